//! Writing persistent dirty bitmaps (qcow2.rst "Bitmaps extension", "Bitmap directory",
//! "Bitmap table", "Bitmap data"): `Qcow2Image::commit_bitmaps` replaces the bitmap directory
//! with a new one, and `Qcow2Image::set_in_use_in_place` flags bitmaps in use.
//!
//! # Crash safety
//!
//! A commit never changes a table, data cluster or directory the header points at. It
//!
//! 1. writes the new bitmap data clusters, the new bitmap tables and the new directory to
//!    clusters allocated through the write path (refcount 1);
//! 2. flushes the write path: the refcounts are on disk, then everything is synced;
//! 3. switches the header's bitmaps extension to the new directory (one write of cluster 0,
//!    synced), setting or clearing the `bitmaps` autoclear bit with it;
//! 4. releases the old directory, the tables no longer used and the data clusters no new table
//!    shares, through the write path's deferred release.
//!
//! An interruption before step 3 leaves the old bitmaps in place (and leaked clusters); after
//! it, the new ones (and possibly leaked clusters). With lazy refcounts the image is marked
//! dirty first, as for any other metadata change, and a repair counts the bitmaps' clusters.
//!
//! Flagging bitmaps in use rewrites the directory in place: only the flags word of the chosen
//! entries changes (4 aligned bytes each, which a torn write cannot split), and a bitmap
//! flagged in use is never trusted, so every state an interruption can leave is safe.

use super::directory::{
    self as bitmaps, encode_directory, read_data_cluster, read_table, table_entries_for, Bitmap,
    BME_OFFSET_MASK,
};
use crate::bitmap::SparseBits;
use crate::error::{Error, Result};
use crate::qcow2::format::header::{autoclear, BitmapsExt, Header};
use crate::qcow2::write::path::WriteState;
use crate::qcow2::Qcow2Image;
use byteorder::{ByteOrder, LittleEndian};
use std::collections::HashSet;

/// What a commit does with a bitmap's contents.
#[derive(Debug)]
pub(crate) enum Contents {
    /// The bitmap table stays as it is (only the directory entry may change).
    Keep,
    /// A new table with every bit clear.
    Empty,
    /// A new table holding the old contents and these bits (bit numbers at the bitmap's
    /// granularity); data clusters whose bits do not change are shared with the old table.
    Or(SparseBits),
    /// As `Or`, with every data cluster written anew, none shared (as qemu stores each bitmap
    /// it loaded when it closes an image it wrote: `qemu-img bitmap` leaves this layout, and so
    /// the same file length, which `measure` of the file as raw depends on).
    Rewrite(SparseBits),
}

/// One entry of a new directory: the entry (flags, name, granularity; for `Keep` and `Or`, the
/// table it had) and what happens to its contents.
#[derive(Debug)]
pub(crate) struct Planned {
    /// The directory entry; its table fields are filled in by the commit.
    pub entry: Bitmap,
    /// What happens to its contents.
    pub contents: Contents,
    /// Rewrite the last data cluster even without new bits, clearing the bits past the end of
    /// the disk (after the disk shrank).
    pub clip_tail: bool,
}

impl Planned {
    /// `entry` unchanged.
    pub(crate) fn keep(entry: Bitmap) -> Self {
        Planned {
            entry,
            contents: Contents::Keep,
            clip_tail: false,
        }
    }

    /// `entry` with its contents stored anew ([`Contents::Rewrite`]) if it is a bitmap qemu
    /// would have loaded for writing (consistent, understood), else unchanged.
    pub(crate) fn restore(entry: Bitmap) -> Self {
        let contents = match !entry.in_use() && entry.understood() {
            true => Contents::Rewrite(SparseBits::new()),
            false => Contents::Keep,
        };
        Planned {
            entry,
            contents,
            clip_tail: false,
        }
    }
}

impl Qcow2Image {
    /// Replaces the bitmap directory `old` (the one the header points at now) with `plans`, in
    /// the crash-safe order of the module documentation. Bitmaps of `old` that no plan keeps
    /// are removed; an empty `plans` removes the bitmaps extension.
    pub(crate) fn commit_bitmaps(
        &self,
        st: &mut WriteState,
        old: &[Bitmap],
        plans: Vec<Planned>,
    ) -> Result<()> {
        let cs = self.header.cluster_size();
        let old_ext = self.bitmaps_ext();
        // 1. New data, tables and directory. Should a write fail (a full block device), the
        // clusters allocated for them are freed again: nothing points at them yet, and qemu
        // leaves none behind either.
        let mut shared: HashSet<u64> = HashSet::new();
        let mut kept_tables: HashSet<u64> = HashSet::new();
        st.alloc_log = Some(Vec::new());
        let written = self.write_new_bitmaps(st, plans, &mut shared, &mut kept_tables);
        let allocated = st.alloc_log.take().unwrap_or_default();
        let new_ext = match written {
            Ok(ext) => ext,
            Err(e) => {
                for c in allocated {
                    let _ = self.unallocate(st, c);
                }
                return Err(e);
            }
        };
        // 2. Refcounts on disk, everything synced.
        self.flush_locked(st)?;
        // 3. The header points at the new directory.
        self.write_bitmaps_ext(new_ext)?;
        // 4. What nothing points at any more.
        let mut free = Vec::new();
        if let Some(e) = old_ext {
            free.extend(
                (e.directory_offset / cs)..(e.directory_offset + e.directory_size).div_ceil(cs),
            );
        }
        for b in old
            .iter()
            .filter(|b| !kept_tables.contains(&b.table_offset))
        {
            // A table that cannot be read (a bitmap left inconsistent by a crash may have any
            // contents) only leaks its data clusters.
            if let Ok(table) = read_table(self, b) {
                for e in table {
                    let off = e & BME_OFFSET_MASK;
                    if off != 0 && !shared.contains(&off) {
                        free.push(off / cs);
                    }
                }
            }
            let table_bytes = u64::from(b.table_size) * 8;
            free.extend((b.table_offset / cs)..(b.table_offset + table_bytes).div_ceil(cs));
        }
        free.sort_unstable();
        free.dedup();
        for c in free {
            // Never below zero, whatever a hostile table says.
            if self.refcount_of(st, c)? > 0 {
                st.pending_free.push(c);
            }
        }
        self.flush_locked(st)
    }

    /// Step 1 of [`Self::commit_bitmaps`]: writes the new data clusters, tables and directory
    /// of `plans`, and returns the bitmaps extension that is to point at the directory.
    fn write_new_bitmaps(
        &self,
        st: &mut WriteState,
        plans: Vec<Planned>,
        shared: &mut HashSet<u64>,
        kept_tables: &mut HashSet<u64>,
    ) -> Result<Option<BitmapsExt>> {
        let mut entries = Vec::with_capacity(plans.len());
        for p in plans {
            let mut e = p.entry;
            match p.contents {
                Contents::Keep => {
                    kept_tables.insert(e.table_offset);
                }
                Contents::Empty => self.store_table(st, &mut e, None, false, false, shared)?,
                Contents::Or(bits) => {
                    self.store_table(st, &mut e, Some(&bits), p.clip_tail, false, shared)?
                }
                Contents::Rewrite(bits) => {
                    self.store_table(st, &mut e, Some(&bits), p.clip_tail, true, shared)?
                }
            }
            entries.push(e);
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let dir = encode_directory(&entries);
        if dir.len() as u64 > bitmaps::MAX_DIRECTORY_BYTES {
            return Err(Error::unsupported(
                "the bitmap directory would exceed qemu's 64 MiB limit",
            ));
        }
        let off = self.alloc_run(st, dir.len() as u64)?;
        self.write_padded(&dir, off, "the bitmap directory")?;
        Ok(Some(BitmapsExt {
            nb_bitmaps: entries.len() as u32,
            directory_size: dir.len() as u64,
            directory_offset: off,
        }))
    }

    /// Writes a new bitmap table for `e` (a disk of the current size) and the data clusters
    /// that change: with `bits`, the old contents of `e`'s table (if it has one) with `bits`
    /// added; without, all clear. Records in `shared` the old data clusters the new table
    /// still uses (with `fresh`, none: every data cluster is written anew), and points `e` at
    /// the new table.
    fn store_table(
        &self,
        st: &mut WriteState,
        e: &mut Bitmap,
        bits: Option<&SparseBits>,
        clip_tail: bool,
        fresh: bool,
        shared: &mut HashSet<u64>,
    ) -> Result<()> {
        let cs = self.header.cluster_size();
        let size = self.header.size;
        let n = table_entries_for(size, e.granularity_bits, cs);
        if n == 0 || n > bitmaps::MAX_TABLE_ENTRIES || n * cs > bitmaps::MAX_DATA_BYTES {
            return Err(Error::unsupported(format!(
                "bitmap '{}' cannot be stored for a disk of {size} bytes",
                e.name
            )));
        }
        let old_table = match (bits, e.table_offset) {
            (Some(_), off) if off != 0 => read_table(self, e)?,
            _ => Vec::new(),
        };
        let per = cs * 8;
        let total_bits = size.div_ceil(1u64 << e.granularity_bits);
        let mut table = vec![0u64; n as usize];
        let mut words = vec![0u64; (per / 64) as usize];
        for (i, slot) in table.iter_mut().enumerate() {
            let i = i as u64;
            let old = old_table.get(i as usize).copied().unwrap_or(0);
            let (start, end) = (i * per, ((i + 1) * per).min(total_bits));
            let Some(bits) = bits else { continue };
            let last_clip = clip_tail && i == n - 1 && old != 0;
            if fresh && old == 0 && !bits.any_in(start, end) {
                continue;
            }
            if !fresh && !bits.any_in(start, end) && !last_clip {
                *slot = old;
                if old & BME_OFFSET_MASK != 0 {
                    shared.insert(old & BME_OFFSET_MASK);
                }
                continue;
            }
            words.fill(0);
            read_data_cluster(self, old, &mut words)?;
            bits.words_into(start, &mut words);
            // Bits past the end of the disk must be zero (qcow2.rst "Bitmap data").
            let valid = end - start;
            for (j, w) in words.iter_mut().enumerate() {
                let b = j as u64 * 64;
                if b >= valid {
                    *w = 0;
                } else if b + 64 > valid {
                    *w &= (1u64 << (valid - b)) - 1;
                }
            }
            if words.iter().all(|&w| w == 0) {
                continue;
            }
            let mut raw = vec![0u8; cs as usize];
            for (w, chunk) in words.iter().zip(raw.chunks_exact_mut(8)) {
                LittleEndian::write_u64(chunk, *w);
            }
            let off = self.alloc_run(st, cs)?;
            self.write_padded(&raw, off, "bitmap data")?;
            *slot = off;
        }
        let mut raw = vec![0u8; table.len() * 8];
        for (w, chunk) in table.iter().zip(raw.chunks_exact_mut(8)) {
            byteorder::BigEndian::write_u64(chunk, *w);
        }
        let off = self.alloc_run(st, raw.len() as u64)?;
        self.write_padded(&raw, off, "a bitmap table")?;
        e.table_offset = off;
        e.table_size = n as u32;
        Ok(())
    }

    /// Writes `data` at `off` (newly allocated clusters). The rest of the last cluster is
    /// left as it is, as qemu leaves it: tables and directories have their sizes recorded and
    /// nothing reads past them (and the file ends where qemu's would).
    fn write_padded(&self, data: &[u8], off: u64, what: &str) -> Result<()> {
        self.storage()
            .write_at(data, off)
            .map_err(|e| Error::io(format!("cannot write {what}"), e).at(off))
    }

    /// Sets the in-use flag of the bitmaps `select` picks in the directory on disk, rewriting
    /// it in place (see the module documentation), and syncs.
    pub(crate) fn set_in_use_in_place(&self, select: &dyn Fn(&Bitmap) -> bool) -> Result<()> {
        let Some(ext) = self.bitmaps_ext() else {
            return Ok(());
        };
        let mut dir = bitmaps::read_directory_at(self, Some(ext))?;
        let mut changed = false;
        for b in dir.iter_mut().filter(|b| select(b) && !b.in_use()) {
            b.flags |= bitmaps::FLAG_IN_USE;
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        let bytes = encode_directory(&dir);
        if bytes.len() as u64 > ext.directory_size {
            return Err(Error::corrupt(
                "the bitmap directory is shorter than its entries",
            ));
        }
        self.storage()
            .write_at(&bytes, ext.directory_offset)
            .map_err(|e| {
                Error::io("cannot write the bitmap directory", e).at(ext.directory_offset)
            })?;
        self.sync()
    }

    /// The header as it is on disk (other code updates single fields in place).
    fn header_on_disk(&self) -> Result<Header> {
        let mut c0 = vec![0u8; self.header.cluster_size() as usize];
        crate::qcow2::refcount::table::read_padded(self, &mut c0, 0)?;
        Header::parse(&c0, self.file_len())
    }

    /// Fails, changing nothing, when cluster 0 has no room for a bitmaps extension.
    pub(crate) fn check_room_for_bitmaps_ext(&self) -> Result<()> {
        let mut h = self.header_on_disk()?;
        h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: 1,
            directory_size: 0,
            directory_offset: 0,
        });
        h.encode().map(|_| ())
    }

    /// Points the header's bitmaps extension at `ext` (none: removes it), with the autoclear
    /// bit that says it is valid, in one synced write of cluster 0; records it as the live
    /// extension.
    fn write_bitmaps_ext(&self, ext: Option<BitmapsExt>) -> Result<()> {
        let mut h = self.header_on_disk()?;
        h.bitmaps = ext;
        if ext.is_some() {
            h.autoclear_features |= autoclear::BITMAPS;
        } else {
            h.autoclear_features &= !autoclear::BITMAPS;
        }
        let bytes = h.encode()?;
        Header::parse(&bytes, self.file_len().max(bytes.len() as u64))
            .map_err(|e| Error::invalid_input(format!("the new header would not be valid: {e}")))?;
        self.storage()
            .write_at(&bytes, 0)
            .map_err(|e| Error::io("cannot write the qcow2 header", e))?;
        self.sync()?;
        self.set_bitmaps_ext(ext);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::PersistentBitmaps;
    use crate::block::BlockImage;
    use crate::check::Check;
    use crate::offsets::GuestOffset;
    use crate::open::ChainGuard;
    use crate::qcow2::create::{create, CreateOptions};

    /// The data cluster offsets of bitmap `name`'s table.
    fn data_clusters(img: &Qcow2Image, name: &str) -> Vec<u64> {
        let dir = bitmaps::read_directory(img).unwrap();
        let b = dir.iter().find(|b| b.name == name).unwrap();
        read_table(img, b).unwrap()
    }

    #[test]
    fn a_store_rewrites_only_the_data_clusters_that_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        // 512-byte clusters, 512 bytes per bit: one data cluster covers 2 MiB of disk.
        let o = CreateOptions {
            size: 8 << 20,
            cluster_size: 512,
            ..Default::default()
        };
        create(&p, &o).unwrap();
        let open = || Qcow2Image::open(&p, true, true, &mut ChainGuard::default()).unwrap();
        let img = open();
        img.add_bitmap("b", Some(512), true).unwrap();
        assert_eq!(data_clusters(&img, "b"), vec![0; 4]);
        img.write_at(&[1; 512], GuestOffset(0)).unwrap();
        img.write_at(&[1; 512], GuestOffset(5 << 20)).unwrap();
        img.close().unwrap();
        let img = open();
        let first = data_clusters(&img, "b");
        assert!(first[0] != 0 && first[1] == 0 && first[2] != 0 && first[3] == 0);
        img.write_at(&[2; 512], GuestOffset(4 << 20)).unwrap();
        img.close().unwrap();
        let img = open();
        let second = data_clusters(&img, "b");
        assert_eq!(second[0], first[0], "an unchanged data cluster is shared");
        assert_ne!(second[2], first[2], "a changed one is written anew");
        let ranges = img.read_bitmap("b").unwrap().dirty_ranges();
        assert_eq!(
            ranges,
            vec![
                (0, 512),
                (4 << 20, (4 << 20) + 512),
                (5 << 20, (5 << 20) + 512)
            ]
        );
        // Nothing leaked, nothing referenced twice.
        let r = img.check().unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        // Removing the last bitmap removes the extension and frees everything.
        img.remove_bitmap("b").unwrap();
        assert!(img.bitmaps_ext().is_none());
        let r = img.check().unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        drop(img);
        let bytes = std::fs::read(&p).unwrap();
        let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.autoclear_features & autoclear::BITMAPS, 0);
    }

    #[test]
    fn flags_in_use_only_while_writes_are_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let o = CreateOptions {
            size: 1 << 20,
            ..Default::default()
        };
        create(&p, &o).unwrap();
        let img = Qcow2Image::open(&p, true, true, &mut ChainGuard::default()).unwrap();
        img.add_bitmap("on", None, true).unwrap();
        img.add_bitmap("off", None, false).unwrap();
        let on_disk = |img: &Qcow2Image| -> Vec<bool> {
            bitmaps::read_directory(img)
                .unwrap()
                .iter()
                .map(|b| b.in_use())
                .collect()
        };
        assert_eq!(on_disk(&img), [false, false]);
        img.write_zeroes(GuestOffset(0), 4096, false).unwrap();
        assert_eq!(
            on_disk(&img),
            [true, false],
            "flagged before the first write"
        );
        // The tracker's own flag does not make the bitmap look inconsistent.
        assert!(img.list_bitmaps().unwrap().iter().all(|b| !b.in_use));
        img.flush().unwrap();
        assert_eq!(on_disk(&img), [false, false]);
        img.discard(GuestOffset(0), 65536).unwrap();
        assert_eq!(on_disk(&img), [true, false]);
        std::mem::forget(img); // a crash: the flag stays (the leaked handle keeps its locks)
        let mut shared = ChainGuard::new(crate::open::Sharing::ForceShare);
        let img = Qcow2Image::open(&p, false, true, &mut shared).unwrap();
        assert_eq!(on_disk(&img), [true, false]);
        assert!(img.read_bitmap("on").is_err());
        assert_eq!(img.read_bitmap("off").unwrap().dirty_ranges(), vec![]);
    }
}
