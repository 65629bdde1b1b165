//! The control socket of `vimg serve --control SOCKET`: JSON in the spirit of QMP.
//!
//! The server greets with `{"QMP": {...}}`; the client sends `{"execute": "qmp_capabilities"}`
//! and then commands `{"execute": NAME, "arguments": {...}, "id": ...}`, one JSON object per
//! line, answered `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}` (with the
//! request's `id`). Events (`BLOCK_JOB_COMPLETED`) go to every client past the capabilities
//! negotiation. A file descriptor passed with `SCM_RIGHTS` alongside a `getfd` command is
//! kept under its name for `backup-start` (`"target": "fd:NAME"`).
//!
//! - [`proto`]: messages in and out (parsing, errors, events);
//! - [`commands`]: what each command does;
//! - [`jobs`]: what the socket needs of a job ([`jobs::ControlJob`]);
//! - [`live_jobs`]: fleecing and incremental backup jobs;
//! - [`server`]: the socket, its clients, the jobs;
//! - [`client`]: the other end, for the CLI.

pub mod client;
pub mod commands;
pub mod jobs;
pub mod live_jobs;
pub mod proto;
pub mod server;

pub use jobs::ControlJob;
pub use server::{Control, ExportFactory, ExportRequest, Session, State};
