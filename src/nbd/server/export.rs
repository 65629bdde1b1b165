//! The served image: the NBD commands over a [`BlockImage`], with qemu-nbd's export settings
//! (read-only, discard and detect-zeroes modes, cache mode).

use super::contexts::Contexts;
use crate::host_run::HostRun;
use crate::nbd::wire::*;
use crate::{BeforeWrite, BlockImage, Error, GuestOffset, Result};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// qemu's `--detect-zeroes`: whether written buffers of zeros become zero writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Buffers are written as they are.
    #[default]
    Off,
    /// A buffer of zeros is written as zeros (without unmapping).
    On,
    /// A buffer of zeros is written as zeros, unmapping when discard is `unmap`.
    Unmap,
}

/// qemu's `--cache` modes, as they change the server's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `writeback` (the default): flush when asked.
    #[default]
    Writeback,
    /// `writethrough`: every write is flushed before it is acknowledged.
    Writethrough,
    /// `none`: `O_DIRECT`, flush when asked.
    None,
    /// `directsync`: `O_DIRECT`, every write flushed.
    Directsync,
    /// `unsafe`: flushes are ignored.
    Unsafe,
}

impl CacheMode {
    /// Parses qemu's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "none" | "off" => CacheMode::None,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }

    /// Whether the mode opens files with `O_DIRECT`.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
}

/// The export's settings.
#[derive(Debug, Clone, Default)]
pub struct ExportSettings {
    /// The export's name (`-x`, default empty).
    pub name: String,
    /// Its description (`-D`).
    pub description: Option<String>,
    /// Refuse writes (`-r`).
    pub readonly: bool,
    /// `--discard=unmap`: TRIM and zero writes may unmap.
    pub discard_unmap: bool,
    /// `--detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `--cache`.
    pub cache: CacheMode,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (a flush on one connection covers the others: true
    /// for every export of this process, whose connections share one open image; advertised
    /// when the export is read-only or may have several clients).
    pub multi_conn: bool,
}

/// An image being served.
pub struct Export {
    settings: ExportSettings,
    image: Box<dyn BlockImage>,
    size: u64,
    contexts: Contexts,
    /// Counts writes, so that cached bitmap answers know when they are stale.
    generation: AtomicU64,
    /// A temporary overlay (`-s`) removed when the export is dropped.
    temporary: Option<PathBuf>,
    /// The hooks every write, zero write and discard calls first. Each write holds the read
    /// lock from calling them until it has reached the image, so that attaching (which takes
    /// the write lock) waits for the writes in flight: see [`Export::attach_hooks`].
    hooks: RwLock<Vec<(HookId, Arc<dyn BeforeWrite>)>>,
}

/// Names a hook attached to an export, to detach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HookId(u64);

static NEXT_HOOK: AtomicU64 = AtomicU64::new(1);

/// A failed command: the wire errno and a message for structured error chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// One of [`WIRE_ERRNOS`].
    pub errno: u32,
    /// What went wrong (sent in structured error chunks and logged).
    pub message: String,
}

impl CommandError {
    /// An error with `errno` saying `message`.
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        CommandError {
            errno,
            message: message.into(),
        }
    }

    fn from_error(e: &Error) -> Self {
        CommandError::new(errno_from_error(e), e.to_string())
    }
}

/// A piece of a read ([`Export::read_plan`]), each starting at its guest offset.
#[derive(Debug, Clone, Copy)]
pub enum ReadPiece<'a> {
    /// This many bytes read as zeros.
    Zero(u64, u64),
    /// Stored byte for byte in a host file, to send from there.
    Send(u64, HostRun<'a>),
    /// This many bytes to read through the image.
    Read(u64, u64),
}

impl ReadPiece<'_> {
    /// Where the piece starts on the disk and its length.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            ReadPiece::Zero(o, l) | ReadPiece::Read(o, l) => (o, l),
            ReadPiece::Send(o, r) => (o, r.len),
        }
    }
}

/// The result of a command.
pub type CmdResult<T> = std::result::Result<T, CommandError>;

/// One extent of a block status answer (a thin alias of the wire's).
pub type StatusExtent = Extent;

impl Export {
    /// Serves `image` with `settings`; `contexts` holds its metadata contexts; `temporary` is
    /// a file to remove when the export is dropped (the `-s` overlay).
    pub fn new(
        image: Box<dyn BlockImage>,
        settings: ExportSettings,
        contexts: Contexts,
        temporary: Option<PathBuf>,
    ) -> Self {
        let size = image.virtual_size();
        Export {
            settings,
            image,
            size,
            contexts,
            generation: AtomicU64::new(0),
            temporary,
            hooks: RwLock::new(Vec::new()),
        }
    }

    /// The served image (for a hook reading the old data before a write).
    pub fn image(&self) -> &dyn BlockImage {
        self.image.as_ref()
    }

    /// Attaches each hook to its export, all at one point in time: every write that began on
    /// any of these exports before this call has reached its image when it returns, and every
    /// write after it calls the hook first. That point is what a backup of several disks is
    /// consistent at. The exports are locked in address order, so concurrent calls cannot
    /// deadlock.
    pub fn attach_hooks(hooks: &[(&Export, Arc<dyn BeforeWrite>)]) -> Vec<HookId> {
        let mut order: Vec<usize> = (0..hooks.len()).collect();
        order.sort_by_key(|&i| hooks[i].0 as *const Export as usize);
        order.dedup_by_key(|i| hooks[*i].0 as *const Export as usize);
        let mut guards: Vec<_> = order
            .iter()
            .map(|&i| {
                let g = hooks[i].0.hooks.write().unwrap_or_else(|p| p.into_inner());
                (hooks[i].0 as *const Export as usize, g)
            })
            .collect();
        let mut ids = Vec::with_capacity(hooks.len());
        for (export, hook) in hooks {
            let id = HookId(NEXT_HOOK.fetch_add(1, Ordering::Relaxed));
            let key = *export as *const Export as usize;
            let (_, g) = guards
                .iter_mut()
                .find(|(k, _)| *k == key)
                .expect("every export was locked above");
            g.push((id, hook.clone()));
            ids.push(id);
        }
        ids
    }

    /// Detaches a hook; writes that already called it have finished when this returns.
    pub fn detach_hook(&self, id: HookId) {
        let mut g = self.hooks.write().unwrap_or_else(|p| p.into_inner());
        g.retain(|(h, _)| *h != id);
    }

    /// Calls the attached hooks for `[offset, offset + len)` and returns the guard the write
    /// must hold until it has reached the image.
    fn before_write(
        &self,
        offset: u64,
        len: u64,
    ) -> RwLockReadGuard<'_, Vec<(HookId, Arc<dyn BeforeWrite>)>> {
        let g = self.hooks.read().unwrap_or_else(|p| p.into_inner());
        for (_, hook) in g.iter() {
            hook.before_write(GuestOffset(offset), len);
        }
        g
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The export's description.
    pub fn description(&self) -> Option<&str> {
        self.settings.description.as_deref()
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.settings.readonly
    }

    /// The metadata contexts it offers.
    pub fn contexts(&self) -> &Contexts {
        &self.contexts
    }

    /// The transmission flags, with `NBD_FLAG_BLOCK_STAT_PAYLOAD` when extended headers are
    /// in use.
    pub fn transmission_flags(&self, extended: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
        f |= TFLAG_SEND_DF;
        if self.settings.readonly {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
        if self.settings.multi_conn {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        if extended {
            f |= TFLAG_BLOCK_STAT_PAYLOAD;
        }
        f
    }

    /// Checks that `[offset, offset + len)` is inside the export: past the end is `EINVAL`,
    /// for writes too, as qemu-nbd 10 answers (before it looks at whether the export is
    /// read-only).
    pub fn check_range(&self, offset: u64, len: u64) -> CmdResult<()> {
        if offset > self.size || len > self.size - offset {
            return Err(CommandError::new(
                NBD_EINVAL,
                format!(
                    "request at {offset} for {len} bytes is past the end of the export ({} bytes)",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> CmdResult<()> {
        if self.settings.readonly {
            return Err(CommandError::new(NBD_EPERM, "the export is read-only"));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> CmdResult<()> {
        self.image
            .read_at(buf, GuestOffset(offset))
            .map_err(|e| CommandError::from_error(&e))
    }

    /// How to send the guest range `[offset, offset + len)`: in order, the pieces that read as
    /// zeros, those stored byte for byte in a host file (when `send_from_files`, see
    /// [`crate::host_run`]: sent from there without being read), and those to read. Neighbours
    /// of one kind are merged (host runs when they follow each other in one file); past `max`
    /// pieces the rest is one piece to read.
    pub fn read_plan(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        send_from_files: bool,
    ) -> CmdResult<Vec<ReadPiece<'_>>> {
        let mut out: Vec<ReadPiece<'_>> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            if out.len() >= max {
                out.push(ReadPiece::Read(pos, end - pos));
                break;
            }
            let st = self
                .image
                .block_status(GuestOffset(pos), end - pos)
                .map_err(|e| CommandError::from_error(&e))?;
            let n = st.len.clamp(1, end - pos);
            let run = match send_from_files && n == st.len {
                true => crate::host_run::host_run(self.image.as_ref(), &st),
                false => None,
            };
            let piece = match (st.zero, run) {
                (true, _) => ReadPiece::Zero(pos, n),
                (false, Some(run)) => ReadPiece::Send(pos, run),
                (false, None) => ReadPiece::Read(pos, n),
            };
            match (out.last_mut(), piece) {
                (Some(ReadPiece::Zero(_, l)), ReadPiece::Zero(_, n)) => *l += n,
                (Some(ReadPiece::Read(_, l)), ReadPiece::Read(_, n)) => *l += n,
                (Some(ReadPiece::Send(_, a)), ReadPiece::Send(_, b))
                    if a.fd.as_raw_fd() == b.fd.as_raw_fd() && a.host.0 + a.len == b.host.0 =>
                {
                    a.len += b.len
                }
                (_, piece) => out.push(piece),
            }
            pos += n;
        }
        Ok(out)
    }

    fn after_write(&self, fua: bool) -> CmdResult<()> {
        self.generation.fetch_add(1, Ordering::Relaxed);
        if fua || self.settings.cache.write_through() {
            return self.flush();
        }
        Ok(())
    }

    /// Writes `data` at `offset`, flushing it first if `fua`.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> CmdResult<()> {
        self.check_writable()?;
        let hooks = self.before_write(offset, data.len() as u64);
        let zeros = self.settings.detect_zeroes != DetectZeroes::Off && crate::zeros::is_zero(data);
        let r = if zeros {
            let unmap =
                self.settings.detect_zeroes == DetectZeroes::Unmap && self.settings.discard_unmap;
            self.image
                .write_zeroes(GuestOffset(offset), data.len() as u64, unmap)
        } else {
            self.image.write_at(data, GuestOffset(offset))
        };
        r.map_err(|e| CommandError::from_error(&e))?;
        drop(hooks);
        self.after_write(fua)
    }

    /// Writes zeros over `[offset, offset + len)`, unmapping if allowed (`!no_hole` and
    /// `--discard=unmap`).
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> CmdResult<()> {
        self.check_writable()?;
        let unmap = !no_hole && self.settings.discard_unmap;
        let hooks = self.before_write(offset, len);
        self.image
            .write_zeroes(GuestOffset(offset), len, unmap)
            .map_err(|e| CommandError::from_error(&e))?;
        drop(hooks);
        self.after_write(fua)
    }

    /// Discards `[offset, offset + len)` with `--discard=unmap`; otherwise does nothing (a
    /// trim is advisory).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> CmdResult<()> {
        self.check_writable()?;
        if self.settings.discard_unmap {
            let hooks = self.before_write(offset, len);
            self.image
                .discard(GuestOffset(offset), len)
                .map_err(|e| CommandError::from_error(&e))?;
            drop(hooks);
        }
        self.after_write(fua)
    }

    /// Flushes the image (nothing with `--cache=unsafe`).
    pub fn flush(&self) -> CmdResult<()> {
        if self.settings.cache == CacheMode::Unsafe {
            return Ok(());
        }
        self.image.flush().map_err(|e| CommandError::from_error(&e))
    }

    /// The extents of context `id` over `[offset, offset + len)`, at most `max` (one with
    /// `REQ_ONE`), each non-empty, none past the request.
    pub fn block_status(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        max: usize,
    ) -> CmdResult<Vec<StatusExtent>> {
        self.contexts.extents(
            self.image.as_ref(),
            id,
            offset,
            len,
            max,
            self.generation.load(Ordering::Relaxed),
        )
    }

    /// Flushes and closes the image at the end of serving (and removes a `-s` overlay).
    pub fn finish(&self) -> Result<()> {
        if self.settings.readonly {
            return Ok(());
        }
        self.image.flush()?;
        self.image.finish()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(p) = &self.temporary {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Records the ranges it is called for; while `gate` holds a receiver, each call first
    /// waits for a message on it.
    struct Recorder {
        seen: Mutex<Vec<(u64, u64)>>,
        gate: Mutex<Option<mpsc::Receiver<()>>>,
    }

    impl BeforeWrite for Recorder {
        fn before_write(&self, offset: GuestOffset, len: u64) {
            if let Some(rx) = self.gate.lock().unwrap().as_ref() {
                rx.recv().unwrap();
            }
            self.seen.lock().unwrap().push((offset.0, len));
        }
    }

    fn export(dir: &std::path::Path, name: &str) -> Export {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let image = crate::raw::RawImage::open(&p, true).unwrap();
        let settings = ExportSettings {
            discard_unmap: true,
            ..Default::default()
        };
        Export::new(Box::new(image), settings, Contexts::default(), None)
    }

    fn recorder() -> Arc<Recorder> {
        Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            gate: Mutex::new(None),
        })
    }

    #[test]
    fn hooks_see_every_write_until_detached() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (export(dir.path(), "a"), export(dir.path(), "b"));
        let (ra, rb) = (recorder(), recorder());
        let ids = Export::attach_hooks(&[(&a, ra.clone() as _), (&b, rb.clone() as _)]);
        a.write(&[1; 512], 4096, false).unwrap();
        a.write_zeroes(8192, 1024, false, false).unwrap();
        b.trim(0, 65536, false).unwrap();
        assert_eq!(*ra.seen.lock().unwrap(), vec![(4096, 512), (8192, 1024)]);
        assert_eq!(*rb.seen.lock().unwrap(), vec![(0, 65536)]);
        a.detach_hook(ids[0]);
        a.write(&[2; 512], 0, false).unwrap();
        assert_eq!(
            ra.seen.lock().unwrap().len(),
            2,
            "a detached hook was called"
        );
        let mut back = [0u8; 512];
        a.read(&mut back, 4096).unwrap();
        assert_eq!(back, [1; 512]);
    }

    #[test]
    fn attaching_waits_for_the_writes_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let a = export(dir.path(), "a");
        // A first hook that holds a write inside the hooks until told to go on.
        let slow = recorder();
        let (go, gate) = mpsc::channel();
        *slow.gate.lock().unwrap() = Some(gate);
        Export::attach_hooks(&[(&a, slow.clone() as _)]);
        std::thread::scope(|s| {
            s.spawn(|| a.write(&[7; 512], 0, false).unwrap());
            while a.hooks.try_write().is_ok() {
                std::thread::yield_now();
            }
            let (tx, rx) = mpsc::channel();
            let a = &a;
            s.spawn(move || {
                let late = recorder();
                Export::attach_hooks(&[(a, late.clone() as _)]);
                tx.send(late).unwrap();
            });
            // The write is still in flight: the second attach must not have returned.
            assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
            go.send(()).unwrap();
            let late = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(
                late.seen.lock().unwrap().is_empty(),
                "a hook saw a write begun before it"
            );
        });
        assert_eq!(*slow.seen.lock().unwrap(), vec![(0, 512)]);
    }
}
