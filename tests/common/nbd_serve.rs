//! Starting NBD servers for tests: `vimg serve` and qemu-nbd (the oracle) on a Unix socket or
//! a loopback port, waiting until they listen, and stopping them with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether the NBD tools (qemu-nbd, nbdinfo, nbdcopy, nbdsh) can be run; as
/// [`super::qemu_available`], a missing tool fails under `VIMG_REQUIRE_QEMU=1`.
pub fn nbd_tools_available(test: &str) -> bool {
    if !super::qemu_available(test) {
        return false;
    }
    let works = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let mut missing: Vec<&str> = ["qemu-nbd", "nbdinfo", "nbdcopy"]
        .into_iter()
        .filter(|t| !works(t, &["--version"]))
        .collect();
    if !works(PYTHON_LIBNBD, &["-c", "import nbd"]) {
        missing.push("python3-libnbd");
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{test}: {missing:?} not found but VIMG_REQUIRE_QEMU=1");
    }
    eprintln!("{test}: skipping: {missing:?} not found");
    false
}

/// The Python that has libnbd's bindings (Debian's python3-libnbd; nbdsh's library).
pub const PYTHON_LIBNBD: &str = "/usr/bin/python3";

/// A running server.
pub struct Server {
    child: Option<Child>,
    /// Its socket (Unix) or `None` for TCP.
    pub socket: Option<PathBuf>,
    /// Its TCP port, for TCP servers.
    pub port: Option<u16>,
    /// The export name.
    pub export: String,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Server {
    /// `vimg serve -t -k SOCKET -x EXPORT ARGS... IMAGE`.
    pub fn vimg(image: &Path, socket: &Path, export: &str, args: &[&str]) -> Server {
        Self::start(
            env!("CARGO_BIN_EXE_vimg"),
            &["serve"],
            image,
            socket,
            export,
            args,
            &[],
        )
    }

    /// `qemu-nbd -t -k SOCKET -x EXPORT ARGS... IMAGE`.
    pub fn qemu(image: &Path, socket: &Path, export: &str, args: &[&str]) -> Server {
        Self::start("qemu-nbd", &[], image, socket, export, args, &[])
    }

    /// `vimg serve` with environment `env` (e.g. TMPDIR).
    pub fn vimg_env(
        image: &Path,
        socket: &Path,
        export: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        Self::start(
            env!("CARGO_BIN_EXE_vimg"),
            &["serve"],
            image,
            socket,
            export,
            args,
            env,
        )
    }

    fn start(
        prog: &str,
        pre: &[&str],
        image: &Path,
        socket: &Path,
        export: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(prog);
        cmd.args(pre)
            .args(["-t", "-k", socket.to_str().unwrap(), "-x", export])
            .args(args)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
        let mut s = Server {
            child: Some(child),
            socket: Some(socket.to_path_buf()),
            port: None,
            export: export.to_string(),
        };
        s.wait_listening(|| std::os::unix::net::UnixStream::connect(socket).is_ok());
        s
    }

    /// `vimg serve -t -b 127.0.0.1 -p PORT -x EXPORT ARGS... IMAGE` (or qemu-nbd's).
    pub fn tcp(qemu: bool, image: &Path, export: &str, args: &[&str]) -> Server {
        let port = free_port();
        let p = port.to_string();
        let mut cmd = if qemu {
            Command::new("qemu-nbd")
        } else {
            let mut c = Command::new(env!("CARGO_BIN_EXE_vimg"));
            c.arg("serve");
            c
        };
        cmd.args(["-t", "-b", "127.0.0.1", "-p", &p, "-x", export])
            .args(args)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = cmd.spawn().unwrap();
        let mut s = Server {
            child: Some(child),
            socket: None,
            port: Some(port),
            export: export.to_string(),
        };
        s.wait_listening(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        s
    }

    fn wait_listening(&mut self, ready: impl Fn() -> bool) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited before listening: {st}");
            }
            // A probe connection is a client too: give it up at once.
            if ready() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server not listening after 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's NBD URI.
    pub fn uri(&self) -> String {
        match (&self.socket, self.port) {
            (Some(s), _) => format!("nbd+unix:///{}?socket={}", self.export, s.display()),
            (None, Some(p)) => format!("nbd://127.0.0.1:{p}/{}", self.export),
            _ => unreachable!(),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the server process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// The server's resident set size in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// The server's peak resident set size in KiB.
    pub fn hwm_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Sends SIGTERM and waits (at most 30 s); returns the exit code (-1 if killed by a
    /// signal).
    pub fn stop(mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill with a pid of our own child and a valid signal number.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
