//! Command-line tests of `vimg` against qemu-img and qemu-io as oracles.
//!
//! Fixtures are made with qemu's own tools in a temporary directory, with layouts drawn from a
//! seeded generator (several seeds), then `vimg` and `qemu-img` are run on them and their
//! answers compared: `info` and `map` output, `compare` verdicts, `convert -O raw` output bytes
//! and sparseness, `check` reports. Mismatches are collected and reported together.
//!
//! Without qemu-img installed the tests print "skipping: qemu-img not found" and pass, unless
//! `VIMG_REQUIRE_QEMU=1` is set, in which case they fail.

use crate::common::header_fields;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tempfile::TempDir;

/// Seeds for the random layouts.
const SEEDS: &[u64] = &[1, 2, 3, 0x5eed];

// ---------------------------------------------------------------------------------------------
// Running things

/// Whether qemu-img (and qemu-io) can be used. Panics if they are missing but required.
fn qemu() -> bool {
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if found("qemu-img") && found("qemu-io") {
        return true;
    }
    if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("qemu-img/qemu-io not found, and VIMG_REQUIRE_QEMU=1 requires them");
    }
    eprintln!("skipping: qemu-img not found");
    false
}

/// Runs `cmd`, returning its output.
fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The vimg binary with `args`.
fn vimg<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_vimg")).args(args))
}

/// qemu-img with `args`, with snapshot dates in UTC (as vimg prints them).
fn qemu_img<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run(Command::new("qemu-img").env("TZ", "UTC").args(args))
}

/// A temporary directory for one test, removed afterwards unless `VIMG_TEST_KEEP=1` (then its
/// path is printed, to look at the fixtures of a failing run).
struct Scratch {
    path: PathBuf,
    _guard: Option<TempDir>,
}

impl Scratch {
    fn path(&self) -> &Path {
        &self.path
    }
}

fn temp_dir() -> Scratch {
    let t = TempDir::new().expect("tempdir");
    if std::env::var("VIMG_TEST_KEEP").as_deref() == Ok("1") {
        let path = t.keep();
        eprintln!("keeping test files in {}", path.display());
        return Scratch { path, _guard: None };
    }
    Scratch {
        path: t.path().to_path_buf(),
        _guard: Some(t),
    }
}

/// vimg and qemu-img with the same `args`, run at the same time.
fn both<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (Output, Output) {
    let child = Command::new("qemu-img")
        .env("TZ", "UTC")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-img");
    let ours = vimg(args);
    let theirs = child.wait_with_output().expect("wait for qemu-img");
    (ours, theirs)
}

/// When vimg's answer (exit code and standard output) differs from qemu-img's `first`, asks
/// qemu-img again a few times and returns its answer if one of them agrees with vimg.
///
/// qemu-img's block status is not always deterministic: whether it looks for holes under data
/// clusters depends on a heuristic over the host file's allocated size ("does this image look
/// metadata-preallocated?"), and on a freshly written file qemu-img has been seen to answer
/// differently from one run to the next (with the file unchanged and its st_blocks stable).
/// A rerun that disagrees with the first answer is reported on standard error.
fn settle_oracle<S: AsRef<std::ffi::OsStr>>(ours: &Output, first: Output, args: &[S]) -> Output {
    let agree = |o: &Output| code(o) == code(ours) && o.stdout == ours.stdout;
    if agree(&first) {
        return first;
    }
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let again = qemu_img(args);
        if again.stdout != first.stdout || code(&again) != code(&first) {
            eprintln!(
                "NOTE: qemu-img answered differently when asked again (block status heuristic)"
            );
        }
        if agree(&again) {
            return again;
        }
    }
    first
}

/// qemu-img with `args`, which must succeed.
fn qemu_img_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let o = qemu_img(args);
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs qemu-io commands on `img` (format `fmt`); they must succeed.
fn qemu_io(fmt: &str, img: &Path, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(img);
    let o = run(&mut c);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?} on {} failed: {out}{}",
        img.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether two files hold the same bytes (compared directly: hashing is slow in test builds).
fn same_bytes(a: &Path, b: &Path) -> bool {
    match (fs::read(a), fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks() * 512
}

/// Mismatches found so far; the test fails at the end, listing all of them.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn finish(self, test: &str) {
        assert!(
            self.0.is_empty(),
            "{test}: {} mismatch(es):\n\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Random layouts

/// splitmix64: small, seeded, good enough for layouts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Which operations a layer may receive.
#[derive(Clone, Copy)]
struct Ops {
    zero: bool,
    compress: bool,
    discard: bool,
}

/// qemu-io commands writing a random layout into a disk of `size` bytes: patterns at
/// `gran`-aligned offsets, and (as allowed) zero writes, compressed clusters of `cluster`
/// bytes, and discards. qemu writes compressed data only into unallocated clusters, so the
/// compressed writes come first and never overlap.
fn random_ops(rng: &mut Rng, size: u64, gran: u64, cluster: u64, ops: Ops) -> Vec<String> {
    let mut cmds = Vec::new();
    let units = size / gran;
    if units == 0 {
        return cmds;
    }
    let clusters = size / cluster;
    if ops.compress && clusters > 0 {
        let mut used = vec![false; clusters as usize];
        for _ in 0..1 + rng.below(4) {
            let c = rng.below(clusters);
            let k = (1 + rng.below(4)).min(clusters - c);
            if used[c as usize..(c + k) as usize].iter().any(|&u| u) {
                continue;
            }
            used[c as usize..(c + k) as usize].fill(true);
            cmds.push(format!(
                "write -c -P {} {} {}",
                1 + rng.below(255),
                c * cluster,
                k * cluster
            ));
        }
    }
    let n = 3 + rng.below(10);
    for _ in 0..n {
        let kind = rng.below(10);
        let off = rng.below(units) * gran;
        let max_units = (units - off / gran).min(1 + rng.below(48));
        let len = (1 + rng.below(max_units)) * gran;
        match kind {
            5 | 6 if ops.zero => {
                let unmap = if rng.chance(50) { "-u " } else { "" };
                cmds.push(format!("write -z {unmap}{off} {len}"));
            }
            9 if ops.discard => cmds.push(format!("discard {off} {len}")),
            _ => cmds.push(format!("write -P {} {off} {len}", 1 + rng.below(255))),
        }
    }
    cmds
}

/// A test image.
struct Fixture {
    /// What it is, for messages.
    name: String,
    path: PathBuf,
    /// Whether it has a backing file (worth `--backing-chain`).
    chain: bool,
}

/// Creates a qcow2 image with `opts`; returns its path.
fn create_qcow2(dir: &Path, name: &str, opts: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
    ];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    args.push(p.display().to_string());
    args.push(size.to_string());
    qemu_img_ok(&args);
    p
}

/// Whether this qemu-img can write zstd-compressed qcow2 images (Debian's 7.2 cannot).
fn has_zstd(dir: &Path) -> bool {
    let p = dir.join("zstd-probe.qcow2");
    let ok = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        p.to_str().unwrap_or_default(),
        "1M",
    ])
    .status
    .success();
    let _ = fs::remove_file(&p);
    if !ok {
        eprintln!("NOTE: this qemu-img cannot create zstd images; zstd fixtures are skipped");
    }
    ok
}

/// The fixture set for `seed`, created in `dir`.
fn fixtures(dir: &Path, seed: u64) -> Vec<Fixture> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let all = Ops {
        zero: true,
        compress: true,
        discard: true,
    };
    let k64 = 64 << 10;

    // Raw with holes (sizes are multiples of 512: qemu rounds raw sizes up to one).
    let raw_size = (1 + rng.below(48)) * k64 + rng.below(64) * 512;
    let raw = dir.join("holes.raw");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "raw",
        raw.to_str().unwrap(),
        &raw_size.to_string(),
    ]);
    let gran = 512 * (1 + rng.below(16));
    let ops = random_ops(
        &mut rng,
        raw_size,
        gran,
        k64,
        Ops {
            zero: true,
            compress: false,
            discard: true,
        },
    );
    qemu_io("raw", &raw, &ops);
    out.push(Fixture {
        name: format!("raw with holes (seed {seed})"),
        path: raw.clone(),
        chain: false,
    });

    // qcow2 v3 and v2 with a random cluster size.
    for (name, compat) in [("v3.qcow2", "1.1"), ("v2.qcow2", "0.10")] {
        let cs = *rng.pick(&[4096u64, 16384, 65536, 2 << 20]);
        let size = (1 + rng.below(96)) * k64 + rng.below(8) * 512;
        let p = create_qcow2(
            dir,
            name,
            &format!("compat={compat},cluster_size={cs}"),
            size,
        );
        let gran = 512 * (1 + rng.below(64));
        let ops = random_ops(&mut rng, size, gran, cs, all);
        qemu_io("qcow2", &p, &ops);
        out.push(Fixture {
            name: format!("qcow2 compat={compat} cluster_size={cs} (seed {seed})"),
            path: p,
            chain: false,
        });
    }

    // Tiny clusters.
    let size = (1 + rng.below(16)) * k64;
    let p = create_qcow2(dir, "c512.qcow2", "cluster_size=512", size);
    let ops = random_ops(&mut rng, size, 512, 512, all);
    qemu_io("qcow2", &p, &ops);
    out.push(Fixture {
        name: format!("qcow2 cluster_size=512 (seed {seed})"),
        path: p,
        chain: false,
    });

    // Extended L2 entries: subcluster-granular writes.
    let cs = *rng.pick(&[16384u64, 32768, 65536]);
    let size = (1 + rng.below(64)) * k64;
    let p = create_qcow2(
        dir,
        "el2.qcow2",
        &format!("extended_l2=on,cluster_size={cs}"),
        size,
    );
    let gran = cs / 32 * (1 + rng.below(8));
    let ops = random_ops(&mut rng, size, gran, cs, all);
    qemu_io("qcow2", &p, &ops);
    out.push(Fixture {
        name: format!("qcow2 extended_l2 cluster_size={cs} (seed {seed})"),
        path: p,
        chain: false,
    });

    // Compressed images converted from the raw one, deflate and zstd.
    let mut kinds = vec!["zlib"];
    if has_zstd(dir) {
        kinds.push("zstd");
    }
    for ct in kinds {
        let p = dir.join(format!("compressed-{ct}.qcow2"));
        qemu_img_ok(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        out.push(Fixture {
            name: format!("qcow2 compressed {ct} (seed {seed})"),
            path: p,
            chain: false,
        });
    }

    // Preallocated metadata: allocated clusters that read as zeros from holes.
    let size = (1 + rng.below(32)) * k64;
    let p = create_qcow2(dir, "prealloc.qcow2", "preallocation=metadata", size);
    let ops = random_ops(
        &mut rng,
        size,
        4096,
        k64,
        Ops {
            zero: true,
            compress: false,
            discard: false,
        },
    );
    qemu_io("qcow2", &p, &ops);
    out.push(Fixture {
        name: format!("qcow2 preallocation=metadata (seed {seed})"),
        path: p,
        chain: false,
    });

    // External data file.
    let size = (1 + rng.below(32)) * k64;
    // qemu-img resolves a relative data file name against its working directory (vimg against
    // the image's directory): give an absolute one.
    let data = dir.join("datafile.data");
    let p = create_qcow2(
        dir,
        "datafile.qcow2",
        &format!("data_file={}", data.display()),
        size,
    );
    let ops = random_ops(
        &mut rng,
        size,
        4096,
        k64,
        Ops {
            zero: true,
            compress: false,
            discard: true,
        },
    );
    qemu_io("qcow2", &p, &ops);
    out.push(Fixture {
        name: format!("qcow2 with data file (seed {seed})"),
        path: p,
        chain: false,
    });

    // Snapshots and a bitmap.
    let size = (1 + rng.below(32)) * k64;
    let p = create_qcow2(dir, "snap.qcow2", "", size);
    let ops = random_ops(&mut rng, size, 4096, k64, all);
    qemu_io("qcow2", &p, &ops);
    qemu_img_ok(&["snapshot", "-c", "first", p.to_str().unwrap()]);
    let ops = random_ops(
        &mut rng,
        size,
        4096,
        k64,
        Ops {
            zero: true,
            compress: false,
            discard: true,
        },
    );
    qemu_io("qcow2", &p, &ops);
    qemu_img_ok(&[
        "snapshot",
        "-c",
        "a-much-longer-snapshot-name",
        p.to_str().unwrap(),
    ]);
    qemu_img_ok(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    out.push(Fixture {
        name: format!("qcow2 with snapshots and a bitmap (seed {seed})"),
        path: p,
        chain: false,
    });

    // A backing chain of 2 or 3 layers with different sizes; the base is raw or qcow2, and the
    // middle layer lives in a subdirectory (its overlay names it by a relative path).
    let sub = dir.join("sub");
    fs::create_dir_all(&sub).expect("mkdir");
    let base_raw = rng.chance(50);
    let base_size = (1 + rng.below(32)) * k64;
    let base = if base_raw {
        let b = sub.join("base.raw");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "raw",
            b.to_str().unwrap(),
            &base_size.to_string(),
        ]);
        let ops = random_ops(
            &mut rng,
            base_size,
            4096,
            k64,
            Ops {
                zero: true,
                compress: false,
                discard: true,
            },
        );
        qemu_io("raw", &b, &ops);
        b
    } else {
        let b = create_qcow2(&sub, "base.qcow2", "", base_size);
        let ops = random_ops(&mut rng, base_size, 4096, k64, all);
        qemu_io("qcow2", &b, &ops);
        b
    };
    let base_fmt = if base_raw { "raw" } else { "qcow2" };
    let mid_size = (1 + rng.below(48)) * k64;
    let mid = sub.join("mid.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.file_name().unwrap().to_str().unwrap(),
        "-F",
        base_fmt,
        mid.to_str().unwrap(),
        &mid_size.to_string(),
    ]);
    let ops = random_ops(&mut rng, mid_size, 4096, k64, all);
    qemu_io("qcow2", &mid, &ops);
    out.push(Fixture {
        name: format!("2-layer chain over {base_fmt} (seed {seed})"),
        path: mid.clone(),
        chain: true,
    });
    let top_size = (1 + rng.below(48)) * k64;
    let top = dir.join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "sub/mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        &top_size.to_string(),
    ]);
    let ops = random_ops(&mut rng, top_size, 4096, k64, all);
    qemu_io("qcow2", &top, &ops);
    out.push(Fixture {
        name: format!("3-layer chain over {base_fmt} (seed {seed})"),
        path: top,
        chain: true,
    });
    out
}

/// Flushes every file under `dir` to disk. Until a file is written back, the file system may
/// still change its allocated size (st_blocks), which qemu's (and vimg's) metadata
/// preallocation heuristic reads: map output of a fresh image could change under our feet.
fn settle(dir: &Path) {
    for entry in fs::read_dir(dir).expect("readdir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            settle(&path);
        } else if let Ok(f) = fs::File::open(&path) {
            let _ = f.sync_all();
        }
    }
}

/// Builds the fixtures of every seed, each seed in its own directory.
fn all_fixtures(root: &Path) -> Vec<Fixture> {
    SEEDS
        .iter()
        .flat_map(|&seed| {
            let d = root.join(format!("seed-{seed}"));
            fs::create_dir_all(&d).expect("mkdir");
            let f = fixtures(&d, seed);
            settle(&d);
            f
        })
        .collect()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// info

#[test]
fn info_matches_qemu() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let mut m = Mismatches::default();
    for f in all_fixtures(tmp.path()) {
        let mut variants = vec![vec![]];
        if f.chain {
            variants.push(vec!["--backing-chain"]);
        }
        for extra in variants {
            // JSON: equal as parsed values (actual-size included: nothing changes the files
            // between the two runs).
            let mut args = vec!["info", "--output", "json"];
            args.extend(&extra);
            args.push(p(&f.path));
            let (ours, theirs) = both(&args);
            m.check(code(&ours) == 0, || {
                format!(
                    "{} info {extra:?}: vimg failed: {}",
                    f.name,
                    text(&ours.stderr)
                )
            });
            let parse = |o: &Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok();
            let (a, b) = (parse(&ours), parse(&theirs));
            m.check(a.is_some() && a == b, || {
                format!(
                    "{} info --output json {extra:?}:\nvimg:\n{}\nqemu-img:\n{}",
                    f.name,
                    text(&ours.stdout),
                    text(&theirs.stdout)
                )
            });
            // The text is laid out identically too, and so is the JSON.
            m.check(ours.stdout == theirs.stdout, || {
                format!(
                    "{} info --output json {extra:?}: same values, different text",
                    f.name
                )
            });
            let mut args = vec!["info"];
            args.extend(&extra);
            args.push(p(&f.path));
            let (ours, theirs) = both(&args);
            m.check(ours.stdout == theirs.stdout, || {
                format!(
                    "{} info {extra:?} (human):\nvimg:\n{}\nqemu-img:\n{}",
                    f.name,
                    text(&ours.stdout),
                    text(&theirs.stdout)
                )
            });
        }
    }
    m.finish("info_matches_qemu");
}

#[test]
fn info_warns_about_probed_backing_format() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let base = tmp.path().join("base.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", p(&base), "1M"]);
    let top = tmp.path().join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&top),
    ]);
    // Hide the backing format extension by renaming its type to an unknown one.
    let mut data = fs::read(&top).expect("read");
    let at = data
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    data[at..at + 4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    fs::write(&top, data).expect("write");
    for chain in [false, true] {
        let mut args = vec!["info", "--output", "json"];
        if chain {
            args.push("--backing-chain");
        }
        args.push(p(&top));
        let o = vimg(&args);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(
            err.contains("not recorded") && err.contains("probed as raw"),
            "no warning: {err}"
        );
        let a: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let b: serde_json::Value =
            serde_json::from_slice(&qemu_img(&args).stdout).expect("qemu json");
        assert_eq!(a, b);
    }
}

// ---------------------------------------------------------------------------------------------
// map

#[test]
fn map_matches_qemu() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let mut m = Mismatches::default();
    let mut rng = Rng(77);
    for f in all_fixtures(tmp.path()) {
        let size: u64 = serde_json::from_slice::<serde_json::Value>(
            &qemu_img_ok(&["info", "--output", "json", p(&f.path)]).stdout,
        )
        .ok()
        .and_then(|v| v["virtual-size"].as_u64())
        .unwrap_or(0);
        let start = rng.below(size + 1).to_string();
        let len = rng.below(size + 1).to_string();
        let ranges: Vec<Vec<&str>> = vec![
            vec![],
            vec!["--start-offset", &start],
            vec!["--start-offset", &start, "--max-length", &len],
        ];
        for range in &ranges {
            for output in ["json", "human"] {
                let mut args = vec!["map", "--output", output];
                args.extend(range);
                args.push(p(&f.path));
                let (ours, theirs) = both(&args);
                if code(&theirs) != 0 {
                    // qemu-img refuses to show compressed ranges in the text layout; vimg
                    // refuses too, after the same rows.
                    m.check(
                        code(&ours) != 0
                            && theirs.stdout.starts_with(&ours.stdout)
                            && text(&ours.stderr).contains("compressed"),
                        || {
                            format!(
                                "{} {args:?}: qemu-img failed ({}), vimg: exit {}, {}",
                                f.name,
                                text(&theirs.stderr).trim(),
                                code(&ours),
                                text(&ours.stderr).trim()
                            )
                        },
                    );
                    continue;
                }
                let theirs = settle_oracle(&ours, theirs, &args);
                m.check(code(&ours) == 0 && ours.stdout == theirs.stdout, || {
                    format!(
                        "{} {args:?}:\nvimg (exit {}): {}\n{}\nqemu-img:\n{}",
                        f.name,
                        code(&ours),
                        text(&ours.stderr),
                        text(&ours.stdout),
                        text(&theirs.stdout)
                    )
                });
            }
        }
    }
    m.finish("map_matches_qemu");
}

#[test]
fn map_of_empty_ranges_matches_qemu() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let empty = tmp.path().join("empty.raw");
    fs::write(&empty, b"").expect("write");
    let img = tmp.path().join("one.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    let mut m = Mismatches::default();
    for args in [
        vec!["map", "--output", "json", p(&empty)],
        vec!["map", p(&empty)],
        vec!["map", "--output", "json", "--start-offset", "5M", p(&img)],
        vec!["map", "--output", "json", "--start-offset", "1M", p(&img)],
        vec!["map", "--output", "json", "--max-length", "0", p(&img)],
        vec![
            "map",
            "--output",
            "json",
            "--start-offset",
            "1.5k",
            "--max-length",
            "3k",
            p(&img),
        ],
    ] {
        let (ours, theirs) = both(&args);
        m.check(
            code(&ours) == code(&theirs) && ours.stdout == theirs.stdout,
            || {
                format!(
                    "{args:?}: vimg {} {:?}, qemu-img {} {:?}",
                    code(&ours),
                    text(&ours.stdout),
                    code(&theirs),
                    text(&theirs.stdout)
                )
            },
        );
    }
    m.finish("map_of_empty_ranges_matches_qemu");
}

// ---------------------------------------------------------------------------------------------
// compare

/// Runs `compare` with `args` through both tools and records any difference in exit code or
/// printed text.
fn compare_both(m: &mut Mismatches, what: &str, args: &[&str]) {
    let mut full = vec!["compare"];
    full.extend(args);
    let (ours, theirs) = both(&full);
    let theirs = settle_oracle(&ours, theirs, &full);
    m.check(
        code(&ours) == code(&theirs) && ours.stdout == theirs.stdout,
        || {
            format!(
                "{what}: compare {args:?}: vimg exit {} {:?} {:?}, qemu-img exit {} {:?}",
                code(&ours),
                text(&ours.stdout),
                text(&ours.stderr),
                code(&theirs),
                text(&theirs.stdout)
            )
        },
    );
}

#[test]
fn compare_matches_qemu() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let mut m = Mismatches::default();
    let mut rng = Rng(4242);
    for (i, f) in all_fixtures(tmp.path()).into_iter().enumerate() {
        let dir = f.path.parent().expect("dir").to_path_buf();
        let same = dir.join(format!("cmp{i}-same.raw"));
        qemu_img_ok(&["convert", "-q", "-O", "raw", p(&f.path), p(&same)]);
        let same_q = dir.join(format!("cmp{i}-same.qcow2"));
        qemu_img_ok(&["convert", "-q", "-O", "qcow2", p(&f.path), p(&same_q)]);
        let size = fs::metadata(&same).expect("stat").len();
        let name = &f.name;

        // Identical pairs, both orders, lax and strict.
        compare_both(&mut m, name, &[p(&f.path), p(&same)]);
        compare_both(&mut m, name, &[p(&f.path), p(&same_q)]);
        compare_both(&mut m, name, &["-s", p(&f.path), p(&same)]);
        compare_both(&mut m, name, &["-s", p(&f.path), p(&f.path)]);

        // A difference at a random offset.
        if size > 0 {
            let diff = dir.join(format!("cmp{i}-diff.raw"));
            fs::copy(&same, &diff).expect("copy");
            let off = rng.below(size);
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&diff)
                .expect("open");
            let mut b = [0u8];
            file.read_exact_at(&mut b, off).expect("read");
            file.write_all_at(&[b[0] ^ 0x5a], off).expect("write");
            drop(file);
            compare_both(&mut m, name, &[p(&f.path), p(&diff)]);
            compare_both(&mut m, name, &["-q", p(&diff), p(&f.path)]);
        }

        // A larger image whose tail reads as zero, then one with data in its tail.
        let longer = dir.join(format!("cmp{i}-longer.raw"));
        fs::copy(&same, &longer).expect("copy");
        let extra = (1 + rng.below(64)) * 4096;
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&longer)
            .expect("open");
        file.set_len(size + extra).expect("extend");
        compare_both(&mut m, name, &[p(&f.path), p(&longer)]);
        compare_both(&mut m, name, &[p(&longer), p(&f.path)]);
        compare_both(&mut m, name, &["-s", p(&f.path), p(&longer)]);
        let off = size + rng.below(extra);
        file.write_all_at(&[0x42], off).expect("write");
        drop(file);
        compare_both(&mut m, name, &[p(&f.path), p(&longer)]);
        compare_both(&mut m, name, &[p(&longer), p(&f.path)]);
        compare_both(&mut m, name, &["-s", p(&longer), p(&f.path)]);
    }
    m.finish("compare_matches_qemu");
}

#[test]
fn compare_errors_exit_2() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let a = tmp.path().join("a.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", p(&a), "1M"]);
    let missing = tmp.path().join("missing.qcow2");
    for args in [
        vec!["compare", p(&a), p(&missing)],
        vec!["compare", p(&missing), p(&a)],
        vec!["compare", "-f", "qcow2", p(&a), p(&a)],
    ] {
        let (ours, theirs) = both(&args);
        assert_eq!(code(&ours), 2, "{args:?}: {}", text(&ours.stderr));
        assert_eq!(code(&theirs), 2, "{args:?}");
        let err = text(&ours.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("vimg: "), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// convert

#[test]
fn convert_matches_qemu() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let mut m = Mismatches::default();
    for (i, f) in all_fixtures(tmp.path()).into_iter().enumerate() {
        let dir = f.path.parent().expect("dir").to_path_buf();
        let ours = dir.join(format!("conv{i}-vimg.raw"));
        let theirs = dir.join(format!("conv{i}-qemu.raw"));
        let o = vimg(&["convert", "-O", "raw", p(&f.path), p(&ours)]);
        qemu_img_ok(&["convert", "-q", "-O", "raw", p(&f.path), p(&theirs)]);
        if code(&o) != 0 {
            m.check(false, || {
                format!("{}: vimg convert failed: {}", f.name, text(&o.stderr))
            });
            continue;
        }
        m.check(same_bytes(&ours, &theirs), || {
            format!("{}: converted data differs from qemu-img's", f.name)
        });
        m.check(
            fs::metadata(&ours).map(|x| x.len()).ok()
                == fs::metadata(&theirs).map(|x| x.len()).ok(),
            || format!("{}: converted size differs from qemu-img's", f.name),
        );
        // Sparse: not more allocated than qemu-img's output, give or take a little.
        let (a, b) = (allocated(&ours), allocated(&theirs));
        m.check(a <= b + (64 << 10) + b / 50, || {
            format!(
                "{}: vimg output allocates {a} bytes, qemu-img's {b}",
                f.name
            )
        });

        // -S 0: fully allocated, same bytes.
        let full = dir.join(format!("conv{i}-full.raw"));
        let o = vimg(&["convert", "-S", "0", p(&f.path), p(&full)]);
        m.check(code(&o) == 0 && same_bytes(&full, &theirs), || {
            format!("{}: convert -S 0 differs: {}", f.name, text(&o.stderr))
        });
        let len = fs::metadata(&full).map(|x| x.len()).unwrap_or(0);
        m.check(allocated(&full) >= len, || {
            format!("{}: convert -S 0 left holes", f.name)
        });

        // -n into an existing, larger target full of old data, as qemu-img does it.
        let size = fs::metadata(&theirs).expect("stat").len();
        let old = vec![0x77u8; (size + 8192) as usize];
        let (tn_ours, tn_theirs) = (
            dir.join(format!("conv{i}-n-vimg.raw")),
            dir.join(format!("conv{i}-n-qemu.raw")),
        );
        fs::write(&tn_ours, &old).expect("write");
        fs::write(&tn_theirs, &old).expect("write");
        let o = vimg(&["convert", "-n", "-O", "raw", p(&f.path), p(&tn_ours)]);
        qemu_img_ok(&[
            "convert",
            "-q",
            "-n",
            "-O",
            "raw",
            p(&f.path),
            p(&tn_theirs),
        ]);
        m.check(code(&o) == 0 && same_bytes(&tn_ours, &tn_theirs), || {
            format!("{}: convert -n differs: {}", f.name, text(&o.stderr))
        });
    }
    m.finish("convert_matches_qemu");
}

#[test]
fn convert_progress_and_refusals() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let src = tmp.path().join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p(&src), "8M"]);
    qemu_io("qcow2", &src, &["write -P 7 1M 3M".to_string()]);
    let dst = tmp.path().join("dst.raw");

    // Progress on a pipe: qemu-img's text format.
    let o = vimg(&["convert", "-p", "-O", "raw", p(&src), p(&dst)]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
    for step in out.trim_end().split('\r').filter(|s| !s.is_empty()) {
        let v = step
            .trim_start()
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix("/100%)"))
            .unwrap_or_else(|| panic!("bad progress step {step:?}"));
        assert!(v.parse::<f64>().is_ok(), "{step:?}");
    }

    // qcow2 output, plain and compressed: qemu accepts it and reads the same data.
    for extra in [
        &[][..],
        &["-c"][..],
        &["-c", "-o", "compression_type=zstd,cluster_size=4k"][..],
    ] {
        let q = tmp.path().join("out.qcow2");
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend([p(&src), p(&q)]);
        let o = vimg(&args);
        assert_eq!(code(&o), 0, "{extra:?}: {}", text(&o.stderr));
        qemu_img_ok(&["check", "-q", p(&q)]);
        qemu_img_ok(&["compare", "-q", p(&src), p(&q)]);
        std::fs::remove_file(&q).unwrap();
    }
    // Compression needs a qcow2 target: a clear refusal, no output file.
    let r = tmp.path().join("out.raw");
    let o = vimg(&["convert", "-c", "-O", "raw", p(&src), p(&r)]);
    assert_eq!(code(&o), 1);
    assert!(
        text(&o.stderr).contains("needs a qcow2 target"),
        "{}",
        text(&o.stderr)
    );
    assert!(!r.exists());

    // Bad -S values are refused as qemu-img refuses them.
    for s in ["1000", "1x", "32M"] {
        let o = vimg(&["convert", "-S", s, p(&src), p(&dst)]);
        assert_eq!(code(&o), 1, "-S {s}");
        assert_eq!(text(&o.stderr).lines().count(), 1);
    }

    // -n into a smaller target, or a missing one, fails.
    let small = tmp.path().join("small.raw");
    fs::write(&small, vec![0u8; 4096]).expect("write");
    let o = vimg(&["convert", "-n", p(&src), p(&small)]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("small.raw"));
    let o = vimg(&["convert", "-n", p(&src), p(&tmp.path().join("nope.raw"))]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("nope.raw"));
}

#[test]
fn failed_convert_leaves_nothing_behind() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let dir = tmp.path().join("work");
    fs::create_dir(&dir).expect("mkdir");
    let src = dir.join("src.qcow2");
    let raw = dir.join("pattern.raw");
    fs::write(&raw, vec![0xabu8; 4 << 20]).expect("write");
    qemu_img_ok(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        p(&raw),
        p(&src),
    ]);
    fs::remove_file(&raw).expect("rm");
    // Garble the first compressed cluster's data.
    let desc = l2_entry(&src, 1);
    let host = desc & ((1u64 << 54) - 1);
    let f = fs::OpenOptions::new().write(true).open(&src).expect("open");
    f.write_all_at(&[0xff; 64], host).expect("write");
    drop(f);
    let dst = dir.join("out.raw");
    let o = vimg(&["convert", "-O", "raw", p(&src), p(&dst)]);
    assert_eq!(code(&o), 1);
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("src.qcow2"), "{err}");
    let left: Vec<_> = fs::read_dir(&dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("src.qcow2")],
        "left behind: {left:?}"
    );

    // An existing destination survives a failed conversion untouched.
    fs::write(&dst, b"precious").expect("write");
    let o = vimg(&["convert", "-O", "raw", p(&src), p(&dst)]);
    assert_eq!(code(&o), 1);
    assert_eq!(fs::read(&dst).expect("read"), b"precious");
}

/// The first L2 entry of a qcow2 image (default options: one L2 table), word `index` of it.
fn l2_entry(path: &Path, index: u64) -> u64 {
    let f = fs::File::open(path).expect("open");
    let word = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).expect("read");
        u64::from_be_bytes(b)
    };
    let l1 = word(40);
    let l2 = word(l1) & 0x00ff_ffff_ffff_fe00;
    word(l2 + 8 * (index - 1))
}

// ---------------------------------------------------------------------------------------------
// check

#[test]
fn check_matches_qemu() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let mut m = Mismatches::default();
    let mut images: Vec<(String, PathBuf)> = all_fixtures(tmp.path())
        .into_iter()
        .filter(|f| !f.name.starts_with("raw"))
        .map(|f| (f.name, f.path))
        .collect();

    // A leaked cluster and a doubly referenced one.
    for (what, fix) in [("leak", 0u8), ("corruption", 1)] {
        let img = tmp.path().join(format!("{what}.qcow2"));
        qemu_img_ok(&["create", "-q", "-f", "qcow2", p(&img), "1M"]);
        qemu_io("qcow2", &img, &["write -P 1 0 128k".to_string()]);
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .expect("open");
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 40).expect("read");
        let l1 = u64::from_be_bytes(b);
        f.read_exact_at(&mut b, l1).expect("read");
        let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
        if fix == 0 {
            f.write_all_at(&[0; 8], l2 + 8).expect("write");
        } else {
            f.read_exact_at(&mut b, l2).expect("read");
            f.write_all_at(&b, l2 + 8).expect("write");
        }
        images.push((format!("image with a {what}"), img));
    }

    for (name, path) in &images {
        for output in ["human", "json"] {
            let args = ["check", "--output", output, p(path)];
            let (ours, theirs) = both(&args);
            m.check(
                code(&ours) == code(&theirs) && ours.stdout == theirs.stdout,
                || {
                    format!(
                        "{name}: {args:?}:\nvimg (exit {}): {}{}\nqemu-img (exit {}):\n{}",
                        code(&ours),
                        text(&ours.stderr),
                        text(&ours.stdout),
                        code(&theirs),
                        text(&theirs.stdout)
                    )
                },
            );
        }
    }

    // Raw has no check.
    let raw = tmp.path().join("plain.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", p(&raw), "1M"]);
    let o = vimg(&["check", p(&raw)]);
    m.check(code(&o) == 63, || format!("raw check exit {}", code(&o)));
    m.check(text(&o.stderr).contains("does not support checks"), || {
        format!("raw check message: {}", text(&o.stderr))
    });
    m.finish("check_matches_qemu");
}

// ---------------------------------------------------------------------------------------------
// errors

#[test]
fn errors_are_one_line_naming_the_file() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let d = tmp.path();
    let missing = d.join("missing.img");
    let good = d.join("good.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p(&good), "1M"]);

    // Damaged images: bad version, L1 table beyond the end, truncated header, not qcow2.
    let bad_version = d.join("bad-version.qcow2");
    fs::copy(&good, &bad_version).expect("copy");
    fs::OpenOptions::new()
        .write(true)
        .open(&bad_version)
        .and_then(|f| f.write_all_at(&[0, 0, 0, 9], header_fields::VERSION))
        .expect("write");
    let bad_l1 = d.join("bad-l1.qcow2");
    fs::copy(&good, &bad_l1).expect("copy");
    fs::OpenOptions::new()
        .write(true)
        .open(&bad_l1)
        .and_then(|f| f.write_all_at(&(1u64 << 40).to_be_bytes(), header_fields::L1_TABLE_OFFSET))
        .expect("write");
    let truncated = d.join("truncated.qcow2");
    fs::write(&truncated, &fs::read(&good).expect("read")[..50]).expect("write");
    let out = d.join("out.raw");

    let mut m = Mismatches::default();
    for img in [&missing, &bad_version, &bad_l1, &truncated] {
        let name = img.file_name().unwrap().to_str().unwrap();
        for args in [
            vec!["info", p(img)],
            vec!["info", "--output", "json", p(img)],
            vec!["map", p(img)],
            vec!["check", p(img)],
            vec!["compare", p(img), p(&good)],
            vec!["convert", "-O", "raw", p(img), p(&out)],
        ] {
            let o = vimg(&args);
            let err = text(&o.stderr);
            m.check(
                code(&o) != 0
                    && err.lines().count() == 1
                    && err.starts_with("vimg: ")
                    && err.contains(name),
                || format!("{args:?}: exit {}, stderr {err:?}", code(&o)),
            );
            m.check(o.stdout.is_empty(), || {
                format!("{args:?}: printed {:?}", text(&o.stdout))
            });
        }
    }
    m.check(!out.exists(), || "a failed convert left its output".into());
    // A raw file is not qcow2.
    let raw = d.join("plain.raw");
    fs::write(&raw, vec![0u8; 65536]).expect("write");
    let o = vimg(&["info", "-f", "qcow2", p(&raw)]);
    m.check(
        code(&o) == 1 && text(&o.stderr).contains("plain.raw"),
        || format!("info -f qcow2 on raw: {} {}", code(&o), text(&o.stderr)),
    );

    // Bad arguments: exit 1, one line.
    for args in [
        vec!["info"],
        vec!["info", "--output", "xml", p(&good)],
        vec!["map", "--start-offset", "-1", p(&good)],
        vec!["map", "--max-length", "1x", p(&good)],
        vec!["compare", p(&good)],
        vec!["convert", "-f", "vmdk", p(&good), p(&out)],
        vec!["frobnicate"],
        vec!["info", "--bogus", p(&good)],
    ] {
        let o = vimg(&args);
        let err = text(&o.stderr);
        m.check(
            code(&o) == 1 && err.lines().count() == 1 && err.starts_with("vimg: "),
            || format!("{args:?}: exit {}, stderr {err:?}", code(&o)),
        );
    }
    let o = vimg(&["--version"]);
    m.check(
        code(&o) == 0 && text(&o.stdout).starts_with("vimg "),
        || format!("--version: {}", text(&o.stdout)),
    );
    m.finish("errors_are_one_line_naming_the_file");
}

#[test]
fn force_share_is_accepted() {
    if !qemu() {
        return;
    }
    let tmp = temp_dir();
    let img = tmp.path().join("a.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    for args in [
        vec!["info", "-U", p(&img)],
        vec!["info", "--force-share", p(&img)],
        vec!["map", "-U", p(&img)],
        vec!["check", "-U", p(&img)],
        vec!["compare", "-U", p(&img), p(&img)],
    ] {
        let o = vimg(&args);
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o.stderr));
    }
    let _ = std::io::stderr().flush();
}

#[test]
fn convert_writes_through_symlinks_and_keeps_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = temp_dir();
    let src = tmp.path().join("src.raw");
    let mut data = vec![0u8; 3 << 20];
    data[5000..9000].fill(0x11);
    data[(2 << 20) + 17] = 0x22;
    fs::write(&src, &data).expect("write");
    let real = tmp.path().join("real.raw");
    fs::write(&real, b"old").expect("write");
    fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).expect("chmod");
    let link = tmp.path().join("link.raw");
    std::os::unix::fs::symlink("real.raw", &link).expect("symlink");
    let o = vimg(&["convert", "-f", "raw", "-O", "raw", p(&src), p(&link)]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(fs::symlink_metadata(&link)
        .expect("stat")
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(&real).expect("read"), data);
    let mode = fs::metadata(&real).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Mostly zeros: mostly holes.
    assert!(
        allocated(&real) <= 64 << 10,
        "{} bytes allocated",
        allocated(&real)
    );
}
