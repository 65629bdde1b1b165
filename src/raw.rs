//! Raw images: the guest disk byte for byte in a host file, sparse-aware.
//!
//! Holes in the host file (found with `SEEK_DATA`/`SEEK_HOLE`) are reported as reading as zero,
//! and zero writes with unmapping punch holes, so copies of mostly-empty disks cost little.

use crate::block::{check_request, BlockImage, BlockStatus, ImageFormat};
use crate::block::{FormatDriver, ProbeInput};
use crate::chain::{ChainGuard, Sharing};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::info::LayerInfo;
use crate::lock::LockRequest;
use crate::offsets::{GuestOffset, HostOffset};
use crate::opener::Opener;
use crate::prealloc::Preallocation;
use crate::storage::Storage;
use std::path::{Path, PathBuf};

pub mod create;
pub mod measure;

/// The raw format's driver ([`crate::block::FormatDriver`]).
pub struct RawDriver;

/// This format's handle.
const RAW: ImageFormat = ImageFormat::of(&RawDriver);

impl FormatDriver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }

    /// Raw claims every file, less surely than any other format (qemu's raw probe gives 1).
    fn probe(&self, _input: &ProbeInput<'_>) -> u32 {
        1
    }

    /// Read-only shared with everybody, unless the open asks that nobody write the top image
    /// (convert's sources); read-write exclusive.
    fn lock_request(&self, sharing: Sharing, writable: bool, top: bool) -> LockRequest {
        match sharing {
            _ if writable => LockRequest::exclusive(true),
            Sharing::NoWriters if top => LockRequest::exclusive(false),
            _ => LockRequest::shared_read(),
        }
    }

    fn open(
        &self,
        path: &Path,
        writable: bool,
        _no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Box<dyn BlockImage>> {
        let locks = RAW
            .locks(guard.sharing(), writable, guard.depth() == 1)
            .map_err(|e| e.with_path(path))?;
        let image = RawImage::open_with(guard.opener(), path, writable, locks)?;
        Ok(Box::new(match guard.cache_direct() {
            true => image.direct(),
            false => image,
        }))
    }

    /// Only the size: the rest (`preallocation`, `extent_size_hint`, `nocow`) are the file's
    /// ([`crate::option_desc::FILE_PROTOCOL`]).
    fn create_option_help(&self) -> &'static [crate::option_desc::OptDesc] {
        &[crate::option_desc::SIZE]
    }

    fn prepare_create(
        &self,
        command: &crate::creation::CreateCommand<'_>,
    ) -> Result<Box<dyn crate::creation::FormatCreation>> {
        let mut given = Default::default();
        let request = crate::qcow2::CreateRequest::parse(command, &mut given)?;
        Ok(Box::new(create::RawCreation::prepare(&request)?))
    }

    fn measure(
        &self,
        options: &[String],
        size: Option<u64>,
        source: Option<&dyn BlockImage>,
        _secrets: &crate::secret::Secrets,
    ) -> Result<crate::creation::Measurement> {
        measure::measure(options, size, source)
    }

    /// qemu's raw creation options, read as qemu reads them (a bad value or an unknown key in
    /// its words); only the one that changes nothing for vimg (`extent_size_hint`) is taken.
    fn check_target_options(&self, options: &[String]) -> Result<()> {
        use crate::option_list::{boolean, invalid_parameter, key_value, size, split};
        for o in options {
            for item in split(o)? {
                let (k, v) = key_value(&item);
                match k {
                    "extent_size_hint" => {
                        size(k, v)?;
                    }
                    "size" | "preallocation" | "nocow" => {
                        if k == "size" {
                            size(k, v)?;
                        } else if k == "nocow" {
                            boolean(k, v)?;
                        }
                        return Err(Error::unsupported(
                            "-o options are not supported for raw targets yet",
                        ));
                    }
                    _ => return Err(invalid_parameter(k)),
                }
            }
        }
        Ok(())
    }

    /// A new raw file of `size` bytes (no options; raw records no backing file).
    fn create_target(
        &self,
        path: &Path,
        size: u64,
        _options: &[String],
        _backing: (Option<String>, Option<String>),
        _no_backing: bool,
        opener: &Opener,
    ) -> Result<Box<dyn BlockImage>> {
        Ok(Box::new(RawImage::create_with(opener, path, size)?))
    }
}

/// A raw image over any [`Storage`].
pub struct RawImage {
    storage: Box<dyn Storage>,
    path: PathBuf,
    writable: bool,
    /// The virtual size: the file's length at open rounded up to whole 512-byte sectors, as qemu
    /// sees it (bytes past the end of the file read as zeros). Read once, as qemu does: asking
    /// the file system on every request would cost a system call each.
    size: u64,
    /// Flushes do not wait for the disk (qemu's `cache=unsafe`).
    unsafe_cache: std::sync::atomic::AtomicBool,
    /// Block status in whole sectors (see [`RawImage::direct`]).
    direct: bool,
    /// The storage is a block device (see [`BlockImage::done_reading`]).
    on_device: bool,
}

impl RawImage {
    /// Opens the raw file at `path`, with the image locks vimg takes on raw images by default:
    /// read-only shared with everybody, read-write exclusive (see [`crate::lock`]).
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let locks = if writable {
            LockRequest::exclusive(true)
        } else {
            LockRequest::shared_read()
        };
        Self::open_with(&Opener::default(), path, writable, locks)
    }

    /// Opens the raw file at `path` through `opener`, taking the image locks `locks`.
    pub fn open_with(
        opener: &Opener,
        path: &Path,
        writable: bool,
        locks: LockRequest,
    ) -> Result<Self> {
        let storage = opener
            .open(path, writable, locks)
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
        Self::from_storage(storage, path, writable)
    }

    /// Creates (or truncates) a raw file at `path` of `size` bytes, all holes but the first
    /// block (see [`allocate_first_block`]), as qemu creates one.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        Self::create_with(&Opener::default(), path, size)
    }

    /// [`RawImage::create`], the file created through `opener`.
    pub fn create_with(opener: &Opener, path: &Path, size: u64) -> Result<Self> {
        let storage = opener
            .create(path)
            .map_err(|e| Error::io("cannot create image", e).with_path(path))?;
        storage
            .set_len(size)
            .and_then(|_| allocate_first_block(storage.as_ref(), size))
            .map_err(|e| Error::io("cannot set image size", e).with_path(path))?;
        Self::from_storage(storage, path, true)
    }

    /// A raw image over existing storage; `path` is used in messages.
    pub fn from_storage(storage: Box<dyn Storage>, path: &Path, writable: bool) -> Result<Self> {
        let len = storage
            .len()
            .map_err(|e| Error::io("cannot get image size", e).with_path(path))?;
        Ok(RawImage {
            path: path.to_path_buf(),
            writable,
            size: len.div_ceil(512) * 512,
            unsafe_cache: std::sync::atomic::AtomicBool::new(false),
            direct: false,
            on_device: storage.host_file().is_some_and(|f| {
                use std::os::unix::fs::FileTypeExt;
                f.metadata().is_ok_and(|m| m.file_type().is_block_device())
            }),
            storage,
        })
    }

    /// The image as qemu sees it opened with `cache.direct=on` (`O_DIRECT`): its block-status
    /// answers then come in whole requests of the device's alignment (at least a 512-byte
    /// sector), so a file ending in a partial sector reports that sector as data with the
    /// data before it, where without `O_DIRECT` the bytes past the end of the file are a zero
    /// range of their own (qemu's file-posix rounds a data extent up to its request
    /// alignment). Reads and writes are unchanged.
    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }

    fn writable_check(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only").with_path(&self.path))
        }
    }
}

impl crate::capability::Resize for RawImage {
    /// The file's exact length (not rounded to sectors as the virtual size is).
    fn resize_base(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io("cannot get image size", e).with_path(&self.path))
    }

    /// `metadata` has no meaning for a raw file and is refused when growing, as by qemu.
    fn check_resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if new_size > self.resize_base()? && prealloc == Preallocation::Metadata {
            return Err(
                Error::invalid_input("Unsupported preallocation mode: metadata")
                    .with_path(&self.path),
            );
        }
        Ok(())
    }

    /// Truncates or extends the file to exactly `new_size` bytes; the grown part is sparse
    /// (`off`), allocated with fallocate (`falloc`) or written with zeros (`full`), as qemu
    /// grows a raw file.
    fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.writable_check()?;
        let cur = self.resize_base()?;
        if new_size > cur && prealloc != Preallocation::Off {
            crate::prealloc::grow_file(self.storage.as_ref(), &self.path, new_size, prealloc)?;
        }
        self.storage
            .set_len(new_size)
            .map_err(|e| Error::io("cannot resize image", e).with_path(&self.path))?;
        // A file grown from empty gets its first block written, as qemu does, whatever the
        // preallocation.
        if cur == 0 && new_size > 0 && prealloc == Preallocation::Off {
            allocate_first_block(self.storage.as_ref(), new_size)
                .map_err(|e| Error::io("cannot resize image", e).with_path(&self.path))?;
        }
        self.storage
            .flush()
            .map_err(|e| Error::io("cannot resize image", e).with_path(&self.path))?;
        self.size = new_size.div_ceil(512) * 512;
        Ok(())
    }
}

/// Writes zeros over the first 4 KiB of a file just grown from empty to `len` bytes (all of it
/// when shorter), as qemu's file-posix driver does whenever it grows an empty file without
/// preallocation, so that later opens can probe the host's block size. A raw image made by
/// qemu therefore maps its first block as data; vimg's do the same.
pub fn allocate_first_block(storage: &dyn Storage, len: u64) -> std::io::Result<()> {
    let n = len.min(4096) as usize;
    if n == 0 {
        return Ok(());
    }
    storage.write_at(&vec![0u8; n], 0)
}

impl BlockImage for RawImage {
    fn format(&self) -> ImageFormat {
        RAW
    }

    fn filename(&self) -> &Path {
        &self.path
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64).in_file(&self.path)?;
        self.storage.debug_event(crate::blkdebug::Event::ReadAio);
        self.storage.read_at(buf, offset.0).map_err(|e| {
            Error::io("read failed", e)
                .with_path(&self.path)
                .at(offset.0)
        })
    }

    fn done_reading(&self, offset: GuestOffset, len: u64) {
        if let (true, Some(f), Some(n)) = (
            self.on_device,
            self.storage.host_file(),
            std::num::NonZeroU64::new(len),
        ) {
            // Advice only: clean pages are dropped, dirty ones stay; a failure changes nothing.
            let _ = rustix::fs::fadvise(f, offset.0, Some(n), rustix::fs::Advice::DontNeed);
        }
    }

    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        self.writable_check()?;
        check_request(self.size, offset, buf.len() as u64).in_file(&self.path)?;
        self.storage.debug_event(crate::blkdebug::Event::WriteAio);
        self.storage.write_at(buf, offset.0).map_err(|e| {
            Error::io("write failed", e)
                .with_path(&self.path)
                .at(offset.0)
        })
    }

    fn write_zeroes(&self, offset: GuestOffset, len: u64, unmap: bool) -> Result<()> {
        self.writable_check()?;
        check_request(self.size, offset, len).in_file(&self.path)?;
        // A raw file can only record zeros by holding them; punching a hole is how it does so
        // cheaply. Without unmap, qemu still punches where the file system keeps the zeros
        // readable, which every hole does; so both modes punch.
        let _ = unmap;
        self.storage.zero_range(offset.0, len).map_err(|e| {
            Error::io("zero write failed", e)
                .with_path(&self.path)
                .at(offset.0)
        })
    }

    /// Punches a hole over the range (it then reads as zeros) where the file system supports
    /// it; elsewhere the range keeps its contents, as qemu's raw discard does.
    fn discard(&self, offset: GuestOffset, len: u64) -> Result<()> {
        self.writable_check()?;
        check_request(self.size, offset, len).in_file(&self.path)?;
        // Bytes of the last partial sector lie past the end of the file: punch up to the end.
        let file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("cannot get image size", e).with_path(&self.path))?;
        let len = len.min(file_len.saturating_sub(offset.0));
        self.storage
            .punch_hole(offset.0, len)
            .map(|_| ())
            .map_err(|e| {
                Error::io("discard failed", e)
                    .with_path(&self.path)
                    .at(offset.0)
            })
    }

    /// Syncs the file, unless the cache mode is unsafe (a raw file keeps no metadata of its
    /// own, so there is no order to keep either).
    fn flush(&self) -> Result<()> {
        if self.unsafe_cache.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.storage
            .flush()
            .map_err(|e| Error::io("flush failed", e).with_path(&self.path))
    }

    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        let size = self.size;
        check_request(size, offset, max_len.max(1)).in_file(&self.path)?;
        if let Some(a) = self
            .storage
            .allocation_at(offset.0)
            .map_err(|e| Error::io("block status query failed", e).with_path(&self.path))?
        {
            // As qemu reads an NBD export's status: allocated where data or zero.
            return Ok(BlockStatus {
                len: a.len.min(max_len).max(1),
                depth: 0,
                present: a.data || a.zero,
                zero: a.zero,
                data: a.data,
                compressed: false,
                offset: (a.data || a.zero).then_some(HostOffset(offset.0)),
            });
        }
        let (is_data, n) = self
            .storage
            .extent_at(offset.0)
            .map_err(|e| Error::io("block status query failed", e).with_path(&self.path))?;
        let mut len = n.min(max_len).max(1);
        if is_data && self.direct {
            // Only the end of the file can end a data extent inside a sector.
            let end = (offset.0 + len).next_multiple_of(512).min(size);
            len = (end - offset.0).min(max_len);
        }
        let host = HostOffset(offset.0);
        Ok(if is_data {
            BlockStatus::data(len, 0, host)
        } else {
            // qemu reports raw holes as present zeros with their offset.
            BlockStatus::zero(len, 0, Some(host))
        })
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn set_unsafe_cache(&self, on: bool) {
        self.unsafe_cache
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The file itself: a layer below another image is read through
    /// [`crate::chain_read::read_through`], whose default read of a stored range reads here.
    fn stored_data(&self) -> Option<&dyn Storage> {
        Some(self.storage.as_ref())
    }

    fn linear_storage(&self) -> Option<&dyn Storage> {
        self.writable.then_some(self.storage.as_ref())
    }

    fn copyable_data(&self) -> Option<&dyn Storage> {
        Some(self.storage.as_ref())
    }

    fn as_resize(&self) -> Option<&dyn crate::capability::Resize> {
        Some(self)
    }

    fn as_resize_mut(&mut self) -> Option<&mut dyn crate::capability::Resize> {
        Some(self)
    }

    fn actual_size(&self) -> Option<u64> {
        self.storage.allocated_bytes()
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            filename: self.path.display().to_string(),
            format: RAW.as_str(),
            virtual_size: self.size,
            actual_size: self.actual_size(),
            cluster_size: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_report_zero_and_zero_writes_punch_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        // A sparse file made elsewhere (vimg's own create writes the first block).
        std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
        let img = RawImage::open(&p, true).unwrap();
        let data = vec![0xabu8; 1 << 20];
        img.write_at(&data, GuestOffset(1 << 20)).unwrap();
        img.flush().unwrap();
        let s0 = img.block_status(GuestOffset(0), 4 << 20).unwrap();
        assert!(s0.zero && !s0.data && s0.present, "{s0:?}");
        assert_eq!(s0.len, 1 << 20);
        let s1 = img.block_status(GuestOffset(1 << 20), 3 << 20).unwrap();
        assert!(s1.data && !s1.zero, "{s1:?}");
        assert_eq!(s1.offset, Some(HostOffset(1 << 20)));
        img.write_zeroes(GuestOffset(1 << 20), 1 << 20, true)
            .unwrap();
        let mut back = vec![1u8; 1 << 20];
        img.read_at(&mut back, GuestOffset(1 << 20)).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        let s2 = img.block_status(GuestOffset(1 << 20), 3 << 20).unwrap();
        assert!(s2.zero, "zero write left data: {s2:?}");
    }

    #[test]
    fn create_writes_the_first_block_as_qemu_does() {
        let dir = tempfile::tempdir().unwrap();
        for (size, first) in [(4u64 << 20, 4096u64), (1024, 1024), (0, 0)] {
            let p = dir.path().join(format!("{size}.raw"));
            let img = RawImage::create(&p, size).unwrap();
            if size == 0 {
                continue;
            }
            let s0 = img.block_status(GuestOffset(0), size).unwrap();
            assert!(s0.data && s0.len == first, "{size}: {s0:?}");
            if size > first {
                let s1 = img.block_status(GuestOffset(first), size - first).unwrap();
                assert!(s1.zero && !s1.data, "{size}: {s1:?}");
            }
            let mut buf = vec![1u8; first as usize];
            img.read_at(&mut buf, GuestOffset(0)).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn discard_punches_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let img = RawImage::create(&p, 4 << 20).unwrap();
        img.write_at(&vec![0x5au8; 2 << 20], GuestOffset(1 << 20))
            .unwrap();
        img.discard(GuestOffset(1 << 20), 1 << 20).unwrap();
        let mut back = vec![1u8; 2 << 20];
        img.read_at(&mut back, GuestOffset(1 << 20)).unwrap();
        // tmpfs and every common Linux file system punch holes; a file system that cannot
        // would keep the data, which discard allows.
        assert!(back[..1 << 20].iter().all(|&b| b == 0));
        assert!(back[1 << 20..].iter().all(|&b| b == 0x5a));
        let s = img.block_status(GuestOffset(1 << 20), 1 << 20).unwrap();
        assert!(s.zero && !s.data, "{s:?}");
        assert!(img.discard(GuestOffset(4 << 20), 1).is_err());
    }

    #[test]
    fn out_of_range_and_read_only_requests_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        RawImage::create(&p, 4096).unwrap();
        let ro = RawImage::open(&p, false).unwrap();
        let mut b = [0u8; 512];
        assert_eq!(
            ro.read_at(&mut b, GuestOffset(4000)).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            ro.write_at(&b, GuestOffset(0)).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        let e = ro.block_status(GuestOffset(4096), 1).unwrap_err();
        assert!(e.to_string().contains("d.raw"), "{e}");
    }
}
