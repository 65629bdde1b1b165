//! The Network Block Device protocol: vimg's own implementation, shared by the server
//! (`vimg serve`, in qemu-nbd's place) and the client (`nbd://` images).
//!
//! The protocol is specified in the NBD project's `doc/proto.md`
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>); section names in
//! the doc comments of [`wire`] refer to it.
//!
//! vimg writes the protocol itself because no crate implements the current protocol: the
//! `nbd` crate speaks only the oldstyle handshake and `NBD_OPT_EXPORT_NAME` (it answers
//! `NBD_OPT_GO`, `NBD_OPT_INFO`, structured replies and extended headers with
//! `NBD_REP_ERR_UNSUP`, and has no block status), and `tokio-nbd` is GPL-licensed. Both sides
//! are written on std (threads and blocking sockets), with no async runtime.
//!
//! - [`client`]: `nbd://` exports as storage.
//! - [`wire`]: every constant and message of the protocol, encoded and decoded in both
//!   directions, so that the client and the server share one codec.
//! - [`server`]: the server (`vimg serve`).
//! - [`tls`]: TLS (`NBD_OPT_STARTTLS`) for both sides.

pub mod client;
pub mod server;
pub mod tls;
pub mod wire;
