//! The block allocation table of a dynamic VHD: one big-endian 32-bit entry per block, the
//! sector where the block's sector bitmap starts (the block's data follows the bitmap), or
//! `0xffffffff` for a block never written. Loaded whole, after its bounds are checked against
//! the file (so the allocation is bounded by the file's size).

use super::footer::{be32, DynHeader};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::sync::{Mutex, RwLock};

/// A BAT entry for a block that is not allocated.
pub const UNALLOCATED: u32 = 0xffff_ffff;

/// The loaded table and the geometry of its blocks.
#[derive(Debug)]
pub struct Bat {
    /// The entries.
    pub entries: RwLock<Vec<u32>>,
    /// Where the table is in the file.
    pub table_offset: u64,
    /// Where the next block goes (where the footer is): past the table and every block.
    pub next_free: Mutex<u64>,
    /// Block size in bytes.
    pub block_size: u64,
    /// Bytes of sector bitmap before each block's data.
    pub bitmap_size: u64,
}

impl Bat {
    /// Loads the table `header` describes from `storage` (`file_len` bytes long) for a disk of
    /// `disk_size` bytes, checking what qemu checks (the table covers the disk, has at most
    /// as many entries as the largest disk needs, and every block lies inside the file) and that
    /// the table itself lies inside the file.
    pub fn load(
        storage: &dyn Storage,
        header: &DynHeader,
        disk_size: u64,
        file_len: u64,
    ) -> Result<Self> {
        let block_size = u64::from(header.block_size);
        let n = u64::from(header.max_table_entries);
        // qemu's own bound first, in its words (vpc_open).
        if n > (i32::MAX / 4) as u64 {
            return Err(Error::corrupt(format!("Max Table Entries too large ({n})")));
        }
        if n > super::footer::MAX_SECTORS * 512 / block_size {
            return Err(Error::corrupt(format!(
                "block allocation table has too many entries ({n})"
            )));
        }
        if n * block_size < disk_size {
            return Err(Error::corrupt(format!(
                "Page table too small: {n} blocks of {block_size} bytes cannot hold the {disk_size}-byte disk"
            )));
        }
        let table_end = header.table_offset.checked_add(n * 4);
        if table_end.is_none_or(|end| end > file_len) {
            return Err(Error::corrupt(format!(
                "block allocation table at offset {} ({n} entries) lies past the end of the file ({file_len} bytes)",
                header.table_offset
            )));
        }
        let mut raw = vec![0u8; (n * 4) as usize];
        storage
            .read_at(&mut raw, header.table_offset)
            .map_err(|e| Error::io("cannot read the block allocation table", e))?;
        let entries: Vec<u32> = (0..n as usize).map(|i| be32(&raw, i * 4)).collect();
        let bitmap_size = header.bitmap_size();
        let mut next_free = (header.table_offset + n * 4).next_multiple_of(512);
        for (i, &e) in entries.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let end = 512 * u64::from(e) + bitmap_size + block_size;
            if end > file_len {
                return Err(Error::corrupt(format!(
                    "block {i} (at offset {}) lies past the end of the file ({file_len} bytes); the image has been truncated",
                    512 * u64::from(e)
                )));
            }
            next_free = next_free.max(end);
        }
        Ok(Bat {
            entries: RwLock::new(entries),
            table_offset: header.table_offset,
            next_free: Mutex::new(next_free),
            block_size,
            bitmap_size,
        })
    }

    /// Where the data of guest offset `offset` is in the file, if its block is allocated.
    pub fn host_offset(&self, offset: u64) -> Option<u64> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let e = *entries.get((offset / self.block_size) as usize)?;
        (e != UNALLOCATED).then(|| 512 * u64::from(e) + self.bitmap_size + offset % self.block_size)
    }
}
