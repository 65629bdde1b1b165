//! A storage wrapper that crashes: after the Nth write it fails (or silently drops) every
//! write, resize and sync, so that a test can interrupt an operation at every write and look at
//! what is left on disk.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vimg::storage::{FileStorage, Storage};

/// How writes after the limit behave.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// They fail with an I/O error (a dying disk).
    Fail,
    /// They report success but never reach the file (a power cut before the cache drained).
    Drop,
}

/// Counts writes; after `limit` of them, fails or drops every write, sync and resize.
pub struct Crashing {
    /// The file written through.
    pub inner: FileStorage,
    /// Writes that reach the file.
    pub limit: u64,
    /// What happens to the others.
    pub mode: Mode,
    /// Writes attempted so far (shared with the test, which reads it afterwards).
    pub writes: Arc<AtomicU64>,
    /// Set once a write was failed or dropped.
    pub crashed: Arc<AtomicBool>,
}

impl Crashing {
    /// Wraps `inner`, letting `limit` writes through.
    pub fn new(inner: FileStorage, limit: u64, mode: Mode) -> Self {
        Crashing {
            inner,
            limit,
            mode,
            writes: Arc::new(AtomicU64::new(0)),
            crashed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Wraps `inner`, letting `limit` writes through, counted together with every other
    /// wrapper sharing `writes` and `crashed` (an operation that changes several files).
    pub fn shared(
        inner: FileStorage,
        limit: u64,
        mode: Mode,
        writes: &Arc<AtomicU64>,
        crashed: &Arc<AtomicBool>,
    ) -> Self {
        Crashing {
            inner,
            limit,
            mode,
            writes: writes.clone(),
            crashed: crashed.clone(),
        }
    }

    fn gate(&self) -> io::Result<bool> {
        if self.writes.fetch_add(1, Ordering::SeqCst) < self.limit {
            return Ok(true);
        }
        self.crashed.store(true, Ordering::SeqCst);
        match self.mode {
            Mode::Fail => Err(io::Error::other("injected failure")),
            Mode::Drop => Ok(false),
        }
    }
}

impl Storage for Crashing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.gate()? {
            self.inner.write_at(buf, offset)?;
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.gate()? {
            self.inner.set_len(len)?;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        if self.crashed.load(Ordering::SeqCst) {
            if let Mode::Fail = self.mode {
                return Err(io::Error::other("injected failure"));
            }
        }
        Ok(()) // durability of the real file does not matter within one test process
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.gate()? {
            self.inner.zero_range(offset, len)?;
        }
        Ok(())
    }
    fn extent_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        self.inner.extent_at(offset)
    }
}
