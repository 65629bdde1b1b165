//! OVA appliances read in place (issue 17): tar archives made by Python's tarfile (ustar, pax,
//! GNU) and by GNU tar, holding an OVF descriptor the test writes and disks qemu-img made
//! (qcow2 and raw), are read by vimg as qemu-img reads the disk files themselves: `info`
//! (format, virtual size; the disk named by its `ova:` locator), `map --output=json`, `convert`
//! (checked by `qemu-img compare` against the disk file) and `compare`. An appliance with
//! several disks is refused with their list until one is named (`ova:PATH,disk=NAME`, by file
//! or by disk id); writing into an appliance is refused and changes nothing; `-f raw` reads the
//! archive's bytes.

use crate::common;

use common::{assert_no_failures, qemu_available, qemu_create, qemu_io, run, run_status};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// An OVF descriptor declaring `disks` (file name, disk id, capacity in bytes).
pub fn ovf(disks: &[(&str, &str, u64)]) -> String {
    let refs: String = disks
        .iter()
        .enumerate()
        .map(|(i, (f, _, _))| format!("    <File ovf:href=\"{f}\" ovf:id=\"file{i}\"/>\n"))
        .collect();
    let ds: String = disks
        .iter()
        .enumerate()
        .map(|(i, (_, id, cap))| {
            format!(
                "    <Disk ovf:capacity=\"{cap}\" ovf:capacityAllocationUnits=\"byte\" ovf:diskId=\"{id}\" ovf:fileRef=\"file{i}\"/>\n"
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\" xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\">\n  <References>\n{refs}  </References>\n  <DiskSection>\n    <Info>Virtual disk information</Info>\n{ds}  </DiskSection>\n</Envelope>\n"
    )
}

/// Makes `out` from the files of `dir` named in `members` (the OVF first), with Python's
/// tarfile in `format` (`ustar`, `pax`, `gnu`) or with GNU tar (`gnutar`).
pub fn make_tar(out: &Path, dir: &Path, members: &[&str], format: &str) {
    if format == "gnutar" {
        let mut args = vec!["-C", p(dir), "-cf", p(out)];
        args.extend(members);
        run("tar", &args);
        return;
    }
    let script = format!(
        "import tarfile,sys\nwith tarfile.open(sys.argv[1],'w',format=tarfile.{}_FORMAT) as t:\n    for n in sys.argv[3:]:\n        t.add(sys.argv[2]+'/'+n, arcname=n)\n",
        format.to_uppercase()
    );
    let mut args = vec!["-c", script.as_str(), p(out), p(dir)];
    args.extend(members);
    run("python3", &args);
}

#[test]
fn disks_inside_appliances_read_as_qemu_reads_the_files() {
    if !qemu_available("ova") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut failures = Vec::new();
    let q = d.join("disk1.qcow2");
    qemu_create(&q, "qcow2", "", None, 9 << 20);
    qemu_io(
        &q,
        "qcow2",
        &["write -P 7 1M 200k".into(), "write -P 9 8M 64k".into()],
    );
    let r = d.join("disk2.img");
    qemu_create(&r, "raw", "", None, 3 << 20);
    qemu_io(&r, "raw", &["write -P 5 4k 100k".into()]);
    std::fs::write(
        d.join("vm.ovf"),
        ovf(&[("disk1.qcow2", "vmdisk1", 9 << 20)]),
    )
    .unwrap();
    std::fs::write(
        d.join("two.ovf"),
        ovf(&[
            ("disk1.qcow2", "vmdisk1", 9 << 20),
            ("disk2.img", "vmdisk2", 3 << 20),
        ]),
    )
    .unwrap();
    for format in ["ustar", "pax", "gnu", "gnutar"] {
        let one = d.join(format!("one-{format}.ova"));
        make_tar(&one, d, &["vm.ovf", "disk1.qcow2"], format);
        let name = format!("{format}: one disk");
        let out = d.join("out.qcow2");
        let _ = std::fs::remove_file(&out);
        let (rc, o) = run_status(VIMG, &["convert", "-O", "qcow2", p(&one), p(&out)]);
        let (qrc, qo) = run_status("qemu-img", &["compare", p(&out), p(&q)]);
        if rc != 0 || qrc != 0 {
            failures.push(format!("{name}: convert: {o} / {qo}"));
        }
        let (rc, o) = run_status(VIMG, &["compare", p(&one), p(&q)]);
        if rc != 0 {
            failures.push(format!("{name}: compare: {o}"));
        }
        let map = run(VIMG, &["map", "--output=json", p(&one)]);
        if map != run("qemu-img", &["map", "--output=json", p(&q)]) {
            failures.push(format!("{name}: map differs from qemu-img's of the disk"));
        }
        let info = run(VIMG, &["info", "--output=json", p(&one)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        let want = format!("ova:{},disk=disk1.qcow2", p(&one));
        if v["format"] != "qcow2" || v["virtual-size"] != 9 << 20 || v["filename"] != want.as_str()
        {
            failures.push(format!("{name}: info: {info}"));
        }
        // Several disks: listed until one is named, by file or by id.
        let two = d.join(format!("two-{format}.ova"));
        make_tar(&two, d, &["two.ovf", "disk1.qcow2", "disk2.img"], format);
        let (rc, o) = run_status(VIMG, &["info", p(&two)]);
        let named = format!("ova:{},disk=", p(&two));
        if rc == 0
            || o.lines().count() != 1
            || !o.contains("disk1.qcow2 (vmdisk1), disk2.img (vmdisk2)")
            || !o.contains(&named)
        {
            failures.push(format!("{name}: two disks without a name: {rc} {o}"));
        }
        for pick in ["disk2.img", "vmdisk2"] {
            let loc = format!("{named}{pick}");
            let raw = d.join("out.raw");
            let (rc, o) = run_status(VIMG, &["convert", "-O", "raw", &loc, p(&raw)]);
            if rc != 0 || std::fs::read(&raw).unwrap() != std::fs::read(&r).unwrap() {
                failures.push(format!("{name}: {loc}: {o}"));
            }
        }
        // Nothing writes into an appliance.
        let before = std::fs::read(&two).unwrap();
        for args in [
            vec![
                "convert",
                "-n",
                "-O",
                "raw",
                p(&r),
                &format!("{named}disk2.img"),
            ],
            vec!["resize", &format!("{named}disk2.img"), "4M"],
            vec!["create", "-f", "raw", &format!("{named}disk2.img"), "1M"],
        ] {
            let (rc, o) = run_status(VIMG, &args);
            if rc == 0 || !o.contains("read-only") {
                failures.push(format!("{name}: {args:?}: {rc} {o}"));
            }
        }
        if std::fs::read(&two).unwrap() != before {
            failures.push(format!("{name}: the appliance changed"));
        }
        // -f raw: the archive's own bytes.
        let (rc, o) = run_status(
            VIMG,
            &["compare", "-f", "raw", "-F", "raw", p(&one), p(&one)],
        );
        let info = run(VIMG, &["info", "--output=json", "-f", "raw", p(&one)]);
        if rc != 0 || !info.contains(&format!("\"virtual-size\": {}", before_len(&one))) {
            failures.push(format!("{name}: -f raw: {o} {info}"));
        }
    }
    // A tar whose first member is not an OVF descriptor is no appliance: raw, as in qemu.
    let plain = d.join("plain.tar");
    make_tar(&plain, d, &["disk2.img", "vm.ovf"], "ustar");
    let v = run(VIMG, &["info", "--output=json", p(&plain)]);
    let q = run("qemu-img", &["info", "--output=json", p(&plain)]);
    let fmt = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["format"].clone();
    if fmt(&v) != fmt(&q) {
        failures.push(format!("plain tar: vimg {v} qemu {q}"));
    }
    assert_no_failures(&failures);
}

fn before_len(f: &Path) -> u64 {
    std::fs::metadata(f).unwrap().len()
}

/// The case: an appliance as VMware and VirtualBox export them, a streamOptimized vmdk
/// made by qemu-img (filled by qemu-io: data, zeros, a hole) behind its OVF, converted straight
/// from the .ova (no unpacking) equals the disk inside (`qemu-img compare` against the vmdk),
/// and `info` names the disk and its format.
#[test]
fn stream_optimized_vmdk_inside_an_ova_converts_to_the_disk() {
    if !qemu_available("ova vmdk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // qemu-io cannot write a stream-optimized disk in place: fill a raw one and convert it.
    let raw = d.join("src.img");
    let size = (7 << 20) + 4096;
    qemu_create(&raw, "raw", "", None, size);
    qemu_io(
        &raw,
        "raw",
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 3M 333k".into(),
            format!("write -P 0x33 {} 4096", size - 4096),
        ],
    );
    let vmdk = d.join("vm-disk1.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&raw),
            p(&vmdk),
        ],
    );
    std::fs::write(d.join("vm.ovf"), ovf(&[("vm-disk1.vmdk", "vmdisk1", size)])).unwrap();
    let ova = d.join("vm.ova");
    make_tar(&ova, d, &["vm.ovf", "vm-disk1.vmdk"], "ustar");

    let info: serde_json::Value =
        serde_json::from_str(&run(VIMG, &["info", "--output", "json", p(&ova)])).unwrap();
    assert_eq!(info["format"], "vmdk", "{info}");
    assert_eq!(info["virtual-size"], size, "{info}");
    let out = d.join("out.qcow2");
    run(VIMG, &["convert", "-O", "qcow2", p(&ova), p(&out)]);
    let (code, msg) = run_status(
        "qemu-img",
        &["compare", "-f", "vmdk", "-F", "qcow2", p(&vmdk), p(&out)],
    );
    assert_eq!(code, 0, "{msg}");
    let (code, msg) = run_status(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", p(&raw), p(&out)],
    );
    assert_eq!(code, 0, "{msg}");
    let (code, msg) = run_status("qemu-img", &["check", p(&out)]);
    assert_eq!(code, 0, "{msg}");
}
