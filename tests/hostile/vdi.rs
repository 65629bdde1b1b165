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

/// Writing into a vdi image whose header counts more blocks allocated than it has (damaged):
/// what needs a new block is refused in one line, nothing is overwritten; writes into
/// allocated blocks still go through.
#[test]
fn writes_into_a_damaged_count_never_overwrite() {
    if !qemu_available("vdi hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("count.vdi");
    qemu_create(&img, "vdi", "", None, 3 << 20);
    common::qemu_io(&img, "vdi", &["write -P 4 0 1M".to_string()]);
    // The block map says blocks 1 and 2 are in use by guest blocks 1 and 2 too, the header
    // that all 3 are: no block is left.
    common::poke(&img, 516, &1u32.to_le_bytes());
    common::poke(&img, 520, &2u32.to_le_bytes());
    common::poke(&img, 388, &3u32.to_le_bytes());
    let before = std::fs::read(&img).unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![8u8; 3 << 20]).unwrap();
    let (rc, o) = common::run_status(
        env!("CARGO_BIN_EXE_vimg"),
        &["convert", "-n", "-O", "vdi", p(&src), p(&img)],
    );
    // Every block is allocated: the write goes through, in place (blocks 1 and 2 past the
    // end of the file grow it), the header and map untouched.
    assert_eq!(rc, 0, "{o}");
    assert_eq!(std::fs::read(&img).unwrap()[..1024], before[..1024]);
    let (rc, o) = common::run_status("qemu-img", &["compare", "-f", "vdi", p(&img), p(&src)]);
    assert_eq!(rc, 0, "{o}");
    // A map whose blocks reach the image's block count leaves no room: refused.
    let img2 = dir.path().join("full.vdi");
    qemu_create(&img2, "vdi", "", None, 3 << 20);
    common::qemu_io(&img2, "vdi", &["write -P 4 0 1M".to_string()]);
    common::poke(&img2, 516, &2u32.to_le_bytes());
    let before = std::fs::read(&img2).unwrap();
    let (rc, o) = common::run_status(
        env!("CARGO_BIN_EXE_vimg"),
        &["convert", "-n", "-O", "vdi", p(&src), p(&img2)],
    );
    assert!(
        rc == 1
            && o.lines().count() == 1
            && o.contains("no free block left")
            && o.contains(p(&img2)),
        "{rc} {o}"
    );
    // Nothing but the data of the blocks the map already had was changed: the map and
    // header are as they were.
    let after = std::fs::read(&img2).unwrap();
    assert_eq!(after[..1024], before[..1024]);
}
