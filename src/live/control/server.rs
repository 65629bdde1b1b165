//! The control socket's server side: the listening socket, one thread per client, the jobs,
//! and the events sent to every client.

use super::commands;
use super::jobs::ControlJob;
use super::proto::{self, CommandError, MAX_LINE};
use crate::live::fdpass::recv_with_fds;
use crate::nbd::server::{listen, Export, Registry, Service};
use crate::{Error, Result};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Most control clients at once.
const MAX_CLIENTS: usize = 16;
/// Most descriptors a client may have passed and not yet named or used.
const MAX_PENDING_FDS: usize = 8;
/// A client that does not take its replies within this is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What `export-add` asks.
#[derive(Debug, Clone, Default)]
pub struct ExportRequest {
    /// The export's name.
    pub name: String,
    /// The image.
    pub file: PathBuf,
    /// Its format (probed when `None`).
    pub format: Option<String>,
    /// Serve it read-only.
    pub readonly: bool,
    /// Dirty bitmaps to export as `qemu:dirty-bitmap:NAME` contexts.
    pub bitmaps: Vec<String>,
    /// A description for NBD_OPT_LIST.
    pub description: Option<String>,
}

/// Opens an export as the server's command line would (its cache mode, secrets, ...).
pub type ExportFactory = Box<dyn Fn(&ExportRequest) -> Result<Export> + Send + Sync>;

/// A connected control client, as the rest of the server sees it.
struct Peer {
    writer: Arc<Mutex<UnixStream>>,
    /// Past `qmp_capabilities`: events go to it.
    ready: Arc<AtomicBool>,
}

/// What the commands act on.
pub struct State {
    /// The server's exports.
    pub exports: Arc<Registry>,
    /// Opens the image of `export-add`.
    pub factory: ExportFactory,
    /// Jobs, running or concluded (until dismissed).
    pub jobs: Mutex<Vec<Arc<dyn ControlJob>>>,
    peers: Mutex<HashMap<u64, Peer>>,
    stop: AtomicBool,
}

impl State {
    /// The jobs, locked.
    pub fn jobs(&self) -> MutexGuard<'_, Vec<Arc<dyn ControlJob>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<u64, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an event line to every client past the capabilities negotiation.
    pub fn broadcast(&self, line: &str) {
        let peers: Vec<_> = self
            .peers()
            .values()
            .filter(|p| p.ready.load(Ordering::Relaxed))
            .map(|p| p.writer.clone())
            .collect();
        for w in peers {
            let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
            if w.write_all(line.as_bytes()).is_err() {
                let _ = w.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// One client's own state: whether it negotiated, and the descriptors it passed.
pub struct Session {
    /// Past `qmp_capabilities`.
    pub ready: Arc<AtomicBool>,
    /// Descriptors received and not yet named by `getfd`, oldest first.
    pub pending: Vec<OwnedFd>,
    /// Descriptors named by `getfd`.
    pub fds: HashMap<String, OwnedFd>,
    /// Jobs this client started with a descriptor it passed: cancelled if it leaves before
    /// they conclude (the command waiting for them is gone, e.g. interrupted).
    pub owned: Vec<Arc<dyn ControlJob>>,
}

/// The control socket of a server.
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
    state: Arc<State>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Control {
    /// Binds the socket at `path` (a stale socket file there is replaced); nothing runs
    /// until [`Service::start`].
    pub fn bind(path: PathBuf, exports: Arc<Registry>, factory: ExportFactory) -> Result<Self> {
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(&path);
            }
        }
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io("Failed to bind socket", e).with_path(&path))?;
        Ok(Control {
            listener,
            path,
            state: Arc::new(State {
                exports,
                factory,
                jobs: Mutex::new(Vec::new()),
                peers: Mutex::new(HashMap::new()),
                stop: AtomicBool::new(false),
            }),
            accept: Mutex::new(None),
        })
    }

    /// What the commands act on.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }
}

impl Service for Control {
    fn start(&self) -> Result<()> {
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| Error::io("cannot set up the control socket", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("cannot set up the control socket", e))?;
        let state = self.state.clone();
        let h = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, state))
            .map_err(|e| Error::io("cannot start the control thread", e))?;
        *self.accept.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(())
    }

    fn stop(&self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let jobs: Vec<_> = self.state.jobs().clone();
        for j in &jobs {
            j.cancel();
        }
        for j in &jobs {
            j.wait();
        }
        if let Some(h) = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, state: Arc<State>) {
    let mut next = 0u64;
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !state.stop.load(Ordering::SeqCst) && !listen::stopping() {
        let mut pfd = libc::pollfd {
            fd: listener.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        threads.retain(|t| !t.is_finished());
        if n <= 0 {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        if state.peers().len() >= MAX_CLIENTS {
            let line = proto::reply(Err(CommandError::generic("too many control clients")), None);
            let _ = (&stream).write_all(line.as_bytes());
            continue;
        }
        let Ok(writer) = stream.try_clone() else {
            continue;
        };
        let id = next;
        next += 1;
        let ready = Arc::new(AtomicBool::new(false));
        let writer = Arc::new(Mutex::new(writer));
        state.peers().insert(
            id,
            Peer {
                writer: writer.clone(),
                ready: ready.clone(),
            },
        );
        let st = state.clone();
        let spawned = std::thread::Builder::new()
            .name("control client".into())
            .spawn(move || {
                serve_client(&st, &stream, &writer, ready);
                st.peers().remove(&id);
                let _ = stream.shutdown(std::net::Shutdown::Both);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => {
                state.peers().remove(&id);
            }
        }
    }
    // Stopping: every client is disconnected, and waited for.
    for p in state.peers().values() {
        let w = p.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Reads requests line by line from `stream` and answers each, until the client leaves.
fn serve_client(
    state: &Arc<State>,
    stream: &UnixStream,
    writer: &Mutex<UnixStream>,
    ready: Arc<AtomicBool>,
) {
    let send = |line: &str| -> bool {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(line.as_bytes()).is_ok()
    };
    if !send(&proto::greeting()) {
        return;
    }
    let mut session = Session {
        ready,
        pending: Vec::new(),
        fds: HashMap::new(),
        owned: Vec::new(),
    };
    serve_lines(state, stream, &send, &mut session);
    for job in &session.owned {
        if !job.concluded() {
            job.cancel();
        }
    }
}

/// The request loop of [`serve_client`].
fn serve_lines(
    state: &Arc<State>,
    stream: &UnixStream,
    send: &dyn Fn(&str) -> bool,
    session: &mut Session,
) {
    let mut line: Vec<u8> = Vec::new();
    // Set while the rest of an overlong line is skipped.
    let mut skipping = false;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match recv_with_fds(stream, &mut chunk, &mut session.pending) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if session.pending.len() > MAX_PENDING_FDS {
            let extra = session.pending.len() - MAX_PENDING_FDS;
            session.pending.drain(..extra);
        }
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            let (part, done) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], Some(i + 1)),
                None => (rest, None),
            };
            if !skipping {
                if line.len() + part.len() > MAX_LINE {
                    skipping = true;
                    line.clear();
                    let e = CommandError::generic(format!("request longer than {MAX_LINE} bytes"));
                    if !send(&proto::reply(Err(e), None)) {
                        return;
                    }
                } else {
                    line.extend_from_slice(part);
                }
            }
            let Some(used) = done else { break };
            rest = &rest[used..];
            if skipping {
                skipping = false;
                continue;
            }
            let text = std::mem::take(&mut line);
            if text.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let answer = match proto::parse(&text) {
                Ok(req) => {
                    let r = commands::execute(state, session, &req);
                    proto::reply(r, req.id)
                }
                Err((e, id)) => proto::reply(Err(e), id),
            };
            if !send(&answer) {
                return;
            }
        }
    }
}
