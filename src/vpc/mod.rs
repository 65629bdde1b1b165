//! Virtual PC / Hyper-V VHD images (`-f vpc`, qemu's `block/vpc.c`).
//!
//! A VHD file ends with a 512-byte footer (cookie `conectix`, big-endian fields, a ones'
//! complement byte-sum checksum). A *fixed* disk is the guest disk followed by that footer. A
//! *dynamic* disk starts with a copy of the footer, then a dynamic disk header (`cxsparse`)
//! pointing at the block allocation table (BAT); each allocated block is a sector bitmap
//! followed by the block's data. Sources: Microsoft's "Virtual Hard Disk Image Format
//! Specification" (footer, dynamic header, BAT and bitmap layouts, the CHS geometry
//! algorithm), the comments of qemu's `block/vpc.c` (which size to trust, from the creator
//! application), and libyal's libvhdi notes. Hand-written: no maintained Rust crate reads and
//! writes VHD with qemu's size rules.
//!
//! What qemu does, vimg does: the disk size is the CHS geometry's unless the creator
//! application is one that records the exact size ([`footer::Footer::disk_size`]); reads of
//! an allocated block return its data whatever its sector bitmap says (qemu sets every bit
//! of a block it allocates and ignores the bitmap on reads); unallocated blocks read as zeros.
//! Differencing disks are refused. A write into an unallocated block of a dynamic disk
//! allocates it where the footer was: its bitmap (all ones, as qemu writes it), the data, the
//! footer moved past the block, then the BAT entry, so that a crash before the entry leaves
//! the block unreferenced. Zeros written into an unallocated block allocate nothing.

pub mod bat;
pub mod create;
pub mod footer;

use crate::block::{check_request, BlockImage, BlockStatus, FormatDriver, ImageFormat, ProbeInput};
use crate::chain::ChainGuard;
use crate::error::{Error, Result, ResultExt};
use crate::info::LayerInfo;
use crate::offsets::{GuestOffset, HostOffset};
use crate::storage::Storage;
use bat::Bat;
use footer::{DiskType, DynHeader, Footer, DYN_HEADER_LEN, FOOTER_LEN};
use std::path::{Path, PathBuf};

/// The vpc format's driver.
pub struct VpcDriver;

/// This format's handle.
const VPC: ImageFormat = ImageFormat::of(&VpcDriver);

impl FormatDriver for VpcDriver {
    fn name(&self) -> &'static str {
        "vpc"
    }

    /// Certain for `conectix` at offset 0 (a dynamic disk's footer copy), as qemu's probe. A
    /// fixed disk has its footer only at the end, which qemu's probe does not look at.
    fn probe(&self, input: &ProbeInput<'_>) -> u32 {
        input.magic(b"conectix")
    }

    fn open(
        &self,
        path: &Path,
        writable: bool,
        _no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Box<dyn BlockImage>> {
        let storage = VPC.open_layer_file(path, writable, guard)?;
        Ok(Box::new(VpcImage::open(storage, path, writable)?))
    }

    /// The format's own options, as qemu lists them (the file's, such as `preallocation`, are
    /// the protocol's).
    fn create_option_help(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("force_size=<bool (on/off)>", "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation"),
            ("size=<size>", "Virtual disk size"),
            ("subformat=<str>", "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "),
        ]
    }

    fn prepare_create(
        &self,
        command: &crate::creation::CreateCommand<'_>,
    ) -> Result<Box<dyn crate::creation::FormatCreation>> {
        let path = command.path;
        let mut opts = create::VpcOptions::parse(command.options).in_file(path)?;
        opts.size = Some(command.size_without_backing("vpc", opts.size)?);
        Ok(Box::new(create::VpcCreation {
            path: path.to_path_buf(),
            opts,
            opener: command.opener.clone(),
        }))
    }

    fn check_target_options(&self, options: &[String]) -> Result<()> {
        create::VpcOptions::parse(options)?.fixed().map(|_| ())
    }

    fn target_takes_options(&self) -> bool {
        true
    }

    fn writes_in_order(&self) -> bool {
        true
    }

    fn create_target(
        &self,
        path: &Path,
        size: u64,
        options: &[String],
        _backing: (Option<String>, Option<String>),
        _no_backing: bool,
        opener: &crate::opener::Opener,
    ) -> Result<Box<dyn BlockImage>> {
        let mut opts = create::VpcOptions::parse(options).in_file(path)?;
        opts.size = Some(size);
        let storage = create::create_image(opener, path, &opts)?;
        Ok(Box::new(VpcImage::open(storage, path, true)?))
    }
}

/// An open VHD image.
pub struct VpcImage {
    storage: Box<dyn Storage>,
    path: PathBuf,
    size: u64,
    /// The BAT of a dynamic disk; `None` for a fixed one.
    bat: Option<Bat>,
    /// The footer, as rewritten past a newly allocated block.
    footer: [u8; FOOTER_LEN],
    writable: bool,
    /// qemu's `cache=unsafe` (convert's default for its target): flushes do not wait.
    unsafe_cache: std::sync::atomic::AtomicBool,
}

impl VpcImage {
    /// Opens the VHD in `storage` (`path` for messages), checking its footer, dynamic header and
    /// BAT as qemu does before anything is read through them.
    pub fn open(storage: Box<dyn Storage>, path: &Path, writable: bool) -> Result<Self> {
        let opening = |e: Error| e.while_opening().with_path(path);
        let len = storage
            .len()
            .map_err(|e| Error::io("cannot get image size", e).with_path(path))?;
        if len < FOOTER_LEN as u64 {
            return Err(opening(Error::corrupt(format!(
                "file too small for a VHD footer ({len} bytes)"
            ))));
        }
        let read = |buf: &mut [u8], at: u64, what: &str| {
            storage
                .read_at(buf, at)
                .map_err(|e| opening(Error::io(format!("cannot read the {what}"), e)))
        };
        let mut fb = [0u8; FOOTER_LEN];
        read(&mut fb, 0, "footer")?;
        if !fb.starts_with(b"conectix") {
            read(&mut fb, len - FOOTER_LEN as u64, "footer")?;
        }
        let footer = Footer::parse(&fb).map_err(opening)?;
        let size = footer.disk_size().map_err(opening)?;
        let bat = match footer.disk_type {
            DiskType::Fixed if writable && size + FOOTER_LEN as u64 > len => {
                return Err(opening(Error::corrupt(format!(
                    "the {size}-byte fixed disk does not fit before its footer in the {len}-byte file"
                ))))
            }
            DiskType::Fixed => None,
            DiskType::Dynamic => {
                // A header that starts in the file and runs past its end reads zeros there,
                // as in qemu, so that its fields are refused in qemu's words.
                let at = footer.data_offset;
                if at >= len {
                    return Err(opening(Error::corrupt(format!(
                        "dynamic disk header offset {at} lies past the end of the file ({len} bytes)"
                    ))));
                }
                let mut hb = [0u8; DYN_HEADER_LEN];
                read(&mut hb, at, "dynamic disk header")?;
                let header = DynHeader::parse(&hb).map_err(opening)?;
                Some(Bat::load(storage.as_ref(), &header, size, len).map_err(opening)?)
            }
        };
        Ok(VpcImage {
            storage,
            path: path.to_path_buf(),
            size,
            bat,
            footer: fb,
            writable,
            unsafe_cache: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn write_failed(&self, e: std::io::Error, at: u64) -> Error {
        Error::io("write failed", e).at(at).with_path(&self.path)
    }

    /// Allocates the block of guest offset `pos` of a dynamic disk (if no other write has):
    /// its bitmap at the end of the data, the footer past it, then its BAT entry.
    fn allocate(&self, bat: &Bat, pos: u64) -> Result<()> {
        let mut next = bat.next_free.lock().unwrap_or_else(|e| e.into_inner());
        if bat.host_offset(pos).is_some() {
            return Ok(());
        }
        let idx = pos / bat.block_size;
        let base = *next;
        let end = base + bat.bitmap_size + bat.block_size;
        let sector = u32::try_from(base / 512)
            .ok()
            .filter(|&s| s != bat::UNALLOCATED)
            .ok_or_else(|| {
                Error::unsupported(format!("no room for another block at offset {base}"))
                    .with_path(&self.path)
            })?;
        let st = self.storage.as_ref();
        st.write_at(&vec![0xff; bat.bitmap_size as usize], base)
            .map_err(|e| self.write_failed(e, base))?;
        st.write_at(&self.footer, end)
            .map_err(|e| self.write_failed(e, end))?;
        let at = bat.table_offset + idx * 4;
        st.write_at(&sector.to_be_bytes(), at)
            .map_err(|e| self.write_failed(e, at))?;
        bat.entries.write().unwrap_or_else(|e| e.into_inner())[idx as usize] = sector;
        *next = end;
        Ok(())
    }

    /// Writes `data` (zeros when `None`) at guest offset `offset`, `len` bytes.
    fn write_range(&self, data: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("the image is opened read-only").with_path(&self.path));
        }
        check_request(self.size, GuestOffset(offset), len).in_file(&self.path)?;
        let Some(bat) = &self.bat else {
            return match data {
                Some(d) => self.storage.write_at(d, offset),
                None => self.storage.zero_range(offset, len),
            }
            .map_err(|e| self.write_failed(e, offset));
        };
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let n = (bat.block_size - pos % bat.block_size).min(len - done);
            let chunk = data.map(|d| &d[done as usize..(done + n) as usize]);
            if bat.host_offset(pos).is_none() {
                if chunk.is_none_or(|c| c.iter().all(|&b| b == 0)) {
                    done += n;
                    continue;
                }
                self.allocate(bat, pos)?;
            }
            let host = bat.host_offset(pos).ok_or_else(|| {
                Error::corrupt(format!("block of guest offset {pos} was not allocated"))
                    .with_path(&self.path)
            })?;
            match chunk {
                Some(c) => self.storage.write_at(c, host),
                None => self.storage.zero_range(host, n),
            }
            .map_err(|e| self.write_failed(e, host))?;
            done += n;
        }
        Ok(())
    }

    fn read_failed(&self, e: std::io::Error, at: u64) -> Error {
        Error::io("read failed", e).at(at).with_path(&self.path)
    }
}

impl BlockImage for VpcImage {
    fn format(&self) -> ImageFormat {
        VPC
    }

    fn filename(&self) -> &Path {
        &self.path
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64).in_file(&self.path)?;
        let Some(bat) = &self.bat else {
            return self
                .storage
                .read_at(buf, offset.0)
                .map_err(|e| self.read_failed(e, offset.0));
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.0 + done as u64;
            let in_block = (bat.block_size - pos % bat.block_size).min((buf.len() - done) as u64);
            let chunk = &mut buf[done..done + in_block as usize];
            match bat.host_offset(pos) {
                Some(host) => self
                    .storage
                    .read_at(chunk, host)
                    .map_err(|e| self.read_failed(e, host))?,
                None => chunk.fill(0),
            }
            done += in_block as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        self.write_range(Some(buf), offset.0, buf.len() as u64)
    }

    fn write_zeroes(&self, offset: GuestOffset, len: u64, _unmap: bool) -> Result<()> {
        self.write_range(None, offset.0, len)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable || self.unsafe_cache.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.storage
            .flush()
            .map_err(|e| Error::io("flush failed", e).with_path(&self.path))
    }

    /// As qemu: a fixed disk is data at its own offset (zeros where the file has a hole); in
    /// a dynamic disk an allocated block is data (one block at a time: bitmaps lie between
    /// blocks), a run of unallocated blocks reads as zeros.
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        let max_len = max_len.max(1);
        check_request(self.size, offset, max_len).in_file(&self.path)?;
        let Some(bat) = &self.bat else {
            let (is_data, n) = self
                .storage
                .extent_at(offset.0)
                .map_err(|e| Error::io("block status query failed", e).with_path(&self.path))?;
            let mut s = BlockStatus::data(n.min(max_len).max(1), 0, HostOffset(offset.0));
            s.zero = !is_data;
            return Ok(s);
        };
        let block_end = |p: u64| (p / bat.block_size + 1) * bat.block_size;
        if let Some(host) = bat.host_offset(offset.0) {
            let len = (block_end(offset.0) - offset.0).min(max_len);
            return Ok(BlockStatus::data(len, 0, HostOffset(host)));
        }
        let end = offset.0 + max_len;
        let mut pos = block_end(offset.0);
        while pos < end && bat.host_offset(pos).is_none() {
            pos = block_end(pos);
        }
        Ok(BlockStatus::zero(pos.min(end) - offset.0, 0, None))
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    /// Every write goes straight to the file, in order; with `on` nothing waits for the disk.
    fn set_unsafe_cache(&self, on: bool) {
        self.unsafe_cache
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn actual_size(&self) -> Option<u64> {
        self.storage.allocated_bytes()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.bat.as_ref().map(|b| b.block_size)
    }

    fn stored_data(&self) -> Option<&dyn Storage> {
        Some(self.storage.as_ref())
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            filename: self.path.display().to_string(),
            format: VPC.as_str(),
            virtual_size: self.size,
            actual_size: self.actual_size(),
            cluster_size: self.cluster_size(),
            encrypted: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            backing_format_probed: false,
            snapshots: Vec::new(),
            dirty_flag: false,
            format_specific: None,
        })
    }
}

/// Opens arbitrary bytes as a VHD and reads every block status and (a bounded part of) the
/// disk: what the fuzz target `vpc_open_read` and its hostile-input tests run. Never panics and
/// allocates at most about the input's size.
pub fn exercise(data: &[u8]) {
    let storage = Box::new(crate::storage::MemStorage::new(data.to_vec()));
    let Ok(img) = VpcImage::open(storage, Path::new("fuzz.vhd"), false) else {
        return;
    };
    let _ = img.layer_info();
    let size = img.virtual_size();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        let Ok(s) = img.block_status(GuestOffset(pos), size - pos) else {
            return;
        };
        let n = s.len.min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], GuestOffset(pos));
        pos += s.len;
    }
}
