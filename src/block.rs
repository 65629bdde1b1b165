//! The [`BlockImage`] trait every image format implements, and the block-status answer that
//! copying, comparing, mapping and backing up are built on.
//!
//! A driver answers "where is this guest range?" with a [`BlockStatus`]; shared code (see
//! [`crate::ops`]) does the copying. Optional capabilities (consistency checks, persistent
//! dirty bitmaps, later snapshots and resizing) are separate traits reached through accessor
//! methods, so that a caller holding a `dyn BlockImage` can ask whether the format offers them.

use crate::capability::{Amend, CompressedWrites, MakeEmpty, Resize, SetBacking, Snapshots};
use crate::chain::{refuse_forced_write, ChainGuard, Sharing};
use crate::check::Check;
use crate::error::{Error, Result};
use crate::lock::LockRequest;
use crate::offsets::{GuestOffset, HostOffset};
use crate::storage::{DebugEvent, Storage};
use std::path::Path;

/// What the probe is given of a file.
#[derive(Debug, Clone, Copy)]
pub struct ProbeInput<'a> {
    /// The file's first bytes: up to [`crate::probe::PROBE_LEN`] (shorter for a short file; the
    /// rest is taken as zeros, as qemu reads it).
    pub head: &'a [u8],
    /// The file's last [`crate::probe::VHD_FOOTER_LEN`] bytes, if it is at least that long.
    pub tail: Option<&'a [u8]>,
    /// The file's length in bytes.
    pub len: u64,
    /// The file's name, for the formats qemu recognises by name.
    pub name: Option<&'a str>,
}

/// One image format.
pub trait FormatDriver: Send + Sync + 'static {
    /// The name qemu-img uses for the format (`-f`, `-O`, and `file format:` in `info`).
    fn name(&self) -> &'static str;

    /// How sure the driver is that the file `input` describes is of its format, as qemu's
    /// probes score: 0 not at all, 100 certain (a magic number), 1 for raw, which takes what
    /// nobody else claims.
    fn probe(&self, input: &ProbeInput<'_>) -> u32;

    /// The image locks a layer of this format takes when opened `writable` or not, with
    /// `sharing`; `top` says whether it is the image named by the user rather than one of its
    /// backing files (qemu's `bdrv_child_perm` rules for the format).
    ///
    /// By default, qemu's rule for a format whose file holds metadata (`bdrv_default_perms`
    /// for an image child: qcow2, vpc, vdi, vmdk, vhdx): nobody else may write (or resize)
    /// the file while it is open, and a file opened for writing may not be used by anybody
    /// else, whatever `sharing` says (`-U` shares reads of a read-only open only, which the
    /// opener handles). Raw and LUKS, which qemu lets others write under them, override it.
    fn lock_request(&self, _sharing: Sharing, writable: bool, _top: bool) -> LockRequest {
        LockRequest::exclusive(writable)
    }

    /// Opens the image at `path` (registered in `guard` by the caller), and unless
    /// `no_backing` the layers below it.
    fn open(
        &self,
        path: &Path,
        writable: bool,
        no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Box<dyn crate::block::BlockImage>>;

    /// The options `create -o` takes at the format's level (qemu's `create_opts`), as `-o
    /// help` lists them; the options of the protocol the file is written through are not
    /// among them ([`crate::option_desc::protocol_options`]).
    fn create_option_help(&self) -> &'static [crate::option_desc::OptDesc];

    /// The options `amend -o` takes, as `-o help` lists them, if the format can amend its
    /// options (qemu's `amend_opts`). The default: it cannot.
    fn amend_option_help(&self) -> Option<&'static [crate::option_desc::OptDesc]> {
        None
    }

    /// Checks a `create` request for this format (its `-o` options, size and backing file, in
    /// qemu-img's order and words) and returns the image to write: qemu's `bdrv_img_create`
    /// up to its "Formatting" line. The default: the format cannot be created.
    fn prepare_create(
        &self,
        command: &crate::creation::CreateCommand<'_>,
    ) -> Result<Box<dyn crate::creation::FormatCreation>> {
        Err(Error::unsupported(format!(
            "Format driver '{}' does not support image creation",
            self.name()
        ))
        .with_path(command.path))
    }

    /// `measure`: the host space a new image of this format takes, created with the `-o`
    /// arguments `options`, for a disk of `size` bytes or holding the data of `source` (qemu's
    /// `bdrv_measure`). `secrets` are the command line's, which encryption options name (qemu
    /// checks the passphrase exists). The default: the format cannot say.
    fn measure(
        &self,
        options: &[String],
        size: Option<u64>,
        source: Option<&dyn BlockImage>,
        secrets: &crate::secret::Secrets,
    ) -> Result<crate::creation::Measurement> {
        let _ = (options, size, source, secrets);
        Err(Error::unsupported(format!(
            "Block driver '{}' does not support size measurement",
            self.name()
        )))
    }

    /// Opens a new image of this format, created at `path` for a copy of `size` bytes (the
    /// target of `convert`, an extracted disk): `options` are the `-o` arguments, `backing`
    /// the backing file and format to record (only for a format that
    /// [`FormatDriver::supports_backing_file`]; it is recorded, not checked, as with `create
    /// -u`). With `no_backing` the backing chain is not opened; otherwise it is opened through
    /// `opener`. The default: the format cannot be created.
    fn create_target(
        &self,
        path: &Path,
        size: u64,
        options: &[String],
        backing: (Option<String>, Option<String>),
        no_backing: bool,
        opener: &crate::opener::Opener,
    ) -> Result<Box<dyn BlockImage>> {
        let _ = (size, options, backing, no_backing, opener);
        Err(Error::unsupported(format!(
            "Format driver '{}' does not support image creation",
            self.name()
        ))
        .with_path(path))
    }

    /// Checks the `-o` arguments for a new image of this format made by
    /// [`FormatDriver::create_target`], before anything is read or written. The default:
    /// they are checked when the image is created.
    fn check_target_options(&self, options: &[String]) -> Result<()> {
        let _ = options;
        Ok(())
    }

    /// Whether [`FormatDriver::create_target`] makes use of `-o` options (a format whose new
    /// copy targets take none may still accept, in [`FormatDriver::check_target_options`],
    /// options that change nothing). The default: it does not.
    fn target_takes_options(&self) -> bool {
        false
    }

    /// `check -r`: repairs the image at `path` in place, leaked clusters only or with `all`
    /// every error the format can fix, and returns the check that follows; `None` if the
    /// format cannot repair (qemu's `bdrv_check` with a fix mode). The default: it cannot.
    fn repair(
        &self,
        path: &Path,
        all: bool,
        opener: &crate::opener::Opener,
    ) -> Option<Result<crate::check::CheckReport>> {
        let _ = (path, all, opener);
        None
    }

    /// `check` without `-r` of an image at `path` that a normal open refused: the check of a
    /// format that opens images for a check more leniently than otherwise (qemu's
    /// `BDRV_O_CHECK`: vhdx then reports BAT entries outside the file as corruptions instead of
    /// refusing the image); `None` when the format has no such open or it fails too (the
    /// first refusal stands). The default: none.
    fn check_unopenable(
        &self,
        path: &Path,
        sharing: Sharing,
        opener: &crate::opener::Opener,
    ) -> Option<crate::check::CheckReport> {
        let _ = (path, sharing, opener);
        None
    }

    /// Whether the new image [`FormatDriver::create_target`] makes with `options` may be
    /// made under a temporary name and renamed: `false` for a format whose files record their
    /// own names (a vmdk descriptor names its extents and the disk file), which `convert` then
    /// makes under its final name. The default: it may.
    fn target_is_one_file(&self, options: &[String]) -> bool {
        let _ = options;
        true
    }

    /// Whether every cluster of a new image made with `options` is compressed, `-c` or not
    /// (a stream-optimized vmdk), so that `convert` sizes its workers for compression. The
    /// default: no.
    fn target_compresses(&self, options: &[String]) -> bool {
        let _ = options;
        false
    }

    /// Whether a new image of this format can record a backing file (qemu: the format's
    /// creation options include `backing_file`).
    fn supports_backing_file(&self) -> bool {
        false
    }

    /// Whether images of this format store compressed clusters (qemu's
    /// `bdrv_supports_compressed_writes`; an opened image offers them through
    /// [`BlockImage::as_compressed_writes`]).
    fn supports_compressed_writes(&self) -> bool {
        false
    }

    /// Whether images of this format can hold persistent dirty bitmaps (qemu's
    /// `bdrv_supports_persistent_dirty_bitmap`).
    fn supports_persistent_bitmaps(&self) -> bool {
        false
    }

    /// Whether `convert` writes a new image of this format in guest order unless `-W` is given
    /// (a format that allocates on write lays its clusters out in that order, as qemu-img
    /// does).
    fn writes_in_order(&self) -> bool {
        false
    }
}

/// An image format: a handle on its driver in [`crate::format::DRIVERS`]. Two handles are equal
/// when they name the same format.
#[derive(Clone, Copy)]
pub struct ImageFormat(&'static dyn FormatDriver);

impl ImageFormat {
    /// The handle on `driver` (the registry, [`crate::format`], names the formats).
    pub const fn of(driver: &'static dyn FormatDriver) -> Self {
        ImageFormat(driver)
    }

    /// The driver.
    pub fn driver(self) -> &'static dyn FormatDriver {
        self.0
    }

    /// The name qemu-img uses for the format (`raw`, `qcow2`).
    pub fn as_str(self) -> &'static str {
        self.0.name()
    }

    /// The image locks for a layer of this format (see [`FormatDriver::lock_request`]); fails
    /// for a writable layer under [`Sharing::ForceShare`], as qemu-img does.
    pub fn locks(self, sharing: Sharing, writable: bool, top: bool) -> Result<LockRequest> {
        refuse_forced_write(sharing, writable)?;
        Ok(match sharing {
            Sharing::ForceShare => LockRequest::force_share(),
            _ => self.0.lock_request(sharing, writable, top),
        })
    }

    /// The file of a layer of this format at `path`, for a driver's `open`: the locks the
    /// format takes at `guard`'s sharing and depth ([`ImageFormat::locks`]), then the file
    /// through `guard`'s opener (`cannot open image` with the OS cause on failure).
    pub fn open_layer_file(
        self,
        path: &Path,
        writable: bool,
        guard: &ChainGuard,
    ) -> Result<Box<dyn Storage>> {
        let locks = self
            .locks(guard.sharing(), writable, guard.depth() == 1)
            .map_err(|e| e.with_path(path))?;
        guard
            .opener()
            .open(path, writable, locks)
            .map_err(|e| crate::error::Error::io("cannot open image", e).with_path(path))
    }
}

impl ProbeInput<'_> {
    /// A probe's score for a format known by the magic bytes its files start with: certain
    /// when the file starts with `magic`, else not at all.
    pub fn magic(&self, magic: &[u8]) -> u32 {
        match self.head.starts_with(magic) {
            true => 100,
            false => 0,
        }
    }
}

impl PartialEq for ImageFormat {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ImageFormat {}

impl std::hash::Hash for ImageFormat {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl std::fmt::Debug for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a guest range holds, as qemu's block-status query reports it (and `qemu-img map`
/// prints it). The range `[offset, offset + len)` has the same status throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the range in bytes (at least 1, at most what was asked for).
    pub len: u64,
    /// The layer that answered: 0 for the image itself, 1 for its backing file, and so on. For
    /// a range no layer allocates, the deepest layer consulted.
    pub depth: u32,
    /// Some layer of the chain allocates the range (as data or as zeros).
    pub present: bool,
    /// The range is known to read as zeros.
    pub zero: bool,
    /// The range is stored in a host file (possibly compressed).
    pub data: bool,
    /// The range is stored compressed.
    pub compressed: bool,
    /// Where the range starts in the host file of layer `depth`, when it is stored
    /// uncompressed (or is a preallocated zero cluster, or a hole in a raw file).
    pub offset: Option<HostOffset>,
}

impl BlockStatus {
    /// A range no layer allocates: reads as zeros.
    pub fn unallocated(len: u64, depth: u32) -> Self {
        BlockStatus {
            len,
            depth,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
        }
    }

    /// A range recorded as zeros at layer `depth`, with a host offset if one is reserved.
    pub fn zero(len: u64, depth: u32, offset: Option<HostOffset>) -> Self {
        BlockStatus {
            len,
            depth,
            present: true,
            zero: true,
            data: false,
            compressed: false,
            offset,
        }
    }

    /// A range stored uncompressed at `offset` in layer `depth`'s host file.
    pub fn data(len: u64, depth: u32, offset: HostOffset) -> Self {
        BlockStatus {
            len,
            depth,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(offset),
        }
    }

    /// A range stored compressed in layer `depth`.
    pub fn compressed(len: u64, depth: u32) -> Self {
        BlockStatus {
            len,
            depth,
            present: true,
            zero: false,
            data: true,
            compressed: true,
            offset: None,
        }
    }

    /// Whether a reader must read the range to learn its contents (it is not known to be zero).
    pub fn needs_read(&self) -> bool {
        !self.zero
    }

    /// Whether `next`, starting where `self` ends, can be merged with it into one range with the
    /// same status (host offsets contiguous where present).
    pub fn can_merge(&self, next: &BlockStatus) -> bool {
        let offsets_follow = match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a.0.checked_add(self.len) == Some(b.0),
            _ => false,
        };
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && offsets_follow
    }
}

/// Something that must see the range of every write before the write reaches an image: a
/// backup job saving the old data first (copy-before-write), a point-in-time (fleecing) view
/// keeping the clusters about to be overwritten.
///
/// A server calls [`BeforeWrite::before_write`] for every write, zero write and discard of an
/// image it is attached to, and the write waits for it to return. It cannot fail the write: the
/// guest comes first, so a hook that cannot do its work (its target full, its reader gone)
/// records that itself and stops asking for anything, and the write goes on.
pub trait BeforeWrite: Send + Sync {
    /// Called before `[offset, offset + len)` is written, zeroed or discarded.
    fn before_write(&self, offset: GuestOffset, len: u64);
}

/// A virtual disk image: one layer of a chain, with its backing layers attached.
///
/// All methods take `&self`: an image may be shared between threads (`Send + Sync`), and
/// drivers synchronise internally. Offsets and lengths are in bytes; a request that reaches past
/// [`BlockImage::virtual_size`] fails with [`crate::ErrorKind::InvalidInput`].
pub trait BlockImage: Send + Sync {
    /// The format of this layer.
    fn format(&self) -> ImageFormat;

    /// The file this layer was opened from.
    fn filename(&self) -> &Path;

    /// The size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buf` with guest data starting at `offset`, reading through backing layers.
    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()>;

    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zeros. With `unmap`, the driver may free the
    /// storage behind the range.
    fn write_zeroes(&self, offset: GuestOffset, len: u64, unmap: bool) -> Result<()>;

    /// Discards `[offset, offset + len)`, as a guest's discard (TRIM/UNMAP) request: the
    /// driver may free the storage behind the range, and afterwards the range's contents are
    /// unspecified: each byte reads as before, as zero, or (where the format can record no
    /// zeros there) as the backing layers hold it, never as data of another guest range nor as
    /// stale host data. Drivers follow qemu: a qcow2 image frees only whole clusters inside the
    /// range (see [`crate::qcow2::Qcow2Image`]), a raw file punches a hole where the file system
    /// can. Discarding is best effort, so the default implementation does nothing.
    fn discard(&self, offset: GuestOffset, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Whether a newly created image of this kind reads as zeros where nothing was written
    /// (qemu's `bdrv_has_zero_init`), so that a copy into it may skip zeros. The default: it
    /// does; an encrypted image, whose unwritten sectors decrypt to noise, does not.
    fn zero_initialized(&self) -> bool {
        true
    }

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;

    /// Ends a session of writes: as [`BlockImage::flush`], and leaves the image clean where the
    /// format keeps state for later (a qcow2 image with lazy refcounts writes every refcount
    /// and clears its dirty bit). Dropping an image does the same but cannot report an error,
    /// so a command that wrote calls this last. The image stays usable; further writes start a
    /// new session.
    fn finish(&self) -> Result<()> {
        self.flush()
    }

    /// The status of the guest range starting at `offset`, at most `max_len` bytes long
    /// (`max_len >= 1`, and the range must lie inside the virtual disk). The answer may cover
    /// less than asked; callers loop.
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus>;

    /// The backing layer, if this image has one.
    fn backing(&self) -> Option<&dyn BlockImage> {
        None
    }

    /// The locator of the external data file this layer keeps its guest data in, if it has
    /// one (qcow2's `data_file`): as opened, or as the image records it when it was not opened.
    fn data_file_path(&self) -> Option<&Path> {
        None
    }

    /// Whether the image was opened for writing.
    fn is_writable(&self) -> bool;

    /// Bytes the layer occupies on the host (qemu's `actual-size`), if known.
    fn actual_size(&self) -> Option<u64>;

    /// A description of this layer for `info` (format-specific data, backing file name, ...).
    fn layer_info(&self) -> Result<crate::info::LayerInfo>;

    /// The consistency check this format offers, if any.
    fn as_check(&self) -> Option<&dyn Check> {
        None
    }

    /// The persistent dirty bitmaps this format offers, if any.
    fn as_bitmaps(&self) -> Option<&dyn crate::bitmap::PersistentBitmaps> {
        None
    }

    /// Internal snapshots, to list them, if the format has them.
    fn as_snapshots(&self) -> Option<&dyn Snapshots> {
        None
    }

    /// Internal snapshots, to change them (the image must be open for writing).
    fn as_snapshots_mut(&mut self) -> Option<&mut dyn Snapshots> {
        None
    }

    /// Checking a resize, if the format can be resized.
    fn as_resize(&self) -> Option<&dyn Resize> {
        None
    }

    /// Resizing, if the format can be resized (the image must be open for writing).
    fn as_resize_mut(&mut self) -> Option<&mut dyn Resize> {
        None
    }

    /// Checking an amend of format options, if the format can amend.
    fn as_amend(&self) -> Option<&dyn Amend> {
        None
    }

    /// Amending format options, if the format can (the image must be open for writing).
    fn as_amend_mut(&mut self) -> Option<&mut dyn Amend> {
        None
    }

    /// Recording another backing file, if the format records one.
    fn as_set_backing_mut(&mut self) -> Option<&mut dyn SetBacking> {
        None
    }

    /// Compressed cluster writes, if the format stores compressed data.
    fn as_compressed_writes(&self) -> Option<&dyn CompressedWrites> {
        None
    }

    /// Whether every write must be a compressed one (a stream-optimized vmdk: qemu's
    /// `needs_compressed_writes`), so that `convert` compresses without `-c`. The default: no.
    fn needs_compressed_writes(&self) -> bool {
        false
    }

    /// The name of the host file holding this layer's data at `guest`, when it is not the
    /// layer's own file (a vmdk extent's file), for `map`'s text output. The default: none.
    fn file_of(&self, guest: GuestOffset) -> Option<String> {
        let _ = guest;
        None
    }

    /// The files besides its own that hold this layer's data (a vmdk descriptor's extent
    /// files), as (child name, file name) in qemu's order, for `info`. The default: none.
    fn extra_files(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Emptying the image down to its backing file, if the format can.
    fn as_make_empty_mut(&mut self) -> Option<&mut dyn MakeEmpty> {
        None
    }

    /// The unit the format allocates guest space in (qcow2's cluster size), if it has one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// The unit a partial write of a cluster allocates (qcow2's subclusters with extended L2
    /// entries), if smaller than [`BlockImage::cluster_size`] or the same.
    fn subcluster_size(&self) -> Option<u64> {
        self.cluster_size()
    }

    /// Whether writes are bound by work this image does under a lock of its own, one write at
    /// a time (a LUKS qcow2 encrypts once it has chosen the host clusters): a copy into it then
    /// keeps fewer prepared writes waiting, as they would only hold memory. The default: no.
    fn serializes_writes(&self) -> bool {
        false
    }

    /// Tells the image that a one-pass copy has read the guest range `[offset, offset+len)` and
    /// will not read it again. A raw image on a block device then drops the range from the
    /// host's page cache: a device read through the cache otherwise fills fresh page-cache
    /// memory with the whole disk, which on a virtual machine that hands freed memory back to
    /// its host is slow to get (reading a 2 GiB loop device took 4-9 s, 0.9-1.5 s with each
    /// piece dropped once read), and evicts what other programs had cached. Files keep their
    /// cache (the next command often reads them again). The default does nothing.
    fn done_reading(&self, offset: GuestOffset, len: u64) {
        let _ = (offset, len);
    }

    /// With `on`, flushes keep their order but do not wait for the disk (qemu's
    /// `cache=unsafe`, the default of `qemu-img convert` for its target). Formats whose
    /// flushes have no order to keep ignore it.
    fn set_unsafe_cache(&self, on: bool) {
        let _ = on;
    }

    /// The host storage this layer's uncompressed guest data lives in (qcow2's external data
    /// file when it has one), for the default [`BlockImage::read_stored`]. The default: none.
    fn stored_data(&self) -> Option<&dyn Storage> {
        None
    }

    /// The storage that holds guest byte `g` at its own offset `g`, for every byte of the disk,
    /// where writing the bytes there is all a write does (a writable raw file): a copy may put
    /// data straight into it (`convert -C`). The default: none.
    fn linear_storage(&self) -> Option<&dyn Storage> {
        None
    }

    /// The storage whose bytes at a range's `status.offset` are this layer's guest data, byte
    /// for byte, for every range whose status has data, no compression and an offset (raw,
    /// uncompressed clusters of an unencrypted qcow2): a copy may take them from there without
    /// reading them (`convert -C`). Only the formats qemu offloads from: for the others qemu-img
    /// falls back to reading with zero detection, and so must vimg. The default: none.
    fn copyable_data(&self) -> Option<&dyn Storage> {
        None
    }

    /// Fills `buf` with the guest data at `guest` of this layer's range whose block status is
    /// `status` (as [`crate::chain_read::read_through`] got it from the top of the chain, with
    /// this layer at `status.depth`; `buf` lies within the range). The default reads
    /// [`BlockImage::stored_data`] at `status.offset` ([`read_host`]); a
    /// format overrides it for data it must transform (qcow2's compressed clusters).
    fn read_stored(&self, buf: &mut [u8], guest: GuestOffset, status: &BlockStatus) -> Result<()> {
        let host = stored_offset(status, guest)?;
        let storage = self.stored_data().ok_or_else(|| {
            Error::unsupported(format!(
                "the {} format does not say where its data at guest offset {guest} is stored",
                self.format()
            ))
        })?;
        read_host(storage, buf, host)
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub fn check_request(size: u64, offset: GuestOffset, len: u64) -> Result<()> {
    match offset.0.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid_input(format!(
            "request of {len} bytes at guest offset {offset} is beyond the end of the {size}-byte disk"
        ))),
    }
}

/// Reads `buf.len()` bytes of guest data stored uncompressed at host offset `host` of
/// `storage`, telling the storage first (qemu's blkdebug `read_aio` event). The default of
/// [`BlockImage::read_stored`], and what a format's own one calls for plain data.
pub fn read_host(storage: &dyn Storage, buf: &mut [u8], host: u64) -> Result<()> {
    storage.debug_event(DebugEvent::ReadAio);
    storage
        .read_at(buf, host)
        .map_err(|e| Error::io("read failed", e).at(host))
}

/// The host offset a stored range starts at, or an error for a status that names none (a
/// format whose status reports ranges without one must read them in its own
/// [`BlockImage::read_stored`]).
pub fn stored_offset(status: &BlockStatus, guest: GuestOffset) -> Result<u64> {
    status.offset.map(|o| o.0).ok_or_else(|| {
        Error::unsupported(format!(
            "guest range at {guest} is stored without a host offset, and the format does not say how to read it"
        ))
    })
}
