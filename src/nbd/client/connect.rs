//! Connecting to an NBD server and negotiating as qemu 10's client does: the fixed newstyle
//! handshake, extended headers if the server offers them (structured replies otherwise), the
//! meta contexts block status needs, then `OPT_GO` asking for the block size constraints,
//! with `OPT_EXPORT_NAME` for servers that do not know `OPT_GO`.

use super::locator::{NbdLocator, Server};
use super::wire_io::read_exact;
use crate::nbd::wire as w;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crate::nbd::tls::Relay;

/// How long the handshake may take before the server is given up on (a server at its limit of
/// clients, such as qemu-nbd without `-e`, accepts the connection but never greets).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected socket, TCP or unix, or the local end of a TLS relay.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
    /// Over TLS: the local end of the relay ([`crate::nbd::tls`]), which ends when the last
    /// handle on it is dropped.
    Tls(UnixStream, Arc<Relay>),
}

impl Stream {
    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s, r) => Stream::Tls(s.try_clone()?, r.clone()),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) | Stream::Tls(s, _) => s.set_read_timeout(t),
        }
    }

    /// Closes both directions (waking a reader blocked on the socket).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) | Stream::Tls(s, _) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) | Stream::Tls(s, _) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) | Stream::Tls(s, _) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) | Stream::Tls(s, _) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The kind of replies negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Simple replies only (an old server).
    Simple,
    /// Structured replies.
    Structured,
    /// Extended headers (64-bit lengths; extended requests and replies).
    Extended,
}

/// What the handshake agreed.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// The export's size in bytes.
    pub size: u64,
    /// The transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes (1, 4096, 32 MiB when the server gives none).
    pub block_size: (u32, u32, u32),
    /// The replies the server sends.
    pub mode: ReplyMode,
    /// The id of the meta context block status reports (`base:allocation`, or the dirty
    /// bitmap asked for); `None` if the server has none.
    pub context: Option<u32>,
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Connects to the server `loc` names, with no handshake yet.
pub fn dial(loc: &NbdLocator) -> io::Result<Stream> {
    Ok(match &loc.server {
        Server::Inet { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
        Server::Unix { path } => Stream::Unix(UnixStream::connect(path)?),
    })
}

/// The OS's words for `e`, without Rust's `(os error N)`.
fn os_words(e: &io::Error) -> String {
    let t = e.to_string();
    t.split(" (os error").next().unwrap_or(&t).to_string()
}

/// What TLS needs (qemu's `tls-creds`, `tls-hostname`): the client configuration and the
/// name the server's certificate must carry. Checked before connecting, as qemu does.
fn tls_settings(loc: &NbdLocator) -> io::Result<Option<(Arc<rustls::ClientConfig>, String)>> {
    let refuse = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    let config = match (&loc.tls_creds, &loc.tls_certificates) {
        (Some(id), _) => crate::nbd::tls::find(id)
            .ok_or_else(|| refuse(format!("No TLS credentials with id '{id}'")))?
            .client()?,
        (None, Some(dir)) => {
            crate::nbd::tls::client_config_in(dir).map_err(|e| refuse(e.to_string()))?
        }
        (None, None) => return Ok(None),
    };
    let hostname = match (&loc.tls_hostname, &loc.server) {
        (Some(h), _) => h.clone(),
        (None, Server::Inet { host, .. }) => host.clone(),
        (None, Server::Unix { .. }) => {
            return Err(refuse("No hostname for certificate validation".into()))
        }
    };
    Ok(Some((config, hostname)))
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake: from then on `s` is the relay's local end.
fn start_tls(s: &mut Stream, config: Arc<rustls::ClientConfig>, hostname: &str) -> io::Result<()> {
    send_option(s, w::OPT_STARTTLS, &[])?;
    let r = read_option_reply(s, w::OPT_STARTTLS)?;
    if r.is_error() {
        let what = match r.kind {
            w::REP_ERR_POLICY => "Denied by server for option 5 (starttls)",
            w::REP_ERR_UNSUP => "Server does not support option 5 (starttls)",
            _ => "Option 5 (starttls) failed",
        };
        let msg = r.message();
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            match msg.is_empty() {
                true => what.to_string(),
                false => format!("{what}: server reported: {msg}"),
            },
        ));
    }
    if r.kind != w::REP_ACK {
        return Err(protocol(format!(
            "Server rejected request to start TLS {}",
            r.kind
        )));
    }
    let session = crate::nbd::tls::connect(s, config, hostname)?;
    let (local, relay) = match s.try_clone()? {
        Stream::Tcp(t) => crate::nbd::tls::relay(session, t)?,
        Stream::Unix(u) => crate::nbd::tls::relay(session, u)?,
        Stream::Tls(..) => return Err(protocol("TLS already started")),
    };
    local.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    *s = Stream::Tls(local, Arc::new(relay));
    Ok(())
}

/// Connects and negotiates: the socket ready for transmission, and what was agreed.
pub fn connect(loc: &NbdLocator) -> io::Result<(Stream, Negotiated)> {
    let tls = tls_settings(loc)?;
    let mut s = dial(loc).map_err(|e| {
        // qemu's words: `Failed to connect to 'ADDRESS': CAUSE`.
        let addr = match &loc.server {
            Server::Inet { host, port } => format!("{host}:{port}"),
            Server::Unix { path } => path.display().to_string(),
        };
        io::Error::new(
            e.kind(),
            format!("Failed to connect to '{addr}': {}", os_words(&e)),
        )
    })?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let n = handshake(&mut s, loc, tls).map_err(|e| match e.kind() {
        // The TLS session ended: why, if the relay knows (an alert from the server).
        _ if relay_error(&s).is_some() => io::Error::new(
            io::ErrorKind::InvalidData,
            relay_error(&s).unwrap_or_default(),
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            "the server did not complete the handshake (is it serving another client already?)",
        ),
        io::ErrorKind::UnexpectedEof => {
            protocol("the server closed the connection during the handshake")
        }
        _ => e,
    })?;
    s.set_read_timeout(None)?;
    Ok((s, n))
}

/// Why the TLS session of `s` ended, if it is over TLS and a TLS error ended it.
fn relay_error(s: &Stream) -> Option<String> {
    match s {
        Stream::Tls(_, r) => r.error(),
        _ => None,
    }
}

/// One option reply: its type and payload.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

impl OptReply {
    fn is_error(&self) -> bool {
        self.kind & w::REP_FLAG_ERROR != 0
    }

    /// The server's message (an error reply's payload), for messages.
    fn message(&self) -> String {
        w::decode_error_message(&self.data)
    }
}

fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<()> {
    w::write_all(s, |b| {
        w::OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode(b);
        b.extend_from_slice(data);
    })
}

fn read_option_reply(s: &mut Stream, opt: u32) -> io::Result<OptReply> {
    let mut h = [0u8; w::OPTION_REPLY_HEADER_LEN];
    read_exact(s, &mut h)?;
    let h = w::OptionReplyHeader::decode(&h)?;
    if h.option != opt {
        return Err(protocol(format!(
            "the server replied to option {} where option {opt} was sent",
            h.option
        )));
    }
    let mut data = vec![0; h.len as usize];
    read_exact(s, &mut data)?;
    Ok(OptReply {
        kind: h.reply,
        data,
    })
}

/// Sends an option with no payload and reads its one reply: whether the server took it.
fn simple_option(s: &mut Stream, opt: u32) -> io::Result<bool> {
    send_option(s, opt, &[])?;
    let r = read_option_reply(s, opt)?;
    if r.is_error() {
        return Ok(false);
    }
    if r.kind != w::REP_ACK {
        return Err(protocol(format!(
            "unexpected reply {} to option {opt}",
            r.kind
        )));
    }
    Ok(true)
}

fn check_name(name: &str) -> io::Result<()> {
    if name.len() > w::MAX_STRING {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "export name too long",
        ));
    }
    Ok(())
}

fn handshake(
    s: &mut Stream,
    loc: &NbdLocator,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
) -> io::Result<Negotiated> {
    let mut g = [0u8; w::GREETING_LEN];
    read_exact(s, &mut g)?;
    if u64::from_be_bytes(g[..8].try_into().expect("8 bytes")) != w::NBDMAGIC {
        return Err(protocol(
            "the server does not speak NBD (bad greeting magic)",
        ));
    }
    if u64::from_be_bytes(g[8..16].try_into().expect("8 bytes")) == w::CLISERV_MAGIC {
        return Err(protocol(
            "the server speaks the oldstyle NBD protocol, which qemu no longer supports",
        ));
    }
    let greeting = w::Greeting::decode(&g)?;
    if greeting.flags & w::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol(
            "the server does not support the fixed newstyle handshake",
        ));
    }
    let no_zeroes = greeting.flags & w::FLAG_NO_ZEROES != 0;
    let mut cflags = w::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= w::FLAG_C_NO_ZEROES;
    }
    w::write_all(s, |b| w::ClientFlags(cflags).encode(b))?;
    if let Some((config, hostname)) = tls {
        start_tls(s, config, &hostname)?;
    }

    let mode = if simple_option(s, w::OPT_EXTENDED_HEADERS)? {
        ReplyMode::Extended
    } else if simple_option(s, w::OPT_STRUCTURED_REPLY)? {
        ReplyMode::Structured
    } else {
        ReplyMode::Simple
    };
    let wanted = loc
        .dirty_bitmap
        .clone()
        .unwrap_or_else(|| w::CONTEXT_BASE_ALLOCATION.to_string());
    let context = match mode {
        ReplyMode::Simple => None,
        _ => set_meta_context(s, &loc.export, &wanted)?,
    };
    if context.is_none() && loc.dirty_bitmap.is_some() {
        return Err(protocol(format!(
            "requested x-dirty-bitmap {wanted} not found"
        )));
    }
    let (size, flags, block_size) = match go(s, &loc.export)? {
        Some(r) => r,
        None => export_name(s, &loc.export, no_zeroes)?,
    };
    let (min, pref, max) = block_size;
    if min == 0 || !min.is_power_of_two() || min > 65536 || pref < min || max < pref {
        return Err(protocol(format!(
            "the server's block sizes (min {min}, preferred {pref}, max {max}) are invalid"
        )));
    }
    Ok(Negotiated {
        size,
        flags,
        block_size: (min, pref, max.min(w::MAX_PAYLOAD as u32)),
        mode,
        context,
    })
}

/// An export's size, transmission flags and block sizes (min, preferred, max).
type ExportInfo = (u64, u16, (u32, u32, u32));

/// `NBD_OPT_SET_META_CONTEXT` with one query: the id the server gave the context, if it has it.
fn set_meta_context(s: &mut Stream, export: &str, query: &str) -> io::Result<Option<u32>> {
    check_name(export)?;
    check_name(query)?;
    let mut d = Vec::new();
    w::MetaContextRequest {
        export: export.to_string(),
        queries: vec![query.to_string()],
    }
    .encode(&mut d);
    send_option(s, w::OPT_SET_META_CONTEXT, &d)?;
    let mut id = None;
    loop {
        let r = read_option_reply(s, w::OPT_SET_META_CONTEXT)?;
        if r.is_error() {
            return Ok(None);
        }
        match r.kind {
            w::REP_ACK => return Ok(id),
            w::REP_META_CONTEXT => {
                let m = w::MetaContextReply::decode(&r.data)?;
                if m.name == query {
                    id = Some(m.id);
                }
            }
            k => {
                return Err(protocol(format!(
                    "unexpected reply {k} to SET_META_CONTEXT"
                )))
            }
        }
    }
}

/// `NBD_OPT_GO` asking for the block sizes; `None` if the server does not know the option.
fn go(s: &mut Stream, export: &str) -> io::Result<Option<ExportInfo>> {
    check_name(export)?;
    let mut d = Vec::new();
    w::InfoRequest {
        name: export.to_string(),
        requests: vec![w::INFO_BLOCK_SIZE],
    }
    .encode(&mut d);
    send_option(s, w::OPT_GO, &d)?;
    let mut export_info = None;
    let mut sizes = (1, 4096, w::MAX_PAYLOAD as u32);
    loop {
        let r = read_option_reply(s, w::OPT_GO)?;
        if r.is_error() {
            if r.kind == w::REP_ERR_UNSUP {
                return Ok(None);
            }
            let what = match r.kind {
                w::REP_ERR_UNKNOWN => "Requested export not available",
                w::REP_ERR_POLICY => "Requested export not available for the server's policy",
                w::REP_ERR_TLS_REQD => {
                    "TLS negotiation required before option 7 (go) (did you forget a valid tls-creds?)"
                }
                _ => "Option 7 (go) failed",
            };
            let msg = r.message();
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                match msg.is_empty() {
                    true => what.to_string(),
                    false => format!("{what}: server reported: {msg}"),
                },
            ));
        }
        match r.kind {
            w::REP_ACK => break,
            w::REP_INFO => match w::Info::decode(&r.data)? {
                w::Info::Export { size, flags } => export_info = Some((size, flags)),
                w::Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => sizes = (min, preferred, max),
                _ => {}
            },
            k => return Err(protocol(format!("unexpected reply {k} to option GO"))),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| protocol("the server sent no export size"))?;
    Ok(Some((size, flags, sizes)))
}

/// `NBD_OPT_EXPORT_NAME`, for a server without `OPT_GO`.
fn export_name(s: &mut Stream, export: &str, no_zeroes: bool) -> io::Result<ExportInfo> {
    check_name(export)?;
    send_option(s, w::OPT_EXPORT_NAME, export.as_bytes())?;
    let mut b = vec![0u8; w::ExportNameReply::wire_len(no_zeroes)];
    read_exact(s, &mut b)?;
    let r = w::ExportNameReply::decode(&b)?;
    Ok((r.size, r.flags, (1, 4096, w::MAX_PAYLOAD as u32)))
}
