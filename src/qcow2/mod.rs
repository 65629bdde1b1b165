//! The qcow2 format (qemu docs/interop/qcow2.rst), in private modules by concern:
//!
//! - `format/`: the on-disk structures: the header and its extensions (`header`, written back
//!   by `header_write`), L1/L2 entries (`l2`), compressed clusters (`compress`), which clusters
//!   hold metadata (`layout`);
//! - `refcount/`: the refcount table and blocks (`table`), rewritten at another width
//!   (`rewrite`);
//! - `write/`: the write path, its crash-safe flush and lazy refcounts (`path`), guest discard
//!   requests (`discard`), resizing (`resize`);
//! - `snapshot/`: the internal snapshot table (`table`), its changes (`write`), reading an
//!   internal snapshot (`view`, convert -l);
//! - `bitmap/`: the persistent dirty bitmap directory and tables (`directory`); `write` writes
//!   them, `track` marks guest writes in them (`tracker` holds the state), `edit` adds,
//!   removes, clears, enables, disables and merges them;
//! - `check/`: the consistency check (`consistency`) and its repairs (`repair`);
//! - `create/`: creating images (options, qemu's allocation plan, the writer), `create -f qcow2`
//!   through the format driver, and `measure -O qcow2`;
//! - `edit/`: changing an image in place: format options (`amend`, with `downgrade`), the
//!   recorded backing file (`backing`, rebase), emptying the active state (`empty`, commit);
//! - `crypt.rs`: encrypted images: the cipher of an open image and the offset its IVs follow
//!   (legacy AES now; LUKS plugs in there);
//! - `cache.rs`: the bounded metadata table cache; `data_file.rs`: which file holds the guest
//!   data of an image with an external data file; `driver.rs`, `capabilities.rs`: the format
//!   driver and the optional capabilities behind [`crate::block::FormatDriver`];
//! - [`hostile`]: untrusted bytes through all of the above, for fuzzing (public).
//!
//! # Public API
//!
//! What the library offers of qcow2 is re-exported here, and only this:
//!
//! - [`Qcow2Image`] (open, read, write, and the methods of the optional capabilities) and
//!   [`Qcow2Driver`] (the format driver);
//! - the header as read ([`Header`], [`CompressionType`], [`BitmapsExt`], [`FeatureName`],
//!   [`UnknownExt`]), the byte offset of each of its fields (declared once, in
//!   `format::header::fields`), and the L1/L2 entry masks and flags for reading the tables
//!   [`Qcow2Image::l1`] and [`Qcow2Image::l2_table`] return ([`L1E_OFFSET_MASK`],
//!   [`L2E_OFFSET_MASK`], [`OFLAG_COMPRESSED`], [`OFLAG_COPIED`], [`OFLAG_ZERO`]);
//! - creation: [`create()`] with [`CreateOptions`] and [`Compat`], and qemu's `-o` option
//!   lists: [`parse_options`] (through [`crate::option_list`]) into [`OptionUpdates`];
//! - [`compress_cluster`], the cluster compression writes use;
//! - amending: [`AmendOptions`], [`AmendPlan`], [`BackingChange`]; resizing: [`V2_SNAPSHOTS`]
//!   (qemu's refusal);
//! - snapshots: [`NewSnapshot`]; [`SnapshotSelector`] and [`open_image_snapshot`] (convert -l);
//! - repairs: [`repair()`], [`repair_file`], [`RepairMode`];
//! - [`hostile`], for the fuzz targets and the hostile-input tests.
//!
//! This module holds [`Qcow2Image`], which maps guest ranges to where they live (its block
//! status) and reads what it stores, decompressing compressed clusters; reading through the
//! backing chain is [`crate::chain_read`]'s.

#![warn(unreachable_pub)]

mod bitmap;
mod cache;
mod capabilities;
mod check;
mod create;
mod crypt;
mod data_file;
mod driver;
mod edit;
mod format;
pub mod hostile;
mod refcount;
mod snapshot;
mod write;

pub use check::repair::{repair, repair_file, RepairMode};
pub use create::{
    create, create_with, parse_options, Compat, CreateOptions, EncryptOptions, OptionUpdates,
    WEAK_AES,
};
pub use edit::amend::{AmendOptions, AmendPlan, BackingChange};
pub use format::compress::compress_cluster;
pub use format::header::{BitmapsExt, CompressionType, FeatureName, Header, UnknownExt};
pub use format::l2::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
pub use snapshot::view::{open_image_snapshot, SnapshotSelector};
pub use snapshot::write::NewSnapshot;
pub use write::resize::V2_SNAPSHOTS;

pub(crate) use check::consistency::SNAPSHOT_READ_FAILED;
pub use create::CreateRequest;
pub(crate) use create::{create_file, parse_target_options, round_size};
pub(crate) use format::header::{MAX_SNAPSHOTS, SNAPSHOTS_TOO_MANY};

use crate::block::{check_request, BlockImage, BlockStatus, ImageFormat};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::info::{FormatSpecific, LayerInfo, Qcow2Info};
use crate::offsets::{GuestOffset, HostOffset};
use crate::open::{open_layer, probe_format_with, ChainGuard};
use crate::opener::Opener;
use crate::storage::Storage;
use bitmap::directory as bitmaps;
use byteorder::{BigEndian, ByteOrder};
use check::repair;
use compress::CompressedDesc;
pub use driver::Qcow2Driver;
use format::{compress, header, l2, layout};
use l2::Slot;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

/// This format's handle.
const QCOW2: ImageFormat = ImageFormat::of(&Qcow2Driver);

/// Refcount blocks the metadata-preallocation heuristic reads at most, in bytes.
const PREALLOC_SCAN_BYTES: u64 = 256 << 20;

/// Memory the L2 cache may use, in bytes (at least a few tables are always kept).
const L2_CACHE_BYTES: u64 = 32 << 20;

/// An open qcow2 image (one layer, with its backing chain attached).
pub struct Qcow2Image {
    path: PathBuf,
    storage: Box<dyn Storage>,
    /// The external data file, when the image has one.
    data_file: Option<(Box<dyn Storage>, PathBuf)>,
    header: Header,
    /// The cipher of an encrypted image ([`crypt`]); `None` for an unencrypted one, or for an
    /// encrypted one opened without its key (for `info`: guest data cannot be read then).
    crypt: Option<crypt::Encryption>,
    /// The active L1 table (changed by allocating writes).
    l1: RwLock<Vec<u64>>,
    l2_cache: cache::TableCache,
    /// Length of the image file (grows as clusters are allocated).
    file_len: AtomicU64,
    backing: Option<Box<dyn BlockImage>>,
    backing_path: Option<PathBuf>,
    backing_probed: bool,
    writable: bool,
    /// The last decompressed cluster, keyed by its descriptor's host offset.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Whether the image looks metadata-preallocated (computed on first use).
    metadata_prealloc: OnceLock<bool>,
    /// Allocation and flush state, for images opened read-write.
    write: Option<Mutex<write::path::WriteState>>,
    /// Flushes order their writes but skip the syncs (qemu's `cache=unsafe`).
    unsafe_cache: std::sync::atomic::AtomicBool,
    /// The bitmaps extension as it is on disk now (the header's, until bitmaps are stored).
    live_bitmaps: Mutex<Option<header::BitmapsExt>>,
    /// The snapshot table as a repair read it (entries and size in bytes), used instead of
    /// the one on disk until the repair writes it ([`snapshot::table::read_table_with_size`]).
    snapshot_override: Option<(Vec<snapshot::table::Snapshot>, u64)>,
}

impl Qcow2Image {
    /// Opens the qcow2 image at `path`; unless `no_backing`, opens its backing chain too,
    /// registering each layer in `guard`.
    pub fn open(
        path: &Path,
        writable: bool,
        no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Self> {
        let locks = QCOW2
            .locks(guard.sharing(), writable, guard.depth() <= 1)
            .map_err(|e| e.with_path(path))?;
        let storage = guard.opener().open(path, writable, locks).map_err(|e| {
            Error::io("cannot open image", e)
                .with_path(path)
                .while_opening()
        })?;
        Self::open_storage(storage, path, writable, no_backing, guard)
    }

    /// Opens a qcow2 image held in `storage`; `path` names it in messages and anchors relative
    /// backing and data file names.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
        no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Self> {
        Self::open_inner(storage, path, writable, no_backing, guard, &DataFile::Named)
            .in_file(path)
            .map_err(Error::while_opening)
    }

    /// Opens a qcow2 image held in `storage` without touching any host file: no backing file
    /// is opened, and an external data file, if the image has one, is `data_file` instead of
    /// the file the image names. For in-memory images (the fuzz targets, tests), whose names
    /// come from untrusted bytes.
    pub fn open_detached(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
        data_file: Option<Box<dyn Storage>>,
    ) -> Result<Self> {
        let mut guard = ChainGuard::default();
        let data = DataFile::Given(data_file);
        Self::open_inner(storage, path, writable, true, &mut guard, &data).in_file(path)
    }

    fn open_inner(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
        no_backing: bool,
        guard: &mut ChainGuard,
        data: &DataFile,
    ) -> Result<Self> {
        let (header, l1, file_len) = read_header_and_l1(storage.as_ref())?;
        let crypt = crypt::bind(&header, storage.as_ref(), path, writable, guard.opener())?;

        let data_file = match (header.has_data_file(), data) {
            (false, _) => None,
            (true, DataFile::Named) => Some(open_data_file(&header, path, writable, guard)?),
            (true, DataFile::Given(given)) => {
                let s = given.as_ref().and_then(|s| s.duplicate()).ok_or_else(|| {
                    Error::unsupported("image has an external data file, and none was given")
                })?;
                Some((
                    s,
                    PathBuf::from(header.data_file.clone().unwrap_or_default()),
                ))
            }
        };

        let tables = (L2_CACHE_BYTES >> header.cluster_bits).max(4) as usize;
        let mut img = Qcow2Image {
            path: path.to_path_buf(),
            storage,
            data_file,
            l1: RwLock::new(l1),
            l2_cache: cache::TableCache::new(tables),
            file_len: AtomicU64::new(file_len),
            backing: None,
            backing_path: None,
            backing_probed: false,
            writable,
            last_compressed: Mutex::new(None),
            metadata_prealloc: OnceLock::new(),
            write: None,
            crypt,
            unsafe_cache: std::sync::atomic::AtomicBool::new(false),
            live_bitmaps: Mutex::new(header.bitmaps),
            snapshot_override: None,
            header,
        };
        if writable {
            img.prepare_for_writing(guard.opener())?;
        }
        if let Some(name) = img.header.backing_file.clone() {
            // `--image-opts ...,backing.file.filename=F,backing.driver=FMT` open F with FMT
            // in place of the backing file the header names, as qemu's options do.
            let given = |k: &str| guard.opener().image_option(path, k);
            let bpath = match given("backing.file.filename") {
                Some(f) => PathBuf::from(f),
                None => guard.opener().resolve(path, &name)?,
            };
            guard.opener().pass_to_backing(path, &bpath);
            img.backing_path = Some(bpath.clone());
            if !no_backing {
                let format = match given("backing.driver").or(img.header.backing_format.clone()) {
                    Some(f) => Some(
                        crate::block::ImageFormat::from_name(&f)
                            .map_err(|e| e.with_path(&bpath))?,
                    ),
                    None => {
                        img.backing_probed = true;
                        Some(probe_format_with(guard.opener(), &bpath).map_err(|e| {
                            let what = format!("cannot open backing file '{name}': {}", e.what());
                            e.reworded(what)
                        })?)
                    }
                };
                let b = open_layer(&bpath, format, false, false, guard)?;
                img.backing = Some(b);
            }
        }
        Ok(img)
    }

    /// Readies a read-write open: refuses images qemu would not write (marked corrupt),
    /// repairs a dirty one (lazy refcounts not written back: qemu's open runs `check -r all`
    /// and marks the image clean), clears the autoclear feature bits vimg does not know (their
    /// structures would not be kept up to date), builds the allocation state, with lazy
    /// refcounts if the image enables them, and starts the dirty tracking of the enabled
    /// persistent bitmaps ([`bitmap::track`]).
    fn prepare_for_writing(&mut self, opener: &Opener) -> Result<()> {
        if self.header.is_corrupt() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "image is marked corrupt: it can only be opened read-only (repair it with check -r)",
            ));
        }
        if self.header.is_dirty() {
            self.repair_dirty(opener)?;
        }
        // Damaged metadata is refused before anything is written.
        let mut st = write::path::WriteState::new(self)?;
        layout::check_metadata_refcounts(self)?;
        self.clear_unknown_autoclear()?;
        st.lazy = self.header.version >= 3 && self.header.lazy_refcounts();
        self.start_tracking(&mut st)?;
        self.write = Some(Mutex::new(st));
        Ok(())
    }

    /// Clears the autoclear feature bits vimg does not know, on disk and in the header, as
    /// qemu's read-write open does (their structures would not be kept up to date).
    pub(crate) fn clear_unknown_autoclear(&mut self) -> Result<()> {
        let h = &self.header;
        let keep = header::autoclear::DATA_FILE_RAW | header::autoclear::BITMAPS;
        if h.version >= 3 && h.autoclear_features & !keep != 0 {
            let v = h.autoclear_features & keep;
            self.storage
                .write_at(&v.to_be_bytes(), header::fields::AUTOCLEAR_FEATURES)
                .and_then(|_| self.storage.flush())
                .map_err(|e| {
                    Error::io("cannot update the header", e).at(header::fields::AUTOCLEAR_FEATURES)
                })?;
            self.header.autoclear_features = v;
        }
        Ok(())
    }

    /// The bitmaps extension as it is on disk now: the header's, or the one the last change
    /// of the bitmaps wrote.
    pub fn bitmaps_ext(&self) -> Option<header::BitmapsExt> {
        *self.live_bitmaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the bitmaps extension just written to disk.
    fn set_bitmaps_ext(&self, ext: Option<header::BitmapsExt>) {
        *self.live_bitmaps.lock().unwrap_or_else(|e| e.into_inner()) = ext;
    }

    /// Repairs a dirty image being opened read-write, as qemu's open does: every refcount is
    /// brought to the number of references and the COPIED flags follow; the repair clears the
    /// dirty bit. The repair's lines go to the opener's notices, which the binary prints on
    /// standard error, as qemu prints them. Fails, leaving the image dirty, if the repair
    /// cannot make it consistent.
    fn repair_dirty(&mut self, opener: &Opener) -> Result<()> {
        self.write = Some(Mutex::new(write::path::WriteState::new(self)?));
        let report = repair::repair(self, repair::RepairMode::All);
        self.write = None;
        let report = report.map_err(|e| {
            let what = format!("image is dirty and repairing it failed: {}", e.what());
            e.reworded(what)
        })?;
        // qemu's open prints what its check finds and repairs on standard error as it goes
        // (`ERROR cluster ...`, `Rebuilding refcount structure`, `Repairing ...`).
        for m in &report.messages {
            opener.notice(m);
        }
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(Error::corrupt(format!(
                "image is dirty and its repair left {} corruptions and {} check errors (try check -r all)",
                report.corruptions, report.check_errors
            )));
        }
        // The repair may have rebuilt the refcount structures (moving the table and growing
        // the file) and changed COPIED flags in L1 and L2 tables: start again from the disk.
        let (header, l1, file_len) = read_header_and_l1(self.storage.as_ref())?;
        if header.is_dirty() {
            return Err(Error::corrupt(
                "image is still marked dirty after its repair (try check -r all)",
            ));
        }
        self.set_bitmaps_ext(header.bitmaps);
        self.header = header;
        *self.l1.get_mut().unwrap_or_else(|e| e.into_inner()) = l1;
        self.file_len.store(file_len, Ordering::Release);
        self.l2_cache = cache::TableCache::new(self.l2_cache.capacity());
        *self
            .last_compressed
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.metadata_prealloc = OnceLock::new();
        Ok(())
    }

    /// Writes back every metadata change the write path holds (a no-op for read-only images).
    pub fn flush_metadata(&self) -> Result<()> {
        match &self.write {
            Some(_) => self.flush_inner().in_file(&self.path),
            None => Ok(()),
        }
    }

    /// Closes an image opened for writing cleanly: writes all metadata (with lazy refcounts,
    /// every refcount too) and clears the dirty bit. Dropping the image does the same but
    /// cannot report errors.
    pub fn close(self) -> Result<()> {
        if self.write.is_none() {
            return Ok(());
        }
        let mut this = self;
        let r = this.close_inner().in_file(&this.path);
        // Nothing is left for the drop to do, or it would fail the same way.
        this.write = None;
        r
    }

    /// With `on`, flushes still write metadata in their safe order but do not wait for the
    /// disk (qemu's `cache=unsafe`, the default of `qemu-img convert` for its target): a crash
    /// of the machine, not of the program, may then lose or tear what was written.
    pub fn set_unsafe_cache(&self, on: bool) {
        self.unsafe_cache.store(on, Ordering::Relaxed);
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file's storage.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The storage guest data lives in: the external data file if there is one, else the image.
    pub fn data_storage(&self) -> &dyn Storage {
        match &self.data_file {
            Some((s, _)) => s.as_ref(),
            None => self.storage.as_ref(),
        }
    }

    /// The active L1 table.
    pub fn l1(&self) -> RwLockReadGuard<'_, Vec<u64>> {
        self.l1.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Length of the image file (as of the last allocation).
    pub fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// Whether the backing format was not recorded and had to be probed.
    pub fn backing_format_probed(&self) -> bool {
        self.backing_probed
    }

    /// Reads the one-cluster table of big-endian words at host offset `offset` (`what` names it
    /// in messages: "L2 table", "refcount block"), checking that it lies inside the image file.
    pub fn read_table(&self, offset: u64, what: &str) -> Result<Vec<u64>> {
        let cs = self.header.cluster_size();
        if !offset.is_multiple_of(cs) {
            return Err(Error::corrupt(format!(
                "{what} offset {offset:#x} is not cluster-aligned"
            ))
            .at(offset));
        }
        if offset.checked_add(cs).is_none_or(|e| e > self.file_len()) {
            return Err(Error::corrupt(format!(
                "{what} at {offset:#x} lies beyond the end of the file ({} bytes)",
                self.file_len()
            ))
            .at(offset));
        }
        let mut raw = vec![0u8; cs as usize];
        self.storage
            .read_at(&mut raw, offset)
            .map_err(|e| Error::io(format!("cannot read {what}"), e).at(offset))?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    /// The L2 table at host offset `offset`, through the cache.
    pub fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>> {
        self.l2_cache
            .get_or_load(offset, || self.read_table(offset, "L2 table"))
    }

    /// Whether the image looks metadata-preallocated: its refcounts claim clearly more clusters
    /// than the host file has allocated (more than a ninth more, and at least two more). Only
    /// then does block status ask the host file about holes under data clusters; qemu applies
    /// the same heuristic, so `map` reports what qemu-img map reports.
    pub fn looks_metadata_preallocated(&self) -> bool {
        *self
            .metadata_prealloc
            .get_or_init(|| self.detect_metadata_preallocation().unwrap_or(false))
    }

    fn detect_metadata_preallocation(&self) -> Result<bool> {
        let Some(real) = self.storage.allocated_bytes() else {
            return Ok(false);
        };
        let real_clusters = real >> self.header.cluster_bits;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let table = refcount::table::RefcountTable::read(self)?;
        let cs = self.header.cluster_size();
        let file_clusters = self.file_len().div_ceil(cs);
        let per_block = table.entries_per_block();
        // Clusters without a refcount block have refcount 0: only existing blocks are read,
        // each once however many table entries name it, and at most PREALLOC_SCAN_BYTES of
        // them (a heuristic need not read a hostile image's whole file).
        let mut per_offset: std::collections::HashMap<u64, u64> = Default::default();
        let mut counted = 0u64;
        let mut block = vec![0u8; cs as usize];
        for idx in 0..table.len() as u64 {
            let first = idx * per_block;
            if first >= file_clusters || counted >= threshold {
                break;
            }
            let Ok(Some(off)) = table.block_offset(idx, refcount::table::Strictness::Lenient)
            else {
                continue;
            };
            let n = match per_offset.get(&off) {
                Some(&n) => n,
                None => {
                    if per_offset.len() as u64 * cs >= PREALLOC_SCAN_BYTES {
                        break;
                    }
                    refcount::table::read_padded(self, &mut block, off)?;
                    let in_file = per_block.min(file_clusters - first);
                    let n = (0..in_file)
                        .filter(|&i| {
                            refcount::table::get_refcount(&block, i, self.header.refcount_order) > 0
                        })
                        .count() as u64;
                    per_offset.insert(off, n);
                    n
                }
            };
            counted += n;
        }
        Ok(counted >= threshold)
    }

    fn sc_bits(&self) -> u32 {
        if self.header.extended_l2() {
            self.header.cluster_bits - 5
        } else {
            self.header.cluster_bits
        }
    }

    /// The slot of the (sub)cluster holding `guest`, and how far from `guest` the same slot
    /// continues (host offsets contiguous), up to `max_len` and never past one L2 table.
    fn map_slot(&self, guest: u64, max_len: u64) -> Result<(Slot, u64)> {
        let h = &self.header;
        let l1_shift = h.l1_shift();
        let l1_idx = (guest >> l1_shift) as usize;
        let table_end = ((guest >> l1_shift) + 1) << l1_shift;
        let limit = max_len.min(table_end - guest);
        let Some(l1e) = self.l1().get(l1_idx).copied() else {
            return Err(Error::corrupt(format!(
                "guest offset {guest:#x} is beyond the L1 table"
            )));
        };
        let Some(l2_off) = l2::l1_entry_target(l1e, h.cluster_size())
            .map_err(|e| e.at(h.l1_table_offset + 8 * l1_idx as u64))?
        else {
            return Ok((Slot::Unallocated { host: None }, limit));
        };
        let table = self.l2_table(l2_off)?;
        let sc_bits = self.sc_bits();
        let unit = 1u64 << sc_bits;
        let words = if h.extended_l2() { 2 } else { 1 };
        let l2_mask = (1u64 << h.l2_bits()) - 1;
        let slot_at = |g: u64| -> Result<Slot> {
            let idx = ((g >> h.cluster_bits) & l2_mask) as usize * words;
            let entry = table[idx];
            let bitmap = h.extended_l2().then(|| table[idx + 1]);
            let desc =
                l2::decode_descriptor(entry, h).map_err(|e| e.at(l2_off + idx as u64 * 8))?;
            let sc = ((g >> sc_bits) & 31) as u32;
            l2::slot(desc, bitmap, if bitmap.is_some() { sc } else { 0 }, sc_bits)
                .map(|s| match s {
                    // A data slot points at the start of its unit; move to `g` within it.
                    Slot::Data { host } if bitmap.is_none() => Slot::Data {
                        host: host + (g & (h.cluster_size() - 1)),
                    },
                    Slot::Data { host } => Slot::Data {
                        host: host + (g & (unit - 1)),
                    },
                    Slot::Zero { host: Some(host) } if bitmap.is_none() => Slot::Zero {
                        host: Some(host + (g & (h.cluster_size() - 1))),
                    },
                    Slot::Zero { host: Some(host) } => Slot::Zero {
                        host: Some(host + (g & (unit - 1))),
                    },
                    other => other,
                })
                .map_err(|e| e.at(l2_off + idx as u64 * 8))
        };
        let first = slot_at(guest)?;
        let mut len = (unit - (guest & (unit - 1))).min(limit);
        if matches!(first, Slot::Compressed(_)) {
            return Ok((first, len));
        }
        while len < limit {
            let next = slot_at(guest + len)?;
            let follows = match (first, next) {
                (Slot::Unallocated { host: None }, Slot::Unallocated { host: None }) => true,
                (Slot::Unallocated { host: Some(a) }, Slot::Unallocated { host: Some(b) }) => {
                    a + len == b
                }
                (Slot::Zero { host: None }, Slot::Zero { host: None }) => true,
                (Slot::Zero { host: Some(a) }, Slot::Zero { host: Some(b) }) => a + len == b,
                (Slot::Data { host: a }, Slot::Data { host: b }) => a + len == b,
                _ => false,
            };
            if !follows {
                break;
            }
            len = (len + unit).min(limit);
        }
        Ok((first, len))
    }

    /// The whole decompressed cluster described by `desc`.
    fn decompressed(&self, desc: CompressedDesc) -> Result<Arc<Vec<u8>>> {
        if let Some((key, data)) = &*self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            if *key == desc.host {
                return Ok(data.clone());
            }
        }
        let mut out = vec![0u8; self.header.cluster_size() as usize];
        self.decompress_into(desc, &mut out)?;
        let out = Arc::new(out);
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((desc.host, out.clone()));
        Ok(out)
    }

    /// Reads the compressed cluster described by `desc` and decompresses it into `out` (one
    /// whole cluster). The compressed bytes are read into this thread's reused page-aligned
    /// buffer: a fresh `Vec` per cluster cost an allocation each, and the kernel copies into a
    /// buffer that does not start on a page boundary several times slower.
    fn decompress_into(&self, desc: CompressedDesc, out: &mut [u8]) -> Result<()> {
        thread_local! {
            static INPUT: std::cell::RefCell<crate::direct_io::AlignedBuf> =
                std::cell::RefCell::new(crate::direct_io::AlignedBuf::default());
        }
        let file_len = self.file_len();
        if desc.host >= file_len {
            return Err(Error::corrupt(format!(
                "compressed cluster at {:#x} lies beyond the end of the file ({} bytes)",
                desc.host, file_len
            ))
            .at(desc.host));
        }
        // The last compressed cluster's sector count may run past the end of the file.
        let n = desc.len.min(file_len - desc.host) as usize;
        INPUT.with(|cell| {
            // A reentrant use (none today) gets a buffer of its own rather than a panic.
            let mut own = crate::direct_io::AlignedBuf::default();
            let mut guard = cell.try_borrow_mut();
            let input = match guard.as_deref_mut() {
                Ok(b) => b,
                Err(_) => &mut own,
            };
            input.resize(n, 0);
            self.storage
                .read_at(input, desc.host)
                .map_err(|e| Error::io("cannot read compressed cluster", e).at(desc.host))?;
            compress::decompress(self.header.compression_type, input, out)
                .map_err(|e| e.at(desc.host))
        })
    }

    /// Fills `buf` with the guest data at `guest`, through the backing chain
    /// ([`crate::chain_read::read_through`]); errors name the layer that failed.
    fn read_inner(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        crate::chain_read::read_through(self, buf, GuestOffset(guest))
    }

    /// Reads this layer's stored guest data at `guest` whose status is `status` (see
    /// [`BlockImage::read_stored`]): compressed clusters are decompressed (through the
    /// one-cluster cache), other data is read from the data storage after checking that it
    /// lies inside the image file.
    fn read_stored_inner(&self, buf: &mut [u8], guest: u64, status: &BlockStatus) -> Result<()> {
        if status.compressed {
            let (slot, _) = self.map_slot(guest, buf.len() as u64)?;
            let Slot::Compressed(desc) = slot else {
                return Err(Error::corrupt(format!(
                    "the compressed cluster at guest offset {guest:#x} changed while it was read"
                )));
            };
            let start = (guest & (self.header.cluster_size() - 1)) as usize;
            if start == 0 && buf.len() as u64 == self.header.cluster_size() {
                // A whole cluster (a copy's read): straight into the caller's buffer, without
                // the cache's allocation and copy.
                return self.decompress_into(desc, buf);
            }
            let data = self.decompressed(desc)?;
            let Some(src) = data.get(start..start + buf.len()) else {
                return Err(Error::corrupt(format!(
                    "read of {} bytes at guest offset {guest:#x} crosses a compressed cluster",
                    buf.len()
                )));
            };
            buf.copy_from_slice(src);
            return Ok(());
        }
        if self.header.crypt_method != crypt::method::NONE {
            return self.read_encrypted(buf, guest);
        }
        let host = crate::block::stored_offset(status, GuestOffset(guest))?;
        if self.data_file.is_none() && host >= self.file_len() {
            return Err(Error::corrupt(format!(
                "data cluster at {host:#x} (guest offset {guest:#x}) lies beyond the end of the file"
            ))
            .at(host));
        }
        crate::block::read_host(self.data_storage(), buf, host)
    }

    /// Reads the uncompressed data clusters of an encrypted image at `guest` and decrypts them
    /// (whole sectors are read; the caller's range need not be aligned). Their host offsets
    /// come from the L2 tables: the block status of an encrypted image names none, as qemu's.
    fn read_encrypted(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        let Some(c) = &self.crypt else {
            return Err(Error::invalid_input(crypt::KEY_REQUIRED));
        };
        let sector = crate::crypto::SECTOR;
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = guest + pos as u64;
            let (slot, n) = self.map_slot(g, (buf.len() - pos) as u64)?;
            let Slot::Data { host } = slot else {
                return Err(Error::corrupt(format!(
                    "the data cluster at guest offset {g:#x} changed while it was read"
                )));
            };
            let n = n as usize;
            let head = g % sector;
            let (a, ha) = (g - head, host - head);
            let len = (head + n as u64).div_ceil(sector) * sector;
            if self.data_file.is_none() && ha.checked_add(len).is_none_or(|e| e > self.file_len()) {
                return Err(Error::corrupt(format!(
                    "data cluster at {host:#x} (guest offset {g:#x}) lies beyond the end of the file"
                ))
                .at(host));
            }
            let out = &mut buf[pos..pos + n];
            if head == 0 && len == n as u64 {
                crate::block::read_host(self.data_storage(), out, ha)?;
                c.decrypt(a, ha, out).map_err(|e| e.at(ha))?;
            } else {
                let mut tmp = vec![0u8; len as usize];
                crate::block::read_host(self.data_storage(), &mut tmp, ha)?;
                c.decrypt(a, ha, &mut tmp).map_err(|e| e.at(ha))?;
                out.copy_from_slice(&tmp[head as usize..head as usize + n]);
            }
            pos += n;
        }
        Ok(())
    }

    /// Whether the image is encrypted (with its key or without).
    pub fn is_encrypted(&self) -> bool {
        self.header.crypt_method != crypt::method::NONE
    }

    fn status_inner(&self, guest: u64, max_len: u64) -> Result<BlockStatus> {
        let mut s = self.status_of_slot(guest, max_len)?;
        // As qemu: the host offset of an encrypted image's data is not reported (it holds
        // ciphertext), and the host file is not asked about holes under it.
        if self.is_encrypted() && s.depth == 0 {
            s.offset = None;
        }
        Ok(s)
    }

    fn status_of_slot(&self, guest: u64, max_len: u64) -> Result<BlockStatus> {
        let (slot, len) = self.map_slot(guest, max_len)?;
        Ok(match slot {
            Slot::Unallocated { host } => match &self.backing {
                Some(b) if guest < b.virtual_size() => {
                    let n = len.min(b.virtual_size() - guest);
                    let mut s = b.block_status(GuestOffset(guest), n)?;
                    s.depth += 1;
                    s
                }
                _ => BlockStatus {
                    offset: host.map(HostOffset),
                    ..BlockStatus::unallocated(len, 0)
                },
            },
            Slot::Zero { host } => BlockStatus::zero(len, 0, host.map(HostOffset)),
            Slot::Compressed(_) => BlockStatus::compressed(len, 0),
            Slot::Data { host } if self.is_encrypted() || !self.looks_metadata_preallocated() => {
                BlockStatus::data(len, 0, HostOffset(host))
            }
            Slot::Data { host } => {
                // In a metadata-preallocated image, ask the host file whether the cluster is a
                // hole: an untouched preallocated cluster reads as zeros.
                let (is_data, n) = self
                    .data_storage()
                    .extent_at(host)
                    .map_err(|e| Error::io("block status query failed", e).at(host))?;
                let mut s = BlockStatus::data(len.min(n).max(1), 0, HostOffset(host));
                s.zero = !is_data;
                s
            }
        })
    }
}

/// Opens the external data file of the image at `path` ([`data_file`]) through the chain's
/// opener: the one given for it with qemu's `data-file` option, else the one its header names;
/// for a read-only open when the opener does not need data files
/// ([`crate::opener::Opener::set_metadata_only`]), a missing one is left out (guest I/O then
/// fails).
fn open_data_file(
    header: &Header,
    path: &Path,
    writable: bool,
    guard: &ChainGuard,
) -> Result<(Box<dyn Storage>, PathBuf)> {
    let opener = guard.opener();
    let absent = |why: String| -> Result<(Box<dyn Storage>, PathBuf)> {
        if writable || !opener.metadata_only() {
            return Err(Error::invalid_input(why));
        }
        let p = PathBuf::from(header.data_file.clone().unwrap_or_default());
        Ok((Box::new(data_file::Absent { why }) as Box<dyn Storage>, p))
    };
    let (p, name) = match (opener.data_file_for(path), &header.data_file) {
        (Some(p), _) => (p.clone(), p.display().to_string()),
        (None, Some(name)) => (opener.resolve(path, name)?, name.clone()),
        (None, None) => return absent(data_file::REQUIRED.to_string()),
    };
    if opener.same(&p, path) {
        return Err(Error::corrupt(format!(
            "the external data file '{name}' is the image file itself"
        )));
    }
    match opener.open(&p, writable, guard.data_file_locks(writable)?) {
        Ok(s) => Ok((s, p)),
        Err(e) if !writable && opener.metadata_only() => absent(format!(
            "Could not open '{name}': {}",
            crate::error::os_reason(&e)
        )),
        // qemu's words: the name as the image (or the option) gives it.
        Err(e) => Err(Error::io(format!("Could not open '{name}'"), e)),
    }
}

/// Where an opened image's external data file comes from.
pub(crate) enum DataFile {
    /// The file the image names, resolved against the image's directory.
    Named,
    /// This storage, through a [`Storage::duplicate`] handle on it for each open (none: an image
    /// that needs a data file fails to open). No host file is touched.
    Given(Option<Box<dyn Storage>>),
}

/// Reads the header and the active L1 table from `storage`; also returns the file length.
fn read_header_and_l1(storage: &dyn Storage) -> Result<(Header, Vec<u64>, u64)> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io("cannot get file size", e))?;
    // Cluster 0 is at most 2 MiB; the header says how much of it matters.
    let mut cluster0 = vec![0u8; file_len.min(1 << header::MAX_CLUSTER_BITS) as usize];
    storage
        .read_at(&mut cluster0, 0)
        .map_err(|e| Error::io("cannot read header", e))?;
    let header = Header::parse(&cluster0, file_len)?;
    let mut l1 = vec![0u8; header.l1_size as usize * 8];
    storage
        .read_at(&mut l1, header.l1_table_offset)
        .map_err(|e| Error::io("cannot read L1 table", e).at(header.l1_table_offset))?;
    let l1: Vec<u64> = l1.chunks_exact(8).map(BigEndian::read_u64).collect();
    Ok((header, l1, file_len))
}

impl BlockImage for Qcow2Image {
    fn format(&self) -> ImageFormat {
        QCOW2
    }

    fn filename(&self) -> &Path {
        &self.path
    }

    fn data_file_path(&self) -> Option<&Path> {
        self.data_file.as_ref().map(|(_, p)| p.as_path())
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.header.size, offset, buf.len() as u64).in_file(&self.path)?;
        self.read_inner(buf, offset.0).in_file(&self.path)
    }

    /// As qemu's `qcow2_has_zero_init`: an encrypted image whose first L2 table exists was
    /// preallocated, and its preallocated clusters decrypt to noise.
    fn zero_initialized(&self) -> bool {
        !(self.is_encrypted() && self.l1().first().is_some_and(|&e| e & L1E_OFFSET_MASK != 0))
    }

    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        check_request(self.header.size, offset, buf.len() as u64).in_file(&self.path)?;
        self.write_inner(buf, offset.0).in_file(&self.path)
    }

    fn serializes_writes(&self) -> bool {
        self.crypt.as_ref().is_some_and(|c| !c.follows_guest())
    }

    fn write_zeroes(&self, offset: GuestOffset, len: u64, unmap: bool) -> Result<()> {
        check_request(self.header.size, offset, len).in_file(&self.path)?;
        self.write_zeroes_inner(offset.0, len, unmap)
            .in_file(&self.path)
    }

    /// See `write/discard.rs`: whole clusters inside the range are freed and read as zeros
    /// (version 2 images without a backing file: as unallocated, which reads as zeros; version 2
    /// with a backing file: nothing is discarded, as in qemu).
    fn discard(&self, offset: GuestOffset, len: u64) -> Result<()> {
        check_request(self.header.size, offset, len).in_file(&self.path)?;
        self.discard_inner(offset.0, len).in_file(&self.path)
    }

    fn flush(&self) -> Result<()> {
        if self.write.is_none() {
            return Ok(());
        }
        self.flush_inner().in_file(&self.path)
    }

    fn finish(&self) -> Result<()> {
        if self.write.is_none() {
            return Ok(());
        }
        self.close_inner().in_file(&self.path)
    }

    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        check_request(self.header.size, offset, max_len.max(1)).in_file(&self.path)?;
        self.status_inner(offset.0, max_len.max(1))
            .in_file(&self.path)
    }

    fn backing(&self) -> Option<&dyn BlockImage> {
        self.backing.as_deref()
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn actual_size(&self) -> Option<u64> {
        self.storage.allocated_bytes()
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        let h = &self.header;
        let v3 = h.version >= 3;
        let snapshots = snapshot::table::read_table(self)
            .in_file(&self.path)?
            .iter()
            .map(|s| s.info())
            .collect();
        let bitmaps = if v3 && self.bitmaps_ext().is_some() {
            Some(
                bitmaps::read_directory(self)
                    .in_file(&self.path)?
                    .iter()
                    .map(|b| b.info())
                    .collect(),
            )
        } else {
            None
        };
        Ok(LayerInfo {
            filename: self.path.display().to_string(),
            format: QCOW2.as_str(),
            virtual_size: h.size,
            actual_size: self.actual_size(),
            cluster_size: Some(h.cluster_size()),
            encrypted: self.is_encrypted().then_some(true),
            backing_filename: h.backing_file.clone(),
            full_backing_filename: self.backing_path.as_ref().map(|p| p.display().to_string()),
            backing_filename_format: h.backing_format.clone(),
            backing_format_probed: self.backing_probed,
            snapshots,
            dirty_flag: h.is_dirty(),
            format_specific: Some(FormatSpecific::Qcow2(Qcow2Info {
                compat: if v3 { "1.1" } else { "0.10" }.to_string(),
                compression_type: h.compression_type.as_str().to_string(),
                lazy_refcounts: v3.then(|| h.lazy_refcounts()),
                bitmaps,
                refcount_bits: h.refcount_bits(),
                corrupt: v3.then(|| h.is_corrupt()),
                extended_l2: v3.then(|| h.extended_l2()),
                data_file: h.data_file.clone(),
                data_file_raw: h.has_data_file().then(|| h.data_file_raw()),
                encrypt: crypt::info(h, self.storage.as_ref()).in_file(&self.path)?,
            })),
        })
    }

    fn as_check(&self) -> Option<&dyn crate::check::Check> {
        Some(self)
    }

    fn as_bitmaps(&self) -> Option<&dyn crate::bitmap::PersistentBitmaps> {
        Some(self)
    }

    fn as_snapshots(&self) -> Option<&dyn crate::capability::Snapshots> {
        Some(self)
    }

    fn as_snapshots_mut(&mut self) -> Option<&mut dyn crate::capability::Snapshots> {
        Some(self)
    }

    fn as_resize(&self) -> Option<&dyn crate::capability::Resize> {
        Some(self)
    }

    fn as_resize_mut(&mut self) -> Option<&mut dyn crate::capability::Resize> {
        Some(self)
    }

    fn as_amend(&self) -> Option<&dyn crate::capability::Amend> {
        Some(self)
    }

    fn as_amend_mut(&mut self) -> Option<&mut dyn crate::capability::Amend> {
        Some(self)
    }

    fn as_set_backing_mut(&mut self) -> Option<&mut dyn crate::capability::SetBacking> {
        Some(self)
    }

    fn as_compressed_writes(&self) -> Option<&dyn crate::capability::CompressedWrites> {
        Some(self)
    }

    fn as_make_empty_mut(&mut self) -> Option<&mut dyn crate::capability::MakeEmpty> {
        Some(self)
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.header.cluster_size())
    }

    fn subcluster_size(&self) -> Option<u64> {
        let shift = if self.header.extended_l2() { 5 } else { 0 };
        Some(self.header.cluster_size() >> shift)
    }

    fn set_unsafe_cache(&self, on: bool) {
        Qcow2Image::set_unsafe_cache(self, on)
    }

    fn stored_data(&self) -> Option<&dyn Storage> {
        Some(self.data_storage())
    }

    /// Uncompressed clusters of an unencrypted image are the guest data as stored.
    fn copyable_data(&self) -> Option<&dyn Storage> {
        (!self.is_encrypted()).then_some(self.data_storage())
    }

    fn read_stored(&self, buf: &mut [u8], guest: GuestOffset, status: &BlockStatus) -> Result<()> {
        self.read_stored_inner(buf, guest.0, status)
            .in_file(&self.path)
    }
}

impl Drop for Qcow2Image {
    /// Closes an image opened for writing cleanly (see [`Qcow2Image::close`]). Errors cannot
    /// be reported from here: callers that care call [`Qcow2Image::close`] (or, without lazy
    /// refcounts, [`BlockImage::flush`]) first.
    fn drop(&mut self) {
        if self.write.is_some() {
            let _ = self.close_inner();
        }
    }
}
