//! Direct I/O (`O_DIRECT`, qemu's `cache.direct=on`): positioned reads and writes of any
//! offset, length and buffer on a file or block device opened with `O_DIRECT`, which itself
//! only takes requests whose offset, length and memory are aligned.
//!
//! The request alignment is, as qemu's file-posix finds it: a block device's logical block
//! size (`BLKSSZGET`, 512 or 4096); for a regular file what the kernel says with `statx`'s
//! `STATX_DIOALIGN` (Linux 6.1 and later), or else 4096, which every file system that takes
//! direct I/O accepts (qemu probes reads of growing sizes instead, which an empty file answers
//! for any size; a larger alignment only costs more bouncing of small requests).
//!
//! A request that is aligned, in a buffer that is aligned, goes to the kernel as it is. Anything
//! else is bounced through an aligned buffer ([`AlignedBuf`]): a read reads the aligned blocks
//! around the request and copies out what was asked; a write reads the partial blocks at its
//! head and tail, copies the new bytes in and writes the whole blocks back
//! (read-modify-write). Writes whose aligned spans overlap wait for each other
//! ([`DirectIo`] keeps the spans in flight), so two read-modify-writes of one block cannot
//! lose either's update, nor an aligned write be overwritten by a stale block.
//!
//! The [`crate::storage::Storage`] contract holds: bytes past the end read as zeros (a short
//! direct read ends at the end of the file), and a write past the end of a regular file
//! leaves it exactly as long as a buffered write would: the last block is written whole, so a
//! write that ends inside it cuts the file back to where the write (or the file, if it was
//! longer) ends. A write that may move the end of the file waits for every other write at or
//! after its start, so that nothing else changes the length between its look at the length and
//! that cut.
//!
//! Written by hand: the crates that open files with `O_DIRECT` hand out aligned buffers but
//! leave unaligned positioned requests, the read-modify-write of partial blocks and its
//! serialisation to the caller, which is what this module is. Buffers are made without
//! `unsafe`: a `Vec` a little larger than needed, used from its first aligned byte.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex};

/// The memory alignment of an [`AlignedBuf`] made with [`AlignedBuf::default`] or
/// [`AlignedBuf::zeroed`]: a page, which satisfies the memory alignment of any device whose
/// logical block is at most a page.
pub const PAGE: usize = 4096;

/// The largest bounce buffer one step of a request uses.
const BOUNCE: usize = 1 << 20;

/// A byte buffer whose first byte is aligned to a power of two (see the module documentation).
/// Dereferences to its bytes. Made without `unsafe`: a zeroed `Vec` over-allocated by the
/// alignment, used from its first aligned byte.
#[derive(Debug, Clone)]
pub struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
    align: usize,
}

impl Default for AlignedBuf {
    /// An empty buffer aligned to [`PAGE`] once it has bytes.
    fn default() -> Self {
        AlignedBuf {
            mem: Vec::new(),
            start: 0,
            len: 0,
            align: PAGE,
        }
    }
}

impl AlignedBuf {
    /// `len` zero bytes aligned to [`PAGE`].
    pub fn zeroed(len: usize) -> Self {
        Self::with_alignment(len, PAGE)
    }

    /// `len` zero bytes aligned to `align` (a power of two; anything else is rounded up to
    /// one).
    pub fn with_alignment(len: usize, align: usize) -> Self {
        let mut b = AlignedBuf {
            align: align.max(1).next_power_of_two(),
            ..Self::default()
        };
        b.resize(len, 0);
        b
    }

    /// Changes the length to `len`, keeping the bytes up to it and setting those added to
    /// `value` (as `Vec::resize` does), still aligned.
    pub fn resize(&mut self, len: usize, value: u8) {
        if len <= self.mem.len() - self.start {
            if len > self.len {
                self.mem[self.start + self.len..self.start + len].fill(value);
            }
            self.len = len;
            return;
        }
        let mem = vec![0u8; len + self.align - 1];
        let start = misalignment(mem.as_ptr() as usize, self.align);
        let mut new = AlignedBuf {
            mem,
            start,
            len,
            align: self.align,
        };
        new.mem[start..start + self.len].copy_from_slice(self);
        new.mem[start + self.len..start + len].fill(value);
        *self = new;
    }

    /// The alignment of the first byte.
    pub fn alignment(&self) -> usize {
        self.align
    }
}

/// How many bytes from `addr` to the next multiple of `align` (a power of two).
fn misalignment(addr: usize, align: usize) -> usize {
    addr.wrapping_neg() & (align - 1)
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

/// What direct I/O on one file must be aligned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Offsets and lengths of requests (a power of two).
    pub request: usize,
    /// The address of buffers (a power of two).
    pub memory: usize,
}

impl Alignment {
    /// The alignment of direct I/O on `file` (see the module documentation).
    pub fn of(file: &File) -> io::Result<Alignment> {
        use std::os::unix::fs::FileTypeExt;
        if file.metadata()?.file_type().is_block_device() {
            let block = rustix::fs::ioctl_blksszget(file)? as usize;
            return Ok(Self::sane(block, block));
        }
        use rustix::fs::{statx, AtFlags, StatxFlags};
        match statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
            Ok(s)
                if s.stx_mask & StatxFlags::DIOALIGN.bits() != 0 && s.stx_dio_offset_align != 0 =>
            {
                Ok(Self::sane(
                    s.stx_dio_offset_align as usize,
                    s.stx_dio_mem_align as usize,
                ))
            }
            _ => Ok(Self::sane(PAGE, PAGE)),
        }
    }

    /// `request` and `memory` as powers of two, at least 512 and 1.
    fn sane(request: usize, memory: usize) -> Alignment {
        Alignment {
            request: request.max(512).next_power_of_two(),
            memory: memory.max(1).next_power_of_two(),
        }
    }
}

thread_local! {
    /// Each thread's bounce buffer, kept between requests.
    static BOUNCE_BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

/// Runs `f` with this thread's bounce buffer, `len` bytes aligned to `align` (contents
/// unspecified).
fn with_bounce<R>(len: usize, align: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut b = BOUNCE_BUF.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if b.alignment() < align {
        b = AlignedBuf::with_alignment(0, align);
    }
    b.resize(len, 0);
    let r = f(&mut b);
    if b.len() <= BOUNCE {
        BOUNCE_BUF.with(|c| *c.borrow_mut() = b);
    }
    r
}

/// Direct I/O on one open file: its [`Alignment`] and the spans of the writes in flight
/// (see the module documentation). Shared by every handle on the same open file.
#[derive(Debug)]
pub struct DirectIo {
    align: Alignment,
    /// The aligned spans `[start, end)` written now; `end` is `u64::MAX` for a write that may
    /// move the end of the file.
    busy: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

/// A span of [`DirectIo::busy`], given back when dropped.
struct Span<'a> {
    io: &'a DirectIo,
    span: (u64, u64),
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let mut busy = self.io.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = busy.iter().position(|s| *s == self.span) {
            busy.swap_remove(i);
        }
        self.io.freed.notify_all();
    }
}

impl DirectIo {
    /// Direct I/O with the alignment `align`.
    pub fn new(align: Alignment) -> Self {
        DirectIo {
            align,
            busy: Mutex::new(Vec::new()),
            freed: Condvar::new(),
        }
    }

    /// Direct I/O on `file`, with its alignment.
    pub fn of(file: &File) -> io::Result<Self> {
        Ok(Self::new(Alignment::of(file)?))
    }

    /// What requests and buffers are aligned to.
    pub fn alignment(&self) -> Alignment {
        self.align
    }

    fn block(&self) -> u64 {
        self.align.request as u64
    }

    fn aligned(&self, buf: &[u8], offset: u64) -> bool {
        offset.is_multiple_of(self.block())
            && (buf.len() as u64).is_multiple_of(self.block())
            && misalignment(buf.as_ptr() as usize, self.align.memory) == 0
    }

    /// Reads `buf.len()` bytes at `offset` from `file` (opened with `O_DIRECT`); bytes past the
    /// end of the file read as zeros.
    pub fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let a = self.block();
        let end = end_of(offset, buf.len())?;
        let mut pos = offset;
        while pos < end {
            let rel = (pos - offset) as usize;
            let whole = (end - pos) / a * a;
            if pos.is_multiple_of(a) && whole > 0 && self.aligned(&buf[rel..rel + a as usize], pos)
            {
                let want = whole as usize;
                let got = self.read_blocks(file, &mut buf[rel..rel + want], pos)?;
                if got < want {
                    buf[rel + got..].fill(0);
                    return Ok(());
                }
                pos += whole;
                continue;
            }
            let start = pos / a * a;
            let stop = round_up(end, a)?.min(start.saturating_add(BOUNCE as u64));
            let copy_end = end.min(stop);
            let at_end = with_bounce((stop - start) as usize, self.align.memory, |b| {
                let got = self.read_blocks(file, b, start)?;
                b[got..].fill(0);
                buf[rel..(copy_end - offset) as usize]
                    .copy_from_slice(&b[(pos - start) as usize..(copy_end - start) as usize]);
                io::Result::Ok(got < b.len())
            })?;
            if at_end {
                buf[(copy_end - offset) as usize..].fill(0);
                return Ok(());
            }
            pos = copy_end;
        }
        Ok(())
    }

    /// Reads whole blocks into the aligned `buf` at the aligned `offset`, until the end of the
    /// file; returns how many bytes there were.
    fn read_blocks(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    // A read that stops inside a block stopped at the end of the file.
                    if !(done as u64).is_multiple_of(self.block()) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Writes all of `buf` at `offset` to `file` (opened with `O_DIRECT`, for writing). With
    /// `grows` (a regular file), a write past the end extends the file to exactly where the
    /// write ends; without (a block device), the file's end is not moved.
    pub fn write_at(&self, file: &File, buf: &[u8], offset: u64, grows: bool) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let a = self.block();
        let end = end_of(offset, buf.len())?;
        let span = (offset / a * a, round_up(end, a)?);
        let (_span, old_len) = self.take_span(span, || match grows {
            true => file.metadata().map(|m| Some(m.len())),
            false => Ok(None),
        })?;
        self.write_span(file, buf, offset)?;
        if let Some(old) = old_len {
            let len = old.max(end);
            if span.1 > len {
                file.set_len(len)?;
            }
        }
        Ok(())
    }

    /// Runs `f` while holding the aligned span over `[offset, offset + len)`, so that no write
    /// (in particular no read-modify-write of a partial block) overlaps it: for zeroing and
    /// discarding, which the kernel does outside these writes (fallocate, ioctls). `f` is
    /// given a writer for zero buffers inside the span, which does not take it again. The
    /// span does not move the end of the file.
    pub fn with_span<R>(
        &self,
        file: &File,
        offset: u64,
        len: u64,
        f: impl FnOnce(&dyn Fn(&[u8], u64) -> io::Result<()>) -> io::Result<R>,
    ) -> io::Result<R> {
        let a = self.block();
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let span = (offset / a * a, round_up(end, a)?);
        let (_span, _) = self.take_span(span, || Ok(None))?;
        let write = |buf: &[u8], off: u64| self.write_span(file, buf, off);
        f(&write)
    }

    /// Sets the length of `file` once no write is in flight, so that a write that moved the
    /// end of the file cannot cut it back past what this sets (see
    /// [`DirectIo::write_at`]).
    pub fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        let _all = self.take_span((0, u64::MAX), || Ok(None))?;
        file.set_len(len)
    }

    /// Waits until no write in flight overlaps `span`, then marks it in flight. `len` gives
    /// the length of the file (for a file that grows): if `span` ends past it, the write may
    /// move the end of the file, and the span taken runs to the end of all offsets. Returns the
    /// length seen then, for such a write.
    fn take_span(
        &self,
        span: (u64, u64),
        len: impl Fn() -> io::Result<Option<u64>>,
    ) -> io::Result<(Span<'_>, Option<u64>)> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let len = len()?;
            let (want, extending) = match len {
                Some(l) if span.1 > l => ((span.0, u64::MAX), Some(l)),
                _ => (span, None),
            };
            if !busy.iter().any(|&(s, e)| s < want.1 && want.0 < e) {
                busy.push(want);
                return Ok((
                    Span {
                        io: self,
                        span: want,
                    },
                    extending,
                ));
            }
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Writes `buf` at `offset` in whole aligned blocks, reading the partial ones at the head
    /// and tail first. The caller holds the span.
    fn write_span(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        let a = self.block();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let rel = (pos - offset) as usize;
            let whole = (end - pos) / a * a;
            if pos.is_multiple_of(a) && whole > 0 && self.aligned(&buf[rel..rel + a as usize], pos)
            {
                write_all(file, &buf[rel..rel + whole as usize], pos)?;
                pos += whole;
                continue;
            }
            let start = pos / a * a;
            let stop = round_up(end, a)?.min(start.saturating_add(BOUNCE as u64));
            let copy_end = end.min(stop);
            with_bounce((stop - start) as usize, self.align.memory, |b| {
                let n = b.len();
                let block = a as usize;
                if pos > start {
                    let got = self.read_blocks(file, &mut b[..block], start)?;
                    b[got..block].fill(0);
                }
                if copy_end < stop && (n > block || pos == start) {
                    let got = self.read_blocks(file, &mut b[n - block..], stop - a)?;
                    b[n - block + got..].fill(0);
                }
                b[(pos - start) as usize..(copy_end - start) as usize]
                    .copy_from_slice(&buf[rel..(copy_end - offset) as usize]);
                write_all(file, b, start)
            })?;
            pos = copy_end;
        }
        Ok(())
    }
}

/// `offset + len`, or an error if it overflows.
fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

/// `x` rounded up to a multiple of `a`, or an error if that overflows.
fn round_up(x: u64, a: u64) -> io::Result<u64> {
    x.checked_next_multiple_of(a)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

/// Writes all of `buf` at `offset`.
fn write_all(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.write_at(&buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write whole buffer",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens `path` as `options` say, with `O_DIRECT` added.
pub fn open_direct(options: &mut std::fs::OpenOptions, path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(libc::O_DIRECT).open(path)
}

/// Whether `file` was opened with `O_DIRECT` (its status flags, `F_GETFL`).
pub fn is_direct(file: &File) -> io::Result<bool> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    Ok(flags.contains(rustix::fs::OFlags::DIRECT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    /// A directory on a file system that takes `O_DIRECT` (tmpfs before Linux 6.6 does not):
    /// under the target directory of the build.
    fn dir() -> tempfile::TempDir {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).unwrap();
        tempfile::tempdir_in(base).unwrap()
    }

    fn open_rw(path: &Path) -> File {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        open_direct(&mut o, path).unwrap()
    }

    #[test]
    fn aligned_buffers_are_aligned_and_keep_their_bytes() {
        for align in [1, 512, 4096, 65536] {
            let mut b = AlignedBuf::with_alignment(100, align);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert!(b.iter().all(|&x| x == 0));
            b[..3].copy_from_slice(b"abc");
            b.resize(50_000, 0);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert_eq!(&b[..3], b"abc");
            assert!(b[3..].iter().all(|&x| x == 0));
            b[40_000] = 9;
            b.resize(10, 0);
            b.resize(50_000, 0);
            // Bytes added back read as zero, as with Vec::resize.
            assert_eq!(b[40_000], 0);
            assert_eq!(b.len(), 50_000);
        }
        assert!(AlignedBuf::default().is_empty());
    }

    #[test]
    fn files_are_opened_with_o_direct() {
        let d = dir();
        let f = open_rw(&d.path().join("f"));
        assert!(is_direct(&f).unwrap());
        let plain = File::open(d.path().join("f")).unwrap();
        assert!(!is_direct(&plain).unwrap());
        let a = Alignment::of(&f).unwrap();
        assert!(a.request >= 512 && a.request.is_power_of_two());
    }

    /// Random unaligned reads and writes, on a file opened with `O_DIRECT` with the
    /// alignment `align`, against the same requests on a `Vec`.
    fn run_against_model(align: usize, ops: &[(bool, u64, usize, u8, usize)]) {
        let d = dir();
        let path = d.path().join("f");
        let f = open_rw(&path);
        // The kernel's own alignment may be smaller than `align` (the test's 512 or 4096
        // requests then all work), never larger than 4096 here.
        let io = DirectIo::new(Alignment {
            request: align,
            memory: align,
        });
        let mut model: Vec<u8> = Vec::new();
        for &(write, off, len, seed, mis) in ops {
            // `mis` shifts the buffer off alignment.
            let mut mem = AlignedBuf::zeroed(len + mis);
            if write {
                for (i, b) in mem[mis..].iter_mut().enumerate() {
                    *b = seed.wrapping_add(i as u8).max(1);
                }
                io.write_at(&f, &mem[mis..], off, true).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&mem[mis..]);
                assert_eq!(
                    f.metadata().unwrap().len(),
                    model.len() as u64,
                    "length after a write of {len} at {off}"
                );
            } else {
                io.read_at(&f, &mut mem[mis..], off).unwrap();
                let mut want = vec![0u8; len];
                let from = (off as usize).min(model.len());
                let to = (off as usize + len).min(model.len());
                want[..to - from].copy_from_slice(&model[from..to]);
                assert!(mem[mis..] == want[..], "read of {len} at {off}");
            }
        }
        // The whole file, read back with buffered I/O.
        assert!(std::fs::read(&path).unwrap() == model);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn unaligned_requests_match_a_model(
            align in prop::sample::select(vec![512usize, 4096]),
            ops in prop::collection::vec(
                (any::<bool>(), 0u64..40_000, 1usize..12_000, any::<u8>(), 0usize..3),
                1..40,
            ),
        ) {
            run_against_model(align, &ops);
        }
    }

    #[test]
    fn large_and_aligned_requests_match_a_model() {
        let big = 3 * BOUNCE + 1000;
        run_against_model(
            4096,
            &[
                (true, 0, 8192, 1, 0),
                (true, 100, big, 2, 1),
                (false, 0, big + 5000, 0, 0),
                (false, 4096, 2 * BOUNCE, 0, 2),
                (true, 8192, 2 * BOUNCE, 3, 0),
                (false, 0, big + 200, 0, 0),
                (true, (big + 50_000) as u64, 10, 4, 0),
                (false, 0, big + 60_000, 0, 1),
            ],
        );
    }

    #[test]
    fn concurrent_writes_past_the_end_leave_the_length_of_the_furthest() {
        let d = dir();
        let path = d.path().join("f");
        let f = open_rw(&path);
        let io = DirectIo::new(Alignment {
            request: 4096,
            memory: 4096,
        });
        // Each piece is 1000 bytes at a stride of 3000: every write ends inside a block and
        // past the end of the file as it was, in whatever order the threads run.
        let pieces = 400u64;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (io, f) = (&io, &f);
                s.spawn(move || {
                    for i in (t..pieces).step_by(4) {
                        let v = vec![(i % 250) as u8 + 1; 1000];
                        io.write_at(f, &v, i * 3000, true).unwrap();
                    }
                });
            }
        });
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, (pieces - 1) * 3000 + 1000);
        for i in 0..pieces as usize {
            let at = i * 3000;
            assert!(data[at..at + 1000]
                .iter()
                .all(|&b| b == (i % 250) as u8 + 1));
            if i + 1 < pieces as usize {
                assert!(data[at + 1000..at + 3000].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn concurrent_writes_into_shared_blocks_lose_nothing() {
        let d = dir();
        let path = d.path().join("f");
        let f = open_rw(&path);
        let io = DirectIo::new(Alignment {
            request: 4096,
            memory: 4096,
        });
        // 8 threads each write every 8th 8-byte entry of 16 blocks, as qcow2 writes
        // table entries: every block is read-modify-written by all of them at once.
        let entries = 16 * 4096 / 8;
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (io, f) = (&io, &f);
                s.spawn(move || {
                    for e in (t as usize..entries).step_by(8) {
                        let v = (e as u64 + 1).to_be_bytes();
                        io.write_at(f, &v, e as u64 * 8, true).unwrap();
                    }
                });
            }
        });
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), entries * 8);
        for (e, v) in data.chunks(8).enumerate() {
            assert_eq!(u64::from_be_bytes(v.try_into().unwrap()), e as u64 + 1);
        }
    }

    /// Zeroing done outside the write path (here: writing zeros through the file behind the
    /// span's back, as a fallocate would) while a read-modify-write of the same block runs:
    /// the span makes the write wait, so the zeros and the entry both survive; without it the
    /// write's read of the old block could put the old bytes back.
    #[test]
    fn zeroing_under_a_span_keeps_out_partial_block_writes() {
        let d = dir();
        let path = d.path().join("f");
        let f = open_rw(&path);
        let io = DirectIo::new(Alignment {
            request: 4096,
            memory: 4096,
        });
        for round in 0..20u64 {
            io.write_at(&f, &[0xffu8; 8192], 0, true).unwrap();
            let entered = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    io.with_span(&f, 16, 4000, |_| {
                        entered.wait();
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        // Bytes 16..4016 zeroed in place, as the kernel would.
                        let mut b = AlignedBuf::zeroed(4096);
                        io.read_at(&f, &mut b, 0).unwrap();
                        b[16..4016].fill(0);
                        write_all(&f, &b, 0)
                    })
                    .unwrap();
                });
                entered.wait();
                io.write_at(&f, &round.to_be_bytes(), 4024, true).unwrap();
            });
            let data = std::fs::read(&path).unwrap();
            assert!(
                data[16..4016].iter().all(|&b| b == 0),
                "round {round}: zeros lost"
            );
            assert_eq!(
                data[4024..4032],
                round.to_be_bytes(),
                "round {round}: entry lost"
            );
            assert!(data[..16].iter().all(|&b| b == 0xff));
        }
    }
}
