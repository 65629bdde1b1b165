//! The VHD footer (512 bytes: the last sector of every VHD file, and a copy at offset 0 of a
//! dynamic disk) and the dynamic disk header (1024 bytes, `cxsparse`), parsed and checked as
//! qemu's `vpc_open` checks them. All fields are big-endian.

use crate::error::{Error, Result};

/// The length of a footer.
pub const FOOTER_LEN: usize = 512;
/// The length of a dynamic disk header.
pub const DYN_HEADER_LEN: usize = 1024;
/// The largest disk qemu opens: 2040 GiB, in sectors (qemu's `VHD_MAX_SECTORS`).
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors per track): a disk with
/// it takes its size from `current_size` whatever its creator.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

/// The disk types of the footer's `disk_type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// The guest disk, then the footer.
    Fixed,
    /// A block allocation table mapping guest blocks to host blocks.
    Dynamic,
}

/// The fields of a footer vimg uses.
#[derive(Debug, Clone)]
pub struct Footer {
    /// Where the dynamic disk header is (dynamic disks).
    pub data_offset: u64,
    /// The creator application's four bytes (`qemu`, `qem2`, `win `, `vpc `, ...).
    pub creator_app: [u8; 4],
    /// `current_size`: the disk size in bytes as recorded.
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub chs: (u16, u8, u8),
    /// Fixed or dynamic.
    pub disk_type: DiskType,
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// The VHD checksum of `b` with the four bytes at `field` taken as zeros: the ones' complement
/// of the sum of the bytes.
pub fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &c)| s.wrapping_add(u32::from(c)));
    !sum
}

impl Footer {
    /// Parses and checks a footer (`b` is [`FOOTER_LEN`] bytes).
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < FOOTER_LEN || !b.starts_with(b"conectix") {
            return Err(Error::corrupt("invalid VPC image: no 'conectix' footer"));
        }
        if checksum(&b[..FOOTER_LEN], 64) != be32(b, 64) {
            return Err(Error::corrupt("Incorrect header checksum"));
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => {
                return Err(Error::unsupported(
                    "differencing VHD images are not supported",
                ))
            }
            t => return Err(Error::corrupt(format!("unknown VHD disk type {t}"))),
        };
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        Ok(Footer {
            data_offset: be64(b, 16),
            creator_app,
            current_size: be64(b, 48),
            chs: (be16(b, 56), b[58], b[59]),
            disk_type,
        })
    }

    /// The sectors of the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        u64::from(self.chs.0) * u64::from(self.chs.1) * u64::from(self.chs.2)
    }

    /// The disk size in bytes, as qemu decides it: Virtual PC and qemu's own `qemu` images
    /// are as large as their CHS geometry; Hyper-V (`win `), qemu's `qem2` (`force_size`),
    /// Disk2vhd (`d2v `), XenServer (`tap\0`) and XenConverter (`CTXS`) images, and any with the
    /// largest geometry, as `current_size` (rounded down to whole sectors). Fails above 2040
    /// GiB.
    pub fn disk_size(&self) -> Result<u64> {
        let by_size = matches!(
            &self.creator_app,
            b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
        );
        let chs = self.chs_sectors();
        let sectors = if by_size || chs == MAX_GEOMETRY_SECTORS {
            self.current_size / 512
        } else {
            chs
        };
        if sectors > MAX_SECTORS {
            return Err(Error::unsupported(
                "Disk size is too large; max size allowed: 2040 GiB",
            ));
        }
        Ok(sectors * 512)
    }
}

/// The fields of a dynamic disk header vimg uses.
#[derive(Debug, Clone)]
pub struct DynHeader {
    /// Where the block allocation table is.
    pub table_offset: u64,
    /// How many entries the table has.
    pub max_table_entries: u32,
    /// The size of a block (a power of two, at least 512).
    pub block_size: u32,
}

impl DynHeader {
    /// Parses and checks a dynamic disk header (`b` is [`DYN_HEADER_LEN`] bytes).
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < DYN_HEADER_LEN || !b.starts_with(b"cxsparse") {
            return Err(Error::corrupt(
                "invalid VPC image: no 'cxsparse' dynamic disk header",
            ));
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(Error::corrupt(format!("Invalid block size {block_size}")));
        }
        Ok(DynHeader {
            table_offset: be64(b, 16),
            max_table_entries: be32(b, 28),
            block_size,
        })
    }

    /// The size of a block's sector bitmap: a bit per sector, in whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        (u64::from(self.block_size) / (8 * 512)).next_multiple_of(512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer(app: &[u8; 4], chs: (u16, u8, u8), size: u64) -> Vec<u8> {
        let mut b = vec![0u8; FOOTER_LEN];
        b[..8].copy_from_slice(b"conectix");
        b[28..32].copy_from_slice(app);
        b[48..56].copy_from_slice(&size.to_be_bytes());
        b[56..58].copy_from_slice(&chs.0.to_be_bytes());
        b[58] = chs.1;
        b[59] = chs.2;
        b[60..64].copy_from_slice(&2u32.to_be_bytes());
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn size_follows_the_creator_app() {
        let chs = (100, 16, 63);
        let f = Footer::parse(&footer(b"qemu", chs, 1 << 30)).unwrap();
        assert_eq!(f.disk_size().unwrap(), 100 * 16 * 63 * 512);
        let f = Footer::parse(&footer(b"win ", chs, (1 << 30) + 100)).unwrap();
        assert_eq!(f.disk_size().unwrap(), 1 << 30);
        let f = Footer::parse(&footer(b"vpc ", (65535, 16, 255), 1 << 40)).unwrap();
        assert_eq!(f.disk_size().unwrap(), 1 << 40);
        let f = Footer::parse(&footer(b"win ", chs, 1 << 42)).unwrap();
        assert!(f.disk_size().is_err());
    }

    #[test]
    fn a_bad_checksum_is_refused() {
        let mut b = footer(b"qemu", (1, 4, 17), 0);
        b[100] ^= 1;
        assert!(Footer::parse(&b).is_err());
    }
}
