//! Internal snapshots (qemu docs/interop/qcow2.rst "Snapshots"): the snapshot table, its
//! changes, and reading a snapshot's disk state.
//!
//! - [`table`]: reading and validating the snapshot table;
//! - [`mod@write`]: creating, applying and deleting snapshots;
//! - [`view`]: opening an image at one of its snapshots (convert -l).

pub(super) mod table;
pub(super) mod view;
pub(super) mod write;
