//! Reading guest data through a backing chain, once for every format.
//!
//! [`read_through`] asks the top image's [`BlockImage::block_status`] where each guest range lives
//! and acts on the answer: a range known to read as zeros, and not stored in a host file, is filled
//! with zeros without reading anything; every other range is read from the layer that answered (its
//! `depth` below the top, found by following [`BlockImage::backing`]) through that layer's
//! [`BlockImage::read_stored`]. A format therefore only maps guest ranges (block status) and says
//! how to read what it stores; walking the chain, zero filling, and a backing file shorter than the
//! image above it (its status answers zeros past its end) are handled here. Data a format must
//! transform before the guest sees it (qcow2's compressed and encrypted clusters) is
//! the format's own `read_stored`; the default, [`read_host`](crate::block::read_host), reads the
//! layer's host storage at the range's host offset.
//!
//! A stored range whose status also says it reads as zeros (a hole under a preallocated qcow2
//! cluster) is still read from the host file, as it was before this path existed, so that
//! qemu's blkdebug `read_aio` event fires for it as in qemu. A hole in a raw backing file, on
//! the other hand, is zero-filled without a read (qemu's raw driver reads it), so a blkdebug
//! rule on that file's `read_aio` does not fire for it: the same as when `convert` skips the
//! holes of a raw image by its block status.
//!
//! Raw images have no backing file: their own [`BlockImage::read_at`] reads the file directly
//! (a block-status query per request would only cost a `SEEK_DATA` system call), and they
//! reach this path only as a layer below another image.

use crate::block::BlockImage;
use crate::error::{Error, Result, ResultExt};
use crate::offsets::GuestOffset;

/// Fills `buf` with the guest data of `top` starting at `offset`, reading each range from the
/// layer of the chain that holds it (see the module documentation). The request must lie
/// inside `top`'s virtual disk (the caller checks it, as [`BlockImage::read_at`] does).
/// Errors name the file of the layer that failed.
pub fn read_through(top: &dyn BlockImage, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let guest = offset.0 + pos as u64;
        let asked = (buf.len() - pos) as u64;
        let status = top.block_status(GuestOffset(guest), asked)?;
        if status.len == 0 || status.len > asked {
            return Err(Error::corrupt(format!(
                "block status at guest offset {guest:#x} answered {} bytes for a request of {asked}",
                status.len
            ))
            .with_path(top.filename()));
        }
        let chunk = &mut buf[pos..pos + status.len as usize];
        if status.zero && !status.data {
            chunk.fill(0);
        } else {
            let layer = layer_at(top, status.depth)?;
            layer
                .read_stored(chunk, GuestOffset(guest), &status)
                .in_file(layer.filename())?;
        }
        pos += status.len as usize;
    }
    Ok(())
}

/// The layer `depth` levels below `top` (0: `top` itself); an error if the chain is shorter.
fn layer_at(top: &dyn BlockImage, depth: u32) -> Result<&dyn BlockImage> {
    let mut layer = top;
    for level in 0..depth {
        layer = layer.backing().ok_or_else(|| {
            Error::corrupt(format!(
                "block status names layer {depth} of the backing chain, which ends at layer {level}"
            ))
            .with_path(top.filename())
        })?;
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockStatus, ImageFormat};
    use crate::error::ErrorKind;
    use crate::info::LayerInfo;
    use crate::offsets::HostOffset;
    use crate::raw::RawImage;
    use crate::storage::{MemStorage, Storage};
    use std::path::{Path, PathBuf};

    /// A layer whose block status is whatever `status` says, over `below` (if any).
    struct Scripted {
        path: PathBuf,
        size: u64,
        status: fn(u64, u64) -> BlockStatus,
        below: Option<Box<dyn BlockImage>>,
    }

    impl BlockImage for Scripted {
        fn format(&self) -> ImageFormat {
            ImageFormat::of(&crate::raw::RawDriver)
        }
        fn filename(&self) -> &Path {
            &self.path
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
            read_through(self, buf, offset)
        }
        fn write_at(&self, _: &[u8], _: GuestOffset) -> Result<()> {
            unreachable!()
        }
        fn write_zeroes(&self, _: GuestOffset, _: u64, _: bool) -> Result<()> {
            unreachable!()
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
            Ok((self.status)(offset.0, max_len))
        }
        fn backing(&self) -> Option<&dyn BlockImage> {
            self.below.as_deref()
        }
        fn is_writable(&self) -> bool {
            false
        }
        fn actual_size(&self) -> Option<u64> {
            None
        }
        fn layer_info(&self) -> Result<LayerInfo> {
            unreachable!()
        }
    }

    fn scripted(
        status: fn(u64, u64) -> BlockStatus,
        below: Option<Box<dyn BlockImage>>,
    ) -> Scripted {
        Scripted {
            path: PathBuf::from("top.img"),
            size: 4096,
            status,
            below,
        }
    }

    fn raw_layer(bytes: &[u8]) -> Box<dyn BlockImage> {
        let s = MemStorage::default();
        s.write_at(bytes, 0).unwrap();
        Box::new(RawImage::from_storage(Box::new(s), Path::new("base.raw"), false).unwrap())
    }

    #[test]
    fn ranges_come_from_the_layer_that_answers() {
        let base: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        // The first half is zero at the top; the second half is the base's data, shifted by
        // 512 bytes in its host file.
        let top = scripted(
            |g, max| {
                if g < 2048 {
                    BlockStatus::zero((2048 - g).min(max), 0, None)
                } else {
                    BlockStatus::data(max.min(1000), 1, HostOffset(g - 512))
                }
            },
            Some(raw_layer(&base)),
        );
        let mut buf = vec![0xeeu8; 4096];
        top.read_at(&mut buf, GuestOffset(0)).unwrap();
        assert!(buf[..2048].iter().all(|&b| b == 0));
        assert_eq!(buf[2048..], base[1536..3584]);
    }

    #[test]
    fn a_status_of_no_bytes_or_more_than_asked_is_an_error() {
        for status in [
            (|_, _| BlockStatus::data(0, 0, HostOffset(0))) as fn(u64, u64) -> BlockStatus,
            |_, max| BlockStatus::zero(max + 1, 0, None),
        ] {
            let top = scripted(status, None);
            let e = top.read_at(&mut [0u8; 100], GuestOffset(0)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains("top.img"), "{e}");
        }
    }

    #[test]
    fn a_layer_below_the_chain_is_an_error() {
        let top = scripted(
            |_, max| BlockStatus::data(max, 2, HostOffset(0)),
            Some(raw_layer(&[1u8; 4096])),
        );
        let e = top.read_at(&mut [0u8; 100], GuestOffset(0)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("layer 2"), "{e}");
    }

    #[test]
    fn a_null_layer_below_reads_as_zeros() {
        let spec = crate::null::NullSpec {
            size: 4096,
            read_zeroes: false,
        };
        let null = crate::null::NullImage::new(spec, Path::new("null-co://"));
        // The null device's own status: not known to be zero, stored nowhere.
        let top = scripted(
            |_, max| BlockStatus {
                zero: false,
                ..BlockStatus::unallocated(max, 1)
            },
            Some(Box::new(null)),
        );
        let mut buf = [0xeeu8; 100];
        top.read_at(&mut buf, GuestOffset(0)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_stored_range_without_a_host_offset_is_an_error() {
        let top = scripted(
            |_, max| BlockStatus::compressed(max, 1),
            Some(raw_layer(&[1u8; 4096])),
        );
        let e = top.read_at(&mut [0u8; 100], GuestOffset(0)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("base.raw"), "{e}");
    }
}
