//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::BytesMut;
use cnbus::codec::{messages, ConnectorMessage, Message};
use cnbus::sys::{ConnectorSocket, RecvMeta};

/// Opens a connector socket, or decides what to do when the kernel is not reachable:
/// under CI (`CI` set) that is a failure; on a developer's machine without root the test is
/// skipped with a message on stderr.
pub fn kernel_socket(test: &str) -> Option<ConnectorSocket> {
    match ConnectorSocket::open().and_then(|s| s.join(1).map(|()| s)) {
        Ok(s) => Some(s),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{test}: the kernel connector is required under CI: {e}")
        }
        Err(e) => {
            eprintln!("{test}: SKIPPED, kernel connector not reachable: {e}");
            None
        }
    }
}

/// Receives connector messages from `sock` until `pred` returns true for one of them or
/// `timeout` passes. Returns every message seen, with the datagram's metadata.
pub fn recv_until(
    sock: &ConnectorSocket,
    timeout: Duration,
    mut pred: impl FnMut(&RecvMeta, &ConnectorMessage) -> bool,
) -> Vec<(RecvMeta, ConnectorMessage)> {
    let deadline = Instant::now() + timeout;
    let wake = cnbus::sys::EventFd::new().unwrap();
    let mut seen = Vec::new();
    let mut buf = BytesMut::with_capacity(1 << 16);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = cnbus::sys::poll_read(sock, &wake, Some(left)).unwrap();
        if !r.socket {
            continue;
        }
        buf.reserve(1 << 16);
        let meta = match sock.recv(&mut buf, true) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(cnbus::Error::Overrun { .. }) => continue,
            Err(e) => panic!("recv: {e}"),
        };
        for m in messages(buf.split().freeze()) {
            if let Ok(Message::Connector(c)) = m {
                let done = pred(&meta, &c);
                seen.push((meta, c));
                if done {
                    return seen;
                }
            }
        }
    }
    seen
}

/// A host-unique idx for tests of custom buses: above the kernel's 1..=10 and distinct per
/// test name and process, so parallel tests never hear each other's traffic.
pub fn test_idx(salt: u32) -> u32 {
    0x4000_0000 | ((std::process::id() & 0xffff) << 8) | (salt & 0xff)
}
