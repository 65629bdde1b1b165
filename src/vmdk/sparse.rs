//! Hosted sparse extents (monolithicSparse, twoGbMaxExtentSparse, streamOptimized): the grain
//! directory (and its redundant copy), grain tables of 32-bit sector numbers, and grains,
//! stored plainly or (stream-optimized) compressed behind a grain marker.
//!
//! Everything the header says is checked before use as qemu checks it (and the directories
//! must lie inside the file, which bounds what a hostile header can make vimg allocate). Grain
//! tables are read on demand into a small cache behind a lock that is never held across I/O
//! of grain data or inflation, so reads of different grains run in parallel.

use super::header::{
    SparseHeader, FLAG_MARKER, FLAG_RGD, FLAG_ZERO_GRAIN, GD_AT_END, GTE_ZEROED, HEADER_LEN,
};
use super::mapping::{Mapped, Mapping};
use crate::error::{Error, Result};
use crate::offsets::HostOffset;
use crate::storage::Storage;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Fills a new grain's bytes around a write: (buffer, grain's extent offset, the grain was
/// zeroed).
pub type Fill<'a> = dyn Fn(&mut [u8], u64, bool) -> Result<()> + 'a;

/// Zeros to write from, shared by every write of zeros (no buffer allocated per write): as
/// large as the grain of every disk qemu and vimg make.
pub static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Writes `len` zero bytes at `at` from [`ZEROS`], a piece at a time.
pub fn write_zeros(storage: &dyn Storage, at: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        storage.write_at(&ZEROS[..n as usize], at + done)?;
        done += n;
    }
    Ok(())
}

/// Grain tables kept in memory per extent.
const GT_CACHE_LEN: usize = 64;
/// The largest grain qemu opens (`cluster_sectors > 0x200000` is refused): 1 GiB.
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// The most grain directory entries qemu reads (32 Mi).
const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// Bytes of a grain marker before its data: LBA (u64) and size (u32).
pub const MARKER_LEN: usize = 12;
/// A sparse extent can address sectors up to 2^32.
const MAX_EXTENT_SECTORS: u64 = 1 << 32;

/// What the first sector of a hosted sparse file holds.
pub enum Opened {
    /// A sparse extent.
    Extent(Box<SparseExtent>),
    /// A header with no capacity and a descriptor: the descriptor's text (at this offset)
    /// describes the disk instead.
    Descriptor(u64),
}

/// An open hosted sparse extent.
pub struct SparseExtent {
    /// The header in effect (the footer's, for a stream-optimized file that has one).
    pub header: SparseHeader,
    /// Grain size in bytes.
    pub grain: u64,
    /// Entries per grain table.
    gt_entries: u64,
    /// The grain directory: sector numbers of grain tables.
    gd: Vec<u32>,
    /// The redundant grain directory, if the header has one.
    rgd: Option<Vec<u32>>,
    /// Grains are compressed (stream-optimized).
    pub compressed: bool,
    /// Grains have markers.
    has_marker: bool,
    /// Grain-table entry 1 means zeros.
    pub zero_grain: bool,
    cache: Mutex<GtCache>,
    /// Where the next grain goes (bytes): the end of the file rounded up to a grain, then
    /// after each new grain (qemu's `next_cluster_sector`).
    next: Mutex<u64>,
}

#[derive(Default)]
struct GtCache {
    tables: HashMap<u32, Arc<Vec<u32>>>,
    order: VecDeque<u32>,
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::corrupt(what)
}

fn read_u32s(storage: &dyn Storage, at: u64, n: usize, what: &str) -> Result<Vec<u32>> {
    let mut raw = vec![0u8; n * 4];
    storage
        .read_at(&mut raw, at)
        .map_err(|e| Error::io(format!("Could not read {what}"), e).at(at))?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl SparseExtent {
    /// Opens the hosted sparse extent in `storage` (whose first sector has the `KDMV` magic),
    /// checking its header as qemu's `vmdk_open_vmdk4` does.
    pub fn open(storage: &dyn Storage, writable: bool) -> Result<Opened> {
        let len = storage
            .len()
            .map_err(|e| Error::io("Could not access file", e))?;
        let mut hb = [0u8; HEADER_LEN];
        let n = (len as usize).min(HEADER_LEN);
        storage
            .read_at(&mut hb[..n], 0)
            .map_err(|e| Error::io("Could not read header", e))?;
        let mut header = SparseHeader::parse(&hb);
        if header.capacity == 0 && header.desc_offset != 0 {
            let at = header
                .desc_offset
                .checked_mul(512)
                .filter(|&a| a < len)
                .ok_or_else(|| corrupt("the descriptor offset lies past the end of the file"))?;
            return Ok(Opened::Descriptor(at));
        }
        if header.gd_offset == GD_AT_END {
            let end = len.div_ceil(512) * 512;
            let at = end
                .checked_sub(1536)
                .ok_or_else(|| corrupt("Failed to read footer: the file is too short"))?;
            let mut fb = [0u8; 1536];
            let avail = (len - at).min(1536) as usize;
            storage
                .read_at(&mut fb[..avail], at)
                .map_err(|e| Error::io("Failed to read footer", e))?;
            header = SparseHeader::from_footer(&fb)?;
        }
        let compressed = header.compressed();
        if header.version > 3 {
            return Err(Error::unsupported(format!(
                "Unsupported VMDK version {}",
                header.version
            )));
        }
        if header.version == 3 && writable && !compressed {
            return Err(Error::invalid_input("VMDK version 3 must be read only"));
        }
        if header.num_gtes_per_gt > 512 {
            return Err(corrupt("L2 table size too big"));
        }
        // qemu multiplies in 32 bits.
        let entry_sectors =
            (header.num_gtes_per_gt as u64).wrapping_mul(header.granularity) & 0xffff_ffff;
        if entry_sectors == 0 {
            return Err(corrupt("L1 entry size is invalid"));
        }
        let gd_len = header.capacity.div_ceil(entry_sectors);
        if len.div_ceil(512) < header.grain_offset {
            return Err(corrupt(format!(
                "File truncated, expecting at least {} bytes",
                header.grain_offset.saturating_mul(512)
            )));
        }
        if header.granularity > MAX_GRAIN_SECTORS {
            return Err(corrupt("Invalid granularity, image may be corrupt"));
        }
        if gd_len > MAX_GD_ENTRIES {
            return Err(corrupt("L1 size too big"));
        }
        if header.capacity > MAX_EXTENT_SECTORS.saturating_mul(header.granularity)
            || header.capacity > (i64::MAX as u64) / 512
        {
            return Err(corrupt(format!(
                "capacity of {} sectors is more than the extent can address",
                header.capacity
            )));
        }
        let load = |sector: u64, what: &str| -> Result<Vec<u32>> {
            let at = sector.saturating_mul(512);
            if at.checked_add(gd_len * 4).is_none_or(|e| e > len) {
                return Err(corrupt(format!(
                    "the {what} ({gd_len} entries at offset {at}) lies past the end of the file ({len} bytes)"
                )));
            }
            read_u32s(storage, at, gd_len as usize, what)
        };
        let gd = load(header.gd_offset, "l1 table")?;
        let rgd = match header.flags & FLAG_RGD != 0 && header.rgd_offset != 0 {
            true => Some(load(header.rgd_offset, "l1 backup table")?),
            false => None,
        };
        let grain = header.granularity * 512;
        Ok(Opened::Extent(Box::new(SparseExtent {
            grain,
            gt_entries: header.num_gtes_per_gt as u64,
            gd,
            rgd,
            compressed,
            has_marker: header.flags & FLAG_MARKER != 0,
            zero_grain: header.flags & FLAG_ZERO_GRAIN != 0,
            cache: Mutex::new(GtCache::default()),
            next: Mutex::new(len.div_ceil(grain) * grain),
            header,
        })))
    }

    /// Guest bytes the extent holds.
    pub fn capacity(&self) -> u64 {
        self.header.capacity * 512
    }

    /// The grain table at `sector`, from the cache or the file.
    fn table(&self, storage: &dyn Storage, sector: u32) -> Result<Arc<Vec<u32>>> {
        if let Some(t) = lock(&self.cache).tables.get(&sector) {
            return Ok(t.clone());
        }
        let at = sector as u64 * 512;
        let len = storage
            .len()
            .map_err(|e| Error::io("Could not access file", e))?;
        if at + self.gt_entries * 4 > len {
            return Err(corrupt(format!(
                "grain table at offset {at} lies past the end of the file ({len} bytes)"
            )));
        }
        let t = Arc::new(read_u32s(
            storage,
            at,
            self.gt_entries as usize,
            "grain table",
        )?);
        let mut c = lock(&self.cache);
        if c.tables.len() >= GT_CACHE_LEN {
            if let Some(old) = c.order.pop_front() {
                c.tables.remove(&old);
            }
        }
        if c.tables.insert(sector, t.clone()).is_none() {
            c.order.push_back(sector);
        }
        Ok(t)
    }

    /// The grain table entry of the grain at extent offset `off`, with where it lives
    /// (directory index, table sector, index in the table); `None` where the directory has no
    /// table.
    fn entry(&self, storage: &dyn Storage, off: u64) -> Result<Option<(usize, u32, usize, u32)>> {
        let grain_no = off / self.grain;
        let l1 = (grain_no / self.gt_entries) as usize;
        let l2 = (grain_no % self.gt_entries) as usize;
        let Some(&gt) = self.gd.get(l1) else {
            return Err(corrupt(format!(
                "offset {off} lies past the grain directory"
            )));
        };
        if gt == 0 {
            return Ok(None);
        }
        let t = self.table(storage, gt)?;
        Ok(Some((l1, gt, l2, t[l2])))
    }

    fn mapping_of(&self, gte: u32) -> Mapping {
        match gte {
            0 => Mapping::Unallocated,
            GTE_ZEROED if self.zero_grain => Mapping::Zero,
            s if self.compressed => Mapping::Compressed(HostOffset(s as u64 * 512)),
            s => Mapping::Data(HostOffset(s as u64 * 512)),
        }
    }

    /// Where the bytes at extent offset `off` are, for at most `max_len` bytes: one grain, or
    /// a run of grains with the same mapping (contiguous for data), as far as one grain table
    /// reaches.
    pub fn map(&self, storage: &dyn Storage, off: u64, max_len: u64) -> Result<Mapped> {
        let first = self.entry(storage, off)?;
        let mapping = self.mapping_of(first.map_or(0, |e| e.3));
        let mut len = (self.grain - off % self.grain).min(max_len);
        if matches!(mapping, Mapping::Compressed(_)) {
            return Ok(Mapped { len, mapping });
        }
        // Extend over the following grains of the same table.
        let table = match first {
            Some((_, gt, _, _)) => Some(self.table(storage, gt)?),
            None => None,
        };
        let grain_no = off / self.grain;
        let mut next = grain_no + 1;
        let table_end = (grain_no / self.gt_entries + 1) * self.gt_entries;
        while len < max_len && next < table_end && next * self.grain < self.capacity() {
            let gte = table
                .as_ref()
                .map_or(0, |t| t[(next % self.gt_entries) as usize]);
            let m = self.mapping_of(gte);
            let follows = match (mapping, m) {
                (Mapping::Data(a), Mapping::Data(b)) => {
                    b.0 == a.0 + (next * self.grain - (off - off % self.grain))
                }
                (a, b) => a == b,
            };
            if !follows {
                break;
            }
            len = (len + self.grain).min(max_len);
            next += 1;
        }
        let mapping = match mapping {
            Mapping::Data(h) => Mapping::Data(HostOffset(h.0 + off % self.grain)),
            m => m,
        };
        Ok(Mapped { len, mapping })
    }

    /// Inflates the compressed grain at `host` into a grain-sized buffer and copies
    /// `buf.len()` bytes from `in_grain` of it.
    pub fn read_compressed(
        &self,
        storage: &dyn Storage,
        host: u64,
        in_grain: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("Could not access file", e))?;
        let (data_at, data_len) = if self.has_marker {
            let mut m = [0u8; MARKER_LEN];
            storage
                .read_at(&mut m, host)
                .map_err(|e| Error::io("read failed", e).at(host))?;
            let size = u32::from_le_bytes([m[8], m[9], m[10], m[11]]) as u64;
            (host + MARKER_LEN as u64, size)
        } else {
            (host, self.grain)
        };
        if data_len == 0 || data_len > 2 * self.grain {
            return Err(corrupt(format!(
                "compressed grain at offset {host} has a bogus size of {data_len} bytes"
            )));
        }
        let avail = file_len.saturating_sub(data_at).min(data_len) as usize;
        let grain = self.grain as usize;
        thread_local! {
            /// An inflater and its input and output buffers, kept per thread: every grain
            /// read would otherwise allocate them anew.
            static INFLATE: std::cell::RefCell<(flate2::Decompress, Vec<u8>, Vec<u8>)> =
                std::cell::RefCell::new((flate2::Decompress::new(true), Vec::new(), Vec::new()));
        }
        INFLATE.with(|cell| {
            let (d, z, out) = &mut *cell.borrow_mut();
            z.resize(avail, 0);
            storage
                .read_at(z, data_at)
                .map_err(|e| Error::io("read failed", e).at(data_at))?;
            // Only the bytes asked for are kept (a hostile grain size bounds nothing); the
            // rest of the stream is inflated into a small scratch buffer, to check that it
            // ends within the grain, as qemu's inflate into one grain checks.
            let end = in_grain + buf.len() as u64;
            out.resize(end as usize, 0);
            d.reset(true);
            let bad = || {
                corrupt(format!(
                    "compressed grain at offset {host} does not inflate to at most one grain"
                ))
            };
            let mut st = d.decompress(z, out, flate2::FlushDecompress::Finish);
            let mut scratch = [0u8; 4096];
            loop {
                match st {
                    Ok(flate2::Status::StreamEnd) => break,
                    Ok(_) => {
                        let (i, o) = (d.total_in(), d.total_out());
                        let room = (grain as u64 - o.min(grain as u64)).min(4096) as usize;
                        let probe = if room == 0 { 1 } else { room };
                        st = d.decompress(
                            &z[i as usize..],
                            &mut scratch[..probe],
                            flate2::FlushDecompress::Finish,
                        );
                        let progressed = d.total_in() != i || d.total_out() != o;
                        let ended = matches!(st, Ok(flate2::Status::StreamEnd));
                        if d.total_out() > grain as u64 || (!progressed && !ended) {
                            return Err(bad());
                        }
                    }
                    Err(_) => return Err(bad()),
                }
            }
            let produced = d.total_out();
            if end > produced {
                return Err(corrupt(format!(
                    "compressed grain at offset {host} holds {produced} bytes, fewer than the {end} read"
                )));
            }
            buf.copy_from_slice(&out[in_grain as usize..end as usize]);
            Ok(())
        })
    }

    /// Whether the grain directory has a grain table for every grain (writes need one: qemu
    /// preallocates them all).
    fn table_for(&self, storage: &dyn Storage, off: u64) -> Result<(usize, u32, usize, u32)> {
        self.entry(storage, off)?.ok_or_else(|| {
            Error::unsupported(format!(
                "cannot write at extent offset {off}: its grain table is not allocated"
            ))
        })
    }

    /// Records `gte` for the grain at (`l1`, `gt`, `l2`) in the grain table and its
    /// redundant copy, then in the cache.
    fn set_entry(
        &self,
        storage: &dyn Storage,
        (l1, gt, l2): (usize, u32, usize),
        gte: u32,
    ) -> Result<()> {
        let bytes = gte.to_le_bytes();
        let at = gt as u64 * 512 + l2 as u64 * 4;
        storage
            .write_at(&bytes, at)
            .map_err(|e| Error::io("write failed", e).at(at))?;
        if let Some(rgd) = &self.rgd {
            let rgt = rgd.get(l1).copied().unwrap_or(0);
            if rgt != 0 {
                let at = rgt as u64 * 512 + l2 as u64 * 4;
                storage
                    .write_at(&bytes, at)
                    .map_err(|e| Error::io("write failed", e).at(at))?;
            }
        }
        let mut c = lock(&self.cache);
        if let Some(t) = c.tables.get_mut(&gt) {
            Arc::make_mut(t)[l2] = gte;
        }
        Ok(())
    }

    /// Writes `data` (zeros when `None`) at extent offset `off` within one grain, allocating
    /// the grain at the end of the file when it has none: the whole grain is written first,
    /// filled from `fill` (the backing file's data, or zeros) around the new bytes, then its
    /// table entries. With `zero` and a whole grain of an extent with zeroed grains, only the
    /// entry is written. The caller holds the image's write lock.
    pub fn write(
        &self,
        storage: &dyn Storage,
        off: u64,
        data: Option<&[u8]>,
        len: u64,
        fill: &Fill<'_>,
    ) -> Result<()> {
        let (l1, gt, l2, gte) = self.table_for(storage, off)?;
        let in_grain = off % self.grain;
        let grain_start = off - in_grain;
        if self.compressed {
            if gte != 0 && !(gte == GTE_ZEROED && self.zero_grain) {
                return Err(Error::unsupported(
                    "Could not write to allocated cluster for streamOptimized",
                ));
            }
            let grain_len = self.grain.min(self.capacity() - grain_start);
            if in_grain != 0 || len != grain_len {
                return Err(Error::unsupported(
                    "a streamOptimized image takes whole grains only, written in order",
                ));
            }
            let z = match data {
                Some(d) => compress(d)?,
                None if len as usize <= ZEROS.len() => compress(&ZEROS[..len as usize])?,
                None => compress(&vec![0u8; len as usize])?,
            };
            return self.append_compressed(storage, off, &z);
        }
        if data.is_none() && self.zero_grain && in_grain == 0 && len == self.grain {
            if gte != GTE_ZEROED {
                self.set_entry(storage, (l1, gt, l2), GTE_ZEROED)?;
            }
            return Ok(());
        }
        let zeroed = gte == GTE_ZEROED && self.zero_grain;
        if gte != 0 && !zeroed {
            // Zeros into an allocated grain: a zero range of the file (the grain stays
            // allocated, and data, whatever the file system makes of the range).
            let at = gte as u64 * 512 + in_grain;
            let res = match data {
                Some(d) => storage.write_at(d, at),
                None => storage.zero_range(at, len),
            };
            return res.map_err(|e| Error::io("write failed", e).at(at));
        }
        // A new grain: the whole of it, then its entry.
        let mut next = lock(&self.next);
        let host = *next;
        if host / 512 + self.grain / 512 > MAX_EXTENT_SECTORS {
            return Err(Error::unsupported("the extent file is full (2 TiB)"));
        }
        if in_grain == 0 && len == self.grain {
            // The whole grain is written: straight from the caller's data (or zeros), without
            // a copy.
            match data {
                Some(d) => storage.write_at(d, host),
                None => write_zeros(storage, host, len),
            }
            .map_err(|e| Error::io("write failed", e).at(host))?;
        } else {
            let mut whole = vec![0u8; self.grain as usize];
            let valid = self.grain.min(self.capacity() - grain_start) as usize;
            fill(&mut whole[..valid], grain_start, zeroed)?;
            if let Some(d) = data {
                whole[in_grain as usize..(in_grain + len) as usize].copy_from_slice(d);
            } else {
                whole[in_grain as usize..(in_grain + len) as usize].fill(0);
            }
            storage
                .write_at(&whole, host)
                .map_err(|e| Error::io("write failed", e).at(host))?;
        }
        *next = host + self.grain;
        drop(next);
        self.set_entry(storage, (l1, gt, l2), (host / 512) as u32)
    }

    /// Appends the compressed grain `z` for the grain at extent offset `off` behind a grain
    /// marker at the end of the file, then records it.
    pub fn append_compressed(&self, storage: &dyn Storage, off: u64, z: &[u8]) -> Result<()> {
        let (l1, gt, l2, gte) = self.table_for(storage, off)?;
        if gte != 0 && !(gte == GTE_ZEROED && self.zero_grain) {
            return Err(Error::unsupported(
                "Could not write to allocated cluster for streamOptimized",
            ));
        }
        let mut marker = [0u8; MARKER_LEN];
        marker[..8].copy_from_slice(&(off / 512).to_le_bytes());
        marker[8..].copy_from_slice(&(z.len() as u32).to_le_bytes());
        let mut next = lock(&self.next);
        let host = *next;
        if host / 512 >= MAX_EXTENT_SECTORS {
            return Err(Error::unsupported("the extent file is full (2 TiB)"));
        }
        // The marker, then the data behind it (two writes: no copy of the grain).
        let data_at = host + MARKER_LEN as u64;
        storage
            .write_at(&marker, host)
            .map_err(|e| Error::io("write failed", e).at(host))?;
        storage
            .write_at(z, data_at)
            .map_err(|e| Error::io("write failed", e).at(data_at))?;
        *next = (data_at + z.len() as u64).div_ceil(512) * 512;
        drop(next);
        self.set_entry(storage, (l1, gt, l2), (host / 512) as u32)
    }

    /// Every grain table entry, for `check`: (grain index, entry), for the grains whose
    /// table is allocated.
    pub fn entries(&self, storage: &dyn Storage) -> Result<Vec<(u64, u32)>> {
        let mut out = Vec::new();
        let grains = self.capacity().div_ceil(self.grain);
        for (l1, &gt) in self.gd.iter().enumerate() {
            if gt == 0 {
                continue;
            }
            let t = self.table(storage, gt)?;
            for (l2, &e) in t.iter().enumerate() {
                let g = l1 as u64 * self.gt_entries + l2 as u64;
                if g < grains {
                    out.push((g, e));
                }
            }
        }
        Ok(out)
    }
}

/// Deflates one grain as a zlib stream (what qemu's `compress()` writes: a zlib header, the
/// default level), with a compressor and an output buffer of zlib's bound kept per thread
/// (setting one up costs more than a grain). The grain returned takes its compressed size
/// only: the copy engine holds several jobs' grains until they are written in order, and
/// buffers of the bound would hold about a grain each.
pub fn compress(data: &[u8]) -> Result<Vec<u8>> {
    type Deflater = (flate2::Compress, Vec<u8>);
    thread_local! {
        static DEFLATE: std::cell::RefCell<Option<Deflater>> =
            const { std::cell::RefCell::new(None) };
    }
    // zlib's compressBound.
    let bound = data.len() + (data.len() >> 12) + (data.len() >> 14) + (data.len() >> 25) + 13 + 6;
    DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let (c, out) = slot.get_or_insert_with(|| {
            let c = flate2::Compress::new(flate2::Compression::default(), true);
            (c, Vec::new())
        });
        out.resize(bound, 0);
        c.reset();
        let r = match c.compress(data, out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => Ok(out[..c.total_out() as usize].to_vec()),
            Ok(_) => Err(Error::corrupt("deflate did not finish within its bound")),
            Err(e) => Err(Error::corrupt(format!("deflate failed: {e}"))),
        };
        // A grain larger than the usual 64 KiB does not keep its buffer.
        if out.capacity() > 1 << 20 {
            *out = Vec::new();
        }
        r
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
