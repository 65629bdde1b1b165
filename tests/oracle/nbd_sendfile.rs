//! `vimg serve` sending READ data from the image file with `sendfile(2)` (src/host_run.rs):
//! the bytes are those of the image as qemu-img reads it, for raw and qcow2 exports with
//! holes, zero and compressed clusters, backing files, requests straddling cluster
//! boundaries and the end of the disk, in structured, DF and simple replies; reads stay right
//! while another connection writes; and where the data cannot be sent from a file
//! (compressed clusters, a writable qcow2, a client on this host, `VIMG_SENDFILE=never`) the
//! copy still serves it. The tests force sendfile on their Unix sockets (`VIMG_SENDFILE=always`).
//! The server runs under `strace -e sendfile`, so each test also sees which path ran.

use crate::common;
use common::nbd_serve::nbd_tools_available;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `vimg serve` under `strace -f -e trace=sendfile`, on a Unix socket.
struct Traced {
    strace: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Traced {
    fn start(image: &Path, dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.strace"));
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-e", "trace=sendfile", "-o", s(&log)])
            .arg(env!("CARGO_BIN_EXE_vimg"))
            .args(["serve", "-t", "-k", s(&socket), "-x", "exp"])
            .args(args)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd.env("VIMG_SENDFILE", "always");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let strace = cmd.spawn().expect("cannot run strace");
        let mut t = Traced {
            strace,
            socket,
            log,
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&t.socket).is_err() {
            if let Some(st) = t.strace.try_wait().unwrap() {
                panic!("server exited before listening: {st}");
            }
            assert!(start.elapsed() < Duration::from_secs(20), "not listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///exp?socket={}", self.socket.display())
    }

    /// Stops the server (SIGTERM to vimg, strace's child) and returns how many `sendfile`
    /// calls it made.
    fn stop(mut self) -> usize {
        let pid = self.strace.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        for c in children.split_whitespace() {
            // SAFETY: kill with the pid of a child of our own child and a valid signal.
            unsafe { libc::kill(c.parse().unwrap(), libc::SIGTERM) };
        }
        let st = self.strace.wait().unwrap();
        assert!(st.success(), "server exit: {st}");
        let log = std::fs::read_to_string(&self.log).unwrap();
        assert!(!log.contains("= -1 E"), "a sendfile failed:\n{log}");
        log.lines().filter(|l| l.contains("sendfile(")).count()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let pid = self.strace.id();
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            for c in children.split_whitespace() {
                // SAFETY: kill with the pid of a child of our own child and a valid signal.
                unsafe { libc::kill(c.parse().unwrap_or(0).max(1), libc::SIGKILL) };
            }
        }
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

/// Reads each range over structured replies, with DF, and over a connection without
/// structured replies, and compares the bytes with the local raw file; prints one line per
/// read, "ok" or "MISMATCH".
const READS: &str = r#"
import nbd, sys, random
uri, local = sys.argv[1], sys.argv[2]
data = open(local, "rb").read()
size = len(data)
C = 65536
ranges = [(0, 1 << 20), (C - 512, 1024), (C - 1, 2), (3 * C - 4096, 3 * C), (size - 4096, 4096),
          (size - 1, 1), (size - 100000, 100000), (size - (32 << 20), 32 << 20), (0, size if size <= 32 << 20 else 32 << 20)]
rnd = random.Random(7)
for _ in range(60):
    off = rnd.randrange(size)
    ranges.append((off, rnd.randrange(1, min(size - off, 3 << 20) + 1)))
for mode in ("structured", "df", "simple"):
    h = nbd.NBD()
    if mode == "simple":
        h.set_request_structured_replies(False)
    h.connect_uri(uri)
    assert h.get_size() == size, (h.get_size(), size)
    for off, n in ranges:
        if off < 0 or n <= 0 or off + n > size:
            continue
        if mode == "df":
            got = h.pread_structured(n, off, lambda *a: 0, nbd.CMD_FLAG_DF)
        else:
            got = h.pread(n, off)
        print(mode, off, n, "ok" if got == data[off:off + n] else "MISMATCH")
    h.shutdown()
"#;

fn check_reads(uri: &str, local: &Path, dir: &Path) {
    let script = dir.join("reads.py");
    std::fs::write(&script, READS).unwrap();
    let out = common::run(
        common::nbd_serve::PYTHON_LIBNBD,
        &[s(&script), uri, s(local)],
    );
    assert!(!out.contains("MISMATCH"), "{out}");
    assert!(
        out.lines().filter(|l| l.ends_with(" ok")).count() > 150,
        "{out}"
    );
    // nbdcopy (several connections, many requests in flight) and qemu-img compare.
    let copy = dir.join("copy.raw");
    common::run("nbdcopy", &[uri, s(&copy)]);
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(local).unwrap(),
        "nbdcopy's copy differs"
    );
    std::fs::remove_file(&copy).unwrap();
    let r = common::run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", uri, s(local)],
    );
    assert!(r.contains("identical"), "{r}");
}

/// A qcow2 (64 MiB + 5 KiB, not a whole number of clusters) over a qcow2 backing file: data,
/// compressed clusters, zero clusters, holes, data only in the backing file, and data in the
/// last, partial cluster.
fn layered(dir: &Path) -> PathBuf {
    let size = (64 << 20) + 5120;
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    common::qemu_create(&base, "qcow2", "", None, size);
    common::qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0x41 0 3M".into(),
            "write -c -P 0x42 8M 192k".into(),
            "write -P 0x43 20M 1M".into(),
        ],
    );
    common::qemu_create(&top, "qcow2", "", Some((&base, "qcow2")), size);
    common::qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x51 1M 100k".into(),
            "write -c -P 0x52 2M 128k".into(),
            "write -z 20M 64k".into(),
            "write -P 0x53 30M 5M".into(),
            "write -P 0x54 64M 5k".into(),
            "write -P 0x55 63M 1M".into(),
        ],
    );
    top
}

#[test]
fn sendfile_serves_raw_and_qcow2_exports_byte_for_byte() {
    if !nbd_tools_available("nbd_sendfile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = layered(dir.path());
    let local = dir.path().join("local.raw");
    common::run("qemu-img", &["convert", "-O", "raw", s(&top), s(&local)]);

    // qcow2 read-only: data clusters of both layers go through sendfile.
    let v = Traced::start(&top, dir.path(), "q", &["-r", "-e", "4"], &[]);
    check_reads(&v.uri(), &local, dir.path());
    assert!(v.stop() > 0, "no sendfile for a read-only qcow2");

    // -s: the overlay is writable (read), its read-only backing file is sent.
    let v = Traced::start(&top, dir.path(), "s", &["-s"], &[("TMPDIR", s(dir.path()))]);
    check_reads(&v.uri(), &local, dir.path());
    assert!(v.stop() > 0, "no sendfile from the backing files under -s");

    // raw, writable, whose file ends 24 bytes before the disk does (the tail reads as zeros).
    let raw = dir.path().join("odd.raw");
    let mut bytes = std::fs::read(&local).unwrap();
    bytes.truncate((8 << 20) + 1000);
    std::fs::write(&raw, &bytes).unwrap();
    bytes.resize((8 << 20) + 1024, 0);
    let padded = dir.path().join("padded.raw");
    std::fs::write(&padded, &bytes).unwrap();
    let v = Traced::start(&raw, dir.path(), "r", &["-f", "raw"], &[]);
    check_reads(&v.uri(), &padded, dir.path());
    assert!(v.stop() > 0, "no sendfile for a raw export");
}

#[test]
fn the_copy_serves_what_cannot_be_sent_from_a_file() {
    if !nbd_tools_available("nbd_sendfile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = layered(dir.path());
    let local = dir.path().join("local.raw");
    common::run("qemu-img", &["convert", "-O", "raw", s(&top), s(&local)]);

    // Compressed clusters only.
    let comp = dir.path().join("comp.qcow2");
    common::run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", s(&local), s(&comp)],
    );
    let v = Traced::start(&comp, dir.path(), "c", &["-r", "-e", "4"], &[]);
    check_reads(&v.uri(), &local, dir.path());
    assert_eq!(v.stop(), 0, "sendfile for compressed clusters");

    // A writable qcow2 without a backing file: its clusters may move, so they are read.
    let flat = dir.path().join("flat.qcow2");
    common::run("qemu-img", &["convert", "-O", "qcow2", s(&local), s(&flat)]);
    let v = Traced::start(&flat, dir.path(), "w", &[], &[]);
    check_reads(&v.uri(), &local, dir.path());
    assert_eq!(v.stop(), 0, "sendfile from a writable qcow2");

    // A client on this host (here on a Unix socket) gets the copy; so does every
    // client under the test hook's "never".
    for mode in ["auto", "never"] {
        let env = [("VIMG_SENDFILE", mode)];
        let v = Traced::start(&top, dir.path(), "n", &["-r", "-e", "4"], &env);
        check_reads(&v.uri(), &local, dir.path());
        assert_eq!(v.stop(), 0, "sendfile to a local client ({mode})");
    }
}

/// One connection writes, trims and zeroes random 4 KiB blocks (each 8-byte word of block b
/// written as b << 32 | generation) while another reads random ranges: every word a read
/// returns is 0 or belongs to its own block (never data of another range), and at the end the
/// disk is what the writer wrote.
const RACE: &str = r#"
import nbd, sys, random, struct, threading
uri = sys.argv[1]
B = 4096
w = nbd.NBD(); w.connect_uri(uri)
size = w.get_size()
nblocks = size // B
def block(b, gen):
    return struct.pack(">Q", (b << 32) | gen) * (B // 8)
model = {}
for b in range(0, nblocks, 16):
    w.pwrite(b"".join(block(b + i, 1) for i in range(16)), b * B)
    for i in range(16):
        model[b + i] = block(b + i, 1)
w.flush()
done = False
bad = []
def reader():
    r = nbd.NBD(); r.connect_uri(uri)
    rnd = random.Random(2)
    n = 0
    while not done or n < 50:
        first = rnd.randrange(nblocks)
        count = rnd.randrange(1, min(nblocks - first, 256) + 1)
        data = r.pread(count * B, first * B)
        for i in range(0, len(data), 8):
            v = struct.unpack_from(">Q", data, i)[0]
            if v != 0 and v >> 32 != first + i // B:
                bad.append((first, i, hex(v)))
                break
        n += 1
    r.shutdown()
    print("reads", n)
t = threading.Thread(target=reader); t.start()
rnd = random.Random(1)
for gen in range(2, 1500):
    b = rnd.randrange(nblocks)
    k = rnd.randrange(10)
    if k == 0:
        w.trim(B, b * B)
        model[b] = None
    elif k == 1:
        w.zero(B, b * B)
        model[b] = bytes(B)
    else:
        w.pwrite(block(b, gen), b * B)
        model[b] = block(b, gen)
done = True
t.join()
for b in range(nblocks):
    got = w.pread(B, b * B)
    if model[b] is None:
        # A discarded block reads as zeros or as what it held.
        words = [struct.unpack_from(">Q", got, i)[0] for i in range(0, B, 8)]
        if any(v != 0 and v >> 32 != b for v in words):
            bad.append(("trimmed", b))
    elif got != model[b]:
        bad.append(("final", b))
w.shutdown()
print("bad", bad[:5], len(bad))
"#;

#[test]
fn reads_stay_right_while_another_connection_writes() {
    if !nbd_tools_available("nbd_sendfile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("race.py");
    std::fs::write(&script, RACE).unwrap();
    let raw = dir.path().join("a.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let qcow = dir.path().join("a.qcow2");
    common::qemu_create(&qcow, "qcow2", "", None, 16 << 20);
    for (img, fmt, sends) in [(&raw, "raw", true), (&qcow, "qcow2", false)] {
        let v = Traced::start(
            img,
            dir.path(),
            fmt,
            &["-f", fmt, "-e", "2", "--discard=unmap"],
            &[],
        );
        let out = common::run(common::nbd_serve::PYTHON_LIBNBD, &[s(&script), &v.uri()]);
        assert!(out.contains("bad [] 0"), "{fmt}: {out}");
        let n = v.stop();
        assert_eq!(n > 0, sends, "{fmt}: {n} sendfile calls");
    }
    let c = common::run("qemu-img", &["check", s(&qcow)]);
    assert!(c.contains("No errors"), "{c}");
}
