//! Subscriber for `bus_producer`: joins a group, prints the first messages and a count
//! every second, and checks each producer thread's sequence numbers.
//!
//! `cargo run --release --example bus_subscriber -- --group 24 [--count N] [--idle-secs 3]`
//! (as root). Stops after `--count` messages, or when nothing arrived for `--idle-secs`
//! after the first message. Exits with status 1 if a sequence was out of order or had gaps,
//! or if the kernel reported that the receive queue overflowed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;
#[path = "common/args.rs"]
mod args;

use cnbus::codec::{messages, Message};
use cnbus::sys::{poll_read, ConnectorSocket, EventFd};

fn main() -> cnbus::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let group = args::int(&args, "--group").unwrap_or(24) as u32;
    let want = args::int(&args, "--count").unwrap_or(u64::MAX);
    let idle = Duration::from_secs(args::int(&args, "--idle-secs").unwrap_or(3));
    let sock = ConnectorSocket::open()?;
    let rcvbuf = sock.set_recv_buffer(32 << 20, true)?;
    sock.join(group)?;
    println!(
        "listening on group {group} (port {}, receive buffer {rcvbuf} bytes)",
        sock.port_id()
    );
    let never = EventFd::new()?;
    let mut buf = BytesMut::with_capacity(1 << 17);
    // Per producer thread (val): next expected sequence number.
    let mut next: BTreeMap<u32, u32> = BTreeMap::new();
    let (mut total, mut datagrams, mut disorder, mut overruns, mut printed) =
        (0u64, 0u64, 0u64, 0u64, 0);
    let mut first: Option<Instant> = None;
    let mut last_msg = Instant::now();
    let mut last_report = Instant::now();
    while total < want {
        if first.is_some() && last_msg.elapsed() > idle {
            break;
        }
        if poll_read(&sock, &never, Some(Duration::from_millis(200)))?.socket {
            buf.reserve(1 << 17);
            match sock.recv(&mut buf, true) {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(cnbus::Error::Overrun { .. }) => {
                    overruns += 1;
                    eprintln!("receive queue overflowed (ENOBUFS): messages were lost");
                    continue;
                }
                Err(e) => return Err(e),
            }
            datagrams += 1;
            for m in messages(buf.split().freeze()) {
                let Message::Connector(c) = m? else { continue };
                if c.msg.id.idx != group || c.msg.data.len() < 8 {
                    continue;
                }
                let seq = u32::from_ne_bytes(c.msg.data[4..8].try_into().unwrap());
                let n = next.entry(c.msg.id.val).or_insert(0);
                if seq != *n {
                    disorder += 1;
                    if disorder <= 10 {
                        eprintln!(
                            "[{}] thread {}: seq {seq}, expected {n}",
                            c.msg.id, c.msg.id.val
                        );
                    }
                }
                *n = seq.wrapping_add(1);
                if printed < 5 {
                    println!(
                        "[{}] [{}.{}] {} bytes, payload seq {seq}",
                        c.msg.id,
                        c.msg.seq,
                        c.msg.ack,
                        c.msg.data.len()
                    );
                    printed += 1;
                }
                total += 1;
                first.get_or_insert_with(Instant::now);
                last_msg = Instant::now();
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) && total > 0 {
            println!("{total} messages in {datagrams} datagrams so far");
            last_report = Instant::now();
        }
    }
    let secs = first
        .map(|f| last_msg.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    println!(
        "received {total} messages in {datagrams} datagrams ({:.1} per datagram) from {} threads in {secs:.3} s; out of order or missing: {disorder}; overruns: {overruns}",
        total as f64 / datagrams.max(1) as f64,
        next.len()
    );
    for (t, n) in &next {
        println!("  thread {t}: {n} messages");
    }
    if disorder > 0 || overruns > 0 {
        std::process::exit(1);
    }
    Ok(())
}
