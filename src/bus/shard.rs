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

use crate::codec::{
    nlmsg_align, CbId, CnHeader, CnMsg, NlHeader, CN_MSG_HDRLEN, NLMSG_DONE, NLMSG_HDRLEN,
};

/// Data up to this length is copied inline into the queue slot (no allocation).
pub(crate) const INLINE: usize = 96;

/// Cell index of an entry pushed by a thread whose thread-local state is unavailable (the
/// thread is being torn down). Such entries always go to shard 0.
pub(crate) const UNTRACKED: u32 = u32::MAX;

/// The data of a queued message.
#[derive(Debug)]
pub(crate) enum Payload {
    /// Copied into the slot.
    Inline { len: u8, buf: [u8; INLINE] },
    /// A prebuilt message's data, or data too long to inline.
    Shared(Bytes),
}

impl Payload {
    #[inline]
    pub(crate) fn copy_from(d: &[u8]) -> Self {
        if d.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..d.len()].copy_from_slice(d);
            Payload::Inline {
                len: d.len() as u8,
                buf,
            }
        } else {
            Payload::Shared(Bytes::copy_from_slice(d))
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Inline { len, buf } => &buf[..usize::from(*len)],
            Payload::Shared(b) => b,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Payload::Inline { len, buf } => Bytes::copy_from_slice(&buf[..usize::from(len)]),
            Payload::Shared(b) => b,
        }
    }
}

/// One queued message.
#[derive(Debug)]
pub(crate) struct Entry {
    pub id: CbId,
    pub seq: u32,
    pub ack: u32,
    pub flags: u16,
    /// The producer's cell, or [`UNTRACKED`].
    pub cell: u32,
    pub data: Payload,
}

impl Entry {
    #[inline]
    pub(crate) fn from_slice(id: CbId, data: &[u8]) -> Self {
        Self {
            id,
            seq: 0,
            ack: 0,
            flags: 0,
            cell: UNTRACKED,
            data: Payload::copy_from(data),
        }
    }

    pub(crate) fn from_msg(m: CnMsg) -> Self {
        Self {
            id: m.id,
            seq: m.seq,
            ack: m.ack,
            flags: m.flags,
            cell: UNTRACKED,
            data: Payload::Shared(m.data),
        }
    }

    pub(crate) fn into_msg(self) -> CnMsg {
        CnMsg {
            id: self.id,
            seq: self.seq,
            ack: self.ack,
            flags: self.flags,
            data: self.data.into_bytes(),
        }
    }

    /// Bytes in a datagram, netlink header and padding included.
    #[inline]
    pub(crate) fn encoded_len(&self) -> usize {
        nlmsg_align(NLMSG_HDRLEN + CN_MSG_HDRLEN + self.data.as_slice().len())
    }

    /// Appends the message exactly as [`crate::codec::DatagramBuilder`] would: an
    /// `NLMSG_DONE` header whose seq is the message's seq and whose pid is `pid`, the
    /// `cn_msg` header, the data, zero padding. The caller has checked that the data fits
    /// in `cn_msg.len`.
    #[inline]
    pub(crate) fn encode(&self, pid: u32, out: &mut Vec<u8>) {
        let data = self.data.as_slice();
        let len = NLMSG_HDRLEN + CN_MSG_HDRLEN + data.len();
        let start = out.len();
        NlHeader {
            len: len as u32,
            ty: NLMSG_DONE,
            flags: 0,
            seq: self.seq,
            pid,
        }
        .emit(out);
        CnHeader {
            id: self.id,
            seq: self.seq,
            ack: self.ack,
            len: data.len() as u16,
            flags: self.flags,
        }
        .emit(out);
        out.extend_from_slice(data);
        out.resize(start + nlmsg_align(len), 0);
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
}

impl Shard {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            queue: ArrayQueue::new(capacity),
            since: CachePadded::new(AtomicU64::new(0)),
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
            let mut e = Entry::from_slice(msg.id, &data);
            e.seq = 7;
            e.ack = 8;
            let mut out = Vec::new();
            e.encode(42, &mut out);
            assert_eq!(out, b.as_bytes(), "payload of {n} bytes");
            assert_eq!(e.encoded_len(), msg.encoded_len());
            let mut out2 = Vec::new();
            Entry::from_msg(msg.clone()).encode(42, &mut out2);
            assert_eq!(out2, out);
            let Some(Ok(Message::Connector(c))) = messages(Bytes::from(out)).next() else {
                panic!("does not decode");
            };
            assert_eq!(c.msg, msg);
            assert_eq!(e.into_msg(), msg);
        }
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
