//! Entry points that run untrusted bytes through the qcow2 code, for the fuzz targets
//! (fuzz/fuzz_targets/) and the hostile-input tests (tests/hostile/hostile.rs), so that both
//! exercise exactly the same paths.
//!
//! Every function takes the bytes of a would-be image file, works on an in-memory copy
//! ([`MemStorage`]) and touches no host file: backing files are not opened and an external data
//! file is an in-memory copy of the same bytes. Errors are the expected outcome for damaged
//! images; these functions return normally unless the code panics, and they must finish quickly
//! and within bounded memory whatever the bytes say.
//!
//! | function | fuzz target | what it runs |
//! |---|---|---|
//! | [`parse_header`] | `qcow2_header` | [`Header::parse`]: the header and every extension |
//! | [`open_and_read`] | `qcow2_open_read` | open, info (snapshot table, bitmap directory), every snapshot's L1 and L2 tables, block status and reads over the disk |
//! | [`check`] | `qcow2_check` | open and the read-only consistency check |
//! | [`repair`] | `qcow2_repair` | `check -r leaks` or `-r all` on the copy, then a check and reads of the result |

use super::bitmap::directory as bitmaps;
use super::format::header::Header;
use super::snapshot::table as snapshot;
use super::Qcow2Image;
use crate::block::BlockImage;
use crate::check::Check;
use crate::offsets::GuestOffset;
use crate::storage::MemStorage;
use std::path::Path;

/// Guest bytes read at most by [`open_and_read`] (block status walks this far).
const READ_LIMIT: u64 = 64 << 20;
/// Snapshot trees walked at most by [`open_and_read`].
const TABLE_LIMIT: usize = 64;
/// The length the in-memory copies may grow to. A hostile image can make a repair allocate far
/// past its end (a file then grows sparse: vimg and qemu-img both do it); in memory that would
/// be unbounded, so writes past this fail as on a file system whose largest file it is.
const GROWTH_LIMIT: u64 = 256 << 20;

/// An in-memory copy of `bytes` (see [`GROWTH_LIMIT`]).
fn copy(bytes: &[u8]) -> MemStorage {
    MemStorage::with_limit(bytes.to_vec(), GROWTH_LIMIT)
}

fn name() -> &'static Path {
    Path::new("fuzz.qcow2")
}

/// An opener with a key for the image [`name`] names, so that an encrypted image opens and
/// its decryption runs too (any passphrase does: legacy AES checks none).
fn opener() -> crate::opener::Opener {
    let o = crate::opener::Opener::new();
    if let Ok(s) = crate::secret::Secrets::from_objects(&["secret,id=fuzz,data=fuzz"]) {
        o.set_secrets(s);
    }
    let key = crate::opener::EncryptOptions {
        key_secret: Some("fuzz".into()),
        format: None,
    };
    o.set_encryption(name(), key);
    o
}

/// Opens `bytes` read-only as a detached image (see the module documentation), with a key
/// for it if it is encrypted.
fn open(bytes: &[u8]) -> Option<Qcow2Image> {
    let storage = Box::new(copy(bytes));
    let data = super::DataFile::Given(Some(Box::new(copy(bytes))));
    let mut guard = crate::chain::ChainGuard::with_opener(Default::default(), opener());
    Qcow2Image::open_inner(storage, name(), false, true, &mut guard, &data).ok()
}

/// Parses `bytes` as the start of a qcow2 file, once as the whole file and once as the start
/// of a much longer one (so that the checks against the file length pass and the rest of the
/// validation runs).
pub fn parse_header(bytes: &[u8]) {
    let _ = Header::parse(bytes, bytes.len() as u64);
    let _ = Header::parse(bytes, 1 << 40);
}

/// Opens `bytes` and walks every read-only path: info, the tree of each snapshot (its L1 table
/// and what it references, as snapshot create and delete walk it), block status over (up to
/// 64 MiB of) the disk and reads of what it reports.
pub fn open_and_read(bytes: &[u8]) {
    let Some(img) = open(bytes) else {
        return;
    };
    let _ = img.layer_info();
    if let Ok(snaps) = snapshot::read_table(&img) {
        // What snapshot create, apply and delete walk.
        for s in snaps.iter().take(TABLE_LIMIT) {
            if let Ok(l1) = img.snapshot_l1(s) {
                let _ = img.tree_clusters(&l1);
            }
        }
    }
    let _ = bitmaps::read_directory(&img);
    read_all(&img);
}

/// Block status over the disk and reads of every range it reports.
fn read_all(img: &Qcow2Image) {
    let size = img.virtual_size().min(READ_LIMIT);
    let mut off = 0;
    let mut buf = vec![0u8; 1 << 16];
    while off < size {
        let Ok(s) = img.block_status(GuestOffset(off), size - off) else {
            return;
        };
        let n = s.len.min(buf.len() as u64) as usize;
        if n == 0 || img.read_at(&mut buf[..n], GuestOffset(off)).is_err() {
            return;
        }
        off += s.len;
    }
}

/// Opens `bytes` and runs the read-only consistency check.
pub fn check(bytes: &[u8]) {
    if let Some(img) = open(bytes) {
        let _ = img.check();
    }
}

/// Repairs an in-memory copy of `bytes` as `check -r` does (`-r all` unless the first byte
/// after the magic is odd, then `-r leaks`), then checks the result and reads it back.
pub fn repair(bytes: &[u8]) {
    use super::check::repair::{repair, RepairMode};
    let mode = match bytes.get(4) {
        Some(b) if b & 1 == 1 => RepairMode::Leaks,
        _ => RepairMode::All,
    };
    let storage = copy(bytes);
    let Some(handle) = crate::storage::Storage::duplicate(&storage) else {
        return;
    };
    let data = super::DataFile::Given(Some(Box::new(copy(bytes))));
    let Ok(img) = Qcow2Image::open_storage_for_repair(Box::new(storage), name(), &data, &opener())
    else {
        return;
    };
    if repair(&img, mode).is_err() {
        return;
    }
    drop(img);
    // What the repair left, opened as any read-only command would open it.
    let mut guard = crate::chain::ChainGuard::with_opener(Default::default(), opener());
    let data = super::DataFile::Given(None);
    let Ok(again) = Qcow2Image::open_inner(handle, name(), false, true, &mut guard, &data) else {
        return;
    };
    let _ = again.check();
    read_all(&again);
}
