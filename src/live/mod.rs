//! Backups of disks being served, while they are written: the pieces a control socket drives.
//!
//! - [`fleece`]: a point-in-time view of a served disk (qemu's fleecing: copy-before-write
//!   into a temporary store), readable as an image and servable as a read-only NBD export,
//!   with a frozen copy of a dirty bitmap;
//! - [`incremental`]: a push backup into a qcow2 overlay holding only the clusters a
//!   persistent dirty bitmap marks, over the previous backup, resetting the bitmap only once
//!   the backup is complete.

//! # Wiring into a control socket
//!
//! Both work on a live [`Export`](crate::nbd::server::Export) held in an `Arc` (the one the
//! server serves: the hooks must see its writes).
//!
//! - `fleece-start`: [`fleece::start`]`(&live, export_name, &ViewOptions { memory_bound,
//!   temp_dir }, bitmap)` returns the read-only export to serve next to the live one and the
//!   [`fleece::PointInTimeView`] to keep; [`fleece::PointInTimeView::stats`] for a query;
//!   `fleece-stop`: remove the export and drop the view (its temporary file goes with it).
//!   Several disks at one point: [`fleece::PointInTimeView::start_group`], then
//!   [`fleece::PointInTimeView::export`] for each.
//! - `backup-start` with `sync=incremental`: [`incremental::run`]`(&BackupRequest { live,
//!   bitmap, target, previous, view, cluster_size, progress, cancel })` in a thread of its own;
//!   `previous: None` makes the full backup that starts a chain; `cancel` (an `AtomicBool`)
//!   makes it fail like any other failure (target removed, bitmap kept).

pub mod fleece;
pub mod incremental;
