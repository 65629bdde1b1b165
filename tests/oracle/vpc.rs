//! VHD images (`-f vpc`, issue 17) against qemu-img/qemu-io: images qemu-img makes (dynamic and
//! fixed, sizes that are not multiples of the 2 MiB block, `force_size`), filled by qemu-io with
//! seeded random writes and zero runs, read by vimg exactly as qemu reads them (`convert -O raw`
//! byte for byte against `qemu-img convert -f vpc -O raw`, and `vimg compare` against that raw
//! copy); `info --output=json` and `map --output=json` equal to qemu-img's; the disk size taken
//! from the CHS geometry or from `current_size` depending on the creator application, as qemu
//! decides.

use crate::common;

use common::{assert_no_failures, qemu_available, qemu_create, qemu_io, run, run_status, Rng};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The guest disk as qemu reads it, with `-f vpc` (qemu probes a fixed VHD as raw).
fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vpc", "-O", "raw", p(img), p(&out)],
    );
    std::fs::read(&out).unwrap()
}

/// Every comparison of vimg with qemu on `img`; differences are pushed to `failures`.
fn compare_with_qemu(img: &Path, dir: &Path, failures: &mut Vec<String>) {
    let name = img.file_name().unwrap().to_str().unwrap().to_string();
    let theirs = qemu_raw(img, dir);
    let ours_path = dir.join("vimg.raw");
    let _ = std::fs::remove_file(&ours_path);
    let (rc, o) = run_status(
        VIMG,
        &["convert", "-f", "vpc", "-O", "raw", p(img), p(&ours_path)],
    );
    if rc != 0 {
        failures.push(format!("{name}: vimg convert: {o}"));
    } else if std::fs::read(&ours_path).unwrap() != theirs {
        failures.push(format!(
            "{name}: vimg convert -O raw differs from qemu-img's"
        ));
    }
    let (rc, o) = run_status(
        VIMG,
        &[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            p(img),
            p(&dir.join("qemu.raw")),
        ],
    );
    if rc != 0 {
        failures.push(format!(
            "{name}: vimg compare with qemu's raw copy: {rc} {o}"
        ));
    }
    for cmd in [
        vec!["info", "--output=json", "-f", "vpc"],
        vec!["info", "-f", "vpc"],
        vec!["map", "--output=json", "-f", "vpc"],
    ] {
        let mut args = cmd.clone();
        args.push(p(img));
        let q = run("qemu-img", &args);
        let (rc, v) = run_status(VIMG, &args);
        if rc != 0 || v != q {
            failures.push(format!("{name}: {cmd:?}:\nqemu-img:\n{q}\nvimg:\n{v}"));
        }
    }
}

/// Seeded random writes (data and zero runs, any sector alignment) covering `size` bytes.
fn random_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let off = rng.below(size / 512) * 512;
            let len = (1 + rng.below(3 << 11)) * 512;
            let len = len.min(size - off);
            if i % 4 == 3 {
                format!("write -z {off} {len}")
            } else {
                format!("write -P {} {off} {len}", 1 + rng.below(255))
            }
        })
        .collect()
}

#[test]
fn qemu_made_images_read_as_qemu_reads_them() {
    if !qemu_available("vpc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(17);
    for opts in [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=dynamic,force_size=on",
        "subformat=fixed,force_size=on",
    ] {
        for size in [
            1u64 << 20,
            (9 << 20) + 7 * 512,
            (64 << 20) - 4096,
            123_456_789,
        ] {
            let img = dir
                .path()
                .join(format!("{}-{size}.vhd", opts.replace([',', '='], "_")));
            qemu_create(&img, "vpc", opts, None, size);
            // The empty image, then filled.
            compare_with_qemu(&img, dir.path(), &mut failures);
            let vsize: u64 = {
                let v: serde_json::Value = serde_json::from_str(&run(
                    "qemu-img",
                    &["info", "--output=json", "-f", "vpc", p(&img)],
                ))
                .unwrap();
                v["virtual-size"].as_u64().unwrap()
            };
            qemu_io(&img, "vpc", &random_writes(&mut rng, vsize, 12));
            compare_with_qemu(&img, dir.path(), &mut failures);
        }
    }
    assert_no_failures(&failures);
}

/// Rewrites the footer's creator application (and its checksum) at `at`.
fn set_creator(img: &Path, at: u64, app: &[u8; 4]) {
    let mut b = std::fs::read(img).unwrap();
    let f = &mut b[at as usize..at as usize + 512];
    f[28..32].copy_from_slice(app);
    f[64..68].fill(0);
    let sum: u32 = f.iter().map(|&c| u32::from(c)).sum();
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    std::fs::write(img, b).unwrap();
}

#[test]
fn the_disk_size_follows_the_creator_app_as_in_qemu() {
    if !qemu_available("vpc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    // A size the CHS geometry cannot express exactly, recorded exactly with force_size.
    for app in [
        b"vpc ", b"qemu", b"qem2", b"win ", b"d2v ", b"CTXS", b"tap\0", b"xyz ",
    ] {
        for sub in ["fixed", "dynamic"] {
            let img = dir.path().join(format!("{sub}-{}.vhd", app[0]));
            qemu_create(
                &img,
                "vpc",
                &format!("subformat={sub},force_size=on"),
                None,
                123_456_789 / 512 * 512,
            );
            let len = std::fs::metadata(&img).unwrap().len();
            set_creator(&img, len - 512, app);
            if sub == "dynamic" {
                set_creator(&img, 0, app);
            }
            compare_with_qemu(&img, dir.path(), &mut failures);
        }
    }
    assert_no_failures(&failures);
}

/// The bytes of a VHD with what differs between two creations masked: each footer's time
/// stamp, checksum and UUID.
fn masked(img: &Path) -> Vec<u8> {
    let mut b = std::fs::read(img).unwrap();
    let len = b.len();
    for at in [0, len.saturating_sub(512)] {
        if b.len() >= at + 512 && b[at..].starts_with(b"conectix") {
            b[at + 24..at + 28].fill(0);
            b[at + 64..at + 84].fill(0);
        }
    }
    b
}

#[test]
fn vimg_creates_what_qemu_img_creates() {
    if !qemu_available("vpc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let ours = dir.path().join("ours.vhd");
    let theirs = dir.path().join("theirs.vhd");
    for opts in [
        "",
        "subformat=dynamic",
        "subformat=fixed",
        "force_size=on",
        "subformat=fixed,force_size=on",
        "subformat=dynamic,force_size=off",
    ] {
        for size in [
            "0",
            "1000",
            "1M",
            "9437703",
            "123456789",
            "100M",
            "200G",
            "2040G",
        ] {
            if opts.contains("fixed") && size.ends_with('G') {
                continue;
            }
            let mut args = vec!["create", "-f", "vpc"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            let mut a = args.clone();
            a.extend([p(&ours), size]);
            let (rc, v) = run_status(VIMG, &a);
            let mut a = args.clone();
            a.extend([p(&theirs), size]);
            let (qrc, q) = run_status("qemu-img", &a);
            let q = q.replace(p(&theirs), p(&ours));
            if (rc, &v) != (qrc, &q) {
                failures.push(format!(
                    "create {opts} {size}: vimg {rc} {v}; qemu-img {qrc} {q}"
                ));
            } else if qrc == 0 && masked(&ours) != masked(&theirs) {
                failures.push(format!("create {opts} {size}: the files differ"));
            }
        }
    }
    // Refused as qemu-img refuses.
    for (opts, size) in [
        ("subformat=foo", "1M"),
        ("force_size=on", "2041G"),
        ("subformat=dynamic", "2100G"),
    ] {
        let (rc, v) = run_status(VIMG, &["create", "-f", "vpc", "-o", opts, p(&ours), size]);
        let (qrc, q) = run_status(
            "qemu-img",
            &["create", "-f", "vpc", "-o", opts, p(&theirs), size],
        );
        let q = q.replace(p(&theirs), p(&ours));
        let last = |s: &str| s.lines().last().unwrap_or("").replace("qemu-img:", "vimg:");
        if rc == 0 || qrc == 0 || last(&v) != last(&q) {
            failures.push(format!(
                "create {opts} {size}: vimg {rc} {v}; qemu-img {qrc} {q}"
            ));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn vimg_written_images_read_back_in_qemu() {
    if !qemu_available("vpc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(1717);
    for size in [(5u64 << 20) + 3 * 512, 64 << 20, 123_456_000] {
        let src = dir.path().join("src.qcow2");
        qemu_create(&src, "qcow2", "", None, size);
        qemu_io(&src, "qcow2", &random_writes(&mut rng, size, 16));
        let src_raw = dir.path().join("src.raw");
        run("qemu-img", &["convert", "-O", "raw", p(&src), p(&src_raw)]);
        let src_bytes = std::fs::read(&src_raw).unwrap();
        for opts in [
            "subformat=dynamic",
            "subformat=fixed",
            "subformat=fixed,force_size=on",
            "force_size=on",
        ] {
            let out = dir.path().join("out.vhd");
            let _ = std::fs::remove_file(&out);
            let (rc, o) = run_status(
                VIMG,
                &["convert", "-O", "vpc", "-o", opts, p(&src), p(&out)],
            );
            if rc != 0 {
                failures.push(format!("convert -o {opts} ({size}): {o}"));
                continue;
            }
            let back = qemu_raw(&out, dir.path());
            // The disk may be larger (rounded up to its geometry), the rest reads as zeros;
            // with force_size it is exactly the source's size.
            if back.len() < src_bytes.len()
                || back[..src_bytes.len()] != src_bytes[..]
                || back[src_bytes.len()..].iter().any(|&b| b != 0)
            {
                failures.push(format!("convert -o {opts} ({size}): qemu reads other data"));
            }
            if opts.contains("force_size=on") && back.len() as u64 != size.next_multiple_of(512) {
                failures.push(format!(
                    "convert -o {opts} ({size}): size {} not exact",
                    back.len()
                ));
            }
            let (rc, o) = run_status(
                "qemu-img",
                &["compare", "-f", "vpc", "-F", "raw", p(&out), p(&src_raw)],
            );
            if rc != 0 {
                failures.push(format!(
                    "qemu-img compare after convert -o {opts} ({size}): {o}"
                ));
            }
            compare_with_qemu(&out, dir.path(), &mut failures);
            // Writes into the image vimg made, then read back by qemu.
            let again = dir.path().join("again.raw");
            qemu_create(&again, "raw", "", None, back.len() as u64);
            qemu_io(
                &again,
                "raw",
                &random_writes(&mut rng, back.len() as u64, 8),
            );
            let (rc, o) = run_status(
                VIMG,
                &[
                    "convert",
                    "-n",
                    "-f",
                    "raw",
                    "-O",
                    "vpc",
                    p(&again),
                    p(&out),
                ],
            );
            let (qrc, qo) = run_status(
                "qemu-img",
                &["compare", "-f", "vpc", "-F", "raw", p(&out), p(&again)],
            );
            if rc != 0 || qrc != 0 {
                failures.push(format!("convert -n into -o {opts} ({size}): {o} / {qo}"));
            }
        }
    }
    // Writes into an image qemu made.
    let img = dir.path().join("qemu.vhd");
    qemu_create(&img, "vpc", "", None, 20 << 20);
    qemu_io(&img, "vpc", &random_writes(&mut rng, 20 << 20, 6));
    let data = dir.path().join("data.raw");
    let vsize = qemu_raw(&img, dir.path()).len() as u64;
    qemu_create(&data, "raw", "", None, vsize);
    qemu_io(&data, "raw", &random_writes(&mut rng, vsize, 10));
    let (rc, o) = run_status(
        VIMG,
        &["convert", "-n", "-f", "raw", "-O", "vpc", p(&data), p(&img)],
    );
    let (qrc, qo) = run_status(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", p(&img), p(&data)],
    );
    if rc != 0 || qrc != 0 {
        failures.push(format!("convert -n into qemu's image: {o} / {qo}"));
    }
    assert_no_failures(&failures);
}

/// A fixed VHD opened without `-f`: qemu-img probes it as raw (a disk 512 bytes too large,
/// the footer in it); vimg recognises the footer, reads the VHD's disk, and says so once on
/// stderr (never in the JSON on stdout). `-f raw` still gives the file's bytes, and a footer
/// whose size does not match the file is refused, naming both choices.
#[test]
fn fixed_vhd_without_f_is_read_as_vpc_with_a_note() {
    if !qemu_available("vpc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(2);
    for (opts, size) in [
        ("subformat=fixed", 10u64 << 20),
        ("subformat=fixed,force_size=on", 3 << 20),
        ("subformat=fixed", 1000),
    ] {
        let img = dir.path().join("f.vhd");
        let _ = std::fs::remove_file(&img);
        qemu_create(&img, "vpc", opts, None, size);
        let vsize = qemu_raw(&img, dir.path()).len() as u64;
        qemu_io(&img, "vpc", &random_writes(&mut rng, vsize, 5));
        let want = qemu_raw(&img, dir.path());
        let name = format!("{opts} {size}");
        let out = dir.path().join("vimg.raw");
        let _ = std::fs::remove_file(&out);
        let o = std::process::Command::new(VIMG)
            .args(["convert", "-O", "raw", p(&img), p(&out)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() || std::fs::read(&out).unwrap() != want {
            failures.push(format!("{name}: convert without -f: {err}"));
        }
        if err
            .matches("ends with a fixed VHD footer; reading it as vpc")
            .count()
            != 1
            || err.lines().count() != 1
        {
            failures.push(format!("{name}: convert: the note, once: {err:?}"));
        }
        for args in [vec!["info", "--output=json"], vec!["map", "--output=json"]] {
            let mut a = args.clone();
            a.push(p(&img));
            let o = std::process::Command::new(VIMG).args(&a).output().unwrap();
            let mut b = args.clone();
            b.extend(["-f", "vpc", p(&img)]);
            let q = run("qemu-img", &b);
            if String::from_utf8_lossy(&o.stdout) != q {
                failures.push(format!(
                    "{name}: {args:?} without -f differs from qemu-img -f vpc"
                ));
            }
            if !String::from_utf8_lossy(&o.stderr).contains("note:") {
                failures.push(format!("{name}: {args:?}: no note"));
            }
        }
        let (rc, o) = run_status(VIMG, &["compare", p(&img), p(&dir.path().join("qemu.raw"))]);
        if rc != 0 {
            failures.push(format!("{name}: compare: {o}"));
        }
        let (rc, o) = run_status(
            VIMG,
            &["convert", "-f", "raw", "-O", "raw", p(&img), p(&out)],
        );
        if rc != 0
            || std::fs::read(&out).unwrap() != std::fs::read(&img).unwrap()
            || o.contains("note")
        {
            failures.push(format!("{name}: -f raw is not the file's bytes: {o}"));
        }
    }
    // The footer checks out but the file is longer than the disk it describes.
    let img = dir.path().join("long.vhd");
    qemu_create(&img, "vpc", "subformat=fixed", None, 1 << 20);
    let mut b = std::fs::read(&img).unwrap();
    let footer = b.split_off(b.len() - 512);
    b.extend(vec![0u8; 4096]);
    b.extend(footer);
    std::fs::write(&img, b).unwrap();
    let (rc, o) = run_status(VIMG, &["info", p(&img)]);
    if rc == 0 || !o.contains("give -f vpc to read the VHD's disk or -f raw") {
        failures.push(format!("long: {rc} {o}"));
    }
    assert_no_failures(&failures);
}

/// An independent reader, libyal's libvhdi, on the VHDs vimg writes: `vhdiinfo` reports the
/// disk type and size, and `pyvhdi` reads the same disk as the source (dynamic and fixed, with
/// and without `force_size`, the fixed disk Azure takes among them).
#[test]
fn libvhdi_reads_the_vhds_vimg_writes() {
    if !qemu_available("vpc libvhdi") || !crate::vhdx::libvhdi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut failures = Vec::new();
    let mut rng = Rng::seeded(5150);
    for (opts, size, kind) in [
        ("subformat=dynamic", 40 << 20, "Dynamic"),
        ("subformat=fixed", 20 << 20, "Fixed"),
        ("subformat=fixed,force_size=on", 16 << 20, "Fixed"),
        ("force_size=on", (9 << 20) + 512, "Dynamic"),
    ] {
        let src = d.join("src.qcow2");
        let _ = std::fs::remove_file(&src);
        qemu_create(&src, "qcow2", "", None, size);
        qemu_io(&src, "qcow2", &random_writes(&mut rng, size, 12));
        let img = d.join("ours.vhd");
        let _ = std::fs::remove_file(&img);
        let (rc, o) = run_status(
            VIMG,
            &["convert", "-O", "vpc", "-o", opts, p(&src), p(&img)],
        );
        if rc != 0 {
            failures.push(format!("{opts}: vimg convert: {o}"));
            continue;
        }
        let ours = qemu_raw(&img, d);
        let info = run("vhdiinfo", &[p(&img)]);
        let want_size = format!("({} bytes)", ours.len());
        let want_kind = format!("Disk type\t\t: {kind}");
        if !info.contains(&want_size) || !info.contains(&want_kind) {
            failures.push(format!("{opts}: vhdiinfo says:\n{info}"));
        }
        let raw = d.join("pyvhdi.raw");
        let (rc, o) = crate::vhdx::pyvhdi_read(&img, &raw);
        if rc != 0 {
            failures.push(format!("{opts}: pyvhdi: {o}"));
            continue;
        }
        let theirs = std::fs::read(&raw).unwrap();
        let src_raw = d.join("src.raw");
        run(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", p(&src), p(&src_raw)],
        );
        let source = std::fs::read(&src_raw).unwrap();
        if theirs != ours || theirs[..source.len()] != source[..] {
            failures.push(format!("{opts}: pyvhdi reads another disk"));
        }
    }
    assert_no_failures(&failures);
}
