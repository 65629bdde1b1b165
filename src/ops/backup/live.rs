//! `vimg backup create --server SOCKET ... ARCHIVE|- EXPORT...`: a live push backup of the
//! exports of a running `vimg serve --control SOCKET`, driven over its control socket.
//!
//! The archive is opened here (created, or standard output) and its descriptor passed to the
//! server (`getfd`), so that the server writes where this command was told to, with this
//! command's rights; then `backup-start`, and `query-jobs` until the job concludes.

use super::{read_config, ArchivePath, CreateOptions};
use crate::live::control::client::ControlClient;
use crate::vma::job::Progress;
use crate::vma::stream::Compression;
use crate::{Error, Result};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// How often the job is asked where it is.
const POLL: Duration = Duration::from_millis(100);

/// Removes a created archive unless disarmed.
struct RemoveOnFailure<'a>(Option<&'a Path>);

impl Drop for RemoveOnFailure<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Backs up `exports` of the server at `socket` into `archive`; returns the concluded job's
/// `query-jobs` entry. A failed job is an error with the job's reason (and a created archive
/// is removed).
pub fn create_on_server(
    socket: &Path,
    archive: &ArchivePath,
    exports: &[String],
    opts: &CreateOptions,
    stall_ms: Option<u64>,
    progress: Option<Progress<'_>>,
) -> Result<Value> {
    if exports.is_empty() {
        return Err(Error::invalid_input(
            "no export to back up (give their names after the archive)",
        )
        .bare());
    }
    let mut configs = Vec::new();
    for c in &opts.configs {
        let cfg = read_config(c)?;
        let data = String::from_utf8(cfg.data).map_err(|_| {
            Error::invalid_input("config file is not UTF-8 text (the control socket carries text)")
                .with_path(c)
        })?;
        configs.push(json!({"name": cfg.name, "data": data}));
    }
    let mut client = ControlClient::connect(socket)?;
    let (file, created) = match archive {
        ArchivePath::Stdio => {
            if std::io::stdout().is_terminal() {
                return Err(Error::invalid_input(
                    "refusing to write an archive to a terminal (redirect standard output)",
                ));
            }
            let out = std::io::stdout()
                .as_fd_dup()
                .map_err(|e| Error::io("cannot use standard output", e))?;
            (out, None)
        }
        ArchivePath::File(p) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Error::invalid_input("archive already exists").with_path(p)
                    } else {
                        Error::io("cannot create the archive", e).with_path(p)
                    }
                })?;
            (f, Some(p.as_path()))
        }
    };
    let mut guard = RemoveOnFailure(created);
    // Interrupted, the command removes its archive; the server cancels the job when this
    // connection goes.
    let _on_signal = created.map(crate::interrupt::remove_on_signal);
    let fdname = format!("vimg-backup-{}", std::process::id());
    client.execute_with_fd("getfd", json!({ "fdname": fdname }), file.as_raw_fd())?;
    drop(file);
    let mut args = json!({
        "devices": exports,
        "target": format!("fd:{fdname}"),
        "configs": configs,
    });
    if opts.compression != Compression::None {
        args["compress"] = json!(match opts.compression {
            Compression::Zstd => "zstd",
            _ => "gzip",
        });
    }
    if let Some(ms) = stall_ms {
        args["stall-timeout-ms"] = json!(ms);
    }
    let started = client.execute("backup-start", args)?;
    let info = follow(&mut client, &started, progress)?;
    guard.0 = None;
    Ok(info)
}

/// Follows the job `backup-start` answered `started` with until it concludes (dismissing it
/// then): its last `query-jobs` entry, or an error with the job's reason if it failed.
fn follow(
    client: &mut ControlClient,
    started: &Value,
    progress: Option<Progress<'_>>,
) -> Result<Value> {
    let id = started["job-id"]
        .as_str()
        .ok_or_else(|| Error::invalid_input("backup-start did not name its job").bare())?
        .to_string();
    let info = loop {
        let jobs = client.execute("query-jobs", json!({}))?;
        let Some(job) = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == json!(id)))
            .cloned()
        else {
            return Err(Error::invalid_input(format!("job '{id}' has disappeared")).bare());
        };
        if let Some(p) = progress {
            let done = job["current-progress"].as_u64().unwrap_or(0);
            let total = job["total-progress"].as_u64().unwrap_or(0);
            p(done, total);
        }
        if job["status"] == "concluded" {
            let _ = client.execute("job-dismiss", json!({ "id": id }));
            break job;
        }
        std::thread::sleep(POLL);
    };
    if let Some(e) = info["error"].as_str() {
        return Err(Error::invalid_input(format!("backup job '{id}' failed: {e}")).bare());
    }
    Ok(info)
}

/// `vimg backup create --server SOCKET --incremental BITMAP [--previous PREV] TARGET EXPORT`:
/// a qcow2 backup of `export` from its persistent dirty bitmap `bitmap`, written by the server
/// to `target` (made absolute here): incremental over `previous` (recorded as the target's
/// backing file as given, so relative to the target's directory), or a full one beginning a
/// chain without it. Returns the concluded job's `query-jobs` entry; a failed job is an error
/// with its reason (the server then removes the target and keeps the bitmap).
pub fn incremental_on_server(
    socket: &Path,
    target: &ArchivePath,
    export: &[String],
    bitmap: &str,
    previous: Option<&str>,
    progress: Option<Progress<'_>>,
) -> Result<Value> {
    let ArchivePath::File(target) = target else {
        return Err(Error::invalid_input(
            "an incremental backup is a qcow2 file, not standard output",
        )
        .bare());
    };
    let [export] = export else {
        return Err(Error::invalid_input(
            "an incremental backup is of one export (give its name after the target)",
        )
        .bare());
    };
    let target = std::path::absolute(target)
        .map_err(|e| Error::io("cannot resolve the target path", e).with_path(target))?;
    let mut client = ControlClient::connect(socket)?;
    let mut args = json!({
        "sync": if previous.is_some() { "incremental" } else { "full" },
        "format": "qcow2",
        "devices": [export],
        "bitmap": bitmap,
        "target": target.display().to_string(),
    });
    if let Some(p) = previous {
        args["previous"] = json!(p);
    }
    let started = client.execute("backup-start", args)?;
    follow(&mut client, &started, progress)
}

/// A duplicate of a standard stream's descriptor, as a file.
trait DupFd {
    fn as_fd_dup(&self) -> std::io::Result<std::fs::File>;
}

impl DupFd for std::io::Stdout {
    fn as_fd_dup(&self) -> std::io::Result<std::fs::File> {
        use std::os::fd::AsFd;
        Ok(std::fs::File::from(self.as_fd().try_clone_to_owned()?))
    }
}
