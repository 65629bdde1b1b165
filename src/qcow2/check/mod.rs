//! Checking and repairing an image (`check`, `check -r`): every structure that references host
//! clusters compared with the stored refcounts (qemu docs/interop/qcow2.rst "Cluster
//! refcounts", "Cluster mapping", "Snapshots", "Bitmaps extension").
//!
//! - [`consistency`]: the read-only consistency check, with qemu-img check's counts;
//! - [`repair`]: fixing leaks and errors, rebuilding the refcount structures.

pub(super) mod consistency;
pub(super) mod repair;
