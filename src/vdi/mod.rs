//! VirtualBox's VDI images (`-f vdi`, qemu's `block/vdi.c`): read, created and written.
//!
//! Layout (qemu's `block/vdi.c` header comments; VirtualBox's VDI layout as libyal's format
//! notes describe it): a 512-byte header (a text line, the signature `0xbeda107f` at byte 64,
//! version 1.1, the image type — 1 dynamic, 2 static —, the offsets of the block map and of
//! the data area, the sector size 512, the disk size, the block size 1 MiB, the block counts
//! and four UUIDs), then the block map: one little-endian 32-bit entry per 1 MiB block of the
//! disk, the index of the block in the data area, or `0xffffffff` (never written) or
//! `0xfffffffe` (discarded), both reading as zeros. A static image has every block allocated in
//! order when it is created.
//!
//! Hand-written: no maintained Rust crate reads VDI images, and the format is small. Every
//! header field is checked as qemu checks it before use (see [`header`]); the block map is
//! read only when it lies inside the file (so its allocation is bounded by the file's size),
//! and an entry naming a block past the image's block count is refused, as `qemu-img check`
//! reports it ("block index ... too large"). Data lying past the end of the file reads as
//! zeros, as qemu's file layer reads it.
//!
//! `info` shows the block size as the cluster size, as qemu-img does; `map` reports a dynamic
//! image's unwritten blocks as zeros and its written ones as data, and a static image's data
//! as the file's extents (qemu looks through to the file there). `check` finds what qemu's
//! `vdi_check` finds (blocks used twice, a wrong allocated count).
//!
//! Creating ([`create`]) and writing follow qemu's `vdi_co_pwritev`: a write into an unallocated
//! (or discarded) block allocates the next block of the data area (after the last one allocated:
//! the end of the file of a clean image), writes the whole block (the data, zeros around it),
//! then the header with the allocated count raised, then the block map entry, so that a crash
//! before the entry leaves the block unreferenced. vimg writes the header and the block map's
//! sectors up to the entry as one write when they lie together within 64 KiB (the first 16 Ki
//! blocks of a qemu-made image), so that a killed process leaves either no trace or the whole
//! allocation; further out, as qemu, the header goes first (a crash between the two leaves a
//! leaked block that `check` counts in its allocated-count mismatch, never a block used twice).
//! A new block goes right after the last block the map uses, whatever the header's count says
//! (a crash between header and map leaves it one too high: the next allocation takes that block
//! again and writes the count of blocks in use), so an allocation never overwrites data. Zeros written into an unallocated
//! block allocate nothing; a static image has every block allocated at creation.

pub mod create;
pub mod header;

use crate::block::{check_request, BlockImage, BlockStatus, FormatDriver, ImageFormat, ProbeInput};
use crate::chain::ChainGuard;
use crate::error::{Error, Result, ResultExt};
use crate::info::LayerInfo;
use crate::offsets::{GuestOffset, HostOffset};
use crate::storage::Storage;
use header::{Header, BLOCK_SIZE, DISCARDED, SECTOR};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The VDI format's driver.
pub struct VdiDriver;

/// This format's handle.
const VDI: ImageFormat = ImageFormat::of(&VdiDriver);

impl FormatDriver for VdiDriver {
    fn name(&self) -> &'static str {
        "vdi"
    }

    /// Certain for the signature, as qemu's probe.
    fn probe(&self, input: &ProbeInput<'_>) -> u32 {
        if Header::probe(input.head) {
            100
        } else {
            0
        }
    }

    fn open(
        &self,
        path: &Path,
        writable: bool,
        _no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Box<dyn BlockImage>> {
        let storage = VDI.open_layer_file(path, writable, guard)?;
        Ok(Box::new(VdiImage::open_with(storage, path, writable)?))
    }

    fn create_option_help(&self) -> &'static [crate::option_desc::OptDesc] {
        create::CREATE_OPTIONS
    }

    fn prepare_create(
        &self,
        command: &crate::creation::CreateCommand<'_>,
    ) -> Result<Box<dyn crate::creation::FormatCreation>> {
        let path = command.path;
        let mut opts = create::VdiOptions::parse(command.options).in_file(path)?;
        opts.size = Some(command.size_without_backing("vdi", opts.size)?);
        Ok(Box::new(create::VdiCreation {
            path: path.to_path_buf(),
            opts,
            opener: command.opener.clone(),
        }))
    }

    fn check_target_options(&self, options: &[String]) -> Result<()> {
        create::VdiOptions::parse(options).map(|_| ())
    }

    fn target_takes_options(&self) -> bool {
        true
    }

    /// qemu-img writes a target in guest order, so blocks are allocated in that order.
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
        let mut opts = create::VdiOptions::parse(options).in_file(path)?;
        opts.size = Some(size);
        let storage = create::create_image(opener, path, &opts)?;
        Ok(Box::new(VdiImage::open_with(storage, path, true)?))
    }
}

/// What writes change: the block map, the header (its allocated count) and the file's length.
struct State {
    /// The block map, one entry per block.
    bmap: Vec<u32>,
    /// The header sector as read (rewritten with a new allocated count).
    raw_header: [u8; SECTOR as usize],
    /// The header's count of allocated blocks.
    blocks_allocated: u32,
    /// The data block the next allocation takes: after every block the map uses.
    next_block: u32,
    /// Entries of the map that name a block (the count the next allocation writes, plus one).
    in_use: u32,
    /// The file's length: data past it reads as zeros.
    file_len: u64,
}

/// The most header and block map bytes written in one piece when a block is allocated.
const ONE_WRITE_METADATA: u64 = 64 << 10;

/// An open VDI image.
pub struct VdiImage {
    storage: Box<dyn Storage>,
    path: PathBuf,
    header: Header,
    state: Mutex<State>,
    writable: bool,
    /// qemu's `cache=unsafe` (convert's default for its target): flushes do not wait.
    unsafe_cache: std::sync::atomic::AtomicBool,
}

impl VdiImage {
    /// Opens the VDI image in `storage` (`path` for messages) read-only, checking its header
    /// and block map.
    pub fn open(storage: Box<dyn Storage>, path: &Path) -> Result<Self> {
        Self::open_with(storage, path, false)
    }

    /// Opens the VDI image in `storage` (`path` for messages), for writing if `writable`.
    pub fn open_with(storage: Box<dyn Storage>, path: &Path, writable: bool) -> Result<Self> {
        let opening = |e: Error| e.while_opening().with_path(path);
        let file_len = storage
            .len()
            .map_err(|e| Error::io("cannot get image size", e).with_path(path))?;
        let mut head = vec![0u8; SECTOR as usize];
        let n = (file_len.min(SECTOR)) as usize;
        storage
            .read_at(&mut head[..n], 0)
            .map_err(|e| opening(Error::io("could not read the VDI header", e)))?;
        let header = Header::parse(&head).map_err(opening)?;
        let bmap_len = header.bmap_len();
        let bmap_start = u64::from(header.offset_bmap);
        if bmap_start + bmap_len > file_len {
            return Err(opening(Error::corrupt(format!(
                "VDI block map ({bmap_len} bytes at offset {bmap_start}) lies past the end of the file ({file_len} bytes)"
            ))));
        }
        let mut raw = vec![0u8; bmap_len as usize];
        storage
            .read_at(&mut raw, bmap_start)
            .map_err(|e| opening(Error::io("could not read the VDI block map", e)))?;
        let bmap: Vec<u32> = raw
            .chunks_exact(4)
            .take(header.blocks_in_image as usize)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some((i, e)) = bmap
            .iter()
            .enumerate()
            .find(|(_, &e)| e < DISCARDED && e >= header.blocks_in_image)
        {
            return Err(opening(Error::corrupt(format!(
                "block index {i} too large, is {e} (the image has {} blocks)",
                header.blocks_in_image
            ))));
        }
        let mut raw_header = [0u8; SECTOR as usize];
        raw_header.copy_from_slice(&head);
        let in_use = bmap.iter().filter(|&&e| e < DISCARDED).count() as u32;
        let used_end = bmap
            .iter()
            .filter(|&&e| e < DISCARDED)
            .map(|&e| e + 1)
            .max()
            .unwrap_or(0);
        Ok(VdiImage {
            storage,
            path: path.to_path_buf(),
            state: Mutex::new(State {
                bmap,
                raw_header,
                blocks_allocated: header.blocks_allocated,
                next_block: used_end,
                in_use,
                file_len,
            }),
            header,
            writable,
            unsafe_cache: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The host offset of the guest byte `offset` if its block is allocated, and how many bytes
    /// from there (at most `max_len`) stay in the block.
    fn locate(&self, offset: u64, max_len: u64) -> (Option<u64>, u64) {
        self.locate_in(&self.state().bmap, offset, max_len)
    }

    /// [`VdiImage::locate`] with the block map in hand.
    fn locate_in(&self, bmap: &[u32], offset: u64, max_len: u64) -> (Option<u64>, u64) {
        let block = offset / BLOCK_SIZE;
        let in_block = offset % BLOCK_SIZE;
        let n = (BLOCK_SIZE - in_block)
            .min(max_len)
            .min(self.header.disk_size - offset);
        // The header check bounds the disk by the block count, so the block has an entry.
        let entry = bmap[block as usize];
        if entry >= DISCARDED {
            return (None, n);
        }
        let host = u64::from(self.header.offset_data) + u64::from(entry) * BLOCK_SIZE + in_block;
        (Some(host), n)
    }

    /// Reads `buf` from host offset `host`, the part past the end of the file as zeros.
    fn read_host(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let file_len = self.state().file_len;
        let inside = file_len.saturating_sub(host).min(buf.len() as u64) as usize;
        let (data, past) = buf.split_at_mut(inside);
        if !data.is_empty() {
            crate::block::read_host(self.storage.as_ref(), data, host).in_file(&self.path)?;
        }
        past.fill(0);
        Ok(())
    }

    fn write_failed(&self, e: std::io::Error, at: u64) -> Error {
        Error::io("write failed", e).at(at).with_path(&self.path)
    }

    /// Writes `data` (zeros when `None`) at guest offset `offset`, `len` bytes.
    fn write_range(&self, data: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("the image is opened read-only").with_path(&self.path));
        }
        check_request(self.header.disk_size, GuestOffset(offset), len).in_file(&self.path)?;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let mut state = self.state();
            let (host, n) = self.locate_in(&state.bmap, pos, len - done);
            let chunk = data.map(|d| &d[done as usize..(done + n) as usize]);
            match host {
                Some(h) => {
                    drop(state);
                    match chunk {
                        Some(c) => self.storage.write_at(c, h),
                        None => self.storage.zero_range(h, n),
                    }
                    .map_err(|e| self.write_failed(e, h))?;
                }
                None => match chunk {
                    Some(c) if c.iter().any(|&b| b != 0) => {
                        // Under the lock: no other write allocates the block meanwhile.
                        self.allocate(&mut state, pos, c)?
                    }
                    _ => {}
                },
            }
            done += n;
        }
        Ok(())
    }

    /// Allocates the block of guest offset `pos` holding `chunk` at `pos` (zeros elsewhere):
    /// the block's data, then the header with the count raised, then the block map entry.
    fn allocate(&self, state: &mut State, pos: u64, chunk: &[u8]) -> Result<()> {
        let index = (pos / BLOCK_SIZE) as usize;
        let in_block = (pos % BLOCK_SIZE) as usize;
        let slot = state.next_block;
        if slot >= self.header.blocks_in_image {
            return Err(Error::corrupt(format!(
                "no free block left: the block map uses {slot} of the image's {} blocks",
                self.header.blocks_in_image
            ))
            .with_path(&self.path));
        }
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        block[in_block..in_block + chunk.len()].copy_from_slice(chunk);
        let at = u64::from(self.header.offset_data) + u64::from(slot) * BLOCK_SIZE;
        let st = self.storage.as_ref();
        st.write_at(&block, at)
            .map_err(|e| self.write_failed(e, at))?;

        let mut header = state.raw_header;
        let count = state.in_use.saturating_add(1);
        header[388..392].copy_from_slice(&count.to_le_bytes());
        let bmap_start = u64::from(self.header.offset_bmap);
        let sector = index as u64 * 4 / SECTOR;
        let first = (sector * SECTOR / 4) as usize;
        let mut map = vec![0u8; SECTOR as usize];
        for (i, e) in map.chunks_exact_mut(4).enumerate() {
            let k = first + i;
            let v = if k == index {
                slot
            } else {
                state.bmap.get(k).copied().unwrap_or(0)
            };
            e.copy_from_slice(&v.to_le_bytes());
        }
        let map_at = bmap_start + sector * SECTOR;
        if bmap_start == SECTOR && map_at + SECTOR <= ONE_WRITE_METADATA {
            // Header and block map up to the entry's sector, one write.
            let mut meta = Vec::with_capacity((map_at + SECTOR) as usize);
            meta.extend_from_slice(&header);
            let before = ((map_at - SECTOR) / 4) as usize;
            for &e in &state.bmap[..before] {
                meta.extend_from_slice(&e.to_le_bytes());
            }
            meta.extend_from_slice(&map);
            st.write_at(&meta, 0).map_err(|e| self.write_failed(e, 0))?;
        } else {
            st.write_at(&header, 0)
                .map_err(|e| self.write_failed(e, 0))?;
            st.write_at(&map, map_at)
                .map_err(|e| self.write_failed(e, map_at))?;
        }
        state.bmap[index] = slot;
        state.raw_header = header;
        state.blocks_allocated = count;
        state.in_use = count;
        state.next_block = slot + 1;
        state.file_len = state.file_len.max(at + BLOCK_SIZE);
        Ok(())
    }
}

impl BlockImage for VdiImage {
    fn format(&self) -> ImageFormat {
        VDI
    }

    fn filename(&self) -> &Path {
        &self.path
    }

    fn virtual_size(&self) -> u64 {
        self.header.disk_size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.header.disk_size, offset, buf.len() as u64).in_file(&self.path)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.0 + done as u64;
            let (host, n) = self.locate(pos, (buf.len() - done) as u64);
            let part = &mut buf[done..done + n as usize];
            match host {
                Some(h) => self.read_host(part, h)?,
                None => part.fill(0),
            }
            done += n as usize;
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

    /// Unwritten and discarded blocks are zeros; a dynamic image's written blocks are data; a
    /// static image's are the file's extents (data, or zeros stored at their offset).
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        check_request(self.header.disk_size, offset, max_len.max(1)).in_file(&self.path)?;
        let (host, n) = self.locate(offset.0, max_len.max(1));
        let Some(host) = host else {
            return Ok(BlockStatus::zero(n, 0, None));
        };
        if !self.header.is_static() {
            return Ok(BlockStatus::data(n, 0, HostOffset(host)));
        }
        let (is_data, len) = self
            .storage
            .extent_at(host)
            .map_err(|e| Error::io("block status query failed", e).with_path(&self.path))?;
        let mut s = BlockStatus::data(n.min(len.max(1)), 0, HostOffset(host));
        s.zero = !is_data;
        Ok(s)
    }

    fn read_stored(&self, buf: &mut [u8], guest: GuestOffset, _status: &BlockStatus) -> Result<()> {
        self.read_at(buf, guest)
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
        Some(BLOCK_SIZE)
    }

    fn as_check(&self) -> Option<&dyn crate::check::Check> {
        Some(self)
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            filename: self.path.display().to_string(),
            format: VDI.as_str(),
            virtual_size: self.header.disk_size,
            actual_size: self.actual_size(),
            cluster_size: Some(BLOCK_SIZE),
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

/// qemu's `vdi_check`: every data block is used by one guest block at most, and the header's
/// count of allocated blocks is the number of guest blocks that have one. (An entry past the
/// image's block count, qemu's "block index ... too large", is refused when the image opens.)
impl crate::check::Check for VdiImage {
    fn check(&self) -> Result<crate::check::CheckReport> {
        let mut report = crate::check::CheckReport::default();
        let state = self.state();
        let mut used = vec![false; state.bmap.len()];
        let mut allocated = 0u64;
        for &e in state.bmap.iter().filter(|&&e| e < DISCARDED) {
            // Bounded by the block count when the image was opened.
            allocated += 1;
            if std::mem::replace(&mut used[e as usize], true) {
                report
                    .messages
                    .push(format!("ERROR: block index {e} also used by {e}"));
                report.corruptions += 1;
            }
        }
        if allocated != u64::from(state.blocks_allocated) {
            report.messages.push(format!(
                "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
                state.blocks_allocated
            ));
            report.corruptions += 1;
        }
        Ok(report)
    }
}

/// Opens arbitrary bytes as a VDI image in memory and reads its whole disk through block
/// status, a block at a time (the fuzz target `vdi_open_read`). Must never panic, hang or
/// allocate more than the input's size allows.
pub fn exercise(data: &[u8]) {
    let storage = Box::new(crate::storage::MemStorage::new(data.to_vec()));
    let Ok(img) = VdiImage::open(storage, Path::new("fuzz.vdi")) else {
        return;
    };
    let size = img.virtual_size();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut pos = 0u64;
    // Bounded: at most 64 MiB of guest data (the disk may be far larger than the input).
    while pos < size.min(64 << 20) {
        let Ok(s) = img.block_status(GuestOffset(pos), size - pos) else {
            return;
        };
        let n = s.len.min(BLOCK_SIZE);
        assert!(n > 0 && pos + n <= size);
        if img
            .read_at(&mut buf[..n as usize], GuestOffset(pos))
            .is_err()
        {
            return;
        }
        if s.zero && !s.data {
            assert!(buf[..n as usize].iter().all(|&b| b == 0));
        }
        pos += n;
    }
    let _ = img.layer_info();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Check;

    fn image(entries: &[u32], data: &[(u32, u8)]) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[64..68].copy_from_slice(&header::SIGNATURE.to_le_bytes());
        b[68..72].copy_from_slice(&header::VERSION_1_1.to_le_bytes());
        b[76..80].copy_from_slice(&header::TYPE_DYNAMIC.to_le_bytes());
        b[340..344].copy_from_slice(&512u32.to_le_bytes());
        b[344..348].copy_from_slice(&1024u32.to_le_bytes());
        b[360..364].copy_from_slice(&512u32.to_le_bytes());
        let size = entries.len() as u64 * BLOCK_SIZE;
        b[368..376].copy_from_slice(&size.to_le_bytes());
        b[376..380].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[384..388].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        for (i, e) in entries.iter().enumerate() {
            b[512 + 4 * i..516 + 4 * i].copy_from_slice(&e.to_le_bytes());
        }
        for &(blk, v) in data {
            let at = 1024 + blk as usize * BLOCK_SIZE as usize;
            if b.len() < at + BLOCK_SIZE as usize {
                b.resize(at + BLOCK_SIZE as usize, 0);
            }
            b[at..at + BLOCK_SIZE as usize].fill(v);
        }
        b
    }

    fn open(b: Vec<u8>) -> Result<VdiImage> {
        VdiImage::open(
            Box::new(crate::storage::MemStorage::new(b)),
            Path::new("t.vdi"),
        )
    }

    #[test]
    fn blocks_map_through_the_block_map() {
        // Guest block 0 unallocated, 1 at data block 1, 2 discarded, 3 at data block 0.
        let img = open(image(&[u32::MAX, 1, DISCARDED, 0], &[(0, 3), (1, 9)])).unwrap();
        let mut buf = vec![1u8; 4 * BLOCK_SIZE as usize];
        img.read_at(&mut buf, GuestOffset(0)).unwrap();
        let mb = BLOCK_SIZE as usize;
        assert!(buf[..mb].iter().all(|&b| b == 0));
        assert!(buf[mb..2 * mb].iter().all(|&b| b == 9));
        assert!(buf[2 * mb..3 * mb].iter().all(|&b| b == 0));
        assert!(buf[3 * mb..].iter().all(|&b| b == 3));
        let s = img
            .block_status(GuestOffset(BLOCK_SIZE + 5), 2 * BLOCK_SIZE)
            .unwrap();
        assert_eq!(
            (s.len, s.data, s.offset),
            (
                BLOCK_SIZE - 5,
                true,
                Some(HostOffset(1024 + BLOCK_SIZE + 5))
            )
        );
        let s = img.block_status(GuestOffset(2 * BLOCK_SIZE), 10).unwrap();
        assert_eq!((s.len, s.zero, s.data), (10, true, false));
    }

    #[test]
    fn allocation_after_a_crash_reuses_the_leaked_block_and_sets_the_count_right() {
        // Block 0 in use; the header counts 2 (a crash after the header, before the map).
        let mut b = image(&[0, u32::MAX, u32::MAX], &[(0, 3)]);
        b[388..392].copy_from_slice(&2u32.to_le_bytes());
        let img = VdiImage::open_with(
            Box::new(crate::storage::MemStorage::new(b)),
            Path::new("t.vdi"),
            true,
        )
        .unwrap();
        assert_eq!(img.check().unwrap().corruptions, 1);
        img.write_at(&[7u8; 512], GuestOffset(2 * BLOCK_SIZE + 512))
            .unwrap();
        img.write_zeroes(GuestOffset(BLOCK_SIZE), 4096, false)
            .unwrap();
        let r = img.check().unwrap();
        assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        let s = img.block_status(GuestOffset(2 * BLOCK_SIZE), 1).unwrap();
        assert_eq!(s.offset, Some(HostOffset(1024 + BLOCK_SIZE)));
        assert!(img.block_status(GuestOffset(BLOCK_SIZE), 1).unwrap().zero);
        let mut buf = vec![0u8; 1024];
        img.read_at(&mut buf, GuestOffset(2 * BLOCK_SIZE)).unwrap();
        assert!(buf[..512].iter().all(|&x| x == 0) && buf[512..].iter().all(|&x| x == 7));
    }

    #[test]
    fn hostile_block_maps_are_refused_and_short_files_read_as_zeros() {
        let e = open(image(&[7, u32::MAX], &[])).err().unwrap().to_string();
        assert!(
            e.contains("block index 0 too large, is 7") && e.contains("t.vdi"),
            "{e}"
        );
        let mut b = image(&[0, 1], &[(0, 4)]);
        b[384..388].copy_from_slice(&0x1fff_0000u32.to_le_bytes());
        let e = open(b).err().unwrap().to_string();
        assert!(e.contains("lies past the end of the file"), "{e}");
        // Block 1 lies past the end of the file: zeros, as qemu reads it.
        let img = open(image(&[0, 1], &[(0, 4)])).unwrap();
        let mut buf = vec![1u8; 512];
        img.read_at(&mut buf, GuestOffset(BLOCK_SIZE)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        exercise(&image(&[0, 1, u32::MAX], &[(0, 4)]));
    }
}
