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
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    let mut children = Vec::new();
    for _ in 0..receivers {
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
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "receiver did not start: {line}");
        children.push((child, out));
    }

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
    // The totals, from the bus's port like every soak message, on val 0.
    bus.insert_msg(
        CnMsg::new(CbId::new(idx, 0), totals.clone().into_bytes()),
        FullPolicy::Block,
    )
    .expect("totals");
    bus.flush().expect("send totals");

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
    for (i, (mut child, mut out)) in children.into_iter().enumerate() {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let status = child.wait().unwrap();
        let good = status.success() && line.contains("ok=true");
        ok &= good;
        out!("  receiver {i}: {}", line.trim())?;
    }
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
            Event::Lost { port, id, count } if *port == from => {
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
    let totals: Arc<Mutex<Option<HashMap<u32, u64>>>> = Arc::default();
    let count = Arc::new(AtomicU64::new(0));
    let foreign = Arc::new(AtomicU64::new(0));
    let reordered = Arc::new(AtomicU64::new(0));
    let (d, t, c, f, r) = (
        delivered.clone(),
        totals.clone(),
        count.clone(),
        foreign.clone(),
        reordered.clone(),
    );
    // Per val: the last seq seen from the producer.
    let mut last: HashMap<u32, u32> = HashMap::new();
    let _reg = conn.register(Match::Idx(idx), move |m| {
        if m.source.port != from {
            f.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(prev) = last.insert(m.msg.id.val, m.msg.seq) {
            if m.msg.seq <= prev {
                r.fetch_add(1, Ordering::Relaxed);
            }
        }
        if m.msg.id.val == 0 {
            let text = String::from_utf8_lossy(&m.msg.data).to_string();
            // Anyone may send on the group: what does not parse is left out.
            let map = text
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
                .collect();
            *t.lock() = Some(map);
        } else {
            *d.lock().entry(m.msg.id.val).or_default() += 1;
            c.fetch_add(1, Ordering::Relaxed);
        }
    });
    out!("ready")?;
    let start = Instant::now();
    let warm_at = Duration::from_secs(seconds) / 4;
    let mut warm_rss = 0;
    let mut end_rss = 0;
    let mut deadline = None;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if warm_rss == 0 && start.elapsed() >= warm_at {
            warm_rss = rss_kib();
        }
        if start.elapsed() < Duration::from_secs(seconds) {
            end_rss = rss_kib();
        }
        let Some(expected) = totals.lock().clone() else {
            if start.elapsed() > Duration::from_secs(seconds + 60) {
                break; // the producer never reported: fail below
            }
            continue;
        };
        let deadline = *deadline.get_or_insert(Instant::now() + Duration::from_secs(10));
        let done = expected.iter().all(|(v, n)| {
            delivered.lock().get(v).copied().unwrap_or(0) + lost.lock().get(v).copied().unwrap_or(0)
                >= *n
        });
        if done || Instant::now() > deadline {
            break;
        }
    }
    let s = conn.stats();
    let expected = totals.lock().clone().unwrap_or_default();
    let own_reordered = reordered.load(Ordering::Relaxed);
    let own_decode_errors = own_decode_errors.load(Ordering::Relaxed);
    let mut ok = !expected.is_empty() && own_reordered == 0 && own_decode_errors == 0;
    let mut per = String::new();
    for (v, n) in &expected {
        let got = delivered.lock().get(v).copied().unwrap_or(0);
        let gone = lost.lock().get(v).copied().unwrap_or(0);
        ok &= got + gone == *n;
        per += &format!(" [{v}: sent {n} = delivered {got} + lost {gone}]");
    }
    ok &= flat(warm_rss, end_rss);
    out!(
        "ok={ok} delivered={} lost={} overruns={} reordered={own_reordered} decode_errors={own_decode_errors} rss_warm={warm_rss}KiB rss_end={end_rss}KiB{per}; from other senders: {} messages ignored, {} decode errors",
        count.load(Ordering::Relaxed),
        lost.lock().values().sum::<u64>(),
        s.overruns,
        foreign.load(Ordering::Relaxed),
        s.decode_errors - own_decode_errors
    )?;
    Ok(ok)
}
