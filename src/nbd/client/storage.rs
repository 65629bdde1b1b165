//! An NBD export as [`Storage`]: reads and writes split at the server's largest request and
//! aligned to its smallest block (read-modify-write for unaligned writes), a fixed length,
//! zeroing by `WRITE_ZEROES`, discards by `TRIM`, and block status by `BLOCK_STATUS`.

use super::connect::Negotiated;
use super::transport::{Extent, Transport};
use crate::nbd::wire as w;
use crate::storage::Storage;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// One connection to an export, shared by the storages open on it.
pub struct Connection {
    transport: Transport,
    info: Negotiated,
    /// The export's name, for messages.
    name: PathBuf,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.transport.disconnect();
    }
}

impl Connection {
    /// Wraps a negotiated connection.
    pub fn new(transport: Transport, info: Negotiated, name: PathBuf) -> Self {
        Connection {
            transport,
            info,
            name,
        }
    }

    /// What the handshake agreed.
    pub fn info(&self) -> &Negotiated {
        &self.info
    }

    fn has(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    /// The connection has failed (the server hung up or broke the protocol).
    pub fn is_dead(&self) -> bool {
        self.transport.is_dead()
    }

    /// The export is read-only.
    pub fn read_only(&self) -> bool {
        self.has(w::TFLAG_READ_ONLY)
    }

    /// The largest request: the server's maximum, at most 32 MiB, a multiple of the minimum.
    fn max_request(&self) -> u64 {
        let (min, _, max) = self.info.block_size;
        (max.min(w::MAX_PAYLOAD as u32) as u64 / min as u64).max(1) * min as u64
    }
}

/// An export opened as storage.
pub struct NbdStorage {
    conn: Arc<Connection>,
    writable: bool,
    /// Taken for reading by aligned writes, for writing by a read-modify-write.
    rmw: RwLock<()>,
    /// The extents of the last block status reply: (where they start, extents).
    extents: Mutex<Option<(u64, Vec<Extent>)>>,
}

fn read_only_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "Operation not permitted: the NBD export is read-only",
    )
}

impl NbdStorage {
    /// Storage over `conn`, for writing if `writable`.
    pub fn new(conn: Arc<Connection>, writable: bool) -> io::Result<Self> {
        if writable && conn.read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "Operation not permitted: the export is read-only",
            ));
        }
        Ok(NbdStorage {
            conn,
            writable,
            rmw: RwLock::new(()),
            extents: Mutex::new(None),
        })
    }

    fn size(&self) -> u64 {
        self.conn.info.size
    }

    fn min_block(&self) -> u64 {
        self.conn.info.block_size.0 as u64
    }

    fn forget_extents(&self) {
        *self.extents.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn check_writable(&self) -> io::Result<()> {
        match self.writable {
            true => Ok(()),
            false => Err(read_only_error()),
        }
    }

    fn beyond_end(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "Cannot write beyond the end of the NBD export ({} bytes)",
                    self.size()
                ),
            ));
        }
        Ok(())
    }

    /// Reads an aligned range inside the export, in requests the server takes.
    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let max = self.conn.max_request() as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let piece = &mut buf[done..done + n];
            self.conn.transport.request(
                w::CMD_READ,
                0,
                offset + done as u64,
                n as u64,
                &[],
                Some(piece),
            )?;
            done += n;
        }
        Ok(())
    }

    fn write_aligned(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let max = self.conn.max_request() as usize;
        for (i, piece) in buf.chunks(max).enumerate() {
            let at = offset + (i * max) as u64;
            self.conn
                .transport
                .request(w::CMD_WRITE, 0, at, piece.len() as u64, piece, None)?;
        }
        Ok(())
    }

    /// The aligned range covering `[offset, offset + len)`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let m = self.min_block();
        let start = offset / m * m;
        let end = (offset + len).div_ceil(m) * m;
        (start, end.min(self.size().div_ceil(m) * m))
    }

    /// Sends a command without payload over `[offset, offset+len)`, in pieces the server takes.
    fn ranged(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        // Not limited by the payload size, but by a 32-bit length (unless extended) and kept
        // aligned.
        let max = (u32::MAX as u64 / self.min_block()) * self.min_block();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            self.conn
                .transport
                .request(cmd, flags, offset + done, n, &[], None)?;
            done += n;
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let max = self.conn.max_request().min(4 << 20);
        let zeros = vec![0u8; max as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.size();
        // Past the end reads as zeros.
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        let buf = &mut buf[..inside];
        let (start, end) = self.widen(offset, inside as u64);
        if start == offset && end == offset + inside as u64 {
            return self.read_aligned(buf, offset);
        }
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_aligned(&mut tmp, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&tmp[at..at + inside]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        self.beyond_end(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.forget_extents();
        let (start, end) = self.widen(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            let _g = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            return self.write_aligned(buf, offset);
        }
        // Read-modify-write of the blocks the write covers in part.
        let _g = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_aligned(&mut tmp, start)?;
        let at = (offset - start) as usize;
        tmp[at..at + buf.len()].copy_from_slice(buf);
        self.write_aligned(&tmp, start)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size())
    }

    /// An export has a fixed size: only its own length (or less, which changes nothing, as
    /// qemu's inexact truncate of an NBD node) is taken.
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.size() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Cannot grow NBD nodes",
            ));
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable || !self.conn.has(w::TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.conn
            .transport
            .request(w::CMD_FLUSH, 0, 0, 0, &[], None)
            .map(drop)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        self.beyond_end(offset, len)?;
        self.forget_extents();
        let m = self.min_block();
        let (a, b) = (offset.div_ceil(m) * m, (offset + len) / m * m);
        if !self.conn.has(w::TFLAG_SEND_WRITE_ZEROES) || b <= a {
            return self.write_zero_buffers(offset, len);
        }
        // Partial blocks at either end get zeros written (read-modify-write).
        self.write_zero_buffers(offset, a - offset)?;
        {
            let _g = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            self.ranged(w::CMD_WRITE_ZEROES, 0, a, b - a)?;
        }
        self.write_zero_buffers(b, offset + len - b)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.check_writable()?;
        if len == 0 || !self.conn.has(w::TFLAG_SEND_TRIM) {
            return Ok(false);
        }
        self.forget_extents();
        let m = self.min_block();
        let a = offset.div_ceil(m) * m;
        let b = ((offset + len) / m * m).min(self.size());
        if b > a {
            let _g = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            self.ranged(w::CMD_TRIM, 0, a, b - a)?;
        }
        // A trim need not leave zeros.
        Ok(false)
    }

    fn extent_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        let (flags, len) = self.status_at(offset)?;
        Ok((flags & w::STATE_HOLE == 0, len))
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.conn.name)
    }

    fn duplicate(&self) -> Option<Box<dyn Storage>> {
        NbdStorage::new(self.conn.clone(), self.writable)
            .ok()
            .map(|s| Box::new(s) as Box<dyn Storage>)
    }

    fn allocation_at(&self, offset: u64) -> io::Result<Option<crate::storage::Allocation>> {
        let (flags, len) = self.status_at(offset)?;
        Ok(Some(crate::storage::Allocation {
            len,
            data: flags & w::STATE_HOLE == 0,
            zero: flags & w::STATE_ZERO != 0,
        }))
    }
}

impl NbdStorage {
    /// The flags and length of the extent at `offset` (of the context negotiated: allocation
    /// or the dirty bitmap asked for), from the last reply when it covers `offset`.
    fn status_at(&self, offset: u64) -> io::Result<(u32, u64)> {
        let size = self.size();
        if offset >= size {
            return Ok((w::STATE_HOLE | w::STATE_ZERO, u64::MAX - offset));
        }
        if self.conn.info.context.is_none() {
            return Ok((0, size - offset));
        }
        {
            let cache = self.extents.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((start, list)) = cache.as_ref() {
                let mut at = *start;
                for &(len, flags) in list {
                    if offset >= at && offset < at + len {
                        return Ok((flags, (at + len).min(size) - offset));
                    }
                    at += len;
                }
            }
        }
        let m = self.min_block();
        let start = offset / m * m;
        let max = (u32::MAX as u64 / m) * m;
        let len = (size - start).min(max);
        let list = self
            .conn
            .transport
            .request(w::CMD_BLOCK_STATUS, 0, start, len, &[], None)?;
        if list.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the server sent no block status for the context negotiated",
            ));
        }
        let mut at = start;
        let mut found = None;
        for &(l, flags) in &list {
            if offset >= at && offset < at.saturating_add(l) {
                found = Some((flags, at.saturating_add(l).min(size) - offset));
                break;
            }
            at = at.saturating_add(l);
        }
        let found = found.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the server's block status did not reach the offset asked for",
            )
        })?;
        *self.extents.lock().unwrap_or_else(|e| e.into_inner()) = Some((start, list));
        Ok(found)
    }
}
