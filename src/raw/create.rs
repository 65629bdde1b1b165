//! Creating raw images: `create -f raw` ([`RawCreation`]), and [`create_raw`], which writes
//! the file.

use crate::creation::FormatCreation;
use crate::error::{Error, Result};
use crate::opener::Opener;
use crate::prealloc::{grow_file, Preallocation};
use crate::qcow2::CreateRequest;
use crate::qcow2::{create_file, round_size};
use std::path::{Path, PathBuf};

/// A checked `create -f raw` request.
#[derive(Debug, Clone)]
pub struct RawCreation {
    /// The file to create.
    path: PathBuf,
    /// Size in bytes as requested (rounded up to 512 bytes when written).
    size: u64,
    /// Preallocation mode.
    preallocation: Preallocation,
    /// What creates the file.
    opener: Opener,
    /// Whether `preallocation` was given explicitly (it is then shown in the formatting line).
    preallocation_given: bool,
}

impl RawCreation {
    /// qemu-img's checks before its "Formatting" line, in its words: raw takes only a size
    /// and a preallocation mode, and needs the size.
    pub fn prepare(request: &CreateRequest<'_>) -> Result<Self> {
        let given = request.given;
        let extra: Vec<String> = given
            .given_keys()
            .into_iter()
            .filter(|k| *k != "size" && *k != "preallocation")
            .collect();
        if let Some(k) = extra.first() {
            return Err(request.file_error(if k.starts_with("backing") {
                "Backing file not supported for file format 'raw'".to_string()
            } else {
                format!("Invalid parameter '{k}'")
            }));
        }
        let preallocation = given.preallocation.unwrap_or_default();
        let size = request.required_size(request.size)?;
        Ok(RawCreation {
            path: request.path.to_path_buf(),
            opener: request.opener.clone(),
            size,
            preallocation,
            preallocation_given: given.preallocation.is_some(),
        })
    }
}

impl FormatCreation for RawCreation {
    /// `Formatting 'disk.raw', fmt=raw size=1000`, with `preallocation` when given.
    fn formatting_line(&self) -> String {
        let mut s = format!(
            "Formatting '{}', fmt=raw size={}",
            self.path.display(),
            self.size
        );
        if self.preallocation_given {
            s.push_str(&format!(" preallocation={}", self.preallocation.as_str()));
        }
        s
    }

    fn execute(&self) -> Result<()> {
        // After the "Formatting" line, as qemu-img refuses it.
        if self.preallocation == Preallocation::Metadata {
            return Err(
                Error::invalid_input("Unsupported preallocation mode: metadata")
                    .with_path(&self.path),
            );
        }
        create_raw_with(&self.opener, &self.path, self.size, self.preallocation)
    }
}

/// Creates (or truncates) the raw image at `path` with `size` bytes, rounded up to whole
/// 512-byte sectors as qemu does, preallocated as `mode` says: `Off` sparse, `Falloc`
/// fallocated, `Full` written with zeros (`Metadata` has no meaning for raw files and is
/// refused). Like qemu-img, the first 4 KiB are written so that the file's block size can be
/// probed. A failed create removes the file.
pub fn create_raw(path: &Path, size: u64, mode: Preallocation) -> Result<()> {
    create_raw_with(&Opener::default(), path, size, mode)
}

/// [`create_raw`], the file made through `opener`.
pub fn create_raw_with(opener: &Opener, path: &Path, size: u64, mode: Preallocation) -> Result<()> {
    if mode == Preallocation::Metadata {
        return Err(Error::invalid_input(
            "preallocation=metadata is not supported for raw images (use falloc or full)",
        ));
    }
    let file = create_file(opener, path)?;
    let r = grow_file(file.as_ref(), path, round_size(size), mode).and_then(|()| {
        file.flush()
            .map_err(|e| Error::io("flush failed", e).with_path(path))
    });
    if r.is_err() {
        drop(file);
        opener.remove_failed_output(path);
    }
    r
}
