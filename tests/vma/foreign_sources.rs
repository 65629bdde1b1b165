//! `backup create` straight from every image format vimg reads: each registered format that
//! qemu-img creates (vpc, vdi, vmdk, vhdx, qcow2 ...) is filled by qemu-io with a pattern,
//! holes and zeros, backed up into one archive with the others, and the extracted disks equal
//! the images (`qemu-img compare`).

use crate::common::{self, assert_no_failures, run_status};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

#[test]
fn every_format_backs_up_and_restores_equal() {
    if !common::qemu_available("every_format_backs_up_and_restores_equal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut devices = Vec::new();
    for (i, format) in vimg::ImageFormat::all().enumerate() {
        let name = format.as_str();
        if name == "luks" || name == "raw" {
            continue; // need a secret / covered by the round-trip tests
        }
        let img = d.join(format!("disk{i}.{name}"));
        // Not a multiple of any format's block or grain: 5 MiB and 3 sectors.
        let size = (5 << 20) + 1536;
        common::qemu_create(&img, name, "", None, size);
        let p = img.to_str().unwrap();
        let writes = [
            format!("write -P 0x{:02x} 4096 1M", 0x30 + i),
            "write -z 2M 64k".to_string(),
            format!("write -P 0x{:02x} 3M 5000", 0x60 + i),
            format!("write -P 0x{:02x} {} 1536", 0x90 + i, size - 1536),
        ];
        let mut args = vec!["-f", name];
        for w in &writes {
            args.extend(["-c", w.as_str()]);
        }
        args.push(p);
        let (code, out) = run_status("qemu-io", &args);
        assert_eq!(code, 0, "qemu-io on {name}: {out}");
        devices.push((format!("drive-{name}"), name, img));
    }
    assert!(devices.len() >= 3, "too few formats registered");
    let archive = d.join("all.vma");
    let mut args = vec!["backup".to_string(), "create".to_string()];
    for (dev, name, img) in &devices {
        args.push("-d".into());
        args.push(format!("format={name}:{dev}={}", img.display()));
    }
    args.push(archive.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out) = run_status(VIMG, &args);
    assert_eq!(code, 0, "backup create: {out}");
    let ex = d.join("ex");
    let (code, out) = run_status(
        VIMG,
        &[
            "backup",
            "extract",
            archive.to_str().unwrap(),
            ex.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "backup extract: {out}");
    let mut failures = Vec::new();
    for (dev, name, img) in &devices {
        let raw = ex.join(format!("disk-{dev}.raw"));
        let (code, out) = run_status(
            "qemu-img",
            &[
                "compare",
                "-f",
                name,
                "-F",
                "raw",
                img.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        if code != 0 {
            failures.push(format!("{name}: {out}"));
        }
    }
    assert_no_failures(&failures);
}
