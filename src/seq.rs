//! Sequence numbering and sequence-gap loss detection for traffic between cnbus processes.
//!
//! Pure data (no I/O, no `unsafe`), below [`sys`](crate::sys), which keeps a [`SeqSource`]
//! in every socket; the public items are re-exported from [`connector`](crate::connector).
//!
//! A cnbus sender numbers the messages of each id consecutively **per socket and
//! destination**: every sender on one [`ConnectorSocket`](crate::sys::ConnectorSocket) (a
//! [`Connector`](crate::connector::Connector)'s `send_numbered`, the async connector, every
//! [`Bus`](crate::bus::Bus) and [`Producer`](crate::bus::Producer) sending through it) takes
//! its numbers from that socket's one [`SeqSource`], one sequence per `(destination, id)`.
//! A receiver keeps one baseline per `(port, group, idx, val)` (group 0 for a unicast),
//! which is exactly what one such sequence reaches: all of a group's messages reach every
//! member, all unicasts to a port reach that port. So two senders sharing a socket never
//! hand a receiver `1, 1, 2, 2`, and one socket sending an id to two groups (or to two
//! ports) never makes a receiver of one of them see `1, 3, 5`. A receiver that sees `seq`
//! jump forward by more than one in a stream counts the difference as lost: the gap is
//! exact, whatever dropped the messages (a full receive queue, a full sender). A backward
//! jump or a repeat means the peer restarted, forgot the id (see [`SeqSource`]) or does not
//! number its messages; it resets the baseline and counts as `reordered`, never as loss.
//!
//! Both tables are bounded; see [`SeqSource`] for what forgetting costs.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::codec::{CbId, Dest};

/// A forward jump larger than this is treated as a restart, not as loss.
const MAX_GAP: u32 = 1 << 30;

/// How many `(destination, id)` sequences a socket's [`SeqSource`] remembers unless a
/// builder says otherwise.
pub const DEFAULT_NUMBERED_IDS: usize = 4096;

/// How many `(port, group, id)` streams a receiver's [`SeqTracker`] remembers unless the builder
/// says otherwise.
pub const DEFAULT_TRACKED_STREAMS: usize = 4096;

/// One remembered sequence number and when it was last used.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u32,
    used: u64,
}

/// The bounded table behind [`SeqSource`] and [`SeqTracker`]: the last sequence number per
/// key, at most `capacity` keys; when full, a new key makes it forget the least recently
/// used eighth of them (each counted in `evictions`, which can be read without the lock
/// the table is usually behind).
#[derive(Debug)]
struct LastSeqs<K> {
    map: HashMap<K, Slot>,
    capacity: usize,
    tick: u64,
    evictions: Arc<AtomicU64>,
}

impl<K: Hash + Eq + Copy> LastSeqs<K> {
    fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
            evictions: Arc::default(),
        }
    }

    /// The last number of `key`, if remembered (does not count as a use).
    fn get(&self, key: &K) -> Option<u32> {
        self.map.get(key).map(|s| s.seq)
    }

    /// The number slot of `key`, created (0) if new, evicting first when full; marks it
    /// used. The second value is true when `key` was new.
    #[inline]
    fn slot(&mut self, key: K) -> (&mut u32, bool) {
        let mut new = false;
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            self.evict();
        }
        self.tick += 1;
        let tick = self.tick;
        let s = self.map.entry(key).or_insert_with(|| {
            new = true;
            Slot { seq: 0, used: 0 }
        });
        s.used = tick;
        (&mut s.seq, new)
    }

    /// Forgets the least recently used keys: down to `capacity - capacity / 8` (at least
    /// one below `capacity`), so evictions come in rounds, O(1) amortized per new key.
    #[cold]
    fn evict(&mut self) {
        let keep = self.capacity - (self.capacity / 8).max(1);
        let drop_n = self.map.len().saturating_sub(keep);
        if drop_n == 0 {
            return;
        }
        let mut ages: Vec<(u64, K)> = self.map.iter().map(|(k, s)| (s.used, *k)).collect();
        if drop_n < ages.len() {
            ages.select_nth_unstable_by_key(drop_n - 1, |a| a.0);
        }
        for (_, k) in ages.iter().take(drop_n) {
            self.map.remove(k);
        }
        self.evictions.fetch_add(drop_n as u64, Relaxed);
    }

    fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        if self.map.len() > self.capacity {
            self.evict();
        }
    }
}

/// Tracks the last sequence number per `(port, group, id)` stream, for receivers; bounded
/// (see [`SeqSource`] for what forgetting a stream costs). The proc connector's numbers are
/// per CPU instead: [`CpuSeqTracker`](crate::proc::CpuSeqTracker) tracks those.
#[derive(Debug)]
pub struct SeqTracker {
    last: LastSeqs<(u32, u32, CbId)>,
}

/// What [`SeqTracker::observe`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// The first message seen from this stream (or since the tracker forgot it): the
    /// baseline.
    First,
    /// The next message, as expected.
    InOrder,
    /// `n` messages before this one were lost.
    Gap(u32),
    /// A repeat, a backward jump or an implausible jump: baseline reset.
    Reordered,
}

impl SeqTracker {
    /// A tracker remembering at most `capacity` streams (at least 1). When full, a new
    /// stream makes it forget the least recently seen eighth of them, each counted in
    /// [`evictions`](Self::evictions); a forgotten stream's next message is a new baseline
    /// ([`SeqVerdict::First`]), so no loss is invented.
    pub fn new(capacity: usize) -> Self {
        Self {
            last: LastSeqs::new(capacity),
        }
    }

    /// Records `seq` of `id` from `port`, received on multicast `group` (0 for a unicast).
    pub fn observe(&mut self, port: u32, group: u32, id: CbId, seq: u32) -> SeqVerdict {
        let (last, new) = self.last.slot((port, group, id));
        let prev = std::mem::replace(last, seq);
        if new {
            return SeqVerdict::First;
        }
        match seq.wrapping_sub(prev) {
            1 => SeqVerdict::InOrder,
            d if (2..MAX_GAP).contains(&d) => SeqVerdict::Gap(d - 1),
            _ => SeqVerdict::Reordered,
        }
    }

    /// Forgets every stream of `port` (for instance when the peer is known to be gone).
    /// Not counted as evictions.
    pub fn forget_port(&mut self, port: u32) {
        self.last.map.retain(|(p, _, _), _| *p != port);
    }

    /// Streams forgotten because the tracker was full, since it was made.
    pub fn evictions(&self) -> u64 {
        self.last.evictions.load(Relaxed)
    }

    /// Streams remembered now.
    pub fn len(&self) -> usize {
        self.last.map.len()
    }

    /// True when no stream is remembered.
    pub fn is_empty(&self) -> bool {
        self.last.map.is_empty()
    }
}

/// Hands out consecutive sequence numbers per destination and id (1, 2, 3, ..., wrapping
/// after `u32::MAX` to 0), for senders; [`next`](Self::next) numbers a sequence per id
/// that belongs to no destination (for requests, and for messages built by hand).
///
/// Every [`ConnectorSocket`](crate::sys::ConnectorSocket) carries one, shared by every
/// cnbus sender on that socket; a standalone one is for senders of your own.
///
/// # Bounded
///
/// This table and the receivers' [`SeqTracker`] are bounded, so that a peer that uses
/// `val` as an object id cannot make them grow without limit. When a table is full and a
/// new key arrives, it forgets the least recently used eighth of its keys at once and
/// counts each one as an eviction
/// ([`Stats::numbering_evictions`](crate::connector::Stats::numbering_evictions),
/// [`Stats::tracker_evictions`](crate::connector::Stats::tracker_evictions),
/// [`BusStats::numbering_evictions`](crate::bus::BusStats::numbering_evictions)). What an
/// eviction costs:
///
/// * A **sender** that forgets a sequence (a destination and id) starts it again at 1.
///   Its receivers see the sequence go back and count one `reordered`, not a loss.
///   Messages of that sequence lost just before the restart (after the last one the
///   receiver got) are not seen as a gap.
/// * A **receiver** that forgets a stream takes the stream's next message as a new
///   baseline: messages of that stream lost between the eviction and that message are not
///   seen as a gap.
///
/// So gap counting is exact while both counts stay 0: size the tables
/// ([`ConnectorBuilder::numbered_ids`](crate::connector::ConnectorBuilder::numbered_ids),
/// [`BusBuilder::numbered_ids`](crate::bus::BusBuilder::numbered_ids),
/// [`ConnectorBuilder::tracked_streams`](crate::connector::ConnectorBuilder::tracked_streams)) for the
/// sequences and streams that are live at one time. The kernel's drop counter, where available, stays exact.
#[derive(Debug)]
pub struct SeqSource {
    last: LastSeqs<(Option<Dest>, CbId)>,
}

impl Default for SeqSource {
    fn default() -> Self {
        Self::new(DEFAULT_NUMBERED_IDS)
    }
}

impl SeqSource {
    /// A source remembering at most `capacity` sequences (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            last: LastSeqs::new(capacity),
        }
    }

    /// Takes the next number of `id`'s sequence that belongs to no destination, starting
    /// at 1.
    pub fn next(&mut self, id: CbId) -> u32 {
        DestSeqs::new(self, None).next(id)
    }

    /// Takes the next number of `id` for messages sent to `dest`, starting at 1.
    pub fn next_to(&mut self, dest: Dest, id: CbId) -> u32 {
        self.to(dest).next(id)
    }

    /// The number [`next_to`](Self::next_to) would return, without taking it.
    pub fn peek_to(&self, dest: Dest, id: CbId) -> u32 {
        let last = self.last.get(&(Some(dest), id)).unwrap_or(0);
        last.wrapping_add(1)
    }

    /// The numbers of the messages sent to `dest`.
    pub(crate) fn to(&mut self, dest: Dest) -> DestSeqs<'_> {
        DestSeqs::new(self, Some(dest))
    }

    /// Sequences forgotten because the source was full, since it was made.
    pub fn evictions(&self) -> u64 {
        self.last.evictions.load(Relaxed)
    }

    /// Its eviction count, to read without holding the source (the socket keeps one, so
    /// that statistics never wait for a send in progress).
    pub(crate) fn eviction_counter(&self) -> Arc<AtomicU64> {
        self.last.evictions.clone()
    }

    /// How many sequences it remembers at most.
    pub fn capacity(&self) -> usize {
        self.last.capacity
    }

    /// Changes how many sequences it remembers (at least 1); forgets the least recently used
    /// ones at once if it holds more.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.last.set_capacity(capacity);
    }

    /// Sequences remembered now.
    pub fn len(&self) -> usize {
        self.last.map.len()
    }

    /// True when no sequence is remembered.
    pub fn is_empty(&self) -> bool {
        self.last.map.is_empty()
    }
}

/// The sequences of one destination of a [`SeqSource`] (or of none), by id.
#[derive(Debug)]
pub(crate) struct DestSeqs<'a> {
    src: &'a mut SeqSource,
    dest: Option<Dest>,
}

impl<'a> DestSeqs<'a> {
    fn new(src: &'a mut SeqSource, dest: Option<Dest>) -> Self {
        Self { src, dest }
    }

    /// Takes the next number of `id`.
    pub(crate) fn next(&mut self, id: CbId) -> u32 {
        let n = self.counter(id);
        *n = n.wrapping_add(1);
        *n
    }

    /// The last number given to `id` (0 if none, or if it was forgotten).
    pub(crate) fn get(&self, id: CbId) -> u32 {
        self.src.last.get(&(self.dest, id)).unwrap_or(0)
    }

    /// Records `n` as the last number given to `id`.
    pub(crate) fn put(&mut self, id: CbId, n: u32) {
        *self.counter(id) = n;
    }

    /// The counter of `id` (its last number, 0 if new), for numbering a run of messages
    /// with one look-up.
    #[inline]
    pub(crate) fn counter(&mut self, id: CbId) -> &mut u32 {
        self.src.last.slot((self.dest, id)).0
    }
}

/// Writes `seq` into an encoded message's `nlmsg_seq` (offset 8) and `cn_msg.seq`
/// (offset 24).
#[inline]
pub(crate) fn write_seq(m: &mut [u8; 28], seq: u32) {
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m[24..28].copy_from_slice(&seq.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_exact_and_restarts_are_not_loss() {
        let id = CbId::new(100, 1);
        let mut t = SeqTracker::new(16);
        assert_eq!(t.observe(5, 0, id, 10), SeqVerdict::First);
        assert_eq!(t.observe(5, 0, id, 11), SeqVerdict::InOrder);
        assert_eq!(t.observe(5, 0, id, 15), SeqVerdict::Gap(3));
        assert_eq!(t.observe(5, 0, id, 15), SeqVerdict::Reordered);
        assert_eq!(t.observe(5, 0, id, 1), SeqVerdict::Reordered);
        assert_eq!(t.observe(5, 0, id, 2), SeqVerdict::InOrder);
        assert_eq!(
            t.observe(6, 0, id, 7),
            SeqVerdict::First,
            "ports are separate streams"
        );
        assert_eq!(
            t.observe(5, 20, id, 7),
            SeqVerdict::First,
            "so are a port's groups"
        );
        assert_eq!(t.observe(5, 20, id, 8), SeqVerdict::InOrder);
        assert_eq!(t.observe(5, 0, id, u32::MAX), SeqVerdict::Reordered);
        assert_eq!(t.observe(5, 0, id, 1), SeqVerdict::Gap(1), "wraps");
    }

    /// Past its capacity the tracker forgets the least recently seen streams and counts
    /// them; the streams still in use keep their baselines, so their gaps stay exact.
    #[test]
    fn tracker_is_bounded_evicts_the_oldest_and_counts() {
        let live = CbId::new(1, 0);
        let mut t = SeqTracker::new(64);
        let mut seq = 0;
        for v in 1..10_000u32 {
            seq += 1;
            let first = seq == 1;
            let verdict = t.observe(7, 0, live, seq);
            assert_eq!(
                verdict,
                if first {
                    SeqVerdict::First
                } else {
                    SeqVerdict::InOrder
                }
            );
            // A new stream for every message: the table stays bounded.
            assert_eq!(t.observe(8, 0, CbId::new(2, v), 1), SeqVerdict::First);
            assert!(t.len() <= 64);
        }
        // The live stream was never forgotten: a gap is still exact.
        assert_eq!(t.observe(7, 0, live, seq + 4), SeqVerdict::Gap(3));
        assert!(t.evictions() >= 10_000 - 64);
        assert_eq!(
            t.evictions() + t.len() as u64,
            10_000,
            "every forgotten stream counted"
        );
        // A forgotten stream comes back as a new baseline, not as loss.
        assert_eq!(t.observe(8, 0, CbId::new(2, 1), 50), SeqVerdict::First);
    }

    /// One sequence per destination and id; the destination-less one of `next` apart.
    #[test]
    fn source_numbers_per_destination_and_id() {
        let (a, b) = (CbId::new(100, 1), CbId::new(100, 2));
        let (g, p) = (Dest::Group(20), Dest::Port(77));
        let mut s = SeqSource::default();
        assert_eq!((s.next_to(g, a), s.next_to(g, a)), (1, 2));
        assert_eq!((s.next_to(p, a), s.next_to(g, b), s.next(a)), (1, 1, 1));
        assert_eq!(
            (s.peek_to(g, a), s.next_to(g, a), s.next_to(p, a)),
            (3, 3, 2)
        );
        assert_eq!((s.to(g).get(a), s.to(Dest::Kernel).get(a)), (3, 0));
    }

    #[test]
    fn source_is_bounded_and_counts_evictions() {
        let (a, d) = (CbId::new(100, 1), Dest::Group(20));
        let mut s = SeqSource::new(16);
        assert_eq!(
            (s.next_to(d, a), s.next_to(d, a), s.next_to(d, a)),
            (1, 2, 3)
        );
        for v in 0..1000 {
            s.next_to(d, CbId::new(200, v));
            // `a` stays in use, so it is never the one forgotten.
            s.next_to(d, a);
            assert!(s.len() <= 16);
        }
        assert_eq!(s.next_to(d, a), 1004);
        assert_eq!(s.evictions() + s.len() as u64, 1001);
        // A forgotten id starts again at 1.
        assert_eq!(s.to(d).get(CbId::new(200, 0)), 0);
        assert_eq!(s.next_to(d, CbId::new(200, 0)), 1);
        // Shrinking forgets at once, and counts.
        let (before, len) = (s.evictions(), s.len() as u64);
        s.set_capacity(2);
        assert!(s.len() < 2);
        assert_eq!(s.evictions() - before, len - s.len() as u64);
    }

    /// What a sender's eviction looks like to a receiver: a restart, counted as
    /// `reordered`, never as loss.
    #[test]
    fn a_sender_eviction_is_reordered_not_loss() {
        let (a, b, d) = (CbId::new(100, 1), CbId::new(100, 2), Dest::Group(20));
        let mut s = SeqSource::new(1);
        let mut t = SeqTracker::new(16);
        for _ in 0..5 {
            assert_ne!(t.observe(9, 20, a, s.next_to(d, a)), SeqVerdict::Reordered);
        }
        t.observe(9, 20, b, s.next_to(d, b)); // forgets `a`
        assert_eq!(s.evictions(), 1);
        assert_eq!(t.observe(9, 20, a, s.next_to(d, a)), SeqVerdict::Reordered);
        assert_eq!(t.observe(9, 20, a, s.next_to(d, a)), SeqVerdict::InOrder);
    }
}
