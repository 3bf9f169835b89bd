//! A bounded metadata table cache (QEMU's `Qcow2Cache`): whole tables, one
//! cluster each, keyed by host offset, least recently used out first.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One cached table, decoded to host-endian words.
pub type Table = Arc<[u64]>;

struct Entry {
    table: Table,
    tick: u64,
    used: Instant,
}

struct Inner {
    map: HashMap<u64, Entry>,
    /// tick → offset, oldest first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
}

pub struct TableCache {
    capacity: usize,
    /// Tables unused for this long are dropped (`cache-clean-interval`).
    clean_interval: Option<Duration>,
    inner: Mutex<Inner>,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize, clean_interval: Option<Duration>) -> TableCache {
        TableCache {
            capacity: capacity.max(2),
            clean_interval,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                lru: BTreeMap::new(),
                tick: 0,
            }),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, offset: u64) -> Option<Table> {
        let mut g = self.inner.lock();
        g.tick += 1;
        let tick = g.tick;
        let inner = &mut *g;
        let e = inner.map.get_mut(&offset)?;
        inner.lru.remove(&e.tick);
        e.tick = tick;
        e.used = Instant::now();
        inner.lru.insert(tick, offset);
        Some(e.table.clone())
    }

    pub fn insert(&self, offset: u64, table: Table) {
        let now = Instant::now();
        let mut g = self.inner.lock();
        g.tick += 1;
        let tick = g.tick;
        let inner = &mut *g;
        if let Some(old) = inner.map.remove(&offset) {
            inner.lru.remove(&old.tick);
        }
        if let Some(iv) = self.clean_interval {
            while let Some((&t, &off)) = inner.lru.iter().next() {
                if now.duration_since(inner.map[&off].used) < iv {
                    break;
                }
                inner.lru.remove(&t);
                inner.map.remove(&off);
            }
        }
        while inner.map.len() >= self.capacity {
            let Some((t, off)) = inner.lru.pop_first() else {
                break;
            };
            let _ = t;
            inner.map.remove(&off);
        }
        inner.map.insert(
            offset,
            Entry {
                table,
                tick,
                used: now,
            },
        );
        inner.lru.insert(tick, offset);
    }

    /// Drops every table.
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        g.map.clear();
        g.lru.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let c = TableCache::new(2, None);
        c.insert(1, Arc::from(vec![1u64]));
        c.insert(2, Arc::from(vec![2u64]));
        assert!(c.get(1).is_some());
        c.insert(3, Arc::from(vec![3u64]));
        assert!(c.get(2).is_none());
        assert_eq!(c.get(1).unwrap()[0], 1);
        assert_eq!(c.get(3).unwrap()[0], 3);
        assert_eq!(c.len(), 2);
    }
}
