//! `vimg commit` against `qemu-img commit` as the oracle. Seeded random chains of 2 to 4 layers
//! (a raw or qcow2 base, qcow2 overlays of other virtual sizes, cluster sizes and options, each
//! with random data, zero, compressed writes and discards) are copied; vimg commits one copy
//! and qemu-img the other (into the backing file, with `-d`, or with `-b` into a layer further
//! down). Afterwards every layer must have the same contents in both copies (qemu-img
//! compare), the same virtual size and backing file (qemu-img info), and every qcow2 layer
//! vimg wrote must be clean (qemu-img check). Refused commits must exit as qemu-img does and
//! leave every file untouched.

use crate::common;

use common::chain::{self, Layer};
use common::{qemu_available, run_status, Rng};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn vimg(dir: &Path, args: &[&str]) -> (i32, String) {
    common::run_in(dir, VIMG, args)
}

fn qemu_img(dir: &Path, args: &[&str]) -> (i32, String) {
    common::run_in(dir, "qemu-img", args)
}

/// A random chain: a raw or qcow2 base and 1 to 3 qcow2 overlays.
fn random_chain(rng: &mut Rng) -> Vec<Layer> {
    let n = 2 + rng.below(3) as usize;
    (0..n)
        .map(|i| {
            let name = format!("l{i}.{}", if i == 0 { "img" } else { "qcow2" });
            if i == 0 && rng.below(3) == 0 {
                Layer::random_raw(rng, &name)
            } else {
                Layer::random_qcow2(rng, &name)
            }
        })
        .collect()
}

#[test]
fn commit_gives_what_qemu_img_commit_gives() {
    if !qemu_available("commit_oracle") {
        return;
    }
    let root = chain::fresh_dir("commit-oracle");
    let mut failures = Vec::new();
    let mut variants = [0usize; 4];
    let mut snapshots = 0;
    for seed in 0..36u64 {
        let mut rng = Rng::seeded(seed);
        let layers = random_chain(&mut rng);
        let built = root.join(format!("s{seed}"));
        std::fs::create_dir_all(&built).unwrap();
        chain::build(&built, &layers, &mut rng);
        let top = layers.last().unwrap().name.clone();
        // Sometimes the top has an internal snapshot (which emptying must keep) and more data.
        let with_snapshot = rng.below(4) == 0;
        if with_snapshot {
            let t = built.join(&top);
            common::run("qemu-img", &["snapshot", "-c", "s", t.to_str().unwrap()]);
            let more = chain::random_writes(&mut rng, layers.last().unwrap());
            common::qemu_io(&t, "qcow2", &more);
        }
        // The operation: plain, -d, -b the backing file, or -b a deeper layer.
        let variant = rng.below(4) as usize;
        let base_name;
        let mut args: Vec<&str> = vec!["commit", "-q"];
        match variant {
            1 => args.push("-d"),
            2 | 3 => {
                let below = layers.len() - 1;
                let idx = if variant == 2 || below == 1 {
                    below - 1
                } else {
                    rng.below(below as u64 - 1) as usize
                };
                base_name = layers[idx].name.clone();
                args.extend(["-b", &base_name]);
            }
            _ => {}
        }
        variants[variant] += 1;
        args.push(&top);
        let ours = root.join(format!("s{seed}-vimg"));
        let theirs = root.join(format!("s{seed}-qemu"));
        chain::copy_dir(&built, &ours);
        chain::copy_dir(&built, &theirs);
        let what = format!("seed {seed} ({})", args.join(" "));
        let (qc, qout) = qemu_img(&theirs, &args);
        let (vc, vout) = vimg(&ours, &args);
        if qc != vc {
            failures.push(format!(
                "{what}: exit {vc} (qemu-img {qc}): {vout} / qemu: {qout}"
            ));
            continue;
        }
        failures.extend(chain::compare_chains(&ours, &theirs, &layers, &what));
        // The chain's top still reads as it did before (qemu-img's result is the oracle, but
        // say so directly too).
        let (code, out) = chain::compare(&built.join(&top), "qcow2", &ours.join(&top), "qcow2");
        if code != 0 {
            failures.push(format!("{what}: the top reads differently: {out}"));
        }
        if with_snapshot {
            snapshots += 1;
            let read = |dir: &Path| {
                let out = dir.join("snap.raw");
                let (c, m) = common::run_in(
                    dir,
                    "qemu-img",
                    &["convert", "-l", "s", "-O", "raw", &top, "snap.raw"],
                );
                assert_eq!(c, 0, "{m}");
                std::fs::read(out).unwrap()
            };
            if read(&ours) != read(&theirs) {
                failures.push(format!("{what}: the top's snapshot reads differently"));
            }
        }
        for d in [&built, &ours, &theirs] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    eprintln!(
        "commit variants (plain, -d, -b backing, -b deeper): {variants:?}, {snapshots} tops with a snapshot"
    );
    assert!(
        variants.iter().all(|&n| n > 0) && snapshots > 0,
        "{variants:?}"
    );
    common::assert_no_failures(&failures);
}

/// Overlay data over a base that is smaller (it grows, raw and qcow2) and over a zeroed range
/// (committed as zeros, not left to show the base through).
#[test]
fn a_smaller_base_grows_and_zeros_are_committed() {
    if !qemu_available("commit_oracle") {
        return;
    }
    let dir = chain::fresh_dir("commit-grow");
    for base_fmt in ["raw", "qcow2"] {
        let base = Layer {
            name: format!("base.{base_fmt}"),
            format: if base_fmt == "raw" { "raw" } else { "qcow2" },
            size: 1_000_448,
            cluster: 4096,
            opts: if base_fmt == "raw" {
                String::new()
            } else {
                "cluster_size=4096".into()
            },
        };
        let top = Layer {
            name: "top.qcow2".into(),
            format: "qcow2",
            size: 3 << 20,
            cluster: 65536,
            opts: String::new(),
        };
        let built = dir.join(format!("{base_fmt}-built"));
        std::fs::create_dir_all(&built).unwrap();
        let mut rng = Rng::seeded(7);
        chain::build(&built, &[base.clone(), top.clone()], &mut rng);
        common::qemu_io(
            &built.join(&base.name),
            base.format,
            &["write -P 0x11 0 1000448".into()],
        );
        common::qemu_io(
            &built.join(&top.name),
            "qcow2",
            &["write -z 4096 65536".into(), "write -P 0x22 2M 64k".into()],
        );
        let before = common::qemu_contents(&built.join("top.qcow2"), &dir);
        let ours = dir.join(format!("{base_fmt}-vimg"));
        let theirs = dir.join(format!("{base_fmt}-qemu"));
        chain::copy_dir(&built, &ours);
        chain::copy_dir(&built, &theirs);
        let (vc, vout) = vimg(&ours, &["commit", "top.qcow2"]);
        assert_eq!(vc, 0, "{vout}");
        assert_eq!(vout.trim(), "Image committed.");
        let (qc, qout) = qemu_img(&theirs, &["commit", "top.qcow2"]);
        assert_eq!(qc, 0, "{qout}");
        let bad = chain::compare_chains(&ours, &theirs, &[base.clone(), top.clone()], base_fmt);
        assert!(bad.is_empty(), "{bad:?}");
        let got = common::qemu_contents(&ours.join(&base.name), &dir);
        assert_eq!(
            got.len(),
            3 << 20,
            "{base_fmt}: the base grew to the overlay's size"
        );
        assert!(
            got == before,
            "{base_fmt}: the base reads as the overlay did"
        );
        // The overlay is empty: it reads the base through, and allocates nothing.
        let map = common::run(
            "qemu-img",
            &[
                "map",
                "--output=json",
                ours.join("top.qcow2").to_str().unwrap(),
            ],
        );
        assert!(!map.contains("\"depth\": 0"), "{base_fmt}: {map}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Refusals exit as qemu-img's do and change nothing.
#[test]
fn refused_commits_exit_as_qemu_img_and_change_nothing() {
    if !qemu_available("commit_oracle") {
        return;
    }
    let dir = chain::fresh_dir("commit-refusals");
    let mut rng = Rng::seeded(3);
    let layers = vec![
        Layer::random_qcow2(&mut rng, "base.qcow2"),
        Layer::random_qcow2(&mut rng, "top.qcow2"),
    ];
    chain::build(&dir, &layers, &mut rng);
    run_status(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            dir.join("other.qcow2").to_str().unwrap(),
            "1M",
        ],
    );
    run_status(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            dir.join("r.raw").to_str().unwrap(),
            "1M",
        ],
    );
    let before = chain::dir_bytes(&dir);
    let cases: &[&[&str]] = &[
        &["commit", "base.qcow2"],
        &["commit", "-f", "raw", "r.raw"],
        &["commit", "-b", "other.qcow2", "top.qcow2"],
        &["commit", "-b", "top.qcow2", "top.qcow2"],
        &["commit", "-b", "nonexistent", "top.qcow2"],
        &["commit", "nonexistent.qcow2"],
        &["commit", "-r", "-5", "top.qcow2"],
        &["commit", "-r", "abc", "top.qcow2"],
        &["commit", "-t", "bogus", "top.qcow2"],
        &["commit", "-f", "raw", "top.qcow2"],
    ];
    for args in cases {
        let (vc, vout) = vimg(&dir, args);
        let (qc, qout) = qemu_img(&dir, args);
        assert_eq!(vc, qc, "{args:?}: vimg: {vout} qemu-img: {qout}");
        assert_ne!(vc, 0, "{args:?}");
        assert!(chain::dir_bytes(&dir) == before, "{args:?} changed a file");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `-r` is accepted as qemu-img takes it, and paces the copy.
#[test]
fn rate_limits_are_accepted_and_respected() {
    if !qemu_available("commit_oracle") {
        return;
    }
    let dir = chain::fresh_dir("commit-rate");
    let layers = vec![
        Layer {
            name: "base.qcow2".into(),
            format: "qcow2",
            size: 4 << 20,
            cluster: 65536,
            opts: String::new(),
        },
        Layer {
            name: "top.qcow2".into(),
            format: "qcow2",
            size: 4 << 20,
            cluster: 65536,
            opts: String::new(),
        },
    ];
    let mut rng = Rng::seeded(11);
    chain::build(&dir, &layers, &mut rng);
    common::qemu_io(&dir.join("top.qcow2"), "qcow2", &["write -P 9 0 1M".into()]);
    let t = std::time::Instant::now();
    let (code, out) = vimg(&dir, &["commit", "-d", "-r", "2M", "top.qcow2"]);
    assert_eq!(code, 0, "{out}");
    // 1 MiB (at least) at 2 MiB/s takes at least half a second.
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
    // Nothing allocated above the base any more (a new empty overlay): only parsing counts.
    common::qemu_create(
        &dir.join("empty.qcow2"),
        "qcow2",
        "",
        Some((&dir.join("top.qcow2"), "qcow2")),
        4 << 20,
    );
    for r in ["0", "1.5k", "1T"] {
        let (code, out) = vimg(&dir, &["commit", "-q", "-r", r, "empty.qcow2"]);
        assert_eq!(code, 0, "-r {r}: {out}");
    }
    let (code, out) = chain::compare(
        &dir.join("base.qcow2"),
        "qcow2",
        &dir.join("top.qcow2"),
        "qcow2",
    );
    assert_eq!(code, 0, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
