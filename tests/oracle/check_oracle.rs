//! `vimg`'s qcow2 consistency check against `qemu-img check --output=json` (qemu is the oracle).
//!
//! Clean images of many variants are made with qemu-img and qemu-io (random writes, zero
//! writes, discards and compressed writes from a seeded generator, so a failure reproduces),
//! damaged images by poking bytes into copies of them; for each, every count `qemu-img check`
//! reports and its exit code must equal vimg's. All mismatches are collected and reported
//! together at the end.
//!
//! Set `VIMG_CHECK_SEED` to run with another seed; `VIMG_REQUIRE_QEMU=1` turns a missing qemu
//! into a failure instead of a skip.

use std::collections::HashSet;
use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use vimg::check::CheckReport;
use vimg::open::{open_image, OpenOptions};

use crate::common;

use common::{qemu_available, run, Rng};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_img(args: &[&str]) {
    run("qemu-img", args);
}

fn qemu_io(path: &Path, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(path));
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io on {}: {out}",
        path.display()
    );
}

/// What `qemu-img check --output=json` said, and its exit code.
#[derive(Debug)]
struct QemuCheck {
    code: i32,
    json: serde_json::Value,
    stderr: String,
}

fn qemu_check(path: &Path) -> QemuCheck {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(path)])
        .output()
        .expect("run qemu-img check");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    QemuCheck {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn vimg_check(path: &Path) -> Result<CheckReport, String> {
    let img = open_image(path, &OpenOptions::default()).map_err(|e| format!("open: {e}"))?;
    let check = img.as_check().ok_or("qcow2 image has no check")?;
    check.check().map_err(|e| format!("check: {e}"))
}

/// The problem counts and exit code of a qemu-img check.
fn summary(q: &QemuCheck) -> (i32, u64, u64, u64) {
    let f = |k: &str| q.json.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (q.code, f("corruptions"), f("leaks"), f("check-errors"))
}

/// Compares vimg's report for `path` with qemu-img's; returns the differences (empty if none).
fn compare(label: &str, path: &Path) -> Vec<String> {
    let q = qemu_check(path);
    if q.json.is_null() {
        return vec![format!(
            "{label}: qemu-img check gave no JSON (exit {}): {}",
            q.code,
            q.stderr.trim()
        )];
    }
    let v = match vimg_check(path) {
        Ok(r) => r,
        Err(e) => return vec![format!("{label}: vimg failed: {e} (qemu exit {})", q.code)],
    };
    let qv = |k: &str| q.json.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let fields: [(&str, u64); 8] = [
        ("corruptions", v.corruptions),
        ("leaks", v.leaks),
        ("check-errors", v.check_errors),
        ("total-clusters", v.total_clusters),
        ("allocated-clusters", v.allocated_clusters),
        ("fragmented-clusters", v.fragmented_clusters),
        ("compressed-clusters", v.compressed_clusters),
        ("image-end-offset", v.image_end_offset.unwrap_or(0)),
    ];
    let mut diffs: Vec<String> = fields
        .iter()
        .filter(|(k, mine)| qv(k) != *mine)
        .map(|(k, mine)| format!("{k}: qemu {} vimg {mine}", qv(k)))
        .collect();
    if q.code != v.exit_code() {
        diffs.push(format!("exit code: qemu {} vimg {}", q.code, v.exit_code()));
    }
    if diffs.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{label}: {}\n    qemu said: {}\n    vimg said: {}",
        diffs.join(", "),
        q.stderr.trim().replace('\n', " | "),
        v.messages.join(" | ")
    )]
}

/// How a clean variant is made.
#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    opts: &'static str,
    size: u64,
    cluster: u64,
    /// Compressed writes allowed.
    compress: bool,
    /// Internal snapshots taken between rounds of writes.
    snapshots: usize,
    bitmaps: bool,
    /// External data file (its path is appended to the options).
    data_file: bool,
    backing: bool,
}

const fn v(name: &'static str, opts: &'static str, size: u64, cluster: u64) -> Variant {
    Variant {
        name,
        opts,
        size,
        cluster,
        compress: true,
        snapshots: 0,
        bitmaps: false,
        data_file: false,
        backing: false,
    }
}

const MIB: u64 = 1 << 20;

fn variants() -> Vec<Variant> {
    vec![
        v("default-64k", "", 16 * MIB, 65536),
        v("cluster-512", "cluster_size=512", 2 * MIB, 512),
        v("cluster-4k", "cluster_size=4096", 8 * MIB, 4096),
        v("cluster-2m", "cluster_size=2M", 64 * MIB, 2 * MIB),
        v("refcount-1", "refcount_bits=1", 8 * MIB, 65536),
        v(
            "refcount-2",
            "refcount_bits=2,cluster_size=4096",
            4 * MIB,
            4096,
        ),
        v(
            "refcount-8",
            "refcount_bits=8,cluster_size=512",
            2 * MIB,
            512,
        ),
        v("refcount-64", "refcount_bits=64", 8 * MIB, 65536),
        v("v2", "compat=0.10", 8 * MIB, 65536),
        v("v2-512", "compat=0.10,cluster_size=512", 2 * MIB, 512),
        v("zstd", "compression_type=zstd", 8 * MIB, 65536),
        v("extended-l2", "extended_l2=on", 8 * MIB, 65536),
        v(
            "extended-l2-32k",
            "extended_l2=on,cluster_size=32768",
            4 * MIB,
            32768,
        ),
        v("lazy", "lazy_refcounts=on", 8 * MIB, 65536),
        // Preallocated clusters are allocated: qemu writes no compressed cluster there.
        Variant {
            compress: false,
            ..v(
                "prealloc-metadata",
                "preallocation=metadata",
                4 * MIB,
                65536,
            )
        },
        Variant {
            compress: false,
            ..v(
                "prealloc-full",
                "preallocation=full,cluster_size=4096",
                2 * MIB,
                4096,
            )
        },
        Variant {
            snapshots: 2,
            ..v("snapshots", "", 8 * MIB, 65536)
        },
        Variant {
            snapshots: 3,
            ..v("snapshots-512", "cluster_size=512", MIB, 512)
        },
        Variant {
            snapshots: 2,
            ..v(
                "snapshots-v2",
                "compat=0.10,cluster_size=4096",
                4 * MIB,
                4096,
            )
        },
        Variant {
            snapshots: 1,
            ..v("snapshots-ext-l2", "extended_l2=on", 8 * MIB, 65536)
        },
        Variant {
            bitmaps: true,
            ..v("bitmaps", "", 8 * MIB, 65536)
        },
        Variant {
            bitmaps: true,
            snapshots: 1,
            ..v("bitmaps-4k", "cluster_size=4096", 4 * MIB, 4096)
        },
        Variant {
            data_file: true,
            compress: false,
            ..v("data-file", "", 8 * MIB, 65536)
        },
        Variant {
            data_file: true,
            compress: false,
            ..v("data-file-raw", "data_file_raw=on", 4 * MIB, 65536)
        },
        Variant {
            backing: true,
            ..v("backing", "", 8 * MIB, 65536)
        },
        Variant {
            backing: true,
            ..v("backing-ext-l2", "extended_l2=on", 4 * MIB, 65536)
        },
    ]
}

/// A round of random qemu-io commands for an image of variant `var`. `touched` holds the
/// guest clusters written before: qemu only writes compressed clusters to clusters that were
/// never allocated, so compressed writes go to untouched clusters only.
fn random_ops(rng: &mut Rng, var: &Variant, n: usize, touched: &mut HashSet<u64>) -> Vec<String> {
    let size = var.size;
    let cl = var.cluster;
    let mut ops = Vec::new();
    for _ in 0..n {
        // Mostly cluster-granular, sometimes sector-granular, ranges.
        let unit = if rng.below(4) == 0 { 512 } else { cl };
        let max_units = (size / unit).max(1);
        let off = rng.below(max_units) * unit;
        let len = ((1 + rng.below(4)) * unit).min(size - off);
        let pat = rng.below(255) + 1;
        let c = rng.below(size / cl);
        match rng.below(10) {
            8 | 9 if var.compress && touched.insert(c) => {
                ops.push(format!(
                    "write -c -P {pat} {} {}",
                    c * cl,
                    cl.min(size - c * cl)
                ));
                continue;
            }
            0..=4 | 8 | 9 => ops.push(format!("write -P {pat} {off} {len}")),
            5 | 6 => ops.push(format!("write -z {off} {len}")),
            _ => ops.push(format!("discard {off} {len}")),
        }
        touched.extend(off / cl..(off + len).div_ceil(cl));
    }
    ops
}

/// Makes the clean image of variant `var` in `dir`; returns its path.
fn make_variant(dir: &Path, var: &Variant, rng: &mut Rng) -> PathBuf {
    let img = dir.join(format!("{}.qcow2", var.name));
    let mut opts = var.opts.to_string();
    if var.data_file {
        let d = dir.join(format!("{}.data", var.name));
        if !opts.is_empty() {
            opts.push(',');
        }
        opts.push_str(&format!("data_file={}", s(&d)));
    }
    let size = var.size.to_string();
    let base;
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    if var.backing {
        base = dir.join(format!("{}.base.qcow2", var.name));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), &size]);
        qemu_io(&base, &random_ops(rng, var, 12, &mut HashSet::new()));
        args.extend(["-b", s(&base), "-F", "qcow2"]);
    }
    args.extend([s(&img), &size]);
    qemu_img(&args);
    let rounds = 1 + var.snapshots;
    let mut touched = HashSet::new();
    for r in 0..rounds {
        if var.bitmaps && r == 0 {
            qemu_img(&["bitmap", "--add", s(&img), "b0"]);
        }
        qemu_io(&img, &random_ops(rng, var, 16, &mut touched));
        if var.bitmaps && r == 0 {
            qemu_img(&["bitmap", "--add", "-g", "1M", s(&img), "b1"]);
            qemu_io(&img, &random_ops(rng, var, 4, &mut touched));
        }
        if r < var.snapshots {
            qemu_img(&["snapshot", "-c", &format!("s{r}"), s(&img)]);
        }
    }
    if var.snapshots >= 2 {
        // Deleting a snapshot recomputes refcounts and COPIED flags.
        qemu_img(&["snapshot", "-d", "s0", s(&img)]);
        qemu_io(&img, &random_ops(rng, var, 4, &mut touched));
    }
    img
}

/// Converted images: `qemu-img convert -c` packs compressed clusters into shared host
/// clusters, which exercises the per-sector refcounting of compressed clusters.
fn make_converted(dir: &Path, rng: &mut Rng, zstd: bool, cluster: u64) -> PathBuf {
    let raw = dir.join(format!("conv-{zstd}-{cluster}.raw"));
    let size = 4 * MIB;
    let mut data = vec![0u8; size as usize];
    let mut pos = 0usize;
    while pos < data.len() {
        let len = (rng.below(3 * cluster) as usize + 512).min(data.len() - pos);
        match rng.below(4) {
            0 => {} // zeros: left out of the image
            1 => data[pos..pos + len]
                .iter_mut()
                .for_each(|b| *b = rng.next() as u8), // incompressible
            _ => {
                let p = rng.next() as u8;
                data[pos..pos + len]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = p ^ (i / 64) as u8);
            }
        }
        pos += len;
    }
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join(format!("conv-{zstd}-{cluster}.qcow2"));
    let opts = format!(
        "cluster_size={cluster}{}",
        if zstd { ",compression_type=zstd" } else { "" }
    );
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &opts,
        s(&raw),
        s(&img),
    ]);
    img
}

/// Minimal qcow2 poking for making damaged images (independent of vimg's reader).
struct Poke {
    path: PathBuf,
    cb: u32,
    l1_off: u64,
    l1_size: u64,
    rt_off: u64,
    rorder: u32,
    rt_clusters: u64,
    nb_snapshots: u32,
    snapshots_off: u64,
    ext: bool,
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

impl Poke {
    fn new(path: &Path) -> Poke {
        let be32 = |o| u32::from_be_bytes(Self::read(path, o, 4).try_into().unwrap());
        let be64 = |o| u64::from_be_bytes(Self::read(path, o, 8).try_into().unwrap());
        let version = be32(4);
        let incompat = if version >= 3 { be64(72) } else { 0 };
        Poke {
            path: path.to_path_buf(),
            cb: be32(20),
            l1_size: u64::from(be32(36)),
            l1_off: be64(40),
            rt_off: be64(48),
            rorder: if version >= 3 { be32(96) } else { 4 },
            rt_clusters: u64::from(be32(56)),
            nb_snapshots: be32(60),
            snapshots_off: be64(64),
            ext: incompat & 16 != 0,
        }
    }
    fn read(path: &Path, off: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(path).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off).unwrap();
        b
    }
    fn cs(&self) -> u64 {
        1 << self.cb
    }
    fn r64(&self, off: u64) -> u64 {
        u64::from_be_bytes(Self::read(&self.path, off, 8).try_into().unwrap())
    }
    fn w64(&self, off: u64, v: u64) {
        let f = FsOpen::new().write(true).open(&self.path).unwrap();
        f.write_all_at(&v.to_be_bytes(), off).unwrap();
    }
    fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }
    /// The bitmaps extension's directory: (offset, size), if the image has one.
    fn bitmap_directory(&self) -> Option<(u64, u64)> {
        let head = Self::read(&self.path, 0, self.cs().min(self.file_len()) as usize);
        let be32 = |o: usize| u32::from_be_bytes(head[o..o + 4].try_into().unwrap());
        let be64 = |o: usize| u64::from_be_bytes(head[o..o + 8].try_into().unwrap());
        let mut off = be32(100) as usize;
        while off + 8 <= head.len() {
            let (kind, len) = (be32(off), be32(off + 4) as usize);
            if kind == 0 {
                return None;
            }
            if kind == 0x2385_2875 {
                return Some((be64(off + 24), be64(off + 16)));
            }
            off += 8 + len.div_ceil(8) * 8;
        }
        None
    }
    /// Host address of the first active L1 entry matching `pred`.
    fn l1_entry(&self, pred: impl Fn(u64) -> bool) -> Option<u64> {
        (0..self.l1_size)
            .map(|i| self.l1_off + 8 * i)
            .find(|&a| pred(self.r64(a)))
    }
    /// Host address of the first unused refcount table entry.
    fn free_reftable_entry(&self) -> Option<u64> {
        (0..self.rt_clusters * self.cs() / 8)
            .map(|i| self.rt_off + 8 * i)
            .find(|&a| self.r64(a) == 0)
    }
    /// Host address of every active L2 entry (with its value) matching `pred`.
    fn l2_entries(&self, pred: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
        let step = if self.ext { 16 } else { 8 };
        let mut out = Vec::new();
        for i in 0..self.l1_size {
            let l2 = self.r64(self.l1_off + 8 * i) & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            for j in 0..self.cs() / step {
                let a = l2 + j * step;
                let e = self.r64(a);
                if pred(e) {
                    out.push((a, e));
                }
            }
        }
        out
    }
    fn first_l2(&self, pred: impl Fn(u64) -> bool) -> Option<(u64, u64)> {
        self.l2_entries(pred).into_iter().next()
    }
    /// Byte address and bit shift of the refcount of host cluster `cl`.
    fn rc_addr(&self, cl: u64) -> (u64, u32) {
        let bits = 1u64 << self.rorder;
        let per = self.cs() * 8 / bits;
        let blk = self.r64(self.rt_off + 8 * (cl / per)) & !0x1ff;
        assert!(blk != 0, "no refcount block for cluster {cl}");
        let bit = (cl % per) * bits;
        (blk + bit / 8, (bit % 8) as u32)
    }
    fn set_refcount(&self, cl: u64, v: u64) {
        let bits = 1u32 << self.rorder;
        let (addr, shift) = self.rc_addr(cl);
        let f = FsOpen::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap();
        if bits >= 8 {
            let n = (bits / 8) as usize;
            f.write_all_at(&v.to_be_bytes()[8 - n..], addr).unwrap();
        } else {
            let mut b = [0u8];
            f.read_exact_at(&mut b, addr).unwrap();
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            b[0] = (b[0] & !mask) | (((v as u8) << shift) & mask);
            f.write_all_at(&b, addr).unwrap();
        }
    }
    fn get_refcount(&self, cl: u64) -> u64 {
        let bits = 1u32 << self.rorder;
        let (addr, shift) = self.rc_addr(cl);
        if bits >= 8 {
            let b = Self::read(&self.path, addr, (bits / 8) as usize);
            b.iter().fold(0, |a, &x| (a << 8) | u64::from(x))
        } else {
            let b = Self::read(&self.path, addr, 1)[0];
            u64::from((b >> shift) & (((1u16 << bits) - 1) as u8))
        }
    }
}

fn is_data(e: u64) -> bool {
    e & COMPRESSED == 0 && e & OFFSET_MASK != 0
}

/// A way of breaking an image: a name and a function that pokes a copy, returning whether it
/// applied (some need a structure the image may not have).
type Damage = (&'static str, fn(&Poke) -> bool);

/// Damage that qemu-img check must not notice (stored refcounts past the end of the file are
/// not compared); every other applied damage must make it report something.
const HARMLESS: &[&str] = &["refcount-beyond-eof"];

/// Ways of breaking an image; each gets a fresh copy.
fn damages() -> Vec<Damage> {
    vec![
        ("refcount-raised", |p| {
            let (_, e) = p.first_l2(is_data).unwrap();
            let cl = (e & OFFSET_MASK) >> p.cb;
            p.set_refcount(cl, p.get_refcount(cl) + 1);
            true
        }),
        ("refcount-zeroed", |p| {
            let (_, e) = p.first_l2(is_data).unwrap();
            p.set_refcount((e & OFFSET_MASK) >> p.cb, 0);
            true
        }),
        ("refcount-of-l1-zeroed", |p| {
            p.set_refcount(p.l1_off >> p.cb, 0);
            true
        }),
        ("refcount-of-header-raised", |p| {
            p.set_refcount(0, 2);
            true
        }),
        ("refcount-beyond-eof", |p| {
            // Inside the first refcount block but past the end of the file.
            let cl = p.file_len().div_ceil(p.cs()) + 3;
            let per = (p.cs() * 8) >> p.rorder;
            cl < per && {
                p.set_refcount(cl, 1);
                true
            }
        }),
        ("copied-cleared-l2", |p| {
            let (a, e) = p.first_l2(|e| is_data(e) && e & COPIED != 0).unwrap();
            p.w64(a, e & !COPIED);
            true
        }),
        ("copied-set-on-compressed", |p| {
            p.first_l2(|e| e & COMPRESSED != 0)
                .map(|(a, e)| p.w64(a, e | COPIED))
                .is_some()
        }),
        ("copied-cleared-l1", |p| {
            p.l1_entry(|e| e != 0)
                .map(|a| p.w64(a, p.r64(a) & !COPIED))
                .is_some()
        }),
        ("l2-beyond-eof", |p| {
            let (a, _) = p.first_l2(is_data).unwrap();
            let far = (p.file_len() + 8 * p.cs()) & !(p.cs() - 1);
            p.w64(a, COPIED | far);
            true
        }),
        ("l2-just-past-eof", |p| {
            let (a, _) = p.first_l2(is_data).unwrap();
            let end = p.file_len().div_ceil(p.cs()) * p.cs();
            p.w64(a, COPIED | end);
            true
        }),
        ("l2-reserved-bits", |p| {
            let (a, e) = p.first_l2(is_data).unwrap();
            p.w64(a, e | 0x2);
            true
        }),
        ("l2-unaligned", |p| {
            let (a, e) = p.first_l2(is_data).unwrap();
            p.cs() > 512 && {
                p.w64(a, e + 512);
                true
            }
        }),
        ("l2-points-at-l1", |p| {
            let (a, _) = p.first_l2(is_data).unwrap();
            p.w64(a, COPIED | p.l1_off);
            true
        }),
        ("l2-duplicate", |p| {
            let d = p.l2_entries(is_data);
            d.len() >= 2 && {
                p.w64(d[1].0, d[0].1);
                true
            }
        }),
        ("l1-reserved-bits", |p| {
            p.l1_entry(|e| e != 0)
                .map(|a| p.w64(a, p.r64(a) | 1))
                .is_some()
        }),
        ("l1-reserved-bits-only", |p| {
            // Offset 0 with a reserved bit: qemu walks the header as an L2 table.
            p.l1_entry(|e| e == 0).map(|a| p.w64(a, 1)).is_some()
        }),
        ("l1-beyond-eof", |p| {
            let far = (p.file_len() + 4 * p.cs()) & !(p.cs() - 1);
            p.l1_entry(|e| e != 0)
                .map(|a| p.w64(a, COPIED | far))
                .is_some()
        }),
        ("reftable-reserved-bits", |p| {
            p.w64(p.rt_off, p.r64(p.rt_off) | 1);
            true
        }),
        ("reftable-duplicate-block", |p| {
            let e = p.r64(p.rt_off);
            p.free_reftable_entry().map(|a| p.w64(a, e)).is_some()
        }),
        ("reftable-block-beyond-eof", |p| {
            let far = (p.file_len() + 16 * p.cs()) & !(p.cs() - 1);
            p.free_reftable_entry().map(|a| p.w64(a, far)).is_some()
        }),
        ("reftable-block-unaligned", |p| {
            p.cs() > 512 && {
                p.w64(p.rt_off, p.r64(p.rt_off) + 512);
                true
            }
        }),
        ("truncated", |p| {
            let len = p.file_len();
            let new_len = len - len.min(2 * p.cs()).min(len / 4);
            // vimg refuses at open (header validation) an image whose snapshot table lies past
            // the end of the file, where qemu reads zeros; keep that table.
            if p.nb_snapshots > 0 && p.snapshots_off + 40 > new_len {
                return false;
            }
            let f = FsOpen::new().write(true).open(&p.path).unwrap();
            f.set_len(new_len).unwrap();
            // Only damage if something referenced was cut off.
            true
        }),
    ]
}

/// Damage specific to some variants: (variant, damage).
fn special_damages() -> Vec<(&'static str, Damage)> {
    vec![
        (
            "extended-l2",
            ("bitmap-alloc-on-unallocated", |p| {
                p.first_l2(|e| e == 0)
                    .map(|(a, _)| p.w64(a + 8, 1))
                    .is_some()
            }),
        ),
        (
            "extended-l2",
            ("bitmap-alloc-and-zero", |p| {
                let (a, _) = p.first_l2(is_data).unwrap();
                p.w64(a + 8, p.r64(a + 8) | 0x1_0000_0001);
                true
            }),
        ),
        (
            "refcount-1",
            ("refcount-overflow", |p| {
                let d = p.l2_entries(is_data);
                d.len() >= 2 && {
                    p.w64(d[1].0, d[0].1);
                    true
                }
            }),
        ),
        (
            "snapshots",
            ("shared-refcount-lowered", |p| {
                // A cluster shared with a snapshot (refcount 2) lowered to 1.
                let all = p.l2_entries(is_data);
                all.iter()
                    .map(|(_, e)| (e & OFFSET_MASK) >> p.cb)
                    .find(|&c| p.get_refcount(c) >= 2)
                    .map(|c| p.set_refcount(c, 1))
                    .is_some()
            }),
        ),
        (
            "snapshots",
            ("snapshot-l1-unaligned", |p| {
                let a = p.snapshots_off;
                p.w64(a, p.r64(a) + 512);
                true
            }),
        ),
        (
            "snapshots",
            ("snapshot-l1-beyond-eof", |p| {
                p.w64(p.snapshots_off, (p.file_len() + 8 * p.cs()) & !(p.cs() - 1));
                true
            }),
        ),
        (
            "bitmaps",
            ("bitmap-table-beyond-eof", |p| {
                let (dir, _) = p.bitmap_directory().unwrap();
                p.w64(dir, (p.file_len() + 8 * p.cs()) & !(p.cs() - 1));
                true
            }),
        ),
        (
            "bitmaps",
            ("bitmap-data-refcount-zeroed", |p| {
                let (dir, _) = p.bitmap_directory().unwrap();
                let table = p.r64(dir);
                let data = p.r64(table) & OFFSET_MASK;
                let target = if data != 0 { data } else { table };
                p.set_refcount(target >> p.cb, 0);
                true
            }),
        ),
        (
            "bitmaps",
            ("bitmap-directory-refcount-raised", |p| {
                let (dir, _) = p.bitmap_directory().unwrap();
                let c = dir >> p.cb;
                p.set_refcount(c, p.get_refcount(c) + 1);
                true
            }),
        ),
        (
            "conv-false-65536",
            ("compressed-beyond-eof", |p| {
                let (a, e) = p.first_l2(|e| e & COMPRESSED != 0).unwrap();
                let host_mask = (1u64 << (62 - (p.cb - 8))) - 1;
                p.w64(a, (e & !host_mask) | (p.file_len() + 4 * p.cs()));
                true
            }),
        ),
        (
            "conv-false-65536",
            ("compressed-refcount-lowered", |p| {
                let (_, e) = p.first_l2(|e| e & COMPRESSED != 0).unwrap();
                let host = e & ((1u64 << (62 - (p.cb - 8))) - 1);
                p.set_refcount(host >> p.cb, 0);
                true
            }),
        ),
        (
            "conv-true-512",
            ("compressed-refcount-raised", |p| {
                let (_, e) = p.first_l2(|e| e & COMPRESSED != 0).unwrap();
                let c = (e & ((1u64 << (62 - (p.cb - 8))) - 1)) >> p.cb;
                p.set_refcount(c, p.get_refcount(c) + 1);
                true
            }),
        ),
        (
            "data-file",
            ("data-file-copied-cleared", |p| {
                p.first_l2(|e| e & COPIED != 0)
                    .map(|(a, e)| p.w64(a, e & !COPIED))
                    .is_some()
            }),
        ),
    ]
}

#[test]
fn check_matches_qemu_img() {
    if !qemu_available("check_oracle") {
        return;
    }
    let seed: u64 = std::env::var("VIMG_CHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c4ec);
    let dir = tempfile::TempDir::new().unwrap();
    let mut mismatches = Vec::new();
    let mut cleans: Vec<(String, PathBuf)> = Vec::new();

    for (i, var) in variants().iter().enumerate() {
        let mut rng = Rng::seeded(seed ^ ((i as u64 + 1) * 0x1000_0001));
        let img = make_variant(dir.path(), var, &mut rng);
        cleans.push((var.name.to_string(), img));
    }
    for (i, (zstd, cl)) in [(false, 65536), (true, 65536), (false, 4096), (true, 512)]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::seeded(seed ^ (0xc0_0000 + i as u64));
        let img = make_converted(dir.path(), &mut rng, zstd, cl);
        cleans.push((format!("conv-{zstd}-{cl}"), img));
    }

    for (name, img) in &cleans {
        mismatches.extend(compare(&format!("{name} (seed {seed:#x})"), img));
    }

    // Damaged copies of some of the clean images.
    let damage_on = [
        "default-64k",
        "cluster-512",
        "refcount-2",
        "v2",
        "snapshots",
        "extended-l2",
        "conv-false-65536",
    ];
    let special = special_damages();
    let mut applied = 0;
    for (name, img) in &cleans {
        let mut list: Vec<Damage> = Vec::new();
        if damage_on.contains(&name.as_str()) {
            list.extend(damages());
        }
        list.extend(
            special
                .iter()
                .filter(|(v, _)| *v == name.as_str())
                .map(|(_, d)| *d),
        );
        for (label, damage) in list {
            let copy = dir.path().join(format!("{name}.{label}.qcow2"));
            std::fs::copy(img, &copy).unwrap();
            let p = Poke::new(&copy);
            if !damage(&p) {
                continue;
            }
            applied += 1;
            // Compared with the clean image (which qemu's own writes may already have left
            // with problems, e.g. a COPIED flag on a cluster shared with compressed data).
            let harmless = HARMLESS.contains(&label);
            if (summary(&qemu_check(&copy)) == summary(&qemu_check(img))) != harmless {
                mismatches.push(format!(
                    "{name} + {label} (seed {seed:#x}): the test's damage had {} effect on qemu-img check",
                    if harmless { "an" } else { "no" }
                ));
            }
            mismatches.extend(compare(
                &format!("{name} + {label} (seed {seed:#x})"),
                &copy,
            ));
        }
    }

    // A lazy-refcounts image whose writer died: refcounts were never written.
    let lazy = dir.path().join("dirty.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&lazy),
        "8M",
    ]);
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 128k",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "sigraise 9",
            s(&lazy),
        ])
        .output();
    mismatches.extend(compare("dirty lazy-refcounts image", &lazy));

    if std::env::var_os("VIMG_CHECK_KEEP").is_some() {
        eprintln!("images kept in {}", dir.keep().display());
    }
    eprintln!(
        "checked {} clean and {applied} damaged images (seed {seed:#x})",
        cleans.len() + 1
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches with qemu-img check:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
