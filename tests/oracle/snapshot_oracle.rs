//! `vimg snapshot` against qemu as the oracle. Random sequences of guest writes (qemu-io: data,
//! compressed and zero writes), grows (`qemu-img resize`), and snapshot creations, deletions
//! and applications (each done by vimg or by `qemu-img snapshot` at random) run on images with
//! several cluster layouts, while a model keeps what the disk and every snapshot must contain.
//! After every snapshot operation `qemu-img check` must exit 0; at checkpoints and at the end,
//! `vimg snapshot -l` must print exactly what `qemu-img snapshot -l` prints, the active disk
//! must read as the model says, and so must every snapshot (`qemu-img convert -l NAME`).

use crate::common;
use crate::common::header_fields;

use common::{qemu_available, qemu_create, qemu_io, run, Rng};
use std::path::{Path, PathBuf};
use std::process::Command;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vimg-snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs vimg with `args`, returning (exit code, stdout, stderr).
fn vimg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(VIMG).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn vimg_ok(args: &[&str]) -> String {
    let (code, out, err) = vimg(args);
    assert_eq!(code, 0, "vimg {} failed: {err}", args.join(" "));
    out
}

/// `qemu-img snapshot -l` in UTC (vimg prints dates in UTC).
fn qemu_list(img: &Path) -> String {
    let out = Command::new("qemu-img")
        .env("TZ", "UTC")
        .args(["snapshot", "-l", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` must find nothing wrong (exit code 0).
fn assert_clean(img: &Path, what: &str) {
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check after {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The contents of snapshot `name` as qemu reads them.
fn snapshot_contents(img: &Path, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join("snap.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// What the image must contain: the active disk and each snapshot, by name.
struct Model {
    active: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
}

fn verify(img: &Path, dir: &Path, m: &Model, what: &str) {
    assert_eq!(
        vimg_ok(&["snapshot", "-l", img.to_str().unwrap()]),
        qemu_list(img),
        "snapshot lists differ after {what}"
    );
    let names: Vec<String> = qemu_list(img)
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    let want: Vec<&String> = m.snaps.iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.iter().collect::<Vec<_>>(),
        want,
        "snapshot names after {what}"
    );
    let got = common::qemu_contents(img, dir);
    assert_eq!(
        first_difference(&got, &m.active),
        None,
        "active disk differs after {what}"
    );
    for (name, data) in &m.snaps {
        let got = snapshot_contents(img, dir, name);
        // qemu reads a snapshot with the current virtual size: cut or zero-extended.
        let mut want = data.clone();
        want.resize(m.active.len(), 0);
        assert_eq!(
            first_difference(&got, &want),
            None,
            "snapshot {name} differs after {what}"
        );
    }
}

fn sequence(opts: &str, seed: u64, steps: usize) {
    let dir = tmpdir(&format!("seq{seed}"));
    let img = dir.join("a.qcow2");
    let p = img.to_str().unwrap().to_string();
    let size: u64 = 4 << 20;
    qemu_create(&img, "qcow2", opts, None, size);
    let cs: u64 = opts
        .split(',')
        .find_map(|o| o.strip_prefix("cluster_size="))
        .map_or(65536, |v| v.parse().unwrap());
    let v2 = opts.contains("compat=0.10");
    let mut m = Model {
        active: vec![0; size as usize],
        snaps: Vec::new(),
    };
    let mut rng = Rng::seeded(seed);
    let mut next_name = 0;
    // Snapshot operations vimg did: create, apply, delete; and grows.
    let mut done = [0usize; 4];
    for step in 0..steps {
        let by_vimg = rng.below(2) == 0;
        let tool = if by_vimg { "vimg" } else { "qemu-img" };
        let len = m.active.len() as u64;
        match rng.below(10) {
            0..=2 => {
                // Data write, any 512-byte aligned range.
                let off = rng.below(len / 512) * 512;
                let n = (1 + rng.below(256)) * 512;
                let n = n.min(len - off);
                let pat = 1 + rng.below(250) as u8;
                qemu_io(&img, "qcow2", &[format!("write -P {pat} {off} {n}")]);
                m.active[off as usize..(off + n) as usize].fill(pat);
            }
            3 => {
                // Compressed cluster (qemu compresses only into an unallocated cluster: the
                // discard makes it one).
                let off = rng.below(len / cs) * cs;
                let pat = 1 + rng.below(250) as u8;
                qemu_io(
                    &img,
                    "qcow2",
                    &[
                        format!("discard {off} {cs}"),
                        format!("write -c -P {pat} {off} {cs}"),
                    ],
                );
                m.active[off as usize..(off + cs) as usize].fill(pat);
            }
            4 => {
                let off = rng.below(len / cs) * cs;
                let n = (1 + rng.below(4)) * cs;
                let n = n.min(len - off);
                qemu_io(&img, "qcow2", &[format!("write -z {off} {n}")]);
                m.active[off as usize..(off + n) as usize].fill(0);
            }
            5 if !v2 && len < (8 << 20) && rng.below(3) == 0 => {
                // Grow: a later apply of an older snapshot shrinks the disk back.
                let new = len + (1 + rng.below(4)) * cs;
                run("qemu-img", &["resize", "-q", &p, &new.to_string()]);
                m.active.resize(new as usize, 0);
                done[3] += 1;
            }
            5 | 6 => {
                let name = format!("s{next_name}");
                next_name += 1;
                if by_vimg {
                    vimg_ok(&["snapshot", "-c", &name, &p]);
                    done[0] += 1;
                } else {
                    run("qemu-img", &["snapshot", "-c", &name, &p]);
                }
                m.snaps.push((name.clone(), m.active.clone()));
                assert_clean(&img, &format!("step {step}: {tool} snapshot -c {name}"));
            }
            7 | 8 if !m.snaps.is_empty() => {
                let i = rng.below(m.snaps.len() as u64) as usize;
                let name = m.snaps[i].0.clone();
                if by_vimg {
                    vimg_ok(&["snapshot", "-a", &name, &p]);
                    done[1] += 1;
                } else {
                    run("qemu-img", &["snapshot", "-a", &name, &p]);
                }
                m.active = m.snaps[i].1.clone();
                let what = format!("step {step}: {tool} snapshot -a {name}");
                assert_clean(&img, &what);
                verify(&img, &dir, &m, &what);
            }
            _ if !m.snaps.is_empty() => {
                let i = rng.below(m.snaps.len() as u64) as usize;
                let name = m.snaps.remove(i).0;
                if by_vimg {
                    vimg_ok(&["snapshot", "-d", &name, &p]);
                    done[2] += 1;
                } else {
                    run("qemu-img", &["snapshot", "-d", &name, &p]);
                }
                assert_clean(&img, &format!("step {step}: {tool} snapshot -d {name}"));
            }
            _ => {}
        }
    }
    eprintln!(
        "{opts} seed {seed}: vimg -c/-a/-d {:?}, grows {}",
        &done[..3],
        done[3]
    );
    assert!(
        done[..3].iter().all(|&n| n > 0),
        "the sequence ({opts}, seed {seed}) left a vimg operation out: {done:?}"
    );
    verify(
        &img,
        &dir,
        &m,
        &format!("the sequence ({opts}, seed {seed})"),
    );
    // Deleting everything that is left frees every snapshot cluster: qemu's check agrees.
    while let Some((name, _)) = m.snaps.pop() {
        vimg_ok(&["snapshot", "-d", &name, &p]);
        assert_clean(&img, &format!("deleting {name}"));
    }
    verify(&img, &dir, &m, "deleting every snapshot");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sequences_default_clusters() {
    if !qemu_available("sequences_default_clusters") {
        return;
    }
    sequence("cluster_size=65536", 1, 80);
    sequence("cluster_size=65536,lazy_refcounts=on", 2, 60);
}

#[test]
fn sequences_small_clusters() {
    if !qemu_available("sequences_small_clusters") {
        return;
    }
    // 4 KiB clusters: two L2 tables for 4 MiB, and more as the disk grows.
    sequence("cluster_size=4096", 3, 80);
    sequence("cluster_size=4096,refcount_bits=4", 4, 60);
}

#[test]
fn sequences_extended_l2_and_v2() {
    if !qemu_available("sequences_extended_l2_and_v2") {
        return;
    }
    sequence("cluster_size=16384,extended_l2=on", 5, 70);
    sequence("compat=0.10,cluster_size=4096", 6, 70);
}

#[test]
fn entries_as_qemu_writes_them() {
    if !qemu_available("entries_as_qemu_writes_them") {
        return;
    }
    let dir = tmpdir("entries");
    let img = dir.join("a.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(&img, "qcow2", "", None, 1 << 20);
    // Nothing to list: both print nothing.
    assert_eq!(vimg_ok(&["snapshot", "-l", p]), "");
    assert_eq!(qemu_list(&img), "");
    vimg_ok(&["snapshot", "-c", "one", p]);
    run("qemu-img", &["snapshot", "-c", "two", p]);
    // Duplicate names are allowed (qemu-img allows them too); ids stay unique.
    vimg_ok(&["snapshot", "-c", "one", p]);
    let list = qemu_list(&img);
    assert_eq!(vimg_ok(&["snapshot", "-l", p]), list);
    let ids: Vec<(&str, &str)> = list
        .lines()
        .skip(2)
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap(), w.next().unwrap())
        })
        .collect();
    assert_eq!(ids, [("1", "one"), ("2", "two"), ("3", "one")]);
    // Deletion removes the first of that name, as qemu-img does; the next id is max + 1.
    vimg_ok(&["snapshot", "-d", "one", p]);
    vimg_ok(&["snapshot", "-c", "four", p]);
    let list = qemu_list(&img);
    let ids: Vec<&str> = list
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids, ["2", "3", "4"]);
    // Applying takes an id as well as a name (qemu-img's -a does too).
    vimg_ok(&["snapshot", "-a", "3", p]);
    run("qemu-img", &["snapshot", "-a", "2", p]);
    // vimg's entries are what qemu-img writes: 24 bytes of extra data (VM state size 0, the
    // disk size, instruction count 0).
    let info = run("qemu-img", &["info", "--output=json", p]);
    assert!(info.contains("\"icount\": 0"), "{info}");
    assert_clean(&img, "the entry checks");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn refusals_match_qemu() {
    if !qemu_available("refusals_match_qemu") {
        return;
    }
    let dir = tmpdir("refuse");
    let img = dir.join("a.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(&img, "qcow2", "", None, 1 << 20);
    run("qemu-img", &["snapshot", "-c", "one", p]);
    let before = std::fs::read(&img).unwrap();
    for (op, msg) in [
        ("-d", "Could not delete snapshot 'nope': snapshot not found"),
        (
            "-a",
            "Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory",
        ),
    ] {
        let (code, _, err) = vimg(&["snapshot", op, "nope", p]);
        let q = Command::new("qemu-img")
            .args(["snapshot", op, "nope", p])
            .output()
            .unwrap();
        assert_eq!(Some(code), q.status.code(), "exit code of {op}");
        assert!(err.contains(msg), "{op}: {err}");
        assert!(String::from_utf8_lossy(&q.stderr).contains(msg));
    }
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "a refusal changed the image"
    );
    // qemu-img deletes by name only, not by id.
    let (code, _, _) = vimg(&["snapshot", "-d", "1", p]);
    assert_eq!(code, 1);
    // A corrupt image is not changed.
    let mut raw = before.clone();
    // Incompatible feature bit 1, corrupt: in the last byte of the big-endian field.
    raw[(header_fields::INCOMPATIBLE_FEATURES + 7) as usize] |= 2;
    std::fs::write(&img, &raw).unwrap();
    let (code, _, err) = vimg(&["snapshot", "-c", "two", p]);
    assert_eq!(code, 1);
    assert!(err.contains("corrupt"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), raw);
    // Listing still works on it (read-only), as with qemu-img -U.
    assert!(vimg_ok(&["snapshot", "-l", "-U", p]).contains("one"));
    // Raw images have no snapshots.
    let r = dir.join("a.raw");
    std::fs::write(&r, vec![0u8; 4096]).unwrap();
    let (code, _, _) = vimg(&["snapshot", "-c", "x", r.to_str().unwrap()]);
    assert_eq!(code, 1);
    std::fs::remove_dir_all(&dir).ok();
}

/// A storage that silently drops every write after the first `limit` (a power cut before the
/// cache drained).
struct Crashing {
    inner: vimg::storage::FileStorage,
    limit: u64,
    writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Crashing {
    fn pass(&self) -> bool {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            < self.limit
    }
}

impl vimg::storage::Storage for Crashing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.pass() {
            self.inner.write_at(buf, offset)?;
        }
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if self.pass() {
            self.inner.set_len(len)?;
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.pass() {
            self.inner.zero_range(offset, len)?;
        }
        Ok(())
    }
    fn extent_at(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        self.inner.extent_at(offset)
    }
}

/// Snapshot names in the table of `img`, as qemu lists them.
fn names(img: &Path) -> Vec<String> {
    qemu_list(img)
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect()
}

/// Every prefix of the writes of a create, a delete and an apply leaves an image that qemu
/// reads as either the state before or the state after the operation (never a mix), in which
/// every listed snapshot has its contents; `qemu-img check` finds at worst leaked clusters and
/// COPIED flags out of step with them (set on private clusters whose refcount is still one too
/// high after a create was cut before its entry was recorded, or clear on clusters whose
/// refcount just dropped to 1: both are safe for writers, as in qemu, which has the same
/// windows), and `qemu-img check -r all` repairs the image completely.
#[test]
fn interrupted_operations_leave_a_consistent_image() {
    if !qemu_available("interrupted_operations_leave_a_consistent_image") {
        return;
    }
    use vimg::qcow2::NewSnapshot;
    let dir = tmpdir("crash");
    let base = dir.join("base.qcow2");
    let bp = base.to_str().unwrap();
    qemu_create(&base, "qcow2", "cluster_size=4096", None, 2 << 20);
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 1 0 1M".into(),
            "write -c -P 2 1M 4k".into(),
            "write -z 4k 8k".into(),
        ],
    );
    run("qemu-img", &["snapshot", "-c", "a", bp]);
    qemu_io(&base, "qcow2", &["write -P 3 512k 1M".into()]);
    run("qemu-img", &["snapshot", "-c", "b", bp]);
    qemu_io(&base, "qcow2", &["write -P 4 0 64k".into()]);
    let active = common::qemu_contents(&base, &dir);
    let snap: Vec<(String, Vec<u8>)> = ["a", "b"]
        .iter()
        .map(|n| (n.to_string(), snapshot_contents(&base, &dir, n)))
        .collect();
    let img = dir.join("crash.qcow2");
    for op in ["create", "delete", "apply"] {
        let mut limit = 0;
        loop {
            std::fs::copy(&base, &img).unwrap();
            let writes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let storage = Crashing {
                inner: vimg::storage::FileStorage::open(&img, true).unwrap(),
                limit,
                writes: writes.clone(),
            };
            let mut q = vimg::qcow2::Qcow2Image::open_storage(
                Box::new(storage),
                &img,
                true,
                true,
                &mut vimg::open::ChainGuard::default(),
            )
            .unwrap();
            let r = match op {
                "create" => q.snapshot_create("c", NewSnapshot::default()),
                "delete" => q.snapshot_delete("a"),
                _ => q.snapshot_apply("a"),
            };
            let closed = q.close();
            let done = writes.load(std::sync::atomic::Ordering::SeqCst) <= limit;
            let what = format!("{op} cut after {limit} writes");
            if done {
                r.unwrap();
                closed.unwrap();
            }
            let out = Command::new("qemu-img")
                .args(["check", img.to_str().unwrap()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            let code = out.status.code().unwrap_or(-1);
            let only_copied = text
                .lines()
                .filter(|l| l.starts_with("ERROR"))
                .all(|l| l.contains("OFLAG_COPIED"));
            assert!(
                code == 0 || code == 3 || (code == 2 && only_copied),
                "{what}: qemu-img check exit {code}: {text}"
            );
            if done {
                assert_eq!(code, 0, "{what}: {text}");
            }
            if code != 0 {
                let fixed = dir.join("fixed.qcow2");
                std::fs::copy(&img, &fixed).unwrap();
                let f = fixed.to_str().unwrap();
                let _ = Command::new("qemu-img")
                    .args(["check", "-r", "all", f])
                    .output()
                    .unwrap();
                assert_clean(&fixed, &format!("{what} and check -r all"));
            }
            let got = common::qemu_contents(&img, &dir);
            let listed = names(&img);
            match op {
                "create" => {
                    assert_eq!(got, active, "{what}: active disk");
                    assert!(
                        listed == ["a", "b"] || listed == ["a", "b", "c"],
                        "{what}: {listed:?}"
                    );
                    if listed.len() == 3 {
                        assert_eq!(snapshot_contents(&img, &dir, "c"), active, "{what}");
                    }
                }
                "delete" => {
                    assert_eq!(got, active, "{what}: active disk");
                    assert!(
                        listed == ["a", "b"] || listed == ["b"],
                        "{what}: {listed:?}"
                    );
                }
                _ => {
                    assert!(got == active || got == snap[0].1, "{what}: a mixed disk");
                    assert_eq!(listed, ["a", "b"], "{what}");
                }
            }
            for (n, data) in &snap {
                if listed.contains(n) {
                    assert_eq!(&snapshot_contents(&img, &dir, n), data, "{what}: {n}");
                }
            }
            if done {
                break;
            }
            limit += 1;
        }
        eprintln!("{op}: {limit} crash points");
    }
    std::fs::remove_dir_all(&dir).ok();
}
