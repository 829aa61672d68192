//! What the tracer remembers about processes when it names them itself (`--enrich off`,
//! or the names of parents): a bounded, approximately-LRU map by pid.

use std::collections::HashMap;
use std::sync::Arc;

/// What the tracer remembers about a process.
#[derive(Clone)]
pub struct ProcInfo {
    pub name: Arc<str>,
    /// Event timestamp of the fork (or first exec) seen, CLOCK_MONOTONIC ns.
    pub start_ns: Option<u64>,
    /// False for a name inherited from the parent at fork while exec events are not traced:
    /// the process may have exec'd since, so /proc is read once more when it is next needed.
    pub fresh: bool,
}

/// A bounded map with approximately-LRU eviction: two generations of at most `cap / 2`
/// entries each; a hit in the old generation is promoted, and when the young one is full the
/// old one is dropped whole. O(1) per operation, never more than `cap` entries.
pub struct Cache {
    young: HashMap<u32, ProcInfo>,
    old: HashMap<u32, ProcInfo>,
    half: usize,
}

impl Cache {
    pub fn new(cap: usize) -> Self {
        let half = (cap / 2).max(1);
        Cache {
            young: HashMap::with_capacity(half),
            old: HashMap::new(),
            half,
        }
    }

    pub fn get(&mut self, pid: u32) -> Option<&mut ProcInfo> {
        if !self.young.contains_key(&pid) {
            let v = self.old.remove(&pid)?;
            self.insert(pid, v);
        }
        self.young.get_mut(&pid)
    }

    pub fn insert(&mut self, pid: u32, v: ProcInfo) {
        if self.young.len() >= self.half && !self.young.contains_key(&pid) {
            self.old = std::mem::replace(&mut self.young, HashMap::with_capacity(self.half));
        }
        self.young.insert(pid, v);
    }

    /// Forgets everything (after a loss: any entry may be of a process that is gone, its
    /// pid another's).
    pub fn clear(&mut self) {
        self.young.clear();
        self.old = HashMap::new();
    }

    pub fn remove(&mut self, pid: u32) -> Option<ProcInfo> {
        self.young.remove(&pid).or_else(|| self.old.remove(&pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_keeps_recent_entries() {
        let mut c = Cache::new(4);
        let info = |n: &str| ProcInfo {
            name: n.into(),
            start_ns: None,
            fresh: true,
        };
        for pid in 0..100 {
            c.insert(pid, info("x"));
            assert!(c.young.len() + c.old.len() <= 4);
        }
        assert!(c.get(99).is_some());
        assert!(c.get(0).is_none());
        c.insert(7, info("seven"));
        c.insert(8, info("eight"));
        c.insert(9, info("nine"));
        // 7 moved to the old generation but a hit promotes it.
        assert_eq!(&*c.get(7).unwrap().name, "seven");
        assert!(c.remove(7).is_some());
        assert!(c.get(7).is_none());
    }
}
