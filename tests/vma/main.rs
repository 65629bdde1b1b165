//! Proxmox VMA backups: round trips, archives vimg did not write, damaged archives, live backup.
//!
//! One test binary for the area (each file a module), so that the suite links a few binaries
//! rather than one per file; shared helpers are in tests/common.

#[path = "../common/mod.rs"]
mod common;

mod extract_to_devices;
mod foreign_sources;
mod vma_damage;
mod vma_fixtures;
mod vma_live;
mod vma_roundtrip;
mod zstd_memory;
