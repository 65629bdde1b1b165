//! No command writes over a file it reads: a target that is a source image, a file of a
//! source's backing chain or a data file is refused under every spelling (the same name, a
//! symbolic link, a hard link), with exit code 1, and the files read are left byte for byte as
//! they were, internal snapshots included (`qemu-img snapshot -l` unchanged). Where qemu-img
//! refuses the same command, its words come first in vimg's message.

use crate::common;

use common::{qemu_available, run_in};
use std::path::Path;

fn vimg() -> &'static str {
    env!("CARGO_BIN_EXE_vimg")
}

/// Makes, in `dir`: `s.qcow2` (data and an internal snapshot), `h.qcow2` (a hard link to it),
/// `l.qcow2` (a symbolic link to it), `o.qcow2` (an overlay over it), `x.qcow2` with external
/// data file `d.raw` and `xh.qcow2` a hard link to it, and `other.raw`.
fn setup(dir: &Path) {
    let q = |args: &[&str]| {
        let (rc, out) = run_in(dir, "qemu-img", args);
        assert_eq!(rc, 0, "qemu-img {args:?}: {out}");
    };
    q(&["create", "-q", "-f", "qcow2", "s.qcow2", "4M"]);
    let (rc, out) = run_in(
        dir,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 64k 192k", "s.qcow2"],
    );
    assert_eq!(rc, 0, "{out}");
    q(&["snapshot", "-c", "snap1", "s.qcow2"]);
    std::fs::hard_link(dir.join("s.qcow2"), dir.join("h.qcow2")).unwrap();
    std::os::unix::fs::symlink("s.qcow2", dir.join("l.qcow2")).unwrap();
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "s.qcow2", "-F", "qcow2", "o.qcow2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw",
        "x.qcow2",
        "4M",
    ]);
    std::fs::hard_link(dir.join("x.qcow2"), dir.join("xh.qcow2")).unwrap();
    q(&["create", "-q", "-f", "raw", "other.raw", "4M"]);
}

/// Everything that must not change: the bytes of the files read, and the snapshot list.
fn state(dir: &Path) -> (Vec<Vec<u8>>, String) {
    let files = ["s.qcow2", "o.qcow2", "x.qcow2", "d.raw"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    let (rc, snaps) = run_in(dir, "qemu-img", &["snapshot", "-l", "-U", "s.qcow2"]);
    assert_eq!(rc, 0, "{snaps}");
    (files, snaps)
}

/// (vimg arguments, words its message must hold, whether qemu-img refuses it too with them).
const CASES: &[(&str, &str, bool)] = &[
    // convert onto the source, under three names, in both output formats
    (
        "convert -O qcow2 s.qcow2 s.qcow2",
        "Failed to get \"write\" lock",
        true,
    ),
    (
        "convert -O qcow2 s.qcow2 h.qcow2",
        "Failed to get \"write\" lock",
        true,
    ),
    (
        "convert -O raw s.qcow2 l.qcow2",
        "Failed to get \"write\" lock",
        true,
    ),
    (
        "convert -O raw s.qcow2 h.qcow2",
        "Failed to get \"write\" lock",
        true,
    ),
    // onto a file of the source's backing chain
    (
        "convert -O qcow2 o.qcow2 s.qcow2",
        "Failed to get \"write\" lock",
        true,
    ),
    (
        "convert -O qcow2 o.qcow2 h.qcow2",
        "Failed to get \"write\" lock",
        true,
    ),
    (
        "convert -n -O qcow2 o.qcow2 h.qcow2",
        "Failed to get \"write\" lock",
        true,
    ),
    (
        "convert -n -O qcow2 s.qcow2 l.qcow2",
        "Failed to get \"write\" lock",
        false,
    ),
    // onto a source's data file
    (
        "convert -O raw x.qcow2 d.raw",
        "Failed to get \"write\" lock",
        true,
    ),
    // a new target whose data file or backing chain is read
    (
        "convert -O qcow2 -o data_file=h.qcow2 o.qcow2 n.qcow2",
        "Failed to get \"write\" lock",
        false,
    ),
    (
        "convert -O qcow2 -B o.qcow2 -F qcow2 other.raw h.qcow2",
        "Failed to get \"write\" lock",
        false,
    ),
    // rebase onto the image itself, or a chain that reads it
    (
        "rebase -b h.qcow2 -F qcow2 s.qcow2",
        "Could not open new backing file",
        true,
    ),
    (
        "rebase -b o.qcow2 -F qcow2 s.qcow2",
        "Could not open new backing file",
        false,
    ),
    // create over its own backing file or chain
    (
        "create -f qcow2 -b h.qcow2 -F qcow2 s.qcow2",
        "Trying to create an image with the same filename as the backing file",
        false,
    ),
    (
        "create -f qcow2 -u -b h.qcow2 -F qcow2 s.qcow2 4M",
        "Trying to create an image with the same filename as the backing file",
        false,
    ),
    (
        "create -f qcow2 -b o.qcow2 -F qcow2 s.qcow2",
        "over a file of its own backing chain",
        false,
    ),
    (
        "create -f qcow2 -b o.qcow2 -F qcow2 -o data_file=h.qcow2 n.qcow2",
        "over a file of its own backing chain",
        false,
    ),
    // amend a data file name that is the image itself or its backing file
    (
        "amend -o data_file=xh.qcow2 x.qcow2",
        "its own data file",
        false,
    ),
];

#[test]
fn targets_that_are_read_are_refused() {
    if !qemu_available("targets_that_are_read_are_refused") {
        return;
    }
    let mut failures = Vec::new();
    for &(cmd, words, qemu_too) in CASES {
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        let before = state(dir.path());
        let args: Vec<&str> = cmd.split(' ').collect();
        let (rc, out) = run_in(dir.path(), vimg(), &args);
        if rc != 1 || !out.contains(words) {
            failures.push(format!("vimg {cmd}: exit {rc} (want 1, '{words}'): {out}"));
        }
        if state(dir.path()) != before {
            failures.push(format!("vimg {cmd}: changed the files it reads"));
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".vimg-"))
            .collect();
        if !names.is_empty() {
            failures.push(format!("vimg {cmd}: left {names:?}"));
        }
        if qemu_too {
            let twin = tempfile::tempdir().unwrap();
            setup(twin.path());
            let (qrc, qout) = run_in(twin.path(), "qemu-img", &args);
            let first = qout.lines().next().unwrap_or("");
            let first = first.split(": ").last().unwrap_or("");
            if qrc != rc || !out.contains(first) {
                failures.push(format!(
                    "vimg {cmd}: exit {rc} '{out}', qemu-img exit {qrc} '{qout}'"
                ));
            }
        }
    }
    common::assert_no_failures(&failures);
}

/// A target that is not read is still written, through a link too (the refusal is by
/// identity, not by name).
#[test]
fn unrelated_targets_are_written() {
    if !qemu_available("unrelated_targets_are_written") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    std::os::unix::fs::symlink("other.raw", dir.path().join("ol.raw")).unwrap();
    let (rc, out) = run_in(
        dir.path(),
        vimg(),
        &["convert", "-O", "raw", "s.qcow2", "ol.raw"],
    );
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = run_in(
        dir.path(),
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "s.qcow2",
            "other.raw",
        ],
    );
    assert_eq!(rc, 0, "{out}");
}
