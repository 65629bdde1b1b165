//! `vimg snapshot -l|-c NAME|-a NAME|-d NAME IMAGE`: lists, creates, applies and deletes the
//! internal snapshots of a qcow2 image (qcow2.rst "Snapshots"), as `qemu-img snapshot` does.
//!
//! The table changes themselves are in [`crate::qcow2::snapshot_write`].

use crate::block::ImageFormat;
use crate::error::{Error, Result};
use crate::info::SnapshotInfo;
use crate::open::{probe_format, refuse_forced_write, ChainGuard, Sharing};
use crate::ops::info::format_date;
use crate::ops::size::human_size;
use crate::qcow2::snapshot::read_table;
use crate::qcow2::snapshot_write::NewSnapshot;
use crate::qcow2::Qcow2Image;
use std::fmt::Write as _;
use std::path::Path;

/// What `vimg snapshot` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOp {
    /// `-l`: list the snapshots.
    List,
    /// `-c NAME`: create a snapshot of the current state.
    Create(String),
    /// `-a NAME`: revert the disk to a snapshot.
    Apply(String),
    /// `-d NAME`: delete a snapshot.
    Delete(String),
}

/// Renders a snapshot list as `qemu-img snapshot -l` (and `info`) print it: a title, a header
/// line and one line per snapshot; nothing at all without snapshots. Dates are printed in UTC
/// (qemu uses the local time zone).
pub fn render_list(snaps: &[SnapshotInfo]) -> String {
    let mut o = String::new();
    if snaps.is_empty() {
        return o;
    }
    o.push_str("Snapshot list:\n");
    let _ = writeln!(
        o,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snaps {
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            s.vm_clock_sec / 3600,
            (s.vm_clock_sec / 60) % 60,
            s.vm_clock_sec % 60,
            s.vm_clock_nsec / 1_000_000
        );
        // qemu prints "--" for an entry that records no instruction count.
        let icount = s.icount.map_or_else(|| "--".to_string(), |n| n.to_string());
        let _ = writeln!(
            o,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            human_size(s.vm_state_size),
            format_date(s.date_sec),
            clock,
            icount
        );
    }
    o
}

/// Runs `op` on the image at `path` (format probed when `format` is `None`; only qcow2 has
/// internal snapshots), sharing the image with other programs as `sharing` says (only a list
/// may force sharing). Returns what to print.
pub fn run(
    path: &Path,
    format: Option<ImageFormat>,
    op: &SnapshotOp,
    sharing: Sharing,
) -> Result<String> {
    refuse_forced_write(sharing, *op != SnapshotOp::List).map_err(|e| e.with_path(path))?;
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    if format != ImageFormat::Qcow2 {
        return Err(Error::unsupported(format!(
            "Could not {} snapshot: the {} format has no internal snapshots",
            match op {
                SnapshotOp::List => "list",
                SnapshotOp::Create(_) => "create",
                SnapshotOp::Apply(_) => "apply",
                SnapshotOp::Delete(_) => "delete",
            },
            format.as_str()
        ))
        .with_path(path));
    }
    if *op == SnapshotOp::List {
        let img = Qcow2Image::open(path, false, true, &mut ChainGuard::new(sharing))?;
        let snaps = read_table(&img).map_err(|e| e.with_path(path))?;
        let infos: Vec<SnapshotInfo> = snaps.iter().map(|s| s.info()).collect();
        return Ok(render_list(&infos));
    }
    let mut img = match Qcow2Image::open(path, true, true, &mut ChainGuard::default()) {
        Ok(img) => img,
        Err(e) => return Err(refused_open(path, op, e)),
    };
    let r = match op {
        SnapshotOp::Create(name) => img.snapshot_create(name, now()),
        SnapshotOp::Apply(name) => img.snapshot_apply(name),
        SnapshotOp::Delete(name) => img.snapshot_delete(name),
        SnapshotOp::List => Ok(()),
    };
    r.map_err(|e| e.with_path(path))?;
    img.close()?;
    Ok(String::new())
}

/// The error for a read-write open of `path` for `op` that failed with `e`. qemu opens some
/// images vimg refuses to write (damaged refcounts, such as a snapshot table past the end of
/// the file) and then refuses to create a snapshot in a full table: that refusal, in qemu's
/// words, is given when it applies ([`Qcow2Image::snapshot_table_full`]).
fn refused_open(path: &Path, op: &SnapshotOp, e: Error) -> Error {
    if let SnapshotOp::Create(name) = op {
        if let Ok(ro) = Qcow2Image::open(path, false, true, &mut ChainGuard::default()) {
            if ro.snapshot_table_full() {
                return crate::qcow2::snapshot_write::too_many_snapshots(name);
            }
        }
    }
    e
}

/// The current time as qemu-img records it in a new snapshot (microsecond resolution).
fn now() -> NewSnapshot {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    NewSnapshot {
        date_sec: d.as_secs() as u32,
        date_nsec: d.subsec_micros() * 1000,
    }
}
