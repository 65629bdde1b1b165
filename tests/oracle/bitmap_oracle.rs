//! Persistent dirty bitmaps against qemu 10's tools.
//!
//! The dirty bits qemu sees are read through qemu-nbd (`-B NAME` exports the bitmap as the
//! `qemu:dirty-bitmap:NAME` metadata context) and `qemu-img map --image-opts` with
//! `x-dirty-bitmap`, which reports the dirty ranges as `"data": false`.
//!
//! - Bitmaps vimg adds and whose bits vimg's writes set are read by qemu: `qemu-img info`
//!   lists them as `vimg info` does, `qemu-img check` is clean, the dirty ranges equal a model
//!   of the writes (also after qemu merges them into a fresh bitmap of another granularity),
//!   and `qemu-img convert --bitmaps` and `vimg convert --bitmaps` copy them.
//! - Bitmaps qemu made and wrote to, then written to and changed by vimg (clear, merge,
//!   disable, remove), then written to by qemu again, hold what the model says.
//! - Interrupting vimg at every write of a session (a storage that fails or drops every write
//!   after the Nth, and kill -9 of `vimg convert -n`) leaves each enabled bitmap flagged in use
//!   or covering every chunk whose contents changed, and no corruption.
//! - `vimg bitmap`, `resize`, `snapshot` and `convert --bitmaps` behave as qemu-img does on
//!   copies of the same images (exit codes, messages, resulting bitmaps).

use crate::common;

use common::{qemu_available, qemu_create, qemu_io, run, run_status, Rng};
use proptest::strategy::Strategy;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use vimg::bitmap::PersistentBitmaps;
use vimg::open::ChainGuard;
use vimg::qcow2::Qcow2Image;
use vimg::{BlockImage, GuestOffset};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

/// Whether qemu-nbd is there too (it reads the dirty bits); as [`qemu_available`].
fn tools_available(test: &str) -> bool {
    if !qemu_available(test) {
        return false;
    }
    let ok = Command::new("qemu-nbd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: qemu-nbd not found but VIMG_REQUIRE_QEMU=1");
        }
        eprintln!("{test}: skipping: qemu-nbd not found");
    }
    ok
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn vimg(args: &[&str]) -> (i32, String) {
    run_status(VIMG, args)
}

/// The dirty ranges of bitmap `name` of `img` as qemu sees them, or qemu-nbd's complaint.
fn qemu_dirty(img: &Path, name: &str) -> Result<Vec<(u64, u64)>, String> {
    let dir = img.parent().unwrap();
    let sock = dir.join(format!("nbd-{}.sock", std::process::id()));
    let pidfile = dir.join("nbd.pid");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&pidfile);
    let (code, out) = run_status(
        "qemu-nbd",
        &[
            "--fork",
            "-r",
            "-f",
            "qcow2",
            "-B",
            name,
            "-k",
            s(&sock),
            "--pid-file",
            s(&pidfile),
            s(img),
        ],
    );
    if code != 0 {
        return Err(out);
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        s(&sock)
    );
    let map = run_status("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    // Without -t, qemu-nbd exits when its client leaves: wait for it (it holds the image).
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        // Gone, or a zombie nobody reaps (the state after the command name in /proc/PID/stat).
        let stat = PathBuf::from(format!("/proc/{}/stat", pid.trim()));
        for _ in 0..500 {
            match std::fs::read_to_string(&stat) {
                Ok(st)
                    if !st
                        .rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z') =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                _ => break,
            }
        }
    }
    let (code, out) = map;
    if code != 0 {
        return Err(out);
    }
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"] == Value::Bool(false) {
            let a = e["start"].as_u64().unwrap();
            let b = a + e["length"].as_u64().unwrap();
            match ranges.last_mut() {
                Some(l) if l.1 == a => l.1 = b,
                _ => ranges.push((a, b)),
            }
        }
    }
    Ok(ranges)
}

/// `format-specific.data.bitmaps` of `info --output json` by `tool`.
fn info_bitmaps(tool: &str, img: &Path) -> Value {
    let out = run(tool, &["info", "--output", "json", s(img)]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// Whether `qemu-img check` finds the image clean (exit 0).
fn qemu_check_clean(img: &Path) -> (bool, String) {
    let (code, out) = run_status("qemu-img", &["check", s(img)]);
    (code == 0, out)
}

/// A model of one bitmap: the chunks written since it was cleared (while enabled).
#[derive(Clone, Debug)]
struct Model {
    name: String,
    gbits: u32,
    enabled: bool,
    chunks: BTreeSet<u64>,
}

impl Model {
    fn new(name: &str, gbits: u32, enabled: bool) -> Self {
        Model {
            name: name.into(),
            gbits,
            enabled,
            chunks: BTreeSet::new(),
        }
    }
    fn write(&mut self, off: u64, len: u64) {
        if self.enabled && len > 0 {
            self.chunks
                .extend((off >> self.gbits)..=((off + len - 1) >> self.gbits));
        }
    }
    /// The dirty byte ranges on a disk of `size` bytes.
    fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &c in &self.chunks {
            let (a, b) = (c << self.gbits, ((c + 1) << self.gbits).min(size));
            match out.last_mut() {
                Some(l) if l.1 == a => l.1 = b,
                _ => out.push((a, b)),
            }
        }
        out
    }
}

/// One guest request.
#[derive(Clone, Copy, Debug)]
enum Req {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

impl Req {
    fn range(self) -> (u64, u64) {
        match self {
            Req::Write(o, l, _) | Req::Zero(o, l, _) | Req::Discard(o, l) => (o, l),
        }
    }
    fn apply(self, img: &dyn BlockImage) {
        match self {
            Req::Write(o, l, p) => img.write_at(&vec![p; l as usize], GuestOffset(o)).unwrap(),
            Req::Zero(o, l, u) => img.write_zeroes(GuestOffset(o), l, u).unwrap(),
            Req::Discard(o, l) => img.discard(GuestOffset(o), l).unwrap(),
        }
    }
    /// The same request as a qemu-io command.
    fn qemu_io(self) -> String {
        match self {
            Req::Write(o, l, p) => format!("write -P {p} {o} {l}"),
            Req::Zero(o, l, true) => format!("write -z -u {o} {l}"),
            Req::Zero(o, l, false) => format!("write -z {o} {l}"),
            Req::Discard(o, l) => format!("discard {o} {l}"),
        }
    }
}

/// A random request inside a disk of `size` bytes (512-aligned for qemu-io).
fn random_req(r: &mut Rng, size: u64) -> Req {
    let off = r.below(size / 512) * 512;
    let max = (size - off).min(3 << 20);
    let len = (1 + r.below(max / 512)) * 512;
    match r.below(6) {
        0 => Req::Zero(off, len, r.below(2) == 0),
        1 => Req::Discard(off, len),
        _ => Req::Write(off, len, 1 + r.below(250) as u8),
    }
}

fn open_rw(p: &Path) -> Qcow2Image {
    Qcow2Image::open(p, true, true, &mut ChainGuard::default()).unwrap()
}

/// Asserts that qemu sees exactly the model's dirty ranges in every bitmap of `img`.
fn assert_qemu_sees(img: &Path, models: &[Model], size: u64, what: &str) {
    for m in models {
        let got = qemu_dirty(img, &m.name).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, m.ranges(size), "{what}: bitmap {}", m.name);
    }
}

#[test]
fn bitmaps_vimg_writes_are_read_by_qemu() {
    if !tools_available("bitmaps_vimg_writes_are_read_by_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..4u64 {
        let mut r = Rng::seeded(0xb17 + seed);
        let cs = [512u64, 4096, 65536, 1 << 21][seed as usize % 4];
        let size = (8 + r.below(120)) << 20 | (r.below(8) * 512);
        let img = dir.path().join(format!("w{seed}.qcow2"));
        let lazy = if r.below(2) == 0 {
            ",lazy_refcounts=on"
        } else {
            ""
        };
        qemu_create(
            &img,
            "qcow2",
            &format!("cluster_size={cs}{lazy}"),
            None,
            size,
        );
        let mut models = Vec::new();
        for i in 0..1 + r.below(3) {
            let gbits = 9 + r.below(12) as u32;
            let enabled = i == 0 || r.below(3) != 0;
            let name = format!("b{i}");
            let g = (1u64 << gbits).to_string();
            let mut args = vec!["bitmap", "--add", "-g", &g];
            if !enabled {
                args.push("--disable");
            }
            args.extend([s(&img), &name]);
            assert_eq!(vimg(&args).0, 0, "{args:?}");
            models.push(Model::new(&name, gbits, enabled));
        }
        // Sessions of random requests, each ended by a close (some by a flush and a drop).
        for session in 0..3 {
            let q = open_rw(&img);
            for _ in 0..1 + r.below(12) {
                let req = random_req(&mut r, size);
                req.apply(&q);
                let (o, l) = req.range();
                models.iter_mut().for_each(|m| m.write(o, l));
                if r.below(5) == 0 {
                    q.flush().unwrap();
                }
            }
            if session == 1 {
                q.flush().unwrap();
                drop(q);
            } else {
                q.close().unwrap();
            }
        }
        let what = format!("seed {seed} (clusters {cs}, size {size})");
        let (clean, out) = qemu_check_clean(&img);
        assert!(clean, "{what}: {out}");
        assert_eq!(
            info_bitmaps("qemu-img", &img),
            info_bitmaps(VIMG, &img),
            "{what}"
        );
        assert_qemu_sees(&img, &models, size, &what);
        // qemu merges each into a fresh bitmap of another granularity.
        let first = &models[0];
        let g2 = 1u64 << (9 + (first.gbits + 3) % 12);
        run(
            "qemu-img",
            &["bitmap", "--add", "-g", &g2.to_string(), s(&img), "merged"],
        );
        run(
            "qemu-img",
            &["bitmap", "--merge", &first.name, s(&img), "merged"],
        );
        let mut merged = Model::new("merged", g2.trailing_zeros(), true);
        for (a, b) in first.ranges(size) {
            merged.write(a, b - a);
        }
        assert_qemu_sees(&img, &[merged], size, &format!("{what}, merged by qemu"));
        run("qemu-img", &["bitmap", "--remove", s(&img), "merged"]);
        // Both tools copy them with convert --bitmaps.
        for tool in ["qemu-img", VIMG] {
            let out = dir.path().join(format!("c{seed}.qcow2"));
            let _ = std::fs::remove_file(&out);
            run(
                tool,
                &["convert", "--bitmaps", "-O", "qcow2", s(&img), s(&out)],
            );
            assert_eq!(
                info_bitmaps("qemu-img", &out),
                info_bitmaps("qemu-img", &img),
                "{what}: {tool} convert"
            );
            assert!(qemu_check_clean(&out).0, "{what}: {tool} convert");
            assert_qemu_sees(&out, &models, size, &format!("{what}: {tool} convert"));
            let c = Qcow2Image::open(&out, false, true, &mut ChainGuard::default()).unwrap();
            for m in &models {
                let b = c.read_bitmap(&m.name).unwrap();
                assert_eq!(
                    b.dirty_ranges(),
                    m.ranges(size),
                    "{what}: {tool} convert, vimg reads"
                );
            }
        }
    }
}

/// A random `vimg bitmap` operation on the bitmaps of `models`, applied to the model too;
/// returns the arguments.
fn random_op(r: &mut Rng, models: &mut [Model], size: u64) -> Vec<String> {
    let i = r.below(models.len() as u64) as usize;
    let name = models[i].name.clone();
    let op = match r.below(4) {
        0 => {
            models[i].chunks.clear();
            vec!["--clear".to_string()]
        }
        1 => {
            models[i].enabled = !models[i].enabled;
            vec![if models[i].enabled {
                "--enable"
            } else {
                "--disable"
            }
            .to_string()]
        }
        _ => {
            let j = r.below(models.len() as u64) as usize;
            let src = models[j].clone();
            for (a, b) in src.ranges(size) {
                let was = models[i].enabled;
                models[i].enabled = true;
                models[i].write(a, b - a);
                models[i].enabled = was;
            }
            vec!["--merge".to_string(), src.name]
        }
    };
    let mut args = vec!["bitmap".to_string()];
    args.extend(op);
    args.push(name);
    args
}

#[test]
fn bitmaps_qemu_made_are_changed_by_vimg() {
    if !tools_available("bitmaps_qemu_made_are_changed_by_vimg") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..3u64 {
        let mut r = Rng::seeded(0x9e + seed);
        let cs = [65536u64, 4096, 1 << 20][seed as usize];
        let size = (16 + r.below(64)) << 20;
        let img = dir.path().join(format!("q{seed}.qcow2"));
        qemu_create(&img, "qcow2", &format!("cluster_size={cs}"), None, size);
        let mut models = Vec::new();
        for i in 0..2 + r.below(2) {
            let gbits = 9 + r.below(12) as u32;
            let enabled = i == 0 || r.below(3) != 0;
            let name = format!("q{i}");
            let g = (1u64 << gbits).to_string();
            let mut args = vec!["bitmap", "--add", "-g", &g];
            if !enabled {
                args.push("--disable");
            }
            args.extend([s(&img), &name]);
            run("qemu-img", &args);
            models.push(Model::new(&name, gbits, enabled));
        }
        let qemu_writes = |r: &mut Rng, models: &mut Vec<Model>| {
            let mut cmds = Vec::new();
            for _ in 0..1 + r.below(10) {
                let req = random_req(r, size);
                let (o, l) = req.range();
                models.iter_mut().for_each(|m| m.write(o, l));
                cmds.push(req.qemu_io());
            }
            qemu_io(&img, "qcow2", &cmds);
        };
        qemu_writes(&mut r, &mut models);
        let what = format!("seed {seed}");
        // vimg reads what qemu wrote.
        {
            let ro = Qcow2Image::open(&img, false, true, &mut ChainGuard::default()).unwrap();
            for m in &models {
                let got = ro.read_bitmap(&m.name).unwrap().dirty_ranges();
                assert_eq!(got, m.ranges(size), "{what}: vimg reads qemu's {}", m.name);
            }
        }
        // vimg writes, then changes the bitmaps, twice.
        for _ in 0..2 {
            let q = open_rw(&img);
            for _ in 0..1 + r.below(10) {
                let req = random_req(&mut r, size);
                req.apply(&q);
                let (o, l) = req.range();
                models.iter_mut().for_each(|m| m.write(o, l));
            }
            q.close().unwrap();
            for _ in 0..1 + r.below(3) {
                let mut args = random_op(&mut r, &mut models, size);
                args.push(s(&img).to_string());
                let n = args.len();
                args.swap(n - 1, n - 2); // ... IMAGE NAME
                let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
                let (code, out) = vimg(&a);
                assert_eq!(code, 0, "{what}: {a:?}: {out}");
            }
            assert_qemu_sees(&img, &models, size, &format!("{what}, after vimg"));
        }
        // qemu writes again, and removes one that vimg leaves.
        qemu_writes(&mut r, &mut models);
        let gone = models.remove(0);
        run("qemu-img", &["bitmap", "--remove", s(&img), &gone.name]);
        let (clean, out) = qemu_check_clean(&img);
        assert!(clean, "{what}: {out}");
        assert_eq!(
            info_bitmaps("qemu-img", &img),
            info_bitmaps(VIMG, &img),
            "{what}"
        );
        assert_qemu_sees(&img, &models, size, &format!("{what}, at the end"));
    }
}

/// One step of the dirty tracking property test.
#[derive(Clone, Debug)]
enum Step {
    Req(Req),
    Compressed(u64),
    Flush,
    Clear(usize),
    Toggle(usize),
    Reopen,
    Compare,
}

fn step_strategy(size: u64) -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let blocks = size / 512;
    let req =
        (0..blocks, 1..blocks.min(8192), 0u8..3, any::<u8>()).prop_map(move |(b, n, kind, p)| {
            let (o, l) = (b * 512, (n * 512).min(size - b * 512));
            Step::Req(match kind {
                0 => Req::Write(o, l, p),
                1 => Req::Zero(o, l, p % 2 == 0),
                _ => Req::Discard(o, l),
            })
        });
    prop_oneof![
        6 => req,
        1 => (0..blocks).prop_map(move |b| Step::Compressed(b * 512)),
        1 => Just(Step::Flush),
        1 => (0usize..3).prop_map(Step::Clear),
        1 => (0usize..3).prop_map(Step::Toggle),
        1 => Just(Step::Reopen),
        1 => Just(Step::Compare),
    ]
}

/// Image options for the property test: cluster bits, size in MiB, extended L2, lazy
/// refcounts, refcount order, the bitmaps' granularity bits and whether they start enabled.
type Setup = (u32, u64, bool, bool, u32, Vec<(u32, bool)>);

fn setup_strategy() -> impl proptest::strategy::Strategy<Value = Setup> {
    use proptest::prelude::*;
    (
        9u32..22,
        1u64..48,
        any::<bool>(),
        any::<bool>(),
        0u32..7,
        proptest::collection::vec((9u32..24, any::<bool>()), 1..4),
    )
}

/// Compares what vimg reads from every bitmap with the model.
fn assert_vimg_reads(img: &Qcow2Image, models: &[Model], size: u64) -> Result<(), String> {
    for m in models {
        let got = img
            .read_bitmap(&m.name)
            .map_err(|e| e.to_string())?
            .dirty_ranges();
        if got != m.ranges(size) {
            return Err(format!(
                "bitmap {}: {got:?} != {:?}",
                m.name,
                m.ranges(size)
            ));
        }
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 48, ..Default::default() })]

    /// Random writes, zero writes, discards, compressed writes, flushes, clears, enables and
    /// disables and reopenings on images with 1-3 bitmaps: the dirty chunks are exactly those
    /// written (whole requests, rounded out to the granularity) since each bitmap was last
    /// cleared while it was enabled, and the image stays consistent.
    #[test]
    fn dirty_bits_follow_every_write(
        (setup, steps) in setup_strategy().prop_flat_map(|setup| {
            let size = (setup.1 << 20) + 512 * (setup.1 % 3);
            (proptest::strategy::Just(setup), proptest::collection::vec(step_strategy(size), 1..40))
        })
    ) {
        use vimg::qcow2::{create, CreateOptions};
        let (cbits, mib, ext, lazy, rorder, bitmaps) = setup;
        let size = (mib << 20) + 512 * (mib % 3);
        let cs = 1u64 << cbits;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        create(&p, &CreateOptions {
            size,
            cluster_size: cs,
            extended_l2: ext && cbits >= 14,
            lazy_refcounts: lazy,
            refcount_bits: 1 << rorder,
            ..Default::default()
        }).unwrap();
        let mut img = open_rw(&p);
        let mut models = Vec::new();
        for (i, (gbits, enabled)) in bitmaps.iter().enumerate() {
            let name = format!("bm{i}");
            img.add_bitmap(&name, Some(1 << gbits), *enabled).unwrap();
            models.push(Model::new(&name, *gbits, *enabled));
        }
        for step in steps {
            match step {
                Step::Req(req) => {
                    req.apply(&img);
                    let (o, l) = req.range();
                    models.iter_mut().for_each(|m| m.write(o, l));
                }
                Step::Compressed(off) => {
                    let gc = off / cs * cs;
                    let data = vec![0x5a; cs as usize];
                    let z = vimg::qcow2::compress_cluster(
                        img.header().compression_type, &data).unwrap();
                    if let Some(z) = z {
                        img.write_compressed(gc, &z).unwrap();
                        let l = cs.min(size - gc);
                        models.iter_mut().for_each(|m| m.write(gc, l));
                    }
                }
                Step::Flush => img.flush().unwrap(),
                Step::Clear(i) => {
                    let i = i % models.len();
                    img.clear_bitmap(&models[i].name).unwrap();
                    models[i].chunks.clear();
                }
                Step::Toggle(i) => {
                    let i = i % models.len();
                    models[i].enabled = !models[i].enabled;
                    img.enable_bitmap(&models[i].name, models[i].enabled).unwrap();
                }
                Step::Reopen => {
                    img.close().unwrap();
                    img = open_rw(&p);
                }
                Step::Compare => {
                    let r = assert_vimg_reads(&img, &models, size);
                    proptest::prop_assert!(r.is_ok(), "{}", r.unwrap_err());
                }
            }
        }
        img.close().unwrap();
        let ro = Qcow2Image::open(&p, false, true, &mut ChainGuard::default()).unwrap();
        let r = assert_vimg_reads(&ro, &models, size);
        proptest::prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        for (b, m) in ro.list_bitmaps().unwrap().iter().zip(&models) {
            proptest::prop_assert!(!b.in_use && b.enabled == m.enabled, "{:?}", b);
        }
        let report = vimg::check::Check::check(&ro).unwrap();
        proptest::prop_assert!(
            report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0,
            "{:?}", report
        );
    }
}

/// How writes past the limit behave.
#[derive(Clone, Copy, Debug)]
enum CrashMode {
    /// They fail (a dying disk).
    Fail,
    /// They seem to succeed but never land (a power cut).
    Drop,
}

/// A file whose writes (and resizes) fail or vanish after the first `limit`.
struct Crashing {
    inner: vimg::storage::FileStorage,
    limit: u64,
    mode: CrashMode,
    writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Crashing {
    fn pass(&self) -> std::io::Result<bool> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.writes.fetch_add(1, SeqCst) < self.limit {
            return Ok(true);
        }
        match self.mode {
            CrashMode::Fail => Err(std::io::Error::other("injected failure")),
            CrashMode::Drop => Ok(false),
        }
    }
}

impl vimg::storage::Storage for Crashing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.pass()? {
            self.inner.write_at(buf, offset)?;
        }
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if self.pass()? {
            self.inner.set_len(len)?;
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.pass()? {
            self.inner.zero_range(offset, len)?;
        }
        Ok(())
    }
    fn extent_at(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        self.inner.extent_at(offset)
    }
}

/// After an interruption: no corruption, disabled bitmaps untouched, and every enabled bitmap
/// either flagged in use or dirty wherever the contents now differ from `before`. Returns how
/// many bitmaps were in use.
fn assert_honest_bitmaps(img: &Path, before: &[u8], models: &[Model], what: &str) -> usize {
    let (code, out) = run_status("qemu-img", &["check", s(img)]);
    assert!(code == 0 || code == 3, "{what}: qemu-img check: {out}");
    let after = common::qemu_contents(img, img.parent().unwrap());
    let info = info_bitmaps("qemu-img", img);
    let mut in_use = 0;
    for m in models {
        let entry = info
            .as_array()
            .and_then(|a| a.iter().find(|b| b["name"] == m.name.as_str()))
            .unwrap_or_else(|| panic!("{what}: bitmap {} is gone: {info}", m.name));
        let flags: Vec<&str> = entry["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        if flags.contains(&"in-use") {
            assert!(
                m.enabled,
                "{what}: disabled bitmap {} flagged in use",
                m.name
            );
            in_use += 1;
            continue;
        }
        let dirty = qemu_dirty(img, &m.name).unwrap_or_else(|e| panic!("{what}: {e}"));
        if !m.enabled {
            assert!(
                dirty.is_empty(),
                "{what}: disabled bitmap {} changed",
                m.name
            );
            continue;
        }
        let g = 1usize << m.gbits;
        for (c, (x, y)) in before.chunks(g).zip(after.chunks(g)).enumerate() {
            let start = (c * g) as u64;
            if x != y {
                assert!(
                    dirty.iter().any(|&(a, b)| a <= start && start < b),
                    "{what}: bitmap {} is clean but chunk {c} changed",
                    m.name
                );
            }
        }
    }
    in_use
}

#[test]
fn bitmaps_interrupted_writes_leave_them_flagged_or_right() {
    if !tools_available("bitmaps_interrupted_writes_leave_them_flagged_or_right") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "qcow2", "cluster_size=4096", None, size);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 7 0 6M".into(), "write -P 9 10M 1M".into()],
    );
    let models = [
        Model::new("g64k", 16, true),
        Model::new("g4k", 12, true),
        Model::new("off", 9, false),
    ];
    for m in &models {
        let g = (1u64 << m.gbits).to_string();
        let mut args = vec!["bitmap", "--add", "-g", &g, s(&base), &m.name];
        if !m.enabled {
            args.insert(2, "--disable");
        }
        run("qemu-img", &args);
    }
    let before = common::qemu_contents(&base, dir.path());
    let mut r = Rng::seeded(0xc4a5);
    let reqs: Vec<Req> = (0..14).map(|_| random_req(&mut r, size)).collect();
    let work = dir.path().join("work.qcow2");
    // One session: requests with flushes between them, then a close.
    let session = |limit: u64, mode: CrashMode| -> u64 {
        std::fs::copy(&base, &work).unwrap();
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let storage = Crashing {
            inner: vimg::storage::FileStorage::open(&work, true).unwrap(),
            limit,
            mode,
            writes: writes.clone(),
        };
        let mut guard = ChainGuard::default();
        if let Ok(img) = Qcow2Image::open_storage(Box::new(storage), &work, true, true, &mut guard)
        {
            let run = || -> vimg::Result<()> {
                for (i, req) in reqs.iter().enumerate() {
                    match *req {
                        Req::Write(o, l, p) => {
                            img.write_at(&vec![p; l as usize], GuestOffset(o))?
                        }
                        Req::Zero(o, l, u) => img.write_zeroes(GuestOffset(o), l, u)?,
                        Req::Discard(o, l) => img.discard(GuestOffset(o), l)?,
                    }
                    if i % 4 == 3 {
                        img.flush()?;
                    }
                }
                img.close()
            };
            let _ = run();
        }
        writes.load(std::sync::atomic::Ordering::SeqCst)
    };
    let total = session(u64::MAX, CrashMode::Fail);
    let (mut in_use, mut clean) = (0, 0);
    let points: Vec<u64> = (0..total).step_by((total as usize / 40).max(1)).collect();
    for mode in [CrashMode::Fail, CrashMode::Drop] {
        for &n in &points {
            session(n, mode);
            let what = format!("{mode:?} after {n} of {total} writes");
            let flagged = assert_honest_bitmaps(&work, &before, &models, &what);
            in_use += flagged;
            clean += 2 - flagged;
        }
    }
    // Both outcomes occur: the test looked at bitmaps in use and at stored ones.
    assert!(in_use > 0 && clean > 0, "in use {in_use}, clean {clean}");
}

#[test]
fn bitmaps_kill_9_of_convert_leaves_them_flagged_or_right() {
    if !tools_available("bitmaps_kill_9_of_convert_leaves_them_flagged_or_right") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 20;
    let src = dir.path().join("src.raw");
    qemu_create(&src, "raw", "", None, size);
    qemu_io(&src, "raw", &["write -P 0x3c 0 64M".into()]);
    let target = dir.path().join("target.qcow2");
    let blank = dir.path().join("blank.qcow2");
    qemu_create(&blank, "qcow2", "", None, size);
    let models = [Model::new("b0", 16, true)];
    run("qemu-img", &["bitmap", "--add", s(&blank), "b0"]);
    let before = vec![0u8; size as usize];
    let mut flagged = 0;
    for (i, delay) in [5u64, 40, 150, 400].into_iter().enumerate() {
        std::fs::copy(&blank, &target).unwrap();
        let mut child = Command::new(VIMG)
            .args([
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-t",
                "writeback",
            ])
            .args([&src, &target])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let what = format!("kill after {delay} ms (run {i}, {status})");
        let n = assert_honest_bitmaps(&target, &before, &models, &what);
        eprintln!("{what}: {n} bitmap(s) in use");
        flagged += n;
    }
    // Some kill came while the bitmap was being tracked.
    assert!(flagged > 0, "no kill interrupted the conversion");
}

/// The first line of a tool's error output, without the tool's prefix, with `paths` and
/// qemu's node names (`#block123`) replaced by `X`.
fn normalize(out: &str, paths: &[&Path]) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with("qemu-img: ") || l.starts_with("vimg: "))
        .unwrap_or("");
    let mut t = line
        .trim_start_matches("qemu-img: ")
        .trim_start_matches("vimg: ")
        .trim_start_matches("warning: ")
        .to_string();
    for p in paths {
        t = t.replace(s(p), "X");
    }
    // vimg names the file where qemu-img does not.
    if let Some(rest) = t.strip_prefix("X: ") {
        t = rest.to_string();
    }
    while let Some(i) = t.find("#block") {
        let end = t[i + 6..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(t.len(), |j| i + 6 + j);
        t.replace_range(i..end, "X");
    }
    t
}

/// What an image's bitmaps look like to qemu: info's list and each one's dirty ranges (or why
/// qemu-nbd would not export it).
type BitmapState = (Value, Vec<Result<Vec<(u64, u64)>, String>>);

/// The [`BitmapState`] of `img` (nothing if it does not exist).
fn bitmap_state(img: &Path) -> BitmapState {
    if !img.exists() {
        return (Value::Null, Vec::new());
    }
    let info = info_bitmaps("qemu-img", img);
    let names: Vec<String> = info
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    let dirty = names
        .iter()
        .map(|n| qemu_dirty(img, n).map_err(|e| normalize(&e, &[img])))
        .collect();
    (info, dirty)
}

/// Runs `args` (with `{img}`, `{src}` and `{dst}` standing for copies of the fixtures) with
/// qemu-img and with vimg and asserts the same outcome: exit code, message (vimg's may say
/// more after qemu-img's), bitmaps and dirty bits of the image and the destination.
fn same_as_qemu(dir: &Path, img: &Path, src: Option<&Path>, args: &[&str]) {
    let mut outcomes = Vec::new();
    for tool in ["qemu-img", VIMG] {
        let tag = if tool == VIMG { "v" } else { "q" };
        let copy = dir.join(format!("{tag}-img.qcow2"));
        std::fs::copy(img, &copy).unwrap();
        let src_copy = dir.join(format!("{tag}-src.qcow2"));
        if let Some(sp) = src {
            std::fs::copy(sp, &src_copy).unwrap();
        }
        let dst = dir.join(format!("{tag}-dst.qcow2"));
        let _ = std::fs::remove_file(&dst);
        let a: Vec<String> = args
            .iter()
            .map(|x| {
                x.replace("{img}", s(&copy))
                    .replace("{src}", s(&src_copy))
                    .replace("{dst}", s(&dst))
            })
            .collect();
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        let (code, out) = run_status(tool, &a);
        let msg = normalize(&out, &[&copy, &src_copy, &dst]);
        let (code_check, check) = run_status("qemu-img", &["check", s(&copy)]);
        // 63: a raw image, which has nothing to check.
        assert!(
            code_check == 0 || code_check == 63,
            "{tool} {args:?} left the image damaged: {check}"
        );
        outcomes.push((code, msg, bitmap_state(&copy), bitmap_state(&dst)));
    }
    let (q, v) = (&outcomes[0], &outcomes[1]);
    assert_eq!(
        q.0, v.0,
        "exit code of {args:?}: qemu-img '{}', vimg '{}'",
        q.1, v.1
    );
    assert!(
        v.1.starts_with(&q.1) && (q.1.is_empty() == v.1.is_empty()),
        "message of {args:?}: qemu-img '{}', vimg '{}'",
        q.1,
        v.1
    );
    assert_eq!(q.2, v.2, "image bitmaps after {args:?}");
    if q.0 == 0 {
        assert_eq!(q.3, v.3, "destination after {args:?}");
    }
}

/// An image with bitmaps qemu wrote to: `b0` (64 KiB, enabled), `b1` (4 KiB, disabled, with
/// what b0 had when it was disabled), `b2` (1 MiB, enabled); of `size` bytes.
fn fixture(path: &Path, size: u64, compat: &str) {
    qemu_create(path, "qcow2", compat, None, size);
    if compat.contains("0.10") {
        return;
    }
    let p = s(path);
    run("qemu-img", &["bitmap", "--add", p, "b0"]);
    run("qemu-img", &["bitmap", "--add", "-g", "4k", p, "b1"]);
    qemu_io(
        path,
        "qcow2",
        &["write -P 1 100k 70k".into(), "discard 3M 64k".into()],
    );
    run("qemu-img", &["bitmap", "--disable", p, "b1"]);
    run("qemu-img", &["bitmap", "--add", "-g", "1M", p, "b2"]);
    qemu_io(
        path,
        "qcow2",
        &["write -z 5M 4k".into(), "write -P 2 9M 1k".into()],
    );
}

#[test]
fn bitmap_command_does_what_qemu_img_does() {
    if !tools_available("bitmap_command_does_what_qemu_img_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("fixture.qcow2");
    fixture(&img, 32 << 20, "");
    let other = d.join("other.qcow2");
    fixture(&other, 32 << 20, "cluster_size=4096");
    qemu_io(&other, "qcow2", &["write -P 3 20M 3M".into()]);
    let small = d.join("small.qcow2");
    fixture(&small, 16 << 20, "");
    let v2 = d.join("v2.qcow2");
    fixture(&v2, 32 << 20, "compat=0.10");
    // b0 and b2 left in use by a qemu that died.
    let broken = d.join("broken.qcow2");
    std::fs::copy(&img, &broken).unwrap();
    let _ = run_status(
        "qemu-io",
        &["-c", "write 0 4k", "-c", "sigraise 9", s(&broken)],
    );
    let cases: &[(&Path, Option<&Path>, &[&str])] = &[
        (&img, None, &["bitmap", "--add", "{img}", "new"]),
        (
            &img,
            None,
            &["bitmap", "--add", "-g", "512", "--disable", "{img}", "new"],
        ),
        (&img, None, &["bitmap", "--add", "-g", "2G", "{img}", "new"]),
        (&img, None, &["bitmap", "--add", "-g", "0", "{img}", "new"]),
        (&img, None, &["bitmap", "--add", "{img}", "b0"]),
        (&img, None, &["bitmap", "--add", "--add", "{img}", "new"]),
        (
            &img,
            None,
            &["bitmap", "--add", "--remove", "--add", "{img}", "new"],
        ),
        (
            &img,
            None,
            &["bitmap", "--add", "-g", "1000", "{img}", "new"],
        ),
        (
            &img,
            None,
            &["bitmap", "--add", "-g", "256", "{img}", "new"],
        ),
        (&img, None, &["bitmap", "--add", "-g", "4G", "{img}", "new"]),
        (
            &img,
            None,
            &["bitmap", "--add", "-g", "abc", "{img}", "new"],
        ),
        (&img, None, &["bitmap", "--add", "{img}", ""]),
        (&img, None, &["bitmap", "--add", "{img}", &"n".repeat(1023)]),
        (&img, None, &["bitmap", "--add", "{img}", &"n".repeat(1024)]),
        (&v2, None, &["bitmap", "--add", "{img}", "new"]),
        (&v2, None, &["bitmap", "--remove", "{img}", "new"]),
        (&img, None, &["bitmap", "--remove", "{img}", "b1"]),
        (&img, None, &["bitmap", "--remove", "{img}", "nope"]),
        (&img, None, &["bitmap", "--clear", "{img}", "b0"]),
        (
            &img,
            None,
            &["bitmap", "--clear", "--clear", "{img}", "nope"],
        ),
        (&img, None, &["bitmap", "--enable", "{img}", "b1"]),
        (&img, None, &["bitmap", "--disable", "{img}", "b0"]),
        (
            &img,
            None,
            &["bitmap", "--enable", "--disable", "--enable", "{img}", "b0"],
        ),
        (&img, None, &["bitmap", "--merge", "b0", "{img}", "b1"]),
        (
            &img,
            None,
            &["bitmap", "--merge", "b1", "--merge", "b2", "{img}", "b0"],
        ),
        (
            &img,
            None,
            &["bitmap", "--merge", "b0", "--clear", "{img}", "b2"],
        ),
        (&img, None, &["bitmap", "--merge", "nope", "{img}", "b0"]),
        (&img, None, &["bitmap", "--merge", "b0", "{img}", "nope"]),
        (
            &img,
            Some(&other),
            &["bitmap", "--merge", "b0", "-b", "{src}", "{img}", "b2"],
        ),
        (
            &img,
            Some(&other),
            &[
                "bitmap", "--merge", "b1", "-b", "{src}", "-F", "qcow2", "{img}", "b0",
            ],
        ),
        (
            &img,
            Some(&small),
            &["bitmap", "--merge", "b0", "-b", "{src}", "{img}", "b2"],
        ),
        (
            &img,
            Some(&broken),
            &["bitmap", "--merge", "b0", "-b", "{src}", "{img}", "b2"],
        ),
        (&broken, None, &["bitmap", "--clear", "{img}", "b0"]),
        (&broken, None, &["bitmap", "--enable", "{img}", "b2"]),
        (&broken, None, &["bitmap", "--disable", "{img}", "b0"]),
        (&broken, None, &["bitmap", "--merge", "b1", "{img}", "b0"]),
        (&broken, None, &["bitmap", "--merge", "b0", "{img}", "b1"]),
        (&broken, None, &["bitmap", "--remove", "{img}", "b0"]),
        (&broken, None, &["bitmap", "--add", "{img}", "new"]),
        (&img, None, &["bitmap", "{img}", "b0"]),
        (
            &img,
            None,
            &["bitmap", "-g", "4k", "--remove", "{img}", "b0"],
        ),
        (
            &img,
            None,
            &["bitmap", "-F", "qcow2", "--remove", "{img}", "b0"],
        ),
        (
            &img,
            Some(&other),
            &["bitmap", "-b", "{src}", "--remove", "{img}", "b0"],
        ),
        (&img, None, &["bitmap", "--remove", "{img}"]),
    ];
    for (image, src, args) in cases {
        same_as_qemu(d, image, *src, args);
    }
    // Too big for the bitmap size limits (512 MiB of bits).
    let big = d.join("big.qcow2");
    qemu_create(&big, "qcow2", "", None, 2049 << 30);
    same_as_qemu(
        d,
        &big,
        None,
        &["bitmap", "--add", "-g", "512", "{img}", "b"],
    );
    same_as_qemu(
        d,
        &big,
        None,
        &["bitmap", "--add", "-g", "1k", "{img}", "b"],
    );
}

#[test]
fn resize_snapshot_convert_and_measure_treat_bitmaps_as_qemu_img_does() {
    if !tools_available("resize_snapshot_convert_and_measure_treat_bitmaps_as_qemu_img_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("fixture.qcow2");
    fixture(&img, 32 << 20, "");
    let v2 = d.join("v2.qcow2");
    fixture(&v2, 32 << 20, "compat=0.10");
    let raw = d.join("raw.img");
    qemu_create(&raw, "raw", "", None, 32 << 20);
    let fresh = d.join("fresh.qcow2");
    qemu_create(&fresh, "qcow2", "", None, 32 << 20);
    let with_snapshot = d.join("snap.qcow2");
    std::fs::copy(&img, &with_snapshot).unwrap();
    run("qemu-img", &["snapshot", "-c", "s1", s(&with_snapshot)]);
    // Every bitmap left in use by qemu, or only the enabled ones by vimg.
    let broken = d.join("broken.qcow2");
    std::fs::copy(&img, &broken).unwrap();
    let _ = run_status(
        "qemu-io",
        &["-c", "write 0 4k", "-c", "sigraise 9", s(&broken)],
    );
    let broken2 = d.join("broken2.qcow2");
    std::fs::copy(&img, &broken2).unwrap();
    {
        // Without image locks, which a dead process would not hold either.
        let storage =
            vimg::storage::FileStorage::open_with(&broken2, true, vimg::lock::LockRequest::NONE)
                .unwrap();
        let q = Qcow2Image::open_storage(
            Box::new(storage),
            &broken2,
            true,
            true,
            &mut ChainGuard::default(),
        )
        .unwrap();
        q.write_at(&[1; 512], GuestOffset(0)).unwrap();
        std::mem::forget(q); // as if the process died
    }
    assert!(info_bitmaps("qemu-img", &broken2)
        .to_string()
        .contains("in-use"));
    // An overlay shorter than its backing file, whose grown area is zeroed.
    let base = d.join("base.qcow2");
    qemu_create(&base, "qcow2", "", None, 64 << 20);
    qemu_io(&base, "qcow2", &["write -P 5 0 64M".into()]);
    let overlay = d.join("overlay.qcow2");
    qemu_create(&overlay, "qcow2", "", Some((&base, "qcow2")), 32 << 20);
    run("qemu-img", &["bitmap", "--add", s(&overlay), "b0"]);
    qemu_io(&overlay, "qcow2", &["write -P 6 1M 1M".into()]);
    let cases: &[(&Path, Option<&Path>, &[&str])] = &[
        (&img, None, &["resize", "{img}", "+1M"]),
        (&img, None, &["resize", "{img}", "+3G"]),
        (&img, None, &["resize", "{img}", "33554944"]),
        (&img, None, &["resize", "--shrink", "{img}", "9437696"]),
        (&img, None, &["resize", "--shrink", "{img}", "1M"]),
        (&broken, None, &["resize", "{img}", "+1M"]),
        (&broken2, None, &["resize", "{img}", "+1M"]),
        (&overlay, None, &["resize", "{img}", "64M"]),
        (&img, None, &["snapshot", "-c", "s1", "{img}"]),
        (&with_snapshot, None, &["snapshot", "-d", "s1", "{img}"]),
        (&with_snapshot, None, &["snapshot", "-a", "s1", "{img}"]),
        (&img, None, &["snapshot", "-a", "nope", "{img}"]),
        (
            &img,
            None,
            &["convert", "--bitmaps", "-O", "qcow2", "{img}", "{dst}"],
        ),
        (
            &img,
            None,
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "{img}",
                "{dst}",
            ],
        ),
        (
            &img,
            None,
            &["convert", "--bitmaps", "-O", "raw", "{img}", "{dst}"],
        ),
        (
            &img,
            None,
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "{img}",
                "{img}",
                "{dst}",
            ],
        ),
        (
            &img,
            None,
            &[
                "convert",
                "--skip-broken-bitmaps",
                "-O",
                "qcow2",
                "{img}",
                "{dst}",
            ],
        ),
        (
            &img,
            None,
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "-o",
                "compat=0.10",
                "{img}",
                "{dst}",
            ],
        ),
        (
            &v2,
            None,
            &["convert", "--bitmaps", "-O", "qcow2", "{img}", "{dst}"],
        ),
        (
            &raw,
            None,
            &[
                "convert",
                "--bitmaps",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "{img}",
                "{dst}",
            ],
        ),
        (
            &broken,
            None,
            &["convert", "--bitmaps", "-O", "qcow2", "{img}", "{dst}"],
        ),
        (
            &broken2,
            None,
            &["convert", "--bitmaps", "-O", "qcow2", "{img}", "{dst}"],
        ),
        (
            &broken2,
            None,
            &[
                "convert",
                "--bitmaps",
                "--skip-broken-bitmaps",
                "-O",
                "qcow2",
                "{img}",
                "{dst}",
            ],
        ),
        (
            &fresh,
            Some(&img),
            &[
                "convert",
                "-n",
                "--bitmaps",
                "-O",
                "qcow2",
                "{src}",
                "{img}",
            ],
        ),
    ];
    for (image, src, args) in cases {
        same_as_qemu(d, image, *src, args);
    }
    // Resizing down and up again drops the bits past the smaller end.
    for (tool, tag) in [("qemu-img", "q"), (VIMG, "v")] {
        let copy = d.join(format!("{tag}-updown.qcow2"));
        std::fs::copy(&img, &copy).unwrap();
        run(tool, &["resize", "--shrink", s(&copy), "9437696"]);
        run(tool, &["resize", s(&copy), "64M"]);
    }
    assert_eq!(
        bitmap_state(&d.join("q-updown.qcow2")),
        bitmap_state(&d.join("v-updown.qcow2"))
    );
    // A name the -n target already has: both refuse (vimg before writing anything).
    let (qc, qout) = {
        std::fs::copy(&img, d.join("q-target.qcow2")).unwrap();
        run_status(
            "qemu-img",
            &[
                "convert",
                "-n",
                "--bitmaps",
                "-O",
                "qcow2",
                s(&img),
                s(&d.join("q-target.qcow2")),
            ],
        )
    };
    std::fs::copy(&img, d.join("v-target.qcow2")).unwrap();
    let before = std::fs::read(d.join("v-target.qcow2")).unwrap();
    let (vc, vout) = vimg(&[
        "convert",
        "-n",
        "--bitmaps",
        "-O",
        "qcow2",
        s(&img),
        s(&d.join("v-target.qcow2")),
    ]);
    assert_eq!((qc, normalize(&qout, &[])), (vc, normalize(&vout, &[])));
    assert!(std::fs::read(d.join("v-target.qcow2")).unwrap() == before);
    // measure counts the bitmaps of images vimg wrote as qemu-img does.
    let measured = d.join("measured.qcow2");
    std::fs::copy(&img, &measured).unwrap();
    vimg(&["bitmap", "--add", "-g", "512", s(&measured), "fine"]);
    for target in [
        &["-O", "qcow2"][..],
        &["-O", "qcow2", "-o", "cluster_size=512"],
        &["-O", "raw"],
    ] {
        let mut args = vec!["measure", "--output", "json"];
        args.extend(target);
        args.push(s(&measured));
        assert_eq!(run("qemu-img", &args), run(VIMG, &args), "{args:?}");
    }
}

/// `amend` of an image with persistent bitmaps, done by vimg and by qemu-img on copies: the
/// bitmaps survive refcount rewrites, lazy refcounts and resizes with the dirty bits qemu's
/// result has, and a downgrade to version 2 is refused (qemu-img 10 leaves a broken image).
#[test]
fn amend_keeps_bitmaps_as_qemu_img_does() {
    if !tools_available("amend_keeps_bitmaps_as_qemu_img_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("a.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    run("qemu-img", &["bitmap", "--add", s(&base), "b0"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512k", s(&base), "b1"],
    );
    let io = |p: &Path, cmd: &str| run("qemu-io", &["-f", "qcow2", "-c", cmd, s(p)]);
    io(&base, "write -P 1 0 100k");
    run("qemu-img", &["bitmap", "--disable", s(&base), "b1"]);
    io(&base, "write -P 2 3M 64k");
    let (v, q) = (dir.path().join("v.qcow2"), dir.path().join("q.qcow2"));
    std::fs::copy(&base, &v).unwrap();
    std::fs::copy(&base, &q).unwrap();
    for opts in [
        "lazy_refcounts=on",
        "refcount_bits=8",
        "size=12M",
        "refcount_bits=64",
        "lazy_refcounts=off",
        "size=6M",
    ] {
        let mut args = vec!["amend", "-o", opts];
        if opts == "size=6M" {
            args.push("--force");
        }
        let (cv, out) = vimg(&[&args[..], &[s(&v)]].concat());
        let (cq, qout) = run_status("qemu-img", &[&args[..], &[s(&q)]].concat());
        assert_eq!((cv, cq), (0, 0), "{opts}: vimg: {out} qemu-img: {qout}");
        let (clean, report) = qemu_check_clean(&v);
        assert!(clean, "{opts}: {report}");
        assert_eq!(
            info_bitmaps("qemu-img", &v),
            info_bitmaps("qemu-img", &q),
            "{opts}"
        );
        for name in ["b0", "b1"] {
            assert_eq!(qemu_dirty(&v, name), qemu_dirty(&q, name), "{opts}: {name}");
        }
        // Writes after the amend are still tracked.
        io(&v, "write -P 3 1M 4k");
        io(&q, "write -P 3 1M 4k");
    }
    let before = std::fs::read(&v).unwrap();
    let (cv, out) = vimg(&["amend", "-o", "compat=0.10", s(&v)]);
    assert!(cv == 1 && out.contains("bitmaps"), "{out}");
    assert!(
        std::fs::read(&v).unwrap() == before,
        "a refused amend changed the image"
    );
}
