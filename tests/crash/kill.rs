//! Crash tests with real processes: vimg is killed with SIGKILL in the middle of convert,
//! resize, snapshot create and delete, check -r, amend, commit and rebase, at every point where it changes a file
//! (and, in a second test, after random delays from outside), and afterwards:
//!
//! - `qemu-img check` finds no corruption in any image the command touched (leaks are
//!   allowed; an image left dirty by lazy refcounts must be one `qemu-img check -r all`
//!   repairs; a snapshot killed between its refcount increments and its COPIED flag updates
//!   may leave COPIED flags set on leaked clusters, which qemu counts as errors and
//!   `check -r leaks` fixes: no cluster is ever used more than its refcount says, see
//!   [`only_stale_copied_flags`]);
//! - every 64 KiB block of the guest disk reads either as before the command or as after it
//!   (the images were complete and flushed before it started: nothing else may appear), and
//!   every internal snapshot that exists before and after still reads as before;
//! - a new output (convert) either does not exist under its name or is complete.
//!
//! The kill points come from `VIMG_TEST_KILL_AFTER_WRITES=N` (see `vimg::storage`): the vimg
//! process kills itself just before its N-th change to a file; N runs from 1 until the command
//! finishes without reaching it.
//!
//! A scenario is one line in [`scenarios`]: a setup that makes the images with qemu's tools and
//! the vimg command line, `{name}` standing for a file of the setup. Another command is one more
//! line, e.g. `sc("commit -d", setup_chain, &["commit", "-d", "{top}"])`.

use crate::common;
use crate::common::header_fields;

use common::{qemu_available, run, run_status};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Guest bytes compared at a time: a block reads wholly as before or wholly as after.
const BLOCK: usize = 65536;
/// Most kill points tried per scenario.
const MAX_POINTS: usize = 80;

/// Images a scenario made, by name (`{name}` in its command line is replaced by the path).
/// The ones listed in `checked` are verified after each kill; a checked file that does not
/// exist yet is a new output.
struct Setup {
    files: BTreeMap<&'static str, PathBuf>,
    checked: Vec<&'static str>,
}

struct Scenario {
    name: &'static str,
    setup: fn(&Path) -> Setup,
    args: &'static [&'static str],
}

fn sc(name: &'static str, setup: fn(&Path) -> Setup, args: &'static [&'static str]) -> Scenario {
    Scenario { name, setup, args }
}

/// Every crash scenario, one line each. Commit and rebase are added here (see the module
/// documentation).
#[rustfmt::skip]
fn scenarios() -> Vec<Scenario> {
    vec![
        sc("convert", setup_chain, &["convert", "-O", "qcow2", "{top}", "{out}"]),
        sc("convert -n", setup_target, &["convert", "-n", "-O", "qcow2", "{img}", "{target}"]),
        sc("resize grow", setup_image, &["resize", "{img}", "+3M"]),
        sc("resize shrink", setup_image, &["resize", "--shrink", "{img}", "2M"]),
        sc("snapshot create", setup_image, &["snapshot", "-c", "s1", "{img}"]),
        sc("snapshot delete", setup_snapshots, &["snapshot", "-d", "s0", "{img}"]),
        sc("check -r all", setup_dirty, &["check", "-r", "all", "{img}"]),
        sc("amend", setup_snapshots, &["amend", "-o", "refcount_bits=8", "{img}"]),
        sc("commit", setup_chain, &["commit", "{top}"]),
        sc("rebase", setup_rebase, &["rebase", "-b", "base2.qcow2", "-F", "qcow2", "{top}"]),
    ]
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs qemu-io commands on `path`.
fn io(path: &Path, cmds: &[&str]) {
    common::qemu_io(
        path,
        "qcow2",
        &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    );
}

/// A 4 MiB qcow2 image with data, a compressed cluster and zeros, 64 KiB clusters.
fn data_image(path: &Path) {
    common::qemu_create(path, "qcow2", "", None, 4 << 20);
    io(
        path,
        &[
            "write -P 0x11 0 256k",
            "write -P 0x22 1M 64k",
            "write -c -P 0x33 2M 64k",
            "write -z 3M 64k",
            "write -P 0x44 3584k 512k",
        ],
    );
}

fn setup_image(dir: &Path) -> Setup {
    let img = dir.join("img.qcow2");
    data_image(&img);
    Setup {
        files: BTreeMap::from([("img", img)]),
        checked: vec!["img"],
    }
}

fn setup_snapshots(dir: &Path) -> Setup {
    let st = setup_image(dir);
    let img = &st.files["img"];
    run("qemu-img", &["snapshot", "-c", "s0", s(img)]);
    io(img, &["write -P 0x55 0 128k", "write -P 0x66 2M 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", s(img)]);
    io(img, &["write -P 0x77 64k 64k"]);
    st
}

/// base.qcow2 (data) <- top.qcow2 (other data over part of it); `out` is a new file.
fn setup_chain(dir: &Path) -> Setup {
    let base = dir.join("base.qcow2");
    data_image(&base);
    let top = dir.join("top.qcow2");
    // A relative backing name, so that each kill point's copy of the directory is self-contained.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "4M",
        ],
    );
    io(&top, &["write -P 0x99 128k 256k", "write -z 3584k 64k"]);
    Setup {
        files: BTreeMap::from([("base", base), ("top", top), ("out", dir.join("out.qcow2"))]),
        checked: vec!["out", "base", "top"],
    }
}

/// [`setup_chain`] and base2.qcow2, other data: the new backing file of a rebase.
fn setup_rebase(dir: &Path) -> Setup {
    let mut st = setup_chain(dir);
    let base2 = dir.join("base2.qcow2");
    common::qemu_create(&base2, "qcow2", "", None, 4 << 20);
    io(&base2, &["write -P 0xb2 0 1M", "write -P 0xb3 2M 1M"]);
    st.files.insert("base2", base2);
    st.checked = vec!["top", "base", "base2"];
    st
}

/// img.qcow2 (data) and target.qcow2, an existing image with other data, written in place.
fn setup_target(dir: &Path) -> Setup {
    let mut st = setup_image(dir);
    let target = dir.join("target.qcow2");
    common::qemu_create(&target, "qcow2", "", None, 4 << 20);
    io(&target, &["write -P 0xee 0 4M"]);
    st.files.insert("target", target);
    st.checked = vec!["target", "img"];
    st
}

/// An image with lazy refcounts left dirty by a killed qemu-io: refcounts on disk are stale.
fn setup_dirty(dir: &Path) -> Setup {
    let img = dir.join("img.qcow2");
    common::qemu_create(&img, "qcow2", "lazy_refcounts=on", None, 4 << 20);
    let (code, out) = run_status(
        "qemu-io",
        &[
            "-c",
            "write -P 0x31 0 512k",
            "-c",
            "write -P 0x32 2M 128k",
            "-c",
            "sigraise 9",
            s(&img),
        ],
    );
    assert!(code != 0 && out.contains("wrote"), "qemu-io: {out}");
    assert!(is_dirty(&img), "the image should be dirty");
    Setup {
        files: BTreeMap::from([("img", img)]),
        checked: vec!["img"],
    }
}

fn is_dirty(img: &Path) -> bool {
    let field = header_fields::INCOMPATIBLE_FEATURES;
    std::fs::read(img)
        .is_ok_and(|b| b.len() >= (field + 8) as usize && common::header_u64(&b, field) & 1 != 0)
}

/// What one image looks like to qemu: its guest data and that of each internal snapshot.
#[derive(Clone, PartialEq)]
struct View {
    active: Vec<u8>,
    snapshots: BTreeMap<String, Vec<u8>>,
}

fn read_raw(img: &Path, snapshot: Option<&str>, scratch: &Path) -> Vec<u8> {
    let out = scratch.join("view.raw");
    let mut args = vec!["convert".to_string()];
    if let Some(n) = snapshot {
        args.extend(["-l".to_string(), format!("snapshot.name={n}")]);
    }
    args.extend(["-O", "raw", s(img), s(&out)].map(String::from));
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    run("qemu-img", &a);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    v
}

fn view(img: &Path, scratch: &Path) -> View {
    let info = run("qemu-img", &["info", "-U", "--output=json", s(img)]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let mut snapshots = BTreeMap::new();
    for sn in info["snapshots"].as_array().into_iter().flatten() {
        let name = sn["name"].as_str().unwrap().to_string();
        let data = read_raw(img, Some(&name), scratch);
        snapshots.insert(name, data);
    }
    View {
        active: read_raw(img, None, scratch),
        snapshots,
    }
}

/// Copies every file of `from` into `to` (a fresh directory).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn command_line(sc: &Scenario, files: &BTreeMap<&'static str, PathBuf>, dir: &Path) -> Vec<String> {
    sc.args
        .iter()
        .map(
            |a| match a.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                Some(k) => s(&dir.join(files[k].file_name().unwrap())).to_string(),
                None => a.to_string(),
            },
        )
        .collect()
}

/// How a vimg run with the kill hook ended: killed (true) or finished (exit code).
fn run_vimg(args: &[String], kill_after: Option<usize>) -> (bool, i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vimg"));
    cmd.args(args);
    if let Some(n) = kill_after {
        cmd.env("VIMG_TEST_KILL_AFTER_WRITES", n.to_string());
    }
    let out = cmd.output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    let killed = out.status.signal() == Some(9);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (killed, out.status.code().unwrap_or(-1), text)
}

/// Checks the state a killed command left in `dir` against `before` and `after` (None: the
/// file did not exist). Returns what is wrong.
fn verify(what: &str, dir: &Path, checked: &[(String, Option<View>, Option<View>)]) -> Vec<String> {
    let mut bad = Vec::new();
    for (name, before, after) in checked {
        let img = dir.join(name);
        if !img.exists() {
            if before.is_some() && after.is_some() {
                bad.push(format!("{what}: {name} disappeared"));
            }
            continue;
        }
        // A new output only appears complete.
        let Some(before) = before else {
            match after {
                Some(a) if view(&img, dir) == *a => {}
                _ => bad.push(format!(
                    "{what}: {name} exists but is not the finished output"
                )),
            }
            continue;
        };
        let subject = if is_dirty(&img) {
            // Lazy refcounts in flight: must be repairable.
            let copy = dir.join(format!("{name}.repaired"));
            std::fs::copy(&img, &copy).unwrap();
            let (code, out) = run_status("qemu-img", &["check", "-r", "all", s(&copy)]);
            if code != 0 {
                bad.push(format!(
                    "{what}: {name} is dirty and qemu-img check -r all exits {code}: {out}"
                ));
                continue;
            }
            copy
        } else {
            let (code, out) = run_status("qemu-img", &["check", s(&img)]);
            if code == 2 && only_stale_copied_flags(&out) {
                // Killed between the refcount increments and the COPIED flag updates of a
                // snapshot (qemu leaves the same state): `check -r leaks` must make it clean.
                let copy = dir.join(format!("{name}.repaired"));
                std::fs::copy(&img, &copy).unwrap();
                let (code, out) = run_status("qemu-img", &["check", "-r", "leaks", s(&copy)]);
                if code != 0 {
                    bad.push(format!(
                        "{what}: {name}: check -r leaks exits {code}: {out}"
                    ));
                    continue;
                }
            } else if code != 0 && code != 3 {
                bad.push(format!("{what}: qemu-img check {name} exits {code}: {out}"));
                continue;
            }
            img.clone()
        };
        let now = view(&subject, dir);
        let after = after.as_ref().unwrap_or(before);
        let len = now.active.len();
        if len != before.active.len() && len != after.active.len() {
            bad.push(format!(
                "{what}: {name} has virtual size {len}, neither before nor after"
            ));
            continue;
        }
        for (i, block) in now.active.chunks(BLOCK).enumerate() {
            let at = |v: &View| {
                let s = i * BLOCK;
                let mut b = v
                    .active
                    .get(s..(s + block.len()).min(v.active.len()))
                    .unwrap_or(&[])
                    .to_vec();
                b.resize(block.len(), 0);
                b
            };
            if block != at(before).as_slice() && block != at(after).as_slice() {
                bad.push(format!(
                    "{what}: {name}: guest block at {:#x} reads neither as before nor as after",
                    i * BLOCK
                ));
                break;
            }
        }
        for (snap, data) in &before.snapshots {
            if after.snapshots.contains_key(snap) {
                match now.snapshots.get(snap) {
                    Some(d) if d == data => {}
                    Some(_) => bad.push(format!("{what}: {name}: snapshot {snap} changed")),
                    None => bad.push(format!("{what}: {name}: snapshot {snap} is gone")),
                }
            }
        }
    }
    bad
}

/// Whether every error in a `qemu-img check` report is a COPIED flag still set on a cluster
/// whose refcount is higher than its references (a leak the same report lists): no cluster
/// is used more than its refcount says, so nothing can be overwritten, and freeing the leak
/// makes the flag right again. Any other error (a refcount too low above all) is corruption.
fn only_stale_copied_flags(report: &str) -> bool {
    let leaked: std::collections::HashSet<u64> = report
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Leaked cluster ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let mut errors = 0;
    for l in report.lines().filter(|l| l.starts_with("ERROR")) {
        errors += 1;
        let entry = l
            .split(' ')
            .find_map(|w| {
                w.strip_prefix("l2_entry=")
                    .or_else(|| w.strip_prefix("l1_entry="))
            })
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        let stale = l.starts_with("ERROR OFLAG_COPIED")
            && l.ends_with("refcount=2")
            // Every image here has 64 KiB clusters: the cluster index is the offset >> 16.
            && entry.is_some_and(|e| leaked.contains(&((e & 0x00ff_ffff_ffff_fe00) >> 16)));
        if !stale {
            return false;
        }
    }
    errors > 0
}

/// The kill points to try: every one up to 40, then growing steps, up to MAX_POINTS.
fn kill_points() -> impl Iterator<Item = usize> {
    let mut n = 0usize;
    std::iter::from_fn(move || {
        n = if n < 40 { n + 1 } else { n + n / 6 };
        Some(n)
    })
    .take(MAX_POINTS)
}

#[test]
fn killed_at_every_write_vimg_leaves_images_qemu_accepts() {
    if !qemu_available("kill") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut problems = Vec::new();
    let mut summary = Vec::new();
    for sc in scenarios() {
        let pristine = root
            .path()
            .join(format!("{}-pristine", sc.name.replace(' ', "_")));
        std::fs::create_dir_all(&pristine).unwrap();
        let setup = (sc.setup)(&pristine);
        // Before, and after a run to completion.
        let done = root
            .path()
            .join(format!("{}-done", sc.name.replace(' ', "_")));
        copy_dir(&pristine, &done);
        let (killed, code, out) = run_vimg(&command_line(&sc, &setup.files, &done), None);
        assert!(
            !killed && code == 0,
            "{}: vimg fails without a kill: {out}",
            sc.name
        );
        let states: Vec<(String, Option<View>, Option<View>)> = setup
            .checked
            .iter()
            .map(|k| {
                let file = setup.files[k]
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                let b = pristine.join(&file);
                let a = done.join(&file);
                let before = b.exists().then(|| view(&b, &pristine));
                let after = a.exists().then(|| view(&a, &done));
                (file, before, after)
            })
            .collect();
        let mut points = 0;
        let mut finished = false;
        for n in kill_points() {
            let dir = root
                .path()
                .join(format!("{}-{n}", sc.name.replace(' ', "_")));
            copy_dir(&pristine, &dir);
            let (killed, code, out) = run_vimg(&command_line(&sc, &setup.files, &dir), Some(n));
            if !killed {
                assert_eq!(code, 0, "{}: N={n}: vimg failed: {out}", sc.name);
                finished = true;
                std::fs::remove_dir_all(&dir).ok();
                break;
            }
            points += 1;
            problems.extend(verify(
                &format!("{} killed before write {n}", sc.name),
                &dir,
                &states,
            ));
            std::fs::remove_dir_all(&dir).ok();
        }
        assert!(points > 0, "{}: the kill hook never fired", sc.name);
        summary.push(format!(
            "{}: {points} kill points{}",
            sc.name,
            if finished { "" } else { " (more not tried)" }
        ));
    }
    eprintln!(
        "kill: {} in {:.1} s",
        summary.join(", "),
        start.elapsed().as_secs_f64()
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// SIGKILL from outside at random moments of a long convert: the output is absent or complete,
/// partial outputs are only ever left under vimg's temporary names, the source is untouched.
#[test]
fn killed_from_outside_a_convert_leaves_no_partial_output() {
    if !qemu_available("kill") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    common::qemu_create(&src, "qcow2", "", None, 96 << 20);
    let mut rng = common::Rng::seeded(0x6b696c6c);
    // Incompressible data, so that the copy takes a while.
    let raw = dir.path().join("data.raw");
    let mut data = vec![0u8; 96 << 20];
    for w in data.chunks_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    std::fs::write(&raw, &data).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&src),
        ],
    );
    let out = dir.path().join("out.qcow2");
    let args = |o: &Path| {
        vec![
            "convert".to_string(),
            "-t".into(),
            "writeback".into(),
            "-O".into(),
            "qcow2".into(),
            s(&src).into(),
            s(o).into(),
        ]
    };
    let t0 = Instant::now();
    let (_, code, text) = run_vimg(&args(&dir.path().join("full.qcow2")), None);
    assert_eq!(code, 0, "{text}");
    let full = t0.elapsed();
    std::fs::remove_file(dir.path().join("full.qcow2")).unwrap();
    let mut complete = 0;
    for i in 0..6u32 {
        let delay = full.mul_f64(f64::from(i) / 6.0 + (rng.below(100) as f64) / 1200.0);
        let mut child = Command::new(env!("CARGO_BIN_EXE_vimg"))
            .args(args(&out))
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        if out.exists() {
            let (c, o) = run_status("qemu-img", &["compare", s(&src), s(&out)]);
            assert_eq!(
                c, 0,
                "kill after {delay:?}: the output exists but differs: {o}"
            );
            complete += 1;
            std::fs::remove_file(&out).unwrap();
        }
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(
                ["src.qcow2", "data.raw"].contains(&n.as_str())
                    || n.starts_with(".out.qcow2.vimg-"),
                "kill after {delay:?}: unexpected file {n}"
            );
            if n.starts_with(".out.qcow2.vimg-") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    let (c, o) = run_status("qemu-img", &["check", s(&src)]);
    assert_eq!(c, 0, "the source was damaged: {o}");
    assert_eq!(read_raw(&src, None, dir.path()), data, "the source changed");
    eprintln!("kill: {complete} of 6 outside kills came after the convert finished ({full:?} for a full run)");
}
