//! A least-recently-used map with a capacity in entries: the per-backend front of the result
//! cache. Lookups, inserts and evictions are O(log n).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Entries are stamped with a counter on every use; the smallest stamp is evicted first.
#[derive(Debug)]
pub struct Lru<K, V> {
    entries: HashMap<K, (V, u64)>,
    by_use: BTreeMap<u64, K>,
    clock: u64,
}

impl<K: Hash + Eq + Clone, V> Default for Lru<K, V> {
    fn default() -> Self {
        Lru {
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            clock: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The value of `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        let now = self.tick();
        let (_, stamp) = self.entries.get_mut(key)?;
        self.by_use.remove(stamp);
        *stamp = now;
        self.by_use.insert(now, key.clone());
        self.entries.get(key).map(|(v, _)| v)
    }

    /// Inserts or replaces `key`, then evicts the least recently used entries beyond `capacity`
    /// (0 keeps nothing).
    pub fn put(&mut self, key: K, value: V, capacity: usize) {
        let now = self.tick();
        if let Some((_, old)) = self.entries.insert(key.clone(), (value, now)) {
            self.by_use.remove(&old);
        }
        self.by_use.insert(now, key);
        self.shrink_to(capacity);
    }

    /// Evicts the least recently used entries until at most `capacity` remain.
    pub fn shrink_to(&mut self, capacity: usize) {
        while self.entries.len() > capacity {
            let Some((_, key)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&key);
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.by_use.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut lru = Lru::new();
        lru.put("a", 1, 2);
        lru.put("b", 2, 2);
        assert_eq!(lru.get(&"a"), Some(&1)); // b is now the oldest
        lru.put("c", 3, 2);
        assert_eq!(lru.get(&"b"), None);
        assert_eq!(lru.get(&"a"), Some(&1));
        assert_eq!(lru.get(&"c"), Some(&3));
        lru.put("a", 10, 2); // replace keeps one entry
        assert_eq!(lru.len(), 2);
        assert_eq!(lru.get(&"a"), Some(&10));
        lru.shrink_to(1);
        assert_eq!(lru.len(), 1);
        assert_eq!(lru.get(&"a"), Some(&10));
        lru.put("z", 0, 0);
        assert!(lru.is_empty());
    }

    proptest! {
        /// Against a model: a Vec ordered from least to most recently used.
        #[test]
        fn behaves_like_a_recency_list(ops in prop::collection::vec((0u8..3, 0u8..12, 0usize..6), 1..300)) {
            let mut lru = Lru::new();
            let mut model: Vec<(u8, u32)> = Vec::new();
            for (i, (op, key, cap)) in ops.into_iter().enumerate() {
                match op {
                    0 => {
                        let got = lru.get(&key).copied();
                        let pos = model.iter().position(|(k, _)| *k == key);
                        let want = pos.map(|p| model[p].1);
                        if let Some(p) = pos {
                            let e = model.remove(p);
                            model.push(e);
                        }
                        prop_assert_eq!(got, want);
                    }
                    1 => {
                        lru.put(key, i as u32, cap);
                        model.retain(|(k, _)| *k != key);
                        model.push((key, i as u32));
                        while model.len() > cap {
                            model.remove(0);
                        }
                    }
                    _ => {
                        lru.shrink_to(cap);
                        while model.len() > cap {
                            model.remove(0);
                        }
                    }
                }
                prop_assert_eq!(lru.len(), model.len());
            }
        }
    }
}
