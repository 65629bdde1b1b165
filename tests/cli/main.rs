//! The command line as scripts use it: qemu-img's options, messages and exit codes, image locks
//! against qemu's, and block devices (loop devices) as images.
//!
//! One test binary for the area (each file a module), so that the suite links a few binaries
//! rather than one per file; shared helpers are in tests/common.

#[path = "../common/mod.rs"]
mod common;

mod blkdebug;
mod block_device_full;
mod block_devices;
mod cli;
mod cli_compat;
mod convert_sync;
mod device_read_cache;
mod device_zeroing;
mod direct_io;
mod locking;
mod option_help;
mod option_words;
