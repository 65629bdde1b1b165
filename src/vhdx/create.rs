//! Creating VHDX images as `qemu-img create -f vhdx` does: its options (`subformat` dynamic or
//! fixed, `block_size`, `log_size`, `block_state_zero`), its size rules and refusals, and its
//! layout: file identifier, two headers, two region tables, the log (1 MiB on), the BAT, the
//! metadata region, then 5 MiB of room before the first payload block. Only the GUIDs, the
//! headers' sequence numbers (random), the creator string and the checksums over them differ.

use super::bat::{Geometry, FULLY_PRESENT, ZERO};
use super::layout::{
    self, set_checksum, BAT_GUID, BLOCK_SIZE_MAX, FILE_PARAMETERS_GUID, HEADER_OFFSETS,
    HEADER_SECTION_END, LOGICAL_SECTOR_GUID, MAX_IMAGE_SIZE, METADATA_GUID, PAGE83_GUID,
    PHYSICAL_SECTOR_GUID, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, VIRTUAL_SIZE_GUID,
};
use crate::error::{Error, Result, ResultExt};
use crate::opener::Opener;
use crate::option_desc::{OptDesc, OptType, FILE_PROTOCOL};
use crate::storage::Storage;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// The options of `create -o`, as qemu's vhdx driver describes them.
pub const CREATE_OPTIONS: &[OptDesc] = &[
    OptDesc::new(
        "block_size",
        OptType::Size,
        "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    ),
    OptDesc::new(
        "block_state_zero",
        OptType::Bool,
        "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to \
         'off' when using 'qemu-img convert' with subformat=dynamic.",
    ),
    OptDesc::new("log_size", OptType::Size, "Log size; min 1MB."),
    OptDesc::new("size", OptType::Size, "Virtual disk size; max of 64TB."),
    OptDesc::new(
        "subformat",
        OptType::Str,
        "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    ),
];

/// The `-o` options of a new VHDX.
#[derive(Debug, Clone, Default)]
pub struct VhdxOptions {
    /// `size`.
    pub size: Option<u64>,
    /// `log_size` as given.
    pub log_size: Option<u64>,
    /// `block_size` as given (0: chosen from the size).
    pub block_size: Option<u64>,
    /// `subformat` as given (checked when the image is made, as qemu does).
    pub subformat: Option<String>,
    /// `block_state_zero`.
    pub block_state_zero: Option<bool>,
}

/// What a new image is made of, once the options are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Disk size (rounded up to 512 bytes).
    pub size: u64,
    /// Log size.
    pub log_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Fixed (all blocks in the file) rather than dynamic.
    pub fixed: bool,
    /// Blocks start in state ZERO rather than NOT_PRESENT / FULLY_PRESENT.
    pub zero_blocks: bool,
}

impl VhdxOptions {
    /// Parses `-o` arguments (later ones win), in qemu's words for what it refuses.
    pub fn parse(options: &[String]) -> Result<Self> {
        let mut o = VhdxOptions::default();
        for p in crate::option_desc::parse(options, &[CREATE_OPTIONS, FILE_PROTOCOL])? {
            match p.name {
                "size" => o.size = Some(p.number()),
                "log_size" => o.log_size = Some(p.number()),
                "block_size" => o.block_size = Some(p.number()),
                "subformat" => o.subformat = Some(p.given),
                "block_state_zero" => o.block_state_zero = Some(p.flag()),
                "preallocation" => crate::option_desc::preallocation_off("vhdx", &p.given)?,
                // The file's `nocow` and `extent_size_hint` change nothing here.
                _ => {}
            }
        }
        Ok(o)
    }

    /// Checks the options for a disk of `size` bytes as qemu's `vhdx_co_create` (after its
    /// silent rounding: size to 512 bytes, log and block size up to 1 MiB, block size at most
    /// 256 MiB) and returns what to make.
    pub fn check(&self, size: u64) -> Result<Plan> {
        let fixed = match self.subformat.as_deref() {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(v) => {
                return Err(Error::invalid_input(format!(
                    "Parameter 'subformat' does not accept value '{v}'"
                )))
            }
        };
        let size = size
            .checked_next_multiple_of(512)
            .filter(|&s| s <= MAX_IMAGE_SIZE)
            .ok_or_else(|| Error::invalid_input("Image size too large; max of 64TB"))?;
        let log_size = match self.log_size {
            None => MIB,
            Some(l) => match l.checked_next_multiple_of(MIB) {
                Some(l) if l <= u64::from(u32::MAX) => l,
                _ => return Err(Error::invalid_input("Log size must be smaller than 4 GB")),
            },
        };
        if log_size < MIB || log_size > u64::from(u32::MAX) {
            return Err(Error::invalid_input("Log size must be a multiple of 1 MB"));
        }
        let block_size = match self
            .block_size
            .map(|b| b.checked_next_multiple_of(MIB).unwrap_or(BLOCK_SIZE_MAX))
        {
            None | Some(0) => {
                if size > 32 << 40 {
                    64 * MIB
                } else if size > 100 << 30 {
                    32 * MIB
                } else if size > 1 << 30 {
                    16 * MIB
                } else {
                    8 * MIB
                }
            }
            Some(b) => b.min(BLOCK_SIZE_MAX),
        };
        if !block_size.is_power_of_two() {
            return Err(Error::invalid_input("Block size must be a power of two"));
        }
        Ok(Plan {
            size,
            log_size,
            block_size,
            fixed,
            zero_blocks: self.block_state_zero.unwrap_or(true),
        })
    }
}

/// The number of BAT entries qemu gives a new image: as [`Geometry`], but a disk of size 0
/// gets the entries of its 32-bit arithmetic (`(0 - 1) >> chunk_ratio_bits`).
fn qemu_bat_entries(geo: &Geometry) -> u64 {
    if geo.data_blocks == 0 {
        u64::from(u32::MAX) >> geo.chunk_ratio.trailing_zeros()
    } else {
        geo.entries
    }
}

/// Writes a new VHDX of `plan` into `storage`.
fn write_image(storage: &dyn Storage, plan: &Plan) -> Result<()> {
    let io = |e| Error::io("cannot write the new image", e);
    // `storage` is new and empty (FileStorage::create): truncating it again would make ext4
    // write the whole output back when it is closed (see there).

    // The file identifier: signature and creator (UTF-16).
    let mut id = b"vhdxfile".to_vec();
    for u in format!("vimg v{}", env!("CARGO_PKG_VERSION")).encode_utf16() {
        id.extend_from_slice(&u.to_le_bytes());
    }
    storage.write_at(&id, 0).map_err(io)?;

    // The two headers.
    let mut seq = [0u8; 4];
    let _ = getrandom::fill(&mut seq);
    let mut h = layout::Header {
        sequence_number: u64::from(u32::from_le_bytes(seq)),
        file_write_guid: super::random_guid(),
        data_write_guid: super::random_guid(),
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: plan.log_size as u32,
        log_offset: HEADER_SECTION_END,
    };
    for at in HEADER_OFFSETS {
        storage.write_at(&h.to_bytes(), at).map_err(io)?;
        h.sequence_number += 1;
    }

    // The region table, twice, and the BAT.
    let geo = Geometry::new(plan.size, plan.block_size, 512);
    let bat_offset = (HEADER_SECTION_END + plan.log_size).next_multiple_of(MIB);
    let bat_len = (qemu_bat_entries(&geo) * 8).next_multiple_of(MIB);
    let md_offset = (bat_offset + bat_len).next_multiple_of(MIB);
    let bat_len32 = u32::try_from(bat_len)
        .map_err(|_| Error::invalid_input("Image size too large; max of 64TB"))?;
    let mut rt = vec![0u8; REGION_TABLE_SIZE];
    rt[..4].copy_from_slice(b"regi");
    rt[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, (guid, off, len)) in [
        (BAT_GUID, bat_offset, bat_len32),
        (METADATA_GUID, md_offset, MIB as u32),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 16 + 32 * i;
        rt[e..e + 16].copy_from_slice(&guid);
        rt[e + 16..e + 24].copy_from_slice(&off.to_le_bytes());
        rt[e + 24..e + 28].copy_from_slice(&len.to_le_bytes());
    }
    set_checksum(&mut rt, 4);

    let data_offset = bat_offset + bat_len + 5 * MIB;
    let file_len = if plan.fixed {
        data_offset + plan.size
    } else {
        data_offset
    };
    storage.set_len(file_len).map_err(io)?;
    if plan.fixed || plan.zero_blocks {
        let state = if plan.zero_blocks {
            ZERO
        } else {
            FULLY_PRESENT
        };
        let mut bat = vec![0u8; bat_len as usize];
        for b in 0..geo.data_blocks {
            let entry = if state == FULLY_PRESENT {
                (data_offset + b * plan.block_size).next_multiple_of(MIB) | state
            } else {
                state
            };
            let i = geo.index(b) as usize * 8;
            bat[i..i + 8].copy_from_slice(&entry.to_le_bytes());
        }
        storage.write_at(&bat, bat_offset).map_err(io)?;
    }
    for at in REGION_TABLE_OFFSETS {
        storage.write_at(&rt, at).map_err(io)?;
    }

    // The metadata region: the table, then the five items 64 KiB in.
    let mut md = vec![0u8; 64 << 10];
    md[..8].copy_from_slice(b"metadata");
    md[10..12].copy_from_slice(&5u16.to_le_bytes());
    let items: [([u8; 16], u32, u32); 5] = [
        (FILE_PARAMETERS_GUID, 8, 4),
        (VIRTUAL_SIZE_GUID, 8, 6),
        (PAGE83_GUID, 16, 6),
        (LOGICAL_SECTOR_GUID, 4, 6),
        (PHYSICAL_SECTOR_GUID, 4, 6),
    ];
    let mut off = 64u32 << 10;
    for (i, (guid, len, bits)) in items.into_iter().enumerate() {
        let e = 32 + 32 * i;
        md[e..e + 16].copy_from_slice(&guid);
        md[e + 16..e + 20].copy_from_slice(&off.to_le_bytes());
        md[e + 20..e + 24].copy_from_slice(&len.to_le_bytes());
        md[e + 24..e + 28].copy_from_slice(&bits.to_le_bytes());
        off += len;
    }
    let mut values = Vec::with_capacity(40);
    values.extend_from_slice(&(plan.block_size as u32).to_le_bytes());
    values.extend_from_slice(&u32::from(plan.fixed).to_le_bytes());
    values.extend_from_slice(&plan.size.to_le_bytes());
    values.extend_from_slice(&super::random_guid());
    values.extend_from_slice(&512u32.to_le_bytes());
    values.extend_from_slice(&512u32.to_le_bytes());
    storage.write_at(&md, md_offset).map_err(io)?;
    storage
        .write_at(&values, md_offset + (64 << 10))
        .map_err(io)?;
    storage
        .flush()
        .map_err(|e| Error::io("cannot write the new image", e))
}

/// Creates the VHDX `opts` describe at `path`; a failed create removes the file.
pub fn create_image(opener: &Opener, path: &Path, opts: &VhdxOptions) -> Result<Box<dyn Storage>> {
    let plan = opts.check(opts.size.unwrap_or(0)).in_file(path)?;
    let storage = opener
        .create(path)
        .map_err(|e| Error::io("cannot create image", e).with_path(path))?;
    match write_image(storage.as_ref(), &plan).in_file(path) {
        Ok(()) => Ok(storage),
        Err(e) => {
            drop(storage);
            opener.remove_failed_output(path);
            Err(e)
        }
    }
}

/// Checks a `create -f vhdx` request: options and size, before the "Formatting" line (what
/// qemu checks after it is checked when the image is made).
pub fn prepare(
    command: &crate::creation::CreateCommand<'_>,
) -> Result<Box<dyn crate::creation::FormatCreation>> {
    let path = command.path;
    let mut opts = VhdxOptions::parse(command.options).in_file(path)?;
    opts.size = Some(command.size_without_backing("vhdx", opts.size)?);
    Ok(Box::new(VhdxCreation {
        path: path.to_path_buf(),
        opts,
        opener: command.opener.clone(),
    }))
}

/// A checked `create -f vhdx` request.
#[derive(Debug)]
pub struct VhdxCreation {
    /// The new file.
    pub path: PathBuf,
    /// Its options.
    pub opts: VhdxOptions,
    /// What creates it.
    pub opener: Opener,
}

impl crate::creation::FormatCreation for VhdxCreation {
    /// `Formatting 'x.vhdx', fmt=vhdx size=N log_size=L block_size=B [subformat=S]
    /// [block_state_zero=on|off]`.
    fn formatting_line(&self) -> String {
        let o = &self.opts;
        let mut s = format!(
            "Formatting '{}', fmt=vhdx size={} log_size={} block_size={}",
            self.path.display(),
            o.size.unwrap_or(0),
            o.log_size.unwrap_or(MIB),
            o.block_size.unwrap_or(0)
        );
        if let Some(v) = &o.subformat {
            s.push_str(&format!(" subformat={v}"));
        }
        if let Some(z) = o.block_state_zero {
            s.push_str(if z {
                " block_state_zero=on"
            } else {
                " block_state_zero=off"
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

    fn plan(o: &str, size: u64) -> Result<Plan> {
        let opts: Vec<String> = if o.is_empty() { vec![] } else { vec![o.into()] };
        VhdxOptions::parse(&opts)?.check(size)
    }

    #[test]
    fn sizes_are_rounded_and_checked_as_qemu() {
        assert_eq!(plan("", 1 << 30).unwrap().block_size, 8 * MIB);
        assert_eq!(plan("", 10 << 30).unwrap().block_size, 16 * MIB);
        assert_eq!(plan("", 200 << 30).unwrap().block_size, 32 * MIB);
        assert_eq!(plan("block_size=1536K", 1).unwrap().block_size, 2 * MIB);
        assert_eq!(plan("block_size=512M", 1).unwrap().block_size, 256 * MIB);
        assert_eq!(plan("log_size=1000", 1).unwrap().log_size, MIB);
        assert_eq!(plan("", 1000).unwrap().size, 1024);
        let e = |o, s| plan(o, s).unwrap_err().to_string();
        assert!(e("block_size=3M", 1).contains("Block size must be a power of two"));
        assert!(e("", 65 << 40).contains("Image size too large; max of 64TB"));
        assert!(e("log_size=5G", 1).contains("Log size must be smaller than 4 GB"));
        assert!(e("subformat=foo", 1).contains("does not accept value 'foo'"));
        assert!(VhdxOptions::parse(&["block_state_zero=x".into()]).is_err());
        assert!(VhdxOptions::parse(&["cluster_size=1M".into()]).is_err());
    }
}
