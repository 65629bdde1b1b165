//! qemu's image locks, against the real thing: a qemu-io process holding an image makes vimg's
//! write commands fail with a message naming the lock (and its read commands too, unless -U),
//! vimg holding an image makes qemu-img and qemu-io fail, and vimg takes exactly the lock bytes
//! qemu takes for the same kind of open (compared through /proc/locks).

use crate::common;

use common::{qemu_available, qemu_create, run_status};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vimg::open::{ChainGuard, Sharing};
use vimg::qcow2::Qcow2Image;
use vimg::raw::RawImage;

fn vimg() -> &'static str {
    env!("CARGO_BIN_EXE_vimg")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The lock bytes held on the file at `path` by anybody, from /proc/locks (OFD locks only).
fn locked_bytes(path: &Path) -> BTreeSet<u64> {
    let m = std::fs::metadata(path).unwrap();
    let id = format!(":{}", m.ino());
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: OFDLCK ADVISORY READ -1 fe:00:10019178 100 101"
        if f.len() >= 8 && f[1] == "OFDLCK" && f[5].ends_with(&id) {
            let (a, b) = (f[6].parse::<u64>().unwrap(), f[7].parse::<u64>().unwrap());
            out.extend(a..=b);
        }
    }
    out
}

/// A qemu-io process holding `path` open (read-only with `-r`), until dropped.
struct Holder(Child);

impl Holder {
    fn start(path: &Path, fmt: &str, read_only: bool) -> Holder {
        let before = locked_bytes(path);
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", fmt]);
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .args(["-c", "sleep 120000", s(path)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start qemu-io");
        let h = Holder(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while locked_bytes(path) == before {
            assert!(Instant::now() < deadline, "qemu-io never locked {path:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_vimg(args: &[&str]) -> (i32, String) {
    run_status(vimg(), args)
}

/// Asserts that a vimg command failed on a lock of `path`, with the words qemu uses.
fn assert_locked(args: &[&str], path: &Path, lock: &str) {
    let (code, out) = run_vimg(args);
    assert_ne!(code, 0, "vimg {args:?} should have failed: {out}");
    let want = format!("Failed to get {lock} lock");
    // One error line (create prints its "Formatting" line first, as qemu-img does).
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("vimg: ")).collect();
    assert!(
        errors.len() == 1 && errors[0].contains(&want) && errors[0].contains(s(path)),
        "vimg {args:?}: expected one error line naming {path:?} and '{want}', got: {out}"
    );
}

fn assert_ok(args: &[&str]) -> String {
    let (code, out) = run_vimg(args);
    assert!(
        code == 0,
        "vimg {args:?} should have succeeded, exit {code}: {out}"
    );
    out
}

/// A small qcow2 image with some data and a snapshot, and a raw file, in a fresh directory.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_create(&img, "qcow2", "", None, 4 << 20);
    common::qemu_io(&img, "qcow2", &["write -P 0x5a 0 128k".into()]);
    common::run("qemu-img", &["snapshot", "-c", "s0", s(&img)]);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, vec![0x11u8; 1 << 20]).unwrap();
    (dir, img, raw)
}

#[test]
fn a_qemu_io_writer_makes_vimg_refuse_to_write_or_read_without_force_share() {
    if !qemu_available("a_qemu_io_writer_makes_vimg_refuse") {
        return;
    }
    let (dir, img, raw) = setup();
    let before = std::fs::read(&img).unwrap();
    let out = dir.path().join("out.raw");
    let _holder = Holder::start(&img, "qcow2", false);
    let i = s(&img);
    // Write commands: the write lock.
    for args in [
        vec!["resize", i, "8M"],
        vec!["snapshot", "-c", "s1", i],
        vec!["snapshot", "-d", "s0", i],
        vec!["snapshot", "-a", "s0", i],
        vec!["check", "-r", "all", i],
        vec!["convert", "-n", "-O", "qcow2", s(&raw), i],
        vec!["convert", "-O", "qcow2", s(&raw), i],
        vec!["create", "-f", "qcow2", i, "1M"],
        vec!["create", "-f", "raw", i, "1M"],
    ] {
        let lock = if args[0] == "resize" {
            // resize looks at the image read-only first, as qemu-img looks for a writer.
            "shared \"write\""
        } else {
            "\"write\""
        };
        assert_locked(&args, &img, lock);
    }
    // Read commands without -U: qemu-img's "shared write" lock.
    for args in [
        vec!["info", i],
        vec!["map", i],
        vec!["check", i],
        vec!["compare", i, i],
        vec!["measure", "-O", "qcow2", i],
        vec!["snapshot", "-l", i],
        vec!["convert", "-O", "raw", i, s(&out)],
    ] {
        assert_locked(&args, &img, "shared \"write\"");
    }
    // With -U they get through, as with qemu-img.
    assert!(assert_ok(&["info", "-U", i]).contains("virtual size: 4 MiB"));
    assert_ok(&["map", "-U", i]);
    assert!(assert_ok(&["check", "-U", i]).contains("No errors"));
    assert!(assert_ok(&["compare", "-U", i, i]).contains("identical"));
    assert_ok(&["measure", "-U", "-O", "qcow2", i]);
    assert!(assert_ok(&["snapshot", "-U", "-l", i]).contains("s0"));
    assert_ok(&["convert", "-U", "-O", "raw", i, s(&out)]);
    assert_eq!(&std::fs::read(&out).unwrap()[..4096], &[0x5a; 4096][..]);
    // -U does not make a write possible.
    for args in [
        vec!["check", "-U", "-r", "leaks", i],
        vec!["snapshot", "-U", "-c", "s1", i],
    ] {
        let (code, text) = run_vimg(&args);
        assert_ne!(code, 0);
        assert!(
            text.contains("can only be used with read-only images"),
            "{text}"
        );
    }
    // Nothing was changed by all these attempts.
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn a_qemu_io_reader_lets_vimg_read_but_not_write() {
    if !qemu_available("a_qemu_io_reader_lets_vimg_read_but_not_write") {
        return;
    }
    let (_dir, img, raw) = setup();
    let _holder = Holder::start(&img, "qcow2", true);
    let i = s(&img);
    assert_ok(&["info", i]);
    assert_ok(&["check", i]);
    assert_ok(&["map", i]);
    assert_ok(&["snapshot", "-l", i]);
    for args in [
        vec!["snapshot", "-c", "s1", i],
        vec!["check", "-r", "all", i],
        vec!["convert", "-n", "-O", "qcow2", s(&raw), i],
    ] {
        assert_locked(&args, &img, "\"write\"");
    }
}

#[test]
fn a_qemu_io_writer_of_a_raw_image_keeps_vimg_writes_and_convert_out() {
    if !qemu_available("a_qemu_io_writer_of_a_raw_image") {
        return;
    }
    let (dir, _img, raw) = setup();
    let target = dir.path().join("t.raw");
    std::fs::write(&target, vec![0u8; 1 << 20]).unwrap();
    let _holder = Holder::start(&target, "raw", false);
    let t = s(&target);
    // qemu-img reads raw images in use (info, map); so does vimg.
    assert_ok(&["info", t]);
    assert_ok(&["map", "-f", "raw", t]);
    // convert keeps writers out of its sources, as qemu-img convert does.
    assert_locked(
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            t,
            s(&dir.path().join("c.raw")),
        ],
        &target,
        "shared \"write\"",
    );
    // vimg never writes a raw image somebody else is writing (stricter than qemu-img here).
    assert_locked(
        &["convert", "-n", "-f", "raw", "-O", "raw", s(&raw), t],
        &target,
        "shared \"write\"",
    );
    assert_locked(
        &["resize", "-f", "raw", t, "2M"],
        &target,
        "shared \"write\"",
    );
}

#[test]
fn vimg_holding_an_image_makes_qemu_refuse_it() {
    if !qemu_available("vimg_holding_an_image_makes_qemu_refuse_it") {
        return;
    }
    let (dir, img, _raw) = setup();
    let i = s(&img);
    {
        // Open for writing through the library, as every vimg write command does.
        let held = Qcow2Image::open(&img, true, false, &mut ChainGuard::default()).unwrap();
        for args in [
            vec!["info", i],
            vec!["check", i],
            vec!["resize", i, "8M"],
            vec!["snapshot", "-c", "x", i],
            vec!["commit", i],
            vec!["amend", "-o", "lazy_refcounts=on", i],
        ] {
            let (code, out) = run_status("qemu-img", &args);
            assert_ne!(
                code, 0,
                "qemu-img {args:?} should fail while vimg writes: {out}"
            );
            assert!(
                out.contains("Failed to get") && out.contains("lock"),
                "qemu-img {args:?}: {out}"
            );
        }
        let (code, out) = run_status("qemu-io", &["-c", "write 0 512", i]);
        assert!(
            code != 0 || out.contains("Failed to get \"write\" lock"),
            "{out}"
        );
        assert!(out.contains("Failed to get \"write\" lock"), "{out}");
        // qemu-img's -U gets through, as it does with qemu's own writers.
        let (code, out) = run_status("qemu-img", &["info", "-U", i]);
        assert_eq!(code, 0, "{out}");
        drop(held);
    }
    {
        // A vimg reader lets qemu read, not write.
        let _held = Qcow2Image::open(&img, false, false, &mut ChainGuard::default()).unwrap();
        let (code, out) = run_status("qemu-img", &["check", i]);
        assert_eq!(code, 0, "{out}");
        let (code, out) = run_status("qemu-img", &["resize", i, "8M"]);
        assert_ne!(code, 0);
        assert!(out.contains("Failed to get \"write\" lock"), "{out}");
    }
    {
        // A vimg raw writer keeps qemu-io's raw writer out.
        let r = dir.path().join("w.raw");
        std::fs::write(&r, vec![0u8; 65536]).unwrap();
        let _held = RawImage::open(&r, true).unwrap();
        let (_, out) = run_status("qemu-io", &["-f", "raw", "-c", "write 0 512", s(&r)]);
        assert!(out.contains("Failed to get \"write\" lock"), "{out}");
    }
    // Everything released once vimg closed the images.
    let (code, out) = run_status("qemu-img", &["resize", i, "8M"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn vimg_takes_the_lock_bytes_qemu_takes() {
    if !qemu_available("vimg_takes_the_lock_bytes_qemu_takes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let data = dir.path().join("a.data");
    qemu_create(
        &img,
        "qcow2",
        &format!("data_file={}", s(&data)),
        None,
        1 << 20,
    );
    let qemu = |read_only: bool| {
        let _h = Holder::start(&img, "qcow2", read_only);
        // qemu-io locks the image first and its data file after: wait until the data file's
        // locks are there and have stopped changing (under load, the image's alone were seen).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = (locked_bytes(&img), locked_bytes(&data));
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = (locked_bytes(&img), locked_bytes(&data));
            if !now.1.is_empty() && now == last {
                break now;
            }
            assert!(Instant::now() < deadline, "qemu-io never locked {data:?}");
            last = now;
        }
    };
    let ours = |writable: bool, sharing: Sharing| {
        let _h = Qcow2Image::open(&img, writable, false, &mut ChainGuard::new(sharing)).unwrap();
        (locked_bytes(&img), locked_bytes(&data))
    };
    let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
    let rw = qemu(false);
    assert_eq!(
        rw.0,
        set(&[100, 101, 103, 201, 203]),
        "qemu's own read-write locks"
    );
    assert_eq!(rw.1, set(&[100, 101, 103, 203]));
    assert_eq!(ours(true, Sharing::Normal), rw);
    let ro = qemu(true);
    assert_eq!(ro.0, set(&[100, 201, 203]));
    assert_eq!(ours(false, Sharing::Normal), ro);
    // -U: consistent read only (qemu-io -r -U).
    let forced = {
        let mut c = Command::new("qemu-io");
        let child = c
            .args(["-r", "-U", "-c", "sleep 120000", s(&img)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let _h = Holder(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while locked_bytes(&img).is_empty() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        (locked_bytes(&img), locked_bytes(&data))
    };
    assert_eq!(forced.0, set(&[100]));
    assert_eq!(ours(false, Sharing::ForceShare), forced);
    assert!(locked_bytes(&img).is_empty(), "locks outlived the image");
}

/// Every format vimg registers takes the lock bytes qemu-io takes on the same image, opened
/// read-write and read-only: qemu's format drivers that keep metadata in the file (qcow2, vpc,
/// vdi) forbid other writers even to a reader, raw lets qemu-io's writers in. vimg locked vpc and vdi images
/// as raw ones before, so `vimg info` read a VHD that a running VM was writing.
#[test]
fn every_format_takes_qemus_lock_bytes() {
    if !qemu_available("every_format_takes_qemus_lock_bytes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for format in vimg::ImageFormat::all() {
        let name = format.as_str();
        if name == "luks" {
            continue; // needs a secret; qemu treats it as raw, tested with raw LUKS images
        }
        let img = dir.path().join(format!("a.{name}"));
        qemu_create(&img, name, "", None, 1 << 20);
        // Raw's locks depend on who opens it (qemu-io shares writes, qemu-img's commands do
        // not): `vimg_takes_the_lock_bytes_qemu_takes` and the tests above cover it.
        for read_only in [false, true].into_iter().filter(|_| name != "raw") {
            let theirs = {
                let _h = Holder::start(&img, name, read_only);
                locked_bytes(&img)
            };
            let ours = {
                let _h = format
                    .driver()
                    .open(
                        &img,
                        !read_only,
                        false,
                        &mut ChainGuard::new(Sharing::Normal),
                    )
                    .unwrap();
                locked_bytes(&img)
            };
            assert_eq!(ours, theirs, "{name}, read-only {read_only}");
        }
        // And the consequence users see: `vimg info` fails while qemu-io writes a format
        // image, as `qemu-img info` does, and succeeds on a raw one.
        let _h = Holder::start(&img, name, false);
        let (code, out) = run_status(vimg(), &["info", "-f", name, s(&img)]);
        let (qcode, qout) = run_status("qemu-img", &["info", "-f", name, s(&img)]);
        assert_eq!(
            code == 0,
            qcode == 0,
            "{name}: vimg {out} / qemu-img {qout}"
        );
        if qcode != 0 {
            assert!(out.contains("Failed to get shared \"write\" lock"), "{out}");
        }
    }
}
