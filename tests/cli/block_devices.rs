//! Block devices as images: loop devices made by the test (512- and 4096-byte sectors), read
//! by vimg and by qemu-img, which must agree on their size and contents. `stat` reports a
//! device's length as 0; vimg must never take that for its size (issue 13, item 2).
//!
//! Needs root and `losetup`; skipped with a message without them, unless `VIMG_REQUIRE_QEMU=1`
//! (then the test fails, as the qemu tests do).

use crate::common;

use common::loop_device::Loop;
use common::{qemu_available, qemu_create, qemu_io, run, run_status};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

/// A loop device of `sector`-byte sectors over a 4 MiB raw file with data in places, or `None`
/// (skipping, or failing under `VIMG_REQUIRE_QEMU=1`) where one cannot be made.
fn device(dir: &Path, sector: u32) -> Option<Loop> {
    if !qemu_available("block_devices") {
        return None;
    }
    let file = dir.join(format!("backing-{sector}.raw"));
    qemu_create(&file, "raw", "", None, 4 << 20);
    qemu_io(
        &file,
        "raw",
        &[
            "write -P 0x5a 0 64k".into(),
            "write -P 0xa5 1M 512k".into(),
            "write -P 0x11 4032k 64k".into(),
        ],
    );
    match Loop::attach(&file, sector) {
        Ok(l) => Some(l),
        Err(why) => {
            if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("block_devices: no loop device ({why}) but VIMG_REQUIRE_QEMU=1");
            }
            eprintln!("block_devices: skipping: no loop device ({why})");
            None
        }
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `info` (text and JSON) says what qemu-img says of the device: its size, `host_device`.
fn info_matches_qemu(dev: &str) {
    for args in [vec!["info", dev], vec!["info", "--output", "json", dev]] {
        let ours = run(VIMG, &args);
        let theirs = run("qemu-img", &args);
        assert_eq!(ours, theirs, "vimg {args:?} differs from qemu-img");
    }
    let ours = run(VIMG, &["info", dev]);
    assert!(
        ours.contains("virtual size: 4 MiB (4194304 bytes)"),
        "{ours}"
    );
    assert!(ours.contains("protocol type: host_device"), "{ours}");
}

fn both(sector: u32) {
    let dir = tempfile::tempdir().unwrap();
    let Some(lo) = device(dir.path(), sector) else {
        return;
    };
    let dev = lo.path();
    info_matches_qemu(dev);
    for args in [
        vec!["map", dev],
        vec!["map", "--output", "json", dev],
        vec!["measure", "-O", "qcow2", dev],
    ] {
        assert_eq!(
            run(VIMG, &args),
            run("qemu-img", &args),
            "vimg {args:?} differs from qemu-img"
        );
    }
    // check: raw images have no checks, a device included; same words and status as qemu-img.
    let (ours, out) = run_status(VIMG, &["check", dev]);
    let (theirs, qout) = run_status("qemu-img", &["check", dev]);
    assert_eq!(ours, theirs, "check status: vimg {out} / qemu-img {qout}");

    // convert from the device, to qcow2 and to raw: qemu-img sees the same disk.
    for fmt in ["qcow2", "raw"] {
        let out = dir.path().join(format!("out.{fmt}"));
        run(VIMG, &["convert", "-O", fmt, dev, p(&out)]);
        let cmp = run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", fmt, dev, p(&out)],
        );
        assert!(cmp.contains("identical"), "{fmt}: {cmp}");
        let info = run("qemu-img", &["info", "--output", "json", p(&out)]);
        assert!(info.contains("\"virtual-size\": 4194304"), "{fmt}: {info}");
        // compare by vimg, the device on either side.
        let (rc, o) = run_status(VIMG, &["compare", dev, p(&out)]);
        assert_eq!(rc, 0, "vimg compare {fmt}: {o}");
        let (rc, o) = run_status(VIMG, &["compare", p(&out), dev]);
        assert_eq!(rc, 0, "vimg compare {fmt} reversed: {o}");
    }
    // A copy that differs is found to differ.
    let changed = dir.path().join("out.raw");
    qemu_io(&changed, "raw", &["write -P 0x77 4190208 512".into()]);
    let (rc, o) = run_status(VIMG, &["compare", dev, p(&changed)]);
    assert_eq!(rc, 1, "vimg compare of differing images: {o}");

    // backup from the device, extracted: the same disk.
    let archive = dir.path().join("a.vma");
    run(
        VIMG,
        &[
            "backup",
            "create",
            "-d",
            &format!("drive-scsi0={dev}"),
            p(&archive),
        ],
    );
    let ex = dir.path().join("ex");
    run(VIMG, &["backup", "extract", p(&archive), p(&ex)]);
    let restored = ex.join("disk-drive-scsi0.raw");
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", dev, p(&restored)],
    );
    assert!(cmp.contains("identical"), "backup: {cmp}");

    // A device cannot be resized (as qemu-img says); its own size is accepted.
    let (rc, o) = run_status(VIMG, &["resize", "-f", "raw", dev, "8M"]);
    assert_ne!(rc, 0, "resize of a device succeeded: {o}");
    assert!(o.contains("Cannot resize device files"), "{o}");
    let (rc, o) = run_status(VIMG, &["resize", "-f", "raw", "--shrink", dev, "2M"]);
    assert_ne!(rc, 0, "shrinking a device succeeded: {o}");
    let (rc, o) = run_status(VIMG, &["resize", "-f", "raw", dev, "4M"]);
    assert_eq!(rc, 0, "resize of a device to its own size: {o}");
    info_matches_qemu(dev);

    // convert onto the device (-n, raw): it then holds the source's disk.
    let src = dir.path().join("src.qcow2");
    qemu_create(&src, "qcow2", "", None, 4 << 20);
    qemu_io(&src, "qcow2", &["write -P 0x3c 512k 1M".into()]);
    run(VIMG, &["convert", "-n", "-O", "raw", p(&src), dev]);
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", p(&src), dev],
    );
    assert!(cmp.contains("identical"), "convert onto the device: {cmp}");

    // create on the device: it cannot grow (refused, as by qemu-img), and a failed create
    // leaves the device node where it is (it used to be unlinked as a failed output file).
    let is_device = |d: &str| {
        use std::os::unix::fs::FileTypeExt;
        std::fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_block_device())
    };
    let (rc, o) = run_status(VIMG, &["create", "-f", "raw", dev, "8M"]);
    assert_ne!(rc, 0, "create of a raw image larger than the device: {o}");
    assert!(o.contains("Cannot grow device files"), "{o}");
    assert!(is_device(dev), "a failed create removed {dev}");
    let full = [
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=full",
        dev,
        "8M",
    ];
    let (rc, o) = run_status(VIMG, &full);
    assert_ne!(
        rc, 0,
        "a preallocated qcow2 image larger than the device: {o}"
    );
    assert!(is_device(dev), "a failed create removed {dev}");
    // A qcow2 image made on the device is what qemu-img makes there.
    run(VIMG, &["create", "-q", "-f", "qcow2", dev, "64M"]);
    run("qemu-img", &["check", dev]);
    assert_eq!(
        run(VIMG, &["info", "--output", "json", dev]),
        run("qemu-img", &["info", "--output", "json", dev])
    );
}

/// A qcow2 image on a device: vimg reads it as qemu-img does (info, check, map, compare,
/// convert), its file length being the device's size.
fn qcow2_on_a_device(sector: u32) {
    let dir = tempfile::tempdir().unwrap();
    if !qemu_available("block_devices") {
        return;
    }
    let img = dir.path().join("img.qcow2");
    qemu_create(&img, "qcow2", "", None, 4 << 20);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x42 0 1M".into(), "write -P 0x43 3M 64k".into()],
    );
    let reference = dir.path().join("ref.qcow2");
    std::fs::copy(&img, &reference).unwrap();
    let lo = match Loop::attach(&img, sector) {
        Ok(l) => l,
        Err(why) => {
            if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("block_devices: no loop device ({why}) but VIMG_REQUIRE_QEMU=1");
            }
            eprintln!("block_devices: skipping: no loop device ({why})");
            return;
        }
    };
    let dev = lo.path();
    for args in [
        vec!["info", dev],
        vec!["info", "--output", "json", dev],
        vec!["check", dev],
        vec!["check", "--output", "json", dev],
        vec!["map", dev],
        vec!["map", "--output", "json", dev],
    ] {
        let (rc, ours) = run_status(VIMG, &args);
        let (qrc, theirs) = run_status("qemu-img", &args);
        assert_eq!(
            (rc, ours),
            (qrc, theirs),
            "vimg {args:?} differs from qemu-img"
        );
    }
    let (rc, o) = run_status(VIMG, &["compare", dev, p(&reference)]);
    assert_eq!(rc, 0, "{o}");
    let out = dir.path().join("out.qcow2");
    run(VIMG, &["convert", "-O", "qcow2", dev, p(&out)]);
    let cmp = run("qemu-img", &["compare", p(&out), p(&reference)]);
    assert!(cmp.contains("identical"), "{cmp}");
}

#[test]
fn qcow2_on_a_512_byte_sector_device() {
    qcow2_on_a_device(512);
}

#[test]
fn qcow2_on_a_4096_byte_sector_device() {
    qcow2_on_a_device(4096);
}

#[test]
fn loop_device_512_byte_sectors() {
    both(512);
}

#[test]
fn loop_device_4096_byte_sectors() {
    both(4096);
}

/// A read-only device (`losetup -r`; Linux lets it be opened for writing and fails each write
/// with EPERM) is refused for every write up front, in qemu-img's words, and left unchanged;
/// it is still read as qemu-img reads it.
#[test]
fn read_only_device_is_refused_for_writes() {
    let dir = tempfile::tempdir().unwrap();
    if !qemu_available("block_devices") {
        return;
    }
    let file = dir.path().join("ro.raw");
    std::fs::write(&file, vec![0x77u8; 4 << 20]).unwrap();
    let dev = match Loop::attach_with(&file, 512, &["-r"]) {
        Ok(l) => l,
        Err(why) => {
            assert!(
                std::env::var("VIMG_REQUIRE_QEMU").as_deref() != Ok("1"),
                "no loop device ({why}) but VIMG_REQUIRE_QEMU=1"
            );
            eprintln!("block_devices: skipping: no loop device ({why})");
            return;
        }
    };
    let d = dev.path();
    let src = dir.path().join("src.qcow2");
    qemu_create(&src, "qcow2", "", None, 1 << 20);
    let s = p(&src);
    let refused = "Could not open '{}': The device is not writable: Permission denied";
    let refused = refused.replace("{}", d);
    for args in [
        vec!["convert", "-n", "-O", "raw", s, d],
        vec!["resize", "-f", "raw", d, "4M"],
        vec!["snapshot", "-c", "x", d],
        vec!["dd", "-O", "raw", "if=/dev/null", &format!("of={d}")],
    ] {
        let (code, out) = run_status(VIMG, &args);
        let (qcode, qout) = run_status("qemu-img", &args);
        assert_eq!(
            (code, qcode),
            (1, 1),
            "{args:?}: vimg {out} / qemu-img {qout}"
        );
        if args[0] != "dd" {
            assert!(out.contains(&refused), "{args:?}: {out}");
            assert!(qout.contains(&refused), "{args:?}: qemu-img {qout}");
        }
    }
    for fmt in ["raw", "qcow2"] {
        let (code, out) = run_status(VIMG, &["create", "-f", fmt, d, "1M"]);
        assert_eq!(code, 1, "create -f {fmt}: {out}");
        assert!(out.contains("The device is not writable"), "{out}");
    }
    info_matches_qemu(d);
    let data = std::fs::read(d).unwrap();
    assert!(
        data.iter().all(|&b| b == 0x77),
        "the read-only device changed"
    );
}
