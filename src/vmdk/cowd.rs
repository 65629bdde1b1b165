//! ESXi's vmfsSparse snapshot delta (`VMFSSPARSE` extent, createType `vmfsSparse`): a "COWD"
//! sparse file, read-only.
//!
//! Layout (qemu's `VMDK3Header` and `vmdk_open_vmfs_sparse` in `block/vmdk.c`; libyal
//! libvmdk's "COWD sparse extent file header"): the file starts with the magic `COWD`, then
//! little-endian 32-bit fields: version, flags, capacity (sectors), granularity (the grain
//! size, sectors), the grain directory's offset (sectors) and its number of entries, then
//! fields a reader does not need (next free sector, geometry, the parent's name and
//! generation). The grain directory (GD) holds 32-bit sector offsets of grain tables (GT), 0
//! for none; each GT holds 4096 32-bit sector offsets of grains, 0 for a grain not in this
//! delta (its bytes are the parent's). Nothing says a grain reads as zeros: there is no
//! zeroed-grain entry in this format.
//!
//! What qemu checks, this checks (granularity at most 0x200000 sectors, at most 32 Mi GD
//! entries, an offset past what the GD covers is an I/O error), and more, since qemu reads
//! past the end of a file as zeros where a damaged file would mislead: the GD, each GT and
//! each grain read must lie inside the file, and a granularity of 0 is refused (qemu divides
//! by it).

use crate::error::{Error, Result};
use crate::offsets::HostOffset;
use crate::storage::Storage;
use crate::vmdk::mapping::{Geometry, GrainLookup, Mapped, Mapping};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The magic at offset 0, in file order.
pub const MAGIC: &[u8; 4] = b"COWD";
/// Bytes of the header a reader looks at: magic and the 32-bit fields up to the GD size.
const HEADER_READ: usize = 32;
/// Grain table entries per grain table (fixed in this format; qemu's `l2_size` 4096).
pub const GTES_PER_GT: u64 = 4096;
/// Largest granularity qemu accepts, in sectors (`vmdk_add_extent`: 1 GiB grains).
pub const MAX_GRANULARITY: u64 = 0x20_0000;
/// Most grain directory entries qemu accepts (`vmdk_add_extent`'s "L1 size too big").
pub const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
const SECTOR: u64 = 512;
const GT_BYTES: usize = (GTES_PER_GT * 4) as usize;

/// An open vmfsSparse (COWD) extent.
pub struct CowdExtent {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    file_len: u64,
    /// Capacity in sectors (the header's, which qemu uses rather than the descriptor's).
    sectors: u64,
    grain_bytes: u64,
    gd_offset: u64,
    gd_entries: u64,
    /// The grain table last read: its GD index and its entries.
    cache: Mutex<Option<(u64, Arc<Vec<u32>>)>>,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl CowdExtent {
    /// Opens and checks the extent whose bytes `storage` holds (`path` names it in errors):
    /// the header as qemu's `vmdk_open_vmfs_sparse` reads it, and the grain directory's place
    /// in the file.
    pub fn open(storage: Arc<dyn Storage>, path: &Path) -> Result<Self> {
        let fail = |e: Error| e.with_path(path).while_opening();
        let file_len = storage
            .len()
            .map_err(|e| fail(Error::io("cannot get the extent's size", e)))?;
        // qemu's words (`vmdk_read_desc`); a longer but short header reads as zeros past the
        // end, as in qemu, and fails the checks below.
        if file_len < 4 {
            return Err(fail(Error::corrupt("File is too small, not a valid image")));
        }
        let mut h = [0u8; HEADER_READ];
        storage
            .read_at(&mut h, 0)
            .map_err(|e| fail(Error::io("Could not read header", e)))?;
        if &h[..4] != MAGIC {
            return Err(fail(Error::corrupt("Image not in VMDK format")));
        }
        let sectors = u64::from(le32(&h, 12));
        let granularity = u64::from(le32(&h, 16));
        let gd_sector = u64::from(le32(&h, 20));
        let gd_entries = u64::from(le32(&h, 24));
        if granularity == 0 || granularity > MAX_GRANULARITY {
            return Err(fail(Error::corrupt(format!(
                "Invalid granularity, image may be corrupt ({granularity} sectors)"
            ))));
        }
        if gd_entries > MAX_GD_ENTRIES {
            return Err(fail(Error::corrupt(format!(
                "L1 size too big ({gd_entries} grain directory entries)"
            ))));
        }
        let gd_offset = gd_sector * SECTOR;
        let gd_end = gd_offset + gd_entries * 4;
        if gd_end > file_len {
            return Err(fail(Error::corrupt(format!(
                "the grain directory (sector {gd_sector}, {gd_entries} entries) lies past the \
                 end of the file ({file_len} bytes)"
            ))));
        }
        Ok(CowdExtent {
            storage,
            path: path.to_path_buf(),
            file_len,
            sectors,
            grain_bytes: granularity * SECTOR,
            gd_offset,
            gd_entries,
            cache: Mutex::new(None),
        })
    }

    /// The extent's size in bytes (the header's capacity), for checking against the
    /// descriptor's extent line.
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// The grain size in bytes.
    pub fn grain_size(&self) -> u64 {
        self.grain_bytes
    }

    fn corrupt(&self, what: String, at: u64) -> Error {
        Error::corrupt(what).with_path(&self.path).at(at)
    }

    /// The grain table of GD entry `index`, `None` if there is none.
    fn grain_table(&self, index: u64) -> Result<Option<Arc<Vec<u32>>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((i, gt)) = cache.as_ref() {
            if *i == index {
                return Ok(Some(gt.clone()));
            }
        }
        let at = self.gd_offset + index * 4;
        let mut e = [0u8; 4];
        self.storage.read_at(&mut e, at).map_err(|e| {
            Error::io("Could not read a grain directory entry", e)
                .with_path(&self.path)
                .at(at)
        })?;
        let gt_sector = u64::from(u32::from_le_bytes(e));
        if gt_sector == 0 {
            return Ok(None);
        }
        let gt_at = gt_sector * SECTOR;
        if gt_at + GT_BYTES as u64 > self.file_len {
            return Err(self.corrupt(
                format!(
                    "grain directory entry {index} points at a grain table (sector \
                     {gt_sector}) past the end of the file ({} bytes)",
                    self.file_len
                ),
                at,
            ));
        }
        let mut raw = vec![0u8; GT_BYTES];
        self.storage.read_at(&mut raw, gt_at).map_err(|e| {
            Error::io("Could not read a grain table", e)
                .with_path(&self.path)
                .at(gt_at)
        })?;
        let gt = Arc::new(raw.chunks_exact(4).map(|c| le32(c, 0)).collect::<Vec<_>>());
        *cache = Some((index, gt.clone()));
        Ok(Some(gt))
    }

    /// Where the bytes at `offset` (bytes from the extent's start) live, for a run of at most
    /// `max_len` bytes: one grain, or several whose entries agree (all unallocated, or stored
    /// one after the other) within one grain table. qemu's `get_cluster_offset` for a
    /// VMDK3 extent. An offset past what the grain directory covers, or a grain past the end
    /// of the file, is an error.
    pub fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        let at = GrainLookup::new(
            &Geometry {
                path: &self.path,
                size: self.size(),
                grain: self.grain_bytes,
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
        let first = gt[slot];
        if first == 0 {
            slot += 1;
            while len < max_len && slot < gt.len() && gt[slot] == 0 {
                len = (len + self.grain_bytes).min(max_len);
                slot += 1;
            }
            return Ok(Mapped {
                len,
                mapping: Mapping::Unallocated,
            });
        }
        let host = u64::from(first) * SECTOR + in_grain;
        if host + len > self.file_len {
            return Err(self.corrupt(
                format!(
                    "grain at offset {offset} lies past the end of the file ({} bytes)",
                    self.file_len
                ),
                host,
            ));
        }
        slot += 1;
        while len < max_len && slot < gt.len() {
            let next = u64::from(gt[slot]) * SECTOR;
            let add = self.grain_bytes.min(max_len - len);
            if gt[slot] == 0 || next != host + len || next + add > self.file_len {
                break;
            }
            len += add;
            slot += 1;
        }
        Ok(Mapped {
            len,
            mapping: Mapping::Data(HostOffset(host)),
        })
    }
}

/// Fuzz entry (target `vmdk_cowd`): opens `data` as a COWD extent from memory, maps it from
/// start to end (a bounded number of runs) and reads what is mapped as data. Never panics.
pub fn exercise(data: &[u8]) {
    let storage: Arc<dyn Storage> = Arc::new(crate::storage::MemStorage::new(data.to_vec()));
    let Ok(extent) = CowdExtent::open(storage.clone(), Path::new("fuzz-delta.vmdk")) else {
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
            pos = (pos / extent.grain_size() + 1) * extent.grain_size();
            continue;
        };
        if let Mapping::Data(host) = m.mapping {
            let n = m.len.min(buf.len() as u64) as usize;
            let _ = storage.read_at(&mut buf[..n], host.get());
        }
        pos += m.len;
    }
}
