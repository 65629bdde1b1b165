//! Connecting to an NBD server and negotiating as qemu 10's client does: the fixed newstyle
//! handshake, extended headers if the server offers them (structured replies otherwise), the
//! meta contexts block status needs, then `OPT_GO` asking for the block size constraints,
//! with `OPT_EXPORT_NAME` for servers that do not know `OPT_GO`.

use super::locator::{NbdLocator, Server};
use super::wire_io::{read_exact, read_u16, read_u32, read_u64};
use super::wire_tmp as w;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How long the handshake may take before the server is given up on (a server at its limit of
/// clients, such as qemu-nbd without `-e`, accepts the connection but never greets).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest option reply vimg reads (qemu's client takes the same bound on strings).
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// A connected socket, TCP or unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Closes both directions (waking a reader blocked on the socket).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
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

/// Connects and negotiates: the socket ready for transmission, and what was agreed.
pub fn connect(loc: &NbdLocator) -> io::Result<(Stream, Negotiated)> {
    let mut s = dial(loc)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let n = handshake(&mut s, loc).map_err(|e| match e.kind() {
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

/// One option reply: its type and payload.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

impl OptReply {
    fn is_error(&self) -> bool {
        self.kind & w::NBD_REP_FLAG_ERROR != 0
    }

    /// The server's message (an error reply's payload), for messages.
    fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

fn send_option(s: &mut Stream, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&w::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

fn read_option_reply(s: &mut Stream, opt: u32) -> io::Result<OptReply> {
    let magic = read_u64(s)?;
    if magic != w::REPLY_MAGIC_OPT {
        return Err(protocol(format!(
            "bad option reply magic 0x{magic:x} from the server"
        )));
    }
    let got = read_u32(s)?;
    let kind = read_u32(s)?;
    let len = read_u32(s)?;
    if got != opt {
        return Err(protocol(format!(
            "the server replied to option {got} where option {opt} was sent"
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(protocol(format!(
            "option reply of {len} bytes from the server is too long"
        )));
    }
    let mut data = vec![0; len as usize];
    read_exact(s, &mut data)?;
    Ok(OptReply { kind, data })
}

/// Sends an option with no payload and reads its one reply: whether the server took it.
fn simple_option(s: &mut Stream, opt: u32) -> io::Result<bool> {
    send_option(s, opt, &[])?;
    let r = read_option_reply(s, opt)?;
    if r.is_error() {
        return Ok(false);
    }
    if r.kind != w::NBD_REP_ACK {
        return Err(protocol(format!(
            "unexpected reply {} to option {opt}",
            r.kind
        )));
    }
    Ok(true)
}

fn name_bytes(out: &mut Vec<u8>, name: &str) -> io::Result<()> {
    if name.len() > w::MAX_STRING as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "export name too long",
        ));
    }
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn handshake(s: &mut Stream, loc: &NbdLocator) -> io::Result<Negotiated> {
    let magic = read_u64(s)?;
    if magic != w::NBDMAGIC {
        return Err(protocol(format!(
            "the server does not speak NBD (greeting 0x{magic:016x})"
        )));
    }
    let magic = read_u64(s)?;
    if magic == w::OLDSTYLE_MAGIC {
        return Err(protocol(
            "the server speaks the oldstyle NBD protocol, which qemu no longer supports",
        ));
    }
    if magic != w::IHAVEOPT {
        return Err(protocol(format!("bad NBD greeting magic 0x{magic:016x}")));
    }
    let server_flags = read_u16(s)?;
    if server_flags & w::NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol(
            "the server does not support the fixed newstyle handshake",
        ));
    }
    let no_zeroes = server_flags & w::NBD_FLAG_NO_ZEROES != 0;
    let mut cflags = w::NBD_FLAG_C_FIXED_NEWSTYLE as u32;
    if no_zeroes {
        cflags |= w::NBD_FLAG_C_NO_ZEROES as u32;
    }
    s.write_all(&cflags.to_be_bytes())?;

    let mode = if simple_option(s, w::NBD_OPT_EXTENDED_HEADERS)? {
        ReplyMode::Extended
    } else if simple_option(s, w::NBD_OPT_STRUCTURED_REPLY)? {
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
        block_size: (min, pref, max.min(w::MAX_PAYLOAD)),
        mode,
        context,
    })
}

/// An export's size, transmission flags and block sizes (min, preferred, max).
type ExportInfo = (u64, u16, (u32, u32, u32));

/// `NBD_OPT_SET_META_CONTEXT` with one query: the id the server gave the context, if it has it.
fn set_meta_context(s: &mut Stream, export: &str, query: &str) -> io::Result<Option<u32>> {
    let mut d = Vec::new();
    name_bytes(&mut d, export)?;
    d.extend_from_slice(&1u32.to_be_bytes());
    name_bytes(&mut d, query)?;
    send_option(s, w::NBD_OPT_SET_META_CONTEXT, &d)?;
    let mut id = None;
    loop {
        let r = read_option_reply(s, w::NBD_OPT_SET_META_CONTEXT)?;
        if r.is_error() {
            return Ok(None);
        }
        match r.kind {
            w::NBD_REP_ACK => return Ok(id),
            w::NBD_REP_META_CONTEXT if r.data.len() >= 4 => {
                let got = u32::from_be_bytes(r.data[..4].try_into().expect("4 bytes"));
                if &r.data[4..] == query.as_bytes() {
                    id = Some(got);
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
    let mut d = Vec::new();
    name_bytes(&mut d, export)?;
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&w::NBD_INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, w::NBD_OPT_GO, &d)?;
    let mut export_info = None;
    let mut sizes = (1, 4096, w::MAX_PAYLOAD);
    loop {
        let r = read_option_reply(s, w::NBD_OPT_GO)?;
        if r.is_error() {
            if r.kind == w::NBD_REP_ERR_UNSUP {
                return Ok(None);
            }
            let what = match r.kind {
                w::NBD_REP_ERR_UNKNOWN => "Requested export not available",
                w::NBD_REP_ERR_POLICY => "Requested export not available for the server's policy",
                w::NBD_REP_ERR_TLS_REQD => "TLS negotiation required before option 7 (go)",
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
            w::NBD_REP_ACK => break,
            w::NBD_REP_INFO if r.data.len() >= 2 => {
                let t = u16::from_be_bytes([r.data[0], r.data[1]]);
                let b = &r.data[2..];
                match t {
                    w::NBD_INFO_EXPORT if b.len() == 10 => {
                        export_info = Some((
                            u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
                            u16::from_be_bytes([b[8], b[9]]),
                        ))
                    }
                    w::NBD_INFO_BLOCK_SIZE if b.len() == 12 => {
                        let u = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4"));
                        sizes = (u(0), u(4), u(8));
                    }
                    w::NBD_INFO_EXPORT | w::NBD_INFO_BLOCK_SIZE => {
                        return Err(protocol(format!(
                            "malformed information {t} from the server"
                        )))
                    }
                    _ => {}
                }
            }
            k => return Err(protocol(format!("unexpected reply {k} to option GO"))),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| protocol("the server sent no export size"))?;
    Ok(Some((size, flags, sizes)))
}

/// `NBD_OPT_EXPORT_NAME`, for a server without `OPT_GO`.
fn export_name(s: &mut Stream, export: &str, no_zeroes: bool) -> io::Result<ExportInfo> {
    if export.len() > w::MAX_STRING as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "export name too long",
        ));
    }
    send_option(s, w::NBD_OPT_EXPORT_NAME, export.as_bytes())?;
    let size = read_u64(s)?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        read_exact(s, &mut [0u8; 124])?;
    }
    Ok((size, flags, (1, 4096, w::MAX_PAYLOAD)))
}
