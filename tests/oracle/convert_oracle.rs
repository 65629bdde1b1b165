//! `vimg convert` against `qemu-img convert` as the oracle: `-B` backing files (raw and qcow2
//! sources, with and without their own backing file, v2 and v3 targets, clusters equal to,
//! different from and zero over the backing file), `--target-is-zero`, guest-ordered allocation
//! and `-W`, several sources of odd sizes, and the command-line refusals with qemu-img's exit
//! codes. Every output must read like its source (`qemu-img compare`) and pass `qemu-img check`.

use crate::common;

use common::{qemu_available, qemu_create, qemu_io, run, Rng};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CS: u64 = 65536;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn vimg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vimg"))
        .args(args)
        .output()
        .expect("run vimg")
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs vimg and panics with its stderr unless it succeeds.
fn vimg_ok(args: &[&str]) {
    let o = vimg(args);
    assert!(
        o.status.success(),
        "vimg {} failed: {}",
        args.join(" "),
        text(&o.stderr)
    );
}

/// `qemu-img compare` says the two images read the same.
fn assert_same(a: &Path, b: &Path, what: &str) {
    let o = qemu_img(&["compare", p(a), p(b)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}: {} and {} differ: {}{}",
        a.display(),
        b.display(),
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `qemu-img check` finds nothing wrong.
fn assert_clean(img: &Path, what: &str) {
    let o = qemu_img(&["check", p(img)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}: check of {}: {}{}",
        img.display(),
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `qemu-img map --output=json` of an image.
fn map(img: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&run("qemu-img", &["map", "--output=json", p(img)])).expect("map json")
}

/// Bytes the top layer stores as data.
fn top_data_bytes(img: &Path) -> u64 {
    map(img)
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// Whether the map entry covering guest offset `off` is stored in the top layer, and whether
/// it is data and whether it reads as zeros there.
fn status_at(entries: &[serde_json::Value], off: u64) -> (bool, bool, bool) {
    let e = entries
        .iter()
        .find(|e| {
            let s = e["start"].as_u64().unwrap();
            s <= off && off < s + e["length"].as_u64().unwrap()
        })
        .expect("offset mapped");
    (
        e["depth"] == 0 && e["present"] == true,
        e["data"] == true,
        e["zero"] == true,
    )
}

/// `qemu-img info --output=json` of an image.
fn info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(img)])).expect("info json")
}

/// What an overlay does to one cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Nothing,
    /// Writes what the backing file holds there (an equal cluster).
    Same,
    Different,
    /// A zero cluster (qemu-io `write -z`).
    ZeroCluster,
    /// Zeros written as data.
    ZeroData,
    /// 4 KiB of new data inside the cluster.
    Partial,
}

/// A base image (`fmt`) of `base_clusters` clusters, some holding a pattern, and a qcow2 overlay
/// of `size` bytes on it with a random [`Op`] per cluster. Returns the overlay and the ops.
fn layered(
    dir: &Path,
    tag: &str,
    fmt: &str,
    base_clusters: u64,
    size: u64,
    rng: &mut Rng,
) -> (PathBuf, PathBuf, Vec<(Op, Option<u8>)>) {
    let base = dir.join(format!("{tag}-base.{fmt}"));
    qemu_create(&base, fmt, "", None, base_clusters * CS);
    let mut pats = Vec::new();
    let mut cmds = Vec::new();
    for c in 0..base_clusters {
        let pat = (rng.below(3) != 0).then(|| 1 + rng.below(200) as u8);
        if let Some(v) = pat {
            cmds.push(format!("write -P {v} {} {CS}", c * CS));
        }
        pats.push(pat);
    }
    qemu_io(&base, fmt, &cmds);
    let top = dir.join(format!("{tag}-top.qcow2"));
    qemu_create(&top, "qcow2", "", Some((&base, fmt)), size);
    let mut cmds = Vec::new();
    let mut ops = Vec::new();
    for c in 0..size.div_ceil(CS) {
        let off = c * CS;
        let len = CS.min(size - off);
        let base_pat = pats.get(c as usize).copied().flatten();
        let op = match rng.below(7) {
            0 | 1 => Op::Nothing,
            2 => Op::Same,
            3 => Op::Different,
            4 => Op::ZeroCluster,
            5 => Op::ZeroData,
            _ if len == CS => Op::Partial,
            _ => Op::Different,
        };
        match op {
            Op::Nothing => {}
            Op::Same => cmds.push(format!("write -P {} {off} {len}", base_pat.unwrap_or(0))),
            Op::Different => cmds.push(format!("write -P {} {off} {len}", 201 + rng.below(50))),
            Op::ZeroCluster => cmds.push(format!("write -z {off} {len}")),
            Op::ZeroData => cmds.push(format!("write -P 0 {off} {len}")),
            Op::Partial => cmds.push(format!("write -P 251 {} 4096", off + 8192)),
        }
        ops.push((op, base_pat));
    }
    qemu_io(&top, "qcow2", &cmds);
    (base, top, ops)
}

/// Converts `src` with `-B base -F fmt` by vimg and by qemu-img; checks ours reads like the
/// source, is clean, records the backing file as given, and (when `qemu_right`: the source's
/// backing file is the new one, or it has none) reads like qemu's and stores no more data.
fn convert_both(
    dir: &Path,
    src: &Path,
    base: &Path,
    base_fmt: &str,
    extra: &[&str],
    qemu_right: bool,
    what: &str,
) -> PathBuf {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    let _ = fs::remove_file(&ours);
    let _ = fs::remove_file(&theirs);
    // The backing file name as qemu-img takes it: relative to the target's directory.
    let bname = base.file_name().unwrap().to_str().unwrap();
    let mut args = vec!["convert", "-O", "qcow2", "-B", bname, "-F", base_fmt];
    args.extend_from_slice(extra);
    let mut a = args.clone();
    a.extend([p(src), p(&ours)]);
    vimg_ok(&a);
    assert_same(src, &ours, what);
    assert_clean(&ours, what);
    let i = info(&ours);
    assert_eq!(i["backing-filename"], bname, "{what}");
    assert_eq!(i["backing-filename-format"], base_fmt, "{what}");
    assert_eq!(
        i["virtual-size"],
        info(src)["virtual-size"],
        "{what}: virtual size"
    );
    if qemu_right {
        let mut a = args.clone();
        a.extend([p(src), p(&theirs)]);
        let o = qemu_img(&a);
        assert!(o.status.success(), "{what}: qemu-img: {}", text(&o.stderr));
        assert_same(&ours, &theirs, what);
        let (o, t) = (top_data_bytes(&ours), top_data_bytes(&theirs));
        assert!(
            o <= t,
            "{what}: vimg stores {o} bytes of data, qemu-img {t}\nvimg: {}\nqemu: {}",
            run("qemu-img", &["map", p(&ours)]),
            run("qemu-img", &["map", p(&theirs)])
        );
    }
    ours
}

#[test]
fn backing_file_output_matches_qemu() {
    if !qemu_available("backing_file_output_matches_qemu") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::seeded(0xb4c1);
    // The overlay is larger than its base and not a whole number of clusters.
    let size = 40 * CS + 1536;
    for base_fmt in ["qcow2", "raw"] {
        let (base, top, ops) = layered(dir, base_fmt, base_fmt, 32, size, &mut rng);
        let raw = dir.join(format!("{base_fmt}-flat.raw"));
        run("qemu-img", &["convert", "-O", "raw", p(&top), p(&raw)]);
        let flat = dir.join(format!("{base_fmt}-flat.qcow2"));
        run("qemu-img", &["convert", "-O", "qcow2", p(&top), p(&flat)]);
        for target in [
            &[][..],
            &["-o", "compat=0.10"][..],
            &["-o", "cluster_size=4096"][..],
        ] {
            let what = |s: &str| format!("base {base_fmt}, source {s}, target {target:?}");
            // The source's own backing file is the new one: cheap skipping applies.
            let ours = convert_both(dir, &top, &base, base_fmt, target, true, &what("overlay"));
            // Everything the overlay leaves to the base stays unallocated.
            let m = map(&ours);
            for (c, (op, _)) in ops.iter().enumerate() {
                if *op == Op::Nothing {
                    let (top, _, _) = status_at(&m, c as u64 * CS);
                    assert!(!top, "{}: cluster {c} copied", what("overlay"));
                }
            }
            // A raw source, and a qcow2 one without a backing file: clusters equal to the base
            // are found by comparing, and left unallocated too.
            for src in [&raw, &flat] {
                let ours = convert_both(dir, src, &base, base_fmt, target, true, &what("flat"));
                let m = map(&ours);
                for (c, (op, base_pat)) in ops.iter().enumerate() {
                    let off = c as u64 * CS;
                    let (top, data, zero) = status_at(&m, off);
                    let same = matches!(op, Op::Nothing | Op::Same) && base_pat.is_some();
                    if same {
                        assert!(!top, "{}: equal cluster {c} copied", what("flat"));
                    }
                    // Zeros over base data: zero clusters (v3) or zeros written (v2).
                    let zeros = matches!(op, Op::ZeroCluster | Op::ZeroData) && base_pat.is_some();
                    if zeros {
                        assert!(top, "{}: zero cluster {c} left to the base", what("flat"));
                        if target.is_empty() {
                            assert!(
                                zero && !data,
                                "{}: cluster {c} not a zero cluster",
                                what("flat")
                            );
                        }
                    }
                }
            }
        }
        // -c and -S 0 with a backing file.
        convert_both(
            dir,
            &top,
            &base,
            base_fmt,
            &["-c"],
            true,
            "compressed overlay",
        );
        convert_both(dir, &raw, &base, base_fmt, &["-c"], true, "compressed raw");
        convert_both(
            dir,
            &top,
            &base,
            base_fmt,
            &["-S", "0"],
            true,
            "-S 0 overlay",
        );
        convert_both(dir, &raw, &base, base_fmt, &["-S", "0"], false, "-S 0 raw");
        convert_both(dir, &raw, &base, base_fmt, &["-W"], true, "-W raw");
    }
    // A source whose backing file is not the new one: qemu-img copies only the overlay and
    // gets it wrong; vimg still reads like the source.
    let (_, other_top, _) = layered(dir, "other", "qcow2", 32, size, &mut rng);
    let base = dir.join("qcow2-base.qcow2");
    convert_both(dir, &other_top, &base, "qcow2", &[], false, "other backing");
    convert_both(
        dir,
        &other_top,
        &base,
        "qcow2",
        &["-o", "compat=0.10"],
        false,
        "other, v2",
    );
}

/// `-n -B`: an existing overlay of the base is written in place. Clusters the source shares
/// with the base stay unallocated where the target holds nothing of its own (as qemu-img leaves
/// them), and are overwritten where it holds old data (which qemu-img leaves behind).
#[test]
fn existing_target_with_backing_file() {
    if !qemu_available("existing_target_with_backing_file") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::seeded(0x4e0b);
    let size = 40 * CS;
    let (base, top, ops) = layered(dir, "n", "qcow2", 40, size, &mut rng);
    let bname = base.file_name().unwrap().to_str().unwrap();
    for (round, old_data) in [false, true].into_iter().enumerate() {
        let dst = dir.join(format!("dst{round}.qcow2"));
        qemu_create(&dst, "qcow2", "", Some((&base, "qcow2")), size);
        let mut old = Vec::new();
        if old_data {
            // Old data in a third of the clusters, some only partly.
            let mut cmds = Vec::new();
            for c in 0..40u64 {
                if rng.below(3) == 0 {
                    old.push(c);
                    cmds.push(format!("write -P 99 {} 4096", c * CS + rng.below(4) * 4096));
                }
            }
            qemu_io(&dst, "qcow2", &cmds);
        }
        let what = format!("-n -B, old data: {old_data}");
        let args = ["convert", "-n", "-B", bname, "-F", "qcow2", "-O", "qcow2"];
        let mut a = args.to_vec();
        a.extend([p(&top), p(&dst)]);
        vimg_ok(&a);
        assert_same(&top, &dst, &what);
        assert_clean(&dst, &what);
        let m = map(&dst);
        for (c, (op, _)) in ops.iter().enumerate() {
            let (in_top, _, _) = status_at(&m, c as u64 * CS);
            if *op == Op::Nothing && !old.contains(&(c as u64)) {
                assert!(
                    !in_top,
                    "{what}: cluster {c} copied although the base holds it"
                );
            }
        }
    }
}

#[test]
fn target_is_zero() {
    if !qemu_available("target_is_zero") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = dir.join("src.qcow2");
    qemu_create(&src, "qcow2", "", None, 64 * CS);
    qemu_io(
        &src,
        "qcow2",
        &[
            format!("write -P 7 0 {}", 4 * CS),
            format!("write -z {} {}", 10 * CS, 20 * CS),
            format!("write -P 9 {} {CS}", 40 * CS),
        ],
    );
    // A fresh target: zero ranges are left alone, so nothing but data is allocated.
    let t = dir.join("t.qcow2");
    qemu_create(&t, "qcow2", "", None, 64 * CS);
    vimg_ok(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "qcow2",
        p(&src),
        p(&t),
    ]);
    assert_same(&src, &t, "--target-is-zero");
    assert_clean(&t, "--target-is-zero");
    let m = map(&t);
    assert!(
        m.iter()
            .all(|e| e["zero"] == false || e["present"] == false),
        "--target-is-zero wrote zeros: {m:?}"
    );
    // Without it, an old target's data is overwritten with zeros.
    let old = dir.join("old.qcow2");
    qemu_create(&old, "qcow2", "", None, 64 * CS);
    qemu_io(&old, "qcow2", &[format!("write -P 3 0 {}", 64 * CS)]);
    vimg_ok(&["convert", "-n", "-O", "qcow2", p(&src), p(&old)]);
    assert_same(&src, &old, "-n over old data");
    assert_clean(&old, "-n over old data");
    // Raw target too.
    let r = dir.join("t.raw");
    fs::write(&r, vec![0u8; (64 * CS) as usize]).unwrap();
    vimg_ok(&["convert", "-n", "--target-is-zero", p(&src), p(&r)]);
    assert_same(&src, &r, "--target-is-zero raw");
    // Refused without -n, as qemu-img refuses it, with the same exit code.
    let no = dir.join("no.qcow2");
    let o = vimg(&[
        "convert",
        "--target-is-zero",
        "-O",
        "qcow2",
        p(&src),
        p(&no),
    ]);
    let q = qemu_img(&[
        "convert",
        "--target-is-zero",
        "-O",
        "qcow2",
        p(&src),
        p(&no),
    ]);
    assert_eq!(o.status.code(), q.status.code());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("requires use of -n"),
        "{}",
        text(&o.stderr)
    );
    assert!(!no.exists());
    // With a backing file for the target (qemu-img prints this error but exits 0).
    let base = dir.join("base.qcow2");
    qemu_create(&base, "qcow2", "", None, 64 * CS);
    let o = vimg(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-B",
        p(&base),
        "-O",
        "qcow2",
        p(&src),
        p(&t),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("Cannot use --target-is-zero"),
        "{}",
        text(&o.stderr)
    );
}

/// Guest offsets of data clusters in host order: whether the host offsets only grow.
fn host_order_inversions(img: &Path) -> usize {
    let d: Vec<u64> = map(img)
        .iter()
        .filter(|e| e["data"] == true && e["depth"] == 0)
        .filter_map(|e| e["offset"].as_u64())
        .collect();
    d.windows(2).filter(|w| w[1] < w[0]).count()
}

#[test]
fn guest_ordered_allocation_and_out_of_order_writes() {
    if !qemu_available("guest_ordered_allocation_and_out_of_order_writes") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 48 MiB of scattered data: many jobs for the workers to race on.
    let src = dir.join("src.raw");
    let mut rng = Rng::seeded(7);
    let mut data = vec![0u8; 48 << 20];
    for (i, chunk) in data.chunks_mut(256 << 10).enumerate() {
        match rng.below(4) {
            0 => {}
            1 => chunk.fill(i as u8 | 1),
            _ => chunk.iter_mut().for_each(|b| *b = rng.next() as u8),
        }
    }
    fs::write(&src, &data).unwrap();
    drop(data);
    let theirs = dir.join("theirs.qcow2");
    run("qemu-img", &["convert", "-O", "qcow2", p(&src), p(&theirs)]);
    // Default: clusters in guest order, laid out exactly as qemu-img lays them out.
    let ours = dir.join("ours.qcow2");
    vimg_ok(&["convert", "-O", "qcow2", "-m", "8", p(&src), p(&ours)]);
    assert_same(&src, &ours, "default");
    assert_clean(&ours, "default");
    assert_eq!(host_order_inversions(&ours), 0, "default order");
    assert_eq!(
        run("qemu-img", &["map", "--output=json", p(&ours)]),
        run("qemu-img", &["map", "--output=json", p(&theirs)]),
        "layout differs from qemu-img's"
    );
    // Compressed, in order too.
    let c = dir.join("c.qcow2");
    vimg_ok(&["convert", "-c", "-O", "qcow2", "-m", "8", p(&src), p(&c)]);
    assert_same(&src, &c, "-c");
    assert_clean(&c, "-c");
    assert_eq!(host_order_inversions(&c), 0, "-c order");
    // -W: any order, same contents.
    for extra in [&[][..], &["-c"][..]] {
        let w = dir.join("w.qcow2");
        let mut a = vec!["convert", "-W", "-O", "qcow2", "-m", "8"];
        a.extend_from_slice(extra);
        a.extend([p(&src), p(&w)]);
        vimg_ok(&a);
        assert_same(&src, &w, "-W");
        assert_clean(&w, "-W");
        fs::remove_file(&w).unwrap();
    }
}

#[test]
fn several_sources_match_qemu() {
    if !qemu_available("several_sources_match_qemu") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Odd sizes: not whole clusters, and one smaller than a cluster.
    let a = dir.join("a.qcow2");
    qemu_create(&a, "qcow2", "", None, 3 * CS + 1536);
    qemu_io(
        &a,
        "qcow2",
        &[
            "write -P 1 0 4096".into(),
            format!("write -P 2 {} 1024", 3 * CS),
        ],
    );
    let b = dir.join("b.raw");
    let mut bd = vec![0u8; 2560];
    bd[..512].fill(5);
    bd[2048..].fill(6);
    fs::write(&b, &bd).unwrap();
    let c = dir.join("c.qcow2");
    qemu_create(&c, "qcow2", "cluster_size=4096", None, 2 * CS + 512);
    qemu_io(
        &c,
        "qcow2",
        &[format!("write -P 9 {} {}", CS - 512, CS + 1024)],
    );
    let srcs = [p(&a), p(&b), p(&c)];
    let total = 3 * CS + 1536 + 2560 + 2 * CS + 512;
    for fmt in ["raw", "qcow2"] {
        let ours = dir.join(format!("ours.{fmt}"));
        let theirs = dir.join(format!("theirs.{fmt}"));
        let mut args = vec!["convert", "-O", fmt];
        args.extend(srcs);
        let mut o = args.clone();
        o.push(p(&ours));
        vimg_ok(&o);
        let mut t = args.clone();
        t.push(p(&theirs));
        run("qemu-img", &t);
        assert_same(&ours, &theirs, fmt);
        assert_eq!(info(&ours)["virtual-size"], total, "{fmt} size");
        assert_eq!(info(&theirs)["virtual-size"], total, "{fmt} qemu size");
        if fmt == "qcow2" {
            assert_clean(&ours, fmt);
        }
    }
    // -f applies to every source: the qcow2 ones read as raw bytes.
    let ours = dir.join("asraw.raw");
    let theirs = dir.join("asraw-q.raw");
    let mut args = vec!["convert", "-f", "raw", "-O", "raw"];
    args.extend(srcs);
    let mut o = args.clone();
    o.push(p(&ours));
    vimg_ok(&o);
    args.push(p(&theirs));
    run("qemu-img", &args);
    assert_same(&ours, &theirs, "-f raw");
    // Progress runs over the whole of them.
    let out = dir.join("p.raw");
    let o = vimg(&["convert", "-p", srcs[0], srcs[1], srcs[2], p(&out)]);
    assert!(o.status.success());
    assert!(
        text(&o.stdout).ends_with("    (100.00/100%)\r\n"),
        "{:?}",
        text(&o.stdout)
    );
    // -n: a target large enough takes them; a smaller one is refused like qemu-img refuses it.
    let big = dir.join("big.qcow2");
    qemu_create(&big, "qcow2", "", None, 8 * CS);
    vimg_ok(&[
        "convert",
        "-n",
        "-O",
        "qcow2",
        srcs[0],
        srcs[1],
        srcs[2],
        p(&big),
    ]);
    assert_clean(&big, "-n");
    let flat = dir.join("ours.raw");
    let o = qemu_img(&["compare", p(&flat), p(&big)]);
    assert_eq!(o.status.code(), Some(0), "-n: {}", text(&o.stdout));
    let small = dir.join("small.qcow2");
    qemu_create(&small, "qcow2", "", None, 5 * CS);
    let args = [
        "convert",
        "-n",
        "-O",
        "qcow2",
        srcs[0],
        srcs[1],
        srcs[2],
        p(&small),
    ];
    let o = vimg(&args);
    let q = qemu_img(&args);
    assert_eq!(o.status.code(), q.status.code());
    assert!(
        text(&o.stderr).contains("smaller than input"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn refusals_match_qemu() {
    if !qemu_available("refusals_match_qemu") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = dir.join("src.qcow2");
    qemu_create(&src, "qcow2", "", None, 4 * CS);
    let s = p(&src);
    let out = dir.join("out.qcow2");
    let o = p(&out);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-O", "qcow2", "-B", s, s, o],
            "requires explicit backing format",
        ),
        (
            vec!["-O", "qcow2", "-o", "backing_file=x", s, o],
            "explicit backing format",
        ),
        (
            vec!["-O", "raw", "-B", s, "-F", "qcow2", s, o],
            "not supported for file format 'raw'",
        ),
        (
            vec!["-O", "qcow2", "-B", s, "-F", "qcow2", s, s, o],
            "concatenating multiple",
        ),
        (
            vec!["-O", "qcow2", "-F", "qcow2", s, o],
            "without backing file",
        ),
        (
            vec!["-O", "qcow2", "--target-is-zero", s, o],
            "requires use of -n",
        ),
        (vec!["-O", "qcow2", "-m", "0", s, o], "between 1 and 16"),
        (vec!["-O", "qcow2", "-m", "17", s, o], "between 1 and 16"),
        (vec!["-O", "qcow2", o], "Must specify image file name"),
        (
            vec!["-O", "qcow2", "-B", "missing", "-F", "qcow2", s, o],
            "missing",
        ),
        (vec!["-O", "qcow2", s, "missing.qcow2", o], "missing.qcow2"),
    ];
    for (args, needle) in cases {
        let mut a = vec!["convert"];
        a.extend(&args);
        let ours = vimg(&a);
        let err = text(&ours.stderr);
        // qemu-img leaves a file behind in some of these cases; vimg must not.
        assert!(!out.exists(), "{args:?}: vimg left {o}");
        let theirs = qemu_img(&a);
        let _ = fs::remove_file(&out);
        assert_eq!(ours.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A backing file that is the destination itself would be replaced by the new image.
    qemu_create(&out, "qcow2", "", None, 4 * CS);
    let a = [
        "convert",
        "-O",
        "qcow2",
        "-B",
        "out.qcow2",
        "-F",
        "qcow2",
        s,
        o,
    ];
    let ours = vimg(&a);
    assert_eq!(ours.status.code(), Some(1), "{}", text(&ours.stderr));
    assert!(text(&ours.stderr).contains("own backing file"));
    assert_clean(&out, "destination after refusal");
}
