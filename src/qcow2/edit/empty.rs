//! Emptying the active state of an image (qemu-img commit's last step): every guest cluster
//! becomes unallocated, so the whole disk reads from the backing file again
//! (qcow2.rst "Cluster mapping": an L1 entry of 0 means the L2 table and all clusters it
//! describes are unallocated).
//!
//! # Crash safety
//!
//! The cleared L1 table is written and synced before any refcount drops (the write path's
//! flush order, see [`crate::qcow2::write::path`]): an interruption leaves either the old tree,
//! a partly cleared L1 table (each entry either still pointing at its old L2 table or cleared), or
//! leaked clusters. Since emptying only follows a commit whose data is durable in the backing
//! file, every one of these states reads the same.

use crate::error::{Error, Result, ResultExt};
use crate::qcow2::format::l2::{self, Descriptor};
use crate::qcow2::Qcow2Image;

impl Qcow2Image {
    /// Drops every cluster of the active L1 tree (the image must be open for writing): the
    /// whole disk then reads from the backing file, or as zeros without one. Clusters internal
    /// snapshots share keep the snapshots' references; the others are freed, their space handed
    /// back to the host file system, and the file is cut after the last cluster still in use
    /// (not with lazy refcounts, whose refcounts on disk may lag until the close).
    pub fn make_empty(&mut self) -> Result<()> {
        let path = self.path.clone();
        self.make_empty_inner().in_file(&path)
    }

    fn make_empty_inner(&mut self) -> Result<()> {
        let cs = self.header.cluster_size();
        let words = if self.header.extended_l2() { 2 } else { 1 };
        let old_l1 = self.l1().clone();
        // Every reference the active tree holds: its L2 tables and what their entries name.
        let mut tables = Vec::new();
        let mut descriptors = Vec::new();
        for &e in &old_l1 {
            let Some(off) = l2::l1_entry_target(e, cs)? else {
                continue;
            };
            tables.push(off);
            let table = self.l2_table(off)?;
            for &entry in table.iter().step_by(words) {
                let d = l2::decode_descriptor(entry, &self.header)?;
                if d != Descriptor::Unallocated {
                    descriptors.push(d);
                }
            }
        }
        let lazy = self.with_write_state(|img, st| {
            // Whatever was written before goes to disk first, in its own order.
            img.flush_locked(st)?;
            if tables.is_empty() {
                return Ok(st.lazy);
            }
            *img.l1.write().unwrap_or_else(|e| e.into_inner()) = vec![0; old_l1.len()];
            st.l1_dirty = true;
            for &off in &tables {
                st.pending_free.push(off / cs);
            }
            for &d in &descriptors {
                img.release(st, d);
            }
            // 1. the cleared L1 table (synced), 2. the refcount decrements.
            img.flush_locked(st)?;
            Ok(st.lazy)
        })?;
        if tables.is_empty() {
            return Ok(());
        }
        if !lazy {
            self.truncate_after_last_cluster()?;
        }
        self.punch_free_runs()
    }

    /// Hands the space of every free cluster inside the file back to the host file system, a
    /// run of neighbours at a time (one request per run, not per cluster). Free clusters are
    /// referenced by nothing, so this is safe at any moment.
    fn punch_free_runs(&self) -> Result<()> {
        let cs = self.header.cluster_size();
        let st = self.write_state()?;
        let end = self.file_len().div_ceil(cs);
        let mut run: Option<u64> = None;
        for c in 0..=end {
            let free = c < end && self.refcount_of(&st, c)? == 0 && !st.metadata.contains(&c);
            match (free, run) {
                (true, None) => run = Some(c),
                (false, Some(start)) => {
                    run = None;
                    self.storage
                        .punch_hole(start * cs, (c - start) * cs)
                        .map_err(|e| {
                            Error::io("cannot discard freed clusters", e).at(start * cs)
                        })?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}
