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
//! refcounts are on disk. A refcount whose refcount block does not exist is not fixed (that
//! needs a rebuild of the refcount structures, which is not supported): it stays a corruption.
//!
//! Images with the dirty bit (lazy refcounts not written back) are repaired the same way: with
//! `All`, every refcount is brought to its computed value. When the final check finds neither
//! corruptions nor check errors, the dirty and corrupt bits are cleared.
//!
//! The report is that of the check after the repair, with `corruptions_fixed` and `leaks_fixed`
//! counting what was repaired: one per refcount set and one per COPIED flag changed.

use super::header::incompat;
use super::l2::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::refcount::{RefcountTable, Strictness};
use super::write::WriteState;
use super::Qcow2Image;
use crate::check::{Check, CheckReport};
use crate::error::{Error, Result, ResultExt};
use crate::open::ChainGuard;
use crate::storage::FileStorage;
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
    /// the header is left as it is (autoclear bits included).
    pub fn open_for_repair(path: &Path) -> Result<Self> {
        let storage = FileStorage::open(path, true)
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
        let mut img = Self::open_inner(
            Box::new(storage),
            path,
            false,
            true,
            &mut ChainGuard::default(),
        )
        .in_file(path)?;
        img.writable = true;
        img.write = Some(Mutex::new(WriteState::new(&img).in_file(path)?));
        Ok(img)
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
pub fn repair(img: &Qcow2Image, mode: RepairMode) -> Result<CheckReport> {
    let mut leaks_fixed = 0u64;
    let mut corruptions_fixed = 0u64;
    let cb = img.header.cluster_bits;
    let mut report = img.check()?;
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
        for m in report.messages.iter().filter_map(|l| parse_mismatch(l)) {
            if m.stored < m.computed && mode == RepairMode::All && has_block(m.cluster) {
                ups.push(m);
            } else if m.stored > m.computed {
                downs.push(m);
            }
        }
        if ups.is_empty() && downs.is_empty() {
            break;
        }
        let mut st = img.write_state()?;
        // Increases first, on disk before any decrease.
        for m in &ups {
            if img.refcount_of(&st, m.cluster)? == m.stored {
                img.set_refcount_of(&mut st, m.cluster, m.computed)?;
                corruptions_fixed += 1;
            }
        }
        img.flush_locked(&mut st)?;
        for m in &downs {
            if img.refcount_of(&st, m.cluster)? == m.stored {
                img.set_refcount_of(&mut st, m.cluster, m.computed)?;
                leaks_fixed += 1;
            }
        }
        img.flush_locked(&mut st)?;
        drop(st);
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
    if mode == RepairMode::All || copied_only() {
        let n = fix_copied(img, cb)?;
        if n > 0 {
            corruptions_fixed += n;
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
            .write_at(&b, 72)
            .map_err(|e| Error::io("cannot write header", e).at(72))?;
        img.sync()?;
    }
    report.leaks_fixed = leaks_fixed;
    report.corruptions_fixed = corruptions_fixed;
    Ok(report)
}

/// Sets the COPIED flag of every active L1 and L2 entry exactly when the refcount of the
/// cluster it points to is 1; returns how many entries changed.
fn fix_copied(img: &Qcow2Image, cb: u32) -> Result<u64> {
    let h = &img.header;
    let cs = h.cluster_size();
    let file_len = img.file_len();
    let step = if h.extended_l2() { 2 } else { 1 };
    let mut fixed = 0;
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
                fixed += 1;
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
            fixed += 1;
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
