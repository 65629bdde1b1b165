//! LUKS-encrypted qcow2 images made by vimg (`create`/`convert -O qcow2 -o
//! encrypt.format=luks`), checked against qemu-img and qemu-io 10: the same layout as qemu-img's
//! (every byte outside the LUKS header's clusters, which hold random keys and salts), every
//! cipher, mode, IV generator and hash read and written by qemu, `measure` as qemu-img
//! measures, and key slots amended in place and then used by qemu.

use crate::common::encrypted::{
    luks_combos, message, ok, open, opener, parallel, qemu_check, qemu_io, qemu_read, random_io,
    random_writes, read_all, secret, spec, with_objects,
};
use crate::common::{self, Rng};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

/// The type of qcow2's full disk encryption header extension (qcow2.rst "Header extensions").
const CRYPTO_EXT: u32 = 0x0537_be77;

/// `create -f qcow2` of a LUKS image with passphrase `pw`, by `prog` (extra `-o` options).
fn create(prog: &str, path: &Path, pw: &str, extra: &str, size: u64) -> (i32, String) {
    let mut o = "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10".to_string();
    if !extra.is_empty() {
        o = format!("{o},{extra}");
    }
    let size = size.to_string();
    let args = ["-q", "-f", "qcow2", "-o", &o, path.to_str().unwrap(), &size];
    with_objects(prog, &["create"], &[secret("k", pw)], &args)
}

/// The FDE header extension's (offset, length) and the cluster size of the image `bytes`.
fn crypto_ext(bytes: &[u8]) -> (u64, u64, u64) {
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let cs = 1u64 << be32(20);
    let mut off = if be32(4) >= 3 { be32(100) as usize } else { 72 };
    loop {
        let (kind, len) = (be32(off), be32(off + 4) as usize);
        assert_ne!(kind, 0, "no FDE header extension");
        if kind == CRYPTO_EXT {
            return (be64(off + 8), be64(off + 16), cs);
        }
        off += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn new_images_are_laid_out_as_qemu_lays_them_out() {
    if !common::qemu_available("luks_create_layout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Cluster sizes whose LUKS header spans thousands of clusters and new refcount blocks,
    // 64-bit refcounts, each preallocation mode (the header after the data clusters),
    // version 2, a smaller header (aes-128-cbc), an external data file.
    let cases: [(&str, u64); 8] = [
        ("", 3 << 20),
        ("cluster_size=512", 3 << 20),
        ("cluster_size=4096,refcount_bits=64", 1 << 20),
        ("preallocation=metadata", 3 << 20),
        ("preallocation=falloc,cluster_size=4096", 1 << 20),
        ("compat=0.10,preallocation=full", 1 << 20),
        (
            "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            5 << 20,
        ),
        ("data_file=DATA", 1 << 20),
    ];
    for (i, (extra, size)) in cases.iter().enumerate() {
        let q = dir.path().join(format!("q{i}.qcow2"));
        let v = dir.path().join(format!("v{i}.qcow2"));
        // qemu opens a relative data file name from its working directory.
        let data = |t: &str| {
            dir.path()
                .join(format!("{t}{i}.data"))
                .display()
                .to_string()
        };
        let qe = extra.replace("DATA", &data("q"));
        let ve = extra.replace("DATA", &data("v"));
        ok(create("qemu-img", &q, "pw", &qe, *size), "qemu-img create");
        ok(create(VIMG, &v, "pw", &ve, *size), "vimg create");
        let (qb, vb) = (std::fs::read(&q).unwrap(), std::fs::read(&v).unwrap());
        let (off, len, cs) = crypto_ext(&qb);
        assert_eq!(
            crypto_ext(&vb),
            (off, len, cs),
            "{extra}: LUKS header place"
        );
        assert_eq!(qb.len(), vb.len(), "{extra}: file length");
        let end = (off + len).next_multiple_of(cs) as usize;
        let (off, mut data_name) = (off as usize, None);
        if extra.contains("data_file") {
            // The data file's name differs: compare cluster 0 with the names swapped.
            data_name = Some((data("q"), data("v")));
        }
        let outside = |b: &[u8]| [b[..off].to_vec(), b[end..].to_vec()].concat();
        let (mut qo, vo) = (outside(&qb), outside(&vb));
        if let Some((qn, vn)) = &data_name {
            let at = qo
                .windows(qn.len())
                .position(|w| w == qn.as_bytes())
                .unwrap();
            qo[at..at + vn.len()].copy_from_slice(vn.as_bytes());
        }
        assert!(qo == vo, "{extra}: bytes outside the LUKS header differ");
        let objects = [secret("k", "pw")];
        let vspec = spec(&v, "k", None);
        qemu_check(&objects, &vspec);
        if !extra.contains("prealloc") {
            // Preallocated clusters hold no ciphertext: they decrypt to noise, in qemu too.
            let read = qemu_read(&objects, &vspec, dir.path());
            assert!(
                read.iter().all(|&b| b == 0),
                "{extra}: a new image reads zeros"
            );
        }
    }
}

/// Every combination of cipher, mode, IV generator and hash qemu 10 accepts
/// ([`luks_combos`]), both ways: an image qemu-img makes and qemu-io writes reads the same in
/// vimg, and vimg's writes into it read the same in qemu; an image vimg makes, written by
/// qemu-io and then by vimg, reads the same in both and passes `qemu-img check`.
#[test]
fn every_cipher_round_trips_through_qemu() {
    if !common::qemu_available("luks_create_ciphers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let combos: Vec<(usize, String)> = luks_combos().into_iter().enumerate().collect();
    let failures = parallel(&combos, |(i, combo)| {
        let extra: Vec<String> = combo.split(',').map(|o| format!("encrypt.{o}")).collect();
        let extra = extra.join(",");
        let mut rng = Rng::seeded(0x1c5e + *i as u64);
        let size = 1u64 << 20;
        let objects = [secret("k", "pw")];
        let mut bad = Vec::new();
        for maker in ["qemu-img", VIMG] {
            let v = dir.path().join(format!("c{i}-{}.qcow2", maker.len()));
            ok(create(maker, &v, "pw", &extra, size), "create");
            let vspec = spec(&v, "k", None);
            // qemu writes, vimg reads.
            qemu_io(&objects, &vspec, &random_io(&mut rng, size, 6));
            let keys = opener(&[("k", "pw")], &[(v.as_path(), "k")]);
            let mut model = qemu_read(&objects, &vspec, dir.path());
            if read_all(open(&v, &keys, false).as_ref()) != model {
                bad.push(format!("{combo}: vimg reads {maker}'s image otherwise"));
            }
            // vimg writes, qemu reads.
            {
                let img = open(&v, &keys, true);
                random_writes(img.as_ref(), &mut model, &mut rng, 6);
                img.finish().unwrap();
            }
            if qemu_read(&objects, &vspec, dir.path()) != model {
                bad.push(format!(
                    "{combo}: qemu reads vimg's writes into {maker}'s image otherwise"
                ));
            }
            qemu_check(&objects, &vspec);
            std::fs::remove_file(&v).unwrap();
        }
        bad
    });
    common::assert_no_failures(&failures);
}

#[test]
fn convert_into_luks_and_between_passphrases() {
    if !common::qemu_available("luks_create_convert") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::seeded(0xc0de);
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; 3 << 20];
    for _ in 0..20 {
        let at = rng.below(data.len() as u64 - 70_000) as usize;
        let b = rng.next() as u8;
        data[at..at + 1 + rng.below(65_536) as usize].fill(b);
    }
    std::fs::write(&raw, &data).unwrap();
    let objects = [secret("a", "first"), secret("b", "second")];
    let one = dir.path().join("one.qcow2");
    let two = dir.path().join("two.qcow2");
    let raw_spec = format!("driver=raw,file.filename={}", raw.display());
    // raw -> LUKS qcow2, then LUKS -> LUKS under another passphrase and cipher, preallocated
    // (whose clusters must then be written even where the source holds zeros, as qemu's
    // iotest 188 checks).
    let to_one = [
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=a,encrypt.iter-time=10",
        raw.to_str().unwrap(),
        one.to_str().unwrap(),
    ];
    ok(
        with_objects(VIMG, &["convert"], &objects, &to_one),
        "convert",
    );
    let one_spec = spec(&one, "a", None);
    let two_opts = "encrypt.format=luks,encrypt.key-secret=b,encrypt.iter-time=10,\
                    encrypt.cipher-alg=twofish-128,preallocation=metadata";
    let to_two = [
        "--image-opts",
        &one_spec,
        "-O",
        "qcow2",
        "-o",
        two_opts,
        two.to_str().unwrap(),
    ];
    ok(
        with_objects(VIMG, &["convert"], &objects, &to_two),
        "convert",
    );
    let two_spec = spec(&two, "b", None);
    for s in [&one_spec, &two_spec] {
        qemu_check(&objects, s);
        let r = with_objects(
            "qemu-img",
            &["compare"],
            &objects,
            &["--image-opts", &raw_spec, s],
        );
        assert_eq!(r.0, 0, "{s}: {}", r.1);
    }
    // Compression with encryption is refused, as by qemu, and leaves no file.
    let three = dir.path().join("three.qcow2");
    let args = [
        "-c",
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=a,encrypt.iter-time=10",
        raw.to_str().unwrap(),
        three.to_str().unwrap(),
    ];
    let q = message(with_objects("qemu-img", &["convert"], &objects, &args));
    let _ = std::fs::remove_file(&three);
    let v = message(with_objects(VIMG, &["convert"], &objects, &args));
    assert_eq!(v, q);
    assert!(!three.exists());
}

#[test]
fn measure_counts_the_luks_header_as_qemu_does() {
    if !common::qemu_available("luks_create_measure") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    common::qemu_create(&src, "qcow2", "", None, 64 << 20);
    common::qemu_io(&src, "qcow2", &["write -P 1 1M 5M".to_string()]);
    let objects = [secret("k", "pw")];
    for args in [
        vec![
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k",
            "--size",
            "3G",
        ],
        vec![
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.cipher-alg=aes-128,cluster_size=512",
            "--output=json",
            src.to_str().unwrap(),
        ],
        // No key: qemu needs it to make the header it measures.
        vec!["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"],
        vec!["-O", "luks", "-o", "key-secret=nosuch", "--size", "1G"],
    ] {
        let q = with_objects("qemu-img", &["measure"], &objects, &args);
        let v = with_objects(VIMG, &["measure"], &objects, &args);
        if q.0 == 0 {
            assert_eq!(v, q, "{args:?}");
        } else {
            assert_eq!(message(v), message(q), "{args:?}");
        }
    }
}

#[test]
fn key_slots_amended_by_vimg_open_in_qemu() {
    if !common::qemu_available("luks_create_amend") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    ok(create(VIMG, &img, "one", "", 1 << 20), "vimg create");
    let objects = [
        secret("s1", "one"),
        secret("s2", "two"),
        secret("s3", "three"),
    ];
    let with = |id: &str| spec(&img, id, None);
    qemu_io(&objects, &with("s1"), &["write -P 9 0 64k".to_string()]);
    let amend = |prog: &str, id: &str, o: &str| {
        with_objects(
            prog,
            &["amend"],
            &objects,
            &["--image-opts", &with(id), "-o", o],
        )
    };
    // A second passphrase in slot 3, added by vimg with the first.
    let add = "encrypt.new-secret=s2,encrypt.state=active,encrypt.keyslot=3,encrypt.iter-time=10";
    ok(amend(VIMG, "s1", add), "vimg amend");
    qemu_io(&objects, &with("s2"), &["read -P 9 0 64k".to_string()]);
    // The same slot again: refused as qemu refuses it, without the file's name.
    let busy = amend(VIMG, "s1", add);
    assert_eq!(
        message(busy),
        (
            1,
            "Refusing to overwrite active keyslot 3 - please erase it first".into()
        )
    );
    // The first passphrase erased by vimg (opened with the second): qemu refuses it now.
    ok(
        amend(VIMG, "s2", "encrypt.old-secret=s1,encrypt.state=inactive"),
        "vimg amend",
    );
    let r = with_objects(
        "qemu-io",
        &[],
        &objects,
        &["--image-opts", "-c", "read 0 512", &with("s1")],
    );
    assert!(
        r.1.contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        r.1
    );
    // qemu adds a third, which vimg opens with.
    ok(
        amend(
            "qemu-img",
            "s2",
            "encrypt.new-secret=s3,encrypt.state=active,encrypt.iter-time=10",
        ),
        "qemu-img amend",
    );
    let keys = opener(&[("s3", "three")], &[(img.as_path(), "s3")]);
    let data = read_all(open(&img, &keys, false).as_ref());
    assert!(data[..65536].iter().all(|&b| b == 9));
    qemu_check(&objects, &with("s3"));
    // Key slot options on images without LUKS: qemu's refusals, word for word.
    let plain = dir.path().join("plain.qcow2");
    common::qemu_create(&plain, "qcow2", "", None, 1 << 20);
    let aes = dir.path().join("aes.qcow2");
    let r = with_objects(
        "qemu-img",
        &["create"],
        &objects,
        &[
            "-q",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s1",
            aes.to_str().unwrap(),
            "1M",
        ],
    );
    ok(r, "qemu-img create");
    for (path, id) in [(&plain, None), (&aes, Some("s1"))] {
        let mut s = format!("driver=qcow2,file.filename={}", path.display());
        if let Some(id) = id {
            s.push_str(&format!(",encrypt.key-secret={id}"));
        }
        let args = ["--image-opts", &s, "-o", "encrypt.new-secret=s2"];
        let q = message(with_objects("qemu-img", &["amend"], &objects, &args));
        let v = message(with_objects(VIMG, &["amend"], &objects, &args));
        assert_eq!(v, q, "{}", path.display());
    }
}

#[test]
fn a_failed_create_leaves_nothing_behind() {
    if !common::qemu_available("luks_create_failures") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    for (objects, extra) in [
        (vec![], "encrypt.format=luks,encrypt.key-secret=nosuch"),
        (vec![secret("k", "pw")], "encrypt.format=luks"),
        (
            vec![secret("k", "pw")],
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.cipher-alg=cast5-128",
        ),
        (
            vec![secret("k", "pw")],
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.hash-alg=sha3",
        ),
    ] {
        let args = ["-f", "qcow2", "-o", extra, img.to_str().unwrap(), "1M"];
        let q = message(with_objects("qemu-img", &["create"], &objects, &args));
        assert!(!img.exists(), "qemu-img left a file: {extra}");
        let v = message(with_objects(VIMG, &["create"], &objects, &args));
        assert_eq!(v, q, "{extra}");
        assert!(!img.exists(), "vimg left a file: {extra}");
    }
}
