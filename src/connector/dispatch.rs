//! The dispatcher thread.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::loss::{SeqTracker, SeqVerdict};
use super::stats::Counters;
use super::{Event, Inner, Received, Source};
use crate::codec::{messages, Message};
use crate::error::Error;
use crate::sys::{poll_read, RecvMeta};

/// Datagrams read per wake-up before looking at the shutdown flag again.
const BATCH: usize = 256;

/// Runs until `inner.shutdown` is set and the eventfd signalled.
pub(super) fn run(inner: &Inner) {
    inner.registry.set_dispatch_thread();
    let cap = inner.config.max_datagram;
    let mut buf = BytesMut::with_capacity(cap * 4);
    let mut tracker = SeqTracker::new(inner.config.tracked_streams);
    loop {
        let ready = match poll_read(&*inner.socket, &inner.wake, None) {
            Ok(r) => r,
            Err(e) => {
                inner.event(Event::RecvFailed { errno: e.errno() });
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
            buf.reserve(cap);
            match inner.socket.recv_max(&mut buf, cap, true) {
                Ok(Some(meta)) => {
                    let datagram = buf.split().freeze();
                    handle_datagram(inner, &mut tracker, datagram, meta);
                }
                Ok(None) => break,
                Err(Error::Overrun { .. }) => {
                    Counters::add(&inner.counters.overruns, 1);
                    inner.event(Event::Overrun);
                }
                Err(Error::Truncated { len, capacity, .. }) => {
                    buf.clear();
                    Counters::add(&inner.counters.truncated, 1);
                    inner.event(Event::Truncated { len, capacity });
                }
                Err(e) => {
                    inner.event(Event::RecvFailed { errno: e.errno() });
                    std::thread::sleep(Duration::from_millis(1));
                    break;
                }
            }
        }
    }
}

/// Parses one datagram and delivers each of its messages.
pub(super) fn handle_datagram(
    inner: &Inner,
    tracker: &mut SeqTracker,
    datagram: Bytes,
    meta: RecvMeta,
) {
    let c = &inner.counters;
    Counters::add(&c.datagrams, 1);
    Counters::add(&c.bytes, datagram.len() as u64);
    let source = Source {
        port: meta.port,
        group: meta.group,
    };
    // One look at the registry per datagram, not per message.
    let registry = inner.registry.snapshot();
    for m in messages(datagram) {
        let cm = match m {
            Ok(Message::Connector(cm)) => cm,
            Ok(Message::Error(e)) => {
                Counters::add(&c.control, 1);
                inner.event(Event::NetlinkError {
                    port: meta.port,
                    error: e.error,
                });
                continue;
            }
            Ok(Message::Noop(_)) | Ok(Message::Overrun(_)) => {
                Counters::add(&c.control, 1);
                continue;
            }
            Err(error) => {
                Counters::add(&c.decode_errors, 1);
                inner.event(Event::Decode {
                    port: meta.port,
                    error,
                });
                break; // the iterator ends after an error anyway
            }
        };
        Counters::add(&c.messages, 1);
        let msg = cm.msg;
        if inner.config.track_seq && !source.is_kernel() {
            match tracker.observe(meta.port, msg.id, msg.seq) {
                SeqVerdict::Gap(n) => {
                    Counters::add(&c.lost, u64::from(n));
                    inner.event(Event::Lost {
                        port: meta.port,
                        id: msg.id,
                        count: n,
                    });
                }
                SeqVerdict::Reordered => Counters::add(&c.reordered, 1),
                SeqVerdict::First | SeqVerdict::InOrder => {}
            }
        }
        let rx = Received { msg, source };
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
                continue;
            }
        }
        let out = registry.dispatch(&rx);
        Counters::add(&c.dispatched, out.delivered as u64);
        if out.delivered == 0 && out.panicked == 0 {
            Counters::add(&c.unmatched, 1);
        }
    }
}
