//! A backing chain being opened: the layers seen so far (to refuse loops and bound the
//! depth), how its files are shared with other programs ([`Sharing`], qemu's image locks), and
//! how names recorded in an image are resolved.
//!
//! Names read from an image are untrusted: a backing file name is resolved relative to the
//! directory of the image that names it, chains that loop are refused, and a chain's depth is
//! bounded by [`MAX_CHAIN_DEPTH`].

use crate::error::{Error, ErrorKind, Result};
use crate::lock::LockRequest;
use crate::opener::{LocatorBuf, Opener};
use crate::storage::FileId;
use std::path::{Path, PathBuf};

/// The deepest backing chain vimg opens (the image itself counts as one layer).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How an open shares its files with other programs, through qemu's image locks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sharing {
    /// What qemu-img takes by default: nobody else may write (or resize) a qcow2 file of the
    /// chain while it is open, raw files are shared, and a file opened for writing may not be
    /// used by anybody else at all.
    #[default]
    Normal,
    /// As `Normal`, and nobody else may write a raw top image either (qemu-img convert's
    /// sources).
    NoWriters,
    /// `-U` / `--force-share`: only reading is announced, on every layer, so images in use by
    /// others can be inspected. Refused for images opened for writing, as in qemu-img.
    ForceShare,
}

/// Refuses to open an image for writing with [`Sharing::ForceShare`], as qemu-img does.
pub fn refuse_forced_write(sharing: Sharing, writable: bool) -> Result<()> {
    if sharing == Sharing::ForceShare && writable {
        return Err(Error::invalid_input(
            "force-share (-U) can only be used with read-only images",
        ));
    }
    Ok(())
}

/// The layers opened so far while walking a chain, to refuse loops and bound the depth, how
/// the chain's files are shared ([`Sharing`]), and the [`Opener`] every layer's storage is
/// opened through.
#[derive(Debug, Default)]
pub struct ChainGuard {
    seen: Vec<LocatorBuf>,
    sharing: Sharing,
    opener: Opener,
    /// The top layer is opened with qemu's `cache.direct=on`.
    cache_direct: bool,
}

impl ChainGuard {
    /// An empty guard for a chain opened with `sharing`, through an opener without settings.
    pub fn new(sharing: Sharing) -> Self {
        Self::with_opener(sharing, Opener::default())
    }

    /// An empty guard for a chain opened with `sharing` through `opener`.
    pub fn with_opener(sharing: Sharing, opener: Opener) -> Self {
        ChainGuard {
            seen: Vec::new(),
            sharing,
            opener,
            cache_direct: false,
        }
    }

    /// Opens the top layer as qemu does with `cache.direct=on` (see
    /// [`crate::open::OpenOptions::cache_direct`]).
    pub fn set_cache_direct(&mut self, on: bool) {
        self.cache_direct = on;
    }

    /// Whether the layer being opened is the top one and opened with `cache.direct=on` (set
    /// here, or by an opener that opens with `O_DIRECT`).
    pub fn cache_direct(&self) -> bool {
        (self.cache_direct || self.opener.direct()) && self.depth() <= 1
    }

    /// The opener the chain's storage is opened through.
    pub fn opener(&self) -> &Opener {
        &self.opener
    }

    /// How the chain's files are shared.
    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// The image locks for the external data file of a layer (see [`LockRequest::data_file`]).
    pub fn data_file_locks(&self, writable: bool) -> Result<LockRequest> {
        refuse_forced_write(self.sharing, writable)?;
        Ok(match self.sharing {
            Sharing::ForceShare => LockRequest::force_share(),
            _ => LockRequest::data_file(writable),
        })
    }

    /// Registers `path` as the next layer; fails if it is already in the chain (spelt
    /// otherwise, [`Opener::canonical`]) or the chain is too deep.
    pub fn enter(&mut self, path: &Path) -> Result<()> {
        let id = self
            .opener
            .canonical(path)
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
        if self.seen.contains(&id) {
            // qemu-img's words, which scripts match.
            return Err(Error::new(
                ErrorKind::BackingChain,
                format!(
                    "Backing file '{}' creates an infinite loop.",
                    path.display()
                ),
            )
            .with_path(path)
            .bare());
        }
        if self.seen.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::new(
                ErrorKind::BackingChain,
                format!("backing chain is deeper than {MAX_CHAIN_DEPTH} layers"),
            )
            .with_path(path));
        }
        self.seen.push(id);
        Ok(())
    }

    /// How many layers are open.
    pub fn depth(&self) -> usize {
        self.seen.len()
    }
}

/// Whether `a` and `b` are the same file (device and inode); `false` if either is missing.
pub fn same_file(a: &Path, b: &Path) -> bool {
    Opener::default().same(a, b)
}

/// Whether `a` and `b` are the same file: by device and inode (so that links are caught), or
/// by name where either does not exist (a file about to be created).
pub fn same_file_or_name(a: &Path, b: &Path) -> bool {
    match (FileId::of(a), FileId::of(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Resolves a file name recorded in the image at `image` (a backing or data file name) against
/// that image's directory, as qemu does, through an opener without settings (see
/// [`Opener::resolve`]). Protocol names (`nbd://`, `json:{...}`) are refused.
pub fn resolve_relative(image: &Path, name: &str) -> Result<PathBuf> {
    Opener::default().resolve(image, name)
}
