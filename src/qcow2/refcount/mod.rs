//! Host cluster reference counts (qemu docs/interop/qcow2.rst "Cluster refcounts" and "Host
//! cluster management"): the refcount table and blocks.
//!
//! - [`table`]: reading the refcount table and blocks, and a host cluster's refcount;
//! - [`rewrite`]: rewriting them at another width (`amend -o refcount_bits`).

pub(super) mod rewrite;
pub(super) mod table;
