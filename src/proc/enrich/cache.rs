//! A bounded map of live processes, two generations: when the young one is full the old one
//! is dropped (its entries counted as evicted) and the young one becomes old. Lookups in
//! the old generation move the entry back to the young one, so processes with events stay.
//! Constant time per operation, memory bounded by `capacity` entries.

use std::collections::HashMap as StdHashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for pid keys: one multiplication (pids are small, dense, not chosen by an
/// attacker in a way that matters: the map is bounded and a collision only costs time).
/// SipHash costs more than the rest of a cache lookup.
#[derive(Default)]
pub(crate) struct PidHasher(u64);

impl Hasher for PidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type HashMap<K, V> = StdHashMap<K, V, BuildHasherDefault<PidHasher>>;

/// The bounded two-generation map.
#[derive(Debug)]
pub(crate) struct Cache<V> {
    young: HashMap<u32, V>,
    old: HashMap<u32, V>,
    half: usize,
    /// Entries dropped to stay within the bound.
    pub evictions: u64,
}

impl<V> Cache<V> {
    /// A cache of at most `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        let half = (capacity / 2).max(1);
        Cache {
            young: HashMap::with_capacity_and_hasher(half.min(4096), Default::default()),
            old: HashMap::default(),
            half,
            evictions: 0,
        }
    }

    /// The entry of `pid`, moved to the young generation.
    pub fn get_mut(&mut self, pid: u32) -> Option<&mut V> {
        if !self.young.contains_key(&pid) {
            let v = self.old.remove(&pid)?;
            self.insert(pid, v);
        }
        self.young.get_mut(&pid)
    }

    /// Inserts or replaces; returns the entry it replaced.
    pub fn insert(&mut self, pid: u32, v: V) -> Option<V> {
        let prev = self.old.remove(&pid);
        if self.young.len() >= self.half && !self.young.contains_key(&pid) {
            let young = std::mem::replace(
                &mut self.young,
                HashMap::with_capacity_and_hasher(self.half.min(4096), Default::default()),
            );
            let dropped = std::mem::replace(&mut self.old, young);
            self.evictions += dropped.len() as u64;
        }
        self.young.insert(pid, v).or(prev)
    }

    /// Removes the entry of `pid`.
    pub fn remove(&mut self, pid: u32) -> Option<V> {
        self.young.remove(&pid).or_else(|| self.old.remove(&pid))
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_with_counted_evictions() {
        let mut c = Cache::new(10);
        for pid in 0..1000 {
            c.insert(pid, pid);
            assert!(c.len() <= 10);
        }
        assert_eq!(c.evictions + c.len() as u64, 1000);
        // The newest survive.
        assert_eq!(c.get_mut(999), Some(&mut 999));
        assert_eq!(c.get_mut(0), None);
    }

    #[test]
    fn used_entries_survive_and_replace_returns_the_old() {
        let mut c = Cache::new(4);
        c.insert(1, "a");
        c.insert(2, "b");
        c.insert(3, "c"); // 1, 2 become old
        assert_eq!(c.get_mut(1), Some(&mut "a")); // back to young
        c.insert(4, "d"); // young {3,1} full: old {2} dropped
        assert_eq!(c.evictions, 1);
        assert_eq!(c.get_mut(2), None);
        assert_eq!(c.insert(1, "A"), Some("a"));
        assert_eq!(c.remove(1), Some("A"));
        assert_eq!(c.remove(1), None);
        assert_eq!(c.len(), 2);
    }
}
