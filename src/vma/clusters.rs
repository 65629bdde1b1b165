//! [`ClusterSet`]: which clusters of a device an archive has held so far, to refuse a cluster
//! seen twice and to find the first one never seen (vma.md "Extents": every cluster appears
//! exactly once).
//!
//! The set is kept as runs of consecutive cluster numbers, so its memory follows the number of
//! gaps, not the device size: an archive written in order needs one run per device whatever
//! its size, and a hostile archive claiming a 256 TiB device costs nothing until it holds
//! clusters (each run costs a few dozen bytes against the 8-byte entry that made it).

use std::collections::BTreeMap;

/// A set of cluster numbers stored as disjoint, non-adjacent runs `[start, end)`.
#[derive(Debug, Default, Clone)]
pub struct ClusterSet {
    /// Run start to run end (exclusive).
    runs: BTreeMap<u64, u64>,
    /// Clusters in the set.
    count: u64,
}

impl ClusterSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many clusters the set holds.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether cluster `c` is in the set.
    pub fn contains(&self, c: u64) -> bool {
        self.runs
            .range(..=c)
            .next_back()
            .is_some_and(|(_, &end)| c < end)
    }

    /// Adds cluster `c`; returns `false` (and changes nothing) if it was already there.
    pub fn insert(&mut self, c: u64) -> bool {
        let before = self.runs.range(..=c).next_back().map(|(&s, &e)| (s, e));
        if let Some((_, end)) = before {
            if c < end {
                return false;
            }
        }
        let next = c + 1;
        let after_end = self.runs.remove(&next);
        match before {
            Some((start, end)) if end == c => {
                self.runs.insert(start, after_end.unwrap_or(next));
            }
            _ => {
                self.runs.insert(c, after_end.unwrap_or(next));
            }
        }
        self.count += 1;
        true
    }

    /// The smallest cluster below `n` not in the set, if any.
    pub fn first_missing(&self, n: u64) -> Option<u64> {
        let mut expect = 0u64;
        for (&s, &e) in &self.runs {
            if s > expect {
                break;
            }
            expect = expect.max(e);
        }
        (expect < n).then_some(expect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn runs_merge_and_duplicates_are_refused() {
        let mut s = ClusterSet::new();
        assert!(s.insert(5));
        assert!(s.insert(3));
        assert!(s.insert(4));
        assert!(!s.insert(4));
        assert_eq!(s.runs.len(), 1);
        assert_eq!(s.first_missing(6), Some(0));
        for c in 0..3 {
            assert!(s.insert(c));
        }
        assert_eq!(s.first_missing(6), None);
        assert_eq!(s.first_missing(7), Some(6));
        assert_eq!(s.len(), 6);
        assert!(s.insert(u32::MAX as u64));
        assert!(s.contains(u32::MAX as u64));
    }

    proptest! {
        #[test]
        fn agrees_with_a_plain_set(ops in proptest::collection::vec(0u64..200, 0..400)) {
            let mut s = ClusterSet::new();
            let mut model = BTreeSet::new();
            for c in ops {
                prop_assert_eq!(s.insert(c), model.insert(c));
                prop_assert_eq!(s.len(), model.len() as u64);
            }
            for c in 0..210 {
                prop_assert_eq!(s.contains(c), model.contains(&c));
            }
            let missing = (0..200).find(|c| !model.contains(c));
            prop_assert_eq!(s.first_missing(200), missing);
            // Runs never touch: adjacent ones would have been merged.
            let runs: Vec<_> = s.runs.iter().collect();
            for w in runs.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
        }
    }
}
