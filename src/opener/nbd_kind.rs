//! NBD exports as a storage kind ([`crate::nbd::client`]).

use super::{Locator, LocatorBuf, OpenRequest, StorageId, StorageKind};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::io;

/// Exports named `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH` (and qemu's
/// other spellings): one connection per export, shared in the process.
pub struct NbdKind;

impl StorageKind for NbdKind {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn claims(&self, loc: &Locator) -> bool {
        crate::nbd::client::claims(loc)
    }

    fn open(&self, loc: &Locator, r: &OpenRequest) -> io::Result<Box<dyn Storage>> {
        crate::nbd::client::open(loc, r.writable)
    }

    /// As qemu "creates" on an NBD export (`bdrv_co_create_opts_simple`): the export is
    /// opened for writing; its size is checked by the length set next, and nothing is
    /// emptied.
    fn create(&self, loc: &Locator, _direct: bool) -> io::Result<Box<dyn Storage>> {
        crate::nbd::client::open(loc, true)
    }

    fn identity(&self, loc: &Locator) -> io::Result<StorageId> {
        Ok(StorageId::Named(
            "nbd",
            crate::nbd::client::parse(loc)?.url(),
        ))
    }

    fn canonical(&self, loc: &Locator) -> io::Result<LocatorBuf> {
        Ok(crate::nbd::client::parse(loc)?.locator().into())
    }

    /// qemu's rule for a name recorded in an image over NBD: a protocol name or an absolute
    /// path is taken as it is; a relative one cannot be resolved, as NBD has no directories
    /// (qemu's `nbd_dirname` refuses, in these words).
    fn resolve(&self, base: &Locator, name: &str) -> Result<LocatorBuf> {
        let p = std::path::Path::new(name);
        if p.is_absolute() || crate::nbd::client::claims(p) {
            return Ok(p.to_path_buf());
        }
        Err(Error::invalid_input(format!(
            "Cannot use relative backing file names for '{}': Cannot generate a base directory for NBD nodes",
            crate::nbd::client::display_name(base).unwrap_or_else(|_| base.display().to_string())
        )))
    }

    fn remove_failed_output(&self, _loc: &Locator) {}
}
