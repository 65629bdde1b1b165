//! Removing partial output when the process is told to stop (SIGINT, SIGTERM, SIGHUP).
//!
//! Commands that make new files register them here while they are incomplete
//! ([`remove_on_signal`], [`remove_dir_on_signal`]); the returned guard takes the name off the
//! list when dropped (once the file is complete, or removed by the command itself). The
//! binary calls [`install`]; on one of the three signals its handler unlinks the registered
//! files, removes the registered directories (if empty), and lets the signal kill the process
//! with its default action, so the parent sees the signal's status (130, 143 or 129 in a shell).
//!
//! The handler only reads pre-built C strings and calls `unlink`, `rmdir` and `raise`, which are
//! async-signal-safe; the names are built when registered, and never freed (a command
//! registers a few), so the handler can never read freed memory. A signal ignored when the
//! program starts (`nohup`) stays ignored.

use std::ffi::{c_char, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, Ordering};

/// How many files, and directories, can be registered at once; further registrations are
/// not recorded (their files are still removed by the command on its own failures).
const SLOTS: usize = 64;

static FILES: [AtomicPtr<c_char>; SLOTS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
static DIRS: [AtomicPtr<c_char>; SLOTS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];

/// The signals that stop a command and remove its partial output.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A registered name: dropped, it is no longer removed on a signal.
#[derive(Debug)]
#[must_use = "the name is unregistered when the guard is dropped"]
pub struct Registered {
    slot: Option<&'static AtomicPtr<c_char>>,
}

impl Registered {
    /// A guard that registered nothing.
    pub fn none() -> Self {
        Registered { slot: None }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            // The string is leaked on purpose: a handler running on another thread may be
            // reading it right now.
            slot.store(std::ptr::null_mut(), Ordering::SeqCst);
        }
    }
}

fn register(list: &'static [AtomicPtr<c_char>; SLOTS], path: &Path) -> Registered {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Registered::none();
    };
    let ptr = c.into_raw();
    for slot in list {
        if slot
            .compare_exchange(
                std::ptr::null_mut(),
                ptr,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            return Registered { slot: Some(slot) };
        }
    }
    // No free slot: not registered; give the string back.
    // SAFETY: `ptr` came from `CString::into_raw` above and was stored nowhere.
    drop(unsafe { CString::from_raw(ptr) });
    Registered::none()
}

/// Registers the file `path` to be unlinked if the process is stopped by a signal.
pub fn remove_on_signal(path: &Path) -> Registered {
    register(&FILES, path)
}

/// Registers the directory `path` to be removed (if empty, after the registered files) if the
/// process is stopped by a signal.
pub fn remove_dir_on_signal(path: &Path) -> Registered {
    register(&DIRS, path)
}

extern "C" fn on_signal(sig: libc::c_int) {
    for slot in &FILES {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: a non-null slot holds a NUL-terminated string from `CString::into_raw`
            // that is never freed; unlink is async-signal-safe.
            unsafe { libc::unlink(p) };
        }
    }
    for slot in &DIRS {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: as above; rmdir is async-signal-safe.
            unsafe { libc::rmdir(p) };
        }
    }
    // The handler was installed with SA_RESETHAND: the disposition is the default again, and
    // the signal raised here is delivered when the handler returns, ending the process with
    // the signal's status.
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(sig) };
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP (each unless it is ignored, as under
/// `nohup`). Call once, early, from the program's main thread.
pub fn install() {
    for sig in SIGNALS {
        // SAFETY: `sigaction` is called with valid pointers to initialised structures; the
        // handler only performs async-signal-safe calls on memory that is never freed.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            act.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut act.sa_mask);
            for other in SIGNALS {
                libc::sigaddset(&mut act.sa_mask, other);
            }
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let used = |list: &[AtomicPtr<c_char>; SLOTS]| {
            list.iter()
                .filter(|s| !s.load(Ordering::SeqCst).is_null())
                .count()
        };
        let before = used(&FILES);
        let g = remove_on_signal(&p);
        assert!(g.slot.is_some());
        assert!(used(&FILES) > before || before == SLOTS);
        drop(g);
        let d = remove_dir_on_signal(dir.path());
        assert!(d.slot.is_some());
    }
}
