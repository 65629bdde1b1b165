//! qemu-img and qemu-io as oracles: every command's result compared with qemu's on the same input
//! (reading, writing, create, convert, commit, rebase, resize, snapshots, bitmaps, measure, check
//! and repair), and the edges qemu's own iotests probe.
//!
//! One test binary for the area (each file a module), so that the suite links a few binaries
//! rather than one per file; shared helpers are in tests/common.

#[path = "../common/mod.rs"]
mod common;

mod alloc_oracle;
mod amend_oracle;
mod bitmap_oracle;
mod chain_read;
mod check_oracle;
mod commit_oracle;
mod convert_oracle;
mod convert_snapshot;
mod copy_offload;
mod create_oracle;
mod iotests_061_080;
mod iotests_080_112;
mod iotests_150_253_190;
mod iotests_checks;
mod lazy_refcounts;
mod live_backup;
mod live_pull;
mod luks;
mod measure_oracle;
mod nbd_client;
mod nbd_sendfile;
mod nbd_server;
mod nbd_server_answers;
mod nbd_tls;
mod options_matrix;
mod oracle_read;
mod ova;
mod qcow2_aes;
mod qcow2_luks;
mod qcow2_luks_create;
mod qcow2_luks_ops;
mod qemu_edges_extensions;
mod qemu_edges_refcount;
mod qemu_edges_shrink;
mod rebase_oracle;
mod repair_edges;
mod repair_oracle;
mod resize_oracle;
mod snapshot_oracle;
mod vdi;
mod vhdx;
mod vmdk;
mod vmdk_esx;
mod vpc;
