//! Shards, the messages they hold (already encoded), and the per-thread producer state
//! that keeps one thread's messages in order.
//!
//! # Shards
//!
//! A shard is a buffer of wire bytes behind a short, rarely contended lock (one shard per
//! CPU; contended only by a drainer's swap, or by a thread that migrated and still has
//! messages queued here, see below): an
//! insert encodes its message straight into the buffer, packing datagrams as it goes (it
//! closes the open datagram when the next message would not fit), so the buffer is at any
//! time a run of ready datagrams. A drainer swaps the whole buffer for an empty one in
//! O(1) under the lock and hands the datagrams to `sendmmsg` where they lie: one copy per
//! message in total, the producer's.
//!
//! # Ordering mechanism
//!
//! Every thread that inserts into a bus gets a [`Cell`] (registered once per thread and
//! bus, reused after the thread exits) and a thread-local [`Local`] that remembers the
//! shard the thread currently uses and how many messages it has queued (`pushed`). The
//! drainers count, per cell, the messages they have finished with (`done`: handed to the
//! kernel or counted as failed), and publish that count only after the `sendmmsg` that
//! carried them returned.
//!
//! A thread moves to the shard of the CPU it now runs on only when `done == pushed`, that
//! is when none of its messages is still queued or in a drainer's hands. So at any time
//! all of a thread's unsent messages are in one shard, in FIFO order, and the shard's
//! single drainer at a time (its drain lock, held from the swap until after the send)
//! sends them in that order. Messages of one thread are therefore delivered in insertion
//! order however the thread migrates. A thread that never drains (a continuous producer)
//! simply keeps its shard.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam::utils::CachePadded;
use parking_lot::Mutex;

use crate::codec::{
    self, nlmsg_align, CbId, CnHeader, CnMsg, NlHeader, CN_MSG_HDRLEN, NLMSG_DONE, NLMSG_HDRLEN,
};
use crate::sys::ShortLock;

/// Netlink plus connector header.
const HDR: usize = NLMSG_HDRLEN + CN_MSG_HDRLEN;

/// Bytes a shard holds per message of capacity: one 64-byte message with its headers.
pub(crate) const BYTES_PER_SLOT: usize = HDR + 64;

/// Cell index of a message pushed by a thread whose thread-local state is unavailable (the
/// thread is being torn down). Such messages always go to shard 0, each after a flush that
/// sends the thread's earlier messages (see `Inner::try_push`), so the order is kept.
pub(crate) const UNTRACKED: u32 = u32::MAX;

/// A message offered to the bus, not queued yet.
#[derive(Debug)]
pub(crate) enum Entry<'a> {
    /// [`Bus::insert`](super::Bus::insert) and friends: seq assigned by the drainer.
    Slice {
        /// The id.
        id: CbId,
        /// The data, copied into the shard.
        data: &'a [u8],
    },
    /// [`Bus::insert_msg`](super::Bus::insert_msg): seq, ack and flags kept.
    Msg(CnMsg),
}

impl Entry<'_> {
    /// Length of the data.
    #[inline]
    pub(crate) fn data_len(&self) -> usize {
        match self {
            Self::Slice { data, .. } => data.len(),
            Self::Msg(m) => m.data.len(),
        }
    }

    /// The id.
    #[inline]
    pub(crate) fn id(&self) -> CbId {
        match self {
            Self::Slice { id, .. } => *id,
            Self::Msg(m) => m.id,
        }
    }

    /// True when the drainer assigns the seq; a prebuilt message keeps its own.
    #[inline]
    pub(crate) fn numbered(&self) -> bool {
        matches!(self, Self::Slice { .. })
    }

    /// The message (for handing it back to the caller).
    pub(crate) fn into_msg(self) -> CnMsg {
        match self {
            Self::Slice { id, data } => CnMsg::new(id, bytes::Bytes::copy_from_slice(data)),
            Self::Msg(m) => m,
        }
    }

    /// Bytes in a datagram, netlink header and padding included.
    #[inline]
    pub(crate) fn encoded_len(&self) -> usize {
        nlmsg_align(HDR + self.data_len())
    }

    /// The `cn_msg` header (seq 0 until numbered for [`Entry::Slice`]; its `len` is
    /// computed by the encoder) and the data.
    #[inline]
    fn parts(&self) -> (CnHeader, &[u8]) {
        match self {
            Self::Slice { id, data } => (
                CnHeader {
                    id: *id,
                    ..CnHeader::default()
                },
                data,
            ),
            Self::Msg(m) => (
                CnHeader {
                    id: m.id,
                    seq: m.seq,
                    ack: m.ack,
                    len: 0,
                    flags: m.flags,
                },
                &m.data[..],
            ),
        }
    }

    /// Writes the encoded message (headers as [`crate::codec::DatagramBuilder`] writes
    /// them: `NLMSG_DONE`, `nlmsg_seq` = `cn_msg.seq`, `nlmsg_pid` = `pid`; data; zero
    /// padding) at the start of `out`. Returns the bytes written, or `None` when `out` is
    /// too short or the data longer than `cn_msg.len` can say (callers check that first).
    #[inline(always)]
    pub(crate) fn encode_into(&self, pid: u32, ty: u16, out: &mut [u8]) -> Option<usize> {
        let (cn, data) = self.parts();
        let nl = NlHeader {
            len: 0,
            ty,
            flags: 0,
            seq: cn.seq,
            pid,
        };
        codec::encode_into(out, nl, cn, data)
    }
}

/// Consecutive messages of a batch pushed by one producer cell with one id and one kind.
/// The drainer numbers a batch run by run (one counter look-up per run) and publishes the
/// producers' `done` counts from the runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// The id of every message of the run, as `idx << 32 | val`.
    id: u64,
    /// The producer's cell (low 32 bits), the encoded length of every message (bits
    /// 32..63) and whether the drainer numbers them (bit 63): one word, so that extending
    /// a run costs two comparisons.
    shape: u64,
    /// Messages in the run.
    pub n: u32,
}

impl Run {
    /// A run of `n` messages.
    #[cfg(test)]
    pub(crate) fn new(cell: u32, id: CbId, numbered: bool, len: u32, n: u32) -> Self {
        Self {
            id: Self::key(id),
            shape: Self::shape_of(cell, numbered, len),
            n,
        }
    }

    #[inline(always)]
    fn key(id: CbId) -> u64 {
        u64::from(id.idx) << 32 | u64::from(id.val)
    }

    #[inline(always)]
    fn shape_of(cell: u32, numbered: bool, len: u32) -> u64 {
        // Encoded lengths are below 2^17 (a 16-bit cn_msg.len plus headers).
        u64::from(cell) | u64::from(len & 0x7fff_ffff) << 32 | u64::from(numbered) << 63
    }

    /// The producer's cell, or [`UNTRACKED`].
    pub(crate) fn cell(&self) -> u32 {
        self.shape as u32
    }

    /// The id of every message of the run.
    pub(crate) fn id(&self) -> CbId {
        CbId::new((self.id >> 32) as u32, self.id as u32)
    }

    /// The encoded length of every message of the run, padding included: its messages lie
    /// at this stride.
    pub(crate) fn len(&self) -> u32 {
        (self.shape >> 32) as u32 & 0x7fff_ffff
    }

    /// True for [`Entry::Slice`] messages, whose seq the drainer assigns; false for
    /// prebuilt ones, which keep theirs.
    pub(crate) fn numbered(&self) -> bool {
        self.shape >> 63 == 1
    }
}

/// Encoded messages packed into datagrams: a shard's contents, or a drainer's batch.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Wire bytes, allocated once at full size: the datagrams lie back to back in
    /// `buf[..used]`, so the messages do too.
    buf: Box<[u8]>,
    used: usize,
    /// Closed datagrams: (start, end, messages).
    pub bounds: Vec<(usize, usize, u64)>,
    /// Start of the open datagram, and its message count.
    open_start: usize,
    open_msgs: u64,
    /// The messages in push order, run-length encoded.
    pub runs: Vec<Run>,
    /// Messages held.
    pub count: usize,
}

impl Batch {
    /// An empty batch that can hold `bytes` bytes of messages (about `msgs` of them), or
    /// `None` when the bytes cannot be allocated.
    pub(crate) fn with_capacity(bytes: usize, msgs: usize) -> Option<Self> {
        Some(Self {
            buf: crate::sys::ring::zeroed_bytes(bytes)?,
            bounds: Vec::with_capacity(msgs.min(1 << 16)),
            // Runs are few (one per stretch of one producer and id) and a batch keeps its
            // allocation across uses, so a small start is enough.
            runs: Vec::with_capacity(msgs.min(16)),
            ..Self::default()
        })
    }

    /// The encoded messages.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.buf.get(..self.used).unwrap_or_default()
    }

    /// The runs, and the encoded messages for the drainer to write sequence numbers into.
    pub(crate) fn runs_and_bytes_mut(&mut self) -> (&[Run], &mut [u8]) {
        (
            &self.runs,
            self.buf.get_mut(..self.used).unwrap_or_default(),
        )
    }

    /// Appends `e` from port `pid` for producer `cell`, closing the open datagram first
    /// if `e` would not fit in it (`coalesce`) or always (one message per datagram).
    /// Returns `None`, changing nothing, when the bytes do not fit.
    #[inline(always)]
    fn append(
        &mut self,
        e: &Entry<'_>,
        pid: u32,
        cell: u32,
        coalesce: bool,
        dgram: usize,
    ) -> Option<()> {
        let at = self.used;
        let len = e.encoded_len();
        let end = at + len;
        if end > self.buf.len() {
            return None;
        }
        if self.open_msgs > 0 && (!coalesce || end - self.open_start > dgram) {
            self.close_open();
        }
        self.used += e.encode_into(pid, NLMSG_DONE, self.buf.get_mut(at..)?)?;
        self.open_msgs += 1;
        self.count += 1;
        let (id, shape) = (
            Run::key(e.id()),
            Run::shape_of(cell, e.numbered(), len as u32),
        );
        match self.runs.last_mut() {
            Some(r) if r.shape == shape && r.id == id && r.n < u32::MAX => r.n += 1,
            _ => self.runs.push(Run { id, shape, n: 1 }),
        }
        Some(())
    }

    /// Closes the open datagram, if any.
    pub(crate) fn close_open(&mut self) {
        if self.open_msgs > 0 {
            self.bounds
                .push((self.open_start, self.used, self.open_msgs));
            self.open_start = self.used;
            self.open_msgs = 0;
        }
    }

    /// Empties the batch, keeping its allocations.
    pub(crate) fn clear(&mut self) {
        self.used = 0;
        self.bounds.clear();
        self.runs.clear();
        self.open_start = 0;
        self.open_msgs = 0;
        self.count = 0;
    }
}

/// The drain right of a shard and the drainer's scratch state.
#[derive(Debug, Default)]
pub(crate) struct Drainer {
    /// The empty batch swapped into the shard at the next take; holds the taken messages
    /// until they are sent.
    pub batch: Batch,
    /// Private copy of the registry's cells, refreshed when a run names a newer one.
    pub cells: Vec<Arc<Cell>>,
}

/// One per-CPU shard.
pub(crate) struct Shard {
    buf: CachePadded<ShortLock<Batch>>,
    /// Messages held: a copy of `buf.count`, stored (Release) under the lock by every push
    /// and take, for lock-free looks (the flusher's sleep decision, statistics).
    len: CachePadded<AtomicUsize>,
    /// Enqueue time (ns since the bus epoch, never 0) of the oldest message held, or 0
    /// when empty. Stored under the lock before `len` (so a reader that sees `len > 0`
    /// with Acquire sees the stamp, or a later value); a 0 with `len > 0` reads as "now".
    since: AtomicU64,
    /// The right to drain this shard, with the drainer's scratch state. Whoever holds it
    /// (the flusher, or a producer helping) takes, numbers, sends and publishes `done`
    /// before releasing it, so exactly one drainer at a time takes this shard's messages
    /// and its datagrams are never interleaved with another drainer's of the same shard.
    pub drain: CachePadded<Mutex<Drainer>>,
    capacity: usize,
}

/// Where a push goes: the bus's framing and limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub pid: u32,
    pub coalesce: bool,
    pub datagram_size: usize,
}

impl Shard {
    /// Bytes of each of a shard's two buffers: `capacity * BYTES_PER_SLOT`, but room for
    /// one message of `max_msg` bytes at least. `None` when that overflows.
    pub(crate) fn byte_limit(capacity: usize, max_msg: usize) -> Option<usize> {
        Some(capacity.checked_mul(BYTES_PER_SLOT)?.max(max_msg))
    }

    /// A shard of `capacity` messages and [`byte_limit`](Self::byte_limit) bytes,
    /// allocated now; `None` when the size overflows or cannot be allocated.
    pub(crate) fn new(capacity: usize, max_msg: usize) -> Option<Self> {
        let byte_limit = Self::byte_limit(capacity, max_msg)?;
        Some(Self {
            buf: CachePadded::new(ShortLock::new(Batch::with_capacity(byte_limit, capacity)?)),
            len: CachePadded::new(AtomicUsize::new(0)),
            since: AtomicU64::new(0),
            drain: CachePadded::new(Mutex::new(Drainer {
                batch: Batch::with_capacity(byte_limit, capacity)?,
                cells: Vec::new(),
            })),
            capacity,
        })
    }

    /// Appends `e` for producer `cell` unless the shard is full. Returns the number of
    /// messages held after the push. `now` gives the enqueue stamp when the shard was
    /// empty.
    #[inline(always)]
    pub(crate) fn push(
        &self,
        e: &Entry<'_>,
        cell: u32,
        lay: Layout,
        now: impl FnOnce() -> u64,
    ) -> Option<usize> {
        let mut b = self.buf.lock();
        if b.count >= self.capacity {
            return None;
        }
        b.append(e, lay.pid, cell, lay.coalesce, lay.datagram_size)?;
        let n = b.count;
        if n == 1 {
            self.since.store(now(), Ordering::Relaxed);
        }
        self.len.store(n, Ordering::Release);
        Some(n)
    }

    /// Moves everything the shard holds into `into` (which must be empty), in O(1).
    /// Returns the number of messages taken and the oldest one's enqueue stamp.
    pub(crate) fn take(&self, into: &mut Batch) -> (usize, u64) {
        let mut b = self.buf.lock();
        if b.count == 0 {
            return (0, 0);
        }
        std::mem::swap(&mut *b, into);
        let since = self.since.swap(0, Ordering::Relaxed);
        self.len.store(0, Ordering::Release);
        (into.count, since)
    }

    /// Messages held (a lock-free look).
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Messages held, read under the shard lock: the flusher's second look before it
    /// parks. A push either completed before this (and is counted) or takes the lock
    /// after it (and then sees the flusher's TIMED/IDLE, stored before this call).
    pub(crate) fn len_locked(&self) -> usize {
        self.buf.lock().count
    }

    /// The oldest message's enqueue stamp, 0 if unknown (read after a non-zero `len`).
    #[inline]
    pub(crate) fn since(&self) -> u64 {
        self.since.load(Ordering::Relaxed)
    }
}

/// Per-producer ordering state shared between the producer thread and the flusher.
#[derive(Debug, Default)]
pub(crate) struct Cell {
    /// Messages of this producer that the flusher has finished with (sent, or counted as
    /// failed). Written only by the flusher, with `Release`, after the send that carried
    /// them; the owner reads it with `Acquire` before it changes shard, so that everything
    /// the flusher did before the store (the pops and the send) happens-before the owner's
    /// next push into another shard.
    pub done: CachePadded<AtomicU64>,
    /// Messages this producer has queued. Written only by the owning thread (`Relaxed`:
    /// it is a statistic for other threads, and a thread adopting the cell reads it after
    /// the `Acquire` that took `in_use`).
    pub pushed: CachePadded<AtomicU64>,
    /// Owned by a live thread. Released (`Release`) when that thread exits; taken with an
    /// `Acquire` compare-exchange.
    pub in_use: AtomicBool,
    /// The bus is gone: thread-local entries pointing here can be pruned.
    pub retired: AtomicBool,
}

/// The cells of one bus. Grows only with the number of threads inserting *at the same
/// time*: a thread's cell is reused after the thread exits.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    cells: Mutex<Vec<Arc<Cell>>>,
}

impl Registry {
    /// Takes a free cell or adds one. Returns its index, the cell, and how many messages
    /// earlier owners queued through it.
    fn acquire(&self) -> (u32, Arc<Cell>, u64) {
        let mut cells = self.cells.lock();
        for (i, c) in cells.iter().enumerate() {
            if c.in_use
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return (i as u32, Arc::clone(c), c.pushed.load(Ordering::Relaxed));
            }
        }
        let c = Arc::new(Cell::default());
        c.in_use.store(true, Ordering::Relaxed);
        cells.push(Arc::clone(&c));
        ((cells.len() - 1) as u32, c, 0)
    }

    /// Appends the cells `into` does not have yet (the flusher's private copy).
    pub(crate) fn refresh(&self, into: &mut Vec<Arc<Cell>>) {
        let cells = self.cells.lock();
        if into.len() < cells.len() {
            into.extend(cells[into.len()..].iter().cloned());
        }
    }

    /// Sum of the messages queued by every producer that used a cell.
    pub(crate) fn pushed_total(&self) -> u64 {
        let cells = self.cells.lock();
        cells.iter().map(|c| c.pushed.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn retire(&self) {
        for c in self.cells.lock().iter() {
            c.retired.store(true, Ordering::Relaxed);
        }
    }
}

/// A thread's state for one bus, in thread-local storage.
pub(crate) struct Local {
    bus: u64,
    pub idx: u32,
    pub cell: Arc<Cell>,
    /// The shard this thread pushes into.
    pub shard: usize,
    /// Messages queued through `cell` (the owner's copy of `cell.pushed`).
    pub pushed: u64,
}

impl Drop for Local {
    fn drop(&mut self) {
        self.cell.pushed.store(self.pushed, Ordering::Relaxed);
        // Release: the adopting thread's Acquire sees `pushed`.
        self.cell.in_use.store(false, Ordering::Release);
    }
}

thread_local! {
    static LOCALS: RefCell<Vec<Local>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's state for bus `bus`, registering it in `registry` on first
/// use (starting on shard `initial()`, called only then). Returns `None` without calling `f` when the
/// thread-local storage is unavailable (thread teardown) or already borrowed.
#[inline]
pub(crate) fn with_local<R>(
    bus: u64,
    registry: &Registry,
    initial: impl FnOnce() -> usize,
    f: impl FnOnce(&mut Local) -> R,
) -> Option<R> {
    LOCALS
        .try_with(|v| {
            let mut v = v.try_borrow_mut().ok()?;
            // The bus used last is kept first: the common case is one comparison.
            if v.first().is_none_or(|l| l.bus != bus) {
                match v.iter().position(|l| l.bus == bus) {
                    Some(p) => v.swap(0, p),
                    None => {
                        v.retain(|l| !l.cell.retired.load(Ordering::Relaxed));
                        let (idx, cell, pushed) = registry.acquire();
                        v.insert(
                            0,
                            Local {
                                bus,
                                idx,
                                cell,
                                shard: initial(),
                                pushed,
                            },
                        );
                    }
                }
            }
            Some(f(v.first_mut()?))
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{messages, DatagramBuilder, Message};
    use bytes::Bytes;

    #[test]
    fn encoding_matches_datagram_builder() {
        let encode = |e: &Entry<'_>| {
            let mut out = vec![0xAAu8; e.encoded_len() + 8];
            let n = e.encode_into(42, NLMSG_DONE, &mut out).unwrap();
            assert_eq!(n, e.encoded_len());
            assert!(out[n..].iter().all(|&b| b == 0xAA), "wrote past its length");
            out.truncate(n);
            out
        };
        for n in [0usize, 1, 3, 63, 64, 65, 1000] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let msg = CnMsg::new(CbId::new(0x4000_0001, 9), data.clone()).with_seq(7, 8);
            let mut b = DatagramBuilder::new(4096).with_pid(42);
            assert!(b.push(&msg).unwrap());
            let e = Entry::Msg(msg.clone());
            let out = encode(&e);
            assert_eq!(out, b.as_bytes(), "payload of {n} bytes");
            assert_eq!(e.encoded_len(), msg.encoded_len());
            assert!(!e.numbered());
            // Too short a buffer: nothing written.
            let mut short = vec![0xAAu8; e.encoded_len() - 1];
            assert_eq!(e.encode_into(42, NLMSG_DONE, &mut short), None);
            assert!(short.iter().all(|&b| b == 0xAA));
            // The slice path (seq/ack 0 until numbered) against the builder.
            let plain = CnMsg::new(msg.id, data.clone());
            let mut b2 = DatagramBuilder::new(4096).with_pid(42);
            assert!(b2.push(&plain).unwrap());
            let e2 = Entry::Slice {
                id: plain.id,
                data: &data,
            };
            assert_eq!(encode(&e2), b2.as_bytes(), "slice payload of {n} bytes");
            assert!(e2.numbered());
            assert_eq!(e2.into_msg(), plain);
            let Some(Ok(Message::Connector(c))) = messages(Bytes::from(out)).next() else {
                panic!("does not decode");
            };
            assert_eq!(c.msg, msg);
            assert_eq!(e.into_msg(), msg);
        }
    }

    #[test]
    fn shard_packs_datagrams_and_bounds_itself() {
        let lay = Layout {
            pid: 1,
            coalesce: true,
            datagram_size: 250,
        };
        let sh = Shard::new(4, 250).unwrap();
        let d = [0u8; 64];
        let e = Entry::Slice {
            id: CbId::new(1, 1),
            data: &d,
        };
        for k in 1..=4 {
            assert_eq!(sh.push(&e, 0, lay, || 5), Some(k));
        }
        assert_eq!(sh.push(&e, 0, lay, || 6), None, "full at capacity");
        assert_eq!(sh.len(), 4);
        assert_eq!(sh.since(), 5);
        let mut into = Batch::with_capacity(400, 4).unwrap();
        assert_eq!(sh.take(&mut into), (4, 5));
        into.close_open();
        // 100-byte messages, 250-byte datagrams: 2 + 2.
        assert_eq!(into.bounds, vec![(0, 200, 2), (200, 400, 2)]);
        assert_eq!(into.runs, vec![Run::new(0, CbId::new(1, 1), true, 100, 4)]);
        assert_eq!((sh.len(), sh.since()), (0, 0));
        // A big message fits an empty shard only.
        let big = [0u8; 200];
        let eb = Entry::Slice {
            id: CbId::new(1, 1),
            data: &big,
        };
        for _ in 0..3 {
            assert!(sh.push(&e, 0, lay, || 7).is_some());
        }
        assert_eq!(
            sh.push(&eb, 0, lay, || 7),
            None,
            "byte bound: 300 + 236 > 400"
        );
    }

    #[test]
    fn huge_shards_are_refused_not_aborted() {
        assert_eq!(Shard::byte_limit(usize::MAX / 50, 0), None, "overflow");
        assert!(Shard::new(usize::MAX / 50, 0).is_none());
        assert!(
            Shard::new(usize::MAX / BYTES_PER_SLOT, 0).is_none(),
            "no allocator"
        );
        assert!(Shard::new(1, usize::MAX).is_none());
        assert_eq!(Shard::byte_limit(3, 1000), Some(1000));
    }

    #[test]
    fn cells_are_reused_after_thread_exit() {
        let reg = Arc::new(Registry::default());
        let r = Arc::clone(&reg);
        std::thread::spawn(move || {
            with_local(
                1,
                &r,
                || 0,
                |l| {
                    l.pushed += 5;
                },
            )
            .unwrap();
        })
        .join()
        .unwrap();
        let r = Arc::clone(&reg);
        let (idx, pushed) =
            std::thread::spawn(move || with_local(1, &r, || 0, |l| (l.idx, l.pushed)).unwrap())
                .join()
                .unwrap();
        assert_eq!((idx, pushed), (0, 5), "the exited thread's cell is adopted");
        assert_eq!(reg.pushed_total(), 5);
    }
}
