//! Commands stopped by SIGINT, SIGTERM or SIGHUP remove their partial output and end with the
//! signal's status; an existing target is left as it was. An overwritten target keeps its hard
//! links; a block device target is written in place.

use crate::common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vimg() -> &'static str {
    env!("CARGO_BIN_EXE_vimg")
}

/// Writes `len` bytes of incompressible (xorshift) data to `path`.
fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut buf = vec![0u8; len];
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    std::fs::write(path, buf).unwrap();
}

/// The names in `dir` a command made for its partial output.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".vimg-"))
        .collect()
}

/// A vimg command whose SIGINT, SIGTERM and SIGHUP start at their default action, as in a
/// terminal: a test run started in the background (`cmd &` without job control) or under
/// `nohup` ignores SIGINT or SIGHUP, children inherit that, and vimg, like qemu-img, leaves an
/// ignored signal ignored, so the signal this test sends would never arrive.
fn vimg_command() -> Command {
    let mut cmd = Command::new(vimg());
    // SAFETY: runs in the forked child before exec and only calls `signal`, which is
    // async-signal-safe, touching no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                if libc::signal(sig, libc::SIG_DFL) == libc::SIG_ERR {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Waits for `child`, which was sent a signal, for at most 60 seconds (killing it then, so
/// that a signal that is not acted on fails the test instead of hanging it); returns the
/// signal that ended it.
fn wait_signalled(child: &mut std::process::Child, what: &str) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.signal();
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running 60 s after the signal");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs vimg with `args` in `dir`, waits until `ready` says its output has started, sends
/// `sig`, and returns the signal that ended it (None if it exited).
fn interrupt(dir: &Path, args: &[&str], sig: i32, ready: &dyn Fn() -> bool) -> Option<i32> {
    let mut child = vimg_command()
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("vimg {args:?} never started its output");
        }
        if child.try_wait().unwrap().is_some() {
            panic!("vimg {args:?} finished before it could be interrupted");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Let it write for a moment (short: a fast run must not finish first).
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: kill with the pid of a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, sig) };
    wait_signalled(&mut child, &format!("vimg {args:?}"))
}

#[test]
fn signals_remove_the_partial_output_of_convert() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    random_file(&src, 256 << 20, 7);
    let out = dir.path().join("out.qcow2");
    std::fs::write(&out, b"the old target").unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let d = dir.path();
        let got = interrupt(
            d,
            &["convert", "-O", "qcow2", "-c", "src.raw", "out.qcow2"],
            sig,
            &|| !leftovers(d).is_empty(),
        );
        assert_eq!(got, Some(sig), "convert was not ended by signal {sig}");
        assert_eq!(leftovers(d), Vec::<String>::new(), "signal {sig}");
        assert_eq!(std::fs::read(&out).unwrap(), b"the old target");
    }
}

#[test]
fn signals_remove_the_partial_output_of_backup_extract() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("disk.raw"), 256 << 20, 11);
    let (rc, o) = common::run_in(
        d,
        vimg(),
        &["backup", "create", "a.vma", "-d", "drive-scsi0=disk.raw"],
    );
    assert_eq!(rc, 0, "{o}");
    // The archive comes through a pipe, of which only the first half is written: the
    // extract has started its output and is waiting for more when the signal comes (reading
    // the file itself can finish before any signal could reach it).
    let archive = std::fs::read(d.join("a.vma")).unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let target = d.join("restored");
        let mut child = vimg_command()
            .args(["backup", "extract", "-", "restored"])
            .current_dir(d)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let half = archive.len() / 2;
        let feeder = {
            let part = archive[..half].to_vec();
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&part);
                stdin // kept open until joined: the extract waits for the rest
            })
        };
        let start = Instant::now();
        while !target.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "extract never started its output"
            );
            assert!(child.try_wait().unwrap().is_none(), "extract ended early");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: kill with the pid of a child this test spawned and has not reaped.
        unsafe { libc::kill(child.id() as i32, sig) };
        let got = wait_signalled(&mut child, "backup extract");
        drop(feeder.join());
        assert_eq!(got, Some(sig), "extract was not ended by signal {sig}");
        assert!(
            !target.exists(),
            "signal {sig}: the target directory is left"
        );
    }
}

#[test]
fn hard_links_to_an_overwritten_target_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("src.raw"), 3 << 20, 3);
    for (fmt, name) in [("raw", "t.raw"), ("qcow2", "t.qcow2")] {
        let t = d.join(name);
        let link = d.join(format!("link-{name}"));
        std::fs::write(&t, vec![0xeeu8; 5 << 20]).unwrap();
        std::fs::hard_link(&t, &link).unwrap();
        let (rc, o) = common::run_in(d, vimg(), &["convert", "-O", fmt, "src.raw", name]);
        assert_eq!(rc, 0, "{o}");
        assert_eq!(std::fs::metadata(&t).unwrap().nlink(), 2, "{name}");
        assert_eq!(
            std::fs::metadata(&t).unwrap().ino(),
            std::fs::metadata(&link).unwrap().ino()
        );
        if common::qemu_available("hard_links_to_an_overwritten_target_are_kept") {
            for n in [&t, &link] {
                let n = n.to_str().unwrap();
                let (rc, o) = common::run_status(
                    "qemu-img",
                    &[
                        "compare",
                        "-f",
                        "raw",
                        "-F",
                        fmt,
                        "-s",
                        d.join("src.raw").to_str().unwrap(),
                        n,
                    ],
                );
                assert_eq!(rc, 0, "{n}: {o}");
            }
        }
        assert_eq!(leftovers(d), Vec::<String>::new());
    }
}

/// A loop device made for a test, detached when dropped.
struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn loop_device(file: &Path) -> Option<Loop> {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(file)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(Loop(PathBuf::from(
            String::from_utf8_lossy(&o.stdout).trim(),
        ))),
        r => {
            if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("losetup failed under VIMG_REQUIRE_QEMU=1: {r:?}");
            }
            eprintln!("skipping: losetup failed: {r:?}");
            None
        }
    }
}

#[test]
fn a_block_device_target_is_written_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("src.raw"), 4 << 20, 5);
    random_file(&d.join("big.raw"), 12 << 20, 9);
    let backing = d.join("dev.img");
    std::fs::write(&backing, vec![0xeeu8; 8 << 20]).unwrap();
    let Some(dev) = loop_device(&backing) else {
        return;
    };
    let devname = dev.0.to_str().unwrap();
    let (rc, o) = common::run_in(d, vimg(), &["convert", "-O", "raw", "src.raw", devname]);
    assert_eq!(rc, 0, "{o}");
    let meta = std::fs::metadata(&dev.0).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "the device was replaced"
    );
    let now = std::fs::read(&backing).unwrap();
    assert_eq!(now.len(), 8 << 20);
    assert!(now[..4 << 20] == std::fs::read(d.join("src.raw")).unwrap()[..]);
    // Larger than the device: refused with qemu's words, the device untouched.
    let (rc, o) = common::run_in(d, vimg(), &["convert", "-O", "raw", "big.raw", devname]);
    assert_eq!(rc, 1, "{o}");
    assert!(o.contains("output file is smaller than input file"), "{o}");
    assert!(std::fs::read(&backing).unwrap() == now);
    assert_eq!(leftovers(d), Vec::<String>::new());
}

/// A write that fails names its OS cause, as qemu-img's message does: here EFBIG ("File too
/// large") from a file size limit (with SIGXFSZ ignored), for new raw and qcow2 targets and an
/// existing one written in place (`-n`); no partial output is left.
#[test]
fn write_errors_name_their_os_cause() {
    if !common::qemu_available("write_errors_name_their_os_cause") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("src.raw"), 8 << 20, 13);
    let (rc, o) = common::run_in(d, "qemu-img", &["create", "-q", "-f", "raw", "n.raw", "8M"]);
    assert_eq!(rc, 0, "{o}");
    for args in [
        "convert -O raw src.raw out.raw",
        "convert -O qcow2 src.raw out.qcow2",
        "convert -n -O raw src.raw n.raw",
    ] {
        for tool in [vimg(), "qemu-img"] {
            // 4096 blocks of 512 bytes: 2 MiB.
            let script = format!("trap '' XFSZ; ulimit -f 4096; exec {tool} {args}");
            let (rc, o) = common::run_in(d, "sh", &["-c", &script]);
            assert_eq!(rc, 1, "{tool} {args}: {o}");
            assert!(o.contains("File too large"), "{tool} {args}: {o}");
            if args.contains("qcow2") {
                // qemu-img's words for a failed write during the copy come first.
                assert!(
                    o.contains("error while writing at byte"),
                    "{tool} {args}: {o}"
                );
            }
            assert_eq!(leftovers(d), Vec::<String>::new(), "{tool} {args}");
        }
    }
}

/// `create` stopped by a signal while it preallocates leaves no half-made image.
#[test]
fn signals_remove_a_half_created_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let img = d.join("new.raw");
        let got = interrupt(
            d,
            &[
                "create",
                "-f",
                "raw",
                "-o",
                "preallocation=full",
                "new.raw",
                "8G",
            ],
            sig,
            &|| img.exists(),
        );
        assert_eq!(got, Some(sig), "create was not ended by signal {sig}");
        assert!(!img.exists(), "signal {sig}: the half-made image is left");
    }
}
