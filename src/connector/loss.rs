//! Sequence-gap loss detection for traffic between cnbus processes.
//!
//! A cnbus sender numbers the messages of each id consecutively per socket (see
//! [`SeqSource`]). A receiver that sees `seq` jump forward by more than one from the same
//! `(port, idx, val)` counts the difference as lost: the gap is exact, whatever dropped the
//! messages (a full receive queue, a full sender). A backward jump or a repeat means the
//! peer restarted or does not number its messages; it resets the baseline and counts as
//! `reordered`, never as loss.

use std::collections::HashMap;

use crate::codec::CbId;

/// A forward jump larger than this is treated as a restart, not as loss.
const MAX_GAP: u32 = 1 << 30;

/// Tracks the last sequence number per `(port, id)`.
#[derive(Debug)]
pub struct SeqTracker {
    last: HashMap<(u32, CbId), u32>,
    capacity: usize,
}

/// What [`SeqTracker::observe`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// The first message seen from this stream: the baseline.
    First,
    /// The next message, as expected.
    InOrder,
    /// `n` messages before this one were lost.
    Gap(u32),
    /// A repeat, a backward jump or an implausible jump: baseline reset.
    Reordered,
}

impl SeqTracker {
    /// A tracker remembering at most `capacity` streams; when full, it forgets all of them
    /// (their next messages become new baselines, so no loss is invented).
    pub fn new(capacity: usize) -> Self {
        Self {
            last: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records `seq` from `(port, id)`.
    pub fn observe(&mut self, port: u32, id: CbId, seq: u32) -> SeqVerdict {
        if self.last.len() >= self.capacity && !self.last.contains_key(&(port, id)) {
            self.last.clear();
        }
        match self.last.insert((port, id), seq) {
            None => SeqVerdict::First,
            Some(prev) => match seq.wrapping_sub(prev) {
                1 => SeqVerdict::InOrder,
                d if (2..MAX_GAP).contains(&d) => SeqVerdict::Gap(d - 1),
                _ => SeqVerdict::Reordered,
            },
        }
    }

    /// Forgets every stream of `port` (for instance when the peer is known to be gone).
    pub fn forget_port(&mut self, port: u32) {
        self.last.retain(|(p, _), _| *p != port);
    }
}

/// Hands out consecutive sequence numbers per id, for senders.
#[derive(Debug, Default)]
pub struct SeqSource {
    next: HashMap<CbId, u32>,
}

impl SeqSource {
    /// The next sequence number for `id`, starting at 1.
    pub fn next(&mut self, id: CbId) -> u32 {
        let n = self.next.entry(id).or_insert(0);
        *n = n.wrapping_add(1);
        *n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_exact_and_restarts_are_not_loss() {
        let id = CbId::new(100, 1);
        let mut t = SeqTracker::new(16);
        assert_eq!(t.observe(5, id, 10), SeqVerdict::First);
        assert_eq!(t.observe(5, id, 11), SeqVerdict::InOrder);
        assert_eq!(t.observe(5, id, 15), SeqVerdict::Gap(3));
        assert_eq!(t.observe(5, id, 15), SeqVerdict::Reordered);
        assert_eq!(t.observe(5, id, 1), SeqVerdict::Reordered);
        assert_eq!(t.observe(5, id, 2), SeqVerdict::InOrder);
        assert_eq!(
            t.observe(6, id, 7),
            SeqVerdict::First,
            "ports are separate streams"
        );
        assert_eq!(t.observe(5, id, u32::MAX), SeqVerdict::Reordered);
        assert_eq!(t.observe(5, id, 1), SeqVerdict::Gap(1), "wraps");
    }

    #[test]
    fn capacity_bounds_memory() {
        let mut t = SeqTracker::new(4);
        for p in 0..100 {
            t.observe(p, CbId::new(1, 1), 1);
            assert!(t.last.len() <= 4);
        }
    }
}
