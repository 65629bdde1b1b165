//! VDI images (`-f vdi`, issue 17) read by vimg as qemu reads them: images qemu-img makes
//! (dynamic and `static=on`, sizes in and out of whole blocks, an odd size rounded up to a
//! sector), filled by qemu-io with seeded random writes (data and zero runs), are read by vimg
//! byte for byte as `qemu-img convert -O raw` reads them (`vimg convert -O raw`, and `vimg
//! compare` against qemu's raw copy), and vimg's `map --output=json` and `info` (text and
//! JSON) equal qemu-img's. vimg refuses to write them (read-only for now), leaving them as
//! they were.

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

#[test]
fn writes_are_refused_and_change_nothing() {
    if !qemu_available("vdi") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.vdi");
    qemu_create(&img, "vdi", "", None, 2 << 20);
    qemu_io(&img, "vdi", &["write -P 5 0 64k".to_string()]);
    let before = std::fs::read(&img).unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![9u8; 2 << 20]).unwrap();
    for args in [
        vec!["convert", "-n", "-O", "vdi", p(&src), p(&img)],
        vec!["resize", p(&img), "+1M"],
        vec!["commit", p(&img)],
    ] {
        let (rc, o) = run_status(VIMG, &args);
        assert!(rc != 0 && o.lines().count() == 1, "{args:?}: {rc} {o}");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "{args:?} changed the image"
        );
    }
    // A new vdi image is not made either (creation is not supported yet).
    let new = dir.path().join("new.vdi");
    let (rc, o) = run_status(VIMG, &["create", "-f", "vdi", p(&new), "1M"]);
    assert!(
        rc != 0 && o.contains("does not support image creation"),
        "{rc} {o}"
    );
}
