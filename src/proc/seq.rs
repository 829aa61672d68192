//! Per-CPU sequence tracking: counting proc events lost before they reached a socket.
//!
//! The kernel numbers every proc-connector message it builds with a per-CPU `u32` counter
//! (`cn_msg.seq`), whoever receives it, and records the CPU in `proc_event.cpu`. On Linux 6.x
//! this includes the ACKs to every socket's `LISTEN` / `IGNORE`: the ACK routine sets
//! `seq` and `cpu = -1`, but the common send routine then overwrites both with the per-CPU
//! counter and the real CPU (observed on 6.18; see `proto/proc_event.md`). A socket that
//! receives *everything* (no kernel filter) therefore sees, on each CPU, consecutive numbers;
//! a jump of `n` means `n - 1` messages were lost (receive-queue overflow, or a failed
//! allocation in the kernel). Messages of one CPU reach the socket in order: the kernel
//! sends them with preemption disabled.
//!
//! A socket with a kernel-side filter legitimately misses numbers, so its gaps mean
//! nothing: the listener disables gap accounting then, rather than report wrong numbers.

/// What [`CpuSeqTracker::observe`] concluded about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The first message seen from this CPU: it sets the baseline. Losses before it cannot
    /// be known.
    First,
    /// The expected number.
    InOrder,
    /// A jump forward: this many messages of this CPU were lost just before this one.
    Gap(u32),
    /// A number at or before one already seen (a duplicate, or the counter restarted).
    /// Nothing is counted; the tracker re-bases on it.
    Backwards,
    /// The CPU number is out of the tracked range (for example `u32::MAX`, which older
    /// kernels put in ACKs outside the per-CPU sequence): not tracked.
    Untracked,
}

/// Counts lost messages from per-CPU sequence gaps. Memory is bounded by
/// [`CpuSeqTracker::MAX_CPUS`].
///
/// Rules: per CPU, the expected number is the last one + 1 (wrapping). A number `d` ahead of
/// the expected one (wrapping distance `1 ..= 2^31 - 1`) counts `d` lost; a distance of
/// `2^31` or more is taken as a step backwards (duplicate or restart), counted in
/// [`backwards`](Self::backwards), never as loss. The first number per CPU is a baseline.
#[derive(Debug, Clone, Default)]
pub struct CpuSeqTracker {
    next: Vec<Option<u32>>,
    lost: Vec<u64>,
    lost_total: u64,
    backwards: u64,
    untracked: u64,
}

impl CpuSeqTracker {
    /// Highest CPU number + 1 that is tracked (the kernel's `NR_CPUS` limit is 8192).
    pub const MAX_CPUS: usize = 8192;

    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records message `seq` from `cpu`.
    pub fn observe(&mut self, cpu: u32, seq: u32) -> SeqCheck {
        let c = cpu as usize;
        if c >= Self::MAX_CPUS {
            self.untracked += 1;
            return SeqCheck::Untracked;
        }
        if c >= self.next.len() {
            self.next.resize(c + 1, None);
            self.lost.resize(c + 1, 0);
        }
        let expected = self.next[c].replace(seq.wrapping_add(1));
        let Some(expected) = expected else {
            return SeqCheck::First;
        };
        match seq.wrapping_sub(expected) {
            0 => SeqCheck::InOrder,
            d if d < 1 << 31 => {
                self.lost[c] += u64::from(d);
                self.lost_total += u64::from(d);
                SeqCheck::Gap(d)
            }
            _ => {
                self.backwards += 1;
                SeqCheck::Backwards
            }
        }
    }

    /// Messages lost, over all CPUs.
    pub fn lost(&self) -> u64 {
        self.lost_total
    }

    /// `(cpu, lost)` for every CPU that lost messages.
    pub fn lost_per_cpu(&self) -> Vec<(u32, u64)> {
        self.lost
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(c, &n)| (c as u32, n))
            .collect()
    }

    /// Steps backwards seen (see [`SeqCheck::Backwards`]).
    pub fn backwards(&self) -> u64 {
        self.backwards
    }

    /// Messages with an untracked CPU number.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// The number expected next from `cpu`, if a baseline exists.
    pub fn expected(&self, cpu: u32) -> Option<u32> {
        self.next.get(cpu as usize).copied().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_per_cpu() {
        let mut t = CpuSeqTracker::new();
        assert_eq!(t.observe(0, 10), SeqCheck::First);
        assert_eq!(t.observe(1, 500), SeqCheck::First);
        assert_eq!(t.observe(0, 11), SeqCheck::InOrder);
        assert_eq!(t.observe(0, 15), SeqCheck::Gap(3));
        assert_eq!(t.observe(1, 501), SeqCheck::InOrder);
        assert_eq!(t.observe(1, 503), SeqCheck::Gap(1));
        assert_eq!(t.lost(), 4);
        assert_eq!(t.lost_per_cpu(), vec![(0, 3), (1, 1)]);
    }

    #[test]
    fn wraps_and_backwards() {
        let mut t = CpuSeqTracker::new();
        t.observe(2, u32::MAX - 1);
        assert_eq!(t.observe(2, u32::MAX), SeqCheck::InOrder);
        assert_eq!(t.observe(2, 0), SeqCheck::InOrder);
        assert_eq!(t.observe(2, 2), SeqCheck::Gap(1));
        assert_eq!(t.observe(2, 2), SeqCheck::Backwards);
        assert_eq!(t.observe(2, 3), SeqCheck::InOrder);
        assert_eq!(t.observe(2, 1), SeqCheck::Backwards);
        assert_eq!(t.expected(2), Some(2));
        assert_eq!(t.lost(), 1);
        assert_eq!(t.backwards(), 2);
        assert_eq!(t.observe(u32::MAX, 7), SeqCheck::Untracked);
        assert_eq!(t.untracked(), 1);
    }

    proptest::proptest! {
        /// Dropping any subset of a per-CPU stream is counted exactly.
        #[test]
        fn counts_exactly_what_was_dropped(
            start in proptest::num::u32::ANY,
            keep in proptest::collection::vec(proptest::bool::ANY, 1..300),
        ) {
            let mut t = CpuSeqTracker::new();
            let mut first = None;
            let mut last = None;
            for (i, k) in keep.iter().enumerate() {
                if *k {
                    t.observe(0, start.wrapping_add(i as u32));
                    first.get_or_insert(i);
                    last = Some(i);
                }
            }
            let want = match (first, last) {
                (Some(f), Some(l)) => keep[f..=l].iter().filter(|k| !**k).count() as u64,
                _ => 0,
            };
            proptest::prop_assert_eq!(t.lost(), want);
        }
    }
}
