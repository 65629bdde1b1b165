//! vimg: a library and command-line tool for virtual disk images (raw and qcow2), an
//! alternative to qemu-img.
//!
//! Every format implements [`block::BlockImage`]; commands ([`ops`]) are built on its
//! block-status query so that unallocated and zero ranges cost nothing. Images are opened with
//! [`open::open_image`], which also opens backing chains; every file under an image is opened
//! through the [`opener::Opener`] in its [`open::OpenOptions`].
//!
//! # Module map
//!
//! The layers, lowest first. A module imports only from its own layer or the ones below, but
//! for the recursion of a backing chain: a format driver opens its backing file through
//! [`open::open_layer`], and the opener reads a `json:` backing file name through
//! [`image_spec`]. No two modules import each other.
//!
//! | layer | modules | what they hold |
//! |---|---|---|
//! | host | [`storage`], [`direct_io`], [`blkdebug`], [`lock`], [`interrupt`], [`error`], [`offsets`], [`size`], [`option_list`], [`option_desc`], [`zeros`], [`crypto`], [`secret`], [`ova`] | positioned I/O on files and block devices (and memory, in tests), aligned `O_DIRECT` I/O under it, file identity (device and inode), qemu's blkdebug fault injection over it, qemu's image locks, cleanup on signals, the one error type, guest/host offset newtypes, sizes as qemu writes them, qemu's `-o` option lists and their help tables, zero detection, sector encryption, the secrets of `--object secret`, the disks inside an OVA appliance's tar archive |
//! | storage opening | [`opener`], [`chain`] | the storage opener: storage kinds (files and block devices today), locators resolved and identified by their kind, the command's settings for particular files (blkdebug rules, data files, notices); a chain being opened (loops by the canonical locator, depth, sharing) |
//! | image model | [`block`], [`chain_read`], [`creation`], [`capability`], [`check`], [`bitmap`], [`info`], [`prealloc`], [`identity`], [`host_run`] | the [`BlockImage`] trait and its block status; the format driver trait; reading through a backing chain; what creating and measuring ask of a format; the optional capabilities (snapshots, resize, amend, backing change, compressed writes, emptying, checks, persistent bitmaps); what `info` reports; preallocation modes; which files an image reads; where a guest range lies in a host file (for `sendfile`) |
//! | formats | [`format`](mod@format), [`foreign`], [`raw`], [`qcow2`], [`luks`], [`vdi`], [`vhdx`], [`vmdk`], [`vpc`], [`null`], [`probe`] | the registry of formats; one folder (or file) per format (`qcow2` in private folders by concern: `format`, `refcount`, `write`, `snapshot`, `bitmap`, `check`, `create`, `edit`, with its public API re-exported at [`qcow2`]'s root); `probe` tells formats apart by their bytes, `foreign` names those vimg does not read |
//! | opening | [`open`], [`image_spec`] | choosing a format and opening a layer with its backing chain; qemu's image names (`json:`, `--image-opts`) |
//! | archives | [`vma`] | Proxmox's VMA backup format, read and written |
//! | network | [`nbd`] | the Network Block Device protocol: its messages (shared by both sides), the server and the client |
//! | live backup | [`live`] | backups of served disks while they are written: the control socket of `vimg serve`, push backups into VMA archives, point-in-time views (fleecing) and incremental backups from dirty bitmaps |
//! | commands | [`ops`] | one module per `vimg` command, each a library call that returns what the binary prints |
//!
//! The binary (`src/main.rs`, behind the default `cli` feature) parses arguments, calls
//! [`ops`] and prints.
//!
//! # Example: create a qcow2 image, write to it, and read it back
//!
//! ```
//! use vimg::open::{open_image, OpenOptions};
//! use vimg::qcow2::{create, CreateOptions};
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
pub mod blkdebug;
pub mod block;
pub mod capability;
pub mod chain;
pub mod chain_read;
pub mod check;
pub mod creation;
pub mod crypto;
pub mod direct_io;
pub mod error;
pub mod foreign;
pub mod format;
pub mod host_run;
pub mod identity;
pub mod image_spec;
pub mod info;
pub mod interrupt;
pub mod live;
pub mod lock;
pub mod luks;
pub mod nbd;
pub mod node_name;
pub mod null;
pub mod offsets;
pub mod open;
pub mod opener;
pub mod ops;
pub mod option_desc;
pub mod option_list;
pub mod ova;
pub mod prealloc;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod secret;
pub mod size;
pub mod storage;
pub mod vdi;
pub mod vhdx;
pub mod vma;
pub mod vmdk;
pub mod vpc;
pub mod zeros;

pub use block::{BeforeWrite, BlockImage, BlockStatus, ImageFormat};
pub use error::{Error, ErrorKind, Result};
pub use offsets::{GuestOffset, HostOffset};
