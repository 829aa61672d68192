//! [`Ring`]: the bus's one queue type, and its one drain. A [`sys::ring`](crate::sys) byte
//! ring of messages encoded as on the wire (`nlmsg_type` [`STAGED`] when the drain numbers
//! them), written through its [`Tail`] by one writer at a time (a `Producer`, or the holder
//! of a shard's lock), drained by the holder of its drain right: docs/BUS.md, "Design".
//!
//! (Over 600 lines with its unit tests: the format is written by `push` and read by
//! `frame` only, and both stay in this file with the tests of the format.)

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;

use crossbeam::utils::CachePadded;
use parking_lot::Mutex;

use crate::codec::{self, array_mut, nlmsg_align, CbId, CnHeader, CnMsg, NlHeader, NLMSG_DONE};
use crate::error::{DecodeError, DecodeErrorKind};
use crate::sys::ring::{self, Probe, Reader, Writer, SKIP};

use super::stats::Counters;
use super::Inner;

/// `nlmsg_type` of a staged message that the drain numbers.
pub(crate) const STAGED: u16 = 0;

/// Netlink plus connector header: the shortest message.
const HDR: usize = 36;

/// Bytes a ring holds per message of capacity: one 64-byte message with its headers.
pub(crate) const BYTES_PER_SLOT: usize = HDR + 64;

/// The largest ring (bytes): a skip word's 31 bits hold any skip.
const MAX_RING: usize = 1 << 30;

/// A message offered to the bus, not queued yet.
#[derive(Debug)]
pub(crate) enum Entry<'a> {
    /// `insert` and friends: seq assigned by the drain.
    Slice {
        /// The id.
        id: CbId,
        /// The data, copied into the ring.
        data: &'a [u8],
    },
    /// `insert_msg`: seq, ack and flags kept.
    Msg(CnMsg),
}

impl Entry<'_> {
    /// Id, seq, ack, flags, `nlmsg_type` ([`STAGED`] when the drain numbers it), data.
    #[inline(always)]
    pub(crate) fn fields(&self) -> (CbId, u32, u32, u16, u16, &[u8]) {
        match self {
            Self::Slice { id, data } => (*id, 0, 0, 0, STAGED, data),
            Self::Msg(m) => (m.id, m.seq, m.ack, m.flags, NLMSG_DONE, &m.data[..]),
        }
    }

    /// The message (for handing it back to the caller).
    pub(crate) fn into_msg(self) -> CnMsg {
        match self {
            Self::Slice { id, data } => CnMsg::new(id, bytes::Bytes::copy_from_slice(data)),
            Self::Msg(m) => m,
        }
    }

    /// Bytes on the wire, netlink header and padding included.
    #[inline]
    pub(crate) fn encoded_len(&self) -> usize {
        nlmsg_align(HDR + self.fields().5.len())
    }

    /// Writes the encoded message (headers as [`crate::codec::DatagramBuilder`] writes
    /// them) at the start of `out`.
    /// Returns the bytes written, or `None` when `out` is too short.
    #[inline(always)]
    pub(crate) fn encode_into(&self, pid: u32, out: &mut [u8]) -> Option<usize> {
        let (id, seq, ack, flags, ty, data) = self.fields();
        let cn = CnHeader {
            id,
            seq,
            ack,
            len: 0,
            flags,
        };
        let nl = NlHeader {
            len: 0,
            ty,
            flags: 0,
            seq,
            pid,
        };
        codec::encode_into(out, nl, cn, data)
    }
}

/// The writing side of a [`Ring`]: one writer at a time (a `Producer`, or the thread
/// holding a shard's lock).
pub(crate) struct Tail {
    /// Its position is just past the last message published: the ring has sent it once
    /// `Ring::probe` says so.
    pub(crate) writer: Writer,
    /// Messages published (our copy of `Ring::pushed`).
    pushed: u64,
}

/// The reading side of a ring and the drain's scratch state.
pub(crate) struct Drainer {
    reader: Reader,
    /// Our copy of `Ring::done`.
    done: u64,
    /// Datagrams of the current drain.
    bounds: Vec<Bound>,
}

/// One datagram of a drain: bytes `start..end` of part `part` (0: before the end of the
/// ring, 1: after), then the first `more` bytes of part 1 (a datagram of part 0 that
/// continues past the end of the ring; 0 otherwise); its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bound {
    part: usize,
    start: usize,
    end: usize,
    more: usize,
    msgs: u64,
}

/// The bus's queue; see the module docs.
pub(crate) struct Ring {
    /// `released(end)`: true once everything up to `end` (the writer's position after a
    /// message) was sent or counted as failed (Acquire: that send happens-before).
    pub(crate) probe: Probe,
    /// Messages published. Stored (`Relaxed`) only by the writer: a statistic and the
    /// flusher's watermark hint; the ring's positions are what order memory.
    pushed: AtomicU64,
    /// Messages drains have finished with (sent or counted as failed). Stored (`Release`)
    /// only by the drain right's holder, after the send; the writer loads it (`Acquire`)
    /// to know how full the ring is.
    done: CachePadded<AtomicU64>,
    /// An enqueue stamp (ns since the bus epoch) no later than the oldest message's:
    /// stored by the writer when it publishes into an empty ring, and by a drain as the
    /// time it loaded the tail (everything it left behind is younger).
    pub(crate) since: AtomicU64,
    /// A `Producer`'s ring whose producer is gone: once empty, the flusher forgets it.
    pub retired: AtomicBool,
    /// The drain right (`pub(super)` for a test that holds it).
    pub(super) drain: Mutex<Drainer>,
}

impl Ring {
    /// Bytes of a ring for `capacity` messages: `capacity * BYTES_PER_SLOT`, at least two
    /// datagrams (`datagram` bytes), as a power of two of at most 1 GiB. `None` when that
    /// overflows or exceeds the maximum.
    pub(crate) fn bytes(capacity: usize, datagram: usize) -> Option<usize> {
        capacity
            .checked_mul(BYTES_PER_SLOT)?
            .max(datagram.checked_mul(2)?)
            .checked_next_power_of_two()
            .filter(|&b| b <= MAX_RING)
    }

    /// A ring of `bytes` bytes (see [`bytes`](Self::bytes)) and its writing side, or `None`
    /// when the memory cannot be allocated.
    pub(crate) fn new(bytes: usize) -> Option<(Arc<Ring>, Tail)> {
        let (writer, reader) = ring::ring(bytes)?;
        let r = Ring {
            probe: writer.probe(),
            pushed: AtomicU64::new(0),
            done: CachePadded::new(AtomicU64::new(0)),
            since: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            drain: Mutex::new(Drainer {
                reader,
                done: 0,
                bounds: Vec::new(),
            }),
        };
        Some((Arc::new(r), Tail { writer, pushed: 0 }))
    }

    /// Appends `e` (from port `pid`) unless the ring holds `cap` messages or has no room.
    /// Returns the messages held after the push. `now` gives the enqueue stamp when the
    /// ring was empty.
    #[inline(always)]
    pub(crate) fn push(
        &self,
        t: &mut Tail,
        e: &Entry<'_>,
        pid: u32,
        cap: usize,
        now: impl FnOnce() -> u64,
    ) -> Option<u64> {
        let queued = t.pushed.wrapping_sub(self.done.load(Acquire));
        if queued >= cap as u64 {
            return None;
        }
        if queued == 0 {
            // Before the message is published: whoever sees it sees this stamp or later.
            self.since.store(now(), Relaxed);
        }
        let len = e.encoded_len();
        let next = t.pushed + 1;
        // Fits: the region has the encoded length, checked against the limits on entry.
        // Counted before it is published (`write` calls this only when it publishes): a
        // drain takes, and a stats snapshot counts as sent, only messages already counted
        // here (`Counters::snapshot`).
        let encode = |b: &mut [u8]| {
            let _ = e.encode_into(pid, b);
            self.pushed.store(next, Relaxed);
        };
        if !t.writer.write(len, encode) {
            return None;
        }
        t.pushed = next;
        Some(queued + 1)
    }

    /// Messages ever published.
    pub(crate) fn pushed(&self) -> u64 {
        self.pushed.load(Relaxed)
    }

    /// Messages held, as seen now (approximate while a writer and a drain run).
    pub(crate) fn queued(&self) -> u64 {
        self.pushed().saturating_sub(self.done.load(Acquire))
    }

    /// True when published bytes are waiting (the flusher's look).
    #[inline]
    pub(crate) fn pending(&self) -> bool {
        self.probe.pending() > 0
    }
}

impl Inner {
    /// Drains `ring` on the calling thread, waiting for its drain right if `wait` (else
    /// returns `None` when someone else is draining it). Returns the messages taken.
    pub(crate) fn drain(&self, ring: &Ring, wait: bool) -> Option<u64> {
        let mut d = if wait {
            ring.drain.lock()
        } else {
            ring.drain.try_lock()?
        };
        Some(self.drain_held(ring, &mut d))
    }

    /// The drain, its right held as `d`: everything published now is framed, numbered and
    /// sent, `max_batch` datagrams per `sendmmsg`, then given back. A panic is contained
    /// ([`contain`](Self::contain)): what was not sent is counted as failed.
    fn drain_held(&self, ring: &Ring, d: &mut Drainer) -> u64 {
        // Read before the tail: every message left behind is younger.
        let t = self.now_ns();
        let Drainer {
            reader,
            done,
            bounds,
        } = d;
        let (a, b) = reader.readable();
        if a.is_empty() {
            return 0;
        }
        let since = ring.since.load(Relaxed);
        bounds.clear();
        // Messages framed, once known: a panic after that point is contained (what was
        // not sent is counted as failed); one while framing leaves the bytes in the ring
        // for the next drain (messages numbered by then keep their numbers).
        let framed = Cell::new(None);
        // Messages and datagrams sent or counted as failed so far.
        let progress = Cell::new((0u64, 0u64));
        let sent = self.contain("bus drainer", || {
            // The send lock: numbering and sending of one drain are not interleaved with
            // another drain's (of any ring, of any bus on this socket), so the numbers of
            // each (destination, id) follow wire order.
            let mut numbering = self.sock.numbering().lock();
            let mut seqs = numbering.to(self.dest);
            // Bytes a datagram may hold: 0 without coalescing (every message closes one).
            let limit = if self.cfg.framing == super::Framing::Coalesce {
                self.cfg.datagram_size
            } else {
                0
            };
            let (msgs, bad) = frame([&mut *a, &mut *b], limit, &mut seqs, bounds);
            framed.set(Some(msgs));
            let parts: [&[u8]; 2] = [a, b];
            // A datagram's bytes: one range, or two when it continues past the end of the
            // ring (sent as one datagram from two iovecs).
            let pieces = |i: usize| {
                bounds.get(i).map_or([&[][..], &[]], |x| {
                    let first = parts[x.part & 1].get(x.start..x.end);
                    [
                        first.unwrap_or_default(),
                        parts[1].get(..x.more).unwrap_or_default(),
                    ]
                })
            };
            let per = |i: usize| bounds.get(i).map_or(0, |x| x.msgs);
            self.send_datagrams(bounds.len(), pieces, per, |m, d, err| {
                let (pm, pd) = progress.get();
                progress.set((pm + m, pd + d));
                if let Some(err) = err {
                    Counters::add(&self.stats.failed_datagrams, d);
                    Counters::add(&self.stats.failed_messages, m);
                    self.record_error(err);
                }
            });
            (msgs, bad)
        });
        let (msgs, bad) = match (sent, framed.get()) {
            (Some(r), _) => r,
            (None, Some(msgs)) => {
                let ((m, d), st) = (progress.get(), &self.stats);
                Counters::add(&st.failed_messages, msgs.saturating_sub(m));
                Counters::add(
                    &st.failed_datagrams,
                    (bounds.len() as u64).saturating_sub(d),
                );
                (msgs, None)
            }
            (None, None) => return 0,
        };
        if let Some(e) = bad {
            // Only a bug can put a malformed word in a ring; the rest of the part is
            // skipped so that the ring cannot wedge, and the error is counted and kept.
            Counters::add(&self.stats.failed_datagrams, 1);
            self.record_error(e.into());
        }
        let taken = a.len() + b.len();
        if since != 0 {
            Counters::max(&self.stats.max_queue_delay, t.saturating_sub(since));
        }
        Counters::max(&self.stats.high_water, msgs);
        ring.since.store(t, Relaxed);
        *done += msgs;
        // Release: the send and `since` happen-before the writer's Acquire of `done`.
        ring.done.store(*done, Release);
        reader.release(taken);
        self.space_freed();
        msgs
    }
}

/// Walks a ring's published bytes, its two parts in order: numbers the staged messages,
/// skips pad words, and appends the datagrams to `out`, each closed at `limit` bytes (after
/// every message when `limit` is 0), at a skip word inside a part, and at the end. A
/// datagram open at the end of part 0 (the writer's skip word, if any, reaches that end)
/// continues into part 1 (`Bound::more`), so that a drain across the end of the ring cuts
/// no datagram short; every message stays whole and aligned in its datagram, since each
/// piece is a run of whole messages. Never reads out of bounds, always advances, and stops
/// a part at its first malformed word (returned, with the messages found). Reads each
/// header once.
fn frame(
    parts: [&mut [u8]; 2],
    limit: usize,
    seqs: &mut crate::seq::DestSeqs,
    out: &mut Vec<Bound>,
) -> (u64, Option<DecodeError>) {
    let mut total = 0u64;
    // The id being numbered (`idx`, `val` as one word) and its last number, written back
    // when the id changes.
    let (mut key, mut n, mut numbering) = (0u64, 0u32, false);
    let mut bad = None;
    // Part 0's last datagram while it may continue into part 1: its index in `out`.
    let mut open: Option<usize> = None;
    // Closes the datagram `start..end` of `part` (`msgs` messages): extends `open` with
    // it, or appends it. With `carry`, leaves it open and returns its bytes.
    let mut close = |part, start, end: usize, msgs: &mut u64, carry: bool| {
        let mut carried = 0;
        if let Some(b) = open.take().and_then(|i| out.get_mut(i)) {
            b.more = end;
            b.msgs += *msgs;
        } else if *msgs > 0 {
            out.push(Bound {
                part,
                start,
                end,
                more: 0,
                msgs: *msgs,
            });
            if carry {
                (open, carried) = (Some(out.len() - 1), end - start);
            }
        }
        total += *msgs;
        *msgs = 0;
        carried
    };
    let mut carried = 0;
    for (part, bytes) in parts.into_iter().enumerate() {
        // The open datagram: start, end of its last message, the end beyond which a
        // message closes it (one carried over from part 0 has its bytes less), messages.
        let (mut start, mut end, mut msgs) = (0usize, 0usize, 0u64);
        let mut close_at = if carried > 0 {
            limit.saturating_sub(carried)
        } else {
            0
        };
        let mut p = 0usize;
        while p < bytes.len() {
            let rest = bytes.len() - p;
            if let Some(h) = bytes.get_mut(p..).and_then(array_mut::<HDR>) {
                let word = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]);
                let stride = nlmsg_align(word as usize);
                // A message (not a skip word) that fits: the common case, one range check.
                if (HDR as u32..SKIP).contains(&word) && stride <= rest {
                    let staged = u16::from_ne_bytes([h[4], h[5]]) == STAGED;
                    let (head, k) = (word8(h, 0), word8(h, 16));
                    if staged {
                        if !numbering || k != key {
                            if numbering {
                                seqs.put(id_of(key), n);
                            }
                            (key, n, numbering) = (k, seqs.get(id_of(k)), true);
                        }
                        n = n.wrapping_add(1);
                        stamp(h, n);
                    }
                    if p + stride > close_at {
                        close(part, start, end, &mut msgs, false);
                        start = p;
                        close_at = p + limit.max(stride);
                    }
                    msgs += 1;
                    p += stride;
                    // The common case, one writer's stream: the messages that follow
                    // repeat this one's length, type, flags and id. Number them with one
                    // comparison each, as long as they stay in the open datagram.
                    if staged {
                        let end = close_at.min(bytes.len());
                        let taken;
                        (p, n, taken) = run(bytes, p, end, stride, [head, k], n);
                        msgs += taken;
                    }
                    end = p;
                    continue;
                }
            }
            // A skip word, or a malformed word: only a bug can put one in a ring; the walk
            // of this part stops there, so that the ring cannot wedge.
            let word = bytes.get(p..p + 4).and_then(|w| w.try_into().ok());
            let word = word.map_or(0, u32::from_ne_bytes);
            let skip = (word & !SKIP) as usize;
            if word & SKIP == 0 || skip < 4 || skip > rest {
                let (len, remaining) = (word, rest);
                let kind = DecodeErrorKind::NlmsgLenOverrun { len, remaining };
                bad = Some(DecodeError::new(p, kind));
                break;
            }
            // The writer's skip word fills part 0 up to the end of the ring, where the
            // datagram goes on (in part 1); a datagram never spans any other.
            if part != 0 || skip != rest {
                close(part, start, end, &mut msgs, false);
                close_at = 0;
            }
            p += skip;
        }
        carried = close(part, start, end, &mut msgs, part == 0 && p == bytes.len());
    }
    if numbering {
        seqs.put(id_of(key), n);
    }
    (total, bad)
}

/// Numbers the messages from `p` that repeat the header words `same` (length, type, flags;
/// id) and end by `end`, their seqs following `n`. Returns the position after them, the
/// last seq and how many. Out of line: with its few variables in registers, one message
/// costs about a dozen instructions.
#[inline(never)]
fn run(
    bytes: &mut [u8],
    mut p: usize,
    end: usize,
    stride: usize,
    same: [u64; 2],
    mut n: u32,
) -> (usize, u32, u64) {
    let from = n;
    while p + stride <= end {
        let Some(h) = bytes.get_mut(p..).and_then(array_mut::<HDR>) else {
            break;
        };
        if word8(h, 0) != same[0] || word8(h, 16) != same[1] {
            break;
        }
        n = n.wrapping_add(1);
        stamp(h, n);
        p += stride;
    }
    (p, n, u64::from(n.wrapping_sub(from)))
}

/// Eight header bytes at `at` as one word (for comparisons only).
#[inline(always)]
fn word8(h: &[u8; HDR], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(b) = h.get(at..at + 8) {
        w.copy_from_slice(b);
    }
    u64::from_ne_bytes(w)
}

/// Writes seq `n` into a staged message's header (`nlmsg_seq`, `cn_msg.seq`) and makes
/// it `NLMSG_DONE`.
#[inline(always)]
pub(crate) fn stamp(h: &mut [u8; HDR], n: u32) {
    h[8..12].copy_from_slice(&n.to_ne_bytes());
    h[24..28].copy_from_slice(&n.to_ne_bytes());
    h[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
}

/// The id of a header's `idx`, `val` read as one host-order word.
fn id_of(key: u64) -> CbId {
    let b = key.to_ne_bytes();
    CbId::new(
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{messages_ref, DatagramBuilder, MessageRef};
    use crate::seq::SeqSource;

    fn staged(id: CbId, data: &[u8], numbered: bool) -> Vec<u8> {
        let e = if numbered {
            Entry::Slice { id, data }
        } else {
            Entry::Msg(CnMsg::new(id, data.to_vec()))
        };
        let mut v = vec![0u8; e.encoded_len()];
        e.encode_into(7, &mut v).unwrap();
        v
    }

    /// `frame` over `bytes` as part `part` (the other one empty), with a fresh numbering.
    fn walk(
        part: usize,
        bytes: &mut [u8],
        limit: usize,
    ) -> ((u64, Option<DecodeError>), Vec<Bound>) {
        let mut none = [0u8; 0];
        let parts = match part {
            0 => [bytes, &mut none[..]],
            _ => [&mut none[..], bytes],
        };
        walk2(parts, limit)
    }

    /// `frame` over both parts, with a fresh numbering.
    fn walk2(parts: [&mut [u8]; 2], limit: usize) -> ((u64, Option<DecodeError>), Vec<Bound>) {
        let mut src = SeqSource::default();
        let mut out = Vec::new();
        let w = frame(
            parts,
            limit,
            &mut src.to(crate::sys::Dest::Group(20)),
            &mut out,
        );
        (w, out)
    }

    #[test]
    fn encoding_matches_datagram_builder_once_framed() {
        for n in [0usize, 1, 3, 63, 64, 65, 1000] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let msg = CnMsg::new(CbId::new(0x4000_0001, 9), data.clone()).with_seq(7, 8);
            let mut b = DatagramBuilder::new(4096).with_pid(42);
            assert!(b.push(&msg).unwrap());
            let e = Entry::Msg(msg.clone());
            let mut out = vec![0xAAu8; e.encoded_len() + 8];
            assert_eq!(e.encode_into(42, &mut out), Some(e.encoded_len()));
            assert!(out[e.encoded_len()..].iter().all(|&b| b == 0xAA));
            assert_eq!(
                &out[..e.encoded_len()],
                b.as_bytes(),
                "payload of {n} bytes"
            );
            let mut short = vec![0xAAu8; e.encoded_len() - 1];
            assert_eq!(e.encode_into(42, &mut short), None);
            assert!(short.iter().all(|&b| b == 0xAA));
            assert_eq!(e.into_msg(), msg);
            // The slice path, once the drain numbered it (seq 1), against the builder.
            let e2 = Entry::Slice {
                id: msg.id,
                data: &data,
            };
            let mut out = vec![0u8; e2.encoded_len()];
            e2.encode_into(42, &mut out).unwrap();
            walk(0, &mut out, 4096);
            let mut b2 = DatagramBuilder::new(4096).with_pid(42);
            assert!(b2
                .push(&CnMsg::new(msg.id, data.clone()).with_seq(1, 0))
                .unwrap());
            assert_eq!(out, b2.as_bytes(), "slice payload of {n} bytes");
        }
    }

    #[test]
    fn push_bounds_by_count_and_bytes_and_wraps() {
        let bytes = Ring::bytes(4, 128).unwrap();
        assert_eq!(bytes, 512);
        let (r, mut t) = Ring::new(bytes).unwrap();
        let d = [0u8; 64];
        let e = Entry::Slice {
            id: CbId::new(1, 1),
            data: &d,
        };
        for k in 1..=4 {
            assert_eq!(r.push(&mut t, &e, 1, 4, || 5), Some(k));
        }
        assert_eq!(r.push(&mut t, &e, 1, 4, || 6), None, "full at capacity");
        assert_eq!((r.queued(), r.since.load(Relaxed), r.pushed()), (4, 5, 4));
        assert!(!r.probe.released(t.writer.position()));
        let big = [0u8; 200];
        let eb = Entry::Slice {
            id: CbId::new(1, 1),
            data: &big,
        };
        assert_eq!(r.push(&mut t, &eb, 1, 9, || 6), None, "byte bound");
        assert_eq!(Ring::bytes(usize::MAX / 50, 0), None, "overflow");
        assert_eq!(Ring::bytes(1 << 30, 0), None, "over 1 GiB");
        assert_eq!(Ring::bytes(3, 1000), Some(2048));
    }

    #[test]
    fn frame_numbers_skips_pads_and_packs_datagrams() {
        let a = CbId::new(0x4000_0001, 1);
        let b = CbId::new(0x4000_0001, 2);
        let mut bytes = Vec::new();
        bytes.extend(staged(a, b"x", true)); // 40 bytes
        bytes.extend(staged(a, b"hello", true)); // 44
        bytes.extend(staged(b, b"x", false)); // 40, prebuilt: seq kept (0)
        bytes.extend(staged(a, b"x", true)); // 40
        bytes.extend((8u32 | SKIP).to_ne_bytes());
        bytes.extend([0u8; 4]);
        let mut src = SeqSource::default();
        let mut seqs = src.to(crate::sys::Dest::Group(20));
        let mut out = Vec::new();
        let w = frame([&mut bytes, &mut []], 100, &mut seqs, &mut out);
        assert_eq!(w, (4, None));
        let spans: Vec<_> = out.iter().map(|x| (x.start, x.end, x.msgs)).collect();
        assert_eq!(spans, [(0, 84, 2), (84, 164, 2)]);
        let got: Vec<_> = messages_ref(&bytes[..164])
            .map(|m| match m {
                Ok(MessageRef::Connector { nl, cn, .. }) => (nl.ty, nl.seq, cn.seq),
                other => panic!("{other:?}"),
            })
            .collect();
        let d = NLMSG_DONE;
        assert_eq!(got, [(d, 1, 1), (d, 2, 2), (d, 0, 0), (d, 3, 3)]);
        assert_eq!(seqs.get(a), 3);
        // One message per datagram without coalescing.
        let mut again = staged(b, b"x", true);
        again.extend(staged(b, b"y", true));
        let (_, out) = walk(1, &mut again, 0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].part, 1);
    }

    #[test]
    fn frame_runs_break_at_datagram_limits_and_id_changes() {
        let a = CbId::new(0x4000_0001, 1);
        let b = CbId::new(0x4000_0001, 2);
        let mut bytes = Vec::new();
        for _ in 0..10 {
            bytes.extend(staged(a, b"abcd", true)); // 40 bytes each
        }
        bytes.extend(staged(b, b"abcd", true));
        bytes.extend(staged(a, b"abcd", true));
        let (w, out) = walk(0, &mut bytes, 120);
        assert_eq!(w.0, 12);
        let per: Vec<u64> = out.iter().map(|x| x.msgs).collect();
        assert_eq!(per, [3, 3, 3, 3]);
        assert!(out.windows(2).all(|w| w[0].end == w[1].start));
        let got: Vec<_> = messages_ref(&bytes)
            .map(|m| match m {
                Ok(MessageRef::Connector { nl, cn, .. }) => (cn.id.val, nl.ty, nl.seq, cn.seq),
                other => panic!("{other:?}"),
            })
            .collect();
        let mut want: Vec<_> = (1..=10).map(|n| (1, NLMSG_DONE, n, n)).collect();
        want.push((2, NLMSG_DONE, 1, 1));
        want.push((1, NLMSG_DONE, 11, 11));
        assert_eq!(got, want);
    }

    #[test]
    fn frame_stops_at_malformed_words() {
        for junk in [
            vec![0u8; 8],                          // nlmsg_len 0
            (12u32 | SKIP).to_ne_bytes().to_vec(), // skip past the end
            SKIP.to_ne_bytes().to_vec(),           // skip of 0: would not advance
            1000u32.to_ne_bytes().to_vec(),        // message past the end
            vec![1, 2],                            // too short for a word
        ] {
            let (w, out) = walk(0, &mut junk.clone(), 4096);
            assert!(w.1.is_some(), "{junk:?}");
            assert!(out.is_empty());
        }
    }

    /// Each datagram of `out` as the bytes it sends (its pieces joined), and its messages'
    /// (`cn_msg.val`, seq), parsed as a receiver does.
    fn sent(parts: [&[u8]; 2], out: &[Bound]) -> Vec<Vec<(u32, u32)>> {
        out.iter()
            .map(|x| {
                let mut d = parts[x.part][x.start..x.end].to_vec();
                d.extend(&parts[1][..x.more]);
                let msgs: Vec<_> = messages_ref(&d)
                    .map(|m| match m {
                        Ok(MessageRef::Connector { nl, cn, .. }) => {
                            assert_eq!(nl.seq, cn.seq);
                            (cn.id.val, cn.seq)
                        }
                        other => panic!("{other:?}"),
                    })
                    .collect();
                assert_eq!(x.msgs as usize, msgs.len());
                msgs
            })
            .collect()
    }

    /// A drain across the end of the ring: the datagram open at the end of part 0 goes on
    /// in part 1 (two iovecs, one datagram), full up to the limit, every message whole and
    /// numbered in wire order. (Before, each part was framed alone: a datagram was cut at
    /// the end of the ring.)
    #[test]
    fn frame_continues_a_datagram_past_the_end_of_the_ring() {
        let a = CbId::new(0x4000_0001, 1);
        let msg = |n: usize| {
            (0..n)
                .flat_map(|_| staged(a, b"abcd", true))
                .collect::<Vec<u8>>()
        };
        // Part 0: 3 messages of 40 bytes and the writer's skip word to the end; part 1: 4.
        let mut p0 = msg(3);
        p0.extend((8u32 | SKIP).to_ne_bytes());
        p0.extend([0u8; 4]);
        let mut p1 = msg(4);
        let (w, out) = walk2([&mut p0, &mut p1], 200);
        assert_eq!(w, (7, None));
        let want = [
            Bound {
                part: 0,
                start: 0,
                end: 120,
                more: 80,
                msgs: 5,
            },
            Bound {
                part: 1,
                start: 80,
                end: 160,
                more: 0,
                msgs: 2,
            },
        ];
        assert_eq!(out, want);
        let got = sent([&p0, &p1], &out);
        let seqs: Vec<u32> = got.iter().flatten().map(|m| m.1).collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
        // Part 0 ending at the end of the ring without a skip word: the same.
        let (mut p0, mut p1) = (msg(3), msg(4));
        let (_, out) = walk2([&mut p0, &mut p1], 200);
        assert_eq!((out.len(), out[0].more, out[0].msgs), (2, 80, 5));
        // Part 0's last datagram already full (120 of 120 bytes): part 1 starts a new one.
        let (mut p0, mut p1) = (msg(3), msg(4));
        let (_, out) = walk2([&mut p0, &mut p1], 120);
        let spans: Vec<_> = out.iter().map(|x| (x.part, x.more, x.msgs)).collect();
        assert_eq!(spans, [(0, 0, 3), (1, 0, 3), (1, 0, 1)]);
        // Room for less than a message: the same.
        let (mut p0, mut p1) = (msg(3), msg(4));
        let (_, out) = walk2([&mut p0, &mut p1], 159);
        let spans: Vec<_> = out.iter().map(|x| (x.part, x.more, x.msgs)).collect();
        assert_eq!(spans, [(0, 0, 3), (1, 0, 3), (1, 0, 1)]);
        // One message per datagram: nothing continues.
        let (mut p0, mut p1) = (msg(3), msg(4));
        let (w, out) = walk2([&mut p0, &mut p1], 0);
        assert_eq!((w.0, out.len()), (7, 7));
        assert!(out.iter().all(|x| x.more == 0 && x.msgs == 1));
        assert_eq!(sent([&p0, &p1], &out).concat().len(), 7);
        // A malformed word in part 0 ends its datagram there (counted), part 1 its own.
        let mut p0 = msg(2);
        p0.extend(1000u32.to_ne_bytes());
        let mut p1 = msg(2);
        let (w, out) = walk2([&mut p0, &mut p1], 4096);
        assert_eq!((w.0, w.1.is_some()), (4, true));
        let spans: Vec<_> = out
            .iter()
            .map(|x| (x.part, x.end, x.more, x.msgs))
            .collect();
        assert_eq!(spans, [(0, 80, 0, 2), (1, 80, 0, 2)]);
        // A skip word inside part 0 (no writer makes one) ends the datagram too.
        let mut p0 = msg(1);
        p0.extend((8u32 | SKIP).to_ne_bytes());
        p0.extend([0u8; 4]);
        p0.extend(msg(1));
        let mut p1 = msg(1);
        let (_, out) = walk2([&mut p0, &mut p1], 4096);
        let spans: Vec<_> = out
            .iter()
            .map(|x| (x.part, x.start, x.end, x.more))
            .collect();
        assert_eq!(spans, [(0, 0, 40, 0), (0, 48, 88, 40)]);
    }

    /// Random message sizes (up to the largest a datagram takes) through a ring of the
    /// minimum size (two datagrams), drained at random points, so that drains start and
    /// end everywhere, skip words and messages lie exactly at the end of the ring: every
    /// datagram framed is whole messages, at most the limit (a lone larger message
    /// excepted: none here), numbered 1, 2, 3, ... in wire order, with and without
    /// coalescing; every message taken once.
    #[test]
    fn frame_over_random_wraps_of_a_minimum_ring_keeps_every_datagram_whole() {
        for limit in [0usize, 256, 1024] {
            let d = 1024;
            let bytes = Ring::bytes(1, d).unwrap();
            assert_eq!(bytes, 2 * d);
            let (r, mut t) = Ring::new(bytes).unwrap();
            let mut src = SeqSource::default();
            let id = CbId::new(0x4000_0001, 7);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut rnd = |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let (mut pushed, mut seen, mut across) = (0u64, 0u32, 0);
            let data = vec![5u8; d];
            for _ in 0..4000 {
                // Sizes: often small, sometimes exactly the largest.
                let len = match rnd(8) {
                    0 => d - HDR,
                    1 => rnd((d - HDR) as u64) as usize,
                    _ => rnd(64) as usize,
                };
                let e = Entry::Slice {
                    id,
                    data: &data[..len],
                };
                if r.push(&mut t, &e, 1, usize::MAX, || 1).is_some() {
                    pushed += 1;
                }
                if rnd(4) != 0 {
                    continue;
                }
                let mut dr = r.drain.lock();
                let (a, b) = dr.reader.readable();
                let taken = a.len() + b.len();
                let mut out = Vec::new();
                let (n, bad) = frame(
                    [&mut *a, &mut *b],
                    limit,
                    &mut src.to(crate::sys::Dest::Group(20)),
                    &mut out,
                );
                assert!(bad.is_none());
                let got = sent([&*a, &*b], &out);
                for (x, msgs) in out.iter().zip(&got) {
                    let len = x.end - x.start + x.more;
                    across += usize::from(x.more > 0);
                    if limit == 0 {
                        assert_eq!(msgs.len(), 1);
                    } else {
                        assert!(len <= limit || msgs.len() == 1, "{x:?}");
                    }
                    for m in msgs {
                        seen += 1;
                        assert_eq!(m.1, seen);
                    }
                }
                assert_eq!(n, got.iter().map(Vec::len).sum::<usize>() as u64);
                dr.reader.release(taken);
            }
            let mut dr = r.drain.lock();
            let (a, b) = dr.reader.readable();
            let mut out = Vec::new();
            frame(
                [&mut *a, &mut *b],
                limit,
                &mut src.to(crate::sys::Dest::Group(20)),
                &mut out,
            );
            seen += sent([&*a, &*b], &out).concat().len() as u32;
            assert_eq!(u64::from(seen), pushed);
            assert_eq!(across > 0, limit > 0, "datagrams across the end: {across}");
        }
    }

    /// The same through a bus, counted at a receiver: 10 messages of 100 bytes queued across
    /// the end of a 2 KiB ring (5 before it, 5 after) go out as one datagram of 1000 bytes
    /// (at most 1024). Before: two datagrams of 5.
    #[test]
    fn a_drain_across_the_end_of_the_ring_sends_full_datagrams() {
        let rx = match crate::sys::ConnectorSocket::open() {
            Ok(rx) => rx,
            Err(e) if std::env::var_os("CI").is_some() => panic!("no netlink socket: {e}"),
            Err(e) => return eprintln!("SKIPPED: no netlink connector socket: {e}"),
        };
        rx.set_recv_buffer(1 << 20, true).unwrap();
        // Our own port: every datagram there is ours.
        let mut seen = Vec::new();
        let mut datagrams = || {
            let mut per = Vec::new();
            let mut buf = bytes::BytesMut::with_capacity(1 << 16);
            while rx.recv(&mut buf, true).unwrap().is_some() {
                // Every message whole and numbered in order (a cut one would be an error).
                let seqs: Vec<u32> = messages_ref(&buf)
                    .map(|m| match m {
                        Ok(MessageRef::Connector { cn, .. }) => cn.seq,
                        other => panic!("{other:?}"),
                    })
                    .collect();
                seen.extend(seqs.iter().copied());
                per.push(seqs.len());
                buf.clear();
            }
            per
        };
        let bus = super::super::Bus::builder(crate::sys::Dest::Port(rx.port_id()))
            .shards(1)
            .capacity(16)
            .datagram_size(1024)
            .watermark(usize::MAX)
            .max_latency(std::time::Duration::from_secs(60))
            .assist(false)
            .build()
            .unwrap();
        let mut p = bus.producer();
        let id = CbId::new(0x4000_0000 | (std::process::id() & 0xffff) << 8 | 0xe1, 1);
        let data = [7u8; 64];
        for _ in 0..15 {
            super::super::Insert::insert(&mut p, id, &data).unwrap();
        }
        bus.flush().unwrap();
        assert_eq!(datagrams().iter().sum::<usize>(), 15);
        let before = bus.stats().sent_datagrams;
        for _ in 0..10 {
            super::super::Insert::insert(&mut p, id, &data).unwrap();
        }
        bus.flush().unwrap();
        assert_eq!(
            datagrams(),
            [10],
            "one full datagram across the end of the ring"
        );
        assert_eq!(bus.stats().sent_datagrams - before, 1);
        assert_eq!(seen, (1..=25).collect::<Vec<u32>>());
    }
}
