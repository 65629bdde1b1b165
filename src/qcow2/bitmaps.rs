//! The persistent dirty bitmap directory (qcow2.rst "Bitmaps extension"): read and validated.

use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::info::BitmapInfo;
use byteorder::{BigEndian, ByteOrder};

/// Largest bitmap directory qemu accepts, in bytes.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Most bitmaps qemu accepts in one image.
pub const MAX_BITMAPS: u32 = 65535;
/// Directory entry flag: the bitmap is in use (possibly inconsistent).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap tracks writes automatically.
pub const FLAG_AUTO: u32 = 1 << 1;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags (in_use, auto, ...).
    pub flags: u32,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
}

impl Bitmap {
    /// The entry as `info` shows it.
    pub fn info(&self) -> BitmapInfo {
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
}

/// Reads the bitmap directory of `img` (empty when the image has no consistent bitmaps
/// extension).
pub fn read_directory(img: &Qcow2Image) -> Result<Vec<Bitmap>> {
    let Some(ext) = img.header().bitmaps else {
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
    // Offset and size were checked against the file when the header was parsed.
    let mut dir = vec![0u8; ext.directory_size as usize];
    img.storage()
        .read_at(&mut dir, ext.directory_offset)
        .map_err(|e| Error::io("cannot read bitmap directory", e).at(ext.directory_offset))?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for i in 0..ext.nb_bitmaps {
        let at = ext.directory_offset + pos as u64;
        if pos + 24 > dir.len() {
            return Err(Error::corrupt(format!(
                "bitmap directory entry {i} runs past the directory"
            ))
            .at(at));
        }
        let e = &dir[pos..];
        let granularity_bits = e[17];
        let name_size = BigEndian::read_u16(&e[18..20]) as usize;
        let extra_size = BigEndian::read_u32(&e[20..24]) as usize;
        let len = (24 + extra_size + name_size).div_ceil(8) * 8;
        if pos + len > dir.len() {
            return Err(Error::corrupt(format!(
                "bitmap directory entry {i} runs past the directory"
            ))
            .at(at));
        }
        if e[16] != 1 {
            return Err(Error::corrupt(format!("bitmap {i} has unknown type {}", e[16])).at(at));
        }
        if !(9..=31).contains(&granularity_bits) {
            return Err(Error::corrupt(format!(
                "bitmap {i} has granularity 2^{granularity_bits} outside 2^9..2^31"
            ))
            .at(at));
        }
        let name =
            String::from_utf8_lossy(&e[24 + extra_size..24 + extra_size + name_size]).into_owned();
        out.push(Bitmap {
            table_offset: BigEndian::read_u64(&e[0..8]),
            table_size: BigEndian::read_u32(&e[8..12]),
            flags: BigEndian::read_u32(&e[12..16]),
            granularity_bits,
            name,
        });
        pos += len;
    }
    Ok(out)
}
