//! Changing guest data (qemu docs/interop/qcow2.rst "Cluster mapping" and "Cluster
//! refcounts"): allocation, copy-on-write and the crash-safe flush order.
//!
//! - [`path`]: the write path, its crash-safe flush and lazy refcounts;
//! - [`discard`]: guest discard requests;
//! - [`resize`]: growing and shrinking the virtual disk.

pub(super) mod discard;
pub(super) mod path;
pub(super) mod resize;
