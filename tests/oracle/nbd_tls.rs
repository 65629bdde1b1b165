//! NBD over TLS (issue 18): `vimg serve --tls-creds` with qemu's and libnbd's clients, vimg's
//! client (`tls-creds=` in `--image-opts` and `json:`) against qemu-nbd's TLS server, and the
//! refusals: a plain client against a TLS server and the reverse, a server certificate of
//! another CA, a host name the certificate does not carry, a client without a certificate
//! where the server verifies its peer, a client that sends garbage instead of a TLS handshake.
//!
//! The certificates are made here with openssl: two CAs, a server certificate for 127.0.0.1
//! (not `localhost`, as qemu's iotest 233 does, so that a host name mismatch can be shown), and
//! client certificates of each CA, laid out as qemu's `tls-creds-x509` directories.

use crate::common;

use common::nbd_serve::Server;
use common::{qemu_create, qemu_io, run_status};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tls-creds-x509` directories: `server` (CA 1's server certificate for 127.0.0.1),
/// `client` (CA 1's client certificate), `nocert` (CA 1 only), `other` (CA 2 and its client
/// certificate).
struct Pki {
    root: PathBuf,
}

impl Pki {
    fn new(root: &Path) -> Pki {
        std::fs::create_dir_all(root).unwrap();
        let pki = Pki {
            root: root.to_path_buf(),
        };
        for ca in ["ca1", "ca2"] {
            let key = root.join(format!("{ca}-key.pem"));
            let cert = root.join(format!("{ca}-cert.pem"));
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                p(&key),
                "-out",
                p(&cert),
                "-days",
                "2",
                "-subj",
                &format!("/CN=vimg test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        }
        for (dir, ca, leaf, san, usage) in [
            (
                "server",
                "ca1",
                "server",
                Some("IP:127.0.0.1"),
                "serverAuth",
            ),
            ("client", "ca1", "client", None, "clientAuth"),
            ("other", "ca2", "client", None, "clientAuth"),
        ] {
            pki.leaf(dir, ca, leaf, san, usage);
        }
        std::fs::create_dir_all(root.join("nocert")).unwrap();
        std::fs::copy(root.join("ca1-cert.pem"), root.join("nocert/ca-cert.pem")).unwrap();
        pki
    }

    fn leaf(&self, dir: &str, ca: &str, leaf: &str, san: Option<&str>, usage: &str) {
        let d = self.root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        let key = d.join(format!("{leaf}-key.pem"));
        let csr = d.join(format!("{leaf}.csr"));
        let ext = d.join(format!("{leaf}.ext"));
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            p(&key),
            "-out",
            p(&csr),
            "-subj",
            &format!("/CN=vimg test {leaf}"),
        ]);
        let mut e = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        );
        if let Some(s) = san {
            e.push_str(&format!("subjectAltName={s}\n"));
        }
        std::fs::write(&ext, e).unwrap();
        let ca_cert = self.root.join(format!("{ca}-cert.pem"));
        let ca_key = self.root.join(format!("{ca}-key.pem"));
        openssl(&[
            "x509",
            "-req",
            "-in",
            p(&csr),
            "-CA",
            p(&ca_cert),
            "-CAkey",
            p(&ca_key),
            "-CAcreateserial",
            "-out",
            p(&d.join(format!("{leaf}-cert.pem"))),
            "-days",
            "2",
            "-extfile",
            p(&ext),
        ]);
        std::fs::copy(&ca_cert, d.join("ca-cert.pem")).unwrap();
        let _ = std::fs::remove_file(csr);
        let _ = std::fs::remove_file(ext);
    }

    fn dir(&self, name: &str) -> String {
        p(&self.root.join(name)).to_string()
    }

    /// `--object tls-creds-x509,...` for the directory `name`.
    fn object(&self, name: &str, endpoint: &str, extra: &str) -> String {
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}{extra}",
            self.dir(name)
        )
    }
}

fn available(test: &str) -> bool {
    common::nbd_serve::nbd_tools_available(test)
        && Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// `--image-opts` spec of the export on 127.0.0.1:`port` with TLS.
fn spec(port: u16, extra: &str) -> String {
    format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0{extra}")
}

/// Runs `prog args` and gives (exit code, stdout, stderr).
fn out(prog: &str, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(prog: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = out(prog, args);
    assert_eq!(code, 0, "{prog} {args:?}: {stderr}");
    stdout
}

/// A qcow2 with data in a few places, and its contents.
fn sample(dir: &Path) -> (PathBuf, Vec<u8>) {
    let img = dir.join("img.qcow2");
    qemu_create(&img, "qcow2", "", None, 8 << 20);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x11 0 64k".to_string(),
            "write -P 0x22 1M 1M".to_string(),
            "write -z 4M 64k".to_string(),
            "write -P 0x33 7M 4k".to_string(),
        ],
    );
    let raw = dir.join("img.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&raw)],
    );
    let bytes = std::fs::read(&raw).unwrap();
    (img, bytes)
}

#[test]
fn qemu_and_libnbd_clients_over_tls_to_vimg_serve() {
    if !available("qemu_and_libnbd_clients_over_tls_to_vimg_serve") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let (img, bytes) = sample(t.path());
    let srv_obj = pki.object("server", "server", "");
    let server = Server::tcp(
        false,
        &img,
        "",
        &[
            "-f",
            "qcow2",
            "-e",
            "4",
            "--object",
            &srv_obj,
            "--tls-creds",
            "tls0",
        ],
    );
    let port = server.port.unwrap();
    let cli_obj = pki.object("client", "client", "");
    let s = spec(port, "");

    // qemu-img info and compare over TLS.
    let info = ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &cli_obj,
            "--image-opts",
            &s,
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 8 << 20, "{info}");
    let raw = t.path().join("img.raw");
    let local = format!("driver=raw,file.filename={}", p(&raw));
    let (code, _, err) = out(
        "qemu-img",
        &["compare", "--object", &cli_obj, "--image-opts", &s, &local],
    );
    assert_eq!(code, 0, "qemu-img compare over TLS: {err}");

    // qemu-img convert from the TLS export.
    let copy = t.path().join("copy.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &cli_obj,
            "--image-opts",
            &s,
            "-O",
            "raw",
            p(&copy),
        ],
    );
    assert!(std::fs::read(&copy).unwrap() == bytes, "convert over TLS");

    // qemu-io reads and writes.
    let io = ok(
        "qemu-io",
        &[
            "--object",
            &cli_obj,
            "--image-opts",
            &s,
            "-c",
            "read -P 0x22 1M 1M",
            "-c",
            "write -P 0x44 2M 192k",
            "-c",
            "read -P 0x44 2M 192k",
            "-c",
            "write -P 0x55 5M 4k",
        ],
    );
    assert!(!io.contains("Pattern verification failed"), "{io}");

    // libnbd: nbdinfo and nbdcopy in both directions with nbds://.
    let url = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.dir("client")
    );
    let size = ok("nbdinfo", &["--size", &url]);
    assert_eq!(size.trim(), (8u64 << 20).to_string());
    let copied = t.path().join("nbdcopy.raw");
    ok("nbdcopy", &[&url, p(&copied)]);
    let mut want = bytes.clone();
    want[2 << 20..(2 << 20) + (192 << 10)].fill(0x44);
    want[5 << 20..(5 << 20) + 4096].fill(0x55);
    assert!(std::fs::read(&copied).unwrap() == want, "nbdcopy from TLS");
    let upload = t.path().join("upload.raw");
    let mut up = want.clone();
    up[6 << 20..7 << 20].fill(0x66);
    std::fs::write(&upload, &up).unwrap();
    ok("nbdcopy", &[p(&upload), &url]);

    // Every client has gone: the relays' threads have ended with their connections (the
    // server has only its main thread left).
    let tasks = || {
        std::fs::read_dir(format!("/proc/{}/task", server.pid()))
            .unwrap()
            .count()
    };
    let start = std::time::Instant::now();
    while tasks() > 1 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tasks(), 1, "threads left after every TLS client left");

    // SIGTERM with a TLS client connected (libnbd, holding its connection): a clean exit.
    let script = format!(
        "import nbd, time\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\n\
         h.connect_uri({url:?})\nprint(h.get_size(), flush=True)\ntime.sleep(60)\n"
    );
    let mut holder = Command::new(common::nbd_serve::PYTHON_LIBNBD)
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 8];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"8388608\n");
    let stopping = std::time::Instant::now();
    assert_eq!(server.stop(), 0);
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?} with a TLS client connected",
        stopping.elapsed()
    );
    let _ = holder.kill();
    let _ = holder.wait();
    let (code, check) = run_status("qemu-img", &["check", "-f", "qcow2", p(&img)]);
    assert_eq!(code, 0, "{check}");
    let after = t.path().join("after.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&after)],
    );
    assert!(
        std::fs::read(&after).unwrap() == up,
        "served image after TLS writes"
    );
}

#[test]
fn vimg_client_over_tls_to_qemu_nbd() {
    if !available("vimg_client_over_tls_to_qemu_nbd") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let (img, bytes) = sample(t.path());
    let srv_obj = pki.object("server", "server", "");
    let server = Server::tcp(
        true,
        &img,
        "",
        &[
            "-f",
            "qcow2",
            "-e",
            "8",
            "--object",
            &srv_obj,
            "--tls-creds",
            "tls0",
        ],
    );
    let port = server.port.unwrap();
    let cli_obj = pki.object("client", "client", "");
    let s = spec(port, "");

    // info and map: what qemu-img gives over the same TLS export.
    for cmd in [
        &["info", "--output=json"][..],
        &["map", "--output=json"][..],
    ] {
        let mut args: Vec<&str> = cmd.to_vec();
        args.extend(["--object", &cli_obj, "--image-opts", &s]);
        let ours = ok(VIMG, &args);
        let theirs = ok("qemu-img", &args);
        let a: serde_json::Value = serde_json::from_str(&ours).unwrap();
        let b: serde_json::Value = serde_json::from_str(&theirs).unwrap();
        assert_eq!(a, b, "{cmd:?} over TLS");
    }
    // `driver=nbd` at the top level is the nbd node itself: `file format: nbd`, as qemu-img.
    let args = ["info", "--object", &cli_obj, "--image-opts", &s];
    let ours = ok(VIMG, &args);
    assert_eq!(ours, ok("qemu-img", &args));
    assert!(ours.contains("file format: nbd\n"), "{ours}");
    // The json: spelling.
    let json = format!(
        r#"json:{{"driver":"nbd","server":{{"type":"inet","host":"127.0.0.1","port":"{port}"}},"tls-creds":"tls0"}}"#
    );
    let info = ok(VIMG, &["info", "--object", &cli_obj, &json]);
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    // libnbd's nbds:// spelling, with the certificates' directory in the URI.
    let nbds = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.dir("client")
    );
    let via_uri = t.path().join("via-uri.raw");
    ok(VIMG, &["convert", "-O", "raw", &nbds, p(&via_uri)]);
    assert!(
        std::fs::read(&via_uri).unwrap() == bytes,
        "convert from nbds://"
    );
    let other = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.dir("other")
    );
    let e = one_line_error(VIMG, &["info", &other]);
    assert!(
        e.contains("The certificate hasn't got a known issuer"),
        "{e}"
    );

    // convert and compare give what the local file gives.
    let copy = t.path().join("copy.qcow2");
    ok(
        VIMG,
        &[
            "convert",
            "--object",
            &cli_obj,
            "--image-opts",
            &s,
            "-O",
            "qcow2",
            p(&copy),
        ],
    );
    let (code, cmp) = run_status("qemu-img", &["compare", "-U", p(&img), p(&copy)]);
    assert_eq!(code, 0, "{cmp}");
    let raw = t.path().join("img.raw");
    let local = format!("driver=raw,file.filename={}", p(&raw));
    let (code, stdout, err) = out(
        VIMG,
        &["compare", "--object", &cli_obj, "--image-opts", &s, &local],
    );
    assert_eq!(code, 0, "vimg compare over TLS: {stdout}{err}");
    // A difference is found over TLS as on the local file.
    let mut changed = bytes.clone();
    changed[7 << 20] ^= 1;
    std::fs::write(&raw, &changed).unwrap();
    let (code, stdout, _) = out(
        VIMG,
        &["compare", "--object", &cli_obj, "--image-opts", &s, &local],
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("Content mismatch at offset 7340032"),
        "{stdout}"
    );
    drop(server);
}

/// The first line of a failed command's error, checked to be its only line.
fn one_line_error(prog: &str, args: &[&str]) -> String {
    let (code, _, err) = out(prog, args);
    assert_ne!(code, 0, "{prog} {args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "{prog}: {err}");
    err.trim_end().to_string()
}

#[test]
fn tls_refusals() {
    if !available("tls_refusals") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let (img, _) = sample(t.path());
    let srv_obj = pki.object("server", "server", "");
    let tls_server = Server::tcp(
        false,
        &img,
        "",
        &[
            "-f",
            "qcow2",
            "-e",
            "0",
            "--object",
            &srv_obj,
            "--tls-creds",
            "tls0",
        ],
    );
    let port = tls_server.port.unwrap();
    let plain_url = format!("nbd://127.0.0.1:{port}");

    // A plain client: TLS required, from vimg's client as from qemu-img (both against vimg's
    // server) and against qemu-nbd's TLS server.
    let ours = one_line_error(VIMG, &["info", &plain_url]);
    assert!(
        ours.contains("TLS negotiation required before option 7 (go)") && ours.contains(&plain_url),
        "{ours}"
    );
    let (code, _, theirs) = out("qemu-img", &["info", &plain_url]);
    assert_ne!(code, 0);
    assert!(
        theirs.contains("TLS negotiation required before option 7 (go)")
            && theirs.contains("server reported: Option 0x7 not permitted before TLS"),
        "{theirs}"
    );
    let copy = t.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let qemu_tls = Server::tcp(
        true,
        &copy,
        "",
        &[
            "-f",
            "qcow2",
            "-r",
            "--object",
            &srv_obj,
            "--tls-creds",
            "tls0",
        ],
    );
    let (code, _, qemu_says) = out(
        "qemu-img",
        &[
            "info",
            &format!("nbd://127.0.0.1:{}", qemu_tls.port.unwrap()),
        ],
    );
    assert_ne!(code, 0);
    assert!(
        qemu_says.contains("server reported: Option 0x7 not permitted before TLS"),
        "{qemu_says}"
    );
    drop(qemu_tls);

    // A server certificate of another CA, a host name it does not carry.
    let other = pki.object("other", "client", "");
    let e = one_line_error(
        VIMG,
        &["info", "--object", &other, "--image-opts", &spec(port, "")],
    );
    assert!(
        e.contains("The certificate hasn't got a known issuer") && e.contains(&plain_url),
        "{e}"
    );
    let client = pki.object("client", "client", "");
    let localhost = format!("driver=nbd,host=localhost,port={port},tls-creds=tls0");
    let e = one_line_error(
        VIMG,
        &["info", "--object", &client, "--image-opts", &localhost],
    );
    assert!(
        e.contains("Certificate does not match the hostname localhost"),
        "{e}"
    );
    let over = format!("{localhost},tls-hostname=127.0.0.1");
    ok(VIMG, &["info", "--object", &client, "--image-opts", &over]);

    // verify-peer (qemu's default): a client without a certificate is refused, by vimg's
    // server as by qemu-img's view of it.
    let nocert = pki.object("nocert", "client", "");
    let e = one_line_error(
        VIMG,
        &["info", "--object", &nocert, "--image-opts", &spec(port, "")],
    );
    assert!(e.contains(&plain_url) && e.contains("TLS"), "{e}");
    let (code, _, _) = out(
        "qemu-img",
        &["info", "--object", &nocert, "--image-opts", &spec(port, "")],
    );
    assert_ne!(code, 0, "qemu-img without a client certificate was let in");
    // A client certificate of another CA is refused too.
    let (code, _, _) = out(
        "qemu-img",
        &[
            "info",
            "--object",
            &pki.object("other", "client", ""),
            "--image-opts",
            &format!("{},tls-hostname=127.0.0.1", spec(port, "")),
        ],
    );
    assert_ne!(code, 0, "a client certificate of another CA was let in");

    // A client that sends garbage in place of the TLS handshake is dropped; one that sends
    // options before STARTTLS gets ERR_TLS_REQD; the server goes on serving.
    garbage_after_starttls(port);
    options_before_starttls(port);
    ok(
        VIMG,
        &["info", "--object", &client, "--image-opts", &spec(port, "")],
    );
    ok(
        "qemu-img",
        &["info", "--object", &client, "--image-opts", &spec(port, "")],
    );
    assert_eq!(tls_server.stop(), 0);

    // verify-peer=off: a client without a certificate is served.
    let open_obj = pki.object("server", "server", ",verify-peer=off");
    let open_server = Server::tcp(
        false,
        &img,
        "",
        &["-f", "qcow2", "--object", &open_obj, "--tls-creds", "tls0"],
    );
    let s = spec(open_server.port.unwrap(), "");
    ok(VIMG, &["info", "--object", &nocert, "--image-opts", &s]);
    drop(open_server);

    // A TLS client against a plain server: refused as qemu-img is refused.
    let plain = Server::tcp(false, &img, "", &["-f", "qcow2"]);
    let s = spec(plain.port.unwrap(), "");
    let e = one_line_error(VIMG, &["info", "--object", &client, "--image-opts", &s]);
    assert!(
        e.contains("Denied by server for option 5 (starttls)")
            && e.contains("server reported: TLS not configured"),
        "{e}"
    );
    let (code, _, theirs) = out(
        "qemu-img",
        &["info", "--object", &client, "--image-opts", &s],
    );
    assert_ne!(code, 0);
    assert!(
        theirs.contains("Denied by server for option 5 (starttls)"),
        "{theirs}"
    );
    drop(plain);

    // A unix socket (-k) with TLS: the host name must be given.
    let sock = t.path().join("tls.sock");
    let unix = Server::vimg(
        &img,
        &sock,
        "",
        &["-f", "qcow2", "--object", &srv_obj, "--tls-creds", "tls0"],
    );
    let us = format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=tls0",
        p(&sock)
    );
    let e = one_line_error(VIMG, &["info", "--object", &client, "--image-opts", &us]);
    assert!(e.contains("No hostname for certificate validation"), "{e}");
    let info = ok(
        VIMG,
        &[
            "info",
            "--object",
            &client,
            "--image-opts",
            &format!("{us},tls-hostname=127.0.0.1"),
        ],
    );
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    drop(unix);

    // Credentials that cannot be used, in qemu-nbd's words.
    for (obj, id, want) in [
        (
            srv_obj.clone(),
            "nope",
            "Failed to get TLS creds: No TLS credentials with id 'nope'",
        ),
        (
            pki.object("client", "server", ""),
            "tls0",
            "Unable to access credentials",
        ),
        (
            pki.object("server", "client", ""),
            "tls0",
            "Failed to get TLS creds: Expected TLS credentials for a server endpoint",
        ),
    ] {
        let sock = t.path().join("never.sock");
        let args = [
            "serve",
            "-k",
            p(&sock),
            "--object",
            &obj,
            "--tls-creds",
            id,
            p(&img),
        ];
        let e = one_line_error(VIMG, &args);
        assert!(e.contains(want), "{e}");
        let (code, _, q) = out("qemu-nbd", &args[1..]);
        assert_ne!(code, 0);
        assert!(q.contains(want), "qemu-nbd: {q}");
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Connects and reads the greeting, sends the client flags (fixed newstyle, no zeroes).
fn greet(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c
}

fn send_option(c: &mut TcpStream, option: u32, data: &[u8]) {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
}

/// Reads one option reply: (option, reply type, payload).
fn read_reply(c: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    let mut data = vec![0u8; be32(&h[16..]) as usize];
    c.read_exact(&mut data).unwrap();
    (be32(&h[8..]), be32(&h[12..]), data)
}

/// Whether the server closes `c` (within the read timeout) when read.
fn dropped(c: &mut TcpStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn garbage_after_starttls(port: u16) {
    let mut c = greet(port);
    send_option(&mut c, 5, &[]);
    let (opt, kind, _) = read_reply(&mut c);
    assert_eq!((opt, kind), (5, 1), "STARTTLS not acknowledged");
    c.write_all(&[0x47; 600]).unwrap();
    assert!(
        dropped(&mut c),
        "garbage in place of a TLS handshake was not dropped"
    );
}

fn options_before_starttls(port: u16) {
    const ERR_TLS_REQD: u32 = (1 << 31) | 5;
    let mut c = greet(port);
    // LIST, INFO, STRUCTURED_REPLY: refused with ERR_TLS_REQD, the connection kept.
    for option in [3u32, 6, 8] {
        let data: &[u8] = if option == 6 {
            &[0, 0, 0, 0, 0, 0]
        } else {
            &[]
        };
        send_option(&mut c, option, data);
        let (opt, kind, msg) = read_reply(&mut c);
        assert_eq!((opt, kind), (option, ERR_TLS_REQD), "option {option}");
        assert_eq!(
            String::from_utf8_lossy(&msg),
            format!("Option 0x{option:x} not permitted before TLS")
        );
    }
    // EXPORT_NAME has no error reply: the client is dropped.
    send_option(&mut c, 1, b"");
    assert!(dropped(&mut c), "EXPORT_NAME before TLS was not dropped");
    // STARTTLS with a payload is refused and dropped, as qemu-nbd does.
    let mut c = greet(port);
    send_option(&mut c, 5, b"x");
    let (_, kind, _) = read_reply(&mut c);
    assert_eq!(kind, (1 << 31) | 3, "ERR_INVALID");
    assert!(dropped(&mut c));
}

/// A TLS client that floods the server with options and never reads the replies: the server
/// drops it at the handshake limit, its relay ends (no thread left, no CPU spent spinning),
/// and the server goes on serving.
#[test]
fn a_tls_client_that_never_reads_is_dropped_and_leaves_no_thread() {
    if !available("a_tls_client_that_never_reads_is_dropped_and_leaves_no_thread") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let (img, _) = sample(t.path());
    let srv_obj = pki.object("server", "server", "");
    let server = Server::tcp(
        false,
        &img,
        "",
        &[
            "-f",
            "qcow2",
            "-e",
            "0",
            "--handshake-limit",
            "2",
            "--object",
            &srv_obj,
            "--tls-creds",
            "tls0",
        ],
    );
    let port = server.port.unwrap();
    let script = r#"
import socket, ssl, struct, sys, time
port, d = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
assert s.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
s.sendall(struct.pack(">I", 3))
s.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0))
r = s.recv(20, socket.MSG_WAITALL)
assert struct.unpack(">I", r[12:16])[0] == 1, r
ctx = ssl.create_default_context(cafile=d + "/ca-cert.pem")
ctx.load_cert_chain(d + "/client-cert.pem", d + "/client-key.pem")
t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
t.setblocking(False)
msg = (b"IHAVEOPT" + struct.pack(">II", 3, 0)) * 1000
sent, end = 0, time.time() + 4
while time.time() < end:
    try:
        sent += t.send(msg)
    except (ssl.SSLWantWriteError, BlockingIOError):
        time.sleep(0.01)
    except Exception:
        break
print(sent, flush=True)
time.sleep(60)
"#;
    let mut flood = Command::new("/usr/bin/python3")
        .args(["-c", script, &port.to_string(), &pki.dir("client")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flood.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let sent: u64 = line.trim().parse().unwrap();
    assert!(sent > 64 << 10, "the client sent only {sent} bytes");
    // The flood has stopped (the client holds its connection open, reading nothing): within
    // the limit and the relay's linger, only the server's main thread is left, idle.
    let pid = server.pid();
    let tasks = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    };
    let start = std::time::Instant::now();
    while tasks() > 1 && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tasks(), 1, "threads left for a dropped TLS client");
    let cpu = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        cpu() - before < 20,
        "the server spins with a dropped TLS client"
    );
    let cli_obj = pki.object("client", "client", "");
    ok(
        VIMG,
        &[
            "info",
            "--object",
            &cli_obj,
            "--image-opts",
            &spec(port, ""),
        ],
    );
    let _ = flood.kill();
    let _ = flood.wait();
    assert_eq!(server.stop(), 0);
}
