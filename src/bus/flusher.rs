//! The flusher thread: drains every ring, and sleeps as long as the oldest queued message
//! allows.

use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::Duration;

use super::handshake::{IDLE, TIMED};
use super::ring::Ring;
use super::stats::Counters;
use super::Inner;

/// Test hook ([`Config::panic_at`](super::Config)): where a panic is injected, to check
/// that the bus contains it and still accounts for every message.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PanicAt {
    /// In a drain, before the bus's `n`-th send system call (1-based).
    Syscall(u64),
    /// In the flusher's loop, outside any drain, at its `n`-th pass (1-based).
    Pass(u64),
}

pub(crate) struct Flusher {
    inner: Arc<Inner>,
    /// Highest flush generation completed.
    published: u64,
    /// Our copy of the rings (taken before each look, so that the drains run without
    /// the rings' lock).
    rings: Vec<Arc<Ring>>,
    #[cfg(test)]
    passes: u64,
}

impl Flusher {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self {
            published: 0,
            inner,
            rings: Vec::new(),
            #[cfg(test)]
            passes: 0,
        }
    }

    /// The thread's main loop: sleep until there is a reason to drain, drain, repeat.
    /// Returns after a stop request once every ring is empty.
    pub(crate) fn run(mut self) {
        loop {
            self.sleep();
            self.inner.bell.awake();
            let stop = self.inner.stop.load(SeqCst);
            // Every push that happened-before a flush() call happened-before its fetch_add
            // of the tickets; reading them here (SeqCst) before the pass makes those pushes
            // visible to the pass.
            let gen = self.inner.tickets.requested();
            #[cfg(test)]
            {
                self.passes += 1;
                if self.inner.cfg.panic_at == Some(PanicAt::Pass(self.passes)) {
                    panic!("test hook: the flusher panics");
                }
            }
            self.drain_all(gen > self.published || stop);
            self.inner.prune_rings();
            if gen > self.published {
                self.published = gen;
                self.inner.tickets.publish(gen);
            }
            if stop && self.inner.rings.lock().iter().all(|r| !r.pending()) {
                break;
            }
        }
    }

    /// One pass over the rings. For a flush (or stop) every ring's drain right is taken,
    /// even when the ring looks empty: a writer helping may have framed the flush's
    /// messages and not yet sent them, and it gives the right back only after its send.
    /// Other passes skip empty rings.
    fn drain_all(&mut self, flushing: bool) {
        let inner = &*self.inner;
        // After the tickets were read: rings added before the flush request are in it.
        self.rings.clone_from(&inner.rings.lock());
        for ring in &self.rings {
            if flushing || ring.pending() {
                inner.drain(ring, true);
            }
        }
    }

    /// Sleeps until there is a reason to drain: a ring past the watermark, the oldest
    /// queued message's deadline, a flush or stop request. Parks indefinitely when every
    /// ring is empty. Wake-up protocol: docs/BUS.md, "Memory orderings".
    fn sleep(&mut self) {
        let inner = Arc::clone(&self.inner);
        let wm = inner.cfg.watermark as u64;
        // Aim a quarter of the bound early (at most 1 ms): the wake-up delay and the send
        // then fit in the bound. Saturating: beyond u64 nanoseconds (584 years) is "never".
        let bound = u64::try_from(inner.cfg.max_latency.as_nanos()).unwrap_or(u64::MAX);
        let aim = bound - (bound / 4).min(1_000_000);
        // A stop, a flush request, or a blocked inserter waiting for space in a non-empty
        // ring: drain now.
        let urgent = |f: &Self| {
            inner.stop.load(SeqCst)
                || inner.tickets.requested() > f.published
                || (inner.space_waiters.load(SeqCst) > 0 && f.rings.iter().any(|r| r.pending()))
        };
        loop {
            self.rings.clone_from(&inner.rings.lock());
            if urgent(self) {
                return;
            }
            let now = inner.now_ns();
            let (mut oldest, mut over) = (u64::MAX, false);
            for r in self.rings.iter().filter(|r| r.pending()) {
                oldest = oldest.min(match r.since.load(Relaxed) {
                    0 => now,
                    t => t,
                });
                over |= r.queued() >= wm;
            }
            if over {
                return;
            }
            // Everything empty: park until a writer wakes us (IDLE); else until the
            // oldest message's deadline (TIMED).
            let (how, timeout) = match oldest.checked_add(aim) {
                _ if oldest == u64::MAX => (IDLE, None),
                Some(d) if d <= now => return,
                d => (TIMED, d.map(|d| Duration::from_nanos(d - now))),
            };
            // Announce (with the fence), then look again: a push either is seen, or sees
            // the announcement and unparks us. A shard's ring is looked at after taking and
            // releasing its lock (the writers' side of the handshake there), a producer's
            // after the fence; a ring added after our copy wakes us (`add_ring`).
            inner.bell.announce(how);
            self.rings.clone_from(&inner.rings.lock());
            for s in inner.shards.iter() {
                drop(s.tail.lock());
            }
            let wm_or_any = |r: &Arc<Ring>| r.pending() && (how == IDLE || r.queued() >= wm);
            if self.rings.iter().any(wm_or_any) || urgent(self) {
                inner.bell.awake();
                continue;
            }
            match timeout {
                None => std::thread::park(),
                Some(t) => std::thread::park_timeout(t),
            }
            inner.bell.awake();
            Counters::add(&inner.stats.flusher_wakeups, 1);
        }
    }
}
