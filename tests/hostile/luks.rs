//! Hostile LUKS headers (issue 16): each damaged field of a raw LUKS image is refused in
//! bounded time and memory with one line naming the file; where qemu-img refuses the same
//! header, in qemu-img's words. Absurd iteration counts, which qemu would run for hours, are
//! refused before any PBKDF2 work.

use crate::common;

use common::{poke, qemu_available, run, run_status};
use std::path::Path;
use std::time::{Duration, Instant};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
/// The passphrase: long and odd enough never to appear by chance in a message (a temporary
/// directory's random name may hold any two letters).
const PASSPHRASE: &str = "Zq9-passphrase-xK";
const SECRET: &str = "secret,id=sec0,data=Zq9-passphrase-xK";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// vimg `convert` of the LUKS image with its key: status, output and how long it took.
fn vimg_convert(img: &Path, out: &Path) -> (i32, String, Duration) {
    let o = format!("driver=luks,file.filename={},key-secret=sec0", p(img));
    convert_with_key(&o, out)
}

/// vimg `convert` of the image `--image-opts` names, with the secret, to a raw `out`.
fn convert_with_key(opts: &str, out: &Path) -> (i32, String, Duration) {
    let t = Instant::now();
    let (rc, text) = run_status(
        VIMG,
        &[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            opts,
            "-O",
            "raw",
            p(out),
        ],
    );
    (rc, text, t.elapsed())
}

/// The reason after `Could not open '...': ` in a one-line message.
fn reason(text: &str) -> &str {
    text.trim_end()
        .split_once("': ")
        .map(|(_, r)| r)
        .unwrap_or(text.trim_end())
}

#[test]
fn hostile_luks_headers_are_refused_quickly_in_one_line() {
    if !qemu_available("luks hostile headers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.luks");
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
            "key-secret=sec0,iter-time=1",
            p(&good),
            "1M",
        ],
    );
    let out = dir.path().join("out.raw");
    let (rc, text, _) = vimg_convert(&good, &out);
    assert_eq!(rc, 0, "{text}");
    // (offset, bytes, whether qemu-img's info refuses it too, in the same words)
    let cases: &[(u64, &[u8], bool)] = &[
        (6, &[0, 2], true),                      // version
        (8, b"des\0", true),                     // cipher name
        (8, &[b'x'; 32], true),                  // cipher name not terminated
        (40, b"xts\0", true),                    // mode without IV generator
        (40, b"xts-essiv\0", true),              // ESSIV without its hash
        (72, b"whirlpool\0", true),              // hash
        (104, &[0, 0, 0, 1], true),              // payload inside the header
        (104, &[0xff, 0xff, 0xff, 0xff], false), // payload past the end of the file
        (108, &[0, 0, 0, 12], true),             // key size the cipher does not have
        (108, &[0, 0, 0, 0], true),              // no key at all
        (164, &[0, 0, 0, 0], true),              // master key iterations zero
        (164, &[0xff, 0xff, 0xff, 0xff], false), // master key iterations absurd
        (208, &[0, 0, 0, 7], true),              // slot state
        (212, &[0xff, 0xff, 0xff, 0xff], false), // slot iterations absurd
        (248, &[0x7f, 0xff, 0xff, 0xff], true),  // key material past the payload (and EOF)
        (248 + 48, &[0, 0, 0, 8], true),         // slots overlapping
        (252, &[0xff, 0xff, 0xff, 0xff], true),  // stripes
        (252, &[0, 0, 0, 0], true),              // no stripes
    ];
    let mut failures = Vec::new();
    for (n, (at, bytes, qemu_too)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("h{n}.luks"));
        std::fs::copy(&good, &img).unwrap();
        poke(&img, *at, bytes);
        let before = std::fs::read(&img).unwrap();
        let (rc, text, took) = vimg_convert(&img, &out);
        let what = format!("patch {bytes:?} at {at}");
        if rc == 0 || text.lines().count() != 1 || !text.contains(p(&img)) {
            failures.push(format!("{what}: status {rc}, said: {text}"));
        }
        if took > Duration::from_secs(10) {
            failures.push(format!("{what}: took {took:?}"));
        }
        if text.contains("panicked") || text.contains(PASSPHRASE) {
            failures.push(format!("{what}: said: {text}"));
        }
        if std::fs::read(&img).unwrap() != before {
            failures.push(format!("{what}: the image was changed"));
        }
        if *qemu_too {
            let (qrc, qtext) = run_status("qemu-img", &["info", "-f", "luks", p(&img)]);
            let (vrc, vtext) = run_status(VIMG, &["info", "-f", "luks", p(&img)]);
            if qrc == 0 || vrc == 0 || reason(&qtext) != reason(&vtext) {
                failures.push(format!("{what}: qemu-img info: {qtext} vimg info: {vtext}"));
            }
        }
    }
    // A file cut short: the header is there, the key material and payload are not.
    let short = dir.path().join("short.luks");
    std::fs::copy(&good, &short).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(8192)
        .unwrap();
    let (rc, text, _) = vimg_convert(&short, &out);
    if rc == 0 || text.lines().count() != 1 || !text.contains("past the end of the file") {
        failures.push(format!("short file: status {rc}, said: {text}"));
    }
    common::assert_no_failures(&failures);
}

/// The full disk encryption header extension of a LUKS qcow2 image pointing elsewhere: past
/// the end of the file, at the qcow2 header, off a cluster boundary, too short for the LUKS
/// header, or with a length field of another size. Each is refused in one line, in qemu-img's
/// words, by vimg's `convert` and by qemu-img's.
#[test]
fn hostile_encryption_header_extensions_are_refused_as_by_qemu() {
    if !qemu_available("luks_qcow2_fde_ext") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let (rc, out) = run_status(
        VIMG,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            p(&img),
            "1M",
        ],
    );
    assert_eq!(rc, 0, "{out}");
    let good = std::fs::read(&img).unwrap();
    // Find the extension (type 0x0537be77) after the 112-byte version 3 header.
    let mut at = 112;
    while good[at..at + 4] != [0x05, 0x37, 0xbe, 0x77] {
        at += 8
            + (u32::from_be_bytes(good[at + 4..at + 8].try_into().unwrap()) as usize)
                .next_multiple_of(8);
    }
    let field = |offset: u64, len: u64| [offset.to_be_bytes(), len.to_be_bytes()].concat();
    let cases: [(&str, usize, Vec<u8>); 5] = [
        ("past the end", at + 8, field(1 << 40, 2068480)),
        ("at the qcow2 header", at + 8, field(0, 2068480)),
        ("unaligned", at + 8, field(262145, 2068480)),
        ("too short", at + 8, field(262144, 100)),
        ("24-byte extension", at + 4, 24u32.to_be_bytes().to_vec()),
    ];
    for (what, offset, bytes) in cases {
        std::fs::write(&img, &good).unwrap();
        poke(&img, offset as u64, &bytes);
        let out = dir.path().join("out.raw");
        let opts = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            p(&img)
        );
        let (vrc, vtext, took) = convert_with_key(&opts, &out);
        let (qrc, qtext) = run_status(
            "qemu-img",
            &[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &opts,
                "-O",
                "raw",
                p(&out),
            ],
        );
        assert_eq!((vrc, qrc), (1, 1), "{what}: {vtext} / {qtext}");
        assert_eq!(vtext.trim().lines().count(), 1, "{what}: {vtext}");
        assert_eq!(reason(&vtext), reason(&qtext), "{what}");
        assert!(took < Duration::from_secs(10), "{what}: {took:?}");
    }
}
