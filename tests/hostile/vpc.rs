//! Hostile VHD images (issue 17): each damaged field of a dynamic VHD that qemu-img made is
//! refused by `vimg info` and `vimg convert` with one line naming the file and a non-zero
//! status, never a panic nor an allocation the file's size does not bound; where qemu-img
//! refuses the same file too, that is checked. The library's fuzz entry point
//! (`vimg::vpc::exercise`) runs on each damaged file as well.

use crate::common;

use common::{qemu_available, qemu_create, run_status};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Recomputes the checksum of the 512-byte footer at `at` (field at 64) or of the dynamic
/// header (1024 bytes, field at 36).
fn fix_sum(b: &mut [u8], at: usize, len: usize, field: usize) {
    let s = &mut b[at..at + len];
    s[field..field + 4].fill(0);
    let sum: u32 = s.iter().map(|&c| u32::from(c)).sum();
    s[field..field + 4].copy_from_slice(&(!sum).to_be_bytes());
}

/// Applies `f` to both footers (the copy at 0 and the one at the end), fixing their checksums.
fn both_footers(b: &mut [u8], f: impl Fn(&mut [u8])) {
    let end = b.len() - 512;
    for at in [0, end] {
        f(&mut b[at..at + 512]);
        fix_sum(b, at, 512, 64);
    }
}

#[test]
fn damaged_vhd_images_are_refused_in_one_line() {
    if !qemu_available("vpc hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    qemu_create(&base, "vpc", "subformat=dynamic", None, 10 << 20);
    run_status(
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 1 0 64k", p(&base)],
    );
    let good = std::fs::read(&base).unwrap();
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    // (name, damage, whether qemu-img refuses it too)
    let cases: Vec<(&str, Damage, bool)> = vec![
        ("bad-footer-sum", Box::new(|b| b[100] ^= 1), true),
        ("truncated", Box::new(|b| b.truncate(300)), true),
        (
            "block-size-0",
            Box::new(|b| {
                be32(b, 512 + 32, 0);
                fix_sum(b, 512, 1024, 36)
            }),
            true,
        ),
        (
            "block-size-odd",
            Box::new(|b| {
                be32(b, 512 + 32, 3000);
                fix_sum(b, 512, 1024, 36)
            }),
            true,
        ),
        (
            "huge-bat",
            Box::new(|b| {
                be32(b, 512 + 28, u32::MAX);
                fix_sum(b, 512, 1024, 36)
            }),
            true,
        ),
        (
            "bat-past-eof",
            Box::new(|b| {
                be64(b, 512 + 16, 1 << 40);
                fix_sum(b, 512, 1024, 36)
            }),
            false,
        ),
        (
            "small-bat",
            Box::new(|b| {
                be32(b, 512 + 28, 1);
                fix_sum(b, 512, 1024, 36)
            }),
            true,
        ),
        (
            "block-past-eof",
            Box::new(|b| be32(b, 1536, 0x00ff_ffff)),
            true,
        ),
        (
            "header-past-eof",
            Box::new(|b| both_footers(b, |f| be64(f, 16, 1 << 50))),
            false,
        ),
        ("no-cxsparse", Box::new(|b| b[512] = b'X'), true),
        (
            "disk-type-9",
            Box::new(|b| both_footers(b, |f| be32(f, 60, 9))),
            false,
        ),
        (
            "too-large",
            Box::new(|b| {
                both_footers(b, |f| {
                    f[28..32].copy_from_slice(b"win ");
                    be64(f, 48, 1 << 45)
                })
            }),
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (name, damage, qemu_refuses) in cases {
        let img = dir.path().join(format!("{name}.vhd"));
        let mut b = good.clone();
        damage(&mut b);
        std::fs::write(&img, &b).unwrap();
        vimg::vpc::exercise(&b);
        let out = dir.path().join("out.raw");
        for args in [
            vec!["info", p(&img)],
            vec!["convert", "-O", "raw", p(&img), p(&out)],
        ] {
            let (rc, o) = run_status(VIMG, &args);
            if rc == 0
                || o.lines().count() != 1
                || !o.contains(&format!("{name}.vhd"))
                || o.contains("panicked")
            {
                failures.push(format!("{name}: vimg {args:?}: status {rc}: {o}"));
            }
        }
        let (qrc, qo) = run_status("qemu-img", &["info", "-f", "vpc", p(&img)]);
        if qemu_refuses && qrc == 0 {
            failures.push(format!("{name}: qemu-img opens it: {qo}"));
        }
    }
    common::assert_no_failures(&failures);
}
