//! Legacy AES encrypted qcow2 images (`crypt_method` 1, `encrypt.format=aes`) against qemu-img
//! and qemu-io 10: images qemu makes and writes (random patterns at any byte offset, over
//! backing files encrypted with another key or not at all, with internal snapshots) read the
//! same through vimg; vimg's writes into them (partial sectors and clusters, copy-on-write from
//! backing files and snapshot-shared clusters, zero writes, discards) and the images vimg
//! creates and converts read the same through qemu (`qemu-img compare` with the secrets) and
//! pass `qemu-img check`; a missing secret fails as in qemu, and a wrong passphrase decrypts to
//! the same garbage as in qemu.

use crate::common::encrypted::{
    chain_opener, message, ok, open, opener, qemu_chain, qemu_check, qemu_create_encrypted,
    qemu_io, qemu_read, random_writes, read_all, secret, snapshot_reads_agree, spec, with_objects,
    AES,
};
use crate::common::{self, Rng};
use vimg::GuestOffset;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

/// The `-o` options of a chain's images: cluster size, extended L2 entries.
fn layout(cluster: u64, extended_l2: bool) -> String {
    let mut extra = format!("cluster_size={cluster}");
    if extended_l2 {
        extra.push_str(",extended_l2=on");
    }
    extra
}

#[test]
fn images_qemu_writes_read_the_same() {
    if !common::qemu_available("aes_read") {
        return;
    }
    let mut rng = Rng::seeded(0xae5);
    for (cluster, ext, base_enc) in [
        (65536, false, true),
        (4096, false, false),
        (512, false, true),
        (16384, true, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (objects, top_spec) =
            qemu_chain(AES, dir.path(), &mut rng, &layout(cluster, ext), base_enc);
        let want = qemu_read(&objects, &top_spec, dir.path());
        let img = open(
            &dir.path().join("top.qcow2"),
            &chain_opener(dir.path(), base_enc),
            false,
        );
        assert!(
            read_all(img.as_ref()) == want,
            "cluster {cluster} ext {ext}"
        );
        // Unaligned reads too.
        let mut buf = vec![0u8; 70001];
        img.read_at(&mut buf, GuestOffset(12345)).unwrap();
        assert!(buf[..] == want[12345..12345 + 70001]);
    }
}

#[test]
fn vimg_writes_into_qemu_images_read_the_same_in_qemu() {
    if !common::qemu_available("aes_write") {
        return;
    }
    let mut rng = Rng::seeded(0x5ec);
    for (cluster, ext, base_enc) in [
        (65536, false, true),
        (4096, false, false),
        (16384, true, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (objects, top_spec) =
            qemu_chain(AES, dir.path(), &mut rng, &layout(cluster, ext), base_enc);
        let mut model = qemu_read(&objects, &top_spec, dir.path());
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
            "cluster {cluster} ext {ext} base encrypted {base_enc}"
        );
        qemu_check(&objects, &top_spec);
        // The snapshot qemu took still reads as before (its clusters were copied, not
        // changed): vimg's convert -l and qemu's agree.
        snapshot_reads_agree(&objects, &top_spec, "s1", dir.path());
    }
}

#[test]
fn images_vimg_creates_and_converts_read_the_same_in_qemu() {
    if !common::qemu_available("aes_create") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    let mut rng = Rng::seeded(7);
    let mut data = vec![0u8; 3 << 20];
    for chunk in data.chunks_mut(65536) {
        if rng.below(3) != 0 {
            chunk.iter_mut().for_each(|b| *b = rng.next() as u8);
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let objects = vec![secret("k", "a passphrase longer than sixteen bytes")];
    // create + convert -n into it; convert -O qcow2 -o encrypt...; the old spelling.
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    let c = d.join("c.qcow2");
    let (code, out) = with_objects(
        VIMG,
        &["create"],
        &objects,
        &[
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=k",
            a.to_str().unwrap(),
            "3M",
        ],
    );
    assert_eq!(code, 0, "{out}");
    // The warning is for a person at a terminal; scripts get qemu-img's output.
    assert!(!out.contains("warning"), "{out}");
    let cmd = format!(
        "{VIMG} create -q -f qcow2 --object secret,id=k,data=x -o encryption=on,encrypt.key-secret=k \
         {}/tty.qcow2 1M",
        d.display()
    );
    let tty = common::run("script", &["-qec", &cmd, "/dev/null"]);
    assert!(
        tty.contains("vimg: warning: legacy qcow2 AES encryption (encrypt.format=aes) is weak"),
        "{tty}"
    );
    ok(
        with_objects(
            VIMG,
            &["convert"],
            &objects,
            &[
                "-n",
                raw.to_str().unwrap(),
                "--target-image-opts",
                &spec(&a, "k", None),
            ],
        ),
        "convert -n",
    );
    ok(
        with_objects(
            VIMG,
            &["convert"],
            &objects,
            &[
                "-O",
                "qcow2",
                "-o",
                "encrypt.format=aes,encrypt.key-secret=k,cluster_size=4096",
                raw.to_str().unwrap(),
                b.to_str().unwrap(),
            ],
        ),
        "convert -O qcow2",
    );
    ok(
        with_objects(
            VIMG,
            &["convert"],
            &objects,
            &[
                "-O",
                "qcow2",
                "-o",
                "encryption=on,encrypt.key-secret=k",
                "--image-opts",
                &spec(&b, "k", None),
                c.to_str().unwrap(),
            ],
        ),
        "convert aes to aes",
    );
    for img in [&a, &b, &c] {
        let s = spec(img, "k", None);
        let (code, out) = with_objects(
            "qemu-img",
            &["compare"],
            &objects,
            &[
                "--image-opts",
                &s,
                &format!("driver=raw,file.filename={}", raw.display()),
            ],
        );
        assert_eq!(code, 0, "{}: {out}", img.display());
        qemu_check(&objects, &s);
        // info without the key, as qemu prints it.
        for fmt in ["human", "json"] {
            let o = format!("--output={fmt}");
            let v = common::run(VIMG, &["info", &o, img.to_str().unwrap()]);
            let q = common::run("qemu-img", &["info", &o, img.to_str().unwrap()]);
            assert_eq!(v, q, "{}", img.display());
        }
    }
    // An encrypted overlay over an encrypted image: info of the chain, without keys.
    let o = d.join("o.qcow2");
    qemu_create_encrypted(AES, &o, "other", 3 << 20, "", Some(&a));
    for fmt in ["human", "json"] {
        let f = format!("--output={fmt}");
        let args = ["info", "--backing-chain", &f, o.to_str().unwrap()];
        assert_eq!(
            common::run(VIMG, &args),
            common::run("qemu-img", &args),
            "{fmt}"
        );
    }
    // An overlay over an encrypted image, its size taken from it: no key needed (qemu opens
    // the backing file without I/O).
    let ov = d.join("ov.qcow2");
    let args = [
        "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
    ];
    let (code, out) = common::run_in(d, VIMG, &[&args[..], &[ov.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{out}");
    let info = common::run("qemu-img", &["info", ov.to_str().unwrap()]);
    assert!(info.contains("virtual size: 3 MiB"), "{info}");
    // vimg reads qemu's conversion of the same data the same.
    let q = d.join("q.qcow2");
    ok(
        with_objects(
            "qemu-img",
            &["convert"],
            &objects,
            &[
                "-O",
                "qcow2",
                "-o",
                "encrypt.format=aes,encrypt.key-secret=k",
                raw.to_str().unwrap(),
                q.to_str().unwrap(),
            ],
        ),
        "qemu convert",
    );
    let img = open(
        &q,
        &opener(
            &[("k", "a passphrase longer than sixteen bytes")],
            &[(&q, "k")],
        ),
        false,
    );
    assert!(read_all(img.as_ref()) == data);
}

#[test]
fn missing_keys_and_wrong_passphrases_as_in_qemu() {
    if !common::qemu_available("aes_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("e.qcow2");
    qemu_create_encrypted(AES, &img, "right", 1 << 20, "", None);
    qemu_io(
        &[secret("k", "right")],
        &spec(&img, "k", None),
        &["write -P 0x5a 1000 70000".to_string()],
    );
    let out = d.join("out.raw");
    let (p, o) = (img.to_str().unwrap(), out.to_str().unwrap());
    let sp = spec(&img, "k", None);
    let sp_other = spec(&img, "nope", None);
    let sp_luks = format!("{sp},encrypt.format=luks");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (vec![], vec!["convert", "-O", "raw", p, o]),
        (vec![], vec!["check", p]),
        (vec![], vec!["map", p]),
        (
            vec![secret("k", "right")],
            vec!["convert", "--image-opts", &sp_other, "-O", "raw", o],
        ),
        (
            vec![secret("k", "right")],
            vec!["convert", "--image-opts", &sp_luks, "-O", "raw", o],
        ),
    ];
    // Encryption options for an image without encryption: a format is refused, a key ignored.
    let plain = d.join("plain.qcow2");
    common::qemu_create(&plain, "qcow2", "", None, 1 << 20);
    let sp_plain_fmt = format!(
        "driver=qcow2,file.filename={},encrypt.format=aes",
        plain.display()
    );
    let sp_plain_key = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=zz",
        plain.display()
    );
    let cases = [
        cases,
        vec![
            (
                vec![],
                vec!["convert", "--image-opts", &sp_plain_fmt, "-O", "raw", o],
            ),
            (
                vec![],
                vec!["convert", "--image-opts", &sp_plain_key, "-O", "raw", o],
            ),
        ],
    ]
    .concat();
    for (objects, args) in &cases {
        let v = message(with_objects(VIMG, &args[..1], objects, &args[1..]));
        let q = message(with_objects("qemu-img", &args[..1], objects, &args[1..]));
        assert_eq!(v.0 != 0, q.0 != 0, "{args:?}: {v:?} {q:?}");
        // qemu names the image by its option string, vimg by its file.
        let strip = |s: &str| s.rsplit("': ").next().unwrap_or(s).to_string();
        assert_eq!(strip(&v.1), strip(&q.1), "{args:?}");
    }
    // Compression with encryption, refused before anything is made.
    let c = d.join("c.qcow2");
    let args = [
        "-c",
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=k",
        p,
        c.to_str().unwrap(),
    ];
    let objects = [secret("k", "right")];
    let v = message(with_objects(VIMG, &["convert"], &objects, &args));
    assert_eq!(
        v,
        (
            1,
            "Compression and encryption not supported at the same time".into()
        )
    );
    assert!(!c.exists());
    // A wrong passphrase goes unnoticed: the same garbage as qemu's.
    let wrong = [secret("k", "wrong")];
    let q = qemu_read(&wrong, &sp, d);
    let img = open(&img, &opener(&[("k", "wrong")], &[(&img, "k")]), false);
    let v = read_all(img.as_ref());
    assert!(v == q);
    assert!(v[1000..71000].iter().any(|&b| b != 0x5a));
}

#[test]
fn commit_resize_and_rebase_of_encrypted_chains() {
    if !common::qemu_available("aes_edit") {
        return;
    }
    let mut rng = Rng::seeded(0xc0);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (objects, top_spec) = qemu_chain(AES, d, &mut rng, &layout(65536, false), true);
    let want = qemu_read(&objects, &top_spec, d);
    // commit the AES top into the AES base (another key).
    ok(
        with_objects(VIMG, &["commit"], &objects, &["--image-opts", &top_spec]),
        "commit",
    );
    let base_spec = spec(&d.join("base.qcow2"), "kb", None);
    assert!(qemu_read(&objects, &base_spec, d) == want);
    qemu_check(&objects, &base_spec);
    // resize the base: grow, then shrink.
    for size in ["+1M", "1536K"] {
        let args: Vec<&str> = if size.starts_with('+') {
            vec!["--image-opts", &base_spec, size]
        } else {
            vec!["--shrink", "--image-opts", &base_spec, size]
        };
        ok(with_objects(VIMG, &["resize"], &objects, &args), "resize");
    }
    let got = qemu_read(&objects, &base_spec, d);
    assert_eq!(got.len(), 1536 << 10);
    assert!(got[..want.len()] == want[..]);
    assert!(got[want.len()..].iter().all(|&b| b == 0));
    qemu_check(&objects, &base_spec);
    // rebase an AES overlay onto nothing: its backing file's data is copied into it.
    let (objects, top_spec) = qemu_chain(
        AES,
        &d.join("x").tap_mkdir(),
        &mut rng,
        &layout(4096, false),
        true,
    );
    let want = qemu_read(&objects, &top_spec, d);
    ok(
        with_objects(
            VIMG,
            &["rebase"],
            &objects,
            &["-b", "", "--image-opts", &top_spec],
        ),
        "rebase",
    );
    let alone = spec(&d.join("x").join("top.qcow2"), "kt", None);
    assert!(qemu_read(&objects, &alone, d) == want);
    qemu_check(&objects, &alone);
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn downgrade_expands_zero_clusters_into_encrypted_zeros() {
    if !common::qemu_available("aes_downgrade") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("b.qcow2");
    let top = d.join("t.qcow2");
    common::qemu_create(&base, "qcow2", "", None, 1 << 20);
    qemu_io(
        &[],
        &format!("driver=qcow2,file.filename={}", base.display()),
        &["write -P 7 0 1M".to_string()],
    );
    qemu_create_encrypted(AES, &top, "pw", 1 << 20, "", Some(&base));
    let objects = [secret("k", "pw")];
    let sp = spec(&top, "k", None);
    // Zero clusters over a backing file: version 2 must store them as data clusters of zeros.
    qemu_io(
        &objects,
        &sp,
        &[
            "write -P 1 0 64k".to_string(),
            "write -z 64k 128k".to_string(),
        ],
    );
    let want = qemu_read(&objects, &sp, d);
    assert!(want[65536..196608].iter().all(|&b| b == 0));
    ok(
        with_objects(
            VIMG,
            &["amend"],
            &objects,
            &["-o", "compat=0.10", "--image-opts", &sp],
        ),
        "amend",
    );
    // qemu-img 10 writes plain zeros there, which then decrypt to garbage; vimg encrypts them.
    assert!(qemu_read(&objects, &sp, d) == want);
    qemu_check(&objects, &sp);
    let info = common::run("qemu-img", &["info", top.to_str().unwrap()]);
    assert!(info.contains("compat: 0.10"), "{info}");
    // Legacy AES has no key slots to amend: qemu's words.
    let v = message(with_objects(
        VIMG,
        &["amend"],
        &objects,
        &["-o", "encrypt.new-secret=k", "--image-opts", &sp],
    ));
    let q = message(with_objects(
        "qemu-img",
        &["amend"],
        &objects,
        &["-o", "encrypt.new-secret=k", "--image-opts", &sp],
    ));
    assert_eq!(v, q);
}

#[test]
fn a_stray_luks_header_is_refused_as_in_qemu() {
    if !common::qemu_available("aes_luks_header") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    ok(
        with_objects(
            "qemu-img",
            &["create"],
            &[secret("k", "pw")],
            &[
                "-q",
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10",
                img.to_str().unwrap(),
                "1M",
            ],
        ),
        "qemu-img create luks",
    );
    let p = img.to_str().unwrap();
    // A LUKS header extension in an image whose method is not LUKS: refused in qemu's words.
    let h = common::header_fields::CRYPT_METHOD;
    for method in [0u32, 1] {
        common::poke(&img, h, &method.to_be_bytes());
        let v = message(common::run_status(VIMG, &["info", p]));
        let q = message(common::run_status("qemu-img", &["info", p]));
        assert_eq!(v, q, "crypt_method {method}");
    }
}
