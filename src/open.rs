//! Opening images by path: format selection (given, recorded, or probed), and backing chains.
//!
//! Names read from an image are untrusted: a backing file name is resolved relative to the
//! directory of the image that names it, the format recorded in the image is used as is
//! (probing happens only where none is recorded, and the layer reports that it did), chains
//! that loop are refused, and a chain's depth is bounded by [`MAX_CHAIN_DEPTH`].
//!
//! Every file of a chain is opened with qemu's image locks ([`crate::lock`]): what each layer
//! takes follows from its format, whether it is written, and the [`Sharing`] of the open,
//! which the [`ChainGuard`] carries down the chain.

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, ErrorKind, Result};
use crate::lock::LockRequest;
use crate::probe::Probed;
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use crate::storage::Storage;
use std::path::{Path, PathBuf};

/// The deepest backing chain vimg opens (the image itself counts as one layer).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The image's format; `None` probes it.
    pub format: Option<ImageFormat>,
    /// Open the top layer for writing (backing layers are always read-only).
    pub writable: bool,
    /// Do not open backing files (qemu-img's `-u` style operations, and `info` without a chain
    /// when the backing file is missing).
    pub no_backing: bool,
    /// How the files are shared with other programs (`-U` is [`Sharing::ForceShare`]).
    pub sharing: Sharing,
}

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

/// The layers opened so far while walking a chain, to refuse loops and bound the depth, and
/// how the chain's files are shared ([`Sharing`]).
#[derive(Debug, Default)]
pub struct ChainGuard {
    seen: Vec<PathBuf>,
    sharing: Sharing,
}

impl ChainGuard {
    /// An empty guard for a chain opened with `sharing`.
    pub fn new(sharing: Sharing) -> Self {
        ChainGuard {
            seen: Vec::new(),
            sharing,
        }
    }

    /// How the chain's files are shared.
    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// The image locks for a layer of `format` opened for writing or not; `top` says whether it
    /// is the image named by the user rather than one of its backing files. Fails for a
    /// writable layer under [`Sharing::ForceShare`].
    pub fn locks(&self, format: ImageFormat, writable: bool, top: bool) -> Result<LockRequest> {
        refuse_forced_write(self.sharing, writable)?;
        Ok(match (self.sharing, format) {
            (Sharing::ForceShare, _) => LockRequest::force_share(),
            (_, ImageFormat::Qcow2) => LockRequest::exclusive(writable),
            (_, ImageFormat::Raw) if writable => LockRequest::exclusive(true),
            (Sharing::NoWriters, ImageFormat::Raw) if top => LockRequest::exclusive(false),
            (_, ImageFormat::Raw) => LockRequest::shared_read(),
        })
    }

    /// The image locks for the external data file of a layer (see [`LockRequest::data_file`]).
    pub fn data_file_locks(&self, writable: bool) -> Result<LockRequest> {
        match self.locks(ImageFormat::Qcow2, writable, false)? {
            l if l == LockRequest::force_share() => Ok(l),
            _ => Ok(LockRequest::data_file(writable)),
        }
    }

    /// Registers `path` as the next layer; fails if it is already in the chain or the chain is
    /// too deep.
    pub fn enter(&mut self, path: &Path) -> Result<()> {
        let canon = std::fs::canonicalize(path)
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
        if self.seen.contains(&canon) {
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
        self.seen.push(canon);
        Ok(())
    }

    /// How many layers are open.
    pub fn depth(&self) -> usize {
        self.seen.len()
    }
}

/// Opens the image at `path` with its whole backing chain.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockImage>> {
    let mut guard = ChainGuard::new(opts.sharing);
    open_layer(
        path,
        opts.format,
        opts.writable,
        opts.no_backing,
        &mut guard,
    )
}

/// Opens one layer (and, unless `no_backing`, the layers below it), registering it in `guard`.
pub fn open_layer(
    path: &Path,
    format: Option<ImageFormat>,
    writable: bool,
    no_backing: bool,
    guard: &mut ChainGuard,
) -> Result<Box<dyn BlockImage>> {
    open_layer_inner(path, format, writable, no_backing, guard).map_err(Error::while_opening)
}

fn open_layer_inner(
    path: &Path,
    format: Option<ImageFormat>,
    writable: bool,
    no_backing: bool,
    guard: &mut ChainGuard,
) -> Result<Box<dyn BlockImage>> {
    guard.enter(path)?;
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    Ok(match format {
        ImageFormat::Raw => {
            let locks = guard
                .locks(ImageFormat::Raw, writable, guard.depth() == 1)
                .map_err(|e| e.with_path(path))?;
            Box::new(RawImage::open_with(path, writable, locks)?)
        }
        ImageFormat::Qcow2 => Box::new(Qcow2Image::open(path, writable, no_backing, guard)?),
    })
}

/// Guesses the format of the file at `path` from its bytes, as qemu does ([`crate::probe`]):
/// qcow2 by its magic, anything no format claims raw. A format qemu knows and vimg does not
/// read (vmdk, vhdx, ...) is refused by name. Takes no image locks (the file is only looked
/// at).
pub fn probe_format(path: &Path) -> Result<ImageFormat> {
    match probe_file(path)? {
        Probed::Supported(f) => Ok(f),
        Probed::Foreign(f) => Err(f.not_supported().with_path(path)),
    }
}

/// What the file at `path` is, as [`crate::probe::probe`] finds it.
pub fn probe_file(path: &Path) -> Result<Probed> {
    let storage =
        crate::storage::FileStorage::open_with(path, false, crate::lock::LockRequest::NONE)
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
    let read_failed = |e| Error::io("Could not read image for determining its format", e);
    let len = storage.len().map_err(|e| read_failed(e).with_path(path))?;
    crate::probe::probe_storage(&storage, len, path).map_err(|e| read_failed(e).with_path(path))
}

/// Whether `a` and `b` are the same file (device and inode); `false` if either is missing.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Resolves a file name recorded in the image at `image` (a backing or data file name) against
/// that image's directory, as qemu does. Protocol names (`nbd://`, `json:{...}`) are refused.
pub fn resolve_relative(image: &Path, name: &str) -> Result<PathBuf> {
    // A json: name with a blkdebug node (qemu's iotests record such backing files) names its
    // file as given, relative to the working directory as in qemu.
    if let Some(r) = crate::blkdebug::resolve_json_name(name) {
        return r.map_err(|e| e.with_path(image));
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::unsupported(format!(
            "file name '{name}' uses a protocol or JSON syntax vimg does not support"
        ))
        .with_path(image));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_against_the_image_directory() {
        let img = Path::new("/images/vm/top.qcow2");
        assert_eq!(
            resolve_relative(img, "base.qcow2").unwrap(),
            PathBuf::from("/images/vm/base.qcow2")
        );
        assert_eq!(
            resolve_relative(img, "../b/base.raw").unwrap(),
            PathBuf::from("/images/vm/../b/base.raw")
        );
        assert_eq!(
            resolve_relative(img, "/abs/x.raw").unwrap(),
            PathBuf::from("/abs/x.raw")
        );
        assert_eq!(
            resolve_relative(Path::new("top.qcow2"), "b.raw").unwrap(),
            PathBuf::from("b.raw")
        );
        for bad in ["json:{\"driver\":\"raw\"}", "nbd://host/x", "http://x/y"] {
            assert_eq!(
                resolve_relative(img, bad).unwrap_err().kind(),
                ErrorKind::Unsupported
            );
        }
    }

    #[test]
    fn chain_guard_refuses_loops_through_other_spellings_of_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.raw");
        std::fs::write(&a, b"x").unwrap();
        let mut g = ChainGuard::default();
        g.enter(&a).unwrap();
        let again = dir.path().join(".").join("a.raw");
        let e = g.enter(&again).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BackingChain);
        assert!(e.to_string().contains("creates an infinite loop"), "{e}");
        assert_eq!(g.depth(), 1);
    }

    #[test]
    fn probing_tells_qcow2_from_raw() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
        let r = dir.path().join("r");
        std::fs::write(&r, b"QFI").unwrap();
        assert_eq!(probe_format(&q).unwrap(), ImageFormat::Qcow2);
        assert_eq!(probe_format(&r).unwrap(), ImageFormat::Raw);
        assert_eq!(
            probe_format(&dir.path().join("none")).unwrap_err().kind(),
            ErrorKind::Io
        );
    }
}
