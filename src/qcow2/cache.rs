//! A bounded cache of metadata tables: L2 tables (`u64` entries) and refcount blocks (bytes).
//!
//! Tables are keyed by their host offset and shared as `Arc<[T]>`, so a reader keeps using a
//! table after it is evicted. Loading happens outside the lock, so a slow read does not stall
//! other threads. A table changed by a write is *dirty*: it stays cached (it is the only up to
//! date copy) until the write path's flush has written it and calls [`TableCache::mark_clean`].
//! Memory is bounded by the entry count fixed at creation plus the dirty tables, which the write
//! path bounds by flushing when [`TableCache::dirty_count`] grows too large.

use crate::error::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// An LRU cache of decoded tables.
#[derive(Debug)]
pub(super) struct TableCache<T = u64> {
    capacity: usize,
    inner: Mutex<Inner<T>>,
}

#[derive(Debug)]
struct Inner<T> {
    /// Table, last use, dirty.
    tables: HashMap<u64, (Arc<[T]>, u64, bool)>,
    clock: u64,
    /// How many of `tables` are dirty (kept so that asking costs nothing).
    dirty: usize,
}

impl<T> TableCache<T> {
    /// How many clean tables the cache holds at most.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// A cache holding at most `capacity` clean tables (at least 1).
    pub(super) fn new(capacity: usize) -> Self {
        TableCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                tables: HashMap::new(),
                clock: 0,
                dirty: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table at host offset `offset`, loaded with `load` on a miss.
    pub(super) fn get_or_load(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<Vec<T>>,
    ) -> Result<Arc<[T]>> {
        {
            let mut g = self.lock();
            g.clock += 1;
            let now = g.clock;
            if let Some((t, stamp, _)) = g.tables.get_mut(&offset) {
                *stamp = now;
                return Ok(t.clone());
            }
        }
        let table: Arc<[T]> = load()?.into();
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        // Another thread may have loaded it meanwhile, or a writer changed it: keep that copy.
        if let Some((t, stamp, _)) = g.tables.get_mut(&offset) {
            *stamp = now;
            return Ok(t.clone());
        }
        g.tables.insert(offset, (table.clone(), now, false));
        Self::evict(&mut g, self.capacity);
        Ok(table)
    }

    /// Stores a changed table: it becomes the cached copy and is dirty until written.
    pub(super) fn put_dirty(&self, offset: u64, table: Arc<[T]>) {
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        if !g
            .tables
            .insert(offset, (table, now, true))
            .is_some_and(|e| e.2)
        {
            g.dirty += 1;
        }
        Self::evict(&mut g, self.capacity);
    }

    /// Changes the table at `offset` (loaded with `load` on a miss) with `change` and marks it
    /// dirty, as [`TableCache::put_dirty`] of a changed copy would; the change is made in place
    /// when no reader holds the cached copy (no copy of the whole table per changed entry).
    pub(super) fn modify(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<Vec<T>>,
        change: impl FnOnce(&mut [T]),
    ) -> Result<()>
    where
        T: Clone,
    {
        let loaded = self.get_or_load(offset, load)?;
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        let g = &mut *g;
        let entry = g.tables.entry(offset).or_insert((loaded, now, false));
        entry.1 = now;
        match Arc::get_mut(&mut entry.0) {
            Some(table) => change(table),
            None => {
                let mut copy = entry.0.to_vec();
                change(&mut copy);
                entry.0 = copy.into();
            }
        }
        if !entry.2 {
            entry.2 = true;
            g.dirty += 1;
        }
        Self::evict(g, self.capacity);
        Ok(())
    }

    /// The dirty tables with their offsets, sorted by offset (for sequential writing).
    pub(super) fn dirty(&self) -> Vec<(u64, Arc<[T]>)> {
        let g = self.lock();
        let mut v: Vec<_> = g
            .tables
            .iter()
            .filter(|(_, e)| e.2)
            .map(|(k, e)| (*k, e.0.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// How many tables are dirty.
    pub(super) fn dirty_count(&self) -> usize {
        self.lock().dirty
    }

    /// Marks the table at `offset` written, if `table` is still the cached copy (a table
    /// changed again since then stays dirty).
    pub(super) fn mark_clean(&self, offset: u64, table: &Arc<[T]>) {
        let mut g = self.lock();
        let cleaned = match g.tables.get_mut(&offset) {
            Some(e) if e.2 && Arc::ptr_eq(&e.0, table) => {
                e.2 = false;
                true
            }
            _ => false,
        };
        if cleaned {
            g.dirty -= 1;
        }
        Self::evict(&mut g, self.capacity);
    }

    /// Drops the table at `offset`, dirty or not (its cluster was freed).
    pub(super) fn forget(&self, offset: u64) {
        let mut g = self.lock();
        if g.tables.remove(&offset).is_some_and(|e| e.2) {
            g.dirty -= 1;
        }
    }

    /// Evicts least recently used clean tables while over capacity.
    fn evict(g: &mut Inner<T>, capacity: usize) {
        while g.tables.len() > capacity {
            let oldest = g
                .tables
                .iter()
                .filter(|(_, e)| !e.2)
                .min_by_key(|(_, e)| e.1)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => g.tables.remove(&k),
                None => return,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_stays_bounded() {
        let c = TableCache::new(2);
        let loads = std::cell::Cell::new(0);
        let load = |v: u64| {
            loads.set(loads.get() + 1);
            Ok(vec![v])
        };
        c.get_or_load(1, || load(1)).unwrap();
        c.get_or_load(2, || load(2)).unwrap();
        c.get_or_load(1, || load(1)).unwrap(); // hit; 2 is now oldest
        c.get_or_load(3, || load(3)).unwrap(); // evicts 2
        assert_eq!(loads.get(), 3);
        assert_eq!(c.get_or_load(1, || load(99)).unwrap()[0], 1);
        assert_eq!(c.get_or_load(2, || load(2)).unwrap()[0], 2);
        assert_eq!(loads.get(), 4);
        assert!(c.lock().tables.len() <= 2);
    }

    #[test]
    fn modify_changes_in_place_unless_a_reader_holds_the_table() {
        let c: TableCache<u64> = TableCache::new(4);
        c.modify(1, || Ok(vec![0, 0]), |t| t[0] = 5).unwrap();
        assert_eq!(c.dirty_count(), 1);
        let held = c.get_or_load(1, || Ok(vec![99])).unwrap();
        assert_eq!(held[..], [5, 0]);
        // A reader holds the table: it keeps its copy, the cache gets a changed one.
        c.modify(1, || Ok(vec![99]), |t| t[1] = 6).unwrap();
        assert_eq!(held[..], [5, 0]);
        let now = c.get_or_load(1, || Ok(vec![99])).unwrap();
        assert_eq!(now[..], [5, 6]);
        // A flush that wrote the older copy leaves the table dirty.
        c.mark_clean(1, &held);
        assert_eq!(c.dirty_count(), 1);
        c.mark_clean(1, &now);
        assert_eq!(c.dirty_count(), 0);
    }

    #[test]
    fn dirty_tables_are_never_evicted_until_marked_clean() {
        let c = TableCache::new(1);
        let t: Arc<[u64]> = vec![7].into();
        c.put_dirty(10, t.clone());
        c.get_or_load(20, || Ok(vec![2])).unwrap();
        c.get_or_load(30, || Ok(vec![3])).unwrap();
        assert_eq!(
            c.get_or_load(10, || Ok(vec![99])).unwrap()[0],
            7,
            "dirty table was evicted"
        );
        assert_eq!(c.dirty().len(), 1);
        let newer: Arc<[u64]> = vec![8].into();
        c.put_dirty(10, newer.clone());
        c.mark_clean(10, &t); // the old copy was written: the newer one stays dirty
        assert_eq!(c.dirty_count(), 1);
        c.mark_clean(10, &newer);
        assert_eq!(c.dirty_count(), 0);
        c.get_or_load(40, || Ok(vec![4])).unwrap();
        assert!(c.lock().tables.len() <= 1);
    }
}
