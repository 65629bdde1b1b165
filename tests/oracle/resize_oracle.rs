//! `vimg resize` against qemu-img as the oracle: each case resizes one copy of an image with
//! vimg and another with `qemu-img resize` (same arguments); then `qemu-img check` must accept
//! vimg's copy, `qemu-img info` must report the new size, and `qemu-img compare` must find
//! the two copies identical.

use crate::common;

use common::{qemu_available, qemu_create, qemu_io, run};
use std::path::Path;
use std::process::Command;
use vimg::block::ImageFormat;
use vimg::ops::resize::{resize, resize_prealloc, RESIZED};
use vimg::prealloc::Preallocation;
use vimg::prealloc::PREALLOC_SHRINK;
use vimg::qcow2::V2_SNAPSHOTS;

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vimg-resize-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn virtual_size(path: &Path, fmt: &str) -> u64 {
    let out = run(
        "qemu-img",
        &["info", "-f", fmt, "--output=json", path.to_str().unwrap()],
    );
    let key = "\"virtual-size\":";
    // The image's own entry comes after its children's (the protocol layer's).
    let at = out.rfind(key).expect("virtual-size in info") + key.len();
    out[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn qemu_resize(path: &Path, fmt: &str, arg: &str, shrink: bool) {
    let p = path.to_str().unwrap();
    let mut args = vec!["resize", "-q", "-f", fmt];
    if shrink {
        args.push("--shrink");
    }
    args.extend([p, "--", arg]);
    run("qemu-img", &args);
}

/// Resizes copies of `base` with vimg and with qemu-img and checks the outcome.
fn case(dir: &Path, base: &Path, fmt: &str, arg: &str, shrink: bool, want: u64) {
    let tag = format!("{fmt}-{arg}-{shrink}").replace(['+', '-'], "_");
    let ours = dir.join(format!("ours-{tag}"));
    let theirs = dir.join(format!("theirs-{tag}"));
    std::fs::copy(base, &ours).unwrap();
    std::fs::copy(base, &theirs).unwrap();
    let format = if fmt == "raw" {
        ImageFormat::Raw
    } else {
        ImageFormat::Qcow2
    };
    let msg = resize(
        &ours,
        Some(format),
        arg,
        shrink,
        &vimg::opener::Opener::default(),
    )
    .unwrap_or_else(|e| panic!("vimg resize {} {arg}: {e}", base.display()));
    assert_eq!(msg, RESIZED);
    qemu_resize(&theirs, fmt, arg, shrink);
    let o = ours.to_str().unwrap();
    if fmt == "qcow2" {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", o])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "check after resize {arg} of {}: {}{}",
            base.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(virtual_size(&ours, fmt), want, "size after {arg}");
    assert_eq!(virtual_size(&theirs, fmt), want, "qemu's size after {arg}");
    let out = run(
        "qemu-img",
        &["compare", "-f", fmt, "-F", fmt, o, theirs.to_str().unwrap()],
    );
    assert!(out.contains("identical"), "compare after {arg}: {out}");
}

/// A shrink without `--shrink` fails and leaves the file byte for byte as it was.
fn refused(dir: &Path, base: &Path, fmt: &str, arg: &str) {
    let copy = dir.join(format!("refused-{fmt}"));
    std::fs::copy(base, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let format = if fmt == "raw" {
        ImageFormat::Raw
    } else {
        ImageFormat::Qcow2
    };
    let e = resize(
        &copy,
        Some(format),
        arg,
        false,
        &vimg::opener::Opener::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("--shrink"), "{e}");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        before,
        "refused resize changed the file"
    );
}

/// Writes recognisable data all over an image of `size` bytes, including its last bytes.
fn fill(path: &Path, fmt: &str, size: u64) {
    let cmds = vec![
        "write -P 0x11 0 65536".to_string(),
        format!("write -P 0x22 {} 70000", size / 3),
        format!("write -P 0x33 {} 3000", size / 2 + 512),
        format!("write -P 0x44 {} 8192", size - 8192),
    ];
    qemu_io(path, fmt, &cmds);
}

#[test]
fn qcow2_resize_matches_qemu() {
    if !qemu_available("qcow2_resize_matches_qemu") {
        return;
    }
    let dir = tmpdir("qcow2");
    let configs: &[(&str, &str, u64)] = &[
        ("64k-v3", "cluster_size=65536,compat=1.1", 1 << 20),
        ("512-v3", "cluster_size=512,compat=1.1", 1 << 20),
        ("2m-v3", "cluster_size=2097152,compat=1.1", 5 << 20),
        ("64k-v2", "cluster_size=65536,compat=0.10", 1 << 20),
        ("512-v2", "cluster_size=512,compat=0.10", 1 << 20),
        (
            "64k-ext",
            "cluster_size=65536,compat=1.1,extended_l2=on",
            3 << 20,
        ),
    ];
    for &(name, opts, size) in configs {
        let base = dir.join(format!("base-{name}.qcow2"));
        qemu_create(&base, "qcow2", opts, None, size);
        fill(&base, "qcow2", size);
        // Across L1 boundaries: a 512-byte-cluster image needs a far bigger L1 table for 2 GiB.
        case(&dir, &base, "qcow2", "2G", false, 2 << 30);
        case(&dir, &base, "qcow2", "+512K", false, size + (512 << 10));
        case(&dir, &base, "qcow2", &size.to_string(), false, size);
        refused(&dir, &base, "qcow2", "-256K");
        let third = size / 3 / 512 * 512;
        case(&dir, &base, "qcow2", &third.to_string(), true, third);
        case(&dir, &base, "qcow2", "-4608", true, size - 4608);
        // Shrinking into the first cluster (or L2 table) and growing across an L1 entry.
        case(&dir, &base, "qcow2", "1536", true, 1536);
        case(&dir, &base, "qcow2", "+1G", false, size + (1 << 30));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn qcow2_unaligned_size_is_refused_untouched() {
    let dir = tmpdir("unaligned");
    let base = dir.join("u.qcow2");
    if !qemu_available("qcow2_unaligned_size_is_refused_untouched") {
        return;
    }
    qemu_create(&base, "qcow2", "", None, 1 << 20);
    let before = std::fs::read(&base).unwrap();
    assert!(resize(
        &base,
        None,
        "2000001",
        false,
        &vimg::opener::Opener::default()
    )
    .is_err());
    assert!(resize(&base, None, "-0", true, &vimg::opener::Opener::default()).is_ok()); // no change is fine
    assert!(resize(&base, None, "-1M", true, &vimg::opener::Opener::default()).is_err()); // zero size
    assert_eq!(std::fs::read(&base).unwrap(), before);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn snapshots_v2_refused_v3_resized() {
    if !qemu_available("snapshots_v2_refused_v3_resized") {
        return;
    }
    let dir = tmpdir("snap");
    for compat in ["0.10", "1.1"] {
        let base = dir.join(format!("s-{compat}.qcow2"));
        qemu_create(&base, "qcow2", &format!("compat={compat}"), None, 1 << 20);
        fill(&base, "qcow2", 1 << 20);
        run(
            "qemu-img",
            &["snapshot", "-c", "s1", base.to_str().unwrap()],
        );
        fill(&base, "qcow2", 1 << 20);
        if compat == "0.10" {
            // qemu refuses any resize of a v2 image with snapshots, with this message.
            let before = std::fs::read(&base).unwrap();
            for (arg, shrink) in [("512K", true), ("3G", false)] {
                let e =
                    resize(&base, None, arg, shrink, &vimg::opener::Opener::default()).unwrap_err();
                assert!(e.to_string().contains(V2_SNAPSHOTS), "{e}");
            }
            assert_eq!(std::fs::read(&base).unwrap(), before);
        } else {
            // v3: both ways, the snapshot stays readable and the image consistent.
            case(&dir, &base, "qcow2", "3G", false, 3 << 30);
            case(&dir, &base, "qcow2", "300K", true, 300 << 10);
            case(&dir, &base, "qcow2", "64K", true, 64 << 10);
            let ours = dir.join("ours-qcow2_64K_true");
            let out = run("qemu-img", &["snapshot", "-l", ours.to_str().unwrap()]);
            assert!(out.contains("s1"), "{out}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `qemu-img map --output=json` as (present, zero, data) runs, merged where adjacent (host
/// offsets differ between the two layouts); `zero` left out when `with_zero` is false.
fn map_runs(path: &Path, fmt: &str, with_zero: bool) -> Vec<(bool, bool, bool, u64, u64)> {
    let out = run(
        "qemu-img",
        &["map", "-f", fmt, "--output=json", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut runs: Vec<(bool, bool, bool, u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        let b = |k: &str| e[k].as_bool().unwrap_or(false);
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let key = (b("present"), b("zero") && with_zero, b("data"));
        match runs.last_mut() {
            Some(r) if (r.0, r.1, r.2) == key && r.4 == start => r.4 = start + len,
            _ => runs.push((key.0, key.1, key.2, start, start + len)),
        }
    }
    runs
}

/// Grows copies of `base` with vimg and qemu-img, both with `--preallocation=mode`; the results
/// must read the same, check clean, map the same and have about the same file size.
fn prealloc_case(dir: &Path, base: &Path, fmt: &str, mode: &str, arg: &str, exact_map: bool) {
    let tag = format!("p-{fmt}-{mode}-{arg}").replace('+', "_");
    let ours = dir.join(format!("{tag}-ours"));
    let theirs = dir.join(format!("{tag}-theirs"));
    std::fs::copy(base, &ours).unwrap();
    std::fs::copy(base, &theirs).unwrap();
    let format = if fmt == "raw" {
        ImageFormat::Raw
    } else {
        ImageFormat::Qcow2
    };
    let pm = Preallocation::from_name(mode).unwrap();
    resize_prealloc(
        &ours,
        Some(format),
        arg,
        false,
        pm,
        &vimg::opener::Opener::default(),
    )
    .unwrap_or_else(|e| panic!("{tag}: vimg resize: {e}"));
    let p = format!("--preallocation={mode}");
    run(
        "qemu-img",
        &["resize", "-q", "-f", fmt, &p, theirs.to_str().unwrap(), arg],
    );
    let (o, t) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
    if fmt == "qcow2" {
        let st = Command::new("qemu-img")
            .args(["check", o])
            .status()
            .unwrap();
        assert!(st.success(), "{tag}: qemu-img check failed");
    }
    let out = run("qemu-img", &["compare", "-f", fmt, "-F", fmt, o, t]);
    assert!(out.contains("identical"), "{tag}: {out}");
    assert_eq!(
        map_runs(&ours, fmt, exact_map),
        map_runs(&theirs, fmt, exact_map),
        "{tag}: map differs"
    );
    let (lo, lt) = (
        std::fs::metadata(&ours).unwrap().len(),
        std::fs::metadata(&theirs).unwrap().len(),
    );
    let slack = if fmt == "raw" { 0 } else { 4 << 20 };
    assert!(
        lo.abs_diff(lt) <= slack,
        "{tag}: file size {lo} vs qemu's {lt}"
    );
}

#[test]
fn preallocation_matches_qemu() {
    if !qemu_available("preallocation_matches_qemu") {
        return;
    }
    let dir = tmpdir("prealloc");
    for (name, opts) in [
        ("512", "cluster_size=512"),
        ("64k", "cluster_size=65536"),
        ("2m", "cluster_size=2097152"),
        ("64k-v2", "cluster_size=65536,compat=0.10"),
        ("ext", "cluster_size=65536,extended_l2=on"),
    ] {
        let base = dir.join(format!("b-{name}.qcow2"));
        qemu_create(&base, "qcow2", opts, None, 1 << 20);
        fill(&base, "qcow2", 1 << 20);
        for mode in ["metadata", "falloc", "full"] {
            // 512-byte clusters: qemu interleaves tables with data differently inside 4 KiB
            // host blocks, so only present/data are compared.
            prealloc_case(&dir, &base, "qcow2", mode, "+3M", name != "512");
        }
        // Shrinking with preallocation is refused, untouched.
        let before = std::fs::read(&base).unwrap();
        let e = resize_prealloc(
            &base,
            None,
            "512K",
            true,
            Preallocation::Full,
            &vimg::opener::Opener::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains(PREALLOC_SHRINK), "{e}");
        assert_eq!(std::fs::read(&base).unwrap(), before);
    }
    let raw = dir.join("b.raw");
    qemu_create(&raw, "raw", "", None, 1 << 20);
    fill(&raw, "raw", 1 << 20);
    for mode in ["falloc", "full"] {
        prealloc_case(&dir, &raw, "raw", mode, "+3M", true);
    }
    let before = std::fs::read(&raw).unwrap();
    let e = resize_prealloc(
        &raw,
        None,
        "+1M",
        false,
        Preallocation::Metadata,
        &vimg::opener::Opener::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("metadata"), "{e}");
    let e = resize_prealloc(
        &raw,
        None,
        "512K",
        true,
        Preallocation::Falloc,
        &vimg::opener::Opener::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains(PREALLOC_SHRINK), "{e}");
    assert_eq!(std::fs::read(&raw).unwrap(), before);
    // Shrinking without preallocation still works after a preallocated grow.
    let grown = dir.join("p-qcow2-full-_3M-ours");
    case(&dir, &grown, "qcow2", "1M", true, 1 << 20);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn qcow2_grow_under_longer_backing_reads_zeros() {
    if !qemu_available("qcow2_grow_under_longer_backing_reads_zeros") {
        return;
    }
    let dir = tmpdir("backing");
    let back = dir.join("back.qcow2");
    qemu_create(&back, "qcow2", "", None, 4 << 20);
    qemu_io(&back, "qcow2", &["write -P 0x55 0 4M".to_string()]);
    for compat in ["1.1", "0.10"] {
        let base = dir.join(format!("over-{compat}.qcow2"));
        let opts = format!("compat={compat}");
        qemu_create(
            &base,
            "qcow2",
            &opts,
            Some((&back, "qcow2")),
            (1 << 20) + 512,
        );
        fill(&base, "qcow2", (1 << 20) + 512);
        if compat == "1.1" {
            case(&dir, &base, "qcow2", "3M", false, 3 << 20);
            case(&dir, &base, "qcow2", "8M", false, 8 << 20);
        } else {
            // Version 2 cannot express zeros over a backing file; qemu refuses too.
            let before = std::fs::read(&base).unwrap();
            assert!(resize(&base, None, "3M", false, &vimg::opener::Opener::default()).is_err());
            assert_eq!(std::fs::read(&base).unwrap(), before);
            // Resizing to the current size changes nothing there.
            case(&dir, &base, "qcow2", "+0", false, (1 << 20) + 512);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn raw_resize_matches_qemu() {
    if !qemu_available("raw_resize_matches_qemu") {
        return;
    }
    let dir = tmpdir("raw");
    let size = 1u64 << 20;
    let base = dir.join("base.raw");
    qemu_create(&base, "raw", "", None, size);
    fill(&base, "raw", size);
    case(&dir, &base, "raw", "2G", false, 2 << 30);
    case(&dir, &base, "raw", "+512K", false, size + (512 << 10));
    refused(&dir, &base, "raw", "-256K");
    // qemu reports raw sizes rounded up to whole sectors.
    case(&dir, &base, "raw", "300000", true, 300032);
    case(&dir, &base, "raw", "-4608", true, size - 4608);
    // Exact, unaligned sizes are kept as they are.
    let ours = dir.join("odd.raw");
    std::fs::copy(&base, &ours).unwrap();
    resize(
        &ours,
        None,
        "2000001",
        false,
        &vimg::opener::Opener::default(),
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&ours).unwrap().len(), 2000001);
    std::fs::remove_dir_all(&dir).ok();
}
