//! qemu's image locks: byte-range locks that keep two programs from writing one image.
//!
//! qemu (its `file-posix` driver, `locking=auto`) takes, on every image file it opens, a
//! shared open-file-description lock (`fcntl(F_OFD_SETLK, F_RDLCK)`) on one byte per block
//! layer permission: byte `100 + i` for each permission `i` it *uses*, byte `200 + i` for each
//! permission it does *not share* with other users of the file. The permissions, in bit order:
//!
//! | bit | permission        | qemu's name         |
//! |-----|-------------------|---------------------|
//! | 0   | consistent read   | `"consistent read"` |
//! | 1   | write             | `"write"`           |
//! | 2   | write unchanged   | `"write unchanged"` |
//! | 3   | resize            | `"resize"`          |
//!
//! Shared locks never block each other; conflicts are found by asking (`F_OFD_GETLK` with a
//! write lock) whether any *other* open file description holds a lock on the opposite byte:
//! a permission we use against `200 + i` (somebody does not share it), a permission we do not
//! share against `100 + i` (somebody uses it). Locks are taken first and tested after, so of two
//! programs opening a file at the same moment at least one sees the other. They disappear with
//! the file description, so they cannot outlive a killed process.
//!
//! What qemu 10 takes, as observed with `/proc/locks` and `strace` on qemu-img and qemu-io
//! (black box): a qcow2 image file read-only uses {consistent read} and does not share
//! {write, resize}; read-write uses {consistent read, write, resize} and does not share
//! {write, resize}; an external data file is the same but shares write; a raw image uses what
//! the command needs and shares everything, except `qemu-img convert`'s sources, which do not
//! share {write, resize}; with `-U` (force-share) a read-only open uses {consistent read} and
//! shares everything, and a read-write open is refused. vimg's [`LockRequest`] constructors
//! reproduce that, with one deliberate difference: a raw image vimg *writes* does not share
//! {write, resize} either, so that two writers of one raw file (vimg and qemu-io, or two vimg
//! processes) refuse each other.
//!
//! Within one process, qemu keeps one set of locks per image (one block node, whose permissions
//! grow and shrink with its users). vimg does the same: the locks of all the handles a process
//! has on one file (a commit has its base open read-only in the top's chain and read-write as
//! its target) are held together, on one open file description per file, and only other
//! processes' locks can conflict with them ([`lock`] returns a [`LockGuard`]; a byte is
//! released when the last guard that needs it goes).
//!
//! A conflict is an [`std::io::Error`] carrying a [`Conflict`] (see [`conflict_of`]); the
//! library's error type turns it into [`crate::ErrorKind::Locked`]. File systems without
//! open-file-description locks are used unlocked, as qemu's `locking=auto` does.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::sync::{Mutex, OnceLock};

/// A set of qemu block-layer permissions (bit `i` is permission `i`, see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// Reading data that nobody else changes underneath (bit 0).
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// Changing the data (bit 1).
    pub const WRITE: Perms = Perms(1 << 1);
    /// Writing data that reads the same afterwards (bit 2).
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// Changing the file's length (bit 3).
    pub const RESIZE: Perms = Perms(1 << 3);
    /// Every permission qemu 10 knows.
    pub const ALL: Perms = Perms(0b1111);

    /// Both sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Whether permission bit `bit` is in the set.
    pub const fn has(self, bit: u32) -> bool {
        self.0 & (1 << bit) != 0
    }

    /// The permission bits in the set, lowest first.
    fn bits(self) -> impl Iterator<Item = u32> {
        (0..PERM_NAMES.len() as u32).filter(move |&b| self.has(b))
    }
}

/// qemu's names of the permissions, by bit (used in its messages and in vimg's).
pub const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// The byte locked for each permission used: `PERM_BASE + bit`.
pub const PERM_BASE: u64 = 100;
/// The byte locked for each permission not shared: `SHARED_BASE + bit`.
pub const SHARED_BASE: u64 = 200;

/// What one open of a file takes: the permissions it uses and those it keeps from others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockRequest {
    /// Permissions used (bytes `100 + i`).
    pub hold: Perms,
    /// Permissions not shared (bytes `200 + i`).
    pub unshare: Perms,
}

const READ_WRITE_RESIZE: Perms = Perms::CONSISTENT_READ
    .union(Perms::WRITE)
    .union(Perms::RESIZE);
const WRITE_RESIZE: Perms = Perms::WRITE.union(Perms::RESIZE);

impl LockRequest {
    /// Takes no lock at all.
    pub const NONE: LockRequest = LockRequest {
        hold: Perms::NONE,
        unshare: Perms::NONE,
    };

    /// A file nobody else may write or resize while it is open: a qcow2 image file (what qemu's
    /// qcow2 driver takes), the raw source of a convert, and any raw image vimg writes.
    /// Read-only: uses consistent read; read-write: also write and resize.
    pub const fn exclusive(writable: bool) -> LockRequest {
        LockRequest {
            hold: if writable {
                READ_WRITE_RESIZE
            } else {
                Perms::CONSISTENT_READ
            },
            unshare: WRITE_RESIZE,
        }
    }

    /// A raw image read as qemu-img reads raw images outside convert (and raw backing files):
    /// uses consistent read, shares everything.
    pub const fn shared_read() -> LockRequest {
        LockRequest {
            hold: Perms::CONSISTENT_READ,
            unshare: Perms::NONE,
        }
    }

    /// A qcow2 image's external data file: as [`LockRequest::exclusive`], but others may write.
    pub const fn data_file(writable: bool) -> LockRequest {
        LockRequest {
            hold: LockRequest::exclusive(writable).hold,
            unshare: Perms::RESIZE,
        }
    }

    /// A read-only open with `-U` / `--force-share`: uses consistent read, shares everything,
    /// so only a program that keeps readers out conflicts with it.
    pub const fn force_share() -> LockRequest {
        LockRequest::shared_read()
    }
}

/// A lock another program holds that keeps this open from going ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The permission, by its qemu name ("write", "resize", ...).
    pub perm: &'static str,
    /// `false`: we wanted to use the permission and somebody does not share it; `true`: we
    /// wanted to keep it from others and somebody uses it (qemu's "shared" lock).
    pub shared: bool,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = if self.shared { "shared " } else { "" };
        write!(
            f,
            "Failed to get {shared}\"{}\" lock: is another process using the image?",
            self.perm
        )
    }
}

impl std::error::Error for Conflict {}

/// The [`Conflict`] an I/O error carries, if it is a lock conflict reported by [`lock`].
pub fn conflict_of(e: &io::Error) -> Option<Conflict> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Conflict>())
        .copied()
}

/// The lock bytes of a request, each as an index into [`Held::counts`] (0-3: bytes 100-103,
/// 4-7: bytes 200-203).
fn slots(req: LockRequest) -> impl Iterator<Item = usize> {
    req.hold
        .bits()
        .map(|b| b as usize)
        .chain(req.unshare.bits().map(|b| 4 + b as usize))
}

/// The byte of slot `i`.
fn slot_byte(i: usize) -> u64 {
    if i < 4 {
        PERM_BASE + i as u64
    } else {
        SHARED_BASE + (i - 4) as u64
    }
}

/// The locks this process holds on one file: the open file description they are on, and how
/// many guards need each byte.
struct Held {
    file: File,
    counts: [u32; 8],
}

/// Every file this process holds locks on, by (device, inode).
fn registry() -> std::sync::MutexGuard<'static, HashMap<(u64, u64), Held>> {
    static R: OnceLock<Mutex<HashMap<(u64, u64), Held>>> = OnceLock::new();
    R.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// This process's need for some image locks on one file. The bytes no other guard needs are
/// released when it is dropped, explicitly: a child process that inherited the descriptor for
/// a moment (forked by another thread, not yet executing) cannot keep them.
#[derive(Debug)]
#[must_use = "the locks are released when the guard is dropped"]
pub struct LockGuard {
    key: (u64, u64),
    req: LockRequest,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut reg = registry();
        let Some(held) = reg.get_mut(&self.key) else {
            return;
        };
        for i in slots(self.req) {
            held.counts[i] = held.counts[i].saturating_sub(1);
            if held.counts[i] == 0 {
                let _ = ofd::set(&held.file, slot_byte(i), ofd::Kind::Unlock);
            }
        }
        if held.counts.iter().all(|&c| c == 0) {
            reg.remove(&self.key);
        }
    }
}

/// Takes the locks `req` names on the file `file` is open on and checks that no other process
/// holds a conflicting one (see the module documentation); they last as long as the returned
/// guard. `None` for [`LockRequest::NONE`], and where the file system cannot lock. On a
/// conflict nothing stays locked for this request, and the error carries a [`Conflict`].
pub fn lock(file: &File, req: LockRequest) -> io::Result<Option<LockGuard>> {
    use std::os::unix::fs::MetadataExt;
    if req == LockRequest::NONE {
        return Ok(None);
    }
    let m = file.metadata()?;
    let key = (m.dev(), m.ino());
    let mut reg = registry();
    let held = match reg.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        // The process's own description of the file for its locks: a clone, so that it lives
        // on when `file` is closed.
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Held {
            file: file.try_clone()?,
            counts: [0; 8],
        }),
    };
    let fresh: Vec<usize> = slots(req).filter(|&i| held.counts[i] == 0).collect();
    match take_and_test(&held.file, req, &fresh) {
        Ok(()) => {
            for i in slots(req) {
                held.counts[i] += 1;
            }
            Ok(Some(LockGuard { key, req }))
        }
        Err(e) => {
            for &i in &fresh {
                let _ = ofd::set(&held.file, slot_byte(i), ofd::Kind::Unlock);
            }
            if held.counts.iter().all(|&c| c == 0) {
                reg.remove(&key);
            }
            if conflict_of(&e).is_none() && locking_unsupported(&e) {
                return Ok(None);
            }
            Err(e)
        }
    }
}

/// A file holding image locks, released (as far as no other handle needs them) when it is
/// dropped.
#[derive(Debug)]
pub struct LockedFile {
    file: File,
    _guard: Option<LockGuard>,
}

impl LockedFile {
    /// Takes the locks `req` names on `file` (see [`lock`]).
    pub fn new(file: File, req: LockRequest) -> io::Result<Self> {
        let guard = lock(&file, req)?;
        Ok(LockedFile {
            file,
            _guard: guard,
        })
    }
}

impl std::ops::Deref for LockedFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

/// Sets the bytes of `fresh` (the slots of `req` not locked yet) on `file`, then tests every
/// byte of `req` against the locks of other open file descriptions.
fn take_and_test(file: &File, req: LockRequest, fresh: &[usize]) -> io::Result<()> {
    for &i in fresh {
        ofd::set(file, slot_byte(i), ofd::Kind::Shared)?;
    }
    let conflict = |bit: u32, shared| {
        io::Error::new(
            io::ErrorKind::ResourceBusy,
            Conflict {
                perm: PERM_NAMES[bit as usize],
                shared,
            },
        )
    };
    for bit in req.hold.bits() {
        if ofd::taken_by_others(file, SHARED_BASE + u64::from(bit))? {
            return Err(conflict(bit, false));
        }
    }
    for bit in req.unshare.bits() {
        if ofd::taken_by_others(file, PERM_BASE + u64::from(bit))? {
            return Err(conflict(bit, true));
        }
    }
    Ok(())
}

/// Errors that mean the file system (or kernel) cannot lock, rather than a conflict.
fn locking_unsupported(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    {
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
        )
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = e;
        true
    }
}

#[cfg(target_os = "linux")]
mod ofd {
    //! The two `fcntl` calls, on one byte each. rustix only offers whole-file locks, so this
    //! goes through libc.

    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// What to do with a byte.
    #[derive(Clone, Copy)]
    pub(super) enum Kind {
        Shared,
        Unlock,
    }

    fn request(kind: libc::c_int, byte: u64) -> io::Result<libc::flock> {
        // SAFETY: `libc::flock` is a plain C struct of integers (and, on some targets,
        // padding): the all-zero bit pattern is a valid value of it.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = libc::off_t::try_from(byte)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "lock byte out of range"))?;
        fl.l_len = 1;
        // l_pid must be 0 for open-file-description locks; zeroed() made it so.
        Ok(fl)
    }

    /// Sets (shared) or releases the lock on `byte`.
    pub(super) fn set(file: &File, byte: u64, kind: Kind) -> io::Result<()> {
        let t = match kind {
            Kind::Shared => libc::F_RDLCK,
            Kind::Unlock => libc::F_UNLCK,
        };
        let fl = request(t, byte)?;
        // SAFETY: the descriptor is open for as long as `file` is borrowed, and F_OFD_SETLK
        // reads exactly one `struct flock` through the pointer, which points at a live,
        // initialised `libc::flock` on our stack.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == -1 {
            let e = io::Error::last_os_error();
            // A byte somebody holds exclusively: only possible with foreign lockers, but it is
            // a conflict all the same.
            if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    super::Conflict {
                        perm: super::lock_byte_name(byte),
                        shared: byte >= super::SHARED_BASE,
                    },
                ));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Whether another open file description holds any lock on `byte`.
    pub(super) fn taken_by_others(file: &File, byte: u64) -> io::Result<bool> {
        let mut fl = request(libc::F_WRLCK, byte)?;
        // SAFETY: as in `set`; F_OFD_GETLK also writes one `struct flock` back through the
        // pointer, which points at our own mutable, properly aligned `libc::flock`.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if r == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

#[cfg(not(target_os = "linux"))]
mod ofd {
    //! No open-file-description locks here: everything is unlocked.
    use std::fs::File;
    use std::io;

    #[derive(Clone, Copy)]
    pub(super) enum Kind {
        Shared,
        Unlock,
    }

    pub(super) fn set(_: &File, _: u64, _: Kind) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub(super) fn taken_by_others(_: &File, _: u64) -> io::Result<bool> {
        Ok(false)
    }
}

/// The permission name of lock byte `byte` (100-103 or 200-203).
fn lock_byte_name(byte: u64) -> &'static str {
    let bit = (byte % 100) as usize;
    PERM_NAMES.get(bit).copied().unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    /// Another process's locks, simulated: bytes locked on a description of the file that
    /// the registry does not know.
    fn foreign(path: &std::path::Path, req: LockRequest) -> File {
        let f = open(path);
        for i in slots(req) {
            ofd::set(&f, slot_byte(i), ofd::Kind::Shared).unwrap();
        }
        f
    }

    fn file(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        p
    }

    #[test]
    fn another_writer_keeps_writers_and_readers_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir);
        let other = foreign(&p, LockRequest::exclusive(true));
        let e = lock(&open(&p), LockRequest::exclusive(true)).unwrap_err();
        assert_eq!(
            conflict_of(&e),
            Some(Conflict {
                perm: "write",
                shared: false
            })
        );
        assert!(
            e.to_string().contains("Failed to get \"write\" lock"),
            "{e}"
        );
        let e = lock(&open(&p), LockRequest::exclusive(false)).unwrap_err();
        assert_eq!(
            conflict_of(&e),
            Some(Conflict {
                perm: "write",
                shared: true
            })
        );
        // Force-share readers get through.
        let g = lock(&open(&p), LockRequest::force_share()).unwrap();
        assert!(g.is_some());
        drop(g);
        // Once the other process is gone, so are its locks.
        drop(other);
        assert!(lock(&open(&p), LockRequest::exclusive(true))
            .unwrap()
            .is_some());
    }

    #[test]
    fn our_locks_are_held_together_and_released_with_the_last_guard() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir);
        // A read-only user and a writer of one file in this process do not conflict.
        let reader = lock(&open(&p), LockRequest::exclusive(false)).unwrap();
        let writer = lock(&open(&p), LockRequest::exclusive(true)).unwrap();
        // Another process sees the union: it may not write, nor read without -U.
        let probe = open(&p);
        assert!(ofd::taken_by_others(&probe, PERM_BASE + 1).unwrap());
        assert!(ofd::taken_by_others(&probe, SHARED_BASE + 1).unwrap());
        drop(writer);
        // The reader still keeps writers out, but no longer writes.
        assert!(!ofd::taken_by_others(&probe, PERM_BASE + 1).unwrap());
        assert!(ofd::taken_by_others(&probe, SHARED_BASE + 1).unwrap());
        drop(reader);
        for i in 0..8 {
            assert!(
                !ofd::taken_by_others(&probe, slot_byte(i)).unwrap(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn a_refused_request_leaves_nothing_locked() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir);
        let other = foreign(&p, LockRequest::exclusive(false));
        assert!(lock(&open(&p), LockRequest::exclusive(true)).is_err());
        drop(other);
        let probe = open(&p);
        for i in 0..8 {
            assert!(
                !ofd::taken_by_others(&probe, slot_byte(i)).unwrap(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn data_files_share_write_but_not_resize() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir);
        let _reader = foreign(&p, LockRequest::data_file(false));
        let e = lock(&open(&p), LockRequest::data_file(true)).unwrap_err();
        assert_eq!(
            conflict_of(&e),
            Some(Conflict {
                perm: "resize",
                shared: false
            })
        );
    }

    #[test]
    fn other_errors_are_not_conflicts() {
        let e = io::Error::other("x");
        assert_eq!(conflict_of(&e), None);
        assert_eq!(lock_byte_name(203), "resize");
        assert_eq!(lock_byte_name(100), "consistent read");
        assert!(lock(&tempfile::tempfile().unwrap(), LockRequest::NONE)
            .unwrap()
            .is_none());
    }
}
