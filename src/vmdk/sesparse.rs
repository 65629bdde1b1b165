//! ESXi's seSparse snapshot delta (`SESPARSE` extent, createType `seSparse`), read-only.
//!
//! The format is not officially documented; this follows what qemu's `block/vmdk.c` reads
//! (`VMDKSESparseConstHeader`, `VMDKSESparseVolatileHeader`, `vmdk_open_se_sparse`,
//! `check_se_sparse_const_header`, `check_se_sparse_volatile_header`, and the seSparse branch
//! of `get_cluster_offset`), with libyal libvmdk's notes. All fields are little-endian 64-bit.
//!
//! - The *constant header* (sector 0, 512 bytes): magic `0xcafebabe`, version
//!   `0x2_0000_0001`, capacity (sectors), grain size (8 sectors), grain table size (64
//!   sectors), flags (0), four reserved fields (0), then (offset, size) pairs in sectors for
//!   the volatile header, the journal header, the journal, the grain directory, the grain
//!   tables, the free bitmap, the backmap and the grains; the rest is zero padding.
//! - The *volatile header* (512 bytes at its offset): magic `0xcafecafe`, the free GT number,
//!   the next transaction number, and `replay_journal`, which must be 0 (a dirty image would
//!   need its journal replayed); the rest is zero padding.
//! - The *grain directory* (GD): 64-bit entries, each 0 (no grain table) or
//!   `0x1000_0000_xxxx_xxxx`, whose low 32 bits index a 32 KiB grain table in the grain
//!   tables area.
//! - A *grain table* (GT): 4096 64-bit entries whose top nibble says what the 4 KiB grain is:
//!   0 not in this delta (the whole entry must be 0; the parent's bytes), 1 unmapped and 2
//!   zero (both read as zeros), 3 stored, with a 60-bit grain index whose low 12 bits are
//!   kept in bits 48..60 and the rest in bits 0..48; the grain lies at that index in the
//!   grains area. Other nibbles are errors.
//!
//! Beyond qemu's checks, the GD, each GT and each grain read must lie inside the file (qemu
//! reads past the end as zeros).

use crate::error::{Error, Result};
use crate::offsets::HostOffset;
use crate::storage::Storage;
use crate::vmdk::mapping::{Geometry, GrainLookup, Mapped, Mapping};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The constant header's magic.
pub const CONST_MAGIC: u64 = 0xcafe_babe;
/// The volatile header's magic.
pub const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
/// The only version qemu reads.
pub const VERSION: u64 = 0x0000_0002_0000_0001;
/// Grain size in sectors (the only one qemu reads).
pub const GRAIN_SECTORS: u64 = 8;
/// Grain table size in sectors (the only one qemu reads): 4096 entries of 8 bytes.
pub const GT_SECTORS: u64 = 64;
/// Most grain directory entries qemu accepts (`vmdk_add_extent`'s "L1 size too big").
pub const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
const SECTOR: u64 = 512;
const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
const GT_BYTES: u64 = GT_SECTORS * SECTOR;
const GTES_PER_GT: u64 = GT_BYTES / 8;

/// An open seSparse extent.
pub struct SeSparseExtent {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    file_len: u64,
    /// Capacity in sectors (the constant header's).
    sectors: u64,
    gd_offset: u64,
    gd_entries: u64,
    /// The grain tables area, in sectors.
    gt_area: u64,
    /// The grains area, in sectors.
    grains_area: u64,
    /// The grain table last read: its GD index and its entries.
    cache: Mutex<Option<(u64, Arc<Vec<u64>>)>>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The constant header's fields, by their byte offset.
mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CAPACITY: usize = 16;
    pub const GRAIN_SIZE: usize = 24;
    pub const GT_SIZE: usize = 32;
    pub const FLAGS: usize = 40;
    pub const RESERVED: usize = 48;
    pub const VOLATILE_OFFSET: usize = 80;
    pub const GD_OFFSET: usize = 128;
    pub const GD_SIZE: usize = 136;
    pub const GT_OFFSET: usize = 144;
    pub const GRAINS_OFFSET: usize = 192;
    pub const PAD: usize = 208;
    pub const VOLATILE_REPLAY: usize = 24;
    pub const VOLATILE_PAD: usize = 32;
}

/// qemu's checks of the constant header (`check_se_sparse_const_header`), in its words.
fn check_const_header(h: &[u8; 512]) -> Result<()> {
    let magic = le64(h, field::MAGIC);
    if magic != CONST_MAGIC {
        return Err(Error::corrupt(format!(
            "Bad const header magic: 0x{magic:016x}"
        )));
    }
    let version = le64(h, field::VERSION);
    if version != VERSION {
        return Err(Error::unsupported(format!(
            "Unsupported version: 0x{version:016x}"
        )));
    }
    let grain = le64(h, field::GRAIN_SIZE);
    if grain != GRAIN_SECTORS {
        return Err(Error::unsupported(format!(
            "Unsupported grain size: {grain}"
        )));
    }
    let gt = le64(h, field::GT_SIZE);
    if gt != GT_SECTORS {
        return Err(Error::unsupported(format!(
            "Unsupported grain table size: {gt}"
        )));
    }
    let flags = le64(h, field::FLAGS);
    if flags != 0 {
        return Err(Error::unsupported(format!(
            "Unsupported flags: 0x{flags:016x}"
        )));
    }
    let r: Vec<u64> = (0..4).map(|i| le64(h, field::RESERVED + 8 * i)).collect();
    if r.iter().any(|&v| v != 0) {
        return Err(Error::unsupported(format!(
            "Unsupported reserved bits: 0x{:016x} 0x{:016x} 0x{:016x} 0x{:016x}",
            r[0], r[1], r[2], r[3]
        )));
    }
    if h[field::PAD..].iter().any(|&b| b != 0) {
        return Err(Error::unsupported(
            "Unsupported non-zero const header padding",
        ));
    }
    Ok(())
}

/// qemu's checks of the volatile header (`check_se_sparse_volatile_header`), in its words.
fn check_volatile_header(h: &[u8; 512]) -> Result<()> {
    let magic = le64(h, 0);
    if magic != VOLATILE_MAGIC {
        return Err(Error::corrupt(format!(
            "Bad volatile header magic: 0x{magic:016x}"
        )));
    }
    if le64(h, field::VOLATILE_REPLAY) != 0 {
        return Err(Error::unsupported(
            "Image is dirty, Replaying journal not supported",
        ));
    }
    if h[field::VOLATILE_PAD..].iter().any(|&b| b != 0) {
        return Err(Error::unsupported(
            "Unsupported non-zero volatile header padding",
        ));
    }
    Ok(())
}

impl SeSparseExtent {
    /// Opens and checks the extent whose bytes `storage` holds (`path` names it in errors):
    /// both headers as qemu's `vmdk_open_se_sparse` checks them, the capacity, and the grain
    /// directory's place in the file.
    pub fn open(storage: Arc<dyn Storage>, path: &Path) -> Result<Self> {
        let fail = |e: Error| e.with_path(path).while_opening();
        let file_len = storage
            .len()
            .map_err(|e| fail(Error::io("cannot get the extent's size", e)))?;
        let read = |buf: &mut [u8; 512], at: u64, what: &str| {
            storage
                .read_at(buf, at)
                .map_err(|e| fail(Error::io(format!("Could not read {what}"), e).at(at)))
        };
        let mut h = [0u8; 512];
        read(&mut h, 0, "const header")?;
        check_const_header(&h).map_err(fail)?;
        let sectors = le64(&h, field::CAPACITY);
        if sectors > i64::MAX as u64 / SECTOR {
            return Err(fail(Error::corrupt(format!(
                "capacity of {sectors} sectors is too large"
            ))));
        }
        let in_file = |sector: u64, bytes: u64, what: &str| -> Result<u64> {
            sector
                .checked_mul(SECTOR)
                .filter(|at| at.checked_add(bytes).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    fail(Error::corrupt(format!(
                        "the {what} (sector {sector}, {bytes} bytes) lies past the end of the \
                         file ({file_len} bytes)"
                    )))
                })
        };
        // Past the end of the file the volatile header reads as zeros (as in qemu) and fails
        // its magic check.
        let volatile_sector = le64(&h, field::VOLATILE_OFFSET);
        let volatile_at = volatile_sector
            .checked_mul(SECTOR)
            .filter(|at| at.checked_add(512).is_some())
            .ok_or_else(|| {
                fail(Error::corrupt(format!(
                    "Bad volatile header offset: sector {volatile_sector}"
                )))
            })?;
        let mut v = [0u8; 512];
        read(&mut v, volatile_at, "volatile header")?;
        check_volatile_header(&v).map_err(fail)?;
        let gd_size = le64(&h, field::GD_SIZE);
        let gd_entries = gd_size.saturating_mul(SECTOR / 8);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(fail(Error::corrupt(format!(
                "L1 size too big ({gd_size} sectors of grain directory)"
            ))));
        }
        let gd_offset = in_file(
            le64(&h, field::GD_OFFSET),
            gd_entries * 8,
            "grain directory",
        )?;
        Ok(SeSparseExtent {
            storage,
            path: path.to_path_buf(),
            file_len,
            sectors,
            gd_offset,
            gd_entries,
            gt_area: le64(&h, field::GT_OFFSET),
            grains_area: le64(&h, field::GRAINS_OFFSET),
            cache: Mutex::new(None),
        })
    }

    /// The extent's size in bytes (the constant header's capacity), for checking against the
    /// descriptor's extent line.
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// The grain size in bytes (always 4 KiB).
    pub fn grain_size(&self) -> u64 {
        GRAIN_BYTES
    }

    fn corrupt(&self, what: String, at: u64) -> Error {
        Error::corrupt(what).with_path(&self.path).at(at)
    }

    fn read_u64s(&self, at: u64, n: usize, what: &str) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; n * 8];
        self.storage.read_at(&mut raw, at).map_err(|e| {
            Error::io(format!("Could not read {what}"), e)
                .with_path(&self.path)
                .at(at)
        })?;
        Ok(raw.chunks_exact(8).map(|c| le64(c, 0)).collect())
    }

    /// The grain table of GD entry `index`, `None` if there is none.
    fn grain_table(&self, index: u64) -> Result<Option<Arc<Vec<u64>>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((i, gt)) = cache.as_ref() {
            if *i == index {
                return Ok(Some(gt.clone()));
            }
        }
        let at = self.gd_offset + index * 8;
        let entry = self.read_u64s(at, 1, "a grain directory entry")?[0];
        if entry == 0 {
            return Ok(None);
        }
        // qemu's strict check: the top 32 bits are 0x10000000 (allocated), so the index fits
        // in 32 bits.
        if entry >> 32 != 0x1000_0000 {
            return Err(self.corrupt(
                format!("grain directory entry {index} is invalid (0x{entry:016x})"),
                at,
            ));
        }
        let gt_index = entry & 0xffff_ffff;
        // qemu keeps GT offsets (in sectors) in 32 bits.
        let gt_sector = self
            .gt_area
            .checked_add(gt_index * GT_SECTORS)
            .filter(|&s| s <= 0xffff_ffff);
        let gt_at = gt_sector
            .map(|s| s * SECTOR)
            .filter(|&b| b + GT_BYTES <= self.file_len)
            .ok_or_else(|| {
                self.corrupt(
                    format!(
                        "grain directory entry {index} points at grain table {gt_index}, past \
                         the end of the file ({} bytes)",
                        self.file_len
                    ),
                    at,
                )
            })?;
        let gt = Arc::new(self.read_u64s(gt_at, GTES_PER_GT as usize, "a grain table")?);
        *cache = Some((index, gt.clone()));
        Ok(Some(gt))
    }

    /// What GT entry `entry` says of its grain: `None` for unallocated, `Some(None)` for
    /// zeros, `Some(Some(host))` for the grain's host byte offset.
    fn grain(&self, entry: u64, offset: u64) -> Result<Option<Option<u64>>> {
        match entry >> 60 {
            0 if entry == 0 => Ok(None),
            1 | 2 => Ok(Some(None)),
            3 => {
                let index = ((entry >> 48) & 0xfff) | ((entry & 0xffff_ffff_ffff) << 12);
                index
                    .checked_mul(GRAIN_SECTORS)
                    .and_then(|s| s.checked_add(self.grains_area))
                    .and_then(|s| s.checked_mul(SECTOR))
                    .map(|host| Some(Some(host)))
                    .ok_or_else(|| {
                        self.corrupt(
                            format!(
                                "grain table entry 0x{entry:016x} for offset {offset} points \
                                 past the end of the file ({} bytes)",
                                self.file_len
                            ),
                            self.gd_offset,
                        )
                    })
            }
            _ => Err(self.corrupt(
                format!("grain table entry for offset {offset} is invalid (0x{entry:016x})"),
                self.gd_offset,
            )),
        }
    }

    /// Where the bytes at `offset` (bytes from the extent's start) live, for a run of at most
    /// `max_len` bytes: one grain, or several whose entries agree (all unallocated, all reading
    /// as zeros, or stored one after the other) within one grain table. The seSparse branch of
    /// qemu's `get_cluster_offset`: unmapped and zero grains are [`Mapping::Zero`] (qemu
    /// reports both as zeroed and does not read the parent). An offset past what the grain
    /// directory covers, an invalid entry, or a grain past the end of the file, is an error.
    pub fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        let at = GrainLookup::new(
            &Geometry {
                path: &self.path,
                size: self.size(),
                grain: GRAIN_BYTES,
                gtes: GTES_PER_GT,
                gd_entries: self.gd_entries,
                gd_offset: self.gd_offset,
            },
            offset,
            max_len,
        )?;
        let Some(gt) = self.grain_table(at.index)? else {
            return Ok(at.without_table());
        };
        let (max_len, mut slot, in_grain, mut len) =
            (at.max_len, at.slot, at.in_grain, at.first_len);
        let first = self.grain(gt[slot], offset)?;
        let mapping = match first {
            None => Mapping::Unallocated,
            Some(None) => Mapping::Zero,
            Some(Some(grain)) => {
                let host = grain + in_grain;
                if host.checked_add(len).is_none_or(|end| end > self.file_len) {
                    return Err(self.corrupt(
                        format!(
                            "grain table entry 0x{:016x} for offset {offset} points past the \
                             end of the file ({} bytes)",
                            gt[slot], self.file_len
                        ),
                        self.gd_offset,
                    ));
                }
                Mapping::Data(HostOffset(host))
            }
        };
        slot += 1;
        while len < max_len && slot < gt.len() {
            let add = GRAIN_BYTES.min(max_len - len);
            let Ok(next) = self.grain(gt[slot], offset + len) else {
                break;
            };
            let same = match (mapping, next) {
                (Mapping::Unallocated, None) | (Mapping::Zero, Some(None)) => true,
                (Mapping::Data(h), Some(Some(g))) => {
                    g == h.get() + len && g.checked_add(add).is_some_and(|e| e <= self.file_len)
                }
                _ => false,
            };
            if !same {
                break;
            }
            len += add;
            slot += 1;
        }
        Ok(Mapped { len, mapping })
    }
}

/// Fuzz entry (target `vmdk_sesparse`): opens `data` as an seSparse extent from memory, maps
/// it from start to end (a bounded number of runs) and reads what is mapped as data. Never
/// panics.
pub fn exercise(data: &[u8]) {
    let storage: Arc<dyn Storage> = Arc::new(crate::storage::MemStorage::new(data.to_vec()));
    let Ok(extent) = SeSparseExtent::open(storage.clone(), Path::new("fuzz-sesparse.vmdk")) else {
        return;
    };
    let size = extent.size();
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    for _ in 0..4096 {
        if pos >= size {
            break;
        }
        let Ok(m) = extent.map(pos, size - pos) else {
            // Skip the grain that failed and go on.
            pos = (pos / GRAIN_BYTES + 1) * GRAIN_BYTES;
            continue;
        };
        if let Mapping::Data(host) = m.mapping {
            let n = m.len.min(buf.len() as u64) as usize;
            let _ = storage.read_at(&mut buf[..n], host.get());
        }
        pos += m.len;
    }
}
