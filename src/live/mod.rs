//! Live backup of served disks (issue 19): what runs inside `vimg serve` beside the NBD
//! exports, while the disks are written.
//!
//! - [`control`]: the control socket (JSON in the spirit of QMP) and its client;
//! - [`push`]: a push backup of several exports into one VMA archive, consistent at its start;
//! - [`output`]: the archive's output, bounded so that a stalled reader aborts the job;
//! - [`fdpass`]: file descriptors passed over a Unix socket (SCM_RIGHTS);
//! - [`fleece`]: a point-in-time view of a served disk (qemu's fleecing: copy-before-write
//!   into a temporary store), readable as an image and servable as a read-only NBD export,
//!   with a frozen copy of a dirty bitmap;
//! - [`incremental`]: a push backup into a qcow2 overlay holding only the clusters a
//!   persistent dirty bitmap marks, over the previous backup, resetting the bitmap only once
//!   the backup is complete.
//!
//! The control socket drives the last two through `fleece-start`/`fleece-stop` and
//! `backup-start` with `sync: incremental`, on the live exports the server holds in an `Arc`
//! (the hooks must see their writes).

pub mod control;
pub mod fdpass;
pub mod fleece;
pub mod incremental;
pub mod output;
pub mod push;
