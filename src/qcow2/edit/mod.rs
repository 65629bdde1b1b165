//! Changing an existing image in place, outside guest writes (qemu docs/interop/qcow2.rst
//! "Header", "Header extensions", "Cluster mapping").
//!
//! - [`amend`]: changing format options (`amend -o`);
//! - [`downgrade`]: turning a version 3 image into version 2 (`amend -o compat=0.10`);
//! - [`backing`]: changing the recorded backing file (rebase);
//! - [`empty`]: emptying the active state (commit).

pub(super) mod amend;
pub(super) mod backing;
pub(super) mod downgrade;
pub(super) mod empty;
