//! File names read from an image are untrusted: backing and data file names resolve against the
//! image's directory (never the working directory), protocol and JSON names are refused, a
//! recorded backing format is used as recorded (a raw file that looks like qcow2 stays raw),
//! chains are bounded and may not loop (symbolic links included), a data file may not be the
//! image itself, and an empty backing name is no backing file, as qemu reads it.

use crate::common;
use crate::common::header_fields;

use common::{qemu_available, qemu_create, run, run_status};
use std::path::{Path, PathBuf};
use vimg::open::{open_image, OpenOptions, MAX_CHAIN_DEPTH};
use vimg::ErrorKind;

fn vimg() -> &'static str {
    env!("CARGO_BIN_EXE_vimg")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Replaces the first occurrence of `from` in the file at `path` with `to` (same length).
fn patch(path: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut b = std::fs::read(path).unwrap();
    let at = b
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} not found in {path:?}", String::from_utf8_lossy(from)));
    b[at..at + to.len()].copy_from_slice(to);
    std::fs::write(path, b).unwrap();
}

/// `qemu-img create -f qcow2 -u -b BACKING -F FMT IMG 1M`: the backing file is only recorded.
fn create_over(img: &Path, backing: &str, fmt: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            fmt,
            s(img),
            "1M",
        ],
    );
}

/// Runs a qemu tool in `dir`: qemu resolves relative data file names against its working
/// directory (unlike backing file names), vimg against the image.
fn qemu_in(dir: &Path, tool: &str, args: &[&str]) {
    let o = std::process::Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn read_all(path: &Path) -> vimg::Result<Vec<u8>> {
    let img = open_image(path, &OpenOptions::default())?;
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut buf, vimg::GuestOffset(0))?;
    Ok(buf)
}

#[test]
fn relative_names_resolve_against_the_image_not_the_working_directory() {
    if !qemu_available("relative_names") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    // The real files, and decoys of the same names where the command runs.
    std::fs::write(images.join("base.raw"), vec![0x42u8; 1 << 20]).unwrap();
    std::fs::write(elsewhere.join("base.raw"), vec![0x66u8; 1 << 20]).unwrap();
    std::fs::write(elsewhere.join("df.data"), vec![0x66u8; 1 << 20]).unwrap();
    let top = images.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&top),
            "1M",
        ],
    );
    let df = images.join("df.qcow2");
    qemu_in(
        &images,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.data",
            "df.qcow2",
            "1M",
        ],
    );
    // vimg resolves data file names against the image, which is what a name recorded in an
    // image can only mean safely; qemu 10 resolves them against its working directory.
    qemu_in(
        &images,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x42 0 1M", "df.qcow2"],
    );
    for img in [&top, &df] {
        let out = elsewhere.join("out.raw");
        let o = std::process::Command::new(vimg())
            .args(["convert", "-O", "raw", s(img), s(&out)])
            .current_dir(&elsewhere)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            std::fs::read(&out).unwrap(),
            vec![0x42u8; 1 << 20],
            "{img:?}"
        );
    }
}

#[test]
fn a_recorded_backing_format_is_used_as_recorded() {
    if !qemu_available("recorded_backing_format") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A raw backing file whose guest wrote a qcow2 image into it.
    let inner = dir.path().join("inner.qcow2");
    qemu_create(&inner, "qcow2", "", None, 1 << 20);
    let base = dir.path().join("base.raw");
    let mut bytes = std::fs::read(&inner).unwrap();
    bytes.resize(1 << 20, 0);
    std::fs::write(&base, &bytes).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_create(&top, "qcow2", "", Some((&base, "raw")), 1 << 20);
    assert_eq!(
        read_all(&top).unwrap(),
        bytes,
        "the raw backing file was read as qcow2"
    );
    // Recorded as qcow2 while it is not: an error, not a silent raw read.
    let liar = dir.path().join("liar.qcow2");
    let plain = dir.path().join("plain.raw");
    std::fs::write(&plain, vec![7u8; 1 << 20]).unwrap();
    create_over(&liar, s(&plain), "qcow2");
    let e = read_all(&liar).unwrap_err();
    assert!(e.to_string().contains("plain.raw"), "{e}");
}

#[test]
fn protocol_and_json_names_are_refused() {
    if !qemu_available("protocol_names") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (kind, name) in [
        ("backing", "http://127.0.0.1/export"),
        ("data", "json:{\"a\":\"b\"}xx"),
    ] {
        let img = dir.path().join(format!("{kind}.qcow2"));
        let placeholder = "p".repeat(name.len());
        if kind == "backing" {
            create_over(&img, &placeholder, "raw");
        } else {
            let opt = format!("data_file={placeholder}");
            qemu_in(
                dir.path(),
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", &opt, s(&img), "1M"],
            );
        }
        patch(&img, placeholder.as_bytes(), name.as_bytes());
        let e = read_all(&img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{kind}: {e}");
        assert!(e.to_string().contains("protocol or JSON"), "{kind}: {e}");
    }
}

#[test]
fn a_data_file_that_is_the_image_itself_is_refused() {
    if !qemu_available("data_file_self") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("aa.qcow2");
    let data = dir.path().join("bb.qcow2");
    qemu_create(
        &img,
        "qcow2",
        &format!("data_file={}", s(&data)),
        None,
        1 << 20,
    );
    patch(&img, b"bb.qcow2", b"aa.qcow2");
    for writable in [false, true] {
        let e = open_image(
            &img,
            &OpenOptions {
                writable,
                ..OpenOptions::default()
            },
        )
        .err()
        .expect("opened an image that is its own data file");
        assert!(e.to_string().contains("is the image file itself"), "{e}");
    }
    let (code, out) = run_status(
        vimg(),
        &["convert", "-O", "raw", s(&img), s(&dir.path().join("o"))],
    );
    assert_eq!(code, 1);
    assert!(out.contains("is the image file itself"), "{out}");
}

#[test]
fn an_empty_backing_name_is_no_backing_file_as_in_qemu() {
    if !qemu_available("empty_backing_name") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.qcow2");
    create_over(&img, "xx", "raw");
    // backing_file_size to 0, the offset left as it is.
    let mut b = std::fs::read(&img).unwrap();
    let at = header_fields::BACKING_FILE_SIZE as usize;
    b[at..at + 4].copy_from_slice(&[0, 0, 0, 0]);
    std::fs::write(&img, &b).unwrap();
    let qemu = run("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(
        !qemu.contains("backing-filename\""),
        "qemu sees a backing file: {qemu}"
    );
    let ours = run(vimg(), &["info", "--output=json", s(&img)]);
    assert!(
        !ours.contains("backing-filename\""),
        "vimg sees a backing file: {ours}"
    );
    assert_eq!(read_all(&img).unwrap(), vec![0u8; 1 << 20]);
}

/// A chain of `n` qcow2 layers over a raw base, made with vimg's create (512-byte clusters,
/// so they are tiny); returns the top.
fn chain(dir: &Path, n: usize) -> PathBuf {
    let base = dir.join("l0.raw");
    std::fs::write(&base, vec![9u8; 4096]).unwrap();
    let mut below = base;
    for i in 1..n {
        let p = dir.join(format!("l{i}.qcow2"));
        vimg::ops::create::create(&vimg::ops::create::CreateArgs {
            format: vimg::ImageFormat::Qcow2,
            filename: p.clone(),
            options: vec!["cluster_size=512".into()],
            backing_file: Some(below.file_name().unwrap().to_str().unwrap().to_string()),
            backing_format: Some(if i == 1 { "raw" } else { "qcow2" }.to_string()),
            unsafe_backing: true,
            size: Some("4096".into()),
            opener: Default::default(),
        })
        .unwrap();
        below = p;
    }
    below
}

#[test]
fn chains_are_bounded_and_may_not_loop_even_through_links() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("deep")).unwrap();
    std::fs::create_dir_all(dir.path().join("ok")).unwrap();
    let ok = chain(&dir.path().join("ok"), MAX_CHAIN_DEPTH);
    assert_eq!(read_all(&ok).unwrap(), vec![9u8; 4096]);
    let deep = chain(&dir.path().join("deep"), MAX_CHAIN_DEPTH + 1);
    let e = read_all(&deep).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BackingChain, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("deeper than {MAX_CHAIN_DEPTH}")),
        "{e}"
    );

    // a.qcow2 -> link.qcow2, a symbolic link to a.qcow2.
    let a = dir.path().join("a.qcow2");
    vimg::ops::create::create(&vimg::ops::create::CreateArgs {
        format: vimg::ImageFormat::Qcow2,
        filename: a.clone(),
        options: vec!["cluster_size=512".into()],
        backing_file: Some("link.qcow2".into()),
        backing_format: Some("qcow2".into()),
        unsafe_backing: true,
        size: Some("4096".into()),
        opener: Default::default(),
    })
    .unwrap();
    std::os::unix::fs::symlink(&a, dir.path().join("link.qcow2")).unwrap();
    let e = read_all(&a).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BackingChain, "{e}");
    assert!(e.to_string().contains("creates an infinite loop"), "{e}");
}
