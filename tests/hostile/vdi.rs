//! Hostile VDI headers and block maps (issue 17): every field vimg reads from the file is
//! checked before use, so a bad image gets one line naming the file and what is wrong, a
//! non-zero exit and no panic, and the block map's allocation is bounded by the file's size.
//! qemu-img refuses the header cases with the same words.

use crate::common;

use common::{poke, qemu_available, qemu_create, run_status};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn bad_headers_and_block_maps_are_one_line_errors() {
    if !qemu_available("vdi hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let le32 = |v: u32| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, u64, Vec<u8>, &str, bool)> = vec![
        // (name, offset, bytes, vimg's words, qemu-img refuses it with the same words)
        (
            "version",
            68,
            le32(0x0001_0000),
            "unsupported VDI image (version 1.0)",
            true,
        ),
        (
            "bmap-align",
            340,
            le32(100),
            "unaligned block map offset 0x64",
            true,
        ),
        (
            "data-align",
            344,
            le32(100),
            "unaligned data offset 0x64",
            true,
        ),
        (
            "sector",
            360,
            le32(4096),
            "sector size 4096 is not 512",
            true,
        ),
        (
            "block",
            376,
            le32(65536),
            "block size 65536 is not 1048576",
            true,
        ),
        (
            "room",
            384,
            le32(1),
            "image bitmap has room for 1048576",
            true,
        ),
        ("link", 424, vec![1], "non-NULL link UUID", true),
        ("parent", 440, vec![1], "non-NULL parent UUID", true),
        (
            "size",
            368,
            u64::MAX.to_le_bytes().to_vec(),
            "Unsupported VDI image size",
            true,
        ),
        (
            "blocks",
            384,
            le32(0x1fff_ff00),
            "lies past the end of the file",
            false,
        ),
        (
            "too-many",
            384,
            le32(0x3fff_ffff),
            "(too many blocks 1073741823, max is 536870784)",
            true,
        ),
        (
            "bmap-far",
            340,
            le32(0x7fff_fe00),
            "lies past the end of the file",
            false,
        ),
        (
            "entry",
            512,
            le32(1000),
            "block index 0 too large, is 1000",
            false,
        ),
    ];
    let mut failures = Vec::new();
    for (name, at, bytes, words, qemu_same) in cases {
        let img = dir.path().join(format!("{name}.vdi"));
        qemu_create(&img, "vdi", "", None, 2 << 20);
        poke(&img, at, &bytes);
        for args in [
            vec!["info", p(&img)],
            vec![
                "convert",
                "-O",
                "raw",
                p(&img),
                p(&dir.path().join("o.raw")),
            ],
            vec!["map", "-f", "vdi", p(&img)],
        ] {
            let (rc, o) = run_status(VIMG, &args);
            if rc == 0
                || o.lines().count() != 1
                || !o.contains(words)
                || !o.contains(p(&img))
                || o.contains("panick")
            {
                failures.push(format!("{name}: vimg {args:?}: {rc} {o}"));
            }
        }
        if qemu_same {
            let (rc, o) = run_status("qemu-img", &["info", p(&img)]);
            if rc == 0 || !o.contains(words) {
                failures.push(format!("{name}: qemu-img info: {rc} {o}"));
            }
        }
    }
    common::assert_no_failures(&failures);
}

/// A data area past the end of the file reads as zeros, as qemu's file layer reads it.
#[test]
fn data_past_the_end_of_the_file_reads_as_zeros_as_in_qemu() {
    if !qemu_available("vdi hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("far.vdi");
    qemu_create(&img, "vdi", "static=on", None, 2 << 20);
    poke(&img, 344, &0x7fff_0000u32.to_le_bytes());
    let (v, q) = (dir.path().join("v.raw"), dir.path().join("q.raw"));
    let (rc, o) = run_status(VIMG, &["convert", "-O", "raw", p(&img), p(&v)]);
    assert_eq!(rc, 0, "{o}");
    let (rc, o) = run_status("qemu-img", &["convert", "-O", "raw", p(&img), p(&q)]);
    assert_eq!(rc, 0, "{o}");
    assert_eq!(std::fs::read(&v).unwrap(), std::fs::read(&q).unwrap());
}
