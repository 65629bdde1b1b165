//! `vimg convert`: copies the guest data of one or more images (concatenated) into a sparse raw
//! file or a qcow2 image.
//!
//! The source is walked with its block-status query: ranges known to read as zero are not read
//! and become holes in the output; the rest is read in chunks of up to [`CHUNK`] bytes by
//! several worker threads, and each chunk is written except for the blocks of
//! [`ConvertOptions::sparse_size`] bytes that turn out to be all zeros (qemu-img's `-S`). The
//! engine is in `copy`; several sources are joined by [`concat::Concat`].
//!
//! With a backing file for the new image (`-B`), target clusters that read the same in the
//! backing file are left unallocated, zero ranges over non-zero backing data become zero
//! clusters, and the rest is copied; ranges the source inherits from that very backing file are
//! not even read.
//!
//! qcow2 targets get their clusters allocated in guest order (qemu-img's default) unless
//! out-of-order writes are allowed (`-W`).
//!
//! A new output is written under a temporary name in the destination's directory and renamed
//! into place only once complete and flushed, so a failed conversion leaves no partial file under
//! the final name (and the destination may even be the source). With `no_create` (qemu-img's
//! `-n`), or when the destination is a device, the existing target is written in place, and
//! zero ranges are written as zeros there (holes punched where possible) since it may hold old
//! data, unless `target_is_zero` says it reads as zeros already.

mod bitmaps;
pub mod concat;
pub(crate) mod copy;

pub use bitmaps::source_bitmaps;

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, Result, ResultExt};
use crate::open::{open_image, resolve_relative, same_file, OpenOptions};
use crate::opener::Opener;
use crate::ops::output::{rename_tmp, TempFile};
pub use crate::ops::transfer::{Progress, CHUNK};
use std::path::Path;
use std::sync::Mutex;

/// Guest bytes one compressing worker reads at once (at least one cluster).
pub const COMPRESS_CHUNK: u64 = 256 << 10;

/// qemu-img's default `-S`: zero blocks of this many bytes are left as holes.
pub const DEFAULT_SPARSE_SIZE: u64 = 4096;

/// Largest `-S` qemu-img accepts.
pub const MAX_SPARSE_SIZE: u64 = 16 << 20;

/// Most worker threads (`-m`) qemu-img accepts.
pub const MAX_THREADS: usize = 16;

/// The worker threads `convert` uses when `-m` is not given: 4 for plain copies, whose
/// workers mostly wait for I/O, and one per CPU (at most 4) when compressing, where a thread
/// more than there are CPUs only adds the memory of another compressor and buffer.
pub fn default_threads(compress: bool) -> usize {
    const PLAIN: usize = 4;
    if !compress {
        return PLAIN;
    }
    std::thread::available_parallelism().map_or(PLAIN, |n| n.get().min(PLAIN))
}

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The output format (`-O`).
    pub output_format: ImageFormat,
    /// Zero detection granularity (`-S`): aligned blocks of this many bytes that read as zero
    /// are not written. 0 turns sparseness off entirely: the output is fully allocated, zero
    /// ranges included, as with qemu-img's `-S 0`.
    pub sparse_size: u64,
    /// Write into the existing target instead of creating it (`-n`).
    pub no_create: bool,
    /// With `no_create`: the target already reads as zeros, so zero ranges are not written
    /// (`--target-is-zero`).
    pub target_is_zero: bool,
    /// Worker threads reading and writing (at least 1).
    pub threads: usize,
    /// Store qcow2 clusters compressed (`-c`), with the target's compression type; clusters
    /// that do not shrink are stored plain. Compression runs on the worker threads.
    pub compress: bool,
    /// `-o` options for a new qcow2 target, as `vimg create` takes them.
    pub target_options: Vec<String>,
    /// Backing file of a new qcow2 target (`-B`), recorded as given; relative names are
    /// relative to the target's directory. `-o backing_file=` does the same. With `no_create`
    /// it is accepted but not relied on: the existing target is written in full.
    pub backing_file: Option<String>,
    /// Format of the backing file (`-F`); required with a backing file, as in qemu-img.
    pub backing_format: Option<String>,
    /// Allow writes in any order (`-W`): qcow2 clusters are then allocated as workers finish,
    /// not in guest order.
    pub out_of_order: bool,
    /// Wait for the target to reach the disk before finishing (`-t` other than `unsafe`).
    /// qemu-img's default for convert is `unsafe`, which does not.
    pub sync: bool,
    /// Copy the source's persistent dirty bitmaps to the qcow2 target (`--bitmaps`).
    pub bitmaps: bool,
    /// With `bitmaps`: skip inconsistent bitmaps instead of failing (`--skip-broken-bitmaps`).
    pub skip_broken_bitmaps: bool,
    /// Source ranges that cannot be read become zeros, with a warning (`--salvage`).
    pub salvage: bool,
    /// No warnings on standard error (`-q`; for `salvage`).
    pub quiet: bool,
    /// Copy at most this many bytes of the disk per second (`-r`); 0 for no limit.
    pub rate_limit: u64,
    /// Copy offloading (`-C`): data ranges are copied whole, zero blocks in them included, as
    /// qemu-img's offloaded copy does (vimg copies them with its own reads and writes).
    pub copy_offload: bool,
    /// What opens the target's storage.
    pub opener: Opener,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            output_format: ImageFormat::Raw,
            sparse_size: DEFAULT_SPARSE_SIZE,
            no_create: false,
            target_is_zero: false,
            threads: 4,
            compress: false,
            target_options: Vec::new(),
            backing_file: None,
            backing_format: None,
            out_of_order: false,
            sync: false,
            bitmaps: false,
            skip_broken_bitmaps: false,
            salvage: false,
            quiet: false,
            rate_limit: 0,
            copy_offload: false,
            opener: Opener::default(),
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

/// Checks a `-m` value as qemu-img does: 1 to [`MAX_THREADS`].
pub fn validate_threads(n: usize) -> Result<usize> {
    if n == 0 || n > MAX_THREADS {
        return Err(Error::invalid_input(format!(
            "Invalid number of coroutines specified. Must be between 1 and {MAX_THREADS}."
        )));
    }
    Ok(n)
}

/// The backing file and format the new target gets: from `-B`/`-F`, else from `-o`.
fn target_backing(opts: &ConvertOptions) -> (Option<String>, Option<String>) {
    let mut file = None;
    let mut format = None;
    for o in &opts.target_options {
        // Malformed options are reported by create; here only the backing matters.
        if let Ok(u) = crate::qcow2::parse_options(o) {
            file = u.backing_file.or(file);
            format = u.backing_fmt.or(format);
        }
    }
    (
        opts.backing_file.clone().or(file),
        opts.backing_format.clone().or(format),
    )
}

/// Refuses the option combinations qemu-img refuses, with its messages, for `sources` source
/// images written to `dst` ([`convert`] checks this first too).
pub fn validate(sources: usize, dst: &Path, opts: &ConvertOptions) -> Result<()> {
    let bad = |m: &str| Err(Error::invalid_input(m.to_string()));
    if sources == 0 {
        return bad("Must specify image file name");
    }
    let driver = opts.output_format.driver();
    if opts.target_is_zero && !opts.no_create {
        return bad("--target-is-zero requires use of -n flag");
    }
    if opts.no_create && !opts.target_options.is_empty() {
        return bad("-o has no effect when skipping image creation");
    }
    if opts.compress && !driver.supports_compressed_writes() {
        return Err(
            Error::invalid_input("compression (-c) needs a qcow2 target (-O qcow2)").with_path(dst),
        );
    }
    if !driver.supports_backing_file() && opts.backing_file.is_some() {
        return bad(&format!(
            "Backing file not supported for file format '{}'",
            opts.output_format
        ));
    }
    // qemu-img reads the option list before it names any file.
    driver.check_target_options(&opts.target_options)?;
    let (file, format) = target_backing(opts);
    if file.is_some() && sources > 1 {
        return bad(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images",
        );
    }
    if opts.backing_file.is_some() && opts.target_is_zero {
        return bad("Cannot use --target-is-zero when the destination image has a backing file");
    }
    if !opts.no_create {
        if file.is_some() && format.is_none() {
            return bad("Use of backing file requires explicit backing format");
        }
        if file.is_none() && format.is_some() {
            return Err(
                Error::invalid_input("Backing format cannot be used without backing file")
                    .with_path(dst),
            );
        }
    }
    if opts.sparse_size != 0 {
        validate_sparse_size(opts.sparse_size)?;
    }
    validate_threads(opts.threads)?;
    bitmaps::validate(sources, opts)
}

/// Copies the guest data of `sources`, one after the other, into a raw or qcow2 image at
/// `dst`.
pub fn convert(
    sources: &[&dyn BlockImage],
    dst: &Path,
    opts: &ConvertOptions,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    validate(sources.len(), dst, opts)?;
    // Never written while being read, whatever name it is given under: qemu-img's two opens
    // of the file conflict; vimg's temporary output would not.
    let context = match opts.no_create {
        true => format!("Could not open '{}'", dst.display()),
        false => format!("error while converting {}", opts.output_format.as_str()),
    };
    crate::identity::refuse_target(dst, sources, &context)?;
    for name in target_data_files(opts) {
        if let Ok(p) = resolve_relative(dst, &name) {
            crate::identity::refuse_target(&p, sources, &context)?;
        }
    }
    let joined;
    let src: &dyn BlockImage = match sources {
        [one] => *one,
        many => {
            joined = concat::Concat::new(many.to_vec())?;
            &joined
        }
    };
    let driver = opts.output_format.driver();
    let size = src.virtual_size();
    let bitmaps = match opts.bitmaps {
        true => Some(source_bitmaps(src, opts)?.0),
        false => None,
    };
    let mut plan = copy::Plan {
        src,
        dst: src,
        compress: None,
        backing: None,
        inherit_depth: None,
        zero_needed: false,
        sparse: opts.sparse_size,
        cluster: 512,
        ordered: false,
        threads: opts.threads.max(1),
        salvage: opts.salvage,
        quiet: opts.quiet,
        rate: opts.rate_limit,
        verbatim: opts.copy_offload,
        offload_failed: Default::default(),
        joined: sources.len() > 1,
    };
    // An NBD export is written in place as a device is (qemu "creates" on one by opening it).
    let existing_device = std::fs::metadata(dst)
        .map(|m| !m.file_type().is_file() && !m.file_type().is_dir())
        .unwrap_or(false)
        || crate::nbd::client::claims(dst);
    let on_nbd = crate::nbd::client::claims(dst);
    if on_nbd && !opts.no_create && opts.output_format != ImageFormat::Raw {
        return Err(Error::unsupported(format!(
            "creating a {} image on an NBD export is not supported (create it with qemu-img, then convert with -n)",
            opts.output_format.as_str()
        ))
        .with_path(dst));
    }
    if opts.no_create || existing_device {
        // The existing target may hold old data: everything is written, zeros included
        // (unless it is known to read as zeros). Its backing file is relied on only with -B,
        // as qemu-img does, and then only where the target holds nothing of its own.
        let target = open_target(dst, opts.output_format, &opts.opener)?;
        // As for a new target: with qemu-img's default `-t unsafe` nothing waits for the disk.
        target.set_unsafe_cache(!opts.sync);
        if opts.backing_file.is_some() {
            if let Some(b) = target.backing() {
                plan.backing = Some(b);
                plan.inherit_depth = inherited_layer(src, b);
                plan.cluster = target.layer_info()?.cluster_size.unwrap_or(512);
            }
        }
        let target_size = target.virtual_size();
        if target_size < size && on_nbd && !opts.no_create {
            // qemu's create on an export is a truncate, which an export refuses.
            return Err(
                Error::invalid_input(format!("{context}: Cannot grow NBD nodes")).with_path(dst),
            );
        }
        if target_size < size {
            return Err(Error::invalid_input(format!(
                "output file is smaller than input file ({target_size} < {size} bytes)"
            ))
            .with_path(dst));
        }
        let bitmap_target = match &bitmaps {
            Some(list) => Some((bitmaps::check_target(target.as_ref(), list)?, list)),
            None => None,
        };
        plan.dst = target.as_ref();
        plan.zero_needed = !opts.target_is_zero;
        plan.ordered = driver.writes_in_order() && !opts.out_of_order;
        copy::run(&plan, progress)?;
        if let Some((to, list)) = bitmap_target {
            bitmaps::copy(src, to, list)?;
        }
        return target.finish();
    }

    // Replace what a symbolic link points to, not the link; keep an existing file's
    // permissions.
    let dst = match std::fs::symlink_metadata(dst) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(dst).unwrap_or(dst.into()),
        _ => dst.to_path_buf(),
    };
    if let (Some(name), _) = target_backing(opts) {
        // The target replaces the destination: it cannot be its own backing file.
        let bpath = resolve_relative(&dst, &name)?;
        if same_file(&bpath, &dst) {
            return Err(
                Error::invalid_input("the image cannot be its own backing file").with_path(&dst),
            );
        }
    }
    let keep_permissions = std::fs::metadata(&dst).ok().map(|m| m.permissions());
    // The file being replaced is locked as qemu-img locks a target it truncates: an image in
    // use elsewhere is refused, and stays untouched until the new one is renamed over it.
    let _replaced = lock_replaced(&dst)?;
    let tmp = match driver.target_is_one_file(&opts.target_options) {
        true => TempFile::create_near(&dst)?,
        false => TempFile::in_place(&dst)?,
    };
    {
        // The new image, made by its format's driver and closed at the end of this block,
        // before it is renamed over the destination. Opened with its backing chain, so that
        // zero writes know what lies below; a failure to open that chain is reported on one
        // line as qemu-img reports it.
        let target = driver
            .create_target(
                &tmp.path,
                size,
                &opts.target_options,
                (opts.backing_file.clone(), opts.backing_format.clone()),
                false,
                &opts.opener,
            )
            .map_err(|e| rename_tmp(e, &tmp.path, &dst))?;
        target.set_unsafe_cache(!opts.sync);
        let bitmap_target = match &bitmaps {
            Some(list) => Some((
                bitmaps::check_target(target.as_ref(), list)
                    .map_err(|e| rename_tmp(e, &tmp.path, &dst))?,
                list,
            )),
            None => None,
        };
        plan.dst = target.as_ref();
        // A new image that does not read as zeros (LUKS) gets its zeros written.
        plan.zero_needed = !target.zero_initialized();
        plan.cluster = target.cluster_size().unwrap_or(512);
        plan.compress = match opts.compress || target.needs_compressed_writes() {
            true => Some(target.as_compressed_writes().ok_or_else(|| {
                Error::unsupported("Compression not supported for this file format").with_path(&dst)
            })?),
            false => None,
        };
        plan.ordered = driver.writes_in_order() && !opts.out_of_order;
        plan.backing = target.backing();
        if let Some(b) = plan.backing {
            // The new image replaces a file its own backing chain reads: refused.
            crate::identity::refuse_target(&dst, &[b], &context)
                .map_err(|e| rename_tmp(e, &tmp.path, &dst))?;
            plan.inherit_depth = inherited_layer(src, b);
        }
        copy::run(&plan, progress).map_err(|e| rename_tmp(e, &tmp.path, &dst))?;
        if let Some((to, list)) = bitmap_target {
            bitmaps::copy(src, to, list).map_err(|e| rename_tmp(e, &tmp.path, &dst))?;
        }
        // Writes the metadata, all of it with lazy refcounts (and, unless the cache is unsafe,
        // waits for the disk).
        target
            .finish()
            .map_err(|e| rename_tmp(e, &tmp.path, &dst))?;
    }
    if let Some(perm) = keep_permissions {
        std::fs::set_permissions(&tmp.path, perm)
            .map_err(|e| Error::io("cannot set the output file's permissions", e))
            .in_file(&dst)?;
    }
    tmp.persist(&dst, opts.sync)
}

/// The external data files named in a new target's `-o` options.
fn target_data_files(opts: &ConvertOptions) -> Vec<String> {
    opts.target_options
        .iter()
        .filter_map(|o| crate::qcow2::parse_options(o).ok())
        .filter_map(|u| u.data_file)
        .collect()
}

/// Takes a writer's image locks on the existing file `dst` that a new output replaces (it is
/// none of the files the sources read: [`convert`] refused that first). Returns the open file
/// holding the locks.
fn lock_replaced(dst: &Path) -> Result<Option<crate::lock::LockedFile>> {
    let is_file = std::fs::metadata(dst).is_ok_and(|m| m.is_file());
    if !is_file {
        return Ok(None);
    }
    let file = std::fs::File::open(dst)
        .map_err(|e| Error::io("cannot open the output file", e).with_path(dst))?;
    crate::lock::LockedFile::new(file, crate::lock::LockRequest::exclusive(true))
        .map(Some)
        .map_err(|e| Error::io("cannot replace the output file", e).with_path(dst))
}

/// The depth (1 = the source's backing file) of the first layer below the source's top that
/// is `backing` itself: the same file opened with the same format. Ranges the layers above it
/// leave unallocated read the same in the new target without being copied.
fn inherited_layer(src: &dyn BlockImage, backing: &dyn BlockImage) -> Option<u32> {
    let mut layer = src.backing();
    let mut depth = 1u32;
    while let Some(l) = layer {
        if l.format() == backing.format() && same_file(l.filename(), backing.filename()) {
            return Some(depth);
        }
        layer = l.backing();
        depth += 1;
    }
    None
}

/// Opens an existing target for writing in place (`-n`), with its backing chain so that zero
/// writes know what lies below.
fn open_target(dst: &Path, format: ImageFormat, opener: &Opener) -> Result<Box<dyn BlockImage>> {
    open_image(
        dst,
        &OpenOptions {
            format: Some(format),
            writable: true,
            opener: opener.clone(),
            ..OpenOptions::default()
        },
    )
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
    use crate::raw::RawImage;

    #[test]
    fn text_progress_only_moves_forward() {
        let p = TextProgress::new();
        assert_eq!(p.update(0, 400).as_deref(), Some("    (0.00/100%)\r"));
        assert_eq!(p.update(2, 400), None);
        assert_eq!(p.update(100, 400).as_deref(), Some("    (25.00/100%)\r"));
        assert_eq!(p.update(50, 400), None);
        assert_eq!(p.update(400, 400).as_deref(), Some("    (100.00/100%)\r"));
    }

    /// Delegates to an image, recording the guest ranges read.
    struct Counting<'a> {
        inner: &'a dyn BlockImage,
        reads: Mutex<Vec<(u64, u64)>>,
    }

    impl BlockImage for Counting<'_> {
        fn format(&self) -> ImageFormat {
            self.inner.format()
        }
        fn filename(&self) -> &Path {
            self.inner.filename()
        }
        fn virtual_size(&self) -> u64 {
            self.inner.virtual_size()
        }
        fn read_at(&self, buf: &mut [u8], offset: crate::offsets::GuestOffset) -> Result<()> {
            self.reads
                .lock()
                .unwrap()
                .push((offset.0, buf.len() as u64));
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: crate::offsets::GuestOffset) -> Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(
            &self,
            offset: crate::offsets::GuestOffset,
            len: u64,
            unmap: bool,
        ) -> Result<()> {
            self.inner.write_zeroes(offset, len, unmap)
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()
        }
        fn finish(&self) -> Result<()> {
            self.inner.finish()
        }
        fn block_status(
            &self,
            offset: crate::offsets::GuestOffset,
            max_len: u64,
        ) -> Result<crate::block::BlockStatus> {
            self.inner.block_status(offset, max_len)
        }
        fn backing(&self) -> Option<&dyn BlockImage> {
            self.inner.backing()
        }
        fn is_writable(&self) -> bool {
            false
        }
        fn actual_size(&self) -> Option<u64> {
            None
        }
        fn layer_info(&self) -> Result<crate::info::LayerInfo> {
            self.inner.layer_info()
        }
    }

    fn qcow2(path: &Path, size: u64, backing: Option<&str>) {
        crate::ops::create::create(&crate::ops::create::CreateArgs {
            format: ImageFormat::Qcow2,
            filename: path.to_path_buf(),
            options: vec![],
            backing_file: backing.map(str::to_string),
            backing_format: backing.map(|_| "qcow2".to_string()),
            unsafe_backing: false,
            size: Some(size.to_string()),
            opener: Default::default(),
        })
        .unwrap();
    }

    fn open_rw(path: &Path) -> Box<dyn BlockImage> {
        let o = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        open_image(path, &o).unwrap()
    }

    fn whole(img: &dyn BlockImage) -> Vec<u8> {
        let mut v = vec![0u8; img.virtual_size() as usize];
        img.read_at(&mut v, crate::offsets::GuestOffset(0)).unwrap();
        v
    }

    /// With -B naming the source's own backing file, only what the overlay allocates is read;
    /// where source and backing file are both known to be zero, nothing is read either.
    #[test]
    fn backing_conversion_reads_only_what_it_must() {
        use crate::offsets::GuestOffset as G;
        let dir = tempfile::tempdir().unwrap();
        let cs = 65536u64;
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        qcow2(&base, 32 * cs, None);
        {
            let b = open_rw(&base);
            b.write_at(&vec![0x11; 16 * cs as usize], G(0)).unwrap();
            b.flush().unwrap();
        }
        qcow2(&top, 32 * cs, Some("base.qcow2"));
        {
            let t = open_rw(&top);
            t.write_at(&vec![0x22; cs as usize], G(3 * cs)).unwrap();
            t.write_zeroes(G(5 * cs), cs, false).unwrap();
            t.flush().unwrap();
        }
        let opts = ConvertOptions {
            output_format: ImageFormat::Qcow2,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..ConvertOptions::default()
        };
        let src = open_image(&top, &OpenOptions::default()).unwrap();
        let counting = Counting {
            inner: src.as_ref(),
            reads: Mutex::new(vec![]),
        };
        let out = dir.path().join("out.qcow2");
        convert(&[&counting], &out, &opts, None).unwrap();
        let reads = counting.reads.lock().unwrap().clone();
        assert!(
            reads.iter().all(|&(o, l)| o >= 3 * cs && o + l <= 4 * cs),
            "read outside the overlay's data: {reads:?}"
        );
        let converted = crate::open::open_image(&out, &Default::default()).unwrap();
        assert!(whole(converted.as_ref()) == whole(src.as_ref()));
        // Closed before it is replaced: an image open (here, in this process) is locked.
        drop(converted);

        // A sparse raw source over an empty backing file: only its data block is read.
        let empty = dir.path().join("empty.qcow2");
        qcow2(&empty, 32 * cs, None);
        let raw = dir.path().join("src.raw");
        // All holes (vimg's and qemu's create write the first block).
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(32 * cs)
            .unwrap();
        let r = RawImage::open(&raw, true).unwrap();
        r.write_at(&[7u8; 4096], G(20 * cs)).unwrap();
        let counting = Counting {
            inner: &r,
            reads: Mutex::new(vec![]),
        };
        let opts = ConvertOptions {
            backing_file: Some("empty.qcow2".into()),
            ..opts
        };
        convert(&[&counting], &out, &opts, None).unwrap();
        let reads = counting.reads.lock().unwrap().clone();
        assert!(
            reads.iter().all(|&(o, l)| o >= 20 * cs && o + l <= 21 * cs),
            "read outside the data block: {reads:?}"
        );
        let converted = crate::open::open_image(&out, &Default::default()).unwrap();
        assert!(whole(converted.as_ref()) == whole(&r));
    }

    #[test]
    fn an_existing_output_is_replaced_also_through_a_symlink() {
        use crate::offsets::GuestOffset as G;
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, byte: u8| {
            let p = dir.path().join(name);
            let r = RawImage::create(&p, 1 << 20).unwrap();
            r.write_at(&[byte; 4096], G(8192)).unwrap();
            p
        };
        let (a, b) = (make("a.raw", 0xaa), make("b.raw", 0xbb));
        let dst = dir.path().join("out.raw");
        let link = dir.path().join("link.raw");
        std::os::unix::fs::symlink(&dst, &link).unwrap();
        for (src, byte, sync) in [(&a, 0xaa, false), (&b, 0xbb, false), (&a, 0xaa, true)] {
            let img = RawImage::open(src, false).unwrap();
            let opts = ConvertOptions {
                sync,
                ..Default::default()
            };
            convert(&[&img], &dst, &opts, None).unwrap();
            let out = std::fs::read(&dst).unwrap();
            assert_eq!(out.len(), 1 << 20);
            assert!(out[8192..12288].iter().all(|&x| x == byte));
            assert!(out[..8192].iter().all(|&x| x == 0));
        }
        // Converting onto a link writes the file it points at, as qemu-img does.
        let img = RawImage::open(&b, false).unwrap();
        convert(&[&img], &link, &ConvertOptions::default(), None).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&dst).unwrap()[8192], 0xbb);
    }

    #[test]
    fn sparse_sizes() {
        assert!(validate_sparse_size(4096).is_ok());
        assert!(validate_sparse_size(512).is_ok());
        assert!(validate_sparse_size(16 << 20).is_ok());
        assert!(validate_sparse_size(1000).is_err());
        assert!(validate_sparse_size(32 << 20).is_err());
    }
}
