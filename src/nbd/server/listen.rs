//! Sockets and the life of the server: listening on TCP or a Unix socket, accepting at most
//! `-e N` clients at once, exiting after the last one unless `-t`, `--fork` and
//! `--pid-file`, and a clean exit (image flushed and closed) on SIGTERM or SIGINT.

use super::export::Export;
use super::registry::Registry;
use super::stream::{Conn, Socket};
use super::{handshake, transmission};
use crate::{Error, Result};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP on `host:port` (`-b`, `-p`).
    Tcp {
        /// The address to bind (`0.0.0.0` by default, as qemu-nbd).
        host: String,
        /// The port (10809 by default).
        port: u16,
    },
    /// A Unix socket (`-k`); a stale socket file there is replaced, and removed at exit.
    Unix(PathBuf),
}

/// How the server listens and lives.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// Where to listen.
    pub address: Address,
    /// `-t`: keep serving after the last client leaves.
    pub persistent: bool,
    /// `-e N`: at most N clients at once (0: no limit).
    pub shared: usize,
    /// `--handshake-limit`: a client must finish the handshake within this (`None`: no
    /// limit).
    pub handshake_limit: Option<Duration>,
    /// `--fork`: the command returns once the server listens, which runs on in a child.
    pub fork: bool,
    /// `--pid-file`: write the server's process id there once it listens.
    pub pid_file: Option<PathBuf>,
    /// `--tls-creds`: clients must start TLS before anything else.
    pub tls: Option<crate::nbd::tls::ServerTls>,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Whether the server has been asked to stop (a signal, or [`request_stop`]).
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Asks the server to stop, as SIGTERM does.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Something that runs beside the NBD listener (the control socket): started once the server
/// runs (after `--fork`, in the process that serves), stopped before the exports are closed.
pub trait Service {
    /// Starts the service's threads.
    fn start(&self) -> Result<()>;
    /// Stops them (jobs cancelled, hooks detached) and waits for them.
    fn stop(&self);
}

extern "C" fn on_stop(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM ask the server to stop (cleanly: clients are disconnected, the
/// image flushed and closed), in place of the default handlers.
fn install_stop_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is called with valid pointers to initialised structures; the
        // handler only stores to an atomic, which is async-signal-safe. No SA_RESTART, so a
        // blocked poll returns with EINTR and sees the flag.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
            act.sa_flags = 0;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn bind(address: &Address) -> Result<Self> {
        match address {
            Address::Tcp { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port)).map_err(|e| {
                    Error::io(format!("Failed to bind socket to {host}:{port}"), e).bare()
                })?;
                Ok(Listener::Tcp(l))
            }
            Address::Unix(path) => {
                // A socket file left by an earlier server is replaced, as qemu-nbd does.
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let l = UnixListener::bind(path)
                    .map_err(|e| Error::io("Failed to bind socket", e).with_path(path))?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    /// Waits up to `timeout` for a client; `None` if none came (or a signal interrupted).
    fn accept(&self, timeout: Duration) -> Option<Socket> {
        let fd = match self {
            Listener::Tcp(l) => l.as_fd().as_raw_fd(),
            Listener::Unix(l, _) => l.as_fd().as_raw_fd(),
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call, and nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if n <= 0 {
            return None;
        }
        let socket = match self {
            Listener::Tcp(l) => l.accept().ok().map(|(s, _)| Socket::Tcp(s)),
            Listener::Unix(l, _) => l.accept().ok().map(|(s, _)| Socket::Unix(s)),
        }?;
        // Accepted sockets must block (the listener does not).
        let ok = match &socket {
            Socket::Tcp(s) => s.set_nonblocking(false),
            Socket::Unix(s) => s.set_nonblocking(false),
        };
        ok.ok().map(|()| socket)
    }
}

/// Serves `export` as `cfg` says until stopped: by a signal, or after the last client when
/// not persistent. The image is flushed and closed before it returns.
pub fn run(export: Export, cfg: &ListenConfig) -> Result<()> {
    run_with(Arc::new(Registry::single(export)), cfg, None)
}

/// Serves the exports of `exports` (which may change while it runs) as `cfg` says, with
/// `service` running beside, until stopped. Every export left is flushed and closed before it
/// returns.
pub fn run_with(
    exports: Arc<Registry>,
    cfg: &ListenConfig,
    service: Option<&dyn Service>,
) -> Result<()> {
    let listener = Listener::bind(&cfg.address)?;
    listener
        .set_nonblocking()
        .map_err(|e| Error::io("cannot set up the listening socket", e))?;
    // With --fork the caller returns only once the server runs, as qemu-nbd's does: the child
    // writes its pid file, then says so through a pipe, and the parent exits 0 only then (1 if
    // the child failed first, having said why on the caller's standard error).
    let mut started = None;
    if cfg.fork {
        let (mut ready_rx, ready_tx) = std::io::pipe().map_err(|e| Error::io("cannot fork", e))?;
        // SAFETY: the process has one thread here (the server's threads start later), so
        // the child may go on running Rust code; the parent only reads the pipe and exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::io("cannot fork", std::io::Error::last_os_error()));
        }
        if pid > 0 {
            drop(ready_tx);
            let mut byte = [0u8; 1];
            let code = match std::io::Read::read(&mut ready_rx, &mut byte) {
                Ok(1) => 0,
                _ => 1,
            };
            // SAFETY: _exit ends the parent at once, leaving the export (and the overlay of
            // -s) to the child.
            unsafe { libc::_exit(code) };
        }
        drop(ready_rx);
        // SAFETY: setsid has no memory effects.
        unsafe { libc::setsid() };
        started = Some(ready_tx);
    }
    if let Some(p) = &cfg.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            if let Listener::Unix(_, path) = &listener {
                let _ = std::fs::remove_file(path);
            }
            return Err(Error::io("Failed to write pid file", e).with_path(p));
        }
    }
    if let Some(mut ready) = started {
        // The parent's caller may be waiting for the end of its output: the server keeps no
        // standard stream of the caller open, as qemu-nbd once it runs.
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors of a file kept open meanwhile.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        let _ = std::io::Write::write_all(&mut ready, b"1");
    }
    install_stop_handler();
    let result = match service.map(|s| s.start()).unwrap_or(Ok(())) {
        Ok(()) => accept_loop(&listener, &exports, cfg),
        Err(e) => Err(e),
    };
    if let Some(s) = service {
        s.stop();
    }
    let mut finished = Ok(());
    for export in exports.drain() {
        let r = export.finish();
        if finished.is_ok() {
            finished = r;
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    if let Some(p) = &cfg.pid_file {
        let _ = std::fs::remove_file(p);
    }
    result.and(finished)
}

fn accept_loop(listener: &Listener, exports: &Registry, cfg: &ListenConfig) -> Result<()> {
    let mut next_id = 0u64;
    let mut served = false;
    std::thread::scope(|s| {
        loop {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            let count = exports.client_count();
            if !cfg.persistent && served && count == 0 {
                break;
            }
            if cfg.shared > 0 && count >= cfg.shared {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let Some(socket) = listener.accept(Duration::from_millis(200)) else {
                continue;
            };
            served = true;
            socket.set_nodelay();
            let id = next_id;
            next_id += 1;
            match socket.try_clone() {
                Ok(c) => exports.connect(id, c),
                Err(_) => continue,
            }
            s.spawn(move || {
                let deadline = cfg.handshake_limit.map(|d| Instant::now() + d);
                let mut conn = Conn::new(socket, deadline).with_tls(cfg.tls.clone());
                if let Ok(Some((nego, export))) = handshake::negotiate(&mut conn, exports, id) {
                    if conn.clear_deadline().is_ok() {
                        let _ = transmission::serve(conn, &export, &nego);
                    }
                }
                exports.disconnect(id);
            });
        }
        // Stopping: every client is disconnected; their threads end with the scope.
        exports.disconnect_all();
    });
    Ok(())
}
