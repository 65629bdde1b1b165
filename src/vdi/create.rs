//! Creating VDI images as `qemu-img create -f vdi` does: the `static` option (a static image
//! has every block allocated, in order, and its file set to its full length, sparse), the size
//! rounded up to whole sectors, 1 MiB blocks, the block map right after the 512-byte header and
//! the data area right after the block map (in whole sectors). The header carries qemu's banner
//! line, version 1.1, header size 0x180 and two random UUIDs (image and last snapshot).
//!
//! `preallocation` is an option of the file qemu creates first (empty), so `falloc` and `full`
//! change nothing and `metadata` is refused in its words; `nocow` and `extent_size_hint` are
//! the file's too and are accepted (shown in the `Formatting` line, as qemu shows them).

use super::header::{
    BLOCK_SIZE, DISK_SIZE_MAX, SECTOR, SIGNATURE, TYPE_DYNAMIC, TYPE_STATIC, UNALLOCATED,
    VERSION_1_1,
};
use crate::error::{Error, Result, ResultExt};
use crate::opener::Opener;
use crate::option_desc::{OptDesc, OptType, FILE_PROTOCOL, SIZE};
use crate::storage::Storage;
use std::path::{Path, PathBuf};

/// The banner qemu writes at the start of the header.
const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// The header size qemu records.
const HEADER_SIZE: u32 = 0x180;

/// The options of `create -o`, as qemu's vdi driver describes them.
pub const CREATE_OPTIONS: &[OptDesc] = &[
    SIZE,
    OptDesc::new("static", OptType::Bool, "VDI static (pre-allocated) image"),
];

/// The `-o` options of a new VDI image.
#[derive(Debug, Clone, Default)]
pub struct VdiOptions {
    /// `size`.
    pub size: Option<u64>,
    /// `static`, as given (qemu prints the word given in its `Formatting` line).
    pub static_word: Option<String>,
    /// `static` parsed.
    pub is_static: bool,
    /// The file's options as given, in qemu's order: `nocow`, `preallocation`,
    /// `extent_size_hint` (for the `Formatting` line).
    file_opts: [Option<String>; 3],
}

impl VdiOptions {
    /// Parses `-o` arguments (later ones win), in qemu's words for what it refuses.
    pub fn parse(options: &[String]) -> Result<Self> {
        let mut o = VdiOptions::default();
        for p in crate::option_desc::parse(options, &[CREATE_OPTIONS, FILE_PROTOCOL])? {
            match p.name {
                "size" => o.size = Some(p.number()),
                "static" => {
                    o.is_static = p.flag();
                    o.static_word = Some(p.given);
                }
                "nocow" => o.file_opts[0] = Some(p.given),
                "preallocation" => o.file_opts[1] = Some(p.given),
                "extent_size_hint" => o.file_opts[2] = Some(p.number().to_string()),
                _ => {}
            }
        }
        Ok(o)
    }

    /// The disk size qemu records: the size asked for rounded up to whole sectors, refused
    /// past the largest VDI disk in qemu's words; and the file's preallocation mode checked.
    pub fn disk_size(&self) -> Result<u64> {
        match self.file_opts[1].as_deref() {
            None | Some("off" | "falloc" | "full") => {}
            Some("metadata") => {
                return Err(Error::unsupported(
                    "Unsupported preallocation mode: metadata",
                ))
            }
            Some(v) => {
                return Err(Error::invalid_input(format!(
                    "invalid parameter value: {v}"
                )))
            }
        }
        let bytes = self.size.unwrap_or(0).next_multiple_of(SECTOR);
        if bytes > DISK_SIZE_MAX {
            return Err(Error::unsupported(format!(
                "Unsupported VDI image size (size is {bytes:#x}, max supported is {DISK_SIZE_MAX:#x})"
            )));
        }
        Ok(bytes)
    }
}

/// A random (version 4) UUID as the VDI header stores it: qemu generates one and byte-swaps
/// its first three fields to little-endian.
fn new_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if getrandom::fill(&mut u).is_err() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        u = now.to_le_bytes();
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u[..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    u
}

/// The header of a new image of `bytes` bytes (a whole number of sectors).
pub fn new_header(bytes: u64, is_static: bool) -> [u8; SECTOR as usize] {
    let blocks = bytes.div_ceil(BLOCK_SIZE) as u32;
    let bmap_size = (u64::from(blocks) * 4).next_multiple_of(SECTOR) as u32;
    let mut h = [0u8; SECTOR as usize];
    h[..TEXT.len()].copy_from_slice(TEXT);
    let mut put32 = |at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(0x40, SIGNATURE);
    put32(0x44, VERSION_1_1);
    put32(0x48, HEADER_SIZE);
    put32(0x4c, if is_static { TYPE_STATIC } else { TYPE_DYNAMIC });
    put32(0x154, SECTOR as u32);
    put32(0x158, SECTOR as u32 + bmap_size);
    put32(0x168, SECTOR as u32);
    put32(0x178, BLOCK_SIZE as u32);
    put32(0x180, blocks);
    put32(0x184, if is_static { blocks } else { 0 });
    h[0x170..0x178].copy_from_slice(&bytes.to_le_bytes());
    h[0x188..0x198].copy_from_slice(&new_uuid());
    h[0x198..0x1a8].copy_from_slice(&new_uuid());
    h
}

/// Writes a new VDI image of `opts` into `storage`.
fn write_image(storage: &dyn Storage, opts: &VdiOptions) -> Result<()> {
    let bytes = opts.disk_size()?;
    let io = |e| Error::io("cannot write the new image", e);
    // `storage` is new and empty (FileStorage::create): truncating it again would make ext4
    // write the whole output back when it is closed (see there).
    let header = new_header(bytes, opts.is_static);
    storage.write_at(&header, 0).map_err(io)?;
    let blocks = bytes.div_ceil(BLOCK_SIZE);
    // The block map, a piece at a time (it reaches 2 GiB for the largest disk).
    const PIECE: u64 = 1 << 18;
    let mut at = 0u64;
    while at < blocks {
        let n = PIECE.min(blocks - at);
        let mut buf = vec![0u8; (n * 4).next_multiple_of(SECTOR) as usize];
        for (i, e) in buf.chunks_exact_mut(4).take(n as usize).enumerate() {
            let v = if opts.is_static {
                (at + i as u64) as u32
            } else {
                UNALLOCATED
            };
            e.copy_from_slice(&v.to_le_bytes());
        }
        storage.write_at(&buf, SECTOR + at * 4).map_err(io)?;
        at += n;
    }
    if opts.is_static {
        let bmap_size = (blocks * 4).next_multiple_of(SECTOR);
        storage
            .set_len(SECTOR + bmap_size + blocks * BLOCK_SIZE)
            .map_err(io)?;
    }
    storage
        .flush()
        .map_err(|e| Error::io("cannot write the new image", e))
}

/// Creates the VDI image `opts` describe at `path`; a failed create removes the file.
pub fn create_image(opener: &Opener, path: &Path, opts: &VdiOptions) -> Result<Box<dyn Storage>> {
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

/// A checked `create -f vdi` request.
#[derive(Debug)]
pub struct VdiCreation {
    /// The new file.
    pub path: PathBuf,
    /// Its options.
    pub opts: VdiOptions,
    /// What creates it.
    pub opener: Opener,
}

impl crate::creation::FormatCreation for VdiCreation {
    /// `Formatting 'x.vdi', fmt=vdi size=N static=W [nocow=..] [preallocation=..]
    /// [extent_size_hint=..]`.
    fn formatting_line(&self) -> String {
        let o = &self.opts;
        let mut s = format!(
            "Formatting '{}', fmt=vdi size={} static={}",
            self.path.display(),
            o.size.unwrap_or(0),
            o.static_word.as_deref().unwrap_or("off")
        );
        for (name, v) in ["nocow", "preallocation", "extent_size_hint"]
            .iter()
            .zip(&o.file_opts)
        {
            if let Some(v) = v {
                s.push_str(&format!(" {name}={v}"));
            }
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
    fn sizes_round_to_sectors_and_stop_at_qemus_largest() {
        let o = |s: u64| VdiOptions {
            size: Some(s),
            ..Default::default()
        };
        assert_eq!(o(1).disk_size().unwrap(), 512);
        assert_eq!(o(2_500_000).disk_size().unwrap(), 2_500_096);
        assert_eq!(o(DISK_SIZE_MAX).disk_size().unwrap(), DISK_SIZE_MAX);
        let e = o(DISK_SIZE_MAX + 1).disk_size().unwrap_err().to_string();
        assert!(
            e.contains("size is 0x1fffff8000200, max supported is 0x1fffff8000000"),
            "{e}"
        );
        let h = new_header(3 << 20, true);
        let p = super::super::header::Header::parse(&h).unwrap();
        assert_eq!((p.blocks_in_image, p.blocks_allocated), (3, 3));
        assert_eq!((p.offset_bmap, p.offset_data), (512, 1024));
    }

    #[test]
    fn options_as_qemu_parses_them() {
        let parse = |o: &str| VdiOptions::parse(&[o.to_string()]);
        assert!(parse("static=yes").unwrap().is_static);
        assert!(parse("static").unwrap().is_static);
        assert!(!parse("static,nostatic").unwrap().is_static);
        assert!(parse("nocow").is_err());
        assert!(parse("static=maybe").is_err());
        assert!(parse("cluster_size=4k").is_err());
        assert!(parse("preallocation=bogus").unwrap().disk_size().is_err());
        assert!(parse("preallocation=metadata")
            .unwrap()
            .disk_size()
            .is_err());
        assert!(parse("preallocation=full").unwrap().disk_size().is_ok());
    }
}
