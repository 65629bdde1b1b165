//! Requests and replies on one connection, from several threads at once.
//!
//! A request is sent whole under the writer's lock. Replies are read by whichever waiting
//! thread takes the reader's turn (leader and followers): a chunk for its own request is read
//! straight into its buffer; a chunk for another request is read into memory and left in that
//! request's slot, and its owner woken. So one request in flight costs no copy, and replies
//! may come in any order. A malformed reply, an unknown cookie, an oversized length or a
//! hang-up ends the connection: every request waiting, and every later one, gets the error.

use super::connect::{ReplyMode, Stream};
use super::wire_io::{read_exact, read_u64};
use crate::nbd::wire as w;
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// One extent of a block status reply: its length and its flags in the context asked for.
pub type Extent = (u64, u32);

/// A request being answered.
#[derive(Default)]
struct Slot {
    cmd: u16,
    offset: u64,
    len: u64,
    /// Data read for the request by another thread: (offset within the request, bytes).
    pieces: Vec<(u64, Vec<u8>)>,
    /// Holes the server reported: (offset within the request, length).
    holes: Vec<(u64, u64)>,
    /// Bytes of a read covered by data and holes so far.
    covered: u64,
    extents: Vec<Extent>,
    error: Option<io::Error>,
    done: bool,
}

struct Shared {
    pending: HashMap<u64, Slot>,
    /// A thread is reading replies (or a header read is waiting in `handoff`).
    reading: bool,
    /// A data chunk's header read by one thread for another's request: the owner reads the
    /// data straight into its buffer, and takes over the reading turn.
    handoff: Option<Header>,
    /// Why the connection is unusable.
    dead: Option<(io::ErrorKind, String)>,
}

/// One NBD connection in its transmission phase.
pub struct Transport {
    writer: Mutex<Stream>,
    reader: Mutex<Stream>,
    shared: Mutex<Shared>,
    turn: Condvar,
    mode: ReplyMode,
    /// The meta context block status replies are read for.
    context: Option<u32>,
    next_cookie: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The error a server's errno stands for (anything outside the protocol's list is `EIO`),
/// with the server's message.
pub fn server_error(errno: u32, msg: &str) -> io::Error {
    let os = w::io_from_errno(errno);
    if msg.is_empty() {
        return os;
    }
    let text = os.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    io::Error::new(os.kind(), format!("{text} (server reported: {msg})"))
}

/// Where to put what the reader reads for its own request.
struct Own<'a> {
    cookie: u64,
    buf: Option<&'a mut [u8]>,
}

/// What reading one chunk came to.
enum Step {
    /// The chunk was applied to its request.
    Done,
    /// A data chunk for another request: its header, for that request's thread.
    HandOff(Header),
}

/// A reply header, in whichever form the server sent it.
#[derive(Clone, Copy)]
struct Header {
    cookie: u64,
    /// `None` for a simple reply (with its error in `error`).
    chunk: Option<(u16, u16)>,
    error: u32,
    len: u64,
}

impl Transport {
    /// Takes over a negotiated connection.
    pub fn new(stream: Stream, mode: ReplyMode, context: Option<u32>) -> io::Result<Self> {
        Ok(Transport {
            reader: Mutex::new(stream.try_clone()?),
            writer: Mutex::new(stream),
            shared: Mutex::new(Shared {
                pending: HashMap::new(),
                reading: false,
                handoff: None,
                dead: None,
            }),
            turn: Condvar::new(),
            mode,
            context,
            next_cookie: AtomicU64::new(1),
        })
    }

    /// Whether the connection has failed.
    pub fn is_dead(&self) -> bool {
        lock(&self.shared).dead.is_some()
    }

    /// Sends `NBD_CMD_DISC` and closes the socket (best effort).
    pub fn disconnect(&self) {
        let _ = self.send(w::CMD_DISC, 0, 0, 0, 0, &[]);
        lock(&self.writer).shutdown();
    }

    fn send(
        &self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut h = Vec::with_capacity(w::EXTENDED_REQUEST_LEN);
        w::Request {
            flags,
            kind: cmd,
            cookie,
            offset,
            length: len,
        }
        .encode(&mut h, self.mode == ReplyMode::Extended)?;
        let mut s = lock(&self.writer);
        s.write_all(&h)?;
        if !payload.is_empty() {
            s.write_all(payload)?;
        }
        Ok(())
    }

    fn fail(&self, e: &io::Error) {
        let mut g = lock(&self.shared);
        if g.dead.is_none() {
            g.dead = Some((e.kind(), e.to_string()));
        }
        drop(g);
        lock(&self.writer).shutdown();
        self.turn.notify_all();
    }

    fn dead_error(d: &(io::ErrorKind, String)) -> io::Error {
        io::Error::new(d.0, d.1.clone())
    }

    /// Sends one request and waits for its reply: for a READ, `buf` (of `len` bytes) is
    /// filled; for BLOCK_STATUS, the extents of the negotiated context are returned.
    pub fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
        buf: Option<&mut [u8]>,
    ) -> io::Result<Vec<Extent>> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut g = lock(&self.shared);
            if let Some(d) = &g.dead {
                return Err(Self::dead_error(d));
            }
            g.pending.insert(
                cookie,
                Slot {
                    cmd,
                    offset,
                    len,
                    ..Slot::default()
                },
            );
        }
        if let Err(e) = self.send(cmd, flags, cookie, offset, len, payload) {
            self.fail(&e);
            lock(&self.shared).pending.remove(&cookie);
            return Err(e);
        }
        let mut own = Own { cookie, buf };
        let mut g = lock(&self.shared);
        loop {
            if g.pending.get(&cookie).is_some_and(|s| s.done) {
                let slot = g.pending.remove(&cookie).expect("present");
                drop(g);
                return Self::finish(slot, own.buf);
            }
            if let Some(d) = &g.dead {
                let d = Self::dead_error(d);
                g.pending.remove(&cookie);
                return Err(d);
            }
            let given = match g.handoff {
                Some(h) if h.cookie == cookie => {
                    g.handoff = None;
                    Some(h)
                }
                _ if !g.reading => {
                    g.reading = true;
                    None
                }
                _ => {
                    g = self.turn.wait(g).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
            };
            drop(g);
            let r = self.read_chunk(&mut own, given);
            if let Err(e) = &r {
                self.fail(e);
            }
            g = lock(&self.shared);
            match r {
                Ok(Step::HandOff(h)) => g.handoff = Some(h),
                _ => g.reading = false,
            }
            self.turn.notify_all();
        }
    }

    /// Puts together what a finished request got.
    fn finish(slot: Slot, buf: Option<&mut [u8]>) -> io::Result<Vec<Extent>> {
        if let Some(e) = slot.error {
            return Err(e);
        }
        if slot.cmd == w::CMD_READ {
            if slot.covered != slot.len {
                return Err(protocol(format!(
                    "the server's reply to a read of {} bytes at {} covered {} bytes",
                    slot.len, slot.offset, slot.covered
                )));
            }
            if let Some(buf) = buf {
                for (at, bytes) in slot.pieces {
                    buf[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
                }
                for (at, n) in slot.holes {
                    buf[at as usize..(at + n) as usize].fill(0);
                }
            }
        }
        Ok(slot.extents)
    }

    fn read_header(&self, s: &mut Stream) -> io::Result<Header> {
        let mut b = [0u8; w::EXTENDED_REPLY_LEN];
        read_exact(s, &mut b[..4])?;
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let expected = match (magic, self.mode) {
            (w::SIMPLE_REPLY_MAGIC, _) => true,
            (w::STRUCTURED_REPLY_MAGIC, m) => m == ReplyMode::Structured,
            (w::EXTENDED_REPLY_MAGIC, m) => m == ReplyMode::Extended,
            _ => false,
        };
        let n = w::ReplyHeader::len_for_magic(magic)
            .filter(|_| expected)
            .ok_or_else(|| protocol(format!("bad reply magic 0x{magic:08x} from the server")))?;
        read_exact(s, &mut b[4..n])?;
        Ok(match w::ReplyHeader::decode(&b[..n])? {
            w::ReplyHeader::Simple { error, cookie } => Header {
                cookie,
                chunk: None,
                error,
                len: 0,
            },
            w::ReplyHeader::Chunk(c) => Header {
                cookie: c.cookie,
                chunk: Some((c.flags, c.kind)),
                error: 0,
                len: c.length,
            },
        })
    }

    /// Reads one reply (simple) or chunk (structured) and applies it to its request, or, for
    /// data of another thread's request, hands the header over to that thread. A failure here
    /// is the connection's.
    fn read_chunk(&self, own: &mut Own<'_>, given: Option<Header>) -> io::Result<Step> {
        let mut s = lock(&self.reader);
        let s = &mut *s;
        let h = match given {
            Some(h) => h,
            None => self.read_header(s).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "Connection closed by the server",
                ),
                _ => e,
            })?,
        };
        let (cmd, offset, len) = {
            let g = lock(&self.shared);
            match g.pending.get(&h.cookie) {
                Some(slot) if !slot.done => (slot.cmd, slot.offset, slot.len),
                _ => {
                    return Err(protocol(format!(
                        "the server replied with unknown cookie {}",
                        h.cookie
                    )))
                }
            }
        };
        let mine = h.cookie == own.cookie;
        let carries_data = match h.chunk {
            None => h.error == 0 && cmd == w::CMD_READ,
            Some((_, kind)) => kind == w::REPLY_TYPE_OFFSET_DATA && cmd == w::CMD_READ,
        };
        if carries_data && !mine {
            return Ok(Step::HandOff(h));
        }
        let eof = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "Connection closed by the server in the middle of a reply",
            ),
            _ => e,
        };
        let mut update = Slot::default();
        let mut done = true;
        match h.chunk {
            None => {
                if h.error != 0 {
                    update.error = Some(server_error(h.error, ""));
                } else if cmd == w::CMD_READ {
                    let n = usize::try_from(len).map_err(|_| protocol("read too long"))?;
                    match (mine, own.buf.as_deref_mut()) {
                        (true, Some(b)) => {
                            read_exact(s, &mut b[..n]).map_err(eof)?;
                        }
                        _ => {
                            let mut v = vec![0; n];
                            read_exact(s, &mut v).map_err(eof)?;
                            update.pieces.push((0, v));
                        }
                    }
                    update.covered = len;
                }
            }
            Some((flags, kind)) => {
                done = flags & w::REPLY_FLAG_DONE != 0;
                let limit = match kind {
                    w::REPLY_TYPE_OFFSET_DATA => len + 8,
                    _ => 1 << 20,
                };
                if h.len > limit {
                    return Err(protocol(format!(
                        "reply chunk of {} bytes from the server is too long",
                        h.len
                    )));
                }
                match kind {
                    w::REPLY_TYPE_NONE if h.len == 0 && done => {}
                    w::REPLY_TYPE_OFFSET_DATA if cmd == w::CMD_READ && h.len > 8 => {
                        let at = read_u64(s).map_err(eof)?;
                        let n = h.len - 8;
                        let rel = at
                            .checked_sub(offset)
                            .filter(|r| r.checked_add(n).is_some_and(|e| e <= len))
                            .ok_or_else(|| protocol(format!(
                                "the server sent data at {at}+{n} for a read of {len} bytes at {offset}"
                            )))?;
                        match (mine, own.buf.as_deref_mut()) {
                            (true, Some(b)) => {
                                read_exact(s, &mut b[rel as usize..(rel + n) as usize])
                                    .map_err(eof)?;
                            }
                            _ => {
                                let mut v = vec![0; n as usize];
                                read_exact(s, &mut v).map_err(eof)?;
                                update.pieces.push((rel, v));
                            }
                        }
                        update.covered = n;
                    }
                    w::REPLY_TYPE_OFFSET_HOLE if cmd == w::CMD_READ && h.len == 12 => {
                        let mut p = [0u8; 12];
                        read_exact(s, &mut p).map_err(eof)?;
                        let hole = w::OffsetHole::decode(&p)?;
                        let (at, n) = (hole.offset, hole.length as u64);
                        let rel = at
                            .checked_sub(offset)
                            .filter(|r| r.checked_add(n).is_some_and(|e| e <= len))
                            .ok_or_else(|| {
                                protocol(format!(
                                "the server sent a hole at {at}+{n} for a read of {len} bytes at {offset}"
                            ))
                            })?;
                        update.holes.push((rel, n));
                        update.covered = n;
                    }
                    w::REPLY_TYPE_BLOCK_STATUS | w::REPLY_TYPE_BLOCK_STATUS_EXT
                        if cmd == w::CMD_BLOCK_STATUS =>
                    {
                        let mut p = vec![0; h.len as usize];
                        read_exact(s, &mut p).map_err(eof)?;
                        update.extents = self.parse_extents(kind, &p)?;
                    }
                    k if k & w::REPLY_TYPE_FLAG_ERROR != 0 => {
                        let mut p = vec![0; h.len as usize];
                        read_exact(s, &mut p).map_err(eof)?;
                        let e = w::ErrorChunk::decode(&p, k)?;
                        update.error = Some(server_error(e.error, &e.message));
                    }
                    k => {
                        return Err(protocol(format!(
                            "unexpected reply chunk type {k} ({} bytes) for command {cmd}",
                            h.len
                        )))
                    }
                }
            }
        }
        let mut g = lock(&self.shared);
        // The request's own thread removes it only once it is done or its sending failed (the
        // connection is then dead): a reply to it now is the server's error, not a panic.
        let Some(slot) = g.pending.get_mut(&h.cookie) else {
            return Err(protocol(format!(
                "the server replied with unknown cookie {}",
                h.cookie
            )));
        };
        slot.pieces.append(&mut update.pieces);
        slot.holes.append(&mut update.holes);
        slot.covered += update.covered;
        if slot.covered > slot.len && slot.cmd == w::CMD_READ {
            return Err(protocol("the server's read reply overlaps itself"));
        }
        if !update.extents.is_empty() {
            if !slot.extents.is_empty() {
                return Err(protocol(
                    "the server sent two block status chunks for one context",
                ));
            }
            slot.extents = update.extents;
        }
        if slot.error.is_none() {
            slot.error = update.error;
        }
        slot.done = done;
        if done && !mine {
            drop(g);
            self.turn.notify_all();
        }
        Ok(Step::Done)
    }

    /// The extents of a block status chunk, if it is for the negotiated context.
    fn parse_extents(&self, kind: u16, p: &[u8]) -> io::Result<Vec<Extent>> {
        let c = w::BlockStatusChunk::decode(p, kind)?;
        if Some(c.context_id) != self.context {
            return Ok(Vec::new());
        }
        Ok(c.extents
            .iter()
            .map(|e| (e.length, e.flags as u32))
            .collect())
    }
}
