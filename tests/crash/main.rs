//! Crash safety and interruption: writes failed or dropped after the Nth, processes killed with
//! SIGKILL mid-write, commands stopped by signals, and the write path against an in-memory model.
//!
//! One test binary for the area (each file a module), so that the suite links a few binaries
//! rather than one per file; shared helpers are in tests/common.

#[path = "../common/mod.rs"]
mod common;

mod aes_kill;
mod commit_rebase_crash;
mod crash_safety;
mod foreign_kill;
mod interrupt;
mod kill;
mod luks_kill;
mod write_model;
