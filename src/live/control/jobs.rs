//! The jobs the control socket runs: what `query-jobs`, `job-cancel`, `job-dismiss`,
//! `export-remove` and the server's exit need of any of them (a push backup,
//! [`crate::live::push`]; a fleecing job or an incremental backup,
//! [`super::live_jobs`]).

use super::proto;
use super::server::State;
use serde_json::{json, Value};
use std::sync::{Arc, Weak};

/// A job of the control socket.
pub trait ControlJob: Send + Sync {
    /// Its id (unique among the server's jobs).
    fn id(&self) -> &str;
    /// The exports it uses: `export-remove` refuses them while it runs.
    fn devices(&self) -> &[String];
    /// Whether it has concluded (successfully or not).
    fn concluded(&self) -> bool;
    /// Asks it to stop: it concludes soon after, with an error saying so.
    fn cancel(&self);
    /// Waits until it has concluded.
    fn wait(&self);
    /// Its `query-jobs` entry: an object with at least `id`, `type`, `status` (`running` or
    /// `concluded`), `current-progress`, `total-progress`, and `error` once failed.
    fn info(&self) -> Value;
    /// The job as a fleecing job, if it is one (for `fleece-stop`).
    fn as_fleece(&self) -> Option<&super::live_jobs::FleeceJob> {
        None
    }
}

impl ControlJob for crate::live::push::PushJob {
    fn id(&self) -> &str {
        self.id()
    }
    fn devices(&self) -> &[String] {
        self.devices()
    }
    fn concluded(&self) -> bool {
        self.concluded()
    }
    fn cancel(&self) {
        self.cancel()
    }
    fn wait(&self) {
        self.wait()
    }
    fn info(&self) -> Value {
        serde_json::to_value(self.info()).unwrap_or(Value::Null)
    }
}

/// Sends `BLOCK_JOB_COMPLETED` for a job whose `query-jobs` entry is `info` to every client
/// of `state` (if the server still runs), as qemu does when a block job ends.
pub fn announce_completion(state: &Weak<State>, info: &Value) {
    let Some(st) = state.upgrade() else { return };
    let mut data = json!({
        "device": info["id"],
        "id": info["id"],
        "type": info["type"],
        "len": info["total-progress"],
        "offset": info["current-progress"],
        "speed": 0,
    });
    if let Some(e) = info.get("error") {
        data["error"] = e.clone();
    }
    st.broadcast(&proto::event("BLOCK_JOB_COMPLETED", data));
}

/// Adds `job` to the server's jobs, dropping the oldest concluded ones past `keep`.
pub fn register(state: &State, job: Arc<dyn ControlJob>, keep: usize) {
    let mut jobs = state.jobs();
    while jobs.iter().filter(|j| j.concluded()).count() >= keep {
        match jobs.iter().position(|j| j.concluded()) {
            Some(i) => {
                jobs.remove(i);
            }
            None => break,
        }
    }
    jobs.push(job);
}
