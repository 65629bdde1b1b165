//! Encrypted writes killed with SIGKILL (issue 16), as tests/crash/kill.rs does for plain ones:
//! a `convert -n` into a raw LUKS image qemu made, killed before each of its writes in turn
//! (`VIMG_TEST_KILL_AFTER_WRITES=N`), leaves the header and key slot intact (qemu opens the
//! image with its key) and every 64 KiB block reading wholly as before or wholly as after; run
//! again, it completes. A new LUKS output killed mid-convert is absent under its name or
//! complete.

use crate::common;

use common::{qemu_available, run, run_status};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
const SECRET: &str = "secret,id=sec0,data=kill-pass";
const SIZE: usize = 4 << 20;
const BLOCK: usize = 65536;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn opts(path: &Path) -> String {
    format!("driver=luks,file.filename={},key-secret=sec0", p(path))
}

/// The guest bytes as qemu decrypts them, or `None` if qemu cannot open the image.
fn qemu_view(img: &Path, dir: &Path) -> Option<Vec<u8>> {
    let out = dir.join("view.raw");
    let _ = std::fs::remove_file(&out);
    let (rc, _) = run_status(
        "qemu-img",
        &[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &opts(img),
            "-O",
            "raw",
            p(&out),
        ],
    );
    (rc == 0).then(|| std::fs::read(&out).unwrap())
}

/// Runs vimg with `args`, killed before its `n`-th write if given: whether it was killed.
fn vimg(args: &[&str], n: Option<usize>) -> (bool, i32, String) {
    let mut c = Command::new(VIMG);
    c.args(args);
    if let Some(n) = n {
        c.env("VIMG_TEST_KILL_AFTER_WRITES", n.to_string());
    }
    let out = c.output().unwrap();
    (
        out.status.signal() == Some(9),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn killed_encrypted_writes_leave_old_or_new_blocks() {
    if !qemu_available("luks_kill") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.luks");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            "key-secret=sec0,iter-time=10",
            p(&base),
            &SIZE.to_string(),
        ],
    );
    run(
        "qemu-io",
        &[
            "--object",
            SECRET,
            "--image-opts",
            &opts(&base),
            "-c",
            &format!("write -P 0x11 0 {SIZE}"),
        ],
    );
    let before = qemu_view(&base, d).unwrap();
    let src = d.join("src.raw");
    let mut data = vec![0u8; SIZE];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 4096 % 200) as u8 + 1;
    }
    std::fs::write(&src, &data).unwrap();

    let img = d.join("t.luks");
    let mut failures = Vec::new();
    let mut finished = false;
    for n in 1..=60 {
        std::fs::copy(&base, &img).unwrap();
        let args = [
            "convert",
            "-n",
            "-f",
            "raw",
            p(&src),
            "--object",
            SECRET,
            "--target-image-opts",
            &opts(&img),
        ];
        let (killed, rc, text) = vimg(&args, Some(n));
        if !killed {
            assert_eq!(rc, 0, "{text}");
            finished = true;
            break;
        }
        let Some(view) = qemu_view(&img, d) else {
            failures.push(format!("kill {n}: qemu cannot open the image"));
            continue;
        };
        for (i, (got, (old, new))) in view
            .chunks(BLOCK)
            .zip(before.chunks(BLOCK).zip(data.chunks(BLOCK)))
            .enumerate()
        {
            if got != old && got != new {
                failures.push(format!("kill {n}: block {i} is neither old nor new"));
            }
        }
        let (_, rc, text) = vimg(&args, None);
        if rc != 0 || qemu_view(&img, d).as_deref() != Some(&data[..]) {
            failures.push(format!("kill {n}: the rerun did not complete: {text}"));
        }
    }
    assert!(finished, "never ran to completion");

    // A new LUKS output: absent under its name, or complete.
    let out = d.join("new.luks");
    for n in 1..=20 {
        let _ = std::fs::remove_file(&out);
        let args = [
            "convert",
            "-f",
            "raw",
            p(&src),
            "-O",
            "luks",
            "--object",
            SECRET,
            "-o",
            "key-secret=sec0,iter-time=1",
            p(&out),
        ];
        let (killed, rc, text) = vimg(&args, Some(n));
        if !killed {
            assert_eq!(rc, 0, "{text}");
            break;
        }
        if out.exists() && qemu_view(&out, d).as_deref() != Some(&data[..]) {
            failures.push(format!(
                "new output, kill {n}: left incomplete under its name"
            ));
        }
    }
    common::assert_no_failures(&failures);
}
