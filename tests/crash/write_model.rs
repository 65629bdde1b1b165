//! The qcow2 write path against a plain in-memory model: random sequences of writes, zero
//! writes (with and without unmapping), compressed writes, discards and flushes through
//! `BlockImage`, on images of random options made by qemu-img (cluster sizes, v2/v3, refcount
//! widths, extended L2, compression type, lazy refcounts, backing files, an internal snapshot
//! taken after qemu wrote data, so that clusters are shared and must be copied). Afterwards
//! vimg reads back exactly the model, the close leaves no dirty bit, `qemu-img check` finds the
//! image clean, qemu reads the same bytes, and the snapshot still holds what it held.
//!
//! The model of a discard is qemu's: the whole clusters inside the range (and the partial last
//! cluster of the disk, when the range reaches the end) read as zeros afterwards; partial
//! clusters keep their contents; a version 2 image with a backing file is not changed.

use crate::common;
use crate::common::header_fields;

use common::{qemu_available, qemu_contents, qemu_create, qemu_io, run};
use proptest::prelude::*;
use std::path::Path;
use std::process::Command;
use vimg::open::ChainGuard;
use vimg::qcow2::compress_cluster;
use vimg::qcow2::Qcow2Image;
use vimg::{BlockImage, GuestOffset};

const OPTIONS: &[&str] = &[
    "",
    "compat=0.10",
    "cluster_size=512",
    "cluster_size=4096,refcount_bits=1",
    "cluster_size=4096,refcount_bits=64",
    "cluster_size=2M",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "compression_type=zstd,cluster_size=8192",
    "refcount_bits=2,cluster_size=1024",
    "lazy_refcounts=on",
    "lazy_refcounts=on,cluster_size=4096,refcount_bits=4",
    "lazy_refcounts=on,extended_l2=on,cluster_size=16k",
];

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        byte: u8,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    /// A whole cluster stored compressed (the cluster holding `off`).
    Compressed {
        off: u64,
        seed: u8,
    },
    /// A guest discard.
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    // Offsets and lengths mostly sector-aligned (as guests write), sometimes not.
    let pos = (0..size, any::<bool>()).prop_map(move |(o, align)| if align { o & !511 } else { o });
    let len = (1u64..300_000, any::<bool>())
        .prop_map(|(l, align)| if align { (l + 511) & !511 } else { l });
    // Discards reach further (up to past the end of the disk, clamped), to free whole clusters
    // of the large sizes too.
    let len_d = move || {
        (1u64..(4 << 20), any::<bool>())
            .prop_map(|(l, align)| if align { (l + 511) & !511 } else { l })
    };
    prop_oneof![
        5 => (pos.clone(), len.clone(), 1u8..255).prop_map(|(off, len, byte)| Op::Write { off, len, byte }),
        2 => (pos.clone(), len, any::<bool>()).prop_map(|(off, len, unmap)| Op::Zero { off, len, unmap }),
        2 => (pos.clone(), any::<u8>()).prop_map(|(off, seed)| Op::Compressed { off, seed }),
        2 => (pos, len_d()).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    options: usize,
    backing: bool,
    snapshot: bool,
    compress_first: bool,
    size: u64,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..OPTIONS.len(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        1u64..48,
    )
        .prop_flat_map(|(options, backing, snapshot, compress_first, mib4)| {
            let size = mib4 * 65536 + if mib4 % 3 == 0 { 512 } else { 0 };
            prop::collection::vec(op(size), 1..24).prop_map(move |ops| Case {
                options,
                backing,
                snapshot,
                compress_first,
                size,
                ops,
            })
        })
}

fn clamp(off: u64, len: u64, size: u64) -> (u64, u64) {
    let off = off.min(size - 1);
    (off, len.min(size - off))
}

fn run_case(c: &Case, dir: &Path) -> Result<(), String> {
    let img = dir.join("t.qcow2");
    let opts = OPTIONS[c.options];
    let mut model = vec![0u8; c.size as usize];
    if c.backing {
        let base = dir.join("base.raw");
        let bsize = (c.size / 2 + 4096) & !511;
        qemu_create(&base, "raw", "", None, bsize);
        qemu_io(
            &base,
            "raw",
            &[
                format!("write -P 0x77 0 {}", bsize / 2),
                format!("write -P 0x99 {} 4096", bsize - 4096),
            ],
        );
        qemu_create(&img, "qcow2", opts, Some((&base, "raw")), c.size);
        model[..bsize as usize].copy_from_slice(&std::fs::read(&base).unwrap());
    } else {
        qemu_create(&img, "qcow2", opts, None, c.size);
    }
    // Data written by qemu first: a compressed cluster, plain data, zeros.
    let cluster = if opts.contains("512") && !opts.contains("2M") {
        512
    } else {
        65536
    };
    let mut pre = vec![format!("write -P 0x31 0 {}", (c.size / 4) & !511)];
    // One-bit refcounts cannot count the sharing snapshots and compressed clusters need.
    let rc1 = opts.contains("refcount_bits=1");
    if c.compress_first && !rc1 && !opts.contains("cluster_size=512") {
        let cs = if opts.contains("2M") {
            2 << 20
        } else if opts.contains("4096") {
            4096
        } else if opts.contains("8192") {
            8192
        } else if opts.contains("1024") {
            1024
        } else if opts.contains("16k") {
            16384
        } else {
            cluster
        };
        if c.size >= 2 * cs {
            pre.insert(0, format!("write -c -P 0x41 {cs} {cs}"));
            model[cs as usize..2 * cs as usize].fill(0x41);
        }
    }
    qemu_io(&img, "qcow2", &pre);
    model[..((c.size / 4) & !511) as usize].fill(0x31);
    let snap_model = model.clone();
    let snapshot = c.snapshot && !rc1;
    if snapshot {
        run("qemu-img", &["snapshot", "-c", "s1", img.to_str().unwrap()]);
    }

    {
        let image = Qcow2Image::open(&img, true, false, &mut ChainGuard::default())
            .map_err(|e| format!("open: {e}"))?;
        let cs = image.header().cluster_size();
        let kind = image.header().compression_type;
        for o in &c.ops {
            match *o {
                Op::Write { off, len, byte } => {
                    let (off, len) = clamp(off, len, c.size);
                    image
                        .write_at(&vec![byte; len as usize], GuestOffset(off))
                        .map_err(|e| format!("{o:?}: {e}"))?;
                    model[off as usize..(off + len) as usize].fill(byte);
                }
                Op::Zero { off, len, unmap } => {
                    let (off, len) = clamp(off, len, c.size);
                    image
                        .write_zeroes(GuestOffset(off), len, unmap)
                        .map_err(|e| format!("{o:?}: {e}"))?;
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Compressed { off, seed } => {
                    let gc = off.min(c.size - 1) / cs * cs;
                    // Compressible but not trivial: a ramp with the seed mixed in.
                    let data: Vec<u8> = (0..cs)
                        .map(|i| (i / 16) as u8 ^ seed ^ (i % 3) as u8)
                        .collect();
                    match compress_cluster(kind, &data).map_err(|e| e.to_string())? {
                        Some(z) => image
                            .write_compressed(gc, &z)
                            .map_err(|e| format!("{o:?}: {e}"))?,
                        None => image
                            .write_at(&data, GuestOffset(gc))
                            .map_err(|e| format!("{o:?}: {e}"))?,
                    }
                    let n = cs.min(c.size - gc) as usize;
                    model[gc as usize..gc as usize + n].copy_from_slice(&data[..n]);
                }
                Op::Discard { off, len } => {
                    let (off, len) = clamp(off, len, c.size);
                    image
                        .discard(GuestOffset(off), len)
                        .map_err(|e| format!("{o:?}: {e}"))?;
                    // qemu: whole clusters only (the partial last one of the disk counts when
                    // the range reaches the end); nothing at all on v2 with a backing file.
                    let v2 = opts.contains("compat=0.10");
                    let first = off.div_ceil(cs);
                    let end = if off + len == c.size {
                        (off + len).div_ceil(cs)
                    } else {
                        (off + len) / cs
                    };
                    if !(v2 && c.backing) && first < end {
                        let a = (first * cs) as usize;
                        let b = ((end * cs).min(c.size)) as usize;
                        model[a..b].fill(0);
                    }
                }
                Op::Flush => image.flush().map_err(|e| format!("flush: {e}"))?,
            }
        }
        let mut got = vec![0u8; c.size as usize];
        image
            .read_at(&mut got, GuestOffset(0))
            .map_err(|e| format!("read back: {e}"))?;
        if let Some(i) = got.iter().zip(&model).position(|(a, b)| a != b) {
            return Err(format!(
                "vimg reads {:#x} at {i}, model says {:#x}",
                got[i], model[i]
            ));
        }
        image.close().map_err(|e| format!("close: {e}"))?;
    }
    let header = std::fs::read(&img).unwrap();
    let incompat = common::header_u64(&header, header_fields::INCOMPATIBLE_FEATURES);
    if common::header_u32(&header, header_fields::VERSION) == 3 && incompat & 1 != 0 {
        return Err("the dirty bit is still set after close".into());
    }
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let theirs = qemu_contents(&img, dir);
    if let Some(i) = theirs.iter().zip(&model).position(|(a, b)| a != b) {
        return Err(format!(
            "qemu reads {:#x} at {i}, model says {:#x}",
            theirs[i], model[i]
        ));
    }
    if snapshot {
        let snap = dir.join("snap.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-l",
                "s1",
                "-O",
                "raw",
                img.to_str().unwrap(),
                snap.to_str().unwrap(),
            ],
        );
        let s = std::fs::read(&snap).unwrap();
        if s != snap_model {
            return Err("the snapshot's contents changed".into());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn writes_match_the_model_and_qemu_accepts_the_image(c in case()) {
        if !qemu_available("write_model") {
            return Ok(());
        }
        let dir = scratch_dir();
        let r = run_case(&c, dir.path());
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// Regression: a compressed cluster copied away, its host cluster freed at a flush and reused
/// for another compressed cluster; reading the new one returned the old one's contents from the
/// decompressed-cluster cache.
#[test]
fn compressed_cluster_reusing_a_freed_host_offset_reads_back() {
    if !qemu_available("write_model") {
        return;
    }
    let dir = scratch_dir();
    let c = Case {
        options: 5,
        backing: true,
        snapshot: true,
        compress_first: false,
        size: 3080192,
        ops: vec![
            Op::Compressed { off: 0, seed: 0 },
            Op::Write {
                off: 0,
                len: 1,
                byte: 1,
            },
            Op::Flush,
            Op::Compressed {
                off: 2450432,
                seed: 110,
            },
        ],
    };
    run_case(&c, dir.path()).unwrap();
}

/// The `qemu-img map --output=json` of `path`, and the allocated-cluster count of its check
/// (which must pass).
fn map_and_allocated(path: &Path) -> (String, u64) {
    let p = path.to_str().unwrap();
    let map = run("qemu-img", &["map", "--output=json", p]);
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", p])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "qemu-img check {p}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    (map, v["allocated-clusters"].as_u64().unwrap())
}

/// qemu-io's `discard` and vimg's discard, given the same requests on copies of one image,
/// leave the same mapping (`qemu-img map --output=json`, byte for byte) and the same number of
/// allocated clusters: the same clusters freed, the same L2 entries rewritten, the same L2
/// tables made private, on v2 and v3 images, with and without backing files, extended L2,
/// compressed clusters, preallocated zero clusters, a snapshot sharing clusters and external
/// data files (whose contents must match too: both pass the discard down to them).
#[test]
fn discard_matches_qemu_io() {
    if !qemu_available("write_model") {
        return;
    }
    let mut rng = common::Rng::seeded(7);
    for (opts, backing, snapshot) in [
        ("", false, false),
        ("", true, false),
        ("compat=0.10", false, false),
        ("compat=0.10", true, false),
        ("extended_l2=on", false, false),
        ("extended_l2=on", true, true),
        ("cluster_size=4096", false, true),
        ("cluster_size=512,lazy_refcounts=on", true, false),
        ("data_file", false, false),
        ("data_file,data_file_raw=on,extended_l2=on", false, false),
    ] {
        let dir = scratch_dir();
        let size: u64 = (6 << 20) + 4096; // the last cluster is partial
        let base = dir.path().join("base.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let ours = dir.path().join("ours.qcow2");
        let what = format!("{opts} backing={backing} snapshot={snapshot}");
        if backing {
            qemu_create(&base, "qcow2", "", None, size);
            qemu_io(&base, "qcow2", &["write -P 0x22 0 6M".into()]);
        }
        // Both images are made by the same qemu commands (qemu allocates deterministically),
        // each with its own external data file where there is one.
        let make = |path: &Path| {
            let data_file = opts.starts_with("data_file");
            let opts = if data_file {
                opts.replacen(
                    "data_file",
                    &format!("data_file={}", path.with_extension("data").display()),
                    1,
                )
            } else {
                opts.to_string()
            };
            let b = backing.then_some((base.as_path(), "qcow2"));
            qemu_create(path, "qcow2", &opts, b, size);
            let mut pre = vec![
                "write -P 0x11 0 2M".to_string(),
                format!("write -P 0x12 {} 4096", size - 4096),
                "write -z 256k 128k".into(),
                "write -P 0x13 4M 1M".into(),
            ];
            if !opts.contains("512") && !data_file {
                pre.push("write -c -P 0x14 3M 64k".into());
            }
            qemu_io(path, "qcow2", &pre);
            if snapshot {
                run("qemu-img", &["snapshot", "-c", "s", path.to_str().unwrap()]);
                qemu_io(path, "qcow2", &["write -P 0x15 1M 64k".into()]);
            }
        };
        make(&theirs);
        make(&ours);
        let mut reqs: Vec<(u64, u64)> = vec![(size - 4096, 4096), (5 << 20, size - (5 << 20))];
        for _ in 0..12 {
            let off = rng.below(size);
            let off = if rng.below(2) == 0 { off & !511 } else { off };
            let len = (rng.below(1 << 20) + 1).min(size - off);
            let len = if rng.below(2) == 0 {
                (len + 511) & !511
            } else {
                len
            }
            .min(size - off);
            reqs.push((off, len));
        }
        let cmds: Vec<String> = reqs
            .iter()
            .map(|(o, l)| format!("discard {o} {l}"))
            .collect();
        qemu_io(&theirs, "qcow2", &cmds);
        let img = Qcow2Image::open(&ours, true, false, &mut ChainGuard::default()).unwrap();
        for &(o, l) in &reqs {
            img.discard(GuestOffset(o), l)
                .unwrap_or_else(|e| panic!("{what}: discard {o} {l}: {e}"));
        }
        img.close().unwrap();
        let (map_t, alloc_t) = map_and_allocated(&theirs);
        let (map_o, alloc_o) = map_and_allocated(&ours);
        assert_eq!(map_o, map_t, "{what}: maps differ after {reqs:?}");
        assert_eq!(alloc_o, alloc_t, "{what}: allocated clusters differ");
        run(
            "qemu-img",
            &["compare", theirs.to_str().unwrap(), ours.to_str().unwrap()],
        );
        if opts.starts_with("data_file") {
            // qemu passes the discard down to the data file; so does vimg.
            let t = std::fs::read(theirs.with_extension("data")).unwrap();
            let o = std::fs::read(ours.with_extension("data")).unwrap();
            assert!(t == o, "{what}: the data files differ");
        }
    }
}

/// A scratch directory, on tmpfs where there is one: syncs cost nothing there, and the model
/// does not need the disk.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}
