//! `vimg resize [--shrink] [--preallocation MODE] IMAGE [+|-]SIZE`: changes an image's
//! virtual size.
//!
//! Raw images are truncated or extended to exactly the new size; the grown part is sparse
//! (`off`), allocated with fallocate (`falloc`) or written with zeros (`full`); `metadata` has
//! no meaning for raw files and is refused, as by qemu. qcow2 images need a multiple of 512
//! bytes; growing may move the L1 table and preallocate the new area, shrinking discards the
//! clusters past the new end (see [`crate::qcow2::resize`]). Shrinking destroys data, so it is
//! only done when asked for explicitly, and never with a preallocation mode; a refused resize
//! leaves the image untouched.

use crate::block::ImageFormat;
use crate::error::{Error, Result};
use crate::open::{probe_format, ChainGuard};
use crate::ops::size::parse_size;
use crate::qcow2::create::{grow_file, Preallocation};
use crate::qcow2::resize::PREALLOC_SHRINK;
use crate::qcow2::Qcow2Image;
use crate::storage::{FileStorage, Storage};
use std::path::Path;

/// What `resize` prints on success, as qemu-img does.
pub const RESIZED: &str = "Image resized.";

/// A requested size: absolute, or relative to the current size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeArg {
    /// `SIZE`
    Absolute(u64),
    /// `+SIZE`
    Grow(u64),
    /// `-SIZE`
    Shrink(u64),
}

impl SizeArg {
    /// Parses `SIZE`, `+SIZE` or `-SIZE` (sizes as [`parse_size`] reads them).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        Ok(if let Some(r) = t.strip_prefix('+') {
            SizeArg::Grow(parse_size(r)?)
        } else if let Some(r) = t.strip_prefix('-') {
            SizeArg::Shrink(parse_size(r)?)
        } else {
            SizeArg::Absolute(parse_size(t)?)
        })
    }

    /// The new size for an image of `current` bytes.
    pub fn apply(self, current: u64) -> Result<u64> {
        match self {
            SizeArg::Absolute(n) => Ok(n),
            SizeArg::Grow(n) => current
                .checked_add(n)
                .filter(|&s| s <= i64::MAX as u64)
                .ok_or_else(|| Error::invalid_input("the new size is too large")),
            SizeArg::Shrink(n) => current
                .checked_sub(n)
                .filter(|&s| s > 0)
                .ok_or_else(|| Error::invalid_input("the new size must be greater than zero")),
        }
    }
}

/// Resizes the image at `path` (format probed when `format` is `None`) as `size_arg` says
/// (`SIZE`, `+SIZE`, `-SIZE`), without preallocation. See [`resize_prealloc`].
pub fn resize(
    path: &Path,
    format: Option<ImageFormat>,
    size_arg: &str,
    shrink: bool,
) -> Result<String> {
    resize_prealloc(path, format, size_arg, shrink, Preallocation::Off)
}

/// Resizes the image at `path` (format probed when `format` is `None`) as `size_arg` says
/// (`SIZE`, `+SIZE`, `-SIZE`), preallocating a grown area as `prealloc` says. Shrinking needs
/// `shrink` and no preallocation; otherwise the image is left untouched and an error explains
/// why. Returns the line to print on success.
pub fn resize_prealloc(
    path: &Path,
    format: Option<ImageFormat>,
    size_arg: &str,
    shrink: bool,
    prealloc: Preallocation,
) -> Result<String> {
    let arg = SizeArg::parse(size_arg)?;
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    let refuse_shrink = |new: u64, cur: u64| -> Result<()> {
        if new < cur && prealloc != Preallocation::Off {
            return Err(Error::invalid_input(PREALLOC_SHRINK).with_path(path).bare());
        }
        if new < cur && !shrink {
            return Err(Error::invalid_input(format!(
                "the new size {new} is smaller than the current size {cur}: shrinking discards \
                 the data past the new end, so it is only done with --shrink"
            ))
            .with_path(path));
        }
        Ok(())
    };
    match format {
        ImageFormat::Raw => {
            let storage = FileStorage::open(path, true)
                .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
            let cur = storage
                .len()
                .map_err(|e| Error::io("cannot get image size", e).with_path(path))?;
            let new = arg.apply(cur)?;
            refuse_shrink(new, cur)?;
            if new > cur && prealloc == Preallocation::Metadata {
                return Err(
                    Error::invalid_input("Unsupported preallocation mode: metadata")
                        .with_path(path),
                );
            }
            // A file grown from empty gets its first block written, as qemu does, whatever
            // the preallocation.
            if new > cur && (prealloc != Preallocation::Off || cur == 0) {
                grow_file(storage.file(), path, new, prealloc)?;
            }
            storage
                .set_len(new)
                .and_then(|_| storage.flush())
                .map_err(|e| Error::io("cannot resize image", e).with_path(path))?;
        }
        ImageFormat::Qcow2 => {
            // Look first, read-only: a refused resize must not change the image at all.
            let cur = {
                let img = Qcow2Image::open(path, false, true, &mut ChainGuard::default())?;
                img.header().size
            };
            let new = arg.apply(cur)?;
            if !new.is_multiple_of(512) {
                return Err(Error::invalid_input(format!(
                    "the new size {new} is not a multiple of 512 bytes, which qcow2 needs"
                ))
                .with_path(path));
            }
            refuse_shrink(new, cur)?;
            // Growing needs the backing chain: a longer backing file must not show through.
            let no_backing = new <= cur;
            let mut img = Qcow2Image::open(path, true, no_backing, &mut ChainGuard::default())?;
            img.resize_with(new, prealloc)
                .map_err(|e| e.with_path(path))?;
            crate::block::BlockImage::finish(&img)?;
        }
    }
    Ok(RESIZED.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_arguments() {
        assert_eq!(SizeArg::parse("2G").unwrap(), SizeArg::Absolute(2 << 30));
        assert_eq!(SizeArg::parse("+512K").unwrap(), SizeArg::Grow(512 << 10));
        assert_eq!(SizeArg::parse("-1M").unwrap(), SizeArg::Shrink(1 << 20));
        assert!(SizeArg::parse("+").is_err());
        assert_eq!(SizeArg::Grow(512).apply(1024).unwrap(), 1536);
        assert_eq!(SizeArg::Shrink(512).apply(1024).unwrap(), 512);
        assert!(SizeArg::Shrink(1024).apply(1024).is_err());
        assert!(SizeArg::Grow(u64::MAX).apply(1).is_err());
    }
}
