//! Host storage under an image: a file, or memory in tests.
//!
//! Formats do all their I/O through [`Storage`], so that tests can substitute an in-memory
//! store (and, later, one that fails or drops writes to prove crash safety).
//!
//! A [`FileStorage`] holds qemu's image locks on its file ([`crate::lock`]) for as long as it
//! is open: [`FileStorage::open`] and [`FileStorage::create`] take those of a qcow2 image file,
//! [`FileStorage::open_with`] any others.
//!
//! For the kill tests (tests/crash/kill.rs), a process started with `VIMG_TEST_KILL_AFTER_WRITES=N`
//! kills itself with SIGKILL just before the N-th change any of its [`FileStorage`]s would make
//! (write, length change, zeroing, hole punch), counted from 1 across the process. The variable
//! is read once; without it a write costs one relaxed atomic load more.

mod device;

use crate::direct_io::DirectIo;
use crate::lock::{self, LockRequest};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Positioned I/O on a host file. All methods take `&self` and may be called from several
/// threads at once.
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`. Bytes past the end of the storage read as zero (as
    /// they do in qemu), so a caller that needs data to be inside the file must check
    /// [`Storage::len`] itself.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// The length of what is really stored, where [`Storage::len`] reports a padded view (the
    /// repair's view of a file whose refcount table lies past its end). The default is `len`.
    fn stored_len(&self) -> io::Result<u64> {
        self.len()
    }
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the length, truncating or extending with zeros (a hole where possible).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn flush(&self) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zero, freeing the space where the storage can
    /// (punching a hole), without changing the length.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Frees the space behind `[offset, offset+len)` if the storage can, without changing the
    /// length. Best effort, as a discard is: returns `Ok(true)` if the range now reads as zero
    /// (a hole punched in a file), `Ok(false)` if it may not: where the storage cannot free
    /// space the contents are unchanged, and after a block device's discard (`BLKDISCARD`)
    /// they are whatever the device makes of it. The default does nothing.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
    /// Where `offset` lies relative to stored data: `Ok((true, n))` if the `n` bytes from
    /// `offset` (n >= 1) may hold data, `Ok((false, n))` if they are a hole that reads as zero.
    /// Storage that cannot tell reports everything up to its end as data. Offsets at or past the
    /// end report a hole running to `u64::MAX`.
    fn extent_at(&self, offset: u64) -> io::Result<(bool, u64)>;
    /// What storage that reports allocation itself (an NBD export's `base:allocation`) says
    /// of the extent at `offset`; `None` (the default) for storage that answers only
    /// [`Storage::extent_at`].
    fn allocation_at(&self, offset: u64) -> io::Result<Option<Allocation>> {
        let _ = offset;
        Ok(None)
    }
    /// Bytes actually allocated on the host, if known (qemu's `actual-size`).
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// The path, for messages; `None` for anonymous storage.
    fn path(&self) -> Option<&Path> {
        None
    }
    /// The host file behind the storage, if it is one (for what only a file can do:
    /// fallocate, preallocation).
    fn host_file(&self) -> Option<&File> {
        None
    }
    /// The open file whose bytes at each offset are this storage's bytes there, read through
    /// the page cache, for a reader that passes them on without reading them (`sendfile(2)`
    /// from the NBD server, see [`crate::host_run`]). Only a host file opened without
    /// `O_DIRECT` gives one: storage that does anything on a read (blkdebug's rules and
    /// events, `O_DIRECT` alignment, anything not a file) gives none, and is read. The default
    /// gives none.
    fn send_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// Copies `len` bytes at `src_offset` of `src` to `offset` of this storage inside the
    /// kernel (`copy_file_range`: a clone where the file system shares extents, XFS or btrfs;
    /// a copy between page caches elsewhere), for `convert -C`. `Ok(false)` when it cannot
    /// (not two host files, a file open with `O_DIRECT`, or a kernel or file system that
    /// refuses: EXDEV, EINVAL, ENOSYS, EOPNOTSUPP), and the caller then reads and writes;
    /// part of the range may have been copied then. The default cannot.
    fn copy_range_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        let _ = (src, src_offset, offset, len);
        Ok(false)
    }
    /// Another handle on the same storage, if it can give one: for a file, the same open file
    /// description (so the same image locks, no conflict with this handle); for memory, the same
    /// bytes. Used to reopen an image that is still open (a repair reading back what it
    /// rebuilt). The default gives none.
    fn duplicate(&self) -> Option<Box<dyn Storage>> {
        None
    }
    /// Tells the storage what the format driver above it is about to do (qemu's
    /// `BLKDBG_EVENT`); only [`crate::blkdebug`]'s storage acts on it. The default ignores it.
    fn debug_event(&self, event: DebugEvent) {
        let _ = event;
    }
}

/// An extent as storage that reports allocation itself describes it ([`Storage::allocation_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Its length from the offset asked about (at least 1).
    pub len: u64,
    /// It is stored (not a hole).
    pub data: bool,
    /// It reads as zeros.
    pub zero: bool,
}

/// A file's identity: the device it is on and its inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file `path` names (through symbolic links); `None` if it does not
    /// exist or cannot be looked at.
    pub fn of(path: &Path) -> Option<FileId> {
        Self::of_file(path).ok()
    }

    /// The identity of the file `path` names (through symbolic links), or why it cannot be
    /// looked at.
    pub fn of_file(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// What a format driver is about to do, told to its storage ([`Storage::debug_event`]); a
/// subset of qemu's `BlkdebugEvent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugEvent {
    /// Reading guest data (qemu's `read_aio`).
    ReadAio,
    /// Writing guest data (qemu's `write_aio`).
    WriteAio,
}

impl DebugEvent {
    /// qemu's name of the event.
    pub fn name(self) -> &'static str {
        match self {
            DebugEvent::ReadAio => "read_aio",
            DebugEvent::WriteAio => "write_aio",
        }
    }
}

/// Empties `file` unless it is empty already (see [`FileStorage::create`]). A block device is left
/// as it is: it has the length it has (qemu's `host_device` driver does not truncate either).
fn empty(file: &File) -> io::Result<()> {
    let m = file.metadata()?;
    if m.file_type().is_file() && m.len() > 0 {
        file.set_len(0)?;
    }
    Ok(())
}

/// What kind of host file an image lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// A regular file (or anything else that is not a block device): its length is the one
    /// `stat` reports, and it can be truncated, extended and made sparse.
    File,
    /// A block device (qemu's `host_device`): its length is the device's size, which `stat`
    /// reports as 0; it cannot be resized, and it has no holes.
    BlockDevice {
        /// The logical sector size (`BLKSSZGET`): the smallest unit the device addresses.
        logical_sector: u32,
        /// The physical sector size (`BLKPBSZGET`): the unit the device writes atomically.
        physical_sector: u32,
    },
}

impl HostKind {
    /// Finds out what `file` is open on.
    pub fn of(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if !file.metadata()?.file_type().is_block_device() {
            return Ok(HostKind::File);
        }
        Ok(HostKind::BlockDevice {
            logical_sector: rustix::fs::ioctl_blksszget(file)?,
            physical_sector: rustix::fs::ioctl_blkpbszget(file)?,
        })
    }

    /// Whether this is a block device.
    pub fn is_block_device(self) -> bool {
        matches!(self, HostKind::BlockDevice { .. })
    }
}

/// The length in bytes of what `file` is open on: a regular file's length, or a block device's
/// size (found, as qemu finds it, by seeking to the device's end: `stat` says 0 for a device).
/// Every size vimg reads from a host file goes through here (or [`FileStorage::len`]).
pub fn file_len(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let m = file.metadata()?;
    if !m.file_type().is_block_device() {
        return Ok(m.len());
    }
    // The file position is not used by anything in vimg (all I/O is positioned), so moving it
    // to the end is harmless.
    rustix::fs::seek(file, rustix::fs::SeekFrom::End(0)).map_err(io::Error::from)
}

/// The length in bytes of the file or block device at `path` (see [`file_len`]).
pub fn path_len(path: &Path) -> io::Result<u64> {
    file_len(&File::open(path)?)
}

/// Removes the file at `path` that a failed create made (or emptied), but only a regular file:
/// a block device (or anything else) written in place is never unlinked, since removing its
/// name would lose the device node, not undo the create. Errors are ignored (best effort).
pub fn remove_failed_output(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether `path` names a block device (following symlinks); `false` if it cannot be looked at.
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Fails, as qemu's `host_device` driver does, if `file` is a block device that is read-only
/// (`BLKROGET`; `blockdev --setro`, `losetup -r`, a write-protected disk): Linux lets such a
/// device be opened for writing and fails only the writes, each with `EPERM`.
fn refuse_read_only_device(file: &File) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::io::AsRawFd;
    /// `_IO(0x12, 94)`, linux/fs.h: whether the device is read-only, as an `int`.
    const BLKROGET: u32 = 0x125e;
    if !file.metadata()?.file_type().is_block_device() {
        return Ok(());
    }
    let mut read_only: libc::c_int = 0;
    // SAFETY: BLKROGET writes one `int` through the pointer (block/ioctl.c `put_int`), which
    // points to `read_only`, alive and not otherwise borrowed during the call; the descriptor
    // stays open while `file` is borrowed.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKROGET as libc::Ioctl,
            &mut read_only as *mut libc::c_int,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if read_only != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "The device is not writable: Permission denied",
        ));
    }
    Ok(())
}

/// Opens `path` for reading and writing, creating it if needed but not truncating it yet.
fn open_for_create(path: &Path, direct: bool) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    match direct {
        true => crate::direct_io::open_direct(&mut options, path),
        false => options.open(path),
    }
}

/// A host file, read and written with `pread`/`pwrite`.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    /// Whether changes count towards `VIMG_TEST_KILL_AFTER_WRITES` (see the module docs).
    counted: bool,
    /// The image locks this handle needs, released when it is dropped.
    _locks: Option<lock::LockGuard>,
    /// Taken around each buffered write, shared with [`Storage::duplicate`]s: see
    /// [`FileStorage::write_at`].
    write_gate: std::sync::Arc<std::sync::Mutex<()>>,
    /// What the file is: a block device has a size `stat` does not report, and no holes.
    kind: HostKind,
    /// For a block device: how it zeroes and discards, and what it has refused.
    device: Option<std::sync::Arc<device::DeviceOps>>,
    /// Set when the file is open with `O_DIRECT`: every read and write goes through it
    /// (aligned, see [`crate::direct_io`]); shared with [`Storage::duplicate`]s.
    direct: Option<Arc<DirectIo>>,
}

/// The `VIMG_TEST_KILL_AFTER_WRITES` hook (see the module documentation).
mod kill_hook {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static DONE: AtomicU64 = AtomicU64::new(0);

    /// Whether the hook is set for this process (read from the environment once).
    pub(super) fn armed() -> bool {
        LIMIT
            .get_or_init(|| {
                std::env::var("VIMG_TEST_KILL_AFTER_WRITES")
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|&n| n > 0)
            })
            .is_some()
    }

    /// Called before each change: kills the process when this is the N-th.
    pub(super) fn before_change() {
        let Some(Some(limit)) = LIMIT.get() else {
            return;
        };
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 >= *limit {
            // SAFETY: kill(2) with our own pid has no memory-safety preconditions; SIGKILL
            // ends the process here, as `kill -9` from outside would.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            // Not reached; should the signal be delayed, do not let the change happen.
            std::process::abort();
        }
    }
}

impl FileStorage {
    /// Opens `path` read-only, or read-write when `writable`, with the image locks of a qcow2
    /// image file ([`LockRequest::exclusive`]): fails with a lock [`lock::Conflict`] if another
    /// process is writing the file (or, for `writable`, using it at all without `-U`).
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        Self::open_with(path, writable, LockRequest::exclusive(writable))
    }

    /// Opens `path` read-only, or read-write when `writable`, taking the image locks `locks`.
    pub fn open_with(path: &Path, writable: bool, locks: LockRequest) -> io::Result<Self> {
        Self::open_cached(path, writable, locks, false)
    }

    /// [`FileStorage::open_with`], with `O_DIRECT` when `direct` (qemu's `cache.direct=on`):
    /// reads and writes then bypass the page cache, aligned as [`crate::direct_io`] aligns
    /// them. A file system that refuses `O_DIRECT` fails the open, as in qemu.
    pub fn open_cached(
        path: &Path,
        writable: bool,
        locks: LockRequest,
        direct: bool,
    ) -> io::Result<Self> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(writable);
        let file = match direct {
            true => crate::direct_io::open_direct(&mut options, path)?,
            false => options.open(path)?,
        };
        if writable {
            refuse_read_only_device(&file)?;
        }
        let guard = lock::lock(&file, locks)?;
        Self::from_file(file, path, guard, direct)
    }

    /// Creates `path`, or empties the file there, for writing, with the image locks of a
    /// writer: the locks are taken before anything is emptied, so a file another process has
    /// open is refused and left as it is.
    ///
    /// An empty file is not truncated again: on ext4 (with its default `auto_da_alloc`),
    /// truncating a file to zero makes its last close start writeback of everything written
    /// since, so a conversion into a freshly made file would wait at the end for the whole
    /// output to be submitted to the disk (half a second per GiB here), which `cache=unsafe` is
    /// meant to avoid.
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::create_cached(path, false)
    }

    /// [`FileStorage::create`], with `O_DIRECT` when `direct` (see
    /// [`FileStorage::open_cached`]).
    pub fn create_cached(path: &Path, direct: bool) -> io::Result<Self> {
        let file = open_for_create(path, direct)?;
        refuse_read_only_device(&file)?;
        let guard = lock::lock(&file, LockRequest::exclusive(true))?;
        let storage = Self::from_file(file, path, guard, direct)?;
        empty(&storage.file)?;
        Ok(storage)
    }

    fn from_file(
        file: File,
        path: &Path,
        locks: Option<lock::LockGuard>,
        direct: bool,
    ) -> io::Result<Self> {
        let kind = HostKind::of(&file)?;
        let device = match kind {
            HostKind::BlockDevice { logical_sector, .. } => {
                Some(std::sync::Arc::new(device::DeviceOps::new(logical_sector)))
            }
            HostKind::File => None,
        };
        let direct = match direct {
            true => Some(Arc::new(DirectIo::of(&file)?)),
            false => None,
        };
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            counted: kill_hook::armed(),
            _locks: locks,
            write_gate: Default::default(),
            kind,
            device,
            direct,
        })
    }

    /// The alignment of direct I/O, when the file is open with `O_DIRECT`.
    pub fn direct_alignment(&self) -> Option<crate::direct_io::Alignment> {
        self.direct.as_ref().map(|d| d.alignment())
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// What the file is (a regular file, or a block device with its sector sizes).
    pub fn kind(&self) -> HostKind {
        self.kind
    }
}

/// The largest piece one `pwrite` hands the kernel. A buffered write of N bytes at an N-aligned
/// offset lets recent kernels (ext4 with large folios, Linux 6.x) put it in one page-cache folio
/// of that size, and folios of 1 MiB and more come from the high-order free blocks that a
/// virtual machine's free page reporting has handed back to its host: each of their pages then
/// faults in on the host on first touch. On this project's machines, writing 1.2 GiB after the
/// freed memory had been reported took 6.1-6.6 s in aligned 1 MiB pieces and 4.1 s in 2 MiB
/// ones, against 0.24 s in 256 or 512 KiB pieces (qemu-img's writes, 4 KiB off 2 MiB alignment,
/// escape it by accident). A syscall per 256 KiB costs nothing measurable elsewhere.
const WRITE_PIECE: usize = 256 << 10;

impl Storage for FileStorage {
    fn host_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn send_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.direct.is_none().then(|| self.file.as_fd())
    }

    /// `VIMG_NO_COPY_FILE_RANGE=1` (a test hook) makes it answer `Ok(false)` at once, as a
    /// file system without `copy_file_range` would, to test the callers' fallback.
    fn copy_range_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        use rustix::io::Errno;
        let Some(from) = src.host_file() else {
            return Ok(false);
        };
        // Only plain files without O_DIRECT on both sides: a device or an O_DIRECT file has
        // requests of its own (alignment, zeroing) that a copy behind their back would skip.
        let plain = |k: HostKind, d: bool| !d && !k.is_block_device();
        if !plain(self.kind, self.direct.is_some())
            || std::env::var_os("VIMG_NO_COPY_FILE_RANGE").is_some_and(|v| v == "1")
        {
            return Ok(false);
        }
        match rustix::fs::fstat(from) {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {}
            _ => return Ok(false),
        }
        self.before_change();
        let (mut at, mut to, end) = (src_offset, offset, src_offset + len);
        while at < end {
            let want = (end - at).min(1 << 30) as usize;
            match rustix::fs::copy_file_range(from, Some(&mut at), &self.file, Some(&mut to), want)
            {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(Errno::INTR) => {}
                Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                    return Ok(false)
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(d) = &self.direct {
            return d.read_at(&self.file, buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.before_change();
        if let Some(d) = &self.direct {
            // Direct writes are not serialised by the kernel's inode lock as buffered ones
            // are; only those over the same blocks wait for each other (in `d`).
            return d.write_at(&self.file, buf, offset, !self.kind.is_block_device());
        }
        // Buffered writes to one file are serialised by the kernel (the inode lock), where a
        // waiting thread spins on the CPU the writing one could use; waiting here sleeps instead.
        // A poisoned gate guards no data, so it is taken all the same.
        let _gate = self.write_gate.lock().unwrap_or_else(|e| e.into_inner());
        // Large writes go to the kernel in pieces of at most WRITE_PIECE bytes: see there.
        let mut done = 0;
        for piece in buf.chunks(WRITE_PIECE) {
            self.file.write_all_at(piece, offset + done)?;
            done += piece.len() as u64;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        file_len(&self.file)
    }

    /// For a block device, only its own size is accepted (nothing changes), as qemu's
    /// `host_device` driver does: a device cannot be resized.
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.kind.is_block_device() {
            if len == self.len()? {
                return Ok(());
            }
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Cannot resize device files",
            ));
        }
        self.before_change();
        if let Some(d) = &self.direct {
            return d.set_len(&self.file, len);
        }
        self.file.set_len(len)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// On a block device, by the cheapest means it offers: a write-zeroes request that may
    /// unmap, `BLKZEROOUT`, zero buffers (src/storage/device.rs).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if len == 0 {
            return Ok(());
        }
        self.before_change();
        self.span_writes(offset, len, |write| {
            if let Some(dev) = &self.device {
                return dev.zero(&self.file, write, offset, len);
            }
            let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match fallocate(&self.file, punch, offset, len) {
                Ok(()) => Ok(()),
                // The file system cannot punch holes: write zeros instead.
                Err(_) => device::write_zero_buffers(write, offset, len),
            }
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        use rustix::fs::{fallocate, FallocateFlags};
        if len == 0 {
            return Ok(true);
        }
        self.before_change();
        self.span_writes(offset, len, |_| {
            if let Some(dev) = &self.device {
                // A discard on a device is not guaranteed to leave zeros.
                dev.discard(&self.file, offset, len)?;
                return Ok(false);
            }
            let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match fallocate(&self.file, punch, offset, len) {
                Ok(()) => Ok(true),
                Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                    Ok(false)
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn extent_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        use rustix::fs::{seek, SeekFrom};
        let len = self.len()?;
        if offset >= len {
            return Ok((false, u64::MAX - offset));
        }
        if self.kind.is_block_device() {
            // Devices do not report holes through SEEK_DATA/SEEK_HOLE: all of one is data.
            return Ok((true, len - offset));
        }
        // SEEK_DATA from `offset`: if it stays at `offset`, we are in data and SEEK_HOLE tells
        // where it ends; otherwise we are in a hole that ends where the next data begins.
        match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(d) if d == offset => {
                let h = seek(&self.file, SeekFrom::Hole(offset)).map_err(io::Error::from)?;
                Ok((true, h.max(offset + 1) - offset))
            }
            Ok(d) if d > offset => Ok((false, d - offset)),
            Ok(_) => Ok((true, len - offset)),
            // ENXIO: no data after offset, the rest of the file is a hole.
            Err(e) if e == rustix::io::Errno::NXIO => Ok((false, len - offset)),
            // The file system does not support SEEK_DATA: everything is data.
            Err(_) => Ok((true, len - offset)),
        }
    }

    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn duplicate(&self) -> Option<Box<dyn Storage>> {
        let file = self.file.try_clone().ok()?;
        // The locks stay with this handle: the duplicate shares them while both are open.
        Some(Box::new(FileStorage {
            file,
            path: self.path.clone(),
            counted: self.counted,
            _locks: None,
            write_gate: self.write_gate.clone(),
            kind: self.kind,
            device: self.device.clone(),
            direct: self.direct.clone(),
        }))
    }
}

impl FileStorage {
    /// Runs `f`, which zeroes or discards `[offset, offset + len)` outside the write path (a
    /// fallocate, an ioctl), with a writer for zero buffers in that range. Under `O_DIRECT` no
    /// write overlapping the range's aligned blocks runs meanwhile: a read-modify-write of a
    /// partial block would otherwise put back old bytes over what was just zeroed.
    fn span_writes<R>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&dyn Fn(&[u8], u64) -> io::Result<()>) -> io::Result<R>,
    ) -> io::Result<R> {
        match &self.direct {
            Some(d) => d.with_span(&self.file, offset, len, f),
            None => f(&|buf: &[u8], off: u64| self.file.write_all_at(buf, off)),
        }
    }

    fn before_change(&self) {
        if self.counted {
            kill_hook::before_change();
        }
    }
}

/// Storage held in memory, for tests and fuzzing. Reports everything as data. Its
/// [`Storage::duplicate`] handles share the bytes.
#[derive(Debug)]
pub struct MemStorage {
    data: Arc<RwLock<Vec<u8>>>,
    /// The largest length writes may grow the store to (a file system's largest file: a file
    /// grows sparse, memory does not).
    limit: u64,
}

impl Default for MemStorage {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl MemStorage {
    /// A store holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        Self::with_limit(data, u64::MAX)
    }

    /// A store holding `data` that writes and resizes may grow to `limit` bytes at most; past
    /// it they fail as on a file system whose largest file is that long (`EFBIG`).
    pub fn with_limit(data: Vec<u8>, limit: u64) -> Self {
        MemStorage {
            data: Arc::new(RwLock::new(data)),
            limit,
        }
    }

    fn too_large(&self, len: u64) -> io::Result<()> {
        if len > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "the in-memory image may grow to {} bytes at most",
                    self.limit
                ),
            ));
        }
        Ok(())
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        if offset < d.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(d.len() - start);
            buf[..n].copy_from_slice(&d[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let end = offset
            .checked_add(buf.len() as u64)
            .and_then(|e| usize::try_from(e).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        self.too_large(end as u64)?;
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.too_large(len)?;
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let dlen = d.len() as u64;
        let start = offset.min(dlen) as usize;
        let end = offset.saturating_add(len).min(dlen) as usize;
        d[start..end].fill(0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.zero_range(offset, len)?;
        Ok(true)
    }

    fn extent_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        let len = self.len()?;
        if offset >= len {
            Ok((false, u64::MAX - offset))
        } else {
            Ok((true, len - offset))
        }
    }

    fn duplicate(&self) -> Option<Box<dyn Storage>> {
        Some(Box::new(MemStorage {
            data: self.data.clone(),
            limit: self.limit,
        }))
    }
}
