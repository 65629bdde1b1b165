//! `vimg check`: runs a format's consistency check and reports it as qemu-img's `check` does,
//! in JSON or as text, with qemu-img's exit codes.

use crate::block::BlockImage;
use crate::check::CheckReport;
use crate::error::Result;
use crate::ops::json::to_qemu_json;
use serde_json::{Map, Value};
use std::fmt::Write;

/// Exit code when the format has no consistency check (qemu-img's 63).
pub const EXIT_NOT_SUPPORTED: i32 = 63;

/// The message qemu-img prints when the format has no consistency check.
pub const NOT_SUPPORTED: &str = "This image format does not support checks";

/// Checks `image`; `None` if its format has no check.
pub fn check(image: &dyn BlockImage) -> Result<Option<CheckReport>> {
    match image.as_check() {
        Some(c) => c.check().map(Some),
        None => Ok(None),
    }
}

/// qemu-img's reason (after `Check failed: `) when a check gave up with `e`, if it is one
/// qemu-img reports so: a snapshot table over qemu's limits (EFBIG).
pub fn abort_reason(e: &crate::error::Error) -> Option<&'static str> {
    e.what()
        .starts_with(crate::qcow2::SNAPSHOT_READ_FAILED)
        .then_some("File too large")
}

/// qemu-img's message when `check` cannot open the qcow2
/// image at `path` because of `e`, but qemu's check would open it and then give up with
/// `File too large` (see [`abort_reason`]): a header counting more snapshots than qemu allows.
pub fn open_failure_message(path: &std::path::Path, e: &crate::error::Error) -> Option<String> {
    use crate::qcow2::{MAX_SNAPSHOTS, SNAPSHOTS_TOO_MANY};
    use std::os::unix::fs::FileExt;
    if e.what() != SNAPSHOTS_TOO_MANY {
        return None;
    }
    let mut n = [0u8; 4];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut n, 60)
        .ok()?;
    let over = u32::from_be_bytes(n).checked_sub(MAX_SNAPSHOTS)?;
    Some(format!(
        "ERROR snapshot table too large\nYou can force-remove all {over} overhanging snapshots with qemu-img check -r all"
    ))
}

/// The exit code for a finished check: 0 clean, 1 incomplete, 2 corruptions, 3 leaks only.
pub fn exit_code(report: &CheckReport) -> i32 {
    report.exit_code()
}

/// qemu-img's JSON for a check of `filename` (of format `format`), ending with a newline.
///
/// As in qemu-img, `check-errors` is always present, `image-end-offset` when known, and the
/// counters (`total-clusters`, `allocated-clusters`, `fragmented-clusters`,
/// `compressed-clusters`, `corruptions`, `leaks`, `corruptions-fixed`, `leaks-fixed`) only when
/// non-zero.
pub fn render_json(report: &CheckReport, filename: &str, format: &str) -> String {
    let mut m = Map::new();
    m.insert("filename".into(), Value::from(filename));
    m.insert("format".into(), Value::from(format));
    m.insert("check-errors".into(), Value::from(report.check_errors));
    if let Some(end) = report.image_end_offset {
        m.insert("image-end-offset".into(), Value::from(end));
    }
    for (key, n) in [
        ("total-clusters", report.total_clusters),
        ("allocated-clusters", report.allocated_clusters),
        ("fragmented-clusters", report.fragmented_clusters),
        ("compressed-clusters", report.compressed_clusters),
        ("corruptions", report.corruptions),
        ("leaks", report.leaks),
        ("corruptions-fixed", report.corruptions_fixed),
        ("leaks-fixed", report.leaks_fixed),
    ] {
        if n != 0 {
            m.insert(key.into(), Value::from(n));
        }
    }
    let mut out = to_qemu_json(&Value::Object(m));
    out.push('\n');
    out
}

/// qemu-img's text report for a check.
pub fn render_human(report: &CheckReport) -> String {
    let r = report;
    let mut o = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        o.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            let _ = write!(
                o,
                "\n{} errors were found on the image.\n\
                 Data may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            let _ = write!(
                o,
                "\n{} leaked clusters were found on the image.\n\
                 This means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            let _ = write!(
                o,
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        let _ = writeln!(
            o,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    if let Some(end) = r.image_end_offset {
        let _ = writeln!(o, "Image end offset: {end}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_like_qemu() {
        let r = CheckReport {
            image_end_offset: Some(393216),
            total_clusters: 1,
            allocated_clusters: 2,
            fragmented_clusters: 1,
            corruptions: 1,
            ..Default::default()
        };
        assert_eq!(
            render_json(&r, "cor.q", "qcow2"),
            "{\n    \"image-end-offset\": 393216,\n    \"total-clusters\": 1,\n    \
             \"corruptions\": 1,\n    \"check-errors\": 0,\n    \"allocated-clusters\": 2,\n    \
             \"filename\": \"cor.q\",\n    \"format\": \"qcow2\",\n    \
             \"fragmented-clusters\": 1\n}\n"
        );
        assert_eq!(
            render_human(&r),
            "\n1 errors were found on the image.\nData may be corrupted, or further writes to the \
             image may corrupt it.\n2/1 = 200.00% allocated, 50.00% fragmented, 0.00% compressed \
             clusters\nImage end offset: 393216\n"
        );
    }
}
