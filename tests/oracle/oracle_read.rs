//! vimg reads exactly what qemu reads: images of every qcow2 variant, written by qemu-io with
//! random layouts (data, zero writes, compressed writes, discards, backing layers), are read
//! whole through `BlockImage::read_at` and compared with `qemu-img convert -O raw`; and every
//! range block status calls zero must read as zero.

use crate::common;

use common::{qemu_available, qemu_contents, qemu_create, qemu_io, Rng};
use std::path::{Path, PathBuf};
use vimg::open::{open_image, OpenOptions};
use vimg::{BlockImage, GuestOffset};

/// Reads the whole virtual disk through vimg, in uneven chunks to exercise range splitting.
fn vimg_contents(img: &dyn BlockImage, rng: &mut Rng) -> Vec<u8> {
    let size = img.virtual_size();
    let mut out = vec![0u8; size as usize];
    let mut off = 0u64;
    while off < size {
        let n = (1 + rng.below(3 << 20)).min(size - off);
        img.read_at(&mut out[off as usize..(off + n) as usize], GuestOffset(off))
            .unwrap();
        off += n;
    }
    out
}

/// Checks that ranges block status reports as zero read as zero, and that statuses tile the disk.
fn status_consistent(img: &dyn BlockImage, data: &[u8]) -> Result<(), String> {
    let size = img.virtual_size();
    let mut off = 0;
    while off < size {
        let s = img
            .block_status(GuestOffset(off), size - off)
            .map_err(|e| e.to_string())?;
        if s.len == 0 || s.len > size - off {
            return Err(format!("block status at {off} has bad length {}", s.len));
        }
        if s.zero
            && data[off as usize..(off + s.len) as usize]
                .iter()
                .any(|&b| b != 0)
        {
            return Err(format!(
                "block status says zero at {off}+{} but data is not",
                s.len
            ));
        }
        off += s.len;
    }
    Ok(())
}

/// Random qemu-io commands for an image of `size` bytes with `cluster` byte clusters.
fn random_ops(
    rng: &mut Rng,
    size: u64,
    cluster: u64,
    compress: bool,
    zero_writes: bool,
) -> Vec<String> {
    let mut cmds = Vec::new();
    // qemu writes compressed clusters only where nothing is allocated yet: do them first, each
    // on its own cluster.
    if compress {
        let mut used = std::collections::HashSet::new();
        for _ in 0..rng.below(6) {
            let c = rng.below(size / cluster) * cluster;
            if used.insert(c) {
                cmds.push(format!("write -c -P {} {c} {cluster}", 1 + rng.below(250)));
            }
        }
    }
    for _ in 0..(4 + rng.below(12)) {
        let kind = rng.below(10);
        let off = rng.below(size / 512) * 512;
        let len = ((1 + rng.below(64)) * 512 * (1 + rng.below(4) * rng.below(64))).min(size - off);
        match kind {
            2 | 3 if zero_writes => cmds.push(format!("write -z {off} {len}")),
            4 => cmds.push(format!("discard {off} {len}")),
            _ => cmds.push(format!("write -P {} {off} {len}", 1 + rng.below(250))),
        }
    }
    cmds
}

struct Variant {
    name: &'static str,
    opts: &'static str,
    cluster: u64,
    v3: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "v3-64k",
        opts: "",
        cluster: 65536,
        v3: true,
    },
    Variant {
        name: "v2-64k",
        opts: "compat=0.10",
        cluster: 65536,
        v3: false,
    },
    Variant {
        name: "v3-512",
        opts: "cluster_size=512",
        cluster: 512,
        v3: true,
    },
    Variant {
        name: "v3-4k-rc1",
        opts: "cluster_size=4096,refcount_bits=1",
        cluster: 4096,
        v3: true,
    },
    Variant {
        name: "v3-2M",
        opts: "cluster_size=2M",
        cluster: 2 << 20,
        v3: true,
    },
    Variant {
        name: "zstd",
        opts: "compression_type=zstd",
        cluster: 65536,
        v3: true,
    },
    Variant {
        name: "zstd-4k",
        opts: "compression_type=zstd,cluster_size=4096",
        cluster: 4096,
        v3: true,
    },
    Variant {
        name: "extl2-64k",
        opts: "extended_l2=on",
        cluster: 65536,
        v3: true,
    },
    Variant {
        name: "extl2-2M",
        opts: "extended_l2=on,cluster_size=2M",
        cluster: 2 << 20,
        v3: true,
    },
    Variant {
        name: "rc64",
        opts: "refcount_bits=64",
        cluster: 65536,
        v3: true,
    },
    Variant {
        name: "prealloc-meta",
        opts: "preallocation=metadata",
        cluster: 65536,
        v3: true,
    },
    Variant {
        name: "prealloc-falloc",
        opts: "preallocation=falloc,cluster_size=4096",
        cluster: 4096,
        v3: true,
    },
    Variant {
        name: "lazy",
        opts: "lazy_refcounts=on",
        cluster: 65536,
        v3: true,
    },
];

#[test]
fn reads_match_qemu_for_every_variant_and_random_layout() {
    if !qemu_available("reads_match_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (vi, v) in VARIANTS.iter().enumerate() {
        for seed in 0..3u64 {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (((vi as u64) << 8 | seed) + 1));
            let size = v.cluster.max(65536) * (8 + rng.below(40)) + 512 * rng.below(3);
            let p = dir.path().join(format!("{}-{seed}.qcow2", v.name));
            qemu_create(&p, "qcow2", v.opts, None, size);
            let compress = !v.opts.contains("prealloc");
            let ops = random_ops(&mut rng, size, v.cluster, compress, v.v3);
            qemu_io(&p, "qcow2", &ops);
            if let Err(e) = compare(&p, dir.path(), &mut rng) {
                failures.push(format!("{} seed {seed}: {e}\n  ops: {ops:?}", v.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn compare(p: &Path, dir: &Path, rng: &mut Rng) -> Result<(), String> {
    let want = qemu_contents(p, dir);
    let img = open_image(p, &OpenOptions::default()).map_err(|e| format!("open: {e}"))?;
    if img.virtual_size() != want.len() as u64 {
        return Err(format!(
            "size {} vs qemu {}",
            img.virtual_size(),
            want.len()
        ));
    }
    let got = vimg_contents(img.as_ref(), rng);
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        return Err(format!(
            "first difference at guest offset {i}: vimg {:#x} qemu {:#x}",
            got[i], want[i]
        ));
    }
    status_consistent(img.as_ref(), &want)
}

/// Backing chains: raw at the bottom, qcow2 layers of different sizes and cluster sizes above,
/// each written at random; relative backing names.
#[test]
fn chains_read_like_qemu() {
    if !qemu_available("chains_read_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for seed in 0..6u64 {
        let mut rng = Rng(0xdead_beef ^ ((seed + 1) * 7919));
        let base = dir.path().join(format!("base{seed}.raw"));
        let base_size = 65536 * (4 + rng.below(20));
        qemu_create(&base, "raw", "", None, base_size);
        qemu_io(
            &base,
            "raw",
            &random_ops(&mut rng, base_size, 65536, false, false),
        );
        let mut below: (PathBuf, &str) = (base, "raw");
        let layers = 1 + rng.below(3);
        let opts = [
            "",
            "cluster_size=4096",
            "extended_l2=on",
            "compat=0.10",
            "cluster_size=512",
        ];
        for l in 0..layers {
            let o = opts[rng.below(opts.len() as u64) as usize];
            let cluster = if o.contains("4096") {
                4096
            } else if o.contains("512") {
                512
            } else {
                65536
            };
            let size = 65536 * (2 + rng.below(30));
            let p = dir.path().join(format!("layer{seed}-{l}.qcow2"));
            // Relative backing name: resolved against the overlay's directory.
            let rel = PathBuf::from(below.0.file_name().unwrap());
            let cwd_guard = std::env::current_dir().unwrap();
            std::env::set_current_dir(dir.path()).unwrap();
            qemu_create(&p, "qcow2", o, Some((&rel, below.1)), size);
            std::env::set_current_dir(cwd_guard).unwrap();
            qemu_io(
                &p,
                "qcow2",
                &random_ops(&mut rng, size, cluster, true, !o.contains("compat")),
            );
            below = (p, "qcow2");
        }
        if let Err(e) = compare(&below.0, dir.path(), &mut rng) {
            failures.push(format!("chain seed {seed}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// External data files, with and without data_file_raw.
#[test]
fn external_data_files_read_like_qemu() {
    if !qemu_available("external_data_files") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, raw) in [false, true].iter().enumerate() {
        let mut rng = Rng(77 + i as u64);
        let p = dir.path().join(format!("df{i}.qcow2"));
        let d = dir.path().join(format!("df{i}.data"));
        let opts = format!(
            "data_file={},data_file_raw={}",
            d.display(),
            if *raw { "on" } else { "off" }
        );
        let size = 4 << 20;
        common::run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                p.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        qemu_io(&p, "qcow2", &random_ops(&mut rng, size, 65536, false, true));
        if let Err(e) = compare(&p, dir.path(), &mut rng) {
            failures.push(format!("data_file_raw={raw}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
