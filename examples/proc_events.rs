//! Prints the kernel's process events on the raw layers: the socket, the codec, and the
//! proc module's pure pieces (`proc::request` to build LISTEN / IGNORE,
//! `ProcEvent::from_kernel` to decode), without a listener.
//!
//! `cargo run --example proc_events [-- --count 20 --seconds 10 --buffer 1M]` (as root).
//! Stops after `--count` events, after `--seconds`, or on SIGINT / SIGTERM, sends IGNORE,
//! and prints what it counted. `ProcListener` and the `proctrace` tool are the
//! full-featured versions (filtering, exact loss accounting, namespaces).
//!
//! The loop is the robust one to copy: any root process can multicast on group 1, so a
//! malformed datagram is counted as a decode error and skipped, an event not sent by the
//! kernel is counted as spoofed and dropped, and a receive-queue overflow (`ENOBUFS`: the
//! kernel dropped events) or a datagram cut to the buffer is counted; reception goes on.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;

#[path = "common/cli.rs"]
#[macro_use]
mod cli;

use cnbus::codec::{messages, CbId, DatagramBuilder, Message};
use cnbus::proc::{request, McastOp, ProcEvent, Rejected};
use cnbus::sys::{poll_read, ConnectorSocket, Dest, EventFd, TermSignals};

/// Prints process events from the proc connector, on the raw socket and codec.
#[derive(Parser)]
#[command(name = "proc_events")]
struct Args {
    /// Stop after this many events.
    #[arg(long, default_value = "20", value_parser = cli::parse_u64)]
    count: u64,
    /// Stop after this many seconds (fractions allowed).
    #[arg(long, default_value = "10", value_parser = cli::parse_secs)]
    seconds: Duration,
    /// Socket receive buffer (bytes, or with a K, M or G suffix; default: the system's).
    #[arg(long, value_parser = cli::parse_size)]
    buffer: Option<usize>,
}

/// What the loop counted.
#[derive(Default)]
struct Counts {
    events: u64,
    overruns: u64,
    truncated: u64,
    decode_errors: u64,
    spoofed: u64,
    other_ids: u64,
}

fn op(sock: &ConnectorSocket, op: McastOp) -> cnbus::Result<()> {
    let mut d = DatagramBuilder::new(64).with_pid(sock.port_id());
    d.push(&request(op, None, 0, sock.port_id()))?;
    sock.send(d.as_bytes(), Dest::Kernel).map(drop)
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before any thread starts, so that only the waiter below gets the signals.
    let signals = match TermSignals::block() {
        Ok(s) => s,
        Err(e) => return cli::finish("proc_events", Err(e.into())),
    };
    cli::finish("proc_events", run(&args, signals))
}

fn run(a: &Args, signals: TermSignals) -> Result<(), cli::Stop> {
    let sock = ConnectorSocket::open()?;
    if let Some(b) = a.buffer {
        sock.set_recv_buffer(b, true)?;
    }
    sock.join(1)?;
    op(&sock, McastOp::Listen)?;
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
    let mut c = Counts::default();
    // Whatever ends the loop, IGNORE is sent: the kernel counts its listeners.
    let r = receive(a, &sock, &wake, &stopped, &mut c);
    let ignored = op(&sock, McastOp::Ignore);
    r?;
    ignored?;
    out!(
        "{} events; overruns (ENOBUFS): {}; decode errors: {}; spoofed (not from the kernel): {}; other ids: {}; truncated: {}",
        c.events,
        c.overruns,
        c.decode_errors,
        c.spoofed,
        c.other_ids,
        c.truncated
    )
}

fn receive(
    a: &Args,
    sock: &ConnectorSocket,
    wake: &EventFd,
    stopped: &AtomicBool,
    c: &mut Counts,
) -> Result<(), cli::Stop> {
    out!(
        "listening for process events on group 1 (port {}, receive buffer {} bytes)",
        sock.port_id(),
        sock.recv_buffer()?
    )?;
    // parse_secs caps the duration, so this cannot overflow.
    let deadline = Instant::now() + a.seconds;
    let mut buf = BytesMut::new();
    while c.events < a.count && !stopped.load(Ordering::SeqCst) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if !poll_read(sock, wake, Some(left))?.socket {
            continue;
        }
        buf.clear();
        buf.reserve(4096);
        let meta = match sock.recv(&mut buf, true) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(cnbus::Error::Overrun { .. }) => {
                c.overruns += 1;
                warn!("receive queue overflowed (ENOBUFS): the kernel dropped events");
                continue;
            }
            Err(cnbus::Error::Truncated { .. }) => {
                c.truncated += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for m in messages(buf.split().freeze()) {
            let msg = match m {
                Ok(Message::Connector(m)) => m,
                Ok(_) => continue, // netlink control messages
                Err(e) => {
                    // The rest of this datagram cannot be parsed; the next one can.
                    c.decode_errors += 1;
                    warn!("malformed datagram from port {}: {e}", meta.port);
                    break;
                }
            };
            if msg.msg.id != CbId::PROC {
                c.other_ids += 1;
                continue;
            }
            // Rejects anything a user-space process sent (its port is not 0).
            match ProcEvent::from_kernel(meta.port, &msg.msg) {
                Ok(ev) => {
                    let pid = ev.task().map_or(0, |t| t.tgid);
                    out!(
                        "[{}] [{}.{}] cpu {} {} pid {pid}: {:?}",
                        msg.msg.id,
                        msg.msg.seq,
                        msg.msg.ack,
                        ev.cpu,
                        ev.kind().name(),
                        ev.body
                    )?;
                    c.events += 1;
                }
                Err(Rejected::Decode(e)) => {
                    c.decode_errors += 1;
                    warn!("malformed proc event: {e}");
                }
                Err(e) => {
                    c.spoofed += 1;
                    warn!("not a kernel event: {e}");
                }
            }
        }
    }
    Ok(())
}
