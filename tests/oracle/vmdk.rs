//! VMDK disks (`-f vmdk`) against qemu-img/qemu-io: every subformat qemu-img makes
//! (monolithicSparse with and without zeroed grains, monolithicFlat, twoGbMaxExtentSparse and
//! twoGbMaxExtentFlat past 2 GiB, streamOptimized), filled by qemu-io with seeded random
//! writes and zero runs (streamOptimized by `qemu-img convert`), read by vimg as qemu reads them
//! (`convert -O raw` byte for byte, `compare` against qemu's raw copy, `info` and `map` output
//! equal); disks vimg creates byte for byte as qemu-img's but for the CID; disks vimg writes
//! (`convert -O vmdk`, `convert -n`, writes through the library) passing `qemu-img check` and
//! `qemu-img compare`; parent chains; qemu's refusals in qemu's words.

use crate::common;

use common::{assert_no_failures, qemu_available, qemu_create, qemu_io, run, run_status, Rng};
use std::path::{Path, PathBuf};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Whether two files have the same bytes (`cmp`, which streams big sparse files).
fn same_bytes(a: &Path, b: &Path) -> bool {
    std::process::Command::new("cmp")
        .args(["-s", p(a), p(b)])
        .status()
        .unwrap()
        .success()
}

/// Every comparison of vimg with qemu on `img`; differences are pushed to `failures`.
fn compare_with_qemu(img: &Path, dir: &Path, failures: &mut Vec<String>) {
    let name = img.file_name().unwrap().to_str().unwrap().to_string();
    let theirs = dir.join("qemu.raw");
    let ours = dir.join("vimg.raw");
    let _ = std::fs::remove_file(&theirs);
    let _ = std::fs::remove_file(&ours);
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", p(img), p(&theirs)],
    );
    let (rc, o) = run_status(
        VIMG,
        &["convert", "-f", "vmdk", "-O", "raw", p(img), p(&ours)],
    );
    if rc != 0 {
        failures.push(format!("{name}: vimg convert: {o}"));
    } else if !same_bytes(&ours, &theirs) {
        failures.push(format!(
            "{name}: vimg convert -O raw differs from qemu-img's"
        ));
    }
    let (rc, o) = run_status(
        VIMG,
        &["compare", "-f", "vmdk", "-F", "raw", p(img), p(&theirs)],
    );
    if rc != 0 {
        failures.push(format!(
            "{name}: vimg compare with qemu's raw copy: {rc} {o}"
        ));
    }
    // The text map names each extent's file (qemu refuses it for compressed grains).
    let (qrc, q) = run_status("qemu-img", &["map", p(img)]);
    let (rc, v) = run_status(VIMG, &["map", p(img)]);
    if qrc == 0 && (rc != 0 || v != q) {
        failures.push(format!("{name}: map:\nqemu-img:\n{q}\nvimg ({rc}):\n{v}"));
    }
    for cmd in [
        vec!["info", "--output=json"],
        vec!["info"],
        vec!["map", "--output=json"],
        vec!["check"],
    ] {
        let mut args = cmd.clone();
        args.push(p(img));
        let (qrc, q) = run_status("qemu-img", &args);
        let (rc, v) = run_status(VIMG, &args);
        if rc != qrc || v != q {
            failures.push(format!(
                "{name}: {cmd:?}:\nqemu-img ({qrc}):\n{q}\nvimg ({rc}):\n{v}"
            ));
        }
    }
}

/// Seeded random writes (data and zero runs, any sector alignment) in `size` bytes.
fn random_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let off = rng.below(size / 512) * 512;
            let len = (1 + rng.below(3 << 9)) * 512;
            let len = len.min(size - off);
            if i % 4 == 3 {
                format!("write -z {off} {len}")
            } else {
                format!("write -P {} {off} {len}", 1 + rng.below(255))
            }
        })
        .collect()
}

/// A raw disk of `size` bytes filled by qemu-io with seeded random writes.
fn random_raw(path: &Path, rng: &mut Rng, size: u64) {
    qemu_create(path, "raw", "", None, size);
    qemu_io(path, "raw", &random_writes(rng, size, 12));
}

const SUBFORMATS: &[&str] = &[
    "subformat=monolithicSparse",
    "subformat=monolithicSparse,zeroed_grain=on",
    "subformat=monolithicFlat",
    "subformat=twoGbMaxExtentSparse",
    "subformat=twoGbMaxExtentFlat",
    "subformat=streamOptimized",
];

fn sizes(opts: &str) -> Vec<u64> {
    let mut s = vec![1u64 << 20, (9 << 20) + 7 * 512, (64 << 20) - 4096];
    if opts.contains("twoGb") {
        s.push((2 << 30) + (5 << 20) + 512);
    }
    s
}

#[test]
fn qemu_made_images_read_as_qemu_reads_them() {
    if !qemu_available("vmdk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(5);
    for opts in SUBFORMATS {
        for size in sizes(opts) {
            let sub = dir
                .path()
                .join(format!("{}-{size}", opts.replace([',', '='], "_")));
            std::fs::create_dir(&sub).unwrap();
            let img = sub.join("d.vmdk");
            if opts.contains("stream") {
                let raw = sub.join("src.raw");
                random_raw(&raw, &mut rng, size);
                run(
                    "qemu-img",
                    &["convert", "-O", "vmdk", "-o", opts, p(&raw), p(&img)],
                );
            } else {
                qemu_create(&img, "vmdk", opts, None, size);
                compare_with_qemu(&img, &sub, &mut failures);
                qemu_io(&img, "vmdk", &random_writes(&mut rng, size, 12));
            }
            compare_with_qemu(&img, &sub, &mut failures);
            std::fs::remove_dir_all(&sub).unwrap();
        }
    }
    assert_no_failures(&failures);
}

/// The files of a folder, each with its `CID=` line masked.
fn masked_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let path = dir.join(&n);
            let len = std::fs::metadata(&path).unwrap().len();
            // Big flat extents are compared by their length and allocation only here; they
            // are all holes but the first block (checked with cmp by the caller).
            let mut b = if len > (16 << 20) {
                Vec::new()
            } else {
                std::fs::read(&path).unwrap()
            };
            // The CID's digits are cut out; in a sparse file the descriptor that follows moves
            // back over its zero padding, which gets as many zeros back.
            if let Some(at) = b.windows(5).position(|w| w == b"\nCID=") {
                let end = b[at + 5..].iter().position(|&c| c == b'\n').unwrap() + at + 5;
                b.drain(at + 5..end);
                if let Some(nul) = b[at..].iter().position(|&c| c == 0) {
                    let n = end - (at + 5);
                    b.splice(at + nul..at + nul, std::iter::repeat_n(0u8, n));
                }
            }
            (n, b)
        })
        .collect()
}

#[test]
fn vimg_creates_what_qemu_img_creates() {
    if !qemu_available("vmdk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut options: Vec<String> = SUBFORMATS.iter().map(|s| s.to_string()).collect();
    options.extend(
        [
            "adapter_type=lsilogic,hwversion=7,toolsversion=10240",
            "adapter_type=buslogic,compat6=on,subformat=streamOptimized",
            "adapter_type=legacyESX,zeroed_grain=on",
            "subformat=twoGbMaxExtentSparse,zeroed_grain=on,adapter_type=lsilogic",
        ]
        .map(String::from),
    );
    for opts in &options {
        for size in [1000u64, 3 << 20, (1 << 30) + 512, 5 << 30] {
            let q = dir.path().join("q");
            let v = dir.path().join("v");
            for d in [&q, &v] {
                let _ = std::fs::remove_dir_all(d);
                std::fs::create_dir(d).unwrap();
            }
            let size_s = size.to_string();
            let args = ["create", "-f", "vmdk", "-o", opts, "d.vmdk", &size_s];
            let (qrc, qo) = common::run_in(&q, "qemu-img", &args);
            let (vrc, vo) = common::run_in(&v, VIMG, &args);
            if (qrc, &qo) != (vrc, &vo) {
                failures.push(format!(
                    "{opts} {size}: qemu-img {qrc} {qo}\nvimg {vrc} {vo}"
                ));
                continue;
            }
            let (qf, vf) = (masked_files(&q), masked_files(&v));
            if qf != vf {
                let names =
                    |f: &[(String, Vec<u8>)]| f.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
                failures.push(format!(
                    "{opts} {size}: files differ: qemu {:?} vimg {:?}",
                    names(&qf),
                    names(&vf)
                ));
            }
            for (n, _) in &qf {
                let (a, b) = (q.join(n), v.join(n));
                let big = std::fs::metadata(&a).unwrap().len() > (16 << 20);
                if big && !same_bytes(&a, &b) {
                    failures.push(format!("{opts} {size}: {n} differs"));
                }
            }
            let (rc, o) = run_status("qemu-img", &["check", p(&v.join("d.vmdk"))]);
            if rc != 0 {
                failures.push(format!("{opts} {size}: qemu-img check on vimg's: {o}"));
            }
            let qi = run("qemu-img", &["info", "--output=json", p(&q.join("d.vmdk"))]);
            let vi = run("qemu-img", &["info", "--output=json", p(&v.join("d.vmdk"))]);
            let strip = |s: &str| {
                s.lines()
                    .filter(|l| !l.contains("\"cid\"") && !l.contains("\"filename\""))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if strip(&qi) != strip(&vi) {
                failures.push(format!("{opts} {size}: info differs:\n{qi}\n{vi}"));
            }
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn vimg_refuses_what_qemu_img_refuses_in_its_words() {
    if !qemu_available("vmdk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for args in [
        vec![
            "create",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=pvscsi",
            "x.vmdk",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=foo",
            "x.vmdk",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "vmdk",
            "-o",
            "compat6=on,hwversion=7",
            "x.vmdk",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat,zeroed_grain=on",
            "x.vmdk",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=maybe",
            "x.vmdk",
            "1M",
        ],
        vec!["create", "-f", "vmdk", "x.vmdk"],
        vec!["measure", "-O", "vmdk", "--size", "1M"],
    ] {
        let (qrc, qo) = common::run_in(dir.path(), "qemu-img", &args);
        let (vrc, vo) = common::run_in(dir.path(), VIMG, &args);
        let vo = vo.replace("vimg:", "qemu-img:");
        if qrc != vrc || qo != vo {
            failures.push(format!("{args:?}:\nqemu-img {qrc}: {qo}\nvimg {vrc}: {vo}"));
        }
        if dir.path().join("x.vmdk").exists() {
            failures.push(format!("{args:?}: left x.vmdk"));
            let _ = std::fs::remove_file(dir.path().join("x.vmdk"));
        }
    }
    // Resizing: qemu's vmdk driver cannot.
    let img = dir.path().join("r.vmdk");
    qemu_create(&img, "vmdk", "", None, 1 << 20);
    let (qrc, _) = run_status("qemu-img", &["resize", p(&img), "2M"]);
    let (vrc, vo) = run_status(VIMG, &["resize", p(&img), "2M"]);
    if qrc != vrc || qrc == 0 {
        failures.push(format!("resize: qemu-img {qrc}, vimg {vrc} {vo}"));
    }
    assert_no_failures(&failures);
}

/// Compares `img` with `raw` through qemu-img (`compare`) and checks it.
fn qemu_accepts(img: &Path, raw: &Path, what: &str, failures: &mut Vec<String>) {
    let (rc, o) = run_status("qemu-img", &["check", p(img)]);
    if rc != 0 {
        failures.push(format!("{what}: qemu-img check: {o}"));
    }
    let (rc, o) = run_status("qemu-img", &["compare", "-F", "raw", p(img), p(raw)]);
    if rc != 0 {
        failures.push(format!("{what}: qemu-img compare: {o}"));
    }
}

#[test]
fn disks_vimg_writes_read_identically_in_qemu() {
    if !qemu_available("vmdk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(9);
    for opts in SUBFORMATS {
        for size in [(9u64 << 20) + 7 * 512, 3 << 20] {
            let sub = dir
                .path()
                .join(format!("{}-{size}", opts.replace([',', '='], "_")));
            std::fs::create_dir(&sub).unwrap();
            let raw = sub.join("src.raw");
            random_raw(&raw, &mut rng, size);
            // A new disk from convert.
            let img = sub.join("c.vmdk");
            let (rc, o) = run_status(
                VIMG,
                &["convert", "-O", "vmdk", "-o", opts, p(&raw), p(&img)],
            );
            if rc != 0 {
                failures.push(format!("{opts}: convert: {o}"));
            }
            qemu_accepts(&img, &raw, &format!("{opts} {size} convert"), &mut failures);
            // Written into a disk qemu made (not streamOptimized: qemu writes those in order only).
            if !opts.contains("stream") {
                let img = sub.join("n.vmdk");
                qemu_create(&img, "vmdk", opts, None, size);
                qemu_io(&img, "vmdk", &random_writes(&mut rng, size, 6));
                let (rc, o) = run_status(VIMG, &["convert", "-n", "-O", "vmdk", p(&raw), p(&img)]);
                if rc != 0 {
                    failures.push(format!("{opts}: convert -n: {o}"));
                }
                qemu_accepts(
                    &img,
                    &raw,
                    &format!("{opts} {size} convert -n"),
                    &mut failures,
                );
            }
            std::fs::remove_dir_all(&sub).unwrap();
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn library_writes_match_qemu_io_writes() {
    if !qemu_available("vmdk") {
        return;
    }
    use vimg::offsets::GuestOffset;
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(21);
    for opts in &SUBFORMATS[..5] {
        let size = (5u64 << 20) + 3 * 512;
        let ours = dir.path().join("ours.vmdk");
        let theirs = dir.path().join("theirs.vmdk");
        for f in [&ours, &theirs] {
            qemu_create(f, "vmdk", opts, None, size);
        }
        let cmds = random_writes(&mut rng, size, 20);
        qemu_io(&theirs, "vmdk", &cmds);
        {
            let img = vimg::open::open_image(
                &ours,
                &vimg::open::OpenOptions {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap();
            for c in &cmds {
                let w: Vec<&str> = c.split(' ').collect();
                let (off, len): (u64, u64) = match w[1] {
                    "-z" => (w[2].parse().unwrap(), w[3].parse().unwrap()),
                    _ => (w[3].parse().unwrap(), w[4].parse().unwrap()),
                };
                if w[1] == "-z" {
                    img.write_zeroes(GuestOffset(off), len, false).unwrap();
                } else {
                    let pat: u8 = w[2].parse().unwrap();
                    img.write_at(&vec![pat; len as usize], GuestOffset(off))
                        .unwrap();
                }
            }
            img.finish().unwrap();
        }
        let (rc, o) = run_status("qemu-img", &["check", p(&ours)]);
        if rc != 0 {
            failures.push(format!("{opts}: qemu-img check: {o}"));
        }
        let (rc, o) = run_status("qemu-img", &["compare", p(&ours), p(&theirs)]);
        if rc != 0 {
            failures.push(format!("{opts}: qemu-img compare with qemu-io's: {o}"));
        }
        // The same grains are allocated (qemu allocates in the same order).
        let qm = run("qemu-img", &["map", "--output=json", p(&theirs)]);
        let vm = run("qemu-img", &["map", "--output=json", p(&ours)]);
        let strip = |s: &str| s.replace(p(&theirs), "").replace(p(&ours), "");
        if strip(&qm) != strip(&vm) {
            failures.push(format!("{opts}: maps differ:\n{qm}\n{vm}"));
        }
        for f in [&ours, &theirs] {
            let _ = std::fs::remove_file(f);
        }
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let _ = std::fs::remove_file(e.unwrap().path());
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn parent_chains_read_as_qemu_reads_them() {
    if !qemu_available("vmdk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(33);
    let size = (7u64 << 20) + 512;
    let parent = dir.path().join("parent.vmdk");
    let child = dir.path().join("child.vmdk");
    qemu_create(&parent, "vmdk", "", None, size);
    qemu_io(&parent, "vmdk", &random_writes(&mut rng, size, 10));
    qemu_create(&child, "vmdk", "", Some((&parent, "vmdk")), size);
    qemu_io(&child, "vmdk", &random_writes(&mut rng, size, 10));
    compare_with_qemu(&child, dir.path(), &mut failures);
    // A child vimg makes over the same parent, written by vimg.
    let raw = dir.path().join("src.raw");
    random_raw(&raw, &mut rng, size);
    let ours = dir.path().join("ours.vmdk");
    let (rc, o) = run_status(
        VIMG,
        &[
            "create",
            "-f",
            "vmdk",
            "-b",
            p(&parent),
            "-F",
            "vmdk",
            p(&ours),
            &size.to_string(),
        ],
    );
    let (qrc, qo) = run_status(
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-b",
            p(&parent),
            "-F",
            "vmdk",
            p(&dir.path().join("q.vmdk")),
            &size.to_string(),
        ],
    );
    if rc != qrc || o.replace("ours.vmdk", "q.vmdk") != qo {
        failures.push(format!("create -b: vimg {rc} {o}\nqemu-img {qrc} {qo}"));
    }
    compare_with_qemu(&ours, dir.path(), &mut failures);
    let cmds = random_writes(&mut rng, size, 8);
    qemu_io(&dir.path().join("q.vmdk"), "vmdk", &cmds);
    {
        use vimg::offsets::GuestOffset;
        let img = vimg::open::open_image(
            &ours,
            &vimg::open::OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        for c in &cmds {
            let w: Vec<&str> = c.split(' ').collect();
            if w[1] == "-z" {
                img.write_zeroes(
                    GuestOffset(w[2].parse().unwrap()),
                    w[3].parse().unwrap(),
                    false,
                )
                .unwrap();
            } else {
                let len: usize = w[4].parse().unwrap();
                img.write_at(
                    &vec![w[2].parse().unwrap(); len],
                    GuestOffset(w[3].parse().unwrap()),
                )
                .unwrap();
            }
        }
        img.finish().unwrap();
    }
    let (rc, o) = run_status(
        "qemu-img",
        &["compare", p(&ours), p(&dir.path().join("q.vmdk"))],
    );
    if rc != 0 {
        failures.push(format!("vimg-written child differs from qemu-io's: {o}"));
    }
    compare_with_qemu(&ours, dir.path(), &mut failures);
    let _: PathBuf = raw;
    assert_no_failures(&failures);
}

/// Whether `cmd args` runs; without it the test is skipped, or fails under
/// `VIMG_REQUIRE_QEMU=1`.
fn tool_available(what: &str, cmd: &str, args: &[&str]) -> bool {
    let ok = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert_ne!(
            std::env::var("VIMG_REQUIRE_QEMU").as_deref(),
            Ok("1"),
            "{what} not found but VIMG_REQUIRE_QEMU=1"
        );
        eprintln!("skipping: {what} not found");
    }
    ok
}

#[test]
fn independent_readers_read_vimgs_disks() {
    if !qemu_available("vmdk readers")
        || !tool_available("vmdkinfo (libvmdk-utils)", "vmdkinfo", &["-V"])
        || !tool_available(
            "pyvmdk (libvmdk-python)",
            "python3",
            &["-c", "import pyvmdk"],
        )
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(44);
    let size = (6u64 << 20) + 5 * 512;
    let raw = dir.path().join("src.raw");
    random_raw(&raw, &mut rng, size);
    for (sub, kind) in [
        ("monolithicSparse", "Monolithic sparse"),
        ("streamOptimized", "Stream optimized"),
    ] {
        let img = dir.path().join(format!("{sub}.vmdk"));
        let (rc, o) = run_status(
            VIMG,
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                p(&raw),
                p(&img),
            ],
        );
        if rc != 0 {
            failures.push(format!("{sub}: convert: {o}"));
            continue;
        }
        let info = run("vmdkinfo", &[p(&img)]);
        let media = format!("({size} bytes)");
        if !info.contains(kind) || !info.contains(&media) || !info.contains(&format!("{sub}.vmdk"))
        {
            failures.push(format!("{sub}: vmdkinfo:\n{info}"));
        }
        let script = "import pyvmdk,sys\nh=pyvmdk.handle()\nh.open(sys.argv[1])\nh.open_extent_data_files()\nn=h.get_media_size()\nd=h.read_buffer_at_offset(n,0)\nsys.stdout.write('%d %s' % (n, d == open(sys.argv[2],'rb').read()))";
        let out = run("python3", &["-c", script, p(&img), p(&raw)]);
        if out.trim() != format!("{size} True") {
            failures.push(format!("{sub}: pyvmdk read: {out}"));
        }
    }
    assert_no_failures(&failures);
}

/// `commit` of a vmdk overlay into its vmdk parent, as qemu-img 10 does it (its iotest 020):
/// the data reaches the base, "Image committed." is printed and the exit code is 0, though a
/// vmdk cannot be emptied (qemu-img ignores ENOTSUP from emptying).
/// vimg refused the commit at the end before ("the image cannot be emptied"). (As in qemu, the
/// base's first write gives it a new CID, so the overlay, whose parentCID is the old one, no
/// longer reads through it afterwards: qemu-img leaves it so too.)
#[test]
fn commit_into_a_vmdk_parent_as_qemu_img() {
    if !common::qemu_available("vmdk commit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.vmdk");
    let top = d.join("top.vmdk");
    common::qemu_create(&base, "vmdk", "", None, 4 << 20);
    common::qemu_io(&base, "vmdk", &["write -P 0x11 0 1M".into()]);
    let b = base.to_str().unwrap();
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            b,
            "-F",
            "vmdk",
            top.to_str().unwrap(),
        ],
    );
    common::qemu_io(&top, "vmdk", &["write -P 0x22 512k 1M".into()]);
    let want = d.join("want.raw");
    common::run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            want.to_str().unwrap(),
        ],
    );
    let (code, out) = common::run_status(
        env!("CARGO_BIN_EXE_vimg"),
        &["commit", top.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Image committed."), "{out}");
    let (code, out) = common::run_status(
        "qemu-img",
        &[
            "compare",
            "-F",
            "raw",
            base.to_str().unwrap(),
            want.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = common::run_status("qemu-img", &["check", base.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

/// Zeros written into an allocated grain of a monolithicSparse disk go to the file as a zero
/// range (a hole where the file system punches one), not as a buffer of zeros allocated and
/// written per write; the disk reads as qemu-io's after the same writes.
#[test]
fn zeros_into_allocated_grains_are_a_zero_range() {
    if !qemu_available("vmdk") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    use vimg::offsets::GuestOffset;
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.vmdk");
    let theirs = dir.path().join("theirs.vmdk");
    let fill = ["write -P 7 0 1M".to_string()];
    for f in [&ours, &theirs] {
        qemu_create(f, "vmdk", "", None, 4 << 20);
        qemu_io(f, "vmdk", &fill);
    }
    let zeros = [
        "write -z 64k 128k".to_string(),
        "write -z 300k 1k".to_string(),
    ];
    qemu_io(&theirs, "vmdk", &zeros);
    let before = std::fs::metadata(&ours).unwrap().blocks();
    {
        let img = vimg::open::open_image(
            &ours,
            &vimg::open::OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        img.write_zeroes(GuestOffset(64 << 10), 128 << 10, false)
            .unwrap();
        img.write_zeroes(GuestOffset(300 << 10), 1 << 10, false)
            .unwrap();
        img.finish().unwrap();
    }
    let after = std::fs::metadata(&ours).unwrap().blocks();
    // Two whole grains (256 sectors of 512 bytes) are no longer stored.
    assert!(
        after + 256 <= before,
        "blocks before {before}, after {after}"
    );
    let (rc, o) = run_status("qemu-img", &["compare", p(&ours), p(&theirs)]);
    assert_eq!(rc, 0, "{o}");
    let (rc, o) = run_status("qemu-img", &["check", p(&ours)]);
    assert_eq!(rc, 0, "{o}");
}
