//! Allocation parity with qemu: the same seeded sequence of writes and zero writes is applied
//! by qemu-io to one copy of an image and by vimg to another. Afterwards the two must read
//! the same (`qemu-img compare`), vimg's must pass `qemu-img check`, and `qemu-img map` must
//! report the same status for every range (data, zero, present, depth; host offsets may
//! differ). With extended L2 entries this proves that vimg allocates subcluster by subcluster
//! as qemu does: a partial write leaves the untouched subclusters of a new cluster unallocated
//! (still reading from the backing file), and zero writes set zero bits per subcluster. Without
//! extended L2 it proves the partial-cluster zero rule (a cluster that holds no data and whose
//! other bytes already read as zeros is marked zero as a whole, not written).

use crate::common;

use common::{qemu_available, qemu_create, qemu_io, run, Rng};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use vimg::open::ChainGuard;
use vimg::qcow2::Qcow2Image;
use vimg::{BlockImage, GuestOffset};

/// One guest operation, as qemu-io spells it and as vimg performs it.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64, unmap: bool },
}

impl Op {
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write { off, len, byte } => format!("write -P {byte} {off} {len}"),
            Op::Zero { off, len, unmap } => {
                format!("write -z{} {off} {len}", if unmap { " -u" } else { "" })
            }
        }
    }

    fn apply(&self, img: &Qcow2Image) {
        match *self {
            Op::Write { off, len, byte } => img
                .write_at(&vec![byte; len as usize], GuestOffset(off))
                .unwrap(),
            Op::Zero { off, len, unmap } => img.write_zeroes(GuestOffset(off), len, unmap).unwrap(),
        }
    }
}

/// Random operations on a disk of `size` bytes with clusters of `cs`, sector-aligned as qemu-io
/// requires, biased towards ranges smaller than a cluster and not aligned to subclusters.
fn ops(rng: &mut Rng, size: u64, cs: u64, n: usize) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let off = rng.below(size / 512) * 512;
            let max = (size - off) / 512;
            let len = match rng.below(3) {
                0 => 1 + rng.below(8),
                1 => 1 + rng.below(cs / 512),
                _ => 1 + rng.below(3 * cs / 512),
            }
            .min(max)
                * 512;
            if rng.below(3) == 0 {
                Op::Zero {
                    off,
                    len,
                    unmap: rng.below(2) == 0,
                }
            } else {
                Op::Write {
                    off,
                    len,
                    byte: 1 + rng.below(250) as u8,
                }
            }
        })
        .collect()
}

/// `qemu-img map --output=json` of `path` without host offsets, merged where that made two
/// neighbouring ranges equal.
fn map_status(path: &Path) -> Vec<Value> {
    let out = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            path.to_str().unwrap(),
        ],
    );
    let mut merged: Vec<Value> = Vec::new();
    for mut e in serde_json::from_str::<Vec<Value>>(&out).unwrap() {
        let o = e.as_object_mut().unwrap();
        o.remove("offset");
        let len = o.remove("length").unwrap().as_u64().unwrap();
        let start = o.remove("start").unwrap().as_u64().unwrap();
        if let Some(last) = merged.last_mut() {
            let lo = last.as_object_mut().unwrap();
            let same = lo
                .iter()
                .all(|(k, v)| k == "start" || k == "length" || o.get(k) == Some(v));
            if same {
                let l = lo["length"].as_u64().unwrap();
                lo.insert("length".into(), (l + len).into());
                continue;
            }
        }
        let mut v = e.clone();
        let vo = v.as_object_mut().unwrap();
        vo.insert("start".into(), start.into());
        vo.insert("length".into(), len.into());
        merged.push(v);
    }
    merged
}

fn run_case(dir: &Path, name: &str, opts: &str, backing: bool, seed: u64) {
    let mut rng = Rng::seeded(seed);
    let cs: u64 = if opts.contains("cluster_size=2M") {
        2 << 20
    } else if opts.contains("cluster_size=32k") {
        32 << 10
    } else {
        64 << 10
    };
    let size = 6 * cs + 3 * 512 + rng.below(4) * cs / 32;
    let base = dir.join(format!("{name}.base.qcow2"));
    let b = backing.then(|| {
        qemu_create(&base, "qcow2", "", None, size);
        let mut cmds = Vec::new();
        for i in 0..6 {
            let off = rng.below(size / 512) * 512;
            let len = (1 + rng.below(2 * cs / 512)).min((size - off) / 512) * 512;
            cmds.push(format!("write -P {} {off} {len}", 200 + i));
        }
        qemu_io(&base, "qcow2", &cmds);
        (base.as_path(), "qcow2")
    });
    let a = dir.join(format!("{name}.qemu.qcow2"));
    let v = dir.join(format!("{name}.vimg.qcow2"));
    qemu_create(&a, "qcow2", opts, b, size);
    std::fs::copy(&a, &v).unwrap();
    let ops = ops(&mut rng, size, cs, 40);
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    qemu_io(&a, "qcow2", &cmds);
    {
        let img = Qcow2Image::open(&v, true, false, &mut ChainGuard::default()).unwrap();
        for op in &ops {
            op.apply(&img);
        }
        img.flush().unwrap();
    }
    let ctx = format!("{name} (options {opts:?}, backing {backing}, seed {seed}): {ops:?}");
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", v.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check failed for {ctx}\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .args([&a, &v])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "contents differ for {ctx}\n{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let (qm, vm) = (map_status(&a), map_status(&v));
    assert_eq!(qm, vm, "qemu-img map differs (qemu's left) for {ctx}");
    for p in [&a, &v, &base] {
        std::fs::remove_file(p).ok();
    }
}

fn seed() -> u64 {
    std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        })
}

#[test]
fn allocation_matches_qemu() {
    if !qemu_available("allocation_matches_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seed = seed();
    eprintln!("allocation_matches_qemu: seed {seed}");
    let configs = [
        ("ext64k", "extended_l2=on", false),
        ("ext64k_b", "extended_l2=on", true),
        ("ext32k_b", "extended_l2=on,cluster_size=32k", true),
        ("ext2m_b", "extended_l2=on,cluster_size=2M", true),
        ("std64k", "", false),
        ("std64k_b", "", true),
    ];
    for round in 0..6u64 {
        for (i, (name, opts, backing)) in configs.iter().enumerate() {
            run_case(
                dir.path(),
                name,
                opts,
                *backing,
                seed.wrapping_add(round * 100 + i as u64),
            );
        }
    }
}
