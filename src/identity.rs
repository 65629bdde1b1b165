//! Which files an image reads, by identity (device and inode), so that no command writes over
//! a file it is reading: a target that is a source image, a file of a source's backing chain
//! or a layer's external data file is refused, whatever name (symbolic link, hard link, `./`
//! spelling) it is given under.
//!
//! qemu-img gets this from its image locks: the target's open for writing conflicts with the
//! source's. vimg writes new outputs under a temporary name first, which conflicts with
//! nothing, so the commands ask here before they start.

use crate::block::BlockImage;
use crate::error::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};

pub use crate::storage::FileId;

/// What a file is to the image that reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The image named by the user.
    Image,
    /// A backing file of the image (at any depth).
    Backing,
    /// The external data file of a layer.
    DataFile,
}

impl Role {
    fn describe(self) -> &'static str {
        match self {
            Role::Image => "the image being read",
            Role::Backing => "a backing file of the image being read",
            Role::DataFile => "the external data file of an image being read",
        }
    }
}

/// A file an image reads: its identity, its name as the image knows it, and its role.
#[derive(Debug, Clone)]
pub struct ChainFile {
    /// The file's identity.
    pub id: FileId,
    /// The file's name (as opened, or as recorded and resolved).
    pub path: PathBuf,
    /// What the file is to the image.
    pub role: Role,
}

/// Every file `img` reads: each layer of its backing chain and each layer's external data file
/// (files that do not exist are left out).
pub fn chain_files(img: &dyn BlockImage) -> Vec<ChainFile> {
    let mut out = Vec::new();
    let mut layer = Some(img);
    let mut role = Role::Image;
    while let Some(l) = layer {
        if let Some(id) = FileId::of(l.filename()) {
            out.push(ChainFile {
                id,
                path: l.filename().to_path_buf(),
                role,
            });
        }
        if let Some(p) = l.data_file_path() {
            if let Some(id) = FileId::of(p) {
                out.push(ChainFile {
                    id,
                    path: p.to_path_buf(),
                    role: Role::DataFile,
                });
            }
        }
        role = Role::Backing;
        layer = l.backing();
    }
    out
}

/// The file of `sources` (their chains and data files) that `target` is, if any.
pub fn read_by(target: &Path, sources: &[&dyn BlockImage]) -> Option<ChainFile> {
    let id = FileId::of(target)?;
    sources
        .iter()
        .flat_map(|s| chain_files(*s))
        .find(|f| f.id == id)
}

/// Refuses to write `target` when it is one of the files `sources` read, with qemu-img's
/// words for the conflict of its two opens (`Failed to get "write" lock`), then what vimg
/// knows: which file of the source it is. `context` is qemu-img's prefix for the command
/// (e.g. `error while converting qcow2`), or empty.
pub fn refuse_target(target: &Path, sources: &[&dyn BlockImage], context: &str) -> Result<()> {
    match read_by(target, sources) {
        None => Ok(()),
        Some(f) => Err(conflict(target, &f, context, false)),
    }
}

/// The error for writing `target`, which is `file` of a source. `shared` words it as qemu does
/// when the file would be read after being opened for writing (`Failed to get shared "write"
/// lock`).
pub fn conflict(target: &Path, file: &ChainFile, context: &str, shared: bool) -> Error {
    let shared = if shared { "shared " } else { "" };
    let prefix = if context.is_empty() {
        String::new()
    } else {
        format!("{context}: ")
    };
    let which = if file.path == target {
        format!("it is {}", file.role.describe())
    } else {
        format!("it is {} ({})", file.role.describe(), file.path.display())
    };
    Error::new(
        ErrorKind::Locked,
        format!(
            "{prefix}Failed to get {shared}\"write\" lock: Is another process using the image [{}]? \
             No: {which}, which would be overwritten while it is read",
            target.display()
        ),
    )
    .with_path(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::RawImage;

    #[test]
    fn links_and_spellings_are_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.raw");
        RawImage::create(&a, 4096).unwrap();
        let hard = dir.path().join("h.raw");
        std::fs::hard_link(&a, &hard).unwrap();
        let soft = dir.path().join("s.raw");
        std::os::unix::fs::symlink("a.raw", &soft).unwrap();
        let other = dir.path().join("o.raw");
        RawImage::create(&other, 4096).unwrap();
        let img = RawImage::open(&a, false).unwrap();
        let srcs: [&dyn BlockImage; 1] = [&img];
        for t in [&a, &hard, &soft, &dir.path().join(".").join("a.raw")] {
            let e = refuse_target(t, &srcs, "").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Locked);
            assert!(
                e.to_string().contains("Failed to get \"write\" lock"),
                "{e}"
            );
        }
        refuse_target(&other, &srcs, "").unwrap();
        refuse_target(&dir.path().join("new.raw"), &srcs, "").unwrap();
    }
}
