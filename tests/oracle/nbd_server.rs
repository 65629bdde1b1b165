//! `vimg serve` with qemu's and libnbd's tools as clients, its answers compared with those of
//! qemu-nbd serving the same image (the oracle) and with the local file.

use crate::common;
use common::nbd_serve::{nbd_tools_available, Server};
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 over a qcow2 backing file: data, zero clusters, discarded ranges, data in the
/// backing file only, unallocated ranges; 64 MiB.
fn layered_image(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    common::qemu_create(&base, "qcow2", "", None, 64 << 20);
    common::qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0x41 0 2M".into(),
            "write -P 0x42 20M 3M".into(),
            "write -P 0x43 40M 64k".into(),
        ],
    );
    common::qemu_create(&top, "qcow2", "", Some((&base, "qcow2")), 64 << 20);
    common::qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x51 1M 512k".into(),
            "write -z 21M 1M".into(),
            "write -P 0x52 30M 100k".into(),
            "write -P 0x53 63M 1M".into(),
        ],
    );
    top
}

/// The same text from both servers, with their URIs made equal.
fn both(v: &Server, q: &Server, cmd: &str, args: &[&str]) -> (String, String) {
    let run = |srv: &Server| {
        let uri = srv.uri();
        let a: Vec<String> = args.iter().map(|x| x.replace("URI", &uri)).collect();
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        common::run(cmd, &a).replace(&uri, "URI")
    };
    (run(v), run(q))
}

#[test]
fn qemu_img_info_map_compare_convert_over_vimg_serve_match_qemu_nbd() {
    if !nbd_tools_available("nbd_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = layered_image(dir.path());
    let v = Server::vimg(&img, &dir.path().join("v.sock"), "exp", &["-r", "-e", "4"]);
    let q = Server::qemu(&img, &dir.path().join("q.sock"), "exp", &["-r", "-e", "4"]);
    for args in [
        vec!["map", "-f", "raw", "--output=json", "URI"],
        vec!["map", "-f", "raw", "URI"],
        vec!["info", "-f", "raw", "--output=json", "URI"],
    ] {
        let (a, b) = both(&v, &q, "qemu-img", &args);
        assert_eq!(a, b, "qemu-img {args:?}");
    }
    for srv in [&v, &q] {
        let out = common::run("qemu-img", &["compare", "-F", "raw", s(&img), &srv.uri()]);
        assert!(out.contains("identical"), "{out}");
    }
    let conv = dir.path().join("conv.qcow2");
    common::run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &v.uri(), s(&conv)],
    );
    let out = common::run("qemu-img", &["compare", s(&img), s(&conv)]);
    assert!(out.contains("identical"), "{out}");
    // The same over TCP.
    let t = Server::tcp(false, &img, "exp", &["-r"]);
    let out = common::run("qemu-img", &["compare", "-F", "raw", s(&img), &t.uri()]);
    assert!(out.contains("identical"), "{out}");
    assert_eq!(v.stop(), 0);
    assert_eq!(t.stop(), 0);
}

#[test]
fn nbdinfo_list_map_content_and_contexts_match_qemu_nbd() {
    if !nbd_tools_available("nbd_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = layered_image(dir.path());
    common::run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    common::qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x61 5M 192k".into(),
            "write -P 0x62 33M 4k".into(),
        ],
    );
    let args = ["-r", "-e", "4", "-B", "b0", "-A", "-D", "a test disk"];
    let v = Server::vimg(&img, &dir.path().join("v.sock"), "exp", &args);
    let q = Server::qemu(&img, &dir.path().join("q.sock"), "exp", &args);
    for a in [
        vec!["--map", "URI"],
        vec!["--map=qemu:dirty-bitmap:b0", "URI"],
        vec!["--map=qemu:allocation-depth", "URI"],
        vec!["--list", "--json", "URI"],
        vec!["--content", "URI"],
        vec!["--json", "URI"],
        vec!["--size", "URI"],
        vec!["--can", "multi-conn", "URI"],
    ] {
        let (x, y) = both(&v, &q, "nbdinfo", &a);
        assert_eq!(x, y, "nbdinfo {a:?}");
    }
    // The bitmap map is not trivial: some range is dirty.
    let (map, _) = both(&v, &q, "nbdinfo", &["--map=qemu:dirty-bitmap:b0", "URI"]);
    assert!(map.contains("dirty"), "{map}");
    // qemu's client reads the bitmap too (dirty shows as data:false).
    let opts = |srv: &Server| {
        format!(
            "driver=nbd,server.type=unix,server.path={},export=exp,x-dirty-bitmap=qemu:dirty-bitmap:b0",
            srv.socket.as_ref().unwrap().display()
        )
    };
    let a = common::run(
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts(&v)],
    );
    let b = common::run(
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts(&q)],
    );
    assert_eq!(a, b);
}

#[test]
fn qemu_io_random_writes_match_a_model_and_the_image_stays_consistent() {
    if !nbd_tools_available("nbd_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("rw.qcow2");
    let size: u64 = 16 << 20;
    common::qemu_create(&img, "qcow2", "", None, size);
    let v = Server::vimg(&img, &dir.path().join("v.sock"), "", &["--discard=unmap"]);
    let mut model = vec![0u8; size as usize];
    let mut rng = common::Rng::seeded(18);
    let mut cmds = Vec::new();
    for i in 0..120 {
        let len = 1 + rng.below(300 << 10);
        let off = rng.below(size - len);
        match rng.below(4) {
            0 => {
                cmds.push(format!("write -z {off} {len}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                // qemu-io discards read back as zeros on a qcow2 v3.
                let (a, l) = (off & !65535, (len + 65535) & !65535);
                let l = l.min(size - a);
                cmds.push(format!("discard {a} {l}"));
                model[a as usize..(a + l) as usize].fill(0);
            }
            _ => {
                let p = (i % 250 + 1) as u8;
                cmds.push(format!("write -P {p} {off} {len}"));
                model[off as usize..(off + len) as usize].fill(p);
            }
        }
    }
    // Check some ranges through the server as we go.
    for _ in 0..20 {
        let len = 1 + rng.below(64 << 10);
        let off = rng.below(size - len);
        cmds.push(format!("read -v {off} {len}"));
    }
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(v.uri());
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    let out = common::run("qemu-io", &a);
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");
    let copy = dir.path().join("copy.raw");
    common::run("nbdcopy", &[&v.uri(), s(&copy)]);
    assert!(
        std::fs::read(&copy).unwrap() == model,
        "contents over NBD differ from the model"
    );
    assert_eq!(v.stop(), 0);
    let check = common::run("qemu-img", &["check", s(&img)]);
    assert!(check.contains("No errors"), "{check}");
    let local = common::qemu_contents(&img, dir.path());
    assert!(local == model, "the image differs from the model");
}

#[test]
fn read_only_refuses_writes_and_snapshot_mode_leaves_the_image_untouched() {
    if !nbd_tools_available("nbd_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = layered_image(dir.path());
    let before = std::fs::read(&img).unwrap();
    let v = Server::vimg(&img, &dir.path().join("r.sock"), "", &["-r"]);
    let (code, out) = common::run_status("qemu-io", &["-f", "raw", "-c", "write 0 4k", &v.uri()]);
    assert!(
        out.contains("Operation not permitted") || code != 0,
        "write to -r: {code} {out}"
    );
    assert_eq!(v.stop(), 0);
    assert!(std::fs::read(&img).unwrap() == before);

    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let v = Server::vimg_env(
        &img,
        &dir.path().join("s.sock"),
        "",
        &["-s"],
        &[("TMPDIR", s(&tmp))],
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        1,
        "the overlay is in TMPDIR"
    );
    let out = common::run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 3M",
            "-c",
            "read -P 0x77 0 3M",
            &v.uri(),
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    let out = common::run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x77 1M 1M", &v.uri()],
    );
    assert!(!out.contains("fail"), "written data is served: {out}");
    assert_eq!(v.stop(), 0);
    assert!(std::fs::read(&img).unwrap() == before, "-s wrote the image");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the overlay is removed"
    );
}

#[test]
fn nbdcopy_in_both_directions_with_several_connections() {
    if !nbd_tools_available("nbd_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = layered_image(dir.path());
    let v = Server::vimg(&img, &dir.path().join("v.sock"), "", &["-r", "-e", "4"]);
    let out = dir.path().join("out.raw");
    common::run("nbdcopy", &[&v.uri(), s(&out)]);
    let r = common::run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&out), s(&img)],
    );
    assert!(r.contains("identical"), "{r}");
    assert_eq!(v.stop(), 0);

    let target = dir.path().join("target.qcow2");
    common::qemu_create(&target, "qcow2", "", None, 64 << 20);
    let w = Server::vimg(&target, &dir.path().join("w.sock"), "", &["-e", "4"]);
    common::run("nbdcopy", &[s(&out), &w.uri()]);
    assert_eq!(w.stop(), 0);
    let r = common::run("qemu-img", &["compare", "-f", "raw", s(&out), s(&target)]);
    assert!(r.contains("identical"), "{r}");
    let c = common::run("qemu-img", &["check", s(&target)]);
    assert!(c.contains("No errors"), "{c}");
}

/// An nbdsh (python3-libnbd) script of protocol edge cases; each line of its output is
/// compared between vimg serve and qemu-nbd.
const EDGE_SCRIPT: &str = r#"
import nbd, socket, struct, sys
path = sys.argv[1]
def attempt(name, f):
    try:
        r = f()
        print(name, "ok", r)
    except nbd.Error as e:
        print(name, "error", e.errno)

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(path)
attempt("list", lambda: h.opt_list(lambda n, d: print("export", repr(n), repr(d))))
h.set_export_name("nope")
attempt("info-bad-name", lambda: h.opt_info())
h.set_export_name("exp")
attempt("info", lambda: h.opt_info())
attempt("size", lambda: h.get_size())
h.add_meta_context("base:allocation")
h.opt_go()
print("structured", h.get_structured_replies_negotiated())
size = h.get_size()
attempt("read-past-end", lambda: len(h.pread(4096, size - 1024)))
attempt("read-at-end", lambda: len(h.pread(0, size)))
attempt("read", lambda: h.pread(8, 20 << 20)[:8].hex())
ext = []
attempt("block-status-req-one", lambda: h.block_status(8 << 20, 0, lambda m, o, e, err: ext.append((m, e)), nbd.CMD_FLAG_REQ_ONE))
print("req-one", ext)
ext = []
attempt("block-status", lambda: h.block_status(64 << 20, 0, lambda m, o, e, err: ext.append((m, e))))
print("all", ext)
attempt("block-status-past-end", lambda: h.block_status(4096, size, lambda m, o, e, err: 0))
attempt("write-readonly", lambda: h.pwrite(b"x" * 512, 0))
attempt("trim-readonly", lambda: h.trim(4096, 0))
attempt("flush", lambda: h.flush())
attempt("cache-readonly", lambda: h.cache(4096, 0))
h.shutdown()

# Raw sockets: an unknown option, and an option with a bad payload, are answered.
s = socket.socket(socket.AF_UNIX)
s.connect(path)
def recvn(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b
g = recvn(18)
print("greeting", g[:16] == b"NBDMAGICIHAVEOPT", struct.unpack(">H", g[16:])[0])
s.sendall(struct.pack(">I", 3))
def opt(o, data=b""):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data)
    magic, oo, typ, ln = struct.unpack(">QIII", recvn(20))
    recvn(ln)
    return oo, hex(typ)
print("unknown-option", opt(99, b"junk"))
print("go-truncated", opt(7, b"\0\0\0\x05ex"))
print("structured-twice", opt(8), opt(8))
print("meta-before-list", opt(9, struct.pack(">I", 3) + b"exp" + struct.pack(">I", 0))[1])
print("abort", opt(2))
"#;

#[test]
fn nbdsh_edge_cases_match_qemu_nbd() {
    if !nbd_tools_available("nbd_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = layered_image(dir.path());
    let script = dir.path().join("edge.py");
    std::fs::write(&script, EDGE_SCRIPT).unwrap();
    let v = Server::vimg(&img, &dir.path().join("v.sock"), "exp", &["-r"]);
    let q = Server::qemu(&img, &dir.path().join("q.sock"), "exp", &["-r"]);
    let a = common::run(
        common::nbd_serve::PYTHON_LIBNBD,
        &[s(&script), s(v.socket.as_ref().unwrap())],
    );
    let b = common::run(
        common::nbd_serve::PYTHON_LIBNBD,
        &[s(&script), s(q.socket.as_ref().unwrap())],
    );
    let al: Vec<&str> = a.lines().collect();
    let bl: Vec<&str> = b.lines().collect();
    assert_eq!(al, bl, "vimg:\n{a}\nqemu-nbd:\n{b}");
    assert!(a.contains("unknown-option (99, '0x80000001')"), "{a}");
    assert_eq!(v.stop(), 0);
}

#[test]
fn sigterm_during_writes_exits_cleanly_and_leaves_the_qcow2_consistent() {
    if !nbd_tools_available("nbd_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut rng = common::Rng::seeded(7);
    let data: Vec<u8> = (0..(64u64 << 20)).map(|_| rng.next() as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let img = dir.path().join("t.qcow2");
    common::qemu_create(&img, "qcow2", "", None, 64 << 20);
    let v = Server::vimg(&img, &dir.path().join("v.sock"), "", &["-e", "4"]);
    let mut copy = std::process::Command::new("nbdcopy")
        .args([src.to_str().unwrap(), &v.uri()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    assert_eq!(v.stop(), 0, "vimg serve's exit status after SIGTERM");
    let _ = copy.wait();
    let c = common::run("qemu-img", &["check", s(&img)]);
    assert!(c.contains("No errors"), "{c}");
    assert!(
        !dir.path().join("v.sock").exists(),
        "the socket is removed at exit"
    );
}

#[test]
fn fork_and_pid_file_and_exit_after_the_last_client() {
    if !nbd_tools_available("nbd_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = layered_image(dir.path());
    let sock = dir.path().join("f.sock");
    let pid = dir.path().join("pid");
    // --fork returns once the server listens, which goes on in the background.
    common::run(
        env!("CARGO_BIN_EXE_vimg"),
        &[
            "serve",
            "--fork",
            "--pid-file",
            s(&pid),
            "-r",
            "-k",
            s(&sock),
            s(&img),
        ],
    );
    let server_pid: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = common::run("qemu-img", &["compare", "-F", "raw", s(&img), &uri]);
    assert!(out.contains("identical"), "{out}");
    // Without -t the server exits after its (last) client.
    let start = std::time::Instant::now();
    // SAFETY: kill with signal 0 only checks that the process exists.
    while unsafe { libc::kill(server_pid, 0) } == 0 {
        assert!(
            start.elapsed().as_secs() < 20,
            "server still running after its client left"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !sock.exists() && !pid.exists(),
        "socket and pid file removed"
    );
}

#[test]
fn a_pid_file_that_cannot_be_written_fails_the_start_and_leaves_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let img = layered_image(dir.path());
    let sock = dir.path().join("p.sock");
    let pid = dir.path().join("missing-dir").join("pid");
    for fork in [false, true] {
        let mut args = vec!["serve", "--pid-file", s(&pid), "-r", "-k", s(&sock)];
        if fork {
            args.push("--fork");
        }
        args.push(s(&img));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vimg"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "fork={fork}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Failed to write pid file"),
            "fork={fork}: {err}"
        );
        assert!(!sock.exists(), "fork={fork}: the socket is removed");
    }
}
