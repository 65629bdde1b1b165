//! Several source images read as one disk, one after the other (qemu-img convert with more than
//! one source): the virtual size is the sum of theirs, and a guest offset falls into the source
//! whose range holds it.

use crate::block::{check_request, BlockImage, BlockStatus, ImageFormat};
use crate::error::{Error, ErrorKind, Result};
use crate::offsets::GuestOffset;
use std::path::Path;

/// Read-only concatenation of images, in order.
pub struct Concat<'a> {
    parts: Vec<&'a dyn BlockImage>,
    /// Guest offset where each part starts (same length as `parts`).
    starts: Vec<u64>,
    size: u64,
}

impl<'a> Concat<'a> {
    /// Joins `parts` (at least one); fails if their sizes add up to more than 64 bits hold.
    pub fn new(parts: Vec<&'a dyn BlockImage>) -> Result<Self> {
        if parts.is_empty() {
            return Err(Error::invalid_input("no source image"));
        }
        let mut starts = Vec::with_capacity(parts.len());
        let mut size = 0u64;
        for p in &parts {
            starts.push(size);
            size = size.checked_add(p.virtual_size()).ok_or_else(|| {
                Error::invalid_input("the sources' sizes add up to more than 2^64 bytes")
                    .with_path(p.filename())
            })?;
        }
        Ok(Concat {
            parts,
            starts,
            size,
        })
    }

    /// The part holding guest offset `off` (< size) and where that part starts.
    fn part_at(&self, off: u64) -> (&'a dyn BlockImage, u64) {
        // The last part starting at or before `off`; empty parts are skipped over because a
        // later part starts at the same offset.
        let i = self.starts.partition_point(|&s| s <= off).saturating_sub(1);
        (self.parts[i], self.starts[i])
    }
}

impl BlockImage for Concat<'_> {
    fn format(&self) -> ImageFormat {
        self.parts[0].format()
    }

    fn filename(&self) -> &Path {
        self.parts[0].filename()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64)?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = offset.0 + pos as u64;
            let (part, start) = self.part_at(g);
            let within = g - start;
            let n = (part.virtual_size() - within).min((buf.len() - pos) as u64) as usize;
            part.read_at(&mut buf[pos..pos + n], GuestOffset(within))?;
            pos += n;
        }
        Ok(())
    }

    fn done_reading(&self, offset: GuestOffset, len: u64) {
        let end = offset.0.saturating_add(len).min(self.size);
        let mut g = offset.0;
        while g < end {
            let (part, start) = self.part_at(g);
            let within = g - start;
            let n = (part.virtual_size() - within).min(end - g);
            part.done_reading(GuestOffset(within), n);
            g += n;
        }
    }

    fn write_at(&self, _buf: &[u8], _offset: GuestOffset) -> Result<()> {
        Err(Error::new(
            ErrorKind::ReadOnly,
            "concatenated sources are read-only",
        ))
    }

    fn write_zeroes(&self, _offset: GuestOffset, _len: u64, _unmap: bool) -> Result<()> {
        Err(Error::new(
            ErrorKind::ReadOnly,
            "concatenated sources are read-only",
        ))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        check_request(self.size, offset, max_len.max(1))?;
        let (part, start) = self.part_at(offset.0);
        let within = offset.0 - start;
        let n = max_len.max(1).min(part.virtual_size() - within);
        let st = part.block_status(GuestOffset(within), n)?;
        if st.len == 0 || st.len > n {
            return Err(Error::corrupt(format!(
                "block status at guest offset {within:#x} returned an invalid length {}",
                st.len
            ))
            .with_path(part.filename()));
        }
        Ok(st)
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn actual_size(&self) -> Option<u64> {
        self.parts
            .iter()
            .try_fold(0u64, |acc, p| acc.checked_add(p.actual_size()?))
    }

    fn layer_info(&self) -> Result<crate::info::LayerInfo> {
        Err(Error::unsupported(
            "concatenated sources have no layer information",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::RawImage;

    #[test]
    fn reads_and_maps_across_parts() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, data: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            RawImage::open(&p, false).unwrap()
        };
        let a = mk("a", &[1u8; 1536]);
        let e = mk("e", &[]);
        let b = mk("b", &[2u8; 512]);
        let c = Concat::new(vec![&a, &e, &b]).unwrap();
        assert_eq!(c.virtual_size(), 2048);
        let mut buf = vec![0u8; 1024];
        c.read_at(&mut buf, GuestOffset(1024)).unwrap();
        assert!(buf[..512].iter().all(|&x| x == 1));
        assert!(buf[512..].iter().all(|&x| x == 2));
        let st = c.block_status(GuestOffset(1000), 2048 - 1000).unwrap();
        assert!(st.len <= 536, "{st:?}");
        let st = c.block_status(GuestOffset(1536), 512).unwrap();
        assert!(st.len <= 512 && st.len > 0);
        assert!(c.read_at(&mut buf, GuestOffset(1536)).is_err());
        assert!(c.write_at(&[0], GuestOffset(0)).is_err());
        assert!(Concat::new(vec![]).is_err());
    }
}
