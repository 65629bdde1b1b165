//! VHDX images (`-f vhdx`, issue 17) against qemu-img/qemu-io: images qemu-img makes (dynamic
//! and fixed, several block sizes, sizes that are not multiples of the block) filled by qemu-io
//! with seeded random writes, zero runs and discards, read by vimg as qemu reads them
//! (`convert -O raw` byte for byte, `vimg compare` against qemu's raw copy, `info` and `map`
//! output equal); images vimg creates laid out as qemu-img's (but for GUIDs, sequence numbers,
//! the creator string and the checksums over them) and clean under `qemu-img check`; images
//! vimg writes (`convert -O vhdx`, `convert -n`) equal to qemu's copies; a log left by a failed
//! metadata write (made by qemu itself through blkdebug) refused read-only and replayed by
//! `check -r all` as qemu replays it; the refusals of `create`, `measure` and `resize` in
//! qemu's words.

use crate::common;

use common::{assert_no_failures, qemu_available, qemu_create, qemu_io, run, run_status, Rng};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The guest disk as qemu reads it.
fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu.raw");
    run("qemu-img", &["convert", "-O", "raw", p(img), p(&out)]);
    std::fs::read(&out).unwrap()
}

/// Every comparison of vimg with qemu on `img`; differences are pushed to `failures`.
fn compare_with_qemu(img: &Path, dir: &Path, failures: &mut Vec<String>) {
    let name = img.file_name().unwrap().to_str().unwrap().to_string();
    let theirs = qemu_raw(img, dir);
    let ours_path = dir.join("vimg.raw");
    let _ = std::fs::remove_file(&ours_path);
    let (rc, o) = run_status(VIMG, &["convert", "-O", "raw", p(img), p(&ours_path)]);
    if rc != 0 {
        failures.push(format!("{name}: vimg convert: {o}"));
    } else if std::fs::read(&ours_path).unwrap() != theirs {
        failures.push(format!(
            "{name}: vimg convert -O raw differs from qemu-img's"
        ));
    }
    let (rc, o) = run_status(
        VIMG,
        &["compare", "-F", "raw", p(img), p(&dir.join("qemu.raw"))],
    );
    if rc != 0 {
        failures.push(format!(
            "{name}: vimg compare with qemu's raw copy: {rc} {o}"
        ));
    }
    for cmd in [
        vec!["info", "--output=json"],
        vec!["info"],
        vec!["map", "--output=json"],
        vec!["check"],
        vec!["check", "--output=json"],
    ] {
        let mut args = cmd.clone();
        args.push(p(img));
        let (qrc, q) = run_status("qemu-img", &args);
        let (rc, v) = run_status(VIMG, &args);
        if rc != qrc || v != q {
            failures.push(format!(
                "{name}: {cmd:?}:\nqemu-img ({qrc}):\n{q}\nvimg ({rc}):\n{v}"
            ));
        }
    }
}

/// Seeded random writes (data, zero runs and discards, any sector alignment) covering `size`
/// bytes.
fn random_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let off = rng.below(size / 512) * 512;
            let len = (1 + rng.below(6 << 11)) * 512;
            let len = len.min(size - off);
            match i % 5 {
                3 => format!("write -z {off} {len}"),
                4 => format!("discard {off} {len}"),
                _ => format!("write -P {} {off} {len}", 1 + rng.below(255)),
            }
        })
        .collect()
}

#[test]
fn qemu_made_images_read_as_qemu_reads_them() {
    if !qemu_available("vhdx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(17);
    for opts in [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=dynamic,block_size=1M",
        "subformat=fixed,block_size=2M,block_state_zero=off",
        "subformat=dynamic,block_state_zero=off,log_size=2M",
    ] {
        for size in [(9 << 20) + 7 * 512, (24 << 20) - 4096, 33_554_944] {
            let img = dir
                .path()
                .join(format!("{}-{size}.vhdx", opts.replace([',', '='], "_")));
            qemu_create(&img, "vhdx", opts, None, size);
            compare_with_qemu(&img, dir.path(), &mut failures);
            qemu_io(&img, "vhdx", &random_writes(&mut rng, size, 12));
            compare_with_qemu(&img, dir.path(), &mut failures);
        }
    }
    assert_no_failures(&failures);
}

/// The bytes of a VHDX with what differs between two creations masked: the creator string,
/// each header's checksum, sequence number and GUIDs, the page 83 GUID, and with `log` the
/// log (its entries hold GUIDs, and qemu writes one per block where vimg batches them).
/// Without `whole`, only the file's length and its bytes up to the end of the metadata region
/// (what a new image writes: its payload area is a hole).
fn masked(img: &Path, log: bool, whole: bool) -> Vec<u8> {
    use std::io::Read;
    let file_len = std::fs::metadata(img).unwrap().len();
    let mut b = Vec::new();
    let limit = if whole { u64::MAX } else { 80 << 20 };
    std::fs::File::open(img)
        .unwrap()
        .take(limit)
        .read_to_end(&mut b)
        .unwrap();
    b[8..8 + 512].fill(0);
    for h in [64usize << 10, 128 << 10] {
        b[h + 4..h + 64].fill(0);
    }
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let log_len = le32(&b, (64 << 10) + 68) as usize;
    let rt = 192 << 10;
    for i in 0..le32(&b, rt + 8) as usize {
        let e = rt + 16 + 32 * i;
        if b[e..e + 4] == [0x06, 0xa2, 0x7c, 0x8b] {
            let md = u64::from_le_bytes(b[e + 16..e + 24].try_into().unwrap()) as usize;
            b[md + (64 << 10) + 16..md + (64 << 10) + 32].fill(0);
            if !whole {
                b.truncate(md + (1 << 20));
            }
        }
    }
    if log {
        b[1 << 20..(1 << 20) + log_len].fill(0);
    }
    b.extend_from_slice(&file_len.to_le_bytes());
    b
}

#[test]
fn vimg_creates_what_qemu_img_creates() {
    if !qemu_available("vhdx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let ours = dir.path().join("ours.vhdx");
    let theirs = dir.path().join("theirs.vhdx");
    for opts in [
        "",
        "subformat=fixed",
        "block_size=1M,log_size=3M",
        "subformat=fixed,block_state_zero=off,block_size=1536K",
        "block_state_zero=off,block_size=512M",
    ] {
        for size in ["0", "1000", "100M", "1G", "5000M", "200G"] {
            // (A disk of size 0 with 256 MiB blocks gets a 2 GiB BAT, which qemu cannot open.)
            if opts.contains("fixed") && size == "200G" || opts.contains("512M") && size == "0" {
                continue;
            }
            for f in [&ours, &theirs] {
                let _ = std::fs::remove_file(f);
            }
            let mut args = vec!["create", "-f", "vhdx"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            let q = run("qemu-img", &[&args[..], &[p(&theirs), size]].concat());
            let (rc, v) = run_status(VIMG, &[&args[..], &[p(&ours), size]].concat());
            if rc != 0 || v.replace(p(&ours), "X") != q.replace(p(&theirs), "X") {
                failures.push(format!("{opts} {size}: qemu-img: {q} vimg ({rc}): {v}"));
                continue;
            }
            if masked(&ours, false, false) != masked(&theirs, false, false) {
                failures.push(format!("{opts} {size}: the files differ"));
            }
            let (rc, o) = run_status("qemu-img", &["check", p(&ours)]);
            if rc != 0 {
                failures.push(format!("{opts} {size}: qemu-img check: {o}"));
            }
        }
    }
    assert_no_failures(&failures);
}

/// A qcow2 image with seeded random data, zero runs and holes.
fn source(dir: &Path, rng: &mut Rng, size: u64) -> std::path::PathBuf {
    let src = dir.join("src.qcow2");
    let _ = std::fs::remove_file(&src);
    qemu_create(&src, "qcow2", "", None, size);
    let cmds: Vec<String> = random_writes(rng, size, 16)
        .into_iter()
        .map(|c| c.replace("discard", "write -z"))
        .collect();
    qemu_io(&src, "qcow2", &cmds);
    src
}

#[test]
fn vimg_converts_to_vhdx_as_qemu_img_does() {
    if !qemu_available("vhdx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(1717);
    let ours = dir.path().join("ours.vhdx");
    let theirs = dir.path().join("theirs.vhdx");
    for (opts, size) in [
        ("", (40 << 20) + 512),
        ("subformat=fixed", 20 << 20),
        ("block_size=1M", 30 << 20),
        ("block_state_zero=off", 17 << 20),
    ] {
        let src = source(dir.path(), &mut rng, size);
        for f in [&ours, &theirs] {
            let _ = std::fs::remove_file(f);
        }
        let mut args = vec!["convert", "-O", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        run("qemu-img", &[&args[..], &[p(&src), p(&theirs)]].concat());
        let (rc, o) = run_status(VIMG, &[&args[..], &[p(&src), p(&ours)]].concat());
        if rc != 0 {
            failures.push(format!("{opts}: vimg convert: {o}"));
            continue;
        }
        if masked(&ours, true, true) != masked(&theirs, true, true) {
            failures.push(format!("{opts}: the files differ"));
        }
        let (rc, o) = run_status("qemu-img", &["check", p(&ours)]);
        if rc != 0 {
            failures.push(format!("{opts}: qemu-img check: {o}"));
        }
        let (rc, o) = run_status("qemu-img", &["compare", p(&src), p(&ours)]);
        if rc != 0 {
            failures.push(format!("{opts}: qemu-img compare: {o}"));
        }

        // convert -n into an image with data of its own: what is written replaces it.
        let target = dir.path().join("target.vhdx");
        let _ = std::fs::remove_file(&target);
        qemu_create(&target, "vhdx", opts, None, size);
        qemu_io(&target, "vhdx", &random_writes(&mut rng, size, 8));
        let (rc, o) = run_status(VIMG, &["convert", "-n", "-O", "vhdx", p(&src), p(&target)]);
        if rc != 0 {
            failures.push(format!("{opts}: vimg convert -n: {o}"));
            continue;
        }
        for (cmd, args) in [
            ("check", vec!["check", p(&target)]),
            ("compare", vec!["compare", p(&src), p(&target)]),
        ] {
            let (rc, o) = run_status("qemu-img", &args);
            if rc != 0 {
                failures.push(format!("{opts}: after convert -n, qemu-img {cmd}: {o}"));
            }
        }
    }
    assert_no_failures(&failures);
}

/// A dynamic VHDX holding a log qemu could not apply: qemu-io writes through blkdebug, which
/// fails the write of the BAT's first sector, so that the BAT update stays in the log.
fn dirty_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    let _ = std::fs::remove_file(&img);
    qemu_create(&img, "vhdx", "", None, 64 << 20);
    let conf = dir.join("blkdebug.conf");
    // The BAT of a 64 MiB image with a 1 MiB log is at 2 MiB: sector 4096.
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"pwritev\"\nerrno = \"5\"\nsector = \"4096\"\n",
    )
    .unwrap();
    let spec = format!(
        "driver=vhdx,file.driver=blkdebug,file.config={},file.image.filename={}",
        p(&conf),
        p(&img)
    );
    let (rc, o) = run_status(
        "qemu-io",
        &[
            "--image-opts",
            &spec,
            "-c",
            "write -P 0x5a 4096 1M",
            "-c",
            "write -P 0x33 9M 64k",
        ],
    );
    assert_ne!(rc, 0, "blkdebug did not fail the BAT write: {o}");
    let (rc, o) = run_status("qemu-img", &["info", p(&img)]);
    assert!(
        rc != 0 && o.contains("contains a log that needs to be replayed"),
        "qemu does not see a log: {o}"
    );
    img
}

#[test]
fn a_log_left_by_qemu_is_refused_read_only_and_replayed_as_qemu_replays_it() {
    if !qemu_available("vhdx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut failures = Vec::new();
    let ours = dirty_image(d, "ours.vhdx");
    let theirs = d.join("theirs.vhdx");
    std::fs::copy(&ours, &theirs).unwrap();

    for cmd in ["info", "map"] {
        let (rc, o) = run_status(VIMG, &[cmd, p(&ours)]);
        let first = o.lines().next().unwrap_or("");
        let want = format!(
            "vimg: Could not open '{0}': VHDX image file '{0}' opened read-only, but contains a log that needs to be replayed",
            p(&ours)
        );
        if rc != 1 || !first.starts_with(&want) || o.lines().count() != 1 {
            failures.push(format!("{cmd} of a dirty image: {rc} {o}"));
        }
    }
    for args in [
        vec!["check", "-r", "all"],
        vec!["check"],
        vec!["check", "--output=json"],
    ] {
        let (qrc, q) = run_status("qemu-img", &[&args[..], &[p(&theirs)]].concat());
        let (rc, v) = run_status(VIMG, &[&args[..], &[p(&ours)]].concat());
        if rc != qrc || v.replace(p(&ours), "X") != q.replace(p(&theirs), "X") {
            failures.push(format!(
                "{args:?}:\nqemu-img ({qrc}):\n{q}\nvimg ({rc}):\n{v}"
            ));
        }
    }
    // Replayed alike: the same disk, the same file but for the headers' GUIDs.
    if masked(&ours, false, true) != masked(&theirs, false, true) {
        failures.push("the replayed files differ".into());
    }
    let (rc, o) = run_status("qemu-img", &["compare", p(&ours), p(&theirs)]);
    if rc != 0 {
        failures.push(format!("qemu-img compare: {o}"));
    }
    let mut want = vec![0u8; 64 << 20];
    want[4096..4096 + (1 << 20)].fill(0x5a);
    if qemu_raw(&ours, d) != want {
        failures.push("the replayed disk is not what qemu-io wrote before the failure".into());
    }

    // A read-write open replays the log too: convert -n into the dirty image.
    let dirty = dirty_image(d, "rw.vhdx");
    let src = d.join("src.raw");
    std::fs::write(&src, vec![0x11u8; 1 << 20]).unwrap();
    let small = d.join("small.vhdx");
    qemu_create(&small, "vhdx", "", None, 64 << 20);
    let (rc, o) = run_status(
        VIMG,
        &[
            "convert",
            "-n",
            "-f",
            "vhdx",
            "-O",
            "vhdx",
            p(&small),
            p(&dirty),
        ],
    );
    if rc != 0 {
        failures.push(format!("convert -n into a dirty image: {o}"));
    }
    let (rc, o) = run_status("qemu-img", &["check", p(&dirty)]);
    if rc != 0 {
        failures.push(format!("qemu-img check after a read-write open: {o}"));
    }
    assert_no_failures(&failures);
}

#[test]
fn refusals_are_qemus() {
    if !qemu_available("vhdx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.vhdx");
    let mut failures = Vec::new();
    // The message after the program's name.
    let tail = |o: &str| {
        o.lines()
            .map(|l| {
                l.strip_prefix("qemu-img: ")
                    .or_else(|| l.strip_prefix("vimg: "))
                    .unwrap_or(l)
                    .to_string()
            })
            .collect::<Vec<_>>()
    };
    for (opts, size) in [
        ("block_size=3M", "1G"),
        ("", "65T"),
        ("subformat=foo", "1G"),
        ("block_state_zero=x", "1G"),
        ("log_size=5G", "1G"),
        ("log_size=4095M", "1G"),
        ("foo=1", "1G"),
    ] {
        let mut args = vec!["create", "-f", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&img), size]);
        let (qrc, q) = run_status("qemu-img", &args);
        let _ = std::fs::remove_file(&img);
        let (rc, v) = run_status(VIMG, &args);
        let _ = std::fs::remove_file(&img);
        if qrc != rc || tail(&q) != tail(&v) {
            failures.push(format!(
                "create {opts} {size}:\nqemu-img ({qrc}): {q}\nvimg ({rc}): {v}"
            ));
        }
    }
    qemu_create(&img, "vhdx", "", None, 1 << 20);
    for args in [
        vec!["measure", "-O", "vhdx", "--size", "1G"],
        vec!["resize", p(&img), "2M"],
    ] {
        let (qrc, q) = run_status("qemu-img", &args);
        let (rc, v) = run_status(VIMG, &args);
        let first = |o: &str| tail(o).first().cloned().unwrap_or_default();
        if qrc != rc || !first(&v).contains(&first(&q)) {
            failures.push(format!(
                "{args:?}:\nqemu-img ({qrc}): {q}\nvimg ({rc}): {v}"
            ));
        }
    }
    assert_no_failures(&failures);
}

/// Whether libyal's `vhdiinfo` and the `pyvhdi` module are there (under `VIMG_REQUIRE_QEMU=1`,
/// as in CI, their absence fails the test).
pub(crate) fn libvhdi_available() -> bool {
    let ok = std::process::Command::new("vhdiinfo")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
        && std::process::Command::new("python3")
            .args(["-c", "import pyvhdi"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        assert_ne!(
            std::env::var("VIMG_REQUIRE_QEMU").as_deref(),
            Ok("1"),
            "vhdiinfo or pyvhdi missing (libvhdi-utils, pip libvhdi-python)"
        );
        eprintln!("skipping: vhdiinfo or pyvhdi missing");
    }
    ok
}

/// The disk in `img` (VHD or VHDX) as libyal's `pyvhdi` reads it, written to `out`.
pub(crate) fn pyvhdi_read(img: &Path, out: &Path) -> (i32, String) {
    let script = "import sys, pyvhdi\nf = pyvhdi.file()\nf.open(sys.argv[1])\nn = f.get_media_size()\nwith open(sys.argv[2], 'wb') as o:\n    off = 0\n    while off < n:\n        b = f.read_buffer_at_offset(min(1 << 20, n - off), off)\n        o.write(b)\n        off += len(b)\n";
    run_status("python3", &["-c", script, p(img), p(out)])
}

/// An independent reader, libyal's libvhdi, on images vimg writes: `vhdiinfo` reports the
/// disk type and size, and `pyvhdi` reads the same disk as the source.
#[test]
fn libvhdi_reads_what_vimg_writes() {
    if !qemu_available("vhdx libvhdi") || !libvhdi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(4242);
    for (opts, size, kind) in [
        ("", (40 << 20) + 512, "Dynamic"),
        ("subformat=fixed", 20 << 20, "Fixed"),
        ("block_size=1M,block_state_zero=off", 30 << 20, "Dynamic"),
        ("subformat=fixed,block_state_zero=off", 12 << 20, "Fixed"),
    ] {
        let src = source(d, &mut rng, size);
        let img = d.join("ours.vhdx");
        let _ = std::fs::remove_file(&img);
        let mut args = vec!["convert", "-O", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let (rc, o) = run_status(VIMG, &[&args[..], &[p(&src), p(&img)]].concat());
        if rc != 0 {
            failures.push(format!("{opts}: vimg convert: {o}"));
            continue;
        }
        let info = run("vhdiinfo", &[p(&img)]);
        let want_size = format!("({size} bytes)");
        let want_kind = format!("Disk type\t\t: {kind}");
        if !info.contains("VHDX") || !info.contains(&want_size) || !info.contains(&want_kind) {
            failures.push(format!("{opts}: vhdiinfo says:\n{info}"));
        }
        let raw = d.join("pyvhdi.raw");
        let (rc, o) = pyvhdi_read(&img, &raw);
        if rc != 0 {
            failures.push(format!("{opts}: pyvhdi: {o}"));
            continue;
        }
        if std::fs::read(&raw).unwrap() != qemu_raw(&src, d) {
            failures.push(format!("{opts}: pyvhdi reads another disk"));
        }
    }
    assert_no_failures(&failures);
}

/// vimg writes the BAT through the log: when the BAT write itself fails (blkdebug, under vimg's
/// own convert -n), the log vimg left is found and replayed by qemu's `check -r all` and by
/// vimg's to the same image, which holds everything written.
#[test]
fn a_log_vimg_leaves_is_replayed_by_qemu() {
    if !qemu_available("vhdx log written") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(99);
    let src = source(d, &mut rng, 64 << 20);
    let ours = d.join("ours.vhdx");
    qemu_create(&ours, "vhdx", "block_size=1M", None, 64 << 20);
    let conf = d.join("blkdebug.conf");
    // The first BAT sector (at 2 MiB): its write fails once guest data was written.
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nsector = \"4096\"\niotype = \"write\"\n",
    )
    .unwrap();
    let spec = format!(
        "driver=vhdx,file.driver=blkdebug,file.config={},file.image.filename={}",
        p(&conf),
        p(&ours)
    );
    let (rc, o) = run_status(
        VIMG,
        &["convert", "-n", p(&src), "--target-image-opts", &spec],
    );
    assert_ne!(rc, 0, "the BAT write did not fail: {o}");
    let (rc, o) = run_status("qemu-img", &["info", p(&ours)]);
    assert!(
        rc != 0 && o.contains("contains a log that needs to be replayed"),
        "qemu sees no log: {o}"
    );
    let theirs = d.join("theirs.vhdx");
    std::fs::copy(&ours, &theirs).unwrap();
    let (qrc, q) = run_status("qemu-img", &["check", "-r", "all", p(&theirs)]);
    let (rc, v) = run_status(VIMG, &["check", "-r", "all", p(&ours)]);
    if rc != qrc || rc != 0 || v != q {
        failures.push(format!(
            "check -r all: qemu-img ({qrc}):\n{q}\nvimg ({rc}):\n{v}"
        ));
    }
    for img in [&ours, &theirs] {
        let (rc, o) = run_status("qemu-img", &["compare", p(&src), p(img)]);
        if rc != 0 {
            failures.push(format!("{}: qemu-img compare: {o}", p(img)));
        }
    }
    if masked(&ours, false, true) != masked(&theirs, false, true) {
        failures.push("the replayed files differ".into());
    }
    assert_no_failures(&failures);
}

/// `check` of a truncated image (a BAT entry past the end of the file), which qemu opens for a
/// check and reports: the same lines (but the program's name), JSON and exit code as qemu-img,
/// with `-r all` too; `info` refuses it as qemu-img does.
#[test]
fn a_truncated_image_is_checked_as_qemu_checks_it() {
    if !qemu_available("vhdx check truncated") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.vhdx");
    qemu_create(&img, "vhdx", "block_size=1M", None, 10 << 20);
    qemu_io(
        &img,
        "vhdx",
        &["write -P 1 0 64k".into(), "write -P 2 2M 64k".into()],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(9 << 20).unwrap();
    drop(f);
    let mut failures = Vec::new();
    let same = |o: &str| o.replace("qemu-img: ", "").replace("vimg: ", "");
    for args in [
        vec!["check"],
        vec!["check", "--output=json"],
        vec!["check", "-r", "all"],
        vec!["info"],
    ] {
        let mut args = args.clone();
        args.push(p(&img));
        let (qrc, q) = run_status("qemu-img", &args);
        let (rc, v) = run_status(VIMG, &args);
        let first = |o: &str| same(o).lines().next().unwrap_or("").to_string();
        let agree = if args[0] == "info" {
            first(&v).starts_with(&format!("Could not open '{}': VHDX BAT entry", p(&img)))
        } else {
            same(&v) == same(&q)
        };
        if rc != qrc || !agree {
            failures.push(format!(
                "{args:?}:\nqemu-img ({qrc}):\n{q}\nvimg ({rc}):\n{v}"
            ));
        }
    }
    assert_no_failures(&failures);
}
