//! Rewriting the refcount structures at another refcount width (`amend -o refcount_bits=N`;
//! qcow2.rst "Cluster refcounts", header field `refcount_order`).
//!
//! The refcount of every host cluster is kept: the new refcount blocks hold the same values,
//! packed at the new width, so leaks and shared clusters stay as they are. A width too narrow
//! for some refcount is refused before anything changes, with qemu-img's message.
//!
//! # Crash safety
//!
//! 1. The clusters for the new refcount blocks and the new refcount table are allocated as
//!    ordinary clusters through the *old* structures (their refcount 1 is written and synced),
//!    repeating until the new structures also cover the clusters they occupy themselves.
//! 2. The new blocks and table are written into those clusters and synced. Until now the
//!    header still points at the old structures, which count the new clusters as used: an
//!    interruption leaves leaked clusters, nothing else.
//! 3. One write of the header switches `refcount_order`, `refcount_table_offset` and
//!    `refcount_table_clusters` together, and is synced.
//! 4. The old table and blocks (and any cluster allocated in step 1 but not used) are released
//!    through the new structures; an interruption before that leaves them leaked.
//!
//! Memory stays bounded: one refcount block is built at a time, and the new table is at most
//! the 8 MiB qemu allows.

use super::table::{
    get_refcount, max_refcount, read_padded, set_refcount, RefcountTable, Strictness,
};
use crate::error::{Error, Result};
use crate::qcow2::edit::amend::Progress;
use crate::qcow2::format::header::MAX_REFTABLE_BYTES;
use crate::qcow2::write::path::WriteState;
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};
use std::collections::HashSet;
use std::sync::Mutex;

/// Rounds of allocation after which the new structures must have settled (each round only
/// adds the few clusters the previous one's allocations made necessary).
const MAX_ROUNDS: usize = 32;

/// The stored refcounts, seen through the refcount blocks of a new width.
#[derive(Debug)]
struct Scan {
    /// Indices of the new refcount blocks covering some cluster with a non-zero refcount,
    /// ascending.
    blocks: Vec<u64>,
    /// The first cluster whose refcount the new width cannot hold, and that refcount.
    too_large: Option<(u64, u64)>,
}

impl Scan {
    /// Clusters the new refcount table needs for these blocks.
    fn table_clusters(&self, cluster_size: u64) -> u64 {
        let entries = self.blocks.last().map_or(1, |b| b + 1);
        (entries * 8).div_ceil(cluster_size)
    }
}

impl Qcow2Image {
    /// Rewrites the refcount structures with `1 << new_order`-bit refcounts (see the module
    /// documentation for the order of writes). The image must be settled (clean, lazy
    /// refcounts not deferring); it is again afterwards.
    pub(in crate::qcow2) fn change_refcount_order(
        &mut self,
        new_order: u32,
        progress: &mut Progress<'_>,
    ) -> Result<()> {
        let cs = self.header.cluster_size();
        let mut scan = self.scan_refcounts(new_order)?;
        if let Some((cluster, refcount)) = scan.too_large {
            return Err(Error::invalid_input(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a \
                 refcount of {refcount}",
                1u32 << new_order,
                cluster * cs
            ))
            .bare());
        }

        // 1. Allocate until the new structures cover themselves.
        let mut block_clusters: Vec<u64> = Vec::new();
        let mut table_run = (0u64, 0u64); // first cluster, clusters
        let mut unused: Vec<u64> = Vec::new();
        let mut rounds = 0;
        loop {
            let need_table = scan.table_clusters(cs);
            if need_table * cs > MAX_REFTABLE_BYTES {
                return Err(table_too_large(new_order));
            }
            let missing = scan.blocks.len().saturating_sub(block_clusters.len()) as u64;
            if missing == 0 && table_run.1 >= need_table {
                break;
            }
            rounds += 1;
            if rounds > MAX_ROUNDS {
                return Err(Error::corrupt(
                    "the new refcount structures do not settle (the refcounts keep growing)",
                ));
            }
            {
                let mut st = self.write_state()?;
                if missing > 0 {
                    let first = self.alloc_metadata_run(&mut st, missing)?;
                    block_clusters.extend(first..first + missing);
                }
                if table_run.1 < need_table {
                    unused.extend(table_run.0..table_run.0 + table_run.1);
                    // One spare cluster, so that the blocks this allocation adds rarely make
                    // the table too small again.
                    let n = need_table + 1;
                    table_run = (self.alloc_metadata_run(&mut st, n)?, n);
                }
            }
            self.settle()?;
            scan = self.scan_refcounts(new_order)?;
        }
        unused.extend(block_clusters.drain(scan.blocks.len()..));

        // 2. The new blocks, then the new table, synced.
        let new_bits = self.header.cluster_bits + 3 - new_order;
        let mut table = vec![0u64; (table_run.1 * cs / 8) as usize];
        let mut block = vec![0u8; cs as usize];
        let mut slots = scan.blocks.iter().zip(&block_clusters);
        let mut current: Option<(u64, u64)> = None; // (new block index, its cluster)
        let total = scan.blocks.len() as u64 + 1;
        let mut done = 0;
        let mut put = |img: &Self, block: &[u8], (index, cluster): (u64, u64)| -> Result<()> {
            let off = cluster * cs;
            img.storage
                .write_at(block, off)
                .map_err(|e| Error::io("cannot write a refcount block", e).at(off))?;
            table[index as usize] = off;
            done += 1;
            progress.within(done, total);
            Ok(())
        };
        let old_table = self.for_each_refcount(|img, c, r| {
            let index = c >> new_bits;
            if current.is_none_or(|(i, _)| i != index) {
                if let Some(cur) = current.take() {
                    put(img, &block, cur)?;
                    block.fill(0);
                }
                // The blocks come in the order the scan found them.
                match slots.next() {
                    Some((&i, &cluster)) if i == index => current = Some((index, cluster)),
                    _ => {
                        return Err(Error::corrupt(
                            "the refcounts changed while their new blocks were written",
                        ))
                    }
                }
            }
            set_refcount(&mut block, c & ((1 << new_bits) - 1), new_order, r);
            Ok(())
        })?;
        if let Some(cur) = current.take() {
            put(self, &block, cur)?;
        }
        let mut raw = vec![0u8; table.len() * 8];
        for (i, e) in table.iter().enumerate() {
            BigEndian::write_u64(&mut raw[i * 8..], *e);
        }
        let table_off = table_run.0 * cs;
        self.storage
            .write_at(&raw, table_off)
            .map_err(|e| Error::io("cannot write the refcount table", e).at(table_off))?;
        self.sync()?;

        // 3. One header write switches to them.
        let old_blocks: Vec<u64> = old_table
            .entries()
            .iter()
            .map(|e| e & super::table::REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        let old_run = (
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters),
        );
        let mut h = self.disk_header()?;
        h.refcount_order = new_order;
        h.refcount_table_offset = table_off;
        h.refcount_table_clusters = table_run.1 as u32;
        self.rewrite_header(h)?;
        // The write state knew the old structures: start it again from the new ones.
        self.write = None;
        self.write = Some(Mutex::new(WriteState::new(self)?));

        // 4. The old structures, and what step 1 allocated but did not use, are released.
        {
            let mut st = self.write_state()?;
            let old_table_clusters = (old_run.0 / cs)..(old_run.0 / cs + old_run.1);
            for c in old_table_clusters
                .chain(old_blocks.iter().map(|o| o / cs))
                .chain(unused)
            {
                // Not `release`: that skips images with an external data file, whose own
                // metadata clusters are refcounted all the same.
                st.pending_free.push(c);
            }
        }
        self.settle()
    }

    /// Allocates a run of `n` free clusters for metadata (refcount 1, in memory until the
    /// next flush) and returns the first.
    fn alloc_metadata_run(&self, st: &mut WriteState, n: u64) -> Result<u64> {
        let first = self.find_free(st, n, true)?;
        for c in first..first + n {
            self.set_refcount_of(st, c, 1)?;
            st.metadata.insert(c);
        }
        self.note_end(first + n);
        Ok(first)
    }

    /// Reads every stored refcount (from the disk: the image must be settled) and works out
    /// which refcount blocks of width `1 << new_order` are needed.
    fn scan_refcounts(&self, new_order: u32) -> Result<Scan> {
        let new_bits = self.header.cluster_bits + 3 - new_order;
        let max = max_refcount(new_order);
        let mut scan = Scan {
            blocks: Vec::new(),
            too_large: None,
        };
        self.for_each_refcount(|_, c, r| {
            if r > max && scan.too_large.is_none() {
                scan.too_large = Some((c, r));
            }
            let b = c >> new_bits;
            if b >= MAX_REFTABLE_BYTES / 8 {
                return Err(table_too_large(new_order));
            }
            if scan.blocks.last() != Some(&b) {
                scan.blocks.push(b);
            }
            Ok(())
        })?;
        Ok(scan)
    }

    /// Calls `f` with (cluster, refcount) for every host cluster whose stored refcount is not
    /// zero, in cluster order, reading each refcount block once (from the disk: the image must
    /// be settled). Two table entries naming the same block are refused, so that the work is
    /// bounded by the file's size. Returns the table read.
    fn for_each_refcount(
        &self,
        mut f: impl FnMut(&Self, u64, u64) -> Result<()>,
    ) -> Result<RefcountTable> {
        let table = RefcountTable::read(self)?;
        let order = self.header.refcount_order;
        let per_word = 64u64 >> order; // refcounts in 8 bytes of a block
        let mut seen = HashSet::new();
        let mut raw = vec![0u8; self.header.cluster_size() as usize];
        for index in 0..table.len() as u64 {
            let Some(off) = table.block_offset(index, Strictness::Strict)? else {
                continue;
            };
            if !seen.insert(off) {
                return Err(Error::corrupt(format!(
                    "refcount table entry {index} names the refcount block at {off:#x} again"
                ))
                .at(off));
            }
            read_padded(self, &mut raw, off)?;
            let base = index << table.block_bits();
            for (w, word) in raw.chunks_exact(8).enumerate() {
                if word.iter().all(|&b| b == 0) {
                    continue;
                }
                for j in w as u64 * per_word..(w as u64 + 1) * per_word {
                    let r = get_refcount(&raw, j, order);
                    if r != 0 {
                        f(self, base + j, r)?;
                    }
                }
            }
        }
        Ok(table)
    }
}

/// The error for a refcount table at `1 << order` bits that qemu would not open.
fn table_too_large(order: u32) -> Error {
    Error::unsupported(format!(
        "with {}-bit refcounts the refcount table would exceed qemu's 8 MiB limit",
        1u32 << order
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open::ChainGuard;
    use crate::qcow2::edit::amend::AmendOptions;

    fn image(dir: &std::path::Path, cluster_size: u64) -> std::path::PathBuf {
        let p = dir.join("t.qcow2");
        let o = crate::qcow2::create::CreateOptions {
            size: 8 << 20,
            cluster_size,
            ..Default::default()
        };
        crate::qcow2::create::create(&p, &o).unwrap();
        let img = Qcow2Image::open(&p, true, true, &mut ChainGuard::default()).unwrap();
        crate::BlockImage::write_at(&img, &vec![9u8; 3 << 20], crate::GuestOffset(1 << 20))
            .unwrap();
        img.close().unwrap();
        p
    }

    fn amend(p: &std::path::Path, opts: &str) -> Result<()> {
        let mut img = Qcow2Image::open(p, true, true, &mut ChainGuard::default())?;
        img.amend(&AmendOptions::parse(opts).unwrap(), &mut |_, _| {})?;
        img.close()
    }

    #[test]
    fn every_width_keeps_every_refcount() {
        use crate::check::Check;
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 512);
        for bits in [64, 1, 32, 2, 8, 4, 16] {
            amend(&p, &format!("refcount_bits={bits}")).unwrap();
            let img = Qcow2Image::open(&p, false, true, &mut ChainGuard::default()).unwrap();
            assert_eq!(img.header().refcount_bits(), bits);
            let report = img.check().unwrap();
            assert_eq!(report.exit_code(), 0, "{bits}: {:?}", report.messages);
            let mut buf = vec![0u8; 3 << 20];
            crate::BlockImage::read_at(&img, &mut buf, crate::GuestOffset(1 << 20)).unwrap();
            assert!(buf.iter().all(|&b| b == 9), "{bits}");
        }
    }

    #[test]
    fn a_refcount_block_named_twice_is_refused_before_anything_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 65536);
        let mut bytes = std::fs::read(&p).unwrap();
        let h = crate::qcow2::format::header::Header::parse(&bytes, bytes.len() as u64).unwrap();
        let rt = h.refcount_table_offset as usize;
        let first: [u8; 8] = bytes[rt..rt + 8].try_into().unwrap();
        bytes[rt + 8..rt + 16].copy_from_slice(&first);
        std::fs::write(&p, &bytes).unwrap();
        let e = amend(&p, "refcount_bits=8").unwrap_err();
        // The read-write open refuses it first (see `layout`), or the rewrite itself does.
        let m = e.to_string();
        assert!(
            m.contains("again") || m.contains("metadata overlaps"),
            "{e}"
        );
        assert!(std::fs::read(&p).unwrap() == bytes);
    }
}
