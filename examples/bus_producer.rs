//! Hot-path producers feeding a subscriber in another process through the batching bus.
//!
//! ```text
//! # terminal 1 (as root)
//! cargo run --release --example bus_subscriber -- --group 24 --count 400000
//! # terminal 2 (as root)
//! cargo run --release --example bus_producer -- --group 24 --threads 4 --count 100000
//! ```
//!
//! Each of `--threads` threads inserts `--count` messages with id `<group>.<thread>` and a
//! 64-byte payload whose first 8 bytes are the thread number and its sequence number (the
//! subscriber checks that every thread's sequence arrives complete and in order). The
//! threads pin themselves to a different CPU every 10000 messages to show that order
//! survives migration. At the end the bus's statistics are printed.
//!
//! By default each thread calls `Bus::insert` (per-CPU shards); with `--lanes` each thread
//! takes its own `Producer` (a lock-free lane, the fastest path) and inserts through it.

use std::time::{Duration, Instant};

#[path = "common/args.rs"]
mod args;

use cnbus::bus::Bus;
use cnbus::codec::CbId;
use cnbus::sys::{self, Dest};

fn main() -> cnbus::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let group = args::int(&args, "--group").unwrap_or(24) as u32;
    let threads = args::int(&args, "--threads").unwrap_or(4) as u32;
    let count = args::int(&args, "--count").unwrap_or(100_000) as u32;
    let latency_us = args::int(&args, "--latency-us").unwrap_or(1000);
    let lanes = args.iter().any(|a| a == "--lanes");
    if !(12..=32).contains(&group) {
        eprintln!("use a group in 12..=32 (lower ones belong to kernel users)");
        std::process::exit(2);
    }
    let bus = Bus::builder(Dest::Group(group))
        .max_latency(Duration::from_micros(latency_us))
        .build()?;
    let ncpu = sys::num_cpus();
    println!(
        "producing {threads} x {count} messages to group {group} from port {} ({})",
        bus.socket().port_id(),
        if lanes {
            format!("{threads} producer lanes")
        } else {
            format!("{} shards", bus.shards())
        }
    );
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let bus = &bus;
            s.spawn(move || {
                let id = CbId::new(group, t);
                let mut payload = [0u8; 64];
                payload[..4].copy_from_slice(&t.to_ne_bytes());
                let mut lane = lanes.then(|| bus.producer());
                for seq in 0..count {
                    if seq % 10_000 == 0 && ncpu > 1 {
                        let _ =
                            sys::pin_current_thread((t as usize + (seq / 10_000) as usize) % ncpu);
                    }
                    payload[4..8].copy_from_slice(&seq.to_ne_bytes());
                    // The default policy blocks while the queue is full: backpressure, no loss.
                    match &mut lane {
                        Some(p) => p.insert(id, &payload).expect("insert"),
                        None => bus.insert(id, &payload).expect("insert"),
                    }
                }
            });
        }
    });
    let inserted = start.elapsed();
    bus.flush()?;
    let st = bus.stats();
    println!(
        "inserted {} in {:.3} s ({:.0} msgs/s), all handed to the kernel after {:.3} s",
        st.inserted,
        inserted.as_secs_f64(),
        st.inserted as f64 / inserted.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "sent {} messages in {} datagrams ({:.1} msgs/datagram) with {} syscalls; rejected {}, failed {}, blocked {}",
        st.sent_messages,
        st.sent_datagrams,
        st.avg_msgs_per_datagram(),
        st.syscalls,
        st.rejected(),
        st.failed_messages,
        st.blocked
    );
    println!(
        "queue high-water {} of {}; longest queue delay {:?}; flusher woke {} times",
        st.high_water, 1024, st.max_queue_delay, st.flusher_wakeups
    );
    Ok(())
}
