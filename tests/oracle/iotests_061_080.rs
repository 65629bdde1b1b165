//! Messages, exit codes and results of the commands qemu's iotests 061 (amend) and 080
//! (snapshots over corrupted tables) run, compared with qemu-img 10.0.2 on the same input.
//!
//! vimg runs under the name `qemu-img` (a link in a scratch directory), as scripts that match
//! qemu-img's messages see it, so that both programs' standard error can be compared whole.

use crate::common;
use crate::common::header_fields;
use common::poke;
use common::Scratch;

use common::{qemu_available, qemu_create, qemu_io};
use std::path::Path;
use std::process::Command;

/// Runs `prog` with `args` in `dir`: (exit code, standard error).
fn stderr_of(dir: &Path, prog: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The virtual size `qemu-img info` shows.
fn virtual_size(img: &Path) -> u64 {
    let out = common::run(
        "qemu-img",
        &["info", "--output", "json", img.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Makes `name` (and its copy `q-name` for qemu-img) with `setup`, then runs `args` (with
/// `IMG` standing for the image) with vimg on the first and qemu-img on the copy: both must
/// print the same standard error, exit with the same code and leave the same virtual size.
fn same_as_qemu(s: &Scratch, name: &str, setup: impl Fn(&Path), args: &[&str]) {
    let v = s.path(name);
    let q = s.path(&format!("q-{name}"));
    setup(&v);
    std::fs::copy(&v, &q).unwrap();
    let with = |img: &Path| -> Vec<String> {
        args.iter()
            .map(|a| {
                if *a == "IMG" {
                    img.file_name().unwrap().to_str().unwrap().to_string()
                } else {
                    a.to_string()
                }
            })
            .collect()
    };
    let va = with(&v);
    let qa = with(&q);
    let va: Vec<&str> = va.iter().map(String::as_str).collect();
    let qa: Vec<&str> = qa.iter().map(String::as_str).collect();
    let (cv, ev) = stderr_of(s.dir.path(), &s.vimg, &va);
    let (cq, eq) = stderr_of(s.dir.path(), Path::new("qemu-img"), &qa);
    let eq = eq.replace(&format!("q-{name}"), name);
    assert_eq!((cv, ev.as_str()), (cq, eq.as_str()), "{args:?}");
    assert_eq!(virtual_size(&v), virtual_size(&q), "{args:?}");
}

fn create(opts: &'static str, size: u64) -> impl Fn(&Path) {
    move |p: &Path| qemu_create(p, "qcow2", opts, None, size)
}

#[test]
fn amend_refusals_as_qemu_img() {
    if !qemu_available("iotests_061_080 amend") {
        return;
    }
    let s = Scratch::new();
    let v2_snap = |p: &Path| {
        qemu_create(p, "qcow2", "compat=0.10", None, 32 << 20);
        common::run("qemu-img", &["snapshot", "-c", "foo", p.to_str().unwrap()]);
    };
    same_as_qemu(&s, "a.qcow2", v2_snap, &["resize", "IMG", "64M"]);
    let v2 = create("compat=0.10", 64 << 20);
    same_as_qemu(
        &s,
        "b.qcow2",
        &v2,
        &["amend", "-o", "lazy_refcounts=on", "IMG"],
    );
    same_as_qemu(
        &s,
        "c.qcow2",
        create("", 64 << 20),
        &["amend", "-o", "compat=0.10,lazy_refcounts=on", "IMG"],
    );
    same_as_qemu(&s, "d.qcow2", &v2, &["amend", "-o", "compat=0.42", "IMG"]);
    for opt in ["cluster_size=1k", "encryption=on", "preallocation=full"] {
        same_as_qemu(&s, "e.qcow2", &v2, &["amend", "-o", opt, "IMG"]);
    }
    let data = format!("data_file={}", s.path("f.data").display());
    same_as_qemu(
        &s,
        "f.qcow2",
        |p: &Path| qemu_create(p, "qcow2", &data, None, 64 << 20),
        &["amend", "-o", "compat=0.10", "IMG"],
    );
    same_as_qemu(
        &s,
        "g.qcow2",
        create("extended_l2=on", 64 << 20),
        &["amend", "-o", "compat=0.10", "IMG"],
    );
}

#[test]
fn amend_refuses_backing_changes_as_qemu_img() {
    if !qemu_available("iotests_061_080 backing") {
        return;
    }
    let s = Scratch::new();
    let base = s.path("base.qcow2");
    qemu_create(&base, "qcow2", "", None, 64 << 20);
    let plain = create("", 64 << 20);
    let backed = |p: &Path| qemu_create(p, "qcow2", "", Some((&base, "qcow2")), 64 << 20);
    let b = base.to_str().unwrap();
    let set = format!("backing_file={b},backing_fmt=qcow2");
    let file_only = format!("backing_file={b}");
    for opts in [set.as_str(), "backing_file=", "backing_fmt=qcow2"] {
        same_as_qemu(&s, "a.qcow2", &plain, &["amend", "-o", opts, "IMG"]);
    }
    // The current backing file and format, both given, are accepted; anything else is not.
    for opts in [
        set.as_str(),
        file_only.as_str(),
        "backing_fmt=qcow2",
        "backing_fmt=raw",
        "backing_file=",
    ] {
        same_as_qemu(&s, "b.qcow2", backed, &["amend", "-o", opts, "IMG"]);
    }
}

#[test]
fn downgrade_refused_after_resize_as_qemu_img() {
    if !qemu_available("iotests_061_080 resize then downgrade") {
        return;
    }
    let s = Scratch::new();
    // Snapshots of two sizes: qemu-img shrinks the image, then refuses the downgrade (a
    // snapshot's size differs from the new one); the image keeps its new size.
    let setup = |p: &Path| {
        let f = p.to_str().unwrap();
        qemu_create(p, "qcow2", "compat=0.10", None, 32 << 20);
        qemu_io(p, "qcow2", &["write -P 0x2a 24M 64k".into()]);
        common::run("qemu-img", &["snapshot", "-c", "foo", f]);
        common::run("qemu-img", &["amend", "-o", "compat=1.1,size=128M", f]);
        common::run("qemu-img", &["snapshot", "-c", "bar", f]);
        common::run("qemu-img", &["resize", "--shrink", f, "64M"]);
    };
    same_as_qemu(
        &s,
        "a.qcow2",
        setup,
        &["amend", "-o", "compat=0.10,size=32M", "IMG"],
    );
    let (code, out) =
        common::run_status("qemu-img", &["check", s.path("a.qcow2").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

/// A 64 MiB image with data at 0 and one snapshot `test` whose table entry gets `field`
/// (offset within the entry) overwritten with `bytes`, as in iotest 080.
fn corrupt_snapshot(img: &Path, field: u64, bytes: &[u8]) {
    qemu_create(img, "qcow2", "", None, 64 << 20);
    qemu_io(img, "qcow2", &["write 0 512".into()]);
    common::run(
        "qemu-img",
        &["snapshot", "-c", "test", img.to_str().unwrap()],
    );
    let header = std::fs::read(img).unwrap();
    let table = common::header_u64(&header, header_fields::SNAPSHOTS_OFFSET);
    poke(img, table + field, bytes);
}

#[test]
fn corrupt_snapshot_l1_refused_per_operation_as_qemu_img() {
    if !qemu_available("iotests_061_080 snapshot L1") {
        return;
    }
    let s = Scratch::new();
    // An L1 offset not cluster-aligned; an L1 table over 32 MiB.
    let cases: [(u64, &[u8]); 2] = [
        (0, &0x400200u64.to_be_bytes()),
        (8, &0x1000_0000u32.to_be_bytes()),
    ];
    for (field, bytes) in cases {
        let setup = |p: &Path| corrupt_snapshot(p, field, bytes);
        let convert = ["convert", "-l", "test", "IMG", "o.raw"];
        same_as_qemu(&s, "a.qcow2", setup, &convert);
        same_as_qemu(&s, "a.qcow2", setup, &["amend", "-o", "compat=0.10", "IMG"]);
        same_as_qemu(&s, "a.qcow2", setup, &["snapshot", "-a", "test", "IMG"]);
        same_as_qemu(&s, "a.qcow2", setup, &["snapshot", "-d", "test", "IMG"]);
        // check names the entry as qemu-img does.
        let img = s.path("c.qcow2");
        setup(&img);
        let i = img.to_str().unwrap();
        let (cq, oq) = common::run_status("qemu-img", &["check", i]);
        let out = Command::new(&s.vimg).args(["check", i]).output().unwrap();
        let ov = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(cq));
        let line = oq
            .lines()
            .find(|l| l.starts_with("ERROR snapshot"))
            .unwrap();
        assert!(ov.lines().any(|l| l == line), "{ov}\nqemu-img: {line}");
    }
}

/// A version 3 image with lazy refcounts left dirty by a killed qemu-io after a 128 KiB
/// write (iotest 061 "dirty version downgrade"): its refcounts were never written.
fn dirty_image(p: &Path) {
    qemu_create(p, "qcow2", "compat=1.1,lazy_refcounts=on", None, 64 << 20);
    let status = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x2a 0 128k",
            "-c",
            "flush",
            "-c",
            "sigraise 9",
        ])
        .arg(p)
        .output()
        .unwrap()
        .status;
    assert!(!status.success(), "qemu-io was to be killed");
}

/// qemu's read-write open of a dirty image repairs it and prints the repair's lines
/// (`ERROR cluster ...`, `Rebuilding refcount structure`, `Repairing cluster ...`) on
/// standard error; vimg's amend must print the same and leave a clean image.
#[test]
fn amend_of_dirty_image_prints_repair_as_qemu_img() {
    if !qemu_available("iotests_061_080 dirty") {
        return;
    }
    let s = Scratch::new();
    for (name, opt) in [
        ("a.qcow2", "compat=0.10"),
        ("b.qcow2", "lazy_refcounts=off"),
    ] {
        same_as_qemu(&s, name, dirty_image, &["amend", "-o", opt, "IMG"]);
        let check = common::run("qemu-img", &["check", s.path(name).to_str().unwrap()]);
        assert!(check.contains("No errors were found"), "{check}");
    }
    // The lines really are there (the comparison above is not between two empty outputs).
    let p = s.path("c.qcow2");
    dirty_image(&p);
    let (_, err) = stderr_of(
        s.dir.path(),
        &s.vimg,
        &["amend", "-o", "compat=0.10", "c.qcow2"],
    );
    assert!(err.contains("Rebuilding refcount structure\n"), "{err}");
}

/// `amend -p` prints progress as qemu-img does: a downgrade reports each L1 entry of the
/// active table and of every snapshot's (iotest 061 "progress report").
#[test]
fn amend_progress_steps_as_qemu_img() {
    if !qemu_available("iotests_061_080 progress") {
        return;
    }
    let s = Scratch::new();
    for snapshot in [false, true] {
        let mut outs = Vec::new();
        for prog in [s.vimg.as_path(), Path::new("qemu-img")] {
            let base = s.path("base.qcow2");
            let img = s.path("p.qcow2");
            let _ = std::fs::remove_file(&img);
            qemu_create(&base, "qcow2", "compat=1.1", None, 4 << 30);
            qemu_create(&img, "qcow2", "compat=1.1", Some((&base, "qcow2")), 4 << 30);
            let writes: Vec<String> = ["0", "1G", "2G", "3G"]
                .iter()
                .map(|o| format!("write -z {o} 64k"))
                .collect();
            qemu_io(&img, "qcow2", &writes);
            if snapshot {
                common::run(
                    "qemu-img",
                    &["snapshot", "-c", "foo", img.to_str().unwrap()],
                );
            }
            let out = Command::new(prog)
                .args(["amend", "-p", "-o", "compat=0.10", "p.qcow2"])
                .current_dir(s.dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            outs.push(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        assert_eq!(outs[0], outs[1], "snapshot: {snapshot}");
        let steps = if snapshot { 18 } else { 10 };
        assert_eq!(outs[0].matches("/100%)").count(), steps, "{}", outs[0]);
    }
}

/// Standard error of `vimg` and of `qemu-img` (both named `qemu-img`) run with `args` in the
/// scratch directory: both must match, with the same exit code. Returns vimg's stdout.
fn both_say_the_same(s: &Scratch, args: &[&str]) -> String {
    let (cv, ev) = stderr_of(s.dir.path(), &s.vimg, args);
    let (cq, eq) = stderr_of(s.dir.path(), Path::new("qemu-img"), args);
    assert_eq!((cv, ev.as_str()), (cq, eq.as_str()), "{args:?}");
    let out = Command::new(&s.vimg)
        .args(args)
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `format-specific` part of `info --output=json` by `prog`, with `args` before the name.
fn format_specific(s: &Scratch, prog: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(prog)
        .args(["info", "--output=json"])
        .args(args)
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{prog:?} {args:?}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["format-specific"].clone()
}

/// Amends `t.qcow2` with vimg and a copy of it with qemu-img (`-o opts`, the image named by
/// `name(file)`, with `--image-opts` when that is not the file name): both must print the
/// same and exit alike. The copy is removed.
fn amend_copies_as_qemu_img(s: &Scratch, opts: &str, name: impl Fn(&str) -> String) {
    std::fs::copy(s.path("t.qcow2"), s.path("q.qcow2")).unwrap();
    let run = |prog: &Path, img: &str| {
        let spec = name(img);
        let mut args = vec!["amend", "-o", opts];
        if spec != img {
            args.push("--image-opts");
        }
        args.push(&spec);
        let (code, err) = stderr_of(s.dir.path(), prog, &args);
        (code, err.replace(img, "IMG"))
    };
    assert_eq!(
        run(&s.vimg, "t.qcow2"),
        run(Path::new("qemu-img"), "q.qcow2"),
        "{opts}"
    );
    std::fs::remove_file(s.path("q.qcow2")).unwrap();
}

/// iotest 061 "Try changing the external data file": a data file name that does not exist
/// is recorded as qemu-img records it; info still describes the image (it does no I/O), other
/// opens fail with qemu's words; `--image-opts data-file.filename=...` gives the data file
/// instead; `data_file=` clears the name, after which the data file must be given.
#[test]
fn external_data_file_renamed_missing_and_given_as_qemu_img() {
    if !qemu_available("iotests_061_080 data-file") {
        return;
    }
    let s = Scratch::new();
    let data = s.path("t.qcow2.data");
    qemu_create(
        &s.path("t.qcow2"),
        "qcow2",
        &format!("compat=1.1,data_file={}", data.display()),
        None,
        64 << 20,
    );
    qemu_io(
        &s.path("t.qcow2"),
        "qcow2",
        &["write -P 0x2a 0 64k".to_string()],
    );
    amend_copies_as_qemu_img(&s, "data_file=foo", |img| img.to_string());
    let info = both_say_the_same(&s, &["info", "t.qcow2"]);
    assert!(info.contains("    data file: foo\n"), "{info}");
    both_say_the_same(&s, &["convert", "-O", "raw", "t.qcow2", "x.raw"]);
    let given = format!(
        "data-file.filename={},file.filename=t.qcow2",
        data.display()
    );
    for args in [&["t.qcow2"][..], &["--image-opts", &given]] {
        assert_eq!(
            format_specific(&s, &s.vimg, args),
            format_specific(&s, Path::new("qemu-img"), args),
            "{args:?}"
        );
    }
    // The data file given is the one read: the guest data is there.
    both_say_the_same(
        &s,
        &["convert", "-O", "raw", "--image-opts", &given, "given.raw"],
    );
    let raw = std::fs::read(s.path("given.raw")).unwrap();
    assert!(raw[..65536].iter().all(|&b| b == 0x2a));

    amend_copies_as_qemu_img(&s, "data_file=", |img| {
        format!("data-file.filename={},file.filename={img}", data.display())
    });
    let info = both_say_the_same(&s, &["info", "t.qcow2"]);
    assert!(
        !info.contains("data file:") && info.contains("data file raw"),
        "{info}"
    );
    both_say_the_same(&s, &["check", "t.qcow2"]);
    both_say_the_same(&s, &["check", "--image-opts", &given]);
    assert_eq!(
        format_specific(&s, &s.vimg, &["--image-opts", &given]),
        format_specific(&s, Path::new("qemu-img"), &["--image-opts", &given]),
    );
}
