//! Downgrading a version 3 image to version 2 (`amend -o compat=0.10`): version 2 has no zero
//! flag in L2 entries (qcow2.rst "Cluster mapping", bit 0), so every zero cluster is expanded,
//! in the active tree and in every snapshot's, before the header becomes a version 2 header.
//!
//! An L2 entry with the zero flag becomes, as in qemu-img:
//!
//! - without a backing file and without a host cluster: unallocated (which reads as zeros);
//! - with a host cluster (preallocated): that cluster, zeroed on the host;
//! - with a backing file and without a host cluster: a new cluster, zeroed.
//!
//! Where an L2 table is shared by several L1 tables (snapshots), a new cluster gets the table's
//! refcount. A preallocated cluster that other tables also reference (qemu makes these when a
//! zero write without unmap hits a cluster shared with a snapshot) may hold data another table
//! reads: it is not zeroed in place but released by this table, which gets a new zeroed cluster
//! or none. (qemu-img 10.0.2 zeroes such a cluster in place, which erases the snapshot's data,
//! and sets the COPIED flag from the table's refcount, which `qemu-img check` reports.)
//!
//! # Crash safety
//!
//! A new cluster's refcount and its zeros reach the disk before the L2 entry that points at it
//! (the write path's flush order); a preallocated cluster is zeroed before its entry loses the
//! zero flag; released references drop only after the tables no longer point there. Until the
//! final header write, the image is a valid version 3 image with some zero clusters expanded;
//! an interruption leaves at worst leaked clusters.

use super::amend::{set_version_2, Progress};
use crate::error::{Error, Result};
use crate::qcow2::format::l2::{self, Descriptor, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::qcow2::snapshot::table::read_table;
use crate::qcow2::write::path::WriteState;
use crate::qcow2::Qcow2Image;
use std::collections::HashSet;

impl Qcow2Image {
    /// Calls `f` once for each L2 table reachable from the active L1 table or a snapshot's
    /// (tables shared between them once), with its host offset; `f` also learns how far the
    /// walk is, as (L1 tables done, L1 tables in all).
    fn for_each_l2_table(&self, mut f: impl FnMut(u64, (u64, u64)) -> Result<()>) -> Result<()> {
        let cs = self.header.cluster_size();
        let snaps = read_table(self)?;
        let total = snaps.len() as u64 + 1;
        let mut seen = HashSet::new();
        for n in 0..total {
            let l1 = match n {
                0 => self.l1().clone(),
                _ => self.snapshot_l1(&snaps[n as usize - 1])?,
            };
            for &e in &l1 {
                if let Some(off) = l2::l1_entry_target(e, cs)? {
                    if seen.insert(off) {
                        f(off, (n, total))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether any L2 table, of the active tree or a snapshot's, has a compressed cluster.
    pub(in crate::qcow2) fn has_compressed_clusters(&self) -> Result<bool> {
        let words = if self.header.extended_l2() { 2 } else { 1 };
        let mut found = false;
        self.for_each_l2_table(|off, _| {
            let t = self.l2_table(off)?;
            found |= t.iter().step_by(words).any(|e| e & OFLAG_COMPRESSED != 0);
            Ok(())
        })?;
        Ok(found)
    }

    /// Expands every zero cluster (see the module documentation), then rewrites the header as
    /// version 2. The image must be settled and its downgrade checked
    /// ([`Qcow2Image::plan_amend`]).
    pub(in crate::qcow2) fn downgrade_to_v2(&mut self, progress: &mut Progress<'_>) -> Result<()> {
        if self.header.extended_l2() {
            return Err(Error::unsupported(
                "extended L2 entries cannot be expanded for version 2",
            ));
        }
        // qemu refuses (in its words) a snapshot L1 table it cannot load; vimg before writing.
        for s in read_table(self)? {
            if let Some((what, why)) = s.qemu_l1_problem(self.header.cluster_size()) {
                let brk = crate::error::REPORT_BREAK;
                return Err(Error::corrupt(format!(
                    "{what}{brk}Failed to turn zero into data clusters: {why}"
                ))
                .bare());
            }
        }
        let backed = self.header.backing_file.is_some();
        // Progress counts L1 entries, of the active table and then of each snapshot's, as
        // qemu's expansion does; an L2 table shared between them is expanded once.
        let cs = self.header.cluster_size();
        let snaps = read_table(self)?;
        let entries =
            self.l1().len() as u64 + snaps.iter().map(|s| u64::from(s.l1_size)).sum::<u64>();
        let mut visited = 0;
        let mut seen = HashSet::new();
        for n in 0..=snaps.len() {
            let l1 = match n {
                0 => self.l1().clone(),
                _ => self.snapshot_l1(&snaps[n - 1])?,
            };
            for (i, &e) in l1.iter().enumerate() {
                if let Some(off) = l2::l1_entry_target(e, cs)? {
                    if seen.insert(off) {
                        let mut st = self.write_state()?;
                        let guest = (i as u64) << self.header.l1_shift();
                        self.expand_zeros_in(&mut st, off, guest, backed)?;
                        self.flush_if_full(&mut st)?;
                    }
                }
                visited += 1;
                progress.within(visited, entries);
            }
        }
        self.settle()?;
        let mut h = self.disk_header()?;
        set_version_2(&mut h);
        self.rewrite_header(h)
    }

    /// Expands the zero clusters of the L2 table at `l2_off`, which maps the guest range from
    /// `guest` (in memory; written at the next flush, after the clusters it now points at were
    /// zeroed).
    fn expand_zeros_in(
        &self,
        st: &mut WriteState,
        l2_off: u64,
        guest: u64,
        backed: bool,
    ) -> Result<()> {
        let cs = self.header.cluster_size();
        let table = self.l2_table(l2_off)?;
        if !table.iter().any(|e| e & l2::OFLAG_ZERO != 0) {
            return Ok(());
        }
        let table_refs = self.refcount_of(st, l2_off / cs)?;
        if table_refs == 0 {
            return Err(Error::corrupt(format!(
                "L2 table at {l2_off:#x} is in use but its refcount is 0 (repair the image with check -r all)"
            ))
            .at(l2_off));
        }
        let mut t = table.to_vec();
        for (i, entry) in t.iter_mut().enumerate() {
            let Descriptor::Zero(host) = l2::decode_descriptor(*entry, &self.header)
                .map_err(|e| e.at(l2_off + i as u64 * 8))?
            else {
                continue;
            };
            // The one cluster this entry keeps, if any, and its refcount.
            let kept = match host {
                Some(x) => {
                    let refs = self.refcount_of(st, x / cs)?;
                    if refs < table_refs {
                        return Err(Error::corrupt(format!(
                            "cluster at {x:#x} has refcount {refs} but its L2 table is referenced {table_refs} times"
                        ))
                        .at(x));
                    }
                    if st.metadata.contains(&(x / cs)) {
                        return Err(Error::corrupt(format!(
                            "preallocated zero cluster at {x:#x} overlaps metadata"
                        ))
                        .at(x));
                    }
                    if refs == table_refs {
                        Some((x, refs))
                    } else {
                        // Other tables reference it (maybe as data): only let go of it here.
                        for _ in 0..table_refs {
                            st.pending_free.push(x / cs);
                        }
                        None
                    }
                }
                None => None,
            };
            let (cluster, refs) = match kept {
                Some(k) => k,
                None if !backed => {
                    *entry = 0;
                    continue;
                }
                None => {
                    let c = self.find_free(st, 1, true)?;
                    self.set_refcount_of(st, c, table_refs)?;
                    self.note_end(c + 1);
                    (c * cs, table_refs)
                }
            };
            self.zero_host_cluster(cluster, guest + ((i as u64) << self.header.cluster_bits))?;
            *entry = (cluster & L2E_OFFSET_MASK) | if refs == 1 { OFLAG_COPIED } else { 0 };
        }
        self.l2_cache.put_dirty(l2_off, t.into());
        Ok(())
    }

    /// Makes the host cluster at `off` read as zeros: a hole punched (or zeros written) inside
    /// the file, the file extended over it past its end. In an encrypted image, where the data
    /// cluster now holds the guest cluster at `guest`, zeros encrypted for it are written
    /// instead (qemu writes plain zeros there, which then decrypt to garbage).
    fn zero_host_cluster(&self, off: u64, guest: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        if let Some(c) = &self.crypt {
            let mut zeros = vec![0u8; cs as usize];
            c.encrypt(guest, off, &mut zeros)?;
            return self
                .storage
                .write_at(&zeros, off)
                .map_err(|e| Error::io("cannot zero a cluster", e).at(off));
        }
        let len = self
            .storage
            .len()
            .map_err(|e| Error::io("cannot get file size", e))?;
        let r = if off + cs > len {
            if off < len {
                self.storage.zero_range(off, len - off)
            } else {
                Ok(())
            }
            .and_then(|_| self.storage.set_len(off + cs))
        } else {
            self.storage.zero_range(off, cs)
        };
        r.map_err(|e| Error::io("cannot zero a cluster", e).at(off))
    }
}
