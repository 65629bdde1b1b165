//! Which file holds the guest data of an image with an external data file (qcow2.rst
//! "incompatible feature bit 2"), when the image is opened by name:
//!
//! - the file the header names, resolved against the image's directory;
//! - or the file given with qemu's `data-file` open option (`--image-opts
//!   data-file.filename=NAME,file.filename=IMG`, or in `json:`), registered for the image
//!   with [`set_override`]; an image whose header names no data file needs one (qemu:
//!   `'data-file' is required for this image`);
//! - or none at all when the command does no guest I/O ([`open_metadata_only`], qemu-img's
//!   `info`): the image's metadata is read, and any access to guest data fails with the reason
//!   the data file is not there.
//!
//! These are settings of the whole command, as qemu's command-line options are.

use crate::storage::Storage;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static OVERRIDES: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
static METADATA_ONLY: AtomicBool = AtomicBool::new(false);

/// Makes every later open of the image at `image` (the path as it will be opened) use `data`
/// as its external data file instead of the one its header names (qemu's `data-file` option).
pub fn set_override(image: &Path, data: &Path) {
    let mut o = OVERRIDES.lock().unwrap_or_else(|e| e.into_inner());
    o.retain(|(i, _)| i != image);
    o.push((image.to_path_buf(), data.to_path_buf()));
}

/// The data file registered for the image at `image`, if any.
pub(super) fn override_for(image: &Path) -> Option<PathBuf> {
    let o = OVERRIDES.lock().unwrap_or_else(|e| e.into_inner());
    o.iter().find(|(i, _)| i == image).map(|(_, d)| d.clone())
}

/// With `true`, later read-only opens do not need the external data file: one that is
/// missing or not named is left out, and guest I/O on such an image fails (qemu-img `info`,
/// which opens images without I/O).
pub fn open_metadata_only(on: bool) {
    METADATA_ONLY.store(on, Ordering::Relaxed);
}

/// Whether [`open_metadata_only`] is on.
pub(super) fn metadata_only() -> bool {
    METADATA_ONLY.load(Ordering::Relaxed)
}

/// qemu's message for an image that needs a data file when none is named or given.
pub const REQUIRED: &str = "'data-file' is required for this image";

/// Stands for a data file that was not opened: every access fails with `why`.
pub(super) struct Absent {
    pub(super) why: String,
}

impl Absent {
    fn fail<T>(&self) -> io::Result<T> {
        Err(io::Error::new(io::ErrorKind::NotFound, self.why.clone()))
    }
}

impl Storage for Absent {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        self.fail()
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        self.fail()
    }
    fn len(&self) -> io::Result<u64> {
        self.fail()
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        self.fail()
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero_range(&self, _: u64, _: u64) -> io::Result<()> {
        self.fail()
    }
    fn extent_at(&self, _: u64) -> io::Result<(bool, u64)> {
        self.fail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_per_image_and_absent_storage_fails() {
        set_override(Path::new("/x/a.qcow2"), Path::new("a.data"));
        set_override(Path::new("/x/a.qcow2"), Path::new("b.data"));
        assert_eq!(
            override_for(Path::new("/x/a.qcow2")),
            Some(PathBuf::from("b.data"))
        );
        assert_eq!(override_for(Path::new("/x/c.qcow2")), None);
        let a = Absent {
            why: REQUIRED.into(),
        };
        let e = a.read_at(&mut [0u8; 4], 0).unwrap_err();
        assert_eq!(e.to_string(), REQUIRED);
        assert!(a.write_at(&[0u8; 4], 0).is_err() && a.len().is_err());
    }
}
