//! Damaged and hostile archives: each case is built from a small valid archive (two devices,
//! clusters out of order, partial masks) by one change, with digests recomputed where the
//! change is meant to get past them. `vimg backup extract` and `verify` must fail with one
//! line naming the archive and what is wrong (and where), exit 1 (never a panic), and leave no
//! target directory behind. Random mutations (with and without recomputed digests) go through
//! the library reader, which must never panic.

use md5::{Digest, Md5};
use proptest::prelude::*;
use std::path::Path;
use std::process::Command;
use vimg::vma::format::{encode_extent_header, ArchiveHeader, BlockInfo, CLUSTER_SIZE};

/// Device 1: 3 whole clusters; device 2: 100000 bytes (2 clusters, the last ending inside
/// block 8).
fn header() -> ArchiveHeader {
    let mut h = ArchiveHeader::new(*b"0123456789abcdef", 1_700_000_000);
    h.add_config("qemu-server.conf", b"memory: 512\n".to_vec())
        .unwrap();
    h.add_device("drive-scsi0", 3 * CLUSTER_SIZE).unwrap();
    h.add_device("drive-scsi1", 100_000).unwrap();
    h
}

/// An extent: entries `(dev, cluster, mask)`, data blocks filled with a byte per entry.
struct Ext {
    uuid: [u8; 16],
    entries: Vec<(u8, u32, u16)>,
}

impl Ext {
    fn new(entries: &[(u8, u32, u16)]) -> Self {
        Ext {
            uuid: *b"0123456789abcdef",
            entries: entries.to_vec(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let raw: Vec<u64> = self
            .entries
            .iter()
            .map(|&(dev_id, cluster, mask)| {
                BlockInfo {
                    mask,
                    dev_id,
                    cluster,
                }
                .encode()
            })
            .collect();
        let mut out = vec![0u8; 512];
        encode_extent_header(&self.uuid, &raw, &mut out);
        for (i, &(_, _, mask)) in self.entries.iter().enumerate() {
            for _ in 0..mask.count_ones() {
                out.extend(std::iter::repeat_n(i as u8 + 1, 4096));
            }
        }
        out
    }
}

/// The valid archive's pieces: header, and two extents holding every cluster once.
fn good_parts() -> (Vec<u8>, Ext, Ext) {
    (
        header().encode().unwrap(),
        Ext::new(&[(1, 2, 0xffff), (2, 1, 0x00ff), (1, 0, 0)]),
        Ext::new(&[(2, 0, 0x8001), (1, 1, 0x0f0f)]),
    )
}

fn join(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn good() -> Vec<u8> {
    let (h, a, b) = good_parts();
    join(&[h, a.bytes(), b.bytes()])
}

/// Recomputes the main header's md5 in place.
fn fix_header_md5(b: &mut [u8]) {
    let size = u32::from_be_bytes(b[56..60].try_into().unwrap()) as usize;
    let size = size.min(b.len());
    b[32..48].fill(0);
    let sum = Md5::digest(&b[..size]);
    b[32..48].copy_from_slice(&sum);
}

/// Recomputes the md5 of the extent header at `at` in place.
fn fix_extent_md5(b: &mut [u8], at: usize) {
    b[at + 24..at + 40].fill(0);
    let sum = Md5::digest(&b[at..at + 512]);
    b[at + 24..at + 40].copy_from_slice(&sum);
}

/// The damaged archives: name, bytes, and words the error must hold.
#[allow(clippy::vec_init_then_push)] // one push per case reads best
fn cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let (h, a, b) = good_parts();
    let hs = h.len();
    let g = good();
    let mut v: Vec<(&'static str, Vec<u8>, &'static str)> = Vec::new();
    v.push(("empty", Vec::new(), "too short"));
    v.push(("truncated-fixed-header", g[..5000].to_vec(), "too short"));
    v.push((
        "truncated-blobs",
        g[..12288 + 100].to_vec(),
        "ends inside its header",
    ));
    v.push((
        "truncated-extent-header",
        g[..hs + 100].to_vec(),
        "ends inside an extent header",
    ));
    v.push((
        "truncated-extent-data",
        g[..hs + 512 + 5000].to_vec(),
        "ends inside the extent's data",
    ));
    v.push((
        "truncated-at-extent-boundary",
        join(&[h.clone(), a.bytes()]),
        "incomplete",
    ));
    let mut x = g.clone();
    x.truncate(g.len() - 1);
    v.push(("truncated-last-byte", x, "ends inside the extent's data"));
    let mut x = g.clone();
    x.extend_from_slice(&[0u8; 100]);
    v.push(("trailing-garbage", x, "ends inside an extent header"));

    let mut x = g.clone();
    x[0] = b'W';
    v.push(("bad-magic", x, "bad magic"));
    let mut x = g.clone();
    x[7] = 2;
    v.push(("version-2", x, "version 2"));
    let mut x = g.clone();
    x[2100] ^= 0x10;
    v.push((
        "flipped-bit-main-header",
        x,
        "md5 checksum mismatch in the main header",
    ));
    let mut x = g.clone();
    x[12300] ^= 1;
    v.push((
        "flipped-bit-blob",
        x,
        "md5 checksum mismatch in the main header",
    ));
    let mut x = g.clone();
    x[hs + 45] ^= 0x04;
    v.push((
        "flipped-bit-extent-entry",
        x,
        "md5 checksum mismatch in extent header",
    ));
    let mut x = g.clone();
    x[hs + 1] ^= 0x01;
    v.push(("flipped-bit-extent-magic", x, "bad extent magic"));
    let b_at = hs + a.bytes().len();
    let mut x = g.clone();
    x[b_at + 7] ^= 0x01;
    v.push(("flipped-bit-second-extent-count", x, "extent 1: md5"));

    let mut w = Ext::new(&b.entries);
    w.uuid[3] ^= 0xff;
    v.push((
        "wrong-uuid",
        join(&[h.clone(), a.bytes(), w.bytes()]),
        "uuid differs",
    ));
    let mut x = g.clone();
    x[b_at + 4] = 1;
    fix_extent_md5(&mut x, b_at);
    v.push(("reserved-nonzero", x, "reserved field"));
    let mut x = g.clone();
    x[b_at + 40 + 2] = 0x80;
    fix_extent_md5(&mut x, b_at);
    v.push(("reserved-bits-nonzero", x, "reserved bits"));
    let mut x = g.clone();
    x[b_at + 7] ^= 0x01;
    fix_extent_md5(&mut x, b_at);
    v.push(("block-count-mismatch", x, "blocks follow"));
    let mut x = g.clone();
    x[b_at + 40 + 8 * 30 + 7] = 1;
    fix_extent_md5(&mut x, b_at);
    v.push(("unused-entry-nonzero", x, "not all zero"));

    // The second extent replaced by one with these entries.
    let second =
        |entries: &[(u8, u32, u16)]| join(&[h.clone(), a.bytes(), Ext::new(entries).bytes()]);
    for (label, entries, what) in [
        (
            "duplicate-cluster",
            &[(2, 0, 0x8001), (1, 1, 0x0f0f), (1, 0, 0)][..],
            "second time",
        ),
        (
            "duplicate-in-one-extent",
            &[(2, 0, 0x8001), (1, 1, 0x0f0f), (1, 1, 0)][..],
            "second time",
        ),
        (
            "missing-cluster",
            &[(2, 0, 0x8001)][..],
            "lacks 1 of its 3 clusters",
        ),
        (
            "cluster-past-device-end",
            &[(2, 0, 0x8001), (1, 1, 0x0f0f), (1, 3, 0)][..],
            "past the end of device 1",
        ),
        (
            "cluster-number-absurd",
            &[(2, 0, 0x8001), (1, 1, 0x0f0f), (1, u32::MAX, 0)][..],
            "past the end",
        ),
        (
            "unknown-device",
            &[(2, 0, 0x8001), (1, 1, 0x0f0f), (3, 0, 0)][..],
            "unknown device id 3",
        ),
    ] {
        v.push((label, second(entries), what));
    }
    let block = Ext::new(&[(2, 0, 0x8001), (1, 1, 0x0f0f)]);
    let a_bad = Ext::new(&[(1, 2, 0xffff), (2, 1, 0x03ff), (1, 0, 0)]);
    v.push((
        "data-block-past-device-end",
        join(&[h.clone(), a_bad.bytes(), block.bytes()]),
        "data block 9",
    ));
    let mut x = g.clone();
    x[56..60].copy_from_slice(&0xffff_fe00u32.to_be_bytes());
    v.push(("absurd-header-size", x, "header_size"));
    let mut x = g.clone();
    x[56..60].copy_from_slice(&12288u32.to_be_bytes());
    v.push(("header-size-too-small", x, "header_size"));
    let mut x = g.clone();
    x[4096 + 32 + 8..4096 + 32 + 16].copy_from_slice(&(1u64 << 60).to_be_bytes());
    fix_header_md5(&mut x);
    v.push(("absurd-device-size", x, "claims"));
    let mut x = g.clone();
    x[52..56].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    fix_header_md5(&mut x);
    v.push(("absurd-blob-size", x, "blob buffer"));
    let mut x = g.clone();
    x[4096 + 32..4096 + 36].copy_from_slice(&400u32.to_be_bytes());
    fix_header_md5(&mut x);
    v.push(("name-pointer-outside-blobs", x, "blob pointer 400"));
    let mut x = g.clone();
    x[4096 + 32 * 255..4096 + 32 * 255 + 4].copy_from_slice(&1u32.to_be_bytes());
    x[4096 + 32 * 255 + 15] = 1;
    fix_header_md5(&mut x);
    v.push(("device-slot-255", x, "device slot 255"));

    // Well-formed archives whose names must not become file names.
    for (label, name) in [
        ("config-name-traversal", "../evil.conf"),
        ("config-name-dot", ".."),
    ] {
        let mut hh = ArchiveHeader::new(*b"0123456789abcdef", 0);
        hh.add_config(name, b"x".to_vec()).unwrap();
        hh.add_device("drive-scsi0", 3 * CLUSTER_SIZE).unwrap();
        hh.add_device("drive-scsi1", 100_000).unwrap();
        v.push((
            label,
            join(&[hh.encode().unwrap(), a.bytes(), b.bytes()]),
            "cannot be restored as a file name",
        ));
    }
    let mut hh = ArchiveHeader::new(*b"0123456789abcdef", 0);
    hh.add_device("a/../../b", 3 * CLUSTER_SIZE).unwrap();
    hh.add_device("drive-scsi1", 100_000).unwrap();
    v.push((
        "device-name-slash",
        join(&[hh.encode().unwrap(), a.bytes(), b.bytes()]),
        "cannot be restored as a file name",
    ));
    v
}

fn vimg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vimg"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_valid_archive_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("good.vma");
    std::fs::write(&p, good()).unwrap();
    let o = vimg(&["backup", "verify", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out");
    let o = vimg(&[
        "backup",
        "extract",
        p.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d1 = std::fs::read(out.join("disk-drive-scsi0.raw")).unwrap();
    // Cluster 2 of device 1 is entry 0 of the first extent: all blocks of byte 1.
    assert!(d1[2 * 65536..].iter().all(|&b| b == 1));
    assert!(d1[..65536].iter().all(|&b| b == 0));
    // Cluster 1 (mask 0x0f0f, entry 1 of the second extent): blocks 0-3 and 8-11.
    let c1 = &d1[65536..2 * 65536];
    assert!(
        c1[..4 * 4096].iter().all(|&b| b == 2) && c1[4 * 4096..8 * 4096].iter().all(|&b| b == 0)
    );
    let d2 = std::fs::read(out.join("disk-drive-scsi1.raw")).unwrap();
    assert_eq!(d2.len(), 100_000);
    // Device 2's cluster 1 holds blocks 0-7 (mask 0x00ff) and then zeros to the end.
    assert!(d2[65536..65536 + 8 * 4096].iter().all(|&b| b == 2));
    assert!(d2[65536 + 8 * 4096..].iter().all(|&b| b == 0));
    // A reader that accepts all 59 entries of an extent (Proxmox writes 58).
    let mut h = ArchiveHeader::new(*b"0123456789abcdef", 0);
    h.add_device("d", 59 * CLUSTER_SIZE).unwrap();
    let entries: Vec<(u8, u32, u16)> = (0..59).map(|c| (1, c, (c % 3) as u16)).collect();
    let p59 = dir.path().join("59.vma");
    std::fs::write(
        &p59,
        join(&[h.encode().unwrap(), Ext::new(&entries).bytes()]),
    )
    .unwrap();
    let o = vimg(&["backup", "verify", p59.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn damaged_archives_fail_with_one_clear_line_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, bytes, what) in cases() {
        let p = dir.path().join(format!("{name}.vma"));
        std::fs::write(&p, &bytes).unwrap();
        let out = dir.path().join(format!("{name}.out"));
        let path_cases = what.contains("file name");
        let mut runs = vec![(
            "extract",
            vimg(&[
                "backup",
                "extract",
                p.to_str().unwrap(),
                out.to_str().unwrap(),
            ]),
        )];
        if !path_cases {
            runs.push(("verify", vimg(&["backup", "verify", p.to_str().unwrap()])));
        }
        for (cmd, o) in runs {
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            let line_ok = err.lines().count() == 1
                && err.starts_with(&format!("vimg: {}: ", p.display()))
                && err.contains(what);
            // Errors found in the data stream say where.
            let where_ok = !(cmd == "verify" && bytes.len() > 13000) || err.contains("offset 0x");
            if o.status.code() != Some(1) || !line_ok || !where_ok {
                failures.push(format!("{name} ({cmd}): exit {:?}: {err}", o.status.code()));
            }
        }
        if out.exists() {
            failures.push(format!("{name}: extract left {}", out.display()));
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".vma"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A damaged archive on standard input is refused the same way.
#[test]
fn damage_on_standard_input_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let g = good();
    let out = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vimg"))
        .args(["backup", "extract", "-", out.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(&g[..g.len() - 3000]);
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("vimg: <stdin>: ") && err.contains("ends inside"),
        "{err}"
    );
    assert!(!out.exists());
}

/// A source image that fails to read in the middle of a backup leaves no archive.
#[test]
fn a_failed_backup_leaves_no_archive() {
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("test-images/bad-l2-entry-past-eof.qcow2.gz");
    let mut img = Vec::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(std::fs::File::open(fixture).unwrap())
        .read_to_end(&mut img)
        .unwrap();
    let src = dir.path().join("bad.qcow2");
    std::fs::write(&src, img).unwrap();
    let archive = dir.path().join("a.vma");
    let o = vimg(&[
        "backup",
        "create",
        "-d",
        &format!("d={}", src.display()),
        archive.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.qcow2") && err.lines().count() == 1,
        "{err}"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["bad.qcow2".to_string()]);
}

/// Recomputes every digest of `b` as far as its structure can be followed, so that mutations
/// reach the checks behind the digests.
fn fix_all_md5(b: &mut [u8]) {
    if b.len() < 12288 {
        return;
    }
    fix_header_md5(b);
    let mut at = u32::from_be_bytes(b[56..60].try_into().unwrap()) as usize;
    while at + 512 <= b.len() {
        fix_extent_md5(b, at);
        let count = u16::from_be_bytes([b[at + 6], b[at + 7]]) as usize;
        at += 512 + count * 4096;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Bytes flipped anywhere, with or without digests fixed, then cut anywhere: the reader
    /// returns an answer, never panics.
    #[test]
    fn mutated_archives_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        fix in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        cut_it in any::<bool>(),
    ) {
        let mut b = good();
        // Bias half of the flips into the structures (headers and extent headers).
        for (i, (idx, v)) in flips.iter().enumerate() {
            let pos = if i % 2 == 0 {
                let hotspots = [0usize, 48, 2044, 4096 + 32, 12288, 12800, 12800 + 40];
                (hotspots[idx.index(hotspots.len())] + (*v as usize % 64)).min(b.len() - 1)
            } else {
                idx.index(b.len())
            };
            b[pos] ^= v | 1;
        }
        if fix {
            fix_all_md5(&mut b);
        }
        if cut_it {
            let n = cut.index(b.len() + 1);
            b.truncate(n);
        }
        vimg::vma::exercise(&b);
    }
}
