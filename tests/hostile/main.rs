//! Hostile and foreign input: fuzz corpora, damaged images, untrusted names in images, formats
//! vimg does not read, targets that are sources, and the committed fixtures.
//!
//! One test binary for the area (each file a module), so that the suite links a few binaries
//! rather than one per file; shared helpers are in tests/common.

#[path = "../common/mod.rs"]
mod common;

mod aes_hostile;
mod fixtures;
mod hostile;
mod luks;
mod nbd_server;
mod ova;
mod probe_foreign;
mod target_safety;
mod untrusted_paths;
mod vdi;
mod vhdx;
mod vmdk;
mod vmdk_esx;
mod vpc;
