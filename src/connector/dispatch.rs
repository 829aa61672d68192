//! The dispatcher thread.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;

use super::ingest::Ingest;
use super::stats::Counters;
use super::{Event, Incoming, Inner};
use crate::sys::poll_read;

/// Datagrams read per wake-up before looking at the shutdown flag again.
const BATCH: usize = 256;

/// Runs until `inner.shutdown` is set and the eventfd signalled.
pub(super) fn run(inner: &Inner) {
    let cap = inner.config.max_datagram;
    let c = &*inner.counters;
    let mut buf = BytesMut::with_capacity(cap * 4);
    let mut ingest = Ingest::new(inner.config.track_seq, inner.config.tracked_streams);
    let mut event = |e: Event| inner.event(e);
    loop {
        let ready = match poll_read(&*inner.socket, &inner.wake, None) {
            Ok(r) => r,
            Err(e) => {
                event(Event::RecvFailed { errno: e.errno() });
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        if ready.wake {
            inner.wake.drain();
        }
        // Acquire: pairs with the Release store in `Connector::stop`.
        if inner.shutdown.load(Ordering::Acquire) {
            return;
        }
        if !ready.socket {
            continue;
        }
        for _ in 0..BATCH {
            match ingest.recv(&inner.socket, &mut buf, cap, c, &mut event) {
                Ok(Some((datagram, meta))) => {
                    // One look at the registry per datagram, not per message.
                    let registry = inner.registry.snapshot();
                    ingest.datagram(c, datagram, meta, |item| match item {
                        Ok(rx) => deliver(inner, &registry, rx),
                        Err(e) => inner.event(e),
                    });
                }
                // Nothing queued, or an overrun/truncation already counted and reported:
                // poll again (an overrun leaves the queue readable, so no wait is lost).
                Ok(None) => break,
                Err(_) => {
                    // Reported as Event::RecvFailed; back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(1));
                    break;
                }
            }
        }
    }
}

/// Hands one message to the request waiting for it, or else to the registry.
fn deliver(inner: &Inner, registry: &super::Snapshot<'_>, rx: Incoming) {
    let c = &inner.counters;
    if inner.pending_count.load(Ordering::Relaxed) > 0 {
        let key = (rx.msg.id, rx.msg.seq, rx.msg.ack);
        let waiter = {
            let mut p = inner.pending.lock();
            let w = p.remove(&key);
            inner.pending_count.store(p.len(), Ordering::Relaxed);
            w
        };
        if let Some(tx) = waiter {
            let _ = tx.try_send(rx);
            Counters::add(&c.replies, 1);
            return;
        }
    }
    let out = registry.dispatch(&rx);
    Counters::add(&c.dispatched, out.delivered as u64);
    if out.delivered == 0 && out.panicked == 0 {
        Counters::add(&c.unmatched, 1);
    }
}
