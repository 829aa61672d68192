//! Prints the kernel's process events on the raw layers: the socket, the codec, and the
//! proc module's pure pieces (`proc::request` to build LISTEN / IGNORE,
//! `ProcEvent::from_kernel` to decode), without a listener.
//!
//! `cargo run --example proc_events` (as root). Stops after 20 events or 10 seconds.
//! `ProcListener` and the `proctrace` tool are the full-featured versions (filtering, loss
//! accounting, namespaces).

use std::time::{Duration, Instant};

use bytes::BytesMut;
use cnbus::codec::{messages, CbId, DatagramBuilder, Message};
use cnbus::proc::{request, McastOp, ProcEvent};
use cnbus::sys::{poll_read, ConnectorSocket, Dest, EventFd};

fn op(sock: &ConnectorSocket, op: McastOp) -> cnbus::Result<()> {
    let mut d = DatagramBuilder::new(64).with_pid(sock.port_id());
    d.push(&request(op, None, 0, sock.port_id()))?;
    sock.send(d.as_bytes(), Dest::Kernel).map(drop)
}

fn main() -> cnbus::Result<()> {
    let sock = ConnectorSocket::open()?;
    sock.join(1)?;
    op(&sock, McastOp::Listen)?;
    let never = EventFd::new()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = BytesMut::new();
    let mut n = 0;
    while n < 20 && Instant::now() < deadline {
        if !poll_read(&sock, &never, Some(Duration::from_millis(200)))?.socket {
            continue;
        }
        buf.reserve(4096);
        let Some(meta) = sock.recv(&mut buf, true)? else {
            continue;
        };
        for m in messages(buf.split().freeze()) {
            let Message::Connector(c) = m? else { continue };
            if c.msg.id != CbId::PROC {
                continue;
            }
            // Rejects anything a user-space process sent (its port is not 0).
            match ProcEvent::from_kernel(meta.port, &c.msg) {
                Ok(ev) => {
                    println!(
                        "[{}] [{}.{}] cpu {} {:?}",
                        c.msg.id, c.msg.seq, c.msg.ack, ev.cpu, ev.body
                    );
                    n += 1;
                }
                Err(e) => eprintln!("not a kernel event: {e}"),
            }
        }
    }
    op(&sock, McastOp::Ignore)
}
