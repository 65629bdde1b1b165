//! LUKS-encrypted qcow2 images (`crypt_method` 2, `encrypt.format=luks`) made by qemu-img and
//! written by qemu-io 10 (over backing files encrypted with another passphrase or not at all,
//! with internal snapshots whose shared clusters later writes copy to new host offsets, where
//! their sectors' IVs change): vimg reads them as qemu does; vimg's writes into them read the
//! same through qemu and pass `qemu-img check`; `info` prints what qemu-img prints, with the
//! key and without; a wrong passphrase is refused in qemu's words and changes nothing.

use crate::common::encrypted::{
    chain_opener, message, ok, open, opener, qemu_chain, qemu_check, qemu_create_encrypted,
    qemu_io, qemu_read, random_writes, read_all, secret, snapshot_reads_agree, spec, with_objects,
    LUKS,
};
use crate::common::{self, Rng};
use vimg::GuestOffset;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

const CASES: [(&str, bool); 3] = [
    ("cluster_size=65536", true),
    ("cluster_size=4096", false),
    ("cluster_size=16384,extended_l2=on", true),
];

#[test]
fn images_qemu_writes_read_the_same() {
    if !common::qemu_available("luks_read") {
        return;
    }
    let mut rng = Rng::seeded(0x1ce);
    for (extra, base_enc) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let (objects, top_spec) = qemu_chain(LUKS, dir.path(), &mut rng, extra, base_enc);
        let want = qemu_read(&objects, &top_spec, dir.path());
        let img = open(
            &dir.path().join("top.qcow2"),
            &chain_opener(dir.path(), base_enc),
            false,
        );
        assert!(read_all(img.as_ref()) == want, "{extra}");
        let mut buf = vec![0u8; 70001];
        img.read_at(&mut buf, GuestOffset(12345)).unwrap();
        assert!(buf[..] == want[12345..12345 + 70001], "{extra}");
        // The CLI too, with the secrets on the command line.
        let out = dir.path().join("v.raw");
        ok(
            with_objects(
                VIMG,
                &["convert"],
                &objects,
                &[
                    "--image-opts",
                    &top_spec,
                    "-O",
                    "raw",
                    out.to_str().unwrap(),
                ],
            ),
            "vimg convert",
        );
        assert!(std::fs::read(&out).unwrap() == want, "{extra}");
    }
}

#[test]
fn vimg_writes_into_qemu_images_read_the_same_in_qemu() {
    if !common::qemu_available("luks_write") {
        return;
    }
    let mut rng = Rng::seeded(0x1ce5);
    for (extra, base_enc) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let (objects, top_spec) = qemu_chain(LUKS, dir.path(), &mut rng, extra, base_enc);
        let mut model = qemu_read(&objects, &top_spec, dir.path());
        let size = model.len() as u64;
        {
            let img = open(
                &dir.path().join("top.qcow2"),
                &chain_opener(dir.path(), base_enc),
                true,
            );
            random_writes(img.as_ref(), &mut model, &mut rng, 40);
            assert!(read_all(img.as_ref()) == model);
            img.finish().unwrap();
        }
        assert!(
            qemu_read(&objects, &top_spec, dir.path()) == model,
            "{extra} base encrypted {base_enc}"
        );
        qemu_check(&objects, &top_spec);
        // The snapshot qemu took still reads as before: vimg's convert -l and qemu's agree.
        snapshot_reads_agree(&objects, &top_spec, "s1", dir.path());
        // convert -n into it through the CLI, then qemu-img compare with the source.
        let raw = dir.path().join("src.raw");
        let data: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
        std::fs::write(&raw, &data).unwrap();
        ok(
            with_objects(
                VIMG,
                &["convert"],
                &objects,
                &[
                    "-n",
                    raw.to_str().unwrap(),
                    "--target-image-opts",
                    &top_spec,
                ],
            ),
            "vimg convert -n",
        );
        let src = format!("driver=raw,file.filename={}", raw.display());
        ok(
            with_objects(
                "qemu-img",
                &["compare"],
                &objects,
                &["--image-opts", &src, &top_spec],
            ),
            "qemu-img compare",
        );
        qemu_check(&objects, &top_spec);
    }
}

#[test]
fn info_as_in_qemu_with_and_without_the_key() {
    if !common::qemu_available("luks_info") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("i.qcow2");
    for (extra, pw) in [
        ("", "pw"),
        (
            "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
             encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
            "another passphrase",
        ),
    ] {
        qemu_create_encrypted(LUKS, &img, pw, 8 << 20, extra, None);
        let objects = vec![secret("k", pw)];
        let sp = spec(&img, "k", None);
        qemu_io(&objects, &sp, &["write -P 0x5a 0 64k".to_string()]);
        let p = img.to_str().unwrap();
        for output in ["human", "json"] {
            let o = format!("--output={output}");
            let q = common::run("qemu-img", &["info", &o, p]);
            let v = common::run(VIMG, &["info", &o, p]);
            assert_eq!(v, q, "{extra} {output}");
            assert!(q.contains("cipher") && q.contains("slots"), "{q}");
            let q = ok(
                with_objects("qemu-img", &["info"], &objects, &[&o, "--image-opts", &sp]),
                "qemu-img info",
            );
            let v = ok(
                with_objects(VIMG, &["info"], &objects, &[&o, "--image-opts", &sp]),
                "vimg info",
            );
            // The image's name aside (qemu names it by its json: options).
            let named = |s: &str| {
                s.lines()
                    .filter(|l| !l.starts_with("image: ") && !l.contains("\"filename\": "))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(named(&v), named(&q), "{extra} {output} with the key");
        }
    }
}

#[test]
fn a_wrong_passphrase_or_no_key_is_refused_and_changes_nothing() {
    if !common::qemu_available("luks_wrong") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    qemu_create_encrypted(LUKS, &img, "right", 1 << 20, "", None);
    let sp = spec(&img, "k", None);
    qemu_io(
        &[secret("k", "right")],
        &sp,
        &["write -P 7 0 8k".to_string()],
    );
    let before = std::fs::read(&img).unwrap();
    let out = dir.path().join("o.raw");
    let o = out.to_str().unwrap();
    let tail = |r: (i32, String)| {
        let (code, line) = message(r);
        let tail = line.rsplit_once("': ").map(|(_, t)| t.to_string());
        (code, tail.unwrap_or(line))
    };
    for (objects, spec) in [
        (vec![secret("k", "wrong")], sp.clone()),
        (
            vec![],
            format!("driver=qcow2,file.filename={}", img.display()),
        ),
    ] {
        for args in [
            vec!["convert", "--image-opts", &spec, "-O", "raw", o],
            vec!["convert", "-n", o, "--target-image-opts", &spec],
        ] {
            if !out.exists() {
                std::fs::write(&out, vec![1u8; 1 << 20]).unwrap();
            }
            let v = tail(with_objects(VIMG, &args[..1], &objects, &args[1..]));
            let q = tail(with_objects("qemu-img", &args[..1], &objects, &args[1..]));
            assert_eq!(v, q, "{args:?}");
            assert_eq!(v.0, 1);
            assert!(std::fs::read(&img).unwrap() == before, "{args:?}");
        }
    }
    let (code, out) = with_objects(
        VIMG,
        &["convert"],
        &[secret("k", "wrong")],
        &["--image-opts", &sp, "-O", "raw", o],
    );
    assert!(
        code == 1 && out.contains("Invalid password, cannot unlock any keyslot"),
        "{out}"
    );
}

/// Writes from several threads at once into one LUKS image (whose data vimg can only encrypt
/// once the host clusters are chosen, under its write lock, in pieces through one reused
/// buffer): in each round every thread writes ranges of up to 3 MiB at once, some
/// overlapping the others' (with the same bytes, so that the outcome does not depend on the
/// order), some adjacent to them in the same cluster, at cluster, sector and byte alignment.
/// What vimg and qemu read afterwards is the model, and `qemu-img check` finds nothing wrong.
#[test]
fn concurrent_writes_read_the_same_in_qemu() {
    if !common::qemu_available("luks_concurrent") {
        return;
    }
    const SIZE: u64 = 24 << 20;
    const THREADS: u64 = 4;
    // The byte every write puts at guest offset `o` in round `r`.
    fn byte(o: u64, r: u64) -> u8 {
        ((o / 512).wrapping_mul(0x9e37_79b9) ^ o ^ (r << 5)) as u8
    }
    let mut rng = Rng::seeded(0xc0c0);
    for extra in ["", "cluster_size=4096", "cluster_size=16384,extended_l2=on"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.qcow2");
        qemu_create_encrypted(LUKS, &path, "pw", SIZE, extra, None);
        let img = open(
            &path,
            &opener(&[("k", "pw")], &[(path.as_path(), "k")]),
            true,
        );
        let mut model = vec![0u8; SIZE as usize];
        for round in 1..=4u64 {
            // Each thread's ranges: (offset, length).
            let mut plans: Vec<Vec<(u64, u64)>> = vec![Vec::new(); THREADS as usize];
            let band = SIZE / THREADS;
            for (t, plan) in plans.iter_mut().enumerate() {
                let base = t as u64 * band;
                for _ in 0..3 {
                    let align = [1, 512, 4096, 65536][rng.below(4) as usize];
                    let off = (base + rng.below(band)) / align * align;
                    let len = (1 + rng.below(3 << 20)).min(SIZE - off);
                    plan.push((off, len));
                }
                // Across the border into the next thread's band (overlapping what it writes
                // there), and a range ending exactly where another starts.
                let border = (base + band).min(SIZE - 1);
                let (a, b) = (
                    border.saturating_sub(rng.below(200_000)),
                    rng.below(200_000),
                );
                plan.push((a, (b + border - a).min(SIZE - a).max(1)));
                plan.push((a.saturating_sub(70_001), a - a.saturating_sub(70_001)));
            }
            std::thread::scope(|s| {
                for plan in &plans {
                    let img = img.as_ref();
                    s.spawn(move || {
                        for &(off, len) in plan {
                            if len == 0 {
                                continue;
                            }
                            let data: Vec<u8> = (off..off + len).map(|o| byte(o, round)).collect();
                            img.write_at(&data, GuestOffset(off)).unwrap();
                        }
                    });
                }
            });
            for &(off, len) in plans.iter().flatten() {
                for o in off..off + len {
                    model[o as usize] = byte(o, round);
                }
            }
        }
        assert!(read_all(img.as_ref()) == model, "{extra}: vimg reads");
        img.finish().unwrap();
        drop(img);
        let objects = vec![secret("k", "pw")];
        let image = spec(&path, "k", None);
        assert!(
            qemu_read(&objects, &image, dir.path()) == model,
            "{extra}: qemu reads"
        );
        qemu_check(&objects, &image);
    }
}
