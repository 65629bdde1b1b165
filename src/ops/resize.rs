//! `vimg resize [--shrink] [--preallocation MODE] IMAGE [+|-]SIZE`: changes an image's
//! virtual size.
//!
//! Raw images are truncated or extended to exactly the new size; the grown part is sparse
//! (`off`), allocated with fallocate (`falloc`) or written with zeros (`full`); `metadata` has
//! no meaning for raw files and is refused, as by qemu. qcow2 images need a multiple of 512
//! bytes; growing may move the L1 table and preallocate the new area, shrinking discards the
//! clusters past the new end (see [`crate::qcow2::Qcow2Image::resize_with`]). Shrinking
//! destroys data, so it is only done when asked for explicitly, and never with a preallocation
//! mode; a refused resize leaves the image untouched.

use crate::block::ImageFormat;
use crate::error::{Error, Result};
use crate::open::{open_image, OpenOptions};
use crate::opener::Opener;
use crate::ops::size::parse_size;
use crate::prealloc::{Preallocation, PREALLOC_SHRINK};
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
    opener: &Opener,
) -> Result<String> {
    resize_prealloc(path, format, size_arg, shrink, Preallocation::Off, opener)
}

/// Resizes the image at `path` (format probed when `format` is `None`) as `size_arg` says
/// (`SIZE`, `+SIZE`, `-SIZE`), preallocating a grown area as `prealloc` says. Shrinking needs
/// `shrink` and no preallocation; otherwise the image is left untouched and an error explains
/// why. The image's storage is opened through `opener`. Returns the line to print on success.
pub fn resize_prealloc(
    path: &Path,
    format: Option<ImageFormat>,
    size_arg: &str,
    shrink: bool,
    prealloc: Preallocation,
    opener: &Opener,
) -> Result<String> {
    let arg = SizeArg::parse(size_arg)?;
    // Looked at read-only first: a refused resize must not change the image at all.
    let img = open_image(
        path,
        &OpenOptions {
            format,
            no_backing: true,
            opener: opener.clone(),
            ..OpenOptions::default()
        },
    )?;
    let not_resizable = || {
        Error::unsupported(format!(
            "Image format driver does not support resize ({})",
            img.format()
        ))
        .with_path(path)
    };
    let check = img.as_resize().ok_or_else(not_resizable)?;
    let cur = check.resize_base()?;
    let new = arg.apply(cur)?;
    check
        .check_resize(new, prealloc)
        .map_err(|e| e.with_path(path))?;
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
    let format = Some(img.format());
    drop(img);
    // Growing needs the backing chain: a longer backing file must not show through.
    let mut img = open_image(
        path,
        &OpenOptions {
            format,
            writable: true,
            no_backing: new <= cur,
            opener: opener.clone(),
            ..OpenOptions::default()
        },
    )?;
    let resize = img
        .as_resize_mut()
        .ok_or_else(|| Error::unsupported("the image cannot be resized").with_path(path))?;
    resize
        .resize(new, prealloc)
        .map_err(|e| e.with_path(path))?;
    img.finish()?;
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
