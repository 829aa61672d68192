//! The dispatcher thread.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;

use super::ingest::Ingest;
use super::registry::Targets;
use super::stats::Counters;
use super::{Delivery, Event, Inner, Snapshot};
use crate::codec::CbId;
use crate::sys::poll_read;

/// Datagrams read per wake-up before polling again.
const BATCH: usize = 256;

/// Runs until `inner.shutdown` is set and the eventfd signalled.
pub(super) fn run(inner: &Inner) {
    let _ = inner.dispatcher.set(std::thread::current().id());
    let cap = inner.config.max_datagram;
    let c = &*inner.counters;
    let mut buf = BytesMut::with_capacity(cap * 4);
    let mut ingest = Ingest::new(inner.config.track_seq, inner.config.tracked_streams);
    let mut event = |e: Event| inner.event(e);
    // An id found in no withdrawn request, and the generation of the requests then
    // (`ingest::Withdrawn::clear_of`): its messages are no late replies, without the lock.
    let mut clear: Option<(CbId, u64)> = None;
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
            // Between datagrams too: a shutdown (from another thread, or a callback that
            // dropped the `Connector`) stops deliveries at once, not after a batch.
            if inner.shutdown.load(Ordering::Acquire) {
                return;
            }
            match ingest.recv(&inner.socket, &mut buf, cap, c, &mut event) {
                Ok(Some((datagram, meta))) => {
                    // One look at the registry per datagram, one lookup per run of
                    // messages of one id, and the counters added once per datagram.
                    let registry = inner.registry.snapshot();
                    let mut d = Tally::default();
                    let mut targets: Option<(CbId, Targets<'_>)> = None;
                    let is_reply = |m: &Delivery<'_>| {
                        // Acquire: pairs with the Release stores of the count, all made
                        // under the `pending` lock: whichever it reads, every request
                        // withdrawn before that store is in `late` (with its count and
                        // generation, loaded Relaxed below), lock or no lock. (One store
                        // Release, in `await_reply`, was not enough: a Relaxed store made
                        // after it by another thread, read here, synchronises with nothing.)
                        inner.pending_count.load(Ordering::Acquire) > 0 && reply(inner, m)
                    };
                    // Asked only after `is_reply` (its Acquire load of `pending_count` orders
                    // these Relaxed loads after every withdrawal it saw).
                    let is_late = |m: &Delivery<'_>| {
                        inner.late_count.load(Ordering::Relaxed) > 0
                            && clear
                                != Some((m.id(), inner.late_generation.load(Ordering::Relaxed)))
                            && {
                                let mut w = inner.late.lock();
                                let late = w.is_late_reply(m);
                                inner.late_count.store(w.len(), Ordering::Relaxed);
                                clear = w.clear_of(m.id()).map(|g| (m.id(), g));
                                late
                            }
                    };
                    ingest.datagram(c, &datagram, meta, is_reply, is_late, |item| {
                        // The rest of the datagram: nobody takes it, and neither a callback
                        // nor the event handler starts (counted as discarded).
                        if inner.shutdown.load(Ordering::Acquire) {
                            d.shutdown_discards += u64::from(item.is_ok());
                            return;
                        }
                        match item {
                            Ok(m) => d.deliver(&registry, &mut targets, &m),
                            Err(e) => {
                                // The event handler is user code: no callback lock held.
                                if let Some((_, t)) = &mut targets {
                                    t.release();
                                }
                                inner.event(e);
                            }
                        }
                    });
                    Counters::add(&c.dispatched, d.dispatched);
                    Counters::add(&c.delivered, d.delivered);
                    Counters::add(&c.unmatched, d.unmatched);
                    Counters::add(&c.shutdown_discards, d.shutdown_discards);
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

/// Hands `m` to the request waiting for it, if any (true), as an owned message: a message
/// with the request's id, seq and ack from the port the request went to (anyone's for a
/// group). A group request's other members may reply too, after it: it is remembered as
/// withdrawn, so that their replies are not gap-tracked either.
fn reply(inner: &Inner, m: &Delivery<'_>) -> bool {
    let key = (m.id(), m.seq(), m.ack());
    let mut p = inner.pending.lock();
    // At most one of the two is outstanding (`replies_clash`).
    let tx = match p.remove(&(key, Some(m.source().port))) {
        Some(tx) => tx,
        None => match p.remove(&(key, None)) {
            Some(tx) => {
                inner.withdraw(key, None);
                tx
            }
            None => return false,
        },
    };
    inner.pending_count.store(p.len(), Ordering::Release);
    // Counted before the requester can wake up and read the counters.
    Counters::add(&inner.counters.replies, 1);
    // Under the lock (a bounded(1) channel, empty: never waits): a requester that timed
    // out and then takes the lock to withdraw finds either its entry or the reply.
    let _ = tx.try_send(m.to_incoming());
    true
}

/// What the registry did with one datagram's messages, added to the counters at its end:
/// each message not taken as a reply is in exactly one of `delivered`, `unmatched` and
/// `shutdown_discards`.
#[derive(Default)]
struct Tally {
    dispatched: u64,
    delivered: u64,
    unmatched: u64,
    shutdown_discards: u64,
}

impl Tally {
    /// Hands one message to the registry, looking its id up only when it differs from the
    /// previous message's.
    fn deliver<'s>(
        &mut self,
        registry: &'s Snapshot<'_>,
        targets: &mut Option<(CbId, Targets<'s>)>,
        m: &Delivery<'_>,
    ) {
        let id = m.id();
        let t = match targets {
            Some((last, t)) if *last == id => t,
            _ => {
                // The previous id's run ends here (its lock, if held, is released).
                *targets = None;
                &mut targets.insert((id, registry.targets(id))).1
            }
        };
        let out = t.dispatch(m);
        self.dispatched += out.delivered as u64;
        if out.delivered == 0 && out.panicked == 0 {
            self.unmatched += 1;
        } else {
            self.delivered += 1;
        }
    }
}
