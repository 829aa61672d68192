//! Subscriber for `bus_producer`: joins a group, prints the first messages and a count
//! every second, and checks each producer stream's sequence numbers.
//!
//! `cargo run --release --example bus_subscriber -- --group 24 [--count N] [--idle-secs 3]`
//! (as root). A stream is one sender's port and val (a `bus_producer` thread); the first 8
//! payload bytes of its messages are the thread number and a sequence number counting from
//! 0. A jump forward counts the skipped messages as lost, a step back as out of order.
//!
//! The loop is the robust one to copy: a malformed datagram (anyone on the host may send
//! one to the group) is counted as a decode error and skipped, a receive-queue overflow
//! (`ENOBUFS`) and a cut datagram are counted, and reception goes on. Messages of other
//! ids are counted and ignored.
//!
//! Stops once `--count` messages were received, when nothing arrived for
//! `--idle-secs` after the first message, or on SIGINT / SIGTERM, and prints the totals and
//! one line per stream. Exits with status 1 if a stream lost messages or had them out of
//! order, or if the receive queue overflowed. `--help` lists the options.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;

#[path = "common/cli.rs"]
#[macro_use]
mod cli;

use cnbus::codec::{messages, Message};
use cnbus::sys::{poll_read, ConnectorSocket, EventFd, TermSignals};

/// Receives and checks the numbered streams of `bus_producer`.
#[derive(Parser)]
#[command(name = "bus_subscriber")]
struct Args {
    /// Multicast group to join (1..=32).
    #[arg(long, default_value = "24", value_parser = cli::parse_group)]
    group: u32,
    /// Connector idx of the messages (decimal or 0x hex; default: the group number).
    #[arg(long, value_parser = cli::parse_u32)]
    idx: Option<u32>,
    /// Stop once this many messages were received (default: no limit).
    #[arg(long, value_parser = cli::parse_u64)]
    count: Option<u64>,
    /// Stop when nothing arrived for this many seconds after the first message.
    #[arg(long, default_value = "3", value_parser = cli::parse_secs)]
    idle_secs: Duration,
    /// Socket receive buffer (bytes, or with a K, M or G suffix; at most 1G).
    #[arg(long, default_value = "32M", value_parser = cli::parse_size)]
    buffer: usize,
    /// Print the first N messages.
    #[arg(long, value_name = "N", default_value = "5", value_parser = cli::parse_u64)]
    print: u64,
}

/// One sender's stream: (port, val).
#[derive(Default)]
struct Stream {
    received: u64,
    lost: u64,
    out_of_order: u64,
    /// The next sequence number expected.
    next: u32,
}

/// What the loop counted.
#[derive(Default)]
struct Totals {
    received: u64,
    lost: u64,
    out_of_order: u64,
    datagrams: u64,
    overruns: u64,
    decode_errors: u64,
    truncated: u64,
    other_ids: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before any thread starts, so that only the waiter in `run` gets the signals.
    let signals = match TermSignals::block() {
        Ok(s) => s,
        Err(e) => return cli::finish("bus_subscriber", Err(e.into())),
    };
    let mut failed = false;
    let r = run(&args, signals, &mut failed);
    match cli::finish("bus_subscriber", r) {
        c if c == ExitCode::SUCCESS && failed => ExitCode::from(1),
        c => c,
    }
}

fn run(a: &Args, signals: TermSignals, failed: &mut bool) -> Result<(), cli::Stop> {
    let group = a.group;
    let idx = a.idx.unwrap_or(group);
    let sock = ConnectorSocket::open()?;
    let rcvbuf = sock.set_recv_buffer(a.buffer, true)?;
    sock.join(group)?;
    out!(
        "listening on group {group} for idx {idx:#x} (port {}, receive buffer {rcvbuf} bytes)",
        sock.port_id()
    )?;
    // SIGINT / SIGTERM end the loop (through `wake`), with the totals.
    let wake = Arc::new(EventFd::new()?);
    let stopped = Arc::new(AtomicBool::new(false));
    {
        let (wake, stopped) = (wake.clone(), stopped.clone());
        std::thread::spawn(move || {
            signals.wait();
            stopped.store(true, Ordering::SeqCst);
            let _ = wake.wake();
        });
    }
    let mut buf = BytesMut::with_capacity(1 << 17);
    let mut streams: BTreeMap<(u32, u32), Stream> = BTreeMap::new();
    let mut t = Totals::default();
    let mut printed = 0;
    let mut first: Option<Instant> = None;
    let mut last_msg = Instant::now();
    let mut last_report = Instant::now();
    while a.count.is_none_or(|c| t.received < c) && !stopped.load(Ordering::SeqCst) {
        if first.is_some() && last_msg.elapsed() > a.idle_secs {
            break;
        }
        if poll_read(&sock, &wake, Some(Duration::from_millis(200)))?.socket {
            buf.clear();
            buf.reserve(1 << 17);
            let meta = match sock.recv(&mut buf, true) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(cnbus::Error::Overrun { .. }) => {
                    t.overruns += 1;
                    warn!("receive queue overflowed (ENOBUFS): messages were lost");
                    continue;
                }
                Err(cnbus::Error::Truncated { len, .. }) => {
                    t.truncated += 1;
                    warn!("a {len}-byte datagram did not fit the buffer: dropped");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            t.datagrams += 1;
            for m in messages(buf.split().freeze()) {
                let c = match m {
                    Ok(Message::Connector(c)) => c,
                    Ok(_) => continue, // netlink control messages
                    Err(e) => {
                        // The rest of this datagram cannot be parsed; the next one can.
                        t.decode_errors += 1;
                        if t.decode_errors <= 10 {
                            warn!("malformed datagram from port {}: {e}", meta.port);
                        }
                        break;
                    }
                };
                let data = &c.msg.data;
                let (Some(seq), true) = (data.get(4..8), c.msg.id.idx == idx) else {
                    t.other_ids += 1;
                    continue;
                };
                let seq = u32::from_ne_bytes([seq[0], seq[1], seq[2], seq[3]]);
                let s = streams.entry((meta.port, c.msg.id.val)).or_default();
                if seq >= s.next {
                    let gap = u64::from(seq - s.next);
                    if gap > 0 && s.lost == 0 {
                        warn!(
                            "port {} thread {}: seq {seq}, expected {}: {gap} lost",
                            meta.port, c.msg.id.val, s.next
                        );
                    }
                    s.lost += gap;
                    t.lost += gap;
                    s.next = seq.wrapping_add(1);
                } else {
                    s.out_of_order += 1;
                    t.out_of_order += 1;
                    if t.out_of_order <= 10 {
                        warn!(
                            "port {} thread {}: seq {seq} after {}: out of order",
                            meta.port,
                            c.msg.id.val,
                            s.next.wrapping_sub(1)
                        );
                    }
                }
                s.received += 1;
                t.received += 1;
                if printed < a.print {
                    out!(
                        "[{}] [{}.{}] {} bytes from port {}, payload seq {seq}",
                        c.msg.id,
                        c.msg.seq,
                        c.msg.ack,
                        data.len(),
                        meta.port
                    )?;
                    printed += 1;
                }
                first.get_or_insert_with(Instant::now);
                last_msg = Instant::now();
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) && t.received > 0 {
            out!(
                "{} messages in {} datagrams so far",
                t.received,
                t.datagrams
            )?;
            last_report = Instant::now();
        }
    }
    let secs = first
        .map(|f| last_msg.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    out!(
        "received {} messages in {} datagrams ({:.1} per datagram) from {} streams in {secs:.3} s; lost (sequence gaps): {}; out of order: {}; overruns: {}; decode errors: {}; truncated: {}; other ids ignored: {}",
        t.received,
        t.datagrams,
        t.received as f64 / t.datagrams.max(1) as f64,
        streams.len(),
        t.lost,
        t.out_of_order,
        t.overruns,
        t.decode_errors,
        t.truncated,
        t.other_ids
    )?;
    for ((port, val), s) in &streams {
        out!(
            "  port {port} thread {val}: {} received, {} lost, {} out of order",
            s.received,
            s.lost,
            s.out_of_order
        )?;
    }
    *failed = t.lost > 0 || t.out_of_order > 0 || t.overruns > 0;
    Ok(())
}
