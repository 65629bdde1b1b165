//! Backups to and from block devices (issue 15): `backup extract --target DEVNAME=PATH` and
//! `-r MAP` (Proxmox's `vma extract -r`, as qmrestore drives it through a fifo) restore
//! devices in place into loop devices the tests make (512- and 4096-byte sectors), zeroing
//! what the archive stores as zeros unless the target is said to read as zeros;
//! `backup create` from a mostly-zero device stores no zero clusters; and an extract onto a
//! device killed with SIGKILL (at every write, and once from outside) leaves the device
//! readable and the same command, run again, restores it exactly.
//!
//! The oracle is the archived disk itself (`qemu-img compare` and the bytes of the device).
//! Proxmox's own `vma` is not installed here (nor packaged for this system), so nothing runs
//! `vma extract -r` on a twin device; the map format follows Proxmox's vma.c.
//!
//! Needs root and `losetup`; skipped with a message without them, unless
//! `VIMG_REQUIRE_QEMU=1` (then the test fails).

use crate::common;

use common::loop_device::Loop;
use common::{qemu_available, qemu_create, qemu_io, run, run_status};
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
/// Size of the archived disk (and of the loop devices restored into).
const DISK: u64 = 4 << 20;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A loop device of `sector`-byte sectors over a new `size`-byte file `name` in `dir`, every
/// byte `fill` (0: a sparse file), or `None` (skipping, or failing under
/// `VIMG_REQUIRE_QEMU=1`) where one cannot be made.
fn device(dir: &Path, name: &str, size: u64, fill: u8, sector: u32) -> Option<Loop> {
    if !qemu_available("extract_to_devices") {
        return None;
    }
    let file = dir.join(name);
    qemu_create(&file, "raw", "", None, size);
    if fill != 0 {
        qemu_io(&file, "raw", &[format!("write -P {fill} 0 {size}")]);
    }
    match Loop::attach(&file, sector) {
        Ok(l) => Some(l),
        Err(why) => {
            if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("extract_to_devices: no loop device ({why}) but VIMG_REQUIRE_QEMU=1");
            }
            eprintln!("extract_to_devices: skipping: no loop device ({why})");
            None
        }
    }
}

/// The disk to archive: data runs, partial clusters, alternating data and zero clusters, and
/// a last cluster of data, in a raw file of [`DISK`] bytes.
fn make_disk(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let disk = dir.join(name);
    qemu_create(&disk, "raw", "", None, DISK);
    let mut cmds = vec![
        format!("write -P {} 0 64k", seed),
        format!("write -P {} 192k 4k", seed.wrapping_add(1)),
        format!("write -P {} 200k 8k", seed.wrapping_add(2)),
        format!("write -P {} 1M 512k", seed.wrapping_add(3)),
        format!("write -P {} 4032k 64k", seed.wrapping_add(4)),
    ];
    for i in 0..16u64 {
        cmds.push(format!(
            "write -P {} {} 64k",
            seed.wrapping_add(16 + i as u8),
            (2 << 20) + i * 128 * 1024
        ));
    }
    qemu_io(&disk, "raw", &cmds);
    disk
}

/// An archive of `disks` (device name, image), with a config file.
fn archive_of(dir: &Path, name: &str, disks: &[(&str, &Path)]) -> PathBuf {
    let conf = dir.join("qemu-server.conf");
    std::fs::write(&conf, "cores: 2\nscsi0: local-lvm:vm-100-disk-0\n").unwrap();
    let archive = dir.join(name);
    let mut args = vec![
        "backup".to_string(),
        "create".into(),
        "-c".into(),
        p(&conf).into(),
    ];
    for (dev, img) in disks {
        args.push("-d".into());
        args.push(format!("{dev}={}", p(img)));
    }
    args.push(p(&archive).into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(VIMG, &args);
    archive
}

fn bytes(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// sha256 of a file or device, by `sha256sum`.
fn sha256(path: &str) -> String {
    run("sha256sum", &[path])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The device holds exactly `disk`: `qemu-img compare` says so, and the sha256 sums agree.
fn assert_holds(dev: &str, disk: &Path, what: &str) {
    let cmp = run_status(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(disk), dev],
    );
    assert_eq!(cmp.0, 0, "{what}: {}", cmp.1);
    assert_eq!(sha256(dev), sha256(p(disk)), "{what}: sha256 differs");
}

/// Fills the whole device with `byte`, through the device.
fn fill_device(dev: &str, byte: u8) {
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all(&vec![byte; DISK as usize]).unwrap();
    f.sync_all().unwrap();
}

fn is_device(d: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_block_device())
}

/// Where Proxmox's `vma` is installed: `vma extract -r` of the same archive onto a twin
/// device full of the same old data gives the same bytes as `dev` holds. (It is not installed
/// here; this then says so and does nothing.)
fn vma_does_the_same(d: &Path, archive: &Path, dev: &str, sector: u32) {
    let present = Command::new("vma")
        .arg("help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("vma extract"));
    if !present {
        eprintln!("extract_to_devices: Proxmox's vma is not installed: no comparison with it");
        return;
    }
    let twin = device(d, "twin.raw", DISK, 0xee, sector).unwrap();
    let map = d.join("vma.map");
    std::fs::write(
        &map,
        format!("1:drive-scsi0={}\nskip=drive-scsi1\ndone\n", twin.path()),
    )
    .unwrap();
    run(
        "vma",
        &["extract", "-r", p(&map), p(archive), p(&d.join("vma-out"))],
    );
    assert_eq!(
        sha256(twin.path()),
        sha256(dev),
        "vma extract -r wrote other bytes"
    );
}

#[test]
fn extract_into_devices_512() {
    extract_into_devices(512);
}

#[test]
fn extract_into_devices_4096() {
    extract_into_devices(4096);
}

/// `--target` onto devices full of old data gives the archived disks; with
/// `--target-is-zero` only data is written; targets that cannot be used are refused, and
/// neither a refusal nor a failure removes or changes a device.
fn extract_into_devices(sector: u32) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(dev) = device(d, "dev.raw", DISK, 0xee, sector) else {
        return;
    };
    let disk = make_disk(d, "disk0.raw", 0x40);
    let disk1 = make_disk(d, "disk1.raw", 0x90);
    let archive = archive_of(
        d,
        "a.vma",
        &[("drive-scsi0", &disk), ("drive-scsi1", &disk1)],
    );
    let dev = dev.path();
    let target = format!("drive-scsi0={dev}");

    // One device onto the loop device (old data zeroed), the other into the directory.
    let out = d.join("out");
    let listing = run(
        VIMG,
        &[
            "backup",
            "extract",
            "--target",
            &target,
            p(&archive),
            p(&out),
        ],
    );
    assert!(
        listing.contains(&format!("DEVINFO {dev} {DISK}\n")),
        "{listing}"
    );
    assert_holds(dev, &disk, "extract --target onto old data");
    let cmp = run(
        "qemu-img",
        &["compare", p(&disk1), p(&out.join("disk-drive-scsi1.raw"))],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    assert!(out.join("qemu-server.conf").exists());
    assert!(!out.join("disk-drive-scsi0.raw").exists());
    vma_does_the_same(d, &archive, dev, sector);

    // --target-is-zero: only data is written, so the old bytes stay where the disk is zero
    // (proving nothing else was written), and the data is the disk's.
    fill_device(dev, 0xee);
    run(
        VIMG,
        &[
            "backup",
            "extract",
            "-d",
            "drive-scsi0",
            "--target-is-zero",
            "--target",
            &target,
            p(&archive),
        ],
    );
    let (want, got) = (bytes(p(&disk)), bytes(dev));
    assert_eq!(got.len(), want.len());
    let mut kept = 0;
    for (i, (w, g)) in want.chunks(4096).zip(got.chunks(4096)).enumerate() {
        if w.iter().all(|&b| b == 0) {
            assert!(g.iter().all(|&b| b == 0xee), "zero block {i} was written");
            kept += 1;
        } else {
            assert_eq!(w, g, "data block {i}");
        }
    }
    assert!(kept > 100, "the disk has zero blocks to leave alone");
    // Onto a device that does read as zeros, that is the disk.
    fill_device(dev, 0);
    let args = [
        "backup",
        "extract",
        "-d",
        "drive-scsi0",
        "--target-is-zero",
        "--target",
        &target,
        p(&archive),
    ];
    run(VIMG, &args);
    assert_holds(dev, &disk, "extract --target-is-zero onto zeros");

    // Refusals, each leaving the device as it is.
    fill_device(dev, 0x77);
    let before = sha256(dev);
    let refuse = |args: &[&str], want: &str| {
        let (rc, o) = run_status(VIMG, args);
        assert_ne!(rc, 0, "{args:?} succeeded: {o}");
        assert!(o.contains(want), "{args:?}: {o}");
        assert!(is_device(dev), "{args:?} removed {dev}");
        assert_eq!(sha256(dev), before, "{args:?} changed {dev}");
    };
    let both = format!("drive-scsi1={dev}");
    refuse(
        &[
            "backup",
            "extract",
            "--target",
            &target,
            "--target",
            &both,
            p(&archive),
        ],
        "is also the target of device",
    );
    let small = device(d, "small.raw", 1 << 20, 0, sector).unwrap();
    let small_target = format!("drive-scsi0={}", small.path());
    refuse(
        &[
            "backup",
            "extract",
            "-d",
            "drive-scsi0",
            "--target",
            &small_target,
            p(&archive),
        ],
        &format!(
            "target is smaller than device 'drive-scsi0' of the archive (1048576 < {DISK} bytes)"
        ),
    );
    refuse(
        &["backup", "extract", "--target", &target, p(&archive)],
        "device 'drive-scsi1' has no target, and no target directory is given",
    );
    refuse(
        &[
            "backup",
            "extract",
            "--target",
            &format!("drive-sata9={dev}"),
            p(&archive),
            p(&d.join("x")),
        ],
        "the archive has no device named 'drive-sata9'",
    );
    assert!(
        !d.join("x").exists(),
        "a refused extract left its directory"
    );
    // The archive itself as a target.
    let archive_sum = sha256(p(&archive));
    refuse(
        &[
            "backup",
            "extract",
            "-d",
            "drive-scsi0",
            "--target",
            &format!("drive-scsi0={}", p(&archive)),
            p(&archive),
        ],
        "the target of device 'drive-scsi0' is the archive being read",
    );
    assert_eq!(sha256(p(&archive)), archive_sum);
    // A failed restore (a damaged archive) leaves the device in place, holding what was
    // written before the damage was found.
    let mut damaged = bytes(p(&archive));
    let at = damaged.len() - 1000;
    damaged.truncate(at);
    let cut = d.join("cut.vma");
    std::fs::write(&cut, &damaged).unwrap();
    let (rc, o) = run_status(
        VIMG,
        &[
            "backup",
            "extract",
            "--target",
            &target,
            p(&cut),
            p(&d.join("y")),
        ],
    );
    assert_ne!(rc, 0, "a truncated archive extracted: {o}");
    assert!(is_device(dev), "a failed extract removed {dev}");
    assert!(!d.join("y").exists(), "a failed extract left its directory");

    // A qcow2 image as a target (format=qcow2:), full of old data.
    let q = d.join("target.qcow2");
    qemu_create(&q, "qcow2", "", None, DISK);
    qemu_io(&q, "qcow2", &["write -P 0xee 0 4M".into()]);
    run(
        VIMG,
        &[
            "backup",
            "extract",
            "-d",
            "drive-scsi1",
            "--target",
            &format!("format=qcow2:drive-scsi1={}", p(&q)),
            p(&archive),
        ],
    );
    run("qemu-img", &["check", p(&q)]);
    let cmp = run("qemu-img", &["compare", "-F", "qcow2", p(&disk1), p(&q)]);
    assert!(cmp.contains("identical"), "qcow2 target: {cmp}");
}

/// `-r FIFO`, driven as qmrestore drives `vma extract -v -r`: the archive's contents come
/// first on standard output, then the map is written to the fifo (`1:` for a device with old
/// data, `0:` for one that reads as zeros, `skip=`, then `done`); every device restored.
#[test]
fn map_from_a_fifo_as_qmrestore_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(old) = device(d, "old.raw", DISK, 0xee, 512) else {
        return;
    };
    let fresh = device(d, "fresh.raw", DISK, 0, 4096).unwrap();
    let disk0 = make_disk(d, "disk0.raw", 0x21);
    let disk1 = make_disk(d, "disk1.raw", 0x61);
    let disk2 = make_disk(d, "disk2.raw", 0xa1);
    let archive = archive_of(
        d,
        "a.vma",
        &[
            ("drive-scsi0", &disk0),
            ("drive-scsi1", &disk1),
            ("drive-virtio2", &disk2),
        ],
    );
    let fifo = d.join("map.fifo");
    run("mkfifo", &[p(&fifo)]);
    let out = d.join("tmpdir");
    let mut child = Command::new(VIMG)
        .args([
            "backup",
            "extract",
            "-v",
            "-r",
            p(&fifo),
            p(&archive),
            p(&out),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut listing = String::new();
    loop {
        let mut line = String::new();
        use std::io::BufRead;
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "no CTIME line: {listing}"
        );
        listing.push_str(&line);
        if line.starts_with("CTIME: ") {
            break;
        }
    }
    assert!(
        listing.contains(&format!(
            "DEV: dev_id=1 size: {DISK} devname: drive-scsi0\n"
        )) && listing.contains("DEV: dev_id=3 size: 4194304 devname: drive-virtio2\n")
            && listing.starts_with("CFG: size: "),
        "{listing}"
    );
    // qmrestore reads the config from the directory before it writes the map.
    assert!(out.join("qemu-server.conf").exists());
    let mut map = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    write!(
        map,
        "format=raw:1:drive-scsi0={}\n0:drive-scsi1={}\nskip=drive-virtio2\ndone\n",
        old.path(),
        fresh.path()
    )
    .unwrap();
    drop(map);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "extract -r failed: {err}");
    assert!(rest.contains("progress 100% (read "), "{rest}");
    assert!(!rest.contains("DEVINFO"), "{rest}");
    assert_holds(old.path(), &disk0, "map 1: onto old data");
    assert_holds(fresh.path(), &disk1, "map 0: onto zeros");
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        files,
        ["qemu-server.conf"],
        "skipped and mapped devices made no file"
    );

    // A map without a line for a device fails as vma does, and leaves no directory.
    let map_file = d.join("map");
    std::fs::write(&map_file, format!("1:drive-scsi0={}\n", old.path())).unwrap();
    let (rc, o) = run_status(
        VIMG,
        &[
            "backup",
            "extract",
            "-r",
            p(&map_file),
            p(&archive),
            p(&d.join("t2")),
        ],
    );
    assert_ne!(rc, 0, "{o}");
    assert!(o.contains("no device name mapping for drive-scsi1"), "{o}");
    assert!(!d.join("t2").exists());
}

#[test]
fn backup_of_a_mostly_zero_device_512() {
    backup_of_a_mostly_zero_device(512);
}

#[test]
fn backup_of_a_mostly_zero_device_4096() {
    backup_of_a_mostly_zero_device(4096);
}

/// The numbers `backup create -v` prints: (clusters, zero clusters, data bytes).
fn create_stats(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("archive: "))
        .unwrap_or_else(|| panic!("no stats: {stderr}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (n[0], n[1], n[2])
}

/// A device with little data, backed up: all of it is read (a device has no holes to ask
/// for), zero clusters and zero 4 KiB blocks are not stored, exactly as for the same disk as
/// a sparse file; the archive restores the device exactly.
fn backup_of_a_mostly_zero_device(sector: u32) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size: u64 = 32 << 20;
    let Some(dev) = device(d, "dev.raw", size, 0, sector) else {
        return;
    };
    qemu_io(
        Path::new(dev.path()),
        "raw",
        &[
            "write -P 0x5a 0 64k".into(),
            "write -P 0x33 5M 4k".into(),
            "write -P 0x44 17M 192k".into(),
            "write -P 0x55 32764k 4k".into(),
        ],
    );
    let contents = bytes(dev.path());
    let data_blocks = contents
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64;
    let zero_clusters = contents
        .chunks(65536)
        .filter(|b| b.iter().all(|&x| x == 0))
        .count() as u64;
    let create = |from: &str, name: &str| -> (PathBuf, (u64, u64, u64)) {
        let archive = d.join(name);
        let out = Command::new(VIMG)
            .args(["backup", "create", "-v", "-d"])
            .arg(format!("drive-scsi0={from}"))
            .arg(&archive)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "backup create of {from}: {err}");
        (archive, create_stats(&err))
    };
    let (archive, stats) = create(dev.path(), "dev.vma");
    assert_eq!(
        stats,
        (size / 65536, zero_clusters, data_blocks * 4096),
        "stored from the device"
    );
    // The same disk as a sparse file (read through its holes) is stored the same way.
    let file = d.join("dev.raw");
    let (_, file_stats) = create(p(&file), "file.vma");
    assert_eq!(stats, file_stats, "device and file archives differ");
    let archive_len = std::fs::metadata(&archive).unwrap().len();
    assert!(
        archive_len < data_blocks * 4096 + (256 << 10),
        "archive of {archive_len} bytes for {} data bytes",
        data_blocks * 4096
    );
    // verify agrees, and the archive restores the device.
    let v = run(VIMG, &["backup", "verify", "-v", p(&archive)]);
    assert!(
        v.contains(&format!(
            "device 1 (drive-scsi0): {} clusters, {zero_clusters} zero, {} data bytes",
            size / 65536,
            data_blocks * 4096
        )),
        "{v}"
    );
    let out = d.join("out");
    run(VIMG, &["backup", "extract", p(&archive), p(&out)]);
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            dev.path(),
            p(&out.join("disk-drive-scsi0.raw")),
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
}

/// Runs `args` with `VIMG_TEST_KILL_AFTER_WRITES=n`; whether the process was killed.
fn killed_after(args: &[&str], n: usize) -> bool {
    let out = Command::new(VIMG)
        .args(args)
        .env("VIMG_TEST_KILL_AFTER_WRITES", n.to_string())
        .output()
        .unwrap();
    match out.status.signal() {
        Some(9) => true,
        None if out.status.success() => false,
        _ => panic!(
            "{args:?} with a kill after {n} writes: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// An extract onto a device killed just before each of its writes: the device stays a
/// readable device of its size, and the same command run again restores the disk exactly.
/// Both forms: `--target` without a directory (the command is run again as it was), and
/// `-r MAP` with a directory (which a killed run leaves behind; removed before the re-run,
/// as qmrestore removes its directory).
#[test]
fn killed_extract_onto_a_device_is_restartable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sector in [512, 4096] {
        let Some(dev) = device(d, &format!("dev{sector}.raw"), DISK, 0xee, sector) else {
            return;
        };
        let dev = dev.path().to_string();
        let disk = make_disk(d, &format!("disk{sector}.raw"), 0x30);
        let archive = archive_of(d, &format!("a{sector}.vma"), &[("drive-scsi0", &disk)]);
        let target = format!("drive-scsi0={dev}");
        let map = d.join(format!("map{sector}"));
        std::fs::write(&map, format!("1:drive-scsi0={dev}\ndone\n")).unwrap();
        let out = d.join(format!("out{sector}"));
        let forms: [Vec<&str>; 2] = [
            vec!["backup", "extract", "--target", &target, p(&archive)],
            vec!["backup", "extract", "-r", p(&map), p(&archive), p(&out)],
        ];
        for args in &forms {
            let mut kills = 0;
            for n in 1.. {
                fill_device(&dev, 0xee);
                let _ = std::fs::remove_dir_all(&out);
                if !killed_after(args, n) {
                    break;
                }
                kills += 1;
                assert!(
                    is_device(&dev),
                    "{args:?} killed at write {n}: {dev} is gone"
                );
                let left = bytes(&dev);
                assert_eq!(left.len() as u64, DISK, "{args:?} killed at write {n}");
                assert!(left != bytes(p(&disk)), "killed at write {n} but complete");
                let _ = std::fs::remove_dir_all(&out);
                run(VIMG, args);
                assert_holds(
                    &dev,
                    &disk,
                    &format!("{args:?} re-run after a kill at write {n}"),
                );
                assert!(n < 200, "{args:?} never finishes");
            }
            assert!(kills >= 10, "{args:?}: only {kills} writes to kill at");
            assert_holds(&dev, &disk, &format!("{args:?} run without a kill"));
        }
    }
}

/// A real SIGKILL from outside while the extract waits for the rest of its archive on
/// standard input (so the kill lands mid-restore, after part of the device was written); the
/// same command, given the whole archive, then restores the device exactly. A SIGTERM at the
/// same point removes the extract's directory and leaves the device.
#[test]
fn extract_onto_a_device_killed_from_outside_is_restartable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(dev) = device(d, "dev.raw", DISK, 0xee, 4096) else {
        return;
    };
    let dev = dev.path();
    let disk = make_disk(d, "disk.raw", 0x50);
    let archive = archive_of(d, "a.vma", &[("drive-scsi0", &disk)]);
    let data = bytes(p(&archive));
    let target = format!("drive-scsi0={dev}");
    let args = ["backup", "extract", "--target", &target, "-"];
    let mut child = Command::new(VIMG)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // All but the end of the last extent: the first extent (clusters 0 to 58) is restored,
    // then the extract waits for the rest.
    stdin.write_all(&data[..data.len() - 1000]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished without its whole archive"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    drop(stdin);
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(is_device(dev));
    let left = bytes(dev);
    assert_eq!(left.len() as u64, DISK);
    let want = bytes(p(&disk));
    assert_eq!(
        left[..65536],
        want[..65536],
        "the first cluster was not written before the kill"
    );
    assert_ne!(left, want, "the whole disk was written before the kill");
    // SIGTERM instead: vimg removes what it made (the directory), never the device.
    let out = d.join("out");
    let mut child = Command::new(VIMG)
        .args(["backup", "extract", "--target", &target, "-", p(&out)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&data[..data.len() - 1000]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        out.join("qemu-server.conf").exists(),
        "the extract has not started"
    );
    // SAFETY: kill(2) on the pid of our own child, which has not been waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    drop(stdin);
    assert!(
        status.signal() == Some(15) || status.code() == Some(143),
        "{status:?}"
    );
    assert!(!out.exists(), "SIGTERM left the extract's directory");
    assert!(is_device(dev), "SIGTERM removed the device");
    assert_eq!(bytes(dev).len() as u64, DISK);

    let mut again = Command::new(VIMG)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    again.stdin.take().unwrap().write_all(&data).unwrap();
    assert!(again.wait().unwrap().success(), "the re-run failed");
    assert_holds(dev, &disk, "re-run after an outside SIGKILL");
}
