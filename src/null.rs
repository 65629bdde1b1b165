//! qemu's `null-co` (and `null-aio`) block driver as a read-only source: a disk of a given size
//! that holds nothing. qemu's iotests and benchmarks convert from it (`null-co://`,
//! `json:{"driver": "null-co", "size": ..., "read-zeroes": true}`).
//!
//! As in qemu, the device is opened as a raw image over the null protocol: it reads as zeros,
//! and its block status says "zero" (present, at the same offset) when `read-zeroes` is on, or
//! "unallocated, contents unknown" when it is off (qemu then returns whatever its buffer held;
//! vimg reads zeros either way). Writes are refused: vimg uses it as a source only.

use crate::block::{check_request, BlockImage, BlockStatus, ImageFormat};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::info::LayerInfo;
use crate::offsets::{GuestOffset, HostOffset};
use std::path::{Path, PathBuf};

/// The size of a null device whose options name none (qemu's default: 1 GiB).
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// A null device as an image spec describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullSpec {
    /// The disk size in bytes, rounded up to whole 512-byte sectors as qemu sees it.
    pub size: u64,
    /// `read-zeroes=on`: block status reports the disk as zeros.
    pub read_zeroes: bool,
}

impl Default for NullSpec {
    fn default() -> Self {
        NullSpec {
            size: DEFAULT_SIZE,
            read_zeroes: false,
        }
    }
}

/// An open null device (see the module documentation).
pub struct NullImage {
    spec: NullSpec,
    name: PathBuf,
}

impl NullImage {
    /// A null device as `spec` describes it; `name` is what messages and `map` call it.
    pub fn new(spec: NullSpec, name: &Path) -> Self {
        NullImage {
            spec,
            name: name.to_path_buf(),
        }
    }
}

impl BlockImage for NullImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn filename(&self) -> &Path {
        &self.name
    }

    fn virtual_size(&self) -> u64 {
        self.spec.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.spec.size, offset, buf.len() as u64).in_file(&self.name)?;
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: GuestOffset) -> Result<()> {
        Err(read_only(&self.name))
    }

    fn write_zeroes(&self, _offset: GuestOffset, _len: u64, _unmap: bool) -> Result<()> {
        Err(read_only(&self.name))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// It stores nothing and reads as zeros (its status, without `read-zeroes`, says only
    /// "unallocated, contents unknown"): as a layer below another image, zeros too.
    fn read_stored(
        &self,
        buf: &mut [u8],
        _guest: GuestOffset,
        _status: &BlockStatus,
    ) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        let max_len = max_len.max(1);
        check_request(self.spec.size, offset, max_len).in_file(&self.name)?;
        Ok(if self.spec.read_zeroes {
            BlockStatus::zero(max_len, 0, Some(HostOffset(offset.0)))
        } else {
            BlockStatus {
                zero: false,
                ..BlockStatus::unallocated(max_len, 0)
            }
        })
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn actual_size(&self) -> Option<u64> {
        Some(0)
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            filename: self.name.display().to_string(),
            format: ImageFormat::Raw.as_str(),
            virtual_size: self.spec.size,
            actual_size: Some(0),
            cluster_size: None,
            encrypted: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            backing_format_probed: false,
            snapshots: Vec::new(),
            dirty_flag: false,
            format_specific: None,
        })
    }
}

fn read_only(name: &Path) -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        "the null driver is a read-only source in vimg",
    )
    .with_path(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeros_and_reports_status_by_read_zeroes() {
        let name = Path::new("null-co://");
        let img = NullImage::new(
            NullSpec {
                size: 8192,
                read_zeroes: true,
            },
            name,
        );
        let mut buf = [1u8; 512];
        img.read_at(&mut buf, GuestOffset(4096)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let st = img.block_status(GuestOffset(512), 8192 - 512).unwrap();
        assert!(st.present && st.zero && !st.data);
        assert_eq!((st.len, st.offset), (8192 - 512, Some(HostOffset(512))));
        let img = NullImage::new(NullSpec::default(), name);
        let st = img.block_status(GuestOffset(0), 1 << 20).unwrap();
        assert!(!st.present && !st.zero && !st.data);
        assert!(img.write_at(&[0], GuestOffset(0)).is_err());
        assert!(img.read_at(&mut buf, GuestOffset(DEFAULT_SIZE)).is_err());
    }
}
