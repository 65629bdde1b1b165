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

mod common;

use common::{qemu_available, qemu_create, qemu_io, run, run_status, Rng};
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
