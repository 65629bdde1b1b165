//! The block allocation table ([MS-VHDX] 2.5): one little-endian 64-bit entry per payload
//! block, a block state in its low 3 bits and the block's file offset in MiB in bits 20-63;
//! after every `chunk_ratio` payload entries comes the entry of a sector bitmap block (used by
//! differencing disks only). Loaded whole after its bounds are checked against the file, so
//! that its allocation is bounded by the file's size.

use super::layout::{le64, Metadata, MAX_SECTORS_PER_BLOCK};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::sync::RwLock;

/// Never written: reads as zeros.
pub const NOT_PRESENT: u64 = 0;
/// Contents undefined: qemu reads zeros.
pub const UNDEFINED: u64 = 1;
/// Reads as zeros.
pub const ZERO: u64 = 2;
/// Unmapped (discarded): qemu reads zeros.
pub const UNMAPPED: u64 = 3;
/// The unmapped state of the draft spec 0.95: qemu reads zeros.
pub const UNMAPPED_V095: u64 = 5;
/// The block is in the file.
pub const FULLY_PRESENT: u64 = 6;
/// Some sectors in the file, the rest in the parent (differencing disks).
pub const PARTIALLY_PRESENT: u64 = 7;
/// The state bits of an entry.
pub const STATE_MASK: u64 = 7;
/// The file offset bits of an entry.
pub const OFFSET_MASK: u64 = !((1 << 20) - 1);

/// The geometry of the table: how guest blocks map to entries.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Payload block size in bytes.
    pub block_size: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks of the disk.
    pub data_blocks: u64,
    /// Entries of the table (payload and sector bitmap).
    pub entries: u64,
}

impl Geometry {
    /// The geometry for a disk of `size` bytes in blocks of `block_size` with logical sectors
    /// of `logical_sector` bytes, as qemu counts entries (a sector bitmap entry after every
    /// chunk, but none after the last partial chunk).
    pub fn new(size: u64, block_size: u64, logical_sector: u64) -> Self {
        let chunk_ratio = MAX_SECTORS_PER_BLOCK * logical_sector / block_size;
        let data_blocks = size.div_ceil(block_size);
        let entries = match data_blocks {
            0 => 0,
            n => n + (n - 1) / chunk_ratio,
        };
        Geometry {
            block_size,
            chunk_ratio,
            data_blocks,
            entries,
        }
    }

    /// The entry of payload block `block`.
    pub fn index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }
}

/// The loaded table.
#[derive(Debug)]
pub struct Bat {
    /// The entries.
    pub entries: RwLock<Vec<u64>>,
    /// The geometry.
    pub geo: Geometry,
    /// Where the table is in the file.
    pub offset: u64,
}

impl Bat {
    /// Loads the table at `offset` (a region of `region_len` bytes) for `meta`, from a
    /// `file_len`-byte file. Checks that the region holds every entry (as qemu) and that the
    /// entries lie in the file.
    pub fn load(
        storage: &dyn Storage,
        meta: &Metadata,
        offset: u64,
        region_len: u32,
        file_len: u64,
    ) -> Result<Self> {
        let geo = Geometry::new(
            meta.virtual_size,
            u64::from(meta.block_size),
            u64::from(meta.logical_sector_size),
        );
        if geo.entries > u64::from(region_len) / 8 {
            return Err(Error::corrupt(format!(
                "the BAT region ({region_len} bytes) is too small for the {} entries of a {}-byte disk",
                geo.entries, meta.virtual_size
            )));
        }
        let bytes = geo.entries * 8;
        if offset.checked_add(bytes).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(format!(
                "the BAT at offset {offset} ({} entries) lies past the end of the file ({file_len} bytes)",
                geo.entries
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        storage
            .read_at(&mut raw, offset)
            .map_err(|e| Error::io("cannot read the BAT", e).at(offset))?;
        let entries = (0..geo.entries as usize)
            .map(|i| le64(&raw, i * 8))
            .collect();
        Ok(Bat {
            entries: RwLock::new(entries),
            geo,
            offset,
        })
    }

    /// The entry of payload block `block`.
    pub fn entry(&self, block: u64) -> u64 {
        let e = self.entries.read().unwrap_or_else(|e| e.into_inner());
        e.get(self.geo.index(block) as usize).copied().unwrap_or(0)
    }

    /// Checks the present blocks as qemu's `vhdx_check_bat_entries`: each lies in the file
    /// (`file_len` bytes; a disk of `disk_size` bytes may end in a partial block) and a payload
    /// block overlaps none of `regions` (the header section, the log, the BAT and metadata
    /// regions). Returns one message per problem, in qemu's words.
    pub fn problems(&self, disk_size: u64, file_len: u64, regions: &[(u64, u64)]) -> Vec<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (i, &e) in entries.iter().enumerate() {
            if e & STATE_MASK != FULLY_PRESENT {
                continue;
            }
            let i = i as u64;
            let payload = !(i + 1).is_multiple_of(self.geo.chunk_ratio + 1);
            let block = i - i / (self.geo.chunk_ratio + 1);
            let offset = e & OFFSET_MASK;
            let len = if payload {
                self.geo
                    .block_size
                    .min(disk_size.saturating_sub(block * self.geo.block_size))
            } else {
                1 << 20
            };
            if offset >= file_len {
                out.push(format!("VHDX BAT entry {i} start offset {offset} points after end of file ({file_len}). Image has probably been truncated."));
            } else if offset + len > file_len {
                out.push(format!(
                    "VHDX BAT entry {i} end offset {} points after end of file ({file_len}). Image has probably been truncated.",
                    offset + len - 1
                ));
            }
            let end = offset + self.geo.block_size;
            if payload && regions.iter().any(|&(s, t)| offset < t && end > s) {
                out.push(format!(
                    "VHDX BAT entry {i} at offset {offset} overlaps the image's metadata"
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_bitmap_entries_are_interleaved() {
        // 1 MiB blocks, 512-byte sectors: 4096 payload blocks per chunk.
        let g = Geometry::new(8 << 30, 1 << 20, 512);
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.index(4095), 4095);
        assert_eq!(g.index(4096), 4097);
        assert_eq!(g.entries, 8192 + 1);
        assert_eq!(Geometry::new(4 << 30, 1 << 20, 512).entries, 4096);
        assert_eq!(Geometry::new(0, 1 << 20, 512).entries, 0);
    }
}
