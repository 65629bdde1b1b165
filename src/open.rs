//! Opening images by locator: format selection (given, recorded, or probed), and backing
//! chains. Every file is opened through the [`Opener`] of the [`OpenOptions`].
//!
//! Names read from an image are untrusted: a backing file name is resolved by the opener
//! against the image that names it (for a file, relative to its directory), the format
//! recorded in the image is used as is (probing happens only where none is recorded, and the
//! layer reports that it did), chains that loop are refused, and a chain's depth is bounded by
//! [`MAX_CHAIN_DEPTH`].
//!
//! Every file of a chain is opened with qemu's image locks ([`crate::lock`]): what each layer
//! takes follows from its format, whether it is written, and the [`Sharing`] of the open,
//! which the [`ChainGuard`] carries down the chain.

use crate::block::{BlockImage, ImageFormat};
pub use crate::chain::{
    refuse_forced_write, resolve_relative, same_file, ChainGuard, Sharing, MAX_CHAIN_DEPTH,
};
use crate::error::{Error, Result};
use crate::opener::Opener;
use crate::probe::Probed;
use std::path::Path;

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
    /// What opens the storage of every layer (the image, its backing files, data files),
    /// with the command's settings for particular files.
    pub opener: Opener,
    /// qemu's `cache.direct=on`: the files of the image are opened with `O_DIRECT` (as
    /// through [`Opener::with_direct`]), which also changes how a raw image reports block
    /// status (see [`crate::raw::RawImage::direct`]).
    pub cache_direct: bool,
}

/// Opens the image at `path` with its whole backing chain.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockImage>> {
    let opener = match opts.cache_direct {
        true => opts.opener.with_direct(true),
        false => opts.opener.clone(),
    };
    let mut guard = ChainGuard::with_opener(opts.sharing, opener);
    guard.set_cache_direct(opts.cache_direct);
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
        None => match probe_file_with(guard.opener(), path)? {
            Probed::Ova => {
                let disk = appliance_disk(guard.opener(), path)?;
                let format = probe_format_with(guard.opener(), &disk)?;
                return format.driver().open(&disk, writable, no_backing, guard);
            }
            p => format_of(p, path)?,
        },
    };
    format.driver().open(path, writable, no_backing, guard)
}

/// The locator of the disk an OVA appliance at `path` holds (its only one; several are
/// refused with their list): `ova:PATH,disk=MEMBER`.
fn appliance_disk(opener: &Opener, path: &Path) -> Result<std::path::PathBuf> {
    let storage = opener
        .open_to_look(path)
        .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
    let len = storage
        .len()
        .map_err(|e| Error::io("cannot get image size", e).with_path(path))?;
    let app = crate::ova::Appliance::read(storage.as_ref(), len).map_err(|e| e.with_path(path))?;
    let (_, m) = app.pick(path, None).map_err(|e| e.with_path(path))?;
    Ok(crate::ova::DiskLocator::name(path, &m.name))
}

/// Guesses the format of the file at `path` from its bytes, as qemu does ([`crate::probe`]):
/// qcow2 by its magic, anything no format claims raw. A format qemu knows and vimg does not
/// read (vmdk, vhdx, ...) is refused by name. Takes no image locks (the file is only looked
/// at).
pub fn probe_format(path: &Path) -> Result<ImageFormat> {
    probe_format_with(&Opener::default(), path)
}

/// [`probe_format`], opening the file through `opener`.
pub fn probe_format_with(opener: &Opener, path: &Path) -> Result<ImageFormat> {
    format_of(probe_file_with(opener, path)?, path)
}

/// The format a probe found, or why vimg does not open the file as it is.
fn format_of(probed: Probed, path: &Path) -> Result<ImageFormat> {
    match probed {
        Probed::Ova => Err(Error::unsupported(format!(
            "the file is an OVA appliance: name its disk as '{}'",
            crate::ova::DiskLocator::name(path, "NAME").display()
        ))
        .with_path(path)),
        Probed::Supported(f) => Ok(f),
        Probed::Foreign(f) => Err(f.not_supported().with_path(path)),
        Probed::FixedVhd { size_matches: true } => {
            note_fixed_vhd(path);
            Ok(ImageFormat::Vpc)
        }
        Probed::FixedVhd { size_matches: false } => Err(Error::unsupported(
            "the file ends with a fixed VHD footer, which qemu-img probes as raw: give -f vpc to read the VHD's disk or -f raw to copy the file's bytes",
        )
        .with_path(path)),
    }
}

/// Says on stderr, once per file and process, that a file probed as a fixed VHD is read as
/// vpc where qemu-img would read it as raw.
fn note_fixed_vhd(path: &Path) {
    static NOTED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
    if noted.iter().any(|p| p == path) {
        return;
    }
    noted.push(path.to_path_buf());
    eprintln!(
        "vimg: note: '{}' ends with a fixed VHD footer; reading it as vpc (qemu-img would probe it as raw; give -f raw for the file's bytes)",
        path.display()
    );
}

/// What the file at `path` is, as [`crate::probe::probe`] finds it.
pub fn probe_file(path: &Path) -> Result<Probed> {
    probe_file_with(&Opener::default(), path)
}

/// [`probe_file`], opening the file through `opener`.
pub fn probe_file_with(opener: &Opener, path: &Path) -> Result<Probed> {
    let storage = opener
        .open_to_look(path)
        .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
    let read_failed = |e| Error::io("Could not read image for determining its format", e);
    let len = storage.len().map_err(|e| read_failed(e).with_path(path))?;
    crate::probe::probe_storage(storage.as_ref(), len, path)
        .map_err(|e| read_failed(e).with_path(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

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
