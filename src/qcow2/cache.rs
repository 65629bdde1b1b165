//! A bounded cache of metadata tables (L2 tables now; refcount blocks with the write path).
//!
//! Tables are keyed by their host offset and shared as `Arc<[u64]>`, so a reader keeps using a
//! table after it is evicted. Memory is bounded by the entry count fixed at creation; loading
//! happens outside the lock, so a slow read does not stall other threads.

use crate::error::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An LRU cache of decoded tables (big-endian u64 entries).
#[derive(Debug)]
pub struct TableCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tables: HashMap<u64, (Arc<[u64]>, u64)>,
    clock: u64,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 1).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The table at host offset `offset`, loaded with `load` on a miss.
    pub fn get_or_load(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<Vec<u64>>,
    ) -> Result<Arc<[u64]>> {
        {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.clock += 1;
            let now = g.clock;
            if let Some((t, stamp)) = g.tables.get_mut(&offset) {
                *stamp = now;
                return Ok(t.clone());
            }
        }
        let table: Arc<[u64]> = load()?.into();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.clock += 1;
        let now = g.clock;
        if g.tables.len() >= self.capacity && !g.tables.contains_key(&offset) {
            if let Some(oldest) = g
                .tables
                .iter()
                .min_by_key(|(_, (_, s))| *s)
                .map(|(k, _)| *k)
            {
                g.tables.remove(&oldest);
            }
        }
        g.tables.insert(offset, (table.clone(), now));
        Ok(table)
    }

    /// Drops every cached table.
    pub fn clear(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tables
            .clear();
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
        assert!(c.inner.lock().unwrap().tables.len() <= 2);
    }
}
