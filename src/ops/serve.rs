//! `vimg serve`: export an image over NBD, in qemu-nbd's place (see [`crate::nbd::server`]).
//!
//! Any image vimg opens can be served (every format, backing chains, block devices). `-s`
//! serves a temporary qcow2 overlay over the image (created in `$TMPDIR`, removed at exit),
//! so that the image itself is never written; `-l` serves an internal snapshot, read-only.

use crate::live::control::{Control, ExportFactory, ExportRequest};
use crate::nbd::server::{
    self, CacheMode, Contexts, DetectZeroes, Export, ExportSettings, ListenConfig, Registry,
};
use crate::open::{open_image, OpenOptions};
use crate::opener::Opener;
use crate::{BlockImage, Error, ImageFormat, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `vimg serve` was asked.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The image.
    pub path: PathBuf,
    /// Its format (`-f`); probed when `None`.
    pub format: Option<ImageFormat>,
    /// What opens the image's files (with the command's secrets and settings).
    pub opener: Opener,
    /// The image name asked for `cache.direct=on`.
    pub direct: bool,
    /// `-r`.
    pub readonly: bool,
    /// `-s`: writes go to a temporary overlay.
    pub snapshot: bool,
    /// `-l SNAPSHOT`: serve an internal snapshot (read-only).
    pub load_snapshot: Option<String>,
    /// `-B NAME`, repeatable.
    pub bitmaps: Vec<String>,
    /// `-A`.
    pub allocation_depth: bool,
    /// `-x NAME`.
    pub export_name: String,
    /// `-D TEXT`.
    pub description: Option<String>,
    /// `--cache` (`-n` is `none`).
    pub cache: CacheMode,
    /// `--discard=unmap`.
    pub discard_unmap: bool,
    /// `--detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// Sockets and lifetime.
    pub listen: ListenConfig,
    /// `--control SOCKET`: a control socket (exports added and removed, backups); the server
    /// is then persistent, as qemu-storage-daemon.
    pub control: Option<PathBuf>,
}

/// Parses `--discard`: `ignore`/`off` or `unmap`/`on`; whether discards unmap.
pub fn parse_discard(s: &str) -> Result<bool> {
    match s {
        "ignore" | "off" => Ok(false),
        "unmap" | "on" => Ok(true),
        _ => Err(Error::invalid_input(format!("Invalid discard mode '{s}'")).bare()),
    }
}

/// Parses `--detect-zeroes`.
pub fn parse_detect_zeroes(s: &str) -> Result<DetectZeroes> {
    match s {
        "off" => Ok(DetectZeroes::Off),
        "on" => Ok(DetectZeroes::On),
        "unmap" => Ok(DetectZeroes::Unmap),
        _ => Err(Error::invalid_input(format!(
            "Parameter 'detect-zeroes' does not accept value '{s}'"
        ))
        .bare()),
    }
}

/// Checks `--aio` (accepted for qemu-nbd compatibility: vimg's I/O is its own).
pub fn check_aio(s: &str) -> Result<()> {
    match s {
        "threads" | "native" | "io_uring" => Ok(()),
        _ => Err(Error::invalid_input(format!("invalid aio mode '{s}'")).bare()),
    }
}

/// Parses `--cache`.
pub fn parse_cache(s: &str) -> Result<CacheMode> {
    CacheMode::parse(s)
        .ok_or_else(|| Error::invalid_input(format!("Invalid cache mode '{s}'")).bare())
}

/// Opens the image as asked and serves it until stopped.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    if opts.detect_zeroes == DetectZeroes::Unmap && !opts.discard_unmap {
        return Err(Error::invalid_input(
            "--detect-zeroes=unmap can only be used if --discard=unmap",
        )
        .bare());
    }
    let (image, temporary) = open_served(opts)?;
    let readonly = opts.readonly || opts.load_snapshot.is_some();
    let contexts = Contexts::new(image.as_ref(), opts.allocation_depth, &opts.bitmaps)?;
    let settings = ExportSettings {
        name: opts.export_name.clone(),
        description: opts.description.clone(),
        readonly,
        discard_unmap: opts.discard_unmap,
        detect_zeroes: opts.detect_zeroes,
        cache: opts.cache,
        multi_conn: readonly || opts.listen.shared != 1,
    };
    let export = Export::new(image, settings, contexts, temporary);
    let Some(control) = &opts.control else {
        return server::run(export, &opts.listen);
    };
    let exports = Arc::new(Registry::single(export));
    let control = Control::bind(control.clone(), exports.clone(), export_factory(opts))?;
    let listen = ListenConfig {
        persistent: true,
        ..opts.listen.clone()
    };
    server::run_with(exports, &listen, Some(&control))
}

/// What opens the images of `export-add`: as the command line's image (cache mode, discard,
/// detect-zeroes, secrets), each export allowing several clients.
fn export_factory(opts: &ServeOptions) -> ExportFactory {
    let opts = opts.clone();
    Box::new(move |req: &ExportRequest| {
        let format = match &req.format {
            Some(f) => Some(ImageFormat::from_name(f)?),
            None => None,
        };
        let image = open_image(&req.file, &open_options(&opts, format, !req.readonly))?;
        let contexts = Contexts::new(image.as_ref(), false, &req.bitmaps)?;
        let settings = ExportSettings {
            name: req.name.clone(),
            description: req.description.clone(),
            readonly: req.readonly,
            discard_unmap: opts.discard_unmap,
            detect_zeroes: opts.detect_zeroes,
            cache: opts.cache,
            multi_conn: true,
        };
        Ok(Export::new(image, settings, contexts, None))
    })
}

fn open_options(opts: &ServeOptions, format: Option<ImageFormat>, writable: bool) -> OpenOptions {
    OpenOptions {
        format,
        writable,
        no_backing: false,
        sharing: Default::default(),
        opener: opts.opener.clone(),
        cache_direct: opts.direct || opts.cache.direct(),
    }
}

/// The image to serve, and the temporary overlay to remove afterwards (`-s`).
fn open_served(opts: &ServeOptions) -> Result<(Box<dyn BlockImage>, Option<PathBuf>)> {
    if let Some(sel) = &opts.load_snapshot {
        let sel = crate::qcow2::SnapshotSelector::parse(sel)?;
        let opener = opts.opener.with_direct(opts.direct || opts.cache.direct());
        let image = crate::qcow2::open_image_snapshot(&opts.path, opts.format, &sel, &opener)?;
        return Ok((image, None));
    }
    if !opts.snapshot {
        let image = open_image(&opts.path, &open_options(opts, opts.format, !opts.readonly))?;
        return Ok((image, None));
    }
    // -s: a qcow2 overlay over the image, in $TMPDIR, removed at exit.
    let base = open_image(&opts.path, &open_options(opts, opts.format, false))?;
    let size = base.virtual_size();
    let format = base.format();
    drop(base);
    let backing = std::fs::canonicalize(&opts.path)
        .map_err(|e| Error::io("cannot resolve the image's path", e).with_path(&opts.path))?;
    let overlay = temporary_name()?;
    let guard = crate::interrupt::remove_on_signal(&overlay);
    crate::qcow2::create_with(
        &opts.opener,
        &overlay,
        &crate::qcow2::CreateOptions {
            size,
            backing_file: Some(backing.to_string_lossy().into_owned()),
            backing_fmt: Some(format.as_str().to_string()),
            ..Default::default()
        },
    )?;
    let image = open_image(
        &overlay,
        &open_options(opts, Some(ImageFormat::Qcow2), !opts.readonly),
    );
    drop(guard);
    match image {
        Ok(image) => Ok((image, Some(overlay))),
        Err(e) => {
            let _ = std::fs::remove_file(&overlay);
            Err(e)
        }
    }
}

/// A new file name in `$TMPDIR` (or /tmp) for the `-s` overlay, created empty.
fn temporary_name() -> Result<PathBuf> {
    let dir = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    for i in 0..100u64 {
        let p: PathBuf = dir.join(format!(
            "vimg-serve.{:016x}.qcow2",
            u64::from_le_bytes(seed).wrapping_add(i)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("cannot create the temporary overlay", e).with_path(&p)),
        }
    }
    Err(
        Error::invalid_input("cannot find a free name for the temporary overlay")
            .with_path(Path::new(&dir)),
    )
}
