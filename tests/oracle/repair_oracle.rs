//! `vimg`'s qcow2 repair (`check -r leaks|all`) against `qemu-img check -r` (qemu is the
//! oracle). Clean images are made with qemu-img and qemu-io, damaged by poking refcounts and
//! COPIED flags into copies (or by killing qemu-io on a lazy-refcounts image, which leaves it
//! dirty); each damaged image is repaired once by qemu-img and once by vimg, on separate copies.
//! vimg's fixed counts must equal qemu-img's, `qemu-img check` must then find vimg's copy as
//! clean as qemu-img's own, and the guest data must be unchanged.

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use vimg::qcow2::Qcow2Image;
use vimg::qcow2::{repair, RepairMode};

use crate::common;

use common::{qemu_available, qemu_contents, qemu_create, qemu_io, run};

const CS: u64 = 4096;
const COPIED: u64 = 1 << 63;
const OFF_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn rd64(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

fn wr64(p: &Path, off: u64, v: u64) {
    let f = FsOpen::new().write(true).open(p).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

/// File offset of the (16-bit) refcount of host cluster `c`.
fn refcount_addr(p: &Path, c: u64) -> u64 {
    let reft = rd64(p, 48);
    let block = rd64(p, reft) & !0x1ff;
    assert!(c < CS / 2);
    block + 2 * c
}

fn set_refcount(p: &Path, c: u64, v: u16) {
    let f = FsOpen::new().write(true).open(p).unwrap();
    f.write_all_at(&v.to_be_bytes(), refcount_addr(p, c))
        .unwrap();
}

fn get_refcount(p: &Path, c: u64) -> u16 {
    let mut b = [0u8; 2];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, refcount_addr(p, c))
        .unwrap();
    u16::from_be_bytes(b)
}

/// File offset of the active L1 entry 0 and of the L2 entry `k` it leads to.
fn l1e0_addr(p: &Path) -> u64 {
    rd64(p, 40)
}

fn l2e_addr(p: &Path, k: u64) -> u64 {
    (rd64(p, l1e0_addr(p)) & OFF_MASK) + 8 * k
}

/// Host cluster of guest cluster `k` (in the first L2 table).
fn data_cluster(p: &Path, k: u64) -> u64 {
    (rd64(p, l2e_addr(p, k)) & OFF_MASK) / CS
}

/// `qemu-img check [-r MODE] --output=json`: exit code and parsed report (Null if none).
fn qemu_check(p: &Path, mode: Option<&str>) -> (i32, serde_json::Value) {
    let mut args = vec!["check", "--output=json"];
    if let Some(m) = mode {
        args.extend(["-r", m]);
    }
    args.push(s(p));
    let out = Command::new("qemu-img").args(&args).output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json)
}

fn key(j: &serde_json::Value, k: &str) -> u64 {
    j.get(k).and_then(|v| v.as_u64()).unwrap_or(0)
}

fn base_image(dir: &Path, name: &str, opts: &str, snapshot: bool) -> PathBuf {
    let p = dir.join(name);
    qemu_create(&p, "qcow2", opts, None, 1 << 20);
    let mut cmds = vec![
        "write -P 0x11 0 12k".to_string(),
        "write -P 0x22 64k 4k".to_string(),
        "write -z 128k 4k".to_string(),
    ];
    if !snapshot {
        cmds.push("write -c -P 0x33 256k 4k".into());
    }
    qemu_io(&p, "qcow2", &cmds);
    if snapshot {
        run("qemu-img", &["snapshot", "-c", "s1", s(&p)]);
        qemu_io(&p, "qcow2", &["write -P 0x44 4k 4k".to_string()]);
    }
    assert_eq!(qemu_check(&p, None).0, 0, "base image {name} is not clean");
    p
}

struct Case {
    name: &'static str,
    base: PathBuf,
    damage: Box<dyn Fn(&Path)>,
    modes: &'static [&'static str],
}

#[test]
fn repair_matches_qemu() {
    if !qemu_available("repair_matches_qemu") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let plain = base_image(dir, "plain.qcow2", "cluster_size=4096", false);
    let snap = base_image(dir, "snap.qcow2", "cluster_size=4096", true);

    let lazy = dir.join("lazy.qcow2");
    qemu_create(
        &lazy,
        "qcow2",
        "cluster_size=4096,lazy_refcounts=on",
        None,
        1 << 20,
    );
    let st = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x55 0 40k",
            "-c",
            "write -P 0x66 512k 8k",
            "-c",
            "sigraise 9",
            s(&lazy),
        ])
        .output()
        .unwrap();
    assert!(!st.status.success(), "qemu-io was not killed");
    assert!(
        rd64(&lazy, 72) & 1 != 0,
        "the lazy-refcounts image is not dirty"
    );

    let all: &'static [&'static str] = &["leaks", "all"];
    let cases = vec![
        Case {
            name: "raised data refcount (leak, COPIED now wrong)",
            base: plain.clone(),
            damage: Box::new(|p| {
                let c = data_cluster(p, 1);
                set_refcount(p, c, get_refcount(p, c) + 1)
            }),
            modes: all,
        },
        Case {
            name: "raised L2 refcount and header refcount (leaks)",
            base: plain.clone(),
            damage: Box::new(|p| {
                let l2 = (rd64(p, l1e0_addr(p)) & OFF_MASK) / CS;
                set_refcount(p, l2, 3);
                set_refcount(p, 0, 2);
            }),
            modes: all,
        },
        Case {
            name: "lowered shared refcount (corruption)",
            base: snap.clone(),
            damage: Box::new(|p| {
                let c = data_cluster(p, 0);
                assert_eq!(get_refcount(p, c), 2);
                set_refcount(p, c, 1)
            }),
            modes: all,
        },
        Case {
            name: "lowered refcount to 0 (corruption)",
            base: plain.clone(),
            damage: Box::new(|p| set_refcount(p, data_cluster(p, 2), 0)),
            modes: &["all"],
        },
        Case {
            name: "cleared COPIED on L2 entries",
            base: plain.clone(),
            damage: Box::new(|p| {
                for k in [0u64, 16] {
                    let a = l2e_addr(p, k);
                    wr64(p, a, rd64(p, a) & !COPIED);
                }
            }),
            modes: all,
        },
        Case {
            name: "cleared COPIED on L1 entry, set on shared L2 entry",
            base: snap.clone(),
            damage: Box::new(|p| {
                let a = l1e0_addr(p);
                wr64(p, a, rd64(p, a) & !COPIED);
                let b = l2e_addr(p, 0);
                wr64(p, b, rd64(p, b) | COPIED);
            }),
            modes: all,
        },
        Case {
            name: "mixed: leak, low shared refcount, cleared COPIED",
            base: snap.clone(),
            damage: Box::new(|p| {
                let shared = data_cluster(p, 0);
                assert_eq!(get_refcount(p, shared), 2);
                set_refcount(p, shared, 1);
                let c = data_cluster(p, 2);
                set_refcount(p, c, get_refcount(p, c) + 2);
                let a = l2e_addr(p, 1);
                assert_ne!(rd64(p, a) & COPIED, 0);
                wr64(p, a, rd64(p, a) & !COPIED);
            }),
            modes: all,
        },
        Case {
            name: "corrupt bit set, cleared COPIED",
            base: plain.clone(),
            damage: Box::new(|p| {
                wr64(p, 72, rd64(p, 72) | 2);
                let a = l2e_addr(p, 1);
                wr64(p, a, rd64(p, a) & !COPIED);
            }),
            modes: all,
        },
        Case {
            name: "dirty lazy-refcounts image killed by qemu-io",
            base: lazy.clone(),
            damage: Box::new(|_| {}),
            modes: &["all"],
        },
    ];

    let mut failures = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let before = qemu_contents(&case.base, dir);
        for mode in case.modes {
            let tag = format!("[{}] -r {mode}", case.name);
            let q = dir.join(format!("c{n}-{mode}-qemu.qcow2"));
            let v = dir.join(format!("c{n}-{mode}-vimg.qcow2"));
            std::fs::copy(&case.base, &q).unwrap();
            (case.damage)(&q);
            std::fs::copy(&q, &v).unwrap();

            let (qrc, qj) = qemu_check(&q, Some(mode));
            let rmode = if *mode == "all" {
                RepairMode::All
            } else {
                RepairMode::Leaks
            };
            let report = {
                let img = match Qcow2Image::open_for_repair(&v, &Default::default()) {
                    Ok(i) => i,
                    Err(e) => {
                        failures.push(format!("{tag}: vimg cannot open: {e}"));
                        continue;
                    }
                };
                match repair(&img, rmode) {
                    Ok(r) => r,
                    Err(e) => {
                        failures.push(format!("{tag}: vimg repair failed: {e}"));
                        continue;
                    }
                }
            };
            let (vafter, vaj) = qemu_check(&v, None);
            let (qafter, _) = qemu_check(&q, None);
            eprintln!(
                "{tag}: qemu rc={qrc} fixed c={} l={}; vimg fixed c={} l={} (remaining c={} l={}); \
                 check after: qemu's copy {qafter}, vimg's copy {vafter}",
                key(&qj, "corruptions-fixed"),
                key(&qj, "leaks-fixed"),
                report.corruptions_fixed,
                report.leaks_fixed,
                report.corruptions,
                report.leaks,
            );
            if qj.is_null() {
                // qemu-img could not repair (it wants a rebuild it was not allowed to do).
                if vafter != 0 && vafter != 2 {
                    failures.push(format!("{tag}: vimg's copy checks with exit {vafter}"));
                }
            } else {
                if key(&qj, "corruptions-fixed") != report.corruptions_fixed
                    || key(&qj, "leaks-fixed") != report.leaks_fixed
                {
                    failures.push(format!(
                        "{tag}: fixed counts differ: qemu {qj}, vimg {report:?}"
                    ));
                }
                if vafter != qafter {
                    failures.push(format!(
                        "{tag}: after repair qemu-img check exits {vafter} on vimg's copy, \
                         {qafter} on qemu's ({vaj})"
                    ));
                }
                if vafter != 0 && *mode == "all" {
                    failures.push(format!("{tag}: not clean after -r all: {vaj}"));
                }
            }
            if key(&vaj, "corruptions") != report.corruptions || key(&vaj, "leaks") != report.leaks
            {
                failures.push(format!(
                    "{tag}: vimg's post-repair report {report:?} differs from qemu-img check {vaj}"
                ));
            }
            if vafter == 0 && rd64(&v, 72) & 3 != 0 {
                failures.push(format!("{tag}: dirty/corrupt bit left set"));
            }
            if qemu_contents(&v, dir) != before {
                failures.push(format!("{tag}: guest data changed"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Seeded random damage (refcounts raised or lowered, COPIED flags flipped) to an image with a
/// snapshot, repaired with `-r all` and `-r leaks`; set `VIMG_REPAIR_SEED` for another seed.
#[test]
fn random_damage_matches_qemu() {
    if !qemu_available("random_damage_matches_qemu") {
        return;
    }
    let seed = std::env::var("VIMG_REPAIR_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7u64);
    let mut rng = common::Rng::seeded(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("base.qcow2");
    qemu_create(&base, "qcow2", "cluster_size=4096", None, 1 << 20);
    let mut cmds: Vec<String> = (0..24)
        .map(|i| format!("write -P {} {}k 4k", i + 1, rng.below(128) * 4))
        .collect();
    cmds.push("write -c -P 0x77 600k 4k".into());
    qemu_io(&base, "qcow2", &cmds);
    run("qemu-img", &["snapshot", "-c", "s1", s(&base)]);
    let cmds: Vec<String> = (0..8)
        .map(|i| format!("write -P {} {}k 4k", i + 100, rng.below(128) * 4))
        .collect();
    qemu_io(&base, "qcow2", &cmds);
    assert_eq!(qemu_check(&base, None).0, 0);
    let before = qemu_contents(&base, dir);
    let clusters = std::fs::metadata(&base).unwrap().len() / CS;

    let mut failures = Vec::new();
    let mut total_fixed = 0;
    for round in 0..24 {
        let damaged = dir.join(format!("r{round}.qcow2"));
        std::fs::copy(&base, &damaged).unwrap();
        let mut what = Vec::new();
        for _ in 0..1 + rng.below(4) {
            match rng.below(3) {
                0 => {
                    let c = rng.below(clusters);
                    let r = get_refcount(&damaged, c);
                    let v = r + 1 + rng.below(2) as u16;
                    set_refcount(&damaged, c, v);
                    what.push(format!("refcount {c}: {r}->{v}"));
                }
                1 => {
                    let c = rng.below(clusters);
                    let r = get_refcount(&damaged, c);
                    // Lowering to 0 makes qemu rebuild all refcount structures elsewhere.
                    if r >= 2 {
                        set_refcount(&damaged, c, r - 1);
                        what.push(format!("refcount {c}: {r}->{}", r - 1));
                    }
                }
                _ => {
                    let k = rng.below(CS / 8);
                    let a = l2e_addr(&damaged, k);
                    let e = rd64(&damaged, a);
                    if e & OFF_MASK != 0 && e & (1 << 62) == 0 {
                        wr64(&damaged, a, e ^ COPIED);
                        what.push(format!("COPIED of L2 entry {k}"));
                    }
                }
            }
        }
        for mode in ["leaks", "all"] {
            let tag = format!("round {round} -r {mode} ({})", what.join(", "));
            let q = dir.join(format!("r{round}-{mode}-qemu.qcow2"));
            let v = dir.join(format!("r{round}-{mode}-vimg.qcow2"));
            std::fs::copy(&damaged, &q).unwrap();
            std::fs::copy(&damaged, &v).unwrap();
            let (_, qj) = qemu_check(&q, Some(mode));
            let rmode = if mode == "all" {
                RepairMode::All
            } else {
                RepairMode::Leaks
            };
            let report = match Qcow2Image::open_for_repair(&v, &Default::default())
                .and_then(|i| repair(&i, rmode))
            {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{tag}: vimg repair failed: {e}"));
                    continue;
                }
            };
            total_fixed += report.corruptions_fixed + report.leaks_fixed;
            let (qafter, _) = qemu_check(&q, None);
            let (vafter, vaj) = qemu_check(&v, None);
            if key(&qj, "corruptions-fixed") != report.corruptions_fixed
                || key(&qj, "leaks-fixed") != report.leaks_fixed
                || qafter != vafter
            {
                failures.push(format!(
                    "{tag}: qemu {qj} then exit {qafter}; vimg {report:?} then exit {vafter} {vaj}"
                ));
            }
            if mode == "all" && vafter != 0 {
                failures.push(format!("{tag}: not clean after -r all: {vaj}"));
            }
            if qemu_contents(&v, dir) != before {
                failures.push(format!("{tag}: guest data changed"));
            }
            std::fs::remove_file(&q).ok();
            std::fs::remove_file(&v).ok();
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(total_fixed >= 24, "too little damage: {total_fixed} fixes");
}

/// A way to damage an image file.
type Damage = Box<dyn Fn(&Path)>;

/// Damage that needs the refcount structures rebuilt (qemu's `rebuild_refcount_structure`):
/// qemu-img and vimg repair separate copies with `-r all`; both copies must then check clean
/// and read as the undamaged image, and vimg's fixed counts must equal qemu-img's.
#[test]
fn rebuild_matches_qemu() {
    if !qemu_available("rebuild_matches_qemu") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (name, opts) in [
        ("64k", "cluster_size=65536"),
        ("4k-snap", "cluster_size=4096"),
    ] {
        let orig = dir.join(format!("{name}.qcow2"));
        qemu_create(&orig, "qcow2", opts, None, 4 << 20);
        qemu_io(
            &orig,
            "qcow2",
            &[
                "write -P 0x11 0 100k".into(),
                "write -P 0x22 2M 300k".into(),
            ],
        );
        run("qemu-img", &["snapshot", "-c", "s1", s(&orig)]);
        qemu_io(&orig, "qcow2", &["write -P 0x33 64k 64k".into()]);
        let cs = 1u64 << (rd64(&orig, 16) & 0xffff_ffff); // cluster_bits: bytes 20..24
        let damages: [(&str, Damage); 4] = [
            (
                "reftable entry zeroed",
                Box::new(|p: &Path| wr64(p, rd64(p, 48), 0)),
            ),
            (
                "refcount block garbage",
                Box::new(move |p: &Path| {
                    let block = rd64(p, rd64(p, 48));
                    let mut rng = common::Rng::seeded(7);
                    let garbage: Vec<u8> = (0..cs).map(|_| rng.next() as u8).collect();
                    let f = FsOpen::new().write(true).open(p).unwrap();
                    f.write_all_at(&garbage, block).unwrap();
                }),
            ),
            (
                "reftable past EOF",
                Box::new(move |p: &Path| {
                    let len = std::fs::metadata(p).unwrap().len();
                    wr64(p, 48, (len / cs + 10) * cs);
                }),
            ),
            (
                "refcount block overlaps L2",
                Box::new(|p: &Path| {
                    let l2 = rd64(p, rd64(p, 40)) & OFF_MASK;
                    wr64(p, rd64(p, 48), l2);
                }),
            ),
        ];
        for (what, damage) in damages.iter() {
            let tag = format!("[{name}: {what}]");
            let q = dir.join("q.qcow2");
            let v = dir.join("v.qcow2");
            std::fs::copy(&orig, &q).unwrap();
            damage(&q);
            std::fs::copy(&q, &v).unwrap();
            let (_, qj) = qemu_check(&q, Some("all"));
            let report = Qcow2Image::open_for_repair(&v, &Default::default())
                .and_then(|img| repair(&img, RepairMode::All))
                .unwrap_or_else(|e| panic!("{tag}: vimg repair failed: {e}"));
            assert_eq!(qemu_check(&q, None).0, 0, "{tag}: qemu's own repair");
            let (rc, after) = qemu_check(&v, None);
            assert_eq!(rc, 0, "{tag}: vimg's copy does not check clean: {after}");
            assert_eq!((report.corruptions, report.leaks), (0, 0), "{tag}");
            for img in [&q, &v] {
                let out = run("qemu-img", &["compare", s(&orig), s(img)]);
                assert!(out.contains("identical"), "{tag}: {out}");
            }
            assert_eq!(
                (report.corruptions_fixed, report.leaks_fixed),
                (key(&qj, "corruptions-fixed"), key(&qj, "leaks-fixed")),
                "{tag}: fixed counts differ from qemu-img's"
            );
            let snaps = run("qemu-img", &["snapshot", "-l", s(&v)]);
            assert!(snaps.contains("s1"), "{tag}: {snaps}");
        }
    }
}
