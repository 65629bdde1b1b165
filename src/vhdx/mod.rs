//! Hyper-V's VHDX images (`-f vhdx`, qemu's `block/vhdx.c`, `vhdx-log.c`).
//!
//! A VHDX file starts with a 1 MiB header section: the file identifier (`vhdxfile`), two
//! headers at 64 KiB and 128 KiB (CRC-32C, the valid one with the higher sequence number is
//! current) and two copies of the region table at 192 KiB and 256 KiB, which locate the BAT and
//! the metadata region (block size, disk size, sector sizes, page 83 GUID). A metadata log,
//! located by the header, holds metadata writes that a crash may have left unapplied. Payload
//! blocks (1-256 MiB) are wherever the BAT says. Sources: Microsoft's [MS-VHDX] open
//! specification (structures, log entries, BAT states), qemu's `block/vhdx*.c` read for what
//! qemu checks and refuses. Hand-written: no maintained Rust crate reads, replays and writes
//! VHDX with qemu's rules.
//!
//! What qemu does, vimg does: the header, log, region table, metadata and BAT are checked in
//! that order when the image is opened; a log to replay is replayed by a read-write open and
//! refuses a read-only one (`check -r` replays it); differencing disks are refused; blocks
//! not in the file read as zeros, fully present ones as their data; `map` shows the whole disk
//! as data (qemu's driver answers no block-status query). A write into a block not in the file
//! allocates it at the end of the file (1 MiB aligned), writes the data, then updates the BAT
//! through the log as qemu does: log entry, flush, BAT written, flush, log cleared. vimg batches
//! the BAT updates of a session until the next flush; a crash before then leaves the new blocks
//! unreferenced (their guest ranges read as before), never a BAT entry pointing at unwritten
//! data. Zeros written into a block not in the file allocate nothing.

pub mod bat;
pub mod create;
pub mod layout;
pub mod log;

use crate::block::{check_request, BlockImage, BlockStatus, FormatDriver, ImageFormat, ProbeInput};
use crate::chain::{ChainGuard, Sharing};
use crate::check::{Check, CheckReport};
use crate::error::{Error, Result, ResultExt};
use crate::info::LayerInfo;
use crate::lock::LockRequest;
use crate::offsets::GuestOffset;
use crate::storage::{DebugEvent, Storage};
use bat::{Bat, FULLY_PRESENT, OFFSET_MASK, STATE_MASK};
use layout::{Header, Metadata, HEADER_OFFSETS, HEADER_SECTION_END, HEADER_SIZE};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The vhdx format's driver.
pub struct VhdxDriver;

/// This format's handle.
const VHDX: ImageFormat = ImageFormat::of(&VhdxDriver);

impl FormatDriver for VhdxDriver {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    /// Certain for `vhdxfile` at offset 0, as qemu's probe.
    fn probe(&self, input: &ProbeInput<'_>) -> u32 {
        input.magic(b"vhdxfile")
    }

    fn open(
        &self,
        path: &Path,
        writable: bool,
        _no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Box<dyn BlockImage>> {
        let storage = VHDX.open_layer_file(path, writable, guard)?;
        Ok(Box::new(VhdxImage::open(storage, path, writable, false)?))
    }

    /// The format's own options, as qemu lists them.
    fn create_option_help(&self) -> &'static [crate::option_desc::OptDesc] {
        create::CREATE_OPTIONS
    }

    fn prepare_create(
        &self,
        command: &crate::creation::CreateCommand<'_>,
    ) -> Result<Box<dyn crate::creation::FormatCreation>> {
        create::prepare(command)
    }

    fn check_target_options(&self, options: &[String]) -> Result<()> {
        create::VhdxOptions::parse(options)?.check(0).map(|_| ())
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
        let mut opts = create::VhdxOptions::parse(options).in_file(path)?;
        opts.size = Some(size);
        let storage = create::create_image(opener, path, &opts)?;
        Ok(Box::new(VhdxImage::open(storage, path, true, false)?))
    }

    /// `check` of an image whose BAT points outside the file: opened as for a check (qemu's
    /// `BDRV_O_CHECK`), it is checked rather than refused.
    fn check_unopenable(
        &self,
        path: &Path,
        sharing: Sharing,
        opener: &crate::opener::Opener,
    ) -> Option<CheckReport> {
        let locks = VHDX.locks(sharing, false, true).ok()?;
        let storage = opener.open(path, false, locks).ok()?;
        let img = VhdxImage::open(storage, path, false, true).ok()?;
        Some(img.check_report())
    }

    /// `check -r`: a read-write open replays the log; the check that follows counts the
    /// replay as a corruption fixed, as qemu's.
    fn repair(
        &self,
        path: &Path,
        _all: bool,
        opener: &crate::opener::Opener,
    ) -> Option<Result<CheckReport>> {
        Some((|| {
            let storage = opener
                .open(path, true, LockRequest::exclusive(true))
                .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
            let img = VhdxImage::open(storage, path, true, true)?;
            let report = img.check_report();
            img.finish()?;
            Ok(report)
        })())
    }
}

/// What a session of writes changes besides guest data: the headers, and the BAT sectors
/// not yet written.
#[derive(Debug)]
struct Session {
    headers: [Header; 2],
    current: usize,
    /// The file write GUID of this session.
    guid: [u8; 16],
    /// Whether the headers already carry this session's GUIDs.
    started: bool,
    /// Where the next block goes: the end of the file.
    file_end: u64,
    /// BAT sectors (4 KiB, by index from the table's start) changed in memory only.
    dirty: BTreeSet<u64>,
}

/// An open VHDX image.
pub struct VhdxImage {
    storage: Box<dyn Storage>,
    path: PathBuf,
    meta: Metadata,
    bat: Bat,
    log_length: u64,
    log_offset: u64,
    /// Where the header section, log, BAT and metadata are: no payload block may overlap them.
    regions: Vec<(u64, u64)>,
    session: Mutex<Session>,
    writable: bool,
    log_replayed: bool,
    unsafe_cache: AtomicBool,
}

fn random_guid() -> [u8; 16] {
    let mut g = [0u8; 16];
    if getrandom::fill(&mut g).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        g = t.to_le_bytes();
    }
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

impl VhdxImage {
    /// Opens the VHDX in `storage` (`path` for messages) as qemu's `vhdx_open`: file identifier,
    /// headers, log (replayed when `writable`, else refused), region table, metadata and BAT.
    /// With `for_check`, BAT entries pointing outside the file are left for the check to
    /// report instead of refusing the image.
    pub fn open(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
        for_check: bool,
    ) -> Result<Self> {
        let opening = |e: Error| e.while_opening().with_path(path);
        let file_len = || {
            storage
                .len()
                .map_err(|e| opening(Error::io("cannot get image size", e)))
        };
        let mut len = file_len()?;
        let read = |buf: &mut [u8], at: u64, len: u64| {
            log::read_padded(storage.as_ref(), buf, at, len).map_err(opening)
        };
        let mut sig = [0u8; 8];
        read(&mut sig, 0, len)?;
        if &sig != b"vhdxfile" {
            return Err(opening(Error::corrupt(
                "invalid VHDX image: no 'vhdxfile' signature",
            )));
        }
        let mut hb = vec![0u8; HEADER_SIZE];
        let mut headers = [None, None];
        for (i, at) in HEADER_OFFSETS.into_iter().enumerate() {
            read(&mut hb, at, len)?;
            headers[i] = Header::parse(&hb);
        }
        let current = layout::current_header(&headers).map_err(opening)?;
        let header = headers[current].clone().unwrap_or_else(unreachable_header);
        let headers = [
            headers[0].clone().unwrap_or_else(|| header.clone()),
            headers[1].clone().unwrap_or_else(|| header.clone()),
        ];
        let mut session = Session {
            headers,
            current,
            guid: random_guid(),
            started: false,
            file_end: len,
            dirty: BTreeSet::new(),
        };

        let log = log::Log::new(storage.as_ref(), len, &header).map_err(opening)?;
        let mut log_replayed = false;
        if let Some(seq) = log.find_active().map_err(opening)? {
            if !writable {
                let name = path.display();
                return Err(opening(Error::new(
                    crate::error::ErrorKind::Unsupported,
                    format!("VHDX image file '{name}' opened read-only, but contains a log that needs to be replayed. To replay the log, run: vimg check -r all '{name}'"),
                )));
            }
            log.replay(&seq).map_err(opening)?;
            storage
                .flush()
                .map_err(|e| opening(Error::io("cannot replay the log", e)))?;
            len = file_len()?;
            session.file_end = len;
            log_replayed = true;
        }
        let (log_offset, log_length) = (header.log_offset, u64::from(header.log_length));

        let mut rt = vec![0u8; layout::REGION_TABLE_SIZE];
        read(&mut rt, layout::REGION_TABLE_OFFSETS[0], len)?;
        let regions = layout::parse_regions(&rt, (log_offset, log_length)).map_err(opening)?;
        let md = regions.metadata;
        let mut table = vec![0u8; layout::METADATA_TABLE_SIZE];
        read(&mut table, md.offset, len)?;
        let meta = layout::parse_metadata(&table, &mut |off, n| {
            if u64::from(off) + u64::from(n) > u64::from(md.length) {
                return Err(Error::corrupt(format!(
                    "invalid metadata: an item at offset {off} ({n} bytes) lies outside the {}-byte metadata region",
                    md.length
                )));
            }
            let mut b = vec![0u8; n as usize];
            log::read_padded(storage.as_ref(), &mut b, md.offset + u64::from(off), len)?;
            Ok(b)
        })
        .map_err(opening)?;
        if meta.virtual_size > layout::MAX_IMAGE_SIZE * 4 {
            return Err(opening(Error::corrupt(format!(
                "invalid metadata: virtual disk size {} is too large",
                meta.virtual_size
            ))));
        }
        let bat = Bat::load(
            storage.as_ref(),
            &meta,
            regions.bat.offset,
            regions.bat.length,
            len,
        )
        .map_err(opening)?;
        let region_list = vec![
            (0, HEADER_SECTION_END),
            (log_offset, log_offset.saturating_add(log_length)),
            (
                regions.bat.offset,
                regions.bat.offset + u64::from(regions.bat.length),
            ),
            (md.offset, md.offset + u64::from(md.length)),
        ];
        let img = VhdxImage {
            storage,
            path: path.to_path_buf(),
            meta,
            bat,
            log_length,
            log_offset,
            regions: region_list,
            session: Mutex::new(session),
            writable,
            log_replayed,
            unsafe_cache: AtomicBool::new(false),
        };
        if !for_check {
            if let Some(p) = img.bat_problems().into_iter().next() {
                return Err(opening(Error::corrupt(p)));
            }
        }
        if log_replayed {
            // qemu marks the session's first write, then clears the log.
            let mut s = img.lock();
            img.start_session(&mut s).map_err(opening)?;
            img.update_headers(&mut s, false, Some([0; 16]))
                .map_err(opening)?;
        }
        if writable && !img.bat.offset.is_multiple_of(log::SECTOR) {
            return Err(opening(Error::unsupported(
                "the BAT is not aligned to 4 KiB, which vimg cannot update through the log",
            )));
        }
        Ok(img)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bat_problems(&self) -> Vec<String> {
        let len = self.storage.len().unwrap_or(0);
        self.bat
            .problems(self.meta.virtual_size, len, &self.regions)
            .into_iter()
            .chain(self.low_blocks())
            .collect()
    }

    /// Present payload blocks inside the header section: qemu reads such a block from the
    /// start of the file and refuses to write it; vimg refuses the image.
    fn low_blocks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for b in 0..self.bat.geo.data_blocks {
            let e = self.bat.entry(b);
            if e & STATE_MASK == FULLY_PRESENT && e & OFFSET_MASK < HEADER_SECTION_END {
                out.push(format!(
                    "VHDX BAT entry {} offset {} lies in the header section",
                    self.bat.geo.index(b),
                    e & OFFSET_MASK
                ));
            }
        }
        out
    }

    /// The check qemu's `vhdx_co_check` makes: the replay of a log counts as a corruption
    /// fixed, every BAT entry outside the file or over the metadata as a corruption.
    fn check_report(&self) -> CheckReport {
        // qemu reports them through error_report: with the program's name.
        let messages: Vec<String> = self
            .bat_problems()
            .into_iter()
            .map(|m| format!("vimg: {m}"))
            .collect();
        CheckReport {
            corruptions: messages.len() as u64,
            corruptions_fixed: u64::from(self.log_replayed),
            messages,
            ..Default::default()
        }
    }

    fn sync(&self) -> Result<()> {
        if self.unsafe_cache.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.storage
            .flush()
            .map_err(|e| Error::io("flush failed", e).with_path(&self.path))
    }

    fn write_failed(&self, e: std::io::Error, at: u64) -> Error {
        Error::io("write failed", e).at(at).with_path(&self.path)
    }

    /// Writes the non-current header as the current one with the next sequence number, this
    /// session's file write GUID, a new data write GUID if `data` and the log GUID `log_guid`
    /// if given; it becomes current. qemu's `vhdx_update_header`.
    fn update_header(&self, s: &mut Session, data: bool, log_guid: Option<[u8; 16]>) -> Result<()> {
        let other = 1 - s.current;
        let mut h = s.headers[s.current].clone();
        h.sequence_number = h.sequence_number.wrapping_add(1);
        h.file_write_guid = s.guid;
        if data {
            h.data_write_guid = random_guid();
        }
        if let Some(g) = log_guid {
            h.log_guid = g;
        }
        let at = HEADER_OFFSETS[other];
        self.storage
            .write_at(&h.to_bytes(), at)
            .map_err(|e| self.write_failed(e, at))?;
        self.sync()?;
        s.headers[other] = h;
        s.current = other;
        Ok(())
    }

    /// Both headers, as the spec asks (qemu's `vhdx_update_headers`).
    fn update_headers(
        &self,
        s: &mut Session,
        data: bool,
        log_guid: Option<[u8; 16]>,
    ) -> Result<()> {
        self.update_header(s, data, log_guid)?;
        self.update_header(s, data, log_guid)
    }

    /// Marks the session's first change, as qemu's `vhdx_user_visible_write`.
    fn start_session(&self, s: &mut Session) -> Result<()> {
        if !s.started {
            s.started = true;
            self.update_headers(s, true, None)?;
        }
        Ok(())
    }

    /// Writes the BAT sectors changed in memory through the log: for each batch, a log GUID in
    /// the headers, the entry, flush, the sectors, flush, the log GUID cleared.
    fn flush_bat(&self) -> Result<()> {
        let mut s = self.lock();
        if s.dirty.is_empty() {
            return Ok(());
        }
        self.start_session(&mut s)?;
        let sectors: Vec<u64> = s.dirty.iter().copied().collect();
        let max = log::max_sectors(self.log_length).max(1);
        let file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("cannot get image size", e).with_path(&self.path))?;
        for batch in sectors.chunks(max) {
            let writes = batch
                .iter()
                .map(|&i| Ok((self.bat.offset + i * log::SECTOR, self.bat_sector(i)?)))
                .collect::<Result<Vec<_>>>()?;
            let log_fits = log::max_sectors(self.log_length) > 0;
            if log_fits {
                let guid = random_guid();
                self.sync()?;
                self.update_headers(&mut s, false, Some(guid))?;
                let e = log::entry(&writes, 1, guid, file_len);
                self.storage
                    .write_at(&e, self.log_offset)
                    .map_err(|err| self.write_failed(err, self.log_offset))?;
                self.sync()?;
            }
            for (at, b) in &writes {
                self.storage
                    .write_at(b, *at)
                    .map_err(|e| self.write_failed(e, *at))?;
            }
            self.sync()?;
            if log_fits {
                self.update_headers(&mut s, false, Some([0; 16]))?;
            }
        }
        s.dirty.clear();
        Ok(())
    }

    /// BAT sector `i` as it is now: the file's bytes under the entries in memory.
    fn bat_sector(&self, i: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; log::SECTOR as usize];
        let at = self.bat.offset + i * log::SECTOR;
        let len = self.storage.len().unwrap_or(0);
        log::read_padded(self.storage.as_ref(), &mut b, at, len).in_file(&self.path)?;
        let entries = self.bat.entries.read().unwrap_or_else(|e| e.into_inner());
        for k in 0..512u64 {
            if let Some(e) = entries.get((i * 512 + k) as usize) {
                b[k as usize * 8..k as usize * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
        }
        Ok(b)
    }

    /// Allocates payload block `block` at the end of the file (1 MiB aligned), unless another
    /// write has; returns its file offset.
    fn allocate(&self, block: u64) -> Result<u64> {
        let mut s = self.lock();
        let e = self.bat.entry(block);
        if e & STATE_MASK == FULLY_PRESENT {
            return Ok(e & OFFSET_MASK);
        }
        self.start_session(&mut s)?;
        let at = s.file_end.next_multiple_of(1 << 20);
        let end = at + self.bat.geo.block_size;
        self.storage
            .set_len(end)
            .map_err(|e| self.write_failed(e, at))?;
        s.file_end = end;
        let idx = self.bat.geo.index(block);
        self.bat.entries.write().unwrap_or_else(|e| e.into_inner())[idx as usize] =
            at | FULLY_PRESENT;
        s.dirty.insert(idx * 8 / log::SECTOR);
        Ok(at)
    }

    /// Writes `data` (zeros when `None`) at guest offset `offset`, `len` bytes.
    fn write_range(&self, data: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("the image is opened read-only").with_path(&self.path));
        }
        check_request(self.meta.virtual_size, GuestOffset(offset), len).in_file(&self.path)?;
        let bs = self.bat.geo.block_size;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let n = (bs - pos % bs).min(len - done);
            let chunk = data.map(|d| &d[done as usize..(done + n) as usize]);
            let block = pos / bs;
            let e = self.bat.entry(block);
            let host = match e & STATE_MASK {
                FULLY_PRESENT => e & OFFSET_MASK,
                bat::PARTIALLY_PRESENT | 4 => return Err(self.bad_state(block, e)),
                _ if chunk.is_none_or(crate::zeros::is_zero) => {
                    done += n;
                    continue;
                }
                _ => self.allocate(block)?,
            } + pos % bs;
            {
                let mut s = self.lock();
                self.start_session(&mut s)?;
            }
            self.storage.debug_event(DebugEvent::WriteAio);
            match chunk {
                Some(c) => self.storage.write_at(c, host),
                None => self.storage.zero_range(host, n),
            }
            .map_err(|e| self.write_failed(e, host))?;
            done += n;
        }
        Ok(())
    }

    fn bad_state(&self, block: u64, e: u64) -> Error {
        Error::corrupt(format!(
            "block {block} has BAT state {}, which vimg reads only in differencing images (not supported)",
            e & STATE_MASK
        ))
        .with_path(&self.path)
    }
}

/// A header when [`layout::current_header`] chose one: never used.
fn unreachable_header() -> Header {
    Header {
        sequence_number: 0,
        file_write_guid: [0; 16],
        data_write_guid: [0; 16],
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: 0,
        log_offset: 0,
    }
}

impl Drop for VhdxImage {
    fn drop(&mut self) {
        if self.writable {
            let _ = self.flush_bat();
        }
    }
}

impl Check for VhdxImage {
    fn check(&self) -> Result<CheckReport> {
        Ok(self.check_report())
    }
}

impl BlockImage for VhdxImage {
    fn format(&self) -> ImageFormat {
        VHDX
    }

    fn filename(&self) -> &Path {
        &self.path
    }

    fn virtual_size(&self) -> u64 {
        self.meta.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.meta.virtual_size, offset, buf.len() as u64).in_file(&self.path)?;
        let bs = self.bat.geo.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.0 + done as u64;
            let n = (bs - pos % bs).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + n];
            let e = self.bat.entry(pos / bs);
            match e & STATE_MASK {
                FULLY_PRESENT => {
                    let host = (e & OFFSET_MASK) + pos % bs;
                    self.storage.debug_event(DebugEvent::ReadAio);
                    self.storage.read_at(chunk, host).map_err(|err| {
                        Error::io("read failed", err).at(host).with_path(&self.path)
                    })?
                }
                bat::PARTIALLY_PRESENT | 4 => return Err(self.bad_state(pos / bs, e)),
                _ => chunk.fill(0),
            }
            done += n;
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
        if !self.writable {
            return Ok(());
        }
        self.flush_bat()?;
        // `-t unsafe` (convert's default, as qemu-img's): the table is written, nothing waits
        // for the disk.
        self.sync()
    }

    fn set_unsafe_cache(&self, on: bool) {
        self.unsafe_cache.store(on, Ordering::Relaxed);
    }

    /// As qemu, whose vhdx driver answers no block-status query: the whole disk is data.
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        let max_len = max_len.max(1);
        check_request(self.meta.virtual_size, offset, max_len).in_file(&self.path)?;
        Ok(BlockStatus {
            len: max_len,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: None,
        })
    }

    fn read_stored(&self, buf: &mut [u8], guest: GuestOffset, _status: &BlockStatus) -> Result<()> {
        self.read_at(buf, guest)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn actual_size(&self) -> Option<u64> {
        self.storage.allocated_bytes()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.bat.geo.block_size)
    }

    fn as_check(&self) -> Option<&dyn Check> {
        Some(self)
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            filename: self.path.display().to_string(),
            format: VHDX.as_str(),
            virtual_size: self.meta.virtual_size,
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

/// Opens arbitrary bytes as a VHDX and reads (a bounded part of) the disk: what the fuzz target
/// `vhdx_open_read` and its hostile-input tests run. Never panics and allocates at most about
/// the input's size.
pub fn exercise(data: &[u8]) {
    // A read-write open of a copy (bounded in growth) replays a log the input may hold.
    let limit = data.len() as u64 + (16 << 20);
    let copy = Box::new(crate::storage::MemStorage::with_limit(data.to_vec(), limit));
    if let Ok(img) = VhdxImage::open(copy, Path::new("fuzz.vhdx"), true, true) {
        let _ = img.check_report();
    }
    let storage = Box::new(crate::storage::MemStorage::new(data.to_vec()));
    let Ok(img) = VhdxImage::open(storage, Path::new("fuzz.vhdx"), false, false) else {
        return;
    };
    let _ = img.layer_info();
    let _ = img.check_report();
    let size = img.virtual_size();
    let bs = img.bat.geo.block_size;
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        let n = (size - pos).min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], GuestOffset(pos));
        pos = pos.saturating_add(bs / 2);
    }
}
