//! The on-disk structures of qcow2 (qemu docs/interop/qcow2.rst): the header and its
//! extensions ("Header", "Header extensions", "Feature name table", "Bitmaps extension"), L1
//! and L2 entries ("Cluster mapping", "Extended L2 Entries"), compressed cluster descriptors
//! ("Compressed Clusters Descriptor"), and which host clusters each structure occupies.
//!
//! - [`header`]: parsing and validating the header and its extensions;
//! - [`header_write`]: writing them back;
//! - [`l2`]: decoding L1/L2 entries and subcluster bitmaps;
//! - [`compress`]: compressed cluster descriptors, deflate and zstd;
//! - [`layout`]: which clusters hold metadata, refusing overlaps.

pub(super) mod compress;
pub(super) mod header;
pub(super) mod header_write;
pub(super) mod l2;
pub(super) mod layout;
