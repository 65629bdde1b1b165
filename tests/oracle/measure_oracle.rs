//! `vimg measure` against `qemu-img measure` as the oracle: every case runs both with the same
//! arguments and compares standard output byte for byte and the exit code; for failures, the
//! error message (after the program name) must equal the first line qemu-img prints.
//!
//! Cases: `--size` over sizes (0, 1, odd, 1.5G, 1T, 4T, too large) crossed with cluster sizes,
//! refcount widths, extended L2, compat levels and preallocation modes, `-O raw`; IMAGE inputs
//! written by qemu-io (raw sparse files, qcow2 images with data, zero and compressed clusters,
//! partial subclusters, metadata preallocation, backing chains, version 2 images, persistent
//! bitmaps), measured for several target options, in human and JSON output.

use crate::common;

use common::{qemu_available, qemu_create, qemu_io, Rng};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vimg-measure-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `prog measure ARGS`: (stdout, first stderr line without the program prefix, exit code).
fn measure(prog: &str, args: &[String]) -> (String, String, i32) {
    let out = Command::new(prog)
        .arg("measure")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().next().unwrap_or("");
    let first = first
        .strip_prefix("qemu-img: ")
        .or_else(|| first.strip_prefix("vimg: "))
        .unwrap_or(first)
        .to_string();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        first,
        out.status.code().unwrap_or(-1),
    )
}

/// Compares vimg and qemu-img on one argument list; returns qemu's stdout.
fn same(args: &[String]) -> String {
    let want = measure("qemu-img", args);
    let got = measure(env!("CARGO_BIN_EXE_vimg"), args);
    assert_eq!(got.0, want.0, "stdout of measure {args:?}");
    assert_eq!(
        got.2, want.2,
        "exit code of measure {args:?} (stderr {:?})",
        got.1
    );
    if want.2 != 0 {
        assert_eq!(got.1, want.1, "error of measure {args:?}");
    }
    want.0
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn size_matrix() {
    if !qemu_available("size_matrix") {
        return;
    }
    let sizes = ["0", "1", "65537", "1.5G", "1T", "4T"];
    let clusters = ["512", "64k", "2M"];
    let refcounts = ["1", "16", "64"];
    let preallocs = ["off", "metadata", "falloc", "full"];
    let mut n = 0usize;
    let mut ok = 0usize;
    for size in sizes {
        for cs in clusters {
            for rb in refcounts {
                for ext in ["off", "on"] {
                    for compat in ["0.10", "1.1"] {
                        let pre = preallocs[n % preallocs.len()];
                        let output = if n.is_multiple_of(2) { "human" } else { "json" };
                        n += 1;
                        let o = format!(
                            "cluster_size={cs},refcount_bits={rb},extended_l2={ext},compat={compat},preallocation={pre}"
                        );
                        let args =
                            strs(&["-O", "qcow2", "-o", &o, "--size", size, "--output", output]);
                        if !same(&args).is_empty() {
                            ok += 1;
                        }
                    }
                }
            }
        }
    }
    // The matrix must mostly measure, not mostly fail (errors are compared too).
    assert!(ok > n / 3, "only {ok} of {n} cases measured");

    // Every preallocation mode with the defaults, and the defaults themselves.
    for size in ["0", "1", "511", "1G", "1T", "4T"] {
        for pre in preallocs {
            for output in ["human", "json"] {
                same(&strs(&[
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("preallocation={pre}"),
                    "--size",
                    size,
                    "--output",
                    output,
                ]));
            }
        }
        same(&strs(&["--size", size]));
        same(&strs(&["-O", "raw", "--size", size, "--output", "json"]));
        same(&strs(&[
            "-O",
            "raw",
            "-o",
            "preallocation=full",
            "--size",
            size,
        ]));
        same(&strs(&["-O", "qcow2", "--size", size]));
    }
    // Options that do not change the figures, and later options winning.
    for o in [
        "lazy_refcounts=on",
        "compat=0.10,lazy_refcounts=on",
        "compression_type=zstd",
        "data_file=x.img,data_file_raw=on",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "nocow=on",
        "cluster_size=4k,cluster_size=2M",
        "size=5M",
    ] {
        same(&strs(&["-O", "qcow2", "-o", o, "--size", "3G"]));
    }
    same(&strs(&["-O", "qcow2", "-o", "size=5M"]));
    same(&strs(&[
        "-O",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-o",
        "refcount_bits=64",
        "--size",
        "77M",
    ]));
}

#[test]
fn errors_match() {
    if !qemu_available("errors_match") {
        return;
    }
    let dir = tmpdir("errors");
    let img = dir.join("a.qcow2");
    qemu_create(&img, "qcow2", "", None, 1 << 20);
    let p = img.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--size", "1G", p],
        vec![p, p],
        vec!["--size", "-1"],
        vec!["--size", "8E"],
        vec!["--size", "1x"],
        vec!["-O", "vmdk", "--size", "1G"],
        vec!["-O", "nonsense", "--size", "1G"],
        vec!["-O", "qcow2", "--size", "9223372036854775807"],
        vec!["-O", "qcow2", "-o", "cluster_size=2M", "--size", "8E"],
        vec!["-O", "qcow2", "-o", "cluster_size=512", "--size", "4T"],
        vec!["-O", "qcow2", "-o", "cluster_size=3000", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "cluster_size=4M", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "refcount_bits=128", "--size", "1G"],
        vec![
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=1",
            "--size",
            "1G",
        ],
        vec![
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
            "--size",
            "1G",
        ],
        vec!["-O", "qcow2", "-o", "foo=1", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "help", "--size", "1G"],
        vec!["-O", "raw", "-o", "cluster_size=64k", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "cluster_size=512", p],
        vec!["-O", "qcow2", "-o", "cluster_size=512", "-o", "size=1T", p],
    ];
    for c in cases {
        same(&strs(&c));
    }
    // A missing image fails in both (the messages name the file differently).
    let missing = dir.join("missing.qcow2");
    let args = strs(&["-O", "qcow2", missing.to_str().unwrap()]);
    assert_eq!(measure("qemu-img", &args).2, 1);
    assert_eq!(measure(env!("CARGO_BIN_EXE_vimg"), &args).2, 1);
    std::fs::remove_dir_all(&dir).ok();
}

/// The target options each source image is measured for.
const TARGETS: &[&[&str]] = &[
    &["-O", "qcow2"],
    &["-O", "qcow2", "-o", "cluster_size=512"],
    &["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64"],
    &["-O", "qcow2", "-o", "extended_l2=on,refcount_bits=1"],
    &["-O", "qcow2", "-o", "compat=0.10"],
    &["-O", "qcow2", "-o", "preallocation=full"],
    &[
        "-O",
        "qcow2",
        "-o",
        "preallocation=metadata,cluster_size=4k",
    ],
    &[
        "-O",
        "qcow2",
        "-o",
        "backing_file=other.qcow2,backing_fmt=qcow2",
    ],
    &["-O", "raw"],
    &[],
];

fn measure_image(img: &Path, fmt: &str) -> Vec<String> {
    let p = img.to_str().unwrap();
    let mut outs = Vec::new();
    for (i, t) in TARGETS.iter().enumerate() {
        let mut args = strs(t);
        args.extend(strs(&["-f", fmt, p]));
        if i % 2 == 1 {
            args.extend(strs(&["--output", "json"]));
        }
        outs.push(same(&args));
    }
    outs
}

/// qemu-io commands writing random ranges of a disk of `size` bytes with clusters of `cs`
/// bytes: first `n / 4` compressed clusters (qcow2 only; compressed writes need unallocated
/// clusters), then `n` ranges of data or (qcow2 only) zeros.
fn random_writes(rng: &mut Rng, size: u64, cs: u64, n: usize, qcow2: bool) -> Vec<String> {
    let mut cmds = Vec::new();
    if qcow2 {
        let mut used = Vec::new();
        for _ in 0..n / 4 {
            let c = rng.below(size / cs);
            if !used.contains(&c) {
                used.push(c);
                cmds.push(format!(
                    "write -c -P 0x{:x} {} {cs}",
                    1 + rng.below(250),
                    c * cs
                ));
            }
        }
    }
    for _ in 0..n {
        let len = (512 * (1 + rng.below(3 * cs / 512 + 8))).min(size);
        let off = rng.below((size - len) / 512 + 1) * 512;
        if qcow2 && rng.below(3) == 0 {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P 0x{:x} {off} {len}", 1 + rng.below(250)));
        }
    }
    cmds
}

#[test]
fn images_match() {
    if !qemu_available("images_match") {
        return;
    }
    let dir = tmpdir("images");
    let mut rng = Rng::seeded(0x6d65_6173);

    // Raw sparse files: empty, odd-sized, with scattered data.
    let empty = dir.join("empty.raw");
    std::fs::File::create(&empty)
        .unwrap()
        .set_len(10 << 20)
        .unwrap();
    measure_image(&empty, "raw");
    let odd = dir.join("odd.raw");
    std::fs::write(&odd, vec![7u8; 1000]).unwrap();
    measure_image(&odd, "raw");
    for seed in 0..3 {
        let raw = dir.join(format!("sparse{seed}.raw"));
        let size = (8 << 20) + 4096 * seed;
        std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
        let cmds = random_writes(&mut rng, size, 65536, 6, false);
        qemu_io(&raw, "raw", &cmds);
        measure_image(&raw, "raw");
    }

    // qcow2 images with data, zero and compressed clusters.
    let mut nonzero = 0;
    for (i, (opts, cs)) in [
        ("cluster_size=64k", 65536),
        ("cluster_size=512", 512),
        ("cluster_size=2M", 2 << 20),
        ("cluster_size=64k,extended_l2=on", 65536),
        ("compat=0.10,cluster_size=4k", 4096),
        ("refcount_bits=1,cluster_size=16k", 16384),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.join(format!("img{i}.qcow2"));
        let size = (12 << 20) + 512 * i as u64 * 3;
        qemu_create(&img, "qcow2", opts, None, size);
        let before = measure_image(&img, "qcow2");
        let cmds = random_writes(&mut rng, size, cs, 12, true);
        qemu_io(&img, "qcow2", &cmds);
        let after = measure_image(&img, "qcow2");
        if before != after {
            nonzero += 1;
        }
    }
    assert!(
        nonzero >= 5,
        "writes changed the figures of only {nonzero} images"
    );

    // Metadata preallocation: data clusters over host holes read as zeros.
    let pre = dir.join("prealloc.qcow2");
    qemu_create(&pre, "qcow2", "preallocation=metadata", None, 5 << 20);
    measure_image(&pre, "qcow2");
    qemu_io(&pre, "qcow2", &["write -P 0x11 1M 100k".to_string()]);
    measure_image(&pre, "qcow2");

    // Backing chains: data in the base counts, zeros in the overlay hide it.
    let base = dir.join("base.qcow2");
    qemu_create(&base, "qcow2", "cluster_size=4k", None, 6 << 20);
    qemu_io(
        &base,
        "qcow2",
        &strs(&[
            "write -P 1 0 2M",
            "write -P 2 4M 64k",
            "write -c -P 3 5M 4k",
        ]),
    );
    let mid = dir.join("mid.qcow2");
    qemu_create(&mid, "qcow2", "", Some((&base, "qcow2")), 6 << 20);
    qemu_io(
        &mid,
        "qcow2",
        &strs(&["write -z 0 1M", "write -P 4 3M 8k", "write -z 4M 4k"]),
    );
    measure_image(&mid, "qcow2");
    let top = dir.join("top.qcow2");
    qemu_create(
        &top,
        "qcow2",
        "cluster_size=512",
        Some((&mid, "qcow2")),
        8 << 20,
    );
    qemu_io(
        &top,
        "qcow2",
        &strs(&["write -P 5 7M 1536", "write -z 1M 64k"]),
    );
    measure_image(&top, "qcow2");
    let rawbase = dir.join("rawbase.raw");
    std::fs::File::create(&rawbase)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    qemu_io(&rawbase, "raw", &strs(&["write -P 9 1M 300k"]));
    let over = dir.join("over.qcow2");
    qemu_create(&over, "qcow2", "", Some((&rawbase, "raw")), 4 << 20);
    measure_image(&over, "qcow2");

    // A raw backing file shorter than the overlay.
    let short = dir.join("short.raw");
    std::fs::File::create(&short)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    qemu_io(&short, "raw", &strs(&["write -P 2 0 1M"]));
    let longer = dir.join("longer.qcow2");
    qemu_create(&longer, "qcow2", "", Some((&short, "raw")), 4 << 20);
    measure_image(&longer, "qcow2");

    // External data files (block status comes from the qcow2 metadata), with and without
    // data_file_raw, and internal snapshots (only the active state counts).
    for (i, opts) in ["data_file=DF", "data_file=DF,data_file_raw=on"]
        .iter()
        .enumerate()
    {
        let img = dir.join(format!("df{i}.qcow2"));
        let df = dir.join(format!("df{i}.data"));
        let opts = opts.replace("DF", df.to_str().unwrap());
        qemu_create(&img, "qcow2", &opts, None, 5 << 20);
        qemu_io(
            &img,
            "qcow2",
            &strs(&["write -P 1 1M 70k", "write -z 3M 64k"]),
        );
        measure_image(&img, "qcow2");
    }
    let snap = dir.join("snap.qcow2");
    qemu_create(&snap, "qcow2", "", None, 4 << 20);
    qemu_io(&snap, "qcow2", &strs(&["write -P 1 0 1M"]));
    let sp = snap.to_str().unwrap();
    common::run("qemu-img", &["snapshot", "-c", "s1", sp]);
    qemu_io(
        &snap,
        "qcow2",
        &strs(&["write -z 0 512k", "write -P 3 2M 128k"]),
    );
    measure_image(&snap, "qcow2");

    // Persistent bitmaps (version 3 only; a v2 target or raw source shows none).
    let bm = dir.join("bitmaps.qcow2");
    qemu_create(&bm, "qcow2", "", None, 10 << 20);
    measure_image(&bm, "qcow2");
    let b = bm.to_str().unwrap();
    common::run("qemu-img", &["bitmap", "--add", b, "b1"]);
    common::run(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            "512",
            b,
            "a-much-longer-bitmap-name",
        ],
    );
    common::run("qemu-img", &["bitmap", "--add", "-g", "2M", b, "x"]);
    let outs = measure_image(&bm, "qcow2");
    assert!(
        outs[0].contains("bitmaps size: ") && !outs[0].contains("bitmaps size: 0\n"),
        "bitmaps not measured: {}",
        outs[0]
    );
    std::fs::remove_dir_all(&dir).ok();
}
