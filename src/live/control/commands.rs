//! What each control command does.

use super::jobs::{self, ControlJob};
use super::live_jobs;
use super::proto::{
    bool_arg, known_args, opt_str_arg, str_arg, str_list_arg, u64_arg, CommandError, Request,
};
use super::server::{ExportRequest, Session, State};
use crate::live::push::{PushJob, PushOptions};
use crate::nbd::server::listen;
use crate::vma::stream::Compression;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

type CmdResult = Result<Value, CommandError>;

/// Default stall limit of a backup (`stall-timeout-ms`).
pub const DEFAULT_STALL_MS: u64 = 5000;
/// Concluded jobs kept for `query-jobs` before the oldest are dropped.
const KEPT_CONCLUDED: usize = 32;

/// The commands, for `query-commands`.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-exports",
    "export-add",
    "export-remove",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-clear",
    "getfd",
    "closefd",
    "backup-start",
    "fleece-start",
    "fleece-stop",
    "query-jobs",
    "job-cancel",
    "job-dismiss",
    "quit",
];

/// Runs `req` for the client of `session`.
pub fn execute(state: &Arc<State>, session: &mut Session, req: &Request) -> CmdResult {
    let args = &req.arguments;
    if !session.ready.load(Ordering::Relaxed) {
        if req.execute == "qmp_capabilities" {
            known_args(args, &["enable"])?;
            session.ready.store(true, Ordering::Relaxed);
            return Ok(json!({}));
        }
        return Err(CommandError {
            class: "CommandNotFound",
            desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
        });
    }
    match req.execute.as_str() {
        "qmp_capabilities" => Err(CommandError {
            class: "CommandNotFound",
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        }),
        "query-commands" => Ok(Value::Array(
            COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
        )),
        "query-exports" => query_exports(state),
        "export-add" => export_add(state, args),
        "export-remove" => export_remove(state, args),
        "block-dirty-bitmap-add"
        | "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "block-dirty-bitmap-clear" => bitmap(state, &req.execute, args),
        "getfd" => {
            known_args(args, &["fdname"])?;
            let name = str_arg(args, "fdname")?;
            if session.pending.is_empty() {
                return Err(CommandError::generic(
                    "No file descriptor supplied via SCM_RIGHTS",
                ));
            }
            let fd = session.pending.remove(0);
            session.fds.insert(name.to_string(), fd);
            Ok(json!({}))
        }
        "closefd" => {
            known_args(args, &["fdname"])?;
            let name = str_arg(args, "fdname")?;
            match session.fds.remove(name) {
                Some(_) => Ok(json!({})),
                None => Err(CommandError::generic(format!(
                    "File descriptor named '{name}' not found"
                ))),
            }
        }
        "backup-start" if args.contains_key("sync") => live_jobs::incremental_start(state, args),
        "backup-start" => backup_start(state, session, args),
        "fleece-start" => live_jobs::fleece_start(state, args),
        "fleece-stop" => live_jobs::fleece_stop(state, args),
        "query-jobs" => Ok(Value::Array(
            state.jobs().iter().map(|j| j.info()).collect(),
        )),
        "job-cancel" => {
            known_args(args, &["id"])?;
            let job = find_job(state, str_arg(args, "id")?)?;
            job.cancel();
            Ok(json!({}))
        }
        "job-dismiss" => {
            known_args(args, &["id"])?;
            let id = str_arg(args, "id")?;
            let job = find_job(state, id)?;
            if !job.concluded() {
                return Err(CommandError::generic(format!(
                    "Job '{id}' in state 'running' cannot accept command verb 'dismiss'"
                )));
            }
            state.jobs().retain(|j| j.id() != id);
            Ok(json!({}))
        }
        "quit" => {
            listen::request_stop();
            Ok(json!({}))
        }
        other => Err(CommandError {
            class: "CommandNotFound",
            desc: format!("The command {other} has not been found"),
        }),
    }
}

fn find_job(state: &State, id: &str) -> Result<Arc<dyn ControlJob>, CommandError> {
    state
        .jobs()
        .iter()
        .find(|j| j.id() == id)
        .cloned()
        .ok_or_else(|| CommandError::generic(format!("Job not found: '{id}'")))
}

fn query_exports(state: &State) -> CmdResult {
    let list = state
        .exports
        .list()
        .iter()
        .map(|e| {
            json!({
                "name": e.name(),
                "size": e.size(),
                "read-only": e.readonly(),
                "clients": state.exports.clients_of(e.name()),
                "file": e.image().filename().display().to_string(),
                "format": e.image().format().as_str(),
            })
        })
        .collect();
    Ok(Value::Array(list))
}

fn export_add(state: &State, args: &Map<String, Value>) -> CmdResult {
    known_args(
        args,
        &[
            "name",
            "file",
            "format",
            "read-only",
            "bitmaps",
            "description",
        ],
    )?;
    let req = ExportRequest {
        name: str_arg(args, "name")?.to_string(),
        file: str_arg(args, "file")?.into(),
        format: opt_str_arg(args, "format")?.map(String::from),
        readonly: bool_arg(args, "read-only", false)?,
        bitmaps: match args.get("bitmaps") {
            None => Vec::new(),
            Some(_) => str_list_arg(args, "bitmaps")?,
        },
        description: opt_str_arg(args, "description")?.map(String::from),
    };
    if state.exports.get(&req.name).is_some() {
        return Err(CommandError::generic(format!(
            "Block export id '{}' is already in use",
            req.name
        )));
    }
    let export = (state.factory)(&req)?;
    state.exports.add(export)?;
    Ok(json!({}))
}

fn export_remove(state: &State, args: &Map<String, Value>) -> CmdResult {
    known_args(args, &["name", "force", "mode"])?;
    let name = str_arg(args, "name")?;
    let force = bool_arg(args, "force", false)?
        || match opt_str_arg(args, "mode")? {
            None | Some("safe") => false,
            Some("hard") => true,
            Some(m) => {
                return Err(CommandError::generic(format!(
                    "Parameter 'mode' does not accept value '{m}'"
                )))
            }
        };
    if let Some(j) = state
        .jobs()
        .iter()
        .find(|j| !j.concluded() && j.devices().iter().any(|d| d == name))
    {
        return Err(CommandError::generic(format!(
            "export '{name}' is in use by job '{}'",
            j.id()
        )));
    }
    let export = state.exports.remove(name, force)?;
    // The clients' threads let go of the export once their sockets are shut down; it is
    // closed when the last of them has (or when it is dropped, if they take too long).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&export) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if Arc::strong_count(&export) == 1 {
        export.finish()?;
    }
    Ok(json!({}))
}

fn bitmap(state: &State, command: &str, args: &Map<String, Value>) -> CmdResult {
    let add = command == "block-dirty-bitmap-add";
    if add {
        known_args(
            args,
            &["node", "name", "granularity", "persistent", "disabled"],
        )?;
    } else {
        known_args(args, &["node", "name"])?;
    }
    let node = str_arg(args, "node")?;
    let name = str_arg(args, "name")?;
    let export = state.exports.get(node).ok_or_else(|| {
        CommandError::generic(format!(
            "Cannot find device='{node}' nor node-name='{node}'"
        ))
    })?;
    let Some(bm) = export.image().as_bitmaps() else {
        return Err(CommandError::generic(format!(
            "Cannot store dirty bitmaps in {} format",
            export.image().format().as_str()
        )));
    };
    let r = match command {
        "block-dirty-bitmap-add" => {
            if !bool_arg(args, "persistent", true)? {
                return Err(CommandError::generic(
                    "only persistent bitmaps are supported (stored in the qcow2 image)",
                ));
            }
            let granularity = u64_arg(args, "granularity")?;
            let disabled = bool_arg(args, "disabled", false)?;
            bm.add_bitmap(name, granularity, !disabled)
        }
        "block-dirty-bitmap-remove" => bm.remove_bitmap(name),
        "block-dirty-bitmap-enable" => bm.enable_bitmap(name, true),
        "block-dirty-bitmap-disable" => bm.enable_bitmap(name, false),
        _ => bm.clear_bitmap(name),
    };
    r?;
    Ok(json!({}))
}

fn backup_start(state: &Arc<State>, session: &mut Session, args: &Map<String, Value>) -> CmdResult {
    known_args(
        args,
        &[
            "job-id",
            "devices",
            "target",
            "configs",
            "config-files",
            "compress",
            "stall-timeout-ms",
        ],
    )?;
    let devices = str_list_arg(args, "devices")?;
    let exports = devices
        .iter()
        .map(|d| {
            state
                .exports
                .get(d)
                .ok_or_else(|| CommandError::generic(format!("Export '{d}' is not found")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let id = match opt_str_arg(args, "job-id")? {
        Some(id) => id.to_string(),
        None => {
            let jobs = state.jobs();
            (0..)
                .map(|n| format!("backup{n}"))
                .find(|c| !jobs.iter().any(|j| j.id() == c))
                .expect("an unused id")
        }
    };
    if state.jobs().iter().any(|j| j.id() == id) {
        return Err(CommandError::generic(format!(
            "Job ID '{id}' already in use"
        )));
    }
    let mut configs = Vec::new();
    if let Some(list) = args.get("configs") {
        let Value::Array(list) = list else {
            return Err(CommandError::generic(
                "Invalid parameter type for 'configs', expected: array",
            ));
        };
        for c in list {
            let Value::Object(c) = c else {
                return Err(CommandError::generic(
                    "Invalid parameter type for 'configs', expected: array of objects",
                ));
            };
            known_args(c, &["name", "data"])?;
            configs.push((
                str_arg(c, "name")?.to_string(),
                str_arg(c, "data")?.as_bytes().to_vec(),
            ));
        }
    }
    if args.get("config-files").is_some() {
        for p in str_list_arg(args, "config-files")? {
            let c = crate::vma::format::ConfigFile::read(std::path::Path::new(&p))?;
            configs.push((c.name, c.data));
        }
    }
    let compression = match opt_str_arg(args, "compress")? {
        None => Compression::None,
        Some(c) => Compression::from_name(c)?,
    };
    let stall = u64_arg(args, "stall-timeout-ms")?.unwrap_or(DEFAULT_STALL_MS);
    let target = str_arg(args, "target")?;
    let passed = target.starts_with("fd:");
    let (file, created) = match target.strip_prefix("fd:") {
        Some(name) => {
            let fd = session.fds.remove(name).ok_or_else(|| {
                CommandError::generic(format!("File descriptor named '{name}' not found"))
            })?;
            (std::fs::File::from(fd), None)
        }
        None => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)
                .map_err(|e| CommandError::generic(format!("Could not create '{target}': {e}")))?;
            (f, Some(std::path::PathBuf::from(target)))
        }
    };
    let weak: Weak<State> = Arc::downgrade(state);
    let on_end = Box::new(move |job: &PushJob| {
        jobs::announce_completion(&weak, &ControlJob::info(job));
    });
    let opts = PushOptions {
        id: id.clone(),
        configs,
        target: file,
        created: created.clone(),
        compression,
        stall_limit: Duration::from_millis(stall.max(1)),
    };
    let job = match PushJob::start(exports, opts, on_end) {
        Ok(j) => j,
        Err(e) => {
            if let Some(p) = created {
                let _ = std::fs::remove_file(p);
            }
            return Err(e.into());
        }
    };
    jobs::register(state, job.clone(), KEPT_CONCLUDED);
    if passed {
        session.owned.push(job);
    }
    Ok(json!({ "job-id": id }))
}
