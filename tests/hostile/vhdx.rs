//! Hostile VHDX images (issue 17): each damaged structure of a dynamic VHDX that qemu-img made
//! (headers, region table, metadata, BAT, log) is refused by `vimg info` and `vimg convert`
//! (and a damaged log by `vimg check -r all`, which replays it) with one line naming the file
//! and a non-zero status, never a panic nor an allocation the file's size does not bound; where
//! qemu-img refuses the same file too, that is checked. The library's fuzz entry point
//! (`vimg::vhdx::exercise`) runs on each damaged file as well.

use crate::common;

use common::{qemu_available, qemu_create, run_status};
use std::path::Path;
use vimg::vhdx::layout::set_checksum;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

const MIB: usize = 1 << 20;
const H1: usize = 64 << 10;
const H2: usize = 128 << 10;
const RT: usize = 192 << 10;
/// Where qemu puts the BAT and metadata of an image with a 1 MiB log.
const BAT: usize = 2 * MIB;
const MD: usize = 3 * MIB;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Applies `f` to both headers and fixes their checksums.
fn headers(b: &mut [u8], f: impl Fn(&mut [u8])) {
    for h in [H1, H2] {
        f(&mut b[h..h + 4096]);
        set_checksum(&mut b[h..h + 4096], 4);
    }
}

/// Applies `f` to the region table and fixes its checksum.
fn regions(b: &mut [u8], f: impl Fn(&mut [u8])) {
    f(&mut b[RT..RT + (64 << 10)]);
    set_checksum(&mut b[RT..RT + (64 << 10)], 4);
}

/// The offset of metadata item `i` (in qemu's order: file parameters, size, page 83, logical
/// and physical sector size).
fn item(i: usize) -> usize {
    MD + (64 << 10) + [0, 8, 16, 32, 36][i]
}

type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// Runs `args` (with the image last) and checks the refusal: non-zero, one line, the file
/// named, no panic.
fn refused(name: &str, file: &str, args: &[&str], failures: &mut Vec<String>) {
    let (rc, o) = run_status(VIMG, args);
    if rc == 0 || o.lines().count() != 1 || !o.contains(file) || o.contains("panicked") {
        failures.push(format!("{name}: vimg {args:?}: status {rc}: {o}"));
    }
}

#[test]
fn damaged_vhdx_images_are_refused_in_one_line() {
    if !qemu_available("vhdx hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    qemu_create(&base, "vhdx", "block_size=1M", None, 10 << 20);
    run_status(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 1 0 64k", p(&base)],
    );
    let good = std::fs::read(&base).unwrap();
    // (name, damage, whether qemu-img refuses it too)
    let cases: Vec<(&str, Damage, bool)> = vec![
        ("no-signature", Box::new(|b| b[0] = b'X'), true),
        ("truncated", Box::new(|b| b.truncate(100 << 10)), true),
        (
            "both-headers-bad",
            Box::new(|b| {
                b[H1 + 100] ^= 1;
                b[H2 + 100] ^= 1
            }),
            true,
        ),
        (
            "headers-same-sequence",
            Box::new(|b| {
                let s = u64::from_le_bytes(b[H1 + 8..H1 + 16].try_into().unwrap());
                put64(b, H2 + 8, s);
                b[H2 + 16] ^= 1;
                set_checksum(&mut b[H2..H2 + 4096], 4);
            }),
            true,
        ),
        (
            "log-offset-unaligned",
            Box::new(|b| headers(b, |h| put64(h, 72, (1 << 20) + 4096))),
            true,
        ),
        (
            "log-version-1",
            Box::new(|b| headers(b, |h| h[64] = 1)),
            true,
        ),
        ("region-table-crc", Box::new(|b| b[RT + 100] ^= 1), true),
        (
            "region-count-huge",
            Box::new(|b| regions(b, |r| put32(r, 8, 100_000))),
            true,
        ),
        (
            "regions-overlap",
            Box::new(|b| regions(b, |r| put64(r, 16 + 32 + 16, BAT as u64))),
            true,
        ),
        (
            "region-overlaps-log",
            Box::new(|b| regions(b, |r| put64(r, 16 + 16, MIB as u64))),
            true,
        ),
        (
            "unknown-required-region",
            Box::new(|b| {
                regions(b, |r| {
                    put32(r, 8, 3);
                    let e = 16 + 64;
                    r[e..e + 16].copy_from_slice(&[0x42; 16]);
                    put64(r, e + 16, 40 * MIB as u64);
                    put32(r, e + 24, MIB as u32);
                    put32(r, e + 28, 1);
                })
            }),
            true,
        ),
        ("metadata-signature", Box::new(|b| b[MD] = b'X'), true),
        (
            "metadata-count-huge",
            Box::new(|b| b[MD + 10..MD + 12].copy_from_slice(&[0xff, 0xff])),
            true,
        ),
        (
            "metadata-item-outside",
            Box::new(|b| put32(b, MD + 32 + 16, u32::MAX - 4)),
            false,
        ),
        (
            "block-size-huge",
            Box::new(|b| put32(b, item(0), 0x8000_0000)),
            true,
        ),
        (
            "block-size-3M",
            Box::new(|b| put32(b, item(0), 3 << 20)),
            true,
        ),
        ("has-parent", Box::new(|b| put32(b, item(0) + 4, 2)), true),
        (
            "sector-size-1000",
            Box::new(|b| put32(b, item(3), 1000)),
            true,
        ),
        (
            "disk-size-huge",
            Box::new(|b| put64(b, item(1), 1 << 60)),
            true,
        ),
        (
            "bat-entry-past-eof",
            Box::new(|b| put64(b, BAT, (1 << 40) | 6)),
            true,
        ),
        (
            "bat-entry-end-past-eof",
            Box::new(|b| b.truncate(b.len() - (512 << 10))),
            true,
        ),
        (
            "bat-entry-over-metadata",
            Box::new(|b| put64(b, BAT, MD as u64 | 6)),
            true,
        ),
        (
            "bat-entry-in-header-section",
            Box::new(|b| put64(b, BAT, 6)),
            false,
        ),
        ("bat-state-7", Box::new(|b| put64(b, BAT, 7)), false),
    ];
    let mut failures = Vec::new();
    for (name, damage, qemu_refuses) in cases {
        let file = format!("{name}.vhdx");
        let img = dir.path().join(&file);
        let mut b = good.clone();
        damage(&mut b);
        std::fs::write(&img, &b).unwrap();
        vimg::vhdx::exercise(&b);
        let out = dir.path().join("out.raw");
        if name == "bat-state-7" {
            // Opens (as in qemu), but its block cannot be read.
            let (rc, o) = run_status(VIMG, &["convert", "-O", "raw", p(&img), p(&out)]);
            if rc == 0 || !o.contains(&file) || o.contains("panicked") {
                failures.push(format!("{name}: vimg convert: status {rc}: {o}"));
            }
            continue;
        }
        refused(name, &file, &["info", "-f", "vhdx", p(&img)], &mut failures);
        refused(
            name,
            &file,
            &["convert", "-f", "vhdx", "-O", "raw", p(&img), p(&out)],
            &mut failures,
        );
        let (qrc, qo) = run_status("qemu-img", &["info", "-f", "vhdx", p(&img)]);
        if qemu_refuses && qrc == 0 {
            failures.push(format!("{name}: qemu-img opens it: {qo}"));
        }
    }
    common::assert_no_failures(&failures);
}

/// A dynamic VHDX with a log qemu could not apply (blkdebug fails the BAT write): see
/// tests/oracle/vhdx.rs. Returns its bytes.
fn dirty(dir: &Path) -> Vec<u8> {
    let img = dir.join("dirty.vhdx");
    qemu_create(&img, "vhdx", "", None, 64 << 20);
    let conf = dir.join("blkdebug.conf");
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
    run_status(
        "qemu-io",
        &["--image-opts", &spec, "-c", "write -P 0x5a 0 1M"],
    );
    std::fs::read(&img).unwrap()
}

/// Rewrites the checksum of the log entry at the start of the log (its length is in its
/// header).
fn fix_entry(b: &mut [u8]) {
    let len = u32::from_le_bytes(b[MIB + 8..MIB + 12].try_into().unwrap()) as usize;
    set_checksum(&mut b[MIB..MIB + len], 4);
}

#[test]
fn damaged_logs_are_refused_in_one_line() {
    if !qemu_available("vhdx hostile log") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dirty(dir.path());
    assert_eq!(&good[MIB..MIB + 4], b"loge", "qemu left no log entry");
    let cases: Vec<(&str, Damage)> = vec![
        (
            "flushed-offset-past-eof",
            Box::new(|b| {
                put64(b, MIB + 48, 1 << 40);
                fix_entry(b)
            }),
        ),
        (
            "last-offset-huge",
            Box::new(|b| {
                put64(b, MIB + 56, 1 << 55);
                fix_entry(b)
            }),
        ),
        (
            "write-into-header-section",
            Box::new(|b| {
                put64(b, MIB + 64 + 16, 64 << 10);
                fix_entry(b)
            }),
        ),
        (
            "zero-into-log",
            Box::new(|b| {
                b[MIB + 64..MIB + 68].copy_from_slice(b"zero");
                put64(b, MIB + 64 + 8, 4096);
                put64(b, MIB + 64 + 16, MIB as u64);
                fix_entry(b)
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (name, damage) in cases {
        let file = format!("{name}.vhdx");
        let img = dir.path().join(&file);
        let mut b = good.clone();
        damage(&mut b);
        std::fs::write(&img, &b).unwrap();
        vimg::vhdx::exercise(&b);
        refused(name, &file, &["check", "-r", "all", p(&img)], &mut failures);
        refused(name, &file, &["info", p(&img)], &mut failures);
    }
    // A damaged entry is no entry: the image opens with the BAT as it was (as in qemu).
    let img = dir.path().join("bad-crc.vhdx");
    let mut b = good.clone();
    b[MIB + 100] ^= 1;
    std::fs::write(&img, &b).unwrap();
    let (rc, o) = run_status(VIMG, &["info", p(&img)]);
    let (qrc, qo) = run_status("qemu-img", &["info", p(&img)]);
    if rc != 0 || qrc != 0 {
        failures.push(format!("bad-crc: vimg {rc} {o}; qemu-img {qrc} {qo}"));
    }
    common::assert_no_failures(&failures);
}
