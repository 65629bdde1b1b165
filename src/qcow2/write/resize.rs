//! Changing the virtual size of a qcow2 image (`vimg resize`), as qemu's `qcow2_co_truncate`
//! does.
//!
//! - **Growing** changes the header's size field, after moving the L1 table to bigger clusters
//!   if it is too small for the new size (the header's size, L1 size and L1 offset are
//!   switched in one write, then the old table is released). With a preallocation mode other
//!   than `off`, every guest cluster of the new area is then given a host cluster (qcow2.rst
//!   "Cluster mapping": standard descriptors with the COPIED flag; extended L2 entries keep an
//!   empty subcluster bitmap, as qemu's do): `metadata` only extends the file sparsely over
//!   them, `falloc` allocates them in the host file system, `full` writes zeros to them.
//! - **Shrinking** discards every cluster past the new end (their L2 entries are cleared, L2
//!   tables wholly past the end are dropped from the L1 table, which keeps its size; a partly
//!   kept table shared with a snapshot is copied first), writes the new size and truncates the
//!   file after the last cluster still in use. Every cluster that becomes free has its host
//!   space given back (a hole punched), also in the middle of the file, as qemu does.
//! - Persistent dirty bitmaps follow the new size, as in qemu 10: the grown area is clear in
//!   them (also where it is zeroed to hide a longer backing file), the bits past a new, smaller
//!   end are dropped. They are flagged in use from before the size changes until they are
//!   stored at the new size; an image with an inconsistent bitmap is not resized (qemu's rule).
//! - Version 2 images with internal snapshots cannot be resized at all (qemu's rule: their
//!   snapshot table has no per-snapshot disk size); version 3 ones can, and the snapshots keep
//!   their own size and data.
//!
//! The order keeps the image consistent whenever it is interrupted: new clusters get their
//! refcounts on disk before anything points at them, and clusters are released only after no
//! table on disk points at them any more (see [`super::path`]).

use crate::error::{Error, Result};
use crate::prealloc::Preallocation;
use crate::qcow2::format::header::fields;
use crate::qcow2::format::l2::{self, Descriptor, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};
use std::sync::atomic::Ordering;

/// qemu's message for resizing a version 2 image that has internal snapshots.
pub const V2_SNAPSHOTS: &str = "Can't resize a v2 image which has snapshots";
pub(crate) use crate::prealloc::PREALLOC_SHRINK;

/// Bytes of zeros written at a time by `preallocation=full`.
const ZERO_CHUNK: u64 = 1 << 20;
/// L2 tables prepared in memory before they are flushed.
const TABLES_PER_FLUSH: usize = 256;

impl Qcow2Image {
    /// Sets the virtual size to `new_size` (a multiple of 512) without preallocation; see
    /// [`Qcow2Image::resize_with`].
    pub fn resize_to(&mut self, new_size: u64) -> Result<()> {
        self.resize_with(new_size, Preallocation::Off)
    }

    /// Sets the virtual size to `new_size` (a multiple of 512), growing the L1 table if needed
    /// and preallocating the new area as `prealloc` says, or discarding the clusters past the
    /// new end. The image must be opened read-write. When the image was opened with its
    /// backing chain and the backing file is longer than the old size, the grown area is made
    /// to read as zeros rather than show the backing file's data.
    pub fn resize_with(&mut self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid_input(format!(
                "the new size {new_size} is not a multiple of 512 bytes"
            )));
        }
        if self.data_file.is_some() || self.header.has_data_file() {
            return Err(Error::unsupported(
                "resizing qcow2 images with an external data file is not supported yet",
            ));
        }
        if new_size > (1u64 << 62) {
            return Err(Error::invalid_input(format!(
                "the new size {new_size} is too large"
            )));
        }
        drop(self.write_state()?); // fails early for read-only opens
        let old_size = self.header.size;
        if new_size == old_size {
            return Ok(());
        }
        if self.header.nb_snapshots > 0 && self.header.version < 3 {
            return Err(Error::unsupported(V2_SNAPSHOTS).bare());
        }
        if new_size < old_size && prealloc != Preallocation::Off {
            return Err(Error::invalid_input(PREALLOC_SHRINK).bare());
        }
        let backing_end = self.backing.as_ref().map_or(0, |b| b.virtual_size());
        if self.header.version < 3 && new_size > old_size && backing_end > old_size {
            // Version 2 has no zero clusters, and qemu refuses this case too.
            return Err(Error::unsupported(
                "cannot grow a version 2 image whose backing file is longer: the new area \
                 could not be made to read as zeros (upgrade the image to compat=1.1 first)",
            ));
        }
        // The bitmaps are flagged in use until they are stored at the new size.
        let bitmaps = self.begin_bitmaps_resize(new_size)?;
        if new_size < old_size {
            self.discard_tail(new_size)?;
            self.write_size(new_size)?;
            self.truncate_after_last_cluster()?;
        } else {
            let needed = entries_needed(new_size, self.header.l1_shift());
            if needed > u64::from(self.header.l1_size) {
                self.grow_l1(new_size, needed)?;
            } else {
                self.write_size(new_size)?;
            }
            // A longer backing file would show through the new area: make it read as zeros,
            // as qemu does.
            let end = backing_end.min(new_size);
            if end > old_size {
                self.write_zeroes_untracked(old_size, end - old_size, false)?;
                self.flush_inner()?;
            }
            if prealloc != Preallocation::Off {
                self.preallocate(old_size, new_size, prealloc)?;
            }
        }
        if bitmaps {
            self.finish_bitmaps_resize()?;
        }
        Ok(())
    }

    /// Writes the size field of the header, syncs, and records it in memory.
    fn write_size(&mut self, new_size: u64) -> Result<()> {
        self.storage
            .write_at(&new_size.to_be_bytes(), fields::SIZE)
            .map_err(|e| Error::io("cannot write the header", e).at(fields::SIZE))?;
        self.sync()?;
        self.header.size = new_size;
        Ok(())
    }

    /// Moves the L1 table to new clusters with room for `entries` entries, and switches the
    /// header to it and to `new_size` in one write.
    fn grow_l1(&mut self, new_size: u64, entries: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        let bytes = entries * 8;
        if bytes > crate::qcow2::format::header::MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "the L1 table for {new_size} bytes would exceed qemu's 32 MiB limit"
            )));
        }
        let clusters = bytes.div_ceil(cs);
        let old_off = self.header.l1_table_offset;
        let old_clusters = (u64::from(self.header.l1_size) * 8).div_ceil(cs);
        let mut table = self.l1().clone();
        table.resize(entries as usize, 0);
        let new_off = {
            let mut st = self.write_state()?;
            // 1. Allocate the new table's clusters; their refcounts reach the disk first.
            let first = self.find_free(&mut st, clusters, true)?;
            for c in first..first + clusters {
                self.set_refcount_of(&mut st, c, 1)?;
            }
            self.note_end(first + clusters);
            self.flush_locked(&mut st)?;
            // 2. Write the new table, whole clusters of it, and sync.
            let off = first * cs;
            let mut raw = vec![0u8; (clusters * cs) as usize];
            for (i, e) in table.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *e);
            }
            self.storage
                .write_at(&raw, off)
                .map_err(|e| Error::io("cannot write the L1 table", e).at(off))?;
            self.sync()?;
            off
        };
        // 3. Switch the header over: size, L1 size, L1 offset (and crypt_method between them,
        // rewritten as it is).
        let mut f = [0u8; (fields::L1_TABLE_OFFSET + 8 - fields::SIZE) as usize];
        let at = |field: u64| (field - fields::SIZE) as usize;
        self.storage
            .read_at(&mut f, fields::SIZE)
            .map_err(|e| Error::io("cannot read the header", e).at(fields::SIZE))?;
        BigEndian::write_u64(&mut f[at(fields::SIZE)..], new_size);
        BigEndian::write_u32(&mut f[at(fields::L1_SIZE)..], entries as u32);
        BigEndian::write_u64(&mut f[at(fields::L1_TABLE_OFFSET)..], new_off);
        self.storage
            .write_at(&f, fields::SIZE)
            .map_err(|e| Error::io("cannot write the header", e).at(fields::SIZE))?;
        self.sync()?;
        self.header.size = new_size;
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = new_off;
        *self.l1.write().unwrap_or_else(|e| e.into_inner()) = table;
        // 4. Release the old table.
        let mut st = self.write_state()?;
        if old_off != 0 {
            for c in 0..old_clusters {
                self.release(&mut st, Descriptor::Normal(old_off + c * cs));
            }
        }
        self.flush_locked(&mut st)
    }

    /// Discards every cluster past `new_size`: clears their L2 entries (in a private copy of
    /// the table the new end falls in when it is shared with a snapshot), drops L2 tables
    /// wholly past the end from the L1 table, and releases what no longer is referenced.
    fn discard_tail(&mut self, new_size: u64) -> Result<()> {
        let h = self.header.clone();
        let cs = h.cluster_size();
        let words = if h.extended_l2() { 2 } else { 1 };
        let per_table = 1u64 << h.l2_bits();
        let first_gc = new_size.div_ceil(cs); // first guest cluster to discard
        let keep_l1 = entries_needed(new_size, h.l1_shift()) as usize;
        let l1 = self.l1().clone();
        let mut new_l1 = l1.clone();
        // What loses a reference once nothing on disk points at it any more.
        let mut releases: Vec<Descriptor> = Vec::new();
        for (i, e) in l1.iter().enumerate().skip(keep_l1) {
            if let Some(off) = l2::l1_entry_target(*e, cs)? {
                let table = self.l2_table(off)?;
                for k in 0..per_table as usize {
                    releases.push(l2::decode_descriptor(table[k * words], &h)?);
                }
                releases.push(Descriptor::Normal(off));
            }
            new_l1[i] = 0;
        }

        let mut st = self.write_state()?;
        // 1. The table the new end falls in: its entries past the end are cleared.
        let within = first_gc % per_table;
        let idx = (first_gc / per_table) as usize;
        if let (true, Some(&e)) = (within != 0, l1.get(idx)) {
            if let Some(off) = l2::l1_entry_target(e, cs)? {
                let mut t = self.l2_table(off)?.to_vec();
                let mut changed = false;
                for i in within as usize..per_table as usize {
                    let w = i * words;
                    if t[w] != 0 || (words == 2 && t[w + 1] != 0) {
                        releases.push(l2::decode_descriptor(t[w], &h)?);
                        t[w] = 0;
                        if words == 2 {
                            t[w + 1] = 0;
                        }
                        changed = true;
                    }
                }
                if changed && e & OFLAG_COPIED != 0 {
                    self.l2_cache.put_dirty(off, t.into());
                } else if changed {
                    // Shared with a snapshot: the active L1 gets its own copy.
                    let c = self.find_free(&mut st, 1, true)?;
                    self.set_refcount_of(&mut st, c, 1)?;
                    self.note_end(c + 1);
                    self.l2_cache.put_dirty(c * cs, t.into());
                    new_l1[idx] = (c * cs) | OFLAG_COPIED;
                    releases.push(Descriptor::Normal(off));
                }
            }
        }
        // 2. New refcounts and the changed L2 tables reach the disk, then the L1 table.
        self.flush_locked(&mut st)?;
        if new_l1 != l1 {
            self.write_l1(&new_l1)?;
        }
        // 3. Only now is anything released. What becomes free goes back to the host file
        // system (a hole is punched where it can be), as qemu's shrink discards the dropped
        // clusters with QCOW2_DISCARD_ALWAYS: freed clusters before the last one still in use
        // would otherwise keep their space, as the truncation only frees the file's tail.
        for d in releases {
            self.release_discarded(&mut st, d)?;
        }
        self.flush_locked(&mut st)
    }

    /// Writes the whole active L1 table to disk, syncs, and records it in memory.
    fn write_l1(&self, table: &[u64]) -> Result<()> {
        let mut raw = vec![0u8; table.len() * 8];
        for (i, e) in table.iter().enumerate() {
            BigEndian::write_u64(&mut raw[i * 8..], *e);
        }
        let off = self.header.l1_table_offset;
        self.storage
            .write_at(&raw, off)
            .map_err(|e| Error::io("cannot write the L1 table", e).at(off))?;
        self.sync()?;
        *self.l1.write().unwrap_or_else(|e| e.into_inner()) = table.to_vec();
        Ok(())
    }

    /// Truncates the image file after the last cluster whose refcount is not zero, as qemu
    /// does after shrinking.
    pub(in crate::qcow2) fn truncate_after_last_cluster(&mut self) -> Result<()> {
        let cs = self.header.cluster_size();
        let len = self
            .storage
            .len()
            .map_err(|e| Error::io("cannot get the image file size", e))?;
        let st = self.write_state()?;
        let mut end = len.div_ceil(cs);
        while end > 1 && self.refcount_of(&st, end - 1)? == 0 {
            end -= 1;
        }
        drop(st);
        if end * cs < len {
            self.storage
                .set_len(end * cs)
                .map_err(|e| Error::io("cannot truncate the image file", e))?;
            self.sync()?;
            self.file_len.store(end * cs, Ordering::Release);
        }
        Ok(())
    }

    /// Gives every guest cluster of `[old_size, new_size)` without a host cluster one, as
    /// `prealloc` says, in qemu's layout: with `metadata`, each missing L2 table is followed by
    /// the data clusters it maps; with `falloc` and `full`, the data clusters form one run
    /// (the cluster holding the old end moves into it, its contents copied) and the new tables
    /// follow it. Tables shared with a snapshot are left alone.
    fn preallocate(&mut self, old_size: u64, new_size: u64, prealloc: Preallocation) -> Result<()> {
        let h = self.header.clone();
        let cs = h.cluster_size();
        let words = if h.extended_l2() { 2 } else { 1 };
        let per_table = 1u64 << h.l2_bits();
        let end_gc = new_size.div_ceil(cs);
        let one_run = prealloc != Preallocation::Metadata;
        let l1 = self.l1().clone();
        // The cluster holding an unaligned old end moves into the new run (falloc, full).
        let mut moved: Option<(u64, u64)> = None; // (guest cluster, old host offset)
        let mut plan: Vec<TablePlan> = Vec::new();
        let mut gc = old_size / cs;
        while gc < end_gc {
            let idx = gc / per_table;
            let table_end = ((idx + 1) * per_table).min(end_gc);
            let e = l1.get(idx as usize).copied().unwrap_or(0);
            let existing = l2::l1_entry_target(e, cs)?;
            let wanted: Vec<u64> = match existing {
                Some(_) if e & OFLAG_COPIED == 0 => Vec::new(),
                Some(off) => {
                    let t = self.l2_table(off)?;
                    let mut w = Vec::new();
                    for g in gc..table_end {
                        let entry = t[(g % per_table) as usize * words];
                        let host = entry & L2E_OFFSET_MASK;
                        if entry & OFLAG_COMPRESSED != 0 {
                            continue;
                        }
                        if host == 0 {
                            w.push(g);
                        } else if one_run
                            && g * cs < old_size
                            && entry & OFLAG_COPIED != 0
                            && entry & l2::OFLAG_ZERO == 0
                        {
                            moved = Some((g, host));
                            w.push(g);
                        }
                    }
                    w
                }
                None => (gc..table_end).collect(),
            };
            if !wanted.is_empty() {
                plan.push(TablePlan {
                    l1_index: idx as usize,
                    existing,
                    wanted,
                    table_at: 0,
                    data_at: 0,
                });
            }
            gc = table_end;
        }
        let n_data: u64 = plan.iter().map(|p| p.wanted.len() as u64).sum();
        if n_data == 0 {
            return Ok(());
        }

        // 1. Allocate the data clusters and the missing tables; their refcounts reach the disk.
        let mut st = self.write_state()?;
        let alloc = |img: &Self, st: &mut super::path::WriteState, n: u64| -> Result<u64> {
            let c = img.find_free(st, n, true)?;
            for k in c..c + n {
                img.set_refcount_of(st, k, 1)?;
            }
            img.note_end(c + n);
            Ok(c)
        };
        let mut run = None;
        if one_run {
            let first = alloc(self, &mut st, n_data)?;
            run = Some((first, n_data));
            let mut next = first;
            for p in &mut plan {
                p.data_at = next;
                next += p.wanted.len() as u64;
            }
        }
        for p in &mut plan {
            p.table_at = match p.existing {
                Some(off) => off,
                None => alloc(self, &mut st, 1)? * cs,
            };
            if !one_run {
                p.data_at = alloc(self, &mut st, p.wanted.len() as u64)?;
            }
        }
        self.flush_locked(&mut st)?;

        // 2. The host space of the data clusters, and the moved cluster's contents.
        match run {
            Some((first, n)) => self.prepare_host_space(first * cs, n * cs, prealloc)?,
            None => {
                let end = plan
                    .iter()
                    .map(|p| p.data_at + p.wanted.len() as u64)
                    .max()
                    .unwrap_or(0);
                self.prepare_host_space(end * cs, 0, prealloc)?;
            }
        }
        let mut releases = Vec::new();
        if let Some((g, old_host)) = moved {
            let p = plan.iter().find(|p| p.wanted.contains(&g));
            if let Some(p) = p {
                let pos = p.wanted.iter().position(|&x| x == g).unwrap_or(0) as u64;
                let mut buf = vec![0u8; cs as usize];
                crate::qcow2::refcount::table::read_padded(self, &mut buf, old_host)?;
                let to = (p.data_at + pos) * cs;
                // Ciphertext whose IV follows the host offset is encrypted again for its new
                // place (LUKS; legacy AES keeps it as it is).
                if let Some(c) = &self.crypt {
                    c.recrypt(g * cs, old_host, to, &mut buf)?;
                }
                self.storage
                    .write_at(&buf, to)
                    .map_err(|e| Error::io("cannot copy a cluster", e).at(to))?;
                self.sync()?;
                releases.push(Descriptor::Normal(old_host));
            }
        }

        // 3. The L2 tables, then the L1 table, then the moved cluster's old place is released.
        let mut new_l1 = l1.clone();
        for (n, p) in plan.iter().enumerate() {
            let mut t = match p.existing {
                Some(o) => self.l2_table(o)?.to_vec(),
                None => vec![0u64; (per_table as usize) * words],
            };
            for (k, g) in p.wanted.iter().enumerate() {
                let w = (g % per_table) as usize * words;
                // A zero flag stays: the cluster keeps reading as zeros.
                t[w] = ((p.data_at + k as u64) * cs) | OFLAG_COPIED | (t[w] & l2::OFLAG_ZERO);
            }
            self.l2_cache.put_dirty(p.table_at, t.into());
            if p.existing.is_none() {
                new_l1[p.l1_index] = p.table_at | OFLAG_COPIED;
            }
            if (n + 1) % TABLES_PER_FLUSH == 0 {
                self.flush_locked(&mut st)?;
            }
        }
        self.flush_locked(&mut st)?;
        if new_l1 != l1 {
            self.write_l1(&new_l1)?;
        }
        for d in releases {
            self.release(&mut st, d);
        }
        self.flush_locked(&mut st)
    }

    /// Makes the host range `[start, start + len)` of newly allocated data clusters part of
    /// the file: sparsely (`metadata`), allocated in the file system (`falloc`) or written with
    /// zeros (`full`).
    fn prepare_host_space(&self, start: u64, len: u64, prealloc: Preallocation) -> Result<()> {
        let end = start + len;
        let cur = self
            .storage
            .len()
            .map_err(|e| Error::io("cannot get the image file size", e))?;
        match prealloc {
            Preallocation::Off | Preallocation::Metadata => {}
            Preallocation::Falloc => {
                let file = self.storage.host_file().ok_or_else(|| {
                    Error::unsupported("preallocation=falloc needs the image in a host file")
                })?;
                rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), start, len)
                    .map_err(|e| Error::io("cannot preallocate", e.into()).at(start))?;
            }
            Preallocation::Full => {
                let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
                let mut at = start;
                while at < end {
                    let n = (end - at).min(ZERO_CHUNK);
                    self.storage
                        .write_at(&zeros[..n as usize], at)
                        .map_err(|e| Error::io("cannot write zeros", e).at(at))?;
                    at += n;
                }
            }
        }
        if cur < end {
            self.storage
                .set_len(end)
                .map_err(|e| Error::io("cannot extend the image file", e))?;
        }
        self.sync()
    }
}

/// What preallocation does to one L2 table.
struct TablePlan {
    /// Its index in the L1 table.
    l1_index: usize,
    /// Its host offset when it exists already.
    existing: Option<u64>,
    /// Guest clusters to give host clusters, in order.
    wanted: Vec<u64>,
    /// Its host offset (new or existing).
    table_at: u64,
    /// Host cluster of the first of `wanted`; the others follow it.
    data_at: u64,
}

/// L1 entries a disk of `size` bytes needs, each covering `1 << l1_shift` bytes.
fn entries_needed(size: u64, l1_shift: u32) -> u64 {
    size.div_ceil(1u64 << l1_shift)
}
