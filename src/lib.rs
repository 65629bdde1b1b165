//! vimg: a library and command-line tool for virtual disk images (raw and qcow2), an
//! alternative to qemu-img.
//!
//! Every format implements [`block::BlockImage`]; commands ([`ops`]) are built on its
//! block-status query so that unallocated and zero ranges cost nothing. Images are opened with
//! [`open::open_image`], which also opens backing chains.

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
pub mod null;
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
