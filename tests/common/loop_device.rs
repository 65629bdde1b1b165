//! Loop devices for the block-device tests: attached over a file with a chosen sector size,
//! detached when dropped. Needs root and `losetup`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file, detached when dropped.
pub struct Loop {
    dev: PathBuf,
    /// The device's major and minor numbers, to put its node back should a broken vimg have
    /// removed it (as a failed create once did).
    rdev: (u64, u64),
}

impl Loop {
    /// Attaches `file` with `sector` bytes per logical sector; `None` (with the reason) where
    /// loop devices cannot be made.
    pub fn attach(file: &Path, sector: u32) -> Result<Loop, String> {
        Self::attach_with(file, sector, &[])
    }

    /// [`Loop::attach`] with more `losetup` options (`-r` for a read-only device,
    /// `--direct-io=on` for a device that reads and writes its file with `O_DIRECT`).
    pub fn attach_with(file: &Path, sector: u32, options: &[&str]) -> Result<Loop, String> {
        // `losetup -f` picks a free device and then attaches it: two at once (this file's tests
        // run in parallel, other test files may make loop devices too) can pick the same one,
        // and the loser fails. So attaches here take turns, and a failed one is retried.
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let mut why = String::new();
        for _ in 0..5 {
            let out = Command::new("losetup")
                .args(["-f", "--show", "--sector-size", &sector.to_string()])
                .args(options)
                .arg(file)
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if out.status.success() {
                let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                use std::os::unix::fs::MetadataExt;
                let rdev = std::fs::metadata(&dev).map_err(|e| e.to_string())?.rdev();
                let rdev = (u64::from(libc::major(rdev)), u64::from(libc::minor(rdev)));
                return Ok(Loop { dev, rdev });
            }
            why = format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Err(why)
    }

    /// The device node, as a string.
    pub fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        let node_ok =
            std::fs::symlink_metadata(&self.dev).is_ok_and(|m| m.file_type().is_block_device());
        if !node_ok {
            // Whatever took the node's place goes; the node comes back (root only, as losetup).
            let _ = std::fs::remove_file(&self.dev);
            let _ = Command::new("mknod")
                .args(["-m", "600"])
                .arg(&self.dev)
                .args(["b", &self.rdev.0.to_string(), &self.rdev.1.to_string()])
                .status();
            eprintln!(
                "loop device {} had been removed; node restored",
                self.dev.display()
            );
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
