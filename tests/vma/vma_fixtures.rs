//! Archives vimg did not write: `test-images/vma-python.vma` (and its `.gz`) come from
//! `test-images/make-vma-fixtures.py`, a VMA writer of its own made from the reference notes
//! (clusters shuffled across devices, 59-entry extents, partial masks, a VM state stream).
//! vimg must list them as the manifest says, verify them, and restore every byte.

use crate::common;

use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;

fn vimg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vimg"))
        .env("TZ", "UTC")
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = vimg(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn sha(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn archives_from_an_independent_writer_restore_exactly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-images");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("vma-python.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let qemu = common::qemu_available("archives_from_an_independent_writer_restore_exactly");
    for name in ["vma-python.vma", "vma-python.vma.gz"] {
        let a = root.join(name);
        let a = a.to_str().unwrap();
        assert_eq!(
            ok(&["backup", "list", a]),
            manifest["list_utc"].as_str().unwrap(),
            "{name}"
        );
        ok(&["backup", "verify", a]);
        let out = dir.path().join(format!("{name}.raw"));
        ok(&["backup", "extract", a, out.to_str().unwrap()]);
        for (dev, want) in manifest["devices"].as_object().unwrap() {
            let file = if dev == "vmstate" {
                "vmstate.bin".to_string()
            } else {
                format!("disk-{dev}.raw")
            };
            let p = out.join(&file);
            assert_eq!(
                std::fs::metadata(&p).unwrap().len(),
                want["size"].as_u64().unwrap(),
                "{name}: {file}"
            );
            assert_eq!(sha(&p), want["sha256"].as_str().unwrap(), "{name}: {file}");
        }
        for (cfg, want) in manifest["configs"].as_object().unwrap() {
            assert_eq!(sha(&out.join(cfg)), want.as_str().unwrap(), "{name}: {cfg}");
            let printed = vimg(&["backup", "config", "-c", cfg, a]).stdout;
            assert_eq!(hex::encode(Sha256::digest(printed)), want.as_str().unwrap());
        }
        if qemu {
            let outq = dir.path().join(format!("{name}.qcow2"));
            ok(&[
                "backup",
                "extract",
                "-O",
                "qcow2",
                a,
                outq.to_str().unwrap(),
            ]);
            for dev in [
                "drive-scsi0",
                "drive-virtio1",
                "drive-efidisk0",
                "drive-sata2",
            ] {
                let q = outq.join(format!("disk-{dev}.qcow2"));
                let r = out.join(format!("disk-{dev}.raw"));
                common::run("qemu-img", &["check", "-q", q.to_str().unwrap()]);
                common::run(
                    "qemu-img",
                    &[
                        "compare",
                        "-q",
                        "-F",
                        "raw",
                        q.to_str().unwrap(),
                        r.to_str().unwrap(),
                    ],
                );
            }
        }
    }
}
