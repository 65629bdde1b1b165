//! Live push backup through `vimg serve --control` (issue 19): a guest stand-in (qemu-io or
//! libnbd over `nbd+unix://`) writes while `vimg backup create --server` runs. The archive
//! must hold the disks as they were at the start (across several disks at one point in time),
//! the live disks every guest write, each cluster read once; and a backup whose target is full,
//! whose reader stops reading, that is cancelled or whose server is killed must never lose or
//! hold up a guest write, and leave the served qcow2 passing `qemu-img check`.

use crate::common;

use common::nbd_serve::{nbd_tools_available, Server, PYTHON_LIBNBD};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
const MIB: u64 = 1 << 20;
const CS: u64 = 65536;

/// A qcow2 image of `size` bytes, every byte `pattern`.
fn patterned(path: &Path, size: u64, pattern: u8) {
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    common::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} 0 {size}"),
            path.to_str().unwrap(),
        ],
    );
}

/// `vimg serve` of `image` as export `name`, with a control socket, several clients allowed.
fn serve(dir: &Path, image: &Path, name: &str) -> (Server, PathBuf) {
    let ctl = dir.join("ctl.sock");
    let s = Server::vimg(
        image,
        &dir.join("nbd.sock"),
        name,
        &["--control", ctl.to_str().unwrap(), "-e", "0", "-f", "qcow2"],
    );
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&ctl).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no control socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (s, ctl)
}

/// `vimg control CTL COMMAND ARGS`: its return value.
fn control(ctl: &Path, command: &str, args: &str) -> Value {
    let out = common::run(VIMG, &["control", ctl.to_str().unwrap(), command, args]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command}: {e}: {out}"))
}

fn nbd_uri(dir: &Path, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        dir.join("nbd.sock").display()
    )
}

/// qemu-io over NBD running `cmds`; panics if any fails.
fn guest_io(dir: &Path, export: &str, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(nbd_uri(dir, export));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = common::run("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "guest I/O failed: {out}"
    );
}

/// A `backup create --server` whose archive goes through a pipe this test drains at `rate`
/// bytes per second (or not at all with 0) into `archive`.
struct Backup {
    child: Child,
    reader: Option<std::thread::JoinHandle<u64>>,
    full_speed: Arc<AtomicBool>,
    drained: Arc<AtomicU64>,
}

impl Backup {
    fn start(ctl: &Path, archive: &Path, exports: &[&str], extra: &[&str], rate: u64) -> Backup {
        let mut child = Command::new(VIMG)
            .args(["backup", "create", "-v", "--server", ctl.to_str().unwrap()])
            .args(extra)
            .arg("-")
            .args(exports)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let full_speed = Arc::new(AtomicBool::new(false));
        let drained = Arc::new(AtomicU64::new(0));
        let (fs, dr) = (full_speed.clone(), drained.clone());
        let mut file = std::fs::File::create(archive).unwrap();
        let reader = std::thread::spawn(move || {
            if rate == 0 {
                while !fs.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return 0;
            }
            let start = Instant::now();
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                if !fs.load(Ordering::SeqCst) {
                    let due = Duration::from_secs_f64(total as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                let n = match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                file.write_all(&buf[..n]).unwrap();
                total += n as u64;
                dr.store(total, Ordering::SeqCst);
            }
            total
        });
        Backup {
            child,
            reader: Some(reader),
            full_speed,
            drained,
        }
    }

    /// Waits until the archive is flowing (the job runs and its header has been read).
    fn wait_running(&self) {
        let start = Instant::now();
        while self.drained.load(Ordering::SeqCst) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "backup not started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lets the reader go at full speed and waits for the command: (exit code, stderr).
    fn finish(mut self) -> (i32, String) {
        self.full_speed.store(true, Ordering::SeqCst);
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = self.child.wait().unwrap();
        let _ = self.reader.take().unwrap().join();
        (st.code().unwrap_or(-1), err)
    }
}

/// The counts of the `-v` line: (by job, by hook, unread, bytes read).
fn job_counts(stderr: &str) -> (u64, u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("job "))
        .unwrap_or_else(|| panic!("no job line in {stderr}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    // "job backupN: A ... B ... C ... D bytes read, E archive bytes"
    let n = nums.len();
    (nums[n - 5], nums[n - 4], nums[n - 3], nums[n - 2])
}

fn check_clean(image: &Path) {
    let (code, out) = common::run_status("qemu-img", &["check", image.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check: {out}");
}

/// Pattern A before the backup, pattern B written by the guest during it: the restored archive
/// holds A everywhere, the live disk B where written, and each cluster was read once (the
/// overwritten ones by the write hook, exactly once each).
#[test]
fn guest_writes_during_the_backup_save_the_old_clusters_once() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 128 * MIB;
    patterned(&img, size, 0xaa);
    let before = dir.path().join("before.qcow2");
    std::fs::copy(&img, &before).unwrap();
    let (server, ctl) = serve(dir.path(), &img, "d");
    let archive = dir.path().join("a.vma");
    // The archive drains at 16 MiB/s until the guest is done (then at full speed). The job
    // runs ahead of the reader by what its buffers and the archive writer's hold (about 18
    // MiB), so the guest writes to the last quarter, which the job reaches after some 5 s;
    // the writes go in parallel (a hook's save waits for room in the archive).
    let job = Backup::start(
        &ctl,
        &archive,
        &["d"],
        &["--stall-timeout", "30000"],
        16 * MIB,
    );
    job.wait_running();
    let writes: Vec<(u64, u64)> = (0..24u64)
        .map(|i| (size * 3 / 4 + i * 3 * CS / 2 + 1000, 5000 + i * 3500))
        .collect();
    let mut cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("aio_write -P 0xbb {o} {l}"))
        .collect();
    cmds.push("aio_flush".into());
    guest_io(dir.path(), "d", &cmds);
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P 0xbb {o} {l}"))
        .collect();
    let (code, err) = job.finish();
    assert_eq!(code, 0, "{err}");
    assert_eq!(server.stop(), 0, "the server did not stop cleanly");

    common::run(VIMG, &["backup", "verify", archive.to_str().unwrap()]);
    let out = dir.path().join("restored");
    common::run(
        VIMG,
        &[
            "backup",
            "extract",
            archive.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let restored = out.join("disk-d.raw");
    let (c, o) = common::run_status(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            restored.to_str().unwrap(),
            before.to_str().unwrap(),
        ],
    );
    assert_eq!(
        c, 0,
        "the archive is not the disk as it was at the start: {o}"
    );
    // The live disk: the start state plus every guest write.
    common::qemu_io(&before, "qcow2", &cmds);
    let (c, o) = common::run_status(
        "qemu-img",
        &["compare", img.to_str().unwrap(), before.to_str().unwrap()],
    );
    assert_eq!(c, 0, "a guest write is missing from the live disk: {o}");
    check_clean(&img);
    // Every cluster read once: those the guest overwrote by the hook, the rest by the job.
    let touched: std::collections::BTreeSet<u64> = writes
        .iter()
        .flat_map(|(o, l)| (o / CS)..(o + l).div_ceil(CS))
        .collect();
    let (by_job, by_hook, unread, bytes) = job_counts(&err);
    assert_eq!(by_hook, touched.len() as u64, "{err}");
    assert_eq!(by_job + by_hook + unread, size / CS, "{err}");
    assert_eq!(
        bytes,
        (by_job + by_hook) * CS,
        "a cluster was read twice: {err}"
    );
}

/// A guest writing a counter to disk 1 then disk 2, over and over, across the start of a
/// backup of both: the archive holds a state the guest went through (disk 1's counter equal to
/// disk 2's or one ahead).
#[test]
fn several_disks_are_consistent_at_the_start() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d1 = dir.path().join("d1.qcow2");
    let d2 = dir.path().join("d2.qcow2");
    patterned(&d1, 8 * MIB, 0x11);
    patterned(&d2, 8 * MIB, 0x22);
    let (server, ctl) = serve(dir.path(), &d1, "d1");
    control(
        &ctl,
        "export-add",
        &format!(
            r#"{{"name": "d2", "file": "{}", "format": "qcow2"}}"#,
            d2.display()
        ),
    );
    let stop = dir.path().join("stop");
    let script = format!(
        r#"
import nbd, struct, os
h1 = nbd.NBD(); h1.connect_uri("{u1}")
h2 = nbd.NBD(); h2.connect_uri("{u2}")
i = 0
while not os.path.exists("{stop}"):
    i += 1
    h1.pwrite(struct.pack("<Q", i) * 64, 0)
    h2.pwrite(struct.pack("<Q", i) * 64, 0)
h1.flush(); h2.flush()
print(i)
"#,
        u1 = nbd_uri(dir.path(), "d1"),
        u2 = nbd_uri(dir.path(), "d2"),
        stop = stop.display()
    );
    let mut guest = Command::new(PYTHON_LIBNBD)
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let archive = dir.path().join("a.vma");
    let job = Backup::start(&ctl, &archive, &["d1", "d2"], &[], 64 * MIB);
    job.wait_running();
    std::thread::sleep(Duration::from_millis(200));
    let (code, err) = job.finish();
    std::fs::write(&stop, b"").unwrap();
    let mut last = String::new();
    guest
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut last)
        .unwrap();
    assert!(guest.wait().unwrap().success());
    assert_eq!(code, 0, "{err}");
    assert_eq!(server.stop(), 0, "the server did not stop cleanly");
    let out = dir.path().join("restored");
    common::run(
        VIMG,
        &[
            "backup",
            "extract",
            archive.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let counter = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        u64::from_le_bytes(b[..8].try_into().unwrap())
    };
    let (m1, m2) = (
        counter(&out.join("disk-d1.raw")),
        counter(&out.join("disk-d2.raw")),
    );
    let last: u64 = last.trim().parse().unwrap();
    assert!(m1 > 0, "the guest had not started writing");
    assert!(
        m1 < last,
        "the guest wrote nothing during the backup ({m1}, {last})"
    );
    assert!(
        m1 == m2 || m1 == m2 + 1,
        "the archive holds disk 1 at {m1} and disk 2 at {m2}: not a state the guest was in"
    );
    check_clean(&d1);
    check_clean(&d2);
}

/// Writes to the second half of `export` while a backup job is stalled, checking each returns
/// within `limit`; the writes used (to check them on the disk afterwards).
fn writes_go_on(dir: &Path, export: &str, size: u64, limit: Duration) -> Vec<String> {
    let cmds: Vec<String> = (0..8u64)
        .map(|i| format!("write -P 0xcc {} 65536", size / 2 + i * 4 * CS))
        .collect();
    let start = Instant::now();
    guest_io(dir, export, &cmds);
    assert!(
        start.elapsed() < limit,
        "guest writes took {:?} while the backup was stalled",
        start.elapsed()
    );
    cmds
}

/// After a failed backup: the disk holds the start state plus `cmds`, and passes check.
fn disk_has_every_write(img: &Path, before: &Path, cmds: &[String]) {
    common::qemu_io(before, "qcow2", cmds);
    let (c, o) = common::run_status(
        "qemu-img",
        &["compare", img.to_str().unwrap(), before.to_str().unwrap()],
    );
    assert_eq!(c, 0, "a guest write is missing: {o}");
    check_clean(img);
}

/// A reader that stops reading: the job aborts after the stall limit with the reason, guest
/// writes meanwhile go on, and the command exits 1.
#[test]
fn a_reader_that_stops_reading_aborts_the_job_not_the_guest() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 32 * MIB;
    patterned(&img, size, 0xaa);
    let before = dir.path().join("before.qcow2");
    std::fs::copy(&img, &before).unwrap();
    let (server, ctl) = serve(dir.path(), &img, "d");
    let archive = dir.path().join("a.vma");
    let job = Backup::start(&ctl, &archive, &["d"], &["--stall-timeout", "1000"], 0);
    // The header is written at the start: wait for the job to exist.
    let start = Instant::now();
    while control(&ctl, "query-jobs", "{}")
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let cmds = writes_go_on(dir.path(), "d", size, Duration::from_secs(15));
    let (code, err) = job.finish();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("took nothing") || err.contains("waited more than"),
        "{err}"
    );
    assert_eq!(server.stop(), 0, "the server did not stop cleanly");
    disk_has_every_write(&img, &before, &cmds);
}

/// The archive's file system fills up mid-way: the job fails with ENOSPC's words, guest
/// writes go on, the disk passes check.
#[test]
fn a_full_target_aborts_the_job_not_the_guest() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let (c, o) = common::run_status(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ],
    );
    if c != 0 {
        if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("cannot mount a small tmpfs: {o}");
        }
        eprintln!("skipping: cannot mount a small tmpfs: {o}");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let img = dir.path().join("disk.qcow2");
    let size = 32 * MIB;
    patterned(&img, size, 0xaa);
    let before = dir.path().join("before.qcow2");
    std::fs::copy(&img, &before).unwrap();
    let (server, ctl) = serve(dir.path(), &img, "d");
    let archive = mnt.join("a.vma");
    let out = Command::new(VIMG)
        .args(["backup", "create", "--server", ctl.to_str().unwrap()])
        .arg(&archive)
        .arg("d")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!archive.exists(), "the failed archive was left behind");
    let cmds = writes_go_on(dir.path(), "d", size, Duration::from_secs(15));
    assert_eq!(server.stop(), 0, "the server did not stop cleanly");
    disk_has_every_write(&img, &before, &cmds);
}

/// job-cancel mid-way, and kill -9 of the server mid-way: the guest's writes are all on the
/// disk and it passes check.
#[test]
fn cancel_and_kill_leave_the_disk_whole() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    for kill in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        let size = 32 * MIB;
        patterned(&img, size, 0xaa);
        let before = dir.path().join("before.qcow2");
        std::fs::copy(&img, &before).unwrap();
        let (mut server, ctl) = serve(dir.path(), &img, "d");
        let archive = dir.path().join("a.vma");
        let job = Backup::start(
            &ctl,
            &archive,
            &["d"],
            &["--stall-timeout", "30000"],
            2 * MIB,
        );
        job.wait_running();
        let cmds = writes_go_on(dir.path(), "d", size, Duration::from_secs(15));
        if kill {
            Command::new("kill")
                .args(["-9", &server.pid().to_string()])
                .status()
                .unwrap();
            let start = Instant::now();
            while server.alive() {
                assert!(start.elapsed() < Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            let jobs = control(&ctl, "query-jobs", "{}");
            let id = jobs[0]["id"].as_str().unwrap().to_string();
            control(&ctl, "job-cancel", &format!(r#"{{"id": "{id}"}}"#));
        }
        let (code, err) = job.finish();
        assert_eq!(code, 1, "{err}");
        if !kill {
            assert!(err.contains("cancelled"), "{err}");
        }
        if !kill {
            assert_eq!(server.stop(), 0);
        }
        disk_has_every_write(&img, &before, &cmds);
    }
}

/// Malformed control messages get error replies; the socket keeps answering, and several
/// clients are served at once.
#[test]
fn malformed_control_messages_get_errors() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    patterned(&img, MIB, 0xaa);
    let (_server, ctl) = serve(dir.path(), &img, "d");
    let connect = || {
        let s = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = std::io::BufReader::new(s.try_clone().unwrap());
        (s, r)
    };
    let (mut a, mut ra) = connect();
    let (mut b, mut rb) = connect();
    let line = |r: &mut std::io::BufReader<std::os::unix::net::UnixStream>| {
        let mut l = String::new();
        std::io::BufRead::read_line(r, &mut l).unwrap();
        serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    };
    assert!(line(&mut ra)["QMP"].is_object());
    assert!(line(&mut rb)["QMP"].is_object());
    // Before negotiation: refused.
    writeln!(a, r#"{{"execute": "query-jobs", "id": 1}}"#).unwrap();
    assert_eq!(line(&mut ra)["error"]["class"], "CommandNotFound");
    writeln!(a, r#"{{"execute": "qmp_capabilities"}}"#).unwrap();
    assert!(line(&mut ra)["return"].is_object());
    let mut seed = 7u64;
    let junk = [
        "garbage".to_string(),
        "[1, 2]".into(),
        r#"{"execute": 5}"#.into(),
        r#"{"execute": "backup-start", "arguments": {"devices": "d"}}"#.into(),
        r#"{"execute": "backup-start", "arguments": {"devices": ["d"], "target": "fd:none"}}"#
            .into(),
        r#"{"execute": "export-remove", "arguments": {"name": "zz"}}"#.into(),
        r#"{"execute": "getfd", "arguments": {"fdname": "x"}}"#.into(),
        r#"{"execute": "nope"}"#.into(),
        "x".repeat(2 << 20),
    ];
    for j in junk.iter().chain(std::iter::repeat_n(&String::new(), 30)) {
        let msg = if j.is_empty() {
            // Random bytes (no newline inside).
            (0..64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    match (seed % 94 + 33) as u8 {
                        b'\n' => b'?',
                        c => c,
                    }
                })
                .collect::<Vec<u8>>()
        } else {
            j.as_bytes().to_vec()
        };
        a.write_all(&msg).unwrap();
        a.write_all(b"\n").unwrap();
        let r = line(&mut ra);
        assert!(r["error"]["desc"].is_string(), "{r}");
        // The other client is still served meanwhile.
        writeln!(b, r#"{{"execute": "qmp_capabilities"}}"#).unwrap();
        let _ = line(&mut rb);
    }
    writeln!(a, r#"{{"execute": "query-exports", "id": "last"}}"#).unwrap();
    let r = line(&mut ra);
    assert_eq!(r["id"], "last");
    assert_eq!(r["return"][0]["name"], "d");
    // `vimg control ... | grep -q` : a reader gone is no panic.
    let (rx, tx) = std::io::pipe().unwrap();
    drop(rx);
    let out = Command::new(VIMG)
        .args(["control", ctl.to_str().unwrap(), "query-exports"])
        .stdout(tx)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
}

/// Exports added and removed while the server runs: NBD clients see them; removing one with a
/// client connected is refused unless forced, which disconnects the client.
#[test]
fn exports_are_added_and_removed() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    patterned(&a, MIB, 0xaa);
    patterned(&b, 2 * MIB, 0xbb);
    let (_server, ctl) = serve(dir.path(), &a, "a");
    control(
        &ctl,
        "export-add",
        &format!(
            r#"{{"name": "b", "file": "{}", "format": "qcow2"}}"#,
            b.display()
        ),
    );
    let (c, o) = common::run_status(
        VIMG,
        &[
            "control",
            ctl.to_str().unwrap(),
            "export-add",
            &format!(r#"{{"name": "b", "file": "{}"}}"#, b.display()),
        ],
    );
    assert_eq!(c, 1, "{o}");
    assert!(o.contains("already in use"), "{o}");
    let info = common::run("nbdinfo", &["--size", &nbd_uri(dir.path(), "b")]);
    assert_eq!(info.trim(), (2 * MIB).to_string());
    let list = common::run("nbdinfo", &["--list", "--json", &nbd_uri(dir.path(), "")]);
    assert!(list.contains("\"b\"") && list.contains("\"a\""), "{list}");
    // A client holding export b.
    let hold = format!(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri('{}')\nsys.stdin.read()\n",
        nbd_uri(dir.path(), "b")
    );
    let mut held = Command::new(PYTHON_LIBNBD)
        .args(["-c", &hold])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while control(&ctl, "query-exports", "{}")[1]["clients"] != 1 {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (c, o) = common::run_status(
        VIMG,
        &[
            "control",
            ctl.to_str().unwrap(),
            "export-remove",
            r#"{"name": "b"}"#,
        ],
    );
    assert_eq!(c, 1, "{o}");
    assert!(o.contains("client"), "{o}");
    control(&ctl, "export-remove", r#"{"name": "b", "mode": "hard"}"#);
    let exports = control(&ctl, "query-exports", "{}");
    assert_eq!(exports.as_array().unwrap().len(), 1);
    drop(held.stdin.take());
    let _ = held.wait();
    let (c, _) = common::run_status("nbdinfo", &["--size", &nbd_uri(dir.path(), "b")]);
    assert_ne!(c, 0, "a removed export is still served");
    check_clean(&b);
}

/// Persistent dirty bitmaps through the control socket, a backup to a path the server creates,
/// and its completion event.
#[test]
fn bitmaps_path_targets_and_events() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    patterned(&img, 4 * MIB, 0xaa);
    let (server, ctl) = serve(dir.path(), &img, "d");
    control(
        &ctl,
        "block-dirty-bitmap-add",
        r#"{"node": "d", "name": "b0"}"#,
    );
    control(
        &ctl,
        "block-dirty-bitmap-add",
        r#"{"node": "d", "name": "b1", "granularity": 131072}"#,
    );
    control(
        &ctl,
        "block-dirty-bitmap-disable",
        r#"{"node": "d", "name": "b1"}"#,
    );
    control(
        &ctl,
        "block-dirty-bitmap-add",
        r#"{"node": "d", "name": "gone"}"#,
    );
    control(
        &ctl,
        "block-dirty-bitmap-remove",
        r#"{"node": "d", "name": "gone"}"#,
    );
    let (c, o) = common::run_status(
        VIMG,
        &[
            "control",
            ctl.to_str().unwrap(),
            "block-dirty-bitmap-enable",
            r#"{"node": "d", "name": "nosuch"}"#,
        ],
    );
    assert_eq!(c, 1, "{o}");
    guest_io(dir.path(), "d", &["write -P 0xbb 1M 64k".to_string()]);

    // A raw client: backup-start to a path, then the event.
    let s = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut next = || {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut r, &mut l).unwrap();
        serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    };
    assert!(next()["QMP"].is_object());
    writeln!(w, r#"{{"execute": "qmp_capabilities"}}"#).unwrap();
    assert!(next()["return"].is_object());
    let archive = dir.path().join("a.vma");
    writeln!(
        w,
        r#"{{"execute": "backup-start", "arguments": {{"job-id": "j", "devices": ["d"], "target": "{}", "configs": [{{"name": "vm.conf", "data": "memory: 512\n"}}]}}, "id": 1}}"#,
        archive.display()
    )
    .unwrap();
    let mut event = None;
    while event.is_none() {
        let v = next();
        if v["event"] == "BLOCK_JOB_COMPLETED" {
            event = Some(v);
        } else if v.get("id").is_some() {
            assert_eq!(v["return"]["job-id"], "j", "{v}");
        }
    }
    let event = event.unwrap();
    assert_eq!(event["data"]["device"], "j");
    assert!(event["data"].get("error").is_none(), "{event}");
    assert_eq!(event["data"]["len"], 4 * MIB);
    let listing = common::run(VIMG, &["backup", "list", archive.to_str().unwrap()]);
    assert!(listing.contains("vm.conf"), "{listing}");
    common::run(VIMG, &["backup", "verify", archive.to_str().unwrap()]);
    // The concluded job (still listed) holds the export no more: it is removed and closed
    // at once.
    let start = Instant::now();
    control(&ctl, "export-remove", r#"{"name": "d"}"#);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(control(&ctl, "query-jobs", "{}")[0]["status"], "concluded");
    assert_eq!(server.stop(), 0);
    check_clean(&img);
    let info: Value = serde_json::from_str(&common::run(
        "qemu-img",
        &["info", "--output=json", img.to_str().unwrap()],
    ))
    .unwrap();
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap();
    let find = |n: &str| bitmaps.iter().find(|b| b["name"] == n).cloned();
    assert!(find("gone").is_none());
    let b0 = find("b0").unwrap();
    let b1 = find("b1").unwrap();
    assert!(
        b0["flags"].as_array().unwrap().iter().any(|f| f == "auto"),
        "{b0}"
    );
    assert!(b1["flags"].as_array().unwrap().is_empty(), "{b1}");
    assert_eq!(b1["granularity"], 131072);
    // b0 recorded the guest's write (as qemu-nbd sees it).
    let q = Server::qemu(&img, &dir.path().join("q.sock"), "q", &["-r", "-B", "b0"]);
    let map = common::run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &q.uri()]);
    let dirty: Vec<&str> = map.lines().filter(|l| l.contains("dirty")).collect();
    assert_eq!(dirty.len(), 1, "{map}");
    let f: Vec<&str> = dirty[0].split_whitespace().collect();
    assert_eq!((f[0], f[1]), ("1048576", "65536"), "{map}");
}

/// `backup create --server` interrupted (SIGINT): the server cancels the job it started, so
/// nothing writes to the command's output any more.
#[test]
fn an_interrupted_command_cancels_its_job() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    patterned(&img, 64 * MIB, 0xaa);
    let (server, ctl) = serve(dir.path(), &img, "d");
    let archive = dir.path().join("a.vma");
    let job = Backup::start(&ctl, &archive, &["d"], &["--stall-timeout", "30000"], MIB);
    job.wait_running();
    Command::new("kill")
        .args(["-INT", &job.child.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    loop {
        let jobs = control(&ctl, "query-jobs", "{}");
        let j = &jobs[0];
        if j["status"] == "concluded" {
            assert!(
                j["error"].as_str().unwrap_or("").contains("cancelled"),
                "{j}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "job not cancelled: {j}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _) = job.finish();
    assert_ne!(code, 0);
    assert_eq!(server.stop(), 0);
    check_clean(&img);
}

/// Polls `query-jobs` until job `id` has concluded: its entry.
fn wait_job(ctl: &Path, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let jobs = control(ctl, "query-jobs", "{}");
        let job = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no job {id}: {jobs}"));
        if job["status"] == "concluded" {
            return job;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{job}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `qemu-img convert` of `src` (an image or an NBD URI) to raw file `out`: its bytes.
fn raw_copy(src: &str, fmt: &str, out: &Path) -> Vec<u8> {
    common::run(
        "qemu-img",
        &[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            src,
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// The dirty extents of `nbdinfo --map=qemu:dirty-bitmap:NAME` of `uri`: (offset, length).
fn dirty_map(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let map = common::run(
        "nbdinfo",
        &[&format!("--map=qemu:dirty-bitmap:{bitmap}"), uri],
    );
    map.lines()
        .filter(|l| l.contains("dirty"))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(2)
                .map(|n| n.parse().unwrap())
                .collect();
            (f[0], f[1])
        })
        .collect()
}

/// Fleecing through the server: while the guest overwrites pattern A with B, the fleecing
/// export reads A everywhere and offers the bitmap as frozen at `fleece-start`; the live disk
/// has every write; `fleece-stop` removes the export and the temporary file.
#[test]
fn fleecing_export_reads_the_disk_as_it_was() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 8 * MIB;
    patterned(&img, size, 0xaa);
    let before = dir.path().join("before.qcow2");
    std::fs::copy(&img, &before).unwrap();
    let (server, ctl) = serve(dir.path(), &img, "d");
    control(
        &ctl,
        "block-dirty-bitmap-add",
        r#"{"node": "d", "name": "b0"}"#,
    );
    let first = vec!["write -P 0xcc 1M 64k".to_string()];
    guest_io(dir.path(), "d", &first);
    common::qemu_io(&before, "qcow2", &first);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let r = control(
        &ctl,
        "fleece-start",
        &format!(
            r#"{{"device": "d", "name": "f", "bitmap": "b0", "memory-bound": 131072, "temp-dir": "{}"}}"#,
            tmp.display()
        ),
    );
    let id = r["job-id"].as_str().unwrap().to_string();
    // The guest overwrites six chunks (two of them dirty in the bitmap already), more than
    // the memory bound holds.
    let writes: Vec<String> = [0u64, MIB, MIB + CS, 3 * MIB + 100, 5 * MIB, size - 4096]
        .iter()
        .map(|o| format!("write -P 0xbb {o} 4096"))
        .collect();
    guest_io(dir.path(), "d", &writes);
    // The export of the live disk is in use by the fleece.
    let (c, o) = common::run_status(
        VIMG,
        &[
            "control",
            ctl.to_str().unwrap(),
            "export-remove",
            r#"{"name": "d"}"#,
        ],
    );
    assert_ne!(c, 0, "{o}");
    let info = control(&ctl, "query-jobs", "{}");
    let job = info
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(job["chunks-kept"], 6, "{job}");
    assert_eq!(job["broken"], false, "{job}");
    assert!(job["file-bytes"].as_u64().unwrap() > 0, "{job}");
    let spill = PathBuf::from(job["file"].as_str().unwrap());
    assert!(spill.starts_with(&tmp) && spill.exists(), "{job}");

    let expect = raw_copy(
        before.to_str().unwrap(),
        "qcow2",
        &dir.path().join("exp.raw"),
    );
    // The guest writes to every cluster while the fleecing export is copied.
    let more: Vec<String> = (0..size / CS)
        .map(|i| format!("write -P 0xbd {} 4096", i * CS + 8192))
        .collect();
    let guest = {
        let (d, more) = (dir.path().to_path_buf(), more.clone());
        std::thread::spawn(move || guest_io(&d, "d", &more))
    };
    let fleeced = raw_copy(&nbd_uri(dir.path(), "f"), "raw", &dir.path().join("f.raw"));
    guest.join().unwrap();
    assert!(
        fleeced == expect,
        "the fleecing export is not the disk at fleece-start"
    );
    assert_eq!(
        dirty_map(&nbd_uri(dir.path(), "f"), "b0"),
        vec![(MIB, CS)],
        "the fleecing export's bitmap is not the one frozen at the start"
    );

    // A client connected to the fleecing export: fleece-stop is refused unless forced.
    let hold = format!(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri('{}')\nsys.stdin.read()\n",
        nbd_uri(dir.path(), "f")
    );
    let mut holder = Command::new(PYTHON_LIBNBD)
        .args(["-c", &hold])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let clients_of_f = || {
        control(&ctl, "query-exports", "{}")
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "f")
            .map(|e| e["clients"].as_u64().unwrap())
    };
    while clients_of_f() != Some(1) {
        assert!(start.elapsed() < Duration::from_secs(20), "no client");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (c, o) = common::run_status(
        VIMG,
        &[
            "control",
            ctl.to_str().unwrap(),
            "fleece-stop",
            r#"{"name": "f"}"#,
        ],
    );
    assert_ne!(c, 0, "{o}");
    assert!(o.contains("client"), "{o}");
    assert!(spill.exists());
    control(&ctl, "fleece-stop", r#"{"name": "f", "force": true}"#);
    drop(holder.stdin.take());
    let _ = holder.wait();
    let exports = control(&ctl, "query-exports", "{}");
    assert!(
        !exports.as_array().unwrap().iter().any(|e| e["name"] == "f"),
        "{exports}"
    );
    assert!(!spill.exists(), "the temporary file is left");
    assert_eq!(wait_job(&ctl, &id)["status"], "concluded");
    // The live export is free again.
    let (c, o) = common::run_status(
        VIMG,
        &["control", ctl.to_str().unwrap(), "query-exports", "{}"],
    );
    assert_eq!(c, 0, "{o}");
    assert_eq!(server.stop(), 0);
    common::qemu_io(&before, "qcow2", &writes);
    common::qemu_io(&before, "qcow2", &more);
    let (c, o) = common::run_status(
        "qemu-img",
        &["compare", img.to_str().unwrap(), before.to_str().unwrap()],
    );
    assert_eq!(c, 0, "a guest write is missing from the live disk: {o}");
    check_clean(&img);
}

/// Incremental backups through the server: a full one, then rounds of guest writes and
/// incremental backups; each overlay is clean and converts to the disk as it was at its
/// backup; a backup that fails (its directory missing) leaves the bitmap for the next one.
#[test]
fn incremental_backups_through_the_server_restore_each_round() {
    if !nbd_tools_available("live_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 8 * MIB;
    patterned(&img, size, 0xaa);
    let (server, ctl) = serve(dir.path(), &img, "d");
    control(
        &ctl,
        "block-dirty-bitmap-add",
        r#"{"node": "d", "name": "b0"}"#,
    );
    let d = dir.path();
    let backup = |id: &str, sync: &str, target: &Path, previous: Option<&str>| -> Value {
        let prev = previous
            .map(|p| format!(r#", "previous": "{p}""#))
            .unwrap_or_default();
        let r = control(
            &ctl,
            "backup-start",
            &format!(
                r#"{{"job-id": "{id}", "sync": "{sync}", "format": "qcow2", "devices": ["d"], "bitmap": "b0", "target": "{}"{prev}}}"#,
                target.display()
            ),
        );
        assert_eq!(r["job-id"], id);
        wait_job(&ctl, id)
    };
    // The disk while the guest is idle, and the overlay restored, compared.
    let round = |n: usize, target: &Path| {
        let now = raw_copy(&nbd_uri(d, "d"), "raw", &d.join(format!("now{n}.raw")));
        check_clean(target);
        let restored = raw_copy(
            target.to_str().unwrap(),
            "qcow2",
            &d.join(format!("restored{n}.raw")),
        );
        assert!(restored == now, "backup {n} does not restore the disk");
    };
    // Malformed requests are refused at once.
    for bad in [
        r#"{"sync": "incremental", "format": "qcow2", "devices": ["d"], "bitmap": "b0", "target": "/nonexistent/x"}"#,
        r#"{"sync": "full", "format": "raw", "devices": ["d"], "bitmap": "b0", "target": "/nonexistent/x"}"#,
        r#"{"sync": "top", "format": "qcow2", "devices": ["d"], "bitmap": "b0", "target": "/nonexistent/x"}"#,
        r#"{"sync": "full", "format": "qcow2", "devices": ["d", "d"], "bitmap": "b0", "target": "/nonexistent/x"}"#,
    ] {
        let (c, o) = common::run_status(
            VIMG,
            &["control", ctl.to_str().unwrap(), "backup-start", bad],
        );
        assert_ne!(c, 0, "{bad}: {o}");
    }
    let full = d.join("full.qcow2");
    let job = backup("j0", "full", &full, None);
    assert!(job.get("error").is_none(), "{job}");
    round(0, &full);

    let writes = |pattern: u8, offsets: &[u64]| {
        let cmds: Vec<String> = offsets
            .iter()
            .map(|o| format!("write -P {pattern} {o} 8192"))
            .collect();
        guest_io(d, "d", &cmds);
    };
    writes(0xb1, &[0, 2 * MIB + 5000]);
    let inc1 = d.join("inc1.qcow2");
    let job = backup("j1", "incremental", &inc1, Some("full.qcow2"));
    assert!(job.get("error").is_none(), "{job}");
    assert_eq!(job["bytes-written"], 2 * CS, "{job}");
    round(1, &inc1);

    writes(0xb2, &[CS, 6 * MIB]);
    // Round 2 through the CLI (a relative target: the command makes it absolute).
    let inc2 = d.join("inc2.qcow2");
    let out = Command::new(VIMG)
        .current_dir(d)
        .args(["backup", "create", "-v", "--server", ctl.to_str().unwrap()])
        .args([
            "--incremental",
            "b0",
            "--previous",
            "inc1.qcow2",
            "inc2.qcow2",
            "d",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("{} bytes written", 2 * CS)), "{err}");
    round(2, &inc2);

    // A backup into a missing directory fails; the bitmap keeps its bits.
    writes(0xb3, &[4 * MIB, 7 * MIB]);
    let lost = d.join("missing").join("inc3.qcow2");
    let job = backup("j3", "incremental", &lost, Some(inc2.to_str().unwrap()));
    assert!(
        job["error"].as_str().is_some_and(|e| e.contains("missing")),
        "{job}"
    );
    // Through the CLI, a failure is the job's reason and exit code 1.
    let out = Command::new(VIMG)
        .args(["backup", "create", "--server", ctl.to_str().unwrap()])
        .args(["--incremental", "b0", "--previous", inc2.to_str().unwrap()])
        .arg(&lost)
        .arg("d")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("failed") && err.contains("missing"), "{err}");
    writes(0xb4, &[7 * MIB + CS]);
    let inc3 = d.join("inc3.qcow2");
    let job = backup("j3b", "incremental", &inc3, Some("inc2.qcow2"));
    assert!(job.get("error").is_none(), "{job}");
    assert_eq!(job["bytes-written"], 3 * CS, "{job}");
    round(3, &inc3);
    let chain = common::run(
        "qemu-img",
        &["info", "--backing-chain", inc3.to_str().unwrap()],
    );
    assert!(chain.contains("full.qcow2"), "{chain}");
    assert_eq!(server.stop(), 0);
    check_clean(&img);
}
