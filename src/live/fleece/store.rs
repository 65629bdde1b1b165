//! Where a point-in-time view keeps the old data of the clusters overwritten since its start:
//! in memory up to a bound, then in a temporary file (a sparse raw file in the temporary
//! directory, qemu's fleecing image), removed when the store is dropped.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The temporary file of a store, removed when dropped.
#[derive(Debug)]
pub struct SpillFile {
    file: File,
    path: PathBuf,
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

impl SpillFile {
    /// Creates a new file in `dir` (never an existing one: `O_EXCL`, mode 0600).
    pub fn create(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let name = format!(
            "vimg-fleece-{}-{}-{:016x}.raw",
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed),
            u64::from_le_bytes(seed)
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io("cannot create the temporary store", e).with_path(&path))?;
        Ok(SpillFile { file, path })
    }

    /// The file's name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| {
            Error::io("write failed", e)
                .with_path(&self.path)
                .at(offset)
        })
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("read failed", e).with_path(&self.path).at(offset))
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where the old data of one kept chunk is.
#[derive(Debug, Clone)]
pub enum Kept {
    /// It read as zeros: nothing stored.
    Zero,
    /// In memory.
    Memory(Arc<[u8]>),
    /// In the temporary file, at this offset.
    File(Arc<SpillFile>, u64),
}

impl Kept {
    /// Copies `buf.len()` bytes of the chunk from byte `at` of it into `buf`.
    pub fn read(&self, buf: &mut [u8], at: u64) -> Result<()> {
        match self {
            Kept::Zero => {
                buf.fill(0);
                Ok(())
            }
            Kept::Memory(data) => {
                let at = at as usize;
                buf.copy_from_slice(&data[at..at + buf.len()]);
                Ok(())
            }
            Kept::File(file, offset) => file.read_at(buf, offset + at),
        }
    }
}

/// The store: the memory in use and its bound, the temporary file once one is needed.
#[derive(Debug)]
pub struct Store {
    /// Bytes of memory the kept chunks may take.
    pub bound: u64,
    /// Bytes they take now.
    pub memory: u64,
    /// The most they took.
    pub peak_memory: u64,
    /// Where the temporary file goes.
    pub dir: PathBuf,
    /// The temporary file, once created.
    pub file: Option<Arc<SpillFile>>,
    /// Bytes handed out in it.
    pub file_len: u64,
}

/// Where [`Store::place`] put a chunk: in memory (already accounted), or at an offset of the
/// file that the caller must write outside the view's lock.
pub enum Placement {
    /// Keep it in memory.
    Memory,
    /// Write it to this file at this offset.
    File(Arc<SpillFile>, u64),
}

impl Store {
    /// An empty store keeping at most `bound` bytes in memory, its file in `dir`.
    pub fn new(bound: u64, dir: PathBuf) -> Self {
        Store {
            bound,
            memory: 0,
            peak_memory: 0,
            dir,
            file: None,
            file_len: 0,
        }
    }

    /// Chooses where a chunk of `len` bytes goes, accounting for it; creates the file the
    /// first time memory is full.
    pub fn place(&mut self, len: u64) -> Result<Placement> {
        if self.memory + len <= self.bound {
            self.memory += len;
            self.peak_memory = self.peak_memory.max(self.memory);
            return Ok(Placement::Memory);
        }
        if self.file.is_none() {
            self.file = Some(Arc::new(SpillFile::create(&self.dir)?));
        }
        let file = self.file.clone().expect("created above");
        let at = self.file_len;
        self.file_len += len;
        Ok(Placement::File(file, at))
    }

    /// Gives back memory taken by [`Store::place`] for a chunk that was not kept after all.
    pub fn unplace_memory(&mut self, len: u64) {
        self.memory -= len;
    }

    /// Forgets everything: the memory is freed by dropping the chunks, the file is removed
    /// once no reader holds it.
    pub fn clear(&mut self) {
        self.memory = 0;
        self.file = None;
    }
}
