//! Changing the virtual size of a qcow2 image (`vimg resize`).
//!
//! Growing only changes the header's size field, unless the L1 table is too small for the new
//! size: then a bigger L1 table is written to newly allocated clusters first, and the header
//! is switched over to it (size, L1 size and L1 offset in one write) before the old table is
//! released. Shrinking discards every cluster past the new end (their L2 entries are cleared,
//! L2 tables wholly past the end are dropped from the L1 table) and then writes the new size.
//!
//! The order keeps the image consistent whenever it is interrupted: new clusters get their
//! refcounts on disk before anything points at them, and clusters are released only after no
//! table on disk points at them any more (see [`super::write`]).

use super::l2::{self, Descriptor};
use super::Qcow2Image;
use crate::error::{Error, Result};
use byteorder::{BigEndian, ByteOrder};

impl Qcow2Image {
    /// Sets the virtual size to `new_size` (a multiple of 512), growing the L1 table if needed
    /// or discarding the clusters past the new end. The image must be opened read-write.
    /// Shrinking images with internal snapshots is refused. When the image was opened with its
    /// backing chain and the backing file is longer than the old size, the grown area is made
    /// to read as zeros rather than show the backing file's data.
    pub fn resize_to(&mut self, new_size: u64) -> Result<()> {
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
        let backing_end = self.backing.as_ref().map_or(0, |b| b.virtual_size());
        if self.header.version < 3 && new_size > old_size && backing_end > old_size {
            // Version 2 has no zero clusters, and qemu refuses this case too.
            return Err(Error::unsupported(
                "cannot grow a version 2 image whose backing file is longer: the new area \
                 could not be made to read as zeros (upgrade the image to compat=1.1 first)",
            ));
        }
        if new_size < old_size {
            if self.header.nb_snapshots > 0 {
                return Err(Error::unsupported(
                    "cannot shrink an image that has internal snapshots",
                ));
            }
            self.discard_tail(new_size)?;
            self.write_size(new_size)?;
        } else if new_size > old_size {
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
                self.write_zeroes_inner(old_size, end - old_size, false)?;
                self.flush_inner()?;
            }
        }
        Ok(())
    }

    /// Writes the size field of the header, syncs, and records it in memory.
    fn write_size(&mut self, new_size: u64) -> Result<()> {
        self.storage
            .write_at(&new_size.to_be_bytes(), 24)
            .map_err(|e| Error::io("cannot write the header", e).at(24))?;
        self.sync()?;
        self.header.size = new_size;
        Ok(())
    }

    /// Moves the L1 table to new clusters with room for `entries` entries, and switches the
    /// header to it and to `new_size` in one write.
    fn grow_l1(&mut self, new_size: u64, entries: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        let bytes = entries * 8;
        if bytes > super::header::MAX_L1_BYTES {
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
        // 3. Switch the header over: size (24..32), L1 size (36..40), L1 offset (40..48).
        let mut f = [0u8; 24];
        self.storage
            .read_at(&mut f, 24)
            .map_err(|e| Error::io("cannot read the header", e).at(24))?;
        BigEndian::write_u64(&mut f[0..8], new_size);
        BigEndian::write_u32(&mut f[12..16], entries as u32);
        BigEndian::write_u64(&mut f[16..24], new_off);
        self.storage
            .write_at(&f, 24)
            .map_err(|e| Error::io("cannot write the header", e).at(24))?;
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

    /// Discards every cluster past `new_size`: clears their L2 entries, drops L2 tables wholly
    /// past the end from the L1 table, and releases what they pointed at.
    fn discard_tail(&mut self, new_size: u64) -> Result<()> {
        let h = self.header.clone();
        let cs = h.cluster_size();
        let words = if h.extended_l2() { 2 } else { 1 };
        let per_table = 1u64 << h.l2_bits();
        let first_gc = new_size.div_ceil(cs); // first guest cluster to discard
        let keep_l1 = entries_needed(new_size, h.l1_shift()) as usize;
        let l1 = self.l1().clone();

        // 1. Drop whole tables from the L1 table, on disk first.
        let mut dropped = Vec::new();
        let mut new_l1 = l1.clone();
        for (i, e) in l1.iter().enumerate().skip(keep_l1) {
            if let Some(off) = l2::l1_entry_target(*e, cs)? {
                dropped.push(off);
            }
            if *e != 0 {
                new_l1[i] = 0;
            }
        }
        if new_l1 != l1 {
            let mut raw = vec![0u8; new_l1.len() * 8];
            for (i, e) in new_l1.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *e);
            }
            let off = h.l1_table_offset;
            // Earlier allocations must be on disk before the table changes.
            self.flush_inner()?;
            self.storage
                .write_at(&raw, off)
                .map_err(|e| Error::io("cannot write the L1 table", e).at(off))?;
            self.sync()?;
            *self.l1.write().unwrap_or_else(|e| e.into_inner()) = new_l1.clone();
        }

        let mut st = self.write_state()?;
        // 2. Release what the dropped tables pointed at, and the tables themselves.
        for off in dropped {
            let table = self.l2_table(off)?;
            for i in 0..per_table as usize {
                let desc = l2::decode_descriptor(table[i * words], &h)?;
                self.release(&mut st, desc);
            }
            self.release(&mut st, Descriptor::Normal(off));
        }
        // 3. The table the new end falls in: clear its entries past the end.
        let within = first_gc % per_table;
        if within != 0 {
            let idx = (first_gc / per_table) as usize;
            if let Some(off) = new_l1
                .get(idx)
                .map(|e| l2::l1_entry_target(*e, cs))
                .transpose()?
                .flatten()
            {
                let mut t = self.l2_table(off)?.to_vec();
                let mut changed = false;
                for i in within as usize..per_table as usize {
                    let w = i * words;
                    if t[w] != 0 || (words == 2 && t[w + 1] != 0) {
                        let desc = l2::decode_descriptor(t[w], &h)?;
                        self.release(&mut st, desc);
                        t[w] = 0;
                        if words == 2 {
                            t[w + 1] = 0;
                        }
                        changed = true;
                    }
                }
                if changed {
                    self.l2_cache.put_dirty(off, t.into());
                }
            }
        }
        // 4. Write the cleared entries, then the releases.
        self.flush_locked(&mut st)
    }
}

/// L1 entries a disk of `size` bytes needs, each covering `1 << l1_shift` bytes.
fn entries_needed(size: u64, l1_shift: u32) -> u64 {
    size.div_ceil(1u64 << l1_shift)
}
