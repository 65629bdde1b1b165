//! VDI images (`-f vdi`, issue 17) read by vimg as qemu reads them: images qemu-img makes
//! (dynamic and `static=on`, sizes in and out of whole blocks, an odd size rounded up to a
//! sector), filled by qemu-io with seeded random writes (data and zero runs), are read by vimg
//! byte for byte as `qemu-img convert -O raw` reads them (`vimg convert -O raw`, and `vimg
//! compare` against qemu's raw copy), and vimg's `map --output=json` and `info` (text and
//! JSON) equal qemu-img's. vimg creates and writes them as qemu-img does (the same bytes but
//! for the UUIDs).

use crate::common;

use common::{
    assert_no_failures, qemu_available, qemu_contents, qemu_create, qemu_io, run, run_status, Rng,
};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// qemu-io writes at random places: data (patterns), zero runs, some across block boundaries.
fn random_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = (1 + rng.below(300)) * 512;
            let off = rng.below(size.saturating_sub(len) / 512 + 1) * 512;
            let len = len.min(size - off);
            if rng.below(4) == 0 {
                format!("write -z {off} {len}")
            } else {
                format!("write -P {} {off} {len}", 1 + rng.below(250))
            }
        })
        .collect()
}

#[test]
fn qemu_made_images_read_map_and_info_as_qemu() {
    if !qemu_available("vdi") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(17);
    for (i, (opts, size, writes)) in [
        ("", 3u64 << 20, 0usize),
        ("", 3 << 20, 20),
        ("static=off", 2_560_000, 15),
        ("", (5 << 20) + 512, 25),
        ("static=on", 3 << 20, 0),
        ("static=on", 2_560_000, 15),
        ("static=on", (5 << 20) + 512, 25),
        ("", 1000, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("i{i}.vdi"));
        qemu_create(&img, "vdi", opts, None, size);
        let cmds = random_writes(&mut rng, size.next_multiple_of(512), writes);
        qemu_io(&img, "vdi", &cmds);
        let name = format!("{} ({opts}, {size} bytes, {writes} writes)", img.display());
        let want = qemu_contents(&img, dir.path());
        let out = dir.path().join(format!("i{i}.vimg.raw"));
        run(VIMG, &["convert", "-O", "raw", p(&img), p(&out)]);
        if std::fs::read(&out).unwrap() != want {
            failures.push(format!(
                "{name}: vimg convert -O raw differs from qemu-img's"
            ));
        }
        let qraw = dir.path().join(format!("i{i}.qemu.raw"));
        std::fs::write(&qraw, &want).unwrap();
        let (rc, o) = run_status(
            VIMG,
            &["compare", "-f", "vdi", "-F", "raw", p(&img), p(&qraw)],
        );
        if rc != 0 {
            failures.push(format!("{name}: vimg compare: {rc} {o}"));
        }
        for args in [
            vec!["map", "--output=json", p(&img)],
            vec!["info", "--output=json", p(&img)],
            vec!["info", p(&img)],
            vec!["info", "-f", "vdi", p(&img)],
        ] {
            let (q, v) = (run("qemu-img", &args), run(VIMG, &args));
            if q != v {
                failures.push(format!("{name}: {args:?}: qemu-img:\n{q}\nvimg:\n{v}"));
            }
        }
    }
    assert_no_failures(&failures);
}

/// `check` finds what qemu-img's finds, in its words and exit codes: clean images, a data block
/// used by two guest blocks, a wrong allocated count, and `-r`, which qemu cannot do for vdi.
#[test]
fn check_as_qemu() {
    if !qemu_available("vdi") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, opts, pokes) in [
        ("clean", "", vec![]),
        ("static", "static=on", vec![]),
        ("twice", "", vec![(512u64, 0u32), (520, 0)]),
        ("count", "", vec![(388, 7)]),
    ] {
        let img = dir.path().join(format!("{name}.vdi"));
        qemu_create(&img, "vdi", opts, None, 3 << 20);
        qemu_io(&img, "vdi", &["write -P 1 1M 4k".to_string()]);
        for (at, v) in pokes {
            common::poke(&img, at, &v.to_le_bytes());
        }
        for args in [
            vec!["check", p(&img)],
            vec!["check", "--output=json", p(&img)],
            vec!["check", "-r", "all", p(&img)],
        ] {
            let (q, v) = (run_status("qemu-img", &args), run_status(VIMG, &args));
            let v = (v.0, v.1.replace("vimg:", "qemu-img:"));
            if q != v {
                failures.push(format!("{name}: {args:?}: qemu-img: {q:?}\nvimg: {v:?}"));
            }
        }
    }
    assert_no_failures(&failures);
}

/// The bytes of a VDI image with what differs between two creations masked: the image and
/// last-snapshot UUIDs.
fn masked(img: &Path) -> Vec<u8> {
    let mut b = std::fs::read(img).unwrap();
    if b.len() >= 0x1a8 {
        b[0x188..0x1a8].fill(0);
    }
    b
}

#[test]
fn vimg_creates_what_qemu_img_creates() {
    if !qemu_available("vdi") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let ours = dir.path().join("ours.vdi");
    let theirs = dir.path().join("theirs.vdi");
    let both = |args: &[&str], failures: &mut Vec<String>, bytes: bool| {
        let _ = std::fs::remove_file(&ours);
        let _ = std::fs::remove_file(&theirs);
        let mut a = args.to_vec();
        a.insert(a.len() - 1, p(&ours));
        let (rc, v) = run_status(VIMG, &a);
        let mut a = args.to_vec();
        a.insert(a.len() - 1, p(&theirs));
        let (qrc, q) = run_status("qemu-img", &a);
        let q = q
            .replace(p(&theirs), p(&ours))
            .replace("qemu-img:", "vimg:");
        if (rc, &v) != (qrc, &q) {
            failures.push(format!("{args:?}: vimg {rc} {v}; qemu-img {qrc} {q}"));
        } else if bytes && qrc == 0 && masked(&ours) != masked(&theirs) {
            failures.push(format!("{args:?}: the files differ"));
        }
    };
    for opts in [
        "",
        "static=off",
        "static=on",
        "static=yes",
        "static",
        "static,nostatic",
        "preallocation=off",
        "preallocation=full",
        "static=on,preallocation=falloc,nocow=on,extent_size_hint=1M",
    ] {
        for size in ["0", "1", "1000", "1M", "2500000", "3M", "5243392", "1G"] {
            let mut args = vec!["create", "-f", "vdi"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.push(size);
            both(&args, &mut failures, true);
        }
    }
    // Refused as qemu-img refuses, in its words.
    let too_large = (0x001f_ffff_f800_0000_u64 + 1).to_string();
    for args in [
        vec!["create", "-f", "vdi", "-o", "preallocation=metadata", "1M"],
        vec!["create", "-f", "vdi", "-o", "preallocation=bogus", "1M"],
        vec!["create", "-f", "vdi", "-o", "static=maybe", "1M"],
        vec!["create", "-f", "vdi", "-o", "cluster_size=4k", "1M"],
        vec!["create", "-f", "vdi", "-o", "nocow", "1M"],
        vec!["create", "-f", "vdi", too_large.as_str()],
        vec!["create", "-f", "vdi", "1000P"],
    ] {
        both(&args, &mut failures, false);
    }
    assert_no_failures(&failures);
}

/// `convert -O vdi` makes the file qemu-img's convert makes (but for the UUIDs), dynamic and
/// static; `convert -n` into a vdi image (qemu's or vimg's) allocates as qemu-io's writes do;
/// everything vimg writes passes `qemu-img check` and `qemu-img compare`, and vimg's `check`
/// and `map` say what qemu-img's say of it.
#[test]
fn vimg_written_images_are_qemus() {
    if !qemu_available("vdi") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(1718);
    for size in [(5u64 << 20) + 3 * 512, 9 << 20, 23_456_768] {
        let src = dir.path().join("src.qcow2");
        qemu_create(&src, "qcow2", "", None, size);
        qemu_io(&src, "qcow2", &random_writes(&mut rng, size, 16));
        for opts in ["static=off", "static=on"] {
            let ours = dir.path().join("ours.vdi");
            let theirs = dir.path().join("theirs.vdi");
            let _ = std::fs::remove_file(&ours);
            let _ = std::fs::remove_file(&theirs);
            let (rc, o) = run_status(
                VIMG,
                &["convert", "-O", "vdi", "-o", opts, p(&src), p(&ours)],
            );
            run(
                "qemu-img",
                &["convert", "-O", "vdi", "-o", opts, p(&src), p(&theirs)],
            );
            let name = format!("convert -o {opts} ({size})");
            if rc != 0 {
                failures.push(format!("{name}: {o}"));
                continue;
            }
            if masked(&ours) != masked(&theirs) {
                failures.push(format!("{name}: differs from qemu-img's convert"));
            }
            check_like_qemu(&ours, &src, &name, &mut failures);
            // Random data written with convert -n. qemu-img writes zeros into the unallocated
            // blocks (allocating them: vdi has no zero writes); vimg allocates nothing for
            // zeros, so only the contents are compared.
            let data = dir.path().join("data.raw");
            qemu_create(&data, "raw", "", None, size.next_multiple_of(512));
            qemu_io(
                &data,
                "raw",
                &random_writes(&mut rng, size.next_multiple_of(512), 10),
            );
            let (rc, o) = run_status(
                VIMG,
                &[
                    "convert",
                    "-n",
                    "-f",
                    "raw",
                    "-O",
                    "vdi",
                    p(&data),
                    p(&ours),
                ],
            );
            let name = format!("convert -n into -o {opts} ({size})");
            if rc != 0 {
                failures.push(format!("{name}: {o}"));
                continue;
            }
            check_like_qemu(&ours, &data, &name, &mut failures);
        }
    }
    // Writes into an image qemu made and wrote.
    let img = dir.path().join("qemu.vdi");
    qemu_create(&img, "vdi", "", None, 20 << 20);
    qemu_io(&img, "vdi", &random_writes(&mut rng, 20 << 20, 6));
    let data = dir.path().join("data.raw");
    qemu_create(&data, "raw", "", None, 20 << 20);
    qemu_io(&data, "raw", &random_writes(&mut rng, 20 << 20, 10));
    let (rc, o) = run_status(
        VIMG,
        &["convert", "-n", "-f", "raw", "-O", "vdi", p(&data), p(&img)],
    );
    if rc != 0 {
        failures.push(format!("convert -n into qemu's image: {o}"));
    }
    check_like_qemu(&img, &data, "convert -n into qemu's image", &mut failures);
    assert_no_failures(&failures);
}

/// Zeros written into unallocated blocks allocate nothing: an empty image stays empty.
#[test]
fn zeros_allocate_nothing() {
    if !qemu_available("vdi") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("z.vdi");
    run(VIMG, &["create", "-f", "vdi", p(&img), "9M"]);
    let before = std::fs::read(&img).unwrap();
    let zeros = dir.path().join("zeros.raw");
    std::fs::write(&zeros, vec![0u8; 9 << 20]).unwrap();
    run(VIMG, &["convert", "-n", "-O", "vdi", p(&zeros), p(&img)]);
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let mut failures = Vec::new();
    check_like_qemu(&img, &zeros, "zeros", &mut failures);
    assert_no_failures(&failures);
}

/// `img` reads as `reference`, and qemu-img's `check` and `map` say of it what vimg's say.
fn check_like_qemu(img: &Path, reference: &Path, name: &str, failures: &mut Vec<String>) {
    let (rc, o) = run_status("qemu-img", &["compare", p(img), p(reference)]);
    if rc != 0 {
        failures.push(format!("{name}: qemu-img compare: {o}"));
    }
    for args in [vec!["check", p(img)], vec!["map", "--output=json", p(img)]] {
        let q = run_status("qemu-img", &args);
        let v = run_status(VIMG, &args);
        if q.0 != 0 || q != v {
            failures.push(format!("{name}: {args:?}: qemu-img {q:?}, vimg {v:?}"));
        }
    }
}

/// What qemu cannot do with a vdi image, vimg refuses too, changing nothing.
#[test]
fn resize_and_measure_are_refused_as_qemu() {
    if !qemu_available("vdi") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.vdi");
    qemu_create(&img, "vdi", "", None, 2 << 20);
    qemu_io(&img, "vdi", &["write -P 5 0 64k".to_string()]);
    let before = std::fs::read(&img).unwrap();
    for args in [
        vec!["resize", p(&img), "+1M"],
        vec!["measure", "-O", "vdi", "--size", "1G"],
        vec!["measure", "-O", "vdi", p(&img)],
    ] {
        let (rc, o) = run_status(VIMG, &args);
        let (qrc, q) = run_status("qemu-img", &args);
        let last = |s: &str| {
            s.lines()
                .last()
                .unwrap_or("")
                .replace("qemu-img:", "vimg:")
                .replace(&format!("vimg: {}: ", p(&img)), "vimg: ")
                .replace(" (vdi)", "")
        };
        assert!(
            rc != 0 && qrc != 0 && last(&o) == last(&q),
            "{args:?}: vimg {rc} {o}; qemu-img {qrc} {q}"
        );
        assert_eq!(std::fs::read(&img).unwrap(), before, "{args:?}");
    }
}

/// Blocks whose block map entries lie past the first 64 KiB of the map (a 20 GiB disk written
/// at 19 GiB): the header and the entry's sector are written apart, and the image is still
/// qemu's: clean, read as the source, mapped alike.
#[test]
fn far_block_map_entries() {
    if !qemu_available("vdi") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.vdi");
    run(VIMG, &["create", "-f", "vdi", p(&img), "20G"]);
    let src = dir.path().join("src.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(20 << 30).unwrap();
        f.write_all_at(&[7u8; 3_000_000], 19 << 30).unwrap();
        f.write_all_at(&[9u8; 100], 5 << 20).unwrap();
    }
    run(VIMG, &["convert", "-n", "-O", "vdi", p(&src), p(&img)]);
    let mut failures = Vec::new();
    check_like_qemu(&img, &src, "20G", &mut failures);
    assert_no_failures(&failures);
}
