//! `vimg convert`: copies an image's guest data into a sparse raw file or a new qcow2 image.
//!
//! The source is walked with its block-status query: ranges known to read as zero are not read
//! and become holes in the output; the rest is read in chunks of up to [`CHUNK`] bytes by
//! several worker threads, and each chunk is written except for the blocks of
//! [`ConvertOptions::sparse_size`] bytes that turn out to be all zeros (qemu-img's `-S`).
//!
//! A new output is written under a temporary name in the destination's directory and renamed
//! into place only once complete and flushed, so a failed conversion leaves no partial file under
//! the final name (and the destination may even be the source). With `no_create` (qemu-img's
//! `-n`), or when the destination is a device, the existing target is written in place, and
//! zero ranges are written as zeros there (holes punched where possible) since it may hold old
//! data.

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::offsets::GuestOffset;
use crate::open::ChainGuard;
use crate::qcow2::compress::compress_cluster;
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

/// Largest piece of guest data read and written at once (rounded down to a multiple of the
/// sparse block size, or raised to it).
pub const CHUNK: u64 = 2 << 20;

/// Guest bytes one compressing worker reads at once (at least one cluster).
pub const COMPRESS_CHUNK: u64 = 256 << 10;

/// qemu-img's default `-S`: zero blocks of this many bytes are left as holes.
pub const DEFAULT_SPARSE_SIZE: u64 = 4096;

/// Largest `-S` qemu-img accepts.
pub const MAX_SPARSE_SIZE: u64 = 16 << 20;

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The output format; only [`ImageFormat::Raw`] is supported so far.
    pub output_format: ImageFormat,
    /// Zero detection granularity (`-S`): aligned blocks of this many bytes that read as zero
    /// are not written. 0 turns sparseness off entirely: the output is fully allocated, zero
    /// ranges included, as with qemu-img's `-S 0`.
    pub sparse_size: u64,
    /// Write into the existing target instead of creating it (`-n`).
    pub no_create: bool,
    /// Worker threads reading and writing (at least 1).
    pub threads: usize,
    /// Store qcow2 clusters compressed (`-c`), with the target's compression type; clusters
    /// that do not shrink are stored plain. Compression runs on the worker threads.
    pub compress: bool,
    /// `-o` options for a new qcow2 target, as `vimg create` takes them.
    pub target_options: Vec<String>,
    /// Wait for the target to reach the disk before finishing (`-t` other than `unsafe`).
    /// qemu-img's default for convert is `unsafe`, which does not.
    pub sync: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            output_format: ImageFormat::Raw,
            sparse_size: DEFAULT_SPARSE_SIZE,
            no_create: false,
            threads: 4,
            compress: false,
            target_options: Vec::new(),
            sync: false,
        }
    }
}

/// Checks a `-S` value as qemu-img does: a multiple of 512 up to [`MAX_SPARSE_SIZE`], or 0.
pub fn validate_sparse_size(size: u64) -> Result<u64> {
    if !size.is_multiple_of(512) || size > MAX_SPARSE_SIZE {
        return Err(Error::invalid_input(format!(
            "invalid sparse size {size}: use a multiple of 512 up to {MAX_SPARSE_SIZE}, \
             or 0 to disable sparse detection (fully allocates the output)"
        )));
    }
    Ok(size)
}

/// Told how far the conversion has got: `(bytes done, bytes in total)`. Called from worker
/// threads.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Copies the guest data of `src` into a raw or qcow2 image at `dst`.
pub fn convert(
    src: &dyn BlockImage,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    let qcow2 = opts.output_format == ImageFormat::Qcow2;
    if opts.compress && !qcow2 {
        return Err(
            Error::invalid_input("compression (-c) needs a qcow2 target (-O qcow2)").with_path(dst),
        );
    }
    if !qcow2 && !opts.target_options.is_empty() {
        return Err(
            Error::unsupported("-o options are not supported for raw targets yet").with_path(dst),
        );
    }
    if opts.sparse_size != 0 {
        validate_sparse_size(opts.sparse_size)?;
    }
    let size = src.virtual_size();
    let existing_device = std::fs::metadata(dst)
        .map(|m| !m.file_type().is_file() && !m.file_type().is_dir())
        .unwrap_or(false);
    if opts.no_create || existing_device {
        let target = open_target(dst, opts.output_format)?;
        let target_size = target.virtual_size();
        if target_size < size {
            return Err(Error::invalid_input(format!(
                "output file is smaller than input file ({target_size} < {size} bytes)"
            ))
            .with_path(dst));
        }
        copy(src, target.as_ref(), None, true, opts, progress)?;
        return target.flush();
    }

    // Replace what a symbolic link points to, not the link; keep an existing file's
    // permissions.
    let dst = match std::fs::symlink_metadata(dst) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(dst).unwrap_or(dst.into()),
        _ => dst.to_path_buf(),
    };
    let keep_permissions = std::fs::metadata(&dst).ok().map(|m| m.permissions());
    let tmp = TempFile::create_near(&dst)?;
    if qcow2 {
        crate::ops::create::create(&crate::ops::create::CreateArgs {
            format: ImageFormat::Qcow2,
            filename: tmp.path.clone(),
            options: opts.target_options.clone(),
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
            size: Some(size.to_string()),
        })
        .in_file(&dst)?;
        let target = Qcow2Image::open(&tmp.path, true, true, &mut ChainGuard::default())?;
        target.set_unsafe_cache(!opts.sync);
        let compress = opts.compress.then_some(&target);
        copy(src, &target, compress, false, opts, progress)?;
        // Writes the metadata (and, unless the cache is unsafe, waits for the disk).
        target.flush()?;
    } else {
        let target = RawImage::create(&tmp.path, size)?;
        copy(src, &target, None, false, opts, progress)?;
        if opts.sync {
            target.flush()?;
        }
    }
    if let Some(perm) = keep_permissions {
        std::fs::set_permissions(&tmp.path, perm)
            .map_err(|e| Error::io("cannot set the output file's permissions", e))
            .in_file(&dst)?;
    }
    tmp.persist(&dst)
}

/// Opens an existing target for writing in place (`-n`).
fn open_target(dst: &Path, format: ImageFormat) -> Result<Box<dyn BlockImage>> {
    Ok(match format {
        ImageFormat::Raw => Box::new(RawImage::open(dst, true)?),
        ImageFormat::Qcow2 => Box::new(Qcow2Image::open(
            dst,
            true,
            true,
            &mut ChainGuard::default(),
        )?),
    })
}

/// A file under a temporary name, removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    /// Creates a new, empty, uniquely named file in the directory of `dst`.
    fn create_near(dst: &Path) -> Result<TempFile> {
        let dir = match dst.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = dst
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".to_string());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut last_err = None;
        for attempt in 0..100u32 {
            let path = dir.join(format!(
                ".{base}.vimg-{}-{:x}",
                std::process::id(),
                nanos.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return Ok(TempFile { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => {
                    return Err(Error::io("cannot create output file", e).with_path(dst));
                }
            }
        }
        Err(Error::io(
            "cannot create a temporary output file",
            last_err.unwrap_or_else(|| std::io::Error::other("name collision")),
        )
        .with_path(dst))
    }

    /// Renames the file to `dst`.
    fn persist(mut self, dst: &Path) -> Result<()> {
        std::fs::rename(&self.path, dst)
            .map_err(|e| Error::io("cannot rename the finished output into place", e))
            .in_file(dst)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A piece of work for the copy threads.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// Guest data to read and write.
    Data { off: u64, len: u64 },
    /// A range known to read as zeros.
    Zero { off: u64, len: u64 },
}

/// Copies all of `src` into `dst` (at least as large). `in_place`: `dst` may hold old data, so
/// zeros must be written, not skipped. With `compress` (the same image as `dst`, fresh), data
/// is copied in whole clusters, each stored compressed where that saves space.
fn copy(
    src: &dyn BlockImage,
    dst: &dyn BlockImage,
    compress: Option<&Qcow2Image>,
    in_place: bool,
    opts: &ConvertOptions,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    let size = src.virtual_size();
    let sparse = opts.sparse_size;
    let chunk = match CHUNK.checked_div(sparse) {
        Some(n) => n.max(1) * sparse,
        None => CHUNK,
    };
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        stop.store(true, Ordering::SeqCst);
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    };
    let report = |n: u64| {
        let d = done.fetch_add(n, Ordering::SeqCst) + n;
        if let Some(p) = progress {
            p(d, size);
        }
    };
    if let Some(p) = progress {
        p(0, size);
    }
    let threads = opts.threads.max(1);
    let (tx, rx) = mpsc::sync_channel::<Job>(threads * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = Vec::new();
                let mut zeros = Vec::new();
                loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    if stop.load(Ordering::SeqCst) {
                        continue;
                    }
                    let (r, n) = match job {
                        Job::Data { off, len } => (
                            match compress {
                                Some(q) => compress_data(src, q, off, len, &mut buf),
                                None => copy_data(src, dst, off, len, sparse, in_place, &mut buf),
                            },
                            len,
                        ),
                        Job::Zero { off, len } => (
                            write_zero_range(dst, off, len, sparse, in_place, &mut zeros),
                            len,
                        ),
                    };
                    match r {
                        Ok(()) => report(n),
                        Err(e) => fail(e),
                    }
                }
            });
        }
        // Produce jobs from the block status walk; the channel bounds how far ahead we get.
        // Compressed copies work in whole clusters: a data range is widened to cluster
        // boundaries, and `emitted` remembers how far clusters were already queued so that no
        // cluster is handed to two workers.
        let ccs = compress.map(|q| q.header().cluster_size());
        let mut emitted = 0u64;
        let mut produce = || -> Result<()> {
            let mut off = 0;
            while off < size && !stop.load(Ordering::SeqCst) {
                let st = src.block_status(GuestOffset(off), size - off)?;
                if st.len == 0 || st.len > size - off {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "block status at guest offset {off:#x} returned an invalid length {}",
                            st.len
                        ),
                    )
                    .with_path(src.filename()));
                }
                let end = off + st.len;
                if let Some(cs) = ccs {
                    // Small jobs: compression works cluster by cluster, so big buffers only cost memory.
                    let step = COMPRESS_CHUNK.max(cs);
                    let (mut o, stop_at, zero) = if st.zero {
                        (off.max(emitted), end, true)
                    } else {
                        (
                            off / cs * cs,
                            end.div_ceil(cs).saturating_mul(cs).min(size),
                            false,
                        )
                    };
                    o = o.max(emitted);
                    while o < stop_at {
                        let n = (step - o % step).min(stop_at - o);
                        let job = if zero {
                            Job::Zero { off: o, len: n }
                        } else {
                            Job::Data { off: o, len: n }
                        };
                        if tx.send(job).is_err() {
                            return Ok(());
                        }
                        o += n;
                    }
                    if !zero {
                        emitted = emitted.max(stop_at);
                    }
                    off = end;
                    continue;
                }
                if st.zero {
                    // Zero ranges are cheap whatever their size; still split them so progress
                    // moves smoothly.
                    let mut o = off;
                    while o < end {
                        let n = (end - o).min(64 * chunk);
                        if tx.send(Job::Zero { off: o, len: n }).is_err() {
                            return Ok(());
                        }
                        o += n;
                    }
                } else {
                    // Chunks aligned to multiples of `chunk` in guest space, so that sparse
                    // blocks stay aligned.
                    let mut o = off;
                    while o < end {
                        let n = (chunk - o % chunk).min(end - o);
                        if tx.send(Job::Data { off: o, len: n }).is_err() {
                            return Ok(());
                        }
                        o += n;
                    }
                }
                off = end;
            }
            Ok(())
        };
        if let Err(e) = produce() {
            fail(e);
        }
        drop(tx);
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reads `[off, off + len)` from `src` and writes it to `dst`, leaving out (or, `in_place`,
/// zeroing) the aligned blocks of `sparse` bytes that are all zeros.
fn copy_data(
    src: &dyn BlockImage,
    dst: &dyn BlockImage,
    off: u64,
    len: u64,
    sparse: u64,
    in_place: bool,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.resize(len as usize, 0);
    src.read_at(buf, GuestOffset(off))?;
    if sparse == 0 {
        return dst.write_at(buf, GuestOffset(off));
    }
    // Walk the blocks, writing maximal runs of non-zero blocks and skipping (or zeroing) runs
    // of zero blocks.
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let block_end = ((pos / sparse + 1) * sparse).min(end);
        let is_zero = is_zero(&buf[(pos - off) as usize..(block_end - off) as usize]);
        let mut run_end = block_end;
        while run_end < end {
            let next_end = (run_end + sparse).min(end);
            if is_zero != self::is_zero(&buf[(run_end - off) as usize..(next_end - off) as usize]) {
                break;
            }
            run_end = next_end;
        }
        let bytes = &buf[(pos - off) as usize..(run_end - off) as usize];
        if !is_zero {
            dst.write_at(bytes, GuestOffset(pos))?;
        } else if in_place {
            dst.write_zeroes(GuestOffset(pos), run_end - pos, true)?;
        }
        pos = run_end;
    }
    Ok(())
}

/// Reads the whole clusters `[off, off + len)` of `src` and stores each in the fresh qcow2
/// image `dst` compressed, or plain where compression does not save space; all-zero clusters
/// are left unallocated.
fn compress_data(
    src: &dyn BlockImage,
    dst: &Qcow2Image,
    off: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let cs = dst.header().cluster_size();
    buf.resize(len as usize, 0);
    src.read_at(buf, GuestOffset(off))?;
    let mut cluster = vec![0u8; cs as usize];
    for (i, piece) in buf.chunks(cs as usize).enumerate() {
        if is_zero(piece) {
            continue;
        }
        let gc = off + i as u64 * cs;
        // The last cluster of a disk whose size is not a multiple of the cluster size is
        // compressed whole, padded with zeros, as qemu does.
        cluster[..piece.len()].copy_from_slice(piece);
        cluster[piece.len()..].fill(0);
        match compress_cluster(dst.header().compression_type, &cluster)? {
            Some(z) => dst.write_compressed(gc, &z)?,
            None => dst.write_at(piece, GuestOffset(gc))?,
        }
    }
    Ok(())
}

/// Makes `[off, off + len)` of `dst` read as zero: nothing to do in a fresh sparse file, a
/// hole punched in an existing one, zeros written when sparseness is off.
fn write_zero_range(
    dst: &dyn BlockImage,
    off: u64,
    len: u64,
    sparse: u64,
    in_place: bool,
    zeros: &mut Vec<u8>,
) -> Result<()> {
    if sparse != 0 {
        if in_place {
            dst.write_zeroes(GuestOffset(off), len, true)?;
        }
        return Ok(());
    }
    if zeros.is_empty() {
        zeros.resize(CHUNK as usize, 0);
    }
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK);
        dst.write_at(&zeros[..n as usize], GuestOffset(pos))?;
        pos += n;
    }
    Ok(())
}

/// Whether `b` is all zeros (in 64-byte steps the compiler can vectorise).
fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    blocks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Renders qemu-img's textual progress, `    (NN.NN/100%)` followed by a carriage return,
/// printing only when the whole percentage grows (so at 0, at most once per percent, and at
/// 100).
#[derive(Debug, Default)]
pub struct TextProgress {
    last: Mutex<Option<u64>>,
}

impl TextProgress {
    /// A renderer that has printed nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The text to print for `done` of `total` bytes, if it is time to print.
    pub fn update(&self, done: u64, total: u64) -> Option<String> {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let whole = pct.floor() as u64;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // Updates may arrive out of order from several threads: only ever move forward.
        if last.is_some_and(|l| whole <= l) {
            return None;
        }
        *last = Some(whole);
        Some(format!("    ({pct:.2}/100%)\r"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_progress_only_moves_forward() {
        let p = TextProgress::new();
        assert_eq!(p.update(0, 400).as_deref(), Some("    (0.00/100%)\r"));
        assert_eq!(p.update(2, 400), None);
        assert_eq!(p.update(100, 400).as_deref(), Some("    (25.00/100%)\r"));
        assert_eq!(p.update(50, 400), None);
        assert_eq!(p.update(400, 400).as_deref(), Some("    (100.00/100%)\r"));
    }

    #[test]
    fn sparse_sizes() {
        assert!(validate_sparse_size(4096).is_ok());
        assert!(validate_sparse_size(512).is_ok());
        assert!(validate_sparse_size(16 << 20).is_ok());
        assert!(validate_sparse_size(1000).is_err());
        assert!(validate_sparse_size(32 << 20).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4097]));
        let mut b = vec![0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        b[4096] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }
}
