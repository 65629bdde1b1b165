//! How much of a new or grown image to allocate up front: qemu's `preallocation=` option,
//! shared by every format that takes it (qemu's `PreallocMode`, qapi/block-core.json).

use crate::error::{Error, Result};
use crate::storage::Storage;
use std::path::Path;

/// qemu-img's message for a preallocation mode given with a shrinking resize.
pub const PREALLOC_SHRINK: &str = "Preallocation can only be used for growing images";

/// How much of the image to allocate up front (`preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing: the new part is sparse (for qcow2, no cluster is mapped).
    #[default]
    Off,
    /// The format's metadata maps every cluster, and the file is extended sparsely to cover
    /// them (for qcow2, every L2 table and standard cluster descriptors with the COPIED flag,
    /// qcow2.rst "Cluster mapping"). A raw file has no metadata: growing one refuses it.
    Metadata,
    /// As `Metadata`, and the data is allocated in the host file system (fallocate).
    Falloc,
    /// As `Metadata`, and the data is written with zeros.
    Full,
}

impl Preallocation {
    /// The option value naming this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }

    /// Parses `off`, `metadata`, `falloc` or `full`.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(Error::invalid_input(format!(
                    "invalid preallocation mode '{name}' (use off, metadata, falloc or full)"
                )))
            }
        })
    }
}

/// Storage being written by a create or a resize, with the error context of its path.
pub(crate) struct FileWriter<'a> {
    /// The storage.
    pub(crate) storage: &'a dyn Storage,
    /// Its path, for messages.
    pub(crate) path: &'a Path,
}

impl FileWriter<'_> {
    pub(crate) fn write(&self, buf: &[u8], off: u64) -> Result<()> {
        self.storage
            .write_at(buf, off)
            .map_err(|e| Error::io("write failed", e).with_path(self.path).at(off))
    }

    pub(crate) fn len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io("cannot get file size", e).with_path(self.path))
    }

    /// Only ever grows the file (see the callers); a block device cannot grow, as qemu says.
    pub(crate) fn set_len(&self, len: u64) -> Result<()> {
        if let Some(file) = self.storage.host_file() {
            let kind = crate::storage::HostKind::of(file)
                .map_err(|e| Error::io("cannot get file size", e).with_path(self.path))?;
            if kind.is_block_device() {
                return Err(Error::invalid_input("Cannot grow device files").with_path(self.path));
            }
        }
        self.storage
            .set_len(len)
            .map_err(|e| Error::io("cannot set file size", e).with_path(self.path))
    }

    pub(crate) fn zeros(&self, start: u64, end: u64) -> Result<()> {
        let chunk = vec![0u8; (end - start).min(1 << 20) as usize];
        let mut off = start;
        while off < end {
            let n = (end - off).min(chunk.len() as u64) as usize;
            self.write(&chunk[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }

    /// Allocates `[start, end)` in the file system; storage that is no host file, or a file
    /// system that cannot preallocate, gets zeros written instead.
    pub(crate) fn fallocate(&self, start: u64, end: u64) -> Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if end <= start {
            return Ok(());
        }
        let Some(file) = self.storage.host_file() else {
            return self.zeros(start, end);
        };
        match fallocate(file, FallocateFlags::empty(), start, end - start) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => self.zeros(start, end),
            Err(e) => Err(Error::io("cannot preallocate", e.into())
                .with_path(self.path)
                .at(start)),
        }
    }

    /// Makes what was written durable.
    pub(crate) fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io("flush failed", e).with_path(self.path))
    }
    /// Grows the file to `len` bytes the way qemu grows a raw file with preallocation `mode`
    /// (`Metadata` counts as `Off`): sparse, fallocated or written with zeros. A file that was
    /// empty gets its first 4 KiB written, as qemu does so that the host block size can be
    /// probed later.
    pub(crate) fn grow(&self, len: u64, mode: Preallocation) -> Result<()> {
        let old = self.len()?;
        if len <= old {
            return Ok(());
        }
        match mode {
            Preallocation::Off | Preallocation::Metadata => self.set_len(len)?,
            Preallocation::Falloc => self.fallocate(old, len)?,
            Preallocation::Full => {
                self.set_len(len)?;
                self.zeros(old, len)?;
            }
        }
        if old == 0 && mode != Preallocation::Full {
            self.zeros(0, len.min(4096))?;
        }
        Ok(())
    }
}

/// Grows `storage` (at `path`, for messages) to `len` bytes the way qemu grows a raw file with
/// preallocation `mode` (see [`Preallocation`]); used for raw images and external data files.
pub(crate) fn grow_file(
    storage: &dyn Storage,
    path: &Path,
    len: u64,
    mode: Preallocation,
) -> Result<()> {
    FileWriter { storage, path }.grow(len, mode)
}
