//! Persistent dirty bitmaps as a capability of an image format (qcow2 version 3 has them:
//! qcow2.rst "Bitmaps extension"): the [`PersistentBitmaps`] trait that `vimg bitmap` and
//! `convert --bitmaps` work through, reached with [`crate::BlockImage::as_bitmaps`].
//!
//! A dirty bitmap records, for each `granularity`-sized chunk of the virtual disk, whether it
//! was written since the bitmap was created or cleared, while the bitmap was enabled. An
//! *inconsistent* bitmap (flagged in use on disk: a program that tracked it did not store it,
//! e.g. because it crashed) cannot be used for anything but removal.

pub mod bits;

use crate::error::{Error, ErrorKind, Result};
pub use bits::SparseBits;

/// qemu's error for a bitmap `name` that does not exist.
pub fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("Dirty bitmap '{name}' not found"),
    )
}

/// qemu's error for using a bitmap flagged in use (one line: qemu adds a hint on a second).
pub fn inconsistent(name: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "Bitmap '{name}' is inconsistent and cannot be used (it can only be removed: \
             bitmap --remove)"
        ),
    )
}

/// One persistent bitmap as the directory describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDesc {
    /// The bitmap's name, unique in the image.
    pub name: String,
    /// Bytes of the disk one bit covers (a power of two).
    pub granularity: u64,
    /// Whether writes are tracked (qcow2's `auto` flag).
    pub enabled: bool,
    /// Whether the bitmap is flagged in use: possibly inconsistent, so unusable.
    pub in_use: bool,
}

/// The contents of a dirty bitmap: bit `n` covers the disk bytes
/// `[n * granularity, (n + 1) * granularity)` (qcow2.rst "Bitmaps").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u32,
    /// Size of the disk the bitmap describes.
    pub disk_size: u64,
    /// The set bits.
    pub bits: SparseBits,
}

impl DirtyBitmap {
    /// The dirty byte ranges `[start, end)` of the disk, in order and merged (one per run of
    /// set bits: [`SparseBits::for_each_run`] visits them without collecting them).
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let g = self.granularity_bits;
        let mut out = Vec::new();
        self.bits.for_each_run(|a, b| {
            let (start, end) = (a << g, (b << g).min(self.disk_size));
            if start < end {
                out.push((start, end));
            }
        });
        out
    }
}

/// What an image with persistent dirty bitmaps offers. Every change is on disk, crash-safely,
/// when the call returns.
pub trait PersistentBitmaps {
    /// Whether this image can hold persistent bitmaps at all (qcow2: version 3).
    fn bitmaps_supported(&self) -> bool;

    /// The bitmaps, in directory order.
    fn list_bitmaps(&self) -> Result<Vec<BitmapDesc>>;

    /// The contents of bitmap `name` (an error if it does not exist or is inconsistent),
    /// including the writes made through this open image so far.
    fn read_bitmap(&self, name: &str) -> Result<DirtyBitmap>;

    /// Adds an empty bitmap `name`, enabled or not, with `granularity` bytes per bit (the
    /// format's default when `None`).
    fn add_bitmap(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()>;

    /// Removes bitmap `name` (inconsistent ones too).
    fn remove_bitmap(&self, name: &str) -> Result<()>;

    /// Clears every bit of bitmap `name`.
    fn clear_bitmap(&self, name: &str) -> Result<()>;

    /// Enables or disables the tracking of writes in bitmap `name`.
    fn enable_bitmap(&self, name: &str, enabled: bool) -> Result<()>;

    /// Sets in bitmap `name` every chunk `src` marks dirty (`src` may have another
    /// granularity, but must describe a disk of the same size).
    fn merge_into_bitmap(&self, name: &str, src: &DirtyBitmap) -> Result<()>;
}
