//! Where the clusters of a new image go (qemu's allocation order, replayed in memory).
//!
//! Preallocation adds L2 tables and data clusters. Where they go depends on the order in which
//! qemu allocates clusters, so the planner replays that order: clusters are handed out first-fit
//! from a moving cursor, a refcount block is created on demand in the first free cluster (it
//! describes itself when it falls into its own range), and a refcount table that is too small
//! is replaced by a larger one in a fresh area holding the new table and the refcount blocks
//! that area needs. `metadata` allocates an L2 table and then its data clusters, table by
//! table; `falloc` and `full` first build refcount structures covering everything (placed at
//! the end of the file), then the data area after them, then the L2 tables in the first free
//! clusters. The whole layout is computed in memory before anything is written.

use super::options::{round_size, CreateOptions};
use crate::prealloc::Preallocation;
use crate::qcow2::format::header::MAX_CLUSTER_BITS;
use std::collections::BTreeMap;

/// Cluster arithmetic for one image.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) cluster_bits: u32,
    pub(super) refcount_order: u32,
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub(super) l2_entry: u64,
}

impl Geometry {
    pub(super) fn new(o: &CreateOptions) -> Self {
        Geometry {
            cluster_bits: o
                .cluster_size
                .max(512)
                .trailing_zeros()
                .min(MAX_CLUSTER_BITS),
            refcount_order: o.refcount_bits.max(1).trailing_zeros().min(6),
            l2_entry: if o.extended_l2 { 16 } else { 8 },
        }
    }
    pub(super) fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Clusters one L2 table maps.
    pub(super) fn l2_entries(&self) -> u64 {
        self.cs() / self.l2_entry
    }
    /// Refcounts per refcount block.
    pub(super) fn rb_entries(&self) -> u64 {
        (self.cs() * 8) >> self.refcount_order
    }
    /// The unit of allocation inside a cluster: a subcluster (1/32 of a cluster) with extended
    /// L2 entries, else the cluster.
    pub(super) fn subcluster(&self) -> u64 {
        if self.l2_entry == 16 {
            self.cs() / 32
        } else {
            self.cs()
        }
    }
    pub(super) fn l1_size(&self, size: u64) -> u64 {
        size.div_ceil(self.cs()).div_ceil(self.l2_entries())
    }
}

/// A set of host clusters, as disjoint half-open ranges keyed by their start.
#[derive(Debug, Default, Clone)]
pub(super) struct ClusterSet {
    pub(super) ranges: BTreeMap<u64, u64>,
}

impl ClusterSet {
    /// The range holding `c`, if any.
    pub(super) fn range_of(&self, c: u64) -> Option<(u64, u64)> {
        self.ranges
            .range(..=c)
            .next_back()
            .filter(|(_, &e)| e > c)
            .map(|(&s, &e)| (s, e))
    }

    /// The first cluster of the set in `[start, end)`.
    pub(super) fn first_in(&self, start: u64, end: u64) -> Option<u64> {
        if self.range_of(start).is_some() {
            return Some(start);
        }
        self.ranges.range(start..end).next().map(|(&s, _)| s)
    }

    pub(super) fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        if let Some((ps, pe)) = self.ranges.range(..=s).next_back().map(|(&a, &b)| (a, b)) {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.ranges.remove(&ps);
            }
        }
        while let Some((ns, ne)) = self.ranges.range(s..=e).next().map(|(&a, &b)| (a, b)) {
            e = e.max(ne);
            self.ranges.remove(&ns);
        }
        self.ranges.insert(s, e);
    }

    pub(super) fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, start);
            }
            if e > end {
                self.ranges.insert(end, e);
            }
        }
    }

    /// The ranges intersecting `[start, end)`, clipped to it.
    pub(super) fn clipped(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some((s, e)) = self.range_of(start) {
            out.push((s.max(start), e.min(end)));
        }
        for (&s, &e) in self.ranges.range(start..end) {
            if s != start {
                out.push((s, e.min(end)));
            }
        }
        out
    }
}

/// An allocation had to be abandoned because the refcount table was replaced; the caller
/// allocates again.
#[derive(Debug)]
pub(super) struct Retry;

/// A run of guest clusters mapped to consecutive host clusters.
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    pub(super) guest: u64,
    pub(super) host: u64,
    pub(super) len: u64,
}

/// The allocation state of the image being built, replaying qemu's cluster allocator (see the
/// module documentation). Cluster numbers are host cluster indices.
#[derive(Debug)]
pub(super) struct Layout {
    pub(super) geo: Geometry,
    /// Clusters with refcount 1 (qcow2.rst "Host cluster management": a new image has no
    /// shared clusters).
    pub(super) used: ClusterSet,
    /// Where the next first-fit search starts.
    pub(super) free_index: u64,
    /// The refcount table: the refcount block cluster of each entry, 0 for none. Its length is
    /// the table's capacity.
    pub(super) table: Vec<u64>,
    pub(super) table_at: u64,
    pub(super) table_clusters: u64,
    /// Refcount tables given up when a larger one replaced them: cluster, length in clusters,
    /// and entries. qemu leaves their contents in place; so does vimg.
    pub(super) stale_tables: Vec<(u64, u64, Vec<u64>)>,
    /// Length of the file written so far, in bytes.
    pub(super) file_end: u64,
}

impl Layout {
    /// The state after the first step of creation: header (cluster 0), refcount table
    /// (cluster 1) and the first refcount block (cluster 2), all with refcount 1.
    pub(super) fn new(geo: Geometry) -> Self {
        let cs = geo.cs();
        let mut table = vec![0u64; (cs / 8) as usize];
        table[0] = 2;
        let mut used = ClusterSet::default();
        used.insert(0, 3);
        Layout {
            geo,
            used,
            free_index: 3,
            table,
            table_at: 1,
            table_clusters: 1,
            stale_tables: Vec::new(),
            file_end: 3 * cs,
        }
    }

    pub(super) fn wrote(&mut self, end_byte: u64) {
        self.file_end = self.file_end.max(end_byte);
    }

    /// Finds `n` free clusters first-fit from the cursor, without taking them.
    pub(super) fn find_free(&mut self, n: u64) -> u64 {
        loop {
            let start = self.free_index;
            match self.used.first_in(start, start + n) {
                Some(c) => {
                    let (_, e) = self.used.range_of(c).expect("cluster is in the set");
                    self.free_index = e;
                }
                None => {
                    self.free_index = start + n;
                    return start;
                }
            }
        }
    }

    /// Allocates `n` consecutive clusters.
    pub(super) fn alloc(&mut self, n: u64) -> u64 {
        loop {
            let start = self.find_free(n);
            if self.take(start, n).is_ok() {
                return start;
            }
        }
    }

    /// Gives clusters `[start, start + n)` refcount 1, creating refcount blocks as needed.
    /// When the refcount table had to be replaced, undoes what it did and asks for a retry.
    pub(super) fn take(&mut self, start: u64, n: u64) -> Result<(), Retry> {
        let e = self.geo.rb_entries();
        let end = start + n;
        let mut c = start;
        while c < end {
            let idx = c / e;
            if let Err(r) = self.ensure_block(idx) {
                if c > start {
                    self.used.remove(start, c);
                    self.free_index = self.free_index.min(start);
                }
                return Err(r);
            }
            let chunk_end = end.min((idx + 1) * e);
            self.used.insert(c, chunk_end);
            c = chunk_end;
        }
        Ok(())
    }

    /// Makes sure refcount block `idx` exists.
    pub(super) fn ensure_block(&mut self, idx: u64) -> Result<(), Retry> {
        if self.table.get(idx as usize).is_some_and(|&b| b != 0) {
            return Ok(());
        }
        let cs = self.geo.cs();
        let new = self.find_free(1);
        let self_describing = new / self.geo.rb_entries() == idx;
        if self_describing {
            self.used.insert(new, new + 1);
        } else {
            self.take(new, 1)?;
        }
        self.wrote((new + 1) * cs);
        if (idx as usize) < self.table.len() {
            self.table[idx as usize] = new;
            return Ok(());
        }
        // The table is full: replace it by a larger one, placed with the refcount blocks it
        // needs after the range the new block covers.
        let area = ((idx + 1) * self.geo.rb_entries())
            .max(self.highest_used().next_multiple_of(self.geo.rb_entries()));
        self.refcount_area(area, 0, false, Some((idx, new)));
        Err(Retry)
    }

    pub(super) fn highest_used(&self) -> u64 {
        self.used.ranges.iter().next_back().map_or(0, |(_, &e)| e)
    }

    /// Refcount blocks and table clusters needed so that `clusters` clusters, the blocks and
    /// the table are all covered; `generous` leaves room in the table for half as many entries
    /// again.
    pub(super) fn metadata_size(&self, clusters: u64, generous: bool) -> (u64, u64) {
        let e = self.geo.rb_entries();
        let per_table_cluster = self.geo.cs() / 8;
        let mut blocks = clusters.div_ceil(e).max(1);
        loop {
            let entries = if generous {
                blocks + blocks.div_ceil(2)
            } else {
                blocks
            };
            let table = entries.div_ceil(per_table_cluster);
            let need = (clusters + blocks + table).div_ceil(e);
            if need <= blocks {
                return (blocks, table);
            }
            blocks = need;
        }
    }

    /// Builds a new refcount table at cluster `start`, after the refcount blocks that cover
    /// `start` onwards and are still missing, sized for `start + additional` clusters plus the
    /// new structures; the old table is freed. `pending` is a refcount block that was created
    /// but found no room in the old table. Returns the first cluster after the area.
    pub(super) fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        pending: Option<(u64, u64)>,
    ) -> u64 {
        let cs = self.geo.cs();
        let e = self.geo.rb_entries();
        let (blocks, mut table_clusters) = self.metadata_size(start + additional, !exact);
        let per_table_cluster = cs / 8;
        let highest_entry = self
            .table
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i as u64 + 1)
            .max(pending.map_or(0, |(i, _)| i + 1));
        table_clusters = table_clusters.max(highest_entry.div_ceil(per_table_cluster));
        let mut table = self.table.clone();
        table.resize((table_clusters * per_table_cluster) as usize, 0);
        if let Some((i, b)) = pending {
            table[i as usize] = b;
        }
        let mut next = start;
        for i in start / e..blocks {
            if table[i as usize] == 0 {
                table[i as usize] = next;
                next += 1;
            }
        }
        let table_at = next;
        next += table_clusters;
        self.used.insert(start, next);
        self.wrote(next * cs);
        let old = std::mem::replace(&mut self.table, table);
        self.stale_tables
            .push((self.table_at, self.table_clusters, old));
        self.used
            .remove(self.table_at, self.table_at + self.table_clusters);
        self.free_index = self.free_index.min(self.table_at);
        self.table_at = table_at;
        self.table_clusters = table_clusters;
        next
    }
}

/// The planned image: where everything goes and what the file holds.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) geo: Geometry,
    pub(super) size: u64,
    pub(super) layout: Layout,
    pub(super) l1_size: u64,
    pub(super) l1_at: u64,
    /// Host cluster of each L2 table (0: none).
    pub(super) l2_at: Vec<u64>,
    /// Data runs (guest cluster to host cluster), sorted by guest cluster.
    pub(super) runs: Vec<Run>,
    /// Guest clusters map to the same offsets of the external data file.
    pub(super) identity_map: bool,
    /// Host byte range to fallocate (`falloc`) or write zeros to (`full`).
    pub(super) data_area: Option<(u64, u64)>,
    /// Byte range of the last (sub)cluster's tail beyond the disk, written with zeros: in the
    /// image file, or in the data file with `identity_map`.
    pub(super) tail: Option<(u64, u64)>,
    /// The file's minimum final length in bytes.
    pub(super) min_len: u64,
    /// Where the LUKS header goes (`encrypt.format=luks`): its first cluster and its length in
    /// bytes (the full disk encryption header extension's fields).
    pub(super) crypto: Option<(u64, u64)>,
}

pub(super) fn plan(o: &CreateOptions) -> Plan {
    let geo = Geometry::new(o);
    let cs = geo.cs();
    let size = round_size(o.size);
    let mut layout = Layout::new(geo);
    let l1_size = geo.l1_size(size);
    let mut l1_at = 0;
    if l1_size > 0 {
        l1_at = layout.alloc((l1_size * 8).div_ceil(cs));
        layout.wrote(l1_at * cs + l1_size * 8);
    }
    let mut p = Plan {
        geo,
        size,
        l1_size,
        l1_at,
        l2_at: vec![0; l1_size as usize],
        runs: Vec::new(),
        identity_map: false,
        data_area: None,
        tail: None,
        min_len: 0,
        crypto: None,
        layout,
    };
    let mode = match o.preallocation {
        Preallocation::Off if o.data_file_raw => Preallocation::Metadata,
        m => m,
    };
    let data_clusters = size.div_ceil(cs);
    let per_l2 = geo.l2_entries();
    // qemu allocates at most this many clusters in one request.
    let max_run = ((i32::MAX as u64) >> geo.cluster_bits).max(1);
    match mode {
        Preallocation::Off => {}
        Preallocation::Metadata | Preallocation::Falloc | Preallocation::Full
            if mode == Preallocation::Metadata || o.data_file.is_some() =>
        {
            let mut last_end = 0;
            for li in 0..l1_size {
                let l2 = p.layout.alloc(1);
                p.layout.wrote((l2 + 1) * cs);
                p.l2_at[li as usize] = l2;
                let first = li * per_l2;
                let count = per_l2.min(data_clusters - first);
                if o.data_file.is_some() {
                    continue;
                }
                let mut k = 0;
                while k < count {
                    let n = max_run.min(count - k);
                    let host = p.layout.alloc(n);
                    p.runs.push(Run {
                        guest: first + k,
                        host,
                        len: n,
                    });
                    k += n;
                    last_end = (host + n - 1) * cs + (size - (first + k - 1) * cs).min(cs);
                }
            }
            // qemu zeroes the rest of the last (sub)cluster past the end of the disk.
            let rem = size % cs;
            let tail_end = rem.next_multiple_of(geo.subcluster());
            if o.data_file.is_some() {
                p.identity_map = true;
                if rem != tail_end {
                    p.tail = Some((size, size - rem + tail_end));
                }
            } else if let Some(last) = p.runs.last() {
                let host_last = last.host + last.len - 1;
                if rem != tail_end {
                    p.tail = Some((host_last * cs + rem, host_last * cs + tail_end));
                }
                p.min_len = last_end;
            }
        }
        Preallocation::Metadata | Preallocation::Falloc | Preallocation::Full => {
            let start = p.layout.file_end.div_ceil(cs);
            let tables = data_clusters.div_ceil(per_l2) + 1;
            let data_at = p
                .layout
                .refcount_area(start, data_clusters + tables, true, None);
            p.layout.used.insert(data_at, data_at + data_clusters);
            p.data_area = Some((data_at * cs, (data_at + data_clusters) * cs));
            p.min_len = (data_at + data_clusters) * cs;
            for li in 0..l1_size {
                let l2 = p.layout.alloc(1);
                p.layout.wrote((l2 + 1) * cs);
                p.l2_at[li as usize] = l2;
                let first = li * per_l2;
                let count = per_l2.min(data_clusters - first);
                p.runs.push(Run {
                    guest: first,
                    host: data_at + first,
                    len: count,
                });
            }
        }
    }
    // qemu sets up the encryption last, on the image made so far: the LUKS header's clusters
    // are the next ones its allocator hands out (qcow2_crypto_hdr_init_func).
    if let Some(len) = luks_header_len(o) {
        let n = len.div_ceil(cs);
        let at = p.layout.alloc(n);
        p.layout.wrote((at + n) * cs);
        p.crypto = Some((at, len));
        p.min_len = p.min_len.max((at + n) * cs);
    }
    p
}

/// The length of the LUKS header a new image with the options `o` holds, if it is encrypted
/// with LUKS (options already checked by [`CreateOptions::validate`]).
fn luks_header_len(o: &CreateOptions) -> Option<u64> {
    let (params, _) = o.encrypt.luks().ok().flatten()?;
    Some(crate::crypto::luks::header_len(&params.spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::create::opts;

    #[test]
    fn cluster_sets_merge_split_and_search() {
        let mut s = ClusterSet::default();
        s.insert(0, 3);
        s.insert(5, 8);
        s.insert(3, 5);
        assert_eq!(s.ranges.len(), 1);
        s.remove(2, 4);
        assert_eq!(s.first_in(2, 10), Some(4));
        assert_eq!(s.first_in(2, 4), None);
        assert_eq!(s.clipped(1, 6), vec![(1, 2), (4, 6)]);
        assert_eq!(s.range_of(5), Some((4, 8)));
    }

    /// Layouts observed from qemu-img 10.0.2 (cluster numbers), as regression checks that need
    /// no qemu: a 3 GiB image with 512-byte clusters needs six more refcount blocks after the
    /// L1 table, one of them describing the block before it.
    #[test]
    fn refcount_blocks_follow_the_l1_table() {
        let p = plan(&opts(|o| {
            o.cluster_size = 512;
            o.size = 3 << 30;
        }));
        assert_eq!(p.l1_at, 3);
        assert_eq!(
            &p.layout.table[..8],
            &[2, 1539, 1541, 1542, 1543, 1544, 1540, 0]
        );
    }

    /// A 16 GiB image with 512-byte clusters and 64-bit refcounts outgrows its refcount table
    /// while allocating the L1 table.
    #[test]
    fn refcount_table_growth_matches_qemu() {
        let p = plan(&opts(|o| {
            o.cluster_size = 512;
            o.refcount_bits = 64;
            o.size = 16 << 30;
        }));
        let l = &p.layout;
        assert_eq!((l.table_at, l.table_clusters), (8259, 4));
        assert_eq!(&l.table[..4], &[2, 8195, 8197, 8198]);
        assert_eq!(&l.table[60..62], &[8255, 8263]);
        assert_eq!(&l.table[127..133], &[8329, 8196, 8256, 8257, 8258, 0]);
        assert_eq!(l.file_end, 8330 * 512);
        for (size, at, clusters) in [
            (9u64, 4674, 2),
            (12, 6210, 3),
            (32, 16453, 7),
            (100, 51278, 20),
        ] {
            let p = plan(&opts(|o| {
                o.cluster_size = 512;
                o.refcount_bits = 64;
                o.size = size << 30;
            }));
            assert_eq!(
                (p.layout.table_at, p.layout.table_clusters),
                (at, clusters),
                "{size}G"
            );
        }
    }

    #[test]
    fn falloc_builds_refcounts_then_data_then_l2() {
        let p = plan(&opts(|o| {
            o.size = 3 << 30;
            o.preallocation = Preallocation::Falloc;
        }));
        assert_eq!((p.layout.table_at, p.layout.table[1]), (5, 4));
        assert_eq!(p.data_area, Some((0x60000, 0xc006_0000)));
        assert_eq!(&p.l2_at[..3], &[1, 0xc006, 0xc007]);
        let p = plan(&opts(|o| {
            o.size = 16 << 20;
            o.cluster_size = 512;
            o.preallocation = Preallocation::Falloc;
        }));
        assert_eq!(
            (p.layout.table_at, p.layout.table_clusters),
            (0x11a00 / 512, 3)
        );
        assert_eq!(p.data_area.unwrap().0, 73728);
    }

    #[test]
    fn metadata_interleaves_l2_tables_and_data() {
        let p = plan(&opts(|o| {
            o.size = 3 << 20;
            o.cluster_size = 4096;
            o.preallocation = Preallocation::Metadata;
        }));
        assert_eq!(p.l2_at, vec![4, 0x205]);
        assert_eq!(p.runs[0].host, 5);
        assert_eq!(p.runs[1].host, 0x206);
        assert_eq!(p.min_len, 0x306000);
    }
}
