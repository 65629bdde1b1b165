//! The output of a live backup: a file, a pipe or a socket whose writes are bounded in time.
//!
//! A guest write during a backup may have to wait for the archive (its old clusters are saved
//! first). If the archive's reader stops reading, a plain write would block that guest write
//! forever; here a write that makes no progress for the stall limit fails instead (and so does
//! every write once the job is aborted), so the job aborts and the guest goes on.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a blocked write looks at the abort flag.
const POLL_STEP: Duration = Duration::from_millis(50);

/// A writer over `file` that fails a write making no progress for `stall`, and every write
/// once `abort` is set. The descriptor is made non-blocking while it is held (its flags are
/// restored when it is dropped).
pub struct BoundedWriter {
    file: File,
    stall: Duration,
    abort: Arc<AtomicBool>,
    flags: Option<libc::c_int>,
    written: u64,
}

impl BoundedWriter {
    /// Wraps `file`; `abort` is shared with whoever may cancel the job.
    pub fn new(file: File, stall: Duration, abort: Arc<AtomicBool>) -> Self {
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this writer owns, with integer arguments only.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let flags = if flags >= 0 {
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
            Some(flags)
        } else {
            None
        };
        BoundedWriter {
            file,
            stall,
            abort,
            flags,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn aborted(&self) -> io::Error {
        io::Error::other("the backup job was aborted")
    }
}

impl Write for BoundedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = Instant::now();
        loop {
            if self.abort.load(Ordering::Relaxed) {
                return Err(self.aborted());
            }
            match self.file.write(buf) {
                Ok(n) => {
                    self.written += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if start.elapsed() >= self.stall {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the archive's reader took nothing for {} ms",
                                self.stall.as_millis()
                            ),
                        ));
                    }
                    let mut pfd = libc::pollfd {
                        fd: self.file.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, POLL_STEP.as_millis() as libc::c_int) };
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BoundedWriter {
    fn drop(&mut self) {
        if let Some(flags) = self.flags {
            // SAFETY: fcntl on the descriptor this writer still owns.
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETFL, flags) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_never_reads_fails_the_write_in_time() {
        let (_rx, tx) = std::io::pipe().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(tx));
        let abort = Arc::new(AtomicBool::new(false));
        let mut w = BoundedWriter::new(file, Duration::from_millis(300), abort);
        let start = Instant::now();
        let chunk = vec![7u8; 1 << 20];
        let e = (0..64).try_for_each(|_| w.write_all(&chunk)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(w.written() > 0, "the pipe's buffer took something first");
    }

    #[test]
    fn an_abort_fails_the_next_write_and_a_gone_reader_is_epipe() {
        let (rx, tx) = std::io::pipe().unwrap();
        let abort = Arc::new(AtomicBool::new(false));
        let mut w = BoundedWriter::new(
            File::from(std::os::fd::OwnedFd::from(tx)),
            Duration::from_secs(60),
            abort.clone(),
        );
        w.write_all(b"x").unwrap();
        drop(rx);
        // Rust programs ignore SIGPIPE: the write fails with EPIPE.
        let e = w.write_all(b"y").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        abort.store(true, Ordering::Relaxed);
        assert!(w.write_all(b"z").is_err());
    }
}
