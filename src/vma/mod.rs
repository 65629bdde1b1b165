//! VMA, Proxmox VE's VM backup archive (reference notes: `vma.md`), split by concern:
//!
//! - [`format`](mod@format): the on-disk structures (main header, blob buffer, extents), declared
//!   once;
//! - [`writer`]: [`VmaWriter`], an archive writer taking 64 KiB clusters of any device in any
//!   order;
//! - [`reader`]: [`VmaReader`], a streaming reader that checks everything a reader must;
//! - [`restore`]: restoring clusters into images in archive order, and verifying;
//! - [`job`]: [`BackupJob`], a live backup of images through block status, with a hook for
//!   writers of the same images ([`BackupJob::before_write`], [`job::GuardedImage`]);
//! - [`stream`]: whole-stream zstd/gzip compression, detected by magic on reading;
//! - [`listing`]: `vma list` output;
//! - [`clusters`]: the set of clusters seen, for duplicates and completeness.
//!
//! The commands (`vimg backup ...`) are in [`crate::ops::backup`].

pub mod clusters;
pub mod format;
pub mod job;
pub mod listing;
pub mod reader;
pub mod restore;
pub mod stream;
pub mod writer;

pub use format::{ArchiveHeader, ConfigFile, DeviceInfo};
pub use job::{BackupJob, BackupStats};
pub use reader::VmaReader;
pub use writer::VmaWriter;

/// A fresh archive header: a random version-4 uuid and the current time.
pub fn new_header() -> crate::Result<ArchiveHeader> {
    let mut uuid = [0u8; 16];
    getrandom::fill(&mut uuid).map_err(|e| {
        crate::Error::io(
            "cannot get random bytes for the archive uuid",
            std::io::Error::other(e.to_string()),
        )
    })?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(ArchiveHeader::new(uuid, now))
}

/// `uuid` in its usual text form (`8-4-4-4-12` hex digits).
pub fn uuid_string(uuid: &[u8; 16]) -> String {
    let h: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Reads arbitrary bytes as an archive (header, then every extent, then completeness),
/// discarding the data: what the fuzz target and hostile-input tests run. Must never panic,
/// hang or allocate without bound, whatever `bytes` holds.
pub fn exercise(bytes: &[u8]) {
    if let Ok(mut r) = VmaReader::new(bytes) {
        let _ = listing::render_list(r.header());
        let _ = r.read_to_end();
    }
}
