//! Benchmark of the batching bus (`cargo bench --bench bus`, as root).
//!
//! One run measures, with 64-byte payloads and one receiver in another process (this
//! binary re-executed with `--receiver`):
//!
//! 1. insert cost per message with the flusher running, 1 thread and 2 threads, through
//!    `Bus::insert` and through a `Producer` per thread: bursts of 1000 inserts are timed
//!    (median and p99 of the per-message cost), the bus is flushed between bursts outside
//!    the timed region; then single-message latency: one message at a time into an idle
//!    bus with the default `max_latency` (1 ms), from the insert to its arrival at a
//!    receiver (median, p90, max; phase `l`);
//! 2. end-to-end delivered messages/s, each mode for `BENCH_SECS` seconds (default 1), in
//!    `BENCH_ROUNDS` rounds (default 5) that interleave the modes:
//!    (a) the bus, batched, through `Bus::insert` (32 messages of 64 B per datagram by
//!    default, `BENCH_PER_DGRAM` to change it for (a), (p) and (c) alike; many datagrams
//!    per `sendmmsg`), (p) the same through a `Producer`,
//!    (b) one message per `send` system call on its own socket, (c) a raw
//!    libc loop that builds the same datagrams (32 x 64 B) and sends them with `sendmmsg`,
//!    with no library around it.
//!
//! "Delivered" means counted by the receiver process, which reports when it sees the
//! phase's end marker; the rate is delivered messages over the time from the start of the
//! phase to that report. For (a), (p) and (c) the producer thread's user and system CPU time
//! per message are printed too (`getrusage(RUSAGE_THREAD)`).
//!
//! The ratios to the raw loop are computed per round (the modes of a round run back to
//! back, so a change in the machine's load hits them alike) and their median is printed.
//!
//! Knobs: `BENCH_ONLY` (phases, default `ilapbc`), `BENCH_SECS`, `BENCH_ROUNDS`, `BENCH_PER_DGRAM`,
//! `BENCH_CAPACITY`, `BENCH_WATERMARK`, `BENCH_BATCH`, `BENCH_ASSIST=0` (no
//! producer-assisted draining in (a) and (p)), `BENCH_PRODUCER_CPU`,
//! `BENCH_DEBUG` (print the bus statistics of (a) and (p)).

use std::io::{BufRead, BufReader, Write};
use std::mem;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cnbus::bus::{Bus, FullPolicy, Insert};
use cnbus::codec::{CbId, CnMsg, DatagramBuilder};
use cnbus::sys::{ConnectorSocket, Dest};

const GROUP: u32 = 31;
const PAYLOAD: usize = 64;
/// Encoded size of one 64-byte message: 16 (nlmsghdr) + 20 (cn_msg) + 64.
const MSG_LEN: usize = 100;
/// Messages per datagram, for the bus and the raw loop alike (`BENCH_PER_DGRAM`,
/// default 32).
fn per_dgram() -> usize {
    std::env::var("BENCH_PER_DGRAM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}
const BATCH: usize = 64;
const END_VAL: u32 = u32::MAX;
const QUIT_VAL: u32 = u32::MAX - 1;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--receiver") {
        let idx: u32 = args[i + 1].parse().unwrap();
        receiver(idx);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let phase_len = Duration::from_secs_f64(secs);
    let idx = 0x4b00_0000 | (std::process::id() & 0xffff);
    // BENCH_ONLY=a (or b, c, i): run only those phases, for profiling.
    let only = std::env::var("BENCH_ONLY").unwrap_or_else(|_| "ilapbc".into());
    let run = |p: char| only.contains(p);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--receiver", &idx.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn receiver");
    let (tx, lines) = mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(10)).unwrap(),
        "ready"
    );
    let ctl = ConnectorSocket::open().unwrap();
    let end_phase = |phase: u32| -> (u64, u64) {
        // Resend the marker until the receiver answers (a marker can be lost to an
        // overrun like any message).
        for _ in 0..50 {
            let mut d = DatagramBuilder::new(256);
            d.push(&CnMsg::new(
                CbId::new(idx, END_VAL),
                phase.to_ne_bytes().to_vec(),
            ))
            .unwrap();
            ctl.send(d.as_bytes(), Dest::Group(GROUP)).unwrap();
            if let Ok(l) = lines.recv_timeout(Duration::from_millis(500)) {
                let f: Vec<u64> = l
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // An answer for another phase comes from a foreign message that looked like
                // our marker (a busy host's noise on the group): ignore it.
                if let [p, got, over] = f[..] {
                    if p == u64::from(phase) {
                        return (got, over);
                    }
                }
            }
        }
        panic!("receiver did not answer for phase {phase}");
    };

    println!("cnbus bus benchmark: 64-byte payloads, receiver in another process (pid {}), {secs} s per throughput phase", child.id());
    println!(
        "machine: {} CPUs available; {} messages of 64 B per datagram for (a) and (c)",
        cnbus::sys::num_cpus(),
        per_dgram()
    );

    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();

    // 1. Insert cost, with the flusher running.
    if run('i') {
        let bus = bench_bus();
        for (via, name) in [(false, "Bus::insert"), (true, "Producer::insert")] {
            for threads in [1usize, 2] {
                let dur = phase_len.min(Duration::from_secs(1));
                let per_thread = insert_cost(&bus, idx, threads, dur, via);
                let mut all: Vec<f64> = per_thread.into_iter().flatten().collect();
                all.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let med = all[all.len() / 2];
                let p99 = all[all.len() * 99 / 100];
                println!(
                    "insert cost, {name:<16}, {threads} thread(s): median {med:.1} ns/msg, p99 {p99:.1} ns/msg ({} bursts of 1000)",
                    all.len()
                );
            }
        }
        let st = bus.stats();
        let (delivered, overruns) = end_phase(0);
        println!(
            "  (insert phases: {} inserted, {delivered} delivered, {overruns} receiver overruns, {:.1} msgs/datagram)",
            st.inserted,
            st.avg_msgs_per_datagram()
        );
    }
    // 1b. Single-message latency on an idle bus.
    if run('l') {
        for (via, name) in [(false, "Bus::insert"), (true, "Producer")] {
            let mut l = latency(idx, 200, via);
            l.sort();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            println!(
                "single-message latency, {name:<11}, idle bus, max_latency 1 ms: median {:.0} us, p90 {:.0} us, max {:.0} us ({} messages, each after 3 ms idle)",
                us(l[l.len() / 2]),
                us(l[l.len() * 9 / 10]),
                us(l[l.len() - 1]),
                l.len()
            );
        }
    }
    // 2. End-to-end rates, in rounds that interleave the modes (BENCH_ROUNDS, default 5),
    // so that a change in the machine's load hits every mode alike; the ratios are
    // computed per round and their median is reported.
    let rounds: u32 = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .clamp(1, 20);
    println!("end-to-end delivered rate (messages/s), one producer thread, {rounds} round(s):");
    if let Some(c) = std::env::var("BENCH_PRODUCER_CPU")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cnbus::sys::pin_current_thread(c).unwrap();
    }
    let mut rates: [Vec<f64>; 4] = Default::default();
    for round in 0..rounds {
        for (k, phase) in ['a', 'p', 'b', 'c'].into_iter().enumerate() {
            // Every mode in every round, (b) included, so that each ratio is a median of
            // per-round ratios.
            if !run(phase) {
                continue;
            }
            // A val per round and mode: the receiver counts each apart.
            let val = 1 + round * 4 + k as u32;
            let cpu0 = thread_cpu();
            let t = Instant::now();
            let (n, detail) = match phase {
                'a' | 'p' => bus_phase(phase == 'p', CbId::new(idx, val), phase_len),
                'b' => (one_per_send(CbId::new(idx, val), phase_len), String::new()),
                _ => (raw_loop(idx, val, phase_len), String::new()),
            };
            let cpu = cpu_per_msg(cpu0, n);
            let (deliv, over) = end_phase(val);
            let r = rate(deliv, t.elapsed());
            rates[k].push(r);
            let name = match phase {
                'a' => "bus insert()",
                'p' => "bus Producer",
                'b' => "one per send()",
                _ => "raw sendmmsg",
            };
            println!(
                "  [{round}] ({phase}) {name:<15} {r:>12.0}  (sent {n}, delivered {deliv}, receiver overruns {over}{detail})"
            );
            if phase != 'b' {
                println!("             {cpu}");
            }
        }
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let ratios = |x: usize, y: usize| -> Vec<f64> {
        let n = rates[x].len().min(rates[y].len());
        (0..n).map(|i| rates[x][i] / rates[y][i]).collect()
    };
    for (x, name, target) in [
        (0, "bus insert()", "target >= 20x"),
        (1, "bus Producer", "target >= 20x"),
        (3, "raw sendmmsg", "what batching alone gains on this host"),
    ] {
        let r = ratios(x, 2);
        if !r.is_empty() {
            let each: Vec<String> = r.iter().map(|v| format!("{v:.1}")).collect();
            println!(
                "  ratio {name} / one-per-send = {:.1}x median ({target}; per round: {})",
                median(r.clone()),
                each.join(", ")
            );
        }
    }
    for (x, name, target) in [(0, "bus insert()", 0.85), (1, "bus Producer", 0.9)] {
        let r = ratios(x, 3);
        if !r.is_empty() {
            let each: Vec<String> = r.iter().map(|v| format!("{v:.2}")).collect();
            println!(
                "  ratio {name} / raw loop = {:.2}x median (target >= {target}x; per round: {})",
                median(r.clone()),
                each.join(", ")
            );
        }
    }

    let mut d = DatagramBuilder::new(256);
    d.push(&CnMsg::new(CbId::new(idx, QUIT_VAL), &b"q"[..]))
        .unwrap();
    let _ = ctl.send(d.as_bytes(), Dest::Group(GROUP));
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Inserts 64-byte messages through `Bus::insert` (or a `Producer`) for `dur`, then
/// flushes. Returns the messages inserted and a summary of the bus's statistics.
fn bus_phase(via_producer: bool, id: CbId, dur: Duration) -> (u64, String) {
    let bus = bench_bus();
    let mut p = [7u8; PAYLOAD];
    let t = Instant::now();
    let mut n = 0u64;
    if via_producer {
        let mut prod = bus.producer();
        while t.elapsed() < dur {
            for _ in 0..1000 {
                p[..8].copy_from_slice(&n.to_ne_bytes());
                prod.insert(id, &p).unwrap();
                n += 1;
            }
        }
    } else {
        while t.elapsed() < dur {
            for _ in 0..1000 {
                p[..8].copy_from_slice(&n.to_ne_bytes());
                bus.insert(id, &p).unwrap();
                n += 1;
            }
        }
    }
    bus.flush().unwrap();
    let st = bus.stats();
    if std::env::var("BENCH_DEBUG").is_ok() {
        println!("      {st:?}");
    }
    let detail = format!(
        "; {:.1} msgs/datagram, {:.0} msgs/syscall, blocked {} times, {:.0}% sent by producer-assisted drains",
        st.avg_msgs_per_datagram(),
        st.avg_msgs_per_syscall(),
        st.blocked,
        100.0 * st.assisted_messages as f64 / st.sent_messages.max(1) as f64
    );
    (n, detail)
}

/// One message per `send` system call through the library's socket, for `dur`. Returns
/// the messages sent.
fn one_per_send(id: CbId, dur: Duration) -> u64 {
    let sock = ConnectorSocket::open().unwrap();
    let mut p = [7u8; PAYLOAD];
    let t = Instant::now();
    let mut m = 0u64;
    let mut d = DatagramBuilder::new(256).with_pid(sock.port_id());
    while t.elapsed() < dur {
        for _ in 0..100 {
            p[..8].copy_from_slice(&m.to_ne_bytes());
            d.clear();
            d.push(&CnMsg::new(id, p.to_vec())).unwrap();
            sock.send(d.as_bytes(), Dest::Group(GROUP)).unwrap();
            m += 1;
        }
    }
    m
}

/// The bus under test: datagrams of `per_dgram()` messages of 64 B, as the raw loop
/// builds.
/// This thread's CPU time so far: (user, system).
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: rusage is plain data; all-zero is valid, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// "user U ns + system S ns": the calling thread's CPU time per message since `from`.
fn cpu_per_msg(from: (Duration, Duration), msgs: u64) -> String {
    let (u, s) = thread_cpu();
    let per = |d: Duration| d.as_nanos() as f64 / msgs.max(1) as f64;
    format!(
        "producer CPU per message: user {:.1} ns + system {:.1} ns",
        per(u - from.0),
        per(s - from.1)
    )
}

fn bench_bus() -> Bus {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let cap = env("BENCH_CAPACITY", 4096);
    Bus::builder(Dest::Group(GROUP))
        .datagram_size(per_dgram() * MSG_LEN)
        .capacity(cap)
        // The raw loop's batching by default: a drain at the watermark makes one
        // `sendmmsg` of BATCH datagrams of `per_dgram()` messages, as (c) does.
        .watermark(env("BENCH_WATERMARK", BATCH * per_dgram()))
        .max_batch(env("BENCH_BATCH", BATCH))
        .on_full(FullPolicy::Block)
        .assist(env("BENCH_ASSIST", 1) != 0)
        .build()
        .unwrap()
}

/// Timed bursts of 1000 inserts per thread; returns ns/message per burst, per thread.
fn insert_cost(
    bus: &Bus,
    idx: u32,
    threads: usize,
    dur: Duration,
    via_producer: bool,
) -> Vec<Vec<f64>> {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let id = CbId::new(idx, 100 + t as u32);
                    let p = [7u8; PAYLOAD];
                    let mut samples = Vec::new();
                    let mut producer = bus.producer();
                    barrier.wait();
                    let start = Instant::now();
                    while start.elapsed() < dur {
                        let t0 = Instant::now();
                        if via_producer {
                            for _ in 0..1000 {
                                producer.insert(id, &p).unwrap();
                            }
                        } else {
                            for _ in 0..1000 {
                                bus.insert(id, &p).unwrap();
                            }
                        }
                        samples.push(t0.elapsed().as_nanos() as f64 / 1000.0);
                        // Let the flusher catch up outside the timed region.
                        bus.flush().unwrap();
                    }
                    samples
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Single-message latency: one message at a time into an idle bus with the default
/// configuration (`max_latency` 1 ms), from the insert to its arrival at a unicast
/// receiver in this process.
fn latency(idx: u32, samples: usize, via_producer: bool) -> Vec<Duration> {
    let rx = ConnectorSocket::open().unwrap();
    rx.set_recv_buffer(1 << 20, false).unwrap();
    let bus = Bus::new(Dest::Port(rx.port_id())).unwrap();
    let mut producer = bus.producer();
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut out = Vec::new();
    for i in 0..samples as u32 {
        std::thread::sleep(Duration::from_millis(3));
        let t = Instant::now();
        let id = CbId::new(idx, 7);
        if via_producer {
            producer.insert(id, &i.to_ne_bytes()).unwrap();
        } else {
            bus.insert(id, &i.to_ne_bytes()).unwrap();
        }
        buf.clear();
        buf.reserve(1 << 16);
        rx.recv(&mut buf, false)
            .unwrap()
            .expect("a blocking recv returns a datagram");
        out.push(t.elapsed());
    }
    out
}

/// Sends 32-message datagrams, 64 per `sendmmsg`, for `dur`, straight through libc.
/// Returns the messages sent.
fn raw_loop(idx: u32, val: u32, dur: Duration) -> u64 {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 11) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_nl is plain data; all-zero is valid (port 0 = kernel assigns).
    let mut local: libc::sockaddr_nl = unsafe { mem::zeroed() };
    local.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `local` is a valid sockaddr_nl and its size is passed.
    let r = unsafe {
        libc::bind(
            fd,
            (&local as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let mut dst: libc::sockaddr_nl = unsafe { mem::zeroed() };
    dst.nl_family = libc::AF_NETLINK as u16;
    dst.nl_groups = 1 << (GROUP - 1);

    let per = per_dgram();
    let dgram = per * MSG_LEN;
    let mut buf = vec![0u8; BATCH * dgram];
    let mut seq = 0u64;
    let mut sent = 0u64;
    let start = Instant::now();
    while start.elapsed() < dur {
        // Build the batch: BATCH datagrams of `per` messages each.
        for (i, m) in buf.chunks_exact_mut(MSG_LEN).enumerate() {
            let _ = i;
            m[0..4].copy_from_slice(&(MSG_LEN as u32).to_ne_bytes()); // nlmsg_len
            m[4..6].copy_from_slice(&3u16.to_ne_bytes()); // NLMSG_DONE
            m[6..8].copy_from_slice(&0u16.to_ne_bytes());
            m[8..12].copy_from_slice(&(seq as u32).to_ne_bytes());
            m[12..16].copy_from_slice(&0u32.to_ne_bytes());
            m[16..20].copy_from_slice(&idx.to_ne_bytes());
            m[20..24].copy_from_slice(&val.to_ne_bytes());
            m[24..28].copy_from_slice(&(seq as u32).to_ne_bytes());
            m[28..32].copy_from_slice(&0u32.to_ne_bytes());
            m[32..34].copy_from_slice(&(PAYLOAD as u16).to_ne_bytes());
            m[34..36].copy_from_slice(&0u16.to_ne_bytes());
            m[36..44].copy_from_slice(&seq.to_ne_bytes());
            m[44..100].fill(7);
            seq += 1;
        }
        let mut iov: Vec<libc::iovec> = buf
            .chunks_exact_mut(dgram)
            .map(|d| libc::iovec {
                iov_base: d.as_mut_ptr().cast(),
                iov_len: d.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is valid.
        let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { mem::zeroed() }; BATCH];
        for (h, v) in hdrs.iter_mut().zip(iov.iter_mut()) {
            h.msg_hdr.msg_name = (&mut dst as *mut libc::sockaddr_nl).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as u32;
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        let mut off = 0;
        while off < BATCH {
            // SAFETY: every header points at `dst` and at one iovec over `buf`, all alive
            // for the call; the count passed is the number of headers from `off`.
            let r =
                unsafe { libc::sendmmsg(fd, hdrs[off..].as_mut_ptr(), (BATCH - off) as u32, 0) };
            assert!(r > 0, "sendmmsg: {}", std::io::Error::last_os_error());
            off += r as usize;
        }
        sent += (BATCH * per) as u64;
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    sent
}

/// The receiver process: counts messages of `idx` per phase (`val`), answers each phase's
/// end marker with "phase delivered overruns".
fn receiver(idx: u32) {
    let sock = ConnectorSocket::open().unwrap();
    sock.set_recv_buffer(64 << 20, true).unwrap();
    sock.join(GROUP).unwrap();
    let mut out = std::io::stdout();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    // Counts per val; vals are small (phases 0..=80, insert threads 100..=101).
    let mut counts = [0u64; 128];
    let mut answered = std::collections::HashSet::<u32>::new();
    let mut overruns = 0u64;
    let mut buf = BytesMut::with_capacity(1 << 16);
    let _ = sock.as_raw_fd();
    loop {
        buf.clear();
        buf.reserve(1 << 16);
        match sock.recv(&mut buf, false) {
            Ok(Some(_)) => {}
            Ok(None) => continue,
            Err(cnbus::Error::Overrun { .. }) => {
                overruns += 1;
                continue;
            }
            Err(e) => panic!("receiver: {e}"),
        }
        // Walk the netlink messages by hand: the cheapest possible consumer.
        let b = &buf[..];
        let mut at = 0;
        while at + 36 <= b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            if len < 36 || at + len > b.len() {
                break;
            }
            let i = u32::from_ne_bytes(b[at + 16..at + 20].try_into().unwrap());
            let v = u32::from_ne_bytes(b[at + 20..at + 24].try_into().unwrap());
            if i == idx {
                match v {
                    QUIT_VAL => return,
                    END_VAL if len >= 40 => {
                        let phase = u32::from_ne_bytes(b[at + 36..at + 40].try_into().unwrap());
                        let got = counts[phase as usize % 128]
                            + if phase == 0 {
                                counts[100] + counts[101]
                            } else {
                                0
                            };
                        if answered.insert(phase) {
                            writeln!(out, "{phase} {got} {overruns}").unwrap();
                            out.flush().unwrap();
                            overruns = 0;
                        }
                    }
                    _ => counts[v as usize % 128] += 1,
                }
            }
            at += (len + 3) & !3;
        }
    }
}
