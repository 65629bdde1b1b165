//! Hostile VMDK disks: each damaged field of a monolithicSparse and a streamOptimized disk
//! qemu-img made, and damaged descriptor files, are refused by `vimg info` (where the damage is
//! in what opening reads) and `vimg convert` with one line naming the file and a non-zero
//! status, never a panic nor an allocation the file's size does not bound; where qemu-img
//! refuses the same file too, that is checked. The library's fuzz entry point
//! (`vimg::vmdk::exercise`) runs on each damaged one-file disk as well.

use crate::common;

use common::{qemu_available, qemu_create, run, run_status};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn rd64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The byte offset of the first grain table entry of the disk in `b` (its first table).
fn first_gte(b: &[u8]) -> usize {
    let gd = rd64(b, 56) as usize * 512;
    rd32(b, gd) as usize * 512
}

type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// Runs `info` and `convert` on each damaged copy of `good`; `(name, damage, info fails,
/// qemu-img refuses to open it)`.
fn run_cases(dir: &Path, good: &[u8], cases: Vec<(&str, Damage, bool, bool)>) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, damage, info_fails, qemu_refuses) in cases {
        let img = dir.join(format!("{name}.vmdk"));
        let mut b = good.to_vec();
        damage(&mut b);
        std::fs::write(&img, &b).unwrap();
        vimg::vmdk::exercise(&b);
        let out = dir.join("out.raw");
        let mut cmds = vec![vec!["convert", "-f", "vmdk", "-O", "raw", p(&img), p(&out)]];
        if info_fails {
            cmds.push(vec!["info", "-f", "vmdk", p(&img)]);
        }
        for args in cmds {
            let (rc, o) = run_status(VIMG, &args);
            if rc == 0
                || o.lines().count() != 1
                || !o.contains(&format!("{name}.vmdk"))
                || o.contains("panicked")
            {
                failures.push(format!("{name}: vimg {args:?}: status {rc}: {o}"));
            }
        }
        let (qrc, qo) = run_status("qemu-img", &["info", "-f", "vmdk", p(&img)]);
        if qemu_refuses && qrc == 0 {
            failures.push(format!("{name}: qemu-img opens it: {qo}"));
        }
    }
    failures
}

#[test]
fn damaged_sparse_disks_are_refused_in_one_line() {
    if !qemu_available("vmdk hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    qemu_create(&base, "vmdk", "", None, 10 << 20);
    run(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 1 0 200k", p(&base)],
    );
    let good = std::fs::read(&base).unwrap();
    let cases: Vec<(&str, Damage, bool, bool)> = vec![
        ("truncated", Box::new(|b| b.truncate(300)), true, true),
        ("tiny", Box::new(|b| b.truncate(3)), true, true),
        ("version-4", Box::new(|b| le32(b, 4, 4)), true, true),
        ("granularity-0", Box::new(|b| le64(b, 20, 0)), true, true),
        (
            "granularity-huge",
            Box::new(|b| le64(b, 20, 1 << 22)),
            true,
            true,
        ),
        ("gtes-1024", Box::new(|b| le32(b, 44, 1024)), true, true),
        (
            "capacity-huge",
            Box::new(|b| le64(b, 12, 1 << 50)),
            true,
            false,
        ),
        (
            "capacity-big-gd",
            Box::new(|b| le64(b, 12, 1 << 36)),
            true,
            false,
        ),
        (
            "gd-past-eof",
            Box::new(|b| le64(b, 56, 1 << 40)),
            true,
            false,
        ),
        (
            "rgd-past-eof",
            Box::new(|b| le64(b, 48, 1 << 30)),
            true,
            false,
        ),
        (
            "grain-offset-past-eof",
            Box::new(|b| le64(b, 64, 1 << 30)),
            true,
            true,
        ),
        (
            "gt-past-eof",
            Box::new(|b| {
                let gd = rd64(b, 56) as usize * 512;
                le32(b, gd, 0x7fff_ffff)
            }),
            false,
            false,
        ),
        (
            "grain-past-eof",
            Box::new(|b| {
                let at = first_gte(b);
                le32(b, at, 0x00ff_ffff)
            }),
            false,
            false,
        ),
        (
            "no-cid",
            Box::new(|b| {
                for i in 512..1024 {
                    if &b[i..i + 4] == b"CID=" {
                        b[i] = b'X';
                    }
                }
            }),
            true,
            true,
        ),
        (
            "footer-bad",
            Box::new(|b| le64(b, 56, u64::MAX)),
            true,
            true,
        ),
    ];
    let failures = run_cases(dir.path(), &good, cases);
    common::assert_no_failures(&failures);
}

#[test]
fn damaged_stream_optimized_disks_are_refused_in_one_line() {
    if !qemu_available("vmdk hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    qemu_create(&raw, "raw", "", None, 4 << 20);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 0 300k", p(&raw)],
    );
    let base = dir.path().join("base.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&raw),
            p(&base),
        ],
    );
    let good = std::fs::read(&base).unwrap();
    let marker = |b: &[u8]| rd32(b, first_gte(b)) as usize * 512;
    let cases: Vec<(&str, Damage, bool, bool)> = vec![
        (
            "marker-size-huge",
            Box::new(move |b| {
                let m = marker(b);
                le32(b, m + 8, u32::MAX)
            }),
            false,
            false,
        ),
        (
            "marker-size-0",
            Box::new(move |b| {
                let m = marker(b);
                le32(b, m + 8, 0)
            }),
            false,
            false,
        ),
        (
            "deflate-garbage",
            Box::new(move |b| {
                let m = marker(b);
                b[m + 12..m + 40].fill(0xa5)
            }),
            false,
            false,
        ),
        (
            "marker-past-eof",
            Box::new(|b| {
                let at = first_gte(b);
                le32(b, at, 0x00ff_fff0)
            }),
            false,
            false,
        ),
    ];
    let failures = run_cases(dir.path(), &good, cases);
    common::assert_no_failures(&failures);
}

#[test]
fn damaged_descriptors_are_refused_in_one_line() {
    if !qemu_available("vmdk hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("flat.vmdk");
    qemu_create(&base, "vmdk", "subformat=monolithicFlat", None, 1 << 20);
    let good = std::fs::read_to_string(&base).unwrap();
    let mut failures = Vec::new();
    let huge = format!("{}\n{}", good, "#".repeat(3 << 20));
    for (name, text, qemu_refuses) in [
        ("no-create-type", good.replace("createType", "kind"), true),
        (
            "unknown-type",
            good.replace("monolithicFlat\"", "fancy\""),
            true,
        ),
        (
            "missing-extent",
            good.replace("flat-flat.vmdk", "nothere.vmdk"),
            true,
        ),
        (
            "bad-line",
            good.replace("FLAT \"flat-flat.vmdk\" 0", "FLAT \"flat-flat.vmdk\""),
            true,
        ),
        (
            "json-extent",
            good.replace("\"flat-flat.vmdk\"", "\"json:{}\""),
            false,
        ),
        ("no-cid", good.replace("CID", "XID"), true),
        ("huge", huge, false),
        (
            "parent-unterminated",
            format!("{good}parentFileNameHint=\"x"),
            true,
        ),
    ] {
        let img = dir.path().join(format!("{name}.vmdk"));
        std::fs::write(&img, text).unwrap();
        let (rc, o) = run_status(VIMG, &["info", "-f", "vmdk", p(&img)]);
        if name == "huge" {
            // Past the first MiB qemu reads nothing of a descriptor: the disk is fine.
            if rc != 0 {
                failures.push(format!("{name}: {rc} {o}"));
            }
            continue;
        }
        if rc == 0
            || o.lines().count() != 1
            || !o.contains(&format!("{name}.vmdk"))
            || o.contains("panicked")
        {
            failures.push(format!("{name}: vimg info: status {rc}: {o}"));
        }
        let (qrc, qo) = run_status("qemu-img", &["info", "-f", "vmdk", p(&img)]);
        if qemu_refuses && qrc == 0 {
            failures.push(format!("{name}: qemu-img opens it: {qo}"));
        }
    }
    common::assert_no_failures(&failures);
}
