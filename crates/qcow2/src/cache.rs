//! A bounded metadata table cache (QEMU's `Qcow2Cache`): whole tables, one
//! cluster each, keyed by host offset, least recently used out first.
//!
//! Tables the writer changed are *dirty*: they are newer than the file,
//! are never evicted or dropped, and reach the file only when the writer
//! writes them back (`crate::write`), in the order crash safety asks for.
//! Readers see dirty tables like any other.

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
    dirty: bool,
}

struct Inner {
    map: HashMap<u64, Entry>,
    /// tick → offset, oldest first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    dirty: usize,
}

impl Inner {
    /// Drops clean tables unused for `iv`, then the least recently used
    /// clean tables until one more fits in `capacity`. Dirty tables stay
    /// (the writer bounds how many there are).
    fn make_room(&mut self, capacity: usize, clean_interval: Option<Duration>, now: Instant) {
        if let Some(iv) = clean_interval {
            let mut expired = Vec::new();
            for (&t, &off) in &self.lru {
                let e = &self.map[&off];
                if now.duration_since(e.used) < iv {
                    break;
                }
                if !e.dirty {
                    expired.push((t, off));
                }
            }
            for (t, off) in expired {
                self.lru.remove(&t);
                self.map.remove(&off);
            }
        }
        if self.map.len() < capacity {
            return;
        }
        let mut victims = Vec::new();
        let mut excess = self.map.len() + 1 - capacity;
        for (&t, &off) in &self.lru {
            if excess == 0 {
                break;
            }
            if !self.map[&off].dirty {
                victims.push((t, off));
                excess -= 1;
            }
        }
        for (t, off) in victims {
            self.lru.remove(&t);
            self.map.remove(&off);
        }
    }

    fn touch(&mut self, offset: u64, now: Instant) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.map.get_mut(&offset) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            e.used = now;
            self.lru.insert(tick, offset);
        }
    }
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
                dirty: 0,
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

    /// How many tables are dirty.
    pub fn dirty_len(&self) -> usize {
        self.inner.lock().dirty
    }

    pub fn get(&self, offset: u64) -> Option<Table> {
        let mut g = self.inner.lock();
        let t = g.map.get(&offset)?.table.clone();
        g.touch(offset, Instant::now());
        Some(t)
    }

    /// Caches a table as read from the file. A table already cached is
    /// at least as new, and stays.
    pub fn insert(&self, offset: u64, table: Table) {
        self.put(offset, table, false, false);
    }

    /// Caches a table the file holds as it is now (the writer just wrote
    /// it), replacing what was cached.
    pub fn insert_written(&self, offset: u64, table: Table) {
        self.put(offset, table, false, true);
    }

    fn put(&self, offset: u64, table: Table, dirty: bool, replace: bool) {
        let now = Instant::now();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if let Some(e) = inner.map.get_mut(&offset) {
            if replace {
                if e.dirty && !dirty {
                    inner.dirty -= 1;
                } else if !e.dirty && dirty {
                    inner.dirty += 1;
                }
                e.dirty = dirty;
                e.table = table;
            }
            inner.touch(offset, now);
            return;
        }
        inner.make_room(self.capacity, self.clean_interval, now);
        inner.tick += 1;
        let tick = inner.tick;
        inner.map.insert(
            offset,
            Entry {
                table,
                tick,
                used: now,
                dirty,
            },
        );
        if dirty {
            inner.dirty += 1;
        }
        inner.lru.insert(tick, offset);
    }

    /// Changes the cached table at `offset` in memory and marks it
    /// dirty; false when it is not cached. A copy a reader still holds is
    /// not changed under it.
    pub fn modify_cached(&self, offset: u64, f: impl FnOnce(&mut [u64])) -> bool {
        let now = Instant::now();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let Some(e) = inner.map.get_mut(&offset) else {
            return false;
        };
        if Arc::get_mut(&mut e.table).is_none() {
            e.table = Arc::from(e.table.to_vec());
        }
        f(Arc::get_mut(&mut e.table).expect("unique"));
        if !e.dirty {
            e.dirty = true;
            inner.dirty += 1;
        }
        inner.touch(offset, now);
        true
    }

    /// Changes the table at `offset`, whose current contents are `base`,
    /// and caches it dirty (only the writer changes tables, so a cached
    /// copy equals `base`).
    pub fn modify(&self, offset: u64, base: &Table, f: impl FnOnce(&mut [u64])) {
        let mut f = Some(f);
        if self.modify_cached(offset, |t| (f.take().expect("once"))(t)) {
            return;
        }
        let mut t = base.to_vec();
        (f.take().expect("once"))(&mut t);
        self.put(offset, t.into(), true, true);
    }

    /// The dirty tables, by offset.
    pub fn dirty_tables(&self) -> Vec<(u64, Table)> {
        let g = self.inner.lock();
        let mut v: Vec<(u64, Table)> = g
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&o, e)| (o, e.table.clone()))
            .collect();
        v.sort_by_key(|(o, _)| *o);
        v
    }

    /// Marks the table at `offset` clean if it is still `written` (the
    /// contents that reached the file).
    pub fn mark_clean(&self, offset: u64, written: &Table) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if let Some(e) = inner.map.get_mut(&offset) {
            if e.dirty && Arc::ptr_eq(&e.table, written) {
                e.dirty = false;
                inner.dirty -= 1;
            }
        }
    }

    /// Drops every clean table.
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        inner.map.retain(|_, e| e.dirty);
        let map = &inner.map;
        inner.lru.retain(|_, off| map.contains_key(off));
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

    #[test]
    fn dirty_tables_stay_until_clean() {
        let c = TableCache::new(2, None);
        let base: Table = Arc::from(vec![0u64; 4]);
        c.modify(1, &base, |t| t[0] = 7);
        assert_eq!(c.dirty_len(), 1);
        // A stale read of the file does not replace the dirty table.
        c.insert(1, base.clone());
        assert_eq!(c.get(1).unwrap()[0], 7);
        c.insert(2, Arc::from(vec![2u64]));
        c.insert(3, Arc::from(vec![3u64]));
        c.insert(4, Arc::from(vec![4u64]));
        assert_eq!(c.get(1).unwrap()[0], 7, "dirty tables are not evicted");
        let held = c.get(1).unwrap();
        c.modify(1, &base, |t| t[1] = 8);
        assert_eq!(held[1], 0, "a reader's copy does not change");
        let d = c.dirty_tables();
        assert_eq!(d.len(), 1);
        c.mark_clean(1, &d[0].1);
        assert_eq!(c.dirty_len(), 0);
        c.insert(5, Arc::from(vec![5u64]));
        c.insert(6, Arc::from(vec![6u64]));
        assert!(c.get(1).is_none());
    }
}
