//! Hot-path producers feeding a subscriber in another process through the batching bus.
//!
//! ```text
//! # terminal 1 (as root)
//! cargo run --release --example bus_subscriber -- --group 24 --count 400000
//! # terminal 2 (as root)
//! cargo run --release --example bus_producer -- --group 24 --threads 4 --count 100000
//! ```
//!
//! Each of `--threads` threads inserts `--count` messages with id `<idx>.<thread>` (idx:
//! the group number unless `--idx` says otherwise) and a 64-byte payload whose first 8
//! bytes are the thread number and its sequence number, from 0 (the subscriber checks that
//! every thread's sequence arrives complete and in order). The threads pin themselves to a
//! different CPU every 10000 messages to show that order survives migration. At the end
//! the bus's statistics are printed.
//!
//! By default each thread calls `Bus::insert` (per-CPU shards); with `--lanes` each thread
//! takes its own `Producer` (a ring of its own, no lock: the fastest path) and inserts through it.
//! `--help` lists the options; a value out of range is a usage error (exit status 2).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

#[path = "common/cli.rs"]
#[macro_use]
mod cli;

use cnbus::bus::{Bus, Insert};
use cnbus::codec::{CbId, CnMsg};
use cnbus::sys::{self, Dest};

/// Producer threads inserting numbered messages into the batching bus.
#[derive(Parser)]
#[command(name = "bus_producer")]
struct Args {
    /// Multicast group (12..=32).
    #[arg(long, default_value = "24", value_parser = cli::parse_user_group)]
    group: u32,
    /// Connector idx of the messages (decimal or 0x hex; above 10: 1..=10 belong to the
    /// kernel; default: the group number).
    #[arg(long, value_parser = cli::parse_user_idx)]
    idx: Option<u32>,
    /// Producer threads (1..=1024); thread t sends with val t.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: u32,
    /// Messages per thread (at most 4294967295: the payload's sequence number is 32 bits).
    #[arg(long, default_value = "100000", value_parser = cli::parse_u32)]
    count: u32,
    /// The bus's latency bound in microseconds (0..=1000000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    latency_us: u64,
    /// Busy work between two inserts of a thread, in nanoseconds (a CPU-bound producer
    /// that inserts now and then; 0..=1000000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    work_ns: u64,
    /// Writers never drain at the watermark (`BusBuilder::assist(false)`): only the flusher,
    /// `flush` and shutdown send.
    #[arg(long)]
    no_assist: bool,
    /// Run the bus's flusher under SCHED_FIFO at this priority (1..=99;
    /// `BusBuilder::flusher_realtime`; needs CAP_SYS_NICE).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99))]
    flusher_realtime: Option<u8>,
    /// Insert through one `Producer` (a ring of its own) per thread instead of `Bus::insert`.
    #[arg(long)]
    lanes: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::finish("bus_producer", run(&args))
}

fn run(a: &Args) -> Result<(), cli::Stop> {
    let (group, threads, count, lanes) = (a.group, a.threads, a.count, a.lanes);
    let work = Duration::from_nanos(a.work_ns);
    let idx = a.idx.unwrap_or(group);
    let bus = Bus::builder(Dest::Group(group))
        .max_latency(Duration::from_micros(a.latency_us))
        .assist(!a.no_assist)
        .flusher_realtime(a.flusher_realtime.unwrap_or(0))
        .build()?;
    let ncpu = sys::num_cpus();
    out!(
        "producing {threads} x {count} messages to group {group} from port {} ({})",
        bus.socket().port_id(),
        if lanes {
            format!("{threads} producer lanes")
        } else {
            format!("{} shards", bus.shards())
        }
    )?;
    let payload_len = 64;
    let start = Instant::now();
    // With --lanes: the bytes one lane holds (every lane is the same size).
    let lane_bytes = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let bus = &bus;
                s.spawn(move || {
                    let id = CbId::new(idx, t);
                    let mut payload = [0u8; 64];
                    payload[..4].copy_from_slice(&t.to_ne_bytes());
                    let mut lane = lanes.then(|| bus.producer());
                    for seq in 0..count {
                        if seq % 10_000 == 0 && ncpu > 1 {
                            let _ = sys::pin_current_thread(
                                (t as usize + (seq / 10_000) as usize) % ncpu,
                            );
                        }
                        if !work.is_zero() {
                            let t0 = Instant::now();
                            while t0.elapsed() < work {
                                std::hint::spin_loop();
                            }
                        }
                        payload[4..8].copy_from_slice(&seq.to_ne_bytes());
                        // The default policy blocks while the queue is full: backpressure,
                        // no loss, so an error here is a bug worth stopping for.
                        match &mut lane {
                            Some(p) => p.insert(id, &payload).expect("insert"),
                            None => bus.insert(id, &payload).expect("insert"),
                        }
                    }
                    lane.map(|p| p.capacity_bytes())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("producer thread"))
            .max()
    });
    let inserted = start.elapsed();
    bus.flush()?;
    let st = bus.stats();
    out!(
        "inserted {} in {:.3} s ({:.0} msgs/s), all handed to the kernel after {:.3} s",
        st.inserted,
        inserted.as_secs_f64(),
        st.inserted as f64 / inserted.as_secs_f64().max(1e-9),
        start.elapsed().as_secs_f64()
    )?;
    out!(
        "sent {} messages in {} datagrams ({:.1} msgs/datagram) with {} syscalls; rejected {}, failed {}, blocked {}",
        st.sent_messages,
        st.sent_datagrams,
        st.avg_msgs_per_datagram(),
        st.syscalls,
        st.rejected(),
        st.failed_messages,
        st.blocked
    )?;
    let room = match lane_bytes {
        Some(bytes) => {
            let per_msg = CnMsg::new(CbId::new(idx, 0), vec![0u8; payload_len]).encoded_len();
            format!(
                "a lane holds {bytes} bytes = {} messages of {per_msg} bytes",
                bytes / per_msg
            )
        }
        None => format!("a shard holds {} messages", bus.capacity()),
    };
    out!(
        "queue high-water {} messages ({room}); longest queue delay {:?}; flusher woke {} times",
        st.high_water,
        st.max_queue_delay,
        st.flusher_wakeups
    )?;
    Ok(())
}
