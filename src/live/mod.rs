//! Live backup of served disks (issue 19): what runs inside `vimg serve` beside the NBD
//! exports.
//!
//! - [`control`]: the control socket (JSON in the spirit of QMP) and its client;
//! - [`push`]: a push backup of several exports into one VMA archive, consistent at its start;
//! - [`output`]: the archive's output, bounded so that a stalled reader aborts the job;
//! - [`fdpass`]: file descriptors passed over a Unix socket (SCM_RIGHTS).

pub mod control;
pub mod fdpass;
pub mod output;
pub mod push;
