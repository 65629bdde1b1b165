//! What the commands that copy guest data share (convert, commit, rebase, backup): the size of
//! a piece copied at once, progress callbacks, and walking block status.

use crate::block::{BlockImage, BlockStatus};
use crate::error::{Error, ErrorKind, Result};
use crate::offsets::GuestOffset;

/// Largest piece of guest data read and written at once (rounded down to a multiple of the
/// sparse block size, or raised to it).
pub const CHUNK: u64 = 2 << 20;

/// Told how far the conversion has got: `(bytes done, bytes in total)`. Called from worker
/// threads.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// The source's block status at `off`, checked: at least one byte, inside the disk.
pub(crate) fn status(img: &dyn BlockImage, off: u64, end: u64) -> Result<BlockStatus> {
    let st = img.block_status(GuestOffset(off), end - off)?;
    if st.len == 0 || st.len > end - off {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "block status at guest offset {off:#x} returned an invalid length {}",
                st.len
            ),
        )
        .with_path(img.filename()));
    }
    Ok(st)
}

/// A block-status walker that remembers the last answer, for questions asked at increasing
/// offsets. Offsets at or past the image's end read as zeros (a backing file smaller than the
/// target).
pub(crate) struct Cursor<'a> {
    img: &'a dyn BlockImage,
    last: Option<(u64, BlockStatus)>,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(img: &'a dyn BlockImage) -> Self {
        Cursor { img, last: None }
    }

    /// The image walked.
    pub(crate) fn image(&self) -> &'a dyn BlockImage {
        self.img
    }

    /// The status at `off` and where the range it describes ends.
    pub(crate) fn at(&mut self, off: u64) -> Result<(BlockStatus, u64)> {
        if let Some((start, st)) = self.last {
            if start <= off && off < start + st.len {
                return Ok((st, start + st.len));
            }
        }
        let size = self.img.virtual_size();
        if off >= size {
            return Ok((BlockStatus::unallocated(u64::MAX - off, 0), u64::MAX));
        }
        let st = status(self.img, off, size)?;
        self.last = Some((off, st));
        Ok((st, off + st.len))
    }
}

/// Reads `buf.len()` bytes at `off` from `img`, zeros past its end.
pub(crate) fn read_clamped(img: &dyn BlockImage, buf: &mut [u8], off: u64) -> Result<()> {
    let inside = img.virtual_size().saturating_sub(off).min(buf.len() as u64) as usize;
    if inside > 0 {
        img.read_at(&mut buf[..inside], GuestOffset(off))?;
    }
    buf[inside..].fill(0);
    Ok(())
}
