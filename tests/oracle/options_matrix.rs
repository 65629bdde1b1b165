//! Every qcow2 option combination vimg can create, written by vimg and by qemu, checked by both
//! (issue 3, "Must show").
//!
//! The combinations are the full product of cluster size (512, 64k, 2M), compat (0.10, 1.1),
//! refcount_bits (1, 16, 64), compression type (zlib, zstd), extended_l2, an external data file
//! (none, `data_file`, `data_file` with `data_file_raw=on`), lazy refcounts, a backing chain
//! (none, a raw file, a qcow2 layer over a raw file) and preallocation (off, metadata, falloc,
//! full), less those `qemu-img create` refuses. [`invalid_combinations_are_refused_like_qemu`]
//! asks qemu-img which those are and checks that vimg refuses exactly the same ones.
//!
//! For each valid combination, [`every_valid_combination_round_trips_through_qemu`] runs:
//!
//! - **a. create**: the library call `vimg create` makes (`ops::create::create`), with a virtual
//!   size of 4 MiB + 37 sectors (so the last 64k and 2M cluster is partial);
//! - **b. vimg writes** through `Qcow2Image` (read-write): seeded random writes of random
//!   lengths (inside a cluster, across cluster boundaries, sector-aligned, whole clusters, over
//!   backing data), zero writes with and without unmap, compressed clusters (`compress_cluster`
//!   then `write_compressed`, where the image allows compression: not with a data file) and
//!   flushes, while a byte model records what the disk must hold;
//! - **c. qemu reads it**: the header's dirty and corrupt bits are clear; `qemu-img check
//!   --output=json` exits 0 and reports no corruption, leak or check error; `qemu-img compare`
//!   of the image against the model written as a raw file says identical; with
//!   `data_file_raw=on`, the data file alone holds the model;
//! - **d. vimg reads qemu's writes**: qemu-io writes patterns (`write -P`, compressed
//!   `write -c` where allowed, `write -z`, `write -z -u`, `discard` of whole clusters) into
//!   the same image; the header bits are clear again, vimg's reader returns the updated model
//!   byte for byte and vimg's own check (`Check::check`) finds the image clean.
//!
//! Failures name the combination (as the `-o` options that make it), the step and the seed; they
//! are collected over all combinations and reported together. `VIMG_MATRIX_SEED` (decimal or
//! `0x` hex) changes the seed, `VIMG_MATRIX_FILTER` runs only combinations whose label contains
//! the given text, `VIMG_MATRIX_THREADS` sets the number of workers (default 3) and
//! `VIMG_MATRIX_KEEP=1` keeps the files of failing cases, `VIMG_MATRIX_TRACE=1` prints vimg's
//! ops (use it with a filter).

use crate::common;
use crate::common::header_fields;

use common::{qemu_available, Rng};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vimg::block::ImageFormat;
use vimg::open::{open_image, ChainGuard, OpenOptions};
use vimg::ops::create::{create, prepare, CreateArgs};
use vimg::qcow2::compress_cluster;
use vimg::qcow2::Qcow2Image;
use vimg::qcow2::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED};
use vimg::{BlockImage, GuestOffset};

/// Virtual size of every image: 4 MiB and 37 sectors, so the disk ends inside a 64k or 2M
/// cluster.
const IMG_SIZE: u64 = (4 << 20) + 37 * 512;
/// Size of the raw base of the backing chains (shorter than the image: the end of the disk
/// has no backing data).
const BASE_SIZE: u64 = (3 << 20) + 4096 + 512;
/// Size of the qcow2 middle layer (over the raw base, shorter than the image too).
const MID_SIZE: u64 = (3 << 20) + (512 << 10) + 1024;
/// The default seed (override with `VIMG_MATRIX_SEED`).
const DEFAULT_SEED: u64 = 0x5eed_0003;

/// The external data file choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataFile {
    None,
    /// `data_file=...,data_file_raw=off`.
    External,
    /// `data_file=...,data_file_raw=on`.
    ExternalRaw,
}

/// The backing chain choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    None,
    /// `base.raw`: a raw file with a known pattern and a hole.
    Raw,
    /// `mid.qcow2`, a qcow2 layer written by qemu-io (plain, compressed and zero clusters) over
    /// `base.raw`.
    Qcow2,
}

/// One combination of create options.
#[derive(Debug, Clone, Copy)]
struct Combo {
    cluster: u64,
    v3: bool,
    refcount_bits: u64,
    zstd: bool,
    extended_l2: bool,
    lazy: bool,
    data_file: DataFile,
    backing: Backing,
    prealloc: &'static str,
}

const PREALLOC: [&str; 4] = ["off", "metadata", "falloc", "full"];

impl Combo {
    /// The `-o` option list, with the data file (if any) at `data_path`.
    fn options(&self, data_path: &str) -> String {
        let onoff = |b: bool| if b { "on" } else { "off" };
        let mut s = format!(
            "compat={},cluster_size={},refcount_bits={},compression_type={},extended_l2={},\
             lazy_refcounts={},preallocation={}",
            if self.v3 { "1.1" } else { "0.10" },
            self.cluster,
            self.refcount_bits,
            if self.zstd { "zstd" } else { "zlib" },
            onoff(self.extended_l2),
            onoff(self.lazy),
            self.prealloc
        );
        if self.data_file != DataFile::None {
            s.push_str(&format!(
                ",data_file={data_path},data_file_raw={}",
                onoff(self.data_file == DataFile::ExternalRaw)
            ));
        }
        s
    }

    /// The backing file (path inside `shared`) and its format.
    fn backing_file(&self, shared: &Path) -> Option<(PathBuf, &'static str)> {
        match self.backing {
            Backing::None => None,
            Backing::Raw => Some((shared.join("base.raw"), "raw")),
            Backing::Qcow2 => Some((shared.join("mid.qcow2"), "qcow2")),
        }
    }

    /// Whether `qemu-img create` accepts the combination (checked against qemu-img itself by
    /// [`invalid_combinations_are_refused_like_qemu`]).
    fn valid(&self) -> bool {
        if !self.v3
            && (self.refcount_bits != 16
                || self.zstd
                || self.extended_l2
                || self.lazy
                || self.data_file != DataFile::None)
        {
            return false;
        }
        if self.extended_l2 && self.cluster < 16384 {
            return false;
        }
        if self.data_file == DataFile::ExternalRaw && self.backing != Backing::None {
            return false;
        }
        if self.backing != Backing::None && self.prealloc != "off" && !self.extended_l2 {
            return false;
        }
        true
    }
}

impl fmt::Display for Combo {
    /// The label failures are reported under: the `-o` options and the backing chain.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-o {}", self.options("D"))?;
        match self.backing {
            Backing::None => Ok(()),
            Backing::Raw => write!(f, " -b base.raw -F raw"),
            Backing::Qcow2 => write!(f, " -b mid.qcow2 -F qcow2 (over base.raw)"),
        }
    }
}

/// The full product of the option values, valid or not.
fn all_combos() -> Vec<Combo> {
    let mut v = Vec::new();
    for cluster in [512u64, 65536, 2 << 20] {
        for v3 in [false, true] {
            for refcount_bits in [1u64, 16, 64] {
                for zstd in [false, true] {
                    for extended_l2 in [false, true] {
                        for lazy in [false, true] {
                            for data_file in
                                [DataFile::None, DataFile::External, DataFile::ExternalRaw]
                            {
                                for backing in [Backing::None, Backing::Raw, Backing::Qcow2] {
                                    for prealloc in PREALLOC {
                                        v.push(Combo {
                                            cluster,
                                            v3,
                                            refcount_bits,
                                            zstd,
                                            extended_l2,
                                            lazy,
                                            data_file,
                                            backing,
                                            prealloc,
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    v
}

/// Runs a command; returns (exit code, stdout, stderr), or an error if it cannot be started.
fn exec(cmd: &str, args: &[&str]) -> Result<(i32, String, String), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs qemu-io (`-t unsafe`: no syncs) with `cmds` on the qcow2 image `path`; any failure or
/// error message is an error.
fn qemu_io(path: &Path, fmt: &str, cmds: &[String]) -> Result<(), String> {
    let mut args = vec!["-t", "unsafe", "-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let p = path.to_str().unwrap();
    args.push(p);
    let (code, out, err) = exec("qemu-io", &args)?;
    if code != 0 || out.contains("error") || out.contains("failed") || !err.is_empty() {
        return Err(format!(
            "qemu-io {} exited {code}: {}{}",
            cmds.join(" ; "),
            out.trim(),
            err.trim()
        ));
    }
    Ok(())
}

/// The guest contents of `path` as qemu reads them (`qemu-img convert -O raw`).
fn qemu_read(path: &Path, fmt: &str, scratch: &Path) -> Result<Vec<u8>, String> {
    let (code, out, err) = exec(
        "qemu-img",
        &[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            path.to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    )?;
    if code != 0 {
        return Err(format!("qemu-img convert exited {code}: {out}{err}"));
    }
    let data = std::fs::read(scratch).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(scratch);
    Ok(data)
}

/// Where two byte strings first differ, described, or `None` if they are equal.
fn first_difference(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    if got.len() != want.len() {
        return Some(format!("{} bytes, want {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let last = got.iter().zip(want).rposition(|(a, b)| a != b).unwrap_or(i);
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "{n} bytes differ between guest offsets {i:#x} and {last:#x}; at {i:#x} read {:#04x}, \
         model {:#04x}",
        got[i], want[i]
    ))
}

/// The shared backing files and what the chain reads as (padded with zeros to [`IMG_SIZE`]).
struct Chains {
    dir: PathBuf,
    raw_model: Vec<u8>,
    qcow2_model: Vec<u8>,
}

/// Creates `base.raw` (a pattern with a hole) and `mid.qcow2` over it (plain data, a compressed
/// cluster, a zero range, a discarded range), and records what each reads as. vimg must read
/// both as qemu does.
fn make_chains(dir: &Path) -> Chains {
    let base = dir.join("base.raw");
    let mut data: Vec<u8> = (0..BASE_SIZE)
        .map(|i| ((i / 512) as u8).wrapping_mul(13) ^ (i as u8) | 1)
        .collect();
    // A hole in the middle (not written: sparse) reads as zeros.
    let hole = (1usize << 20)..(3usize << 20) / 2;
    data[hole.clone()].fill(0);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(BASE_SIZE).unwrap();
        f.write_all_at(&data[..hole.start], 0).unwrap();
        f.write_all_at(&data[hole.end..], hole.end as u64).unwrap();
    }
    let mut raw_model = data;
    raw_model.resize(IMG_SIZE as usize, 0);

    let mid = dir.join("mid.qcow2");
    common::qemu_create(
        &mid,
        "qcow2",
        "cluster_size=65536",
        Some((&base, "raw")),
        MID_SIZE,
    );
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x5a 4096 200000".into(),
            "write -c -P 0x6b 1048576 65536".into(),
            "write -z 2162688 131072".into(),
            "write -P 0x7c 3145728 300000".into(),
        ],
    )
    .unwrap();
    let mut qcow2_model = qemu_read(&mid, "qcow2", &dir.join("mid.ref")).unwrap();
    qcow2_model.resize(IMG_SIZE as usize, 0);
    // The chain as vimg reads it must be the chain as qemu reads it.
    for (p, model) in [(&base, &raw_model), (&mid, &qcow2_model)] {
        let img = open_image(p, &OpenOptions::default()).unwrap();
        let mut got = vec![0u8; img.virtual_size() as usize];
        img.read_at(&mut got, GuestOffset(0)).unwrap();
        assert_eq!(
            first_difference(&got, &model[..got.len()]),
            None,
            "vimg reads {} differently from qemu",
            p.display()
        );
    }
    Chains {
        dir: dir.to_path_buf(),
        raw_model,
        qcow2_model,
    }
}

/// A random guest range: inside a cluster, across a cluster boundary, sector-aligned or whole
/// clusters, clipped to the disk.
fn pick_range(rng: &mut Rng, cs: u64) -> (u64, u64) {
    let small = cs.min(8192);
    let (off, len) = match rng.below(4) {
        0 => (rng.below(IMG_SIZE), 1 + rng.below(4096)),
        1 => {
            let boundary = cs * (1 + rng.below((IMG_SIZE / cs).max(1)));
            let off = boundary.saturating_sub(1 + rng.below(small));
            (off, boundary - off + 1 + rng.below(small))
        }
        2 => (
            rng.below(IMG_SIZE) & !511,
            512 * (1 + rng.below((2 * cs).min(256 << 10) / 512)),
        ),
        _ => (
            rng.below(IMG_SIZE.div_ceil(cs)) * cs,
            cs * (1 + rng.below(2)),
        ),
    };
    let off = off.min(IMG_SIZE - 1);
    (off, len.min(IMG_SIZE - off))
}

/// `n` random bytes.
fn random_bytes(rng: &mut Rng, n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n as usize + 8);
    while (v.len() as u64) < n {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(n as usize);
    v
}

/// Time spent in each step over all cases, in microseconds.
#[derive(Default)]
struct StepTimes {
    create: AtomicU64,
    vimg_write: AtomicU64,
    qemu_check: AtomicU64,
    qemu_compare: AtomicU64,
    qemu_io: AtomicU64,
    vimg_read_check: AtomicU64,
}

fn timed<T>(slot: &AtomicU64, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    slot.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    r
}

/// Prints what `f` says when `VIMG_MATRIX_TRACE` is set (to follow one combination's ops).
fn trace(f: impl FnOnce() -> String) {
    if std::env::var_os("VIMG_MATRIX_TRACE").is_some() {
        eprintln!("{}", f());
    }
}

/// Step a: creates the image with the library call behind `vimg create`.
fn step_create(c: &Combo, img: &Path, data: &Path, chains: &Chains) -> Result<(), String> {
    let backing = c.backing_file(&chains.dir);
    let args = CreateArgs {
        format: ImageFormat::Qcow2,
        filename: img.to_path_buf(),
        options: vec![c.options(data.to_str().unwrap())],
        backing_file: backing
            .as_ref()
            .map(|(p, _)| p.to_str().unwrap().to_string()),
        backing_format: backing.as_ref().map(|(_, f)| f.to_string()),
        unsafe_backing: false,
        size: Some(IMG_SIZE.to_string()),
        opener: Default::default(),
    };
    create(&args).map(|_| ()).map_err(|e| e.to_string())
}

/// Step b: seeded random writes, zero writes, compressed clusters and flushes through the
/// `BlockImage` API, recorded in `model`.
fn step_vimg_writes(c: &Combo, img: &Path, rng: &mut Rng, model: &mut [u8]) -> Result<(), String> {
    let image = Qcow2Image::open(img, true, false, &mut ChainGuard::default())
        .map_err(|e| format!("open read-write: {e}"))?;
    image.set_unsafe_cache(true);
    let cs = image.header().cluster_size();
    let kind = image.header().compression_type;
    let compress_ok = c.data_file == DataFile::None;
    // 2 MiB clusters make every op costly (copy-on-write and compression of whole clusters):
    // fewer ops there keep the run short.
    let (n_ops, forced): (u32, &[u32]) = if cs >= 2 << 20 {
        (10, &[2])
    } else {
        (16, &[2, 9])
    };
    for i in 0..n_ops {
        // The forced ops are compressed clusters where the image allows them.
        let what = match i {
            _ if compress_ok && forced.contains(&i) => 10,
            _ => rng.below(if compress_ok { 11 } else { 10 }),
        };
        match what {
            0..=5 => {
                let (off, len) = pick_range(rng, cs);
                let buf = random_bytes(rng, len);
                image
                    .write_at(&buf, GuestOffset(off))
                    .map_err(|e| format!("op {i}: write of {len} bytes at {off:#x}: {e}"))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
                trace(|| format!("op {i}: write {off:#x}+{len:#x}"));
            }
            6..=8 => {
                let (off, len) = pick_range(rng, cs);
                let unmap = what == 8 || rng.below(2) == 1;
                image
                    .write_zeroes(GuestOffset(off), len, unmap)
                    .map_err(|e| {
                        format!(
                            "op {i}: zero write (unmap {unmap}) of {len} bytes at {off:#x}: {e}"
                        )
                    })?;
                model[off as usize..(off + len) as usize].fill(0);
                trace(|| format!("op {i}: zero write (unmap {unmap}) {off:#x}+{len:#x}"));
            }
            9 => {
                image.flush().map_err(|e| format!("op {i}: flush: {e}"))?;
                trace(|| format!("op {i}: flush"));
            }
            _ => {
                let gc = rng.below(IMG_SIZE.div_ceil(cs)) * cs;
                let seed = rng.next() as u8;
                // Compressible but not trivial.
                let data: Vec<u8> = (0..cs)
                    .map(|j| (j / 24) as u8 ^ seed ^ (j % 5) as u8)
                    .collect();
                let n = cs.min(IMG_SIZE - gc) as usize;
                let z = compress_cluster(kind, &data)
                    .map_err(|e| format!("op {i}: compress_cluster: {e}"))?;
                match z {
                    Some(z) => image.write_compressed(gc, &z).map_err(|e| {
                        format!(
                            "op {i}: compressed write of cluster {gc:#x} ({} bytes): {e}",
                            z.len()
                        )
                    })?,
                    None => image.write_at(&data[..n], GuestOffset(gc)).map_err(|e| {
                        format!("op {i}: write of incompressible cluster {gc:#x}: {e}")
                    })?,
                }
                model[gc as usize..gc as usize + n].copy_from_slice(&data[..n]);
                trace(|| format!("op {i}: compressed cluster {gc:#x}"));
            }
        }
    }
    image.flush().map_err(|e| format!("final flush: {e}"))?;
    // vimg reads back what it wrote before qemu looks.
    let mut got = vec![0u8; IMG_SIZE as usize];
    image
        .read_at(&mut got, GuestOffset(0))
        .map_err(|e| format!("read back: {e}"))?;
    if let Some(d) = first_difference(&got, model) {
        return Err(format!("vimg's own read-back of its writes: {d}"));
    }
    Ok(())
}

/// The header's dirty and corrupt bits (qcow2.rst "Header", incompatible feature bits 0 and 1)
/// are clear: a closed image is neither left dirty nor marked corrupt.
fn header_clean(img: &Path) -> Result<(), String> {
    let mut h = [0u8; (header_fields::INCOMPATIBLE_FEATURES + 8) as usize];
    let f = std::fs::File::open(img).map_err(|e| e.to_string())?;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut h, 0).map_err(|e| e.to_string())?;
    let version = common::header_u32(&h, header_fields::VERSION);
    let incompat = common::header_u64(&h, header_fields::INCOMPATIBLE_FEATURES);
    if version >= 3 && incompat & 0b11 != 0 {
        return Err(format!(
            "incompatible feature bits {incompat:#x}: the image is left dirty or marked corrupt"
        ));
    }
    Ok(())
}

/// Step c, first half: `qemu-img check --output=json` exits 0 with nothing wrong reported.
fn step_qemu_check(img: &Path) -> Result<(), String> {
    let (code, out, err) = exec(
        "qemu-img",
        &[
            "check",
            "-f",
            "qcow2",
            "--output=json",
            img.to_str().unwrap(),
        ],
    )?;
    let json: Value = serde_json::from_str(&out)
        .map_err(|e| format!("exit {code}, unparsable output ({e}): {out}{err}"))?;
    let n = |k: &str| json.get(k).and_then(Value::as_u64).unwrap_or(0);
    if code != 0
        || n("check-errors") != 0
        || n("corruptions") != 0
        || n("leaks") != 0
        || json.get("corruptions-fixed").is_some()
    {
        return Err(format!("exit {code}: {}{}", out.trim(), err.trim()));
    }
    Ok(())
}

/// Step c, second half: `qemu-img compare` of the image against the model says identical.
fn step_qemu_compare(img: &Path, model_raw: &Path) -> Result<(), String> {
    let (code, out, err) = exec(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().unwrap(),
            model_raw.to_str().unwrap(),
        ],
    )?;
    if code != 0 {
        return Err(format!("exit {code}: {}{}", out.trim(), err.trim()));
    }
    Ok(())
}

/// The guest offsets of the whole clusters (not the partial last one) whose L2 entry has no
/// host offset (unallocated, or zero without a preallocated cluster).
fn clusters_without_host_offset(img: &Path) -> Result<Vec<u64>, String> {
    let image = Qcow2Image::open(img, false, true, &mut ChainGuard::default())
        .map_err(|e| format!("open to find free clusters: {e}"))?;
    let h = image.header();
    let cs = h.cluster_size();
    let words = if h.extended_l2() { 2 } else { 1 };
    let per_table = 1u64 << h.l2_bits();
    let l1 = image.l1().clone();
    let mut free = Vec::new();
    for i in 0..IMG_SIZE / cs {
        let l2_off = l1[(i / per_table) as usize] & L1E_OFFSET_MASK;
        if l2_off == 0 {
            free.push(i * cs);
            continue;
        }
        let table = image
            .l2_table(l2_off)
            .map_err(|e| format!("L2 table at {l2_off:#x}: {e}"))?;
        let e = table[(i % per_table) as usize * words];
        if e & (L2E_OFFSET_MASK | OFLAG_COMPRESSED) == 0 {
            free.push(i * cs);
        }
    }
    Ok(free)
}

/// What one qemu-io command does to the guest disk.
enum Effect {
    Fill(u8),
    /// A discard: zeros, except on version 2 images with a backing file, where qemu ignores
    /// discards (they could only let the backing data show through).
    Discard,
}

/// Step d: qemu-io writes patterns, a compressed cluster (where allowed), zeros with and without
/// unmap and a discard of whole clusters into vimg's image; `model` is updated in command
/// order. Returns the commands run.
fn step_qemu_writes(
    c: &Combo,
    img: &Path,
    rng: &mut Rng,
    model: &mut [u8],
) -> Result<Vec<String>, String> {
    let cs = c.cluster;
    let full_clusters = IMG_SIZE / cs;
    let mut ops: Vec<(String, u64, u64, Effect)> = Vec::new();
    let range = |rng: &mut Rng| pick_range(rng, cs);
    // A compressed cluster. qemu compresses only into clusters without a host cluster (it
    // fails with EIO otherwise): take one vimg left free, or discard one first.
    if c.data_file == DataFile::None {
        let free = clusters_without_host_offset(img)?;
        let discard_works = c.v3 || c.backing == Backing::None;
        let gc = if !free.is_empty() {
            Some(free[rng.below(free.len() as u64) as usize])
        } else if discard_works {
            let gc = rng.below(full_clusters) * cs;
            ops.push((format!("discard {gc} {cs}"), gc, cs, Effect::Discard));
            Some(gc)
        } else {
            None
        };
        if let Some(gc) = gc {
            ops.push((
                format!("write -c -P 0xc3 {gc} {cs}"),
                gc,
                cs,
                Effect::Fill(0xc3),
            ));
        }
    }
    let (o, l) = range(rng);
    ops.push((format!("write -P 0xa5 {o} {l}"), o, l, Effect::Fill(0xa5)));
    let (o, l) = range(rng);
    ops.push((format!("write -z {o} {l}"), o, l, Effect::Fill(0)));
    let first = rng.below(full_clusters);
    let (o, l) = (
        first * cs,
        (1 + rng.below(2)).min(full_clusters - first) * cs,
    );
    ops.push((format!("discard {o} {l}"), o, l, Effect::Discard));
    let (o, l) = range(rng);
    ops.push((format!("write -P 0x3c {o} {l}"), o, l, Effect::Fill(0x3c)));
    let (o, l) = range(rng);
    ops.push((format!("write -z -u {o} {l}"), o, l, Effect::Fill(0)));
    let (o, l) = range(rng);
    ops.push((format!("write -P 0x5b {o} {l}"), o, l, Effect::Fill(0x5b)));

    for (_, off, len, effect) in &ops {
        let r = &mut model[*off as usize..(off + len) as usize];
        match effect {
            Effect::Fill(b) => r.fill(*b),
            Effect::Discard if !c.v3 && c.backing != Backing::None => {}
            Effect::Discard => r.fill(0),
        }
    }
    let cmds: Vec<String> = ops.into_iter().map(|(cmd, ..)| cmd).collect();
    qemu_io(img, "qcow2", &cmds)?;
    Ok(cmds)
}

/// Step d, reading: vimg reads the whole image as the model says, and its own check is clean.
fn step_vimg_read_check(img: &Path, model: &[u8], scratch: &Path) -> Result<(), String> {
    header_clean(img).map_err(|e| format!("after qemu-io closed the image: {e}"))?;
    let image = open_image(img, &OpenOptions::default()).map_err(|e| format!("open: {e}"))?;
    let mut got = vec![0u8; image.virtual_size() as usize];
    image
        .read_at(&mut got, GuestOffset(0))
        .map_err(|e| format!("read: {e}"))?;
    if let Some(d) = first_difference(&got, model) {
        // Say whether qemu agrees with the model, to tell a vimg bug from a model bug.
        let qemu = match qemu_read(img, "qcow2", scratch) {
            Ok(q) => match first_difference(&q, model) {
                None => "qemu reads the model".to_string(),
                Some(qd) => format!("qemu does not read the model either: {qd}"),
            },
            Err(e) => e,
        };
        return Err(format!("vimg read after qemu-io: {d}; {qemu}"));
    }
    let check = image
        .as_check()
        .ok_or("qcow2 image offers no check")?
        .check()
        .map_err(|e| format!("vimg check: {e}"))?;
    if check.check_errors != 0 || check.corruptions != 0 || check.leaks != 0 {
        return Err(format!(
            "vimg check after qemu-io: {} check errors, {} corruptions, {} leaks: {}",
            check.check_errors,
            check.corruptions,
            check.leaks,
            check.messages.join("; ")
        ));
    }
    Ok(())
}

/// Runs steps a to d for one combination in `dir`; the error names the step.
fn run_case(
    c: &Combo,
    seed: u64,
    dir: &Path,
    chains: &Chains,
    t: &StepTimes,
) -> Result<(), String> {
    let img = dir.join("t.qcow2");
    let data = dir.join("t.data");
    let model_raw = dir.join("model.raw");
    let scratch = dir.join("scratch.raw");
    let mut rng = Rng::seeded(seed);
    let backing_model: Option<&[u8]> = match c.backing {
        Backing::None => None,
        Backing::Raw => Some(&chains.raw_model),
        Backing::Qcow2 => Some(&chains.qcow2_model),
    };
    let mut model = match backing_model {
        Some(m) => m.to_vec(),
        None => vec![0u8; IMG_SIZE as usize],
    };

    timed(&t.create, || step_create(c, &img, &data, chains))
        .map_err(|e| format!("a. create: {e}"))?;
    timed(&t.vimg_write, || {
        step_vimg_writes(c, &img, &mut rng, &mut model)
    })
    .map_err(|e| format!("b. vimg writes: {e}"))?;

    header_clean(&img).map_err(|e| format!("c. after vimg closed the image: {e}"))?;
    timed(&t.qemu_check, || step_qemu_check(&img))
        .map_err(|e| format!("c. qemu-img check of vimg's image: {e}"))?;
    std::fs::write(&model_raw, &model).map_err(|e| e.to_string())?;
    timed(&t.qemu_compare, || step_qemu_compare(&img, &model_raw)).map_err(|e| {
        let detail = qemu_read(&img, "qcow2", &scratch)
            .map(|q| first_difference(&q, &model).unwrap_or_else(|| "no difference?".into()))
            .unwrap_or_else(|e| e);
        format!("c. qemu-img compare with the model: {e} ({detail})")
    })?;
    let mut soft = None;
    if c.data_file == DataFile::ExternalRaw {
        let raw = std::fs::read(&data).map_err(|e| format!("c. read data file: {e}"))?;
        let mut head = raw[..raw.len().min(IMG_SIZE as usize)].to_vec();
        head.resize(IMG_SIZE as usize, 0);
        if let Some(d) = first_difference(&head, &model) {
            // Not fatal: step d still runs, so that this does not hide other failures.
            // Known vimg bug (for the lead to fix, not hidden): a whole-cluster zero write sets
            // the zero flag without writing zeros to a raw data file; the smallest form is
            // data_file_raw_zero_writes_reach_the_data_file.
            soft = Some(format!(
                "c. data_file_raw: the data file alone is not the guest disk: {d} (known bug: \
                 whole-cluster zero writes do not reach the data file)"
            ));
        }
    }

    let with_soft = |e: String| match &soft {
        Some(s) => format!("{s}; then {e}"),
        None => e,
    };
    let cmds = timed(&t.qemu_io, || {
        step_qemu_writes(c, &img, &mut rng, &mut model)
    })
    .map_err(|e| with_soft(format!("d. qemu-io writes into vimg's image: {e}")))?;
    timed(&t.vimg_read_check, || {
        step_vimg_read_check(&img, &model, &scratch)
    })
    .map_err(|e| with_soft(format!("d. after qemu-io {}: {e}", cmds.join(" ; "))))?;
    soft.map_or(Ok(()), Err)
}

/// The seed from `VIMG_MATRIX_SEED` (decimal or `0x` hex), or the default.
fn base_seed() -> u64 {
    match std::env::var("VIMG_MATRIX_SEED") {
        Ok(s) => {
            let s = s.trim();
            let r = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            r.unwrap_or_else(|_| panic!("VIMG_MATRIX_SEED={s} is not a number"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

/// The seed of one combination: the base seed mixed with the combination's label, so that a
/// filtered run reproduces exactly what the full run did.
fn case_seed(base: u64, c: &Combo) -> u64 {
    let mut h = base ^ 0xcbf2_9ce4_8422_2325;
    for b in c.to_string().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Whether this qemu-img can create zstd images (older releases cannot).
fn qemu_has_zstd(dir: &Path) -> bool {
    let p = dir.join("zstd-probe.qcow2");
    let ok = exec(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            p.to_str().unwrap(),
            "1M",
        ],
    )
    .map(|(code, _, _)| code == 0)
    .unwrap_or(false);
    let _ = std::fs::remove_file(p);
    ok
}

#[test]
fn every_valid_combination_round_trips_through_qemu() {
    if !qemu_available("every_valid_combination_round_trips_through_qemu") {
        return;
    }
    let start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let chains = make_chains(tmp.path());
    let seed = base_seed();
    let filter = std::env::var("VIMG_MATRIX_FILTER").ok();
    let zstd = qemu_has_zstd(tmp.path());
    if !zstd {
        eprintln!("qemu-img cannot create zstd images: skipping the zstd combinations");
    }
    let combos: Vec<Combo> = all_combos()
        .into_iter()
        .filter(|c| c.valid() && (zstd || !c.zstd))
        .filter(|c| filter.as_deref().is_none_or(|f| c.to_string().contains(f)))
        .collect();
    eprintln!(
        "options_matrix: {} combinations, seed {seed:#x} (VIMG_MATRIX_SEED)",
        combos.len()
    );
    let workers: usize = std::env::var("VIMG_MATRIX_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let keep = std::env::var_os("VIMG_MATRIX_KEEP").is_some();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let times = StepTimes::default();
    std::thread::scope(|s| {
        for w in 0..workers {
            let (next, failures, times, chains, combos) =
                (&next, &failures, &times, &chains, &combos);
            let root = tmp.path().to_path_buf();
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = combos.get(i) else { break };
                let dir = root.join(format!("w{w}-{i}"));
                std::fs::create_dir(&dir).unwrap();
                let cs = case_seed(seed, c);
                let t0 = Instant::now();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_case(c, cs, &dir, chains, times)
                }))
                .unwrap_or_else(|p| {
                    Err(format!(
                        "panicked: {}",
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default()
                    ))
                });
                if std::env::var_os("VIMG_MATRIX_TIMES").is_some() {
                    eprintln!("{:>6} ms  {c}", t0.elapsed().as_millis());
                }
                if let Err(e) = r {
                    let kept = if keep {
                        format!(" (files kept in {})", dir.display())
                    } else {
                        String::new()
                    };
                    failures.lock().unwrap().push(format!("[{c}] {e}{kept}"));
                    if keep {
                        // Keep the directory: tempdir removal would delete it, so move it out.
                        let dest = std::env::temp_dir().join(format!("vimg-matrix-fail-{i}"));
                        let _ = std::fs::remove_dir_all(&dest);
                        let _ = std::fs::rename(&dir, &dest);
                        continue;
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
            });
        }
    });
    let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) / 1000;
    eprintln!(
        "options_matrix: {} combinations in {:.1} s on {workers} threads; step totals (ms): \
         create {}, vimg writes {}, qemu-img check {}, qemu-img compare {}, qemu-io {}, \
         vimg read+check {}",
        combos.len(),
        start.elapsed().as_secs_f64(),
        ms(&times.create),
        ms(&times.vimg_write),
        ms(&times.qemu_check),
        ms(&times.qemu_compare),
        ms(&times.qemu_io),
        ms(&times.vimg_read_check),
    );
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} of {} combinations failed (seed {seed:#x}; rerun one with VIMG_MATRIX_SEED={seed:#x} \
         VIMG_MATRIX_FILTER='<label>'):\n{}",
        failures.len(),
        combos.len(),
        failures.join("\n")
    );
}

/// The combinations whose validity is asked of qemu-img: the full product of compat, cluster
/// size, extended_l2, data file, backing (none or raw) and preallocation, each with the default
/// refcount width, compression type and lazy refcount setting and with each of them changed
/// alone; and the qcow2 backing chain with the defaults. (Asking about all of [`all_combos`]
/// would start over 5000 qemu-img processes; the validity rules do not depend on how the
/// refcount width, compression type and lazy refcounts are combined with each other, nor on the
/// backing file's format, and vimg itself is checked on every combination.)
fn combos_to_ask_qemu() -> Vec<Combo> {
    let defaults = |c: &Combo| c.refcount_bits == 16 && !c.zstd && !c.lazy;
    all_combos()
        .into_iter()
        .filter(|c| {
            let n_changed =
                u32::from(c.refcount_bits != 16) + u32::from(c.zstd) + u32::from(c.lazy);
            match c.backing {
                Backing::Qcow2 => defaults(c),
                _ => n_changed <= 1,
            }
        })
        .collect()
}

/// Combinations qemu-img refuses are exactly those [`Combo::valid`] rejects, and vimg refuses
/// exactly those too (leaving no file behind), over every combination of [`all_combos`].
#[test]
fn invalid_combinations_are_refused_like_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let chains_dir = tmp.path();
    // The backing files only need to exist and be valid for this test.
    let base = chains_dir.join("base.raw");
    std::fs::write(&base, vec![0u8; BASE_SIZE as usize]).unwrap();
    let mid = chains_dir.join("mid.qcow2");
    let mid_args = CreateArgs {
        format: ImageFormat::Qcow2,
        filename: mid.clone(),
        options: vec![],
        backing_file: Some(base.to_str().unwrap().into()),
        backing_format: Some("raw".into()),
        unsafe_backing: false,
        size: Some(MID_SIZE.to_string()),
        opener: Default::default(),
    };
    create(&mid_args).unwrap();
    let chains = Chains {
        dir: chains_dir.to_path_buf(),
        raw_model: vec![],
        qcow2_model: vec![],
    };
    let all = all_combos();
    let n_valid = all.iter().filter(|c| c.valid()).count();
    eprintln!(
        "options_matrix: {} combinations in the product, {n_valid} valid",
        all.len()
    );

    // vimg, on every combination.
    let mut problems = Vec::new();
    let img = tmp.path().join("v.qcow2");
    let data = tmp.path().join("v.data");
    for c in &all {
        let backing = c.backing_file(&chains.dir);
        let args = CreateArgs {
            format: ImageFormat::Qcow2,
            filename: img.clone(),
            options: vec![c.options(data.to_str().unwrap())],
            backing_file: backing
                .as_ref()
                .map(|(p, _)| p.to_str().unwrap().to_string()),
            backing_format: backing.as_ref().map(|(_, f)| f.to_string()),
            unsafe_backing: false,
            size: Some(IMG_SIZE.to_string()),
            opener: Default::default(),
        };
        if c.valid() {
            if let Err(e) = prepare(&args) {
                problems.push(format!("[{c}] vimg refuses a valid combination: {e}"));
            }
        } else {
            match create(&args) {
                Ok(_) => problems.push(format!("[{c}] vimg accepts an invalid combination")),
                Err(_) if img.exists() || data.exists() => {
                    problems.push(format!("[{c}] vimg refused but left a file behind"))
                }
                Err(_) => {}
            }
            let _ = std::fs::remove_file(&img);
            let _ = std::fs::remove_file(&data);
        }
    }

    // qemu-img, on the combinations of combos_to_ask_qemu.
    if qemu_available("invalid_combinations_are_refused_like_qemu") {
        let zstd = qemu_has_zstd(tmp.path());
        let ask: Vec<Combo> = combos_to_ask_qemu()
            .into_iter()
            .filter(|c| zstd || !c.zstd)
            .collect();
        let next = AtomicUsize::new(0);
        let qemu_problems = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for w in 0..4 {
                let (next, ask, chains, qemu_problems) = (&next, &ask, &chains, &qemu_problems);
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(c) = ask.get(i) else { break };
                    let img = chains.dir.join(format!("q{w}.qcow2"));
                    let data = chains.dir.join(format!("q{w}.data"));
                    let opts = c.options(data.to_str().unwrap());
                    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
                    let backing = c.backing_file(&chains.dir);
                    let bname = backing
                        .as_ref()
                        .map(|(p, _)| p.to_str().unwrap().to_string());
                    if let (Some(b), Some((_, f))) = (&bname, &backing) {
                        args.extend(["-b", b, "-F", f]);
                    }
                    let size = (64u64 << 10).to_string();
                    args.extend([img.to_str().unwrap(), &size]);
                    let r = exec("qemu-img", &args);
                    let _ = std::fs::remove_file(&img);
                    let _ = std::fs::remove_file(&data);
                    let (code, out, err) = match r {
                        Ok(r) => r,
                        Err(e) => {
                            qemu_problems.lock().unwrap().push(e);
                            continue;
                        }
                    };
                    if (code == 0) != c.valid() {
                        qemu_problems.lock().unwrap().push(format!(
                            "[{c}] qemu-img create exits {code} but the test's rules say {}: {}{}",
                            if c.valid() { "valid" } else { "invalid" },
                            out.trim(),
                            err.trim()
                        ));
                    }
                });
            }
        });
        eprintln!(
            "options_matrix: asked qemu-img about {} combinations",
            ask.len()
        );
        problems.extend(qemu_problems.into_inner().unwrap());
    }
    problems.sort();
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// With `data_file_raw=on` the data file alone must be the guest disk (qcow2.rst, "autoclear
/// feature bits", bit 1: "writing zeros requires writing to the data file instead of only
/// setting the zero flag"). qemu writes zeros there for zero writes with and without unmap
/// (checked here as the premise); vimg must too. The smallest form of what the matrix's
/// "c. data_file_raw" step finds.
#[test]
fn data_file_raw_zero_writes_reach_the_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut want = vec![0x11u8; 256 << 10];
    want.resize(1 << 20, 0);
    want[4096..8192].fill(0);
    want[65536..131072].fill(0);
    want[131072..196608].fill(0);
    if qemu_available("data_file_raw_zero_writes_reach_the_data_file") {
        let img = tmp.path().join("q.qcow2");
        let data = tmp.path().join("q.data");
        let o = format!("data_file={},data_file_raw=on", data.display());
        common::qemu_create(&img, "qcow2", &o, None, 1 << 20);
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0x11 0 256k".into(),
                "write -z 4096 4096".into(),
                "write -z -u 65536 65536".into(),
                "write -z 131072 65536".into(),
            ],
        )
        .unwrap();
        let got = std::fs::read(&data).unwrap();
        assert_eq!(first_difference(&got, &want), None, "qemu's data file");
    }
    let img = tmp.path().join("v.qcow2");
    let data = tmp.path().join("v.data");
    create(&CreateArgs {
        format: ImageFormat::Qcow2,
        filename: img.clone(),
        options: vec![format!("data_file={},data_file_raw=on", data.display())],
        backing_file: None,
        backing_format: None,
        unsafe_backing: false,
        size: Some("1M".into()),
        opener: Default::default(),
    })
    .unwrap();
    {
        let image = Qcow2Image::open(&img, true, false, &mut ChainGuard::default()).unwrap();
        image
            .write_at(&vec![0x11; 256 << 10], GuestOffset(0))
            .unwrap();
        image.write_zeroes(GuestOffset(4096), 4096, false).unwrap();
        image.write_zeroes(GuestOffset(65536), 65536, true).unwrap();
        image
            .write_zeroes(GuestOffset(131072), 65536, false)
            .unwrap();
        image.flush().unwrap();
        let mut guest = vec![0u8; 1 << 20];
        image.read_at(&mut guest, GuestOffset(0)).unwrap();
        assert_eq!(first_difference(&guest, &want), None, "vimg's guest view");
    }
    let got = std::fs::read(&data).unwrap();
    assert_eq!(
        first_difference(&got, &want),
        None,
        "vimg's data file (data_file_raw=on) is not the guest disk"
    );
}
