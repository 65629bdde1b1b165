//! Backups of disks being served, while they are written: the pieces a control socket drives.
//!
//! - [`fleece`]: a point-in-time view of a served disk (qemu's fleecing: copy-before-write
//!   into a temporary store), readable as an image and servable as a read-only NBD export,
//!   with a frozen copy of a dirty bitmap;
//! - [`incremental`]: a push backup into a qcow2 overlay holding only the clusters a
//!   persistent dirty bitmap marks, over the previous backup, resetting the bitmap only once
//!   the backup is complete.

pub mod fleece;
pub mod incremental;
