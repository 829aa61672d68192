//! The flusher thread: drains every shard, packs datagrams, sends them with `sendmmsg`,
//! and sleeps exactly as long as the oldest queued message allows.

use std::io::IoSlice;
use std::sync::atomic::{fence, Ordering::*};
use std::sync::Arc;
use std::time::Duration;

use super::shard::{Cell, Entry, UNTRACKED};
use super::stats::Counters;
use super::{Inner, AWAKE, IDLE, TIMED};

/// How often a transient send error (`ENOBUFS`, `EAGAIN`, `EINTR`, `ENOMEM`) is retried
/// before the datagram is counted as failed.
const TRANSIENT_RETRIES: u32 = 2;

pub(crate) struct Flusher {
    inner: Arc<Inner>,
    /// Private copy of the registry's cells, refreshed when an entry names a newer one.
    cells: Vec<Arc<Cell>>,
    /// Per cell: messages taken since the last send (published to `done` after it).
    pending: Vec<u64>,
    touched: Vec<u32>,
    /// Encoded datagrams of the batch being built, back to back.
    arena: Vec<u8>,
    /// Closed datagrams: (start, end, messages).
    bounds: Vec<(usize, usize, u64)>,
    /// Start of the open datagram in `arena`, and its message count.
    open_start: usize,
    open_msgs: u64,
    /// Highest flush generation completed.
    published: u64,
    coalesce: bool,
}

impl Flusher {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        let cap = inner.cfg.datagram_size * inner.cfg.max_batch;
        Self {
            coalesce: inner.cfg.coalesce(),
            cells: Vec::new(),
            pending: Vec::new(),
            touched: Vec::new(),
            arena: Vec::with_capacity(cap.min(1 << 22)),
            bounds: Vec::with_capacity(inner.cfg.max_batch),
            open_start: 0,
            open_msgs: 0,
            published: 0,
            inner,
        }
    }

    /// The thread's main loop: sleep until there is a reason to drain, drain, repeat.
    /// Returns after a stop request once every shard is empty.
    pub(crate) fn run(mut self) {
        loop {
            self.sleep();
            self.inner.state.store(AWAKE, SeqCst);
            let stop = self.inner.stop.load(SeqCst);
            // Every push that happened-before a flush() call happened-before its fetch_add
            // of `flush_req`; reading it here (SeqCst) before the pass makes those pushes
            // visible to the pass's pops.
            let gen = self.inner.flush_req.load(SeqCst);
            self.drain_all();
            if gen > self.published {
                self.published = gen;
                self.inner.publish_flush(gen);
            }
            if stop && self.inner.all_empty() {
                break;
            }
        }
    }

    /// One bounded pass: pops from each shard at most what it held when the pass reached
    /// it (so producers cannot keep the flusher in one shard forever), then sends.
    fn drain_all(&mut self) {
        let inner = Arc::clone(&self.inner);
        for shard in inner.shards.iter() {
            if shard.queue.is_empty() {
                continue;
            }
            let stamp = shard.since.swap(0, SeqCst);
            fence(SeqCst);
            if stamp != 0 {
                let delay = inner.now_ns().saturating_sub(stamp);
                Counters::max(&inner.stats.max_queue_delay_ns, delay);
            }
            let n = shard.queue.len();
            Counters::max(&inner.stats.high_water, n as u64);
            for _ in 0..n {
                match shard.queue.pop() {
                    Some(e) => self.take(e),
                    None => break,
                }
            }
            // A producer that pushed during the pass may have stamped `since` for a message
            // this pass took. Clear it if the shard is now empty; should a push slip in
            // between, `sleep` stamps the unstamped shard itself.
            if shard.queue.is_empty() {
                shard.since.store(0, SeqCst);
            }
            // Space was freed: wake blocked inserters (SeqCst pairs with their increment
            // of `space_waiters` before their retry).
            fence(SeqCst);
            if inner.space_waiters.load(SeqCst) > 0 {
                let _g = inner.space_lock.lock();
                inner.space_cv.notify_all();
            }
        }
        self.close_open();
        self.send();
    }

    /// Adds one popped entry to the batch.
    fn take(&mut self, e: Entry) {
        let len = e.encoded_len();
        if self.open_msgs > 0
            && (!self.coalesce
                || self.arena.len() - self.open_start + len > self.inner.cfg.datagram_size)
        {
            self.close_open();
            if self.bounds.len() >= self.inner.cfg.max_batch {
                self.send();
            }
        }
        e.encode(&mut self.arena);
        self.open_msgs += 1;
        if e.cell != UNTRACKED {
            let i = e.cell as usize;
            if i >= self.pending.len() {
                self.pending.resize(i + 1, 0);
            }
            if self.pending[i] == 0 {
                self.touched.push(e.cell);
            }
            self.pending[i] += 1;
        }
    }

    fn close_open(&mut self) {
        if self.open_msgs > 0 {
            self.bounds
                .push((self.open_start, self.arena.len(), self.open_msgs));
            self.open_start = self.arena.len();
            self.open_msgs = 0;
        }
    }

    /// Sends every closed datagram (the open one is empty whenever this runs), then
    /// publishes the producers' `done` counts.
    fn send(&mut self) {
        debug_assert_eq!(self.open_msgs, 0);
        if !self.bounds.is_empty() {
            let inner = &*self.inner;
            let st = &inner.stats;
            let slices: Vec<IoSlice<'_>> = self
                .bounds
                .iter()
                .map(|&(s, e, _)| IoSlice::new(&self.arena[s..e]))
                .collect();
            let mut off = 0;
            let mut tries = 0;
            while off < slices.len() {
                Counters::add(&st.syscalls, 1);
                let r = inner.sock.send_batch(&slices[off..], inner.dest);
                match r {
                    Ok(k) if k > 0 => {
                        let msgs: u64 = self.bounds[off..off + k].iter().map(|b| b.2).sum();
                        Counters::add(&st.sent_datagrams, k as u64);
                        Counters::add(&st.sent_messages, msgs);
                        off += k;
                        tries = 0;
                    }
                    other => {
                        let err = match other {
                            Err(e) => e,
                            Ok(_) => crate::Error::from_io(
                                crate::Op::SendBatch,
                                std::io::Error::from_raw_os_error(libc::EAGAIN),
                            ),
                        };
                        let errno = err.errno().unwrap_or(libc::EIO);
                        st.send_error(errno);
                        let transient = matches!(
                            errno,
                            libc::ENOBUFS | libc::EAGAIN | libc::EINTR | libc::ENOMEM
                        );
                        if transient && tries < TRANSIENT_RETRIES {
                            tries += 1;
                            std::thread::sleep(Duration::from_micros(50 << tries));
                            continue;
                        }
                        // Give up on this datagram: count it, keep the error, go on.
                        Counters::add(&st.failed_datagrams, 1);
                        Counters::add(&st.failed_messages, self.bounds[off].2);
                        inner.record_error(err);
                        off += 1;
                        tries = 0;
                    }
                }
            }
            drop(slices);
            self.bounds.clear();
            self.arena.clear();
            self.open_start = 0;
        }
        if !self.touched.is_empty() {
            if self.cells.len() <= self.touched.iter().copied().max().unwrap_or(0) as usize {
                self.inner.registry.refresh(&mut self.cells);
            }
            for &i in &self.touched {
                let i = i as usize;
                // Release: the pops and the send above happen-before the owner's Acquire
                // load that lets it change shard.
                if let Some(c) = self.cells.get(i) {
                    c.done.fetch_add(self.pending[i], Release);
                }
                self.pending[i] = 0;
            }
            self.touched.clear();
        }
    }

    /// Sleeps until there is a reason to drain: a shard past the watermark, the oldest
    /// queued message's deadline, a flush or stop request. Parks indefinitely when every
    /// shard is empty. See the module docs of [`super`] for the wake-up protocol.
    fn sleep(&mut self) {
        let inner = Arc::clone(&self.inner);
        let wm = inner.cfg.watermark;
        let max_latency = inner.cfg.max_latency.as_nanos() as u64;
        // A stop, a flush request, or a blocked inserter waiting for space in a non-empty
        // shard: drain now.
        let urgent = |f: &Self| {
            inner.stop.load(SeqCst)
                || inner.flush_req.load(SeqCst) > f.published
                || (inner.space_waiters.load(SeqCst) > 0 && !inner.all_empty())
        };
        loop {
            if urgent(self) {
                return;
            }
            let now = inner.now_ns();
            let mut oldest = u64::MAX;
            let mut over = false;
            for s in inner.shards.iter() {
                let len = s.queue.len();
                if len > 0 {
                    let t = match s.since.compare_exchange(0, now, SeqCst, SeqCst) {
                        Ok(_) => now,
                        Err(t) => t,
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
                // then look again (SeqCst fence pairs with the producers' fence between
                // their push and their load of `state`).
                inner.state.store(IDLE, SeqCst);
                fence(SeqCst);
                if !inner.all_empty() || urgent(self) {
                    inner.state.store(AWAKE, SeqCst);
                    continue;
                }
                std::thread::park();
            } else {
                let deadline = oldest.saturating_add(max_latency);
                if now >= deadline {
                    return;
                }
                inner.state.store(TIMED, SeqCst);
                fence(SeqCst);
                if inner.shards.iter().any(|s| s.queue.len() >= wm) || urgent(self) {
                    inner.state.store(AWAKE, SeqCst);
                    return;
                }
                std::thread::park_timeout(Duration::from_nanos(deadline - now));
            }
            inner.state.store(AWAKE, SeqCst);
            Counters::add(&inner.stats.wakeups, 1);
        }
    }
}
