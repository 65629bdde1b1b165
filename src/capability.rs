//! What only some formats can do, as small traits a caller reaches from a
//! [`BlockImage`](crate::BlockImage) by asking (`as_snapshots`, `as_resize`, ...), as it asks
//! for [`Check`](crate::check::Check) and
//! [`PersistentBitmaps`](crate::bitmap::PersistentBitmaps). A command holds a
//! `Box<dyn BlockImage>` and never the type of a driver: a format that lacks a capability
//! answers `None`, and the command refuses with qemu-img's words for that.
//!
//! The traits follow qemu's block layer, where each is an optional driver callback
//! (`bdrv_snapshot_create`, `bdrv_co_truncate`, `bdrv_amend_options`,
//! `bdrv_change_backing_file`, `bdrv_co_pwritev_compressed`, `bdrv_make_empty`).

use crate::error::Result;
use crate::info::SnapshotInfo;
use crate::offsets::GuestOffset;
use crate::prealloc::Preallocation;

/// When a new internal snapshot is taken, as recorded in its table entry (qcow2.rst "Snapshot
/// table": date seconds and nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotTime {
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds past `date_sec`.
    pub date_nsec: u32,
}

impl SnapshotTime {
    /// The current time as qemu-img records it (microsecond resolution).
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        SnapshotTime {
            date_sec: d.as_secs() as u32,
            date_nsec: d.subsec_micros() * 1000,
        }
    }
}

/// Internal snapshots (`vimg snapshot`).
pub trait Snapshots {
    /// The snapshots, in the order of the image's table.
    fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>>;
    /// Refuses, without changing anything, a new snapshot named `name` the image has no room
    /// for (qemu's words); an image open read-only may be asked. The default refuses nothing.
    fn refuse_create(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }
    /// Takes a snapshot of the current disk named `name`.
    fn create_snapshot(&mut self, name: &str, at: SnapshotTime) -> Result<()>;
    /// Makes the snapshot named (or numbered) `name_or_id` the current disk.
    fn apply_snapshot(&mut self, name_or_id: &str) -> Result<()>;
    /// Deletes the snapshot named (or numbered) `name_or_id`.
    fn delete_snapshot(&mut self, name_or_id: &str) -> Result<()>;
}

/// Changing the virtual size (`vimg resize`, and a commit into a smaller base).
pub trait Resize {
    /// The size a relative resize (`+SIZE`, `-SIZE`) starts from.
    fn resize_base(&self) -> Result<u64>;
    /// Refuses, before anything changes, a new size or preallocation mode the format cannot
    /// take (qemu-img's words).
    fn check_resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()>;
    /// Sets the virtual size to `new_size`, allocating the grown part as `prealloc` says.
    /// Shrinking drops the data past the new end; the caller decides whether that is allowed.
    fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<()>;
}

/// Changing format options in place (`vimg amend -o ...`).
pub trait Amend {
    /// Checks `options` (the `-o` arguments, each a comma-separated list) against the image
    /// without changing anything: refused options fail here, with qemu-img's words. Says
    /// what the amend will do.
    fn check_amend(&self, options: &[String]) -> Result<AmendSummary>;
    /// Applies `options`, reporting progress as (done, total).
    fn amend(&mut self, options: &[String], progress: &mut dyn FnMut(u64, u64)) -> Result<()>;
}

/// What a checked amend will do, as far as the command needs to know before it opens the
/// image for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmendSummary {
    /// Nothing changes.
    pub is_empty: bool,
    /// The virtual size grows, so the backing chain must be open (a longer backing file must
    /// not show through).
    pub grows: bool,
}

/// Recording another backing file (`vimg rebase`): only the name and format in the image's
/// metadata change; the data a rebase copies goes through ordinary writes.
pub trait SetBacking {
    /// Records `file` (`None`: no backing file) with `format` as the image's backing file.
    fn set_backing_file(&mut self, file: Option<&str>, format: Option<&str>) -> Result<()>;
}

/// Storing whole clusters compressed (`convert -c`, `rebase -c`, backups restored
/// compressed).
pub trait CompressedWrites: Sync {
    /// The unit of compression: a compressed write covers exactly one aligned cluster.
    fn compression_unit(&self) -> u64;
    /// Compresses one cluster of guest data (`data.len()` is the unit, or less at the end of
    /// the disk) with the image's compression type. `None`: it does not get smaller, so it is
    /// better written plainly.
    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Stores `compressed` (from [`CompressedWrites::compress`]) as the cluster at `offset`
    /// (aligned to the unit), which must not be allocated yet.
    fn write_compressed(&self, offset: GuestOffset, compressed: &[u8]) -> Result<()>;
    /// Ends a run of compressed writes as qemu-img does (the file's length rounded up to whole
    /// sectors).
    fn finish_compressed(&self) -> Result<()>;
}

/// Dropping everything the image itself holds, so that it reads as its backing file (a
/// commit's last step).
pub trait MakeEmpty {
    /// Unmaps every guest cluster of the active disk, keeping snapshots.
    fn make_empty(&mut self) -> Result<()>;
}
