//! The on-disk structures of a VHDX file before its payload: the file identifier, the two
//! headers, the region table and the metadata region, parsed and checked as qemu's
//! `vhdx_open` checks them ([MS-VHDX] sections 2.2 and 2.6). All fields are little-endian;
//! GUIDs are kept as their 16 file bytes (Microsoft's mixed-endian layout).

use crate::error::{Error, Result};

/// Where the two headers are, and the bytes their checksum covers.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// The bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4 << 10;
/// Where the two copies of the region table are, and their size.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// The bytes a region table's checksum covers.
pub const REGION_TABLE_SIZE: usize = 64 << 10;
/// The end of the header section: no object but these lies before it.
pub const HEADER_SECTION_END: u64 = 1 << 20;
/// The metadata table (header and entries) at the start of the metadata region.
pub const METADATA_TABLE_SIZE: usize = 64 << 10;
/// Block sizes a VHDX may have (1 MiB to 256 MiB).
pub const BLOCK_SIZE_MIN: u64 = 1 << 20;
/// The largest block size.
pub const BLOCK_SIZE_MAX: u64 = 256 << 20;
/// Sectors a sector-bitmap block describes: the chunk ratio's numerator.
pub const MAX_SECTORS_PER_BLOCK: u64 = 1 << 23;
/// The largest disk qemu creates: 64 TiB.
pub const MAX_IMAGE_SIZE: u64 = 64 << 40;

/// A GUID as its 16 file bytes, from the usual `{d1-d2-d3-d4}` parts.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// The BAT region.
pub const BAT_GUID: [u8; 16] = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// The metadata region.
pub const METADATA_GUID: [u8; 16] = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
/// Metadata item: file parameters (block size, flags).
pub const FILE_PARAMETERS_GUID: [u8; 16] = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
/// Metadata item: virtual disk size.
pub const VIRTUAL_SIZE_GUID: [u8; 16] = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
/// Metadata item: SCSI page 83 data (a GUID naming the disk).
pub const PAGE83_GUID: [u8; 16] = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_GUID: [u8; 16] = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_GUID: [u8; 16] = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
/// Metadata item: parent locator (differencing disks).
pub const PARENT_LOCATOR_GUID: [u8; 16] = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

pub(crate) fn guid_at(b: &[u8], at: usize) -> [u8; 16] {
    b[at..at + 16].try_into().unwrap_or([0; 16])
}

const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C (Castagnoli) state: [`Crc32c::update`] over pieces, [`Crc32c::finish`] for the
/// checksum of their concatenation.
#[derive(Debug, Clone, Copy)]
pub struct Crc32c(u32);

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c(0xffff_ffff)
    }
}

impl Crc32c {
    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.0;
        for &b in data {
            c = CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    /// The checksum of everything added.
    pub fn finish(self) -> u32 {
        !self.0
    }
}

/// The CRC-32C of `b` with the four bytes at `field` taken as zeros (how every VHDX checksum
/// is computed).
pub fn checksum(b: &[u8], field: usize) -> u32 {
    let mut c = Crc32c::default();
    c.update(&b[..field]);
    c.update(&[0; 4]);
    c.update(&b[field + 4..]);
    c.finish()
}

/// Whether the checksum stored at `field` of `b` is right.
pub fn checksum_ok(b: &[u8], field: usize) -> bool {
    checksum(b, field) == le32(b, field)
}

/// Stores the checksum of `b` at `field`.
pub fn set_checksum(b: &mut [u8], field: usize) {
    let c = checksum(b, field);
    b[field..field + 4].copy_from_slice(&c.to_le_bytes());
}

/// One of the two headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which wins: the valid header with the higher number.
    pub sequence_number: u64,
    /// Changed on the first write to the file of every session.
    pub file_write_guid: [u8; 16],
    /// Changed on the first write to the guest data of every session.
    pub data_write_guid: [u8; 16],
    /// Non-zero when the log holds entries to replay.
    pub log_guid: [u8; 16],
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Length of the log in bytes (a multiple of 1 MiB).
    pub log_length: u32,
    /// Where the log is (a multiple of 1 MiB, past the header section).
    pub log_offset: u64,
}

impl Header {
    /// The header in `b` (its 4 KiB), if its signature, checksum and version are right.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || &b[..4] != b"head" || !checksum_ok(&b[..HEADER_SIZE], 4) {
            return None;
        }
        let h = Header {
            sequence_number: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        (h.version == 1).then_some(h)
    }

    /// The header's 4 KiB, checksummed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        set_checksum(&mut b, 4);
        b
    }
}

/// Chooses the current header of the two read at 64 KiB and 128 KiB, as qemu: the valid one,
/// or of two valid ones the one with the higher sequence number (two identical headers, as
/// Disk2VHD writes them, are fine). Returns its index.
pub fn current_header(h: &[Option<Header>; 2]) -> Result<usize> {
    let none = || Error::corrupt("No valid VHDX header found");
    match h {
        [Some(_), None] => Ok(0),
        [None, Some(_)] => Ok(1),
        [None, None] => Err(none()),
        [Some(a), Some(b)] => {
            if a.sequence_number > b.sequence_number || a == b {
                Ok(0)
            } else if b.sequence_number > a.sequence_number {
                Ok(1)
            } else {
                Err(none())
            }
        }
    }
}

/// A region table entry.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Where it is in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u32,
}

/// The BAT and metadata regions of a region table.
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    /// The block allocation table.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
}

/// Parses the region table `b` (64 KiB) as qemu: checksum, signature, at most 2047 entries,
/// no entry overlapping another or `log` (offset, length), the BAT and metadata regions each
/// exactly once, and no other region marked required.
pub fn parse_regions(b: &[u8], log: (u64, u64)) -> Result<Regions> {
    let bad = |what: &str| Error::corrupt(format!("invalid region table: {what}"));
    if b.len() < REGION_TABLE_SIZE || !checksum_ok(&b[..REGION_TABLE_SIZE], 4) {
        return Err(bad("checksum mismatch"));
    }
    if &b[..4] != b"regi" {
        return Err(bad("bad signature"));
    }
    let count = le32(b, 8);
    if count > 2047 {
        return Err(bad(&format!("{count} entries (at most 2047)")));
    }
    let mut seen: Vec<(u64, u64)> = vec![(log.0, log.0.saturating_add(log.1))];
    let (mut bat, mut metadata) = (None, None);
    for i in 0..count as usize {
        let e = 16 + i * 32;
        let id = guid_at(b, e);
        let offset = le64(b, e + 16);
        let length = le32(b, e + 24);
        let required = le32(b, e + 28) & 1 != 0;
        let end = offset.saturating_add(u64::from(length));
        if seen.iter().any(|&(s, t)| offset < t && end > s) {
            return Err(bad(&format!(
                "region {i} at offset {offset} ({length} bytes) overlaps another region or the log"
            )));
        }
        seen.push((offset, end));
        let r = Some(Region { offset, length });
        if id == BAT_GUID {
            if bat.is_some() {
                return Err(bad("two BAT regions"));
            }
            bat = r;
        } else if id == METADATA_GUID {
            if metadata.is_some() {
                return Err(bad("two metadata regions"));
            }
            metadata = r;
        } else if required {
            return Err(Error::unsupported(format!(
                "unsupported VHDX feature: region {i} is required and unknown"
            )));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(bad("no BAT or no metadata region")),
    }
}

/// The metadata items vimg reads.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// Payload block size in bytes.
    pub block_size: u32,
    /// Fixed disks leave their blocks allocated.
    pub leave_blocks_allocated: bool,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// SCSI page 83 GUID.
    pub page83: [u8; 16],
}

/// The location of one metadata item: offset from the metadata region's start, length.
type Item = (u32, u32);

/// Parses the metadata table `table` (the region's first 64 KiB) and reads each item through
/// `read_item` (offset from the region start, length), as qemu: signature, entry count within
/// the table, each known item at most once, unknown required items refused, all five required
/// items present; a disk with a parent (differencing) refused as qemu refuses it.
pub fn parse_metadata(
    table: &[u8],
    read_item: &mut dyn FnMut(u32, u32) -> Result<Vec<u8>>,
) -> Result<Metadata> {
    let bad = |what: String| Error::corrupt(format!("invalid metadata: {what}"));
    if table.len() < METADATA_TABLE_SIZE || &table[..8] != b"metadata" {
        return Err(bad("bad signature".into()));
    }
    let count = usize::from(le16(table, 10));
    if count * 32 > METADATA_TABLE_SIZE - 32 {
        return Err(bad(format!("{count} entries do not fit the table")));
    }
    let known = [
        FILE_PARAMETERS_GUID,
        VIRTUAL_SIZE_GUID,
        PAGE83_GUID,
        LOGICAL_SECTOR_GUID,
        PHYSICAL_SECTOR_GUID,
        PARENT_LOCATOR_GUID,
    ];
    let mut items: [Option<Item>; 6] = [None; 6];
    for i in 0..count {
        let e = 32 + i * 32;
        let id = guid_at(table, e);
        let item = (le32(table, e + 16), le32(table, e + 20));
        let required = le32(table, e + 24) & 4 != 0;
        match known.iter().position(|k| *k == id) {
            Some(k) if items[k].is_some() => {
                return Err(bad(format!("metadata item {i} appears twice")))
            }
            Some(k) => items[k] = Some(item),
            None if required => {
                return Err(Error::unsupported(format!(
                    "unsupported VHDX feature: metadata item {i} is required and unknown"
                )))
            }
            None => {}
        }
    }
    let mut get = |k: usize, need: u32, name: &str| -> Result<Vec<u8>> {
        let Some((off, len)) = items[k] else {
            return Err(Error::unsupported(format!(
                "the required metadata item '{name}' is missing"
            )));
        };
        if len < need {
            return Err(bad(format!(
                "the '{name}' item is {len} bytes long, not {need}"
            )));
        }
        read_item(off, need)
    };
    let params = get(0, 8, "file parameters")?;
    let size = get(1, 8, "virtual disk size")?;
    let page83 = get(2, 16, "page 83 data")?;
    let logical = get(3, 4, "logical sector size")?;
    let physical = get(4, 4, "physical sector size")?;
    let bits = le32(&params, 4);
    if bits & 2 != 0 {
        return Err(if items[5].is_some() {
            Error::unsupported("differencing VHDX images (with a parent) are not supported")
        } else {
            bad("the disk has a parent but no parent locator".into())
        });
    }
    let m = Metadata {
        block_size: le32(&params, 0),
        leave_blocks_allocated: bits & 1 != 0,
        virtual_size: le64(&size, 0),
        logical_sector_size: le32(&logical, 0),
        physical_sector_size: le32(&physical, 0),
        page83: guid_at(&page83, 0),
    };
    let bs = u64::from(m.block_size);
    if !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&bs) || !bs.is_power_of_two() {
        return Err(bad(format!("block size {bs}")));
    }
    if m.logical_sector_size != 512 && m.logical_sector_size != 4096 {
        return Err(bad(format!(
            "logical sector size {}",
            m.logical_sector_size
        )));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        let mut c = Crc32c::default();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.finish(), 0xe306_9283);
    }

    #[test]
    fn guids_are_stored_mixed_endian() {
        assert_eq!(
            BAT_GUID,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
    }

    #[test]
    fn headers_round_trip_and_the_newer_valid_one_wins() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b), Some(h.clone()));
        let newer = Header {
            sequence_number: 8,
            ..h.clone()
        };
        assert_eq!(current_header(&[Some(h.clone()), Some(newer)]).unwrap(), 1);
        b[100] ^= 1;
        assert_eq!(Header::parse(&b), None);
        let same_seq = Header {
            log_length: 2 << 20,
            ..h.clone()
        };
        assert!(current_header(&[Some(h), Some(same_seq)]).is_err());
    }
}
