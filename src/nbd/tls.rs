//! NBD over TLS (proto.md "TLS support", `NBD_OPT_STARTTLS`), for the server and the client:
//! qemu's `tls-creds-x509` objects, the TLS handshake (rustls with the ring provider), and a
//! relay that carries the protocol over the TLS session.
//!
//! The relay keeps the rest of the NBD code unchanged: once the handshake is done, one thread
//! pumps bytes between the TLS session on the network socket and one end of a
//! `UnixStream::pair()`; the protocol code reads and writes the other end as a plain socket
//! (several threads through `try_clone`, `sendfile` into it). The relay ends when either side
//! closes: the network side's end of stream (or a fatal TLS error) closes the local end, the
//! local end's closing sends the TLS `close_notify` and closes the network socket.
//!
//! Credentials follow qemu's `tls-creds-x509` object: `dir` holds `ca-cert.pem` (always
//! required), `server-cert.pem` and `server-key.pem` for a server, `client-cert.pem` and
//! `client-key.pem` (optional) for a client; `verify-peer` (on by default, as in qemu) makes a
//! server require a client certificate signed by the CA. A client checks the server's
//! certificate against the CA and the host name it connects to (or `tls-hostname`).

use crate::error::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Which side of a connection credentials are for (qemu's `endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `endpoint=server`.
    Server,
    /// `endpoint=client` (qemu's default).
    Client,
}

/// The rustls configuration that credentials were loaded into.
#[derive(Clone)]
enum Config {
    Server(Arc<rustls::ServerConfig>),
    Client(Arc<rustls::ClientConfig>),
}

/// One `tls-creds-x509` object: its id and the certificates loaded from its directory.
#[derive(Clone)]
pub struct TlsCreds {
    id: String,
    dir: PathBuf,
    config: Config,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint())
            .finish()
    }
}

/// Where qemu looks for credentials when `dir` is not given.
const DEFAULT_DIR: &str = "/etc/pki/qemu";

/// rustls' ring provider (the task's choice: aws-lc-rs needs cmake and a C toolchain to
/// build). rustls 0.23.48 deprecated it for lacking post-quantum key exchange, which NBD
/// peers (qemu and libnbd, through gnutls) do not need.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The path of `name` in `dir`, checked readable as qemu checks it: a missing required file
/// is refused in qemu's words; a missing optional one is `None`.
fn cred_path(dir: &Path, name: &str, required: bool) -> Result<Option<PathBuf>> {
    let p = dir.join(name);
    match std::fs::File::open(&p) {
        Ok(_) => Ok(Some(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(Error::io(format!("Unable to access credentials {}", p.display()), e).bare()),
    }
}

fn pem_error(what: &str, path: &Path, e: rustls::pki_types::pem::Error) -> Error {
    match e {
        rustls::pki_types::pem::Error::Io(io) => {
            Error::io(format!("Unable to read {what} {}", path.display()), io).bare()
        }
        rustls::pki_types::pem::Error::NoItemsFound => Error::invalid_input(format!(
            "Unable to import {what} {}: no PEM data found",
            path.display()
        ))
        .bare(),
        e => Error::invalid_input(format!("Unable to import {what} {}: {e:?}", path.display()))
            .bare(),
    }
}

fn load_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(
            what,
            path,
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error("private key", path, e))
}

fn load_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs("CA certificate list", path)? {
        roots.add(c).map_err(|e| {
            Error::invalid_input(format!(
                "Unable to import CA certificate list {}: {e}",
                path.display()
            ))
            .bare()
        })?;
    }
    Ok(Arc::new(roots))
}

fn rustls_error(what: &str, e: rustls::Error) -> Error {
    Error::invalid_input(format!("{what}: {e}")).bare()
}

impl TlsCreds {
    /// Parses `tls-creds-x509,id=ID[,dir=DIR][,endpoint=server|client][,verify-peer=on|off]`
    /// (qemu's `--object`) and loads the certificates, refusing missing or bad files in
    /// qemu's words.
    pub fn from_object(text: &str) -> Result<Self> {
        let bad = |m: String| Error::invalid_input(m).bare();
        let items = crate::secret::split(text);
        let mut items = items.iter().map(String::as_str);
        let ty = items.next().unwrap_or_default();
        let ty = ty.strip_prefix("qom-type=").unwrap_or(ty);
        if ty != "tls-creds-x509" {
            return Err(bad(format!("invalid object type: {ty}")));
        }
        let (mut id, mut dir, mut endpoint, mut verify_peer) = (None, None, Endpoint::Client, true);
        for item in items {
            let Some((k, v)) = item.split_once('=') else {
                return Err(bad(format!("Invalid parameter '{item}'")));
            };
            match k {
                "id" => id = Some(v.to_string()),
                "dir" => dir = Some(PathBuf::from(v)),
                "endpoint" => {
                    endpoint = match v {
                        "server" => Endpoint::Server,
                        "client" => Endpoint::Client,
                        _ => {
                            return Err(bad(format!(
                                "Parameter 'endpoint' does not accept value '{v}'"
                            )))
                        }
                    }
                }
                "verify-peer" => {
                    verify_peer = match v {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => {
                            return Err(bad("Parameter 'verify-peer' expects 'on' or 'off'".into()))
                        }
                    }
                }
                // Accepted as qemu does; vimg's priorities are rustls' safe defaults.
                "priority" | "sanity-check" | "loaded" => {}
                "passwordid" => {
                    return Err(Error::unsupported(
                        "tls-creds-x509 parameter 'passwordid' (encrypted keys) is not supported",
                    ))
                }
                _ => return Err(bad(format!("Property 'tls-creds-x509.{k}' not found"))),
            }
        }
        let id = id.ok_or_else(|| bad("Parameter 'id' is missing".into()))?;
        let dir = dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        let config = match endpoint {
            Endpoint::Server => Config::Server(server_config(&dir, verify_peer)?),
            Endpoint::Client => Config::Client(client_config(&dir)?),
        };
        Ok(TlsCreds { id, dir, config })
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The side these credentials are for.
    pub fn endpoint(&self) -> Endpoint {
        match self.config {
            Config::Server(_) => Endpoint::Server,
            Config::Client(_) => Endpoint::Client,
        }
    }

    /// The server configuration, or qemu's refusal if these are a client's credentials.
    pub fn server(&self) -> Result<ServerTls> {
        match &self.config {
            Config::Server(c) => Ok(ServerTls(c.clone())),
            Config::Client(_) => {
                Err(Error::invalid_input("Expected TLS credentials for a server endpoint").bare())
            }
        }
    }

    /// The client configuration, or qemu's refusal if these are a server's credentials.
    pub fn client(&self) -> io::Result<Arc<rustls::ClientConfig>> {
        match &self.config {
            Config::Client(c) => Ok(c.clone()),
            Config::Server(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Expected TLS credentials for a client endpoint",
            )),
        }
    }
}

/// A client configuration from the certificates in `dir` (libnbd's `tls-certificates=DIR`,
/// named as in a `tls-creds-x509` directory), loaded once per directory in the process.
pub fn client_config_in(dir: &Path) -> Result<Arc<rustls::ClientConfig>> {
    static BY_DIR: Mutex<Vec<(PathBuf, Arc<rustls::ClientConfig>)>> = Mutex::new(Vec::new());
    let mut all = BY_DIR.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = all.iter().find(|(d, _)| d == dir) {
        return Ok(c.clone());
    }
    let c = client_config(dir)?;
    all.push((dir.to_path_buf(), c.clone()));
    Ok(c)
}

fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<rustls::ServerConfig>> {
    let ca = cred_path(dir, "ca-cert.pem", true)?.expect("required");
    let cert = cred_path(dir, "server-cert.pem", true)?.expect("required");
    let key = cred_path(dir, "server-key.pem", true)?.expect("required");
    let roots = load_roots(&ca)?;
    let chain = load_certs("server certificate", &cert)?;
    let key = load_key(&key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_error("cannot set up TLS", e))?;
    let builder = if verify_peer {
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| {
                Error::invalid_input(format!(
                    "Unable to use CA certificate list {}: {e}",
                    ca.display()
                ))
                .bare()
            })?;
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        Error::invalid_input(format!(
            "Unable to use server certificate {} with its key: {e}",
            cert.display()
        ))
        .bare()
    })?;
    Ok(Arc::new(config))
}

fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let ca = cred_path(dir, "ca-cert.pem", true)?.expect("required");
    let cert = cred_path(dir, "client-cert.pem", false)?;
    let key = cred_path(dir, "client-key.pem", false)?;
    let roots = load_roots(&ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_error("cannot set up TLS", e))?
        .with_root_certificates(roots);
    let config = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = load_certs("client certificate", &cert)?;
            let key = load_key(&key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::invalid_input(format!(
                    "Unable to use client certificate {} with its key: {e}",
                    cert.display()
                ))
                .bare()
            })?
        }
        (Some(p), None) | (None, Some(p)) => {
            return Err(Error::invalid_input(format!(
                "{} has no matching {}",
                p.display(),
                if p.ends_with("client-cert.pem") {
                    "client-key.pem"
                } else {
                    "client-cert.pem"
                }
            ))
            .bare())
        }
        (None, None) => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The TLS credentials of this process's `--object tls-creds-x509,...` arguments, by id.
static CREDS: Mutex<Vec<Arc<TlsCreds>>> = Mutex::new(Vec::new());

/// Keeps `creds` for [`find`] (a later object with the same id is refused, as qemu does).
pub fn register(creds: TlsCreds) -> Result<()> {
    let mut all = CREDS.lock().unwrap_or_else(|e| e.into_inner());
    if all.iter().any(|c| c.id == creds.id) {
        return Err(Error::invalid_input(format!(
            "attempt to add duplicate property '{}' to object (type 'container')",
            creds.id
        )));
    }
    all.push(Arc::new(creds));
    Ok(())
}

/// Loads and keeps every `tls-creds-x509` object of a command line
/// ([`crate::secret::Secrets::tls_objects`]), in order, stopping at the first refused one.
pub fn register_objects(objects: &[String]) -> Result<()> {
    for o in objects {
        register(TlsCreds::from_object(o)?)?;
    }
    Ok(())
}

/// The credentials registered with this id.
pub fn find(id: &str) -> Option<Arc<TlsCreds>> {
    CREDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|c| c.id == id)
        .cloned()
}

/// The server's side of TLS (`vimg serve --tls-creds`), as a listener carries it.
#[derive(Clone)]
pub struct ServerTls(Arc<rustls::ServerConfig>);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// The server credentials registered as `id`, or qemu-nbd's refusal.
    pub fn from_id(id: &str) -> Result<Self> {
        match find(id) {
            Some(c) => c.server(),
            None => Err(Error::invalid_input(format!("No TLS credentials with id '{id}'")).bare()),
        }
    }
}

/// The words qemu (gnutls) uses for a certificate refused, where it has them.
fn describe(e: &rustls::Error, hostname: &str) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("Certificate does not match the hostname {hostname}")
            }
            C::Expired | C::ExpiredContext { .. } => "The certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "The certificate is not yet activated".into()
            }
            C::Revoked => "The certificate has been revoked".into(),
            _ => format!("The certificate is not trusted: {e}"),
        },
        rustls::Error::NoCertificatesPresented => "Verify failed: No certificate was found.".into(),
        _ => format!("TLS handshake failed: {e}"),
    }
}

/// An `io::Error` for a failed handshake, in qemu's words where it has them.
fn handshake_error(e: io::Error, hostname: &str) -> io::Error {
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return io::Error::new(io::ErrorKind::InvalidData, describe(t, hostname));
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "TLS handshake failed: the peer closed the connection",
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => e,
        _ => io::Error::new(e.kind(), format!("TLS handshake failed: {e}")),
    }
}

/// Runs a TLS handshake to its end on a blocking socket.
fn handshake<C, S>(conn: &mut rustls::ConnectionCommon<S>, sock: &mut C) -> io::Result<()>
where
    C: Read + Write,
    S: rustls::SideData,
{
    while conn.is_handshaking() {
        let (r, w) = conn.complete_io(sock)?;
        if r == 0 && w == 0 && conn.is_handshaking() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    // What is still queued (TLS 1.3 session tickets) goes before the relay starts.
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

/// The server's TLS handshake on `sock` (after the ACK to `NBD_OPT_STARTTLS`).
pub fn accept<C: Read + Write>(sock: &mut C, tls: &ServerTls) -> io::Result<rustls::Connection> {
    let mut conn = rustls::ServerConnection::new(tls.0.clone())
        .map_err(|e| io::Error::other(format!("TLS handshake failed: {e}")))?;
    handshake(&mut conn, sock).map_err(|e| handshake_error(e, ""))?;
    Ok(conn.into())
}

/// The client's TLS handshake on `sock`: the server's certificate must be signed by the CA
/// and name `hostname`.
pub fn connect<C: Read + Write>(
    sock: &mut C,
    config: Arc<rustls::ClientConfig>,
    hostname: &str,
) -> io::Result<rustls::Connection> {
    let name = ServerName::try_from(hostname.to_string()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{hostname}' is not a valid hostname for certificate validation"),
        )
    })?;
    let mut conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| io::Error::other(format!("TLS handshake failed: {e}")))?;
    handshake(&mut conn, sock).map_err(|e| handshake_error(e, hostname))?;
    Ok(conn.into())
}

/// A running relay between a TLS session and the local socket the protocol code uses. Dropping
/// it closes the local socket (the relay then says `close_notify` and closes the network
/// socket) and waits for the relay's thread.
#[derive(Debug)]
pub struct Relay {
    thread: Option<JoinHandle<()>>,
    local: UnixStream,
    /// The network socket (a duplicate), shut down if the relay has not ended within
    /// [`LINGER`] of the local side's closing (a peer that takes nothing more).
    net: OwnedFd,
    error: Arc<Mutex<Option<String>>>,
}

impl Relay {
    /// Why the TLS session ended, if a TLS error or an alert from the peer ended it.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.local.shutdown(std::net::Shutdown::Both);
        let Some(t) = self.thread.take() else {
            return;
        };
        // The relay sends close_notify and ends; one stuck on a peer that reads nothing more
        // is cut off.
        let start = std::time::Instant::now();
        let mut pause = Duration::from_micros(100);
        while !t.is_finished() && start.elapsed() < LINGER {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        if !t.is_finished() {
            // SAFETY: shutdown on a descriptor this relay owns (a duplicate of the socket).
            unsafe { libc::shutdown(self.net.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let _ = t.join();
    }
}

/// Starts the relay for a connection whose handshake is done: the socket the protocol code
/// uses in place of `net`, and the relay.
pub fn relay<S>(tls: rustls::Connection, net: S) -> io::Result<(UnixStream, Relay)>
where
    S: Read + Write + AsFd + AsRawFd + Send + 'static,
{
    let (mine, theirs) = UnixStream::pair()?;
    let local = theirs.try_clone()?;
    let net_fd = net.as_fd().try_clone_to_owned()?;
    mine.set_nonblocking(true)?;
    set_nonblocking(net.as_raw_fd())?;
    let error = Arc::new(Mutex::new(None));
    let err = error.clone();
    let thread = std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || pump(tls, net, mine, &err))?;
    Ok((
        theirs,
        Relay {
            thread: Some(thread),
            local,
            net: net_fd,
            error,
        },
    ))
}

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns (kept open by it for the call); F_GETFL
    // and F_SETFL only read and set the file status flags.
    let r = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How much plaintext the relay takes from the local socket at a time.
const CHUNK: usize = 256 << 10;

/// How long the relay waits for the peer to take the last records (`close_notify`) once the
/// local side has closed.
const LINGER: Duration = Duration::from_secs(5);

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Moves the plaintext rustls holds into `down`; whether the peer has closed the session.
fn take_plaintext(tls: &mut rustls::Connection, down: &mut Vec<u8>) -> bool {
    loop {
        let at = down.len();
        down.resize(at + (64 << 10), 0);
        match tls.reader().read(&mut down[at..]) {
            Ok(0) => {
                down.truncate(at);
                return true; // close_notify
            }
            Ok(n) => down.truncate(at + n),
            Err(e) => {
                down.truncate(at);
                return e.kind() != io::ErrorKind::WouldBlock;
            }
        }
    }
}

/// The relay's loop: nonblocking sockets, `poll` when nothing moves. Memory is bounded: at
/// most one chunk of plaintext each way is held.
fn pump<S: Read + Write + AsRawFd>(
    mut tls: rustls::Connection,
    mut net: S,
    mut local: UnixStream,
    error: &Mutex<Option<String>>,
) {
    let set_error = |m: String| {
        let mut e = error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(m);
        }
    };
    tls.set_buffer_limit(None);
    let mut up = vec![0u8; CHUNK];
    let mut down: Vec<u8> = Vec::new();
    let mut down_at = 0;
    let (mut net_eof, mut local_eof) = (false, false);
    loop {
        let mut moved = false;
        // Network -> TLS -> plaintext for the local side (only once the last is delivered).
        // Plaintext may be waiting in rustls already (records that came with the end of the
        // handshake), so it is taken before reading more.
        if down.is_empty() {
            if let Err(e) = tls.process_new_packets() {
                set_error(format!("Cannot read from TLS channel: {e}"));
                // The alert rustls queued, if the peer still listens.
                let _ = tls.write_tls(&mut net);
                break;
            }
            net_eof |= take_plaintext(&mut tls, &mut down);
        }
        if !net_eof && down.is_empty() {
            match tls.read_tls(&mut net) {
                Ok(0) => {
                    net_eof = true;
                    moved = true;
                }
                Ok(_) => moved = true,
                Err(e) if would_block(&e) => {}
                Err(_) => net_eof = true,
            }
        }
        if down_at < down.len() {
            match local.write(&down[down_at..]) {
                Ok(n) => {
                    down_at += n;
                    moved |= n > 0;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => break, // the local side is gone
            }
            if down_at == down.len() {
                down.clear();
                down_at = 0;
            }
        }
        // Local plaintext -> TLS records (only once the last records are sent).
        if !local_eof && !tls.wants_write() {
            match local.read(&mut up) {
                Ok(0) => {
                    local_eof = true;
                    tls.send_close_notify();
                    moved = true;
                }
                Ok(n) => {
                    if tls.writer().write_all(&up[..n]).is_err() {
                        break;
                    }
                    moved = true;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => {
                    local_eof = true;
                    tls.send_close_notify();
                }
            }
        }
        let mut peer_gone = false;
        while tls.wants_write() {
            match tls.write_tls(&mut net) {
                Ok(n) => moved |= n > 0,
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    peer_gone = true;
                    break;
                }
            }
        }
        // Nothing more can be sent once the peer is gone (and no reply could reach it).
        if peer_gone || (net_eof && down.is_empty()) || (local_eof && !tls.wants_write()) {
            break;
        }
        if moved {
            continue;
        }
        let mut fds = [
            libc::pollfd {
                fd: net.as_raw_fd(),
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: local.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        if !net_eof && down.is_empty() {
            fds[0].events |= libc::POLLIN;
        }
        if tls.wants_write() {
            fds[0].events |= libc::POLLOUT;
        }
        if !local_eof && !tls.wants_write() {
            fds[1].events |= libc::POLLIN;
        }
        if !down.is_empty() {
            fds[1].events |= libc::POLLOUT;
        }
        // A socket with nothing asked of it is left out: its hang-up would wake poll at once,
        // again and again, while the relay waits on the other one.
        for f in &mut fds {
            if f.events == 0 {
                f.fd = -1;
            }
        }
        let timeout = if local_eof {
            LINGER.as_millis() as libc::c_int
        } else {
            -1
        };
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n == 0 {
            break; // the peer did not take the close_notify in time
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            set_error(format!("poll: {}", io::Error::last_os_error()));
            break;
        }
    }
    // SAFETY: shutdown on the descriptor `net` owns, still open here.
    unsafe { libc::shutdown(net.as_raw_fd(), libc::SHUT_RDWR) };
    let _ = local.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        for (text, want) in [
            (
                "tls-creds-x509,dir=/x".to_string(),
                "Parameter 'id' is missing",
            ),
            (
                format!("tls-creds-x509,id=t,dir={d},endpoint=peer"),
                "Parameter 'endpoint' does not accept value 'peer'",
            ),
            (
                format!("tls-creds-x509,id=t,dir={d},bogus=1"),
                "Property 'tls-creds-x509.bogus' not found",
            ),
            (
                format!("tls-creds-x509,id=t,dir={d},endpoint=server"),
                "Unable to access credentials",
            ),
        ] {
            let e = TlsCreds::from_object(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        // `,,` is a comma in a value, as in qemu's option lists.
        let comma = dir.path().join("a,b");
        std::fs::create_dir(&comma).unwrap();
        let e = TlsCreds::from_object(&format!("tls-creds-x509,id=t,dir={d}/a,,b"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a,b/ca-cert.pem"), "{e}");
        std::fs::write(dir.path().join("ca-cert.pem"), "not a certificate\n").unwrap();
        let e = TlsCreds::from_object(&format!("tls-creds-x509,id=t,dir={d}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca-cert.pem"), "{e}");
    }
}
