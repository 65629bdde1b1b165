//! `backup create --compress zstd` stays below the memory of the `zstd` tool compressing the
//! same disk with as many threads (issue 21: vimg's peak was 132 MB against zstd's 72-80 MB,
//! zstd's default 8 MiB jobs at level 3 filling its buffer pool).

use std::path::Path;
use std::process::Command;

/// Runs `prog args` to completion through a small Python parent and returns whether it
/// succeeded and its peak resident set in KiB. The parent's `RUSAGE_CHILDREN` counts that one
/// child alone; measured from this test process directly, a child's `ru_maxrss` would start
/// from this process's own peak (Linux carries it over fork and exec), which the other tests
/// running in parallel raise.
fn peak_kib(prog: &str, args: &[&str]) -> (bool, i64) {
    const RUN: &str = "import resource, subprocess, sys\n\
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n\
print(r, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let out = Command::new("python3")
        .args(["-c", RUN, prog])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let code: i32 = words.next().unwrap().parse().unwrap();
    let peak: i64 = words.next().unwrap().parse().unwrap();
    (code == 0, peak)
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
    let (ok, tool) = peak_kib(
        "zstd",
        &[
            "-q",
            "-3",
            &format!("-T{threads}"),
            "-f",
            disk.to_str().unwrap(),
            "-o",
            dir.path().join("disk.zst").to_str().unwrap(),
        ],
    );
    assert!(ok, "zstd failed");
    let archive = dir.path().join("b.vma.zst");
    let (ok, vimg) = peak_kib(
        env!("CARGO_BIN_EXE_vimg"),
        &[
            "backup",
            "create",
            "--compress",
            "zstd",
            "-d",
            &format!("drive-scsi0={}", disk.display()),
            archive.to_str().unwrap(),
        ],
    );
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
