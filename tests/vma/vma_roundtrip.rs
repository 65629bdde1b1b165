//! `vimg backup` round trips: random images (raw, qcow2 of several cluster sizes, a backing
//! chain; holes, zero writes, explicit zero data, odd sizes) are archived and restored, as raw
//! files and straight into qcow2, and must come back byte for byte. qemu-img is the oracle for
//! the sources' contents, compares and checks the restored qcow2 images; PyPI's
//! `dissect.archive` is an independent reader of every archive vimg writes. Archives written
//! in shuffled cluster order (through the library writer), 254 devices in one archive,
//! compressed and streamed archives, and the `list`/`config` output are covered too.

use crate::common;

use common::{
    dissect_available, dissect_read, qemu_available, qemu_contents, qemu_create, qemu_io, Rng,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use vimg::vma::format::{ArchiveHeader, CLUSTER_SIZE};
use vimg::vma::VmaWriter;

fn vimg<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vimg"))
        .args(args)
        .output()
        .expect("run vimg")
}

/// Runs vimg, failing the test with its stderr unless it succeeds; returns stdout.
fn vimg_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = vimg(args);
    assert!(
        out.status.success(),
        "vimg {:?} failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Random qemu-io writes over a disk of `size` bytes: patterned data, zero writes and
/// explicit zero data, 512-byte aligned, some crossing cluster boundaries.
fn random_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..n {
        let sectors = size / 512;
        let off = rng.below(sectors) * 512;
        let len = ((rng.below(300) + 1) * 512).min(size - off);
        let cmd = match rng.below(5) {
            0 => format!("write -z {off} {len}"),
            1 => format!("write -P 0 {off} {len}"),
            _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
        };
        cmds.push(cmd);
    }
    cmds
}

/// Non-zero 4 KiB blocks and 64 KiB clusters of `data`.
fn nonzero_units(data: &[u8]) -> (u64, u64) {
    let nz = |unit: usize| {
        data.chunks(unit)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count() as u64
    };
    (nz(4096), nz(65536))
}

/// Bytes the host file system allocated for `path`.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Bytes `qemu-img map` reports as data in a qcow2 image.
fn qcow2_data_bytes(path: &Path) -> u64 {
    let out = common::run("qemu-img", &["map", "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// The guest contents a source image must come back as: qemu's reading of it, padded with
/// zeros to the device size (its size rounded up to 512).
fn expected(path: &Path, dir: &Path) -> Vec<u8> {
    let mut v = qemu_contents(path, dir);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

/// Checks that dissect.archive reads `archive` as holding `configs` and `devices`.
fn dissect_agrees(
    archive: &Path,
    dir: &Path,
    configs: &[(String, Vec<u8>)],
    devices: &[(String, Vec<u8>)],
) {
    let view = dissect_read(archive, dir);
    let mut want = configs.to_vec();
    want.sort();
    assert!(view.configs == want, "dissect.archive reads other configs");
    assert_eq!(
        view.devices.len(),
        devices.len(),
        "dissect.archive device count"
    );
    for ((id, name, data), (wname, wdata)) in view.devices.iter().zip(devices) {
        assert_eq!(name, wname, "device {id}");
        assert!(
            data == wdata,
            "dissect.archive reads other bytes for device {name}"
        );
    }
}

#[test]
fn images_round_trip_through_archives_raw_and_qcow2() {
    if !qemu_available("images_round_trip_through_archives_raw_and_qcow2") {
        return;
    }
    let with_dissect = dissect_available("images_round_trip_through_archives_raw_and_qcow2");
    for seed in [1u64, 0x5eed] {
        let mut rng = Rng::seeded(seed);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // (device name, file, format, size, qemu-img create options)
        let mut sources: Vec<(String, PathBuf, &str)> = Vec::new();
        let odd = |rng: &mut Rng| (rng.below(40) + 1) * CLUSTER_SIZE + rng.below(128) * 512;
        let layouts: [(&str, &str, &str); 4] = [
            ("drive-scsi0", "raw", ""),
            ("drive-scsi1", "qcow2", ""),
            ("drive-virtio2", "qcow2", "cluster_size=4096"),
            ("drive-sata3", "qcow2", "cluster_size=2M,extended_l2=on"),
        ];
        for (name, fmt, opts) in layouts {
            let size = odd(&mut rng);
            let p = d.join(format!("{name}.{fmt}"));
            qemu_create(&p, fmt, opts, None, size);
            let n = 6 + rng.below(10) as usize;
            qemu_io(&p, fmt, &random_writes(&mut rng, size, n));
            sources.push((name.to_string(), p, fmt));
        }
        // A chain: qcow2 overlay over a raw base, backed up as what the overlay reads.
        let base = d.join("base.raw");
        let size = odd(&mut rng);
        qemu_create(&base, "raw", "", None, size);
        qemu_io(&base, "raw", &random_writes(&mut rng, size, 8));
        let top = d.join("top.qcow2");
        qemu_create(&top, "qcow2", "", Some((&base, "raw")), size);
        qemu_io(&top, "qcow2", &random_writes(&mut rng, size, 8));
        sources.push(("drive-scsi4".into(), top, "qcow2"));

        let conf = d.join("qemu-server.conf");
        std::fs::write(&conf, b"boot: order=scsi0\ncores: 2\nmemory: 2048\n").unwrap();
        let fw = d.join("qemu-server.fw");
        std::fs::write(&fw, b"[OPTIONS]\nenable: 1\n").unwrap();
        let archive = d.join("vzdump-qemu-100.vma");
        let mut args: Vec<String> = vec!["backup".into(), "create".into()];
        for c in [&conf, &fw] {
            args.extend(["-c".into(), s(c).into()]);
        }
        for (name, p, fmt) in &sources {
            args.extend(["-d".into(), format!("format={fmt}:{name}={}", s(p))]);
        }
        args.push(s(&archive).into());
        vimg_ok(&args);
        vimg_ok(&["backup", "verify", s(&archive)]);

        let want: Vec<(String, Vec<u8>)> = sources
            .iter()
            .map(|(n, p, _)| (n.clone(), expected(p, d)))
            .collect();
        let configs = vec![
            (
                "qemu-server.conf".to_string(),
                std::fs::read(&conf).unwrap(),
            ),
            ("qemu-server.fw".to_string(), std::fs::read(&fw).unwrap()),
        ];

        // Raw restore: every byte, configs beside, zero blocks left as holes.
        let out = d.join("restore-raw");
        vimg_ok(&["backup", "extract", s(&archive), s(&out)]);
        for (name, data) in &configs {
            assert!(
                std::fs::read(out.join(name)).unwrap() == *data,
                "config {name}"
            );
        }
        for (name, bytes) in &want {
            let p = out.join(format!("disk-{name}.raw"));
            let got = std::fs::read(&p).unwrap();
            assert_eq!(got.len(), bytes.len(), "seed {seed}: size of {name}");
            assert!(got == *bytes, "seed {seed}: contents of {name} differ");
            let (blocks, _) = nonzero_units(bytes);
            assert!(
                allocated(&p) <= blocks * 4096 + 65536,
                "seed {seed}: {name} restored with {} bytes allocated for {blocks} data blocks",
                allocated(&p)
            );
        }

        // qcow2 restore: identical to the source for qemu, clean, zero clusters unallocated.
        let outq = d.join("restore-qcow2");
        vimg_ok(&["backup", "extract", "-O", "qcow2", s(&archive), s(&outq)]);
        for ((name, src, _), (_, bytes)) in sources.iter().zip(&want) {
            let p = outq.join(format!("disk-{name}.qcow2"));
            common::run("qemu-img", &["check", "-q", s(&p)]);
            common::run("qemu-img", &["compare", "-q", s(src), s(&p)]);
            let (_, clusters) = nonzero_units(bytes);
            let data = qcow2_data_bytes(&p);
            assert!(
                data <= clusters * 65536,
                "seed {seed}: {name}: {data} bytes allocated for {clusters} non-zero clusters"
            );
        }
        let outo = d.join("restore-qcow2-opts");
        vimg_ok(&[
            "backup",
            "extract",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=16k,compat=0.10",
            s(&archive),
            s(&outo),
        ]);
        let p = outo.join("disk-drive-scsi1.qcow2");
        common::run("qemu-img", &["check", "-q", s(&p)]);
        common::run("qemu-img", &["compare", "-q", s(&sources[1].1), s(&p)]);
        let info = common::run("qemu-img", &["info", s(&p)]);
        assert!(
            info.contains("cluster_size: 16384") && info.contains("compat: 0.10"),
            "{info}"
        );

        if with_dissect {
            dissect_agrees(&archive, d, &configs, &want);
        }
    }
}

/// Device contents for the library tests: random data, zero blocks and zero clusters, sizes
/// that are multiples of 512 but rarely of 64 KiB.
fn random_device(rng: &mut Rng, max_clusters: u64) -> Vec<u8> {
    let size = (rng.below(max_clusters * 128) + 1) * 512;
    let mut v = vec![0u8; size as usize];
    for block in v.chunks_mut(4096) {
        match rng.below(4) {
            0 | 1 => {}
            2 => block.fill(rng.below(255) as u8 + 1),
            _ => block.iter_mut().for_each(|b| *b = rng.next() as u8),
        }
    }
    v
}

/// Writes an archive of `devices` through the library, clusters in a random order across
/// all devices.
fn shuffled_archive(
    path: &Path,
    devices: &[(String, Vec<u8>)],
    configs: &[(String, Vec<u8>)],
    rng: &mut Rng,
) {
    let mut h = vimg::vma::new_header().unwrap();
    for (n, c) in configs {
        h.add_config(n, c.clone()).unwrap();
    }
    let mut order = Vec::new();
    for (name, data) in devices {
        let id = h.add_device(name, data.len() as u64).unwrap();
        for c in 0..(data.len() as u64).div_ceil(CLUSTER_SIZE) {
            order.push((id, c));
        }
    }
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let file = std::fs::File::create(path).unwrap();
    let mut w = VmaWriter::new(file, h, false).unwrap();
    for (id, c) in order {
        let data = &devices[id as usize - 1].1;
        let from = (c * CLUSTER_SIZE) as usize;
        let to = (from + CLUSTER_SIZE as usize).min(data.len());
        w.write_cluster(id, c as u32, &data[from..to]).unwrap();
    }
    w.finish().unwrap();
}

/// Verifies `archive`, extracts it into `dir/out` as raw files and checks every device's
/// bytes; returns the output directory.
fn verify_and_extract(archive: &Path, dir: &Path, devices: &[(String, Vec<u8>)]) -> PathBuf {
    vimg_ok(&["backup", "verify", s(archive)]);
    let out = dir.join("out");
    vimg_ok(&["backup", "extract", s(archive), s(&out)]);
    for (name, data) in devices {
        let got = std::fs::read(out.join(format!("disk-{name}.raw"))).unwrap();
        assert!(got == *data, "{}: {name} differs", archive.display());
    }
    out
}

#[test]
fn shuffled_archives_restore_exactly() {
    let with_dissect = dissect_available("shuffled_archives_restore_exactly");
    for seed in [3u64, 4, 5] {
        let mut rng = Rng::seeded(seed);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let devices: Vec<(String, Vec<u8>)> = (0..4)
            .map(|i| (format!("drive-scsi{i}"), random_device(&mut rng, 24)))
            .collect();
        let configs = vec![("qemu-server.conf".to_string(), b"cores: 4\n".to_vec())];
        let archive = d.join("shuffled.vma");
        shuffled_archive(&archive, &devices, &configs, &mut rng);
        let out = verify_and_extract(&archive, d, &devices);
        if qemu_available("shuffled_archives_restore_exactly") {
            let outq = d.join("outq");
            vimg_ok(&["backup", "extract", "-O", "qcow2", s(&archive), s(&outq)]);
            for (name, _) in &devices {
                let q = outq.join(format!("disk-{name}.qcow2"));
                let r = out.join(format!("disk-{name}.raw"));
                common::run("qemu-img", &["check", "-q", s(&q)]);
                common::run("qemu-img", &["compare", "-q", "-F", "raw", s(&q), s(&r)]);
            }
        }
        if with_dissect {
            dissect_agrees(&archive, d, &configs, &devices);
        }
    }
}

#[test]
fn two_hundred_fifty_four_devices_in_one_archive() {
    let mut rng = Rng::seeded(254);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args: Vec<String> = vec!["backup".into(), "create".into()];
    let mut devices = Vec::new();
    for i in 0..254 {
        let size = (rng.below(40) + 1) * 512;
        let mut data = vec![0u8; size as usize];
        if i % 3 != 0 {
            for b in data.iter_mut().take(rng.below(size) as usize) {
                *b = rng.next() as u8;
            }
        }
        let p = d.join(format!("d{i}.raw"));
        std::fs::write(&p, &data).unwrap();
        let name = format!("drive-{i}");
        args.extend(["-d".into(), format!("format=raw:{name}={}", s(&p))]);
        devices.push((name, data));
    }
    let archive = d.join("many.vma");
    args.push(s(&archive).into());
    vimg_ok(&args);
    let list = vimg_ok(&["backup", "list", s(&archive)]);
    assert_eq!(list.lines().filter(|l| l.starts_with("DEV: ")).count(), 254);
    assert!(list.contains("DEV: dev_id=254 size: "), "{list}");
    verify_and_extract(&archive, d, &devices);
    if dissect_available("two_hundred_fifty_four_devices_in_one_archive") {
        dissect_agrees(&archive, d, &[], &devices);
    }
    // A 255th device does not fit.
    let p = d.join("one-more.raw");
    std::fs::write(&p, [1u8; 512]).unwrap();
    let last = args.pop().unwrap();
    args.extend(["-d".into(), format!("drive-254={}", s(&p)), last + ".2"]);
    let out = vimg(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 254"), "{err}");
    assert!(!Path::new(&args[args.len() - 1]).exists());
}

#[test]
fn compressed_and_streamed_archives() {
    let mut rng = Rng::seeded(77);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = random_device(&mut rng, 20);
    let img = d.join("disk.raw");
    std::fs::write(&img, &data).unwrap();
    let dev = format!("drive-scsi0={}", s(&img));
    let plain = d.join("plain.vma");
    vimg_ok(&["backup", "create", "-d", &dev, s(&plain)]);
    let plain_list = vimg_ok(&["backup", "list", s(&plain)]);
    for (comp, magic) in [
        ("zstd", &[0x28u8, 0xb5, 0x2f, 0xfd][..]),
        ("gzip", &[0x1f, 0x8b][..]),
    ] {
        let a = d.join(format!("a.vma.{comp}"));
        vimg_ok(&["backup", "create", "--compress", comp, "-d", &dev, s(&a)]);
        assert!(
            std::fs::read(&a).unwrap().starts_with(magic),
            "{comp} magic"
        );
        vimg_ok(&["backup", "verify", s(&a)]);
        let list = vimg_ok(&["backup", "list", s(&a)]);
        assert_eq!(list.lines().next(), plain_list.lines().next());
        // From a file and from standard input.
        let out = d.join(format!("out-{comp}"));
        vimg_ok(&["backup", "extract", s(&a), s(&out)]);
        assert!(std::fs::read(out.join("disk-drive-scsi0.raw")).unwrap() == data);
        let out2 = d.join(format!("out-{comp}-stdin"));
        let status = Command::new(env!("CARGO_BIN_EXE_vimg"))
            .args(["backup", "extract", "-", s(&out2)])
            .stdin(std::fs::File::open(&a).unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        assert!(std::fs::read(out2.join("disk-drive-scsi0.raw")).unwrap() == data);
    }
    // To standard output, then back in through a pipe.
    let streamed = d.join("streamed.vma");
    let status = Command::new(env!("CARGO_BIN_EXE_vimg"))
        .args(["backup", "create", "-d", &dev, "-"])
        .stdout(std::fs::File::create(&streamed).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&streamed).unwrap().starts_with(b"VMA\0"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vimg"))
        .args(["backup", "verify", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&std::fs::read(&streamed).unwrap()).unwrap();
    }
    assert!(child.wait().unwrap().success());
}

#[test]
fn list_and_config_print_what_vma_prints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.raw");
    std::fs::write(&img, vec![5u8; 70000]).unwrap();
    let conf = d.join("qemu-server.conf");
    std::fs::write(&conf, b"name: vm100\nmemory: 1024\n").unwrap();
    let other = d.join("sub");
    std::fs::create_dir(&other).unwrap();
    let fw = other.join("qemu-server.fw");
    std::fs::write(&fw, b"[OPTIONS]\n").unwrap();
    let archive = d.join("a.vma");
    vimg_ok(&[
        "backup",
        "create",
        "-c",
        s(&conf),
        "-c",
        s(&fw),
        "-d",
        &format!("drive-scsi0={}", s(&img)),
        "-d",
        &format!("format=raw:drive-efidisk0={}", s(&img)),
        s(&archive),
    ]);
    let bytes = std::fs::read(&archive).unwrap();
    let ctime = i64::from_be_bytes(bytes[24..32].try_into().unwrap());
    let date = Command::new("date")
        .env("TZ", "UTC")
        .args(["-d", &format!("@{ctime}"), "+%a %b %e %H:%M:%S %Y"])
        .output()
        .unwrap();
    let when = String::from_utf8(date.stdout).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vimg"))
        .env("TZ", "UTC")
        .args(["backup", "list", s(&archive)])
        .output()
        .unwrap();
    assert!(out.status.success());
    // The raw image's size is rounded up to 512, as Proxmox requires.
    let expect = format!(
        "CFG: size: 25 name: qemu-server.conf\nCFG: size: 10 name: qemu-server.fw\n\
         DEV: dev_id=1 size: 70144 devname: drive-scsi0\n\
         DEV: dev_id=2 size: 70144 devname: drive-efidisk0\nCTIME: {when}"
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expect);
    assert_eq!(
        vimg_ok(&["backup", "config", s(&archive)]),
        "name: vm100\nmemory: 1024\n"
    );
    assert_eq!(
        vimg_ok(&["backup", "config", "-c", "qemu-server.fw", s(&archive)]),
        "[OPTIONS]\n"
    );
    let out = vimg(&["backup", "config", "-c", "nope.conf", s(&archive)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unable to find configuration data 'nope.conf'"),
        "{err}"
    );
    let parsed = ArchiveHeader::parse(&bytes[..12800]).unwrap();
    assert_eq!(parsed.devices.len(), 2);
}

#[test]
fn extract_selects_devices_and_refuses_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a_img = d.join("a.raw");
    std::fs::write(&a_img, vec![1u8; 4096]).unwrap();
    let b_img = d.join("b.raw");
    std::fs::write(&b_img, vec![2u8; 8192]).unwrap();
    let archive = d.join("x.vma");
    vimg_ok(&[
        "backup",
        "create",
        "-d",
        &format!("drive-a={}", s(&a_img)),
        "-d",
        &format!("drive-b={}", s(&b_img)),
        s(&archive),
    ]);
    let out = d.join("only-b");
    let printed = vimg_ok(&["backup", "extract", "-d", "drive-b", s(&archive), s(&out)]);
    assert_eq!(
        printed,
        format!("DEVINFO {} 8192\n", s(&out.join("disk-drive-b.raw")))
    );
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["disk-drive-b.raw".to_string()]);

    let refused = |args: &[&str], what: &str| {
        let o = vimg(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    };
    let fresh = d.join("fresh");
    refused(
        &["backup", "extract", "-d", "drive-z", s(&archive), s(&fresh)],
        "no device named 'drive-z'",
    );
    assert!(!fresh.exists());
    refused(
        &["backup", "extract", s(&archive), s(&out)],
        "already exists",
    );
    refused(
        &[
            "backup",
            "extract",
            "-O",
            "qcow2",
            "-o",
            "backing_file=x.raw",
            s(&archive),
            s(&fresh),
        ],
        "backing file",
    );
    refused(
        &[
            "backup",
            "extract",
            "-o",
            "cluster_size=4k",
            s(&archive),
            s(&fresh),
        ],
        "-O qcow2",
    );
    refused(
        &[
            "backup",
            "extract",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            s(&archive),
            s(&fresh),
        ],
        "Cluster size must be a power of two",
    );
    assert!(!fresh.exists());
    refused(
        &[
            "backup",
            "create",
            "-d",
            &format!("drive-a={}", s(&a_img)),
            s(&archive),
        ],
        "already exists",
    );
    let new = d.join("new.vma");
    refused(
        &["backup", "create", "-d", "drive-a", s(&new)],
        "DEVNAME=PATH",
    );
    refused(
        &[
            "backup",
            "create",
            "-d",
            &format!("vmstate={}", s(&a_img)),
            s(&new),
        ],
        "reserved",
    );
    refused(
        &[
            "backup",
            "create",
            "-d",
            &format!("format=qed:a={}", s(&a_img)),
            s(&new),
        ],
        "qed",
    );
    refused(
        &[
            "backup",
            "create",
            "-d",
            &format!("a={}", s(&a_img)),
            "-d",
            &format!("a={}", s(&b_img)),
            s(&new),
        ],
        "given twice",
    );
    let big = d.join("big.conf");
    std::fs::write(&big, vec![b'x'; 70000]).unwrap();
    refused(
        &[
            "backup",
            "create",
            "-c",
            s(&big),
            "-d",
            &format!("a={}", s(&a_img)),
            s(&new),
        ],
        "65535",
    );
    assert!(!new.exists());
    // A diskless archive: configs only.
    let conf = d.join("qemu-server.conf");
    std::fs::write(&conf, b"x\n").unwrap();
    vimg_ok(&["backup", "create", "-c", s(&conf), s(&new)]);
    assert_eq!(std::fs::metadata(&new).unwrap().len(), 12288 + 512 + 512);
    vimg_ok(&["backup", "verify", s(&new)]);
    let out = d.join("diskless");
    vimg_ok(&["backup", "extract", s(&new), s(&out)]);
    assert_eq!(std::fs::read(out.join("qemu-server.conf")).unwrap(), b"x\n");
}
