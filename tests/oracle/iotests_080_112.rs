//! Messages, exit codes and results of commands qemu's iotests 080 (snapshots over corrupted
//! tables) and 112 (refcount widths) run, compared with qemu-img 10.0.2 on the same input.
//! Where qemu-img leaves clusters leaked after a refused snapshot, vimg must leave the file
//! as it was.
//!
//! vimg runs under the name `qemu-img` (a link in a scratch directory), so that both
//! programs' output can be compared whole.

use crate::common;
use crate::common::header_fields;
use common::poke;
use common::Scratch;

use common::{qemu_available, qemu_create, qemu_io};
use std::path::Path;
use std::process::Command;

/// Runs `prog` with `args` in `dir` (dates in UTC): (exit code, standard output, standard
/// error).
fn output_of(dir: &Path, prog: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Makes `name` (and its copy `q-name` for qemu-img) with `setup`, then runs `args` (with
/// `IMG` standing for the image) with vimg on the first and qemu-img on the copy: both must
/// exit with the same code and print the same (standard output and error). Returns the
/// image's bytes before and after vimg ran.
fn same_as_qemu(
    s: &Scratch,
    name: &str,
    setup: impl Fn(&Path),
    args: &[&str],
) -> (Vec<u8>, Vec<u8>) {
    let v = s.path(name);
    let q = s.path(&format!("q-{name}"));
    setup(&v);
    std::fs::copy(&v, &q).unwrap();
    let before = std::fs::read(&v).unwrap();
    let with = |img: &str| -> Vec<String> {
        args.iter()
            .map(|a| if *a == "IMG" { img } else { a }.to_string())
            .collect()
    };
    let va = with(name);
    let qname = format!("q-{name}");
    let qa = with(&qname);
    let va: Vec<&str> = va.iter().map(String::as_str).collect();
    let qa: Vec<&str> = qa.iter().map(String::as_str).collect();
    let (cv, ov, ev) = output_of(s.dir.path(), &s.vimg, &va);
    let (cq, oq, eq) = output_of(s.dir.path(), Path::new("qemu-img"), &qa);
    let (oq, eq) = (oq.replace(&qname, name), eq.replace(&qname, name));
    assert_eq!(
        (cv, ov.as_str(), ev.as_str()),
        (cq, oq.as_str(), eq.as_str()),
        "{args:?}"
    );
    (before, std::fs::read(&v).unwrap())
}

/// 080 "Hitting snapshot table size limit": a full snapshot table (65536 entries) past the
/// end of the file. qemu opens the image (the table reads as zeros) and refuses a new
/// snapshot with EFBIG; vimg did not open it.
#[test]
fn full_snapshot_table_past_the_end_as_qemu_img() {
    if !qemu_available("iotests_080_112 snapshot table past the end") {
        return;
    }
    let s = Scratch::new();
    let setup = |p: &Path| {
        qemu_create(p, "qcow2", "", None, 64 << 20);
        poke(
            p,
            header_fields::SNAPSHOTS_OFFSET,
            &0x100_0000u64.to_be_bytes(),
        );
        poke(p, header_fields::NB_SNAPSHOTS, &0x1_0000u32.to_be_bytes());
    };
    let (before, after) = same_as_qemu(&s, "a.qcow2", setup, &["snapshot", "-c", "test", "IMG"]);
    assert!(before == after, "a refused snapshot changed the image");
    // The entries read as zeros: no id, no name, no instruction count ("--").
    same_as_qemu(&s, "b.qcow2", setup, &["snapshot", "-l", "IMG"]);
}

/// 080 "Invalid L2 entry (huge physical offset)": a snapshot whose refcount increase qemu
/// cannot make, with qemu's errno (the L2 entry's reserved bits set do not come first). qemu
/// leaks clusters on the way; vimg must leave the file as it was.
#[test]
fn snapshot_of_huge_l2_offset_refused_as_qemu_img() {
    if !qemu_available("iotests_080_112 huge L2 offset") {
        return;
    }
    let s = Scratch::new();
    // Reserved bits and an offset no refcount table can reach ("File too large"); an offset
    // whose refcount block does not exist ("Resource temporarily unavailable").
    for entry in [0xbfff_ffff_ffff_0000u64, 0x8000_00ff_ffff_0000] {
        let setup = |p: &Path| {
            qemu_create(p, "qcow2", "", None, 64 << 20);
            qemu_io(p, "qcow2", &["write 0 512".into()]);
            poke(p, 0x40000, &entry.to_be_bytes());
        };
        let (before, after) =
            same_as_qemu(&s, "a.qcow2", setup, &["snapshot", "-c", "test", "IMG"]);
        assert!(
            before == after,
            "a refused snapshot changed the image ({entry:#x})"
        );
    }
}

/// 112: a negative refcount width is taken as qemu takes it (a huge number), shown in the
/// "Formatting" line and refused as a width.
#[test]
fn negative_refcount_width_as_qemu_img() {
    if !qemu_available("iotests_080_112 negative width") {
        return;
    }
    let s = Scratch::new();
    for opt in ["refcount_bits=-1", "refcount_bits=-16", "refcount_bits=0"] {
        let setup = |_: &Path| {};
        let v = s.path("n.qcow2");
        std::fs::write(&v, b"").unwrap();
        same_as_qemu(
            &s,
            "n.qcow2",
            setup,
            &["create", "-f", "qcow2", "-o", opt, "IMG", "64M"],
        );
    }
}

/// 112 "Amend with snapshot": a width too narrow for a refcount is refused in qemu's words,
/// without the file name.
#[test]
fn amend_to_narrow_width_refused_as_qemu_img() {
    if !qemu_available("iotests_080_112 amend narrow") {
        return;
    }
    let s = Scratch::new();
    let setup = |p: &Path| {
        qemu_create(p, "qcow2", "", None, 64 << 20);
        qemu_io(p, "qcow2", &["write 0 64k".into()]);
        common::run("qemu-img", &["snapshot", "-c", "foo", p.to_str().unwrap()]);
    };
    let (before, after) = same_as_qemu(
        &s,
        "a.qcow2",
        setup,
        &["amend", "-o", "refcount_bits=1", "IMG"],
    );
    assert!(before == after);
}

/// 112 "Testing too many references for check": a cluster with more references than its
/// refcount width counts, reported in qemu's words, once, by `check` and by `check -r all`
/// (which cannot repair it).
#[test]
fn refcount_overflow_reported_as_qemu_img() {
    if !qemu_available("iotests_080_112 overflow") {
        return;
    }
    let s = Scratch::new();
    let setup = |p: &Path| {
        qemu_create(p, "qcow2", "refcount_bits=1", None, 64 << 20);
        qemu_io(p, "qcow2", &["write 0 64k".into()]);
        poke(p, 0x40008, &0x8000_0000_0005_0000u64.to_be_bytes());
    };
    same_as_qemu(&s, "a.qcow2", setup, &["check", "IMG"]);
    same_as_qemu(&s, "b.qcow2", setup, &["check", "-r", "all", "IMG"]);
}
