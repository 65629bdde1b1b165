//! Incremental push backups from a persistent dirty bitmap, as libvirt's push-mode backup
//! with `incremental` makes them: a qcow2 overlay holding only the clusters the bitmap marks
//! dirty, whose backing file is the previous backup, so that the chain of backups restores
//! with any qcow2 reader (`qemu-img convert` of the newest overlay gives the disk as it was
//! when that backup started). The first backup of a chain (no previous one) is a full copy.
//!
//! [`run`] works at one point in time, its *start*: it starts a
//! [`PointInTimeView`] of the live export, which freezes a copy
//! of the bitmap at the start and records the chunks written since (the bitmap's next
//! generation, as libvirt starts a new checkpoint bitmap at the start). It copies what the
//! frozen bitmap marks from the view, so writes during the backup change nothing in it. Only
//! once the target is complete and flushed is the bitmap reset: cleared, then given the bits
//! written since the start (which the image's own tracking also set after the clear), so no
//! write is missing from the next increment. On any failure the target is removed and the
//! bitmap left as it was (with the writes since the start added by tracking, as always): the
//! next backup still copies everything this one would have.

use super::fleece::{bitmap_desc, PointInTimeView, ViewOptions, ViewRequest, ViewStats};
use crate::bitmap::{DirtyBitmap, SparseBits};
use crate::block::ImageFormat;
use crate::error::{Error, Result};
use crate::nbd::server::Export;
use crate::offsets::GuestOffset;
use crate::open::{open_image, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes copied at once.
const PIECE: u64 = 4 << 20;

/// One incremental (or, without a previous backup, full) backup of a served disk.
pub struct BackupRequest<'a> {
    /// The live export (its image must hold `bitmap`, enabled).
    pub live: &'a Arc<Export>,
    /// The persistent dirty bitmap that says what changed since the previous backup.
    pub bitmap: &'a str,
    /// The new qcow2 overlay (must not exist).
    pub target: &'a Path,
    /// The previous backup, recorded as the target's backing file exactly as given (relative
    /// names are relative to the target's directory) with its format: qcow2 or raw. `None`:
    /// a full backup, without a backing file.
    pub previous: Option<(&'a str, ImageFormat)>,
    /// How the view keeps the old data of the clusters written during the backup.
    pub view: ViewOptions,
    /// The target's cluster size (`None`: 64 KiB).
    pub cluster_size: Option<u64>,
    /// Told `(bytes done, bytes to copy)` as the copy goes.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    /// Set to cancel: the backup then fails as any other failure does.
    pub cancel: Option<&'a AtomicBool>,
}

impl<'a> BackupRequest<'a> {
    /// A request with the default view options, cluster size, no progress and no cancel.
    pub fn new(
        live: &'a Arc<Export>,
        bitmap: &'a str,
        target: &'a Path,
        previous: Option<(&'a str, ImageFormat)>,
    ) -> Self {
        BackupRequest {
            live,
            bitmap,
            target,
            previous,
            view: ViewOptions::default(),
            cluster_size: None,
            progress: None,
            cancel: None,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// A full backup (no previous one).
    pub full: bool,
    /// Bytes of the disk to copy: the dirty ranges (aligned to the target's clusters) of an
    /// incremental backup, the whole disk of a full one.
    pub bytes_to_copy: u64,
    /// Bytes written to the target as data.
    pub bytes_written: u64,
    /// Bytes written to the target as zeros (or, in a full backup, skipped as zeros).
    pub zero_bytes: u64,
    /// What the point-in-time view did (old data kept for writes during the backup).
    pub view: ViewStats,
}

/// Runs the backup `req` asks for; see the module documentation.
pub fn run(req: &BackupRequest<'_>) -> Result<BackupStats> {
    let image = req.live.image();
    let desc = bitmap_desc(req.live, req.bitmap)?;
    if desc.in_use {
        return Err(crate::bitmap::inconsistent(req.bitmap).with_path(image.filename()));
    }
    if !desc.enabled {
        return Err(Error::invalid_input(format!(
            "bitmap '{}' is disabled: it does not record the writes an incremental backup needs",
            req.bitmap
        ))
        .with_path(image.filename()));
    }
    if req.target.symlink_metadata().is_ok() {
        return Err(Error::invalid_input("the backup target already exists").with_path(req.target));
    }
    if let Some((prev, fmt)) = req.previous {
        check_previous(req.target, prev, fmt, image.virtual_size())?;
    }
    let view = PointInTimeView::start_group(
        &[ViewRequest {
            live: req.live,
            bitmap: Some(req.bitmap),
            record_writes: true,
        }],
        &req.view,
    )?
    .remove(0);
    let copied = copy_to_target(req, &view);
    let r = copied.and_then(|mut stats| {
        new_generation(req, &view)?;
        stats.view = view.stats();
        Ok(stats)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(req.target);
    }
    drop(view);
    r
}

/// Checks the previous backup: a readable image of the given format and of the disk's size.
fn check_previous(target: &Path, prev: &str, fmt: ImageFormat, size: u64) -> Result<()> {
    if fmt != ImageFormat::Qcow2 && fmt != ImageFormat::Raw {
        return Err(Error::invalid_input(format!(
            "the previous backup must be qcow2 or raw, not {fmt}"
        )));
    }
    let path = Path::new(prev);
    let resolved = match (path.is_relative(), target.parent()) {
        (true, Some(dir)) => dir.join(path),
        _ => path.to_path_buf(),
    };
    let opts = OpenOptions {
        format: Some(fmt),
        no_backing: true,
        sharing: crate::chain::Sharing::ForceShare,
        ..Default::default()
    };
    let img = open_image(&resolved, &opts)?;
    if img.virtual_size() != size {
        return Err(Error::invalid_input(format!(
            "the previous backup is {} bytes, the disk {size}",
            img.virtual_size()
        ))
        .with_path(&resolved));
    }
    Ok(())
}

/// The guest ranges to copy: the frozen bitmap's dirty ranges widened to whole target
/// clusters (so that no cluster of the overlay is partly written over its backing file), or
/// the whole disk for a full backup.
fn ranges_to_copy(
    req: &BackupRequest<'_>,
    view: &PointInTimeView,
    cluster: u64,
) -> Vec<(u64, u64)> {
    let size = view.live().size();
    if req.previous.is_none() {
        return vec![(0, size)];
    }
    let frozen = view.frozen_bitmap().expect("the view froze the bitmap");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in frozen.dirty_ranges() {
        let s = s / cluster * cluster;
        let e = e.div_ceil(cluster).saturating_mul(cluster).min(size);
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn copy_to_target(req: &BackupRequest<'_>, view: &PointInTimeView) -> Result<BackupStats> {
    let size = view.live().size();
    let cluster = req.cluster_size.unwrap_or(65536);
    let opts = crate::qcow2::CreateOptions {
        size,
        cluster_size: cluster,
        backing_file: req.previous.map(|(p, _)| p.to_string()),
        backing_fmt: req.previous.map(|(_, f)| f.as_str().to_string()),
        ..Default::default()
    };
    crate::qcow2::create(req.target, &opts)?;
    let target = open_image(
        req.target,
        &OpenOptions {
            format: Some(ImageFormat::Qcow2),
            writable: true,
            no_backing: true,
            ..Default::default()
        },
    )?;
    let source = view.image();
    let ranges = ranges_to_copy(req, view, cluster);
    let mut stats = BackupStats {
        full: req.previous.is_none(),
        bytes_to_copy: ranges.iter().map(|(s, e)| e - s).sum(),
        ..Default::default()
    };
    let mut done = 0;
    let mut buf = Vec::new();
    for (start, end) in ranges {
        let mut pos = start;
        while pos < end {
            if req.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::invalid_input("the backup was cancelled").with_path(req.target));
            }
            let mut n = (end - pos).min(PIECE);
            let zero_known = stats.full && {
                let st = source.block_status(GuestOffset(pos), n)?;
                n = st.len.min(n);
                st.zero
            };
            if zero_known {
                stats.zero_bytes += n;
            } else {
                buf.resize(n as usize, 0);
                source.read_at(&mut buf, GuestOffset(pos))?;
                if crate::zeros::is_zero(&buf) {
                    stats.zero_bytes += n;
                    if !stats.full {
                        target.write_zeroes(GuestOffset(pos), n, false)?;
                    }
                } else {
                    target.write_at(&buf, GuestOffset(pos))?;
                    stats.bytes_written += n;
                }
            }
            pos += n;
            done += n;
            if let Some(p) = req.progress {
                p(done, stats.bytes_to_copy);
            }
        }
    }
    target.finish()?;
    drop(target);
    Ok(stats)
}

/// Starts the bitmap's new generation at the backup's start: clears it and sets the chunks
/// written since the start (the view's hook recorded them all: a write calls the hook before
/// the image marks the bitmap, so a write marked before the clear is in the record taken
/// after it, and one marked after the clear is in the bitmap anyway). If the bits cannot be
/// put back, the bitmap is set whole, so that the next backup copies everything.
fn new_generation(req: &BackupRequest<'_>, view: &PointInTimeView) -> Result<()> {
    let image = req.live.image();
    let bitmaps = image.as_bitmaps().expect("checked before the backup");
    bitmaps
        .clear_bitmap(req.bitmap)
        .map_err(|e| e.with_path(image.filename()))?;
    let written = view
        .written_since_start()
        .expect("the view records the writes");
    if written.bits.is_empty() {
        return Ok(());
    }
    if let Err(e) = bitmaps.merge_into_bitmap(req.bitmap, &written) {
        let mut all = SparseBits::new();
        let g = written.granularity_bits;
        all.set_range(0, written.disk_size.div_ceil(1 << g));
        let whole = DirtyBitmap {
            bits: all,
            ..written
        };
        let _ = bitmaps.merge_into_bitmap(req.bitmap, &whole);
        return Err(Error::new(
            e.kind(),
            format!(
                "cannot record the writes made during the backup in bitmap '{}' ({e}); the \
                 bitmap was set whole",
                req.bitmap
            ),
        )
        .with_path(image.filename()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::server::{Contexts, ExportSettings};

    fn live(dir: &Path, enabled: bool) -> Arc<Export> {
        let p = dir.join("live.qcow2");
        let size = 1 << 20;
        crate::qcow2::create(
            &p,
            &crate::qcow2::CreateOptions {
                size,
                ..Default::default()
            },
        )
        .unwrap();
        let opts = OpenOptions {
            writable: true,
            ..Default::default()
        };
        let image = open_image(&p, &opts).unwrap();
        image.write_at(&[5; 4096], GuestOffset(65536)).unwrap();
        let b = image.as_bitmaps().unwrap();
        b.add_bitmap("b", Some(65536), enabled).unwrap();
        image.write_at(&[6; 4096], GuestOffset(3 * 65536)).unwrap();
        let settings = ExportSettings::default();
        Arc::new(Export::new(image, settings, Contexts::default(), None))
    }

    fn dirty(live: &Export) -> Vec<(u64, u64)> {
        let b = live.image().as_bitmaps().unwrap();
        b.read_bitmap("b").unwrap().dirty_ranges()
    }

    #[test]
    fn refusals_and_a_cancel_leave_the_bitmap_and_other_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let live = live(dir.path(), true);
        let before = dirty(&live);
        assert_eq!(before, vec![(3 * 65536, 4 * 65536)]);
        // An existing target is neither overwritten nor removed.
        let existing = dir.path().join("existing");
        std::fs::write(&existing, b"keep").unwrap();
        let e = run(&BackupRequest::new(&live, "b", &existing, None)).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
        // No such bitmap; a previous backup of another size.
        let t = dir.path().join("t.qcow2");
        assert!(run(&BackupRequest::new(&live, "nope", &t, None)).is_err());
        let small = dir.path().join("small.raw");
        std::fs::write(&small, [0u8; 512]).unwrap();
        let prev = Some(("small.raw", ImageFormat::Raw));
        let e = run(&BackupRequest::new(&live, "b", &t, prev)).unwrap_err();
        assert!(e.to_string().contains("previous backup"), "{e}");
        // Cancelled: the target is removed, the bitmap kept.
        let cancel = AtomicBool::new(true);
        let mut req = BackupRequest::new(&live, "b", &t, None);
        req.cancel = Some(&cancel);
        let e = run(&req).unwrap_err();
        assert!(e.to_string().contains("cancelled"), "{e}");
        assert!(!t.exists());
        assert_eq!(dirty(&live), before);
        // A full backup, then an incremental one over a raw previous backup.
        let full = run(&BackupRequest::new(&live, "b", &t, None)).unwrap();
        assert!(full.full && full.bytes_written == 2 * 65536, "{full:?}");
        assert_eq!(dirty(&live), vec![]);
        let raw = dir.path().join("full.raw");
        let mut data = vec![0u8; 1 << 20];
        live.image().read_at(&mut data, GuestOffset(0)).unwrap();
        std::fs::write(&raw, &data).unwrap();
        live.write(&[7; 100], 9 * 65536, false).unwrap();
        let t2 = dir.path().join("t2.qcow2");
        let prev = Some(("full.raw", ImageFormat::Raw));
        let inc = run(&BackupRequest::new(&live, "b", &t2, prev)).unwrap();
        assert!(!inc.full && inc.bytes_to_copy == 65536, "{inc:?}");
        let chain = open_image(&t2, &OpenOptions::default()).unwrap();
        let mut back = vec![0u8; 1 << 20];
        chain.read_at(&mut back, GuestOffset(0)).unwrap();
        live.image().read_at(&mut data, GuestOffset(0)).unwrap();
        assert!(back == data, "the chain does not restore the disk");
    }

    #[test]
    fn a_disabled_bitmap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let live = live(dir.path(), false);
        let t = dir.path().join("t.qcow2");
        let e = run(&BackupRequest::new(&live, "b", &t, None)).unwrap_err();
        assert!(e.to_string().contains("disabled"), "{e}");
        assert!(!t.exists());
    }
}
