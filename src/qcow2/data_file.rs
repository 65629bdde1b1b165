//! Which file holds the guest data of an image with an external data file (qcow2.rst
//! "incompatible feature bit 2"), when the image is opened by name:
//!
//! - the file the header names, resolved against the image's directory;
//! - or the file given with qemu's `data-file` open option (`--image-opts
//!   data-file.filename=NAME,file.filename=IMG`, or in `json:`), given for the image to the
//!   command's opener ([`crate::opener::Opener::set_data_file`]); an image whose header names
//!   no data file needs one (qemu: `'data-file' is required for this image`);
//! - or none at all when the command does no guest I/O
//!   ([`crate::opener::Opener::set_metadata_only`], qemu-img's `info`): the image's metadata
//!   is read, and any access to guest data fails with the reason the data file is not there.
//!
//! These are settings of the whole command, as qemu's command-line options are, kept by the
//! command's [`crate::opener::Opener`].

use crate::storage::Storage;
use std::io;

/// qemu's message for an image that needs a data file when none is named or given.
pub(super) const REQUIRED: &str = "'data-file' is required for this image";

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
    fn absent_storage_fails() {
        let a = Absent {
            why: REQUIRED.into(),
        };
        let e = a.read_at(&mut [0u8; 4], 0).unwrap_err();
        assert_eq!(e.to_string(), REQUIRED);
        assert!(a.write_at(&[0u8; 4], 0).is_err() && a.len().is_err());
    }
}
