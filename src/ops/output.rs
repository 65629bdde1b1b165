//! Outputs written under a temporary name and renamed into place when complete, so that a
//! command that fails or is stopped leaves no partial file under the name asked for (convert's
//! new targets, backup's archives and extracted images).

use crate::error::{Error, Result, ResultExt};
use crate::ops::transfer::CHUNK;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// An error about the temporary output names the destination instead (the temporary name means
/// nothing to the user, and the file is gone once the error is reported).
pub(crate) fn rename_tmp(e: Error, tmp: &Path, dst: &Path) -> Error {
    e.moved_to(tmp, dst)
}

/// A file under a temporary name, removed on drop unless persisted, and by the signal handler
/// of [`crate::interrupt`] if the process is stopped by SIGINT, SIGTERM or SIGHUP.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    keep: bool,
    signal: crate::interrupt::Registered,
}

impl TempFile {
    /// Creates a new, empty, uniquely named file in the directory of `dst`.
    pub(crate) fn create_near(dst: &Path) -> Result<TempFile> {
        let dir = match dst.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = dst
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".to_string());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut last_err = None;
        for attempt in 0..100u32 {
            let path = dir.join(format!(
                ".{base}.vimg-{}-{:x}",
                std::process::id(),
                nanos.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => {
                    let signal = crate::interrupt::remove_on_signal(&path);
                    return Ok(TempFile {
                        path,
                        keep: false,
                        signal,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => {
                    return Err(Error::io("cannot create output file", e).with_path(dst));
                }
            }
        }
        Err(Error::io(
            "cannot create a temporary output file",
            last_err.unwrap_or_else(|| std::io::Error::other("name collision")),
        )
        .with_path(dst))
    }

    /// The output `dst` itself, emptied, for a target that names other files after its own
    /// name (a vmdk descriptor's extents): removed on failure, kept by [`TempFile::persist`].
    pub(crate) fn in_place(dst: &Path) -> Result<TempFile> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dst)
            .map_err(|e| Error::io("cannot create output file", e).with_path(dst))?;
        Ok(TempFile {
            path: dst.to_path_buf(),
            keep: false,
            signal: crate::interrupt::remove_on_signal(dst),
        })
    }

    /// Renames the file to `dst`. Unless `synced`, a file already at `dst` is removed first:
    /// ext4 (with its default `auto_da_alloc`) makes a rename over an existing file start
    /// writeback of the new one and wait for the blocks to be allocated, half a second per GiB
    /// here, which is the durability `cache=unsafe` does not ask for. A synced output is on
    /// the disk already, so the rename over is atomic and cheap.
    ///
    /// An existing `dst` with other hard links keeps its inode, so that every name of it shows
    /// the new content: the finished file is copied into it ([`copy_into`]) and then removed.
    ///
    /// From here on a signal no longer removes the complete output: at worst it is left
    /// under its temporary name, never lost with the file it replaces.
    pub(crate) fn persist(mut self, dst: &Path, synced: bool) -> Result<()> {
        self.signal = crate::interrupt::Registered::none();
        if self.path == dst {
            self.keep = true;
            return Ok(());
        }
        if std::fs::metadata(dst).is_ok_and(|m| m.file_type().is_file() && m.nlink() > 1) {
            copy_into(&self.path, dst, synced).in_file(dst)?;
            return Ok(());
        }
        if !synced && std::fs::symlink_metadata(dst).is_ok_and(|m| m.file_type().is_file()) {
            std::fs::remove_file(dst)
                .map_err(|e| Error::io("cannot replace the existing output file", e))
                .in_file(dst)?;
        }
        std::fs::rename(&self.path, dst)
            .map_err(|e| Error::io("cannot rename the finished output into place", e))
            .in_file(dst)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Copies the finished file `from` into the existing file `to`, in place: `to` is emptied
/// and refilled with `from`'s data ranges (found with SEEK_DATA/SEEK_HOLE, copied with
/// copy_file_range), so its holes stay holes. `to` keeps its inode, permissions and links.
/// Synced to the disk when `sync`.
fn copy_into(from: &Path, to: &Path, sync: bool) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let io = |what: &'static str| move |e: std::io::Error| Error::io(what, e);
    let mut src = std::fs::File::open(from).map_err(io("cannot open the finished output"))?;
    let len = src
        .metadata()
        .map_err(io("cannot get the finished output's size"))?
        .len();
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .map_err(io("cannot open the output file"))?;
    dst.set_len(0)
        .and_then(|()| dst.set_len(len))
        .map_err(io("cannot set the output file's size"))?;
    let mut pos = 0u64;
    let mut buf = Vec::new();
    while pos < len {
        let start = match rustix::fs::seek(&src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA here: all of it is data.
            Err(_) => pos,
        };
        let end = rustix::fs::seek(&src, rustix::fs::SeekFrom::Hole(start)).unwrap_or(len);
        let (mut at, end) = (start, end.min(len));
        while at < end {
            let mut off_in = at;
            let mut off_out = at;
            let want = (end - at).min(1 << 30) as usize;
            match rustix::fs::copy_file_range(
                &src,
                Some(&mut off_in),
                &dst,
                Some(&mut off_out),
                want,
            ) {
                Ok(n) if n > 0 => at += n as u64,
                // The finished file ended early: never leave the rest of the target unwritten.
                Ok(_) => {
                    return Err(Error::io(
                        "error while writing",
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                    )
                    .at(at))
                }
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::OPNOTSUPP,
                ) => {
                    // Copied by hand where the kernel does not copy between these files.
                    buf.resize(want.min(CHUNK as usize), 0);
                    src.seek(SeekFrom::Start(at))
                        .and_then(|_| src.read_exact(&mut buf))
                        .map_err(io("cannot read the finished output"))?;
                    dst.seek(SeekFrom::Start(at))
                        .and_then(|_| dst.write_all(&buf))
                        .map_err(|e| Error::io("error while writing", e).at(at))?;
                    at += buf.len() as u64;
                }
                Err(e) => {
                    return Err(Error::io("error while writing", e.into()).at(at));
                }
            }
        }
        pos = end.max(pos + 1);
    }
    if sync {
        dst.sync_all().map_err(io("flush failed"))?;
    }
    drop(dst);
    std::fs::remove_file(from).map_err(io("cannot remove the temporary output"))?;
    Ok(())
}
