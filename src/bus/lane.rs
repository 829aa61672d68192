//! Lanes: a [`Producer`]'s own single-producer ring in front of the bus.
//!
//! A lane is a [`sys::ring`](crate::sys) byte ring that only its producer writes, so an
//! insert needs no lock and no atomic read-modify-write: the producer encodes the message
//! at the ring's tail and publishes it with one `Release` store. Drainers (the producer
//! itself at the watermark, or the flusher) take the lane's drain right, frame the
//! published messages into datagrams, number them, send them with `sendmmsg` where they
//! lie, and give the bytes back.
//!
//! # Staged format
//!
//! A lane holds encoded messages back to back, each `nlmsg_align(nlmsg_len)` bytes, as the
//! wire has them, with two differences the drainer removes before sending:
//! * a message whose seq the drainer assigns has `nlmsg_type` [`STAGED`]; the drainer
//!   writes its seq (both fields) and sets the type to `NLMSG_DONE`. A prebuilt message is
//!   staged as `NLMSG_DONE` and keeps its seq.
//! * a message never wraps around the end of the ring: when one would, the producer fills
//!   the rest of the ring with a skip word, [`PAD`] `| bytes` where a message has its
//!   `nlmsg_len` (lengths are below 2^17, so the bit is free), and writes the message at
//!   the start. Datagrams are closed at the end of the ring.
//!
//! # Waking the flusher
//!
//! A push into a shard orders itself against the flusher's last look before it parks
//! through the shard's lock (see the `handshake` module). A lane has no lock, so the same
//! Dekker pattern is paired asymmetrically: the producer publishes, runs
//! [`membarrier::Light`] (a compiler fence where the kernel offers `membarrier(2)`), and
//! loads the flusher's state; the flusher announces `IDLE`, runs [`membarrier::heavy`]
//! (which makes every running thread of the process execute a full barrier), and looks at
//! every lane. Either the flusher sees the message or the producer sees `IDLE` and wakes
//! it. Where membarrier is unavailable both sides use `SeqCst` fences. The flusher pays
//! the system call only when it parks with no timeout and lanes exist. A missed
//! watermark wake-up of a flusher that waits for a deadline (`TIMED`) is not paired: it
//! costs at most the deadline, which bounds the wait anyway.

use std::io::IoSlice;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::*};

use crate::error::{DecodeError, DecodeErrorKind};
use std::sync::Arc;

use crossbeam::utils::CachePadded;
use parking_lot::Mutex;

use crate::codec::{array_mut, nlmsg_align, CbId, CnMsg, NLMSG_DONE};
use crate::sys::membarrier;
use crate::sys::ring::{self, Probe, Reader, Short, Writer};

use super::drain::Progress;
use super::insert::{self, Queue};
use super::shard::{Entry, BYTES_PER_SLOT};
use super::stats::Counters;
use super::{Bus, FullPolicy, Inner, InsertError};

/// `nlmsg_type` of a staged message that the drainer numbers.
pub(crate) const STAGED: u16 = 0;

/// High bit of a skip word (see the module docs).
pub(crate) const PAD: u32 = 1 << 31;

/// Netlink plus connector header: the shortest message.
const HDR: usize = 36;

/// The largest lane ring (bytes).
const MAX_RING: usize = 1 << 30;

/// A lane's shared state.
pub(crate) struct Lane {
    probe: Probe,
    /// Messages the producer has published. Stored (`Relaxed`) only by the producer: a
    /// statistic and a hint for the flusher; the ring's positions are what order memory.
    pub pushed: AtomicU64,
    /// Messages drainers have finished with (sent or counted as failed). Stored (`Release`)
    /// only by the holder of `drain`, after the send and after `since`; the producer loads
    /// it (`Acquire`) to tell whether the lane is empty and how full it is.
    pub done: CachePadded<AtomicU64>,
    /// An enqueue stamp (ns since the bus epoch) no later than that of the oldest
    /// message held: stored by the producer when it publishes into an empty lane, and by a
    /// drainer (before `done`) as the time it loaded the tail, which every message it left
    /// behind is younger than. Read only while the lane holds messages.
    pub since: AtomicU64,
    /// The producer is gone: once empty, the flusher forgets the lane.
    pub retired: AtomicBool,
    /// The drain right, with the ring's reading side.
    pub drain: Mutex<LaneDrainer>,
}

/// The reading side of a lane and the drainer's scratch state.
pub(crate) struct LaneDrainer {
    reader: Reader,
    /// Our copy of `Lane::done`.
    done: u64,
    /// Datagrams of the current drain.
    bounds: Vec<Bound>,
}

/// One datagram of a drain: part (0: before the end of the ring, 1: after), byte range in
/// that part, messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bound {
    part: usize,
    start: usize,
    end: usize,
    msgs: u64,
}

impl Lane {
    /// Messages held, as seen now (approximate while the producer and a drainer run).
    pub(crate) fn queued(&self) -> u64 {
        self.pushed
            .load(Relaxed)
            .saturating_sub(self.done.load(Acquire))
    }

    /// True when published bytes are waiting (the flusher's look).
    pub(crate) fn has_pending(&self) -> bool {
        self.probe.pending() > 0
    }

    /// True when messages wait and no drainer is at work on the lane. The flusher's look
    /// when it decides how to sleep: only the lane's producer drains it outside the
    /// flusher, and while it does it inserts nothing, so its drain takes everything and
    /// the producer's next insert follows the wake-up protocol again.
    pub(crate) fn waiting(&self) -> bool {
        self.has_pending() && !self.drain.is_locked()
    }
}

impl Inner {
    /// Drains the lane whose drain right the caller holds as `d`: everything published
    /// now is framed, numbered and sent, then given back. Returns the messages taken.
    pub(crate) fn drain_lane(&self, lane: &Lane, d: &mut LaneDrainer) -> u64 {
        // Read before the tail: every message left behind is younger.
        let t = self.now_ns();
        let LaneDrainer {
            reader,
            done,
            bounds,
        } = d;
        let (a, b) = reader.readable();
        if a.is_empty() {
            return 0;
        }
        let since = lane.since.load(Relaxed);
        bounds.clear();
        // Messages framed, once known: a panic after that point is contained (what was
        // not sent is counted as failed); one while framing leaves the bytes in the lane,
        // for the next drain (messages numbered by then keep their numbers).
        let framed = std::cell::Cell::new(None);
        let progress = Progress::default();
        let sent = self.contain("bus drainer", || {
            // The send lock: numbers follow wire order per id (see `drain`).
            let mut numbering = self.seqs().lock();
            let mut seqs = numbering.to(self.dest);
            let lim = Limits {
                coalesce: self.cfg.coalesce(),
                datagram: self.cfg.datagram_size,
            };
            let (mut msgs, mut bad) = (0u64, None);
            for (part, bytes) in [(0, &mut *a), (1, &mut *b)] {
                let w = frame(part, bytes, lim, &mut seqs, bounds);
                msgs += w.msgs;
                bad = bad.or(w.bad);
            }
            framed.set(Some(msgs));
            let parts = [&*a, &*b];
            let slices: Vec<IoSlice<'_>> = bounds
                .iter()
                .filter_map(|x| parts.get(x.part)?.get(x.start..x.end).map(IoSlice::new))
                .collect();
            self.send_datagrams(&slices, |i| bounds.get(i).map_or(0, |x| x.msgs), &progress);
            (msgs, bad)
        });
        let (msgs, bad) = match (sent, framed.get()) {
            (Some(r), _) => r,
            (None, Some(msgs)) => {
                self.fail_rest(&progress, msgs, bounds.len() as u64);
                (msgs, None)
            }
            (None, None) => return 0,
        };
        if let Some(e) = bad {
            // Only a bug can put a malformed word in a lane; the rest of the part is
            // skipped so that the lane cannot wedge, and the error is counted and kept
            // (returned by the next `flush`). How many messages the skipped bytes held is
            // unknown, so they are in no counter, and this producer's `queued` stays above
            // 0 from then on.
            Counters::add(&self.stats.failed_datagrams, 1);
            self.record_error(e.into());
        }
        let taken = a.len() + b.len();
        if since != 0 {
            Counters::max(&self.stats.max_queue_delay_ns, t.saturating_sub(since));
        }
        Counters::max(&self.stats.high_water, msgs);
        lane.since.store(t, Relaxed);
        *done += msgs;
        // Release: the send and `since` happen-before the producer's Acquire of `done`.
        lane.done.store(*done, Release);
        reader.release(taken);
        self.space_freed();
        msgs
    }
}

#[derive(Clone, Copy)]
struct Limits {
    coalesce: bool,
    datagram: usize,
}

/// What [`frame`] found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Walk {
    msgs: u64,
    /// A malformed word ended the walk (offset within the part).
    bad: Option<DecodeError>,
}

/// Walks one part of a lane's published bytes: numbers the staged messages, skips pad
/// words, and appends the datagrams (closed at `lim.datagram` bytes, after every message
/// without coalescing, and at the end of the part) to `out`. Never reads out of bounds,
/// always advances, and stops at the first malformed word. Runs once per message on the
/// drainer's side, so it reads each header once, as one fixed-size array.
fn frame(
    part: usize,
    bytes: &mut [u8],
    lim: Limits,
    seqs: &mut super::drain::DestSeqs,
    out: &mut Vec<Bound>,
) -> Walk {
    // Bytes a datagram may hold: 0 without coalescing (every message closes one).
    let limit = if lim.coalesce { lim.datagram } else { 0 };
    // The open datagram: start, the end beyond which a message closes it, messages.
    let (mut start, mut close_at, mut msgs) = (0usize, 0usize, 0u64);
    let mut total = 0u64;
    // The id being numbered (`idx`, `val` as one word) and its last number, written back
    // when the id changes.
    let (mut key, mut n, mut numbering) = (0u64, 0u32, false);
    let mut bad = None;
    let mut p = 0usize;
    let mut close = |out: &mut Vec<Bound>, start: usize, end: usize, msgs: &mut u64| {
        if *msgs > 0 {
            out.push(Bound {
                part,
                start,
                end,
                msgs: *msgs,
            });
            total += *msgs;
            *msgs = 0;
        }
    };
    while p < bytes.len() {
        let rest = bytes.len() - p;
        if let Some(h) = bytes.get_mut(p..).and_then(array_mut::<HDR>) {
            let word = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]);
            let stride = nlmsg_align(word as usize);
            // A message (not a skip word) that fits: the common case, one range check.
            if (HDR as u32..PAD).contains(&word) && stride <= rest {
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
                    close(out, start, p, &mut msgs);
                    start = p;
                    close_at = p + limit.max(stride);
                }
                msgs += 1;
                p += stride;
                // The common case, one producer's stream: the messages that follow repeat
                // this one's length, type, flags and id. Number them with one comparison
                // each, as long as they stay in the open datagram.
                if staged {
                    let end = close_at.min(bytes.len());
                    while p + stride <= end {
                        let Some(h) = bytes.get_mut(p..).and_then(array_mut::<HDR>) else {
                            break;
                        };
                        if word8(h, 0) != head || word8(h, 16) != k {
                            break;
                        }
                        n = n.wrapping_add(1);
                        stamp(h, n);
                        msgs += 1;
                        p += stride;
                    }
                }
                continue;
            }
        }
        // A skip word (a datagram never spans one), or a malformed word.
        match skip(bytes.get(p..).unwrap_or_default(), p) {
            Ok(k) => {
                close(out, start, p, &mut msgs);
                close_at = 0;
                p += k;
            }
            Err(e) => {
                bad = Some(e);
                break;
            }
        }
    }
    close(out, start, p, &mut msgs);
    if numbering {
        seqs.put(id_of(key), n);
    }
    Walk { msgs: total, bad }
}

/// The length of the skip word at the start of `rest` (at offset `at` of its part), or why
/// the bytes there are neither a skip word nor a message.
#[cold]
fn skip(rest: &[u8], at: usize) -> Result<usize, DecodeError> {
    let err = |kind| Err(DecodeError::new(at, kind));
    let Some(&[a, b, c, d]) = rest.get(..4) else {
        return err(DecodeErrorKind::ShortHeader {
            remaining: rest.len(),
        });
    };
    let word = u32::from_ne_bytes([a, b, c, d]);
    let n = (word & !PAD) as usize;
    if word & PAD == 0 && (word as usize) < HDR {
        err(DecodeErrorKind::NlmsgLenTooSmall { len: word })
    } else if word & PAD == 0 || n < 4 || n > rest.len() {
        err(DecodeErrorKind::NlmsgLenOverrun {
            len: word,
            remaining: rest.len(),
        })
    } else {
        Ok(n)
    }
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
fn stamp(h: &mut [u8; HDR], n: u32) {
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

/// A hot-path producer's own lane into a [`Bus`]: the fastest way to insert.
///
/// [`Bus::insert`] finds the calling thread's state in thread-local storage and pushes
/// into the shard of its CPU under the shard's lock. A `Producer` owns a single-producer
/// ring instead: an insert encodes the message at the ring's tail and publishes it with
/// one store, with no lock, no atomic read-modify-write and no thread-local look-up. The
/// bus's drainers (this producer at the [watermark](super::BusBuilder::watermark), or the
/// flusher at the latency deadline, on [`Bus::flush`] and at shutdown) send its messages
/// like a shard's: many per datagram, many datagrams per `sendmmsg`, numbered per id in
/// wire order.
///
/// * **Order**: messages inserted through one `Producer` are sent in insertion order, from
///   whichever thread it is used (it is `Send`; its inserts take `&mut self`). There is no
///   order with other producers or with [`Bus::insert`] calls of the same thread.
/// * **Bounds**: a lane holds `capacity × 100` bytes (rounded up to a power of two, and at
///   least two of its largest messages, at most 1 GiB); when it is full the bus's [`FullPolicy`] applies exactly as for
///   a shard, and every rejection is counted.
/// * **Lifetime**: a `Producer` borrows its bus, so the bus outlives it; dropping it keeps
///   its queued messages, which the flusher sends (within the latency bound) and which
///   [`Bus::flush`] and the bus's shutdown wait for.
///
/// ```no_run
/// use cnbus::bus::Bus;
/// use cnbus::codec::CbId;
/// use cnbus::sys::Dest;
///
/// # fn main() -> cnbus::Result<()> {
/// let bus = Bus::builder(Dest::Group(24)).build()?;
/// std::thread::scope(|s| {
///     for t in 0..2u32 {
///         let bus = &bus;
///         s.spawn(move || {
///             let mut p = bus.producer();
///             for i in 0u32..1000 {
///                 p.insert(CbId::new(0x4000_0001, t), &i.to_ne_bytes()).expect("accepted");
///             }
///         });
///     }
/// });
/// bus.flush()?;
/// # Ok(()) }
/// ```
pub struct Producer<'b> {
    bus: &'b Bus,
    lane: Arc<Lane>,
    writer: Writer,
    /// Our copy of `lane.pushed`.
    pushed: u64,
    /// Our side of the wake-up fence pair (module docs).
    light: membarrier::Light,
}

impl std::fmt::Debug for Producer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("ring_bytes", &self.writer.size())
            .field("pushed", &self.pushed)
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

impl<'b> Producer<'b> {
    /// A new lane, or `None` when its ring cannot be allocated.
    pub(crate) fn new(bus: &'b Bus) -> Option<Self> {
        let inner = &*bus.inner;
        // Registers the process before the first insert relies on `light`.
        let light = membarrier::init();
        // Room for two of the largest messages this bus accepts (so that one always fits
        // after a wrap), and at most 1 GiB (so that a skip word's length, 31 bits, holds
        // any skip).
        let max_msg = inner
            .cfg
            .datagram_size
            .min(nlmsg_align(HDR + CnMsg::MAX_DATA));
        let bytes = (inner.cfg.capacity.saturating_mul(BYTES_PER_SLOT))
            .max(2 * max_msg)
            .min(MAX_RING);
        let (writer, reader) = ring::ring(bytes)?;
        let lane = Arc::new(Lane {
            probe: writer.probe(),
            pushed: AtomicU64::new(0),
            done: CachePadded::new(AtomicU64::new(0)),
            since: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            drain: Mutex::new(LaneDrainer {
                reader,
                done: 0,
                bounds: Vec::new(),
            }),
        });
        inner.add_lane(Arc::clone(&lane));
        Some(Self {
            bus,
            lane,
            writer,
            pushed: 0,
            light,
        })
    }

    /// Queues a message with id `id`, ack 0, the next seq of `id`, and a copy of `data`,
    /// applying the bus's [`FullPolicy`] if the lane is full. See [`Bus::insert`].
    #[inline]
    pub fn insert(&mut self, id: CbId, data: &[u8]) -> Result<(), InsertError<CnMsg>> {
        let policy = self.bus.inner.cfg.policy;
        insert::insert(self, Entry::Slice { id, data }, policy)
    }

    /// [`insert`](Self::insert) with [`FullPolicy::Reject`].
    #[inline]
    pub fn try_insert(&mut self, id: CbId, data: &[u8]) -> Result<(), InsertError<CnMsg>> {
        insert::insert(self, Entry::Slice { id, data }, FullPolicy::Reject)
    }

    /// [`insert`](Self::insert) that waits for space at most `timeout`, or without limit.
    #[inline]
    pub fn insert_blocking(
        &mut self,
        id: CbId,
        data: &[u8],
        timeout: Option<std::time::Duration>,
    ) -> Result<(), InsertError<CnMsg>> {
        insert::insert(
            self,
            Entry::Slice { id, data },
            FullPolicy::blocking(timeout),
        )
    }

    /// [`insert`](Self::insert) that sends on the caller's thread when the lane is full
    /// (after this producer's queued messages, so the order is kept).
    #[inline]
    pub fn insert_or_send(&mut self, id: CbId, data: &[u8]) -> Result<(), InsertError<CnMsg>> {
        insert::insert(self, Entry::Slice { id, data }, FullPolicy::SendDirect)
    }

    /// Queues a prebuilt message (seq, ack and flags kept) with the given policy.
    #[inline]
    pub fn insert_msg(&mut self, msg: CnMsg, policy: FullPolicy) -> Result<(), InsertError<CnMsg>> {
        insert::insert(self, Entry::Msg(msg), policy)
    }

    /// Messages of this producer not sent yet (queued or being sent).
    pub fn queued(&self) -> u64 {
        self.pushed - self.lane.done.load(Acquire)
    }

    /// Bytes this producer's lane holds (see the bounds above); a message takes
    /// [`CnMsg::encoded_len`] of them.
    pub fn capacity_bytes(&self) -> usize {
        self.writer.size()
    }

    /// The bus.
    pub fn bus(&self) -> &'b Bus {
        self.bus
    }

    /// Fills the rest of the ring with a skip word, so that the next message goes at its
    /// start; false when the ring has no room for the skip.
    #[cold]
    fn wrap(&mut self) -> bool {
        let n = self.writer.until_end();
        let skip = (n as u32 | PAD).to_ne_bytes();
        self.writer
            .write(n, |b| {
                if let Some(w) = b.get_mut(..4) {
                    w.copy_from_slice(&skip);
                }
            })
            .is_ok()
    }

    /// Drains this lane on the calling thread, waiting for the drain right if `wait`.
    fn drain_own(&mut self, wait: bool) -> bool {
        let inner = &*self.bus.inner;
        let mut d = match wait {
            true => self.lane.drain.lock(),
            false => match self.lane.drain.try_lock() {
                Some(d) => d,
                None => return false,
            },
        };
        let n = inner.drain_lane(&self.lane, &mut d);
        drop(d);
        Counters::add(&inner.stats.assisted_drains, 1);
        Counters::add(&inner.stats.assisted_messages, n);
        true
    }
}

impl<'b> Queue<'b> for Producer<'b> {
    #[inline(always)]
    fn inner(&self) -> &'b Inner {
        &self.bus.inner
    }

    #[inline(always)]
    fn try_push(&mut self, e: &Entry<'_>, help: bool) -> bool {
        let inner: &'b Inner = &self.bus.inner;
        let len = e.encoded_len();
        let queued = self.pushed.wrapping_sub(self.lane.done.load(Acquire));
        let (pid, ty) = (inner.pid, if e.numbered() { STAGED } else { NLMSG_DONE });
        // Fits: the region has the encoded length, checked against the limits on entry.
        if queued == 0 {
            // Before the message is published (the ring's Release store): whoever sees
            // the message sees this stamp or a later one.
            self.lane.since.store(inner.now_ns(), Relaxed);
        }
        let encode = |b: &mut [u8]| {
            let _ = e.encode_into(pid, ty, b);
        };
        match self.writer.write(len, encode) {
            Ok(()) => {}
            Err(Short::End) if self.wrap() && self.writer.write(len, encode).is_ok() => {}
            Err(_) => return false,
        }
        self.pushed += 1;
        self.lane.pushed.store(self.pushed, Relaxed);
        // Pairs with the flusher's `heavy` before its last look (module docs).
        self.light.fence();
        let n = (queued + 1) as usize;
        inner.after_push(n, help, || self.drain_own(false));
        true
    }

    fn help_own(&mut self) -> bool {
        self.drain_own(false)
    }

    fn settle_own(&mut self) -> bool {
        self.drain_own(true);
        true
    }
}

impl Drop for Producer<'_> {
    fn drop(&mut self) {
        // The flusher sends what is left (it was woken, or has a deadline, when it was
        // queued) and then forgets the lane.
        self.lane.retired.store(true, Release);
    }
}

impl Inner {
    /// Makes a new lane visible to the flusher.
    fn add_lane(&self, lane: Arc<Lane>) {
        {
            let mut l = self.lanes.lock();
            l.push(lane);
            // Release (under the lock too): a flusher that sees the new generation sees
            // the lane when it takes the lock.
            self.lanes_gen.fetch_add(1, Release);
        }
        // A flusher parked IDLE may have looked at the lanes before this one was added,
        // and then did not pair its park with `membarrier::heavy`: wake it, so that it
        // looks again. Dekker with real fences (this is rare): the flusher announces IDLE
        // (SeqCst) before it copies the list; we added the lane before this fence.
        fence(SeqCst);
        if self.bell.state() == super::handshake::IDLE {
            self.wake_from_sleep(super::handshake::IDLE);
        }
    }

    /// Refreshes the flusher's copy of the lanes if they changed.
    pub(crate) fn refresh_lanes(&self, into: &mut Vec<Arc<Lane>>, gen: &mut u64) {
        let g = self.lanes_gen.load(Acquire);
        if g != *gen {
            let l = self.lanes.lock();
            into.clear();
            into.extend(l.iter().cloned());
            *gen = self.lanes_gen.load(Relaxed);
        }
    }

    /// Forgets retired lanes that are empty, keeping their counts for the statistics.
    pub(crate) fn prune_lanes(&self) {
        let mut l = self.lanes.lock();
        let before = l.len();
        l.retain(|x| {
            let gone = x.retired.load(Acquire) && !x.has_pending();
            if gone {
                Counters::add(&self.stats.retired_lane_inserts, x.pushed.load(Relaxed));
            }
            !gone
        });
        if l.len() != before {
            self.lanes_gen.fetch_add(1, Release);
        }
    }

    /// Messages inserted through lanes, retired ones included (under the lanes lock, so
    /// that a lane being forgotten is counted once).
    pub(crate) fn lane_inserts(&self) -> (u64, u64) {
        let l = self.lanes.lock();
        let live: u64 = l.iter().map(|x| x.pushed.load(Relaxed)).sum();
        let queued: u64 = l.iter().map(|x| x.queued()).sum();
        (live + self.stats.retired_lane_inserts.load(Relaxed), queued)
    }

    /// True when no lane holds a message.
    pub(crate) fn lanes_empty(&self) -> bool {
        self.lanes.lock().iter().all(|x| !x.has_pending())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{messages_ref, MessageRef};

    fn staged(id: CbId, data: &[u8], numbered: bool) -> Vec<u8> {
        let e = Entry::Slice { id, data };
        let mut v = vec![0u8; e.encoded_len()];
        let ty = if numbered { STAGED } else { NLMSG_DONE };
        e.encode_into(7, ty, &mut v).unwrap();
        v
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
        bytes.extend((8u32 | PAD).to_ne_bytes());
        bytes.extend([0u8; 4]);
        let mut src = super::super::drain::SeqSource::default();
        let mut seqs = src.to(crate::sys::Dest::Group(20));
        let mut out = Vec::new();
        let lim = Limits {
            coalesce: true,
            datagram: 100,
        };
        let w = frame(0, &mut bytes, lim, &mut seqs, &mut out);
        assert_eq!(w, Walk { msgs: 4, bad: None });
        let spans: Vec<_> = out.iter().map(|x| (x.start, x.end, x.msgs)).collect();
        assert_eq!(spans, [(0, 84, 2), (84, 164, 2)]);
        let got: Vec<_> = messages_ref(&bytes[..164])
            .map(|m| match m {
                Ok(MessageRef::Connector { nl, cn, .. }) => (nl.ty, nl.seq, cn.seq),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                (NLMSG_DONE, 1, 1),
                (NLMSG_DONE, 2, 2),
                (NLMSG_DONE, 0, 0),
                (NLMSG_DONE, 3, 3)
            ]
        );
        assert_eq!(seqs.get(a), 3);
        // One message per datagram without coalescing.
        let mut out = Vec::new();
        let mut again = staged(b, b"x", true);
        let lim = Limits {
            coalesce: false,
            datagram: 100,
        };
        again.extend(staged(b, b"y", true));
        frame(1, &mut again, lim, &mut seqs, &mut out);
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
        let mut src = super::super::drain::SeqSource::default();
        let mut seqs = src.to(crate::sys::Dest::Group(20));
        let mut out = Vec::new();
        let lim = Limits {
            coalesce: true,
            datagram: 120,
        };
        let w = frame(0, &mut bytes, lim, &mut seqs, &mut out);
        assert_eq!(
            w,
            Walk {
                msgs: 12,
                bad: None
            }
        );
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
        let mut src = super::super::drain::SeqSource::default();
        let mut seqs = src.to(crate::sys::Dest::Group(20));
        let lim = Limits {
            coalesce: true,
            datagram: 4096,
        };
        for junk in [
            vec![0u8; 8],                         // nlmsg_len 0
            (12u32 | PAD).to_ne_bytes().to_vec(), // skip past the end
            PAD.to_ne_bytes().to_vec(),           // skip of 0: would not advance
            1000u32.to_ne_bytes().to_vec(),       // message past the end
            vec![1, 2],                           // too short for a word
        ] {
            let mut b = junk.clone();
            let mut out = Vec::new();
            let w = frame(0, &mut b, lim, &mut seqs, &mut out);
            assert!(w.bad.is_some(), "{junk:?}");
            assert!(out.is_empty());
        }
    }
}
