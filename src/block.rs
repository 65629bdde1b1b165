//! The [`BlockImage`] trait every image format implements, and the block-status answer that
//! copying, comparing, mapping and backing up are built on.
//!
//! A driver answers "where is this guest range?" with a [`BlockStatus`]; shared code (see
//! [`crate::ops`]) does the copying. Optional capabilities (consistency checks, persistent
//! dirty bitmaps, later snapshots and resizing) are separate traits reached through accessor
//! methods, so that a caller holding a `dyn BlockImage` can ask whether the format offers them.

use crate::check::Check;
use crate::error::{Error, Result};
use crate::offsets::{GuestOffset, HostOffset};
use std::path::Path;

/// The image formats vimg knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A plain disk image: guest offset equals file offset.
    Raw,
    /// QEMU copy-on-write version 2 (qemu docs/interop/qcow2.rst).
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img uses for the format (`raw`, `qcow2`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses a format name as given to `-f`/`-F` or recorded in an image.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(match crate::probe::ForeignFormat::from_name(other) {
                Some(f) => f.not_supported(),
                None => {
                    Error::unsupported(format!("unknown or unsupported image format '{other}'"))
                }
            }),
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a guest range holds, as qemu's block-status query reports it (and `qemu-img map`
/// prints it). The range `[offset, offset + len)` has the same status throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the range in bytes (at least 1, at most what was asked for).
    pub len: u64,
    /// The layer that answered: 0 for the image itself, 1 for its backing file, and so on. For
    /// a range no layer allocates, the deepest layer consulted.
    pub depth: u32,
    /// Some layer of the chain allocates the range (as data or as zeros).
    pub present: bool,
    /// The range is known to read as zeros.
    pub zero: bool,
    /// The range is stored in a host file (possibly compressed).
    pub data: bool,
    /// The range is stored compressed.
    pub compressed: bool,
    /// Where the range starts in the host file of layer `depth`, when it is stored
    /// uncompressed (or is a preallocated zero cluster, or a hole in a raw file).
    pub offset: Option<HostOffset>,
}

impl BlockStatus {
    /// A range no layer allocates: reads as zeros.
    pub fn unallocated(len: u64, depth: u32) -> Self {
        BlockStatus {
            len,
            depth,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
        }
    }

    /// A range recorded as zeros at layer `depth`, with a host offset if one is reserved.
    pub fn zero(len: u64, depth: u32, offset: Option<HostOffset>) -> Self {
        BlockStatus {
            len,
            depth,
            present: true,
            zero: true,
            data: false,
            compressed: false,
            offset,
        }
    }

    /// A range stored uncompressed at `offset` in layer `depth`'s host file.
    pub fn data(len: u64, depth: u32, offset: HostOffset) -> Self {
        BlockStatus {
            len,
            depth,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(offset),
        }
    }

    /// A range stored compressed in layer `depth`.
    pub fn compressed(len: u64, depth: u32) -> Self {
        BlockStatus {
            len,
            depth,
            present: true,
            zero: false,
            data: true,
            compressed: true,
            offset: None,
        }
    }

    /// Whether a reader must read the range to learn its contents (it is not known to be zero).
    pub fn needs_read(&self) -> bool {
        !self.zero
    }

    /// Whether `next`, starting where `self` ends, can be merged with it into one range with the
    /// same status (host offsets contiguous where present).
    pub fn can_merge(&self, next: &BlockStatus) -> bool {
        let offsets_follow = match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a.0.checked_add(self.len) == Some(b.0),
            _ => false,
        };
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && offsets_follow
    }
}

/// A virtual disk image: one layer of a chain, with its backing layers attached.
///
/// All methods take `&self`: an image may be shared between threads (`Send + Sync`), and
/// drivers synchronise internally. Offsets and lengths are in bytes; a request that reaches past
/// [`BlockImage::virtual_size`] fails with [`crate::ErrorKind::InvalidInput`].
pub trait BlockImage: Send + Sync {
    /// The format of this layer.
    fn format(&self) -> ImageFormat;

    /// The file this layer was opened from.
    fn filename(&self) -> &Path;

    /// The size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buf` with guest data starting at `offset`, reading through backing layers.
    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()>;

    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zeros. With `unmap`, the driver may free the
    /// storage behind the range.
    fn write_zeroes(&self, offset: GuestOffset, len: u64, unmap: bool) -> Result<()>;

    /// Discards `[offset, offset + len)`, as a guest's discard (TRIM/UNMAP) request: the
    /// driver may free the storage behind the range, and afterwards the range's contents are
    /// unspecified: each byte reads as before, as zero, or (where the format can record no
    /// zeros there) as the backing layers hold it, never as data of another guest range nor as
    /// stale host data. Drivers follow qemu: a qcow2 image frees only whole clusters inside the
    /// range (see [`crate::qcow2::Qcow2Image`]), a raw file punches a hole where the file system
    /// can. Discarding is best effort, so the default implementation does nothing.
    fn discard(&self, offset: GuestOffset, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;

    /// Ends a session of writes: as [`BlockImage::flush`], and leaves the image clean where the
    /// format keeps state for later (a qcow2 image with lazy refcounts writes every refcount
    /// and clears its dirty bit). Dropping an image does the same but cannot report an error,
    /// so a command that wrote calls this last. The image stays usable; further writes start a
    /// new session.
    fn finish(&self) -> Result<()> {
        self.flush()
    }

    /// The status of the guest range starting at `offset`, at most `max_len` bytes long
    /// (`max_len >= 1`, and the range must lie inside the virtual disk). The answer may cover
    /// less than asked; callers loop.
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus>;

    /// The backing layer, if this image has one.
    fn backing(&self) -> Option<&dyn BlockImage> {
        None
    }

    /// Whether the image was opened for writing.
    fn is_writable(&self) -> bool;

    /// Bytes the layer occupies on the host (qemu's `actual-size`), if known.
    fn actual_size(&self) -> Option<u64>;

    /// A description of this layer for `info` (format-specific data, backing file name, ...).
    fn layer_info(&self) -> Result<crate::info::LayerInfo>;

    /// The consistency check this format offers, if any.
    fn as_check(&self) -> Option<&dyn Check> {
        None
    }

    /// The persistent dirty bitmaps this format offers, if any.
    fn as_bitmaps(&self) -> Option<&dyn crate::bitmap::PersistentBitmaps> {
        None
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub fn check_request(size: u64, offset: GuestOffset, len: u64) -> Result<()> {
    match offset.0.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid_input(format!(
            "request of {len} bytes at guest offset {offset} is beyond the end of the {size}-byte disk"
        ))),
    }
}
