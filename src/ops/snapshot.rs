//! `vimg snapshot -l|-c NAME|-a NAME|-d NAME IMAGE`: lists, creates, applies and deletes the
//! internal snapshots of a qcow2 image (qcow2.rst "Snapshots"), as `qemu-img snapshot` does.
//!
//! The format does the work, through its [`crate::capability::Snapshots`].

use crate::block::ImageFormat;
use crate::capability::SnapshotTime;
use crate::error::{Error, Result};
use crate::info::SnapshotInfo;
use crate::open::{open_image, refuse_forced_write, OpenOptions, Sharing};
use crate::opener::Opener;
use crate::ops::size::human_size;
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
    opener: &Opener,
) -> Result<String> {
    refuse_forced_write(sharing, *op != SnapshotOp::List).map_err(|e| e.with_path(path))?;
    // As qemu-img: a list opens the image read-only, every other operation read-write (so a
    // writer elsewhere is refused with qemu's "write" lock message).
    let writable = *op != SnapshotOp::List;
    let opened = open_image(
        path,
        &OpenOptions {
            format,
            writable,
            no_backing: true,
            sharing,
            opener: opener.clone(),
            ..OpenOptions::default()
        },
    );
    let mut img = match opened {
        Ok(img) => img,
        Err(e) => return Err(refused_open(path, format, op, e, opener)),
    };
    let format = img.format();
    let Some(snapshots) = img.as_snapshots_mut() else {
        // qemu-img's words: a list is empty, the rest fail as its block layer says.
        let why = |what: &str, name: &str, qemu: &str| {
            Error::unsupported(format!(
                "Could not {what} snapshot '{name}': {qemu} (the {format} format has no \
                 internal snapshots)"
            ))
            .with_path(path)
        };
        return match op {
            SnapshotOp::List => Ok(String::new()),
            SnapshotOp::Create(n) => Err(why("create", n, "Operation not supported")),
            SnapshotOp::Apply(n) => Err(why("apply", n, "Block driver does not support snapshots")),
            SnapshotOp::Delete(n) => Err(why("delete", n, "snapshot not found")),
        };
    };
    if *op == SnapshotOp::List {
        let infos = snapshots.list_snapshots().map_err(|e| e.with_path(path))?;
        return Ok(render_list(&infos));
    }
    let r = match op {
        SnapshotOp::Create(name) => snapshots.create_snapshot(name, SnapshotTime::now()),
        SnapshotOp::Apply(name) => snapshots.apply_snapshot(name),
        SnapshotOp::Delete(name) => snapshots.delete_snapshot(name),
        SnapshotOp::List => Ok(()),
    };
    r.map_err(|e| e.with_path(path))?;
    img.finish()?;
    Ok(String::new())
}

/// The error for a read-write open of `path` for `op` that failed with `e`. qemu opens some
/// images vimg refuses to write (damaged refcounts, such as a snapshot table past the end of
/// the file) and then refuses to create a snapshot in a full table: that refusal, in qemu's
/// words, is given when it applies ([`crate::capability::Snapshots::refuse_create`]).
fn refused_open(
    path: &Path,
    format: Option<ImageFormat>,
    op: &SnapshotOp,
    e: Error,
    opener: &Opener,
) -> Error {
    if let SnapshotOp::Create(name) = op {
        let ro = OpenOptions {
            format,
            no_backing: true,
            opener: opener.clone(),
            ..OpenOptions::default()
        };
        if let Ok(img) = open_image(path, &ro) {
            if let Some(Err(full)) = img.as_snapshots().map(|s| s.refuse_create(name)) {
                return full;
            }
        }
    }
    e
}

/// `YYYY-MM-DD HH:MM:SS` for `secs` since the epoch, in UTC.
///
/// qemu-img prints snapshot dates in the local time zone; vimg has no time zone database and
/// prints UTC (identical on hosts whose local time is UTC).
pub fn format_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_795_303_610), "2026-11-21 23:26:50");
        assert_eq!(format_date(951_782_400), "2000-02-29 00:00:00");
    }
}
