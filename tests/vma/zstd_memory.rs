//! `backup create --compress zstd` stays below the memory of the `zstd` tool compressing the
//! same disk with as many threads (issue 21: vimg's peak was 132 MB against zstd's 72-80 MB,
//! zstd's default 8 MiB jobs at level 3 filling its buffer pool).

use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `cmd` to completion and returns its exit status and peak resident set in KiB (from
/// `wait4`'s `ru_maxrss` of that child alone).
fn peak_kib(cmd: &mut Command) -> (bool, i64) {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data, zero-initialised; wait4 reaps our own child, whose Child
    // handle is forgotten below so nothing waits for it twice.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    std::mem::forget(child);
    assert_eq!(r, pid, "wait4 failed");
    (
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        usage.ru_maxrss,
    )
}

/// 192 MiB of data zstd must work on: pseudo-random bytes over a small alphabet, so that it
/// compresses by about half, as a disk does.
fn write_disk(p: &Path) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..192 {
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = b"abcdefghijklmnop"[(x & 15) as usize];
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

#[test]
fn zstd_backup_peaks_below_the_zstd_tool() {
    if Command::new("zstd").arg("--version").output().is_err() {
        if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!(
                "zstd_backup_peaks_below_the_zstd_tool: zstd is missing but VIMG_REQUIRE_QEMU=1"
            );
        }
        eprintln!("zstd_backup_peaks_below_the_zstd_tool: skipping: no zstd tool");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    write_disk(&disk);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (ok, tool) = peak_kib(Command::new("zstd").args([
        "-q",
        "-3",
        &format!("-T{threads}"),
        "-f",
        disk.to_str().unwrap(),
        "-o",
        dir.path().join("disk.zst").to_str().unwrap(),
    ]));
    assert!(ok, "zstd failed");
    let archive = dir.path().join("b.vma.zst");
    let (ok, vimg) = peak_kib(Command::new(env!("CARGO_BIN_EXE_vimg")).args([
        "backup",
        "create",
        "--compress",
        "zstd",
        "-d",
        &format!("drive-scsi0={}", disk.display()),
        archive.to_str().unwrap(),
    ]));
    assert!(ok, "vimg backup create failed");
    eprintln!("peak RSS with {threads} threads: zstd {tool} KiB, vimg {vimg} KiB");
    assert!(
        vimg < tool,
        "vimg's peak {vimg} KiB is not below the zstd tool's {tool} KiB ({threads} threads)"
    );
    // And the archive is whole.
    let out = Command::new(env!("CARGO_BIN_EXE_vimg"))
        .args(["backup", "verify", archive.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
