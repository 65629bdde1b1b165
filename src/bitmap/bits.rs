//! [`SparseBits`]: a set of bit numbers kept in memory as fixed-size pages, of which only those
//! holding a set bit exist. Dirty bitmaps use it for the bits written since they were last
//! stored (a few pages for a few writes, whatever the size of the disk) and for whole bitmaps
//! read from an image (memory proportional to the bitmap's non-zero clusters).

use std::collections::BTreeMap;

/// log2 of the bits in one page (4 KiB of bits).
pub const PAGE_BITS: u32 = 15;
/// 64-bit words in one page.
const PAGE_WORDS: usize = 1 << (PAGE_BITS - 6);

/// A sparse set of bit numbers. Pages are keyed by `bit >> PAGE_BITS`; bit `b` of a page is
/// bit `b % 64` of its word `b / 64`, so that a page's words, stored little-endian, are the
/// bytes of a qcow2 bitmap (qcow2.rst "Bitmap data": bit `n` is bit `n % 8` of byte `n / 8`).
/// No page is ever all zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SparseBits {
    pages: BTreeMap<u64, Box<[u64]>>,
}

impl SparseBits {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Bytes of memory the pages take.
    pub fn memory_bytes(&self) -> u64 {
        self.pages.len() as u64 * (PAGE_WORDS as u64 * 8)
    }

    fn page_mut(&mut self, page: u64) -> &mut [u64] {
        self.pages
            .entry(page)
            .or_insert_with(|| vec![0u64; PAGE_WORDS].into_boxed_slice())
    }

    /// Sets the bits `[start, end)`.
    pub fn set_range(&mut self, start: u64, end: u64) {
        let mut bit = start;
        while bit < end {
            let page = bit >> PAGE_BITS;
            let page_end = ((page + 1) << PAGE_BITS).min(end);
            let words = self.page_mut(page);
            let mut b = bit & ((1 << PAGE_BITS) - 1);
            let stop = b + (page_end - bit);
            while b < stop {
                let w = (b / 64) as usize;
                let lo = b % 64;
                let hi = (stop - (b - lo)).min(64);
                words[w] |= mask(lo, hi);
                b = b - lo + hi;
            }
            bit = page_end;
        }
    }

    /// Whether bit `bit` is set.
    pub fn get(&self, bit: u64) -> bool {
        self.pages
            .get(&(bit >> PAGE_BITS))
            .is_some_and(|p| p[((bit >> 6) as usize) & (PAGE_WORDS - 1)] & (1 << (bit % 64)) != 0)
    }

    /// The number of set bits.
    pub fn count(&self) -> u64 {
        self.pages
            .values()
            .flat_map(|p| p.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether any bit of `[start, end)` is set.
    pub fn any_in(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        let (first, last) = (start >> PAGE_BITS, (end - 1) >> PAGE_BITS);
        for (&page, words) in self.pages.range(first..=last) {
            let base = page << PAGE_BITS;
            let (a, b) = (
                start.max(base) - base,
                end.min(base + (1 << PAGE_BITS)) - base,
            );
            let mut bit = a;
            while bit < b {
                let lo = bit % 64;
                let hi = (b - (bit - lo)).min(64);
                if words[(bit / 64) as usize] & mask(lo, hi) != 0 {
                    return true;
                }
                bit = bit - lo + hi;
            }
        }
        false
    }

    /// ORs `words` (bit `i` of the set is bit `i % 64` of `words[i / 64]`) into the set at bit
    /// `start`, a multiple of 64.
    pub fn or_words(&mut self, start: u64, words: &[u64]) {
        debug_assert!(start.is_multiple_of(64));
        for (i, &w) in words.iter().enumerate() {
            if w != 0 {
                let bit = start + i as u64 * 64;
                let page = self.page_mut(bit >> PAGE_BITS);
                page[((bit >> 6) as usize) & (PAGE_WORDS - 1)] |= w;
            }
        }
    }

    /// ORs the set's bits `[start, start + 64 * out.len())` into `out` (`start` a multiple of
    /// 64), in the layout [`SparseBits::or_words`] takes.
    pub fn words_into(&self, start: u64, out: &mut [u64]) {
        debug_assert!(start.is_multiple_of(64));
        if out.is_empty() {
            return;
        }
        let end = start + out.len() as u64 * 64;
        let (first, last) = (start >> PAGE_BITS, (end - 1) >> PAGE_BITS);
        for (&page, words) in self.pages.range(first..=last) {
            let base = page << PAGE_BITS;
            for (j, &w) in words.iter().enumerate() {
                let bit = base + j as u64 * 64;
                if w != 0 && bit >= start && bit < end {
                    out[((bit - start) / 64) as usize] |= w;
                }
            }
        }
    }

    /// Clears every bit from `end` on.
    pub fn truncate(&mut self, end: u64) {
        let page = end >> PAGE_BITS;
        let _ = self.pages.split_off(&(page + 1));
        if let Some(words) = self.pages.get_mut(&page) {
            let b = (end & ((1 << PAGE_BITS) - 1)) as usize;
            for (i, w) in words.iter_mut().enumerate() {
                if i * 64 >= b {
                    *w = 0;
                } else if (i + 1) * 64 > b {
                    *w &= mask(0, (b - i * 64) as u64);
                }
            }
            if words.iter().all(|&w| w == 0) {
                self.pages.remove(&page);
            }
        }
    }

    /// Adds every bit of `other`.
    pub fn union_with(&mut self, other: &SparseBits) {
        for (&page, words) in &other.pages {
            let mine = self.page_mut(page);
            for (a, b) in mine.iter_mut().zip(words.iter()) {
                *a |= b;
            }
        }
    }

    /// Calls `f` with each maximal run `[start, end)` of set bits, in order (without
    /// collecting them: a bitmap of alternating bits has as many runs as half its bits).
    pub fn for_each_run(&self, mut f: impl FnMut(u64, u64)) {
        let mut open: Option<(u64, u64)> = None;
        for (&page, words) in &self.pages {
            for (j, &w) in words.iter().enumerate() {
                let base = (page << PAGE_BITS) + j as u64 * 64;
                let mut w = w;
                let mut shift = 0u64;
                while w != 0 {
                    let zeros = u64::from(w.trailing_zeros());
                    w >>= zeros;
                    shift += zeros;
                    let ones = u64::from((!w).trailing_zeros());
                    let (s, e) = (base + shift, base + shift + ones);
                    match &mut open {
                        Some(run) if run.1 == s => run.1 = e,
                        _ => {
                            if let Some((a, b)) = open.replace((s, e)) {
                                f(a, b);
                            }
                        }
                    }
                    shift += ones;
                    w = if ones == 64 { 0 } else { w >> ones };
                }
            }
        }
        if let Some((a, b)) = open {
            f(a, b);
        }
    }

    /// The maximal runs `[start, end)` of set bits, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        self.for_each_run(|a, b| out.push((a, b)));
        out
    }

    /// The same dirty ranges of a disk of `disk_size` bytes at another granularity: a bit of
    /// the result (granularity `2^to_bits`) is set when any byte it covers is covered by a set
    /// bit of `self` (granularity `2^from_bits`).
    pub fn regranulate(&self, from_bits: u32, to_bits: u32, disk_size: u64) -> SparseBits {
        if from_bits == to_bits {
            return self.clone();
        }
        let mut out = SparseBits::new();
        self.for_each_run(|a, b| {
            let start = a << from_bits;
            let end = (b << from_bits).min(disk_size);
            if start < end {
                out.set_range(start >> to_bits, (end - 1) / (1 << to_bits) + 1);
            }
        });
        out
    }
}

/// The bits `[lo, hi)` of a word (`hi <= 64`).
fn mask(lo: u64, hi: u64) -> u64 {
    let high = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    high & !((1u64 << lo) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn model_runs(m: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &b in m {
            match out.last_mut() {
                Some(l) if l.1 == b => l.1 += 1,
                _ => out.push((b, b + 1)),
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((0u64..200_000, 0u64..70_000, 0u8..4), 1..24)) {
            let mut s = SparseBits::new();
            let mut m = BTreeSet::new();
            for (a, n, kind) in ops {
                match kind {
                    0 | 1 => { s.set_range(a, a + n); m.extend(a..a + n); }
                    2 => { s.truncate(a); m.retain(|&b| b < a); }
                    _ => {
                        let start = a & !63;
                        let mut w = vec![0u64; (n as usize % 300) + 1];
                        s.words_into(start, &mut w);
                        for (i, word) in w.iter().enumerate() {
                            for k in 0..64 {
                                let bit = start + i as u64 * 64 + k;
                                prop_assert_eq!(word & (1 << k) != 0, m.contains(&bit));
                            }
                        }
                        prop_assert_eq!(s.any_in(a, a + n), m.range(a..a + n).next().is_some());
                    }
                }
                prop_assert!(s.pages.values().all(|p| p.iter().any(|&w| w != 0)));
            }
            prop_assert_eq!(s.count(), m.len() as u64);
            prop_assert_eq!(s.runs(), model_runs(&m));
            let mut t = SparseBits::new();
            for (a, b) in s.runs() { t.set_range(a, b); }
            prop_assert_eq!(&t, &s);
            let mut copy = SparseBits::new();
            let start = 0;
            let mut w = vec![0u64; 5000];
            s.words_into(start, &mut w);
            copy.or_words(start, &w);
            prop_assert_eq!(&copy, &s);
        }

        #[test]
        fn regranulating_covers_exactly(bits in proptest::collection::btree_set(0u64..5000, 0..50), from in 9u32..14, to in 9u32..14) {
            let size = 5000u64 << from;
            let mut s = SparseBits::new();
            for &b in &bits { s.set_range(b, b + 1); }
            let r = s.regranulate(from, to, size);
            let chunks = size.div_ceil(1 << to);
            for c in 0..chunks {
                let (a, b) = (c << to, ((c + 1) << to).min(size));
                let want = bits.iter().any(|&x| (x << from) < b && ((x + 1) << from) > a);
                prop_assert_eq!(r.get(c), want, "chunk {}", c);
            }
            prop_assert!(!r.any_in(chunks, u64::MAX));
        }
    }

    #[test]
    fn full_words_and_page_edges() {
        let mut s = SparseBits::new();
        s.set_range(64, 128);
        s.set_range((1 << PAGE_BITS) - 1, (1 << PAGE_BITS) + 1);
        assert_eq!(
            s.runs(),
            vec![(64, 128), ((1 << PAGE_BITS) - 1, (1 << PAGE_BITS) + 1)]
        );
        s.truncate(100);
        assert_eq!(s.runs(), vec![(64, 100)]);
        s.truncate(0);
        assert!(s.is_empty());
    }
}
