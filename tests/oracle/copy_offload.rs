//! `convert -C` (copy offloading) against qemu-img's: data runs of raw and qcow2 sources go to
//! raw targets with `copy_file_range`; the output must read as the source, and
//! its allocation (`qemu-img map`) must be qemu-img's: holes stay holes, zero blocks inside data
//! are copied as data. Where the kernel refuses (forced here with the
//! `VIMG_NO_COPY_FILE_RANGE=1` test hook), qemu-img stops offloading and copies with zero
//! detection as without `-C`: so must vimg, and from or into a fixed VHD, which qemu cannot
//! offload at all.

use crate::common::{self, qemu_available, run};
use std::path::Path;
use std::process::Command;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A 16 MiB raw disk: data with an explicitly written zero block inside it, holes, data runs
/// not aligned to 64 KiB.
fn raw_source(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("src.raw");
    common::qemu_create(&img, "raw", "", None, 16 << 20);
    common::qemu_io(
        &img,
        "raw",
        &[
            "write -P 0x11 0 1M".to_string(),
            "write -z 256k 64k".to_string(),
            "write -P 0 512k 8k".to_string(),
            "write -P 0x22 3M 12k".to_string(),
            "write -P 0x33 9000k 1100k".to_string(),
            "write -P 0x44 15M 1M".to_string(),
        ],
    );
    img
}

/// A qcow2 chain over the raw disk: a top with data of its own and zero clusters (and a
/// compressed cluster when `compressed`), over a qcow2 copy of the raw disk (so data comes
/// from two layers' files).
fn qcow2_source(dir: &Path, raw: &Path, compressed: bool) -> std::path::PathBuf {
    let base = dir.join("base.qcow2");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", p(raw), p(&base)],
    );
    let top = dir.join(format!("top-{compressed}.qcow2"));
    common::qemu_create(&top, "qcow2", "", Some((&base, "qcow2")), 16 << 20);
    common::qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x55 64k 192k".to_string(),
            if compressed {
                "write -c -P 0x66 2M 64k"
            } else {
                "write -P 0x66 2M 64k"
            }
            .to_string(),
            "write -z 9M 64k".to_string(),
            "write -P 0x77 12M 2M".to_string(),
        ],
    );
    top
}

/// The allocation of a file: `qemu-img map` of it read as raw (a fixed VHD's own map reports
/// data everywhere, holes included).
fn map(img: &Path) -> String {
    run("qemu-img", &["map", "--output=json", "-f", "raw", p(img)])
}

/// Runs vimg with `args`, with the copy_file_range fallback forced or not; under strace when
/// `trace` is given, returning how many copy_file_range calls succeeded.
fn vimg(args: &[&str], fallback: bool, trace: Option<&Path>) -> usize {
    let mut cmd = match trace {
        Some(t) => {
            let mut c = Command::new("strace");
            c.args(["-f", "-qq", "-e", "trace=copy_file_range", "-o", p(t), VIMG]);
            c
        }
        None => Command::new(VIMG),
    };
    if fallback {
        cmd.env("VIMG_NO_COPY_FILE_RANGE", "1");
    }
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "vimg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    trace.map_or(0, |t| {
        std::fs::read_to_string(t)
            .unwrap()
            .lines()
            .filter(|l| l.contains("copy_file_range(") && !l.contains("= -1"))
            .count()
    })
}

fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn convert_c_copies_in_kernel_with_qemus_allocation() {
    if !qemu_available("convert_c_copies_in_kernel_with_qemus_allocation") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_source(dir.path());
    let qcow = qcow2_source(dir.path(), &raw, false);
    let traced = strace_available();
    let vpc_opts = "subformat=fixed,force_size=on";
    let vhd = dir.path().join("src.vhd");
    run(
        "qemu-img",
        &["convert", "-O", "vpc", "-o", vpc_opts, p(&raw), p(&vhd)],
    );
    let cases: [(&Path, &str, &str, &[&str]); 5] = [
        (&raw, "raw", "raw", &[]),
        (&qcow, "qcow2", "raw", &[]),
        (&vhd, "vpc", "raw", &[]),
        (&raw, "raw", "vpc", &["-o", vpc_opts]),
        (&qcow, "qcow2", "vpc", &["-o", vpc_opts]),
    ];
    for (src, sfmt, tfmt, extra) in cases {
        let theirs = dir.path().join(format!("q-{sfmt}.{tfmt}"));
        let mut args = vec!["convert", "-C", "-f", sfmt, "-O", tfmt];
        args.extend_from_slice(extra);
        args.push(p(src));
        let mut q = args.clone();
        q.push(p(&theirs));
        run("qemu-img", &q);
        let offloaded = map(&theirs);
        // qemu-img without -C: what a copy that cannot offload must allocate.
        let plain = dir.path().join(format!("p-{sfmt}.{tfmt}"));
        let mut q = args
            .iter()
            .filter(|a| **a != "-C")
            .copied()
            .collect::<Vec<_>>();
        q.push(p(&plain));
        run("qemu-img", &q);
        let detected = map(&plain);
        // qemu offloads from raw and qcow2 into raw files; from or into a VHD it cannot, and
        // copies with zero detection.
        let offloads = tfmt == "raw" && sfmt != "vpc";
        assert_eq!(
            offloaded != detected,
            offloads,
            "{sfmt} -> {tfmt}: the source must have zero blocks inside data"
        );
        for fallback in [false, true] {
            let ours = dir.path().join(format!("v-{sfmt}-{fallback}.{tfmt}"));
            let mut v = args.clone();
            v.push(p(&ours));
            let trace = dir.path().join("trace");
            let calls = vimg(&v, fallback, traced.then_some(trace.as_path()));
            let case = format!("{sfmt} -> {tfmt}, fallback {fallback}");
            if traced {
                // Offloaded unless forced back.
                assert_eq!(
                    calls > 0,
                    offloads && !fallback,
                    "{case}: {calls} copy_file_range calls"
                );
            }
            let (c, m) = common::run_status(
                "qemu-img",
                &["compare", "-f", sfmt, "-F", tfmt, p(src), p(&ours)],
            );
            assert_eq!(c, 0, "{case}: {m}");
            let want = if fallback { &detected } else { &offloaded };
            assert_eq!(
                &map(&ours),
                want,
                "{case}: allocation differs from qemu-img's"
            );
        }
    }
}

/// A source with a compressed cluster cannot be offloaded past it (qemu-img neither): the copy
/// still reads as the source. (Which ranges were offloaded before the workers saw the
/// failure depends on timing, in qemu-img too, so the allocation is not compared.)
#[test]
fn convert_c_falls_back_at_a_compressed_cluster() {
    if !qemu_available("convert_c_falls_back_at_a_compressed_cluster") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_source(dir.path());
    let qcow = qcow2_source(dir.path(), &raw, true);
    let ours = dir.path().join("v.raw");
    vimg(
        &["convert", "-C", "-O", "raw", p(&qcow), p(&ours)],
        false,
        None,
    );
    let (c, m) = common::run_status("qemu-img", &["compare", p(&qcow), p(&ours)]);
    assert_eq!(c, 0, "{m}");
}

/// Several sources joined: qemu-img offloads each part, so the zero blocks inside their data
/// are copied as data; vimg writes the data ranges whole (it does not offload joined images)
/// and must allocate the same.
#[test]
fn convert_c_of_several_sources_allocates_as_qemu() {
    if !qemu_available("convert_c_of_several_sources_allocates_as_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_source(dir.path());
    let qcow = qcow2_source(dir.path(), &raw, false);
    let theirs = dir.path().join("q.raw");
    let ours = dir.path().join("v.raw");
    let args = ["convert", "-C", "-O", "raw", p(&raw), p(&qcow)];
    let mut q = args.to_vec();
    q.push(p(&theirs));
    run("qemu-img", &q);
    let mut v = args.to_vec();
    v.push(p(&ours));
    vimg(&v, false, None);
    let (c, m) = common::run_status(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&theirs), p(&ours)],
    );
    assert_eq!(c, 0, "{m}");
    assert_eq!(
        map(&ours),
        map(&theirs),
        "allocation differs from qemu-img's"
    );
}
