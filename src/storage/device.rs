//! Zeroing and discarding on a block device, as qemu's `host_device` driver does them
//! (block/file-posix.c: `handle_aiocb_write_zeroes_unmap`, `handle_aiocb_write_zeroes_block`,
//! `handle_aiocb_discard`).
//!
//! - **Zeroing** ([`DeviceOps::zero`]) makes a range read as zeros, by the cheapest means the
//!   device offers, tried in this order: `fallocate(PUNCH_HOLE | KEEP_SIZE)`, which the kernel
//!   turns into a write-zeroes request that may unmap (thin LVM volumes, zvols, loop devices and
//!   SSDs that deallocate to zeros answer it without writing anything) and refuses rather than
//!   fall back to writing; then the `BLKZEROOUT` ioctl, a write-zeroes request without unmapping
//!   that the kernel itself falls back to writing zero pages for; and last, zero buffers
//!   written from here. Each of the first two is given up for the rest of the run once the
//!   device has said it cannot do it, as qemu does. Heads and tails off the device's logical
//!   sector are written as zero buffers (the kernel takes only whole sectors).
//! - **Discarding** ([`DeviceOps::discard`]) is `BLKDISCARD`: the device may free the space, and
//!   what the range reads afterwards is not promised (a loop device reads zeros, an SSD may
//!   not), so a discard never counts as zeroing.
//!
//! Both ioctls and the fallocate drop the device's page-cache pages over the range before they
//! act (Linux `blk_ioctl_zeroout`, `blk_ioctl_discard` and `blkdev_fallocate` call
//! `truncate_bdev_range`), so buffered reads through vimg's own handle see the zeros; qemu keeps
//! `BLKZEROOUT` to O_DIRECT opens only because Linux 3.10 did not.
//!
//! The ioctls are issued through `libc` by hand: neither rustix nor libc names `BLKZEROOUT` or
//! `BLKDISCARD`, and rustix's typed ioctl wrapper needs an unsafe call all the same.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `_IO(0x12, 119)`, linux/fs.h: discard a byte range `[u64; 2]` (offset, length).
const BLKDISCARD: u32 = 0x1277;
/// `_IO(0x12, 127)`, linux/fs.h: write zeros over a byte range `[u64; 2]` (offset, length).
const BLKZEROOUT: u32 = 0x127f;

/// The largest zero buffer written at once when the device offers no zeroing of its own.
const ZERO_BUFFER: usize = 1 << 20;

/// What one open block device has said it can do, remembered across calls.
#[derive(Debug)]
pub(super) struct DeviceOps {
    /// The logical sector size: ioctls and fallocate take only whole sectors.
    sector: u64,
    /// `fallocate(PUNCH_HOLE)` has not been refused yet.
    punch: AtomicBool,
    /// `BLKZEROOUT` has not been refused yet.
    zeroout: AtomicBool,
    /// `BLKDISCARD` has not been refused yet.
    discard: AtomicBool,
}

/// Whether an error says the device cannot do what was asked (rather than that it failed),
/// as qemu's `translate_err` reads them; `EINVAL` and `EBUSY` too, as qemu takes them from a
/// punch on a device.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EOPNOTSUPP
                | libc::ENOSYS
                | libc::ENODEV
                | libc::ENOTTY
                | libc::EINVAL
                | libc::EBUSY
        )
    )
}

/// Issues the range ioctl `request` on `file`.
fn range_ioctl(file: &File, request: u32, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    loop {
        // SAFETY: BLKZEROOUT and BLKDISCARD read exactly a `[u64; 2]` through the pointer
        // (linux/fs.h, block/ioctl.c `blk_ioctl_zeroout` / `blk_ioctl_discard`), which points to
        // `range`, alive and unaliased for the duration of the call; the descriptor is open for
        // as long as `file` is borrowed. Nothing is written through the pointer.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                request as libc::Ioctl,
                range.as_ptr() as *const libc::c_void,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How the storage writes a buffer at an offset (its own write path, which knows how the device
/// is opened).
pub(super) type Write<'a> = &'a dyn Fn(&[u8], u64) -> io::Result<()>;

/// Writes zero buffers over `[offset, offset + len)` with `write`.
pub(super) fn write_zero_buffers(write: Write<'_>, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(ZERO_BUFFER as u64) as usize];
    let end = offset + len;
    let mut off = offset;
    while off < end {
        let n = (end - off).min(zeros.len() as u64) as usize;
        write(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

impl DeviceOps {
    /// The operations of a device whose logical sector is `sector` bytes (a power of two).
    pub(super) fn new(sector: u32) -> Self {
        DeviceOps {
            sector: u64::from(sector.max(1)),
            punch: AtomicBool::new(true),
            zeroout: AtomicBool::new(true),
            discard: AtomicBool::new(true),
        }
    }

    /// The whole sectors inside `[offset, offset + len)`: `(start, end)`, empty when `start >=
    /// end`.
    fn inner(&self, offset: u64, len: u64) -> (u64, u64) {
        let s = self.sector;
        let start = offset.div_ceil(s).saturating_mul(s);
        let end = offset.saturating_add(len) / s * s;
        (start, end)
    }

    /// Makes `[offset, offset + len)` of the device `file` read as zeros (see the module docs
    /// for how), writing zero buffers, where it must, with `write`.
    pub(super) fn zero(
        &self,
        file: &File,
        write: Write<'_>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let end = offset.saturating_add(len);
        let (a, b) = self.inner(offset, len);
        if a >= b {
            return write_zero_buffers(write, offset, len);
        }
        write_zero_buffers(write, offset, a - offset)?;
        self.zero_sectors(file, write, a, b - a)?;
        write_zero_buffers(write, b, end - b)
    }

    /// [`DeviceOps::zero`] over whole sectors.
    fn zero_sectors(&self, file: &File, write: Write<'_>, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if self.punch.load(Ordering::Relaxed) {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match fallocate(file, flags, offset, len).map_err(io::Error::from) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.punch.store(false, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        if self.zeroout.load(Ordering::Relaxed) {
            match range_ioctl(file, BLKZEROOUT, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.zeroout.store(false, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        write_zero_buffers(write, offset, len)
    }

    /// Discards the whole sectors inside `[offset, offset + len)` of the device `file` with
    /// `BLKDISCARD`, where the device takes discards. What the range reads afterwards is not
    /// promised; a device that takes no discards keeps it as it was.
    pub(super) fn discard(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let (a, b) = self.inner(offset, len);
        if a >= b || !self.discard.load(Ordering::Relaxed) {
            return Ok(());
        }
        match range_ioctl(file, BLKDISCARD, a, b - a) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => {
                self.discard.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_sectors_inside_a_range() {
        let d = DeviceOps::new(4096);
        assert_eq!(d.inner(0, 8192), (0, 8192));
        assert_eq!(d.inner(512, 8192), (4096, 8192));
        assert_eq!(d.inner(512, 1024), (4096, 0));
        assert_eq!(d.inner(4096, 4095), (4096, 4096));
        let d = DeviceOps::new(512);
        assert_eq!(d.inner(100, 1000), (512, 1024));
    }

    /// A regular file stands in for the device: it takes the punch (so only heads and tails
    /// are written as buffers), and refuses `BLKZEROOUT` (ENOTTY), so that with the punch taken
    /// away the whole range is written as zero buffers; either way it reads as zeros after, and
    /// nothing outside the range changes.
    #[test]
    fn zeroing_falls_back_step_by_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        for punch in [true, false] {
            std::fs::write(&path, vec![0x5au8; 64 << 10]).unwrap();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let ops = DeviceOps::new(4096);
            ops.punch.store(punch, Ordering::Relaxed);
            let written = std::sync::Mutex::new(Vec::new());
            let write = |buf: &[u8], off: u64| {
                written.lock().unwrap().push((off, buf.len() as u64));
                use std::os::unix::fs::FileExt;
                file.write_all_at(buf, off)
            };
            ops.zero(&file, &write, 1000, 20000).unwrap();
            let data = std::fs::read(&path).unwrap();
            assert!(data[..1000].iter().all(|&b| b == 0x5a));
            assert!(data[1000..21000].iter().all(|&b| b == 0));
            assert!(data[21000..].iter().all(|&b| b == 0x5a));
            let written = written.into_inner().unwrap();
            if punch {
                assert_eq!(written, [(1000, 3096), (20480, 520)]);
            } else {
                assert_eq!(written, [(1000, 3096), (4096, 16384), (20480, 520)]);
                assert!(
                    !ops.zeroout.load(Ordering::Relaxed),
                    "BLKZEROOUT was not tried"
                );
            }
        }
    }

    #[test]
    fn unsupported_errors_are_told_from_failures() {
        assert!(unsupported(&io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
        assert!(unsupported(&io::Error::from_raw_os_error(libc::ENOTTY)));
        assert!(!unsupported(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(!unsupported(&io::Error::from_raw_os_error(libc::ENOSPC)));
    }
}
