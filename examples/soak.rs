//! Stress and soak: producer threads insert through the batching bus while receiver
//! processes on the same group count what arrives. Checks, for every receiver and every
//! producer stream, that delivered + counted-lost = sent and nothing was reordered, and that
//! memory stays flat after warm-up. Exits non-zero if any check fails.
//!
//! ```sh
//! # the documented long run (60 s):
//! cargo run --release --example soak -- --seconds 60 --producers 3 --receivers 3
//! # the CI run:
//! cargo run --release --example soak -- --seconds 10
//! ```
//!
//! Loopback only: everything stays inside this host's netlink. Needs root (multicast).
//! `--help` lists the options; a value out of range is a usage error (exit status 2).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

#[path = "common/cli.rs"]
#[macro_use]
mod cli;

use cnbus::bus::{Bus, FullPolicy};
use cnbus::connector::{Connector, Event, Match};
use cnbus::sys::Dest;
use cnbus::{CbId, CnMsg};
use parking_lot::Mutex;

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Memory is flat when the end RSS is within 10% (and at least 2 MiB) of the warm RSS.
fn flat(warm: u64, end: u64) -> bool {
    end <= warm + (warm / 10).max(2048)
}

/// Longest the producer waits for a receiver to start, and then for its report once the
/// run is over; a receiver that misses either is killed and the soak fails.
const RECEIVER_WAIT: Duration = Duration::from_secs(30);
/// How often the producer sends the totals again until every receiver has reported: the
/// kernel drops them like any message when a receiver's queue is full.
const TOTALS_EVERY: Duration = Duration::from_millis(200);

/// Reads a receiver's stdout on a thread, passing each line (tagged with the receiver's
/// number) to `tx`, so that the producer can wait for it with a deadline.
fn forward_lines(i: usize, child: &mut Child, tx: mpsc::Sender<(usize, String)>) {
    let out = BufReader::new(child.stdout.take().expect("piped stdout"));
    std::thread::spawn(move || {
        for l in out.lines() {
            let Ok(l) = l else { break };
            if tx.send((i, l)).is_err() {
                break;
            }
        }
    });
}

/// Bus producers against receiver processes, checking exact accounting and flat memory.
#[derive(Parser)]
#[command(name = "soak")]
struct Args {
    /// How long the producers run, in seconds (1..=1000000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    seconds: u64,
    /// Producer threads (1..=256), one stream each.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    producers: u32,
    /// Receiver processes (1..=64).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    receivers: u64,
    /// Multicast group (12..=32).
    #[arg(long, default_value = "29", value_parser = cli::parse_user_group)]
    group: u32,
    /// Internal: run as one of the receiver processes.
    #[arg(long, hide = true)]
    receiver: bool,
    /// Internal: the receivers' connector idx.
    #[arg(long, hide = true, default_value = "0", value_parser = cli::parse_u32)]
    idx: u32,
    /// Internal: the producer's port id; the receivers count only its messages.
    #[arg(long, hide = true, default_value = "0", value_parser = cli::parse_u32)]
    from_port: u32,
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.receiver {
        return match receiver(a.idx, a.from_port, a.group, a.seconds) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => cli::finish("soak receiver", Err(e)),
        };
    }
    let idx = 0x5300_0000 | (std::process::id() & 0xffff);
    match run(a.seconds, a.producers, a.receivers, a.group, idx) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => cli::finish("soak", Err(e)),
    }
}

fn run(
    seconds: u64,
    producers: u32,
    receivers: u64,
    group: u32,
    idx: u32,
) -> Result<bool, cli::Stop> {
    // The bus first: its port tells the receivers which messages are the soak's (any root
    // process may send on the group, even replay the soak's own messages).
    let bus = Arc::new(
        Bus::builder(Dest::Group(group))
            .on_full(FullPolicy::Block)
            .build()
            .expect("bus"),
    );
    let port = bus.socket().port_id();
    let exe = std::env::current_exe().expect("own path");
    let (tx, lines) = mpsc::channel();
    let mut children = Vec::new();
    for i in 0..receivers as usize {
        let mut child = Command::new(&exe)
            .args([
                "--receiver",
                "--idx",
                &idx.to_string(),
                "--group",
                &group.to_string(),
            ])
            .args(["--seconds", &seconds.to_string()])
            .args(["--from-port", &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn receiver");
        forward_lines(i, &mut child, tx.clone());
        children.push(child);
        match lines.recv_timeout(RECEIVER_WAIT) {
            Ok((_, l)) if l.trim() == "ready" => {}
            got => {
                for c in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                warn!("soak: receiver {i} did not start within {RECEIVER_WAIT:?}: {got:?}");
                return Ok(false);
            }
        }
    }
    drop(tx);
    out!("soak: {receivers} receivers ready on group {group}, producing for {seconds} s")?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for p in 0..producers {
        let (bus, stop) = (bus.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let id = CbId::new(idx, p + 1);
            let mut seq = 0u32;
            let mut payload = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..256 {
                    seq += 1;
                    payload[..4].copy_from_slice(&seq.to_ne_bytes());
                    let m = CnMsg::new(id, payload.to_vec()).with_seq(seq, 0);
                    if bus.insert_msg(m, FullPolicy::Block).is_err() {
                        seq -= 1;
                    }
                }
            }
            seq
        }));
    }
    let start = Instant::now();
    let warm_at = Duration::from_secs(seconds) / 4;
    let mut warm_rss = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(100));
        if warm_rss == 0 && start.elapsed() >= warm_at {
            warm_rss = rss_kib();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    bus.flush().expect("flush");
    let end_rss = rss_kib();
    // A final message per stream once the receivers have drained, so a loss at the tail
    // shows up as a gap.
    std::thread::sleep(Duration::from_millis(300));
    for (p, n) in sent.iter_mut().enumerate() {
        *n += 1;
        let m = CnMsg::new(CbId::new(idx, p as u32 + 1), vec![0u8; 64]).with_seq(*n, 0);
        bus.insert_msg(m, FullPolicy::Block).expect("final message");
    }
    bus.flush().expect("flush");
    let bus_stats = bus.stats();
    let totals: String = sent
        .iter()
        .enumerate()
        .map(|(p, n)| format!("{}={n} ", p + 1))
        .collect();
    // The totals, from the bus's port like every soak message, on val 0, numbered 1, 2, ...
    // as they are sent again until every receiver has reported (a receiver whose queue was
    // full when they came lost them).
    let mut totals_seq = 0u32;
    let mut send_totals = || {
        totals_seq += 1;
        let m = CnMsg::new(CbId::new(idx, 0), totals.clone().into_bytes()).with_seq(totals_seq, 0);
        bus.insert_msg(m, FullPolicy::Block).expect("totals");
        bus.flush().expect("send totals");
    };
    send_totals();

    let total: u64 = sent.iter().map(|&n| u64::from(n)).sum();
    let secs = start.elapsed().as_secs_f64();
    out!(
        "soak: {producers} producers, {receivers} receivers, {seconds} s: sent {total} messages ({:.2} M msg/s), {:.1} msgs/datagram, producer blocked {} times",
        total as f64 / seconds as f64 / 1e6,
        bus_stats.avg_msgs_per_datagram(),
        bus_stats.blocked
    )?;
    let mut ok = flat(warm_rss, end_rss);
    out!(
        "  producer process RSS: {warm_rss} KiB after warm-up, {end_rss} KiB at the end: {}",
        if ok { "flat" } else { "GREW" }
    )?;
    // Every receiver's report, at most RECEIVER_WAIT away; the totals again meanwhile.
    let mut reports: Vec<Option<String>> = vec![None; children.len()];
    let end = Instant::now() + RECEIVER_WAIT;
    let mut next_totals = Instant::now() + TOTALS_EVERY;
    while reports.iter().any(Option::is_none) && Instant::now() < end {
        let until = next_totals.min(end);
        match lines.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok((i, l)) => reports[i] = Some(l),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every receiver closed its output: the missing reports are failures below.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_totals {
            send_totals();
            next_totals = Instant::now() + TOTALS_EVERY;
        }
    }
    for (i, (mut child, report)) in children.into_iter().zip(reports).enumerate() {
        let Some(line) = report else {
            let _ = child.kill();
            let _ = child.wait();
            ok = false;
            out!("  receiver {i}: no report within {RECEIVER_WAIT:?} after the run (killed)")?;
            continue;
        };
        // It has written its report, its last act: the exit follows (bounded all the same).
        let exit_by = Instant::now().max(end) + Duration::from_secs(5);
        let status = loop {
            match child.try_wait().expect("wait for a receiver") {
                Some(st) => break Some(st),
                None if Instant::now() >= exit_by => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        ok &= status.is_some_and(|st| st.success()) && line.contains("ok=true");
        out!("  receiver {i}: {}", line.trim())?;
    }
    out!("  totals sent {totals_seq} times")?;
    out!("  totals per stream (val=sent): {totals}")?;
    out!(
        "soak {} in {secs:.1} s",
        if ok { "PASSED" } else { "FAILED" }
    )?;
    Ok(ok)
}

/// One receiver process; `Ok(true)` when every check passed. It checks the messages of
/// the producer's port `from` only: others (foreign senders on the group, replays) are
/// counted and left out.
fn receiver(idx: u32, from: u32, group: u32, seconds: u64) -> Result<bool, cli::Stop> {
    let lost: Arc<Mutex<HashMap<u32, u64>>> = Arc::default();
    let own_decode_errors = Arc::new(AtomicU64::new(0));
    let (l, de) = (lost.clone(), own_decode_errors.clone());
    let conn = Connector::builder()
        .recv_buffer(32 << 20)
        .on_event(move |e| match e {
            // The totals' own stream (val 0) is not counted: it is sent until received.
            Event::Lost { port, id, count } if *port == from && id.val != 0 => {
                *l.lock().entry(id.val).or_default() += u64::from(*count);
            }
            Event::Decode { port, .. } if *port == from => {
                de.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        })
        .spawn()
        .expect("receiver connector");
    let _sub = conn.subscribe(group).expect("subscribe");
    let delivered: Arc<Mutex<HashMap<u32, u64>>> = Arc::default();
    // The producer's totals (val -> sent) and, per val, how many of them came after the
    // last message received: lost at the tail, where no later message shows a gap.
    type Totals = (HashMap<u32, u64>, HashMap<u32, u64>);
    let totals: Arc<Mutex<Option<Totals>>> = Arc::default();
    let beyond = Arc::new(AtomicU64::new(0));
    let count = Arc::new(AtomicU64::new(0));
    let foreign = Arc::new(AtomicU64::new(0));
    let reordered = Arc::new(AtomicU64::new(0));
    let (d, t, c, f, r, b) = (
        delivered.clone(),
        totals.clone(),
        count.clone(),
        foreign.clone(),
        reordered.clone(),
        beyond.clone(),
    );
    // Per val: the last seq seen from the producer.
    let mut last: HashMap<u32, u32> = HashMap::new();
    let _reg = conn.register(Match::Idx(idx), move |m| {
        if m.source().port != from {
            f.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(prev) = last.insert(m.id().val, m.seq()) {
            if m.seq() <= prev {
                r.fetch_add(1, Ordering::Relaxed);
            }
        }
        if m.id().val == 0 {
            let mut t = t.lock();
            if t.is_some() {
                return; // sent again for a receiver that lost it
            }
            let text = String::from_utf8_lossy(m.data()).to_string();
            // Anyone may send on the group: what does not parse is left out.
            let map: HashMap<u32, u64> = text
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
                .collect();
            // The producer sent the totals after every other message, from the same socket,
            // and this queue is in order: what has not come by now was dropped, the messages
            // after the last one received of each stream included (counted here, as no
            // later message will show their gap).
            let mut tail = HashMap::new();
            for (&v, &n) in &map {
                let seen = last.get(&v).map_or(0, |&s| u64::from(s));
                if seen > n {
                    b.fetch_add(1, Ordering::Relaxed); // more than was sent: a failure
                }
                tail.insert(v, n.saturating_sub(seen));
            }
            *t = Some((map, tail));
        } else {
            *d.lock().entry(m.id().val).or_default() += 1;
            c.fetch_add(1, Ordering::Relaxed);
        }
    });
    out!("ready")?;
    let start = Instant::now();
    let warm_at = Duration::from_secs(seconds) / 4;
    let mut warm_rss = 0;
    let mut end_rss = 0;
    let parent = std::os::unix::process::parent_id();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if warm_rss == 0 && start.elapsed() >= warm_at {
            warm_rss = rss_kib();
        }
        if start.elapsed() < Duration::from_secs(seconds) {
            end_rss = rss_kib();
        }
        // Once the totals are in, every message before them has been counted.
        if totals.lock().is_some() {
            break;
        }
        // The producer sends the totals until every receiver has reported, and kills the
        // receivers it gave up on; these only guard against a producer that died.
        if std::os::unix::process::parent_id() != parent
            || start.elapsed() > Duration::from_secs(seconds) + RECEIVER_WAIT * 2
        {
            warn!("soak receiver: no totals from the producer: failing");
            break;
        }
    }
    if end_rss == 0 {
        end_rss = rss_kib(); // not scheduled before the end of the run (a starved process)
    }
    if warm_rss == 0 {
        // Its clock never reached the warm-up point (stopped, or starved, from the start of
        // the run until the totals came): no growth to judge, so the baseline is now.
        warm_rss = rss_kib().max(end_rss);
    }
    let s = conn.stats();
    let (expected, tail) = totals.lock().clone().unwrap_or_default();
    let own_reordered = reordered.load(Ordering::Relaxed);
    let own_decode_errors = own_decode_errors.load(Ordering::Relaxed);
    let beyond = beyond.load(Ordering::Relaxed);
    let mut ok = !expected.is_empty() && own_reordered == 0 && own_decode_errors == 0;
    ok &= beyond == 0;
    // A loss the kernel did not count (no dropped datagram) would be a silent one.
    let any_lost = lost.lock().values().any(|&n| n > 0) || tail.values().any(|&n| n > 0);
    ok &= !any_lost || s.kernel_drops.is_none_or(|d| d > 0);
    let mut per = String::new();
    for (v, n) in &expected {
        let got = delivered.lock().get(v).copied().unwrap_or(0);
        let gaps = lost.lock().get(v).copied().unwrap_or(0);
        let tail = tail.get(v).copied().unwrap_or(0);
        ok &= got + gaps + tail == *n;
        per += &format!(
            " [{v}: sent {n} = delivered {got} + lost {} ({gaps} in gaps, {tail} at the tail)]",
            gaps + tail
        );
    }
    ok &= flat(warm_rss, end_rss);
    out!(
        "ok={ok} delivered={} lost={} overruns={} kernel_drops={:?} streams_beyond_totals={beyond} reordered={own_reordered} decode_errors={own_decode_errors} rss_warm={warm_rss}KiB rss_end={end_rss}KiB{per}; from other senders: {} messages ignored, {} decode errors",
        count.load(Ordering::Relaxed),
        lost.lock().values().sum::<u64>() + tail.values().sum::<u64>(),
        s.overruns,
        s.kernel_drops,
        foreign.load(Ordering::Relaxed),
        s.decode_errors - own_decode_errors
    )?;
    Ok(ok)
}
