//! `convert`'s target cache mode decides whether the target is synced at the end, as qemu-img
//! decides it: its default for convert is `unsafe` (no sync), also onto an existing target
//! (`-n`, as when importing a disk into a volume, where a needless sync of gigabytes of dirty
//! pages costs seconds). Counted with strace on both tools.

use crate::common;
use std::process::Command;

/// Whether strace can trace; under `VIMG_REQUIRE_QEMU=1` its absence fails the test.
pub(crate) fn strace_available(test: &str) -> bool {
    let ok = Command::new("strace")
        .args(["-qq", "-e", "trace=none", "true"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("VIMG_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: strace cannot run but VIMG_REQUIRE_QEMU=1");
        }
        eprintln!("{test}: skipping: strace cannot run");
    }
    ok
}

/// The fsync and fdatasync calls `tool convert ARGS` makes (it must succeed).
fn syncs(tool: &str, args: &[&str], log: &std::path::Path) -> usize {
    let mut all = vec![
        "-f",
        "-qq",
        "-e",
        "trace=fsync,fdatasync",
        "-o",
        log.to_str().unwrap(),
        tool,
        "convert",
    ];
    all.extend_from_slice(args);
    common::run("strace", &all);
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("sync("))
        .count()
}

#[test]
fn convert_syncs_the_target_when_qemu_img_does() {
    if !common::qemu_available("convert_syncs_the_target_when_qemu_img_does")
        || !strace_available("convert_syncs_the_target_when_qemu_img_does")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let src = p("src.raw");
    common::run("qemu-img", &["create", "-q", "-f", "raw", &src, "4M"]);
    common::run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 1M 1M", &src]);
    let vimg = env!("CARGO_BIN_EXE_vimg");
    let log = dir.path().join("strace.log");
    let mut failures = vec![];
    for fmt in ["raw", "qcow2", "vpc", "vdi", "vhdx", "vmdk"] {
        for cache in [None, Some("unsafe"), Some("writeback"), Some("none")] {
            for existing in [true, false] {
                let mut counts = vec![];
                for tool in ["qemu-img", vimg] {
                    let dst = p(&format!("dst.{fmt}"));
                    let _ = std::fs::remove_file(&dst);
                    let mut args = vec![];
                    if existing {
                        common::run("qemu-img", &["create", "-q", "-f", fmt, &dst, "4M"]);
                        args.push("-n");
                    }
                    if let Some(c) = cache {
                        args.extend(["-t", c]);
                    }
                    args.extend(["-O", fmt, &src, &dst]);
                    counts.push(syncs(tool, &args, &log));
                    common::run("qemu-img", &["compare", "-q", &src, &dst]);
                }
                if (counts[0] > 0) != (counts[1] > 0) {
                    failures.push(format!(
                        "-O {fmt} -t {} {}: qemu-img synced {} times, vimg {}",
                        cache.unwrap_or("(default)"),
                        if existing { "-n" } else { "(new target)" },
                        counts[0],
                        counts[1]
                    ));
                }
            }
        }
    }
    common::assert_no_failures(&failures);
}
