//! vimg's NBD client (issue 18) against qemu-nbd and nbdkit: every command on an `nbd://` or
//! `nbd+unix://` image gives what it gives on the local file, and what qemu-img gives on the
//! same URL where qemu-img prints it (info and map JSON); writes through vimg over NBD (with
//! the server's block size constraints) are checked against an in-memory model; a server
//! that errs at one offset gives an error naming the peer; hostile servers (a fake one in
//! this file) give a one-line error, never a panic or a hang.

use crate::common;

use common::{assert_no_failures, qemu_available, qemu_create, qemu_io, run, run_status, Rng};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Whether `tool` runs (`--version`); like [`qemu_available`], fatal under
/// `VIMG_REQUIRE_QEMU=1`.
fn tool_available(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: {tool} not found but VIMG_REQUIRE_QEMU=1");
        }
        eprintln!("{test}: skipping: {tool} not found");
    }
    ok
}

/// A server process on a unix socket, killed when dropped.
struct Served {
    child: Child,
    /// The export's URL.
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(sock: &Path, child: &mut Child) {
    let start = Instant::now();
    while !sock.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("server exited ({st}): {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no socket {sock:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-nbd -t -x EXPORT -k SOCK ARGS FILE`.
fn qemu_nbd(dir: &Path, tag: &str, args: &[&str], file: &Path) -> Served {
    let sock = dir.join(format!("{tag}.sock"));
    let mut child = Command::new("qemu-nbd")
        .args(["-t", "-x", tag, "-k", p(&sock)])
        .args(args)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-nbd");
    wait_for_socket(&sock, &mut child);
    Served {
        child,
        url: format!("nbd+unix:///{tag}?socket={}", sock.display()),
    }
}

/// `nbdkit -f -U SOCK ARGS` (the default export).
fn nbdkit(dir: &Path, tag: &str, args: &[&str]) -> Served {
    let sock = dir.join(format!("{tag}.sock"));
    let mut child = Command::new("nbdkit")
        .args(["-f", "-U", p(&sock)])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdkit");
    wait_for_socket(&sock, &mut child);
    Served {
        child,
        url: format!("nbd+unix://?socket={}", sock.display()),
    }
}

fn vimg(args: &[&str]) -> (i32, String) {
    run_status(VIMG, args)
}

/// Compares what vimg and qemu-img print for `args` (both must succeed).
fn same_as_qemu(args: &[&str], failures: &mut Vec<String>) {
    let (vc, v) = vimg(args);
    let v = v.replace("vimg: ", "qemu-img: ");
    let (qc, q) = run_status("qemu-img", args);
    if (vc, &v) != (qc, &q) {
        failures.push(format!(
            "{args:?}: vimg ({vc}):\n{v}\nqemu-img ({qc}):\n{q}"
        ));
    }
}

/// A qcow2 image with data, zero clusters, unallocated ranges and an unaligned write.
fn sample_qcow2(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_create(&img, "qcow2", "", None, 64 << 20);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x11 0 1M".into(),
            "write -z 4M 1M".into(),
            "write -P 0x22 10M 3000".into(),
            "write -P 0x33 63M 1M".into(),
        ],
    );
    img
}

#[test]
fn qemu_nbd_exports_read_as_their_images() {
    if !qemu_available("qemu_nbd_exports_read_as_their_images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sample_qcow2(dir.path(), "a.qcow2");
    let mut failures = Vec::new();
    for (tag, args) in [
        ("plain", vec!["-r", "-f", "qcow2"]),
        ("shared", vec!["-r", "-f", "qcow2", "-e", "4"]),
        ("depth", vec!["-r", "-f", "qcow2", "--allocation-depth"]),
    ] {
        let s = qemu_nbd(dir.path(), tag, &args, &img);
        let u = s.url.as_str();
        for cmd in [
            vec!["info", u],
            vec!["info", "--output=json", u],
            vec!["map", "--output=json", u],
            vec!["map", u],
            vec!["check", u],
            vec!["measure", "-O", "qcow2", u],
            vec!["measure", "-O", "raw", u],
        ] {
            same_as_qemu(&cmd, &mut failures);
        }
        // What it gives on the local file.
        let (c, out) = vimg(&["compare", u, p(&img)]);
        if c != 0 {
            failures.push(format!("{tag}: compare with the local image: {out}"));
        }
        let out_raw = dir.path().join(format!("{tag}.raw"));
        run(VIMG, &["convert", "-O", "raw", u, p(&out_raw)]);
        run("qemu-img", &["compare", p(&out_raw), p(&img)]);
        let out_q = dir.path().join(format!("{tag}.qcow2"));
        run(VIMG, &["convert", "-O", "qcow2", u, p(&out_q)]);
        run("qemu-img", &["compare", p(&out_q), p(&img)]);
        run("qemu-img", &["check", p(&out_q)]);
        // The three other spellings of the same export.
        let sock = dir.path().join(format!("{tag}.sock"));
        let json = format!(
            r#"json:{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"export":"{tag}"}}"#,
            sock.display()
        );
        let opts = format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={tag}",
            sock.display()
        );
        let legacy = format!("nbd:unix:{}:exportname={tag}", sock.display());
        for name in [json.as_str(), legacy.as_str()] {
            let (c, out) = vimg(&["compare", name, p(&img)]);
            if c != 0 {
                failures.push(format!("{name}: {out}"));
            }
        }
        let (c, out) = vimg(&[
            "compare",
            "--image-opts",
            &opts,
            &format!("driver=qcow2,file.filename={}", p(&img)),
        ]);
        if c != 0 {
            failures.push(format!("{opts}: {out}"));
        }
        same_as_qemu(
            &["map", "--output=json", "--image-opts", &opts],
            &mut failures,
        );
    }
    // A server that is not persistent (no -t) serves one client and exits when it goes: the
    // format probe and the copy share one connection, closed when the command ends.
    let sock = dir.path().join("once.sock");
    let mut once = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-x", "once", "-k", p(&sock), p(&img)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut once);
    let out_once = dir.path().join("once.raw");
    let url_once = format!("nbd+unix:///once?socket={}", sock.display());
    run(VIMG, &["convert", "-O", "raw", &url_once, p(&out_once)]);
    run("qemu-img", &["compare", p(&out_once), p(&img)]);
    let start = Instant::now();
    while once.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "qemu-nbd still waits for vimg to go"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Over TCP too.
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut child = Command::new("qemu-nbd")
        .args([
            "-t",
            "-r",
            "-f",
            "qcow2",
            "-x",
            "tcp",
            "-b",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("nbd://127.0.0.1:{port}/tcp");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    // (The probe connection above is the one client qemu-nbd serves at a time: wait for it
    // to go.)
    std::thread::sleep(Duration::from_millis(200));
    same_as_qemu(&["info", "--output=json", &url], &mut failures);
    same_as_qemu(
        &[
            "map",
            "--output=json",
            &format!("nbd://127.0.0.1:{port}/tcp"),
        ],
        &mut failures,
    );
    let (c, out) = vimg(&["compare", &url, p(&img)]);
    if c != 0 {
        failures.push(format!("{url}: {out}"));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_no_failures(&failures);
}

#[test]
fn qcow2_served_raw_is_opened_as_qcow2() {
    if !qemu_available("qcow2_served_raw_is_opened_as_qcow2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sample_qcow2(dir.path(), "a.qcow2");
    let s = qemu_nbd(dir.path(), "rawq", &["-r", "-f", "raw"], &img);
    let u = s.url.as_str();
    let mut failures = Vec::new();
    for cmd in [
        vec!["info", "--output=json", u],
        vec!["info", "-f", "qcow2", u],
        vec!["map", "--output=json", "-f", "qcow2", u],
        vec!["check", "-f", "qcow2", u],
        vec!["check", "--output=json", u],
        vec!["measure", "-O", "qcow2", u],
    ] {
        same_as_qemu(&cmd, &mut failures);
    }
    let out = dir.path().join("out.raw");
    run(VIMG, &["convert", "-f", "qcow2", "-O", "raw", u, p(&out)]);
    run("qemu-img", &["compare", p(&out), p(&img)]);
    let (c, msg) = vimg(&["compare", "-f", "qcow2", "-F", "qcow2", u, p(&img)]);
    assert_eq!(c, 0, "{msg}");
    assert_no_failures(&failures);
}

#[test]
fn dirty_bitmap_maps_as_qemu_img_maps_it() {
    if !qemu_available("dirty_bitmap_maps_as_qemu_img_maps_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_create(&img, "qcow2", "", None, 16 << 20);
    qemu_io(&img, "qcow2", &["write -P 1 0 2M".into()]);
    run("qemu-img", &["bitmap", "--add", p(&img), "b0"]);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 2 1M 64k".into(), "write -P 3 8M 1M".into()],
    );
    let s = qemu_nbd(
        dir.path(),
        "d",
        &["-r", "-f", "qcow2", "-B", "b0", "-A"],
        &img,
    );
    let sock = dir.path().join("d.sock");
    let base = format!(
        "driver=nbd,server.type=unix,server.path={},export=d",
        sock.display()
    );
    let bitmap = format!("{base},x-dirty-bitmap=qemu:dirty-bitmap:b0");
    let mut failures = Vec::new();
    for o in [&base, &bitmap] {
        for f in ["--output=json", "--output=human"] {
            same_as_qemu(&["map", f, "--image-opts", o], &mut failures);
        }
    }
    // The dirty ranges are really reported as such (not only as qemu-img does).
    let (_, m) = vimg(&["map", "--output=json", "--image-opts", &bitmap]);
    assert!(
        m.contains(r#""start": 8388608, "length": 1048576, "depth": 0, "present": false"#),
        "{m}"
    );
    let missing = format!("{base},x-dirty-bitmap=qemu:dirty-bitmap:nope");
    let (c, out) = vimg(&["map", "--image-opts", &missing]);
    assert_eq!(c, 1, "{out}");
    assert!(
        out.contains("qemu:dirty-bitmap:nope") && out.lines().count() == 1,
        "{out}"
    );
    drop(s);
    assert_no_failures(&failures);
}

#[test]
fn nbdkit_plugins_read_as_qemu_img_reads_them() {
    if !qemu_available("nbdkit_plugins") || !tool_available("nbdkit", "nbdkit_plugins") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (tag, args) in [
        ("pattern", vec!["pattern", "size=8M"]),
        ("sparse", vec!["sparse-random", "size=64M", "seed=7"]),
        ("memory", vec!["memory", "size=8M"]),
        (
            "delay",
            vec!["--filter=delay", "pattern", "size=4M", "delay-read=2ms"],
        ),
        (
            "noext",
            vec!["--filter=noextents", "sparse-random", "size=16M", "seed=3"],
        ),
    ] {
        let s = nbdkit(dir.path(), tag, &args);
        let u = s.url.as_str();
        for cmd in [
            vec!["info", "--output=json", u],
            vec!["map", "--output=json", u],
            vec!["measure", "-O", "qcow2", u],
        ] {
            same_as_qemu(&cmd, &mut failures);
        }
        let out = dir.path().join(format!("{tag}.raw"));
        run(VIMG, &["convert", "-O", "raw", u, p(&out)]);
        let (c, msg) = run_status(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", p(&out), u],
        );
        if c != 0 {
            failures.push(format!("{tag}: convert: {msg}"));
        }
        let (c, msg) = vimg(&["compare", u, p(&out)]);
        if c != 0 {
            failures.push(format!("{tag}: compare: {msg}"));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn a_read_error_at_one_offset_names_the_peer() {
    if !qemu_available("read_error") || !tool_available("nbdkit", "read_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Zeros everywhere but at 4 MiB, where every read fails with EIO.
    let pread = "if [ $4 -le 4194304 ] && [ $(($4 + $3)) -gt 4194304 ]; then echo 'EIO bad sector' >&2; exit 1; fi; head -c $3 /dev/zero";
    let s = nbdkit(
        dir.path(),
        "err",
        &["eval", "get_size=echo 8388608", &format!("pread={pread}")],
    );
    let out = dir.path().join("o.raw");
    let (c, msg) = vimg(&["convert", "-O", "raw", &s.url, p(&out)]);
    assert_eq!(c, 1, "{msg}");
    let line = msg.trim_end();
    assert_eq!(line.lines().count(), 1, "{msg}");
    assert!(
        line.contains(&s.url) && line.contains("Input/output error"),
        "{msg}"
    );
    let (qc, _) = run_status("qemu-img", &["convert", "-O", "raw", &s.url, p(&out)]);
    assert_ne!(qc, 0);
    // nbdkit's error filter, failing every read: the same one line.
    let f = nbdkit(
        dir.path(),
        "errf",
        &[
            "--filter=error",
            "pattern",
            "size=8M",
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    let (c, msg) = vimg(&["convert", "-f", "raw", "-O", "raw", &f.url, p(&out)]);
    assert_eq!(c, 1, "{msg}");
    assert_eq!(msg.trim_end().lines().count(), 1, "{msg}");
    assert!(
        msg.contains(&f.url) && msg.contains("Input/output error"),
        "{msg}"
    );
    // Reads away from the bad sector still work.
    let (c, msg) = vimg(&[
        "dd",
        "-f",
        "raw",
        "-O",
        "raw",
        "bs=1M",
        "count=2",
        &format!("if={}", s.url),
        &format!("of={}", p(&out)),
    ]);
    assert_eq!(c, 0, "{msg}");
    assert_eq!(std::fs::read(&out).unwrap(), vec![0u8; 2 << 20]);
}

/// Random unaligned writes and reads through vimg's library over NBD, checked against a
/// model of the disk, then the export read back by qemu-img.
fn random_io(url: &str, size: u64, seed: u64, threads: u64) {
    use vimg::open::{open_image, OpenOptions};
    use vimg::GuestOffset;
    let image = open_image(
        Path::new(url),
        &OpenOptions {
            format: Some(vimg::ImageFormat::Raw),
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let image: &dyn vimg::BlockImage = image.as_ref();
    let part = size / threads;
    let models: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                sc.spawn(move || {
                    let base = t * part;
                    let mut model = vec![0u8; part as usize];
                    image.read_at(&mut model, GuestOffset(base)).unwrap();
                    let mut rng = Rng::seeded(seed + t);
                    for i in 0..120 {
                        let len = 1 + rng.below(150_000.min(part - 1));
                        let off = rng.below(part - len);
                        if i % 3 == 2 {
                            let mut got = vec![0u8; len as usize];
                            image.read_at(&mut got, GuestOffset(base + off)).unwrap();
                            assert!(
                                got == model[off as usize..(off + len) as usize],
                                "read at {}",
                                base + off
                            );
                        } else {
                            let b = (rng.next() & 0xff) as u8;
                            let data: Vec<u8> = (0..len).map(|k| b ^ (k as u8)).collect();
                            image.write_at(&data, GuestOffset(base + off)).unwrap();
                            model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        }
                    }
                    model
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    image.flush().unwrap();
    let mut all = vec![0u8; size as usize];
    image.read_at(&mut all, GuestOffset(0)).unwrap();
    let want: Vec<u8> = models.concat();
    assert!(
        all[..want.len()] == want[..],
        "whole read-back differs from the model"
    );
}

#[test]
fn random_writes_over_nbd_match_a_model() {
    if !qemu_available("random_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.raw");
    qemu_create(&img, "raw", "", None, 16 << 20);
    {
        let s = qemu_nbd(dir.path(), "w", &["-f", "raw", "-e", "4"], &img);
        random_io(&s.url, 16 << 20, 1, 4);
    }
    if !tool_available("nbdkit", "random_writes") {
        return;
    }
    // A server that refuses requests not aligned to 4 KiB or longer than 64 KiB: vimg
    // splits and aligns (read-modify-write).
    let s = nbdkit(
        dir.path(),
        "policy",
        &[
            "--filter=blocksize-policy",
            "memory",
            "size=8M",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    random_io(&s.url, 8 << 20, 2, 2);
    let s2 = nbdkit(
        dir.path(),
        "policy512",
        &[
            "--filter=blocksize-policy",
            "memory",
            "size=4M",
            "blocksize-minimum=512",
            "blocksize-error-policy=error",
        ],
    );
    random_io(&s2.url, 4 << 20, 3, 1);
    // nbdkit's blocksize filter (it aligns on the server's side), and a server without
    // WRITE_ZEROES (vimg writes zeros itself).
    let s3 = nbdkit(
        dir.path(),
        "blocksize",
        &[
            "--filter=blocksize",
            "memory",
            "size=4M",
            "minblock=4096",
            "maxdata=65536",
        ],
    );
    random_io(&s3.url, 4 << 20, 4, 2);
    let s4 = nbdkit(
        dir.path(),
        "nozero",
        &["--filter=nozero", "memory", "size=8M", "zeromode=none"],
    );
    let src = dir.path().join("src.qcow2");
    qemu_create(&src, "qcow2", "", None, 8 << 20);
    qemu_io(
        &src,
        "qcow2",
        &["write -P 0x44 1M 1M".into(), "write -z 2M 1M".into()],
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x99 0 8M", &s4.url],
    );
    run(VIMG, &["convert", "-n", "-O", "raw", p(&src), &s4.url]);
    run("qemu-img", &["compare", p(&src), &s4.url]);
}

#[test]
fn nbd_exports_as_targets_and_backing_files() {
    if !qemu_available("nbd_targets") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = sample_qcow2(dir.path(), "src.qcow2");
    let export = dir.path().join("t.raw");
    qemu_create(&export, "raw", "", None, 64 << 20);
    qemu_io(&export, "raw", &["write -P 0x5a 0 64M".into()]);
    let s = qemu_nbd(dir.path(), "t", &["-f", "raw", "-e", "4"], &export);
    let u = s.url.as_str();
    // convert -n and without -n: the old data is overwritten, zeros included.
    run(VIMG, &["convert", "-n", "-O", "raw", p(&src), u]);
    run("qemu-img", &["compare", p(&src), u]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 64M", u]);
    run(VIMG, &["convert", "-O", "raw", p(&src), u]);
    run("qemu-img", &["compare", p(&src), u]);
    // Too large a source: qemu's words.
    let big = dir.path().join("big.raw");
    qemu_create(&big, "raw", "", None, 100 << 20);
    let (c, v) = vimg(&["convert", "-O", "raw", p(&big), u]);
    let (qc, q) = run_status("qemu-img", &["convert", "-O", "raw", p(&big), u]);
    assert_eq!((c, qc), (1, 1), "{v}{q}");
    assert!(
        v.contains("Cannot grow NBD nodes") && q.contains("Cannot grow NBD nodes"),
        "{v}{q}"
    );
    // commit into an export that is a backing file.
    let ov = dir.path().join("ov.qcow2");
    run(
        VIMG,
        &["create", "-f", "qcow2", "-b", u, "-F", "raw", p(&ov)],
    );
    qemu_io(
        &ov,
        "qcow2",
        &["write -P 0x77 2M 1M".into(), "write -z 63M 64k".into()],
    );
    let expect = dir.path().join("expect.raw");
    run("qemu-img", &["convert", "-O", "raw", p(&ov), p(&expect)]);
    run(VIMG, &["commit", p(&ov)]);
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&expect), u],
    );
    // rebase off an export, and onto one.
    let ov2 = dir.path().join("ov2.qcow2");
    run(
        VIMG,
        &["create", "-f", "qcow2", "-b", u, "-F", "raw", p(&ov2)],
    );
    qemu_io(&ov2, "qcow2", &["write -P 0x66 8M 64k".into()]);
    let before = dir.path().join("before.raw");
    run("qemu-img", &["convert", "-O", "raw", p(&ov2), p(&before)]);
    run(VIMG, &["rebase", "-b", "", p(&ov2)]);
    run("qemu-img", &["compare", p(&before), p(&ov2)]);
    run("qemu-img", &["check", p(&ov2)]);
    let ov3 = dir.path().join("ov3.qcow2");
    run("qemu-img", &["convert", "-O", "qcow2", p(&src), p(&ov3)]);
    run(VIMG, &["rebase", "-b", u, "-F", "raw", p(&ov3)]);
    run("qemu-img", &["compare", p(&src), p(&ov3)]);
    run("qemu-img", &["check", p(&ov3)]);
    // backup create from the export, extract into it.
    let vma = dir.path().join("b.vma");
    run(
        VIMG,
        &[
            "backup",
            "create",
            "-d",
            &format!("drive-scsi0={u}"),
            p(&vma),
        ],
    );
    let saved = dir.path().join("saved.raw");
    run("qemu-img", &["convert", "-O", "raw", u, p(&saved)]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x12 0 64M", u]);
    run(
        VIMG,
        &[
            "backup",
            "extract",
            p(&vma),
            "--target",
            &format!("drive-scsi0={u}"),
        ],
    );
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&saved), u],
    );
    // A relative backing name recorded in an image on an export: qemu's refusal.
    let img_on = dir.path().join("q_on.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "base.raw",
            "-F",
            "raw",
            p(&img_on),
            "1M",
        ],
    );
    run(
        VIMG,
        &["convert", "-n", "-O", "raw", "-f", "raw", p(&img_on), u],
    );
    let (c, out) = vimg(&["info", "--backing-chain", "-f", "qcow2", u]);
    assert_eq!(c, 1, "{out}");
    assert!(
        out.contains("Cannot generate a base directory for NBD nodes"),
        "{out}"
    );
}

#[test]
fn read_only_export_refuses_writes_in_one_line() {
    if !qemu_available("read_only_export") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = sample_qcow2(dir.path(), "src.qcow2");
    let export = dir.path().join("ro.raw");
    qemu_create(&export, "raw", "", None, 64 << 20);
    let s = qemu_nbd(dir.path(), "ro", &["-r", "-f", "raw"], &export);
    let (c, out) = vimg(&["convert", "-n", "-O", "raw", p(&src), &s.url]);
    assert_eq!(c, 1, "{out}");
    assert_eq!(out.trim_end().lines().count(), 1, "{out}");
    assert!(
        out.contains(&s.url) && out.contains("not permitted"),
        "{out}"
    );
    let mut failures = Vec::new();
    same_as_qemu(&["info", "nbd://127.0.0.1:1/x"], &mut failures);
    same_as_qemu(
        &["info", "nbd+unix:///x?socket=/nonexistent/sock"],
        &mut failures,
    );
    assert_no_failures(&failures);
    let (c, out) = vimg(&["info", "nbd+unix:///x?socket=/nonexistent/sock"]);
    assert_eq!(c, 1);
    assert!(
        out.contains("nbd+unix:///x?socket=/nonexistent/sock") && out.contains("No such file"),
        "{out}"
    );
}

// A fake server for the hostile cases: a thread on a unix socket that negotiates structured
// replies and base:allocation, then misbehaves as told.

#[derive(Clone, Copy, Debug)]
enum Hostile {
    BadGreeting,
    HangUpInHandshake,
    OversizedOptionReply,
    BadReplyMagic,
    UnknownCookie,
    OversizedChunk,
    HangUpMidReply,
    ZeroLengthExtent,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

fn fake_server(sock: &Path, how: Hostile) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let Ok((mut c, _)) = listener.accept() else {
            return;
        };
        c.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let _ = serve_hostile(&mut c, how);
        std::thread::sleep(Duration::from_millis(100));
    })
}

fn serve_hostile(c: &mut std::os::unix::net::UnixStream, how: Hostile) -> std::io::Result<()> {
    const IHAVEOPT: u64 = 0x49484156454F5054;
    const REP: u64 = 0x3e889045565a9;
    if let Hostile::BadGreeting = how {
        c.write_all(b"NOTNBD!!IHAVEOPT\x00\x03")?;
        return Ok(());
    }
    c.write_all(&0x4e42444d41474943u64.to_be_bytes())?;
    c.write_all(&IHAVEOPT.to_be_bytes())?;
    c.write_all(&3u16.to_be_bytes())?;
    let mut b4 = [0u8; 4];
    c.read_exact(&mut b4)?;
    if let Hostile::HangUpInHandshake = how {
        return Ok(());
    }
    let reply = |c: &mut std::os::unix::net::UnixStream, opt: u32, kind: u32, data: &[u8]| {
        let mut v = REP.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        c.write_all(&v)
    };
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h)?;
        let opt = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        match opt {
            11 => reply(c, opt, 0x8000_0001, &[])?,
            8 => {
                if let Hostile::OversizedOptionReply = how {
                    let mut v = REP.to_be_bytes().to_vec();
                    v.extend_from_slice(&opt.to_be_bytes());
                    v.extend_from_slice(&1u32.to_be_bytes());
                    v.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
                    c.write_all(&v)?;
                    return Ok(());
                }
                reply(c, opt, 1, &[])?
            }
            10 => {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(b"base:allocation");
                reply(c, opt, 4, &d)?;
                reply(c, opt, 1, &[])?;
            }
            7 => {
                let mut d = 0u16.to_be_bytes().to_vec();
                d.extend_from_slice(&(1u64 << 20).to_be_bytes());
                d.extend_from_slice(&3u16.to_be_bytes());
                reply(c, opt, 3, &d)?;
                reply(c, opt, 1, &[])?;
                break;
            }
            _ => reply(c, opt, 0x8000_0001, &[])?,
        }
    }
    // Transmission: answer the first request badly.
    let mut r = [0u8; 28];
    c.read_exact(&mut r)?;
    let cmd = u16::from_be_bytes([r[6], r[7]]);
    let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
    let len = be32(&r[24..28]);
    let chunk = |flags: u16, kind: u16, cookie: u64, len: u32| {
        let mut v = 0x668e33efu32.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    match how {
        Hostile::BadReplyMagic => c.write_all(&[0xde; 40])?,
        Hostile::UnknownCookie => c.write_all(&chunk(1, 0, cookie + 1000, 0))?,
        Hostile::OversizedChunk => {
            c.write_all(&chunk(1, 1, cookie, 0xffff_fff0))?;
            c.write_all(&offset.to_be_bytes())?;
        }
        Hostile::HangUpMidReply => {
            c.write_all(&chunk(1, 1, cookie, 8 + len))?;
            c.write_all(&offset.to_be_bytes())?;
            c.write_all(&vec![7u8; (len as usize).min(100)])?;
        }
        Hostile::ZeroLengthExtent => {
            if cmd == 7 {
                c.write_all(&chunk(1, 5, cookie, 12))?;
                c.write_all(&1u32.to_be_bytes())?;
                c.write_all(&[0u8; 8])?;
            } else {
                // A good read, then a zero-length extent for the block status that follows.
                c.write_all(&chunk(1, 2, cookie, 12))?;
                c.write_all(&offset.to_be_bytes())?;
                c.write_all(&len.to_be_bytes())?;
                return serve_zero_extent(c);
            }
        }
        _ => {}
    }
    Ok(())
}

fn serve_zero_extent(c: &mut std::os::unix::net::UnixStream) -> std::io::Result<()> {
    loop {
        let mut r = [0u8; 28];
        c.read_exact(&mut r)?;
        let cmd = u16::from_be_bytes([r[6], r[7]]);
        let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
        let len = be32(&r[24..28]);
        let mut v = 0x668e33efu32.to_be_bytes().to_vec();
        v.extend_from_slice(&1u16.to_be_bytes());
        if cmd == 7 {
            v.extend_from_slice(&5u16.to_be_bytes());
            v.extend_from_slice(&cookie.to_be_bytes());
            v.extend_from_slice(&12u32.to_be_bytes());
            v.extend_from_slice(&1u32.to_be_bytes());
            v.extend_from_slice(&[0u8; 8]);
        } else {
            v.extend_from_slice(&2u16.to_be_bytes());
            v.extend_from_slice(&cookie.to_be_bytes());
            v.extend_from_slice(&12u32.to_be_bytes());
            v.extend_from_slice(&offset.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
        }
        c.write_all(&v)?;
    }
}

#[test]
fn hostile_servers_get_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, how) in [
        Hostile::BadGreeting,
        Hostile::HangUpInHandshake,
        Hostile::OversizedOptionReply,
        Hostile::BadReplyMagic,
        Hostile::UnknownCookie,
        Hostile::OversizedChunk,
        Hostile::HangUpMidReply,
        Hostile::ZeroLengthExtent,
    ]
    .into_iter()
    .enumerate()
    {
        let sock = dir.path().join(format!("h{i}.sock"));
        let server = fake_server(&sock, how);
        let url = format!("nbd+unix:///x?socket={}", sock.display());
        let out = dir.path().join("o.raw");
        let mut child = Command::new(VIMG)
            .args(["convert", "-O", "raw", &url, p(&out)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        match status {
            None => failures.push(format!("{how:?}: vimg hung")),
            Some(st) if st.code() != Some(1) => failures.push(format!("{how:?}: exit {st}: {err}")),
            Some(_) => {
                let line = err.trim_end();
                if line.lines().count() != 1 || !line.contains(&url) || line.contains("panicked") {
                    failures.push(format!("{how:?}: not one line naming the peer: {err}"));
                }
            }
        }
        let _ = server.join();
    }
    assert_no_failures(&failures);
}

/// `vimg serve -t -x TAG -k SOCK ARGS FILE`.
fn vimg_serve(dir: &Path, tag: &str, args: &[&str], file: &Path) -> Served {
    let sock = dir.join(format!("{tag}.sock"));
    let mut child = Command::new(VIMG)
        .args(["serve", "-t", "-x", tag, "-k", p(&sock)])
        .args(args)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vimg serve");
    wait_for_socket(&sock, &mut child);
    Served {
        child,
        url: format!("nbd+unix:///{tag}?socket={}", sock.display()),
    }
}

#[test]
fn vimg_client_against_vimg_serve() {
    if !qemu_available("vimg_client_against_vimg_serve") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sample_qcow2(dir.path(), "a.qcow2");
    let mut failures = Vec::new();
    {
        let s = vimg_serve(dir.path(), "ro", &["-r", "-f", "qcow2"], &img);
        let u = s.url.as_str();
        for cmd in [
            vec!["info", "--output=json", u],
            vec!["map", "--output=json", u],
            vec!["measure", "-O", "qcow2", u],
        ] {
            same_as_qemu(&cmd, &mut failures);
        }
        let out = dir.path().join("out.raw");
        run(VIMG, &["convert", "-O", "raw", u, p(&out)]);
        run("qemu-img", &["compare", p(&out), p(&img)]);
        let (c, msg) = vimg(&["compare", u, p(&img)]);
        if c != 0 {
            failures.push(format!("compare: {msg}"));
        }
    }
    {
        // Writes through vimg's client into a qcow2 vimg serves, several threads at once.
        let s = vimg_serve(dir.path(), "rw", &["-f", "qcow2", "-e", "4"], &img);
        random_io(&s.url, 64 << 20, 9, 4);
    }
    run("qemu-img", &["check", p(&img)]);
    assert_no_failures(&failures);
}

/// An old server: no extended headers, no structured replies, no `OPT_GO` (only
/// `OPT_EXPORT_NAME`), simple replies; its 1 MiB export reads as `offset % 251`.
fn serve_old(c: &mut std::os::unix::net::UnixStream) -> std::io::Result<()> {
    const IHAVEOPT: u64 = 0x49484156454F5054;
    c.write_all(&0x4e42444d41474943u64.to_be_bytes())?;
    c.write_all(&IHAVEOPT.to_be_bytes())?;
    c.write_all(&3u16.to_be_bytes())?;
    let mut b4 = [0u8; 4];
    c.read_exact(&mut b4)?;
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h)?;
        let opt = be32(&h[8..12]);
        let mut data = vec![0u8; be32(&h[12..16]) as usize];
        c.read_exact(&mut data)?;
        if opt == 1 {
            c.write_all(&(1u64 << 20).to_be_bytes())?;
            c.write_all(&3u16.to_be_bytes())?;
            break;
        }
        let mut v = 0x3e889045565a9u64.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&0x8000_0001u32.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        c.write_all(&v)?;
    }
    loop {
        let mut r = [0u8; 28];
        c.read_exact(&mut r)?;
        let cmd = u16::from_be_bytes([r[6], r[7]]);
        let cookie = &r[8..16];
        let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
        let len = be32(&r[24..28]) as u64;
        if cmd == 2 {
            return Ok(());
        }
        let mut v = 0x67446698u32.to_be_bytes().to_vec();
        v.extend_from_slice(&(if cmd == 0 { 0u32 } else { 22 }).to_be_bytes());
        v.extend_from_slice(cookie);
        if cmd == 0 {
            v.extend((offset..offset + len).map(|o| (o % 251) as u8));
        }
        c.write_all(&v)?;
    }
}

#[test]
fn an_old_server_is_read_through_export_name_and_simple_replies() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("old.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        // One connection per vimg run: the probe and the copy share it.
        let (mut c, _) = listener.accept().unwrap();
        let _ = serve_old(&mut c);
    });
    let url = format!("nbd+unix:///old?socket={}", sock.display());
    let out = dir.path().join("o.raw");
    let (c, msg) = vimg(&["convert", "-O", "raw", &url, p(&out)]);
    assert_eq!(c, 0, "{msg}");
    let want: Vec<u8> = (0..1u64 << 20).map(|o| (o % 251) as u8).collect();
    assert!(std::fs::read(&out).unwrap() == want, "the copy differs");
    server.join().unwrap();
}
