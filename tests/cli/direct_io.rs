//! `-t none` / `-T none` / `directsync`: images opened with `O_DIRECT`, every request aligned
//! to the device's logical block (512 or 4096 bytes), partial blocks read-modify-written.
//!
//! On loop devices the tests make (`-b 512` and `-b 4096`, with and without
//! `--direct-io=on`), against qemu-img doing the same on a twin device over an identical file,
//! and on regular files. That `O_DIRECT` is really used is seen in `strace`'s `openat` lines.
//!
//! Needs root, `losetup` and `strace`; skipped with a message without them, unless
//! `VIMG_REQUIRE_QEMU=1` (then the test fails, as the qemu tests do). Files are made under the
//! build's target directory: tmpfs, where `/tmp` often is, refuses `O_DIRECT` before Linux 6.6
//! (and vimg, as qemu, fails the open there).

use crate::common;

use common::loop_device::Loop;
use common::{qemu_available, qemu_create, qemu_io, run, run_status};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

/// A directory on a file system that takes `O_DIRECT`.
fn dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn require(test: &str, what: &str) {
    if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{test}: {what} but VIMG_REQUIRE_QEMU=1");
    }
    eprintln!("{test}: skipping: {what}");
}

/// A 4 MiB file of 0xee bytes (what was on the device before) with a loop device over it.
fn device(dir: &Path, name: &str, sector: u32, dio: bool) -> Option<Loop> {
    let file = dir.join(format!("{name}.raw"));
    std::fs::write(&file, vec![0xeeu8; 4 << 20]).unwrap();
    let options: &[&str] = if dio {
        &["--direct-io=on"]
    } else {
        &["--direct-io=off"]
    };
    match Loop::attach_with(&file, sector, options) {
        Ok(l) => Some(l),
        Err(why) => {
            require("direct_io", &format!("no loop device ({why})"));
            None
        }
    }
}

fn sha(path: &str) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A qcow2 source of 4 MiB with data at offsets aligned to 512 but not to 4096, a zeroed
/// range, and the last sector written.
fn source(dir: &Path, opts: &str) -> PathBuf {
    let src = dir.join("src.qcow2");
    qemu_create(&src, "qcow2", opts, None, 4 << 20);
    qemu_io(
        &src,
        "qcow2",
        &[
            "write -P 0x11 512 1536".into(),
            "write -P 0x22 1052160 9k".into(),
            "write -P 0x33 3M 64k".into(),
            "write -z 3200k 8k".into(),
            "write -P 0x44 4193792 512".into(),
        ],
    );
    src
}

fn assert_identical(a: &str, b: &str) {
    let (code, out) = run_status("qemu-img", &["compare", a, b]);
    assert_eq!(code, 0, "qemu-img compare {a} {b}: {out}");
}

fn assert_clean(img: &str) {
    let (code, out) = run_status("qemu-img", &["check", img]);
    assert_eq!(code, 0, "qemu-img check {img}: {out}");
}

/// `convert -t none -n -O raw` onto a device, `-T none` from it, and a qcow2 written onto a
/// device with `-t none`, for one sector size and loop mode.
fn devices(sector: u32, dio: bool) {
    if !qemu_available("direct_io") {
        return;
    }
    let d = dir();
    let src = source(d.path(), "");
    let (Some(a), Some(b)) = (
        device(d.path(), "a", sector, dio),
        device(d.path(), "b", sector, dio),
    ) else {
        return;
    };
    let (a, b) = (a.path().to_string(), b.path().to_string());
    let what = format!("{sector}-byte sectors, direct-io={dio}");

    // Raw onto the device: -S 512 makes writes and zeroing of single 512-byte sectors, which a
    // 4096-byte device takes only as read-modify-writes.
    for cache in ["none", "directsync"] {
        let args = ["convert", "-t", cache, "-n", "-S", "512", "-O", "raw"];
        let mut ours = args.to_vec();
        ours.extend([p(&src), &a]);
        run(VIMG, &ours);
        let mut theirs = args.to_vec();
        theirs.extend([p(&src), &b]);
        run("qemu-img", &theirs);
        assert_eq!(sha(&a), sha(&b), "-t {cache} onto the device, {what}");
        assert_identical(p(&src), &a);
    }

    // From the device into a file, the device read with O_DIRECT.
    let out = d.path().join("out.qcow2");
    let qout = d.path().join("qout.qcow2");
    run(VIMG, &["convert", "-T", "none", "-O", "qcow2", &a, p(&out)]);
    run(
        "qemu-img",
        &["convert", "-T", "none", "-O", "qcow2", &b, p(&qout)],
    );
    assert_clean(p(&out));
    assert_identical(&a, p(&out));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&qout).unwrap(),
        "convert -T none from the device, {what}"
    );

    // A qcow2 with 512-byte clusters on the device, every cluster, table entry and header
    // field written with O_DIRECT; the same written through the page cache on the twin must
    // give the same bytes.
    for dev in [&a, &b] {
        run(
            VIMG,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                dev,
                "4M",
            ],
        );
    }
    run(
        VIMG,
        &["convert", "-n", "-t", "none", "-O", "qcow2", p(&src), &a],
    );
    run(VIMG, &["convert", "-n", "-O", "qcow2", p(&src), &b]);
    assert_clean(&a);
    assert_identical(p(&src), &a);
    assert_eq!(sha(&a), sha(&b), "qcow2 on the device, {what}");
}

#[test]
fn devices_512() {
    devices(512, false);
}

#[test]
fn devices_4096() {
    devices(4096, false);
}

#[test]
fn devices_512_loop_direct_io() {
    devices(512, true);
}

#[test]
fn devices_4096_loop_direct_io() {
    devices(4096, true);
}

/// Regular files written with `-t none`: the same bytes, and the same length, as through the
/// page cache (and as qemu-img writes them), qcow2 images clean.
#[test]
fn files_written_with_o_direct_match_buffered_ones() {
    if !qemu_available("direct_io") {
        return;
    }
    let d = dir();
    let path = |n: &str| d.path().join(n);
    // A raw source whose size is no multiple of 4096 (nor of 512).
    let raw = path("odd.raw");
    let mut bytes: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8 + 1).collect();
    bytes[200_000..300_000].fill(0);
    std::fs::write(&raw, &bytes).unwrap();
    let src = source(d.path(), "");
    for (input, fmt, opts) in [
        (&raw, "raw", ""),
        (&src, "qcow2", ""),
        (&src, "qcow2", "cluster_size=512"),
        (&raw, "qcow2", "cluster_size=4096"),
    ] {
        let direct = path("direct.out");
        let buffered = path("buffered.out");
        let qemu = path("qemu.out");
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let with = |extra: &[&str], out: &Path| {
            let mut a = args.clone();
            a.extend(extra);
            a.extend([p(input), p(out)]);
            a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        let call = |prog: &str, a: Vec<String>| {
            run(prog, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>())
        };
        call(VIMG, with(&["-t", "none"], &direct));
        call(VIMG, with(&[], &buffered));
        call("qemu-img", with(&[], &qemu));
        let what = format!("{} -> {fmt} {opts}", input.display());
        assert_eq!(
            std::fs::read(&direct).unwrap(),
            std::fs::read(&buffered).unwrap(),
            "{what}: -t none against the page cache"
        );
        assert_eq!(
            std::fs::read(&direct).unwrap(),
            std::fs::read(&qemu).unwrap(),
            "{what}: against qemu-img"
        );
        if fmt == "qcow2" {
            assert_clean(p(&direct));
        }
        assert_identical(p(input), p(&direct));
    }
}

/// commit, rebase and amend with `-t none` do on files what qemu-img does.
#[test]
fn commit_rebase_amend_with_o_direct() {
    if !qemu_available("direct_io") {
        return;
    }
    let d = dir();
    let make = |tag: &str| {
        let base = d.path().join(format!("{tag}-base.qcow2"));
        let top = d.path().join(format!("{tag}-top.qcow2"));
        qemu_create(&base, "qcow2", "cluster_size=4096", None, 4 << 20);
        qemu_io(&base, "qcow2", &["write -P 0x10 0 1M".into()]);
        qemu_create(&top, "qcow2", "", Some((&base, "qcow2")), 4 << 20);
        qemu_io(
            &top,
            "qcow2",
            &[
                "write -P 0x20 1536 3k".into(),
                "write -P 0x30 2M 100k".into(),
            ],
        );
        (base, top)
    };
    let (vb, vt) = make("v");
    let (qb, qt) = make("q");
    run(VIMG, &["commit", "-q", "-t", "none", p(&vt)]);
    run("qemu-img", &["commit", "-q", "-t", "none", p(&qt)]);
    assert_clean(p(&vb));
    assert_identical(p(&vb), p(&qb));
    assert_identical(p(&vt), p(&qt));

    // Rebase onto no backing file: the base's data is copied into the top, with O_DIRECT.
    for (prog, top) in [(VIMG, &vt), ("qemu-img", &qt)] {
        run(
            prog,
            &["rebase", "-t", "none", "-T", "none", "-b", "", p(top)],
        );
    }
    assert_clean(p(&vt));
    assert_identical(p(&vt), p(&qt));

    for (prog, top) in [(VIMG, &vt), ("qemu-img", &qt)] {
        run(
            prog,
            &["amend", "-t", "none", "-o", "lazy_refcounts=on", p(top)],
        );
    }
    assert_clean(p(&vt));
    assert_identical(p(&vt), p(&qt));
    assert!(run(VIMG, &["info", p(&vt)]).contains("lazy refcounts: true"));
}

/// The `openat` lines strace saw while `prog args` ran.
fn openats(args: &[&str]) -> Option<Vec<String>> {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("strace.log");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=openat", "-o", p(&log), VIMG]);
    let out = match cmd.args(args).output() {
        Ok(o) => o,
        Err(e) => {
            require("direct_io", &format!("cannot run strace ({e})"));
            return None;
        }
    };
    // compare exits with 1 for images that differ.
    let ok = out.status.success() || (args[0] == "compare" && out.status.code() == Some(1));
    assert!(
        ok,
        "vimg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The test's files, not the libraries the loader opens.
    let ours = Path::new(env!("CARGO_TARGET_TMPDIR")).join(".tmp");
    Some(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains(p(&ours)))
            .map(str::to_string)
            .collect(),
    )
}

/// Whether every open of `file` in `lines` had O_DIRECT (and there was one).
fn all_direct(lines: &[String], file: &Path) -> bool {
    let name = file.file_name().unwrap().to_str().unwrap();
    let opens: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(name) && !l.contains("O_EXCL"))
        .collect();
    !opens.is_empty() && opens.iter().all(|l| l.contains("O_DIRECT"))
}

/// Each command and cache option opens what it applies to with `O_DIRECT`, and only that.
#[test]
fn cache_modes_open_with_o_direct() {
    if !qemu_available("direct_io") {
        return;
    }
    let d = dir();
    let f = |n: &str| d.path().join(n);
    let (base, top, out) = (f("base.qcow2"), f("top.qcow2"), f("out.qcow2"));
    qemu_create(&base, "qcow2", "", None, 1 << 20);
    qemu_io(&base, "qcow2", &["write -P 1 0 64k".into()]);
    qemu_create(&top, "qcow2", "", Some((&base, "qcow2")), 1 << 20);
    qemu_io(&top, "qcow2", &["write -P 2 64k 64k".into()]);
    let (t, b, o) = (p(&top), p(&base), p(&out));

    // (args, files opened with O_DIRECT, files opened without)
    type Case<'a> = (Vec<&'a str>, Vec<&'a Path>, Vec<&'a Path>);
    let cases: Vec<Case> = vec![
        (
            vec!["convert", "-O", "qcow2", t, o],
            vec![],
            vec![&top, &base, &out],
        ),
        (
            vec!["convert", "-t", "none", "-O", "qcow2", t, o],
            vec![&out],
            vec![&top, &base],
        ),
        (
            vec!["convert", "-t", "directsync", "-O", "raw", t, o],
            vec![&out],
            vec![&top],
        ),
        (
            vec!["convert", "-t", "writethrough", "-O", "raw", t, o],
            vec![],
            vec![&out],
        ),
        (
            vec!["convert", "-T", "none", "-O", "qcow2", t, o],
            vec![&top, &base],
            vec![&out],
        ),
        (
            vec!["compare", "-T", "none", t, b],
            vec![&top, &base],
            vec![],
        ),
        (vec!["compare", t, b], vec![], vec![&top, &base]),
        (vec!["check", "-T", "none", t], vec![&top], vec![]),
        (vec!["check", t], vec![], vec![&top]),
        (
            vec!["amend", "-t", "none", "-o", "lazy_refcounts=on", t],
            vec![&top],
            vec![],
        ),
        (
            vec!["amend", "-o", "lazy_refcounts=off", t],
            vec![],
            vec![&top],
        ),
        (
            vec!["rebase", "-t", "none", "-u", "-b", b, "-F", "qcow2", t],
            vec![&top],
            vec![],
        ),
        (
            vec!["commit", "-d", "-t", "directsync", t],
            vec![&top, &base],
            vec![],
        ),
        (vec!["commit", "-d", t], vec![], vec![&top, &base]),
    ];
    for (args, direct, buffered) in cases {
        // A target that exists is looked at (read-only) before it is replaced.
        let _ = std::fs::remove_file(&out);
        let Some(lines) = openats(&args) else {
            return;
        };
        for file in direct {
            assert!(
                all_direct(&lines, file),
                "{args:?}: {file:?} without O_DIRECT:\n{lines:?}"
            );
        }
        for file in buffered {
            let name = file.file_name().unwrap().to_str().unwrap();
            assert!(
                !lines
                    .iter()
                    .any(|l| l.contains(name) && l.contains("O_DIRECT")),
                "{args:?}: {file:?} with O_DIRECT:\n{lines:?}"
            );
        }
    }
    // A rebase reading the new backing file with -T none.
    let nb = f("newbase.qcow2");
    qemu_create(&nb, "qcow2", "", None, 1 << 20);
    let Some(lines) = openats(&["rebase", "-T", "none", "-b", p(&nb), "-F", "qcow2", t]) else {
        return;
    };
    assert!(all_direct(&lines, &nb), "{lines:?}");
    assert!(!lines
        .iter()
        .any(|l| l.contains("top.qcow2") && l.contains("O_DIRECT")));
}

/// Bad cache modes get qemu-img's messages, and nothing is made.
#[test]
fn bad_cache_modes_are_refused_as_qemu_refuses_them() {
    let d = dir();
    let img = d.path().join("a.raw");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let out = d.path().join("b.raw");
    for (args, msg) in [
        (
            vec!["convert", "-t", "bogus", p(&img), p(&out)],
            "Invalid cache option: bogus",
        ),
        (
            vec!["convert", "-T", "bogus", p(&img), p(&out)],
            "Invalid source cache option: bogus",
        ),
        (
            vec!["check", "-T", "bogus", p(&img)],
            "Invalid source cache option: bogus",
        ),
        (
            vec!["commit", "-t", "bogus", p(&img)],
            "Invalid cache option: bogus",
        ),
        (
            vec!["rebase", "-T", "bogus", "-u", "-b", "", p(&img)],
            "Invalid source cache option: bogus",
        ),
    ] {
        let (code, text) = run_status(VIMG, &args);
        assert_eq!(code, 1, "{args:?}: {text}");
        assert!(text.contains(msg), "{args:?}: {text}");
        assert!(!out.exists(), "{args:?} made the target");
    }
}
