//! Repairing refcounts and COPIED flags (`vimg check -r leaks|all`).
//!
//! A repair starts from the read-only check ([`Check::check`]): its messages name every host
//! cluster whose stored refcount differs from the number of references the check counted
//! (`ERROR cluster N refcount=A reference=B`, `Leaked cluster N refcount=A reference=B`).
//!
//! - [`RepairMode::Leaks`] sets the stored refcount of every leaked cluster (A > B) to B and
//!   changes nothing else.
//! - [`RepairMode::All`] also raises every refcount that is too low (A < B) to B, then sets the
//!   COPIED flag (bit 63) of every active L1 and L2 entry exactly when the refcount of the
//!   cluster it points to is 1 (qcow2.rst "Cluster mapping").
//! - With `Leaks`, COPIED flags are fixed too, but only when, after the leaks are fixed, the
//!   check finds nothing else wrong (so the refcounts they are set from can be trusted), as
//!   `qemu-img check -r leaks` does.
//!
//! Refcount changes go through the write path's refcount cache and its crash-safe flush: all
//! increases are written and synced before any decrease, so a crash in between leaves leaks at
//! worst, never a cluster in use with too low a refcount. COPIED flags are fixed after the
//! refcounts are on disk.
//!
//! With `All`, damage that per-cluster fixes cannot repair (a cluster in use with refcount 0,
//! e.g. because its refcount block is missing; a refcount block overlapping other metadata;
//! an unreadable refcount table) makes `rebuild_refcounts` write complete new refcount
//! structures after the end of the file and switch the header to them, as qemu's
//! `rebuild_refcount_structure` does; with `Leaks` such damage stays a corruption.
//!
//! Images with the dirty bit (lazy refcounts not written back) are repaired the same way: with
//! `All`, every refcount is brought to its computed value. When the final check finds neither
//! corruptions nor check errors, the dirty and corrupt bits are cleared.
//!
//! The report is that of the check after the repair, with `corruptions_fixed` and `leaks_fixed`
//! counting what was repaired: one per refcount set and one per COPIED flag changed.

use super::consistency::References;
use crate::check::{Check, CheckReport};
use crate::error::{Error, Result, ResultExt};
use crate::lock::LockRequest;
use crate::open::{ChainGuard, Sharing};
use crate::opener::Opener;
use crate::qcow2::format::header::{fields, incompat, QCOW2_MAGIC};
use crate::qcow2::format::l2::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use crate::qcow2::refcount::table::{RefcountTable, Strictness};
use crate::qcow2::write::path::WriteState;
use crate::qcow2::{DataFile, Qcow2Image};
use crate::storage::Storage;
use byteorder::{BigEndian, ByteOrder};
use std::path::Path;
use std::sync::Mutex;

/// What a repair may change, as `qemu-img check -r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only lower the refcounts of leaked clusters.
    Leaks,
    /// Fix leaks, too-low refcounts and COPIED flags.
    All,
}

/// Most check-and-fix rounds; more than one is needed only when a check's message list was
/// capped.
const MAX_ROUNDS: usize = 64;

impl Qcow2Image {
    /// Opens the qcow2 image at `path` read-write for [`repair`], without its backing chain.
    /// Unlike a normal read-write open, images with the corrupt or dirty bit are accepted and
    /// the header is left as it is, but for the autoclear bits vimg does not know, which are
    /// cleared as qemu's read-write open clears them.
    ///
    /// A refcount table that lies (partly) past the end of the file is read as zeros, as qemu
    /// reads it, so that the repair can rebuild it: such an image is opened through a view of
    /// the file that pretends it is long enough (writes still go to the file).
    pub fn open_for_repair(path: &Path, opener: &Opener) -> Result<Self> {
        let storage = opener
            .open(path, true, LockRequest::exclusive(true))
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
        Self::open_storage_for_repair(storage, path, &DataFile::Named, opener)
    }

    /// [`Qcow2Image::open_for_repair`] on an image held in `storage` (`path` names it in
    /// messages and, with [`DataFile::Named`], anchors the data file's name). In-memory images
    /// are repaired this way by the fuzz targets, with [`DataFile::Given`] so that no host file
    /// is opened.
    pub(crate) fn open_storage_for_repair(
        storage: Box<dyn Storage>,
        path: &Path,
        data: &DataFile,
        opener: &Opener,
    ) -> Result<Self> {
        let open = |storage: Box<dyn Storage>| {
            let mut guard = ChainGuard::with_opener(Sharing::Normal, opener.clone());
            Self::open_inner(storage, path, false, true, &mut guard, data).in_file(path)
        };
        // A second handle, in case the first open fails and a padded view is needed.
        let spare = storage.duplicate();
        let mut img = match open(storage) {
            Ok(img) => img,
            Err(e) => {
                let Some(storage) = spare else {
                    return Err(e);
                };
                match reftable_end_past_eof(storage.as_ref()) {
                    Some(end) => open(Box::new(PaddedStorage {
                        inner: storage,
                        min_len: end,
                    }))?,
                    None => return Err(e),
                }
            }
        };
        img.writable = true;
        // qemu's read-write open (the one `check -r` makes) drops unknown autoclear bits.
        img.clear_unknown_autoclear().in_file(path)?;
        // A refcount table that cannot be read leaves the image without a write state: only
        // a rebuild of the refcount structures ([`repair`] with `All`) can fix it.
        img.write = WriteState::new(&img).ok().map(Mutex::new);
        Ok(img)
    }

    /// Opens the image again for repair through another handle on its storage (the same open
    /// file, so its image locks do not get in the way).
    fn reopen_for_repair(&self) -> Result<Self> {
        let storage = self.storage.duplicate().ok_or_else(|| {
            Error::unsupported("the image's storage cannot be reopened").with_path(&self.path)
        })?;
        let data = match &self.data_file {
            Some((d, _)) => DataFile::Given(d.duplicate()),
            None => DataFile::Named,
        };
        // Nothing is opened by name: the data file, if any, is the one this image holds. An
        // encrypted image keeps its cipher (the fresh opener has no key for it: it opens it as
        // for metadata only, and the cipher is handed over).
        let opener = Opener::new();
        opener.set_metadata_only(self.is_encrypted());
        let mut img = Self::open_storage_for_repair(storage, &self.path, &data, &opener)?;
        img.crypt = self.crypt.clone();
        if self.snapshot_override.is_some() {
            // The write state is made again with the table the repair holds.
            img.snapshot_override = self.snapshot_override.clone();
            img.write = WriteState::new(&img).ok().map(Mutex::new);
        }
        Ok(img)
    }
}

/// How far past the end of the file a refcount table may start and still be read as zeros
/// for a repair: further out, the offset is taken for garbage (a rebuild would otherwise place
/// the new structures that far out, growing the file to match).
const MAX_REFTABLE_GAP: u64 = 64 << 20;

/// The end of the refcount table named by the header of `storage`, when it lies past the
/// end of the file but is otherwise plausible (aligned, at most 8 MiB, starting at most
/// [`MAX_REFTABLE_GAP`] past the end).
fn reftable_end_past_eof(storage: &dyn Storage) -> Option<u64> {
    let mut h = [0u8; (fields::REFCOUNT_TABLE_CLUSTERS + 4) as usize];
    storage.read_at(&mut h, 0).ok()?;
    let bits = fields::be32(&h, fields::CLUSTER_BITS);
    if !(9..=21).contains(&bits) {
        return None;
    }
    let off = fields::be64(&h, fields::REFCOUNT_TABLE_OFFSET);
    let bytes = u64::from(fields::be32(&h, fields::REFCOUNT_TABLE_CLUSTERS)) << bits;
    let end = off.checked_add(bytes)?;
    let len = storage.len().ok()?;
    (off.is_multiple_of(1 << bits)
        && bytes > 0
        && bytes <= crate::qcow2::format::header::MAX_REFTABLE_BYTES
        && end > len
        && off <= len.saturating_add(MAX_REFTABLE_GAP))
    .then_some(end)
}

/// A file that reads as at least `min_len` bytes long (zeros past its real end); everything
/// else goes to the file.
struct PaddedStorage {
    inner: Box<dyn Storage>,
    min_len: u64,
}

impl Storage for PaddedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.inner.len()?.max(self.min_len))
    }
    fn stored_len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.zero_range(offset, len)
    }
    fn extent_at(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        self.inner.extent_at(offset)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn duplicate(&self) -> Option<Box<dyn Storage>> {
        // The reopened image decides again whether it needs the padding.
        self.inner.duplicate()
    }
}

/// One refcount mismatch reported by the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mismatch {
    cluster: u64,
    stored: u64,
    computed: u64,
}

/// Parses `ERROR cluster N refcount=A reference=B` and `Leaked cluster N refcount=A
/// reference=B`.
fn parse_mismatch(line: &str) -> Option<Mismatch> {
    let rest = line
        .strip_prefix("ERROR cluster ")
        .or_else(|| line.strip_prefix("Leaked cluster "))?;
    let mut it = rest.split(' ');
    let cluster = it.next()?.parse().ok()?;
    let stored = it.next()?.strip_prefix("refcount=")?.parse().ok()?;
    let computed = it.next()?.strip_prefix("reference=")?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(Mismatch {
        cluster,
        stored,
        computed,
    })
}

/// Repairs `img` (opened with [`Qcow2Image::open_for_repair`]) as `qemu-img check -r` does
/// with `mode`; returns the check of the repaired image with the fixed counts filled in.
///
/// With `All`, damage that per-cluster fixes cannot repair (see `needs_rebuild`) makes the
/// refcount structures be rebuilt from scratch (`rebuild_refcounts`); the image is then
/// reopened and repaired as usual (the old structures' clusters are leaks by then, fixed
/// quietly). As with qemu, the fixed counts are then the corruptions and leaks the first check
/// found minus those left at the end, and the report's messages are the first check's,
/// followed by `Rebuilding refcount structure`.
pub fn repair(img: &Qcow2Image, mode: RepairMode) -> Result<CheckReport> {
    // A snapshot table qemu's check repairs as it reads it (too much extra data, too big):
    // the refcounts are repaired with the table as read, then the table is written anew.
    if mode == RepairMode::All && img.snapshot_override.is_none() && img.header.nb_snapshots > 0 {
        if let Ok(t) = crate::qcow2::snapshot::table::read_table_repairing(img) {
            if !t.messages.is_empty() {
                return repair_snapshot_table(img, mode, t);
            }
        }
    }
    // Damage outside the refcount structures (overlapping tables, an unreadable snapshot
    // table) is beyond what a refcount repair or rebuild can fix: refuse before changing
    // anything.
    crate::qcow2::format::layout::MetadataMap::build(img, None)
        .map_err(|e| {
            let what = format!("cannot repair this image: {}", e.what());
            e.reworded(what)
        })
        .map(drop)
        .in_file(&img.path)?;
    if super::consistency::too_large_to_check(img) {
        return Err(Error::unsupported(
            "cannot repair this image: its file has more clusters than the check handles",
        )
        .with_path(&img.path));
    }
    if mode == RepairMode::All {
        // Incomplete snapshot table entries first, as qemu does: the table is rewritten, then
        // the refcounts are repaired on the image as it is now.
        // Then preallocated clusters at unaligned offsets lose their offset, as qemu's check
        // repairs them while it walks the L2 tables.
        let mut fresh = img.reopen_for_repair()?;
        let completed = fresh.complete_snapshot_entries().in_file(&img.path)?;
        let mut messages: Vec<String> = completed
            .iter()
            .map(|i| format!("Repairing snapshot table entry {i} is incomplete"))
            .collect();
        if completed.is_empty() {
            messages = realign_preallocated(&fresh).in_file(&img.path)?;
        }
        if !messages.is_empty() {
            drop(fresh);
            let fresh = img.reopen_for_repair()?;
            let mut report = repair(&fresh, mode)?;
            report.corruptions_fixed += messages.len() as u64;
            messages.append(&mut report.messages);
            report.messages = messages;
            return Ok(report);
        }
        drop(fresh);
        let (before, refs) = super::consistency::check_with_references(img);
        if img.write.is_none() || needs_rebuild(&before) {
            let Some(refs) = refs else {
                // Rebuilding from references nobody counted would free everything.
                return Err(Error::corrupt(format!(
                    "cannot rebuild the refcounts: the check could not count the references ({})",
                    before.messages.first().map_or("", |m| m.as_str())
                ))
                .with_path(&img.path));
            };
            let freed = rebuild_refcounts(img, refs)?;
            let fresh = img.reopen_for_repair()?;
            if fresh.write.is_none() {
                return Err(Error::corrupt("the rebuilt refcount table cannot be read")
                    .with_path(&img.path));
            }
            let mut report = repair_in_place(&fresh, mode, Some(freed))?;
            // qemu fixes COPIED flags after the rebuild, counting only the refcount damage.
            let copied = before
                .messages
                .iter()
                .filter(|m| m.starts_with("ERROR OFLAG_COPIED "))
                .count() as u64;
            report.corruptions_fixed = before
                .corruptions
                .saturating_sub(copied)
                .saturating_sub(report.corruptions);
            report.leaks_fixed = before.leaks.saturating_sub(report.leaks);
            // qemu looks at COPIED flags only after the rebuild.
            let mut messages: Vec<String> = before
                .messages
                .into_iter()
                .filter(|m| !m.starts_with("ERROR OFLAG_COPIED "))
                .collect();
            messages.push("Rebuilding refcount structure".to_string());
            messages.append(&mut report.messages);
            report.messages = messages;
            return Ok(report);
        }
    }
    if img.write.is_none() {
        // Only a rebuild could fix this; say why, as a normal read-write open would.
        WriteState::new(img).in_file(&img.path)?;
    }
    repair_in_place(img, mode, None)
}

/// Clears the offset of every preallocated cluster whose offset is not cluster-aligned, in the
/// active L2 tables and the snapshots', as qemu's check does when repairing: such an entry
/// holds no data (a standard zero cluster, or with extended L2 entries no allocated
/// subcluster), so it becomes an unallocated one: a zero cluster without an offset, or with
/// extended L2 entries an entry without an offset that keeps its subcluster bitmap. Each
/// entry changes with one 8-byte write (either value is valid), synced at the end; the
/// cluster the bad offset pointed at is then a leak. Returns qemu's message for each entry.
fn realign_preallocated(img: &Qcow2Image) -> Result<Vec<String>> {
    let h = &img.header;
    let cs = h.cluster_size();
    let ext = h.extended_l2();
    let step = if ext { 2 } else { 1 };
    let file_len = img.file_len();
    let mut l1s = vec![img.l1().clone()];
    // Snapshots whose tables cannot be read are the check's to report.
    for s in crate::qcow2::snapshot::table::read_table(img).unwrap_or_default() {
        if let Ok(l1) = img.snapshot_l1(&s) {
            l1s.push(l1);
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut messages = Vec::new();
    for l2_off in l1s.iter().flatten().map(|e| e & L1E_OFFSET_MASK) {
        if l2_off == 0
            || !l2_off.is_multiple_of(cs)
            || l2_off.saturating_add(cs) > file_len
            || !seen.insert(l2_off)
        {
            continue;
        }
        let mut raw = vec![0u8; cs as usize];
        img.storage
            .read_at(&mut raw, l2_off)
            .map_err(|e| Error::io("cannot read an L2 table", e).at(l2_off))?;
        let words: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        for (k, pair) in words.chunks_exact(step).enumerate() {
            let entry = pair[0];
            let off = entry & L2E_OFFSET_MASK;
            if entry & OFLAG_COMPRESSED != 0 || off == 0 || off.is_multiple_of(cs) {
                continue;
            }
            let holds_data = if ext {
                pair[1] & 0xffff_ffff != 0
            } else {
                entry & OFLAG_ZERO == 0
            };
            if holds_data {
                continue;
            }
            let new = if ext { 0 } else { OFLAG_ZERO };
            let at = l2_off + (k * step * 8) as u64;
            img.storage
                .write_at(&new.to_be_bytes(), at)
                .map_err(|e| Error::io("cannot write an L2 table entry", e).at(at))?;
            messages.push(format!(
                "Repairing offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
            ));
        }
    }
    if !messages.is_empty() {
        img.sync()?;
    }
    Ok(messages)
}

/// Repairs the qcow2 image at `path` as `qemu-img check -r` does with `mode`: opens it with
/// [`Qcow2Image::open_for_repair`] and calls [`repair`]. With `All`, a header that counts more
/// snapshots than qemu's limit (65536) is first brought down to the limit in place, as qemu's
/// check does before it reads the table; the snapshots past the limit are discarded and what
/// only they referenced becomes leaks.
pub fn repair_file(path: &Path, mode: RepairMode, opener: &Opener) -> Result<CheckReport> {
    let mut messages = Vec::new();
    let mut fixed = 0;
    if mode == RepairMode::All {
        if let Some(n) = discard_excess_snapshots(path, opener).in_file(path)? {
            messages.push(format!("Discarding {n} overhanging snapshots"));
            fixed += n;
        }
    }
    let img = Qcow2Image::open_for_repair(path, opener)?;
    let mut report = repair(&img, mode)?;
    report.corruptions_fixed += fixed;
    messages.append(&mut report.messages);
    report.messages = messages;
    Ok(report)
}

/// Sets the snapshot count in the header of the qcow2 image at `path` to qemu's limit when it
/// is above it (one synced 4-byte write); returns how many snapshots that discards.
fn discard_excess_snapshots(path: &Path, opener: &Opener) -> Result<Option<u64>> {
    let storage = opener
        .open(path, true, LockRequest::exclusive(true))
        .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
    let mut h = [0u8; (fields::SNAPSHOTS_OFFSET + 8) as usize];
    if storage.read_at(&mut h, 0).is_err() || h[fields::MAGIC as usize..][..4] != QCOW2_MAGIC {
        return Ok(None); // the open that follows says what is wrong
    }
    let nb = fields::be32(&h, fields::NB_SNAPSHOTS);
    let max = crate::qcow2::snapshot::write::MAX_SNAPSHOTS;
    let table_end = fields::be64(&h, fields::SNAPSHOTS_OFFSET).saturating_add(u64::from(max) * 40);
    // A table that could not hold the snapshots kept is left to the open to refuse.
    let fits = storage.len().is_ok_and(|len| table_end <= len);
    if nb <= max || !fits {
        return Ok(None);
    }
    storage
        .write_at(&max.to_be_bytes(), fields::NB_SNAPSHOTS)
        .map_err(|e| Error::io("cannot write the header", e).at(fields::NB_SNAPSHOTS))?;
    storage
        .flush()
        .map_err(|e| Error::io("cannot sync the image", e))?;
    Ok(Some(u64::from(nb - max)))
}

/// Repairs `img` whose snapshot table
/// [`crate::qcow2::snapshot::table::read_table_repairing`] read as `t`, as qemu does: the
/// refcounts are repaired with the table as read (the discarded snapshots' clusters are leaks),
/// then the kept entries are written as a new table and the old one freed when extra data was
/// cut, or else the header's snapshot count lowered in place; then the image is checked again.
/// Before the table or count is written, the old table stays allocated, so a crash leaves it
/// readable by a repair.
fn repair_snapshot_table(
    img: &Qcow2Image,
    mode: RepairMode,
    t: crate::qcow2::snapshot::table::RepairedTable,
) -> Result<CheckReport> {
    let mut fresh = img.reopen_for_repair()?;
    fresh.snapshot_override = Some((t.entries.clone(), t.bytes));
    fresh.write = WriteState::new(&fresh).ok().map(Mutex::new);
    let mut report = repair(&fresh, mode)?;
    // The refcount structures may have been rebuilt: the table is written through a new open.
    let mut fresh = fresh.reopen_for_repair()?;
    // The report ends with the check of the image as repaired so far: that part is replaced
    // by the check after the table is written.
    let stale = fresh.check()?.messages;
    if t.extra_cut {
        let size = fresh.header.size;
        let entries: Vec<Vec<u8>> = t
            .entries
            .iter()
            .map(|s| crate::qcow2::snapshot::write::encode_entry(s, size))
            .collect();
        fresh
            .with_write_state(|i, st| i.replace_snapshot_table(st, &entries))
            .in_file(&img.path)?;
    } else {
        // Only entries at the end were discarded: the table stays where it is, shorter.
        let n = t.entries.len() as u32;
        fresh
            .storage
            .write_at(&n.to_be_bytes(), fields::NB_SNAPSHOTS)
            .map_err(|e| Error::io("cannot write the header", e).at(fields::NB_SNAPSHOTS))
            .in_file(&img.path)?;
        fresh.sync()?;
    }
    drop(fresh);
    let done = img.reopen_for_repair()?;
    let after = done.check()?;
    let mut messages = t.messages;
    let pass = if report.messages.ends_with(&stale) {
        report.messages.len() - stale.len()
    } else {
        report.messages.len()
    };
    messages.extend(report.messages.drain(..pass));
    messages.extend(after.messages.iter().cloned());
    Ok(CheckReport {
        corruptions_fixed: report.corruptions_fixed + t.fixed,
        leaks_fixed: report.leaks_fixed,
        messages,
        ..after
    })
}

/// Whether a check report shows damage that needs the refcount structures rebuilt, as qemu
/// decides: a cluster in use whose stored refcount is 0 (its refcount block may be missing),
/// a refcount block that is referenced more than once (it overlaps other metadata), not
/// cluster-aligned, outside the file or has reserved bits set, a refcount that cannot be
/// read, or a refcount table that cannot be read.
pub(crate) fn needs_rebuild(report: &CheckReport) -> bool {
    report.messages.iter().any(|m| {
        parse_mismatch(m).is_some_and(|x| x.stored == 0 && x.computed > 0)
            || (m.starts_with("ERROR refcount block ")
                && (m.contains(" is referenced ")
                    || m.contains("not cluster-aligned")
                    || m.contains("outside the image file")))
            || (m.starts_with("ERROR refcount table entry ") && m.ends_with("reserved bits set"))
            || m.starts_with("ERROR cannot get the refcount of cluster")
            || m.starts_with("ERROR cannot read the refcount table")
    })
}

/// Writes new refcount blocks and a new refcount table after the end of the file, holding the
/// references `refs` the check counted (minus those of the old refcount structures, which are
/// dropped), plus the new structures' own; then switches the header to them.
///
/// Crash safety: nothing in use is overwritten (the new clusters lie past everything the
/// image references), and the new structures are written and synced before the header's
/// refcount table offset and size change in one 12-byte write, which is synced too. A crash
/// before that leaves the old (damaged) structures in charge, and the new clusters unused.
///
/// Returns the lines qemu prints for the old structures' clusters: its rebuild counts them as
/// in use and then repairs them as leaks (`Repairing cluster N refcount=A reference=B`).
pub(crate) fn rebuild_refcounts(img: &Qcow2Image, refs: References) -> Result<Vec<String>> {
    let h = &img.header;
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let mut counts = refs;
    // Drop the old refcount structures' own references, as the check counted them.
    let mut dropped: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
    let mut drop_ref = |counts: &mut References, cluster: u64| {
        let before = counts.get(cluster);
        if before > 0 {
            counts.drop_one(cluster);
            dropped.entry(cluster).or_insert((before, before)).1 = before - 1;
        }
    };
    let old_table_bytes = u64::from(h.refcount_table_clusters) * cs;
    let file_len = img.file_len();
    let table_ok = h.refcount_table_offset.is_multiple_of(cs)
        && h.refcount_table_offset
            .checked_add(old_table_bytes)
            .is_some_and(|e| e <= file_len);
    if table_ok {
        if let Ok(table) = RefcountTable::read(img) {
            for &e in table.entries() {
                let off = e & crate::qcow2::refcount::table::REFT_OFFSET_MASK;
                if e & crate::qcow2::refcount::table::REFT_RESERVED_MASK == 0
                    && off != 0
                    && off.is_multiple_of(cs)
                    && off < file_len
                {
                    drop_ref(&mut counts, off >> cb);
                }
            }
        }
        let first = h.refcount_table_offset >> cb;
        for c in first..first + u64::from(h.refcount_table_clusters) {
            drop_ref(&mut counts, c);
        }
    }
    let max = crate::qcow2::refcount::table::max_refcount(h.refcount_order);
    if let Some((i, n)) = counts.iter().filter(|&(_, n)| n > max).min() {
        return Err(Error::unsupported(format!(
            "cluster {i} has {n} references, more than {}-bit refcounts can hold",
            h.refcount_bits()
        ))
        .with_path(&img.path));
    }

    // Place the new structures after everything: refcount blocks, then the table, sized so
    // that they cover themselves.
    let per_block = 1u64 << (cb + 3 - h.refcount_order.min(6));
    // The real end of the file (the image may see a padded view of it) and everything in use.
    let real_len = img.storage.stored_len().unwrap_or(file_len);
    let in_use = counts.iter().map(|(c, _)| c + 1).max().unwrap_or(0);
    let start = in_use.max(real_len.div_ceil(cs));
    let (mut n_blocks, mut n_table) = (0u64, 0u64);
    loop {
        let total = start + n_blocks + n_table;
        let nb = total.div_ceil(per_block);
        let nt = (nb * 8).div_ceil(cs).max(1);
        if nb == n_blocks && nt == n_table {
            break;
        }
        (n_blocks, n_table) = (nb, nt);
    }
    if n_table * cs > crate::qcow2::format::header::MAX_REFTABLE_BYTES {
        return Err(Error::unsupported(
            "the rebuilt refcount table would exceed qemu's 8 MiB limit",
        )
        .with_path(&img.path));
    }
    let end = start + n_blocks + n_table;
    // Every referenced cluster in order, then the new structures themselves (refcount 1).
    let mut refcounts: Vec<(u64, u64)> = counts.iter().collect();
    refcounts.sort_unstable();
    refcounts.extend((start..end).map(|c| (c, 1)));
    let mut next = refcounts.iter().peekable();
    // Refcount blocks, then the table.
    let mut table = vec![0u8; (n_table * cs) as usize];
    let mut block = vec![0u8; cs as usize];
    for b in 0..n_blocks {
        block.fill(0);
        let first = b * per_block;
        while let Some(&&(c, v)) = next.peek().filter(|(c, _)| *c < first + per_block) {
            crate::qcow2::refcount::table::set_refcount(&mut block, c - first, h.refcount_order, v);
            next.next();
        }
        let off = (start + b) * cs;
        img.storage
            .write_at(&block, off)
            .map_err(|e| Error::io("cannot write a refcount block", e).at(off))?;
        BigEndian::write_u64(&mut table[(b * 8) as usize..], off);
    }
    let table_off = (start + n_blocks) * cs;
    img.storage
        .write_at(&table, table_off)
        .map_err(|e| Error::io("cannot write the refcount table", e).at(table_off))?;
    img.sync()?;
    // The switch: refcount table offset and clusters in one write.
    let (f, at) = fields::reftable(table_off, n_table as u32);
    img.storage
        .write_at(&f, at)
        .map_err(|e| Error::io("cannot write the header", e).at(at))?;
    img.sync()?;
    Ok(dropped
        .into_iter()
        .map(|(c, (a, b))| format!("Repairing cluster {c} refcount={a} reference={b}"))
        .collect())
}

/// The per-cluster repair: refcounts set one by one, then COPIED flags.
///
/// The report's messages are those `qemu-img check -r` prints: what the check found
/// (mismatched refcounts as `ERROR cluster ...` or `Leaked cluster ...`), then each mismatch
/// again as it is repaired (`Repairing cluster ...`) or left (the same line), then each COPIED
/// flag changed (`Repairing OFLAG_COPIED ...`), then what the check of the repaired image
/// finds. `after_rebuild` is for the repair that follows `rebuild_refcounts`, with the lines
/// it returned: qemu then lists the mismatches only once, as it repairs them, after those
/// lines.
fn repair_in_place(
    img: &Qcow2Image,
    mode: RepairMode,
    after_rebuild: Option<Vec<String>>,
) -> Result<CheckReport> {
    let rebuilt = after_rebuild.is_some();
    let mut leaks_fixed = 0u64;
    let mut corruptions_fixed = 0u64;
    let cb = img.header.cluster_bits;
    let mut report = img.check()?;
    let first = report.messages.clone();
    let mut repaired: Vec<String> = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let capped = report
            .messages
            .last()
            .is_some_and(|m| m.starts_with("... ") && m.ends_with(" more problems not listed"));
        let table = RefcountTable::read(img)?;
        let has_block = |cluster: u64| {
            let (idx, _) = table.locate(cluster);
            matches!(table.block_offset(idx, Strictness::Lenient), Ok(Some(_)))
        };
        let mut ups = Vec::new();
        let mut downs = Vec::new();
        let mut lines = Vec::new();
        for (line, m) in report
            .messages
            .iter()
            .filter_map(|l| parse_mismatch(l).map(|m| (l, m)))
        {
            lines.push((line.clone(), m));
            if m.stored < m.computed && mode == RepairMode::All && has_block(m.cluster) {
                ups.push(m);
            } else if m.stored > m.computed {
                downs.push(m);
            }
        }
        if ups.is_empty() && downs.is_empty() {
            repaired.extend(lines.into_iter().map(|(l, _)| l));
            break;
        }
        let mut fixed = std::collections::HashSet::new();
        let mut st = img.write_state()?;
        // Increases first, on disk before any decrease.
        for m in &ups {
            if img.refcount_of(&st, m.cluster)? == m.stored {
                img.set_refcount_of(&mut st, m.cluster, m.computed)?;
                corruptions_fixed += 1;
                fixed.insert(m.cluster);
            }
        }
        img.flush_locked(&mut st)?;
        for m in &downs {
            if img.refcount_of(&st, m.cluster)? == m.stored {
                img.set_refcount_of(&mut st, m.cluster, m.computed)?;
                leaks_fixed += 1;
                fixed.insert(m.cluster);
            }
        }
        img.flush_locked(&mut st)?;
        drop(st);
        repaired.extend(lines.into_iter().map(|(l, m)| {
            if fixed.contains(&m.cluster) {
                format!(
                    "Repairing cluster {} refcount={} reference={}",
                    m.cluster, m.stored, m.computed
                )
            } else {
                l
            }
        }));
        report = img.check()?;
        if !capped {
            break;
        }
    }
    // With `Leaks`, COPIED flags are fixed only when the refcounts are now known to be right:
    // no check errors, leaks or corruptions remain other than wrong COPIED flags.
    let copied_only = || {
        let capped = report
            .messages
            .last()
            .is_some_and(|m| m.starts_with("... "));
        let copied = report
            .messages
            .iter()
            .filter(|m| m.starts_with("ERROR OFLAG_COPIED "))
            .count() as u64;
        !capped && report.check_errors == 0 && report.leaks == 0 && report.corruptions == copied
    };
    let fix_flags = mode == RepairMode::All || copied_only();
    let mut copied_msgs = Vec::new();
    if fix_flags {
        copied_msgs = fix_copied(img, cb)?;
        if !copied_msgs.is_empty() {
            corruptions_fixed += copied_msgs.len() as u64;
            report = img.check()?;
        }
    }
    let h = &img.header;
    if report.check_errors == 0
        && report.corruptions == 0
        && h.version >= 3
        && h.incompatible_features & (incompat::DIRTY | incompat::CORRUPT) != 0
    {
        let v = h.incompatible_features & !(incompat::DIRTY | incompat::CORRUPT);
        let mut b = [0u8; 8];
        BigEndian::write_u64(&mut b, v);
        img.storage
            .write_at(&b, fields::INCOMPATIBLE_FEATURES)
            .map_err(|e| Error::io("cannot write header", e).at(fields::INCOMPATIBLE_FEATURES))?;
        img.sync()?;
    }
    // What the repair pass says, in qemu's order, then the check of the repaired image.
    let mut messages: Vec<String> = first
        .into_iter()
        .filter(|m| {
            let copied = fix_flags && m.starts_with("ERROR OFLAG_COPIED ");
            let listed_later = rebuilt && parse_mismatch(m).is_some();
            !copied && !listed_later
        })
        .collect();
    messages.extend(after_rebuild.into_iter().flatten());
    messages.append(&mut repaired);
    messages.append(&mut copied_msgs);
    // qemu checks the image again only when something was repaired: otherwise that check
    // would only say again what the first one said.
    if rebuilt || leaks_fixed + corruptions_fixed > 0 {
        messages.append(&mut report.messages);
    }
    report.messages = messages;
    report.leaks_fixed = leaks_fixed;
    report.corruptions_fixed = corruptions_fixed;
    Ok(report)
}

/// Sets the COPIED flag of every active L1 and L2 entry exactly when the refcount of the
/// cluster it points to is 1; returns qemu's message for each entry changed
/// (`Repairing OFLAG_COPIED ...`).
fn fix_copied(img: &Qcow2Image, cb: u32) -> Result<Vec<String>> {
    let h = &img.header;
    let cs = h.cluster_size();
    let file_len = img.file_len();
    let step = if h.extended_l2() { 2 } else { 1 };
    let mut fixed = Vec::new();
    let mut st = img.write_state()?;
    let l1 = img.l1().clone();
    let mut l1_fixes = Vec::new();
    for (i, &l1e) in l1.iter().enumerate() {
        let l2_off = l1e & L1E_OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        let rc = img.refcount_of(&st, l2_off >> cb)?;
        if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
            l1_fixes.push((i, l1e ^ OFLAG_COPIED));
            fixed.push(format!(
                "Repairing OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
            ));
        }
        if !l2_off.is_multiple_of(cs) || l2_off + cs > file_len {
            continue;
        }
        let table = img.l2_table(l2_off)?;
        let mut t = table.to_vec();
        let mut changed = false;
        for k in (0..t.len()).step_by(step) {
            let e = t[k];
            if e & OFLAG_COMPRESSED != 0 {
                continue;
            }
            let off = e & L2E_OFFSET_MASK;
            let zero_std = e & OFLAG_ZERO != 0 && !h.extended_l2();
            let allocated = off != 0 || (!zero_std && h.has_data_file() && e & OFLAG_COPIED != 0);
            if !allocated {
                continue;
            }
            let rc = if h.has_data_file() {
                1
            } else {
                img.refcount_of(&st, off >> cb)?
            };
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                t[k] = e ^ OFLAG_COPIED;
                changed = true;
                fixed.push(format!(
                    "Repairing OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                ));
            }
        }
        if changed {
            img.l2_cache.put_dirty(l2_off, t.into());
        }
    }
    img.flush_locked(&mut st)?;
    if !l1_fixes.is_empty() {
        let mut l1w = img.l1.write().unwrap_or_else(|e| e.into_inner());
        for &(i, e) in &l1_fixes {
            let off = h.l1_table_offset + i as u64 * 8;
            img.storage
                .write_at(&e.to_be_bytes(), off)
                .map_err(|err| Error::io("cannot write L1 table", err).at(off))?;
            l1w[i] = e;
        }
        drop(l1w);
        img.sync()?;
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mismatches() {
        assert_eq!(
            parse_mismatch("ERROR cluster 5 refcount=0 reference=1"),
            Some(Mismatch {
                cluster: 5,
                stored: 0,
                computed: 1
            })
        );
        assert_eq!(
            parse_mismatch("Leaked cluster 12 refcount=3 reference=2"),
            Some(Mismatch {
                cluster: 12,
                stored: 3,
                computed: 2
            })
        );
        assert_eq!(
            parse_mismatch("ERROR cluster 5 refcount=0 reference=1 x"),
            None
        );
        assert_eq!(
            parse_mismatch("ERROR OFLAG_COPIED data cluster: l2_entry=5000 refcount=0"),
            None
        );
    }
}
