//! `resize --shrink` gives back the host space of every cluster it drops (issue 13, item 7;
//! qemu-iotests 250): qemu discards the dropped clusters (QCOW2_DISCARD_ALWAYS, so a freed
//! cluster in the middle of the file is punched) and truncates the file after the last
//! cluster in use. vimg only truncated, so the dropped clusters before the file's last used
//! one kept their disk space (du fell by 5 MiB where qemu-img's fell by 15 MiB in test 250).
//!
//! Identical images are shrunk by vimg and by qemu-img; the space each file occupies
//! afterwards (st_blocks) must be within one cluster of the other, the disk and every
//! snapshot must read the same, and `qemu-img check` must find nothing.

use crate::common;

use common::{qemu_available, qemu_io, run, run_status};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vimg-shrink-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Bytes of disk space the file occupies (`du --block-size=1`).
fn used(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// The guest contents of `p` as qemu-img reads them.
fn contents(p: &Path) -> Vec<u8> {
    let raw = p.with_extension("raw");
    let _ = std::fs::remove_file(&raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            p.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let d = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    d
}

/// The whole disk of snapshot `s` of `p` at its own size (read by qemu-img from a copy
/// reverted to it: `convert -l` would cut it at the active disk's size).
fn snapshot_contents(p: &Path) -> Vec<u8> {
    let copy = p.with_extension("snap.qcow2");
    std::fs::copy(p, &copy).unwrap();
    run("qemu-img", &["snapshot", "-a", "s", copy.to_str().unwrap()]);
    let d = contents(&copy);
    std::fs::remove_file(&copy).unwrap();
    d
}

struct Case {
    name: &'static str,
    opts: &'static str,
    size: &'static str,
    cluster: u64,
    io: &'static [&'static str],
    snapshot: bool,
    new_size: &'static str,
}

const CASES: &[Case] = &[
    // qemu-iotests 250 itself: the data past the new end lies in the middle of the file.
    Case {
        name: "iotests-250",
        opts: "cluster_size=1M,preallocation=metadata",
        size: "2100M",
        cluster: 1 << 20,
        io: &[
            "discard 0 10M",
            "discard 2090M 10M",
            "write -P 0x25 2090M 10M",
            "write -P 0x0a 0 10M",
        ],
        snapshot: false,
        new_size: "5M",
    },
    // 64 KiB clusters, data interleaved before and after the new end, no preallocation.
    Case {
        name: "interleaved",
        opts: "",
        size: "64M",
        cluster: 64 << 10,
        io: &[
            "write -P 0x31 40M 4M",
            "write -P 0x32 0 2M",
            "write -P 0x33 50M 3M",
            "write -P 0x34 2M 1M",
            "write -c -P 0x35 60M 1M",
        ],
        snapshot: false,
        new_size: "3M",
    },
    // Shared clusters keep their space (a snapshot still uses them); private ones go.
    Case {
        name: "snapshot",
        opts: "",
        size: "64M",
        cluster: 64 << 10,
        io: &["write -P 0x41 20M 4M", "write -P 0x42 0 1M"],
        snapshot: true,
        new_size: "2M",
    },
];

fn prepare(c: &Case, p: &Path) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            if c.opts.is_empty() {
                "cluster_size=65536"
            } else {
                c.opts
            },
            p.to_str().unwrap(),
            c.size,
        ],
    );
    let io: Vec<String> = c.io.iter().map(|s| s.to_string()).collect();
    qemu_io(p, "qcow2", &io);
    if c.snapshot {
        run("qemu-img", &["snapshot", "-c", "s", p.to_str().unwrap()]);
        // Private data after the snapshot, past the new end and in the middle of the file.
        qemu_io(p, "qcow2", &["write -P 0x43 30M 6M".into()]);
        qemu_io(p, "qcow2", &["write -P 0x44 1M 1M".into()]);
    }
}

#[test]
fn shrinking_frees_the_host_space_of_every_dropped_cluster_as_qemu_img_does() {
    if !qemu_available("resize --shrink disk usage") {
        return;
    }
    let dir = tmpdir("du");
    let mut failures = Vec::new();
    for c in CASES {
        let v = dir.join(format!("{}-vimg.qcow2", c.name));
        let q = dir.join(format!("{}-qemu.qcow2", c.name));
        // Made twice the same way (a copy of the file may lay out its holes differently).
        prepare(c, &v);
        prepare(c, &q);
        let snap_before = c.snapshot.then(|| snapshot_contents(&v));
        let (before, qbefore) = (used(&v), used(&q));
        let (code, out) = run_status(
            VIMG,
            &["resize", "--shrink", v.to_str().unwrap(), c.new_size],
        );
        if code != 0 {
            failures.push(format!("{}: vimg resize failed: {out}", c.name));
            continue;
        }
        run(
            "qemu-img",
            &["resize", "--shrink", q.to_str().unwrap(), c.new_size],
        );
        let (vu, qu) = (used(&v), used(&q));
        let (vfreed, qfreed) = (before as i64 - vu as i64, qbefore as i64 - qu as i64);
        eprintln!(
            "{}: vimg {before} -> {vu} (freed {vfreed}), qemu-img {qbefore} -> {qu} (freed {qfreed})",
            c.name
        );
        if vu.abs_diff(qu) > c.cluster || vfreed.abs_diff(qfreed) > c.cluster {
            failures.push(format!(
                "{}: vimg's shrink freed {vfreed} bytes ({vu} left), qemu-img's {qfreed} ({qu} left)",
                c.name
            ));
        }
        let (code, out) = run_status("qemu-img", &["check", v.to_str().unwrap()]);
        if code != 0 {
            failures.push(format!("{}: qemu-img check after vimg: {out}", c.name));
        }
        if contents(&v) != contents(&q) {
            failures.push(format!("{}: the disks differ", c.name));
        }
        if let Some(s) = snap_before {
            if snapshot_contents(&v) != s {
                failures.push(format!("{}: the snapshot changed", c.name));
            }
        }
    }
    common::assert_no_failures(&failures);
    let _ = std::fs::remove_dir_all(&dir);
}
