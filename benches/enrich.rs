//! Enrichment cost per event on the live proc-event stream while this benchmark runs a
//! fork/exec/exit load: the receiving thread's CPU time per event (`getrusage
//! (RUSAGE_THREAD)`) without an enricher, and with one with and without reads at fork;
//! the difference is what enrichment costs.
//!
//! ```sh
//! cargo bench --bench enrich            # root: the proc connector
//! cargo bench --bench enrich -- 5       # seconds per configuration (default 3)
//! ```
//!
//! The load: one thread spawning `/bin/true` (fork, exec, exit) and one forking children
//! that exit at once (fork, exit), as fast as they can. Every event on the host is enriched
//! (as a tracer would). Also printed: wall time inside `enrich()` per kind (on a loaded
//! machine this includes preemption), `/proc` files read per event, and the share of events
//! that needed no read at all.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnbus::proc::{EnrichConfig, Enricher, EventKind, EventSet, ProcListener, Received};

fn load(stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<u64>> {
    let s1 = stop.clone();
    let exec = std::thread::spawn(move || {
        let mut n = 0;
        while !s1.load(Ordering::Relaxed) {
            let _ = Command::new("/bin/true")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status();
            n += 1;
        }
        n
    });
    let fork = std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: the child only calls _exit; the parent reaps it.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
            if pid > 0 {
                let mut st = 0;
                // SAFETY: reaps our own child.
                unsafe { libc::waitpid(pid, &mut st, 0) };
                n += 1;
            }
        }
        n
    });
    vec![exec, fork]
}

/// This thread's user + system CPU time.
fn thread_cpu() -> Duration {
    // SAFETY: rusage is plain data; all-zero is valid, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid for writes.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `None`: no enricher (the baseline); `Some(read_at_fork)`.
fn run(seconds: u64, mode: Option<bool>) {
    let mut l = ProcListener::builder()
        .events(EventSet::FORK | EventSet::EXEC | EventSet::EXIT)
        .open()
        .expect("proc listener (run as root)");
    let read_at_fork = mode.unwrap_or(false);
    let mut e = Enricher::with_config(EnrichConfig {
        read_at_fork,
        ..EnrichConfig::default()
    });
    let cpu0 = thread_cpu();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(stop.clone());
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut per_kind: BTreeMap<EventKind, (u64, Duration)> = BTreeMap::new();
    let (mut lost, mut no_read) = (0u64, 0u64);
    while Instant::now() < end {
        match l.recv_timeout(Some(Duration::from_millis(100))).unwrap() {
            Some(Received::Event(ev)) if mode.is_none() => {
                per_kind.entry(ev.kind()).or_default().0 += 1;
            }
            Some(Received::Event(ev)) => {
                let reads = e.stats().proc_reads + e.stats().proc_read_failures;
                let t = Instant::now();
                let info = e.enrich(&ev);
                let dt = t.elapsed();
                std::hint::black_box(info);
                if e.stats().proc_reads + e.stats().proc_read_failures == reads {
                    no_read += 1;
                }
                let k = per_kind.entry(ev.kind()).or_default();
                k.0 += 1;
                k.1 += dt;
            }
            Some(Received::Lost(_)) => {
                lost += 1;
                e.note_loss();
            }
            None => {}
        }
    }
    let cpu = thread_cpu() - cpu0;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let st = e.stats();
    let (n, total) = per_kind
        .values()
        .fold((0u64, Duration::ZERO), |(n, d), (k, t)| (n + k, d + *t));
    let name = match mode {
        None => "no enricher".to_string(),
        Some(r) => format!("read_at_fork={r}"),
    };
    println!(
        "{name}: {n} events, receiving thread {:.2} µs CPU/event; in enrich() {:.2} µs/event \
         (wall), {:.2} /proc files/event, {:.0} % of events with no read, loss reports {lost}",
        cpu.as_secs_f64() * 1e6 / n.max(1) as f64,
        total.as_secs_f64() * 1e6 / n.max(1) as f64,
        (st.proc_reads + st.proc_read_failures) as f64 / n.max(1) as f64,
        no_read as f64 * 100.0 / n.max(1) as f64,
    );
    if mode.is_none() {
        return;
    }
    for (k, (c, t)) in &per_kind {
        println!(
            "  {k:<5} {c:>8} events  {:.2} µs/event",
            t.as_secs_f64() * 1e6 / (*c).max(1) as f64
        );
    }
    println!("  {st:?}");
}

fn main() {
    let seconds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    run(seconds, None);
    run(seconds, Some(false));
    run(seconds, Some(true));
}
