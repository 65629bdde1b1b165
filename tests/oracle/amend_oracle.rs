//! `vimg amend` against `qemu-img amend` as the oracle.
//!
//! Images qemu made (data, compressed, preallocated and plain zero clusters, internal
//! snapshots, backing files; 512-byte, 64 KiB and 2 MiB clusters; versions 2 and 3) go
//! through chains of amends; every amend is done by vimg on one copy and by qemu-img on
//! another. Both must succeed or fail alike (same exit code; a refused amend leaves vimg's copy
//! byte for byte unchanged). After a successful one: `qemu-img check` finds vimg's copy clean,
//! `qemu-img compare` finds it identical to qemu's, the guest data is what it was (a resized
//! disk: the kept part, and zeros after it), `qemu-img info` shows the same format-specific
//! data, size, backing file and snapshots for both, every snapshot reads as before
//! (`qemu-img convert -l`), and qemu-io writes to a copy of vimg's result read back right.
//!
//! Where vimg deliberately differs from qemu-img 10.0.2 (downgrading images with
//! bitmaps, or renaming the data file to one that does not exist, which qemu does and leaves
//! leaked clusters or an image it cannot open; zeroing a preallocated zero cluster shared with
//! a snapshot, where qemu erases the snapshot's data), the tests say what vimg does instead.
//!
//! The crash test interrupts amends (refcount width changes, downgrades, an upgrade) at every
//! write, failing or dropping the writes after it: the image left behind must pass
//! `qemu-img check` (leaked clusters allowed), read as before, have the old or the new
//! header, keep its snapshots, and accept the same amend again. The kill test does the same
//! with `kill -9` of the real vimg process at spread-out moments.

use crate::common;
use crate::common::header_fields;

use common::crashing::{Crashing, Mode};
use common::{qemu_available, qemu_create, qemu_io, run, run_status};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use vimg::open::ChainGuard;
use vimg::qcow2::AmendOptions;
use vimg::qcow2::Qcow2Image;
use vimg::storage::FileStorage;
use vimg::GuestOffset;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

/// A scratch directory, on tmpfs where there is one (syncs cost nothing there).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs vimg, returning (exit code, stdout, stderr).
fn vimg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(VIMG).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` in `dir`, returning its exit code and its stdout followed by its stderr.
fn in_dir(dir: &Path, cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img check`'s exit code.
fn check_code(img: &Path) -> (i32, String) {
    run_status("qemu-img", &["check", s(img)])
}

/// The guest contents of `img` (of snapshot `snap` when given), as qemu reads them.
fn contents(img: &Path, snap: Option<&str>) -> Vec<u8> {
    let out = img.with_extension("dump.raw");
    let mut args = vec!["convert"];
    if let Some(n) = snap {
        args.extend(["-l", n]);
    }
    args.extend(["-O", "raw", s(img), s(&out)]);
    run("qemu-img", &args);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

/// What `qemu-img info` shows that an amend decides: sizes, backing file, snapshots and the
/// format-specific data.
fn info(img: &Path) -> Value {
    let text = run("qemu-img", &["info", "--output=json", s(img)]);
    let v: Value = serde_json::from_str(&text).unwrap();
    let keep = [
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "snapshots",
        "format-specific",
    ];
    Value::Object(
        keep.iter()
            .filter_map(|k| v.get(*k).map(|x| (k.to_string(), x.clone())))
            .collect(),
    )
}

/// Runs qemu-io commands, tolerating nothing but success.
fn io(img: &Path, cmds: &[String]) {
    qemu_io(img, "qcow2", cmds);
}

/// An image qemu built, with the names of its snapshots.
struct Image {
    path: PathBuf,
    snaps: Vec<String>,
}

/// A version 3 (or, with `v2`, version 2) image with clusters of `cs` bytes holding data,
/// compressed clusters, preallocated and plain zero clusters (v3), discarded clusters and two
/// snapshots taken between writes.
fn rich(dir: &Path, name: &str, cs: u64, extra_opts: &str) -> Image {
    let path = dir.join(name);
    let size = 32 * cs.max(64 << 10);
    let mut opts = format!("cluster_size={cs}");
    if !extra_opts.is_empty() {
        opts = format!("{opts},{extra_opts}");
    }
    qemu_create(&path, "qcow2", &opts, None, size);
    let u = |n: u64| n * cs;
    io(
        &path,
        &[
            format!("write -P 0x11 0 {}", u(8)),
            format!("write -c -P 0x22 {} {}", u(8), u(2)),
            format!("write -z {} {}", u(2), u(1)),
            format!("write -z -u {} {}", u(3), u(1)),
            format!("write -z {} {}", u(12), u(2)),
            format!("write -P 0x12 {} 777", u(16) + 100),
        ],
    );
    run("qemu-img", &["snapshot", "-c", "s1", s(&path)]);
    io(
        &path,
        &[
            format!("write -P 0x33 {} {}", u(4), u(1)),
            format!("write -z {} {}", u(14), u(1)),
            format!("write -P 0x34 {} {}", u(24), u(2)),
            format!("write -z {} {}", u(25), u(1)),
        ],
    );
    run("qemu-img", &["snapshot", "-c", "s2", s(&path)]);
    io(
        &path,
        &[
            format!("write -P 0x44 {} {}", u(20), u(3)),
            format!("discard {} {}", u(6), u(1)),
            format!("write -c -P 0x45 {} {}", u(28), u(1)),
        ],
    );
    Image {
        path,
        snaps: vec!["s1".into(), "s2".into()],
    }
}

/// An overlay (clusters of `cs` bytes, 32 of them, or 2 MiB if smaller) over a longer qcow2
/// backing file full of data: its own data, plain zero clusters over backing data, a
/// preallocated zero cluster and a snapshot.
fn backed(dir: &Path, name: &str, cs: u64) -> Image {
    let base = dir.join(format!("{name}.base.qcow2"));
    let path = dir.join(name);
    let size = 32 * cs.max(64 << 10);
    qemu_create(
        &base,
        "qcow2",
        &format!("cluster_size={cs}"),
        None,
        size * 3 / 2,
    );
    io(&base, &[format!("write -P 0x99 0 {}", size * 3 / 2)]);
    qemu_create(
        &path,
        "qcow2",
        &format!("cluster_size={cs}"),
        Some((&base, "qcow2")),
        size,
    );
    let u = |n: u64| n * cs;
    io(
        &path,
        &[
            format!("write -P 0x55 0 {}", u(2)),
            format!("write -z {} {}", u(2), u(2)),
            format!("write -z -u {} {}", u(4), u(1)),
            format!("write -P 0x56 {} {}", u(6), u(1)),
            format!("write -z {} {}", u(6), u(1)),
        ],
    );
    run("qemu-img", &["snapshot", "-c", "s1", s(&path)]);
    io(
        &path,
        &[
            format!("write -z {} {}", u(8), u(1)),
            format!("write -P 0x57 {} {}", u(9), 4096.min(cs)),
        ],
    );
    Image {
        path,
        snaps: vec!["s1".into()],
    }
}

/// Plain data in a version 3 image without snapshots (every refcount is 1).
fn plain(dir: &Path, name: &str, cs: u64) -> Image {
    let path = dir.join(name);
    let size = 32 * cs.max(64 << 10);
    qemu_create(&path, "qcow2", &format!("cluster_size={cs}"), None, size);
    io(
        &path,
        &[
            format!("write -P 0x61 0 {}", 5 * cs),
            format!("write -P 0x62 {} {}", 17 * cs + 3 * 512, 2 * cs),
        ],
    );
    Image {
        path,
        snaps: Vec::new(),
    }
}

/// vimg's copy and qemu's copy of one image, amended in lockstep.
struct Pair {
    v: PathBuf,
    q: PathBuf,
    snaps: Vec<String>,
    /// The guest contents (active disk, then each snapshot) before the amends.
    active: Vec<u8>,
    snapshots: Vec<Vec<u8>>,
    steps: usize,
}

impl Pair {
    fn new(img: &Image) -> Pair {
        let v = img.path.with_extension("vimg.qcow2");
        let q = img.path.with_extension("qemu.qcow2");
        std::fs::copy(&img.path, &v).unwrap();
        std::fs::copy(&img.path, &q).unwrap();
        Pair {
            active: contents(&img.path, None),
            snapshots: img
                .snaps
                .iter()
                .map(|n| contents(&img.path, Some(n)))
                .collect(),
            v,
            q,
            snaps: img.snaps.clone(),
            steps: 0,
        }
    }

    /// Amends both copies with `opts`; `ok` says whether qemu-img is expected to succeed (so
    /// that a chain cannot silently turn into a list of refusals).
    fn amend(&mut self, opts: &str, ok: bool) {
        self.steps += 1;
        let what = format!("{} step {} (-o {opts})", self.v.display(), self.steps);
        let before = std::fs::read(&self.v).unwrap();
        let (cv, _, ev) = vimg(&["amend", "-o", opts, s(&self.v)]);
        let (cq, oq) = run_status("qemu-img", &["amend", "-o", opts, s(&self.q)]);
        assert_eq!(cq == 0, ok, "{what}: qemu-img exit {cq}: {oq}");
        assert_eq!(
            cv, cq,
            "{what}: vimg exit {cv} ({ev}), qemu-img exit {cq} ({oq})"
        );
        if cv != 0 {
            assert!(
                std::fs::read(&self.v).unwrap() == before,
                "{what}: a refused amend changed the image"
            );
            return;
        }
        let (code, out) = check_code(&self.v);
        assert_eq!(code, 0, "{what}: qemu-img check: {out}");
        let (code, out) = run_status("qemu-img", &["compare", s(&self.v), s(&self.q)]);
        assert_eq!(code, 0, "{what}: compare with qemu's result: {out}");
        assert_eq!(
            info(&self.v),
            info(&self.q),
            "{what}: qemu-img info differs"
        );
        // What lies past an old end after a resize is what qemu-img's result holds there
        // (compared above): the backing file's data, or a partial last cluster's old bytes.
        let now = contents(&self.v, None);
        assert!(
            same_prefix(&now, &self.active),
            "{what}: guest data changed"
        );
        for (n, want) in self.snaps.iter().zip(&self.snapshots) {
            // qemu-img reads a snapshot at the image's current size.
            let got = contents(&self.v, Some(n));
            assert!(same_prefix(&got, want), "{what}: snapshot {n} changed");
            assert!(
                got == contents(&self.q, Some(n)),
                "{what}: snapshot {n} differs from qemu's"
            );
        }
        if now.len() < self.active.len() {
            self.active = now;
        }
        qemu_writes_read_back(&self.v, &what);
    }

    /// Changes the refcount width of both copies: with qemu-img as for any amend, except for
    /// 2 MiB clusters, where qemu-img 10 takes minutes for it: there vimg's result must show
    /// the new width and otherwise the same `qemu-img info` as before, pass the same checks,
    /// and becomes qemu's copy too.
    fn refcount(&mut self, bits: u32, ok: bool, cs: u64) {
        let opts = format!("refcount_bits={bits}");
        if cs < 2 << 20 {
            return self.amend(&opts, ok);
        }
        self.steps += 1;
        let what = format!(
            "{} step {} (-o {opts}, vimg only)",
            self.v.display(),
            self.steps
        );
        let mut want = info(&self.v);
        let before = std::fs::read(&self.v).unwrap();
        let (cv, _, ev) = vimg(&["amend", "-o", &opts, s(&self.v)]);
        assert_eq!(cv == 0, ok, "{what}: vimg exit {cv}: {ev}");
        if cv != 0 {
            assert!(std::fs::read(&self.v).unwrap() == before, "{what}: changed");
            return;
        }
        want["format-specific"]["data"]["refcount-bits"] = bits.into();
        assert_eq!(info(&self.v), want, "{what}");
        let (code, out) = check_code(&self.v);
        assert_eq!(code, 0, "{what}: qemu-img check: {out}");
        assert!(
            contents(&self.v, None) == contents(&self.q, None),
            "{what}: guest data changed"
        );
        for (n, want) in self.snaps.iter().zip(&self.snapshots) {
            let got = contents(&self.v, Some(n));
            assert!(
                same_prefix(&got, want) && got == contents(&self.q, Some(n)),
                "{what}: snapshot {n} changed"
            );
        }
        qemu_writes_read_back(&self.v, &what);
        std::fs::copy(&self.v, &self.q).unwrap();
    }
}

/// Whether `now` and `before` (disk contents before and after a resize) agree as far as both
/// reach.
fn same_prefix(now: &[u8], before: &[u8]) -> bool {
    let kept = now.len().min(before.len());
    now[..kept] == before[..kept]
}

/// qemu-io writes to a copy of `img` (at the start and the end of the disk) read back as
/// written, and `qemu-img check` stays clean.
fn qemu_writes_read_back(img: &Path, what: &str) {
    let w = img.with_extension("writes.qcow2");
    std::fs::copy(img, &w).unwrap();
    let size: u64 = info(&w)["virtual-size"].as_u64().unwrap();
    let tail = size - 8192;
    io(
        &w,
        &[
            "write -P 0x5a 1000 70000".into(),
            format!("write -P 0x5b {tail} 8192"),
            "read -P 0x5a 1000 70000".into(),
            format!("read -P 0x5b {tail} 8192"),
        ],
    );
    let (code, out) = check_code(&w);
    assert_eq!(code, 0, "{what}: check after qemu-io writes: {out}");
    std::fs::remove_file(&w).ok();
}

const CLUSTER_SIZES: [u64; 3] = [512, 65536, 2 << 20];

#[test]
fn refcount_widths_1_to_64_as_qemu_img() {
    if !qemu_available("amend_oracle refcount widths") {
        return;
    }
    let dir = scratch();
    for cs in CLUSTER_SIZES {
        // Every refcount is 1: every width, from and to every other along the chain.
        let img = plain(dir.path(), &format!("plain-{cs}.qcow2"), cs);
        let mut p = Pair::new(&img);
        for bits in [1, 64, 2, 32, 4, 8, 16, 1, 16] {
            p.refcount(bits, true, cs);
        }
        // Snapshots, compressed clusters: refcounts above 1, which narrow widths refuse.
        let img = rich(dir.path(), &format!("rich-{cs}.qcow2"), cs, "");
        let mut p = Pair::new(&img);
        p.refcount(8, true, cs);
        p.refcount(64, true, cs);
        p.refcount(1, false, cs);
        p.refcount(32, true, cs);
        p.amend("lazy_refcounts=on", true);
        p.refcount(16, true, cs);
        p.amend("lazy_refcounts=off", true);
        if cs < 2 << 20 {
            p.amend("refcount_bits=8,lazy_refcounts=on", true);
            p.amend("refcount_bits=16,lazy_refcounts=off", true);
        }
    }
}

#[test]
fn compat_downgrade_and_upgrade_as_qemu_img() {
    if !qemu_available("amend_oracle compat") {
        return;
    }
    let dir = scratch();
    for cs in CLUSTER_SIZES {
        // Zero clusters of the active disk and of both snapshots are expanded.
        let img = rich(
            dir.path(),
            &format!("rich-{cs}.qcow2"),
            cs,
            "lazy_refcounts=on",
        );
        let mut p = Pair::new(&img);
        p.amend("compat=0.10", true);
        p.amend("lazy_refcounts=on", false);
        p.amend("refcount_bits=8", false);
        if cs < 2 << 20 {
            p.amend("compat=1.1,refcount_bits=64,lazy_refcounts=on", true);
        } else {
            p.amend("compat=1.1,lazy_refcounts=on", true);
            p.refcount(64, true, cs);
        }
        p.amend("compat=0.10", false); // needs 16-bit refcounts
        if cs < 2 << 20 {
            p.amend("compat=0.10,refcount_bits=16", true);
        } else {
            p.refcount(16, true, cs);
            p.amend("compat=0.10", true);
        }
        p.amend("compat=v3", true);

        // Over a backing file, zero clusters become zeroed clusters; resizing a version 2
        // image with snapshots is refused; growing over a longer backing file reads zeros.
        let img = backed(dir.path(), &format!("backed-{cs}.qcow2"), cs);
        let size = 32 * cs.max(64 << 10);
        let mut p = Pair::new(&img);
        p.amend("compat=0.10", true);
        p.amend(&format!("size={}", size + 8 * cs), false);
        p.amend(&format!("compat=1.1,size={}", size + 8 * cs), true);
        p.amend(&format!("size={}", size / 2), true);
        p.amend("compat=0.10", false); // the snapshot has another disk size
        p.amend(&format!("compat=0.10,size={size}"), true);
    }
    // Version 2 images qemu made: upgraded, then changed as version 3.
    let img = dir.path().join("v2.qcow2");
    qemu_create(
        &img,
        "qcow2",
        "compat=0.10,cluster_size=4096",
        None,
        8 << 20,
    );
    io(&img, &["write -P 0x71 0 300k".into()]);
    run("qemu-img", &["snapshot", "-c", "old", s(&img)]);
    io(
        &img,
        &["write -z 4k 8k".into(), "write -P 0x72 1M 5k".into()],
    );
    let mut p = Pair::new(&Image {
        path: img,
        snaps: vec!["old".into()],
    });
    p.amend("compat=1.1", true);
    p.amend("refcount_bits=2", true);
    p.amend("compat=0.10", false);
    p.amend("refcount_bits=16,compat=0.10", true);
}

#[test]
fn size_changes_as_qemu_img() {
    if !qemu_available("amend_oracle size") {
        return;
    }
    let dir = scratch();
    for cs in CLUSTER_SIZES {
        let img = rich(dir.path(), &format!("rich-{cs}.qcow2"), cs, "");
        let size = 32 * cs.max(64 << 10);
        let mut p = Pair::new(&img);
        p.amend(&format!("size={}", size * 4), true); // the L1 table may move
        p.amend(&format!("size={}", size / 4 + 512), true); // snapshots keep their size
        p.amend("size=0", true); // qemu's "not given"
        p.amend(&format!("size={}", size / 4 + 512), true); // unchanged
        p.amend("size=1000", false);
        if cs < 2 << 20 {
            p.amend(&format!("size={size},refcount_bits=1"), false);
            p.amend(&format!("size={size},refcount_bits=32"), true);
        } else {
            p.amend(&format!("size={size}"), true);
        }
    }
}

#[test]
fn dirty_images_get_their_refcounts_first() {
    if !qemu_available("amend_oracle dirty") {
        return;
    }
    let dir = scratch();
    for (i, opts) in ["lazy_refcounts=off", "refcount_bits=4", "compat=0.10"]
        .iter()
        .enumerate()
    {
        let path = dir.path().join(format!("dirty{i}.qcow2"));
        qemu_create(
            &path,
            "qcow2",
            "lazy_refcounts=on,cluster_size=4096",
            None,
            8 << 20,
        );
        io(
            &path,
            &["write -P 0x91 0 1M".into(), "write -z 8k 64k".into()],
        );
        run("qemu-img", &["snapshot", "-c", "s", s(&path)]);
        // Killed with refcounts not written back: the image is left dirty.
        let _ = run_status(
            "qemu-io",
            &["-c", "write -P 0x92 2M 1M", "-c", "sigraise 9", s(&path)],
        );
        let b = std::fs::read(&path).unwrap();
        let incompat = common::header_u64(&b, header_fields::INCOMPATIBLE_FEATURES);
        assert_eq!(incompat & 1, 1, "not dirty");
        let mut p = Pair::new(&Image {
            path,
            snaps: vec!["s".into()],
        });
        p.amend(opts, true);
    }
}

/// Creates `name` in `dir` with `qemu-img create -o OPTS` (16 MiB), then runs `setup` in
/// `dir` (so that relative names, such as a data file's, stay in `dir`).
fn make(dir: &Path, name: &str, opts: &str, setup: &str) -> PathBuf {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let o = if opts.is_empty() {
        String::new()
    } else {
        format!("-o '{opts}'")
    };
    let mut script = format!(
        "cd '{}' && qemu-img create -q -f qcow2 {o} {name} 16M",
        dir.display()
    );
    if !setup.is_empty() {
        script = format!("{script} && {setup}");
    }
    let (code, out) = run_status("sh", &["-c", &script]);
    assert_eq!(code, 0, "{script}: {out}");
    path
}

#[test]
fn refusals_match_qemu_img() {
    if !qemu_available("amend_oracle refusals") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    // (create options, setup, amend options, vimg says what qemu says)
    let cases: &[(&str, &str, &str, bool)] = &[
        ("", "", "cluster_size=4k", true),
        ("", "", "preallocation=metadata", true),
        ("", "", "compression_type=zstd", true),
        ("", "", "extended_l2=on", true),
        ("", "", "encryption=on", true),
        ("", "", "encrypt.format=luks", true),
        ("", "", "encrypt.new-secret=x", true),
        ("", "", "foo=bar", true),
        ("", "", "compat=0.9", true),
        ("", "", "refcount_bits=3", true),
        ("", "", "refcount_bits=128", true),
        ("", "", "lazy_refcounts=maybe", false),
        ("", "", "size=1000", true),
        ("", "", "", false),
        ("", "", "data_file=x.raw", true),
        ("", "", "data_file_raw=on", true),
        ("compat=0.10", "", "lazy_refcounts=on", true),
        ("compat=0.10", "", "refcount_bits=8", true),
        ("", "", "compat=0.10,refcount_bits=8", true),
        ("", "", "compat=0.10,lazy_refcounts=on", true),
        ("refcount_bits=8", "", "compat=0.10", true),
        ("extended_l2=on", "", "compat=0.10", true),
        ("data_file=d.raw", "", "compat=0.10", true),
        (
            "compression_type=zstd",
            "qemu-io -c 'write -c -P 3 0 64k' t.qcow2",
            "compat=0.10",
            true,
        ),
        (
            "",
            "qemu-img snapshot -c s1 t.qcow2 && qemu-img resize -q t.qcow2 32M",
            "compat=0.10",
            true,
        ),
        (
            "",
            "qemu-io -c 'write -P 3 0 64k' t.qcow2 && qemu-img snapshot -c s1 t.qcow2",
            "refcount_bits=1",
            true,
        ),
        (
            "compat=0.10",
            "qemu-img snapshot -c s1 t.qcow2",
            "size=32M",
            true,
        ),
        // Version 2 cannot make the grown area read as zeros over a longer backing file.
        (
            "",
            "qemu-img create -q -f qcow2 b.qcow2 64M && rm t.qcow2 && \
             qemu-img create -q -f qcow2 -o compat=0.10 -b b.qcow2 -F qcow2 t.qcow2 16M",
            "size=32M",
            false,
        ),
    ];
    for &(create, setup, opts, same_message) in cases {
        let img = make(d, "t.qcow2", create, setup);
        let q = d.join("q.qcow2");
        std::fs::copy(&img, &q).unwrap();
        let before = std::fs::read(&img).unwrap();
        // In the directory, as qemu-img finds relative data file names from there.
        let (cv, ev) = in_dir(d, VIMG, &["amend", "-o", opts, "t.qcow2"]);
        let (cq, oq) = in_dir(d, "qemu-img", &["amend", "-o", opts, "q.qcow2"]);
        let what = format!("create -o '{create}', {setup}, amend -o '{opts}'");
        assert_ne!(cq, 0, "{what}: qemu-img accepted it: {oq}");
        assert_eq!(
            cv, cq,
            "{what}: vimg exit {cv} ({ev}), qemu-img {cq} ({oq})"
        );
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{what}: refused, yet the image changed"
        );
        let first = oq.lines().next().unwrap_or("");
        let msg = first.strip_prefix("qemu-img: ").unwrap_or(first);
        if same_message {
            assert!(
                ev.contains(msg),
                "{what}: vimg said {ev:?}, qemu-img {msg:?}"
            );
        }
        let lines = if same_message { oq.lines().count() } else { 1 };
        assert_eq!(ev.lines().count(), lines, "{what}: {ev:?} against {oq:?}");
    }

    // Command-line errors.
    let img = make(d, "t.qcow2", "", "");
    let raw = d.join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let missing = d.join("missing.qcow2");
    let cases: &[&[&str]] = &[
        &["amend", s(&img)],
        &["amend", "-o", "lazy_refcounts=on"],
        &["amend", "-t", "foo", "-o", "lazy_refcounts=on", s(&img)],
        &["amend", "-f", "raw", "-o", "size=2M", s(&raw)],
        &["amend", "-o", "size=2M", s(&raw)],
        &["amend", "-o", "lazy_refcounts=on", s(&missing)],
    ];
    for args in cases {
        let (cv, _, ev) = vimg(args);
        let (cq, oq) = run_status("qemu-img", args);
        assert_ne!(cq, 0, "{args:?}: qemu-img accepted it");
        assert_eq!(cv, cq, "{args:?}: vimg {cv} ({ev}), qemu-img {cq} ({oq})");
    }
    // -o help, with and without an image.
    for args in [
        &["amend", "-f", "qcow2", "-o", "help"][..],
        &["amend", "-o", "help", s(&img)],
        &["amend", "-o", "?", s(&img)],
    ] {
        let (cv, out, _) = vimg(args);
        let (cq, oq) = run_status("qemu-img", args);
        assert_eq!((cv, cq), (0, 0), "{args:?}: {oq}");
        assert!(out.starts_with("Amend options for 'qcow2':\n"), "{out}");
        for key in [
            "compat=",
            "refcount_bits=",
            "lazy_refcounts=",
            "size=",
            "backing_file=",
        ] {
            assert!(out.contains(key) && oq.contains(key), "{key} missing");
        }
    }
    let (cv, _, _) = vimg(&["amend", "-o", "help"]);
    let (cq, _) = run_status("qemu-img", &["amend", "-o", "help"]);
    assert_eq!(cv, cq);
    // -p prints qemu's progress lines, -q nothing; unknown options change nothing.
    let (cv, out, _) = vimg(&["amend", "-p", "-o", "refcount_bits=8", s(&img)]);
    assert_eq!(cv, 0);
    assert!(
        out.contains("(100.00/100%)\r") && out.ends_with('\n'),
        "{out:?}"
    );
    let (cv, out, _) = vimg(&[
        "amend",
        "-p",
        "-q",
        "-t",
        "unsafe",
        "-o",
        "refcount_bits=2",
        s(&img),
    ]);
    assert_eq!((cv, out.as_str()), (0, ""));
    assert_eq!(check_code(&img).0, 0);
}

#[test]
fn where_vimg_differs_from_qemu_img() {
    if !qemu_available("amend_oracle deviations") {
        return;
    }
    let dir = scratch();
    let d = dir.path();

    // Downgrading an image with persistent bitmaps is refused (qemu 10 leaves a version 2
    // image with a bitmaps extension and leaked clusters).
    let img = make(d, "bm.qcow2", "", "qemu-img bitmap --add bm.qcow2 b0");
    let before = std::fs::read(&img).unwrap();
    let (cv, _, ev) = vimg(&["amend", "-o", "compat=0.10", s(&img)]);
    assert!(cv == 1 && ev.contains("bitmaps"), "{ev}");
    assert!(std::fs::read(&img).unwrap() == before);

    // The data file is renamed, to a file that exists or (as qemu-img does) not.
    let img = make(
        d,
        "df.qcow2",
        "data_file=df.raw",
        "qemu-io -c 'write -P 7 0 1M' df.qcow2",
    );
    let q = d.join("df-q.qcow2");
    std::fs::copy(&img, &q).unwrap();
    std::fs::copy(d.join("df.raw"), d.join("df2.raw")).unwrap();
    let m = d.join("df-m.qcow2");
    std::fs::copy(&img, &m).unwrap();
    let (cv, _, ev) = vimg(&["amend", "-o", "data_file=missing.raw", s(&m)]);
    assert_eq!(cv, 0, "{ev}");
    let text = run("qemu-img", &["info", "--output=json", s(&m)]);
    assert!(text.contains("\"data-file\": \"missing.raw\""), "{text}");
    let (cv, _, ev) = vimg(&["amend", "-o", "data_file=df2.raw", s(&img)]);
    assert_eq!(cv, 0, "{ev}");
    let (code, out) = in_dir(
        d,
        "qemu-img",
        &["amend", "-o", "data_file=df2.raw", "df-q.qcow2"],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(info(&img), info(&q));
    // (qemu-img finds a relative data file name from its working directory.)
    let (code, out) = in_dir(d, "qemu-img", &["check", "df.qcow2"]);
    assert_eq!(code, 0, "{out}");

    // A preallocated zero cluster shared with a snapshot (a zero write without unmap over a
    // cluster the snapshot holds data in): vimg's downgrade keeps the snapshot's data and
    // leaves correct COPIED flags, with and without a backing file.
    for backing in [false, true] {
        let b = d.join("zb.raw");
        std::fs::write(&b, vec![0x66u8; 4 << 20]).unwrap();
        let img = d.join("zs.qcow2");
        qemu_create(&img, "qcow2", "", backing.then_some((&b, "raw")), 4 << 20);
        io(&img, &["write -P 0x67 0 128k".into()]);
        run("qemu-img", &["snapshot", "-c", "s1", s(&img)]);
        io(&img, &["write -z 0 64k".into(), "write -z 1M 64k".into()]);
        let snap = contents(&img, Some("s1"));
        let active = contents(&img, None);
        let (cv, _, ev) = vimg(&["amend", "-o", "compat=0.10", s(&img)]);
        assert_eq!(cv, 0, "{ev}");
        let (code, out) = check_code(&img);
        assert_eq!(code, 0, "backing {backing}: {out}");
        assert!(contents(&img, Some("s1")) == snap, "snapshot data lost");
        assert!(contents(&img, None) == active);
        qemu_writes_read_back(&img, "shared zero cluster");
    }
}

/// Interrupts `opts` on copies of `pristine` at every write (in both crash modes) and checks
/// what is left (see the module documentation). Returns the number of writes the amend makes.
fn crash_every_write(dir: &Path, img: &Image, opts: &str) -> u64 {
    let amend = AmendOptions::parse(opts).unwrap();
    let active = contents(&img.path, None);
    let snaps: Vec<Vec<u8>> = img
        .snaps
        .iter()
        .map(|n| contents(&img.path, Some(n)))
        .collect();
    let header = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let version = common::header_u32(&b, header_fields::VERSION);
        let order = if version >= 3 {
            common::header_u32(&b, header_fields::REFCOUNT_ORDER)
        } else {
            4
        };
        (version, order)
    };
    let old_state = header(&img.path);
    let copy = dir.join("crash.qcow2");
    let run_to = |limit: u64, mode: Mode| -> (u64, bool) {
        std::fs::copy(&img.path, &copy).unwrap();
        let storage = Crashing::new(FileStorage::open(&copy, true).unwrap(), limit, mode);
        let (writes, crashed) = (storage.writes.clone(), storage.crashed.clone());
        let r = Qcow2Image::open_storage(
            Box::new(storage),
            &copy,
            true,
            true,
            &mut ChainGuard::default(),
        )
        .and_then(|mut i| {
            i.amend(&amend, &mut |_, _| {})?;
            i.close()
        });
        let crashed = crashed.load(std::sync::atomic::Ordering::SeqCst);
        if !crashed {
            r.unwrap_or_else(|e| panic!("{opts}: amend without a crash failed: {e}"));
        }
        (writes.load(std::sync::atomic::Ordering::SeqCst), crashed)
    };
    let (total, _) = run_to(u64::MAX, Mode::Fail);
    let new_state = header(&copy);
    assert_ne!(new_state, old_state, "{opts}: the amend changed nothing");
    assert_eq!(
        check_code(&copy).0,
        0,
        "{opts}: uninterrupted result not clean"
    );
    let mut failures = Vec::new();
    for limit in 0..total {
        for mode in [Mode::Fail, Mode::Drop] {
            let what = format!(
                "{} -o {opts}: crash at write {limit} ({mode:?})",
                img.path.display()
            );
            let (_, crashed) = run_to(limit, mode);
            assert!(crashed, "{what}: no crash");
            let (code, out) = check_code(&copy);
            if code != 0 && code != 3 {
                failures.push(format!("{what}: qemu-img check exit {code}: {out}"));
                continue;
            }
            // Each field the amend changes is either old or new (an amend of several steps
            // may stop between them).
            let state = header(&copy);
            if (state.0 != old_state.0 && state.0 != new_state.0)
                || (state.1 != old_state.1 && state.1 != new_state.1)
            {
                failures.push(format!("{what}: header {state:?}"));
            }
            let read = vimg::open::open_image(&copy, &Default::default()).and_then(|i| {
                let mut buf = vec![0u8; i.virtual_size() as usize];
                i.read_at(&mut buf, GuestOffset(0)).map(|_| buf)
            });
            match read {
                Ok(buf) if buf == active => {}
                Ok(_) => failures.push(format!("{what}: guest data changed")),
                Err(e) => failures.push(format!("{what}: cannot read: {e}")),
            }
            if limit % 3 == 0 {
                for (n, want) in img.snaps.iter().zip(&snaps) {
                    if contents(&copy, Some(n)) != *want {
                        failures.push(format!("{what}: snapshot {n} changed"));
                    }
                }
            }
            if limit % 5 == 0 {
                // The interrupted amend can be done again.
                let again = Qcow2Image::open(&copy, true, true, &mut ChainGuard::default())
                    .and_then(|mut i| {
                        i.amend(&amend, &mut |_, _| {})?;
                        i.close()
                    });
                let (code, out) = check_code(&copy);
                if again.is_err() || (code != 0 && code != 3) || header(&copy) != new_state {
                    failures.push(format!(
                        "{what}: amending again: {again:?}, check {code}: {out}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    total
}

#[test]
fn interrupted_amends_leave_at_worst_leaks() {
    if !qemu_available("amend_oracle crash safety") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let with = |img: Image, cmds: &[&str]| {
        io(
            &img.path,
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        );
        img
    };
    for (img, opts) in [
        (
            with(rich(d, "c1.qcow2", 65536, ""), &["write -P 0x81 1M 1M"]),
            "refcount_bits=64",
        ),
        // 64 refcounts per block: dozens of new blocks.
        (
            with(rich(d, "c2.qcow2", 512, ""), &["write -P 0x82 1M 900k"]),
            "refcount_bits=64",
        ),
        (
            with(
                rich(d, "c3.qcow2", 4096, "refcount_bits=4"),
                &["write -P 0x83 1M 1M"],
            ),
            "refcount_bits=1,refcount_bits=8",
        ),
        (backed(d, "c4.qcow2", 4096), "compat=0.10"),
        // Dozens of preallocated zero clusters, zeroed one by one.
        (
            with(
                rich(d, "c5.qcow2", 512, ""),
                &[
                    "write -P 0x85 1M 40k",
                    "write -z 1M 30k",
                    "write -z 1200k 64k",
                ],
            ),
            "compat=0.10",
        ),
        (
            with(
                backed(d, "c6.qcow2", 512),
                &["write -P 0x86 0 20k", "write -z 0 20k"],
            ),
            "compat=0.10",
        ),
        (
            rich(d, "c7.qcow2", 65536, "compat=0.10"),
            "compat=1.1,refcount_bits=4",
        ),
    ] {
        let t0 = std::time::Instant::now();
        let n = crash_every_write(d, &img, opts);
        eprintln!(
            "{} -o {opts}: {n} writes, {:?}",
            img.path.display(),
            t0.elapsed()
        );
    }
}

#[test]
fn killed_amends_leave_at_worst_leaks() {
    if !qemu_available("amend_oracle kill -9") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    // Hundreds of refcount blocks to write (64 refcounts each), hundreds of zero clusters.
    let pristine = d.join("big.qcow2");
    qemu_create(&pristine, "qcow2", "cluster_size=512", None, 16 << 20);
    io(
        &pristine,
        &["write -P 0x21 0 12M".into(), "write -z 4M 3M".into()],
    );
    run("qemu-img", &["snapshot", "-c", "s", s(&pristine)]);
    let active = contents(&pristine, None);
    let copy = d.join("killed.qcow2");
    for opts in ["refcount_bits=64", "compat=0.10"] {
        std::fs::copy(&pristine, &copy).unwrap();
        let t0 = std::time::Instant::now();
        let (code, _, err) = vimg(&["amend", "-o", opts, s(&copy)]);
        assert_eq!(code, 0, "{err}");
        let full = t0.elapsed();
        let mut interrupted = 0;
        for i in 0..12u32 {
            std::fs::copy(&pristine, &copy).unwrap();
            let mut child = Command::new(VIMG)
                .args(["amend", "-o", opts, s(&copy)])
                .spawn()
                .unwrap();
            std::thread::sleep(full * i / 10);
            let _ = child.kill();
            let status = child.wait().unwrap();
            interrupted += u32::from(!status.success());
            let what = format!("-o {opts}, killed after {:?}", full * i / 10);
            let (code, out) = check_code(&copy);
            assert!(
                code == 0 || code == 3,
                "{what}: qemu-img check exit {code}: {out}"
            );
            assert!(
                contents(&copy, None) == active,
                "{what}: guest data changed"
            );
        }
        eprintln!("-o {opts}: {full:?} uninterrupted, {interrupted} of 12 runs killed");
    }
}
