//! Commands built on [`crate::block::BlockImage`]: info, map, compare, check, convert.
//!
//! Each module is a library implementation of one `vimg` subcommand: it opens nothing it is not
//! given where it can, returns [`crate::Error`]s instead of printing them, and renders output in
//! qemu-img's formats. The binary (`src/main.rs`) only parses arguments and prints.

pub mod amend;
pub mod backup;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod json;
pub mod map;
pub mod measure;
pub(crate) mod output;
pub mod rebase;
pub mod resize;
pub use crate::size;
pub mod serve;
pub mod snapshot;
pub mod transfer;

/// The output styles of `info`, `map` and `check` (qemu-img's `--output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Text for people.
    #[default]
    Human,
    /// qemu-img's JSON.
    Json,
}
