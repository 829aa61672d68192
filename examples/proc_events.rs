//! Prints the kernel's process events using only the raw socket and the codec.
//!
//! `cargo run --example proc_events` (as root). Stops after 20 events or 10 seconds.
//! The typed API in `cnbus::proc` and the `proctrace` tool are the full-featured versions.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use cnbus::codec::{messages, CbId, CnMsg, DatagramBuilder, Message};
use cnbus::sys::{poll_read, ConnectorSocket, Dest, EventFd};

fn op(sock: &ConnectorSocket, op: u32) -> cnbus::Result<()> {
    let mut d = DatagramBuilder::new(64).with_pid(sock.port_id());
    d.push(&CnMsg::new(CbId::PROC, op.to_ne_bytes().to_vec()))?;
    sock.send(d.as_bytes(), Dest::Kernel).map(drop)
}

fn main() -> cnbus::Result<()> {
    let sock = ConnectorSocket::open()?;
    sock.join(1)?;
    op(&sock, 1)?; // PROC_CN_MCAST_LISTEN
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
            if !meta.from_kernel() || c.msg.id != CbId::PROC || c.msg.data.len() < 24 {
                continue;
            }
            let d = &c.msg.data;
            let u = |at: usize| u32::from_ne_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
            println!(
                "[{}] [{}.{}] what={:#010x} cpu={} pid={} tgid={}",
                c.msg.id,
                c.msg.seq,
                c.msg.ack,
                u(0),
                u(4) as i32,
                u(16),
                u(20)
            );
            n += 1;
        }
    }
    op(&sock, 2) // PROC_CN_MCAST_IGNORE
}
