//! `vimg rebase [-u] [-b BACKING|""] [-F FMT] [-c] IMAGE`: changes the backing file of a
//! qcow2 image, as `qemu-img rebase` does.
//!
//! With `-u` only the header changes (the backing file name and the backing format
//! extension, which appears or disappears with it). In safe mode the image's guest contents
//! stay the same: every range the image itself leaves unallocated, and where the old backing
//! chain and the new one read differently, gets the old chain's data written into the image
//! first (compressed with `-c`); `-b ""` (or `-u` without `-b`) removes the backing file, so
//! safe mode then copies everything the old chain provides.
//!
//! The comparison is driven by block status on both chains: ranges the image allocates are
//! skipped, ranges both chains know to read as zeros are skipped, and so are ranges both
//! chains answer from the same layer (when the new backing file is in the old chain, or the
//! old one in the new chain). Only the rest is read from both chains and compared, in units of
//! the image's clusters; of a cluster the image leaves wholly unallocated, the subclusters
//! (the whole cluster without extended L2 entries; with `-c`, the whole cluster) that differ
//! are written (as data even where the old data is zeros, as qemu-img writes it, but as a zero
//! cluster when the image had no backing file), while in a partly allocated cluster only the
//! differing unallocated parts are. Layers of any cluster size and virtual size
//! combine: a shorter layer reads as zeros past its end.
//!
//! # Crash safety
//!
//! Everything written into the image is the data it already read through its old backing
//! chain, so the image reads the same throughout the copy; the copy is flushed (and synced)
//! before the header switches to the new backing file in one write of cluster 0. An
//! interruption leaves the old backing file with some clusters copied (reading as before), or
//! the new one with all of them (reading as after), and at worst leaked clusters.

use crate::block::{BlockImage, BlockStatus, ImageFormat};
use crate::error::{Error, Result};
use crate::offsets::GuestOffset;
use crate::open::same_file;
use crate::open::{open_image, open_layer, ChainGuard, OpenOptions};
use crate::opener::Opener;
use crate::ops::commit::CacheMode;
use crate::ops::create::KNOWN_FORMATS;
use crate::ops::transfer::{read_clamped, Cursor, Progress, CHUNK};
use crate::zeros::is_zero;
use std::path::Path;

/// qemu-img's message when neither `-b` nor `-u` is given.
pub const NEED_BACKING: &str = "Must specify backing file (-b) or use unsafe mode (-u)";

/// How to rebase.
#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// The image's format (`-f`); probed when `None`.
    pub format: Option<ImageFormat>,
    /// The new backing file (`-b`), recorded as given (relative names are relative to the
    /// image); `Some("")` removes the backing file; `None` (only with `unsafe_mode`) too.
    pub backing: Option<String>,
    /// The new backing file's format (`-F`): required with a new backing file.
    pub backing_format: Option<String>,
    /// Only rewrite the header (`-u`): the new backing file need not exist.
    pub unsafe_mode: bool,
    /// Write the copied clusters compressed (`-c`).
    pub compress: bool,
    /// Cache mode of the image (`-t`).
    pub cache: CacheMode,
    /// `-T`: the new backing file is read bypassing the host's cache (`O_DIRECT`).
    pub backing_direct: bool,
    /// What opens the storage of the image and of its old and new backing files.
    pub opener: Opener,
}

/// Rebases the image at `path` as `opts` say (see the module documentation). `progress` is
/// told how much of the disk safe mode has compared.
pub fn rebase(path: &Path, opts: &RebaseOptions, progress: Option<Progress<'_>>) -> Result<()> {
    if opts.backing.is_none() && !opts.unsafe_mode {
        return Err(Error::invalid_input(NEED_BACKING));
    }
    let new_name = opts.backing.as_deref().filter(|s| !s.is_empty());
    if let Some(f) = &opts.backing_format {
        if !KNOWN_FORMATS.contains(&f.as_str()) {
            return Err(Error::invalid_input(format!("Invalid format name: '{f}'")));
        }
    }
    // qemu-img's words exactly (iotests 114 matches them): the message names the new backing
    // file, and the image is the only one on the command line.
    let cannot_change = |why: &str| {
        Error::invalid_input(format!(
            "Could not change the backing file to '{}': {why}",
            new_name.unwrap_or("")
        ))
        .with_path(path)
        .bare()
    };
    let open = |writable: bool, no_backing: bool| {
        open_image(
            path,
            &OpenOptions {
                format: opts.format,
                writable,
                no_backing,
                opener: opts.opener.clone(),
                ..OpenOptions::default()
            },
        )
    };
    // A format that records no backing file is refused on the first open, before anything
    // is written.
    let capable = |img: &mut dyn BlockImage| -> Result<()> {
        if opts.compress && img.as_compressed_writes().is_none() {
            return Err(
                Error::unsupported("Compression not supported for this file format")
                    .with_path(path)
                    .bare(),
            );
        }
        if img.as_set_backing_mut().is_none() {
            return Err(cannot_change(
                "Operation not supported (only qcow2 images have a backing file)",
            ));
        }
        Ok(())
    };
    let new_format = match (new_name, opts.backing_format.as_deref()) {
        (Some(_), Some(f)) => Some(f),
        (Some(name), None) => {
            if !opts.unsafe_mode {
                // As qemu-img: a new backing file that cannot be opened is the first complaint.
                let p = opts.opener.resolve(path, name)?;
                opts.opener.identity(&p).map_err(|e| {
                    Error::io(format!("Could not open new backing file '{name}'"), e)
                })?;
            }
            return Err(cannot_change("backing format must be specified"));
        }
        (None, _) => None,
    };

    if opts.unsafe_mode {
        // Only the pointer changes, whatever it names, as qemu-img's -u does: a name that
        // makes the chain loop (the image itself) is refused by every later open ("creates an
        // infinite loop"), and `rebase -u` again puts it right (iotest 043).
        let mut img = open(true, true)?;
        opts.opener
            .refuse_backing_options(path, img.format().as_str())?;
        capable(img.as_mut())?;
        img.set_unsafe_cache(!opts.cache.syncs());
        set_backing(img.as_mut(), new_name, new_format)?;
        return img.finish();
    }

    // Safe mode: both chains must open before anything is written.
    let mut before = open(false, false)?;
    capable(before.as_mut())?;
    let new_backing = match (new_name, new_format) {
        (Some(name), Some(fmt)) => Some({
            refuse_relative_to_json_name(path, name, before.as_ref(), &opts.opener)?;
            open_new_backing(
                path,
                name,
                fmt,
                &opts.opener.with_direct(opts.backing_direct),
            )?
        }),
        _ => None,
    };
    if let (Some(b), Some(name)) = (&new_backing, new_name) {
        // The files rebase writes (the image, its data file) must not be read through the new
        // chain: compared by device and inode, so links are caught.
        for f in crate::identity::chain_files(before.as_ref()) {
            if f.role == crate::identity::Role::Backing {
                continue;
            }
            if let Some(r) = crate::identity::read_by(&f.path, &[b.as_ref()]) {
                return Err(crate::identity::conflict(
                    path,
                    &r,
                    &format!("Could not open new backing file '{name}'"),
                    true,
                ));
            }
        }
    }
    drop(before);
    let img = open(true, false)?;
    img.set_unsafe_cache(!opts.cache.syncs());
    let to = NewBacking {
        image: new_backing.as_deref(),
        name: new_name,
        format: new_format,
    };
    rebase_image(img, &to, opts.compress, progress)
}

/// The backing file an image is rebased onto.
#[derive(Clone, Copy)]
pub struct NewBacking<'a> {
    /// The new backing file, opened with its chain (`None`: no backing file).
    pub image: Option<&'a dyn BlockImage>,
    /// The name to record (`None`: no backing file).
    pub name: Option<&'a str>,
    /// The format to record with it.
    pub format: Option<&'a str>,
}

/// Safe mode on an opened image (read-write, with its old backing chain), in its crash-safe
/// order: [`rebase_copy`] (which ends with a flush), then the header switch, then the close.
pub fn rebase_image(
    mut img: Box<dyn BlockImage>,
    to: &NewBacking<'_>,
    compress: bool,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    rebase_copy(img.as_ref(), to.image, compress, progress)?;
    set_backing(img.as_mut(), to.name, to.format)?;
    img.finish()
}

/// Records `name` (`None`: none) with `format` as the backing file of `img`.
fn set_backing(img: &mut dyn BlockImage, name: Option<&str>, format: Option<&str>) -> Result<()> {
    let path = img.filename().to_path_buf();
    img.as_set_backing_mut()
        .ok_or_else(|| Error::unsupported("the image records no backing file").with_path(&path))?
        .set_backing_file(name, format)
}

/// Refuses a relative new backing file name `name` when qemu names the image `img` (at
/// `path`) by its options (`json:{...}`, [`crate::node_name`]: it was given strong options such
/// as `encrypt.key-secret`): qemu-img resolves the new name against the image's name and
/// cannot resolve it against options, so it fails, in these words.
fn refuse_relative_to_json_name(
    path: &Path,
    name: &str,
    img: &dyn BlockImage,
    opener: &Opener,
) -> Result<()> {
    let protocol = name.split('/').next().is_some_and(|p| p.contains(':'));
    if Path::new(name).is_absolute() || protocol {
        return Ok(());
    }
    let backing = img.backing().map(|b| b.filename().display().to_string());
    let own = path.display().to_string();
    let node = opener.node_name(path, img.format().as_str(), &own, backing.as_deref());
    if node.starts_with("json:") {
        return Err(Error::invalid_input(format!(
            "Could not resolve backing filename: Cannot use relative backing file names for \
             '{node}'"
        )));
    }
    Ok(())
}

/// Opens the new backing file `name` (relative to the image at `path`) read-only with its
/// chain, refusing a chain that leads back to the image.
fn open_new_backing(
    path: &Path,
    name: &str,
    format: &str,
    opener: &Opener,
) -> Result<Box<dyn BlockImage>> {
    let format = ImageFormat::from_name(format).map_err(|e| {
        Error::new(
            e.kind(),
            format!("Could not open new backing file '{name}': {e}"),
        )
    })?;
    let bpath = opener.resolve(path, name)?;
    // qemu-img names the new backing file once: what its format driver refuses (a wrong or
    // missing key, a bad header) follows directly, while a failure to open a file (the new
    // backing file's own, or one deeper in its chain) keeps the file's name.
    let fail = |e: Error| {
        let text = match (e.path(), std::error::Error::source(&e)) {
            (Some(p), None) if p == bpath.as_path() && e.offset().is_none() => e.what().to_string(),
            _ => e.to_string(),
        };
        Error::new(
            e.kind(),
            format!("Could not open new backing file '{name}': {text}"),
        )
    };
    let mut guard = ChainGuard::with_opener(Default::default(), opener.clone());
    guard.enter(path)?;
    open_layer(&bpath, Some(format), false, false, &mut guard).map_err(fail)
}

/// The topmost layer the image's old chain (depth 1 = its backing file) and `new`'s chain
/// (depth 0 = `new`) share, as (old depth, new depth): the same file opened in the same
/// format. Ranges both chains answer from it or below read the same in both.
fn common_layer(img: &dyn BlockImage, new: Option<&dyn BlockImage>) -> Option<(u32, u32)> {
    let new = new?;
    let mut old = img.backing();
    let mut d = 1u32;
    while let Some(o) = old {
        let mut n = Some(new);
        let mut j = 0u32;
        while let Some(l) = n {
            if l.format() == o.format() && same_file(l.filename(), o.filename()) {
                return Some((d, j));
            }
            n = l.backing();
            j += 1;
        }
        old = o.backing();
        d += 1;
    }
    None
}

/// Whether a chain's status `s` is answered by layer `idx` of that chain or below: at that
/// depth or deeper, or unallocated down to the layer just above it because layer `idx` is
/// shorter than the offset (where everything from it down reads zeros).
fn reaches(s: &BlockStatus, idx: u32) -> bool {
    s.depth >= idx || (!s.present && s.depth + 1 == idx)
}

/// One cluster of the image to compare: its guest range, and the parts of it the image does
/// not allocate itself.
#[derive(Debug)]
struct ClusterPlan {
    start: u64,
    end: u64,
    /// The whole cluster is unallocated in the image.
    whole: bool,
    /// Unallocated pieces that may read differently through the two chains.
    pieces: Vec<(u64, u64)>,
}

/// The two chains being compared, walked in increasing guest order.
struct Walk<'a> {
    img: Cursor<'a>,
    new: Option<Cursor<'a>>,
    new_size: u64,
    common: Option<(u32, u32)>,
}

impl Walk<'_> {
    /// Looks at the cluster `[c, cend)`: the plan for it if some unallocated part of it may
    /// differ, and how far the verdict "nothing to do" holds at least (for skipping runs of
    /// clusters at once).
    fn classify(&mut self, c: u64, cend: u64, cs: u64) -> Result<(Option<ClusterPlan>, u64)> {
        let mut plan = ClusterPlan {
            start: c,
            end: cend,
            whole: true,
            pieces: Vec::new(),
        };
        let mut pos = c;
        let mut first_end = None;
        while pos < cend {
            let (ts, tend) = self.img.at(pos)?;
            let mut end = tend;
            if ts.depth == 0 && ts.present {
                plan.whole = false; // the image allocates this part itself
            } else {
                let same = match &mut self.new {
                    _ if pos >= self.new_size => ts.zero,
                    None => ts.zero,
                    Some(nc) => {
                        let (ns, nend) = nc.at(pos)?;
                        end = end.min(nend);
                        (ts.zero && ns.zero)
                            || self
                                .common
                                .is_some_and(|(d, j)| reaches(&ts, d) && reaches(&ns, j))
                    }
                };
                if pos < self.new_size {
                    end = end.min(self.new_size);
                }
                if !same {
                    let e = end.min(cend);
                    match plan.pieces.last_mut() {
                        Some(last) if last.1 == pos => last.1 = e,
                        _ => plan.pieces.push((pos, e)),
                    }
                }
            }
            first_end.get_or_insert(end);
            pos = end.min(cend);
        }
        if !plan.pieces.is_empty() {
            return Ok((Some(plan), cend));
        }
        // Nothing here: when one status answer covered the whole cluster and more, the
        // clusters it covers entirely need nothing either.
        let first_end = first_end.unwrap_or(cend);
        let skip_to = if first_end > cend {
            (first_end / cs * cs).max(cend)
        } else {
            cend
        };
        Ok((None, skip_to))
    }
}

/// Safe mode's copy: writes into `img` (open for writing, with its old backing chain) the
/// old chain's data wherever `img` leaves a range unallocated and the old chain and `new`'s
/// chain (`None`: no backing file, all zeros) read differently (see the module
/// documentation), then flushes. With `compress`, wholly unallocated clusters are written
/// compressed where that saves space.
pub fn rebase_copy(
    img: &dyn BlockImage,
    new: Option<&dyn BlockImage>,
    compress: bool,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    let size = img.virtual_size();
    let cs = img.cluster_size().unwrap_or(512);
    let mut walk = Walk {
        img: Cursor::new(img),
        new: new.map(Cursor::new),
        new_size: new.map_or(0, |n| n.virtual_size()),
        common: common_layer(img, new),
    };
    let batch = CHUNK.max(cs);
    let mut run: Vec<ClusterPlan> = Vec::new();
    let mut bufs = (Vec::new(), Vec::new());
    if let Some(p) = progress {
        p(0, size);
    }
    let mut c = 0u64;
    while c < size {
        let cend = (c + cs).min(size);
        let (plan, next) = walk.classify(c, cend, cs)?;
        let contiguous = run.last().is_none_or(|l| l.end == c);
        let full = run.first().is_some_and(|f| cend - f.start > batch);
        if !run.is_empty() && (plan.is_none() || !contiguous || full) {
            copy_run(img, new, compress, &run, &mut bufs)?;
            run.clear();
        }
        if let Some(p) = plan {
            run.push(p);
        }
        c = next;
        if let Some(p) = progress {
            p(c.min(size), size);
        }
    }
    if !run.is_empty() {
        copy_run(img, new, compress, &run, &mut bufs)?;
    }
    img.flush()
}

/// Reads the clusters of `run` (contiguous) through both chains and writes into `img` the old
/// chain's data where it differs.
fn copy_run(
    img: &dyn BlockImage,
    new: Option<&dyn BlockImage>,
    compress: bool,
    run: &[ClusterPlan],
    (old_buf, new_buf): &mut (Vec<u8>, Vec<u8>),
) -> Result<()> {
    let (start, end) = match (run.first(), run.last()) {
        (Some(f), Some(l)) => (f.start, l.end),
        _ => return Ok(()),
    };
    let len = (end - start) as usize;
    old_buf.resize(len, 0);
    new_buf.resize(len, 0);
    img.read_at(old_buf, GuestOffset(start))?;
    match new {
        Some(n) => read_clamped(n, new_buf, start)?,
        None => new_buf.fill(0),
    }
    let at = |a: u64, b: u64| (a - start) as usize..(b - start) as usize;
    let cs = img.cluster_size().unwrap_or(512);
    let gran = img.subcluster_size().unwrap_or(cs);
    // A run of whole (sub)clusters of plain data, written in one request.
    let mut pending: Option<(u64, u64)> = None;
    let write_pending = |p: &mut Option<(u64, u64)>| -> Result<()> {
        if let Some((a, b)) = p.take() {
            img.write_at(&old_buf[at(a, b)], GuestOffset(a))?;
        }
        Ok(())
    };
    for cl in run {
        let differs = cl
            .pieces
            .iter()
            .any(|&(a, b)| old_buf[at(a, b)] != new_buf[at(a, b)]);
        if !differs {
            write_pending(&mut pending)?;
            continue;
        }
        if !cl.whole {
            write_pending(&mut pending)?;
            for &(a, b) in &cl.pieces {
                if old_buf[at(a, b)] != new_buf[at(a, b)] {
                    img.write_at(&old_buf[at(a, b)], GuestOffset(a))?;
                }
            }
            continue;
        }
        // Where the image has an old backing file, what it reads is written as data, zeros
        // too, as qemu-img 10 writes it (`qemu-img map` shows such a cluster as data, iotest
        // 024); without one (nothing to read), a zero cluster is written, as qemu-img writes
        // it (iotest 252).
        let data = &old_buf[at(cl.start, cl.end)];
        if img.backing().is_none() && is_zero(data) {
            write_pending(&mut pending)?;
            img.write_zeroes(GuestOffset(cl.start), cl.end - cl.start, false)?;
        } else if let (true, Some(cw)) = (compress, img.as_compressed_writes()) {
            write_pending(&mut pending)?;
            let mut cluster = vec![0u8; cw.compression_unit() as usize];
            cluster[..data.len()].copy_from_slice(data);
            match cw.compress(&cluster)? {
                Some(z) => cw.write_compressed(GuestOffset(cl.start), &z)?,
                None => img.write_at(data, GuestOffset(cl.start))?,
            }
        } else {
            // Only the (sub)clusters that differ, as qemu-img 10 writes through the image's
            // subcluster granularity.
            let mut a = cl.start;
            while a < cl.end {
                let b = (a + gran).min(cl.end);
                if old_buf[at(a, b)] == new_buf[at(a, b)] {
                    write_pending(&mut pending)?;
                } else {
                    pending = match pending {
                        Some((p, q)) if q == a => Some((p, b)),
                        other => {
                            let mut o = other;
                            write_pending(&mut o)?;
                            Some((a, b))
                        }
                    };
                }
                a = b;
            }
        }
    }
    write_pending(&mut pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaching_a_layer() {
        let at = |depth, present| BlockStatus {
            present,
            ..BlockStatus::unallocated(512, depth)
        };
        assert!(reaches(&at(2, true), 2));
        assert!(reaches(&at(3, false), 2));
        assert!(!reaches(&at(1, true), 2));
        // Unallocated down to layer 1 because layer 2 is shorter: layer 2 and below read zeros.
        assert!(reaches(&at(1, false), 2));
        assert!(!reaches(&at(0, false), 2));
    }
}
