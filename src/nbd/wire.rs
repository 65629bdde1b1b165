//! The NBD protocol's constants and messages, in both directions.
//!
//! Every message has an encoder (appending to a `Vec<u8>`; [`write_all`] sends one to a
//! [`Write`]) and a decoder that parses a byte slice and returns a [`WireError`] (one line)
//! on anything malformed. Decoders never panic and never allocate from a length they have not
//! checked against the bytes present and the protocol's bounds ([`MAX_STRING`],
//! [`MAX_PAYLOAD`]). All integers are big-endian ("network byte order", proto.md "Conventions").
//!
//! Section names in the doc comments are those of proto.md
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).

use std::fmt;
use std::io::{self, Write};

// ---------------------------------------------------------------------------------------------
// Magics ("Handshake", "Transmission")

/// `NBDMAGIC`, the first 8 bytes the server sends ("Newstyle negotiation").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic after [`NBDMAGIC`], and the start of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle handshake's magic after [`NBDMAGIC`] (not spoken by vimg; recognised only).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The magic of every option reply ("Option haggling").
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a simple (compact) request ("Request message").
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of an extended request (with extended headers negotiated).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// The magic of a simple reply ("Simple reply message").
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk ("Structured reply chunk message").
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// The magic of an extended reply chunk (with extended headers negotiated).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Bounds ("Size constraints", "Metadata querying")

/// The longest string (export name, description, context name, query) accepted: 4096 bytes.
pub const MAX_STRING: usize = 4096;
/// The largest payload (write data, read reply) vimg sends or accepts: 32 MiB, as qemu.
pub const MAX_PAYLOAD: usize = 32 << 20;
/// The largest option payload vimg accepts: room for an export name and many meta-context
/// queries of [`MAX_STRING`] each, bounded so that a client cannot make a peer buffer gigabytes.
pub const MAX_OPTION_LEN: u32 = 1 << 20;
/// The simple request's header length.
pub const REQUEST_LEN: usize = 28;
/// The extended request's header length.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// The simple reply's header length.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The structured reply chunk's header length.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// The extended reply chunk's header length.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// The server greeting's length (magic, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;
/// An option request header's length (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// An option reply header's length (magic, option, reply type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

// ---------------------------------------------------------------------------------------------
// Handshake flags ("Newstyle negotiation")

/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may ask for no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding after EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// The client flags a server knows; any other bit ends the handshake.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Options ("Option types")

/// `NBD_OPT_EXPORT_NAME`: choose an export and end the handshake, with no reply header.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: end the handshake without an export.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: list the exports.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_PEEK_EXPORT` (withdrawn).
pub const OPT_PEEK_EXPORT: u32 = 4;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: describe an export.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: describe an export and enter transmission with it.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option reply types ("Option reply types")

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export of a LIST.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one information item of INFO/GO.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one context of LIST/SET_META_CONTEXT.
pub const REP_META_CONTEXT: u32 = 4;
/// The bit that makes a reply type an error.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`: TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must ask for block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`: the request or reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`: extended headers required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------------------------
// Information types ("NBD_OPT_INFO and NBD_OPT_GO")

/// `NBD_INFO_EXPORT`: size and transmission flags (always sent).
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission flags ("Transmission flags")

/// `NBD_FLAG_HAS_FLAGS`: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL`.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_RESIZE`.
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_FLAG_SEND_CACHE`.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// `NBD_FLAG_BLOCK_STAT_PAYLOAD`.
pub const TFLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// Commands and command flags ("Request types", "Command flags")

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: disconnect, no reply.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// `NBD_CMD_RESIZE`.
pub const CMD_RESIZE: u16 = 8;

/// `NBD_CMD_FLAG_FUA`: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`: WRITE_ZEROES must allocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`: READ in one chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: BLOCK_STATUS with one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`: WRITE_ZEROES fails rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// `NBD_CMD_FLAG_PAYLOAD_LEN`: the length field is a payload length (extended headers).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Structured replies ("Structured reply chunk message", "Structured reply types")

/// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// The bit that makes a chunk type an error.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------------------------
// Metadata contexts ("Metadata querying", "`base:` metadata context")

/// The context of allocation status.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// qemu's context of how deep in the backing chain a range is allocated.
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// The prefix of qemu's dirty-bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `base:allocation`: `NBD_STATE_HOLE`, the range is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: `NBD_STATE_ZERO`, the range reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the range is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

// ---------------------------------------------------------------------------------------------
// Errors ("Error values")

/// `EPERM`: operation not permitted (e.g. a write to a read-only export).
pub const NBD_EPERM: u32 = 1;
/// `EIO`: input/output error.
pub const NBD_EIO: u32 = 5;
/// `ENOMEM`: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// `EINVAL`: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// `ENOSPC`: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// `EOVERFLOW`: value too large (e.g. a read without DF that would need several chunks).
pub const NBD_EOVERFLOW: u32 = 75;
/// `ENOTSUP`: not supported (e.g. FAST_ZERO when zeroing would be slow).
pub const NBD_ENOTSUP: u32 = 95;
/// `ESHUTDOWN`: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;
/// Every errno the protocol allows on the wire.
pub const WIRE_ERRNOS: [u32; 8] = [
    NBD_EPERM,
    NBD_EIO,
    NBD_ENOMEM,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EOVERFLOW,
    NBD_ENOTSUP,
    NBD_ESHUTDOWN,
];

/// The wire errno for an I/O error: the host errno if the protocol allows it (mapped from the
/// host's numbering to the protocol's), otherwise the closest allowed one (`EIO` by default).
pub fn errno_from_io(err: &io::Error) -> u32 {
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::EPERM | libc::EACCES | libc::EROFS => NBD_EPERM,
            libc::ENOMEM => NBD_ENOMEM,
            libc::EINVAL => NBD_EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
            libc::EOVERFLOW => NBD_EOVERFLOW,
            libc::ENOTSUP | libc::ENOSYS => NBD_ENOTSUP,
            libc::ESHUTDOWN => NBD_ESHUTDOWN,
            _ => NBD_EIO,
        };
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NBD_EPERM,
        io::ErrorKind::OutOfMemory => NBD_ENOMEM,
        io::ErrorKind::InvalidInput => NBD_EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => NBD_ENOSPC,
        io::ErrorKind::Unsupported => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

/// The wire errno for an error of vimg's own type: its OS cause if it has one, otherwise by
/// its kind (read-only → `EPERM`, invalid input → `EINVAL`, unsupported → `ENOTSUP`, else `EIO`).
pub fn errno_from_error(err: &crate::Error) -> u32 {
    use std::error::Error as _;
    let mut source = err.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return errno_from_io(io);
        }
        source = s.source();
    }
    match err.kind() {
        crate::ErrorKind::ReadOnly => NBD_EPERM,
        crate::ErrorKind::InvalidInput => NBD_EINVAL,
        crate::ErrorKind::Unsupported => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

/// The I/O error a wire errno stands for (any value outside the protocol's list reads as `EIO`,
/// as proto.md asks of a client).
pub fn io_from_errno(errno: u32) -> io::Error {
    let code = match errno {
        NBD_EPERM => libc::EPERM,
        NBD_ENOMEM => libc::ENOMEM,
        NBD_EINVAL => libc::EINVAL,
        NBD_ENOSPC => libc::ENOSPC,
        NBD_EOVERFLOW => libc::EOVERFLOW,
        NBD_ENOTSUP => libc::ENOTSUP,
        NBD_ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    };
    io::Error::from_raw_os_error(code)
}

// ---------------------------------------------------------------------------------------------
// The codec's error and cursor

/// A malformed message: one line saying what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e.0)
    }
}

/// The result of a decoder.
pub type WireResult<T> = std::result::Result<T, WireError>;

fn bad(msg: impl Into<String>) -> WireError {
    WireError(msg.into())
}

/// A reader over a byte slice that fails, rather than panics, past its end.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    fn take(&mut self, n: usize) -> WireResult<&'a [u8]> {
        if self.buf.len() < n {
            return Err(bad(format!(
                "{}: truncated ({} bytes left, {} needed)",
                self.what,
                self.buf.len(),
                n
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self) -> WireResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> WireResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> WireResult<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes, bounded by [`MAX_STRING`], in UTF-8.
    fn string(&mut self, len: usize, field: &str) -> WireResult<String> {
        if len > MAX_STRING {
            return Err(bad(format!(
                "{}: {field} of {len} bytes is longer than {MAX_STRING}",
                self.what
            )));
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| bad(format!("{}: {field} is not UTF-8", self.what)))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(&self) -> WireResult<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(bad(format!(
                "{}: {} unexpected trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// A string's length as the u32 the wire carries (strings are bounded far below 4 GiB).
fn len32(s: &str) -> u32 {
    u32::try_from(s.len()).unwrap_or(u32::MAX)
}

/// Sends an encoded message (any encoder's output) to `w`.
pub fn write_all(w: &mut impl Write, encode: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
    let mut buf = Vec::new();
    encode(&mut buf);
    w.write_all(&buf)
}

// ---------------------------------------------------------------------------------------------
// Handshake ("Newstyle negotiation", "Fixed newstyle negotiation")

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, u16 handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags ([`FLAG_FIXED_NEWSTYLE`], [`FLAG_NO_ZEROES`]).
    pub flags: u16,
}

impl Greeting {
    /// Appends the 18-byte greeting.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, NBDMAGIC);
        put_u64(out, IHAVEOPT);
        put_u16(out, self.flags);
    }

    /// Parses the 18-byte greeting; an oldstyle server is refused.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "server greeting");
        if c.u64()? != NBDMAGIC {
            return Err(bad("server greeting: bad magic (not an NBD server)"));
        }
        match c.u64()? {
            IHAVEOPT => {}
            CLISERV_MAGIC => {
                return Err(bad(
                    "server greeting: oldstyle negotiation is not supported",
                ))
            }
            _ => return Err(bad("server greeting: bad newstyle magic")),
        }
        let flags = c.u16()?;
        c.end()?;
        Ok(Greeting { flags })
    }
}

/// The client's 4-byte flags after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    /// Appends the 4-byte client flags.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.0);
    }

    /// Parses the client flags; a bit the protocol does not define is an error (the server
    /// must then close the connection).
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "client flags");
        let flags = c.u32()?;
        c.end()?;
        if flags & !KNOWN_CLIENT_FLAGS != 0 {
            return Err(bad(format!("client flags: unknown bits {flags:#x}")));
        }
        Ok(ClientFlags(flags))
    }
}

/// An option request's header: `IHAVEOPT`, u32 option, u32 payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`OPT_*`).
    pub option: u32,
    /// The length of the payload that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Appends the 16-byte header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, IHAVEOPT);
        put_u32(out, self.option);
        put_u32(out, self.len);
    }

    /// Parses the 16-byte header. The length is not bounded here: a server drains an
    /// oversized payload or drops the client as it chooses (compare with [`MAX_OPTION_LEN`]).
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "option request");
        if c.u64()? != IHAVEOPT {
            return Err(bad("option request: bad magic"));
        }
        let option = c.u32()?;
        let len = c.u32()?;
        c.end()?;
        Ok(OptionHeader { option, len })
    }
}

/// An option reply's header: magic, u32 option, u32 reply type, u32 payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// The reply type (`REP_*`).
    pub reply: u32,
    /// The length of the payload that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Appends the 20-byte header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, OPTION_REPLY_MAGIC);
        put_u32(out, self.option);
        put_u32(out, self.reply);
        put_u32(out, self.len);
    }

    /// Parses the 20-byte header; a payload longer than [`MAX_OPTION_LEN`] is refused.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "option reply");
        if c.u64()? != OPTION_REPLY_MAGIC {
            return Err(bad("option reply: bad magic"));
        }
        let option = c.u32()?;
        let reply = c.u32()?;
        let len = c.u32()?;
        c.end()?;
        if len > MAX_OPTION_LEN {
            return Err(bad(format!(
                "option reply: payload of {len} bytes is too long"
            )));
        }
        Ok(OptionReplyHeader { option, reply, len })
    }

    /// Whether the reply type is an error (`REP_ERR_*`).
    pub fn is_error(&self) -> bool {
        self.reply & REP_FLAG_ERROR != 0
    }
}

/// Appends a whole option reply: header and payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    OptionReplyHeader {
        option,
        reply,
        len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
    }
    .encode(out);
    out.extend_from_slice(payload);
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: u64 size, u16 transmission flags, and 124
/// zero bytes unless the client asked for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// The export's size in bytes.
    pub size: u64,
    /// The transmission flags (`TFLAG_*`).
    pub flags: u16,
}

impl ExportNameReply {
    /// Appends the reply, with the 124 zero bytes unless `no_zeroes`.
    pub fn encode(&self, out: &mut Vec<u8>, no_zeroes: bool) {
        put_u64(out, self.size);
        put_u16(out, self.flags);
        if !no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
    }

    /// The length of the reply on the wire.
    pub fn wire_len(no_zeroes: bool) -> usize {
        if no_zeroes {
            10
        } else {
            134
        }
    }

    /// Parses the reply (10 bytes, or 134 with the padding).
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        if buf.len() != 10 && buf.len() != 134 {
            return Err(bad(format!(
                "export name reply: {} bytes, expected 10 or 134",
                buf.len()
            )));
        }
        let mut c = Cursor::new(buf, "export name reply");
        let size = c.u64()?;
        let flags = c.u16()?;
        Ok(ExportNameReply { size, flags })
    }
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`: u32 name length, name, u16 count, count ×
/// u16 information types.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// The export's name (empty: the default export).
    pub name: String,
    /// The information types asked for (`INFO_*`).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, len32(&self.name));
        out.extend_from_slice(self.name.as_bytes());
        put_u16(out, u16::try_from(self.requests.len()).unwrap_or(u16::MAX));
        for r in &self.requests {
            put_u16(out, *r);
        }
    }

    /// Parses the payload.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "info request");
        let len = c.u32()? as usize;
        let name = c.string(len, "export name")?;
        let n = c.u16()? as usize;
        if c.buf.len() != n * 2 {
            return Err(bad(format!(
                "info request: {n} information requests but {} bytes",
                c.buf.len()
            )));
        }
        let mut requests = Vec::with_capacity(n);
        for _ in 0..n {
            requests.push(c.u16()?);
        }
        Ok(InfoRequest { name, requests })
    }
}

/// One `NBD_REP_INFO` payload: u16 information type and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// The export's size.
        size: u64,
        /// Its transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    BlockSize {
        /// Minimum block size (a power of two, 1 to 64 KiB).
        min: u32,
        /// Preferred block size (a power of two ≥ min and ≥ 512).
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// An information type this codec does not know (to be ignored by a client).
    Unknown {
        /// Its type.
        kind: u16,
        /// Its data.
        data: Vec<u8>,
    },
}

impl Info {
    /// Appends the payload (not the reply header; see [`encode_option_reply`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Info::Export { size, flags } => {
                put_u16(out, INFO_EXPORT);
                put_u64(out, *size);
                put_u16(out, *flags);
            }
            Info::Name(s) => {
                put_u16(out, INFO_NAME);
                out.extend_from_slice(s.as_bytes());
            }
            Info::Description(s) => {
                put_u16(out, INFO_DESCRIPTION);
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                put_u16(out, INFO_BLOCK_SIZE);
                put_u32(out, *min);
                put_u32(out, *preferred);
                put_u32(out, *max);
            }
            Info::Unknown { kind, data } => {
                put_u16(out, *kind);
                out.extend_from_slice(data);
            }
        }
    }

    /// Parses a `NBD_REP_INFO` payload.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "info reply");
        let kind = c.u16()?;
        let info = match kind {
            INFO_EXPORT => Info::Export {
                size: c.u64()?,
                flags: c.u16()?,
            },
            INFO_NAME => {
                let n = c.buf.len();
                Info::Name(c.string(n, "export name")?)
            }
            INFO_DESCRIPTION => {
                let n = c.buf.len();
                Info::Description(c.string(n, "description")?)
            }
            INFO_BLOCK_SIZE => {
                let (min, preferred, max) = (c.u32()?, c.u32()?, c.u32()?);
                if !min.is_power_of_two()
                    || min > 64 << 10
                    || !preferred.is_power_of_two()
                    || preferred < min
                    || max < min
                {
                    return Err(bad(format!(
                        "info reply: invalid block sizes {min}/{preferred}/{max}"
                    )));
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                }
            }
            _ => {
                if c.buf.len() > MAX_OPTION_LEN as usize {
                    return Err(bad("info reply: too long"));
                }
                Info::Unknown {
                    kind,
                    data: c.rest().to_vec(),
                }
            }
        };
        c.end()?;
        Ok(info)
    }
}

/// One `NBD_REP_SERVER` payload (an answer to `NBD_OPT_LIST`): u32 name length, name, and the
/// rest of the payload as the description.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerEntry {
    /// The export's name.
    pub name: String,
    /// Its description (may be empty).
    pub description: String,
}

impl ServerEntry {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, len32(&self.name));
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(self.description.as_bytes());
    }

    /// Parses the payload.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "server list reply");
        let len = c.u32()? as usize;
        let name = c.string(len, "export name")?;
        let n = c.buf.len();
        let description = c.string(n, "description")?;
        Ok(ServerEntry { name, description })
    }
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: u32 name length,
/// export name, u32 query count, then each query as u32 length and string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaContextRequest {
    /// The export's name.
    pub export: String,
    /// The queries (context names, or namespaces such as `qemu:` to list).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, len32(&self.export));
        out.extend_from_slice(self.export.as_bytes());
        put_u32(out, u32::try_from(self.queries.len()).unwrap_or(u32::MAX));
        for q in &self.queries {
            put_u32(out, len32(q));
            out.extend_from_slice(q.as_bytes());
        }
    }

    /// Parses the payload.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "meta context request");
        let len = c.u32()? as usize;
        let export = c.string(len, "export name")?;
        let n = c.u32()? as usize;
        // Each query takes at least its 4-byte length: bound the count by the bytes present.
        if n > c.buf.len() / 4 {
            return Err(bad(format!(
                "meta context request: {n} queries in {} bytes",
                c.buf.len()
            )));
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            let qlen = c.u32()? as usize;
            queries.push(c.string(qlen, "query")?);
        }
        c.end()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// One `NBD_REP_META_CONTEXT` payload: u32 context id and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextReply {
    /// The id the server gave the context (0 in answers to LIST).
    pub id: u32,
    /// The context's name.
    pub name: String,
}

impl MetaContextReply {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.id);
        out.extend_from_slice(self.name.as_bytes());
    }

    /// Parses the payload.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "meta context reply");
        let id = c.u32()?;
        let n = c.buf.len();
        let name = c.string(n, "context name")?;
        Ok(MetaContextReply { id, name })
    }
}

/// Parses an option reply's error payload (a message in UTF-8, possibly empty); bytes that are
/// not UTF-8 are replaced.
pub fn decode_error_message(buf: &[u8]) -> String {
    let end = buf.len().min(MAX_STRING);
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests ("Request message")

/// A request, simple or extended (the form is chosen when encoding, or by the magic when
/// decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`).
    pub kind: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (of the effect, or of the payload with `CMD_FLAG_PAYLOAD_LEN`); 32 bits in a
    /// simple request.
    pub length: u64,
}

impl Request {
    /// Appends the 28-byte simple request; a length above 4 GiB is an error.
    pub fn encode_simple(&self, out: &mut Vec<u8>) -> WireResult<()> {
        let len = u32::try_from(self.length)
            .map_err(|_| bad("request: length does not fit a simple request"))?;
        put_u32(out, REQUEST_MAGIC);
        put_u16(out, self.flags);
        put_u16(out, self.kind);
        put_u64(out, self.cookie);
        put_u64(out, self.offset);
        put_u32(out, len);
        Ok(())
    }

    /// Appends the 32-byte extended request.
    pub fn encode_extended(&self, out: &mut Vec<u8>) {
        put_u32(out, EXTENDED_REQUEST_MAGIC);
        put_u16(out, self.flags);
        put_u16(out, self.kind);
        put_u64(out, self.cookie);
        put_u64(out, self.offset);
        put_u64(out, self.length);
    }

    /// Appends the request in the form negotiated.
    pub fn encode(&self, out: &mut Vec<u8>, extended: bool) -> WireResult<()> {
        if extended {
            self.encode_extended(out);
            Ok(())
        } else {
            self.encode_simple(out)
        }
    }

    /// The header length of a request in the form negotiated.
    pub fn header_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Parses a request header of exactly [`Request::header_len`] bytes; the magic must match
    /// the form negotiated (proto.md: a server must not accept the other).
    pub fn decode(buf: &[u8], extended: bool) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "request");
        let magic = c.u32()?;
        let expected = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected {
            return Err(bad(format!("request: bad magic {magic:#010x}")));
        }
        let flags = c.u16()?;
        let kind = c.u16()?;
        let cookie = c.u64()?;
        let offset = c.u64()?;
        let length = if extended { c.u64()? } else { c.u32()? as u64 };
        c.end()?;
        Ok(Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        })
    }

    /// Whether the request carries a payload after its header (WRITE, or any command with
    /// `CMD_FLAG_PAYLOAD_LEN`), and how long it is.
    pub fn payload_len(&self) -> u64 {
        if self.kind == CMD_WRITE || self.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            self.length
        } else {
            0
        }
    }
}

/// The payload of a BLOCK_STATUS request with `CMD_FLAG_PAYLOAD_LEN` (extended headers,
/// "NBD_CMD_BLOCK_STATUS"): u64 effect length, then the u32 ids of the contexts wanted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockStatusPayload {
    /// The length of the range to describe.
    pub effect_length: u64,
    /// The context ids the client wants (a subset of those negotiated).
    pub ids: Vec<u32>,
}

impl BlockStatusPayload {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.effect_length);
        for id in &self.ids {
            put_u32(out, *id);
        }
    }

    /// Parses the payload: at least one id, and a whole number of them.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "block status payload");
        let effect_length = c.u64()?;
        if c.buf.is_empty()
            || !c.buf.len().is_multiple_of(4)
            || c.buf.len() > MAX_OPTION_LEN as usize
        {
            return Err(bad(format!(
                "block status payload: {} bytes of context ids",
                c.buf.len()
            )));
        }
        let mut ids = Vec::with_capacity(c.buf.len() / 4);
        while !c.buf.is_empty() {
            ids.push(c.u32()?);
        }
        Ok(BlockStatusPayload { effect_length, ids })
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies ("Simple reply message", "Structured reply chunk message")

/// A reply header of any of the three forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: u32 error, u64 cookie (then the data of a successful READ).
    Simple {
        /// The errno (0 for success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk (`STRUCTURED_REPLY_MAGIC`) or an extended one
    /// (`EXTENDED_REPLY_MAGIC`, which adds the request's offset and a 64-bit length).
    Chunk(ChunkHeader),
}

/// A structured or extended reply chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkHeader {
    /// Reply flags ([`REPLY_FLAG_DONE`]).
    pub flags: u16,
    /// The chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (extended form only; 0 when decoded from a structured one).
    pub offset: u64,
    /// The length of the chunk's payload.
    pub length: u64,
}

impl ChunkHeader {
    /// Appends the 20-byte structured header (the length must fit 32 bits) or the 32-byte
    /// extended header.
    pub fn encode(&self, out: &mut Vec<u8>, extended: bool) {
        if extended {
            put_u32(out, EXTENDED_REPLY_MAGIC);
            put_u16(out, self.flags);
            put_u16(out, self.kind);
            put_u64(out, self.cookie);
            put_u64(out, self.offset);
            put_u64(out, self.length);
        } else {
            put_u32(out, STRUCTURED_REPLY_MAGIC);
            put_u16(out, self.flags);
            put_u16(out, self.kind);
            put_u64(out, self.cookie);
            put_u32(out, u32::try_from(self.length).unwrap_or(u32::MAX));
        }
    }

    /// Whether the chunk type is an error type.
    pub fn is_error(&self) -> bool {
        self.kind & REPLY_TYPE_FLAG_ERROR != 0
    }

    /// Whether this is the reply's last chunk.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

impl ReplyHeader {
    /// Appends a simple reply header.
    pub fn encode_simple(out: &mut Vec<u8>, error: u32, cookie: u64) {
        put_u32(out, SIMPLE_REPLY_MAGIC);
        put_u32(out, error);
        put_u64(out, cookie);
    }

    /// The header length that a reply starting with `magic` has, or `None` for an unknown
    /// magic.
    pub fn len_for_magic(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_LEN),
            EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_LEN),
            _ => None,
        }
    }

    /// Parses a whole reply header (its length given by [`ReplyHeader::len_for_magic`]). A
    /// chunk payload longer than [`MAX_PAYLOAD`] plus room for headers is refused.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "reply");
        let magic = c.u32()?;
        let header = match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: c.u32()?,
                cookie: c.u64()?,
            },
            STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                let flags = c.u16()?;
                let kind = c.u16()?;
                let cookie = c.u64()?;
                let (offset, length) = if magic == EXTENDED_REPLY_MAGIC {
                    (c.u64()?, c.u64()?)
                } else {
                    (0, c.u32()? as u64)
                };
                if length > MAX_PAYLOAD as u64 + 4096 {
                    return Err(bad(format!(
                        "reply: chunk of {length} bytes is longer than the 32 MiB limit"
                    )));
                }
                ReplyHeader::Chunk(ChunkHeader {
                    flags,
                    kind,
                    cookie,
                    offset,
                    length,
                })
            }
            _ => return Err(bad(format!("reply: bad magic {magic:#010x}"))),
        };
        c.end()?;
        Ok(header)
    }

    /// The request cookie the reply answers.
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } => *cookie,
            ReplyHeader::Chunk(h) => h.cookie,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chunk payloads ("Structured reply types")

/// Appends an `OFFSET_DATA` chunk's payload prefix (u64 offset); the data follows it.
pub fn encode_offset_data_prefix(out: &mut Vec<u8>, offset: u64) {
    put_u64(out, offset);
}

/// Parses an `OFFSET_DATA` payload into its offset and data (at least one byte).
pub fn decode_offset_data(buf: &[u8]) -> WireResult<(u64, &[u8])> {
    let mut c = Cursor::new(buf, "data chunk");
    let offset = c.u64()?;
    let data = c.rest();
    if data.is_empty() {
        return Err(bad("data chunk: no data"));
    }
    Ok((offset, data))
}

/// An `OFFSET_HOLE` chunk's payload: u64 offset, u32 length (non-zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetHole {
    /// Offset of the hole.
    pub offset: u64,
    /// Its length.
    pub length: u32,
}

impl OffsetHole {
    /// Appends the 12-byte payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.offset);
        put_u32(out, self.length);
    }

    /// Parses the 12-byte payload.
    pub fn decode(buf: &[u8]) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "hole chunk");
        let offset = c.u64()?;
        let length = c.u32()?;
        c.end()?;
        if length == 0 {
            return Err(bad("hole chunk: zero length"));
        }
        Ok(OffsetHole { offset, length })
    }
}

/// One extent of a block status reply: its length and its flags in the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// Flags, meaning given by the context (e.g. [`STATE_HOLE`] | [`STATE_ZERO`]).
    pub flags: u64,
}

/// A `BLOCK_STATUS` or `BLOCK_STATUS_EXT` chunk's payload: the context id and its extents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockStatusChunk {
    /// The context id.
    pub context_id: u32,
    /// The extents, in order from the request's offset.
    pub extents: Vec<Extent>,
}

impl BlockStatusChunk {
    /// The chunk type to send this in: `BLOCK_STATUS_EXT` with extended headers.
    pub fn chunk_type(extended: bool) -> u16 {
        if extended {
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            REPLY_TYPE_BLOCK_STATUS
        }
    }

    /// Appends the payload: `BLOCK_STATUS` (u32 id, (u32 length, u32 flags)*; lengths and
    /// flags must fit 32 bits, larger are clamped) or `BLOCK_STATUS_EXT` (u32 id, u32 count,
    /// (u64 length, u64 flags)*).
    pub fn encode(&self, out: &mut Vec<u8>, extended: bool) {
        put_u32(out, self.context_id);
        if extended {
            put_u32(out, u32::try_from(self.extents.len()).unwrap_or(u32::MAX));
            for e in &self.extents {
                put_u64(out, e.length);
                put_u64(out, e.flags);
            }
        } else {
            for e in &self.extents {
                put_u32(out, u32::try_from(e.length).unwrap_or(u32::MAX));
                put_u32(out, u32::try_from(e.flags).unwrap_or(u32::MAX));
            }
        }
    }

    /// Parses a payload of chunk type `kind` (`BLOCK_STATUS` or `BLOCK_STATUS_EXT`): at
    /// least one extent, every one non-empty.
    pub fn decode(buf: &[u8], kind: u16) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "block status chunk");
        let context_id = c.u32()?;
        let (n, wide) = match kind {
            REPLY_TYPE_BLOCK_STATUS => {
                if !c.buf.len().is_multiple_of(8) {
                    return Err(bad("block status chunk: not a whole number of extents"));
                }
                (c.buf.len() / 8, false)
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                let n = c.u32()? as usize;
                if !c.buf.len().is_multiple_of(16) || c.buf.len() / 16 != n {
                    return Err(bad(format!(
                        "block status chunk: {n} extents in {} bytes",
                        c.buf.len()
                    )));
                }
                (n, true)
            }
            _ => return Err(bad(format!("block status chunk: wrong chunk type {kind}"))),
        };
        if n == 0 {
            return Err(bad("block status chunk: no extents"));
        }
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            let e = if wide {
                Extent {
                    length: c.u64()?,
                    flags: c.u64()?,
                }
            } else {
                Extent {
                    length: c.u32()? as u64,
                    flags: c.u32()? as u64,
                }
            };
            if e.length == 0 {
                return Err(bad("block status chunk: extent of length 0"));
            }
            extents.push(e);
        }
        c.end()?;
        Ok(BlockStatusChunk {
            context_id,
            extents,
        })
    }
}

/// An `ERROR` or `ERROR_OFFSET` chunk's payload: u32 errno, u16 message length, message, and
/// for `ERROR_OFFSET` the u64 offset the error is at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorChunk {
    /// The errno (one of [`WIRE_ERRNOS`] when sent; non-zero).
    pub error: u32,
    /// A human-readable message (may be empty).
    pub message: String,
    /// The offset of the error (`ERROR_OFFSET` only).
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// The chunk type this is sent as.
    pub fn chunk_type(&self) -> u16 {
        if self.offset.is_some() {
            REPLY_TYPE_ERROR_OFFSET
        } else {
            REPLY_TYPE_ERROR
        }
    }

    /// Appends the payload; a message longer than [`MAX_STRING`] is cut on a character
    /// boundary.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut end = self.message.len().min(MAX_STRING);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        put_u32(out, self.error);
        put_u16(out, end as u16);
        out.extend_from_slice(&self.message.as_bytes()[..end]);
        if let Some(off) = self.offset {
            put_u64(out, off);
        }
    }

    /// Parses a payload of chunk type `kind` (`ERROR`, `ERROR_OFFSET`, or an unknown error
    /// type, whose extra bytes after the message are ignored as proto.md asks).
    pub fn decode(buf: &[u8], kind: u16) -> WireResult<Self> {
        let mut c = Cursor::new(buf, "error chunk");
        let error = c.u32()?;
        if error == 0 {
            return Err(bad("error chunk: error value 0"));
        }
        let len = c.u16()? as usize;
        let message = c.take(len)?;
        let message = String::from_utf8_lossy(message).into_owned();
        let offset = match kind {
            REPLY_TYPE_ERROR_OFFSET => Some(c.u64()?),
            REPLY_TYPE_ERROR => None,
            k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
                c.rest();
                None
            }
            _ => return Err(bad(format!("error chunk: not an error type {kind}"))),
        };
        c.end()?;
        Ok(ErrorChunk {
            error,
            message,
            offset,
        })
    }
}

/// Exercises the option and request decoders on arbitrary bytes (the fuzz target
/// `nbd_request` and its replay in the hostile tests): every decoder must return, never panic.
pub fn exercise(data: &[u8]) {
    let _ = Greeting::decode(data);
    let _ = ClientFlags::decode(data);
    let _ = OptionHeader::decode(data);
    let _ = OptionReplyHeader::decode(data);
    let _ = ExportNameReply::decode(data);
    let _ = InfoRequest::decode(data);
    let _ = Info::decode(data);
    let _ = ServerEntry::decode(data);
    let _ = MetaContextRequest::decode(data);
    let _ = MetaContextReply::decode(data);
    let _ = Request::decode(data, false);
    let _ = Request::decode(data, true);
    let _ = BlockStatusPayload::decode(data);
    let _ = ReplyHeader::decode(data);
    let _ = decode_offset_data(data);
    let _ = OffsetHole::decode(data);
    let _ = BlockStatusChunk::decode(data, REPLY_TYPE_BLOCK_STATUS);
    let _ = BlockStatusChunk::decode(data, REPLY_TYPE_BLOCK_STATUS_EXT);
    let _ = ErrorChunk::decode(data, REPLY_TYPE_ERROR);
    let _ = ErrorChunk::decode(data, REPLY_TYPE_ERROR_OFFSET);
    // The request stream as a server reads it: headers, then payloads within bounds.
    let mut rest = data;
    for extended in [false, true] {
        let n = Request::header_len(extended);
        while rest.len() >= n {
            let Ok(req) = Request::decode(&rest[..n], extended) else {
                rest = &rest[1..];
                continue;
            };
            rest = &rest[n..];
            let p = req.payload_len().min(rest.len() as u64) as usize;
            if req.kind == CMD_BLOCK_STATUS {
                let _ = BlockStatusPayload::decode(&rest[..p]);
            }
            rest = &rest[p..];
        }
        rest = data;
    }
}

#[cfg(test)]
mod tests;
