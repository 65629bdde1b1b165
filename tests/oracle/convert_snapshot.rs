//! `vimg convert -l` reads internal snapshots of qcow2 images qemu made. Images with several
//! cluster layouts get data, zero and compressed writes, snapshots, resizes (grown and shrunk)
//! between them, and sometimes a backing file; the disk is captured with `qemu-img convert`
//! whenever a snapshot is taken. Every selector form (`NAME`, `ID`, `snapshot.id=`,
//! `snapshot.name=`, both) must then give exactly the captured disk, raw and qcow2 targets
//! (these clean under `qemu-img check`), and agree with `qemu-img convert -l` where qemu keeps
//! the snapshot whole (qemu-img 10 gives the current virtual size, not the snapshot's).
//! Selectors qemu-img refuses, vimg refuses with the same exit code.

use crate::common;

use common::chain;
use common::run_in;
use common::{qemu_available, qemu_create, qemu_io, run};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

/// A snapshot taken during a scenario: its name, id, and the disk as it was.
struct Taken {
    name: String,
    id: String,
    disk: Vec<u8>,
}

fn capture(img: &Path, dir: &Path) -> Vec<u8> {
    common::qemu_contents(img, dir)
}

/// Runs one scenario: creates `img`, then applies `steps` (qemu-io commands, `snap NAME`,
/// `resize SIZE`) and returns the snapshots taken.
fn scenario(dir: &Path, img: &Path, steps: &[&str]) -> Vec<Taken> {
    let mut taken = Vec::new();
    for step in steps {
        if let Some(name) = step.strip_prefix("snap ") {
            run("qemu-img", &["snapshot", "-c", name, img.to_str().unwrap()]);
            taken.push(Taken {
                name: name.to_string(),
                id: (taken.len() + 1).to_string(),
                disk: capture(img, dir),
            });
        } else if let Some(size) = step.strip_prefix("resize ") {
            let shrink = size.starts_with('-');
            let mut args = vec!["resize", "-q"];
            if shrink {
                args.push("--shrink");
            }
            args.extend([img.to_str().unwrap(), size]);
            run("qemu-img", &args);
        } else {
            qemu_io(img, "qcow2", &[step.to_string()]);
        }
    }
    taken
}

#[test]
fn convert_l_reads_snapshots_as_they_were() {
    if !qemu_available("convert_snapshot") {
        return;
    }
    let dir = chain::fresh_dir("convert-l");
    let layouts = [
        "cluster_size=65536",
        "cluster_size=512",
        "cluster_size=65536,extended_l2=on",
        "cluster_size=4096,compression_type=zstd",
        "compat=0.10",
    ];
    let mut checked = 0;
    for (li, opts) in layouts.iter().enumerate() {
        let img = dir.join(format!("img{li}.qcow2"));
        // Every other layout is an overlay: unallocated clusters read from its backing file.
        let backing = dir.join(format!("b{li}.qcow2"));
        if li % 2 == 1 {
            qemu_create(&backing, "qcow2", "", None, 6 << 20);
            qemu_io(&backing, "qcow2", &["write -P 0x77 0 6M".into()]);
            qemu_create(&img, "qcow2", opts, Some((&backing, "qcow2")), 4 << 20);
        } else {
            qemu_create(&img, "qcow2", opts, None, 4 << 20);
        }
        let compressed = if opts.contains("compat") {
            "write -P 0x21 3M 64k"
        } else {
            "write -c -P 0x21 3M 64k"
        };
        // Version 2 images with snapshots cannot be resized.
        let v2 = opts.contains("compat=0.10");
        let steps: Vec<&str> = [
            compressed,
            "write -P 0x11 0 1M",
            "write -z 512k 64k",
            "snap first",
            "resize 8M",
            "write -P 0x12 3M 128k",
            "write -P 0x13 256k 4k",
            "snap 1",
            "resize -6M",
            "write -P 0x14 0 64k",
            "snap third",
        ]
        .into_iter()
        .filter(|s| !(v2 && s.starts_with("resize")))
        .collect();
        let taken = scenario(&dir, &img, &steps);
        for t in &taken {
            let forms = [
                t.name.clone(),
                format!("snapshot.id={}", t.id),
                format!("snapshot.name={}", t.name),
                format!("snapshot.id={},snapshot.name={}", t.id, t.name),
            ];
            for form in &forms {
                // "1" names snapshot 2 but is the id of snapshot 1: an id matches first.
                let expect = if form == "1" { &taken[0] } else { t };
                for fmt in ["raw", "qcow2"] {
                    let out = dir.join(format!("out.{fmt}"));
                    let (code, msg) = run_in(
                        &dir,
                        VIMG,
                        &[
                            "convert",
                            "-l",
                            form,
                            "-O",
                            fmt,
                            img.to_str().unwrap(),
                            out.to_str().unwrap(),
                        ],
                    );
                    assert_eq!(code, 0, "{opts} -l {form}: {msg}");
                    if fmt == "qcow2" {
                        let (c, m) = chain::check(&out);
                        assert_eq!(c, 0, "{opts} -l {form}: {m}");
                    }
                    let got = capture(&out, &dir);
                    assert!(
                        got.len() == expect.disk.len() && got == expect.disk,
                        "{opts} -l {form} -O {fmt}: {} bytes, expected the {} bytes of '{}'",
                        got.len(),
                        expect.disk.len(),
                        expect.name
                    );
                    checked += 1;
                }
                // qemu-img's copy has the current size: equal where both have data, zeros past
                // the snapshot's end (a snapshot larger than the current disk qemu cuts).
                let ours = dir.join("ours.raw");
                let theirs = dir.join("theirs.raw");
                for (tool, out) in [(VIMG, &ours), ("qemu-img", &theirs)] {
                    let (code, msg) = run_in(
                        &dir,
                        tool,
                        &[
                            "convert",
                            "-l",
                            form,
                            "-O",
                            "raw",
                            img.to_str().unwrap(),
                            out.to_str().unwrap(),
                        ],
                    );
                    assert_eq!(code, 0, "{tool} -l {form}: {msg}");
                }
                let (a, b) = (
                    std::fs::read(&ours).unwrap(),
                    std::fs::read(&theirs).unwrap(),
                );
                let common_len = a.len().min(b.len());
                assert!(
                    a[..common_len] == b[..common_len],
                    "{opts} -l {form}: differs from qemu-img's"
                );
                assert!(
                    b[common_len..].iter().all(|&x| x == 0),
                    "{opts} -l {form}: qemu's tail"
                );
            }
        }
        // Refusals, with qemu-img's exit codes.
        for bad in [
            "nope",
            "snapshot.id=99",
            "snapshot.foo=1",
            "",
            "snapshot.id=1,snapshot.name=third",
        ] {
            let out = dir.join("bad.raw");
            let args = [
                "convert",
                "-l",
                bad,
                "-O",
                "raw",
                img.to_str().unwrap(),
                out.to_str().unwrap(),
            ];
            let (vc, vm) = run_in(&dir, VIMG, &args);
            let (qc, qm) = run_in(&dir, "qemu-img", &args);
            assert_eq!(vc, qc, "-l {bad:?}: vimg {vm} / qemu-img {qm}");
            assert_ne!(vc, 0, "-l {bad:?}");
            assert!(!out.exists() || qc == 0, "-l {bad:?} left an output");
            let _ = std::fs::remove_file(&out);
        }
    }
    // Raw sources have no snapshots; several sources all read their snapshot.
    let raw = dir.join("r.raw");
    qemu_create(&raw, "raw", "", None, 1 << 20);
    let out = dir.join("o.raw");
    let args = [
        "convert",
        "-l",
        "first",
        "-O",
        "raw",
        raw.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    let (vc, _) = run_in(&dir, VIMG, &args);
    let (qc, _) = run_in(&dir, "qemu-img", &args);
    assert_eq!((vc, qc), (1, 1));
    // Several sources with a snapshot: refused, as qemu-img refuses a bare name (with
    // snapshot.id= qemu-img would read the snapshot of the first source only).
    let a = dir.join("img0.qcow2");
    let args = [
        "convert",
        "-l",
        "third",
        "-O",
        "raw",
        a.to_str().unwrap(),
        a.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    let (vc, vm) = run_in(&dir, VIMG, &args);
    let (qc, qm) = run_in(&dir, "qemu-img", &args);
    assert_eq!((vc, qc), (1, 1), "{vm} / {qm}");
    assert!(checked >= 5 * 3 * 4 * 2, "{checked}");
    let _ = std::fs::remove_dir_all(&dir);
}
