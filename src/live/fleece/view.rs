//! The state of a point-in-time view and its two sides: the hook that keeps the old data of a
//! chunk aside before a write changes it (`SaveHook`), and the reads of the view
//! (`Shared::read`, `Shared::block_status`).
//!
//! Each chunk (a power of two, at least the live image's cluster size) is in one of three
//! states: *live* (not written since the start: the live image still holds its old data),
//! *saving* (a writer claimed it and is copying its old data into the store) or *kept* (the
//! store holds its old data). A writer claims the live chunks its write touches, copies them,
//! and waits for the chunks another writer is saving; it then also waits until no reader of
//! the view is reading those chunks from the live image, so a reader never sees new data: a
//! reader registers on the live chunks it reads (under the same lock that tells it they are
//! live) and unregisters when its read is done.
//!
//! If the store fails, the view is *broken*: the write goes on, and every later read of the
//! view fails saying why (qemu's copy-before-write with `on-cbw-error=break-snapshot`).

use super::store::{Kept, Placement, Store};
use crate::bitmap::SparseBits;
use crate::block::{BlockImage, BlockStatus};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::server::Export;
use crate::offsets::GuestOffset;
use crate::BeforeWrite;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

/// Most bytes a writer claims and copies in one read of the live image.
const MAX_SAVE_RUN: u64 = 4 << 20;

/// What the view has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Chunks whose old data was read from the live image and kept (each once).
    pub chunks_kept: u64,
    /// Reads of the live image made to keep old data (one per run of chunks claimed).
    pub save_reads: u64,
    /// Bytes read from the live image to keep old data.
    pub bytes_saved: u64,
    /// Bytes of old data held in memory now.
    pub memory_bytes: u64,
    /// The most bytes of old data held in memory at once.
    pub peak_memory_bytes: u64,
    /// Bytes of old data written to the temporary file.
    pub file_bytes: u64,
    /// The temporary file, while it exists.
    pub file: Option<PathBuf>,
    /// Why the view broke, if it did.
    pub broken: Option<String>,
}

/// The mutable state, under one lock.
pub(super) struct State {
    /// Writers wait until the start point is fixed (the frozen bitmap read).
    pub ready: bool,
    /// The view was stopped: the hook does nothing, reads fail.
    pub stopped: bool,
    /// Why the store failed.
    pub broken: Option<String>,
    kept: HashMap<u64, Kept>,
    saving: HashSet<u64>,
    /// Readers reading each live chunk from the live image now.
    live_readers: HashMap<u64, u32>,
    store: Store,
    stats: ViewStats,
    /// The chunks of granularity `1 << .0` written since the start, when asked for (an
    /// incremental backup's next bitmap generation).
    pub written: Option<(u32, SparseBits)>,
}

/// What the hook and the view image share.
pub(super) struct Shared {
    /// Bytes per chunk (a power of two).
    pub chunk: u64,
    /// The disk's size.
    pub size: u64,
    /// The live image's name, for messages.
    pub name: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    pub fn new(
        chunk: u64,
        size: u64,
        name: PathBuf,
        bound: u64,
        dir: PathBuf,
        written: Option<u32>,
    ) -> Self {
        Shared {
            chunk,
            size,
            name,
            state: Mutex::new(State {
                ready: false,
                stopped: false,
                broken: None,
                kept: HashMap::new(),
                saving: HashSet::new(),
                live_readers: HashMap::new(),
                store: Store::new(bound, dir),
                stats: ViewStats::default(),
                written: written.map(|g| (g, SparseBits::new())),
            }),
            changed: Condvar::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// Fixes the start point: writers held since the hook was attached go on.
    pub fn set_ready(&self) {
        self.lock().ready = true;
        self.changed.notify_all();
    }

    /// Stops the view: the store is freed (its file removed), reads fail from now on.
    pub fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        st.ready = true;
        st.kept.clear();
        st.store.clear();
        drop(st);
        self.changed.notify_all();
    }

    pub fn stats(&self) -> ViewStats {
        let st = self.lock();
        let mut s = st.stats.clone();
        s.memory_bytes = st.store.memory;
        s.peak_memory_bytes = st.store.peak_memory;
        s.file_bytes = st.store.file_len;
        s.file = st.store.file.as_ref().map(|f| f.path().to_path_buf());
        s.broken = st.broken.clone();
        s
    }

    /// The chunks of `[offset, offset + len)` (clamped to the disk).
    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return 0..0;
        }
        offset / self.chunk..(end - 1) / self.chunk + 1
    }

    /// The bytes of chunk `c` inside the disk.
    fn chunk_len(&self, c: u64) -> u64 {
        self.chunk.min(self.size - c * self.chunk)
    }

    fn unusable(&self, st: &State) -> Option<Error> {
        if st.stopped {
            return Some(
                Error::new(
                    ErrorKind::InvalidInput,
                    "the point-in-time view was stopped",
                )
                .with_path(&self.name),
            );
        }
        st.broken.as_ref().map(|why| {
            Error::new(
                ErrorKind::Io,
                format!(
                    "the point-in-time view is broken (guest writes went on without it): {why}"
                ),
            )
            .with_path(&self.name)
        })
    }

    /// The hook's work for a write of `[offset, offset + len)`: keeps the old data of every
    /// chunk it touches, then waits until no reader reads them from the live image.
    fn before_write(&self, live: &dyn BlockImage, offset: u64, len: u64) {
        let chunks = self.chunks(offset, len);
        let mut st = self.lock();
        while !st.ready {
            st = self.wait(st);
        }
        if let Some((g, bits)) = st.written.as_mut() {
            let end = offset.saturating_add(len).min(self.size);
            if offset < end {
                bits.set_range(offset >> *g, (end - 1) / (1u64 << *g) + 1);
            }
        }
        let mut c = chunks.start;
        while c < chunks.end {
            if st.stopped || st.broken.is_some() {
                return;
            }
            if st.kept.contains_key(&c) {
                c += 1;
                continue;
            }
            if st.saving.contains(&c) {
                st = self.wait(st);
                continue;
            }
            // Claim the run of live chunks from `c`.
            let mut n = 1;
            while c + n < chunks.end
                && n * self.chunk < MAX_SAVE_RUN
                && !st.kept.contains_key(&(c + n))
                && !st.saving.contains(&(c + n))
            {
                n += 1;
            }
            for i in c..c + n {
                st.saving.insert(i);
            }
            drop(st);
            let r = self.save_run(live, c, n);
            st = self.lock();
            for i in c..c + n {
                st.saving.remove(&i);
            }
            match r {
                Ok(kept) => {
                    st.stats.save_reads += 1;
                    for (i, k) in kept {
                        st.stats.chunks_kept += 1;
                        st.stats.bytes_saved += self.chunk_len(i);
                        if st.stopped {
                            continue;
                        }
                        st.kept.insert(i, k);
                    }
                }
                Err(e) => {
                    if st.broken.is_none() {
                        st.broken = Some(e.to_string());
                    }
                    st.kept.clear();
                    st.store.clear();
                }
            }
            self.changed.notify_all();
            c += n;
        }
        // The write may go on once nobody reads its chunks from the live image.
        for c in chunks {
            while st.live_readers.contains_key(&c) && !st.stopped && st.broken.is_none() {
                st = self.wait(st);
            }
        }
    }

    /// Reads chunks `[c, c + n)` from the live image and stores each (outside the lock but
    /// for choosing where).
    fn save_run(&self, live: &dyn BlockImage, c: u64, n: u64) -> Result<Vec<(u64, Kept)>> {
        let start = c * self.chunk;
        let end = ((c + n) * self.chunk).min(self.size);
        let mut buf = vec![0u8; (end - start) as usize];
        live.read_at(&mut buf, GuestOffset(start)).map_err(|e| {
            Error::new(
                e.kind(),
                format!("cannot read the old data at guest offset {start}: {e}"),
            )
        })?;
        let mut out = Vec::with_capacity(n as usize);
        for (j, piece) in buf.chunks(self.chunk as usize).enumerate() {
            let i = c + j as u64;
            if crate::zeros::is_zero(piece) {
                out.push((i, Kept::Zero));
                continue;
            }
            let placement = self.lock().store.place(piece.len() as u64);
            match placement {
                Ok(Placement::Memory) => out.push((i, Kept::Memory(Arc::from(piece)))),
                Ok(Placement::File(file, at)) => {
                    file.write_at(piece, at)?;
                    out.push((i, Kept::File(file, at)));
                }
                Err(e) => {
                    let mut st = self.lock();
                    for (_, k) in &out {
                        if let Kept::Memory(m) = k {
                            st.store.unplace_memory(m.len() as u64);
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Fills `buf` with the disk's data at `offset` as it was at the start point.
    pub fn read(&self, live: &dyn BlockImage, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::block::check_request(self.size, GuestOffset(offset), buf.len() as u64)
            .map_err(|e| e.with_path(&self.name))?;
        let chunks = self.chunks(offset, buf.len() as u64);
        // Where each chunk is, the live ones registered as being read.
        let mut sources: Vec<Option<Kept>> = Vec::with_capacity(chunks.clone().count());
        {
            let mut st = self.lock();
            if let Some(e) = self.unusable(&st) {
                return Err(e);
            }
            for c in chunks.clone() {
                match st.kept.get(&c) {
                    Some(k) => sources.push(Some(k.clone())),
                    None => {
                        *st.live_readers.entry(c).or_insert(0) += 1;
                        sources.push(None);
                    }
                }
            }
        }
        let r = self.read_sources(live, buf, offset, chunks.start, &sources);
        let mut st = self.lock();
        for (c, s) in chunks.zip(&sources) {
            if s.is_none() {
                let n = st.live_readers.get_mut(&c).expect("registered above");
                *n -= 1;
                if *n == 0 {
                    st.live_readers.remove(&c);
                }
            }
        }
        // A store that failed while we read may have missed a chunk we read live.
        let unusable = self.unusable(&st);
        drop(st);
        self.changed.notify_all();
        r?;
        match unusable {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn read_sources(
        &self,
        live: &dyn BlockImage,
        buf: &mut [u8],
        offset: u64,
        first: u64,
        sources: &[Option<Kept>],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut i = 0;
        while i < sources.len() {
            let c = first + i as u64;
            let from = (c * self.chunk).max(offset);
            if sources[i].is_none() {
                // A run of live chunks: one read.
                let mut j = i;
                while j < sources.len() && sources[j].is_none() {
                    j += 1;
                }
                let to = ((first + j as u64) * self.chunk).min(end);
                let piece = &mut buf[(from - offset) as usize..(to - offset) as usize];
                live.read_at(piece, GuestOffset(from))?;
                i = j;
                continue;
            }
            let to = ((c + 1) * self.chunk).min(end);
            let piece = &mut buf[(from - offset) as usize..(to - offset) as usize];
            sources[i]
                .as_ref()
                .expect("kept")
                .read(piece, from - c * self.chunk)
                .map_err(|e| e.with_path(&self.name))?;
            i += 1;
        }
        Ok(())
    }

    /// The status of the view's range at `offset`, at most `max_len` bytes: kept chunks are
    /// data (or zeros), live ones as the live image says while no write can change them.
    pub fn block_status(
        &self,
        live: &dyn BlockImage,
        offset: u64,
        max_len: u64,
    ) -> Result<BlockStatus> {
        let max_len = max_len.max(1);
        crate::block::check_request(self.size, GuestOffset(offset), max_len)
            .map_err(|e| e.with_path(&self.name))?;
        let limit = offset + max_len.min(1 << 30);
        let first = offset / self.chunk;
        let mut st = self.lock();
        if let Some(e) = self.unusable(&st) {
            return Err(e);
        }
        let run_end = |st: &State, pred: &dyn Fn(Option<&Kept>) -> bool| {
            let mut c = first + 1;
            while c * self.chunk < limit && pred(st.kept.get(&c)) {
                c += 1;
            }
            (c * self.chunk).min(limit)
        };
        match st.kept.get(&first) {
            Some(Kept::Zero) => {
                let end = run_end(&st, &|k| matches!(k, Some(Kept::Zero)));
                Ok(BlockStatus::zero(end - offset, 0, None))
            }
            Some(_) => {
                let end = run_end(&st, &|k| {
                    matches!(k, Some(Kept::Memory(_) | Kept::File(..)))
                });
                Ok(BlockStatus {
                    compressed: false,
                    ..BlockStatus::compressed(end - offset, 0)
                })
            }
            None => {
                let end = run_end(&st, &|k| k.is_none());
                let chunks = first..(end - 1) / self.chunk + 1;
                for c in chunks.clone() {
                    *st.live_readers.entry(c).or_insert(0) += 1;
                }
                drop(st);
                let r = live.block_status(GuestOffset(offset), end - offset);
                let mut st = self.lock();
                for c in chunks {
                    let n = st.live_readers.get_mut(&c).expect("registered above");
                    *n -= 1;
                    if *n == 0 {
                        st.live_readers.remove(&c);
                    }
                }
                let unusable = self.unusable(&st);
                drop(st);
                self.changed.notify_all();
                if let Some(e) = unusable {
                    return Err(e);
                }
                let s = r?;
                Ok(BlockStatus {
                    offset: None,
                    compressed: false,
                    ..s
                })
            }
        }
    }
}

/// The hook attached to the live export: keeps old data before each write.
pub(super) struct SaveHook {
    pub shared: Arc<Shared>,
    /// The live export (weak: it holds this hook).
    pub live: Weak<Export>,
}

impl BeforeWrite for SaveHook {
    fn before_write(&self, offset: GuestOffset, len: u64) {
        match self.live.upgrade() {
            Some(live) => self.shared.before_write(live.image(), offset.0, len),
            None => self.shared.stop(),
        }
    }
}
