//! The persistent dirty bitmap directory and bitmap tables (qcow2.rst "Bitmaps extension",
//! "Bitmap directory", "Bitmap table", "Bitmap data"): read, validated and encoded. Writing
//! them back is [`super::write`]'s job; tracking guest writes is
//! [`super::track`]'s.

pub(crate) use crate::bitmap::{inconsistent, not_found};
use crate::bitmap::{BitmapDesc, DirtyBitmap, SparseBits};
use crate::error::{Error, Result};
use crate::info::BitmapInfo;
use crate::qcow2::format::header::BitmapsExt;
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder, LittleEndian};

/// Largest bitmap directory qemu accepts, in bytes.
pub(crate) const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Most bitmaps qemu accepts in one image.
pub(crate) const MAX_BITMAPS: u32 = 65535;
/// Longest bitmap name qemu accepts, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 1023;
/// Most entries qemu accepts in one bitmap table.
pub(crate) const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Most bytes of bitmap data qemu keeps for one bitmap (it holds them all in memory).
pub(crate) const MAX_DATA_BYTES: u64 = 512 << 20;
/// Smallest granularity qemu supports, as a power of two (512 bytes).
pub(crate) const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity qemu supports, as a power of two (2 GiB).
pub(crate) const MAX_GRANULARITY_BITS: u8 = 31;
/// Directory entry flag: the bitmap is in use (possibly inconsistent).
pub(crate) const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap tracks writes automatically (it is enabled).
pub(crate) const FLAG_AUTO: u32 = 1 << 1;
/// Directory entry flag: the bitmap may be used even though its extra data is not understood.
pub(crate) const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// The directory entry flags qcow2 defines.
pub(crate) const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// Directory entry type of a dirty tracking bitmap, the only one defined.
pub(crate) const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap table entry bits 9-55: the data cluster offset.
pub(crate) const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bits that must be zero: 1-8 and 56-63.
pub(crate) const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry bit 0: with offset 0, the cluster reads as all ones.
pub(crate) const BME_ALL_ONES: u64 = 1;
/// Bytes of a directory entry before its extra data and name.
const ENTRY_FIXED_BYTES: usize = 24;

/// One bitmap directory entry (qcow2.rst "Bitmap directory").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitmap {
    /// Host offset of the bitmap table (bytes 0-7).
    pub table_offset: u64,
    /// Entries in the bitmap table (bytes 8-11).
    pub table_size: u32,
    /// Flags: in_use, auto, extra_data_compatible (bytes 12-15).
    pub flags: u32,
    /// log2 of the bytes one bit covers (byte 17).
    pub granularity_bits: u8,
    /// The name, as text (invalid UTF-8 replaced).
    pub name: String,
    /// The name's bytes exactly as stored.
    pub raw_name: Vec<u8>,
    /// Type-specific extra data, kept verbatim.
    pub extra: Vec<u8>,
}

impl Bitmap {
    /// A new entry named `name` (its table is set when it is stored).
    pub(crate) fn new(name: &str, granularity_bits: u8, flags: u32) -> Self {
        Bitmap {
            table_offset: 0,
            table_size: 0,
            flags,
            granularity_bits,
            name: name.to_string(),
            raw_name: name.as_bytes().to_vec(),
            extra: Vec::new(),
        }
    }

    /// The entry as `info` shows it.
    pub(crate) fn info(&self) -> BitmapInfo {
        let mut flags = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            flags.push("in-use".to_string());
        }
        if self.flags & FLAG_AUTO != 0 {
            flags.push("auto".to_string());
        }
        BitmapInfo {
            flags,
            name: self.name.clone(),
            granularity: 1u64 << self.granularity_bits,
        }
    }

    /// The entry as [`crate::bitmap::PersistentBitmaps`] describes it.
    pub(crate) fn desc(&self) -> BitmapDesc {
        BitmapDesc {
            name: self.name.clone(),
            granularity: 1u64 << self.granularity_bits,
            enabled: self.enabled(),
            in_use: self.in_use(),
        }
    }

    /// Whether the bitmap is flagged in use (possibly inconsistent).
    pub(crate) fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Whether the bitmap is enabled (its `auto` flag).
    pub(crate) fn enabled(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Whether the entry is one vimg may interpret and change: no unknown flags, and extra data
    /// only if it is marked compatible. Other entries are kept as they are.
    pub(crate) fn understood(&self) -> bool {
        self.flags & !KNOWN_FLAGS == 0
            && (self.extra.is_empty() || self.flags & FLAG_EXTRA_DATA_COMPATIBLE != 0)
    }

    /// Bytes the entry takes in the directory, padding included.
    pub(crate) fn entry_len(&self) -> usize {
        (ENTRY_FIXED_BYTES + self.extra.len() + self.raw_name.len()).div_ceil(8) * 8
    }
}

/// Entries of a bitmap table for a disk of `disk_size` bytes with `2^granularity_bits` bytes
/// per bit and clusters of `cluster_size` bytes: one per cluster of bitmap data.
pub(crate) fn table_entries_for(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let bits = disk_size.div_ceil(1u64 << granularity_bits);
    bits.div_ceil(8).div_ceil(cluster_size)
}

/// The directory holding `entries`, as bytes (qcow2.rst "Bitmap directory").
pub(crate) fn encode_directory(entries: &[Bitmap]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in entries {
        let start = out.len();
        out.resize(start + b.entry_len(), 0);
        let e = &mut out[start..];
        BigEndian::write_u64(&mut e[0..8], b.table_offset);
        BigEndian::write_u32(&mut e[8..12], b.table_size);
        BigEndian::write_u32(&mut e[12..16], b.flags);
        e[16] = TYPE_DIRTY_TRACKING;
        e[17] = b.granularity_bits;
        BigEndian::write_u16(&mut e[18..20], b.raw_name.len() as u16);
        BigEndian::write_u32(&mut e[20..24], b.extra.len() as u32);
        let x = ENTRY_FIXED_BYTES + b.extra.len();
        e[ENTRY_FIXED_BYTES..x].copy_from_slice(&b.extra);
        e[x..x + b.raw_name.len()].copy_from_slice(&b.raw_name);
    }
    out
}

/// Reads the bitmap directory of `img` as it is now (empty when the image has no consistent
/// bitmaps extension).
pub(crate) fn read_directory(img: &Qcow2Image) -> Result<Vec<Bitmap>> {
    read_directory_at(img, img.bitmaps_ext())
}

/// Reads the bitmap directory `ext` describes.
pub(crate) fn read_directory_at(img: &Qcow2Image, ext: Option<BitmapsExt>) -> Result<Vec<Bitmap>> {
    let Some(ext) = ext else {
        return Ok(Vec::new());
    };
    if ext.nb_bitmaps > MAX_BITMAPS {
        return Err(Error::corrupt(format!(
            "{} bitmaps exceed the limit of {MAX_BITMAPS}",
            ext.nb_bitmaps
        )));
    }
    if ext.directory_size > MAX_DIRECTORY_BYTES {
        return Err(Error::corrupt(format!(
            "bitmap directory of {} bytes exceeds 64 MiB",
            ext.directory_size
        )));
    }
    if ext
        .directory_offset
        .checked_add(ext.directory_size)
        .is_none_or(|e| e > img.file_len())
    {
        return Err(
            Error::corrupt("bitmap directory lies beyond the end of the file")
                .at(ext.directory_offset),
        );
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    img.storage()
        .read_at(&mut dir, ext.directory_offset)
        .map_err(|e| Error::io("cannot read bitmap directory", e).at(ext.directory_offset))?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for i in 0..ext.nb_bitmaps {
        let at = ext.directory_offset + pos as u64;
        if pos + ENTRY_FIXED_BYTES > dir.len() {
            return Err(Error::corrupt(format!(
                "bitmap directory entry {i} runs past the directory"
            ))
            .at(at));
        }
        let e = &dir[pos..];
        let granularity_bits = e[17];
        let name_size = BigEndian::read_u16(&e[18..20]) as usize;
        let extra_size = BigEndian::read_u32(&e[20..24]) as usize;
        let len = (ENTRY_FIXED_BYTES + extra_size + name_size).div_ceil(8) * 8;
        if pos + len > dir.len() {
            return Err(Error::corrupt(format!(
                "bitmap directory entry {i} runs past the directory"
            ))
            .at(at));
        }
        if e[16] != TYPE_DIRTY_TRACKING {
            return Err(Error::corrupt(format!("bitmap {i} has unknown type {}", e[16])).at(at));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(Error::corrupt(format!(
                "bitmap {i} has granularity 2^{granularity_bits} outside 2^9..2^31"
            ))
            .at(at));
        }
        let x = ENTRY_FIXED_BYTES + extra_size;
        let raw_name = e[x..x + name_size].to_vec();
        out.push(Bitmap {
            table_offset: BigEndian::read_u64(&e[0..8]),
            table_size: BigEndian::read_u32(&e[8..12]),
            flags: BigEndian::read_u32(&e[12..16]),
            granularity_bits,
            name: String::from_utf8_lossy(&raw_name).into_owned(),
            raw_name,
            extra: e[ENTRY_FIXED_BYTES..x].to_vec(),
        });
        pos += len;
    }
    Ok(out)
}

/// Checks what vimg relies on before it reads, tracks or rewrites the bitmaps of a directory:
/// unique non-empty names of at most [`MAX_NAME_BYTES`] bytes, and for each bitmap a table that
/// is cluster-aligned, inside the file and within qemu's limits, covering the whole disk when
/// the bitmap is not in use (qemu's rules; an in-use bitmap may have a stale size).
pub(crate) fn validate(img: &Qcow2Image, dir: &[Bitmap]) -> Result<()> {
    let cs = img.header().cluster_size();
    let mut names = std::collections::HashSet::new();
    for b in dir {
        let bad = |what: String| Err(Error::corrupt(format!("bitmap '{}' {what}", b.name)));
        if b.raw_name.is_empty() || b.raw_name.len() > MAX_NAME_BYTES {
            return bad(format!("has a name of {} bytes", b.raw_name.len()));
        }
        if !names.insert(&b.raw_name) {
            return bad("appears twice in the bitmap directory".into());
        }
        let entries = u64::from(b.table_size);
        if entries == 0 || entries > MAX_TABLE_ENTRIES || entries * cs > MAX_DATA_BYTES {
            return bad(format!("has a bitmap table of {entries} entries"));
        }
        if b.table_offset == 0 || !b.table_offset.is_multiple_of(cs) {
            return bad(format!(
                "has a misaligned bitmap table offset {:#x}",
                b.table_offset
            ));
        }
        if b.table_offset
            .checked_add(entries * 8)
            .is_none_or(|e| e > img.file_len())
        {
            return bad("has a bitmap table beyond the end of the file".into());
        }
        let needed = table_entries_for(img.header().size, b.granularity_bits, cs);
        if !b.in_use() && entries < needed {
            return bad(format!(
                "has {entries} bitmap table entries, too few for the disk ({needed})"
            ));
        }
    }
    Ok(())
}

/// Reads the bitmap table of `b` (validated with [`validate`]), checking every entry:
/// reserved bits clear, data clusters aligned and inside the file.
pub(crate) fn read_table(img: &Qcow2Image, b: &Bitmap) -> Result<Vec<u64>> {
    let cs = img.header().cluster_size();
    let mut raw = vec![0u8; b.table_size as usize * 8];
    img.storage()
        .read_at(&mut raw, b.table_offset)
        .map_err(|e| Error::io("cannot read a bitmap table", e).at(b.table_offset))?;
    let table: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
    for (i, &e) in table.iter().enumerate() {
        let off = e & BME_OFFSET_MASK;
        let bad = e & BME_RESERVED_MASK != 0
            || (off != 0
                && (e & BME_ALL_ONES != 0
                    || !off.is_multiple_of(cs)
                    || off + cs > img.file_len().next_multiple_of(cs)));
        if bad {
            return Err(Error::corrupt(format!(
                "bitmap '{}' table entry {i} ({e:#x}) is invalid",
                b.name
            ))
            .at(b.table_offset + i as u64 * 8));
        }
    }
    Ok(table)
}

/// Bits of bitmap data one cluster holds.
pub(crate) fn bits_per_cluster(img: &Qcow2Image) -> u64 {
    img.header().cluster_size() * 8
}

/// ORs the bitmap data cluster that table entry `entry` describes into `out` (one cluster of
/// bits, as words: see [`SparseBits`]).
pub(crate) fn read_data_cluster(img: &Qcow2Image, entry: u64, out: &mut [u64]) -> Result<()> {
    let off = entry & BME_OFFSET_MASK;
    if off == 0 {
        if entry & BME_ALL_ONES != 0 {
            out.fill(u64::MAX);
        }
        return Ok(());
    }
    let mut raw = vec![0u8; out.len() * 8];
    crate::qcow2::refcount::table::read_padded(img, &mut raw, off)?;
    for (w, chunk) in out.iter_mut().zip(raw.chunks_exact(8)) {
        *w |= LittleEndian::read_u64(chunk);
    }
    Ok(())
}

/// The contents of bitmap `b` (validated with [`validate`], not in use), for a disk of
/// `disk_size` bytes: only bits inside the disk are kept.
pub(crate) fn read_contents(img: &Qcow2Image, b: &Bitmap, disk_size: u64) -> Result<DirtyBitmap> {
    let table = read_table(img, b)?;
    let per = bits_per_cluster(img);
    let mut bits = SparseBits::new();
    let mut words = vec![0u64; (per / 64) as usize];
    for (i, &e) in table.iter().enumerate() {
        if e == 0 {
            continue;
        }
        words.fill(0);
        read_data_cluster(img, e, &mut words)?;
        bits.or_words(i as u64 * per, &words);
    }
    bits.truncate(disk_size.div_ceil(1u64 << b.granularity_bits));
    Ok(DirtyBitmap {
        granularity_bits: u32::from(b.granularity_bits),
        disk_size,
        bits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_padded_to_8_bytes() {
        let mut b = Bitmap::new("abc", 16, FLAG_AUTO);
        b.table_offset = 0x50000;
        b.table_size = 1;
        b.extra = vec![9; 3];
        let d = encode_directory(&[b.clone(), Bitmap::new("0123456789abcdef", 9, 0)]);
        assert_eq!(b.entry_len(), 32);
        assert_eq!(d.len(), 32 + 40);
        assert_eq!(&d[24..30], &[9, 9, 9, b'a', b'b', b'c']);
        assert!(d[30..32].iter().all(|&x| x == 0));
        assert_eq!(d[16], 1);
        assert_eq!(d[32 + 17], 9);
    }

    #[test]
    fn table_sizes_follow_the_disk() {
        // 64 MiB at 64 KiB per bit: 1024 bits, 128 bytes: one cluster.
        assert_eq!(table_entries_for(64 << 20, 16, 65536), 1);
        // 1 TiB at 512 B per bit: 2^31 bits, 256 MiB: 4096 clusters of 64 KiB.
        assert_eq!(table_entries_for(1 << 40, 9, 65536), 4096);
        // 512-byte clusters hold 4096 bits: 2 MiB of disk at 512 bytes per bit.
        assert_eq!(table_entries_for(512 * 4096 + 1, 9, 512), 2);
    }
}
