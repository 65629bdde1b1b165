//! [`BackupJob`]: backs up a set of images into a VMA archive while they stay in use.
//!
//! The job copies each device cluster by cluster, walking its block status so that ranges
//! known to read as zeros are recorded as zero clusters without being read, and reading the
//! rest in runs of up to [`RUN_CLUSTERS`] clusters (4 KiB blocks that turn out to be zero are
//! not stored, see [`super::writer`]).
//!
//! While it runs, whoever writes to the same images calls [`BackupJob::before_write`] first (or
//! writes through a [`GuardedImage`], which does): the clusters the write will change that the
//! job has not saved yet are saved at once, in the writer's thread, and only then does the
//! write go ahead. This is the live backup VMA was made for (vma.md: "1 read, 2 writes, no
//! temporary snapshot"): the archive holds the images exactly as they were when the job was
//! created, whatever is written during it, and every cluster is read exactly once, by whichever
//! of the job and the writers claims it first; a writer that finds its cluster being copied by
//! another thread waits for that copy.
//!
//! Why a zero block status stays true: a cluster's status is asked before it is claimed, and
//! no write can reach a cluster between the job's start and its claim (a write first needs the
//! cluster saved, which needs the claim). So a cluster claimed after its status said "zero"
//! still read as zeros at the job's start.
//!
//! If saving fails (the archive cannot be written, an image cannot be read), the job fails but
//! writes are not held up: [`BackupJob::before_write`] reports the error and [`GuardedImage`]
//! lets the write through anyway, as qemu's backup does by default ("break the snapshot, not
//! the guest").

use super::format::{ArchiveHeader, CLUSTER_SIZE};
use super::writer::{VmaWriter, WriterStats};
use crate::block::{BlockImage, BlockStatus, ImageFormat};
use crate::direct_io::AlignedBuf;
use crate::error::{Error, Result};
use crate::offsets::GuestOffset;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most clusters the job reads at once (2 MiB).
pub const RUN_CLUSTERS: u64 = 32;

/// Read buffers the job keeps: one being read, one queued, one being written.
const PIPELINE_BUFFERS: usize = 3;

/// A claimed run of clusters on its way from the job's reader to the archive.
struct Run {
    dev: usize,
    start: u64,
    len: u64,
    /// Known zeros, not read.
    zero: bool,
    buf: AlignedBuf,
}

/// Told how far the job has got: `(device bytes saved, device bytes in total)`.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

const PENDING: u8 = 0;
const COPYING: u8 = 1;
const DONE: u8 = 2;

/// A source image of the job: borrowed from the caller, or shared with others (a served
/// export the job reaches while the server owns it).
pub enum Source<'a> {
    /// An image the caller keeps for the job's lifetime.
    Borrowed(&'a dyn BlockImage),
    /// An image the job holds a share of.
    Shared(Arc<dyn BlockImage>),
}

impl Source<'_> {
    fn get(&self) -> &dyn BlockImage {
        match self {
            Source::Borrowed(i) => *i,
            Source::Shared(i) => i.as_ref(),
        }
    }
}

/// One device of the job.
struct Device<'a> {
    image: Source<'a>,
    id: u8,
    /// The image's virtual size (what can be read).
    image_size: u64,
    /// Clusters of the device in the archive.
    clusters: u64,
}

/// Which clusters are saved, being saved, or still to save; and the first failure.
struct JobState {
    clusters: Vec<Vec<u8>>,
    remaining: u64,
    error: Option<Error>,
}

/// Counts of what the job did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// Clusters the job itself read and saved.
    pub clusters_by_job: u64,
    /// Clusters saved by [`BackupJob::before_write`] on behalf of a writer.
    pub clusters_by_hook: u64,
    /// Clusters recorded as zeros from block status, without reading.
    pub clusters_unread: u64,
    /// Bytes read from the images.
    pub bytes_read: u64,
    /// What the archive holds.
    pub archive: WriterStats,
}

/// A backup of several images into one archive; see the module documentation.
pub struct BackupJob<'a, W: Write + Send + 'static> {
    devices: Vec<Device<'a>>,
    state: Mutex<JobState>,
    changed: Condvar,
    writer: Mutex<Option<VmaWriter<W>>>,
    by_job: AtomicU64,
    by_hook: AtomicU64,
    unread: AtomicU64,
    bytes_read: AtomicU64,
    /// How long [`BackupJob::before_write`] may wait for clusters other threads are saving
    /// before it aborts the job (`None`: no limit).
    write_wait_limit: Option<Duration>,
}

/// A copy of `e` (errors hold an I/O error and are not `Clone`): same kind, file, offset and
/// text.
fn replicate(e: &Error) -> Error {
    let what = match std::error::Error::source(e) {
        Some(s) => format!("{}: {s}", e.what()),
        None => e.what().to_string(),
    };
    let mut copy = Error::new(e.kind(), what);
    if let Some(p) = e.path() {
        copy = copy.with_path(p);
    }
    if let Some(o) = e.offset() {
        copy = copy.at(o);
    }
    copy
}

impl<'a, W: Write + Send + 'static> BackupJob<'a, W> {
    /// Starts a backup of `sources` (device name, image) into `out`, with the uuid, time and
    /// config files of `header` (its devices must be empty: they are made from `sources`, each
    /// the image's size rounded up to 512 bytes, as Proxmox requires). The archive's header is
    /// written at once. From this moment the archive is to hold the images as they are now:
    /// every later write to them must go through [`BackupJob::before_write`] or a
    /// [`GuardedImage`]. With `background`, the archive is written by a thread of its own.
    pub fn new(
        out: W,
        header: ArchiveHeader,
        sources: &[(&str, &'a dyn BlockImage)],
        background: bool,
    ) -> Result<Self> {
        let sources = sources
            .iter()
            .map(|(name, image)| (name.to_string(), Source::Borrowed(*image)))
            .collect();
        Self::with_sources(out, header, sources, background)
    }

    /// As [`BackupJob::new`], with sources the job may hold shares of (see [`Source`]).
    pub fn with_sources(
        out: W,
        mut header: ArchiveHeader,
        sources: Vec<(String, Source<'a>)>,
        background: bool,
    ) -> Result<Self> {
        if !header.devices.is_empty() {
            return Err(Error::invalid_input(
                "the header given to a backup job must not list devices",
            ));
        }
        let mut devices = Vec::with_capacity(sources.len());
        for (name, image) in sources {
            let image_size = image.get().virtual_size();
            let id = header
                .add_device(&name, image_size.div_ceil(512) * 512)
                .map_err(|e| e.with_path(image.get().filename()))?;
            devices.push(Device {
                image,
                id,
                image_size,
                clusters: image_size.div_ceil(CLUSTER_SIZE),
            });
        }
        let writer = VmaWriter::new(out, header, background)?;
        let clusters: Vec<Vec<u8>> = devices
            .iter()
            .map(|d| vec![PENDING; d.clusters as usize])
            .collect();
        let remaining = devices.iter().map(|d| d.clusters).sum();
        Ok(BackupJob {
            devices,
            state: Mutex::new(JobState {
                clusters,
                remaining,
                error: None,
            }),
            changed: Condvar::new(),
            writer: Mutex::new(Some(writer)),
            by_job: AtomicU64::new(0),
            by_hook: AtomicU64::new(0),
            unread: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            write_wait_limit: None,
        })
    }

    /// Bounds how long [`BackupJob::before_write`] waits for clusters that another thread is
    /// saving: past `limit` the job is aborted (the archive is lost) and the write goes on,
    /// so that a stalled archive cannot hold up the writers forever.
    pub fn set_write_wait_limit(&mut self, limit: Duration) {
        self.write_wait_limit = Some(limit);
    }

    /// Fails the job with `reason` (unless it failed already): [`BackupJob::run`] returns
    /// soon after, and writers stop saving clusters.
    pub fn abort(&self, reason: Error) {
        self.lock_state().error.get_or_insert(reason);
        self.changed.notify_all();
    }

    /// The job's first error, if it has failed.
    pub fn error(&self) -> Option<Error> {
        self.failed()
    }

    /// What the job has done so far (the archive's counts are filled in by
    /// [`BackupJob::finish`] only).
    pub fn stats(&self) -> BackupStats {
        BackupStats {
            clusters_by_job: self.by_job.load(Ordering::Relaxed),
            clusters_by_hook: self.by_hook.load(Ordering::Relaxed),
            clusters_unread: self.unread.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            archive: WriterStats::default(),
        }
    }

    /// Bytes of the devices saved so far, and in total.
    pub fn progress(&self) -> (u64, u64) {
        let total: u64 = self.devices.iter().map(|d| d.image_size).sum();
        let all: u64 = self.devices.iter().map(|d| d.clusters).sum();
        let remaining = self.lock_state().remaining;
        (((all - remaining) * CLUSTER_SIZE).min(total), total)
    }

    /// The archive's header (its devices in source order, ids from 1).
    pub fn header(&self) -> Result<ArchiveHeader> {
        self.lock_writer()
            .as_ref()
            .map(|w| w.header().clone())
            .ok_or_else(|| Error::invalid_input("the backup job is finished"))
    }

    /// An image that writes through to source `device` (its index in the sources), calling
    /// [`BackupJob::before_write`] before every write, zero write and discard.
    pub fn guard(&self, device: usize) -> Result<GuardedImage<'_, 'a, W>> {
        if device >= self.devices.len() {
            return Err(Error::invalid_input(format!(
                "the backup job has no device {device}"
            )));
        }
        Ok(GuardedImage { job: self, device })
    }

    fn lock_state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_writer(&self) -> MutexGuard<'_, Option<VmaWriter<W>>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self) -> Option<Error> {
        self.lock_state().error.as_ref().map(replicate)
    }

    /// Claims the first run of pending clusters of `dev` in `[from, to)`, at most `max` long.
    fn claim(&self, dev: usize, from: u64, to: u64, max: u64) -> Option<(u64, u64)> {
        let mut st = self.lock_state();
        let states = &mut st.clusters[dev];
        let start = (from..to).find(|&c| states[c as usize] == PENDING)?;
        let mut n = 0;
        while start + n < to && n < max && states[(start + n) as usize] == PENDING {
            states[(start + n) as usize] = COPYING;
            n += 1;
        }
        Some((start, n))
    }

    /// Marks `[start, start + n)` of `dev` saved (also after a failure, so nobody waits for
    /// them), recording `result`'s error if it is the first.
    fn settle(&self, dev: usize, start: u64, n: u64, result: Result<()>) -> Result<()> {
        let mut st = self.lock_state();
        for c in start..start + n {
            st.clusters[dev][c as usize] = DONE;
        }
        st.remaining -= n;
        let out = match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let copy = replicate(&e);
                st.error.get_or_insert(e);
                Err(copy)
            }
        };
        drop(st);
        self.changed.notify_all();
        out
    }

    /// Reads the claimed run `[start, start + n)` of `dev` into `buf` (nothing when `zero`:
    /// the clusters are known to read as zeros).
    fn read_run(
        &self,
        dev: usize,
        start: u64,
        n: u64,
        zero: bool,
        buf: &mut AlignedBuf,
    ) -> Result<()> {
        let d = &self.devices[dev];
        let off = start * CLUSTER_SIZE;
        let len = if zero {
            0
        } else {
            ((start + n) * CLUSTER_SIZE).min(d.image_size) - off
        };
        buf.resize(len as usize, 0);
        if len > 0 {
            d.image
                .get()
                .read_at(buf, GuestOffset(off))
                .map_err(|e| e.with_path(d.image.get().filename()))?;
            self.bytes_read.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes the run `[start, start + n)` of `dev`, read into `buf` (shorter than the run
    /// where the rest reads as zeros), to the archive.
    fn store_run(&self, dev: usize, start: u64, n: u64, buf: &[u8]) -> Result<()> {
        let d = &self.devices[dev];
        let mut w = self.lock_writer();
        let w = w
            .as_mut()
            .ok_or_else(|| Error::invalid_input("the backup job is finished"))?;
        for k in 0..n {
            let from = ((k * CLUSTER_SIZE) as usize).min(buf.len());
            let to = (((k + 1) * CLUSTER_SIZE) as usize).min(buf.len());
            w.write_cluster(d.id, (start + k) as u32, &buf[from..to])?;
        }
        Ok(())
    }

    /// Saves the claimed run `[start, start + n)` of `dev`: reads it (unless `zero`), writes
    /// it to the archive, and marks it saved.
    fn save(&self, dev: usize, start: u64, n: u64, zero: bool, buf: &mut AlignedBuf) -> Result<()> {
        let result = self
            .read_run(dev, start, n, zero, buf)
            .and_then(|()| self.store_run(dev, start, n, buf));
        self.settle(dev, start, n, result)
    }

    /// Saves every pending cluster of `dev` in `[from, to)`, in runs of at most `max`.
    fn save_range(
        &self,
        dev: usize,
        from: u64,
        to: u64,
        zero: bool,
        buf: &mut AlignedBuf,
        counter: &AtomicU64,
    ) -> Result<()> {
        let mut at = from;
        while let Some((start, n)) = self.claim(dev, at, to, RUN_CLUSTERS) {
            self.save(dev, start, n, zero, buf)?;
            counter.fetch_add(n, Ordering::Relaxed);
            at = start + n;
        }
        Ok(())
    }

    /// To be called before writing `[offset, offset + len)` of source `device`: saves the old
    /// contents of the clusters the write touches that are not saved yet (waiting for any that
    /// another thread is saving). When it returns, the write may go ahead. An error means the
    /// backup has failed (the write may still go ahead; the archive is lost).
    pub fn before_write(&self, device: usize, offset: u64, len: u64) -> Result<()> {
        let Some(d) = self.devices.get(device) else {
            return Err(Error::invalid_input(format!(
                "the backup job has no device {device}"
            )));
        };
        if len == 0 || offset >= d.image_size {
            return Ok(());
        }
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let from = offset / CLUSTER_SIZE;
        let to = offset
            .saturating_add(len)
            .min(d.image_size)
            .div_ceil(CLUSTER_SIZE);
        let mut buf = AlignedBuf::default();
        self.save_range(device, from, to, false, &mut buf, &self.by_hook)?;
        // Clusters other threads are saving: wait for them (within the limit, if any).
        let deadline = self.write_wait_limit.map(|l| (Instant::now() + l, l));
        let mut st = self.lock_state();
        while st.error.is_none() && (from..to).any(|c| st.clusters[device][c as usize] != DONE) {
            st = match deadline {
                None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some((at, limit)) => {
                    let now = Instant::now();
                    if now >= at {
                        st.error.get_or_insert(Error::invalid_input(format!(
                            "a write waited more than {} ms for the archive: the backup is \
                             aborted so that writes go on",
                            limit.as_millis()
                        )));
                        drop(st);
                        self.changed.notify_all();
                        st = self.lock_state();
                        break;
                    }
                    self.changed
                        .wait_timeout(st, at - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        match &st.error {
            Some(e) => Err(replicate(e)),
            None => Ok(()),
        }
    }

    /// The block status of `dev` at `off`, checked to cover at least one byte.
    fn status(&self, dev: usize, off: u64) -> Result<BlockStatus> {
        let d = &self.devices[dev];
        let st = d
            .image
            .get()
            .block_status(GuestOffset(off), d.image_size - off)?;
        if st.len == 0 || st.len > d.image_size - off {
            return Err(Error::corrupt(format!(
                "block status at guest offset {off:#x} returned an invalid length {}",
                st.len
            ))
            .with_path(d.image.get().filename()));
        }
        Ok(st)
    }

    /// Walks every device's block status in order, claiming and reading what is not saved
    /// yet, and hands each run to `send` (which writes it to the archive); read buffers come
    /// back through `bufs`. A run `send` refuses is marked settled without being saved (the
    /// job has failed then), so that no writer waits for it.
    fn walk(
        &self,
        send: &dyn Fn(Run) -> std::result::Result<(), Run>,
        bufs: &mpsc::Receiver<AlignedBuf>,
    ) -> Result<()> {
        let mut made = 0usize;
        for (dev, d) in self.devices.iter().enumerate() {
            let mut c = 0u64;
            while c < d.clusters {
                if let Some(e) = self.failed() {
                    return Err(e);
                }
                let off = c * CLUSTER_SIZE;
                let st = self.status(dev, off)?;
                let end = off + st.len;
                // Whole clusters the answer covers (the last cluster of the device counts as
                // whole when the answer reaches the end).
                let whole = if end >= d.image_size {
                    d.clusters - c
                } else {
                    (end - off) / CLUSTER_SIZE
                };
                let (n, zero) = if !st.needs_read() && whole > 0 {
                    (whole, true)
                } else {
                    let n = (end - off).div_ceil(CLUSTER_SIZE).clamp(1, RUN_CLUSTERS);
                    (n.min(d.clusters - c), false)
                };
                let mut at = c;
                while let Some((start, len)) = self.claim(dev, at, c + n, RUN_CLUSTERS) {
                    // Zero runs need no buffer; data runs take one of at most
                    // PIPELINE_BUFFERS, which come back once written.
                    let mut buf = if zero {
                        AlignedBuf::default()
                    } else {
                        match bufs.try_recv() {
                            Ok(b) => b,
                            Err(_) if made < PIPELINE_BUFFERS => {
                                made += 1;
                                // Page-aligned: see crate::direct_io::AlignedBuf.
                                AlignedBuf::zeroed((RUN_CLUSTERS * CLUSTER_SIZE) as usize)
                            }
                            Err(_) => bufs.recv().unwrap_or_default(),
                        }
                    };
                    if let Err(e) = self.read_run(dev, start, len, zero, &mut buf) {
                        return self.settle(dev, start, len, Err(e));
                    }
                    let run = Run {
                        dev,
                        start,
                        len,
                        zero,
                        buf,
                    };
                    if let Err(r) = send(run) {
                        return self.settle(r.dev, r.start, r.len, Ok(()));
                    }
                    at = start + len;
                }
                c += n;
            }
        }
        Ok(())
    }

    /// Copies everything not saved yet, device after device in guest order, then waits until
    /// clusters that writers are saving are saved too. Reading (one thread) overlaps with
    /// writing to the archive (this thread, and the writer's own thread behind it). Returns
    /// the first error of the job.
    pub fn run(&self, progress: Option<Progress<'_>>) -> Result<()> {
        let total: u64 = self.devices.iter().map(|d| d.image_size).sum();
        let all: u64 = self.devices.iter().map(|d| d.clusters).sum();
        let report = |remaining: u64| {
            if let Some(p) = progress {
                p(((all - remaining) * CLUSTER_SIZE).min(total), total);
            }
        };
        report(all);
        let (tx, rx) = mpsc::sync_channel::<Run>(1);
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        let walked = std::thread::scope(|s| {
            let walker = s.spawn(move || {
                let send = |r: Run| tx.send(r).map_err(|e| e.0);
                self.walk(&send, &free_rx)
            });
            for run in rx.iter() {
                let stored = self.store_run(run.dev, run.start, run.len, &run.buf);
                let counter = if run.zero { &self.unread } else { &self.by_job };
                counter.fetch_add(run.len, Ordering::Relaxed);
                let failed = self.settle(run.dev, run.start, run.len, stored).is_err();
                if !run.zero {
                    let _ = free_tx.send(run.buf);
                }
                report(self.lock_state().remaining);
                if failed {
                    break;
                }
            }
            // Whatever the walker still sends is refused (and marked) once this is gone.
            drop(rx);
            walker
                .join()
                .unwrap_or_else(|_| Err(Error::corrupt("the backup reader thread panicked")))
        });
        let mut st = self.lock_state();
        while st.remaining > 0 && st.error.is_none() {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let remaining = st.remaining;
        let error = st.error.as_ref().map(replicate);
        drop(st);
        report(remaining);
        walked?;
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Ends the archive after [`BackupJob::run`] and returns the output and what the job did.
    /// Writers may go on through their guards afterwards: there is nothing left to save.
    pub fn finish(&self) -> Result<(W, BackupStats)> {
        if let Some(e) = self.lock_state().error.take() {
            return Err(e);
        }
        let writer = self
            .lock_writer()
            .take()
            .ok_or_else(|| Error::invalid_input("the backup job is finished"))?;
        let (out, archive) = writer.finish()?;
        Ok((
            out,
            BackupStats {
                clusters_by_job: self.by_job.load(Ordering::Relaxed),
                clusters_by_hook: self.by_hook.load(Ordering::Relaxed),
                clusters_unread: self.unread.load(Ordering::Relaxed),
                bytes_read: self.bytes_read.load(Ordering::Relaxed),
                archive,
            },
        ))
    }
}

/// A source image of a running [`BackupJob`], seen by a writer: every write, zero write and
/// discard first lets the job save the clusters it touches (see the module documentation);
/// reads and everything else go straight to the image.
pub struct GuardedImage<'j, 'a, W: Write + Send + 'static> {
    job: &'j BackupJob<'a, W>,
    device: usize,
}

impl<W: Write + Send + 'static> GuardedImage<'_, '_, W> {
    fn inner(&self) -> &dyn BlockImage {
        self.job.devices[self.device].image.get()
    }

    /// Lets the job save `[offset, offset + len)`; a failed backup does not stop the write.
    fn guard(&self, offset: GuestOffset, len: u64) {
        // The error is the job's to report (run and finish return it).
        let _ = self.job.before_write(self.device, offset.0, len);
    }
}

impl<W: Write + Send + 'static> BlockImage for GuardedImage<'_, '_, W> {
    fn format(&self) -> ImageFormat {
        self.inner().format()
    }
    fn filename(&self) -> &Path {
        self.inner().filename()
    }
    fn virtual_size(&self) -> u64 {
        self.inner().virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        self.inner().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        self.guard(offset, buf.len() as u64);
        self.inner().write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: GuestOffset, len: u64, unmap: bool) -> Result<()> {
        self.guard(offset, len);
        self.inner().write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: GuestOffset, len: u64) -> Result<()> {
        self.guard(offset, len);
        self.inner().discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner().flush()
    }
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        self.inner().block_status(offset, max_len)
    }
    fn backing(&self) -> Option<&dyn BlockImage> {
        self.inner().backing()
    }
    fn is_writable(&self) -> bool {
        self.inner().is_writable()
    }
    fn actual_size(&self) -> Option<u64> {
        self.inner().actual_size()
    }
    fn layer_info(&self) -> Result<crate::info::LayerInfo> {
        self.inner().layer_info()
    }
    fn as_check(&self) -> Option<&dyn crate::check::Check> {
        self.inner().as_check()
    }
    fn as_bitmaps(&self) -> Option<&dyn crate::bitmap::PersistentBitmaps> {
        self.inner().as_bitmaps()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A raw image whose reads wait while `held` is set (after saying they started).
    struct Gated {
        inner: crate::raw::RawImage,
        held: AtomicBool,
        reading: AtomicU64,
    }

    impl BlockImage for Gated {
        fn format(&self) -> ImageFormat {
            self.inner.format()
        }
        fn filename(&self) -> &Path {
            self.inner.filename()
        }
        fn virtual_size(&self) -> u64 {
            self.inner.virtual_size()
        }
        fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
            self.reading.fetch_add(1, Ordering::SeqCst);
            while self.held.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: GuestOffset, len: u64, unmap: bool) -> Result<()> {
            self.inner.write_zeroes(offset, len, unmap)
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()
        }
        fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
            self.inner.block_status(offset, max_len)
        }
        fn is_writable(&self) -> bool {
            true
        }
        fn actual_size(&self) -> Option<u64> {
            None
        }
        fn layer_info(&self) -> Result<crate::info::LayerInfo> {
            self.inner.layer_info()
        }
    }

    fn gated(dir: &Path) -> Gated {
        let p = dir.join("disk.raw");
        std::fs::write(&p, vec![0xaau8; 4 * CLUSTER_SIZE as usize]).unwrap();
        Gated {
            inner: crate::raw::RawImage::open(&p, true).unwrap(),
            held: AtomicBool::new(true),
            reading: AtomicU64::new(0),
        }
    }

    fn header() -> ArchiveHeader {
        crate::vma::new_header().unwrap()
    }

    /// Writer A's hook claims cluster 0 and is reading its old data; writer B, writing the same
    /// cluster, must wait until A's save is done, not write over data A has not read yet.
    #[test]
    fn a_second_writer_waits_for_the_save_of_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let img = gated(dir.path());
        let job = BackupJob::new(
            Vec::new(),
            header(),
            &[("d", &img as &dyn BlockImage)],
            false,
        )
        .unwrap();
        let b_done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let a = s.spawn(|| job.before_write(0, 0, 512));
            while img.reading.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            let b = s.spawn(|| {
                let r = job.before_write(0, 100, 512);
                b_done.store(true, Ordering::SeqCst);
                r
            });
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                !b_done.load(Ordering::SeqCst),
                "writer B went ahead while A was still reading the old data"
            );
            img.held.store(false, Ordering::SeqCst);
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        });
        assert_eq!(
            img.reading.load(Ordering::SeqCst),
            1,
            "cluster 0 read twice"
        );
        assert_eq!(job.stats().clusters_by_hook, 1);
    }

    /// With a wait limit, writer B gives up waiting for a save that does not end: the job is
    /// aborted (with the reason) and B returns, so the guest write goes on.
    #[test]
    fn a_stalled_save_aborts_the_job_instead_of_holding_writes() {
        let dir = tempfile::tempdir().unwrap();
        let img = gated(dir.path());
        let mut job = BackupJob::new(
            Vec::new(),
            header(),
            &[("d", &img as &dyn BlockImage)],
            false,
        )
        .unwrap();
        job.set_write_wait_limit(Duration::from_millis(200));
        std::thread::scope(|s| {
            let a = s.spawn(|| job.before_write(0, 0, 512));
            while img.reading.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            let start = Instant::now();
            let e = job.before_write(0, 0, 4096).unwrap_err();
            assert!(start.elapsed() < Duration::from_secs(5));
            assert!(e.to_string().contains("waited more than 200 ms"), "{e}");
            assert!(job.error().is_some());
            // Later writes return at once: the job has failed.
            assert!(job.before_write(0, 2 * CLUSTER_SIZE, 512).is_err());
            img.held.store(false, Ordering::SeqCst);
            let _ = a.join().unwrap();
        });
        assert!(job.run(None).is_err());
    }
}
