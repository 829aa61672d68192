//! Dispatch benchmark: cost per message and delivered messages per second, 64-byte payloads.
//!
//! ```sh
//! cargo bench --bench dispatch
//! ```
//!
//! 1. In memory: parse a datagram of 32 messages and dispatch each to a counting callback,
//!    with the copy-on-write registry cnbus uses and with the alternative it was measured
//!    against (a read lock held across the lookup), idle and while another thread
//!    registers and unregisters continuously.
//! 2. End to end: a sender in another process multicasts 64-byte messages, 32 per
//!    datagram; a `Connector` receives and dispatches them. Reports delivered messages/s,
//!    lost messages and the receiving process's CPU time per message.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cnbus::codec::{messages, DatagramBuilder, Message};
use cnbus::connector::{Connector, Incoming, Registry, Source};
use cnbus::sys::Dest;
use cnbus::{CbId, CnMsg};
use parking_lot::{Mutex, RwLock};

const PAYLOAD: usize = 64;
const PER_DATAGRAM: usize = 32;

fn datagram(id: CbId) -> Bytes {
    let mut b = DatagramBuilder::new(1 << 16);
    for i in 0..PER_DATAGRAM {
        b.push(&CnMsg::new(id, vec![0u8; PAYLOAD]).with_seq(i as u32, 0))
            .unwrap();
    }
    Bytes::from(b.take())
}

type Cb = Arc<Mutex<Box<dyn FnMut(&Incoming) + Send>>>;

/// The alternative design: a `parking_lot` read lock around the lookup.
struct LockedRegistry {
    map: RwLock<HashMap<CbId, Vec<Cb>>>,
}

impl LockedRegistry {
    /// Holds the read lock while calling: cheapest, but a callback that registers (takes
    /// the write lock) deadlocks, so it is shown for reference only.
    fn dispatch_holding(&self, m: &Incoming) {
        let map = self.map.read();
        if let Some(v) = map.get(&m.msg.id) {
            for cb in v {
                (cb.lock())(m);
            }
        }
    }

    /// Copies the matching callbacks out under the read lock, then calls them unlocked.
    fn dispatch_cloning(&self, m: &Incoming) {
        let v: Vec<Cb> = self.map.read().get(&m.msg.id).cloned().unwrap_or_default();
        for cb in v {
            (cb.lock())(m);
        }
    }
}

/// ns per message to parse datagrams of 32 messages and hand each to `f`; `per_datagram`
/// runs once per datagram and its result is passed along (for per-datagram snapshots).
fn per_msg_ns<S>(
    rounds: usize,
    mut per_datagram: impl FnMut() -> S,
    mut f: impl FnMut(&S, &Incoming),
) -> f64 {
    let id = CbId::new(0x5000_0001, 1);
    let d = datagram(id);
    let src = Source { port: 1, group: 0 };
    let t = Instant::now();
    for _ in 0..rounds {
        let s = per_datagram();
        for m in messages(d.clone()) {
            let Ok(Message::Connector(c)) = m else {
                unreachable!()
            };
            f(
                &s,
                &Incoming {
                    msg: c.msg,
                    source: src,
                },
            );
        }
    }
    t.elapsed().as_nanos() as f64 / (rounds * PER_DATAGRAM) as f64
}

fn in_memory() {
    let id = CbId::new(0x5000_0001, 1);
    let rounds = 100_000;
    let count = Arc::new(AtomicU64::new(0));
    println!("in-memory: parse a datagram of {PER_DATAGRAM} x {PAYLOAD} B messages and dispatch each to one counting callback (ns per message)");
    println!(
        "{:<34} {:>8} {:>12} {:>12} {:>14} {:>15}",
        "background", "parse", "cow/datagram", "cow/message", "rwlock+clone", "rwlock held*"
    );
    for churn_pause in [None, Some(Duration::from_micros(100)), Some(Duration::ZERO)] {
        let cow = Registry::new();
        let c = count.clone();
        let _keep = cow.register(id, move |_| {
            c.fetch_add(1, Ordering::Relaxed);
        });
        let locked = Arc::new(LockedRegistry {
            map: RwLock::new(HashMap::new()),
        });
        let c = count.clone();
        let cb: Cb = Arc::new(Mutex::new(Box::new(move |_: &Incoming| {
            c.fetch_add(1, Ordering::Relaxed);
        })));
        locked.map.write().insert(id, vec![cb]);

        let stop = Arc::new(AtomicBool::new(false));
        let churner = churn_pause.map(|pause| {
            let (cow, locked, stop) = (cow.clone(), locked.clone(), stop.clone());
            std::thread::spawn(move || {
                let other = CbId::new(0x5000_0002, 1);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    drop(cow.register(other, |_| {}));
                    let cb: Cb = Arc::new(Mutex::new(Box::new(|_: &Incoming| {})));
                    locked.map.write().insert(other, vec![cb]);
                    locked.map.write().remove(&other);
                    n += 1;
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                }
                n
            })
        });
        let parse = per_msg_ns(rounds, || (), |_, _| {});
        let cow_dgram = per_msg_ns(
            rounds,
            || cow.snapshot(),
            |s, m| {
                s.dispatch(m);
            },
        );
        let cow_msg = per_msg_ns(
            rounds,
            || (),
            |_, m| {
                cow.dispatch(m);
            },
        );
        let cloning = per_msg_ns(rounds, || (), |_, m| locked.dispatch_cloning(m));
        let holding = per_msg_ns(rounds, || (), |_, m| locked.dispatch_holding(m));
        stop.store(true, Ordering::Relaxed);
        let churns = churner.map(|t| t.join().unwrap());
        let label = match (churn_pause, churns) {
            (None, _) => "idle".to_string(),
            (Some(p), Some(n)) if !p.is_zero() => format!("registrations every 100 us ({n})"),
            (_, Some(n)) => format!("registrations nonstop ({n})"),
            _ => unreachable!(),
        };
        println!("{label:<34} {parse:>8.1} {cow_dgram:>12.1} {cow_msg:>12.1} {cloning:>14.1} {holding:>15.1}");
    }
    println!(
        "* holding the read lock while calling deadlocks a callback that registers; reference only"
    );
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the full line: 12 and 13 after the comm.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn sender(group: u32, idx: u32, n: usize) {
    let conn = Connector::builder().recv_buffer(0).spawn().unwrap();
    let id = CbId::new(idx, 1);
    let mut left = n;
    let mut batch = Vec::with_capacity(PER_DATAGRAM * 64);
    while left > 0 {
        batch.clear();
        for _ in 0..(PER_DATAGRAM * 64).min(left) {
            batch.push(CnMsg::new(id, vec![0u8; PAYLOAD]).with_seq(conn.next_seq(id), 0));
        }
        left -= conn.send_batch(&batch, Dest::Group(group)).unwrap();
    }
}

fn end_to_end() {
    let (group, idx, n) = (31, 0x5100_0000 | (std::process::id() & 0xffff), 2_000_000);
    let conn = Connector::builder().recv_buffer(64 << 20).spawn().unwrap();
    let _sub = conn.subscribe(group).unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let _reg = conn.register(CbId::new(idx, 1), move |_| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--sender",
            &group.to_string(),
            &idx.to_string(),
            &n.to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mut last = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = count.load(Ordering::Relaxed) + conn.stats().lost;
        if now == n as u64 || (now == last.0 && last.1.elapsed() > Duration::from_millis(500)) {
            break;
        }
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let s = conn.stats();
    let got = count.load(Ordering::Relaxed);
    println!(
        "end-to-end: {n} messages of {PAYLOAD} B, {PER_DATAGRAM} per datagram, sender in another process: delivered {got} in {secs:.2} s = {:.2} M msg/s; lost {} (overruns {}); receiver CPU {:.0} ns/msg",
        got as f64 / secs / 1e6,
        s.lost,
        s.overruns,
        cpu * 1e9 / got.max(1) as f64,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--sender") {
        let p = |k: usize| args[i + k].parse::<usize>().unwrap();
        sender(p(1) as u32, p(2) as u32, p(3));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` compatibility
    }
    in_memory();
    end_to_end();
}
