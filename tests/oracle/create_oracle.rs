//! `vimg create` against `qemu-img create`: for a matrix of option combinations, both tools
//! create an image in directories of their own (same file names, so that relative backing and
//! data file names mean the same thing), and the images must agree: `qemu-img check` clean,
//! `qemu-img info` equal except file names and sizes on disk, `qemu-img map` equal, the files
//! (image and data file) byte-identical, qemu-io able to write and read vimg's image with
//! `check` still clean, and vimg's own reader seeing zeros. Invalid combinations must be
//! refused by both. Mismatches are collected and reported together.

use crate::common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use vimg::block::ImageFormat;
use vimg::open::{open_image, OpenOptions};
use vimg::ops::create::{create, create_raw, CreateArgs};
use vimg::prealloc::Preallocation;
use vimg::GuestOffset;

/// 1 MiB + 512: a disk that ends inside a cluster.
const ODD: u64 = (1 << 20) + 512;
const G3: u64 = 3 << 30;

#[derive(Debug, Clone)]
enum Backing {
    None,
    /// `base.raw` next to the image, named relatively; SIZE omitted (taken from it).
    Relative,
    /// The same base, named by its absolute path.
    Absolute,
}

#[derive(Debug, Clone)]
struct Case {
    opts: String,
    size: u64,
    backing: Backing,
}

fn case(opts: &str, size: u64) -> Case {
    Case {
        opts: opts.to_string(),
        size,
        backing: Backing::None,
    }
}

/// Runs `cmd args` in `dir`; returns (success, stdout, stderr).
fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn info_json(dir: &Path) -> Result<Value, String> {
    let (ok, out, err) = run_in(dir, "qemu-img", &["info", "--output=json", "i.qcow2"]);
    if !ok {
        return Err(err);
    }
    let mut v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    if let Some(m) = v.as_object_mut() {
        for k in ["filename", "actual-size", "children"] {
            m.remove(k);
        }
    }
    Ok(v)
}

fn map_json(dir: &Path) -> String {
    let (ok, out, err) = run_in(dir, "qemu-img", &["map", "--output=json", "i.qcow2"]);
    if ok {
        out
    } else {
        format!("map failed: {err}")
    }
}

fn check_clean(dir: &Path) -> Result<(), String> {
    let (ok, out, err) = run_in(dir, "qemu-img", &["check", "i.qcow2"]);
    if ok {
        Ok(())
    } else {
        Err(format!("{out}{err}")
            .lines()
            .take(4)
            .collect::<Vec<_>>()
            .join(" | "))
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The byte ranges of `f` that may hold data (`SEEK_DATA`/`SEEK_HOLE`).
fn data_extents(f: &std::fs::File) -> Vec<(u64, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let len = f.metadata().unwrap().len();
    let mut v = Vec::new();
    let mut off = 0;
    while off < len {
        let Ok(start) = seek(f, SeekFrom::Data(off)) else {
            break;
        };
        let end = seek(f, SeekFrom::Hole(start)).map_or(len, |e| e.min(len));
        if end <= start {
            break;
        }
        v.push((start, end));
        off = end;
    }
    v
}

/// Compares two files, reading only where either holds data (large sparse images stay cheap).
fn same_bytes(a: &Path, b: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    if la != lb {
        return Err(format!("sizes differ: qemu {la}, vimg {lb}"));
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for (start, end) in data_extents(&fa).into_iter().chain(data_extents(&fb)) {
        let mut off = start;
        while off < end {
            let n = (end - off).min(1 << 20) as usize;
            fa.read_exact_at(&mut ba[..n], off).unwrap();
            fb.read_exact_at(&mut bb[..n], off).unwrap();
            if ba[..n] != bb[..n] {
                let i = ba[..n]
                    .iter()
                    .zip(&bb[..n])
                    .position(|(x, y)| x != y)
                    .unwrap();
                return Err(format!("first difference at byte {:#x}", off + i as u64));
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Runs one case; returns the mismatches found.
fn run_case(c: &Case) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let (qd, vd) = (tmp.path().join("q"), tmp.path().join("v"));
    std::fs::create_dir_all(&qd).unwrap();
    std::fs::create_dir_all(&vd).unwrap();
    let shared_base = tmp.path().join("base.raw");
    let mut problems = Vec::new();
    let label = format!("[-o '{}' size {} {:?}]", c.opts, c.size, c.backing);
    let mut bad = |what: String| problems.push(format!("{label} {what}"));

    // The backing file: a raw file of ODD bytes, in each directory and shared.
    let (bname, size_arg) = match c.backing {
        Backing::None => (None, Some(c.size.to_string())),
        Backing::Relative => {
            for d in [&qd, &vd] {
                create_raw(&d.join("base.raw"), ODD, Preallocation::Off).unwrap();
            }
            (Some("base.raw".to_string()), None)
        }
        Backing::Absolute => {
            create_raw(&shared_base, ODD, Preallocation::Off).unwrap();
            (
                Some(shared_base.to_str().unwrap().to_string()),
                Some(c.size.to_string()),
            )
        }
    };

    let mut qargs = vec!["create", "-q", "-f", "qcow2"];
    if !c.opts.is_empty() {
        qargs.extend(["-o", &c.opts]);
    }
    if let Some(b) = &bname {
        qargs.extend(["-b", b, "-F", "raw"]);
    }
    qargs.push("i.qcow2");
    if let Some(s) = &size_arg {
        qargs.push(s);
    }
    let (qok, _, qerr) = run_in(&qd, "qemu-img", &qargs);

    let args = CreateArgs {
        format: ImageFormat::Qcow2,
        filename: vd.join("i.qcow2"),
        options: if c.opts.is_empty() {
            vec![]
        } else {
            vec![c.opts.clone()]
        },
        backing_file: bname.clone(),
        backing_format: bname.as_ref().map(|_| "raw".to_string()),
        unsafe_backing: false,
        size: size_arg.clone(),
        opener: Default::default(),
    };
    let vres = create(&args);
    match (qok, &vres) {
        (true, Ok(_)) => {}
        (false, Err(_)) => return problems, // both refuse: consistent
        (true, Err(e)) => {
            bad(format!("vimg refused what qemu accepts: {e}"));
            return problems;
        }
        (false, Ok(_)) => {
            bad(format!("vimg accepted what qemu refuses: {}", qerr.trim()));
            return problems;
        }
    }
    let line = vres.unwrap();
    if !line.starts_with("Formatting '") || !line.contains("fmt=qcow2") {
        bad(format!("odd formatting line: {line}"));
    }

    if let Err(e) = check_clean(&vd) {
        bad(format!("qemu-img check on vimg's image: {e}"));
    }
    match (info_json(&qd), info_json(&vd)) {
        (Ok(a), Ok(b)) if a == b => {}
        (a, b) => bad(format!("info differs:\n  qemu {a:?}\n  vimg {b:?}")),
    }
    let (qm, vm) = (map_json(&qd), map_json(&vd));
    if qm != vm {
        bad(format!("map differs:\n  qemu {qm}\n  vimg {vm}"));
    }
    let (qf, vf) = (files_in(&qd), files_in(&vd));
    if qf != vf {
        bad(format!("different files: qemu {qf:?}, vimg {vf:?}"));
    } else {
        for f in &qf {
            if let Err(e) = same_bytes(&qd.join(f), &vd.join(f)) {
                bad(format!("{f}: {e}"));
            }
        }
    }

    // vimg's reader sees zeros at the start, in the middle and at the end.
    let vimg_path = vd.join("i.qcow2");
    match open_image(&vimg_path, &OpenOptions::default()) {
        Ok(img) => {
            let size = img.virtual_size();
            let n = size.min(65536);
            for off in [0, (size / 2) & !511, size - n] {
                let mut buf = vec![0xffu8; n as usize];
                match img.read_at(&mut buf, GuestOffset(off)) {
                    Ok(()) if buf.iter().all(|&b| b == 0) => {}
                    Ok(()) => bad(format!("vimg reads non-zero data at {off}")),
                    Err(e) => bad(format!("vimg cannot read at {off}: {e}")),
                }
            }
        }
        Err(e) => bad(format!("vimg cannot open its own image: {e}")),
    }

    // qemu can write to vimg's image, and the image stays consistent.
    let size = if size_arg.is_none() {
        ODD
    } else {
        c.size.div_ceil(512) * 512
    };
    let n = size.min(65536);
    if n > 0 {
        let w = format!("write -P 0x5a 0 {n}");
        let r = format!("read -P 0x5a 0 {n}");
        let (ok, out, err) = run_in(
            &vd,
            "qemu-io",
            &["-f", "qcow2", "-c", &w, "-c", &r, "i.qcow2"],
        );
        if !ok || out.contains("failed") || out.contains("error") {
            bad(format!("qemu-io on vimg's image: {out}{err}"));
        }
        if let Err(e) = check_clean(&vd) {
            bad(format!("qemu-img check after qemu-io write: {e}"));
        }
    }
    problems
}

/// The option combinations to compare.
fn matrix() -> Vec<Case> {
    let shapes = [
        "",
        "compat=0.10",
        "compat=v2,cluster_size=4k",
        "cluster_size=512",
        "cluster_size=4k,refcount_bits=1",
        "cluster_size=2M,refcount_bits=2",
        "refcount_bits=8,lazy_refcounts=on",
        "cluster_size=512,refcount_bits=64",
        "compression_type=zstd",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k,compression_type=zstd,lazy_refcounts=on",
        "compat=1.1,refcount_bits=16,extended_l2=off,compression_type=zlib",
    ];
    let mut v = Vec::new();
    for shape in shapes {
        let big_clusters = !shape.contains("cluster_size=") || shape.contains("2M");
        for size in [0, 1, ODD, G3] {
            for mode in ["off", "metadata", "falloc", "full"] {
                // Keep the run short: 3G only where preallocation writes little.
                let slow = size == G3
                    && (mode == "falloc"
                        || mode == "full"
                        || (mode == "metadata" && !big_clusters));
                if slow {
                    continue;
                }
                let opts = match (shape, mode) {
                    ("", "off") => String::new(),
                    ("", m) => format!("preallocation={m}"),
                    (s, "off") => s.to_string(),
                    (s, m) => format!("{s},preallocation={m}"),
                };
                v.push(case(&opts, size));
            }
        }
    }
    // Full preallocation of a few MiB, with refcount blocks and L2 tables after the data.
    for opts in [
        "preallocation=full,cluster_size=4k",
        "preallocation=full,cluster_size=512,refcount_bits=64",
        "preallocation=falloc,cluster_size=1k,refcount_bits=1",
    ] {
        v.push(case(opts, 5 << 20));
    }
    // Refcount table growth while preallocating.
    v.push(case("preallocation=metadata,cluster_size=512", 12 << 20));
    v.push(case(
        "preallocation=metadata,cluster_size=512,refcount_bits=64",
        9 << 20,
    ));
    v.push(case(
        "preallocation=falloc,cluster_size=512,refcount_bits=64",
        20 << 20,
    ));
    v.push(case("cluster_size=512,refcount_bits=64", 16 << 30));
    // External data files.
    for extra in [
        "",
        ",data_file_raw=on",
        ",cluster_size=16k,extended_l2=on",
        ",data_file_raw=on,extended_l2=on",
    ] {
        for mode in ["off", "metadata", "falloc", "full"] {
            for size in [0, ODD, 3 << 20] {
                v.push(case(
                    &format!("data_file=d.raw{extra},preallocation={mode}"),
                    size,
                ));
            }
        }
    }
    // Backing files, named relatively (size from the backing file) and absolutely.
    for (opts, backing) in [
        ("", Backing::Relative),
        ("compat=0.10,cluster_size=512", Backing::Relative),
        ("extended_l2=on,preallocation=metadata", Backing::Relative),
        ("extended_l2=on,preallocation=falloc", Backing::Absolute),
        ("", Backing::Absolute),
        ("data_file=d.raw", Backing::Absolute),
        ("cluster_size=2M,lazy_refcounts=on", Backing::Absolute),
    ] {
        v.push(Case {
            opts: opts.to_string(),
            size: 3 << 20,
            backing,
        });
    }
    v
}

/// Whether this qemu-img knows `compression_type=zstd` (older releases do not).
fn qemu_has_zstd() -> bool {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "z.qcow2",
        "1M",
    ];
    run_in(tmp.path(), "qemu-img", &args).0
}

#[test]
fn vimg_create_matches_qemu_img_create() {
    if !common::qemu_available("vimg_create_matches_qemu_img_create") {
        return;
    }
    let mut cases = matrix();
    if !qemu_has_zstd() {
        eprintln!("qemu-img cannot create zstd images: skipping the zstd cases");
        cases.retain(|c| !c.opts.contains("zstd"));
    }
    let next = AtomicUsize::new(0);
    let problems = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                let t = std::time::Instant::now();
                let p = run_case(c);
                if std::env::var_os("VIMG_TEST_TIMES").is_some() {
                    eprintln!("{:>6} ms  {c:?}", t.elapsed().as_millis());
                }
                problems.lock().unwrap().extend(p);
            });
        }
    });
    let problems = problems.into_inner().unwrap();
    assert!(
        problems.is_empty(),
        "{} of {} cases disagree with qemu-img:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );
}

/// Raw images: same size and the same allocation (`qemu-img map` of the raw file) as qemu-img.
#[test]
fn raw_create_matches_qemu_img_create() {
    if !common::qemu_available("raw_create_matches_qemu_img_create") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut problems = Vec::new();
    for mode in ["off", "falloc", "full"] {
        for size in [0u64, 1000, 4096, ODD, 3 << 20] {
            let q = tmp.path().join(format!("q-{mode}-{size}.raw"));
            let v = tmp.path().join(format!("v-{mode}-{size}.raw"));
            let o = format!("preallocation={mode}");
            common::run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "raw",
                    "-o",
                    &o,
                    q.to_str().unwrap(),
                    &size.to_string(),
                ],
            );
            let args = CreateArgs {
                format: ImageFormat::Raw,
                filename: v.clone(),
                options: vec![o.clone()],
                backing_file: None,
                backing_format: None,
                unsafe_backing: false,
                size: Some(size.to_string()),
                opener: Default::default(),
            };
            let line = create(&args).unwrap();
            let want = format!("Formatting '{}', fmt=raw size={size} {o}", v.display());
            if line != want {
                problems.push(format!("line {line:?}, want {want:?}"));
            }
            let map = |p: &PathBuf| {
                common::run(
                    "qemu-img",
                    &["map", "-f", "raw", "--output=json", p.to_str().unwrap()],
                )
            };
            if let Err(e) = same_bytes(&q, &v) {
                problems.push(format!("{mode} {size}: {e}"));
            }
            if map(&q) != map(&v) {
                problems.push(format!("{mode} {size}: map {} vs {}", map(&q), map(&v)));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Combinations qemu-img refuses are refused by vimg too, before any file is written.
#[test]
fn invalid_combinations_are_refused_like_qemu() {
    let qemu = common::qemu_available("invalid_combinations_are_refused_like_qemu");
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.raw");
    create_raw(&base, 1 << 20, Preallocation::Off).unwrap();
    let b = base.to_str().unwrap();
    let cases: Vec<(String, Option<&str>)> = [
        "compat=0.10,lazy_refcounts=on",
        "compat=0.10,compression_type=zstd",
        "compat=0.10,refcount_bits=8",
        "compat=0.10,extended_l2=on",
        "compat=0.10,data_file=d.raw",
        "cluster_size=8k,extended_l2=on",
        "cluster_size=1000",
        "cluster_size=256",
        "cluster_size=4M",
        "refcount_bits=3",
        "refcount_bits=128",
        "compat=1.2",
        "compression_type=lz4",
        "preallocation=bogus",
        "lazy_refcounts=1",
        "bogus=1",
        "data_file_raw=on",
        &format!("backing_file={b}"),
        &format!("backing_file={b},backing_fmt=raw,preallocation=metadata"),
        &format!("backing_file={b},backing_fmt=raw,data_file=d.raw,data_file_raw=on"),
        "cluster_size=",
    ]
    .iter()
    .map(|o| (o.to_string(), Some("1M")))
    .chain([
        ("size=2M".to_string(), Some("1M")),
        (String::new(), None),
        ("cluster_size=512".to_string(), Some("1P")),
    ])
    .collect();
    for (opts, size) in cases {
        let img = tmp.path().join("x.qcow2");
        let args = CreateArgs {
            format: ImageFormat::Qcow2,
            filename: img.clone(),
            options: if opts.is_empty() {
                vec![]
            } else {
                vec![opts.clone()]
            },
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
            size: size.map(str::to_string),
            opener: Default::default(),
        };
        let r = create(&args);
        assert!(r.is_err(), "vimg accepted -o '{opts}'");
        assert!(!img.exists(), "vimg left a file behind for -o '{opts}'");
        if qemu {
            let mut a = vec!["create", "-q", "-f", "qcow2"];
            if !opts.is_empty() {
                a.extend(["-o", &opts]);
            }
            a.push("x.qcow2");
            a.extend(size);
            let (ok, _, _) = run_in(tmp.path(), "qemu-img", &a);
            assert!(
                !ok,
                "qemu-img accepted -o '{opts}' (the test's premise is wrong)"
            );
            let _ = std::fs::remove_file(tmp.path().join("x.qcow2"));
        }
    }
    // A missing backing file is an error unless -u is given (then SIZE is required).
    let mut args = CreateArgs {
        format: ImageFormat::Qcow2,
        filename: tmp.path().join("y.qcow2"),
        options: vec![],
        backing_file: Some("missing.raw".into()),
        backing_format: Some("raw".into()),
        unsafe_backing: false,
        size: Some("1M".into()),
        opener: Default::default(),
    };
    assert!(create(&args).is_err());
    args.unsafe_backing = true;
    create(&args).unwrap();
    args.size = None;
    assert!(create(&args).is_err());
}

/// An existing file is overwritten, as qemu-img does.
#[test]
fn create_overwrites_existing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("x.qcow2");
    std::fs::write(&img, vec![0xab; 5 << 20]).unwrap();
    let args = CreateArgs {
        format: ImageFormat::Qcow2,
        filename: img.clone(),
        options: vec!["cluster_size=4k".into()],
        backing_file: None,
        backing_format: None,
        unsafe_backing: false,
        size: Some("1M".into()),
        opener: Default::default(),
    };
    create(&args).unwrap();
    assert_eq!(img.metadata().unwrap().len(), 0x3008);
    let i = open_image(&img, &OpenOptions::default()).unwrap();
    let mut buf = vec![1u8; 4096];
    i.read_at(&mut buf, GuestOffset(0)).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}
