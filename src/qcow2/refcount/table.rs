//! Refcount tables and blocks (qcow2.rst "Cluster refcounts"): reading a host cluster's
//! refcount.
//!
//! qcow2 keeps one reference count per host cluster of the image file, in a two-level
//! structure: the refcount table (header fields `refcount_table_offset` and
//! `refcount_table_clusters`) holds the offsets of refcount blocks, and each refcount block is
//! one cluster of `refcount_bits`-wide entries. For host cluster `n`:
//!
//! ```text
//! entries_per_block = cluster_size * 8 / refcount_bits
//! table index       = n / entries_per_block
//! block index       = n % entries_per_block
//! ```
//!
//! A refcount table entry of 0, or an index past the end of the table, means every cluster it
//! would cover has refcount 0.
//!
//! Everything read from the file is validated before it is used; see [`Strictness`] for the
//! two ways a malformed table entry can be treated.

use crate::error::{Error, Result};
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};

/// Refcount table entry bits 9-63: the host offset of a refcount block
/// (qcow2.rst "Cluster refcounts", refcount table entry).
pub(crate) const REFT_OFFSET_MASK: u64 = !0x1ff;
/// Refcount table entry bits 0-8, reserved (must be zero).
pub(crate) const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Largest `refcount_order` qcow2 allows: 64-bit refcounts (qcow2.rst "Header", byte 96).
pub(crate) const MAX_REFCOUNT_ORDER: u32 = 6;

/// How a refcount lookup treats refcount table entries that break the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strictness {
    /// Every defect is an error: reserved bits set, a block offset that is not
    /// cluster-aligned, or a block that does not lie entirely inside the image file.
    Strict,
    /// What `qemu-img check` does when it reads stored refcounts: reserved bits are ignored,
    /// a block that lies (partly) past the end of the file reads as zeros, and only a block
    /// offset that is not cluster-aligned is an error.
    Lenient,
}

/// The refcount table of an image (qcow2.rst "Cluster refcounts"): the raw 64-bit entries,
/// plus the geometry needed to find a cluster's refcount.
#[derive(Debug, Clone)]
pub(crate) struct RefcountTable {
    entries: Vec<u64>,
    cluster_bits: u32,
    refcount_order: u32,
    file_len: u64,
}

impl RefcountTable {
    /// Reads the refcount table of `img` (`refcount_table_clusters` clusters at
    /// `refcount_table_offset`, qcow2.rst "Header" bytes 48-59), checking that it lies inside
    /// the image file. The header parser already bounds its size (8 MiB, as qemu).
    pub(crate) fn read(img: &Qcow2Image) -> Result<Self> {
        let h = img.header();
        let bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits;
        let off = h.refcount_table_offset;
        if bytes > crate::qcow2::format::header::MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(format!(
                "refcount table of {bytes} bytes exceeds the 8 MiB limit"
            ))
            .at(off));
        }
        if !off.is_multiple_of(h.cluster_size()) {
            return Err(Error::corrupt(format!(
                "refcount table offset {off:#x} is not cluster-aligned"
            ))
            .at(off));
        }
        if off.checked_add(bytes).is_none_or(|e| e > img.file_len()) {
            return Err(Error::corrupt(format!(
                "refcount table at {off:#x} ({bytes} bytes) lies beyond the end of the file ({} bytes)",
                img.file_len()
            ))
            .at(off));
        }
        let mut raw = vec![0u8; bytes as usize];
        img.storage()
            .read_at(&mut raw, off)
            .map_err(|e| Error::io("cannot read refcount table", e).at(off))?;
        Ok(Self::from_entries(
            raw.chunks_exact(8).map(BigEndian::read_u64).collect(),
            h.cluster_bits,
            h.refcount_order,
            img.file_len(),
        ))
    }

    /// A table made of `entries` for an image with clusters of `1 << cluster_bits` bytes,
    /// refcounts of `1 << refcount_order` bits (clamped to 64) and a file of `file_len` bytes.
    pub(crate) fn from_entries(
        entries: Vec<u64>,
        cluster_bits: u32,
        refcount_order: u32,
        file_len: u64,
    ) -> Self {
        RefcountTable {
            entries,
            cluster_bits,
            refcount_order: refcount_order.min(MAX_REFCOUNT_ORDER),
            file_len,
        }
    }

    /// The raw table entries, reserved bits included.
    pub(crate) fn entries(&self) -> &[u64] {
        &self.entries
    }

    /// Number of entries in the table.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Cluster size in bytes.
    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the number of refcounts in one refcount block
    /// (`cluster_bits + 3 - refcount_order`).
    pub(crate) fn block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    /// Number of refcounts one refcount block holds (`cluster_size * 8 / refcount_bits`).
    pub(crate) fn entries_per_block(&self) -> u64 {
        1 << self.block_bits()
    }

    /// Number of host clusters the table can describe (entries × refcounts per block),
    /// saturating.
    #[cfg(test)]
    pub(crate) fn covered_clusters(&self) -> u64 {
        (self.entries.len() as u64).saturating_mul(self.entries_per_block())
    }

    /// Where host cluster `cluster`'s refcount lives: (refcount table index, index inside
    /// the refcount block).
    pub(crate) fn locate(&self, cluster: u64) -> (u64, u64) {
        (
            cluster >> self.block_bits(),
            cluster & (self.entries_per_block() - 1),
        )
    }

    /// The host offset of refcount block `index` (`None`: not allocated, or `index` past the
    /// end of the table, so every refcount it covers is 0), validated as `strictness` says.
    pub(crate) fn block_offset(&self, index: u64, strictness: Strictness) -> Result<Option<u64>> {
        let Some(&entry) = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
        else {
            return Ok(None);
        };
        if strictness == Strictness::Strict && entry & REFT_RESERVED_MASK != 0 {
            return Err(Error::corrupt(format!(
                "refcount table entry {index} ({entry:#x}) has reserved bits set"
            )));
        }
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cluster_size()) {
            return Err(Error::corrupt(format!(
                "refcount block {index} offset {off:#x} is not cluster-aligned"
            ))
            .at(off));
        }
        if strictness == Strictness::Strict
            && off
                .checked_add(self.cluster_size())
                .is_none_or(|e| e > self.file_len)
        {
            return Err(Error::corrupt(format!(
                "refcount block {index} at {off:#x} lies beyond the end of the file ({} bytes)",
                self.file_len
            ))
            .at(off));
        }
        Ok(Some(off))
    }
}

/// Largest refcount an entry of `1 << refcount_order` bits can hold.
pub(crate) fn max_refcount(refcount_order: u32) -> u64 {
    let bits = 1u32 << refcount_order.min(MAX_REFCOUNT_ORDER);
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// The refcount of host cluster `cluster` after `more` references are added to its
/// `current` refcount, or an error when the result does not fit an entry of
/// `1 << refcount_order` bits. Every refcount increase goes through here, so that a refcount
/// at the width's maximum (2^64-1 included) never wraps: qemu refuses such an update with
/// EINVAL ("Invalid argument"), and callers refuse before they change anything.
pub(crate) fn increased(cluster: u64, current: u64, more: u64, refcount_order: u32) -> Result<u64> {
    let max = max_refcount(refcount_order);
    match current.checked_add(more) {
        Some(r) if r <= max => Ok(r),
        _ => Err(Error::new(
            crate::error::ErrorKind::InvalidInput,
            format!(
                "Invalid argument: the refcount of host cluster {cluster} ({current}) cannot \
                 take {more} more reference{}: {max} is the largest {}-bit refcount",
                if more == 1 { "" } else { "s" },
                1u32 << refcount_order.min(MAX_REFCOUNT_ORDER)
            ),
        )),
    }
}

/// Entry `index` of a refcount block `block` whose entries are `1 << refcount_order` bits wide
/// (qcow2.rst "Cluster refcounts": entries narrower than a byte are packed starting at the
/// least significant bit of each byte; entries of a byte or more are big-endian).
///
/// Returns 0 for an index outside the block (callers pass whole blocks, so this only guards
/// against misuse).
pub(crate) fn get_refcount(block: &[u8], index: u64, refcount_order: u32) -> u64 {
    let order = refcount_order.min(MAX_REFCOUNT_ORDER);
    let bits = 1u64 << order;
    let Some(bit) = index.checked_mul(bits) else {
        return 0;
    };
    let byte = (bit / 8) as usize;
    if bits < 8 {
        let Some(&b) = block.get(byte) else {
            return 0;
        };
        u64::from((b >> (bit % 8)) & ((1u8 << bits) - 1))
    } else {
        let n = (bits / 8) as usize;
        match block.get(byte..byte + n) {
            Some(s) => s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
            None => 0,
        }
    }
}

/// Stores `value` (truncated to the entry width) as entry `index` of refcount block `block`
/// with entries `1 << refcount_order` bits wide, packed as [`get_refcount`] reads them. An
/// index outside the block is ignored.
pub(crate) fn set_refcount(block: &mut [u8], index: u64, refcount_order: u32, value: u64) {
    let order = refcount_order.min(MAX_REFCOUNT_ORDER);
    let bits = 1u64 << order;
    let Some(bit) = index.checked_mul(bits) else {
        return;
    };
    let byte = (bit / 8) as usize;
    if bits < 8 {
        let Some(b) = block.get_mut(byte) else {
            return;
        };
        let shift = bit % 8;
        let mask = ((1u8 << bits) - 1) << shift;
        *b = (*b & !mask) | (((value as u8) << shift) & mask);
    } else {
        let n = (bits / 8) as usize;
        if let Some(s) = block.get_mut(byte..byte + n) {
            for (i, b) in s.iter_mut().enumerate() {
                *b = (value >> (8 * (n - 1 - i))) as u8;
            }
        }
    }
}

/// Reads `buf.len()` bytes at `offset` of `img`'s file; whatever lies past the end of the
/// file reads as zeros (as qemu's reads do), and nothing is read from past it.
pub(crate) fn read_padded(img: &Qcow2Image, buf: &mut [u8], offset: u64) -> Result<()> {
    let avail = img.file_len().saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[avail..].fill(0);
    if avail > 0 {
        img.storage()
            .read_at(&mut buf[..avail], offset)
            .map_err(|e| Error::io("read failed", e).at(offset))?;
    }
    Ok(())
}

/// Looks up stored refcounts of host clusters, keeping the last refcount block read so that
/// walking clusters in order reads each block once.
pub(crate) struct RefcountReader<'a> {
    img: &'a Qcow2Image,
    table: &'a RefcountTable,
    strictness: Strictness,
    block: Option<(u64, Vec<u8>)>,
}

impl<'a> RefcountReader<'a> {
    /// A reader of `img`'s refcounts through `table`, treating defects as `strictness` says.
    pub(crate) fn new(
        img: &'a Qcow2Image,
        table: &'a RefcountTable,
        strictness: Strictness,
    ) -> Self {
        RefcountReader {
            img,
            table,
            strictness,
            block: None,
        }
    }

    /// The stored refcount of host cluster `cluster` (the cluster at byte offset
    /// `cluster * cluster_size` of the image file).
    pub(crate) fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let (index, entry) = self.table.locate(cluster);
        let Some(off) = self.table.block_offset(index, self.strictness)? else {
            return Ok(0);
        };
        if self.block.as_ref().is_none_or(|(o, _)| *o != off) {
            let mut raw = vec![0u8; self.table.cluster_size() as usize];
            read_padded(self.img, &mut raw, off)?;
            self.block = Some((off, raw));
        }
        let (_, raw) = self.block.as_ref().expect("block was just loaded");
        Ok(get_refcount(raw, entry, self.table.refcount_order))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs `values` into a block the way qcow2.rst describes, independently of
    /// `set_refcount`: bit `i * bits + k` of the block (LSB-first within each byte) is bit `k`
    /// of value `i` for sub-byte widths; wider values are big-endian byte strings.
    fn pack(values: &[u64], order: u32) -> Vec<u8> {
        let bits = 1usize << order;
        let mut out = vec![0u8; (values.len() * bits).div_ceil(8)];
        for (i, &v) in values.iter().enumerate() {
            if bits < 8 {
                for k in 0..bits {
                    if v >> k & 1 != 0 {
                        let bit = i * bits + k;
                        out[bit / 8] |= 1 << (bit % 8);
                    }
                }
            } else {
                let n = bits / 8;
                let be = v.to_be_bytes();
                out[i * n..(i + 1) * n].copy_from_slice(&be[8 - n..]);
            }
        }
        out
    }

    fn sample(order: u32) -> Vec<u64> {
        let max = max_refcount(order);
        (0..64u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(i as u32) & max)
            .chain([0, max, 1, max - 1])
            .collect()
    }

    fn roundtrip(order: u32) {
        let values = sample(order);
        let packed = pack(&values, order);
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(
                get_refcount(&packed, i as u64, order),
                v,
                "order {order} entry {i}"
            );
        }
        let mut block = vec![0u8; packed.len()];
        for (i, &v) in values.iter().enumerate() {
            set_refcount(&mut block, i as u64, order, v);
        }
        assert_eq!(block, packed, "order {order}");
        // Out-of-range indices are harmless.
        assert_eq!(get_refcount(&packed, values.len() as u64 * 64, order), 0);
        set_refcount(&mut block, u64::MAX, order, 1);
        assert_eq!(block, packed);
    }

    #[test]
    fn width_1() {
        roundtrip(0);
        // LSB first: entries 0 and 3 set -> 0b0000_1001.
        assert_eq!(get_refcount(&[0b0000_1001], 0, 0), 1);
        assert_eq!(get_refcount(&[0b0000_1001], 1, 0), 0);
        assert_eq!(get_refcount(&[0b0000_1001], 3, 0), 1);
        assert_eq!(get_refcount(&[0x00, 0x80], 15, 0), 1);
    }

    #[test]
    fn width_2() {
        roundtrip(1);
        // 0b11_10_01_00: entries 0..4 are 0, 1, 2, 3.
        for i in 0..4 {
            assert_eq!(get_refcount(&[0b1110_0100], i, 1), i);
        }
    }

    #[test]
    fn width_4() {
        roundtrip(2);
        assert_eq!(get_refcount(&[0xa5], 0, 2), 0x5);
        assert_eq!(get_refcount(&[0xa5], 1, 2), 0xa);
    }

    #[test]
    fn width_8() {
        roundtrip(3);
        assert_eq!(get_refcount(&[7, 200], 1, 3), 200);
    }

    #[test]
    fn width_16() {
        roundtrip(4);
        assert_eq!(get_refcount(&[0, 1, 0x12, 0x34], 1, 4), 0x1234);
    }

    #[test]
    fn width_32() {
        roundtrip(5);
        assert_eq!(get_refcount(&[0, 0, 0, 0, 1, 2, 3, 4], 1, 5), 0x0102_0304);
    }

    #[test]
    fn width_64() {
        roundtrip(6);
        let b = [0xffu8, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(get_refcount(&b, 0, 6), 0xff00_0000_0000_0001);
        assert_eq!(max_refcount(6), u64::MAX);
    }

    #[test]
    fn increases_past_the_width_are_refused_for_every_width() {
        for order in 0..=MAX_REFCOUNT_ORDER {
            let max = max_refcount(order);
            assert_eq!(increased(5, max - 1, 1, order).unwrap(), max);
            assert_eq!(increased(5, 0, max, order).unwrap(), max);
            let e = increased(5, max, 1, order).unwrap_err();
            assert!(e.to_string().starts_with("Invalid argument"), "{e}");
            assert!(e.to_string().contains(&max.to_string()), "{e}");
            assert!(increased(5, 1, max, order).is_err());
            assert!(increased(5, max, u64::MAX, order).is_err());
        }
    }

    #[test]
    fn geometry() {
        // 64 KiB clusters, 16-bit refcounts: 32768 refcounts per block.
        let t = RefcountTable::from_entries(vec![0x1_0000, 0, 0x2_0001], 16, 4, 0x10_0000);
        assert_eq!(t.entries_per_block(), 32768);
        assert_eq!(t.locate(32769), (1, 1));
        assert_eq!(t.covered_clusters(), 3 * 32768);
        assert_eq!(
            t.block_offset(0, Strictness::Strict).unwrap(),
            Some(0x1_0000)
        );
        assert_eq!(t.block_offset(1, Strictness::Strict).unwrap(), None);
        assert_eq!(t.block_offset(9, Strictness::Strict).unwrap(), None);
        // Reserved bit 0: an error when strict, ignored when lenient.
        assert!(t.block_offset(2, Strictness::Strict).is_err());
        assert_eq!(
            t.block_offset(2, Strictness::Lenient).unwrap(),
            Some(0x2_0000)
        );
        // Unaligned or past the end of the file.
        let t = RefcountTable::from_entries(vec![0x1_0200, 0x20_0000], 16, 4, 0x10_0000);
        assert!(t.block_offset(0, Strictness::Lenient).is_err());
        assert!(t.block_offset(1, Strictness::Strict).is_err());
        assert_eq!(
            t.block_offset(1, Strictness::Lenient).unwrap(),
            Some(0x20_0000)
        );
        // 512-byte clusters, 1-bit refcounts: 4096 per block; 64-bit: 64 per block.
        assert_eq!(
            RefcountTable::from_entries(vec![], 9, 0, 0).entries_per_block(),
            4096
        );
        assert_eq!(
            RefcountTable::from_entries(vec![], 9, 6, 0).entries_per_block(),
            64
        );
    }
}
