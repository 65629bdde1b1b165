//! A convert reading a block device drops the device's pages from the host's page cache (each
//! piece once read, see `BlockImage::done_reading`; checked by tracing the advice with strace): reading a whole volume
//! through the cache filled gigabytes of fresh page-cache memory, which on this project's
//! virtual machine made reading a 2 GiB device 4-9 s instead of about 1 s. The copy must still
//! be exact.
//!
//! Needs root, `losetup` and strace; skipped with a message without them, unless `VIMG_REQUIRE_QEMU=1`.

use crate::common;

use common::loop_device::Loop;
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

/// The bytes `vimg convert ARGS` told the kernel to drop from the page cache
/// (`POSIX_FADV_DONTNEED`), traced with strace, as sorted (offset, length) pairs.
fn dropped(args: &[&str], log: &Path) -> Vec<(u64, u64)> {
    let mut all = vec![
        "-f",
        "-qq",
        "-e",
        "trace=fadvise64",
        "-o",
        s(log),
        VIMG,
        "convert",
    ];
    all.extend_from_slice(args);
    common::run("strace", &all);
    let mut v: Vec<(u64, u64)> = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        // Whole calls, and the first halves of those strace splits (`<unfinished ...>`).
        .filter(|l| l.contains("POSIX_FADV_DONTNEED"))
        .map(|l| {
            let args = &l[l.find("fadvise64(").unwrap() + 10..];
            let f: Vec<&str> = args.split(',').map(str::trim).collect();
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    v.sort_unstable();
    v
}

/// Whether the sorted ranges cover `[0, len)`.
fn covers(ranges: &[(u64, u64)], len: u64) -> bool {
    let mut end = 0;
    for &(o, l) in ranges {
        if o > end {
            return false;
        }
        end = end.max(o + l);
    }
    end >= len
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn converting_from_a_device_leaves_it_uncached() {
    if !common::qemu_available("device_read_cache")
        || !crate::convert_sync::strace_available("device_read_cache")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let len = 32usize << 20;
    let file = dir.path().join("backing.raw");
    common::qemu_create(&file, "raw", "", None, len as u64);
    // Data all over: what the copy reads is the whole device.
    common::qemu_io(
        &file,
        "raw",
        &["write -P 0x5a 0 12M".into(), "write -P 0xa5 20M 12M".into()],
    );
    let lo = match Loop::attach(&file, 512) {
        Ok(l) => l,
        Err(why) => {
            if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("device_read_cache: no loop device ({why}) but VIMG_REQUIRE_QEMU=1");
            }
            eprintln!("device_read_cache: skipping: no loop device ({why})");
            return;
        }
    };
    let dev = lo.path();
    let log = dir.path().join("strace.log");
    for fmt in ["qcow2", "raw"] {
        let out = dir.path().join(format!("out.{fmt}"));
        let ranges = dropped(&["-f", "raw", "-O", fmt, dev, s(&out)], &log);
        common::run("qemu-img", &["compare", "-q", "-f", "raw", dev, s(&out)]);
        assert!(
            covers(&ranges, len as u64),
            "-O {fmt}: the device's pages dropped from the cache: {ranges:?}"
        );
    }
    // A file keeps its cache (the next command often reads it again).
    let out = dir.path().join("again.qcow2");
    let ranges = dropped(&["-f", "raw", "-O", "qcow2", s(&file), s(&out)], &log);
    assert!(
        ranges.is_empty(),
        "a file source's cache dropped: {ranges:?}"
    );
}
