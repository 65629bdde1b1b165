//! The NBD server (`vimg serve`, in qemu-nbd's place): one export, served to several clients
//! at once, each with several requests in flight.
//!
//! - [`listen`]: sockets, client limits, `--fork`, `--pid-file`, signals;
//! - [`registry`]: the exports by name, and their clients;
//! - [`handshake`]: option negotiation;
//! - [`transmission`]: the request loop, replies out of order, bounded memory;
//! - [`export`]: the served image and the NBD commands over it;
//! - [`contexts`]: the metadata contexts (allocation, allocation depth, dirty bitmaps);
//! - [`stream`]: a TCP or Unix connection.

pub mod contexts;
pub mod export;
pub mod handshake;
pub mod listen;
pub mod registry;
pub mod stream;
pub mod transmission;

pub use contexts::Contexts;
pub use export::{CacheMode, DetectZeroes, Export, ExportSettings, HookId};
pub use listen::{run, run_with, Address, ListenConfig, Service};
pub use registry::Registry;
