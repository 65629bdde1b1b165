//! Crash tests of block allocation in dynamic VHD (`vpc`), VDI, monolithicSparse vmdk and
//! dynamic VHDX images, as tests/crash/kill.rs
//! does for qcow2: vimg kills itself with SIGKILL just before its N-th change to a file
//! (`VIMG_TEST_KILL_AFTER_WRITES=N`, see `vimg::storage`), for N from 1 until the command
//! finishes, in `convert -n` of new data (into allocated and unallocated blocks, and zeros)
//! into an image qemu made and wrote. After each kill the image opens in qemu-img and in vimg,
//! both read the same disk, every 4 KiB of it reads as before the command or as after it (never
//! as garbage, nor as another block's data), `qemu-img check` finds no corruption (a leak is
//! allowed; qemu cannot check VHDs; a VHDX's log left by the kill is replayed by `qemu-img
//! check -r all` first, as qemu wants it), and the command run again to the end, by vimg and
//! by qemu-img, gives the complete new disk: a half-done allocation never makes a later one
//! overwrite data.

use crate::common::{self, qemu_available};
use std::path::Path;
use std::process::Command;

const UNIT: usize = 4096;
/// At most this many kill points (a vmdk writes each 64 KiB grain's data, then its grain
/// table entry and the redundant one: about 700 writes here).
const MAX_POINTS: usize = 1000;
const SIZE: u64 = 12 << 20;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn qemu_img(args: &[&str]) -> (i32, String) {
    common::run_status("qemu-img", args)
}

/// The image `img.<fmt>` qemu made, with data in some blocks, and `new.raw`: the disk after
/// the command (data across allocated and unallocated blocks, zero runs, untouched ranges).
fn setup(dir: &Path, fmt: &str) {
    let img = dir.join(format!("img.{fmt}"));
    common::qemu_create(&img, fmt, "", None, SIZE);
    let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    common::qemu_io(
        &img,
        fmt,
        &w(&[
            "write -P 0x11 0 64k",
            "write -P 0x22 3M 1M",
            "write -P 0x33 9M 100k",
        ]),
    );
    let new = dir.join("new.raw");
    let view = dir.join("view.raw");
    common::run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", p(&img), p(&view)],
    );
    let mut data = std::fs::read(&view).unwrap();
    std::fs::remove_file(&view).unwrap();
    for (i, b) in data.iter_mut().enumerate() {
        let unit = i / (16 * UNIT);
        // Untouched, zeroed and rewritten 64 KiB pieces, in stretches that cross blocks.
        match unit % 23 {
            0..=3 => {}
            4..=6 => *b = 0,
            _ => *b = (unit * 7 % 251 + 1) as u8,
        }
    }
    std::fs::write(&new, data).unwrap();
}

/// The disk as qemu-img reads it, or why it cannot.
fn view(dir: &Path, fmt: &str, prog: &str) -> Result<Vec<u8>, String> {
    let out = dir.join(format!("view-{}.raw", prog.len()));
    let _ = std::fs::remove_file(&out);
    let img = dir.join(format!("img.{fmt}"));
    let (c, o) = common::run_status(prog, &["convert", "-f", fmt, "-O", "raw", p(&img), p(&out)]);
    if c != 0 {
        return Err(format!("{prog} convert exits {c}: {o}"));
    }
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    Ok(v)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `convert -n new.raw img.<fmt>` by `prog`, killed before its `kill`-th write if given.
fn convert_n(dir: &Path, fmt: &str, prog: &str, kill: Option<usize>) -> (bool, i32, String) {
    let img = dir.join(format!("img.{fmt}"));
    let new = dir.join("new.raw");
    let mut cmd = Command::new(prog);
    cmd.args(["convert", "-n", "-f", "raw", "-O", fmt, p(&new), p(&img)]);
    if let Some(n) = kill {
        cmd.env("VIMG_TEST_KILL_AFTER_WRITES", n.to_string());
    }
    let out = cmd.output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    (
        out.status.signal() == Some(9),
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What is wrong with the image in `dir` after a kill.
fn verify(what: &str, dir: &Path, fmt: &str, before: &[u8], after: &[u8]) -> Vec<String> {
    let vimg = env!("CARGO_BIN_EXE_vimg");
    let mut bad = Vec::new();
    let img = dir.join(format!("img.{fmt}"));
    if fmt == "vhdx" {
        // A log the kill left must be replayed before qemu reads the image read-only.
        let (c, o) = qemu_img(&["check", "-r", "all", "-f", fmt, p(&img)]);
        if c != 0 && c != 3 {
            bad.push(format!("{what}: qemu-img check -r all exits {c}: {o}"));
        }
    }
    if fmt != "vpc" {
        let (c, o) = qemu_img(&["check", "-f", fmt, p(&img)]);
        if c != 0 && c != 3 {
            bad.push(format!("{what}: qemu-img check exits {c}: {o}"));
        }
    }
    let (q, v) = match (view(dir, fmt, "qemu-img"), view(dir, fmt, vimg)) {
        (Ok(q), Ok(v)) => (q, v),
        (q, v) => {
            bad.push(format!("{what}: cannot read the image: {q:?} / {v:?}"));
            return bad;
        }
    };
    if q != v {
        bad.push(format!("{what}: vimg and qemu-img read different disks"));
    }
    for (i, unit) in q.chunks(UNIT).enumerate() {
        let r = i * UNIT..(i * UNIT + unit.len());
        if unit != &before[r.clone()] && unit != &after[r] {
            bad.push(format!(
                "{what}: guest bytes at {:#x} read neither as before nor as after",
                i * UNIT
            ));
            break;
        }
    }
    // Finishing the job, by vimg and (on a copy) by qemu-img, gives the whole new disk.
    let again = dir.join("again");
    copy_dir(dir, &again);
    for (d, prog) in [(dir, vimg), (again.as_path(), "qemu-img")] {
        let (_, c, o) = convert_n(d, fmt, prog, None);
        if c != 0 {
            bad.push(format!("{what}: {prog} convert -n again exits {c}: {o}"));
            continue;
        }
        let (c, o) = qemu_img(&[
            "compare",
            "-f",
            fmt,
            "-F",
            "raw",
            p(&d.join(format!("img.{fmt}"))),
            p(&d.join("new.raw")),
        ]);
        if c != 0 {
            bad.push(format!("{what}: after {prog} finished: {o}"));
        }
        if fmt != "vpc" {
            let (c, o) = qemu_img(&["check", "-f", fmt, p(&d.join(format!("img.{fmt}")))]);
            if c != 0 && c != 3 {
                bad.push(format!(
                    "{what}: after {prog} finished, check exits {c}: {o}"
                ));
            }
        }
    }
    bad
}

fn killed_at_every_write(fmt: &str) {
    if !qemu_available(&format!("{fmt} kill")) {
        return;
    }
    let vimg = env!("CARGO_BIN_EXE_vimg");
    let tmp = tempfile::tempdir().unwrap();
    let origin = tmp.path().join("origin");
    std::fs::create_dir_all(&origin).unwrap();
    setup(&origin, fmt);
    let before = view(&origin, fmt, "qemu-img").unwrap();
    let after = std::fs::read(origin.join("new.raw")).unwrap();
    let done = tmp.path().join("done");
    copy_dir(&origin, &done);
    let (killed, code, out) = convert_n(&done, fmt, vimg, None);
    assert!(!killed && code == 0, "{out}");
    assert_eq!(view(&done, fmt, "qemu-img").unwrap(), after);
    let mut failures = Vec::new();
    let mut kills = 0;
    for n in 1..=MAX_POINTS {
        let dir = tmp.path().join(format!("k{n}"));
        copy_dir(&origin, &dir);
        let (killed, code, out) = convert_n(&dir, fmt, vimg, Some(n));
        if !killed {
            assert_eq!(code, 0, "at {n}: {out}");
            break;
        }
        kills += 1;
        failures.extend(verify(
            &format!("{fmt} killed at write {n}"),
            &dir,
            fmt,
            &before,
            &after,
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{fmt}: killed at {kills} points");
    assert!(kills >= 5, "the kill hook stopped it only {kills} times");
    assert!(
        kills < MAX_POINTS,
        "the command was not killed at all of its writes"
    );
    common::assert_no_failures(&failures);
}

#[test]
fn vpc_allocation_killed_at_every_write() {
    killed_at_every_write("vpc");
}

#[test]
fn vdi_allocation_killed_at_every_write() {
    killed_at_every_write("vdi");
}

#[test]
fn vmdk_allocation_killed_at_every_write() {
    killed_at_every_write("vmdk");
}

#[test]
fn vhdx_allocation_killed_at_every_write() {
    killed_at_every_write("vhdx");
}
