//! vimg: a library and command-line tool for virtual disk images (raw and qcow2), an
//! alternative to qemu-img.
//!
//! Every format implements [`block::BlockImage`]; commands ([`ops`]) are built on its
//! block-status query so that unallocated and zero ranges cost nothing. Images are opened with
//! [`open::open_image`], which also opens backing chains.
//!
//! # Example: create a qcow2 image, write to it, and read it back
//!
//! ```
//! use vimg::open::{open_image, OpenOptions};
//! use vimg::qcow2::create::{create, CreateOptions};
//! use vimg::{BlockImage, GuestOffset};
//!
//! # fn main() -> vimg::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("disk.qcow2");
//! create(&path, &CreateOptions { size: 1 << 20, ..Default::default() })?;
//!
//! let image = open_image(&path, &OpenOptions { writable: true, ..Default::default() })?;
//! image.write_at(b"hello", GuestOffset(512 << 10))?;
//! image.finish()?;
//!
//! let mut buf = [0u8; 5];
//! image.read_at(&mut buf, GuestOffset(512 << 10))?;
//! assert_eq!(&buf, b"hello");
//! // Ranges never written read as zeros, and block status says so without reading them.
//! let status = image.block_status(GuestOffset(0), 4096)?;
//! assert!(status.zero && !status.present);
//! # Ok(())
//! # }
//! ```
//!
//! The command-line binary needs the default `cli` feature; a library user may turn it off
//! (`default-features = false`) and depend on neither clap nor indicatif.

#![warn(missing_docs)]

pub mod bitmap;
pub mod block;
pub mod check;
pub mod error;
pub mod identity;
pub mod image_spec;
pub mod info;
pub mod interrupt;
pub mod lock;
pub mod offsets;
pub mod open;
pub mod ops;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod secret;
pub mod storage;
pub mod vma;

pub use block::{BlockImage, BlockStatus, ImageFormat};
pub use error::{Error, ErrorKind, Result};
pub use offsets::{GuestOffset, HostOffset};
