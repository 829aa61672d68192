//! Draining one shard: take its datagrams (a buffer swap), number them, send them with
//! `sendmmsg` where they lie, publish the producers' `done` counts. Run by whoever holds the shard's drain right
//! ([`Shard::drain`](super::shard::Shard::drain)): the flusher thread, or a producer whose
//! insert found its shard at the watermark (producer-assisted draining, see the module docs
//! of [`super`]).

use std::cell::Cell;
use std::io::IoSlice;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{fence, Ordering::*};
use std::time::{Duration, Instant};

use super::shard::{Batch, Drainer, UNTRACKED};
use super::stats::Counters;
use super::Inner;

/// How often a transient send error (`ENOBUFS`, `EAGAIN`, `EINTR`, `ENOMEM`) is retried
/// before the datagram is counted as failed.
const TRANSIENT_RETRIES: u32 = 2;

pub(crate) use crate::seq::write_seq;
/// The counters of one destination (the bus's), by id.
pub(crate) use crate::seq::DestSeqs;
/// The sequence counters: the socket's (see
/// [`ConnectorSocket`](crate::sys::ConnectorSocket)), shared with every other bus and
/// connector sending on it, one sequence per destination and id. Their lock is the send
/// lock, held from numbering a batch until its `sendmmsg` returned, so numbers follow wire
/// order per id whichever drainer (of whichever bus) sends.
pub(crate) use crate::seq::SeqSource;

/// Longest sleep between two attempts to send to a full unicast receiver.
const MAX_ROOM_PAUSE: Duration = Duration::from_millis(1);

/// A send's wait for room at a full unicast receiver ([`Dest::Port`](crate::sys::Dest)):
/// the bus sends with `MSG_DONTWAIT` and, when the receiver's queue is full, sleeps a
/// little and tries again, for at most [`BusBuilder::send_timeout`](super::BusBuilder::send_timeout)
/// (and never past the shutdown deadline). A wait that times out marks the bus's receiver
/// as stalled: later sends do not wait for it until one of them gets a datagram through.
///
/// Sleeping, not `poll`: a netlink sender's `POLLOUT` reflects its own send buffer, which
/// a unicast does not hold on to (the datagram is charged to the receiver at once), so it
/// stays set while the receiver is full (checked on Linux 6.18: `EAGAIN`, then `poll`
/// reports `POLLOUT`). Nothing the sender can wait on says when the receiver reads.
pub(crate) struct RoomWait {
    since: Option<Instant>,
    pause: Duration,
}

impl RoomWait {
    pub(crate) fn new() -> Self {
        Self {
            since: None,
            pause: Duration::from_micros(20),
        }
    }

    /// The receiver was full: sleeps before the next attempt and returns true, or returns
    /// false when the send must give up (timeout, shutdown deadline, stalled receiver).
    pub(crate) fn wait(&mut self, inner: &Inner) -> bool {
        if inner.stalled.load(Relaxed) {
            return false;
        }
        let now = Instant::now();
        let first = self.since.is_none();
        let since = *self.since.get_or_insert(now);
        let mut deadline = since.checked_add(inner.cfg.send_timeout);
        if let Some(&stop) = inner.stop_deadline.get() {
            deadline = Some(deadline.map_or(stop, |d| d.min(stop)));
        }
        let left = deadline.map_or(self.pause, |d| d.saturating_duration_since(now));
        if left.is_zero() {
            inner.stalled.store(true, Relaxed);
            return false;
        }
        if first {
            Counters::add(&inner.stats.full_receiver_waits, 1);
        }
        std::thread::sleep(self.pause.min(left));
        self.pause = (self.pause * 2).min(MAX_ROOM_PAUSE);
        true
    }

    /// A datagram got through: the receiver takes datagrams again.
    pub(crate) fn done(&mut self, inner: &Inner) {
        if self.since.take().is_some() || inner.stalled.load(Relaxed) {
            inner.stalled.store(false, Relaxed);
        }
        self.pause = Duration::from_micros(20);
    }
}

/// Messages and datagrams of one drain accounted for so far (sent, or counted as failed):
/// what a panic in the middle of the drain leaves to count as failed.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    msgs: Cell<u64>,
    dgrams: Cell<u64>,
}

impl Progress {
    fn add(&self, msgs: u64, dgrams: u64) {
        self.msgs.set(self.msgs.get() + msgs);
        self.dgrams.set(self.dgrams.get() + dgrams);
    }
}

/// The error recorded for a datagram that a full unicast receiver did not take in time.
pub(crate) fn receiver_full(op: crate::Op) -> crate::Error {
    crate::Error::from_io(op, std::io::Error::from_raw_os_error(libc::EAGAIN))
}

impl DestSeqs<'_> {
    /// Numbers the batch's messages: for each run of [`Entry::Slice`](super::shard::Entry)
    /// messages, consecutive numbers of its id (one counter look-up per run), written into
    /// `nlmsg_seq` and `cn_msg.seq`. Prebuilt messages keep theirs. A run's messages lie
    /// at a fixed stride (its `len`), so the writes do not wait on reads of the lengths;
    /// every access is bounds-checked and a run that does not fit ends the walk.
    fn number(&mut self, batch: &mut Batch) {
        let (runs, bytes) = batch.runs_and_bytes_mut();
        let mut at = 0usize;
        for r in runs {
            let (len, n) = (r.len() as usize, r.n as usize);
            let Some(span) = bytes.get_mut(at..at + len * n) else {
                return;
            };
            at += len * n;
            if !r.numbered() || len < 28 {
                continue;
            }
            let counter = self.counter(r.id());
            for m in span.chunks_exact_mut(len) {
                *counter = counter.wrapping_add(1);
                if let Some(m) = crate::codec::array_mut::<28>(m) {
                    write_seq(m, *counter);
                }
            }
        }
    }
}

impl Inner {
    /// Runs `f`; if it panics, the panic is caught, counted ([`BusStats::panics`]) and kept
    /// as [`Error::Panicked`](crate::Error::Panicked) for `flush`/`close`, and `None` is
    /// returned. Wraps every drain, so that a bug cannot make taken messages vanish
    /// uncounted, nor kill the flusher.
    ///
    /// [`BusStats::panics`]: super::BusStats::panics
    pub(crate) fn contain<R>(&self, thread: &'static str, f: impl FnOnce() -> R) -> Option<R> {
        match std::panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => Some(r),
            Err(p) => {
                self.panicked(thread, &*p);
                None
            }
        }
    }

    /// Counts and keeps a caught panic (it takes the place of a pending send error: a
    /// panic is a bug and must be seen).
    pub(crate) fn panicked(&self, thread: &'static str, payload: &(dyn std::any::Any + Send)) {
        Counters::add(&self.stats.panics, 1);
        let message = payload
            .downcast_ref::<&str>()
            .map(|m| m.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(a panic without a message)".to_string());
        let mut l = self.last_error.lock();
        if !matches!(*l, Some(crate::Error::Panicked { .. })) {
            *l = Some(crate::Error::Panicked { thread, message });
        }
    }

    /// After a panic in the middle of a drain of `msgs` messages in `dgrams` datagrams:
    /// counts those `p` does not cover as failed.
    pub(crate) fn fail_rest(&self, p: &Progress, msgs: u64, dgrams: u64) {
        let st = &self.stats;
        Counters::add(&st.failed_messages, msgs.saturating_sub(p.msgs.get()));
        Counters::add(&st.failed_datagrams, dgrams.saturating_sub(p.dgrams.get()));
    }

    /// Drains every shard and lane on the calling thread (taking each drain right), as a
    /// flush pass does: for `flush` and shutdown when the flusher is gone.
    pub(crate) fn drain_everything(&self) {
        for (i, shard) in self.shards.iter().enumerate() {
            let mut d = shard.drain.lock();
            self.drain_shard(i, &mut d);
        }
        let lanes: Vec<_> = self.lanes.lock().clone();
        for lane in &lanes {
            let mut d = lane.drain.lock();
            self.drain_lane(lane, &mut d);
        }
    }

    /// Drains shard `i`, whose drain right the caller holds as `d`: takes everything the
    /// shard holds now (an O(1) swap, so producers cannot keep a drainer here), numbers
    /// and sends it, and publishes `done`. Returns the number of messages taken. A panic
    /// while numbering or sending is contained ([`contain`](Self::contain)): what was not
    /// sent yet is counted as failed.
    pub(crate) fn drain_shard(&self, i: usize, d: &mut Drainer) -> u64 {
        let Some(shard) = self.shards.get(i) else {
            return 0;
        };
        let (n, stamp) = shard.take(&mut d.batch);
        if n == 0 {
            return 0;
        }
        if stamp != 0 {
            let delay = self.now_ns().saturating_sub(stamp);
            Counters::max(&self.stats.max_queue_delay_ns, delay);
        }
        Counters::max(&self.stats.high_water, n as u64);
        self.space_freed();
        d.batch.close_open();
        let progress = Progress::default();
        let dgrams = d.batch.bounds.len() as u64;
        if self
            .contain("bus drainer", || self.send(d, &progress))
            .is_none()
        {
            self.fail_rest(&progress, n as u64, dgrams);
        }
        self.publish_done(d);
        d.batch.clear();
        n as u64
    }

    /// Space was freed in a shard or lane: wakes blocked inserters (the SeqCst fence pairs
    /// with their SeqCst increment of `space_waiters` before their retry: either we see
    /// the waiter, or its retry sees the space).
    pub(crate) fn space_freed(&self) {
        fence(SeqCst);
        if self.space_waiters.load(SeqCst) > 0 {
            let _g = self.space_lock.lock();
            self.space_cv.notify_all();
        }
    }

    /// Numbers and sends every datagram of the batch, `max_batch` per `sendmmsg`,
    /// recording in `progress` what it accounted for.
    fn send(&self, d: &mut Drainer, progress: &Progress) {
        let b = &mut d.batch;
        // The send lock: numbering and sending of one batch are not interleaved with
        // another drainer's (of any bus on this socket), so per-id numbers follow wire order.
        let mut seqs = self.seqs().lock();
        seqs.to(self.dest).number(b);
        let bytes = b.bytes();
        let slices: Vec<IoSlice<'_>> = b
            .bounds
            .iter()
            .filter_map(|&(s, e, _)| bytes.get(s..e).map(IoSlice::new))
            .collect();
        self.send_datagrams(&slices, |i| b.bounds.get(i).map_or(0, |x| x.2), progress);
    }

    /// Publishes the producers' `done` counts for the batch just sent (or counted as
    /// failed).
    fn publish_done(&self, d: &mut Drainer) {
        let b = &d.batch;
        // Publish `done` per producer, one add per stretch of runs of the same cell.
        if let Some(max) = b
            .runs
            .iter()
            .map(|r| r.cell())
            .filter(|&c| c != UNTRACKED)
            .max()
        {
            if d.cells.len() <= max as usize {
                self.registry.refresh(&mut d.cells);
            }
        }
        let mut pending: Option<(u32, u64)> = None;
        for r in b.runs.iter().filter(|r| r.cell() != UNTRACKED) {
            match &mut pending {
                Some((c, n)) if *c == r.cell() => *n += u64::from(r.n),
                _ => {
                    if let Some((c, n)) = pending {
                        add_done(&d.cells, c, n);
                    }
                    pending = Some((r.cell(), u64::from(r.n)));
                }
            }
        }
        if let Some((c, n)) = pending {
            add_done(&d.cells, c, n);
        }
    }

    /// Sends `slices`, one datagram each (datagram `i` holds `msgs(i)` messages),
    /// `max_batch` per `sendmmsg`, retrying transient errors a bounded number of times,
    /// waiting a bounded time for room at a full unicast receiver ([`RoomWait`]), and
    /// counting everything (and recording it in `progress`). The caller holds the send
    /// lock.
    pub(crate) fn send_datagrams(
        &self,
        slices: &[IoSlice<'_>],
        msgs: impl Fn(usize) -> u64,
        progress: &Progress,
    ) {
        let st = &self.stats;
        let max_batch = self.cfg.max_batch.max(1);
        let unicast = matches!(self.dest, crate::sys::Dest::Port(_));
        let mut room = RoomWait::new();
        let mut off = 0;
        let mut tries = 0;
        while off < slices.len() {
            Counters::add(&st.syscalls, 1);
            let end = (off + max_batch).min(slices.len());
            #[cfg(test)]
            if self.cfg.panic_at
                == Some(super::flusher::PanicAt::Syscall(st.syscalls.load(Relaxed)))
            {
                panic!("test hook: a drainer panics");
            }
            // Never blocks: a full unicast receiver is waited for below, boundedly.
            let r = self.sock.try_send_batch(&slices[off..end], self.dest);
            match r {
                Ok(k) if k > 0 => {
                    let n: u64 = (off..off + k).map(&msgs).sum();
                    Counters::add(&st.sent_datagrams, k as u64);
                    Counters::add(&st.sent_messages, n);
                    progress.add(n, k as u64);
                    off += k;
                    tries = 0;
                    if unicast {
                        room.done(self);
                    }
                }
                Ok(_) if unicast => {
                    if room.wait(self) {
                        continue;
                    }
                    // The receiver took nothing in time: count the datagram as failed
                    // (its numbers are used up, so a receiver counts them as lost).
                    st.send_error(libc::EAGAIN);
                    Counters::add(&st.failed_datagrams, 1);
                    Counters::add(&st.failed_messages, msgs(off));
                    progress.add(msgs(off), 1);
                    self.record_error(receiver_full(crate::Op::SendBatch));
                    off += 1;
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
                    // Give up on this datagram: count it, keep the error, go on. Its
                    // numbers are used up, so a receiver counts its messages as lost.
                    Counters::add(&st.failed_datagrams, 1);
                    Counters::add(&st.failed_messages, msgs(off));
                    progress.add(msgs(off), 1);
                    self.record_error(err);
                    off += 1;
                    tries = 0;
                }
            }
        }
    }
}

/// Adds `n` to the `done` count of cell `i`.
fn add_done(cells: &[std::sync::Arc<super::shard::Cell>], i: u32, n: u64) {
    // Release: the take and the send happen-before the owner's Acquire load that lets it
    // change shard.
    if let Some(c) = cells.get(i as usize) {
        c.done.fetch_add(n, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CbId;

    #[test]
    fn numbering_is_per_id_and_consecutive() {
        use super::super::shard::{Entry, Layout, Shard};
        use crate::codec::{messages_ref, CnMsg, MessageRef};
        let a = CbId::new(1, 2);
        let b = CbId::new(3, 4);
        let lay = Layout {
            pid: 9,
            coalesce: true,
            datagram_size: 4096,
        };
        let sh = Shard::new(16, 4096).unwrap();
        let push = |e: Entry<'_>, cell| sh.push(&e, cell, lay, || 1).unwrap();
        // Data of 1 and 5 bytes: messages of 40 and 44 bytes, padding included.
        push(Entry::Slice { id: a, data: b"x" }, 0);
        push(
            Entry::Slice {
                id: a,
                data: b"hello",
            },
            1,
        );
        push(Entry::Msg(CnMsg::new(a, &b"p"[..]).with_seq(777, 0)), 1);
        push(Entry::Slice { id: b, data: b"x" }, 1);
        push(Entry::Slice { id: a, data: b"x" }, UNTRACKED);
        let mut batch = Batch::with_capacity(4096, 16).unwrap();
        sh.take(&mut batch);
        let mut src = SeqSource::default();
        let dest = crate::sys::Dest::Group(20);
        let mut s = src.to(dest);
        s.number(&mut batch);
        let seqs = |batch: &Batch| -> Vec<(u32, u32)> {
            messages_ref(batch.bytes())
                .map(|m| match m {
                    Ok(MessageRef::Connector { nl, cn, .. }) => (nl.seq, cn.seq),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(seqs(&batch), [(1, 1), (2, 2), (777, 777), (1, 1), (3, 3)]);
        // The next batch goes on from there.
        batch.clear();
        push(Entry::Slice { id: a, data: b"x" }, 0);
        sh.take(&mut batch);
        s.number(&mut batch);
        assert_eq!(seqs(&batch), [(4, 4)]);
        assert_eq!(s.next(b), 2);
        assert_eq!(src.next_to(dest, b), 3);
        assert_eq!(
            src.next_to(crate::sys::Dest::Group(21), a),
            1,
            "per destination"
        );
        let mut s = src.to(dest);
        // Runs that claim more messages than the bytes hold end the walk, no panic.
        batch.runs[0].n = 1000;
        s.number(&mut batch);
    }
}
