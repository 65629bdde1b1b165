//! Creating, deleting and applying internal snapshots (qcow2.rst "Snapshots"), as
//! `qemu-img snapshot -c/-d/-a` does.
//!
//! A cluster's refcount counts the L1 tables (the active one and each snapshot's) it is
//! reachable through, once per reference; an L1 or L2 entry of the active tree has the COPIED
//! flag exactly when the refcount of what it points at is 1.
//!
//! # Crash safety
//!
//! Every change goes through the write path's refcount cache and its flush order (see
//! [`crate::qcow2::write::path`]): refcount increments reach the disk before anything that
//! needs them, the new snapshot table and L1 tables are written and synced before the header's
//! `nb_snapshots`/`snapshots_offset` (one 12-byte write) switch to them, and clusters lose
//! references only after no table on disk points at them any more. COPIED flags are cleared
//! before a new snapshot is recorded (so no writer ever changes a shared cluster in place), and
//! set again after the refcounts dropped (deletion and apply). An interruption leaves at worst
//! leaked clusters, or COPIED flags clear where they could be set, which `qemu-img check -r all`
//! repairs.

use super::table::{read_table, Snapshot, MAX_TABLE_BYTES};
use crate::error::{Error, Result};
use crate::qcow2::format::header::fields;
use crate::qcow2::format::l2::{self, Descriptor, OFLAG_COPIED};
use crate::qcow2::refcount::table as refcount;
use crate::qcow2::write::path::WriteState;
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};

/// Most snapshots an image may have (qemu's `QCOW_MAX_SNAPSHOTS`).
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
/// Longest name qemu-img records, in bytes (longer ones are cut).
pub(crate) const MAX_NAME_BYTES: usize = 255;
/// Extra data qemu writes per entry: VM state size (64 bits), disk size, instruction count.
const EXTRA_BYTES: usize = 24;

/// What a new snapshot records besides the tree (qemu-img takes the date from the clock and
/// sets the rest to 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct NewSnapshot {
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
}

impl Qcow2Image {
    /// Checks that snapshots can be changed in this image at all.
    fn snapshot_preconditions(&self) -> Result<()> {
        drop(self.write_state()?); // refuses read-only opens
        if self.data_file.is_some() || self.header.has_data_file() {
            return Err(Error::unsupported(
                "internal snapshots are not supported with an external data file",
            ));
        }
        self.snapshot_table_in_file()
    }

    /// Refuses to change snapshots while the snapshot table lies (partly) past the end of the
    /// file. qemu opens such an image and reads zeros there; vimg reads it the same way, but
    /// rewriting the table would release clusters no refcount covers.
    fn snapshot_table_in_file(&self) -> Result<()> {
        if self.header.nb_snapshots == 0 || self.snapshot_override.is_some() {
            return Ok(());
        }
        let bytes = self.snapshot_table_bytes()?;
        let off = self.header.snapshots_offset;
        if off.saturating_add(bytes) > self.file_len() {
            return Err(Error::corrupt(format!(
                "snapshot table at {off:#x} ({bytes} bytes) lies beyond the end of the file ({} bytes)",
                self.file_len()
            ))
            .at(64));
        }
        Ok(())
    }

    /// The L1 table of snapshot `s`, read after checking its bounds.
    pub(crate) fn snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>> {
        s.validate_l1(self)?;
        let mut raw = vec![0u8; s.l1_size as usize * 8];
        self.storage
            .read_at(&mut raw, s.l1_table_offset)
            .map_err(|e| Error::io("cannot read a snapshot's L1 table", e).at(s.l1_table_offset))?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    /// Every host cluster the tree of `l1` references, once per reference: its L2 tables and
    /// what their entries point at (every host cluster a compressed cluster touches).
    pub(crate) fn tree_clusters(&self, l1: &[u64]) -> Result<Vec<u64>> {
        self.tree_clusters_noting(l1, None)
    }

    /// [`Self::tree_clusters`], except that with `defect` given a standard L2 entry with
    /// reserved bits set is not an error at once: its cluster (the entry's offset bits, as
    /// qemu takes them) is listed and the first such error is stored in `defect`, for the
    /// caller to return after what qemu would refuse first.
    fn tree_clusters_noting(
        &self,
        l1: &[u64],
        mut defect: Option<&mut Option<Error>>,
    ) -> Result<Vec<u64>> {
        let cs = self.header.cluster_size();
        let bits = self.header.cluster_bits;
        let words = if self.header.extended_l2() { 2 } else { 1 };
        let mut out = Vec::new();
        for &e in l1 {
            let Some(off) = l2::l1_entry_target(e, cs)? else {
                continue;
            };
            out.push(off / cs);
            let table = self.l2_table(off)?;
            for &entry in table.iter().step_by(words) {
                let desc = match (l2::decode_descriptor(entry, &self.header), defect.as_mut()) {
                    (Ok(d), _) => d,
                    (Err(e), Some(slot))
                        if entry & l2::OFLAG_COMPRESSED == 0
                            && entry & l2::L2E_RESERVED_MASK != 0 =>
                    {
                        let off = entry & l2::L2E_OFFSET_MASK;
                        if off != 0 && off.is_multiple_of(cs) {
                            out.push(off / cs);
                        }
                        slot.get_or_insert(e);
                        continue;
                    }
                    (Err(e), _) => return Err(e),
                };
                match desc {
                    Descriptor::Normal(h) | Descriptor::Zero(Some(h)) => out.push(h / cs),
                    Descriptor::Compressed(d) => {
                        let (a, b) = d.host_clusters(bits);
                        out.extend(a..=b);
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// The refcount each of `clusters` will have with one more reference per appearance in
    /// the list (a host cluster a tree references twice gains two), checked against the
    /// refcount width ([`refcount::increased`]) and against a refcount of 0 for a cluster in
    /// use. Changes nothing: callers plan before they allocate or write anything, so that a
    /// refusal leaves the file as it was.
    fn plan_increments(&self, st: &WriteState, clusters: &[u64]) -> Result<Vec<(u64, u64)>> {
        let mut counts = std::collections::BTreeMap::new();
        for &c in clusters {
            *counts.entry(c).or_insert(0u64) += 1;
        }
        let order = self.header.refcount_order;
        counts
            .into_iter()
            .map(|(c, more)| {
                let r = self.refcount_of(st, c)?;
                if r == 0 {
                    return Err(self.zero_refcount_refusal(st, c));
                }
                Ok((c, refcount::increased(c, r, more, order)?))
            })
            .collect()
    }

    /// Why one more reference to cluster `c`, in use but with a refcount of 0, is refused.
    /// Where qemu fails too, in qemu's words (its callers prefix what failed): no refcount
    /// table qemu can make reaches `c` ("File too large"), or no refcount block covers it
    /// (qemu makes one, then gives up with "Resource temporarily unavailable"). Where a block
    /// covers it, qemu would count one reference of several: vimg refuses that as corruption.
    fn zero_refcount_refusal(&self, st: &WriteState, c: u64) -> Error {
        let idx = c >> self.refblock_bits();
        let qemu = |what: &str| Error::new(crate::error::ErrorKind::InvalidInput, what);
        if idx >= crate::qcow2::format::header::MAX_REFTABLE_BYTES / 8 {
            return qemu("File too large");
        }
        let covered = usize::try_from(idx)
            .ok()
            .and_then(|i| st.reftable.get(i))
            .is_some_and(|e| e & refcount::REFT_OFFSET_MASK != 0);
        if !covered {
            return qemu("Resource temporarily unavailable");
        }
        Error::corrupt(format!(
            "cluster {c} is in use but its refcount is 0 (repair the image with check -r all)"
        ))
    }

    /// Stores the refcounts [`Self::plan_increments`] computed (in memory; written at the
    /// next flush).
    fn apply_increments(&self, st: &mut WriteState, plan: &[(u64, u64)]) -> Result<()> {
        for &(c, r) in plan {
            self.set_refcount_of(st, c, r)?;
        }
        Ok(())
    }

    /// Allocates `bytes` rounded up to whole new clusters (refcount 1, in memory) and returns
    /// the offset of the first.
    pub(in crate::qcow2) fn alloc_run(&self, st: &mut WriteState, bytes: u64) -> Result<u64> {
        let cs = self.header.cluster_size();
        let n = bytes.div_ceil(cs).max(1);
        let first = self.find_free(st, n, true)?;
        for c in first..first + n {
            self.set_refcount_of(st, c, 1)?;
            st.metadata.insert(c);
            if let Some(log) = st.alloc_log.as_mut() {
                log.push(c);
            }
        }
        self.note_end(first + n);
        Ok(first * cs)
    }

    /// Queues the clusters of the `bytes` long table at `off` for release at the next flush.
    fn release_run(&self, st: &mut WriteState, off: u64, bytes: u64) {
        let cs = self.header.cluster_size();
        for c in (off / cs)..(off + bytes).div_ceil(cs) {
            self.release(st, Descriptor::Normal(c * cs));
        }
    }

    /// Writes `data` at `off` (newly allocated clusters) and syncs.
    fn write_synced(&self, data: &[u8], off: u64, what: &str) -> Result<()> {
        self.storage
            .write_at(data, off)
            .map_err(|e| Error::io(format!("cannot write {what}"), e).at(off))?;
        self.sync()
    }

    /// Sets the COPIED flag of every entry of the active L1 table and its L2 tables exactly
    /// when the refcount of what it points at is 1 (in memory; written at the next flush).
    fn recompute_copied(&self, st: &mut WriteState) -> Result<()> {
        let cs = self.header.cluster_size();
        let words = if self.header.extended_l2() { 2 } else { 1 };
        let l1 = self.l1().clone();
        let mut new_l1 = l1.clone();
        for (i, &e) in l1.iter().enumerate() {
            let Some(off) = l2::l1_entry_target(e, cs)? else {
                continue;
            };
            let flag = if self.refcount_of(st, off / cs)? == 1 {
                OFLAG_COPIED
            } else {
                0
            };
            new_l1[i] = (e & !OFLAG_COPIED) | flag;
            let table = self.l2_table(off)?;
            let mut changed = table.to_vec();
            for j in (0..changed.len()).step_by(words) {
                let entry = changed[j];
                let host = match l2::decode_descriptor(entry, &self.header)? {
                    Descriptor::Normal(h) | Descriptor::Zero(Some(h)) => h,
                    _ => continue, // compressed and unallocated entries never have COPIED
                };
                let flag = if self.refcount_of(st, host / cs)? == 1 {
                    OFLAG_COPIED
                } else {
                    0
                };
                changed[j] = (entry & !OFLAG_COPIED) | flag;
            }
            if changed[..] != table[..] {
                self.l2_cache.put_dirty(off, changed.into());
            }
        }
        if new_l1 != l1 {
            *self.l1.write().unwrap_or_else(|e| e.into_inner()) = new_l1;
            st.l1_dirty = true;
        }
        Ok(())
    }

    /// Clears the COPIED flag everywhere in the active tree (every cluster of it is shared
    /// with the snapshot being created).
    fn clear_copied(&self, st: &mut WriteState) -> Result<()> {
        let cs = self.header.cluster_size();
        let words = if self.header.extended_l2() { 2 } else { 1 };
        let l1 = self.l1().clone();
        for &e in &l1 {
            let Some(off) = l2::l1_entry_target(e, cs)? else {
                continue;
            };
            let table = self.l2_table(off)?;
            if table.iter().step_by(words).any(|w| w & OFLAG_COPIED != 0) {
                let mut t = table.to_vec();
                for w in t.iter_mut().step_by(words) {
                    *w &= !OFLAG_COPIED;
                }
                self.l2_cache.put_dirty(off, t.into());
            }
        }
        let cleared: Vec<u64> = l1.iter().map(|e| e & !OFLAG_COPIED).collect();
        if cleared != l1 {
            *self.l1.write().unwrap_or_else(|e| e.into_inner()) = cleared;
            st.l1_dirty = true;
        }
        Ok(())
    }

    /// Writes `entries` as the new snapshot table to new clusters, switches the header to it
    /// and releases the old table (at the flush this ends with).
    pub(in crate::qcow2) fn replace_snapshot_table(
        &mut self,
        st: &mut WriteState,
        entries: &[Vec<u8>],
    ) -> Result<()> {
        self.snapshot_table_in_file()?;
        let old = (self.header.snapshots_offset, self.snapshot_table_bytes()?);
        let bytes: Vec<u8> = entries.concat();
        if bytes.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::unsupported(
                "the snapshot table would exceed qemu's 64 MiB limit",
            ));
        }
        let off = if bytes.is_empty() {
            0
        } else {
            let off = self.alloc_run(st, bytes.len() as u64)?;
            // Refcounts (and the tree changes made so far) first, then the table.
            self.flush_locked(st)?;
            self.write_synced(&bytes, off, "the snapshot table")?;
            off
        };
        self.flush_locked(st)?;
        let mut f = [0u8; 12];
        BigEndian::write_u32(&mut f[..4], entries.len() as u32);
        BigEndian::write_u64(
            &mut f[(fields::SNAPSHOTS_OFFSET - fields::NB_SNAPSHOTS) as usize..],
            off,
        );
        self.write_synced(&f, fields::NB_SNAPSHOTS, "the header")?;
        self.header.nb_snapshots = entries.len() as u32;
        self.header.snapshots_offset = off;
        if old.1 > 0 && old.0 != 0 {
            self.release_run(st, old.0, old.1);
        }
        self.flush_locked(st)
    }

    /// Length of the current snapshot table in bytes (0 without snapshots).
    fn snapshot_table_bytes(&self) -> Result<u64> {
        if self.header.nb_snapshots == 0 {
            return Ok(0);
        }
        Ok(super::table::read_table_with_size(self)?.1)
    }

    /// The id qemu gives a new snapshot: one more than the largest numeric id.
    fn next_snapshot_id(snaps: &[Snapshot]) -> String {
        let max = snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        (max + 1).to_string()
    }

    /// Whether the image has as many snapshots as qemu allows (`MAX_SNAPSHOTS`): qemu
    /// refuses to create another before it looks at anything else.
    pub fn snapshot_table_full(&self) -> bool {
        self.header.nb_snapshots >= MAX_SNAPSHOTS
    }

    /// Creates snapshot `name` of the active state (`qemu-img snapshot -c`). Duplicate names
    /// are allowed, as by qemu-img; ids are unique.
    pub fn snapshot_create(&mut self, name: &str, info: NewSnapshot) -> Result<()> {
        // qemu-img keeps at most 255 bytes of a name.
        let mut end = name.len().min(MAX_NAME_BYTES);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let name = &name[..end];
        // qemu checks the count before anything else (EFBIG), whatever the table holds.
        if self.snapshot_table_full() {
            return Err(too_many_snapshots(name));
        }
        self.snapshot_preconditions()?;
        let snaps = read_table(self)?;
        for s in &snaps {
            s.validate_l1(self)?;
        }
        let id = Self::next_snapshot_id(&snaps);
        let l1 = self.l1().clone();
        let l1_bytes = l1.len() as u64 * 8;
        // An L2 entry with reserved bits set is refused, but after what qemu refuses first:
        // qemu ignores those bits and fails on the refcount of the cluster they leave.
        let mut defect = None;
        let tree = self.tree_clusters_noting(&l1, Some(&mut defect))?;
        let size = self.header.size;
        let mut entries: Vec<Vec<u8>> = snaps.iter().map(|s| encode_entry(s, size)).collect();
        self.with_write_state(|img, st| {
            // 1. New clusters for the snapshot's L1 copy, and one more reference to the tree
            // (refused before anything changes if a refcount would not fit its width).
            let plan = img
                .plan_increments(st, &tree)
                .map_err(|e| snapshot_failed("create", name, e))?;
            if let Some(e) = defect {
                return Err(e);
            }
            let l1_off = img.alloc_run(st, l1_bytes)?;
            // 2. The copy (COPIED flags mean nothing outside the active table: cleared),
            // written into its new clusters before the tree's refcounts go up, as qemu orders
            // it: if it cannot be written (a full block device) the image is left as it was
            // but for those clusters, leaked as qemu leaks them, rather than with a tree
            // counted twice under COPIED flags.
            let mut raw = vec![0u8; l1_bytes as usize];
            for (i, e) in l1.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], e & !OFLAG_COPIED);
            }
            if !raw.is_empty() {
                img.write_synced(&raw, l1_off, "a snapshot's L1 table")?;
            }
            img.apply_increments(st, &plan)?;
            img.flush_locked(st)?;
            // 3. Nothing of the active tree is private any more.
            img.clear_copied(st)?;
            // 4. The new table, then the header.
            let mut extra = vec![0u8; EXTRA_BYTES];
            BigEndian::write_u64(&mut extra[8..16], size);
            entries.push(encode_entry(
                &Snapshot {
                    entry_offset: 0,
                    l1_table_offset: l1_off,
                    l1_size: l1.len() as u32,
                    id,
                    name: name.to_string(),
                    date_sec: info.date_sec,
                    date_nsec: info.date_nsec,
                    vm_clock_nsec: 0,
                    vm_state_size: 0,
                    disk_size: Some(size),
                    icount: Some(0),
                    extra,
                },
                size,
            ));
            img.replace_snapshot_table(st, &entries)
        })
    }

    /// Finds the snapshot `qemu-img snapshot -d` would delete: the first with this name.
    fn find_by_name(snaps: &[Snapshot], name: &str) -> Option<usize> {
        snaps.iter().position(|s| s.name == name)
    }

    /// Deletes the first snapshot named `name` (`qemu-img snapshot -d`): the entry goes, the
    /// clusters only it referenced are freed, and COPIED flags are set again where the active
    /// tree became the only user.
    pub fn snapshot_delete(&mut self, name: &str) -> Result<()> {
        self.snapshot_preconditions()?;
        let snaps = read_table(self)?;
        let idx = Self::find_by_name(&snaps, name).ok_or_else(|| not_found_delete(name))?;
        let victim = snaps[idx].clone();
        if let Some((what, _)) = victim.qemu_l1_problem(self.header.cluster_size()) {
            return Err(
                Error::corrupt(format!("Could not delete snapshot '{name}': {what}")).bare(),
            );
        }
        let l1 = self.snapshot_l1(&victim)?;
        let tree = self.tree_clusters(&l1)?;
        let entries: Vec<Vec<u8>> = snaps
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != idx)
            .map(|(_, s)| encode_entry(s, self.header.size))
            .collect();
        self.with_write_state(|img, st| {
            img.replace_snapshot_table(st, &entries)?;
            // The entry is gone from disk: its tree and L1 table lose their reference.
            for &c in &tree {
                st.pending_free.push(c);
            }
            img.release_run(st, victim.l1_table_offset, u64::from(victim.l1_size) * 8);
            img.flush_locked(st)?;
            img.recompute_copied(st)?;
            img.flush_locked(st)
        })
    }

    /// Runs `f` with the write state taken out of its lock, so that `f` may change the image.
    pub(in crate::qcow2) fn with_write_state<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut WriteState) -> Result<T>,
    ) -> Result<T> {
        let mut guard = self
            .write
            .take()
            .ok_or_else(|| Error::unsupported("the image is not open for writing"))?;
        let r = {
            let st = guard.get_mut().unwrap_or_else(|e| e.into_inner());
            f(self, st)
        };
        self.write = Some(guard);
        r
    }

    /// Reverts the active state to snapshot `name_or_id` (`qemu-img snapshot -a`; an id is matched
    /// first, then a name), refused while the image has persistent dirty bitmaps, as by qemu (they
    /// would not record the change): the virtual size becomes the one the snapshot recorded, the
    /// active L1 table gets the snapshot's entries, and the old active tree loses its reference.
    pub fn snapshot_apply(&mut self, name_or_id: &str) -> Result<()> {
        self.snapshot_preconditions()?;
        // The disk would change under the bitmaps without a write to mark: qemu refuses too.
        if self.bitmaps_ext().is_some_and(|b| b.nb_bitmaps > 0) {
            return Err(Error::new(
                crate::error::ErrorKind::Unsupported,
                format!("Could not apply snapshot '{name_or_id}': Device has active dirty bitmaps"),
            ));
        }
        let snaps = read_table(self)?;
        let idx = snaps
            .iter()
            .position(|s| s.id == name_or_id)
            .or_else(|| Self::find_by_name(&snaps, name_or_id))
            .ok_or_else(|| {
                Error::new(
                    crate::error::ErrorKind::InvalidInput,
                    format!(
                        "Could not apply snapshot '{name_or_id}': Failed to load snapshot: No \
                         such file or directory"
                    ),
                )
            })?;
        let snap = snaps[idx].clone();
        if let Some((what, why)) = snap.qemu_l1_problem(self.header.cluster_size()) {
            let brk = crate::error::REPORT_BREAK;
            return Err(Error::corrupt(format!(
                "{what}{brk}Could not apply snapshot '{name_or_id}': Failed to load snapshot: {why}"
            ))
            .bare());
        }
        let sn_l1 = self.snapshot_l1(&snap)?;
        if let Some(size) = snap.disk_size {
            if size != self.header.size {
                self.resize_to(size)?;
            }
        }
        if snap.l1_size > self.header.l1_size {
            self.grow_active_l1(snap.l1_size)?;
        }
        let sn_tree = self.tree_clusters(&sn_l1)?;
        // The snapshot's tree gains a reference: refused before the resize below changes the
        // image if a refcount would not fit its width.
        self.with_write_state(|img, st| img.plan_increments(st, &sn_tree))
            .map_err(|e| snapshot_failed("apply", name_or_id, e))?;
        let cs = self.header.cluster_size();
        self.with_write_state(|img, st| {
            for &e in &sn_l1 {
                if let Some(off) = l2::l1_entry_target(e, cs)? {
                    st.metadata.insert(off / cs);
                }
            }
            // 1. The snapshot's tree gains a reference (on disk before the L1 points at it).
            let plan = img.plan_increments(st, &sn_tree)?;
            img.apply_increments(st, &plan)?;
            img.flush_locked(st)?;
            let old_l1 = img.l1().clone();
            let old_tree = img.tree_clusters(&old_l1)?;
            // 2. The active L1 gets the snapshot's entries (the rest of it cleared), written
            // by the flush before the old tree loses its reference.
            let mut new_l1: Vec<u64> = sn_l1.iter().map(|e| e & !OFLAG_COPIED).collect();
            new_l1.resize(old_l1.len(), 0);
            *img.l1.write().unwrap_or_else(|e| e.into_inner()) = new_l1;
            st.l1_dirty = true;
            st.pending_free.extend(old_tree);
            img.flush_locked(st)?;
            // 3. COPIED where the active tree is now the only user.
            img.recompute_copied(st)?;
            img.flush_locked(st)
        })
    }

    /// Moves the active L1 table to new clusters with `entries` entries (the virtual size
    /// stays), switching the header's L1 size and offset in one write.
    fn grow_active_l1(&mut self, entries: u32) -> Result<()> {
        let bytes = u64::from(entries) * 8;
        let old = (
            self.header.l1_table_offset,
            u64::from(self.header.l1_size) * 8,
        );
        let mut table = self.l1().clone();
        table.resize(entries as usize, 0);
        self.with_write_state(|img, st| {
            let off = img.alloc_run(st, bytes)?;
            img.flush_locked(st)?;
            let mut raw = vec![0u8; bytes as usize];
            for (i, e) in table.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *e);
            }
            img.write_synced(&raw, off, "the L1 table")?;
            let mut f = [0u8; 12];
            BigEndian::write_u32(&mut f[..4], entries);
            BigEndian::write_u64(
                &mut f[(fields::L1_TABLE_OFFSET - fields::L1_SIZE) as usize..],
                off,
            );
            img.write_synced(&f, fields::L1_SIZE, "the header")?;
            img.header.l1_size = entries;
            img.header.l1_table_offset = off;
            *img.l1.write().unwrap_or_else(|e| e.into_inner()) = table;
            if old.0 != 0 && old.1 > 0 {
                img.release_run(st, old.0, old.1);
            }
            img.flush_locked(st)
        })
    }
}

/// qemu-img's refusal to add snapshot `name` to an image that has [`MAX_SNAPSHOTS`] already
/// ("File too large"), printed without the file name, as qemu-img prints it.
pub(crate) fn too_many_snapshots(name: &str) -> Error {
    Error::new(
        crate::error::ErrorKind::InvalidInput,
        format!("Could not create snapshot '{name}': File too large"),
    )
    .bare()
}

/// qemu-img's message for deleting a snapshot that does not exist.
/// `e` (a refused refcount increase) as qemu-img words it: "Could not create snapshot 'foo':
/// Invalid argument", printed without the file name before it, with vimg's details after
/// qemu's words. Other errors pass unchanged.
fn snapshot_failed(verb: &str, name: &str, e: Error) -> Error {
    if e.kind() != crate::error::ErrorKind::InvalidInput {
        return e;
    }
    Error::new(
        e.kind(),
        format!("Could not {verb} snapshot '{name}': {}", e.what()),
    )
    .bare()
}

fn not_found_delete(name: &str) -> Error {
    Error::new(
        crate::error::ErrorKind::InvalidInput,
        format!("Could not delete snapshot '{name}': snapshot not found"),
    )
}

impl Qcow2Image {
    /// Completes the extra data of version 3 snapshot table entries that have less than the
    /// 16 bytes qcow2.rst requires (the 64-bit VM state size and the disk size; qemu's check
    /// calls such entries incomplete): each gets the 24 bytes qemu writes, with the disk size
    /// of the image and no instruction count, and the table is rewritten. For `check -r all`,
    /// on an image opened with [`Qcow2Image::open_for_repair`]. Returns the indexes of the
    /// entries completed.
    pub fn complete_snapshot_entries(&mut self) -> Result<Vec<u32>> {
        // A table a repair holds in memory is written, completed, at the end of the repair.
        if self.snapshot_override.is_some() {
            return Ok(Vec::new());
        }
        let mut snaps = super::table::read_table(self)?;
        let incomplete = |s: &Snapshot| s.extra.len() < 16;
        if self.header.version < 3 || !snaps.iter().any(incomplete) {
            return Ok(Vec::new());
        }
        let mut fixed = Vec::new();
        for (i, s) in snaps.iter_mut().enumerate().filter(|(_, s)| incomplete(s)) {
            let mut extra = vec![0u8; 24];
            BigEndian::write_u64(&mut extra[0..8], s.vm_state_size);
            BigEndian::write_u64(&mut extra[8..16], self.header.size);
            BigEndian::write_u64(&mut extra[16..24], u64::MAX);
            s.extra = extra;
            fixed.push(i as u32);
        }
        let size = self.header.size;
        let entries: Vec<Vec<u8>> = snaps.iter().map(|s| encode_entry(s, size)).collect();
        self.with_write_state(|img, st| img.replace_snapshot_table(st, &entries))?;
        Ok(fixed)
    }
}

/// The bytes of snapshot table entry `s` as qemu writes it (`qcow2_write_snapshots`): the
/// extra data is at least the 24 bytes qemu knows (64-bit VM state size, disk size,
/// instruction count); an entry with less gets the missing fields, as qemu fills them in when
/// it reads such an entry: the VM state size from the 32-bit field, the disk size of the image
/// (`image_size`) and no instruction count (all ones). Longer extra data is kept verbatim.
pub(in crate::qcow2) fn encode_entry(s: &Snapshot, image_size: u64) -> Vec<u8> {
    if s.extra.len() >= EXTRA_BYTES {
        return encode_verbatim(s);
    }
    let mut extra = vec![0u8; EXTRA_BYTES];
    extra[..s.extra.len()].copy_from_slice(&s.extra);
    if s.extra.len() < 8 {
        BigEndian::write_u64(&mut extra[0..8], s.vm_state_size);
    }
    if s.extra.len() < 16 {
        BigEndian::write_u64(&mut extra[8..16], image_size);
    }
    BigEndian::write_u64(&mut extra[16..24], u64::MAX);
    encode_verbatim(&Snapshot { extra, ..s.clone() })
}

/// The bytes of snapshot table entry `s` (qcow2.rst "Snapshots") with its extra data as it
/// is, padded to a multiple of 8.
pub(in crate::qcow2) fn encode_verbatim(s: &Snapshot) -> Vec<u8> {
    let mut e = vec![0u8; 40];
    BigEndian::write_u64(&mut e[0..8], s.l1_table_offset);
    BigEndian::write_u32(&mut e[8..12], s.l1_size);
    BigEndian::write_u16(&mut e[12..14], s.id.len() as u16);
    BigEndian::write_u16(&mut e[14..16], s.name.len() as u16);
    BigEndian::write_u32(&mut e[16..20], s.date_sec);
    BigEndian::write_u32(&mut e[20..24], s.date_nsec);
    BigEndian::write_u64(&mut e[24..32], s.vm_clock_nsec);
    // The 32-bit field holds the low half, as qemu writes it (the extra data has all of it).
    BigEndian::write_u32(&mut e[32..36], s.vm_state_size as u32);
    BigEndian::write_u32(&mut e[36..40], s.extra.len() as u32);
    e.extend_from_slice(&s.extra);
    e.extend_from_slice(s.id.as_bytes());
    e.extend_from_slice(s.name.as_bytes());
    e.resize(e.len().div_ceil(8) * 8, 0);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_padded_and_keep_their_fields() {
        let s = Snapshot {
            entry_offset: 0,
            l1_table_offset: 0x30000,
            l1_size: 3,
            id: "12".into(),
            name: "abc".into(),
            date_sec: 7,
            date_nsec: 8,
            vm_clock_nsec: 9,
            vm_state_size: 0x1_0000_0005,
            disk_size: None,
            icount: None,
            extra: vec![0xaa; 24],
        };
        let e = encode_entry(&s, 1 << 20);
        assert_eq!(e.len(), 40 + 24 + 8); // 69 bytes padded to 72
        assert_eq!(BigEndian::read_u64(&e[0..8]), 0x30000);
        assert_eq!(BigEndian::read_u32(&e[8..12]), 3);
        assert_eq!(BigEndian::read_u16(&e[12..14]), 2);
        assert_eq!(BigEndian::read_u16(&e[14..16]), 3);
        assert_eq!(BigEndian::read_u32(&e[32..36]), 5);
        assert_eq!(BigEndian::read_u32(&e[36..40]), 24);
        assert_eq!(&e[64..69], b"12abc");
        assert!(e[69..].iter().all(|&b| b == 0));
    }

    #[test]
    fn next_id_is_one_more_than_the_largest_number() {
        let mk = |id: &str| Snapshot::named(id, "");
        assert_eq!(Qcow2Image::next_snapshot_id(&[]), "1");
        let snaps = [mk("2"), mk("x9"), mk("10"), mk("3")];
        assert_eq!(Qcow2Image::next_snapshot_id(&snaps), "11");
    }
}
