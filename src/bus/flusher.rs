//! The flusher thread: drains every shard, packs datagrams, sends them with `sendmmsg`,
//! and sleeps exactly as long as the oldest queued message allows.

use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::Duration;

use super::handshake::{IDLE, TIMED};
use super::lane::Lane;
use super::stats::Counters;
use super::Inner;
use crate::error::{Error, Op};
use crate::sys::membarrier;

/// Longest idle sleep when `membarrier` failed (see [`Flusher::sleep`]).
const BARRIER_FALLBACK: Duration = Duration::from_millis(10);

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
    /// Our copy of the producers' lanes, and the generation it was taken at.
    lanes: Vec<Arc<Lane>>,
    lanes_gen: u64,
    /// `membarrier::heavy` failed once: its error was recorded, and the flusher no longer
    /// parks without a timeout while lanes exist.
    barrier_failed: bool,
    #[cfg(test)]
    passes: u64,
}

impl Flusher {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self {
            published: 0,
            inner,
            lanes: Vec::new(),
            lanes_gen: 0,
            barrier_failed: false,
            #[cfg(test)]
            passes: 0,
        }
    }

    /// The thread's main loop: sleep until there is a reason to drain, drain, repeat.
    /// Returns after a stop request once every shard is empty.
    pub(crate) fn run(mut self) {
        loop {
            self.sleep();
            self.inner.bell.awake();
            let stop = self.inner.stop.load(SeqCst);
            // Every push that happened-before a flush() call happened-before its fetch_add
            // of the tickets; reading them here (SeqCst) before the pass makes those pushes
            // visible to the pass's pops.
            let gen = self.inner.tickets.requested();
            #[cfg(test)]
            {
                self.passes += 1;
                if self.inner.cfg.panic_at == Some(PanicAt::Pass(self.passes)) {
                    panic!("test hook: the flusher panics");
                }
            }
            self.drain_all(gen > self.published || stop);
            if !self.lanes.is_empty() {
                self.inner.prune_lanes();
            }
            if gen > self.published {
                self.published = gen;
                self.inner.tickets.publish(gen);
            }
            if stop && self.inner.all_empty() {
                break;
            }
        }
    }

    /// One pass over the shards. Each shard is drained under its drain lock, one shard
    /// per `sendmmsg` batch.
    ///
    /// For a flush (or stop) every shard's lock is taken, even when the shard looks
    /// empty: a producer helping may have popped the flush's messages and not yet sent
    /// them, and the lock is released only after its send. Other passes skip empty shards.
    ///
    /// Lanes likewise: for a flush every lane's drain right is taken (its producer may be
    /// draining it), otherwise only lanes holding messages are drained.
    fn drain_all(&mut self, flushing: bool) {
        let inner = &*self.inner;
        for (i, shard) in inner.shards.iter().enumerate() {
            if !flushing && shard.len() == 0 {
                continue;
            }
            let mut d = shard.drain.lock();
            inner.drain_shard(i, &mut d);
        }
        // After the tickets were read: lanes added before the flush request are in the
        // copy.
        inner.refresh_lanes(&mut self.lanes, &mut self.lanes_gen);
        for lane in &self.lanes {
            let mut d = if flushing {
                lane.drain.lock()
            } else if !lane.has_pending() {
                continue;
            } else {
                // Someone (its producer) is draining it and takes everything published.
                let Some(d) = lane.drain.try_lock() else {
                    continue;
                };
                d
            };
            inner.drain_lane(lane, &mut d);
        }
    }

    /// Sleeps until there is a reason to drain: a shard past the watermark, the oldest
    /// queued message's deadline, a flush or stop request. Parks indefinitely when every
    /// shard is empty. See the module docs of [`super`] for the wake-up protocol.
    fn sleep(&mut self) {
        let inner = Arc::clone(&self.inner);
        let wm = inner.cfg.watermark;
        // Saturating: a latency beyond u64 nanoseconds (584 years) is "never".
        let max_latency = u64::try_from(inner.cfg.max_latency.as_nanos()).unwrap_or(u64::MAX);
        // A stop, a flush request, or a blocked inserter waiting for space in a non-empty
        // shard: drain now.
        let urgent = |f: &Self| {
            inner.stop.load(SeqCst)
                || inner.tickets.requested() > f.published
                || (inner.space_waiters.load(SeqCst) > 0 && !inner.all_empty())
        };
        loop {
            if urgent(self) {
                return;
            }
            inner.refresh_lanes(&mut self.lanes, &mut self.lanes_gen);
            let now = inner.now_ns();
            let mut oldest = u64::MAX;
            let mut over = false;
            let shards = inner.shards.iter().map(|s| (s.len(), s.since()));
            // A lane being drained is in its drainer's hands (its `queued` still counts
            // the messages being sent).
            let lanes = self.lanes.iter().filter(|l| l.waiting()).map(|l| {
                let q = (l.queued() as usize).max(1);
                (q, l.since.load(Relaxed))
            });
            for (len, since) in shards.chain(lanes) {
                if len > 0 {
                    let t = match since {
                        0 => now,
                        t => t,
                    };
                    oldest = oldest.min(t);
                    over |= len >= wm;
                }
            }
            if over {
                return;
            }
            if oldest == u64::MAX {
                // Everything empty: park until a producer wakes us. Announce IDLE first,
                // then look again under each shard's lock: a push either completed before
                // our lock (we see it) or locks after us (it then loads `state` after our
                // store and sees IDLE).
                inner.bell.announce(IDLE);
                // Lanes have no lock to order against: pair with their producers'
                // `light` fence (see the `lane` module), then look at every lane, a new
                // one included.
                // A lane added after this copy wakes us (`Inner::add_lane`): the SeqCst
                // fence pairs with the one there, between its push and its look at the
                // state (a SeqCst store and a later Acquire load alone do not order).
                std::sync::atomic::fence(SeqCst);
                inner.refresh_lanes(&mut self.lanes, &mut self.lanes_gen);
                // Without the barrier the last look at the lanes proves nothing: sleep
                // with a timeout then, so that a missed lane message waits at most that.
                let mut timeout = None;
                if !self.lanes.is_empty() {
                    if let Err(e) = membarrier::heavy() {
                        if !self.barrier_failed {
                            self.barrier_failed = true;
                            inner.record_error(Error::from_io(Op::Membarrier, e));
                        }
                        timeout = Some(inner.cfg.max_latency.min(BARRIER_FALLBACK));
                    }
                }
                if inner.shards.iter().any(|s| s.len_locked() > 0)
                    || self.lanes.iter().any(|l| l.waiting())
                    || urgent(self)
                {
                    inner.bell.awake();
                    continue;
                }
                match timeout {
                    None => std::thread::park(),
                    Some(t) => std::thread::park_timeout(t),
                }
            } else {
                let deadline = oldest.saturating_add(max_latency);
                if now >= deadline {
                    return;
                }
                inner.bell.announce(TIMED);
                if inner.shards.iter().any(|s| s.len_locked() >= wm)
                    || self
                        .lanes
                        .iter()
                        .any(|l| l.waiting() && l.queued() >= wm as u64)
                    || urgent(self)
                {
                    inner.bell.awake();
                    return;
                }
                std::thread::park_timeout(Duration::from_nanos(deadline - now));
            }
            inner.bell.awake();
            Counters::add(&inner.stats.wakeups, 1);
        }
    }
}
