//! The corruption corpus (test-images/corrupt/, made by make-corrupt.py): every damaged image
//! goes through `vimg info`, `check`, `check -r all`, `convert` and a write (`convert -n`
//! of a 64 KiB pattern), each a real vimg process under a memory limit (RLIMIT_AS) and a
//! timeout, and each outcome must be the one the manifest gives: a clear one-line error or a
//! success (a repair that qemu-img check then finds clean), never a panic, a signal, a hang or
//! more memory than the bound.
//!
//! Besides the manifest's outcome:
//! - a write that succeeds must read back, and the rest of the disk must read as before;
//! - a write or repair that fails must leave the image as it was, except a write refused in
//!   the middle because it would overwrite metadata: that image must be marked corrupt, as
//!   qemu marks it;
//! - where qemu-img is available, vimg's check verdict (clean, leaks, corrupt, could not check)
//!   must be qemu-img check's, except where the manifest says why they differ (and then they
//!   must differ, so that a stale note is noticed).

use crate::common;

use serde_json::Value;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address space a vimg process may use (it needs well under this for these tiny images).
const ADDRESS_SPACE: u64 = 1 << 30;
/// Peak resident memory a vimg process may reach.
const MAX_RSS_KIB: i64 = 200 << 10;
/// Longest a vimg command may take on one of these images.
const TIMEOUT: Duration = Duration::from_secs(20);

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test-images/corrupt")
}

/// How a bounded vimg run ended.
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    output: String,
    peak_kib: i64,
    took: Duration,
}

/// Runs vimg with `args` in `dir` under [`ADDRESS_SPACE`] and [`TIMEOUT`], measuring its peak
/// resident memory. The child is reaped with wait4 (for its resource usage), not `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_bounded(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vimg"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: ADDRESS_SPACE,
                rlim_max: ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("cannot run vimg");
    let pid = child.id() as libc::pid_t;
    let mut pipes = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    let readers: Vec<_> = pipes
        .iter_mut()
        .map(|p| {
            let mut p = p.take().unwrap();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = p.read_to_string(&mut s);
                s
            })
        })
        .collect();
    let mut status = 0;
    // SAFETY: plain-old-data struct filled in by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid for writes; `pid` is our own child, which
        // nothing else reaps (the `Child` is never waited on).
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert!(r == 0, "wait4 failed");
        if start.elapsed() > TIMEOUT {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut usage);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = start.elapsed();
    let output = readers
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect::<Vec<_>>()
        .join("");
    let exited = libc::WIFEXITED(status);
    Run {
        code: exited.then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        output,
        peak_kib: usage.ru_maxrss,
        took,
    }
}

/// The manifest's expectation for a string-valued operation: "ok", "error" or "error:TEXT".
fn expect_outcome(what: &str, want: &Value, run: &Run) -> Result<(), String> {
    let want = want
        .as_str()
        .ok_or(format!("{what}: bad expectation {want}"))?;
    match want.strip_prefix("error") {
        None if want == "ok" => {
            if run.code != Some(0) {
                return Err(format!(
                    "{what}: expected success, got exit {:?}: {}",
                    run.code, run.output
                ));
            }
        }
        Some(rest) => {
            expect_error(what, run)?;
            let text = rest.strip_prefix(':').unwrap_or("");
            if !run.output.contains(text) {
                return Err(format!(
                    "{what}: error should mention '{text}': {}",
                    run.output
                ));
            }
        }
        None => return Err(format!("{what}: bad expectation {want}")),
    }
    Ok(())
}

/// A failure must be exit 1 with one line starting "vimg: " naming the image.
fn expect_error(what: &str, run: &Run) -> Result<(), String> {
    let lines: Vec<&str> = run
        .output
        .lines()
        .filter(|l| l.starts_with("vimg: "))
        .collect();
    if run.code != Some(1) || lines.len() != 1 {
        return Err(format!(
            "{what}: expected one 'vimg:' error line and exit 1, got exit {:?}: {}",
            run.code, run.output
        ));
    }
    Ok(())
}

/// An exit-code expectation (check, repair), or "error:TEXT" for a command that cannot open
/// the image (exit 1 with that message).
fn expect_code(what: &str, want: &Value, run: &Run) -> Result<(), String> {
    if let Some(n) = want.as_i64() {
        if run.code != Some(n as i32) {
            return Err(format!(
                "{what}: expected exit {n}, got {:?}: {}",
                run.code, run.output
            ));
        }
        return Ok(());
    }
    expect_outcome(what, want, run)
}

/// qemu-img check's verdict classes.
fn class(code: i32) -> &'static str {
    match code {
        0 => "clean",
        2 => "corrupt",
        3 => "leaks",
        _ => "could not check",
    }
}

fn read_raw_via_vimg(dir: &Path, img: &str, out: &str) -> Option<Vec<u8>> {
    let r = run_bounded(dir, &["convert", "-O", "raw", img, out]);
    (r.code == Some(0)).then(|| std::fs::read(dir.join(out)).unwrap())
}

/// What a test compares of an image file: its length and its first 16 MiB (the extended
/// images are sparse terabytes; everything past their committed bytes is a hole).
fn contents(path: &Path) -> (u64, Vec<u8>) {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut head = Vec::new();
    f.take(16 << 20).read_to_end(&mut head).unwrap();
    (len, head)
}

/// Records a failed expectation.
fn note(problems: &mut Vec<String>, name: &str, r: Result<(), String>) {
    if let Err(m) = r {
        problems.push(format!("{name}: {m}"));
    }
}

/// Runs one manifest entry in a fresh directory; returns what went wrong.
fn run_entry(e: &Value, qemu: bool, peak: &mut i64) -> Vec<String> {
    let name = e["name"].as_str().unwrap();
    let file = e["file"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut files = vec![file.to_string()];
    if let Some(extra) = e["extra"].as_array() {
        files.extend(extra.iter().map(|x| x.as_str().unwrap().to_string()));
    }
    for f in &files {
        std::fs::copy(corpus_dir().join(f), d.join(f)).unwrap();
    }
    // A copy of the image as the entry describes it (sparse-extended where it says so).
    let fresh = |to: &str| {
        std::fs::copy(corpus_dir().join(file), d.join(to)).unwrap();
        if let Some(len) = e["extend_to"].as_u64() {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join(to))
                .unwrap()
                .set_len(len)
                .unwrap();
        }
    };
    fresh(file);
    std::fs::write(d.join("pattern.raw"), vec![0x5au8; 65536]).unwrap();
    let original = contents(&d.join(file));
    let exp = &e["expect"];
    let mut problems = Vec::new();
    let mut bounded = |args: &[&str]| {
        let r = run_bounded(d, args);
        *peak = (*peak).max(r.peak_kib);
        let mut bad = Vec::new();
        if let Some(s) = r.signal {
            bad.push(format!("vimg {args:?} died of signal {s}: {}", r.output));
        }
        if r.took > TIMEOUT {
            bad.push(format!("vimg {args:?} hung (killed after {:?})", r.took));
        }
        if r.peak_kib > MAX_RSS_KIB {
            bad.push(format!("vimg {args:?} used {} KiB", r.peak_kib));
        }
        if r.output.contains("panicked") {
            bad.push(format!("vimg {args:?} panicked: {}", r.output));
        }
        (r, bad)
    };

    let (r, bad) = bounded(&["info", file]);
    problems.extend(bad.into_iter().map(|b| format!("{name}: {b}")));
    note(
        &mut problems,
        name,
        expect_outcome("info", &exp["info"], &r),
    );

    let (r, bad) = bounded(&["check", file]);
    problems.extend(bad.into_iter().map(|b| format!("{name}: {b}")));
    note(&mut problems, name, expect_code("check", &exp["check"], &r));
    let vimg_check = r.code.unwrap_or(-1);

    let qemu_hangs = e["qemu"]["check_exit"].as_i64() == Some(124);
    if qemu && !qemu_hangs {
        let (q, out) = common::run_status("qemu-img", &["check", d.join(file).to_str().unwrap()]);
        let same = class(q) == class(vimg_check);
        match e.get("verdict_differs") {
            None if !same => problems.push(format!(
                "{name}: vimg check says {} (exit {vimg_check}), qemu-img check says {} (exit {q}): {out}",
                class(vimg_check),
                class(q)
            )),
            Some(why) if same => problems.push(format!(
                "{name}: verdicts agree now ({}); drop the note '{why}'",
                class(q)
            )),
            _ => {}
        }
    }
    assert!(
        contents(&d.join(file)) == original,
        "{name}: read-only commands changed the image"
    );

    // The repair, on a copy.
    fresh("repair.qcow2");
    let (r, bad) = bounded(&["check", "-r", "all", "repair.qcow2"]);
    problems.extend(bad.into_iter().map(|b| format!("{name}: {b}")));
    note(
        &mut problems,
        name,
        expect_code("check -r all", &exp["repair"], &r),
    );
    if r.code == Some(0) && qemu && !qemu_hangs {
        let (q, out) = common::run_status(
            "qemu-img",
            &["check", d.join("repair.qcow2").to_str().unwrap()],
        );
        if q != 0 {
            problems.push(format!(
                "{name}: repaired, but qemu-img check exits {q}: {out}"
            ));
        }
    }
    if r.code == Some(1) && contents(&d.join("repair.qcow2")) != original {
        problems.push(format!(
            "{name}: a repair that failed changed the image: {}",
            r.output
        ));
    }

    let (r, bad) = bounded(&["convert", "-O", "raw", file, "before.raw"]);
    problems.extend(bad.into_iter().map(|b| format!("{name}: {b}")));
    note(
        &mut problems,
        name,
        expect_outcome("convert", &exp["convert"], &r),
    );
    let before = (r.code == Some(0)).then(|| std::fs::read(d.join("before.raw")).unwrap());

    // The write, on a copy.
    fresh("write.qcow2");
    let (r, bad) = bounded(&["convert", "-n", "-O", "qcow2", "pattern.raw", "write.qcow2"]);
    problems.extend(bad.into_iter().map(|b| format!("{name}: {b}")));
    note(
        &mut problems,
        name,
        expect_outcome("write", &exp["write"], &r),
    );
    let after = contents(&d.join("write.qcow2"));
    if r.code == Some(0) {
        match read_raw_via_vimg(d, "write.qcow2", "after.raw") {
            None => problems.push(format!("{name}: the written image cannot be read back")),
            Some(got) => {
                if got[..65536] != [0x5a; 65536][..] {
                    problems.push(format!("{name}: the write does not read back"));
                }
                if let Some(b) = &before {
                    if got.len() != b.len() || got[65536..] != b[65536..] {
                        problems.push(format!("{name}: the write changed data outside its range"));
                    }
                }
            }
        }
    } else if r.output.contains("refusing a data write") {
        // Refused in the middle of the copy, as qemu refuses a write that would overwrite
        // metadata: what was written before stays, and the image must be marked corrupt.
        if after.1.len() < 80 || after.1[79] & 2 == 0 {
            problems.push(format!(
                "{name}: a write refused as corrupting is not marked corrupt"
            ));
        }
    } else if after != original {
        // Refused at open: untouched.
        problems.push(format!(
            "{name}: a refused write changed the image: {}",
            r.output
        ));
    }
    problems
}

#[test]
fn every_damaged_image_gets_a_clear_error_or_a_repair_within_bounds() {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(corpus_dir().join("manifest.json")).expect("manifest.json"),
    )
    .unwrap();
    let entries = manifest["images"].as_array().unwrap();
    assert!(
        entries.len() >= 40,
        "the corpus has only {} images",
        entries.len()
    );
    let qemu = common::qemu_available("corruption_corpus");
    let start = Instant::now();
    let mut peak = 0;
    let mut problems = Vec::new();
    for e in entries {
        problems.extend(run_entry(e, qemu, &mut peak));
    }
    eprintln!(
        "corruption_corpus: {} images in {:.1} s, peak RSS of a vimg process {} KiB",
        entries.len(),
        start.elapsed().as_secs_f64(),
        peak
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
