//! `vimg compare`: whether two images hold the same guest data, as qemu-img's `compare` decides
//! it.
//!
//! Both disks are walked with their block-status queries. Ranges known to read as zero on both
//! sides are not read at all; a range zero on one side only is checked by reading the other side
//! alone; everything else is read from both sides (in parallel, in chunks of up to
//! [`CHUNK`] bytes) and compared. When the sizes differ, the part of the larger disk beyond
//! the smaller one must read as zeros, unless strict mode is on, in which case any size
//! difference, or any difference in allocation status, is a mismatch.

use crate::block::{BlockImage, BlockStatus};
use crate::error::{Error, ErrorKind, Result};
use crate::offsets::GuestOffset;

/// Largest amount read from one image at a time.
pub const CHUNK: u64 = 4 << 20;

/// How to compare.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompareOptions {
    /// qemu-img's `-s`: images of different sizes differ, and so do ranges whose allocation
    /// status differs (allocated or not, known zero or not, stored or not, compressed or not,
    /// with a host offset or not), even when their contents are equal.
    pub strict: bool,
}

/// What the comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The guest data is the same.
    Identical,
    /// Strict mode, and the virtual sizes differ.
    SizeMismatch,
    /// Strict mode, and the allocation status differs at this guest offset.
    StatusMismatch(u64),
    /// The contents differ in the 512-byte sector starting at this guest offset (qemu-img
    /// reports mismatches at sector granularity).
    ContentMismatch(u64),
}

/// The verdict plus what qemu-img warns about on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The result.
    pub verdict: Verdict,
    /// Size of the smaller disk: the end of the part both images have.
    pub common_size: u64,
    /// The virtual sizes differ.
    pub sizes_differ: bool,
}

impl Outcome {
    /// The lines qemu-img prints for this outcome (on standard output, unless quiet).
    pub fn messages(&self) -> Vec<String> {
        let mut lines = Vec::new();
        // The size warning comes once the common part has been found equal.
        let common_equal = match self.verdict {
            Verdict::Identical => true,
            Verdict::ContentMismatch(o) => o >= self.common_size,
            _ => false,
        };
        if self.sizes_differ && common_equal {
            lines.push("Warning: Image size mismatch!".to_string());
        }
        lines.push(match self.verdict {
            Verdict::Identical => "Images are identical.".to_string(),
            Verdict::SizeMismatch => "Strict mode: Image size mismatch!".to_string(),
            Verdict::StatusMismatch(o) => format!("Strict mode: Offset {o} block status mismatch!"),
            Verdict::ContentMismatch(o) => format!("Content mismatch at offset {o}!"),
        });
        lines
    }

    /// qemu-img's exit code: 0 identical, 1 different.
    pub fn exit_code(&self) -> i32 {
        match self.verdict {
            Verdict::Identical => 0,
            _ => 1,
        }
    }
}

/// Why a comparison stopped without a verdict.
#[derive(Debug)]
pub enum CompareError {
    /// Reading guest data failed: from image `image` (0 the first, 1 the second), in the
    /// chunk at guest offset `offset` (qemu-img reports `Error while reading offset N of
    /// NAME` and exits with 4). `size_warning`: the disks differ in size and the failure came
    /// while checking the tail of the larger one, after qemu-img's size warning.
    Read {
        /// Which image: 0 or 1.
        image: usize,
        /// The guest offset of the chunk being read.
        offset: u64,
        /// Whether the size warning comes before the failure.
        size_warning: bool,
        /// The failure.
        error: Error,
    },
    /// Anything else (block status, metadata).
    Other(Error),
}

impl From<Error> for CompareError {
    fn from(e: Error) -> Self {
        CompareError::Other(e)
    }
}

impl CompareError {
    /// The underlying error.
    pub fn into_error(self) -> Error {
        match self {
            CompareError::Read { error, .. } | CompareError::Other(error) => error,
        }
    }
}

/// Compares the guest data of `a` and `b`.
pub fn compare(a: &dyn BlockImage, b: &dyn BlockImage, opts: &CompareOptions) -> Result<Outcome> {
    compare_detailed(a, b, opts).map_err(CompareError::into_error)
}

/// Compares the guest data of `a` and `b`, telling a failed read of guest data apart
/// ([`CompareError::Read`]).
pub fn compare_detailed(
    a: &dyn BlockImage,
    b: &dyn BlockImage,
    opts: &CompareOptions,
) -> std::result::Result<Outcome, CompareError> {
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    let common = size_a.min(size_b);
    let outcome = |verdict| Outcome {
        verdict,
        common_size: common,
        sizes_differ: size_a != size_b,
    };
    if opts.strict && size_a != size_b {
        return Ok(outcome(Verdict::SizeMismatch));
    }
    let mut bufs = Buffers::default();
    let mut ra = Runs::new(a, opts.strict);
    let mut rb = Runs::new(b, opts.strict);
    let mut off = 0;
    while off < common {
        let (sa, la) = ra.run(off, common - off)?;
        let (sb, lb) = rb.run(off, common - off)?;
        if opts.strict && sa.key() != sb.key() {
            return Ok(outcome(Verdict::StatusMismatch(off)));
        }
        let n = la.min(lb);
        let found = match (sa.status.zero, sb.status.zero) {
            (true, true) => None,
            (true, false) => first_nonzero(b, off, n, &mut bufs).map_err(read_failed(1, false))?,
            (false, true) => first_nonzero(a, off, n, &mut bufs).map_err(read_failed(0, false))?,
            (false, false) => first_difference(a, b, off, n, &mut bufs)?,
        };
        if let Some(p) = found {
            return Ok(outcome(Verdict::ContentMismatch(sector_of(p, off))));
        }
        off += n;
    }
    // The tail of the larger image must read as zeros.
    let (longer, longer_size, side) = if size_a > size_b {
        (a, size_a, 0)
    } else {
        (b, size_b, 1)
    };
    let mut rl = Runs::new(longer, false);
    let mut off = common;
    while off < longer_size {
        let (s, n) = rl.run(off, longer_size - off)?;
        if !s.status.zero {
            if let Some(p) = first_nonzero(longer, off, n, &mut bufs)
                .map_err(read_failed(side, size_a != size_b))?
            {
                return Ok(outcome(Verdict::ContentMismatch(sector_of(p, off))));
            }
        }
        off += n;
    }
    Ok(outcome(Verdict::Identical))
}

/// Makes a failed read of image `side` (the chunk's offset attached by the reader) a
/// [`CompareError::Read`].
fn read_failed(side: usize, size_warning: bool) -> impl Fn((u64, Error)) -> CompareError {
    move |(offset, error)| CompareError::Read {
        image: side,
        offset,
        size_warning,
        error,
    }
}

/// The start of the 512-byte sector holding byte `p`, not before `floor`.
fn sector_of(p: u64, floor: u64) -> u64 {
    (p & !511).max(floor)
}

/// What strict mode compares between two ranges, as qemu-img does: allocation, zero, data,
/// compression, whether there is a host offset (not which one, and not the layer), and whether
/// the block-status answer covering the range runs to the end of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatusKey {
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    has_offset: bool,
    to_end: bool,
}

/// A part of one block-status answer: the status (clipped to the part) and whether the whole
/// answer reached the end of the disk.
#[derive(Debug, Clone, Copy)]
struct Part {
    status: BlockStatus,
    to_end: bool,
}

impl Part {
    fn key(&self) -> StatusKey {
        let s = &self.status;
        StatusKey {
            present: s.present,
            zero: s.zero,
            data: s.data,
            compressed: s.compressed,
            has_offset: s.offset.is_some(),
            to_end: self.to_end,
        }
    }
}

/// Consecutive block-status answers of one image, merged into runs that a comparison can treat
/// alike: same zero-ness (and, in strict mode, the same [`StatusKey`]), at most [`CHUNK`] bytes
/// when they need reading.
struct Runs<'a> {
    image: &'a dyn BlockImage,
    strict: bool,
    /// The last answer and the guest offset it starts at, for reuse when a run stopped inside it.
    cached: Option<(u64, BlockStatus)>,
}

impl<'a> Runs<'a> {
    fn new(image: &'a dyn BlockImage, strict: bool) -> Self {
        Runs {
            image,
            strict,
            cached: None,
        }
    }

    /// The status at `off`, covering at most `max` bytes.
    fn status(&mut self, off: u64, max: u64) -> Result<Part> {
        let size = self.image.virtual_size();
        if let Some((start, s)) = self.cached {
            if start <= off && off < start + s.len {
                let mut part = s;
                part.len = (start + s.len - off).min(max);
                part.offset = s.offset.and_then(|o| o.checked_add(off - start));
                return Ok(Part {
                    status: part,
                    to_end: start + s.len == size,
                });
            }
        }
        let s = self.image.block_status(GuestOffset(off), size - off)?;
        if s.len == 0 || s.len > size - off {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "block status at guest offset {off:#x} returned an invalid length {}",
                    s.len
                ),
            )
            .with_path(self.image.filename()));
        }
        self.cached = Some((off, s));
        let mut part = s;
        part.len = s.len.min(max);
        Ok(Part {
            status: part,
            to_end: off + s.len == size,
        })
    }

    /// The run starting at `off`, at most `max` bytes: its first part and its length.
    fn run(&mut self, off: u64, max: u64) -> Result<(Part, u64)> {
        let first = self.status(off, max)?;
        let zero = first.status.zero;
        let limit = if zero { max } else { max.min(CHUNK) };
        let mut len = first.status.len.min(limit);
        while len < limit {
            let next = self.status(off + len, limit - len)?;
            let alike = if self.strict {
                next.key() == first.key()
            } else {
                next.status.zero == zero
            };
            if !alike {
                break;
            }
            len += next.status.len;
        }
        Ok((first, len))
    }
}

/// Read buffers, allocated once per comparison (fresh allocations would cost a page fault per
/// page read).
#[derive(Default)]
struct Buffers {
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Buffers {
    /// Both buffers, at least `len` bytes long.
    fn get(&mut self, len: usize) -> (&mut [u8], &mut [u8]) {
        if self.a.len() < len {
            self.a.resize(len, 0);
            self.b.resize(len, 0);
        }
        (&mut self.a[..len], &mut self.b[..len])
    }
}

/// The guest offset of the first non-zero byte of `image` in `[off, off + len)`, if any.
fn first_nonzero(
    image: &dyn BlockImage,
    off: u64,
    len: u64,
    bufs: &mut Buffers,
) -> std::result::Result<Option<u64>, (u64, Error)> {
    let (buf, _) = bufs.get(len.min(CHUNK) as usize);
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK) as usize;
        image
            .read_at(&mut buf[..n], GuestOffset(pos))
            .map_err(|e| (pos, e))?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}

/// The guest offset of the first byte in `[off, off + len)` where `a` and `b` differ, if any.
/// The two images are read in parallel.
fn first_difference(
    a: &dyn BlockImage,
    b: &dyn BlockImage,
    off: u64,
    len: u64,
    bufs: &mut Buffers,
) -> std::result::Result<Option<u64>, CompareError> {
    let (ba, bb) = bufs.get(len.min(CHUNK) as usize);
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK) as usize;
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| a.read_at(&mut ba[..n], GuestOffset(pos)));
            let rb = b.read_at(&mut bb[..n], GuestOffset(pos));
            let ra = ta.join().unwrap_or_else(|_| {
                Err(Error::new(ErrorKind::Io, "reader thread panicked").with_path(a.filename()))
            });
            (ra, rb)
        });
        ra.map_err(|e| read_failed(0, false)((pos, e)))?;
        rb.map_err(|e| read_failed(1, false)((pos, e)))?;
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}
