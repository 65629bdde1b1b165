//! The header of a hosted sparse extent (VMware's "Virtual Disk Format 5.0", `SparseExtentHeader`;
//! qemu's `VMDK4Header`): the `KDMV` magic then little-endian fields, in the first sector of
//! the extent file, and for a stream-optimized extent whose header says so, again in a footer
//! near the end of the file.

use crate::error::{Error, Result};

/// The magic a hosted sparse extent starts with.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// The magic of an ESX vmfsSparse (`COWD`) extent.
pub const COWD_MAGIC: &[u8; 4] = b"COWD";
/// Bytes of the header sector.
pub const HEADER_LEN: usize = 512;
/// Line-ending detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// A redundant grain directory (and grain tables) follows the primary ones.
pub const FLAG_RGD: u32 = 1 << 1;
/// Grain table entry 1 means "reads as zeros" (zeroed-grain GTEs).
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Grains are compressed.
pub const FLAG_COMPRESS: u32 = 1 << 16;
/// Grains and metadata are preceded by markers.
pub const FLAG_MARKER: u32 = 1 << 17;
/// `compressAlgorithm` of deflate (a zlib stream).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// `gdOffset` saying the grain directory's place is in the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// Grain-table entry of a zeroed grain (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;
/// The grain table entries per grain table qemu and VMware write.
pub const GTES_PER_GT: u32 = 512;
/// The metadata marker types of a stream-optimized extent.
pub const MARKER_EOS: u32 = 0;
/// A grain table follows.
pub const MARKER_GT: u32 = 1;
/// A grain directory follows.
pub const MARKER_GD: u32 = 2;
/// The footer follows.
pub const MARKER_FOOTER: u32 = 3;

/// A hosted sparse extent header (sizes and offsets in 512-byte sectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SparseHeader {
    /// 1, 2 (zeroed grains) or 3 (stream-optimized, or changed-block tracking).
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Sectors of guest data the extent holds.
    pub capacity: u64,
    /// Sectors per grain.
    pub granularity: u64,
    /// Sector of the embedded descriptor (0: none).
    pub desc_offset: u64,
    /// Sectors of the embedded descriptor.
    pub desc_size: u64,
    /// Entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// Sector of the grain directory (or [`GD_AT_END`]).
    pub gd_offset: u64,
    /// Sector where grains start (the metadata before it).
    pub grain_offset: u64,
    /// The four line-ending detection bytes.
    pub check_bytes: [u8; 4],
    /// [`COMPRESSION_DEFLATE`] or 0.
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

impl SparseHeader {
    /// Parses the header sector `b` (starting with the magic, which the caller checked).
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            granularity: u64_at(b, 20),
            desc_offset: u64_at(b, 28),
            desc_size: u64_at(b, 36),
            num_gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            grain_offset: u64_at(b, 64),
            check_bytes: [b[73], b[74], b[75], b[76]],
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        }
    }

    /// The header sector, magic included.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.grain_offset.to_le_bytes());
        b[73..77].copy_from_slice(&self.check_bytes);
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Whether grains are deflate-compressed (qemu looks only at `compressAlgorithm`).
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }

    /// The stream-optimized footer (1536 bytes before the end of a file whose header has
    /// `gdOffset` [`GD_AT_END`]): a footer marker, the footer header, the end-of-stream
    /// marker. Returns the footer's header, checked as qemu checks it.
    pub fn from_footer(b: &[u8; 1536]) -> Result<Self> {
        let marker_ok = u32_at(b, 8) == 0 && u32_at(b, 12) == MARKER_FOOTER;
        let eos = &b[1024..];
        let eos_ok = u64_at(eos, 0) == 0 && u32_at(eos, 8) == 0 && u32_at(eos, 12) == MARKER_EOS;
        if &b[512..516] != MAGIC || !marker_ok || !eos_ok {
            return Err(Error::corrupt("Invalid footer"));
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&b[512..1024]);
        Ok(Self::parse(&h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = SparseHeader {
            version: 3,
            flags: FLAG_RGD | FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER,
            capacity: 2048,
            granularity: 128,
            desc_offset: 1,
            desc_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 26,
            grain_offset: 128,
            check_bytes: [b'\n', b' ', b'\r', b'\n'],
            compress_algorithm: 1,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..4], MAGIC);
        assert_eq!(SparseHeader::parse(&b), h);
        assert!(h.compressed());
    }
}
