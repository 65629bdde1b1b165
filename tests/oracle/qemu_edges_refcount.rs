//! Refcounts at the largest value their width can hold (issue 13, item 4; qemu-iotests 112).
//!
//! Images are made by qemu-img for every `refcount_bits` (1 to 64); the refcount of the guest's
//! first data cluster is then set to the width's maximum by editing the refcount block bytes
//! (found through the header, the refcount table, the L1 and the L2 table). A command that
//! would give that cluster one more reference (`snapshot -c`, `snapshot -a`) must fail, as
//! qemu-img's does ("Invalid argument"), and leave the file byte for byte as it was; the wrap
//! to 0 of a 64-bit refcount it replaced made `qemu-img check` report `refcount=0
//! reference=2`. Commands that write without adding references (convert -n, commit, rebase,
//! amend) must end as qemu-img's do on an identical copy.

use crate::common;
use crate::common::header_fields;

use common::{qemu_available, qemu_create, qemu_io, run, run_status};
use std::path::{Path, PathBuf};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
const WIDTHS: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vimg-rcmax-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Sets the refcount of the host cluster holding guest cluster 0 to the largest value the
/// image's refcount width holds, editing the refcount block in the file; returns that value.
fn set_first_data_refcount_to_max(path: &Path) -> u64 {
    let mut f = std::fs::read(path).unwrap();
    let cluster_bits = be32(&f, header_fields::CLUSTER_BITS as usize);
    let order = be32(&f, header_fields::REFCOUNT_ORDER as usize);
    let bits = 1u64 << order;
    let mask = 0x00ff_ffff_ffff_fe00u64;
    let l1 = be64(&f, header_fields::L1_TABLE_OFFSET as usize);
    let l2 = (be64(&f, l1 as usize) & mask) as usize;
    let data = be64(&f, l2) & mask;
    assert_ne!(
        data,
        0,
        "{}: guest cluster 0 is not allocated",
        path.display()
    );
    let cluster = data >> cluster_bits;
    let block_bits = cluster_bits + 3 - order;
    let reftable = be64(&f, header_fields::REFCOUNT_TABLE_OFFSET as usize) as usize;
    let block = (be64(&f, reftable + 8 * (cluster >> block_bits) as usize) & !0x1ff) as usize;
    let index = cluster & ((1 << block_bits) - 1);
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    let bit = index * bits;
    if bits < 8 {
        let b = &mut f[block + (bit / 8) as usize];
        *b |= (max as u8) << (bit % 8);
    } else {
        let n = (bits / 8) as usize;
        let at = block + (bit / 8) as usize;
        f[at..at + n].copy_from_slice(&max.to_be_bytes()[8 - n..]);
    }
    std::fs::write(path, f).unwrap();
    max
}

/// `qemu-img check` of `path`: its exit code and the lines naming clusters (errors, leaks).
fn check_findings(path: &Path) -> (i32, Vec<String>) {
    let (code, out) = run_status("qemu-img", &["check", path.to_str().unwrap()]);
    let lines = out
        .lines()
        .filter(|l| l.contains("ERROR") || l.starts_with("Leaked"))
        .map(str::to_string)
        .collect();
    (code, lines)
}

/// An image of `bits`-bit refcounts whose first data cluster has the largest refcount the
/// width holds. With 2 bits or more, a snapshot `s0` (made by qemu-img) shares the cluster
/// first, so that the active L2 entry has no COPIED flag and the raised refcount is only a
/// leak; with 1 bit the cluster's single reference already is the maximum.
fn image_at_max(dir: &Path, bits: u32) -> PathBuf {
    let p = dir.join(format!("rc{bits}.qcow2"));
    qemu_create(
        &p,
        "qcow2",
        &format!("refcount_bits={bits}"),
        None,
        64 << 20,
    );
    qemu_io(&p, "qcow2", &["write -P 0x5a 0 512".into()]);
    if bits > 1 {
        run("qemu-img", &["snapshot", "-c", "s0", p.to_str().unwrap()]);
    }
    set_first_data_refcount_to_max(&p);
    let (code, findings) = check_findings(&p);
    assert!(
        code == 0 || code == 3,
        "{bits} bits: the test image itself is broken: {findings:?}"
    );
    assert!(
        findings.iter().all(|l| !l.contains("ERROR")),
        "{bits} bits: {findings:?}"
    );
    p
}

/// Runs `tool` (vimg or qemu-img) with `args`; returns exit code and output.
fn tool(tool: &str, args: &[&str]) -> (i32, String) {
    run_status(tool, args)
}

#[test]
fn a_new_reference_past_the_refcount_width_is_refused_before_anything_is_written() {
    if !qemu_available("refcount at max") {
        return;
    }
    let dir = tmpdir("refuse");
    let mut failures = Vec::new();
    for bits in WIDTHS {
        let p = image_at_max(&dir, bits);
        let ps = p.to_str().unwrap();
        let before = std::fs::read(&p).unwrap();
        let mut ops: Vec<(&str, Vec<&str>)> =
            vec![("Could not create snapshot 'new'", vec!["-c", "new"])];
        if bits > 1 {
            ops.push(("Could not apply snapshot 's0'", vec!["-a", "s0"]));
        }
        for (want, op) in ops {
            // The oracle: qemu-img refuses too (on a copy: it may leave a leaked cluster).
            let copy = dir.join("oracle.qcow2");
            std::fs::copy(&p, &copy).unwrap();
            let mut args = vec!["snapshot"];
            args.extend(&op);
            let mut qargs = args.clone();
            qargs.push(copy.to_str().unwrap());
            let (qcode, qout) = tool("qemu-img", &qargs);
            if qcode == 0 {
                failures.push(format!("{bits} bits: qemu-img {op:?} succeeded: {qout}"));
            }
            args.push(ps);
            let (code, out) = tool(VIMG, &args);
            if code == 0 {
                failures.push(format!("{bits} bits: vimg snapshot {op:?} succeeded"));
            }
            // qemu-img's words first, right after the program's name.
            if !out.starts_with(&format!("vimg: {want}: Invalid argument")) {
                failures.push(format!("{bits} bits: vimg snapshot {op:?}: {out}"));
            }
            if std::fs::read(&p).unwrap() != before {
                failures.push(format!(
                    "{bits} bits: vimg snapshot {op:?} changed the file"
                ));
                std::fs::write(&p, &before).unwrap();
            }
        }
        let (code, findings) = check_findings(&p);
        if findings.iter().any(|l| l.contains("ERROR")) || !(code == 0 || code == 3) {
            failures.push(format!("{bits} bits: check after vimg: {findings:?}"));
        }
    }
    common::assert_no_failures(&failures);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `op` with vimg on one copy of an image at the maximum and with qemu-img on another;
/// both must exit alike, leave the same `qemu-img check` findings and the same disk.
#[test]
fn commands_that_add_no_reference_end_as_qemu_img_does_at_the_maximum() {
    if !qemu_available("refcount at max, other commands") {
        return;
    }
    let dir = tmpdir("others");
    let src = dir.join("src.raw");
    qemu_create(&src, "raw", "", None, 64 << 20);
    qemu_io(&src, "raw", &["write -P 0x11 0 192k".into()]);
    let srcs = src.to_str().unwrap().to_string();
    let mut failures = Vec::new();
    for bits in [2, 16, 64] {
        type Op = fn(&Path, &str, &str) -> Vec<String>;
        let ops: Vec<(&str, Op)> = vec![
            ("convert -n", |_, img, src| {
                ["convert", "-n", "-f", "raw", "-O", "qcow2", src, img]
                    .map(String::from)
                    .to_vec()
            }),
            ("commit", |dir, img, _| {
                let o = dir.join("overlay.qcow2");
                let _ = std::fs::remove_file(&o);
                qemu_create(&o, "qcow2", "", Some((Path::new(img), "qcow2")), 64 << 20);
                qemu_io(&o, "qcow2", &["write -P 0x22 0 128k".into()]);
                ["commit", o.to_str().unwrap()].map(String::from).to_vec()
            }),
            ("rebase", |dir, img, src| {
                run("qemu-img", &["rebase", "-u", "-b", src, "-F", "raw", img]);
                let nb = dir.join("newbase.qcow2");
                let _ = std::fs::remove_file(&nb);
                qemu_create(&nb, "qcow2", "", None, 64 << 20);
                ["rebase", "-b", nb.to_str().unwrap(), "-F", "qcow2", img]
                    .map(String::from)
                    .to_vec()
            }),
            ("amend refcount_bits=1", |_, img, _| {
                ["amend", "-o", "refcount_bits=1", img]
                    .map(String::from)
                    .to_vec()
            }),
            ("amend lazy_refcounts=on", |_, img, _| {
                ["amend", "-o", "lazy_refcounts=on", img]
                    .map(String::from)
                    .to_vec()
            }),
        ];
        for (what, op) in ops {
            let mut ends = Vec::new();
            for t in [VIMG, "qemu-img"] {
                let sub = dir.join(format!(
                    "{bits}-{}",
                    if t == VIMG { "vimg" } else { "qemu" }
                ));
                let _ = std::fs::remove_dir_all(&sub);
                std::fs::create_dir_all(&sub).unwrap();
                let p = image_at_max(&sub, bits);
                let args = op(&sub, p.to_str().unwrap(), &srcs);
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let (code, out) = tool(t, &a);
                let raw = sub.join("disk.raw");
                run(
                    "qemu-img",
                    &[
                        "convert",
                        "-O",
                        "raw",
                        p.to_str().unwrap(),
                        raw.to_str().unwrap(),
                    ],
                );
                let disk = std::fs::read(&raw).unwrap();
                ends.push((code == 0, check_findings(&p), disk, out));
            }
            let (v, q) = (&ends[0], &ends[1]);
            if v.0 != q.0 || v.1 != q.1 || v.2 != q.2 {
                failures.push(format!(
                    "{bits} bits, {what}: vimg (ok {}, check {:?}, {}) vs qemu-img (ok {}, check {:?}, {}), disks equal: {}",
                    v.0, v.1, v.3.trim(), q.0, q.1, q.3.trim(), v.2 == q.2
                ));
            }
        }
    }
    common::assert_no_failures(&failures);
    let _ = std::fs::remove_dir_all(&dir);
}
