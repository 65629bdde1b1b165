//! Shared helpers for the integration tests: finding the qemu oracles, running them, and a
//! small seeded random generator so that failures reproduce.

#![allow(dead_code)]

pub mod chain;
pub mod crashing;
pub mod encrypted;
pub mod loop_device;
pub mod nbd_serve;

use std::path::Path;
use std::process::Command;

/// Whether qemu-img and qemu-io can be run. When they cannot: under `VIMG_REQUIRE_QEMU=1`
/// (as in CI) this panics, so a missing oracle fails loudly; otherwise the caller skips, and
/// this says so on stderr.
pub fn qemu_available(test: &str) -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if !ok {
        if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: qemu-img/qemu-io not found but VIMG_REQUIRE_QEMU=1");
        }
        eprintln!("{test}: skipping: qemu-img/qemu-io not found");
    }
    ok
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that may fail; returns its exit code (-1 if killed) and its stdout followed
/// by its stderr.
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String) {
    status_of(Command::new(cmd).args(args), cmd)
}

/// [`run_status`] with `dir` as the working directory (for relative image names).
pub fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> (i32, String) {
    status_of(Command::new(cmd).current_dir(dir).args(args), cmd)
}

fn status_of(c: &mut Command, cmd: &str) -> (i32, String) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Fails the test listing `failures`, if there are any.
pub fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `qemu-img create -q -f FMT [-o OPTS] [-b BACKING -F BFMT] PATH SIZE`.
pub fn qemu_create(path: &Path, fmt: &str, opts: &str, backing: Option<(&Path, &str)>, size: u64) {
    let p = path.to_str().unwrap();
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let b;
    if let Some((bp, bf)) = backing {
        b = bp.to_str().unwrap().to_string();
        args.extend(["-b", &b, "-F", bf]);
    }
    args.extend([p, &size]);
    run("qemu-img", &args);
}

/// Runs qemu-io commands (`-c CMD` each) on `path` of format `fmt`.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(path.to_str().unwrap().to_string());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run("qemu-io", &a);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io on {}: {out}",
        path.display()
    );
}

/// The guest contents of an image as qemu reads them (`qemu-img convert -O raw`).
pub fn qemu_contents(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.ref.raw",
        path.file_name().unwrap().to_str().unwrap()
    ));
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

/// xorshift64*: a tiny deterministic generator for reproducible random layouts.
pub struct Rng(pub u64);

impl Rng {
    /// A generator for `seed` (any value; zero is fine).
    pub fn seeded(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Whether PyPI's `dissect.archive` (an independent VMA reader) can be imported by python3.
/// Like [`qemu_available`]: under `VIMG_REQUIRE_QEMU=1` a missing module fails the test,
/// otherwise the caller skips and this says so.
pub fn dissect_available(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import dissect.archive.vma"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: python3 module dissect.archive not found but VIMG_REQUIRE_QEMU=1");
        }
        eprintln!("{test}: skipping: python3 module dissect.archive not found");
    }
    ok
}

/// What `dissect.archive` reads from a VMA archive: its configs (name, data) and its devices
/// (id, name, contents), through its Python API.
pub struct DissectView {
    /// Config files, sorted by name.
    pub configs: Vec<(String, Vec<u8>)>,
    /// Devices, by id.
    pub devices: Vec<(u8, String, Vec<u8>)>,
}

/// Reads `archive` with `dissect.archive`'s `VMA` class (configs, and each device's
/// `open().read(size)`), in a scratch directory under `dir`.
pub fn dissect_read(archive: &Path, dir: &Path) -> DissectView {
    let out = dir.join("dissect-out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let script = r#"
import sys, os
from dissect.archive.vma import VMA
arch, out = sys.argv[1], sys.argv[2]
with open(arch, "rb") as fh:
    v = VMA(fh)
    names = open(os.path.join(out, "index"), "w")
    for i, (name, data) in enumerate(sorted(v.configs().items())):
        open(os.path.join(out, "cfg-%d" % i), "wb").write(data)
        names.write("cfg %d %s\n" % (i, name))
    for d in v.devices():
        data = d.open().read(d.size)
        if len(data) != d.size:
            sys.exit("short read of device %s: %d of %d" % (d.name, len(data), d.size))
        open(os.path.join(out, "dev-%d" % d.id), "wb").write(data)
        names.write("dev %d %s\n" % (d.id, d.name))
"#;
    run(
        "python3",
        &[
            "-c",
            script,
            archive.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let index = std::fs::read_to_string(out.join("index")).unwrap();
    let mut view = DissectView {
        configs: Vec::new(),
        devices: Vec::new(),
    };
    for line in index.lines() {
        let mut parts = line.splitn(3, ' ');
        let (kind, n, name) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap_or("").to_string(),
        );
        if kind == "cfg" {
            let data = std::fs::read(out.join(format!("cfg-{n}"))).unwrap();
            view.configs.push((name, data));
        } else {
            let data = std::fs::read(out.join(format!("dev-{n}"))).unwrap();
            view.devices.push((n.parse().unwrap(), name, data));
        }
    }
    std::fs::remove_dir_all(&out).ok();
    view
}

/// The byte offsets of the qcow2 header's fields, from qemu's docs/interop/qcow2.rst
/// ("Header"), written down here rather than taken from vimg, so that the tests that read or
/// damage headers byte by byte do not depend on the code they check.
pub mod header_fields {
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// The 4-byte big-endian qcow2 header field at `field` (a [`header_fields`] offset) of
/// `header`, the first bytes of an image file.
pub fn header_u32(header: &[u8], field: u64) -> u32 {
    let at = field as usize;
    u32::from_be_bytes(header[at..at + 4].try_into().unwrap())
}

/// The 8-byte big-endian qcow2 header field at `field` (a [`header_fields`] offset) of
/// `header`, the first bytes of an image file.
pub fn header_u64(header: &[u8], field: u64) -> u64 {
    let at = field as usize;
    u64::from_be_bytes(header[at..at + 8].try_into().unwrap())
}

/// Writes `bytes` at `offset` of `img` (qemu's `poke_file`).
pub fn poke(img: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// A scratch directory with a link `bin/qemu-img` to vimg, so that vimg runs under qemu-img's
/// name and starts its messages as qemu-img does.
pub struct Scratch {
    /// The directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The link to vimg named qemu-img.
    pub vimg: std::path::PathBuf,
}

impl Scratch {
    /// A new scratch directory with the link.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let vimg = bin.join("qemu-img");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vimg"), &vimg).unwrap();
        Scratch { dir, vimg }
    }

    /// A file in the directory.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}
