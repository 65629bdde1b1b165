//! The transmission phase (proto.md "Transmission"): one reader (this connection's thread)
//! reads requests and their payloads, a few workers run them against the export and write
//! their replies whole under a lock, so replies may leave out of order. The bytes held in
//! payloads and read buffers of requests in flight are bounded ([`BYTES_IN_FLIGHT`]), so a
//! client pipelining many large writes cannot grow the server's memory without bound.
//!
//! A malformed request header, or a payload the server cannot read into its bounds, ends the
//! connection (after an error reply when the request's cookie is known); every other bad
//! request gets an error reply with one of the protocol's errnos.

use super::export::{CmdResult, CommandError, Export, ReadPiece};
use super::handshake::Negotiated;
use super::stream::{Conn, Socket};
use crate::host_run::HostRun;
use crate::nbd::wire::*;
use rustix::io::Errno;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};

/// Most bytes of payloads and read buffers a connection holds for requests in flight.
pub const BYTES_IN_FLIGHT: u64 = 64 << 20;
/// Largest reply buffer a worker keeps between requests.
const RETAINED: usize = 1 << 20;
/// Worker threads per connection.
const WORKERS: usize = 4;
/// Most extents one block status chunk holds.
const MAX_EXTENTS: usize = 16384;
/// Most pieces (holes, data, host runs) a read is split into.
const MAX_READ_SEGMENTS: usize = 64;
/// The command flags the server knows.
const KNOWN_FLAGS: u16 = CMD_FLAG_FUA
    | CMD_FLAG_NO_HOLE
    | CMD_FLAG_DF
    | CMD_FLAG_REQ_ONE
    | CMD_FLAG_FAST_ZERO
    | CMD_FLAG_PAYLOAD_LEN;

/// A counting budget of bytes: takers wait until what they need is free.
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    /// Takes `n` bytes, waiting while others hold too much (a request larger than the whole
    /// budget waits until nothing else is held).
    fn take(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && *used + n > BYTES_IN_FLIGHT {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
    }

    fn give(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

/// A request read whole, waiting for a worker.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: u64,
}

/// What the workers share.
struct Shared<'a> {
    export: &'a Export,
    nego: &'a Negotiated,
    writer: Mutex<Socket>,
    budget: Budget,
    /// A reply could not be sent: the connection is over.
    dead: AtomicBool,
    /// READ data stored in host files is sent with `sendfile` ([`sendfile_for`]).
    sendfile: bool,
}

/// Serves requests on `conn` until the client disconnects (or misbehaves beyond repair).
pub fn serve(mut conn: Conn, export: &Export, nego: &Negotiated) -> io::Result<()> {
    let shared = Shared {
        export,
        nego,
        writer: Mutex::new(conn.socket.try_clone()?),
        budget: Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
        },
        dead: AtomicBool::new(false),
        sendfile: sendfile_for(&conn.socket),
    };
    let (tx, rx) = mpsc::sync_channel::<Job>(64);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                // Reply buffers are reused, so that reads neither allocate nor clear memory;
                // one grown past RETAINED is given back after its reply.
                let mut buf = Vec::new();
                loop {
                    let job = {
                        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                        rx.recv()
                    };
                    let Ok(job) = job else { break };
                    let cost = job.cost;
                    if !shared.dead.load(Ordering::Relaxed) && run(&shared, job, &mut buf).is_err()
                    {
                        shared.dead.store(true, Ordering::Relaxed);
                        conn_shutdown(&shared);
                    }
                    if buf.len() > RETAINED {
                        buf = Vec::new();
                    }
                    shared.budget.give(cost);
                }
            });
        }
        let r = read_loop(&mut conn, &shared, &tx);
        drop(tx);
        r
    })
}

fn conn_shutdown(shared: &Shared) {
    shared
        .writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shutdown();
}

fn read_loop(conn: &mut Conn, shared: &Shared, tx: &mpsc::SyncSender<Job>) -> io::Result<()> {
    let extended = shared.nego.extended;
    let hlen = Request::header_len(extended);
    let mut hb = [0u8; EXTENDED_REQUEST_LEN];
    loop {
        if shared.dead.load(Ordering::Relaxed) {
            return Ok(());
        }
        match conn.read_exact(&mut hb[..hlen]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = Request::decode(&hb[..hlen], extended)?;
        let plen = req.payload_len();
        if plen > MAX_PAYLOAD as u64 {
            // The payload cannot be held, and skipping it would take unbounded time: answer
            // and end the connection.
            let msg = format!("payload of {plen} bytes is larger than the 32 MiB limit");
            let _ = reply_error(shared, &req, &CommandError::new(NBD_EOVERFLOW, msg));
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "payload too large",
            ));
        }
        let read_buf = if req.kind == CMD_READ {
            req.length.min(MAX_PAYLOAD as u64)
        } else {
            0
        };
        let cost = plen + read_buf;
        shared.budget.take(cost);
        let mut payload = Vec::new();
        if plen > 0 {
            payload.resize(plen as usize, 0);
            if let Err(e) = conn.read_exact(&mut payload) {
                shared.budget.give(cost);
                return match e.kind() {
                    io::ErrorKind::UnexpectedEof => Ok(()),
                    _ => Err(e),
                };
            }
        }
        if req.kind == CMD_DISC {
            shared.budget.give(cost);
            return Ok(());
        }
        if tx.send(Job { req, payload, cost }).is_err() {
            return Ok(());
        }
    }
}

/// Runs one request and sends its reply; an error is a failure to send (the connection is
/// over).
fn run(shared: &Shared, job: Job, buf: &mut Vec<u8>) -> io::Result<()> {
    let req = &job.req;
    if req.kind == CMD_READ {
        return match check(shared, req) {
            Ok(()) => reply_read(shared, req, buf),
            Err(e) => reply_error(shared, req, &e),
        };
    }
    let result = check(shared, req).and_then(|()| execute(shared, req, &job.payload));
    match result {
        Ok(Some(chunks)) => reply_status(shared, req, chunks),
        Ok(None) => reply_ok(shared, req),
        Err(e) => reply_error(shared, req, &e),
    }
}

fn invalid(msg: impl Into<String>) -> CommandError {
    CommandError::new(NBD_EINVAL, msg)
}

/// What every request must satisfy before it runs.
fn check(shared: &Shared, req: &Request) -> CmdResult<()> {
    let export = shared.export;
    if req.flags & !KNOWN_FLAGS != 0 {
        return Err(invalid(format!("unknown command flags {:#x}", req.flags)));
    }
    if req.flags & CMD_FLAG_PAYLOAD_LEN != 0
        && !(shared.nego.extended && matches!(req.kind, CMD_WRITE | CMD_BLOCK_STATUS))
    {
        return Err(invalid("payload length flag not allowed here"));
    }
    let write = matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    match req.kind {
        CMD_READ => {
            if req.length > MAX_PAYLOAD as u64 {
                return Err(invalid("read larger than the 32 MiB limit"));
            }
        }
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_FLUSH | CMD_CACHE | CMD_BLOCK_STATUS => {}
        _ => return Err(invalid(format!("unknown command {}", req.kind))),
    }
    if req.flags & CMD_FLAG_DF != 0 && req.kind != CMD_READ {
        return Err(invalid("DF flag on a command other than read"));
    }
    if req.flags & CMD_FLAG_REQ_ONE != 0 && req.kind != CMD_BLOCK_STATUS {
        return Err(invalid("REQ_ONE flag on a command other than block status"));
    }
    if req.flags & (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) != 0 && req.kind != CMD_WRITE_ZEROES {
        return Err(invalid("zero flags on a command other than write zeroes"));
    }
    match req.kind {
        CMD_FLUSH => {
            if req.offset != 0 || req.length != 0 {
                return Err(invalid("flush with an offset or length"));
            }
        }
        CMD_BLOCK_STATUS => {
            if !shared.nego.structured || shared.nego.contexts.is_empty() {
                return Err(invalid("block status without a negotiated meta context"));
            }
        }
        // READ, WRITE (whose payload length, with PAYLOAD_LEN too, is its length), TRIM,
        // WRITE_ZEROES and CACHE.
        _ => export.check_range(req.offset, req.length)?,
    }
    // On a read-only export, as qemu-nbd 10 answers on the wire (libnbd answers EPERM to its
    // own caller without asking): a write, trim or zero write inside the export gets EINVAL,
    // and CACHE, which qemu carries out as a copy-on-read prefetch (a write), EPERM.
    if export.readonly() && write {
        return Err(invalid("the export is read-only"));
    }
    if export.readonly() && req.kind == CMD_CACHE {
        return Err(CommandError::new(NBD_EPERM, "the export is read-only"));
    }
    Ok(())
}

/// Runs a command other than READ: `Some(chunks)` for block status.
fn execute(
    shared: &Shared,
    req: &Request,
    payload: &[u8],
) -> CmdResult<Option<Vec<BlockStatusChunk>>> {
    let export = shared.export;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.kind {
        CMD_WRITE => export.write(payload, req.offset, fua)?,
        CMD_WRITE_ZEROES => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            export.write_zeroes(req.offset, req.length, no_hole, fua)?
        }
        CMD_TRIM => export.trim(req.offset, req.length, fua)?,
        CMD_FLUSH => export.flush()?,
        CMD_CACHE => {}
        CMD_BLOCK_STATUS => {
            let (len, ids) = if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
                let p = BlockStatusPayload::decode(payload).map_err(|e| invalid(e.0))?;
                for id in &p.ids {
                    if !shared.nego.contexts.iter().any(|(c, _)| c == id) {
                        return Err(invalid(format!("meta context {id} was not negotiated")));
                    }
                }
                (p.effect_length, p.ids)
            } else {
                let ids = shared.nego.contexts.iter().map(|(id, _)| *id).collect();
                (req.length, ids)
            };
            if len == 0 {
                return Err(invalid("block status of an empty range"));
            }
            export.check_range(req.offset, len)?;
            let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            let mut chunks = Vec::new();
            for id in ids {
                let mut extents = export.block_status(id, req.offset, len, max)?;
                if !shared.nego.extended {
                    // 32-bit lengths: a long extent ends the (shortened) answer.
                    if let Some(i) = extents.iter().position(|e| e.length > u32::MAX as u64) {
                        extents.truncate(i + 1);
                        extents[i].length = (u32::MAX as u64) & !0xfff;
                    }
                }
                chunks.push(BlockStatusChunk {
                    context_id: id,
                    extents,
                });
            }
            return Ok(Some(chunks));
        }
        _ => return Err(invalid("unknown command")),
    }
    Ok(None)
}

fn send(shared: &Shared, parts: &[&[u8]]) -> io::Result<()> {
    let mut w = shared.writer.lock().unwrap_or_else(|p| p.into_inner());
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

fn chunk_header(shared: &Shared, req: &Request, flags: u16, kind: u16, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(EXTENDED_REPLY_LEN);
    ChunkHeader {
        flags,
        kind,
        cookie: req.cookie,
        offset: req.offset,
        length: len,
    }
    .encode(&mut out, shared.nego.extended);
    out
}

fn reply_ok(shared: &Shared, req: &Request) -> io::Result<()> {
    if shared.nego.structured {
        let h = chunk_header(shared, req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        send(shared, &[&h])
    } else {
        let mut h = Vec::new();
        ReplyHeader::encode_simple(&mut h, 0, req.cookie);
        send(shared, &[&h])
    }
}

fn reply_error(shared: &Shared, req: &Request, e: &CommandError) -> io::Result<()> {
    let errno = if WIRE_ERRNOS.contains(&e.errno) {
        e.errno
    } else {
        NBD_EIO
    };
    if shared.nego.structured {
        let mut p = Vec::new();
        ErrorChunk {
            error: errno,
            message: e.message.clone(),
            offset: None,
        }
        .encode(&mut p);
        let h = chunk_header(
            shared,
            req,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            p.len() as u64,
        );
        send(shared, &[&h, &p])
    } else {
        let mut h = Vec::new();
        ReplyHeader::encode_simple(&mut h, errno, req.cookie);
        send(shared, &[&h])
    }
}

fn reply_status(shared: &Shared, req: &Request, chunks: Vec<BlockStatusChunk>) -> io::Result<()> {
    let n = chunks.len();
    let kind = BlockStatusChunk::chunk_type(shared.nego.extended);
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let mut p = Vec::new();
        c.encode(&mut p, shared.nego.extended);
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        out.extend_from_slice(&chunk_header(shared, req, flags, kind, p.len() as u64));
        out.extend_from_slice(&p);
    }
    send(shared, &[&out])
}

/// Makes `buf` at least `n` bytes long (growing it only: bytes already there are
/// overwritten, never cleared).
fn at_least(buf: &mut Vec<u8>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0);
    }
}

/// A part of a reply being sent.
enum Part<'a> {
    /// Bytes of the header buffer.
    Head(std::ops::Range<usize>),
    /// Bytes of the data buffer.
    Buf(std::ops::Range<usize>),
    /// A run of a host file, sent from there.
    File(HostRun<'a>),
}

/// Whether READ data stored as it is in a host file is sent from there with `sendfile` on this
/// connection: for a TCP client on another host. The kernel then hands the page-cache pages
/// to the network card without either copy of `pread` and `write`. A client on this host (a
/// Unix socket, a TCP peer at one of our own addresses) copies the bytes out of those pages
/// itself, from memory rather than from the cache a copy through a buffer has just warmed:
/// measured with nbdcopy over loopback (2 GiB qcow2, 2 cores), the server's system time fell
/// from 0.5-0.7 s to 0.25-0.4 s but nbdcopy's rose from 1.0 s to 1.1-1.4 s and the copy took
/// longer (1.9-2.1 s against 1.3-1.8 s), so local clients get the copy. `VIMG_SENDFILE=always`
/// or `never` (a test hook) decides for every client.
fn sendfile_for(socket: &Socket) -> bool {
    match std::env::var("VIMG_SENDFILE").as_deref() {
        Ok("always") => return true,
        Ok("never") => return false,
        _ => {}
    }
    match socket {
        Socket::Unix(_) => false,
        Socket::Tcp(s) => match (s.peer_addr(), s.local_addr()) {
            (Ok(peer), Ok(local)) => !peer.ip().is_loopback() && peer.ip() != local.ip(),
            _ => false,
        },
    }
}

/// Sends a READ's data: a simple reply; or structured, zero ranges as holes (one data chunk
/// with DF). Data stored byte for byte in a host file (raw, uncompressed qcow2 clusters of a
/// layer whose mapping cannot change: [`crate::host_run`]) goes from the file to the socket
/// with `sendfile`, never through user space; the rest is read into `buf` first, so that a
/// read error sends an error reply alone. A failure of `sendfile` once the reply has begun
/// (its header is out) can only end the connection.
fn reply_read(shared: &Shared, req: &Request, buf: &mut Vec<u8>) -> io::Result<()> {
    if shared.nego.structured && req.length == 0 {
        return reply_ok(shared, req);
    }
    let mut heads = Vec::with_capacity(EXTENDED_REPLY_LEN * 2);
    match plan_read(shared, req, buf, &mut heads) {
        Ok(parts) => send_parts(shared, &heads, buf, &parts),
        Err(e) => reply_error(shared, req, &e),
    }
}

/// Lays out a READ's reply as parts: headers in `heads`, data read (and zeros sent as bytes)
/// in `buf`, host runs to send from their files.
fn plan_read<'a>(
    shared: &'a Shared,
    req: &Request,
    buf: &mut Vec<u8>,
    heads: &mut Vec<u8>,
) -> CmdResult<Vec<Part<'a>>> {
    let export = shared.export;
    let structured = shared.nego.structured;
    let holes = structured && req.flags & CMD_FLAG_DF == 0;
    let pieces = export.read_plan(req.offset, req.length, MAX_READ_SEGMENTS, shared.sendfile)?;
    let in_buf: u64 = pieces
        .iter()
        .map(|p| match *p {
            ReadPiece::Read(_, l) => l,
            ReadPiece::Zero(_, l) if !holes => l,
            _ => 0,
        })
        .sum();
    at_least(buf, in_buf as usize);
    let mut parts: Vec<Part> = Vec::with_capacity(pieces.len() * 2 + 1);
    let head = |heads: &mut Vec<u8>, parts: &mut Vec<Part>, c: Vec<u8>| {
        let start = heads.len();
        heads.extend_from_slice(&c);
        parts.push(Part::Head(start..heads.len()));
    };
    if !structured {
        let mut h = Vec::new();
        ReplyHeader::encode_simple(&mut h, 0, req.cookie);
        head(heads, &mut parts, h);
    } else if !holes {
        let mut h = chunk_header(
            shared,
            req,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            8 + req.length,
        );
        encode_offset_data_prefix(&mut h, req.offset);
        head(heads, &mut parts, h);
    }
    let mut at = 0usize;
    let mut i = 0;
    while i < pieces.len() {
        if !holes {
            push_data(export, &pieces[i], buf, &mut at, &mut parts)?;
            i += 1;
            continue;
        }
        if let ReadPiece::Zero(off, len) = pieces[i] {
            let flags = if i + 1 == pieces.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let mut h = chunk_header(shared, req, flags, REPLY_TYPE_OFFSET_HOLE, 12);
            OffsetHole {
                offset: off,
                length: len as u32,
            }
            .encode(&mut h);
            head(heads, &mut parts, h);
            i += 1;
            continue;
        }
        // One data chunk for the pieces up to the next hole.
        let end = pieces[i..]
            .iter()
            .position(|p| matches!(p, ReadPiece::Zero(..)))
            .map_or(pieces.len(), |n| i + n);
        let len: u64 = pieces[i..end].iter().map(|p| p.range().1).sum();
        let flags = if end == pieces.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let mut h = chunk_header(shared, req, flags, REPLY_TYPE_OFFSET_DATA, 8 + len);
        encode_offset_data_prefix(&mut h, pieces[i].range().0);
        head(heads, &mut parts, h);
        for p in &pieces[i..end] {
            push_data(export, p, buf, &mut at, &mut parts)?;
        }
        i = end;
    }
    Ok(parts)
}

/// Adds the data of one piece to `parts`: a host run as it is, other data read (zeros
/// written) into `buf` at `*at`.
fn push_data<'a>(
    export: &Export,
    piece: &ReadPiece<'a>,
    buf: &mut [u8],
    at: &mut usize,
    parts: &mut Vec<Part<'a>>,
) -> CmdResult<()> {
    let range = match *piece {
        ReadPiece::Send(_, run) => {
            parts.push(Part::File(run));
            return Ok(());
        }
        ReadPiece::Zero(_, len) => {
            let r = *at..*at + len as usize;
            buf[r.clone()].fill(0);
            r
        }
        ReadPiece::Read(off, len) => {
            let r = *at..*at + len as usize;
            export.read(&mut buf[r.clone()], off)?;
            r
        }
    };
    *at = range.end;
    match parts.last_mut() {
        Some(Part::Buf(r)) if r.end == range.start => r.end = range.end,
        _ => parts.push(Part::Buf(range)),
    }
    Ok(())
}

/// Sends a reply's parts in order under the writer's lock: the bytes before each host run in
/// one `sendmsg` with `MSG_MORE` (so that TCP puts the header in the run's first segment
/// rather than a packet of its own), each run with `sendfile`.
fn send_parts(shared: &Shared, heads: &[u8], buf: &[u8], parts: &[Part]) -> io::Result<()> {
    let w = shared.writer.lock().unwrap_or_else(|p| p.into_inner());
    let mut pending: Vec<io::IoSlice> = Vec::with_capacity(parts.len());
    for p in parts {
        match p {
            Part::Head(r) => pending.push(io::IoSlice::new(&heads[r.clone()])),
            Part::Buf(r) => pending.push(io::IoSlice::new(&buf[r.clone()])),
            Part::File(run) => {
                send_all(&w, &mut pending, true)?;
                send_run(&w, run)?;
            }
        }
    }
    send_all(&w, &mut pending, false)
}

/// Sends all of `slices` (then empties it), with `MSG_MORE` when more follows.
fn send_all(sock: &Socket, slices: &mut Vec<io::IoSlice>, more: bool) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendFlags};
    let mut flags = SendFlags::NOSIGNAL;
    if more {
        flags |= SendFlags::MORE;
    }
    let mut left: &mut [io::IoSlice] = slices;
    while !left.is_empty() {
        if left[0].is_empty() {
            left = &mut left[1..];
            continue;
        }
        match rustix::net::sendmsg(sock, left, &mut SendAncillaryBuffer::default(), flags) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut left, n),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    slices.clear();
    Ok(())
}

/// Sends a host run from its file. Should the file have become shorter meanwhile, the bytes
/// past its end are sent as zeros (as a read of them gives). A kernel that cannot `sendfile`
/// between these two (`EINVAL`, `ENOSYS`) gets the run read and written instead.
fn send_run(sock: &Socket, run: &HostRun) -> io::Result<()> {
    let (mut at, end) = (run.host.0, run.host.0 + run.len);
    while at < end {
        let want = (end - at).min(1 << 30) as usize;
        match rustix::fs::sendfile(sock, run.fd, Some(&mut at), want) {
            Ok(0) => return send_copy(sock, run.fd, at, end, true),
            Ok(_) | Err(Errno::INTR) => {}
            Err(Errno::INVAL | Errno::NOSYS) if at == run.host.0 => {
                return send_copy(sock, run.fd, at, end, false)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends `[at, end)` of `fd` by reading it (zeros where `zeros`, or past the end of the file).
fn send_copy(
    sock: &Socket,
    fd: std::os::fd::BorrowedFd,
    mut at: u64,
    end: u64,
    mut zeros: bool,
) -> io::Result<()> {
    let mut piece = vec![0u8; (end - at).min(1 << 20) as usize];
    while at < end {
        let n = (end - at).min(piece.len() as u64) as usize;
        if zeros {
            piece[..n].fill(0);
        } else {
            match rustix::io::pread(fd, &mut piece[..n], at) {
                Ok(0) => {
                    zeros = true;
                    continue;
                }
                Ok(got) => {
                    send_all(sock, &mut vec![io::IoSlice::new(&piece[..got])], false)?;
                    at += got as u64;
                    continue;
                }
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        send_all(sock, &mut vec![io::IoSlice::new(&piece[..n])], false)?;
        at += n as u64;
    }
    Ok(())
}
