//! Raw LUKS images (`-f luks`, issue 16) against qemu-img/qemu-io and cryptsetup, both ways, on
//! every cipher, mode, IV generator and hash qemu 10 accepts:
//!
//! - images qemu makes and fills (qemu-io) read identically by vimg (`convert -O raw`, compared
//!   byte for byte with qemu-img's own decryption), and vimg's writes into them (`convert -n`)
//!   read identically by qemu (`qemu-img compare` with the secret);
//! - images vimg makes (`convert -O luks`) read identically by qemu, and `info` (text and JSON,
//!   no key) says what qemu-img says;
//! - cryptsetup (`luksDump`, `open --test-passphrase`) accepts vimg's images, and vimg opens
//!   images `cryptsetup luksFormat --type luks1` made, including a 192-bit CBC one (which qemu
//!   10.0.2 aborts on), whose data is checked against `openssl enc`;
//! - a wrong passphrase is one line in qemu's words, exit 1, nothing written.
//!
//! qemu's LUKS create takes seconds (it times PBKDF2 whatever iter-time says), so each
//! combination's fixtures are made once and the combinations run on two threads.

use crate::common;

use common::{assert_no_failures, encrypted, qemu_available, run, run_status};
use std::path::{Path, PathBuf};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
const PASS: &str = "luks-pass";
const SECRET: &str = "secret,id=sec0,data=luks-pass";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `driver=luks,file.filename=PATH,key-secret=sec0`.
fn opts(path: &Path) -> String {
    format!("driver=luks,file.filename={},key-secret=sec0", p(path))
}

/// qemu-io commands on a LUKS image, with the secret.
fn qemu_io_luks(img: &Path, cmds: &[&str]) {
    let o = opts(img);
    let mut args = vec!["--object", SECRET, "--image-opts", &o];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = run("qemu-io", &args);
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
}

/// `qemu-img compare` of a LUKS image with a raw one, with the secret: status and output.
fn qemu_compare(img: &Path, raw: &Path) -> (i32, String) {
    run_status(
        "qemu-img",
        &[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &opts(img),
            &format!("driver=raw,file.filename={}", p(raw)),
        ],
    )
}

/// A raw image of `size` bytes with patterns at unaligned offsets, written by qemu-io.
fn pattern_raw(path: &Path, size: u64, seed: u8) {
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(path), &size.to_string()],
    );
    let cmds = [
        format!("write -P {} 1000 70000", seed),
        format!("write -P {} 200000 512", seed.wrapping_add(1)),
        format!("write -P {} 300001 4097", seed.wrapping_add(2)),
        format!("write -P {} {} 1536", seed.wrapping_add(3), size - 1536),
    ];
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(p(path));
    run("qemu-io", &args);
}

/// Checks one combination; returns what went wrong.
fn check_combo(dir: &Path, n: usize, o: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let mut fail = |m: String| failures.push(format!("[{o}] {m}"));
    let size: u64 = 1 << 20;
    let create_opts = format!("key-secret=sec0,iter-time=10,{o}");

    // qemu's image, filled by qemu-io, read by vimg.
    let q = dir.join(format!("q{n}.luks"));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            &create_opts,
            p(&q),
            "1M",
        ],
    );
    qemu_io_luks(
        &q,
        &[
            "write -P 0x5a 1000 70000",
            "write -P 0xc3 524288 512",
            "write -P 0x17 1047552 1024",
        ],
    );
    let ours = dir.join(format!("q{n}.vimg.raw"));
    let theirs = dir.join(format!("q{n}.qemu.raw"));
    let (rc, out) = run_status(
        VIMG,
        &[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &opts(&q),
            "-O",
            "raw",
            p(&ours),
        ],
    );
    if rc != 0 {
        fail(format!("vimg cannot read qemu's image: {out}"));
        return failures;
    }
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &opts(&q),
            "-O",
            "raw",
            p(&theirs),
        ],
    );
    if std::fs::read(&ours).unwrap() != std::fs::read(&theirs).unwrap() {
        fail("vimg reads qemu's image differently from qemu".into());
    }
    for (args, what) in [
        (vec!["info"], "text"),
        (vec!["info", "--output=json"], "json"),
    ] {
        let mut a = args.clone();
        a.push(p(&q));
        let v = run_status(VIMG, &a);
        let qv = run_status("qemu-img", &a);
        if v != qv {
            fail(format!(
                "info ({what}) differs:\nvimg: {}\nqemu: {}",
                v.1, qv.1
            ));
        }
    }

    // vimg's writes into qemu's image, read by qemu.
    let src = dir.join(format!("src{n}.raw"));
    pattern_raw(&src, size, 0x40 + n as u8);
    let (rc, out) = run_status(
        VIMG,
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            p(&src),
            "--object",
            SECRET,
            "--target-image-opts",
            &opts(&q),
        ],
    );
    if rc != 0 {
        fail(format!("vimg cannot write qemu's image: {out}"));
    } else if qemu_compare(&q, &src).0 != 0 {
        fail(format!(
            "qemu reads vimg's writes differently: {}",
            qemu_compare(&q, &src).1
        ));
    }

    // vimg's image, read by qemu.
    let v = dir.join(format!("v{n}.luks"));
    let (rc, out) = run_status(
        VIMG,
        &[
            "convert",
            "-f",
            "raw",
            p(&src),
            "-O",
            "luks",
            "--object",
            SECRET,
            "-o",
            &create_opts,
            p(&v),
        ],
    );
    if rc != 0 {
        fail(format!("vimg cannot make the image: {out}"));
        return failures;
    }
    let (rc, out) = qemu_compare(&v, &src);
    if rc != 0 {
        fail(format!("qemu reads vimg's image differently: {out}"));
    }
    let vi = run(VIMG, &["info", "--output=json", p(&v)]);
    let qi = run("qemu-img", &["info", "--output=json", p(&v)]);
    if vi != qi {
        fail(format!(
            "info of vimg's image differs:\nvimg: {vi}\nqemu: {qi}"
        ));
    }
    // And the header says what was asked for.
    let j: serde_json::Value = serde_json::from_str(&qi).unwrap();
    let data = &j["format-specific"]["data"];
    for item in o.split(',') {
        let (k, val) = item.split_once('=').unwrap();
        if data[k] != val {
            fail(format!("qemu sees {k}={} in vimg's image", data[k]));
        }
    }
    for f in [&q, &v, &ours, &theirs, &src] {
        let _ = std::fs::remove_file(f);
    }
    failures
}

#[test]
fn every_combination_qemu_accepts_both_ways() {
    if !qemu_available("luks::every_combination_qemu_accepts_both_ways") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let combos: Vec<(usize, String)> = encrypted::luks_combos().into_iter().enumerate().collect();
    let failures = encrypted::parallel(&combos, |(n, o)| check_combo(dir.path(), *n, o));
    assert_no_failures(&failures);
}

#[test]
fn wrong_passphrase_is_one_line_and_writes_nothing() {
    if !qemu_available("luks::wrong_passphrase") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.luks");
    run(
        VIMG,
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            "key-secret=sec0,iter-time=10",
            p(&img),
            "1M",
        ],
    );
    let src = dir.path().join("s.raw");
    pattern_raw(&src, 1 << 20, 9);
    let before = std::fs::read(&img).unwrap();
    let wrong = "secret,id=sec0,data=not-it";
    let o = opts(&img);
    for args in [
        vec![
            "convert",
            "-n",
            "-f",
            "raw",
            p(&src),
            "--object",
            wrong,
            "--target-image-opts",
            &o,
        ],
        vec![
            "convert",
            "--object",
            wrong,
            "--image-opts",
            &o,
            "-O",
            "raw",
            p(&src),
        ],
        vec!["resize", "--object", wrong, "--image-opts", &o, "2M"],
    ] {
        let (rc, out) = run_status(VIMG, &args);
        assert_eq!(rc, 1, "{args:?}: {out}");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.contains("Invalid password, cannot unlock any keyslot"),
            "{out}"
        );
        assert!(!out.contains("not-it") && !out.contains(PASS), "{out}");
    }
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the image was changed"
    );
    // Without key-secret: qemu's words; info needs no key.
    let (rc, out) = run_status(
        VIMG,
        &["convert", "-f", "luks", p(&img), "-O", "raw", p(&src)],
    );
    assert_eq!(rc, 1);
    assert!(
        out.contains("Parameter 'key-secret' is required for cipher"),
        "{out}"
    );
    let (rc, _) = run_status(VIMG, &["info", p(&img)]);
    assert_eq!(rc, 0);
    // Nor with a wrong one, as qemu-img's info, which opens without I/O, does not check it.
    let (rc, out) = run_status(VIMG, &["info", "--object", wrong, "--image-opts", &o]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        run_status("qemu-img", &["info", "--object", wrong, "--image-opts", &o]).0,
        0
    );
    // The right one opens it.
    let (rc, out) = run_status(
        VIMG,
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            p(&src),
            "--object",
            SECRET,
            "--target-image-opts",
            &o,
        ],
    );
    assert_eq!(rc, 0, "{out}");
    assert_eq!(qemu_compare(&img, &src).0, 0);
}

/// cryptsetup, from PATH or the sbin directories Debian puts it in.
fn cryptsetup() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("cryptsetup"))
        .find(|c| c.exists());
    if found.is_none() && std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("cryptsetup not found (apt-get install cryptsetup-bin) but VIMG_REQUIRE_QEMU=1");
    }
    found
}

#[test]
fn cryptsetup_accepts_vimg_images() {
    let Some(cs) = cryptsetup() else { return };
    if !qemu_available("luks::cryptsetup_accepts_vimg_images") {
        return;
    }
    let cs = p(&cs).to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, PASS).unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "nope").unwrap();
    // AES in XTS and CBC only: without device-mapper, cryptsetup decrypts key material
    // through the kernel's crypto API, which offers those here (not serpent, twofish, ECB).
    for (n, o) in [
        "",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
        "cipher-alg=aes-192,cipher-mode=cbc,hash-alg=sha512",
        "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain,hash-alg=sha384",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("c{n}.luks"));
        let create = format!(
            "key-secret=sec0,iter-time=10{}{o}",
            if o.is_empty() { "" } else { "," }
        );
        run(
            VIMG,
            &[
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                SECRET,
                "-o",
                &create,
                p(&img),
                "1M",
            ],
        );
        let dump = run(&cs, &["luksDump", p(&img)]);
        assert!(dump.contains("Version:       \t1"), "{dump}");
        assert!(dump.contains("Key Slot 0: ENABLED"), "{dump}");
        let (rc, out) = run_status(
            &cs,
            &["open", "--test-passphrase", "--key-file", p(&key), p(&img)],
        );
        assert_eq!(rc, 0, "[{o}] cryptsetup refuses vimg's image: {out}");
        let (rc, _) = run_status(
            &cs,
            &["open", "--test-passphrase", "--key-file", p(&bad), p(&img)],
        );
        assert_ne!(rc, 0, "[{o}] cryptsetup takes a wrong passphrase");
    }
}

/// The bytes of `hex` (as luksDump prints a key: pairs separated by spaces and newlines).
fn hex_bytes(text: &str) -> String {
    text.split_whitespace().collect()
}

#[test]
fn vimg_opens_cryptsetup_images() {
    let Some(cs) = cryptsetup() else { return };
    if !qemu_available("luks::vimg_opens_cryptsetup_images") {
        return;
    }
    let cs = p(&cs).to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, PASS).unwrap();
    let mut failures = Vec::new();
    // AES only, as above: cryptsetup's luksFormat checks the cipher through the kernel.
    for (n, (cipher, bits, hash)) in [
        ("aes-xts-plain64", "512", "sha256"),
        ("aes-cbc-essiv:sha256", "128", "sha1"),
        ("aes-xts-plain", "256", "sha512"),
        ("aes-cbc-plain", "256", "ripemd160"),
        ("aes-cbc-plain64", "192", "sha256"),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("cs{n}.luks"));
        run("truncate", &["-s", "3M", p(&img)]);
        run(
            &cs,
            &[
                "luksFormat",
                "-q",
                "--type",
                "luks1",
                "--pbkdf-force-iterations",
                "1000",
                "--cipher",
                cipher,
                "--key-size",
                bits,
                "--hash",
                hash,
                "--key-file",
                p(&key),
                p(&img),
            ],
        );
        let ours = dir.path().join(format!("cs{n}.raw"));
        let (rc, out) = run_status(
            VIMG,
            &[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &opts(&img),
                "-O",
                "raw",
                p(&ours),
            ],
        );
        if rc != 0 {
            failures.push(format!("{cipher}/{bits}: vimg cannot open it: {out}"));
            continue;
        }
        if bits == "192" && cipher == "aes-cbc-plain64" {
            // qemu 10.0.2 aborts on it: decrypt the payload with openssl and the volume key
            // cryptsetup dumps, sector by sector (IV = LE sector number).
            let dump = run(
                &cs,
                &[
                    "luksDump",
                    "--dump-volume-key",
                    "--batch-mode",
                    "--key-file",
                    p(&key),
                    p(&img),
                ],
            );
            let mk = dump.split("MK dump:").nth(1).unwrap();
            let mk = hex_bytes(mk.split("\n\n").next().unwrap());
            let mk: String = mk.chars().take(48).collect();
            let file = std::fs::read(&img).unwrap();
            let payload = 4096 * 512;
            let plain = std::fs::read(&ours).unwrap();
            for sector in [0u64, 1, 777, 2047] {
                let ct = dir.path().join("ct");
                std::fs::write(&ct, &file[payload + sector as usize * 512..][..512]).unwrap();
                let mut iv = [0u8; 16];
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                let iv: String = iv.iter().map(|b| format!("{b:02x}")).collect();
                let out = std::process::Command::new("openssl")
                    .args([
                        "enc",
                        "-d",
                        "-aes-192-cbc",
                        "-nopad",
                        "-K",
                        &mk,
                        "-iv",
                        &iv,
                        "-in",
                        p(&ct),
                    ])
                    .output()
                    .unwrap();
                if out.stdout != plain[sector as usize * 512..][..512] {
                    failures.push(format!(
                        "{cipher}/{bits}: sector {sector} differs from openssl's"
                    ));
                }
            }
        } else {
            let theirs = dir.path().join(format!("cs{n}.qemu.raw"));
            run(
                "qemu-img",
                &[
                    "convert",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &opts(&img),
                    "-O",
                    "raw",
                    p(&theirs),
                ],
            );
            if std::fs::read(&ours).unwrap() != std::fs::read(&theirs).unwrap() {
                failures.push(format!(
                    "{cipher}/{bits}: vimg reads it differently from qemu"
                ));
            }
            let vi = run(VIMG, &["info", "--output=json", p(&img)]);
            let qi = run("qemu-img", &["info", "--output=json", p(&img)]);
            if vi != qi {
                failures.push(format!("{cipher}/{bits}: info differs\n{vi}\n{qi}"));
            }
        }
    }
    assert_no_failures(&failures);
}

/// The image opens (vimg `convert`, or qemu-io) with the passphrase of secret `id`.
fn opens_with(tool: &str, img: &Path, id: &str, secrets: &[&str]) -> bool {
    let o = format!("driver=luks,file.filename={},key-secret={id}", p(img));
    let mut args: Vec<&str> = Vec::new();
    for s in secrets {
        args.extend(["--object", s]);
    }
    let out = img.with_extension("check.raw");
    let (rc, _) = if tool == "vimg" {
        args.extend(["--image-opts", &o]);
        let mut a = vec!["convert"];
        a.extend(args.iter().copied());
        a.extend(["-O", "raw", p(&out)]);
        run_status(VIMG, &a)
    } else {
        args.extend(["--image-opts", &o, "-c", "read 0 512"]);
        let (rc, text) = run_status("qemu-io", &args);
        (if text.contains("read 512/512") { rc } else { 1 }, text)
    };
    let _ = std::fs::remove_file(&out);
    rc == 0
}

#[test]
fn amend_key_slots_both_ways() {
    if !qemu_available("luks::amend_key_slots_both_ways") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secrets = [
        SECRET,
        "secret,id=sec1,data=second",
        "secret,id=sec2,data=third",
    ];
    let img = dir.path().join("a.luks");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            "key-secret=sec0,iter-time=10",
            p(&img),
            "1M",
        ],
    );
    let amend = |tool: &str, key: &str, o: &str, force: bool| {
        let spec = format!("driver=luks,file.filename={},key-secret={key}", p(&img));
        let mut a = vec!["amend"];
        for s in &secrets {
            a.extend(["--object", s]);
        }
        a.extend(["--image-opts", &spec, "-o", o]);
        if force {
            a.push("--force");
        }
        run_status(if tool == "vimg" { VIMG } else { "qemu-img" }, &a)
    };
    // vimg adds slot 1 to qemu's image: qemu opens it with the new passphrase.
    let (rc, out) = amend(
        "vimg",
        "sec0",
        "state=active,new-secret=sec1,iter-time=10",
        false,
    );
    assert_eq!(rc, 0, "{out}");
    assert!(opens_with("qemu", &img, "sec1", &secrets));
    // qemu adds slot 5: vimg opens with it.
    let (rc, out) = amend(
        "qemu",
        "sec1",
        "state=active,new-secret=sec2,keyslot=5,iter-time=10",
        false,
    );
    assert_eq!(rc, 0, "{out}");
    assert!(opens_with("vimg", &img, "sec2", &secrets));
    // vimg's refusals are qemu's, word for word, and change nothing.
    let before = std::fs::read(&img).unwrap();
    for (o, force) in [
        ("state=active,new-secret=sec2,keyslot=0", false),
        ("state=inactive,old-secret=sec0,keyslot=1", false),
        ("state=inactive", false),
        ("state=inactive,keyslot=3", false),
        ("state=active,keyslot=9,new-secret=sec2", false),
        ("state=inactive,new-secret=sec2", false),
    ] {
        let v = amend("vimg", "sec0", o, force);
        let q = amend("qemu", "sec0", o, force);
        let strip = |t: &str| t.replacen("vimg:", "qemu-img:", 1);
        assert_eq!((v.0, strip(&v.1)), q, "{o}");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "{o} changed the image"
        );
    }
    // vimg erases slot 0 by its passphrase: neither opens with it, both with the others.
    let (rc, out) = amend("vimg", "sec1", "state=inactive,old-secret=sec0", false);
    assert_eq!(rc, 0, "{out}");
    for tool in ["vimg", "qemu"] {
        assert!(!opens_with(tool, &img, "sec0", &secrets), "{tool}");
        assert!(opens_with(tool, &img, "sec1", &secrets), "{tool}");
        assert!(opens_with(tool, &img, "sec2", &secrets), "{tool}");
    }
}
