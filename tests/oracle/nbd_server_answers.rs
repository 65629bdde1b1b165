//! `vimg serve` against qemu-nbd 10 on what libnbd's checks hide: the wire answers to
//! requests past the end, writes to a read-only export and CACHE (sent on a raw socket, so
//! that no client library answers for the server); and `-l SNAPSHOT`, an internal snapshot
//! served read-only.

use crate::common;
use common::nbd_serve::{nbd_tools_available, Server};
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Sends single requests (simple replies, after OPT_GO on export "exp") and prints the errno
/// of each reply.
const RAW: &str = r#"
import socket, struct, sys
path = sys.argv[1]
def run(typ, off, ln, payload=b"", flags=0):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    def recvn(n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c: raise EOFError
            b += c
        return b
    recvn(18); s.sendall(struct.pack(">I", 3))
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 9) + struct.pack(">I", 3) + b"exp" + struct.pack(">H", 0))
    while True:
        magic, o, t, l = struct.unpack(">QIII", recvn(20)); recvn(l)
        if t == 1: break
    s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, 1, off, ln) + payload)
    m, err, h = struct.unpack(">IIQ", recvn(16))
    s.close()
    return err
M = 1 << 20
for name, args in [
    ("write", (1, 0, 4096, b"x" * 4096)), ("write-past", (1, M, 4096, b"x" * 4096)),
    ("write-straddle", (1, M - 512, 4096, b"x" * 4096)), ("write-empty", (1, 512, 0)),
    ("zero", (6, 0, 4096)), ("zero-past", (6, M, 4096)), ("trim", (4, 0, 4096)),
    ("trim-past", (4, M + 1, 1)), ("cache", (5, 0, 4096)), ("cache-all", (5, 0, M)),
    ("cache-fua", (5, 0, 4096, b"", 1)), ("cache-past", (5, M, 4096)),
    ("cache-straddle", (5, M - 4096, 8192)), ("cache-df", (5, 0, 4096, b"", 4)),
    ("read-past", (0, M, 1)), ("read-empty", (0, 0, 0)),
]:
    print(name, run(*args))
"#;

#[test]
fn past_the_end_read_only_and_cache_answers_match_qemu_nbd() {
    if !nbd_tools_available("nbd_server_answers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("raw.py");
    std::fs::write(&script, RAW).unwrap();
    for (ro, args) in [(true, &["-r"][..]), (false, &[][..])] {
        let vi = dir.path().join(format!("v{ro}.qcow2"));
        let qi = dir.path().join(format!("q{ro}.qcow2"));
        common::qemu_create(&vi, "qcow2", "", None, 1 << 20);
        common::qemu_create(&qi, "qcow2", "", None, 1 << 20);
        let v = Server::vimg(&vi, &dir.path().join("v.sock"), "exp", args);
        let q = Server::qemu(&qi, &dir.path().join("q.sock"), "exp", args);
        let py = common::nbd_serve::PYTHON_LIBNBD;
        let a = common::run(py, &[s(&script), s(v.socket.as_ref().unwrap())]);
        let b = common::run(py, &[s(&script), s(q.socket.as_ref().unwrap())]);
        assert_eq!(a, b, "read-only {ro}: vimg:\n{a}\nqemu-nbd:\n{b}");
        // The answers are those the comparison is about: EINVAL past the end for writes too,
        // EPERM for CACHE on a read-only export.
        assert!(a.contains("write-past 22\n"), "{a}");
        assert!(
            a.contains(&format!("cache {}\n", if ro { 1 } else { 0 })),
            "{a}"
        );
        assert_eq!(v.stop(), 0);
    }
}

#[test]
fn an_internal_snapshot_is_served_as_qemu_nbd_serves_it() {
    if !nbd_tools_available("nbd_server_answers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    common::qemu_create(&img, "qcow2", "", None, 16 << 20);
    common::qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x11 0 3M".into(),
            "write -c -P 0x12 8M 256k".into(),
        ],
    );
    common::run("qemu-img", &["snapshot", "-c", "first", s(&img)]);
    common::qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x21 1M 1M".into(),
            "write -z 8M 64k".into(),
            "write -P 0x22 12M 1M".into(),
        ],
    );
    common::run("qemu-img", &["snapshot", "-c", "second", s(&img)]);
    common::qemu_io(&img, "qcow2", &["discard 0 16M".into()]);
    for sel in ["first", "2", "snapshot.name=second", "snapshot.id=1"] {
        let v = Server::vimg(
            &img,
            &dir.path().join("v.sock"),
            "",
            &["-r", "-e", "4", "-l", sel],
        );
        let q = Server::qemu(
            &img,
            &dir.path().join("q.sock"),
            "",
            &["-r", "-e", "4", "-l", sel],
        );
        let (vo, qo) = (dir.path().join("v.raw"), dir.path().join("q.raw"));
        common::run("nbdcopy", &[&v.uri(), s(&vo)]);
        common::run("nbdcopy", &[&q.uri(), s(&qo)]);
        let (vb, qb) = (std::fs::read(&vo).unwrap(), std::fs::read(&qo).unwrap());
        assert!(
            vb == qb,
            "-l {sel}: the served snapshot differs from qemu-nbd's"
        );
        // ... and it is the snapshot, not the current (discarded) disk.
        assert!(vb.iter().any(|&b| b != 0), "-l {sel}: served zeros");
        let local = dir.path().join("local.raw");
        common::run(
            "qemu-img",
            &["convert", "-l", sel, "-O", "raw", s(&img), s(&local)],
        );
        assert!(
            std::fs::read(&local).unwrap() == vb,
            "-l {sel}: not the snapshot's data"
        );
        let map = |srv: &Server| common::run("nbdinfo", &["--map", &srv.uri()]);
        assert_eq!(map(&v), map(&q), "-l {sel}: allocation map");
        // Read-only: a write is refused as qemu-nbd refuses it.
        let w = |srv: &Server| {
            common::run_status("qemu-io", &["-f", "raw", "-c", "write 0 4k", &srv.uri()]).0
        };
        assert_eq!(w(&v), w(&q), "-l {sel}: write");
        assert_eq!(v.stop(), 0);
        assert_eq!(q.stop(), 0);
    }
    // A snapshot that does not exist: both refuse to start.
    let (vc, _) = common::run_status(
        env!("CARGO_BIN_EXE_vimg"),
        &[
            "serve",
            "-r",
            "-l",
            "nope",
            "-k",
            s(&dir.path().join("x.sock")),
            s(&img),
        ],
    );
    let (qc, _) = common::run_status(
        "qemu-nbd",
        &[
            "-r",
            "-l",
            "nope",
            "-k",
            s(&dir.path().join("y.sock")),
            s(&img),
        ],
    );
    assert_eq!((vc != 0, qc != 0), (true, true));
}
