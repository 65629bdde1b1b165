//! The VDI header (the first 512 bytes of the file) and the checks qemu's `vdi_open` makes of
//! it, in qemu's order and words; plus the bounds vimg adds so that a hostile header can neither
//! make it allocate more than the file holds nor read outside the file.

use crate::error::{Error, Result};

/// The VDI signature, little-endian at byte 64.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the only one qemu reads (major in the high 16 bits).
pub const VERSION_1_1: u32 = 0x0001_0001;
/// The sector size every VDI image qemu reads has.
pub const SECTOR: u64 = 512;
/// The block size every VDI image qemu reads has (1 MiB).
pub const BLOCK_SIZE: u64 = 1 << 20;
/// A block map entry for a block never written: reads as zeros.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// A block map entry for a discarded block: reads as zeros.
pub const DISCARDED: u32 = 0xffff_fffe;
/// The most blocks qemu accepts: its block map, rounded up to whole sectors, must fit in
/// `INT_MAX` bytes (0x1fffff80 entries).
pub const BLOCKS_IN_IMAGE_MAX: u32 = ((1u32 << 31) - SECTOR as u32) / 4;
/// The largest disk qemu accepts.
pub const DISK_SIZE_MAX: u64 = BLOCKS_IN_IMAGE_MAX as u64 * BLOCK_SIZE;
/// Image type of a dynamic (growing) image.
pub const TYPE_DYNAMIC: u32 = 1;
/// Image type of a static (preallocated) image.
pub const TYPE_STATIC: u32 = 2;

/// The header fields vimg uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1 dynamic, 2 static (other values are read like dynamic images, as qemu does).
    pub image_type: u32,
    /// Where the block map starts in the file.
    pub offset_bmap: u32,
    /// Where block 0 of the data area starts in the file.
    pub offset_data: u32,
    /// The disk size, rounded up to whole sectors as qemu rounds it.
    pub disk_size: u64,
    /// Entries in the block map.
    pub blocks_in_image: u32,
    /// Blocks allocated in the data area.
    pub blocks_allocated: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Whether `head` (the file's first bytes) carries the VDI signature.
    pub fn probe(head: &[u8]) -> bool {
        head.len() >= 68 && le32(head, 64) == SIGNATURE
    }

    /// Parses and checks the header sector `b` (shorter input is taken as padded with zeros).
    pub fn parse(b: &[u8]) -> Result<Header> {
        let mut s = [0u8; SECTOR as usize];
        let n = b.len().min(s.len());
        s[..n].copy_from_slice(&b[..n]);
        let b = &s[..];
        let signature = le32(b, 64);
        let version = le32(b, 68);
        let image_type = le32(b, 76);
        let offset_bmap = le32(b, 340);
        let offset_data = le32(b, 344);
        let sector_size = le32(b, 360);
        let mut disk_size = le64(b, 368);
        let block_size = le32(b, 376);
        let blocks_in_image = le32(b, 384);
        let blocks_allocated = le32(b, 388);
        let uuid_link = &b[424..440];
        let uuid_parent = &b[440..456];

        let unsupported =
            |m: String| Err(Error::unsupported(format!("unsupported VDI image ({m})")));
        if disk_size > DISK_SIZE_MAX {
            return Err(Error::unsupported(format!(
                "Unsupported VDI image size (size is {disk_size:#x}, max supported is {DISK_SIZE_MAX:#x})"
            )));
        }
        // Images with a size that is no whole number of sectors are read rounded up.
        disk_size = disk_size.next_multiple_of(SECTOR);
        if signature != SIGNATURE {
            return Err(Error::invalid_input(format!(
                "Image not in VDI format (bad signature {signature:08x})"
            )));
        }
        if version != VERSION_1_1 {
            return unsupported(format!("version {}.{}", version >> 16, version & 0xffff));
        }
        if u64::from(offset_bmap) % SECTOR != 0 {
            return unsupported(format!("unaligned block map offset {offset_bmap:#x}"));
        }
        if u64::from(offset_data) % SECTOR != 0 {
            return unsupported(format!("unaligned data offset {offset_data:#x}"));
        }
        if u64::from(sector_size) != SECTOR {
            return unsupported(format!("sector size {sector_size} is not {SECTOR}"));
        }
        if u64::from(block_size) != BLOCK_SIZE {
            return unsupported(format!("block size {block_size} is not {BLOCK_SIZE}"));
        }
        let room = u64::from(blocks_in_image) * BLOCK_SIZE;
        if disk_size > room {
            return unsupported(format!(
                "disk size {disk_size}, image bitmap has room for {room}"
            ));
        }
        if uuid_link.iter().any(|&x| x != 0) {
            return unsupported("non-NULL link UUID".into());
        }
        if uuid_parent.iter().any(|&x| x != 0) {
            return unsupported("non-NULL parent UUID".into());
        }
        if blocks_in_image > BLOCKS_IN_IMAGE_MAX {
            return unsupported(format!(
                "too many blocks {blocks_in_image}, max is {BLOCKS_IN_IMAGE_MAX}"
            ));
        }
        Ok(Header {
            image_type,
            offset_bmap,
            offset_data,
            disk_size,
            blocks_in_image,
            blocks_allocated,
        })
    }

    /// The block map's length in bytes, in whole sectors as qemu reads it.
    pub fn bmap_len(&self) -> u64 {
        (u64::from(self.blocks_in_image) * 4).next_multiple_of(SECTOR)
    }

    /// Whether the image is static (preallocated).
    pub fn is_static(&self) -> bool {
        self.image_type == TYPE_STATIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[64..68].copy_from_slice(&SIGNATURE.to_le_bytes());
        b[68..72].copy_from_slice(&VERSION_1_1.to_le_bytes());
        b[76..80].copy_from_slice(&TYPE_DYNAMIC.to_le_bytes());
        b[340..344].copy_from_slice(&512u32.to_le_bytes());
        b[344..348].copy_from_slice(&1024u32.to_le_bytes());
        b[360..364].copy_from_slice(&512u32.to_le_bytes());
        b[368..376].copy_from_slice(&(3u64 << 20).to_le_bytes());
        b[376..380].copy_from_slice(&(1u32 << 20).to_le_bytes());
        b[384..388].copy_from_slice(&3u32.to_le_bytes());
        b
    }

    #[test]
    fn checks_in_qemus_order_and_words() {
        assert_eq!(Header::parse(&good()).unwrap().disk_size, 3 << 20);
        let bad = |at: usize, v: &[u8]| {
            let mut b = good();
            b[at..at + v.len()].copy_from_slice(v);
            Header::parse(&b).unwrap_err().to_string()
        };
        assert!(bad(64, &[0; 4]).contains("bad signature 00000000"));
        assert!(bad(68, &0x0001_0000u32.to_le_bytes()).contains("(version 1.0)"));
        assert!(bad(340, &100u32.to_le_bytes()).contains("unaligned block map offset 0x64"));
        assert!(bad(344, &100u32.to_le_bytes()).contains("unaligned data offset 0x64"));
        assert!(bad(360, &4096u32.to_le_bytes()).contains("sector size 4096 is not 512"));
        assert!(bad(376, &4096u32.to_le_bytes()).contains("block size 4096 is not 1048576"));
        assert!(bad(384, &2u32.to_le_bytes()).contains("image bitmap has room for 2097152"));
        assert!(bad(430, &[1]).contains("non-NULL link UUID"));
        assert!(bad(450, &[1]).contains("non-NULL parent UUID"));
        assert!(bad(368, &u64::MAX.to_le_bytes()).contains("Unsupported VDI image size"));
        // An odd size is rounded up to a whole sector.
        let mut b = good();
        b[368..376].copy_from_slice(&1000u64.to_le_bytes());
        assert_eq!(Header::parse(&b).unwrap().disk_size, 1024);
    }
}
