//! A push backup of running exports into one VMA archive (Proxmox's live backup design).
//!
//! [`PushJob::start`] builds a [`BackupJob`] over the exports' images, attaches a hook to every
//! export at one point in time ([`Export::attach_hooks`]: the archive holds the disks as they
//! were then, all of them), and copies in a thread of its own. A guest write meanwhile saves
//! the old clusters it touches first (each cluster is read once, by the hook or by the job).
//! When the job ends, however it ends, the hooks are detached.
//!
//! The guest comes first: the archive's output is a [`BoundedWriter`] (a reader that stops
//! reading fails the job after the stall limit) and a hook waits for the archive at most that
//! long too, so a full disk, a closed pipe or a stalled reader aborts the job, with the reason
//! in [`PushJob::info`], and guest writes go on. The served images are only ever read.

use super::output::BoundedWriter;
use crate::block::{BeforeWrite, BlockImage, BlockStatus, ImageFormat};
use crate::nbd::server::{Export, HookId};
use crate::offsets::GuestOffset;
use crate::vma::format::ArchiveHeader;
use crate::vma::job::{BackupJob, BackupStats, Source};
use crate::vma::stream::{ArchiveOutput, Compression};
use crate::{Error, Result};
use serde::Serialize;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The archive's output as the job writes it.
type Out = ArchiveOutput<BoundedWriter>;
type Job = BackupJob<'static, Out>;

/// An export's image as a source of the backup job (read only; it holds the export).
struct ServedImage(Arc<Export>);

impl ServedImage {
    fn inner(&self) -> &dyn BlockImage {
        self.0.image()
    }
}

fn read_only() -> Error {
    Error::invalid_input("a backup source is not written by the job")
}

impl BlockImage for ServedImage {
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
    fn write_at(&self, _buf: &[u8], _offset: GuestOffset) -> Result<()> {
        Err(read_only())
    }
    fn write_zeroes(&self, _offset: GuestOffset, _len: u64, _unmap: bool) -> Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        self.inner().block_status(offset, max_len)
    }
    fn is_writable(&self) -> bool {
        false
    }
    fn actual_size(&self) -> Option<u64> {
        self.inner().actual_size()
    }
    fn layer_info(&self) -> Result<crate::info::LayerInfo> {
        self.inner().layer_info()
    }
}

/// The hook of one export: saves the old clusters of a write through the job.
struct Hook {
    job: Arc<Job>,
    device: usize,
    abort: Arc<AtomicBool>,
}

impl BeforeWrite for Hook {
    fn before_write(&self, offset: GuestOffset, len: u64) {
        // A failure is the job's (recorded there); the write goes on. Once failed, the
        // output refuses at once, so nothing else waits for it.
        if self.job.before_write(self.device, offset.0, len).is_err() {
            self.abort.store(true, Ordering::Relaxed);
        }
    }
}

/// What a push backup is asked.
pub struct PushOptions {
    /// The job's id (unique among the server's jobs).
    pub id: String,
    /// Config files to store: (name, contents).
    pub configs: Vec<(String, Vec<u8>)>,
    /// The archive's output (a file, a pipe, a socket).
    pub target: File,
    /// A file the server created for the archive, removed if the job fails.
    pub created: Option<PathBuf>,
    /// Compression of the whole stream.
    pub compression: Compression,
    /// How long the archive may take nothing (and a guest write wait for it) before the job
    /// aborts.
    pub stall_limit: Duration,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Copying.
    Running,
    /// Finished (successfully or not: see the error).
    Concluded,
}

/// A job's state, as `query-jobs` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// Always `backup`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Running or concluded.
    pub status: JobStatus,
    /// The exports backed up, in archive order.
    pub devices: Vec<String>,
    /// Device bytes saved so far.
    #[serde(rename = "current-progress")]
    pub done: u64,
    /// Device bytes in all.
    #[serde(rename = "total-progress")]
    pub total: u64,
    /// Clusters the job read itself.
    #[serde(rename = "clusters-by-job")]
    pub clusters_by_job: u64,
    /// Clusters saved by the write hook, before a guest write.
    #[serde(rename = "clusters-by-hook")]
    pub clusters_by_hook: u64,
    /// Clusters stored as zeros without reading.
    #[serde(rename = "clusters-unread")]
    pub clusters_unread: u64,
    /// Bytes read from the exports.
    #[serde(rename = "bytes-read")]
    pub bytes_read: u64,
    /// Archive bytes written (after compression), once concluded.
    #[serde(rename = "archive-bytes", skip_serializing_if = "Option::is_none")]
    pub archive_bytes: Option<u64>,
    /// Why the job failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The end of a job.
struct Outcome {
    error: Option<String>,
    stats: BackupStats,
    archive_bytes: u64,
    progress: (u64, u64),
}

/// A running or finished push backup.
pub struct PushJob {
    id: String,
    devices: Vec<String>,
    /// The job and the exports it reads, let go of once it has concluded (so that the
    /// exports can be removed and closed while the job stays listed).
    job: Mutex<Option<Arc<Job>>>,
    exports: Mutex<Vec<Arc<Export>>>,
    abort: Arc<AtomicBool>,
    outcome: Mutex<Option<Outcome>>,
    ended: Condvar,
}

impl PushJob {
    /// Starts a backup of `exports` (archive devices named after them) as `opts` says. The
    /// archive holds the exports as they are when this returns; `on_end` is called from the
    /// job's thread once it has concluded (hooks detached, output closed).
    pub fn start(
        exports: Vec<Arc<Export>>,
        opts: PushOptions,
        on_end: Box<dyn FnOnce(&PushJob) + Send>,
    ) -> Result<Arc<PushJob>> {
        if exports.is_empty() {
            return Err(Error::invalid_input("a backup needs at least one export").bare());
        }
        for (i, e) in exports.iter().enumerate() {
            if exports[..i].iter().any(|o| o.name() == e.name()) {
                return Err(
                    Error::invalid_input(format!("export '{}' is listed twice", e.name())).bare(),
                );
            }
        }
        let mut header: ArchiveHeader = crate::vma::new_header()?;
        for (name, data) in opts.configs {
            header.add_config(&name, data)?;
        }
        let abort = Arc::new(AtomicBool::new(false));
        let out = BoundedWriter::new(opts.target, opts.stall_limit, abort.clone());
        let out = ArchiveOutput::new(out, opts.compression)?;
        let sources = exports
            .iter()
            .map(|e| {
                let image: Arc<dyn BlockImage> = Arc::new(ServedImage(e.clone()));
                (e.name().to_string(), Source::Shared(image))
            })
            .collect();
        let mut job = BackupJob::with_sources(out, header, sources, true)?;
        job.set_write_wait_limit(opts.stall_limit);
        let job = Arc::new(job);
        let hooks: Vec<(&Export, Arc<dyn BeforeWrite>)> = exports
            .iter()
            .enumerate()
            .map(|(device, e)| {
                let hook: Arc<dyn BeforeWrite> = Arc::new(Hook {
                    job: job.clone(),
                    device,
                    abort: abort.clone(),
                });
                (e.as_ref(), hook)
            })
            .collect();
        // The point in time the archive is consistent at.
        let ids = Export::attach_hooks(&hooks);
        drop(hooks);
        let push = Arc::new(PushJob {
            id: opts.id,
            devices: exports.iter().map(|e| e.name().to_string()).collect(),
            job: Mutex::new(Some(job)),
            exports: Mutex::new(exports),
            abort,
            outcome: Mutex::new(None),
            ended: Condvar::new(),
        });
        let me = push.clone();
        let created = opts.created;
        std::thread::Builder::new()
            .name(format!("backup {}", me.id))
            .spawn(move || {
                let outcome = me.run(&ids, created.as_deref());
                *me.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
                *me.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
                me.exports.lock().unwrap_or_else(|p| p.into_inner()).clear();
                me.ended.notify_all();
                on_end(&me);
            })
            .map_err(|e| Error::io("cannot start the backup thread", e))?;
        Ok(push)
    }

    /// Copies, detaches the hooks, ends the archive.
    fn run(&self, hooks: &[HookId], created: Option<&Path>) -> Outcome {
        let job = self.job().expect("the job is held until it concludes");
        let copied = job.run(None);
        if copied.is_err() {
            self.abort.store(true, Ordering::Relaxed);
        }
        let exports = self
            .exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (e, id) in exports.iter().zip(hooks) {
            e.detach_hook(*id);
        }
        let stats = job.stats();
        let progress = job.progress();
        let ended = copied.and_then(|()| job.finish()).and_then(|(out, s)| {
            let w = out
                .finish()
                .map_err(|e| Error::io("cannot write to the archive", e))?;
            Ok((w.written(), s))
        });
        match ended {
            Ok((bytes, stats)) => Outcome {
                error: None,
                stats,
                archive_bytes: bytes,
                progress,
            },
            Err(e) => {
                self.abort.store(true, Ordering::Relaxed);
                if let Some(p) = created {
                    let _ = std::fs::remove_file(p);
                }
                Outcome {
                    error: Some(e.to_string()),
                    stats,
                    archive_bytes: 0,
                    progress,
                }
            }
        }
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The exports it backs up.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// Whether it has concluded.
    pub fn concluded(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Cancels the job: it concludes soon after with an error saying so.
    pub fn cancel(&self) {
        if let Some(job) = self.job() {
            job.abort(Error::invalid_input("the backup job was cancelled").bare());
        }
        self.abort.store(true, Ordering::Relaxed);
    }

    fn job(&self) -> Option<Arc<Job>> {
        self.job.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the job has concluded.
    pub fn wait(&self) {
        let mut g = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        while g.is_none() {
            g = self.ended.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Where the job is.
    pub fn info(&self) -> JobInfo {
        let g = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let ((done, total), status, stats, error, archive_bytes) = match (&*g, self.job()) {
            (Some(o), _) => (
                o.progress,
                JobStatus::Concluded,
                o.stats.clone(),
                o.error.clone(),
                Some(o.archive_bytes),
            ),
            (None, Some(job)) => (job.progress(), JobStatus::Running, job.stats(), None, None),
            (None, None) => (
                (0, 0),
                JobStatus::Running,
                BackupStats::default(),
                None,
                None,
            ),
        };
        JobInfo {
            id: self.id.clone(),
            kind: "backup",
            status,
            devices: self.devices.clone(),
            done,
            total,
            clusters_by_job: stats.clusters_by_job,
            clusters_by_hook: stats.clusters_by_hook,
            clusters_unread: stats.clusters_unread,
            bytes_read: stats.bytes_read,
            archive_bytes,
            error,
        }
    }
}
