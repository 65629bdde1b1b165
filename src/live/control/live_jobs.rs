//! The pull and incremental jobs of the control socket: `fleece-start` / `fleece-stop` (a
//! point-in-time export of a served disk, [`crate::live::fleece`]) and `backup-start` with
//! `"sync"` (an incremental or full qcow2 backup from a persistent dirty bitmap,
//! [`crate::live::incremental`]). Both are [`ControlJob`]s: `query-jobs` lists them,
//! `job-cancel` ends them, `export-remove` refuses the disks they use while they run.

use super::jobs::{self, ControlJob};
use super::proto::{
    bool_arg, known_args, opt_str_arg, str_arg, str_list_arg, u64_arg, CommandError,
};
use super::server::State;
use crate::block::ImageFormat;
use crate::live::fleece::{self, PointInTimeView, ViewOptions};
use crate::live::incremental::{self, BackupRequest, BackupStats};
use crate::nbd::server::Export;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

type CmdResult = Result<Value, CommandError>;

/// Concluded jobs kept for `query-jobs` before the oldest are dropped.
const KEPT_CONCLUDED: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The export named `name`, or qemu's error.
fn device(state: &State, name: &str) -> Result<Arc<Export>, CommandError> {
    state
        .exports
        .get(name)
        .ok_or_else(|| CommandError::generic(format!("Export '{name}' is not found")))
}

/// `id` if free among the server's jobs, else qemu's error.
fn free_id(state: &State, id: String) -> Result<String, CommandError> {
    if state.jobs().iter().any(|j| j.id() == id) {
        return Err(CommandError::generic(format!(
            "Job ID '{id}' already in use"
        )));
    }
    Ok(id)
}

/// A fleecing job: a point-in-time view of a live export, served as a read-only export.
pub struct FleeceJob {
    id: String,
    /// The live export, then the fleecing export.
    devices: Vec<String>,
    size: u64,
    state: Weak<State>,
    /// The running view; `None` once stopped.
    view: Mutex<Option<PointInTimeView>>,
    /// The view's last statistics (kept for `query-jobs` after the stop).
    last: Mutex<fleece::ViewStats>,
    ended: Condvar,
}

impl FleeceJob {
    /// The fleecing export's name.
    pub fn export_name(&self) -> &str {
        &self.devices[1]
    }

    /// Removes the fleecing export (refused while clients are connected unless `force`,
    /// which disconnects them) and stops the view (its temporary file removed).
    pub fn stop(&self, state: &State, force: bool) -> Result<(), CommandError> {
        let mut view = lock(&self.view);
        if view.is_none() {
            return Ok(());
        }
        let export = match state.exports.remove(self.export_name(), force) {
            Ok(e) => Some(e),
            // Already gone: nothing to remove, the view still is to stop.
            Err(_) if state.exports.get(self.export_name()).is_none() => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(export) = export {
            // The clients' threads let go of the export once their sockets are shut down.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Arc::strong_count(&export) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(v) = view.take() {
            *lock(&self.last) = v.stats();
            v.stop();
        }
        drop(view);
        self.ended.notify_all();
        jobs::announce_completion(&self.state, &self.info());
        Ok(())
    }
}

impl ControlJob for FleeceJob {
    fn id(&self) -> &str {
        &self.id
    }
    fn devices(&self) -> &[String] {
        &self.devices
    }
    fn concluded(&self) -> bool {
        lock(&self.view).is_none()
    }
    /// Cancelling a fleecing job disconnects its clients (as `fleece-stop` with `force`).
    fn cancel(&self) {
        if let Some(st) = self.state.upgrade() {
            let _ = self.stop(&st, true);
        } else if let Some(v) = lock(&self.view).take() {
            v.stop();
            self.ended.notify_all();
        }
    }
    fn wait(&self) {
        let mut g = lock(&self.view);
        while g.is_some() {
            g = self.ended.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
    fn as_fleece(&self) -> Option<&FleeceJob> {
        Some(self)
    }
    fn info(&self) -> Value {
        let (running, stats) = match &*lock(&self.view) {
            Some(v) => (true, v.stats()),
            None => (false, lock(&self.last).clone()),
        };
        let mut v = json!({
            "id": self.id,
            "type": "fleece",
            "status": if running { "running" } else { "concluded" },
            "devices": self.devices,
            "export": self.export_name(),
            "current-progress": 0,
            "total-progress": self.size,
            "chunks-kept": stats.chunks_kept,
            "save-reads": stats.save_reads,
            "bytes-saved": stats.bytes_saved,
            "memory-bytes": stats.memory_bytes,
            "peak-memory-bytes": stats.peak_memory_bytes,
            "file-bytes": stats.file_bytes,
            "file": stats.file.map(|p| p.display().to_string()),
            "broken": stats.broken.is_some(),
        });
        if let Some(b) = stats.broken {
            v["error"] = Value::String(b);
        }
        v
    }
}

/// `fleece-start {"device", "name", "bitmap"?, "memory-bound"?, "temp-dir"?, "job-id"?}`.
pub fn fleece_start(state: &Arc<State>, args: &Map<String, Value>) -> CmdResult {
    known_args(
        args,
        &[
            "device",
            "name",
            "bitmap",
            "memory-bound",
            "temp-dir",
            "job-id",
        ],
    )?;
    let dev = str_arg(args, "device")?;
    let name = str_arg(args, "name")?;
    let live = device(state, dev)?;
    if state.exports.get(name).is_some() {
        return Err(CommandError::generic(format!(
            "Block export id '{name}' is already in use"
        )));
    }
    let id = free_id(
        state,
        opt_str_arg(args, "job-id")?
            .unwrap_or(&format!("fleece-{name}"))
            .to_string(),
    )?;
    let opts = ViewOptions {
        memory_bound: u64_arg(args, "memory-bound")?.unwrap_or(fleece::DEFAULT_MEMORY_BOUND),
        temp_dir: opt_str_arg(args, "temp-dir")?.map(PathBuf::from),
    };
    let (export, view) = fleece::start(&live, name, &opts, opt_str_arg(args, "bitmap")?)?;
    // On failure here the view is dropped, which stops it.
    state.exports.add(export)?;
    let job = Arc::new(FleeceJob {
        id: id.clone(),
        devices: vec![dev.to_string(), name.to_string()],
        size: live.size(),
        state: Arc::downgrade(state),
        view: Mutex::new(Some(view)),
        last: Mutex::new(Default::default()),
        ended: Condvar::new(),
    });
    jobs::register(state, job, KEPT_CONCLUDED);
    Ok(json!({ "job-id": id }))
}

/// `fleece-stop {"name", "force"?}`: ends the fleecing job serving export `name`.
pub fn fleece_stop(state: &Arc<State>, args: &Map<String, Value>) -> CmdResult {
    known_args(args, &["name", "force"])?;
    let name = str_arg(args, "name")?;
    let force = bool_arg(args, "force", false)?;
    let jobs: Vec<Arc<dyn ControlJob>> = state.jobs().clone();
    let job = jobs
        .iter()
        .filter_map(|j| j.as_fleece())
        .find(|j| j.export_name() == name && !j.concluded())
        .ok_or_else(|| CommandError::generic(format!("No fleecing export '{name}'")))?;
    job.stop(state, force)?;
    Ok(json!({}))
}

/// What an incremental job ends with.
enum Outcome {
    Done(BackupStats),
    Failed(String),
}

/// An incremental (or full) qcow2 backup of one served disk, run in a thread.
pub struct IncrementalJob {
    id: String,
    devices: Vec<String>,
    sync: &'static str,
    bitmap: String,
    target: PathBuf,
    cancel: AtomicBool,
    done: AtomicU64,
    total: AtomicU64,
    outcome: Mutex<Option<Outcome>>,
    ended: Condvar,
}

impl ControlJob for IncrementalJob {
    fn id(&self) -> &str {
        &self.id
    }
    fn devices(&self) -> &[String] {
        &self.devices
    }
    fn concluded(&self) -> bool {
        lock(&self.outcome).is_some()
    }
    fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
    fn wait(&self) {
        let mut g = lock(&self.outcome);
        while g.is_none() {
            g = self.ended.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
    fn info(&self) -> Value {
        let g = lock(&self.outcome);
        let mut v = json!({
            "id": self.id,
            "type": "backup",
            "status": if g.is_some() { "concluded" } else { "running" },
            "devices": self.devices,
            "sync": self.sync,
            "bitmap": self.bitmap,
            "target": self.target.display().to_string(),
            "current-progress": self.done.load(Ordering::Relaxed),
            "total-progress": self.total.load(Ordering::Relaxed),
        });
        match &*g {
            Some(Outcome::Done(s)) => {
                v["bytes-written"] = json!(s.bytes_written);
                v["zero-bytes"] = json!(s.zero_bytes);
                v["chunks-kept"] = json!(s.view.chunks_kept);
            }
            Some(Outcome::Failed(e)) => v["error"] = Value::String(e.clone()),
            None => {}
        }
        v
    }
}

/// `backup-start` with `"sync": "incremental"|"full"`: `{"devices": [ONE] (or "device"),
/// "format": "qcow2", "bitmap", "target", "previous"?, "previous-format"?, "job-id"?,
/// "memory-bound"?, "temp-dir"?, "cluster-size"?}`.
pub fn incremental_start(state: &Arc<State>, args: &Map<String, Value>) -> CmdResult {
    known_args(
        args,
        &[
            "job-id",
            "sync",
            "device",
            "devices",
            "format",
            "bitmap",
            "target",
            "previous",
            "previous-format",
            "memory-bound",
            "temp-dir",
            "cluster-size",
        ],
    )?;
    let sync = match str_arg(args, "sync")? {
        "incremental" => "incremental",
        "full" => "full",
        s => {
            return Err(CommandError::generic(format!(
                "Parameter 'sync' does not accept value '{s}' (incremental or full)"
            )))
        }
    };
    match opt_str_arg(args, "format")? {
        Some("qcow2") => {}
        None => {
            return Err(CommandError::generic(
                "Parameter 'format' is missing (qcow2)",
            ))
        }
        Some(f) => {
            return Err(CommandError::generic(format!(
                "an incremental backup is written as qcow2, not {f}"
            )))
        }
    }
    let dev = match (args.get("device"), args.get("devices")) {
        (Some(_), None) => str_arg(args, "device")?.to_string(),
        (None, Some(_)) => {
            let mut list = str_list_arg(args, "devices")?;
            if list.len() != 1 {
                return Err(CommandError::generic(
                    "an incremental backup is of one device",
                ));
            }
            list.remove(0)
        }
        _ => return Err(CommandError::generic("Parameter 'device' is missing")),
    };
    let live = device(state, &dev)?;
    let bitmap = str_arg(args, "bitmap")?.to_string();
    let target = PathBuf::from(str_arg(args, "target")?);
    let previous = match (sync, opt_str_arg(args, "previous")?) {
        ("incremental", Some(p)) => {
            let fmt = match opt_str_arg(args, "previous-format")? {
                Some(f) => ImageFormat::from_name(f)?,
                None => {
                    let resolved = match (Path::new(p).is_relative(), target.parent()) {
                        (true, Some(d)) => d.join(p),
                        _ => PathBuf::from(p),
                    };
                    crate::open::probe_format(&resolved)?
                }
            };
            Some((p.to_string(), fmt))
        }
        ("incremental", None) => {
            return Err(CommandError::generic(
                "an incremental backup needs 'previous' (use sync 'full' to begin a chain)",
            ))
        }
        (_, Some(_)) => {
            return Err(CommandError::generic(
                "a full backup has no 'previous' backup",
            ))
        }
        (_, None) => None,
    };
    let view = ViewOptions {
        memory_bound: u64_arg(args, "memory-bound")?.unwrap_or(fleece::DEFAULT_MEMORY_BOUND),
        temp_dir: opt_str_arg(args, "temp-dir")?.map(PathBuf::from),
    };
    let cluster_size = u64_arg(args, "cluster-size")?;
    let id = match opt_str_arg(args, "job-id")? {
        Some(id) => free_id(state, id.to_string())?,
        None => {
            let jobs = state.jobs();
            (0..)
                .map(|n| format!("backup{n}"))
                .find(|c| !jobs.iter().any(|j| j.id() == c))
                .expect("an unused id")
        }
    };
    let job = Arc::new(IncrementalJob {
        id: id.clone(),
        devices: vec![dev],
        sync,
        bitmap,
        target,
        cancel: AtomicBool::new(false),
        done: AtomicU64::new(0),
        total: AtomicU64::new(live.size()),
        outcome: Mutex::new(None),
        ended: Condvar::new(),
    });
    let weak = Arc::downgrade(state);
    let j = job.clone();
    jobs::register(state, job.clone(), KEPT_CONCLUDED);
    let spawned = std::thread::Builder::new()
        .name(format!("backup {id}"))
        .spawn(move || {
            let progress = |done: u64, total: u64| {
                j.done.store(done, Ordering::Relaxed);
                j.total.store(total, Ordering::Relaxed);
            };
            let mut req = BackupRequest::new(
                &live,
                &j.bitmap,
                &j.target,
                previous.as_ref().map(|(p, f)| (p.as_str(), *f)),
            );
            req.view = view;
            req.cluster_size = cluster_size;
            req.progress = Some(&progress);
            req.cancel = Some(&j.cancel);
            let r = incremental::run(&req);
            drop(req);
            drop(live);
            *lock(&j.outcome) = Some(match r {
                Ok(s) => Outcome::Done(s),
                Err(e) if j.cancel.load(Ordering::SeqCst) => {
                    Outcome::Failed(format!("the job was cancelled ({e})"))
                }
                Err(e) => Outcome::Failed(e.to_string()),
            });
            j.ended.notify_all();
            jobs::announce_completion(&weak, &j.info());
        });
    if let Err(e) = spawned {
        *lock(&job.outcome) = Some(Outcome::Failed(format!(
            "cannot start the backup thread: {e}"
        )));
        job.ended.notify_all();
        return Err(CommandError::generic(format!(
            "cannot start the backup thread: {e}"
        )));
    }
    Ok(json!({ "job-id": id }))
}
