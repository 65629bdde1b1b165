//! A qcow2 image whose container is a block device that fills up: vimg must fail as qemu-img
//! does (the same exit code, a one-line message naming the device with the OS cause), leave an
//! image that `qemu-img check` finds as it finds qemu-img's in the same situation, and keep the
//! data written before the failure. Each case runs vimg on one loop device and qemu-img on a
//! second over an identical file.
//!
//! Needs root and `losetup`; skipped with a message without them, unless `VIMG_REQUIRE_QEMU=1`
//! (then the test fails).

use crate::common;

use common::loop_device::Loop;
use common::{qemu_available, run, run_status};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
/// The device size: room for the first 2 MiB of guest data, not for the second; not a whole
/// number of clusters, so that the last data write is cut short by the device's end (and a
/// cluster allocated there counts for `qemu-img check`).
const DEVICE: u64 = (3 << 20) + (32 << 10);
const DISK: u64 = 64 << 20;

/// Two loop devices over zeroed `DEVICE`-byte files (vimg's, qemu-img's), or `None` where they
/// cannot be made (skipping, or failing under `VIMG_REQUIRE_QEMU=1`).
fn devices(dir: &Path, sector: u32) -> Option<(Loop, Loop)> {
    if !qemu_available("block_device_full") {
        return None;
    }
    let mut loops = Vec::new();
    for name in ["vimg", "qemu"] {
        let file = dir.join(format!("{name}-{sector}.dev"));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(DEVICE)
            .unwrap();
        match Loop::attach(&file, sector) {
            Ok(l) => loops.push(l),
            Err(why) => {
                if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
                    panic!("block_device_full: no loop device ({why}) but VIMG_REQUIRE_QEMU=1");
                }
                eprintln!("block_device_full: skipping: no loop device ({why})");
                return None;
            }
        }
    }
    let qemu = loops.pop().unwrap();
    Some((loops.pop().unwrap(), qemu))
}

/// A raw source of `DISK` bytes, no two 512-byte sectors alike and none zero.
fn source(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src.raw");
    let data: Vec<u8> = (0..DISK)
        .map(|i| ((i >> 9) as u8 ^ (i >> 17) as u8 ^ (i as u8).wrapping_mul(7)) | 1)
        .collect();
    std::fs::write(&src, &data).unwrap();
    src
}

/// `qemu-img check` of `dev` (text, then JSON with the device name taken out) and its status.
fn qemu_check(dev: &str) -> (i32, String) {
    let (code, text) = run_status("qemu-img", &["check", dev]);
    let (_, json) = run_status("qemu-img", &["check", "--output", "json", dev]);
    (code, format!("{text}{}", json.replace(dev, "DEV")))
}

/// `convert -n` of more than fits onto a qcow2 (created with `-o opts`) on a `sector`-byte
/// sector device, then `snapshot -c` on the (nearly) full device. With `like_qemu`, the image
/// afterwards must be qemu-img's; otherwise (vimg writes extended L2 images a cluster at a
/// time where qemu writes 2 MiB at once, so it gets further) it must be clean and hold the
/// source up to a cluster boundary at or past the failure qemu reports, and zeros after.
fn overflow(sector: u32, opts: &str, like_qemu: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some((ours, theirs)) = devices(dir.path(), sector) else {
        return;
    };
    let (a, b) = (ours.path(), theirs.path());
    let src = source(dir.path());
    let src = src.to_str().unwrap();
    run(VIMG, &["create", "-f", "qcow2", "-o", opts, a, "64M"]);
    run("qemu-img", &["create", "-f", "qcow2", "-o", opts, b, "64M"]);

    let (code, msg) = run_status(VIMG, &["convert", "-n", "-O", "qcow2", src, a]);
    let (qcode, qmsg) = run_status("qemu-img", &["convert", "-n", "-O", "qcow2", src, b]);
    assert_eq!(
        code, qcode,
        "exit codes differ: vimg {msg:?}, qemu-img {qmsg:?}"
    );
    assert_ne!(code, 0, "{msg}");
    assert_eq!(msg.trim().lines().count(), 1, "not one line: {msg:?}");
    // qemu's words ("error while writing at byte N"), the device's name, the OS cause.
    let words = qmsg
        .trim()
        .strip_prefix("qemu-img: ")
        .and_then(|m| m.strip_suffix(": No space left on device"))
        .unwrap_or_else(|| panic!("unexpected qemu-img message {qmsg:?}"));
    assert!(
        msg.starts_with(&format!("vimg: {a}: {words}")),
        "{msg:?} vs {qmsg:?}"
    );
    assert!(msg.trim().ends_with(": No space left on device"), "{msg:?}");

    // The image afterwards: what qemu-img check says of it is what it says of qemu-img's
    // (no leaks: qemu frees the clusters of a write that failed), and vimg check agrees.
    let (ccode, check) = qemu_check(a);
    let (qccode, qcheck) = qemu_check(b);
    if like_qemu {
        let ours = (ccode, &check);
        assert_eq!(
            ours,
            (qccode, &qcheck),
            "qemu-img check of vimg's image differs"
        );
    }
    assert_eq!(ccode, 0, "{check}");
    for args in [vec!["check", a], vec!["check", "--output", "json", a]] {
        let (vc, v) = run_status(VIMG, &args);
        let (qc, q) = run_status("qemu-img", &args);
        assert_eq!((vc, v), (qc, q), "vimg {args:?} differs from qemu-img");
    }
    // The data written before the failure reads back, the rest reads as zeros; qemu-img's
    // image holds the same.
    if like_qemu {
        let (c, out) = run_status("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", a, b]);
        assert_eq!(c, 0, "{out}");
    }
    let raw = dir.path().join("back.raw");
    let raw = raw.to_str().unwrap();
    run("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", a, raw]);
    let back = std::fs::read(raw).unwrap();
    let want = std::fs::read(src).unwrap();
    assert_eq!(back.len() as u64, DISK);
    let written = words
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .expect("a byte offset in qemu's message");
    assert!(written > 0);
    let kept = if like_qemu {
        written
    } else {
        (0..back.len()).find(|&i| back[i] != want[i]).unwrap()
    };
    assert!(kept >= written && kept % (64 << 10) == 0, "kept {kept}");
    assert!(back[..kept] == want[..kept], "data before the failure lost");
    assert!(
        back[kept..].iter().all(|&x| x == 0),
        "data after the failure"
    );

    // Filled to the brim: the source's next 11 clusters after the 2 MiB fit (the last data
    // cluster ends where the device's last, half cluster begins).
    let part = dir.path().join("part.raw");
    let mut data = want;
    data[written + 11 * (64 << 10)..].fill(0);
    std::fs::write(&part, &data).unwrap();
    let (code, msg) = run_status(VIMG, &["convert", "-n", "-O", "qcow2", p(&part), a]);
    assert_eq!(code, 0, "{msg}");

    // A snapshot on the device that is now full, after copying vimg's device onto qemu-img's
    // so that both start the same: vimg does as qemu-img does (exit code, and the clusters
    // qemu leaks when the snapshot does not fit are the clusters vimg leaks; no refcount may
    // go up without the COPIED flags going down).
    let msg = snapshot_fails_as_qemu(a, b);
    assert!(msg.starts_with(&format!("vimg: {a}: ")), "{msg:?}");
}

/// Copies vimg's full device `a` onto qemu-img's `b`, then takes a snapshot on each: both must
/// fail alike (exit code; vimg on one line ending in the OS cause), leave images `qemu-img
/// check` finds the same things in, and `vimg check` must print what `qemu-img check` prints.
/// Returns vimg's message.
fn snapshot_fails_as_qemu(a: &str, b: &str) -> String {
    copy_device(a, b);
    let (code, msg) = run_status(VIMG, &["snapshot", "-c", "s1", a]);
    let (qcode, qmsg) = run_status("qemu-img", &["snapshot", "-c", "s1", b]);
    assert_eq!(code, qcode, "snapshot: vimg {msg:?}, qemu-img {qmsg:?}");
    assert_ne!(
        code, 0,
        "the snapshot fits: the test no longer fills the device"
    );
    assert_eq!(msg.trim().lines().count(), 1, "not one line: {msg:?}");
    assert!(msg.trim().ends_with(": No space left on device"), "{msg:?}");
    assert_eq!(
        qemu_check(a),
        qemu_check(b),
        "qemu-img check after snapshot -c"
    );
    let (vc, v) = run_status(VIMG, &["check", a]);
    assert_eq!((vc, v), run_status("qemu-img", &["check", a]), "vimg check");
    msg
}

/// On the device `overflow` filled, `convert -n` of a source whose first 2 MiB are zeros and
/// whose next 12 clusters hold data: the zeros free the clusters written before, and qemu-img
/// reuses them for the data; vimg must too rather than run out of space (the clusters it
/// releases are only reusable after a flush). With extended L2 qemu-img gives up (it wants
/// 2 MiB of new clusters at once) where vimg needs less, so only vimg's result is checked
/// (`like_qemu` false).
fn refill(opts: &str, like_qemu: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some((ours, theirs)) = devices(dir.path(), 512) else {
        return;
    };
    let (a, b) = (ours.path(), theirs.path());
    let src = source(dir.path());
    let src = src.to_str().unwrap();
    run(VIMG, &["create", "-f", "qcow2", "-o", opts, a, "64M"]);
    let (code, msg) = run_status(VIMG, &["convert", "-n", "-O", "qcow2", src, a]);
    assert_eq!(code, 1, "{msg}");
    copy_device(a, b);
    let mut fill = vec![0u8; DISK as usize];
    let data = (2 << 20)..(2 << 20) + 12 * (64 << 10);
    fill[data.clone()].copy_from_slice(&std::fs::read(src).unwrap()[data]);
    let fill_path = dir.path().join("fill.raw");
    std::fs::write(&fill_path, &fill).unwrap();
    let fill = fill_path.to_str().unwrap();
    let (code, msg) = run_status(VIMG, &["convert", "-n", "-O", "qcow2", fill, a]);
    let (qcode, qmsg) = run_status("qemu-img", &["convert", "-n", "-O", "qcow2", fill, b]);
    assert_eq!(code, 0, "{msg}");
    let (ccode, check) = qemu_check(a);
    assert_eq!(ccode, 0, "{check}");
    if like_qemu {
        assert_eq!(code, qcode, "vimg {msg:?}, qemu-img {qmsg:?}");
        let theirs = qemu_check(b);
        assert_eq!((ccode, check), theirs, "qemu-img check after the refill");
    }
    let (c, out) = run_status(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", fill, a],
    );
    assert_eq!(c, 0, "{out}");
}

#[test]
fn refill_reuses_freed_clusters() {
    refill("cluster_size=64k", true);
}

#[test]
fn refill_reuses_freed_clusters_extended_l2() {
    refill("extended_l2=on", false);
}

/// `snapshot -c` on a full device, of a 3 TiB disk whose 48 KiB L1 table does not fit in the
/// half cluster left: the copy of the L1 table cannot be written, and vimg must then leave the
/// image as qemu-img leaves its own (only the copy's cluster leaked), not with the tree's
/// refcounts raised for a snapshot that does not exist.
#[test]
fn snapshot_on_full_device() {
    let dir = tempfile::tempdir().unwrap();
    let Some((ours, theirs)) = devices(dir.path(), 512) else {
        return;
    };
    let (a, b) = (ours.path(), theirs.path());
    let src = source(dir.path());
    let mut data = std::fs::read(&src).unwrap();
    data[(2 << 20) + 11 * (64 << 10)..].fill(0);
    std::fs::write(&src, &data).unwrap();
    run(VIMG, &["create", "-f", "qcow2", a, "3T"]);
    let (code, msg) = run_status(VIMG, &["convert", "-n", "-O", "qcow2", p(&src), a]);
    assert_eq!(code, 0, "{msg}");
    snapshot_fails_as_qemu(a, b);
    let (c, out) = run_status("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", a, b]);
    assert_eq!(c, 0, "{out}");
}

/// `bitmap --add` on a full device: the bitmap's table fits in the half cluster left, its
/// directory does not. qemu-img fails and leaves the image clean; vimg must too, freeing the
/// table's cluster rather than leaking it.
#[test]
fn bitmap_add_on_full_device() {
    let dir = tempfile::tempdir().unwrap();
    let Some((ours, theirs)) = devices(dir.path(), 512) else {
        return;
    };
    let (a, b) = (ours.path(), theirs.path());
    let src = source(dir.path());
    let mut data = std::fs::read(&src).unwrap();
    data[(2 << 20) + 11 * (64 << 10)..].fill(0);
    std::fs::write(&src, &data).unwrap();
    run(VIMG, &["create", "-f", "qcow2", a, "64M"]);
    let (code, msg) = run_status(VIMG, &["convert", "-n", "-O", "qcow2", p(&src), a]);
    assert_eq!(code, 0, "{msg}");
    copy_device(a, b);
    let (code, msg) = run_status(VIMG, &["bitmap", "--add", a, "b1"]);
    let (qcode, qmsg) = run_status("qemu-img", &["bitmap", "--add", b, "b1"]);
    assert_eq!(code, qcode, "bitmap --add: vimg {msg:?}, qemu-img {qmsg:?}");
    assert_ne!(
        code, 0,
        "the bitmap fits: the test no longer fills the device"
    );
    assert_eq!(msg.trim().lines().count(), 1, "not one line: {msg:?}");
    assert!(msg.trim().ends_with(": No space left on device"), "{msg:?}");
    assert_eq!(
        qemu_check(a),
        qemu_check(b),
        "qemu-img check after bitmap --add"
    );
    assert_eq!(qemu_check(a).0, 0);
    let (c, out) = run_status("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", a, b]);
    assert_eq!(c, 0, "{out}");
    let info = |cmd: &str| run(cmd, &["info", "--output", "json", a]).replace(a, "DEV");
    assert_eq!(info(VIMG), info("qemu-img"), "info after bitmap --add");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Copies the contents of device `from` onto device `to` (of the same size).
fn copy_device(from: &str, to: &str) {
    use std::io::Write;
    let data = std::fs::read(from).unwrap();
    assert_eq!(data.len() as u64, DEVICE);
    let mut f = std::fs::OpenOptions::new().write(true).open(to).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn overflow_512() {
    overflow(512, "cluster_size=64k", true);
}

#[test]
fn overflow_4096() {
    overflow(4096, "cluster_size=64k", true);
}

/// Extended L2 entries: every data write goes through the subcluster path.
#[test]
fn overflow_extended_l2() {
    overflow(512, "extended_l2=on", false);
}
