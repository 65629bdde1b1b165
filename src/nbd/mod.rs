//! NBD, the network block device protocol.

pub mod client;
