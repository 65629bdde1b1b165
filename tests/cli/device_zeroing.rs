//! `convert -n` onto a block device that holds old data: vimg must leave the device as qemu-img
//! leaves a twin device (every range the source reads as zero is zeroed, unless
//! `--target-is-zero`), and must zero those ranges the cheap way (the loop device passes the
//! zeroing on to its backing file as a punched hole, so the backing file ends up sparse), on
//! devices of 512- and 4096-byte sectors, with zero ranges off the 4096-byte sector (`-S 512`).
//! A `kill -9` during such a convert leaves the device readable and a second run finishes it.
//!
//! Needs root and `losetup`; skipped with a message without them, unless `VIMG_REQUIRE_QEMU=1`
//! (then the test fails).

use crate::common;

use common::loop_device::Loop;
use common::{qemu_available, qemu_create, qemu_io, run, run_status};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
const DEVICE: u64 = 8 << 20;

/// Loop devices named by `names` over `DEVICE`-byte files full of 0xaa bytes (the old data),
/// or `None` where they cannot be made (skipping, or failing under `VIMG_REQUIRE_QEMU=1`).
fn devices(dir: &Path, sector: u32, names: &[&str]) -> Option<Vec<(Loop, PathBuf)>> {
    if !qemu_available("device_zeroing") {
        return None;
    }
    let mut out = Vec::new();
    for name in names {
        let file = dir.join(format!("{name}-{sector}.dev"));
        std::fs::write(&file, vec![0xaau8; DEVICE as usize]).unwrap();
        match Loop::attach(&file, sector) {
            Ok(l) => out.push((l, file)),
            Err(why) => {
                if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
                    panic!("device_zeroing: no loop device ({why}) but VIMG_REQUIRE_QEMU=1");
                }
                eprintln!("device_zeroing: skipping: no loop device ({why})");
                return None;
            }
        }
    }
    Some(out)
}

/// A qcow2 source smaller than the device: data in places (some of it off 4096-byte
/// boundaries, with zero sectors inside data clusters), clusters written as zeros, and
/// unallocated ranges. Returned with the sha256 of its contents (as qemu-img reads them).
fn source(dir: &Path) -> (PathBuf, String) {
    let src = dir.join("src.qcow2");
    qemu_create(&src, "qcow2", "", None, 6 << 20);
    qemu_io(
        &src,
        "qcow2",
        &[
            "write -P 0x11 0 64k".into(),
            "write -z 8k 1k".into(),
            "write -P 0x22 1M 3584".into(),
            "write -P 0x33 1539k 7k".into(),
            "write -z 2M 64k".into(),
            "write -P 0x44 5M 1M".into(),
            "write -z 5500k 1536".into(),
        ],
    );
    let expect = dir.join("expect.raw");
    let e = expect.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-O", "raw", src.to_str().unwrap(), e],
    );
    (src, sha(e))
}

/// Fills the device with the old data (0xaa), through the device, so that its page cache and
/// its backing file both hold it.
fn fill(dev: &Loop) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev.path())
        .unwrap();
    f.write_all(&vec![0xaau8; DEVICE as usize]).unwrap();
    f.sync_all().unwrap();
}

fn sha(path: &str) -> String {
    run("sha256sum", &[path])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Bytes the file really holds on disk.
fn allocated(file: &Path) -> u64 {
    std::fs::metadata(file).unwrap().blocks() * 512
}

/// The device's first `len` bytes, as a file, hashed: what the source's contents must equal.
fn sha_prefix(dev: &str, len: u64, dir: &Path) -> String {
    let out = dir.join("prefix.raw");
    let data = std::fs::read(dev).unwrap();
    std::fs::write(&out, &data[..len as usize]).unwrap();
    sha(out.to_str().unwrap())
}

fn zeroing(sector: u32) {
    let dir = tempfile::tempdir().unwrap();
    let Some(devs) = devices(dir.path(), sector, &["vimg", "qemu"]) else {
        return;
    };
    let (src, expect_sha) = source(dir.path());
    let s = src.to_str().unwrap();
    let (vd, vfile) = (&devs[0].0, &devs[0].1);
    let (qd, qfile) = (&devs[1].0, &devs[1].1);
    for sparse in [None, Some("512")] {
        for target_is_zero in [false, true] {
            fill(vd);
            fill(qd);
            let mut args = vec!["convert", "-n", "-f", "qcow2", "-O", "raw"];
            if let Some(n) = sparse {
                args.extend(["-S", n]);
            }
            if target_is_zero {
                args.push("--target-is-zero");
            }
            let what = format!("{sector}-byte sectors, {args:?}");
            let (code, out) = run_status(VIMG, &[&args[..], &[s, vd.path()]].concat());
            assert_eq!(code, 0, "vimg {what}: {out}");
            run("qemu-img", &[&args[..], &[s, qd.path()]].concat());
            assert_eq!(
                sha(vd.path()),
                sha(qd.path()),
                "{what}: the devices differ after vimg and qemu-img"
            );
            let prefix = sha_prefix(vd.path(), 6 << 20, dir.path());
            if target_is_zero {
                // The old data stays where the source reads zeros: nothing was zeroed.
                assert_ne!(prefix, expect_sha, "{what}: zero ranges were written");
            } else {
                assert_eq!(
                    prefix, expect_sha,
                    "{what}: the device does not hold the source"
                );
                // Zeroed by punching through the loop device into its backing file, not by
                // writing zero buffers: the zeroed ranges hold no space. (The device's last
                // 2 MiB, past the source, keep their old data and their space.)
                let held = allocated(vfile);
                assert!(
                    held <= allocated(qfile) + (64 << 10) && held < (4 << 20),
                    "{what}: the device's backing file holds {held} bytes (qemu-img's {})",
                    allocated(qfile)
                );
            }
        }
    }
}

#[test]
fn convert_onto_a_512_byte_sector_device_zeroes_as_qemu_does() {
    zeroing(512);
}

#[test]
fn convert_onto_a_4096_byte_sector_device_zeroes_as_qemu_does() {
    zeroing(4096);
}

/// vimg killed (SIGKILL) at several points of a `convert -n` onto a device, then run again:
/// the device stays readable after the kill, and the second run leaves what an uninterrupted
/// one does.
#[test]
fn convert_onto_a_device_killed_and_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let Some(devs) = devices(dir.path(), 4096, &["kill"]) else {
        return;
    };
    let (src, expect_sha) = source(dir.path());
    let s = src.to_str().unwrap();
    let dev = &devs[0].0;
    let args = ["convert", "-n", "-O", "raw", "-S", "512", s, dev.path()];
    let mut killed = 0;
    for n in [1usize, 2, 3, 5, 8, 13, 40] {
        fill(dev);
        let out = std::process::Command::new(VIMG)
            .args(args)
            .env("VIMG_TEST_KILL_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() == Some(libc::SIGKILL) {
            killed += 1;
        } else {
            assert!(out.status.success(), "kill point {n}: {out:?}");
        }
        // Readable after the kill, by qemu-img as by vimg.
        let (code, info) = run_status("qemu-img", &["info", "-f", "raw", dev.path()]);
        assert_eq!(code, 0, "kill point {n}: {info}");
        let (code, out) = run_status(VIMG, &args);
        assert_eq!(code, 0, "kill point {n}, second run: {out}");
        assert_eq!(
            sha_prefix(dev.path(), 6 << 20, dir.path()),
            expect_sha,
            "kill point {n}: the second run left something else"
        );
    }
    assert!(killed >= 5, "only {killed} runs were killed");
    // A SIGKILL from outside, part way through a slower copy (a rate limit of 1 MiB/s).
    fill(dev);
    let mut child = std::process::Command::new(VIMG)
        .args(["convert", "-n", "-O", "raw", "-r", "1M", s, dev.path()])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let (code, out) = run_status(VIMG, &args);
    assert_eq!(code, 0, "after SIGKILL: {out}");
    assert_eq!(sha_prefix(dev.path(), 6 << 20, dir.path()), expect_sha);
}
