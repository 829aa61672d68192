//! Shards, queued entries and the per-thread producer state that keeps one thread's
//! messages in order.
//!
//! # Ordering mechanism
//!
//! Every thread that inserts into a bus gets a [`Cell`] (registered once per thread and
//! bus, reused after the thread exits) and a thread-local [`Local`] that remembers the
//! shard the thread currently uses and how many messages it has queued (`pushed`). The
//! flusher counts, per cell, the messages it has finished with (`done`: handed to the
//! kernel or counted as failed), and publishes that count only after the `sendmmsg` that
//! carried them returned.
//!
//! A thread moves to the shard of the CPU it now runs on only when `done == pushed`, that
//! is when none of its messages is still queued or in the flusher's hands. So at any time
//! all of a thread's unsent messages are in one shard, in FIFO order, and the single
//! flusher sends them in the order it pops them. Messages of one thread are therefore
//! delivered in insertion order however the thread migrates. A thread that never drains
//! (a continuous producer) simply keeps its shard.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam::queue::ArrayQueue;
use crossbeam::utils::CachePadded;
use parking_lot::Mutex;

use super::drain::Drain;

use crate::codec::{nlmsg_align, CbId, CnHeader, CnMsg, CN_MSG_HDRLEN, NLMSG_DONE, NLMSG_HDRLEN};

/// Data up to this length is encoded inline into the queue slot (no allocation); the
/// slot then holds the message exactly as it goes on the wire.
pub(crate) const INLINE: usize = 64;

/// Netlink plus connector header.
const HDR: usize = NLMSG_HDRLEN + CN_MSG_HDRLEN;

/// Wire bytes of an inline message: headers, data, padding.
const WIRE: usize = HDR + INLINE;

/// Cell index of an entry pushed by a thread whose thread-local state is unavailable (the
/// thread is being torn down). Such entries always go to shard 0.
pub(crate) const UNTRACKED: u32 = u32::MAX;

/// A queued message, already encoded by the producer.
#[derive(Debug)]
pub(crate) enum Body {
    /// Headers, data and zero padding, ready to copy into a datagram.
    Inline([u8; WIRE]),
    /// Headers, and data kept apart (a prebuilt message's data, or data too long to
    /// inline).
    Shared { hdr: [u8; HDR], data: Bytes },
}

/// One queued message.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The producer's cell, or [`UNTRACKED`].
    pub cell: u32,
    /// Data length (may exceed `u16::MAX` until the size check rejects the entry), and in
    /// bit 31 [`NUMBERED`]: the drainer assigns the message's sequence number.
    data_len: u32,
    body: Body,
}

/// Writes the netlink header (type `NLMSG_DONE`, seq = the message's seq, pid) and the
/// `cn_msg` header, as [`crate::codec::DatagramBuilder`] does.
#[inline]
fn headers(out: &mut [u8], pid: u32, h: &CnHeader) {
    let len = (HDR + usize::from(h.len)) as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
    out[6..8].copy_from_slice(&0u16.to_ne_bytes());
    out[8..12].copy_from_slice(&h.seq.to_ne_bytes());
    out[12..16].copy_from_slice(&pid.to_ne_bytes());
    out[16..20].copy_from_slice(&h.id.idx.to_ne_bytes());
    out[20..24].copy_from_slice(&h.id.val.to_ne_bytes());
    out[24..28].copy_from_slice(&h.seq.to_ne_bytes());
    out[28..32].copy_from_slice(&h.ack.to_ne_bytes());
    out[32..34].copy_from_slice(&h.len.to_ne_bytes());
    out[34..36].copy_from_slice(&h.flags.to_ne_bytes());
}

/// Bit of `Entry::data_len` marking a message whose seq the drainer assigns.
const NUMBERED: u32 = 1 << 31;
/// The length bits of `Entry::data_len` (a larger length is clamped: still too large).
const LEN_MASK: u32 = NUMBERED - 1;

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Entry {
    /// Encodes `data` for id `id` (ack, flags 0), from port `pid`. Its seq is written as 0
    /// here and assigned by the drainer ([`Entry::numbered`]).
    #[inline]
    pub(crate) fn from_slice(pid: u32, id: CbId, data: &[u8]) -> Self {
        let h = CnHeader {
            id,
            seq: 0,
            ack: 0,
            len: data.len() as u16, // checked against MAX_DATA before use
            flags: 0,
        };
        let body = if data.len() <= INLINE {
            let mut w = [0u8; WIRE];
            headers(&mut w, pid, &h);
            w[HDR..HDR + data.len()].copy_from_slice(data);
            Body::Inline(w)
        } else {
            let mut hdr = [0u8; HDR];
            headers(&mut hdr, pid, &h);
            Body::Shared {
                hdr,
                data: Bytes::copy_from_slice(data),
            }
        };
        Self {
            cell: UNTRACKED,
            data_len: data.len().min(LEN_MASK as usize) as u32 | NUMBERED,
            body,
        }
    }

    /// Encodes a prebuilt message (its data is kept, not copied), from port `pid`.
    pub(crate) fn from_msg(pid: u32, m: CnMsg) -> Self {
        let h = CnHeader {
            id: m.id,
            seq: m.seq,
            ack: m.ack,
            len: m.data.len() as u16, // checked against MAX_DATA before use
            flags: m.flags,
        };
        let mut hdr = [0u8; HDR];
        headers(&mut hdr, pid, &h);
        Self {
            cell: UNTRACKED,
            data_len: m.data.len().min(LEN_MASK as usize) as u32,
            body: Body::Shared { hdr, data: m.data },
        }
    }

    /// Length of the data.
    #[inline]
    pub(crate) fn data_len(&self) -> usize {
        (self.data_len & LEN_MASK) as usize
    }

    /// True when the drainer assigns the seq (messages of [`Entry::from_slice`]); a
    /// prebuilt message keeps its own.
    #[inline]
    pub(crate) fn numbered(&self) -> bool {
        self.data_len & NUMBERED != 0
    }

    /// The message again (for handing it back to the caller).
    pub(crate) fn into_msg(self) -> CnMsg {
        let (hdr, data) = match self.body {
            Body::Inline(w) => (w, Bytes::copy_from_slice(&w[HDR..HDR + self.data_len()])),
            Body::Shared { hdr, data } => {
                let mut w = [0u8; WIRE];
                w[..HDR].copy_from_slice(&hdr);
                (w, data)
            }
        };
        CnMsg {
            id: CbId::new(u32_at(&hdr, 16), u32_at(&hdr, 20)),
            seq: u32_at(&hdr, 24),
            ack: u32_at(&hdr, 28),
            flags: u16::from_ne_bytes([hdr[34], hdr[35]]),
            data,
        }
    }

    /// Bytes in a datagram, netlink header and padding included.
    #[inline]
    pub(crate) fn encoded_len(&self) -> usize {
        nlmsg_align(HDR + self.data_len())
    }

    /// Appends the message to a datagram being built: one copy for an inline message.
    /// The caller has checked that the data fits in `cn_msg.len`.
    #[inline]
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let len = self.encoded_len();
        match &self.body {
            Body::Inline(w) => out.extend_from_slice(&w[..len]),
            Body::Shared { hdr, data } => {
                let start = out.len();
                out.extend_from_slice(hdr);
                out.extend_from_slice(data);
                out.resize(start + len, 0);
            }
        }
    }
}

/// One per-CPU queue.
pub(crate) struct Shard {
    pub queue: ArrayQueue<Entry>,
    /// Enqueue time (ns since the bus epoch, never 0) of the oldest message that may be in
    /// the queue, or 0 when unset.
    ///
    /// Invariant: whenever the queue is non-empty, `since` is non-zero and not later than
    /// the enqueue time of its oldest message, except in the short window between a push
    /// and the pusher's stamp (the flusher reads 0 with a non-empty queue as "now").
    /// The flusher stores 0 (then a SeqCst fence) before it pops a shard; a producer, after
    /// its push and a SeqCst fence, stamps `since` if it reads 0. By the two fences either
    /// the flusher's pop pass sees the push, or the producer sees the 0 and stamps.
    pub since: CachePadded<AtomicU64>,
    /// The right to drain this shard, with the drainer's scratch state. Whoever holds it
    /// (the flusher, or a producer helping) pops, packs, sends and publishes `done` before
    /// releasing it, so exactly one drainer at a time takes this shard's messages and its
    /// datagrams are never interleaved with another drainer's of the same shard.
    pub drain: CachePadded<Mutex<Drain>>,
}

impl Shard {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            queue: ArrayQueue::new(capacity),
            since: CachePadded::new(AtomicU64::new(0)),
            drain: CachePadded::new(Mutex::new(Drain::default())),
        }
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
/// use (starting on shard `initial`). Returns `None` without calling `f` when the
/// thread-local storage is unavailable (thread teardown) or already borrowed.
#[inline]
pub(crate) fn with_local<R>(
    bus: u64,
    registry: &Registry,
    initial: usize,
    f: impl FnOnce(&mut Local) -> R,
) -> Option<R> {
    LOCALS
        .try_with(|v| {
            let mut v = v.try_borrow_mut().ok()?;
            let pos = match v.iter().position(|l| l.bus == bus) {
                Some(p) => p,
                None => {
                    v.retain(|l| !l.cell.retired.load(Ordering::Relaxed));
                    let (idx, cell, pushed) = registry.acquire();
                    v.push(Local {
                        bus,
                        idx,
                        cell,
                        shard: initial,
                        pushed,
                    });
                    v.len() - 1
                }
            };
            Some(f(&mut v[pos]))
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{messages, DatagramBuilder, Message};

    #[test]
    fn encoding_matches_datagram_builder() {
        for n in [0usize, 1, 3, 64, INLINE, INLINE + 1, 1000] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let msg = CnMsg::new(CbId::new(0x4000_0001, 9), data.clone()).with_seq(7, 8);
            let mut b = DatagramBuilder::new(4096).with_pid(42);
            assert!(b.push(&msg).unwrap());
            let e = Entry::from_msg(42, msg.clone());
            let mut out = Vec::new();
            e.encode(&mut out);
            assert_eq!(out, b.as_bytes(), "payload of {n} bytes");
            assert_eq!(e.encoded_len(), msg.encoded_len());
            if n == 0 || n == INLINE || n == INLINE + 1 || n == 1000 {
                // The inline path (seq/ack 0) against the builder.
                let plain = CnMsg::new(msg.id, data.clone());
                let mut b2 = DatagramBuilder::new(4096).with_pid(42);
                assert!(b2.push(&plain).unwrap());
                let mut out2 = Vec::new();
                let e2 = Entry::from_slice(42, plain.id, &data);
                e2.encode(&mut out2);
                assert_eq!(out2, b2.as_bytes(), "inline payload of {n} bytes");
                assert_eq!(e2.into_msg(), plain);
            }
            let Some(Ok(Message::Connector(c))) = messages(Bytes::from(out)).next() else {
                panic!("does not decode");
            };
            assert_eq!(c.msg, msg);
            assert_eq!(e.into_msg(), msg);
        }
    }

    #[test]
    fn slot_stays_small() {
        // 64 bytes of data and both headers inline, plus cell and length: the queue's
        // memory per message (with the queue's 8-byte stamp) stays at 120 bytes.
        assert!(
            std::mem::size_of::<Entry>() <= 112,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn cells_are_reused_after_thread_exit() {
        let reg = Arc::new(Registry::default());
        let r = Arc::clone(&reg);
        std::thread::spawn(move || {
            with_local(1, &r, 0, |l| {
                l.pushed += 5;
            })
            .unwrap();
        })
        .join()
        .unwrap();
        let r = Arc::clone(&reg);
        let (idx, pushed) =
            std::thread::spawn(move || with_local(1, &r, 0, |l| (l.idx, l.pushed)).unwrap())
                .join()
                .unwrap();
        assert_eq!((idx, pushed), (0, 5), "the exited thread's cell is adopted");
        assert_eq!(reg.pushed_total(), 5);
    }
}
