//! VMware's VMDK images (`-f vmdk`, qemu's `block/vmdk.c`).
//!
//! A VMDK disk is a text descriptor listing extents (sparse, flat, stream-optimized, or a
//! snapshot delta in the ESXi formats), each covering a run of the guest disk. This module is
//! being written: [`mapping`] is the contract every extent kind answers reads through.

pub mod cowd;
pub mod mapping;
pub mod sesparse;
