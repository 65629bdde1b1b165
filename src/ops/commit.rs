//! `vimg commit [-b BASE] [-d] [-r RATE] IMAGE`: writes what an overlay holds into a layer
//! below it, as `qemu-img commit` does.
//!
//! Without `-b` the overlay's data goes into its backing file, and the overlay is emptied
//! afterwards (unless `-d`), so that it reads through to the backing file again. With
//! `-b BASE`, everything the layers above BASE hold goes into BASE; as in qemu-img 10 (whose
//! `-b` implies `-d`) no image is emptied and no backing file pointer changes: the layers in
//! between stay in the chain, now holding nothing the top does not read the same way through
//! them. BASE is named as qemu-img matches it: the name is resolved against the directory of
//! each layer in turn and compared with the file that layer's backing file name designates.
//!
//! The copy is driven by block status: ranges the layers above the base leave unallocated
//! are not read at all; ranges that read as zeros there become zeros in the base (written
//! only where the base does not read as zeros already) rather than letting the base show
//! through; the rest is read through the overlay and written into the base, with reading and
//! writing overlapped. A base smaller than the overlay grows to the overlay's size first, as
//! qemu-img grows it.
//!
//! # Crash safety
//!
//! The base is written completely and flushed (data and metadata durable) before the overlay is
//! emptied (see the format's [`crate::capability::MakeEmpty`] for the order within that step). Only
//! ranges the layers above the base allocate are written into the base, so the overlay reads the
//! same throughout; an interruption at any point leaves at worst leaked clusters.

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::offsets::GuestOffset;
use crate::open::same_file;
use crate::open::{open_image, probe_format_with, resolve_relative, OpenOptions};
use crate::opener::Opener;
use crate::ops::transfer::{status, Progress, CHUNK};
use crate::prealloc::Preallocation;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What qemu-img prints after a successful commit.
pub const COMMITTED: &str = "Image committed.";
/// qemu-img's message for committing an image without a backing file.
pub const NO_BACKING: &str = "Image does not have a backing file";

/// Chunks read ahead of the one being written.
const READ_AHEAD: usize = 4;

/// The cache modes qemu-img's `-t` accepts. `unsafe` skips waiting for the disk (writes are
/// still ordered); every other mode waits at each flush. `none` and `directsync` open the
/// files with `O_DIRECT` ([`CacheMode::direct`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `none` (or `off`): `O_DIRECT`, waiting for the disk at flushes.
    None,
    /// `writeback`, qemu-img's default for commit and rebase.
    #[default]
    Writeback,
    /// `writethrough`.
    Writethrough,
    /// `directsync`: `O_DIRECT`, waiting for the disk at flushes.
    Directsync,
    /// `unsafe`: flushes order their writes but do not wait for the disk.
    Unsafe,
}

impl CacheMode {
    /// Parses a `-t` value, with qemu-img's message for an unknown one.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            other => {
                return Err(Error::invalid_input(format!(
                    "Invalid cache option: {other}"
                )))
            }
        })
    }

    /// Whether flushes wait for the disk.
    pub fn syncs(self) -> bool {
        self != CacheMode::Unsafe
    }

    /// Whether the files are opened bypassing the host's cache (`O_DIRECT`, qemu's
    /// `cache.direct=on`): `none` and `directsync`.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
}

/// Parses a `-r RATE` value (bytes per second, with qemu-img's size suffixes; 0 means no
/// limit), with qemu-img's messages.
pub fn parse_rate_limit(text: &str) -> Result<u64> {
    let t = text.trim();
    let range = || {
        Error::invalid_input(format!(
            "Invalid rate limit specified. Must be between 0 and {}.",
            i64::MAX
        ))
    };
    if let Some(rest) = t.strip_prefix('-') {
        return Err(if crate::ops::size::parse_size(rest).is_ok() {
            range()
        } else {
            Error::invalid_input(format!("Invalid rate limit specified: '{text}'."))
        });
    }
    crate::ops::size::parse_size(t).map_err(|e| {
        if e.what().contains("too large") {
            range()
        } else {
            Error::invalid_input(format!("Invalid rate limit specified: '{text}'."))
        }
    })
}

/// How to commit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The overlay's format (`-f`); probed when `None`.
    pub format: Option<ImageFormat>,
    /// The layer to commit into (`-b`), named as qemu-img matches it; `None` for the backing
    /// file. Giving it implies `drop`.
    pub base: Option<String>,
    /// Do not empty the overlay afterwards (`-d`).
    pub drop: bool,
    /// Bytes per second to write at most (`-r`); 0 for no limit.
    pub rate_limit: u64,
    /// Cache mode of the images written (`-t`).
    pub cache: CacheMode,
    /// What opens the storage of the chain's layers.
    pub opener: Opener,
}

/// The layer of `top`'s chain that `name` designates, and its depth (1 for the backing file):
/// without a name the backing file; with one, the first layer whose backing file is the file
/// `name` names when resolved against that layer's directory (qemu-img's matching).
pub fn find_base<'a>(
    top: &'a dyn BlockImage,
    name: Option<&str>,
) -> Result<(u32, &'a dyn BlockImage)> {
    let Some(first) = top.backing() else {
        return Err(Error::invalid_input(NO_BACKING).with_path(top.filename()));
    };
    let Some(name) = name else {
        return Ok((1, first));
    };
    let mut layer = top;
    let mut depth = 1u32;
    while let Some(below) = layer.backing() {
        if let Ok(wanted) = resolve_relative(layer.filename(), name) {
            if same_file(&wanted, below.filename()) {
                return Ok((depth, below));
            }
        }
        layer = below;
        depth += 1;
    }
    Err(Error::invalid_input(format!(
        "Did not find '{name}' in the backing chain of '{}'",
        top.filename().display()
    )))
}

/// [`find_base`] for the image at `path` opened by `opener`: when its image name gave its
/// backing file strong options of its own (`backing.encrypt.key-secret`), qemu names that
/// backing file by them (`json:{...}`, [`crate::node_name`]) and compares `name` with that
/// name only, as the backing file of an overridden layer has no file name to resolve against.
fn find_base_of<'a>(
    path: &Path,
    top: &'a dyn BlockImage,
    name: Option<&str>,
    opener: &Opener,
) -> Result<(u32, &'a dyn BlockImage)> {
    let (Some(wanted), Some(first)) = (name, top.backing()) else {
        return find_base(top, name);
    };
    let file = first.filename().display().to_string();
    let Some(json) = opener.overridden_backing_name(path, first.format().as_str(), &file) else {
        return find_base(top, name);
    };
    if wanted == json {
        return Ok((1, first));
    }
    match find_base(first, name) {
        Ok((depth, layer)) => Ok((depth + 1, layer)),
        Err(_) => Err(Error::invalid_input(format!(
            "Did not find '{wanted}' in the backing chain of '{}'",
            top.filename().display()
        ))),
    }
}

/// Opens the file of chain layer `layer` for writing, in the format it was opened with and
/// with its own backing chain (so that zero writes know what lies below it), as a commit's
/// target.
pub fn open_target(
    layer: &dyn BlockImage,
    cache: CacheMode,
    opener: &Opener,
) -> Result<Box<dyn BlockImage>> {
    let img = open_image(
        layer.filename(),
        &OpenOptions {
            format: Some(layer.format()),
            writable: true,
            opener: opener.clone(),
            ..OpenOptions::default()
        },
    )?;
    img.set_unsafe_cache(!cache.syncs());
    Ok(img)
}

/// Grows `base` to `size` bytes if it is smaller, and flushes it.
fn grow(base: &mut dyn BlockImage, size: u64) -> Result<()> {
    if base.virtual_size() >= size {
        return Ok(());
    }
    let path = base.filename().to_path_buf();
    let format = base.format();
    base.as_resize_mut()
        .ok_or_else(|| {
            Error::unsupported(format!(
                "the base ({format}) is smaller than the image and cannot grow"
            ))
        })
        .in_file(&path)?
        .resize(size, Preallocation::Off)
        .in_file(&path)?;
    base.flush()
}

/// Keeps writes at or below a rate (bytes per second; 0 for none) by sleeping.
struct RateLimiter {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl RateLimiter {
    fn new(rate: u64) -> Self {
        RateLimiter {
            rate,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// The largest piece to write at once: small enough that the pace stays smooth.
    fn chunk(&self) -> u64 {
        if self.rate == 0 {
            CHUNK
        } else {
            (self.rate / 8).clamp(64 << 10, CHUNK) / 512 * 512
        }
    }

    /// Counts `n` bytes written; sleeps until they are due.
    fn account(&mut self, n: u64) {
        if self.rate == 0 {
            return;
        }
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// Copies into `base` (opened for writing) everything `top`'s chain holds above `base_depth`,
/// the depth of `base`'s layer in that chain (see the module documentation), growing `base`
/// to `top`'s size first if it is smaller, and flushes `base`. Writes at most `rate_limit`
/// bytes per second (0: no limit). `progress` is told how much of `top`'s disk was walked.
pub fn commit_into(
    top: &dyn BlockImage,
    base_depth: u32,
    base: &mut dyn BlockImage,
    rate_limit: u64,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    let size = top.virtual_size();
    grow(base, size)?;
    let dst: &dyn BlockImage = base;
    let mut limiter = RateLimiter::new(rate_limit);
    let chunk = limiter.chunk();
    if let Some(p) = progress {
        p(0, size);
    }
    // Block status (which may descend into the base's read-only twin in `top`'s chain) and
    // writes happen on this thread; a reader thread reads the data ahead, only ever from
    // layers above the base.
    std::thread::scope(|s| -> Result<()> {
        let (req_tx, req_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(READ_AHEAD);
        let (done_tx, done_rx) = mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(READ_AHEAD);
        s.spawn(move || {
            for (off, mut buf) in req_rx {
                let r = top.read_at(&mut buf, GuestOffset(off)).map(|()| (off, buf));
                let failed = r.is_err();
                if done_tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        let mut in_flight = 0usize;
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut write_one = |in_flight: &mut usize, spare: &mut Vec<Vec<u8>>| -> Result<()> {
            let (off, buf) = done_rx
                .recv()
                .map_err(|_| Error::new(ErrorKind::Io, "the reader thread stopped"))??;
            *in_flight -= 1;
            dst.write_at(&buf, GuestOffset(off))?;
            limiter.account(buf.len() as u64);
            spare.push(buf);
            Ok(())
        };
        let mut off = 0u64;
        while off < size {
            let st = status(top, off, size)?;
            let end = off + st.len;
            if st.depth < base_depth && st.zero {
                zero_where_needed(dst, off, end)?;
            } else if st.depth < base_depth {
                let mut o = off;
                while o < end {
                    let n = (chunk - o % chunk).min(end - o);
                    if in_flight == READ_AHEAD {
                        write_one(&mut in_flight, &mut spare)?;
                    }
                    let mut buf = spare.pop().unwrap_or_default();
                    buf.resize(n as usize, 0);
                    req_tx
                        .send((o, buf))
                        .map_err(|_| Error::new(ErrorKind::Io, "the reader thread stopped"))?;
                    in_flight += 1;
                    o += n;
                }
            }
            off = end;
            if let Some(p) = progress {
                p(off, size);
            }
        }
        drop(req_tx);
        while in_flight > 0 {
            write_one(&mut in_flight, &mut spare)?;
        }
        Ok(())
    })?;
    dst.flush()
}

/// Makes `[off, end)` of `dst` read as zeros, writing only where it does not already.
fn zero_where_needed(dst: &dyn BlockImage, off: u64, end: u64) -> Result<()> {
    let mut pos = off;
    while pos < end {
        let st = status(dst, pos, end)?;
        if !st.zero {
            dst.write_zeroes(GuestOffset(pos), st.len, true)?;
        }
        pos += st.len;
    }
    Ok(())
}

/// Commits the image at `path` as `opts` say (see the module documentation). Returns the line
/// qemu-img prints on success.
pub fn commit(path: &Path, opts: &CommitOptions, progress: Option<Progress<'_>>) -> Result<String> {
    let format = match opts.format {
        Some(f) => f,
        None => probe_format_with(&opts.opener, path)?,
    };
    // Looked at read-only first: a refused commit leaves every image untouched.
    let open = |writable| {
        open_image(
            path,
            &OpenOptions {
                format: Some(format),
                writable,
                opener: opts.opener.clone(),
                ..OpenOptions::default()
            },
        )
    };
    let top = open(false)?;
    let (depth, base_layer) = find_base_of(path, top.as_ref(), opts.base.as_deref(), &opts.opener)?;
    let base = open_target(base_layer, opts.cache, &opts.opener)?;
    let empty = opts.base.is_none() && !opts.drop;
    let top = if empty {
        drop(top);
        let top = open(true)?;
        top.set_unsafe_cache(!opts.cache.syncs());
        top
    } else {
        top
    };
    let job = CommitJob {
        depth,
        empty,
        rate_limit: opts.rate_limit,
        syncs: opts.cache.syncs(),
    };
    commit_images(top, base, &job, progress)?;
    Ok(COMMITTED.to_string())
}

/// What [`commit_images`] does with the images it is given.
#[derive(Debug, Clone, Copy)]
pub struct CommitJob {
    /// Depth of the base in the top's chain (see [`find_base`]).
    pub depth: u32,
    /// Empty the top afterwards (the top must then be open for writing).
    pub empty: bool,
    /// Bytes per second to write at most; 0 for no limit.
    pub rate_limit: u64,
    /// Wait for the disk at the end (not with `-t unsafe`).
    pub syncs: bool,
}

/// The whole commit on opened images, in its crash-safe order: [`commit_into`], the base
/// finished (everything durable, unless `job.syncs` is off), then, with `job.empty`, the top
/// emptied and finished.
pub fn commit_images(
    mut top: Box<dyn BlockImage>,
    mut base: Box<dyn BlockImage>,
    job: &CommitJob,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    base.set_unsafe_cache(!job.syncs);
    commit_into(
        top.as_ref(),
        job.depth,
        base.as_mut(),
        job.rate_limit,
        progress,
    )
    .map_err(block_job_failed)?;
    // The base is durable before the overlay lets go of anything.
    base.finish()?;
    drop(base);
    // A format that cannot empty an image keeps its data, now also in the base: qemu-img
    // commit ignores ENOTSUP from blk_make_empty (vmdk, vpc, vdi, vhdx overlays).
    if let (true, Some(e)) = (job.empty, top.as_make_empty_mut()) {
        e.make_empty()?;
        top.finish()?;
    }
    Ok(())
}

/// A failure of the copy, worded as qemu-img words a failed commit job: `Block job failed:
/// CAUSE`, the cause being the operating system's reason for an I/O error (kept as the
/// error's source), the error's own text otherwise.
fn block_job_failed(e: Error) -> Error {
    let os = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error);
    match os {
        Some(code) => Error::io("Block job failed", std::io::Error::from_raw_os_error(code)).bare(),
        None => Error::new(e.kind(), format!("Block job failed: {e}")).bare(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_parse_as_qemu_img_parses_them() {
        assert_eq!(parse_rate_limit("0").unwrap(), 0);
        assert_eq!(parse_rate_limit("1M").unwrap(), 1 << 20);
        assert_eq!(parse_rate_limit("1.5k").unwrap(), 1536);
        let e = parse_rate_limit("-5").unwrap_err();
        assert!(e.what().contains("Must be between 0 and"), "{e}");
        let e = parse_rate_limit("abc").unwrap_err();
        assert_eq!(e.what(), "Invalid rate limit specified: 'abc'.");
        let e = parse_rate_limit("9E").unwrap_err();
        assert!(e.what().contains("Must be between"), "{e}");
    }

    #[test]
    fn cache_modes() {
        assert_eq!(CacheMode::parse("unsafe").unwrap(), CacheMode::Unsafe);
        assert!(!CacheMode::Unsafe.syncs());
        assert!(CacheMode::parse("writeback").unwrap().syncs());
        assert_eq!(
            CacheMode::parse("bogus").unwrap_err().what(),
            "Invalid cache option: bogus"
        );
    }

    #[test]
    fn the_limiter_paces_writes() {
        let mut l = RateLimiter::new(1 << 20);
        assert_eq!(l.chunk(), 128 << 10);
        let t = Instant::now();
        l.account(256 << 10);
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        let unlimited = RateLimiter::new(0);
        assert_eq!(unlimited.chunk(), CHUNK);
    }
}
