//! qcow2's optional capabilities ([`crate::capability`]): internal snapshots, resizing,
//! amending options, changing the backing file, compressed writes and emptying, each a thin
//! adapter over the module that does the work (`snapshot/write`, `write/resize`, `edit/amend`,
//! `edit/backing`, `write/path` and `format/compress`, `edit/empty`).

use super::edit::amend::AmendOptions;
use super::snapshot::write::NewSnapshot;
use super::Qcow2Image;
use crate::capability::{
    Amend, AmendSummary, CompressedWrites, MakeEmpty, Resize, SetBacking, SnapshotTime, Snapshots,
};
use crate::error::{Error, Result};
use crate::info::SnapshotInfo;
use crate::offsets::GuestOffset;
use crate::prealloc::Preallocation;

impl Snapshots for Qcow2Image {
    fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let table = super::snapshot::table::read_table(self)?;
        Ok(table.iter().map(|s| s.info()).collect())
    }

    fn refuse_create(&self, name: &str) -> Result<()> {
        if self.snapshot_table_full() {
            return Err(super::snapshot::write::too_many_snapshots(name));
        }
        Ok(())
    }

    fn create_snapshot(&mut self, name: &str, at: SnapshotTime) -> Result<()> {
        self.snapshot_create(
            name,
            NewSnapshot {
                date_sec: at.date_sec,
                date_nsec: at.date_nsec,
            },
        )
    }

    fn apply_snapshot(&mut self, name_or_id: &str) -> Result<()> {
        self.snapshot_apply(name_or_id)
    }

    fn delete_snapshot(&mut self, name_or_id: &str) -> Result<()> {
        self.snapshot_delete(name_or_id)
    }
}

impl Resize for Qcow2Image {
    fn resize_base(&self) -> Result<u64> {
        Ok(self.header().size)
    }

    fn check_resize(&self, new_size: u64, _prealloc: Preallocation) -> Result<()> {
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid_input(format!(
                "the new size {new_size} is not a multiple of 512 bytes, which qcow2 needs"
            )));
        }
        Ok(())
    }

    fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.resize_with(new_size, prealloc)
    }
}

impl Amend for Qcow2Image {
    fn check_amend(&self, options: &[String]) -> Result<AmendSummary> {
        let plan = self.plan_amend(&AmendOptions::parse_all(options)?)?;
        Ok(AmendSummary {
            is_empty: plan.is_empty(),
            grows: plan.size.is_some_and(|s| s > self.header().size),
        })
    }

    fn amend(&mut self, options: &[String], progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let opts = AmendOptions::parse_all(options)?;
        Qcow2Image::amend(self, &opts, progress)
    }
}

impl SetBacking for Qcow2Image {
    fn set_backing_file(&mut self, file: Option<&str>, format: Option<&str>) -> Result<()> {
        Qcow2Image::set_backing_file(self, file, format)
    }
}

impl CompressedWrites for Qcow2Image {
    fn compression_unit(&self) -> u64 {
        self.header().cluster_size()
    }

    /// An encrypted image stores no compressed clusters: the data is written encrypted and
    /// uncompressed instead (a `convert -c -n` into an encrypted image).
    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        if self.is_encrypted() {
            return Ok(None);
        }
        super::format::compress::compress_cluster(self.header().compression_type, data)
    }

    fn write_compressed(&self, offset: GuestOffset, compressed: &[u8]) -> Result<()> {
        Qcow2Image::write_compressed(self, offset.0, compressed)
    }

    /// Rounds the length of the file compressed clusters were appended to up to whole 512-byte
    /// sectors, as qemu-img's convert does when it ends a compressed copy.
    fn finish_compressed(&self) -> Result<()> {
        let st = self.storage();
        let len = st
            .len()
            .map_err(|e| Error::io("cannot get the output's length", e))?;
        if len % 512 != 0 {
            st.set_len(len.next_multiple_of(512))
                .map_err(|e| Error::io("cannot extend the output to whole sectors", e))?;
        }
        Ok(())
    }
}

impl MakeEmpty for Qcow2Image {
    fn make_empty(&mut self) -> Result<()> {
        Qcow2Image::make_empty(self)
    }
}
