//! Creating VHD images as `qemu-img create -f vpc` does: the `subformat` (dynamic, the default,
//! or fixed) and `force_size` options; the CHS geometry of the VHD specification, the disk size
//! rounded up to it unless `force_size` (then the largest geometry and the exact size, creator
//! `qem2`, which is what Azure takes); 2 MiB blocks and an empty BAT for a dynamic disk.

use super::footer::{checksum, DYN_HEADER_LEN, FOOTER_LEN, MAX_GEOMETRY_SECTORS, MAX_SECTORS};
use crate::error::{Error, Result, ResultExt};
use crate::opener::Opener;
use crate::option_desc::{OptDesc, OptType, FILE_PROTOCOL, SIZE};
use crate::storage::Storage;
use std::path::{Path, PathBuf};

/// The block size of the dynamic disks qemu and vimg make.
pub const BLOCK_SIZE: u64 = 2 << 20;
/// Where the BAT of a new dynamic disk starts (after the footer copy and the dynamic header).
pub const BAT_OFFSET: u64 = 3 * 512;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;

/// The options of `create -o`, as qemu's vpc driver describes them.
pub const CREATE_OPTIONS: &[OptDesc] = &[
    OptDesc::new(
        "force_size",
        OptType::Bool,
        "Force disk size calculation to use the actual size specified, rather than using the \
         nearest CHS-based calculation",
    ),
    SIZE,
    OptDesc::new(
        "subformat",
        OptType::Str,
        "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    ),
];

/// The `-o` options of a new VHD.
#[derive(Debug, Clone, Default)]
pub struct VpcOptions {
    /// `size`.
    pub size: Option<u64>,
    /// `subformat` as given (checked when the image is made, as qemu does).
    pub subformat: Option<String>,
    /// `force_size`.
    pub force_size: Option<bool>,
}

impl VpcOptions {
    /// Parses `-o` arguments (later ones win), in qemu's words for what it refuses.
    pub fn parse(options: &[String]) -> Result<Self> {
        let mut o = VpcOptions::default();
        for p in crate::option_desc::parse(options, &[CREATE_OPTIONS, FILE_PROTOCOL])? {
            match p.name {
                "size" => o.size = Some(p.number()),
                "subformat" => o.subformat = Some(p.given),
                "force_size" => o.force_size = Some(p.flag()),
                "preallocation" => crate::option_desc::preallocation_off("vpc", &p.given)?,
                // The file's `nocow` and `extent_size_hint` change nothing here.
                _ => {}
            }
        }
        Ok(o)
    }

    /// Whether the disk is fixed (an unknown subformat is refused in qemu's words).
    pub fn fixed(&self) -> Result<bool> {
        match self.subformat.as_deref() {
            None | Some("dynamic") => Ok(false),
            Some("fixed") => Ok(true),
            Some(v) => Err(Error::invalid_input(format!(
                "Parameter 'subformat' does not accept value '{v}'"
            ))),
        }
    }
}

/// The CHS geometry of the VHD specification for `sectors` (which it may round down).
pub fn geometry(sectors: u64) -> (u16, u8, u8) {
    let sectors = sectors.min(MAX_GEOMETRY_SECTORS);
    let (heads, secs, cth);
    if sectors >= 65535 * 16 * 63 {
        (heads, secs) = (16u64, 255u64);
        cth = sectors / secs;
    } else {
        let mut s = 17;
        let mut c = sectors / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            (s, h) = (31, 16);
            c = sectors / s;
        }
        if c >= h * 1024 {
            (s, h) = (63, 16);
            c = sectors / s;
        }
        (heads, secs, cth) = (h, s, c);
    }
    ((cth / heads) as u16, heads as u8, secs as u8)
}

fn chs_product(g: (u16, u8, u8)) -> u64 {
    u64::from(g.0) * u64::from(g.1) * u64::from(g.2)
}

/// The geometry and the disk size in bytes of a new disk asked to hold `size` bytes: with
/// `force_size` the largest geometry and `size` (in whole sectors); otherwise the smallest
/// geometry that holds `size` and its size, unless that is the largest geometry (then `size`).
pub fn new_disk_size(size: u64, force_size: bool) -> Result<((u16, u8, u8), u64)> {
    let sectors = size.div_ceil(512);
    let too_large = || Error::invalid_input("The image size is too large for file format 'vpc'");
    if sectors > MAX_SECTORS {
        return Err(too_large());
    }
    if force_size {
        return Ok(((65535, 16, 255), sectors * 512));
    }
    let mut g = (0, 0, 0);
    let mut i = 0;
    while sectors > chs_product(g) {
        g = geometry(sectors + i);
        if chs_product(g) == MAX_GEOMETRY_SECTORS {
            break;
        }
        i += 1;
    }
    if chs_product(g) == MAX_GEOMETRY_SECTORS {
        return Ok((g, sectors * 512));
    }
    Ok((g, chs_product(g) * 512))
}

/// A new footer.
fn footer(size: u64, chs: (u16, u8, u8), fixed: bool, force_size: bool) -> [u8; FOOTER_LEN] {
    let mut b = [0u8; FOOTER_LEN];
    b[..8].copy_from_slice(b"conectix");
    b[8..12].copy_from_slice(&2u32.to_be_bytes());
    b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = if fixed { u64::MAX } else { FOOTER_LEN as u64 };
    b[16..24].copy_from_slice(&data_offset.to_be_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    b[24..28].copy_from_slice(&(now.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
    b[28..32].copy_from_slice(if force_size { b"qem2" } else { b"qemu" });
    b[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes());
    b[36..40].copy_from_slice(b"Wi2k");
    b[40..48].copy_from_slice(&size.to_be_bytes());
    b[48..56].copy_from_slice(&size.to_be_bytes());
    b[56..58].copy_from_slice(&chs.0.to_be_bytes());
    b[58] = chs.1;
    b[59] = chs.2;
    b[60..64].copy_from_slice(&(if fixed { 2u32 } else { 3 }).to_be_bytes());
    let mut uuid = [0u8; 16];
    if getrandom::fill(&mut uuid).is_err() {
        uuid[..8].copy_from_slice(&now.to_be_bytes());
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    b[68..84].copy_from_slice(&uuid);
    let sum = checksum(&b, 64);
    b[64..68].copy_from_slice(&sum.to_be_bytes());
    b
}

/// Writes a new VHD of `opts` into `storage`.
fn write_image(storage: &dyn Storage, opts: &VpcOptions) -> Result<()> {
    let fixed = opts.fixed()?;
    let force = opts.force_size.unwrap_or(false);
    let (chs, size) = new_disk_size(opts.size.unwrap_or(0), force)?;
    let f = footer(size, chs, fixed, force);
    let io = |e| Error::io("cannot write the new image", e);
    // `storage` is new and empty (FileStorage::create): truncating it again would make ext4
    // write the whole output back when it is closed (see there).
    if fixed {
        storage.set_len(size).map_err(io)?;
        storage.write_at(&f, size).map_err(io)?;
    } else {
        let entries = size.div_ceil(BLOCK_SIZE);
        let bat_len = (entries * 4).next_multiple_of(512);
        let mut h = [0u8; DYN_HEADER_LEN];
        h[..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&BAT_OFFSET.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
        let sum = checksum(&h, 36);
        h[36..40].copy_from_slice(&sum.to_be_bytes());
        storage.write_at(&f, 0).map_err(io)?;
        storage.write_at(&h, FOOTER_LEN as u64).map_err(io)?;
        storage
            .write_at(&vec![0xff; bat_len as usize], BAT_OFFSET)
            .map_err(io)?;
        storage.write_at(&f, BAT_OFFSET + bat_len).map_err(io)?;
    }
    storage
        .flush()
        .map_err(|e| Error::io("cannot write the new image", e))
}

/// Creates the VHD `opts` describe at `path`; a failed create removes the file.
pub fn create_image(opener: &Opener, path: &Path, opts: &VpcOptions) -> Result<Box<dyn Storage>> {
    let storage = opener
        .create(path)
        .map_err(|e| Error::io("cannot create image", e).with_path(path))?;
    match write_image(storage.as_ref(), opts).in_file(path) {
        Ok(()) => Ok(storage),
        Err(e) => {
            drop(storage);
            opener.remove_failed_output(path);
            Err(e)
        }
    }
}

/// A checked `create -f vpc` request.
#[derive(Debug)]
pub struct VpcCreation {
    /// The new file.
    pub path: PathBuf,
    /// Its options.
    pub opts: VpcOptions,
    /// What creates it.
    pub opener: Opener,
}

impl crate::creation::FormatCreation for VpcCreation {
    /// `Formatting 'x.vhd', fmt=vpc size=N [subformat=S] [force_size=on|off]`.
    fn formatting_line(&self) -> String {
        let o = &self.opts;
        let mut s = format!(
            "Formatting '{}', fmt=vpc size={}",
            self.path.display(),
            o.size.unwrap_or(0)
        );
        if let Some(v) = &o.subformat {
            s.push_str(&format!(" subformat={v}"));
        }
        if let Some(f) = o.force_size {
            s.push_str(if f {
                " force_size=on"
            } else {
                " force_size=off"
            });
        }
        s
    }

    fn execute(&self) -> Result<()> {
        create_image(&self.opener, &self.path, &self.opts).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_the_geometry_unless_forced() {
        // 1000 bytes: two sectors, the smallest geometry (1 cylinder, 4 heads, 17 sectors).
        assert_eq!(new_disk_size(1000, false).unwrap(), ((1, 4, 17), 68 * 512));
        assert_eq!(new_disk_size(1000, true).unwrap(), ((65535, 16, 255), 1024));
        let (_, s) = new_disk_size(100 << 20, false).unwrap();
        assert_eq!(s, 0x0640_2000);
        assert!(new_disk_size(2041 << 30, true).is_err());
        assert_eq!(new_disk_size(2040 << 30, false).unwrap().1, 2040 << 30);
    }

    #[test]
    fn options_vimg_cannot_honour_are_refused() {
        let parse = |o: &str| VpcOptions::parse(&[o.to_string()]);
        assert!(parse("preallocation=full").is_err());
        assert!(parse("preallocation=off").is_ok());
        assert!(parse("force_size=maybe").is_err());
        assert!(parse("cluster_size=4k").is_err());
        assert!(parse("subformat=foo").unwrap().fixed().is_err());
    }
}
