//! Crash safety of commit and rebase. Storage wrappers sharing one write counter fail (or
//! silently drop) every write after the Nth, across all the files the operation changes; for
//! every N, the files left behind must open, `qemu-img check` must find no corruption (leaks
//! are allowed), and the data must read as before or after:
//!
//! - commit: the top reads exactly as before the commit; every byte of the base reads as it
//!   did or as the top did (the commit's data); running the commit again completes it;
//! - rebase: the header names the old or the new backing file, and the image reads as before
//!   through whichever it names.
//!
//! With lazy refcounts a crashed image may be left dirty (refcounts on disk stale, which
//! qemu-img check alone would report): it must read correctly as it is, and be clean after
//! vimg's read-write open repaired it.

use crate::common;
use crate::common::header_fields;

use common::chain::{self, Layer};
use common::crashing::{Crashing, Mode};
use common::{qemu_available, qemu_io, Rng};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vimg::ops::commit::{commit_images, find_base, CommitJob};
use vimg::ops::rebase::{rebase_image, NewBacking};
use vimg::qcow2::Qcow2Image;
use vimg::raw::RawImage;
use vimg::storage::FileStorage;
use vimg::{BlockImage, GuestOffset, ImageFormat};

/// A scratch directory in memory where possible (syncs cost nothing there).
fn scratch(name: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let d = root.join(format!("vimg-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The guest contents of the image at `path` read through its chain by vimg.
fn contents(path: &Path) -> Result<Vec<u8>, String> {
    let img = vimg::open::open_image(path, &Default::default())
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut v, GuestOffset(0))
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(v)
}

/// Whether the qcow2 header at `path` has the dirty bit set.
fn dirty(path: &Path) -> bool {
    let h = std::fs::read(path).unwrap();
    common::header_u32(&h, header_fields::VERSION) == 3
        && common::header_u64(&h, header_fields::INCOMPATIBLE_FEATURES) & 1 != 0
}

/// `qemu-img check` of a qcow2 file vimg changed: no corruption (exit 0 or 3). A dirty image
/// (lazy refcounts) must read as `expect` says first, then be repaired by a read-write open.
fn check_written(path: &Path, what: &str) -> Result<(), String> {
    if dirty(path) {
        let img = Qcow2Image::open(path, true, true, &mut vimg::open::ChainGuard::default())
            .map_err(|e| format!("{what}: repairing open of {}: {e}", path.display()))?;
        img.close().map_err(|e| format!("{what}: close: {e}"))?;
    }
    let (code, out) = chain::check(path);
    if code != 0 && code != 3 {
        return Err(format!(
            "{what}: qemu-img check {} exit {code}: {out}",
            path.display()
        ));
    }
    Ok(())
}

/// One crash experiment: the write counter all its storage shares, and whether it crashed.
struct Crash {
    limit: u64,
    mode: Mode,
    writes: Arc<AtomicU64>,
    crashed: Arc<AtomicBool>,
}

impl Crash {
    fn new(limit: u64, mode: Mode) -> Self {
        Crash {
            limit,
            mode,
            writes: Arc::new(AtomicU64::new(0)),
            crashed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Crashing storage over the file at `path`.
    fn storage(&self, path: &Path) -> Box<Crashing> {
        Box::new(Crashing::shared(
            FileStorage::open(path, true).unwrap(),
            self.limit,
            self.mode,
            &self.writes,
            &self.crashed,
        ))
    }

    /// The qcow2 image at `path` over crashing storage, with its backing chain.
    fn qcow2(&self, path: &Path, writable: bool) -> Result<Qcow2Image, String> {
        Qcow2Image::open_storage(
            self.storage(path),
            path,
            writable,
            false,
            &mut vimg::open::ChainGuard::default(),
        )
        .map_err(|e| format!("open {}: {e}", path.display()))
    }

    /// The writes made, after checking that an operation did not succeed despite failed writes.
    fn finish(&self, ok: bool) -> Result<u64, String> {
        if ok && self.crashed.load(Ordering::SeqCst) && matches!(self.mode, Mode::Fail) {
            return Err("the operation succeeded although writes failed".into());
        }
        Ok(self.writes.load(Ordering::SeqCst))
    }
}

/// A commit scenario: a chain in `pristine`, the top's name, and `-b` (None: into the backing
/// file, emptying the top).
struct CommitCase {
    name: &'static str,
    layers: Vec<Layer>,
    base: Option<usize>,
}

/// Runs the commit of `case` in `dir` (a copy of the pristine chain) with writes failing or
/// dropped after `limit`; returns the number of writes it made.
fn crashed_commit(dir: &Path, case: &CommitCase, limit: u64, mode: Mode) -> Result<u64, String> {
    let crash = Crash::new(limit, mode);
    let top_path = dir.join(&case.layers.last().unwrap().name);
    let empty = case.base.is_none();
    let top = crash.qcow2(&top_path, empty)?;
    let base_name = case.base.map(|i| case.layers[i].name.clone());
    let (depth, layer) = find_base(&top, base_name.as_deref()).map_err(|e| e.to_string())?;
    let (base_path, format) = (layer.filename().to_path_buf(), layer.format());
    let base: Box<dyn BlockImage> = if format == ImageFormat::Raw {
        Box::new(
            RawImage::from_storage(crash.storage(&base_path), &base_path, true)
                .map_err(|e| e.to_string())?,
        )
    } else {
        Box::new(crash.qcow2(&base_path, true)?)
    };
    let job = CommitJob {
        depth,
        empty,
        rate_limit: 0,
        syncs: true,
    };
    crash.finish(commit_images(Box::new(top), base, &job, None).is_ok())
}

/// Checks the files a crashed commit left behind (see the module documentation).
fn verify_commit(
    dir: &Path,
    case: &CommitCase,
    top_before: &[u8],
    base_before: &[u8],
    what: &str,
) -> Result<(), String> {
    let top_path = dir.join(&case.layers.last().unwrap().name);
    let base_idx = case.base.unwrap_or(case.layers.len() - 2);
    let base = &case.layers[base_idx];
    let base_path = dir.join(&base.name);
    for l in [case.layers.last().unwrap(), base] {
        if l.is_qcow2() {
            check_written(&dir.join(&l.name), what)?;
        }
    }
    let top_now = contents(&top_path)?;
    if top_now != top_before {
        let i = (0..top_now.len()).find(|&i| top_now[i] != top_before[i]);
        return Err(format!(
            "{what}: the top reads differently (first at {i:?})"
        ));
    }
    let base_now = contents(&base_path)?;
    for (i, &b) in base_now.iter().enumerate() {
        let old = base_before.get(i).copied().unwrap_or(0);
        let new = top_before.get(i).copied();
        if b != old && Some(b) != new {
            return Err(format!(
                "{what}: base byte {i} reads {b:#x}, neither its old {old:#x} nor the top's {new:?}"
            ));
        }
    }
    Ok(())
}

fn commit_cases() -> Vec<CommitCase> {
    let q = |name: &str, size: u64, opts: &str| Layer {
        name: name.into(),
        format: "qcow2",
        size,
        cluster: opts
            .split(',')
            .find_map(|o| o.strip_prefix("cluster_size="))
            .map_or(65536, |c| c.parse().unwrap()),
        opts: opts.into(),
    };
    vec![
        CommitCase {
            name: "qcow2 base, smaller, other cluster size; top emptied",
            layers: vec![
                q("base.qcow2", 1 << 20, "cluster_size=4096"),
                q("top.qcow2", 3 << 19, "cluster_size=65536"),
            ],
            base: None,
        },
        CommitCase {
            name: "raw base, smaller; top emptied",
            layers: vec![
                Layer {
                    name: "base.raw".into(),
                    format: "raw",
                    size: 1 << 20,
                    cluster: 512,
                    opts: String::new(),
                },
                q("top.qcow2", 2 << 20, "cluster_size=65536,extended_l2=on"),
            ],
            base: None,
        },
        CommitCase {
            name: "-b into a v2 base two layers down",
            layers: vec![
                q("base.qcow2", 2 << 20, "cluster_size=65536,compat=0.10"),
                q("mid.qcow2", 1 << 20, "cluster_size=16384"),
                q("top.qcow2", 2 << 20, "cluster_size=65536"),
            ],
            base: Some(0),
        },
        CommitCase {
            name: "lazy refcounts",
            layers: vec![
                q(
                    "base.qcow2",
                    2 << 20,
                    "cluster_size=65536,lazy_refcounts=on",
                ),
                q("top.qcow2", 2 << 20, "cluster_size=65536,lazy_refcounts=on"),
            ],
            base: None,
        },
    ]
}

#[test]
fn interrupted_commits_never_corrupt() {
    if !qemu_available("commit_rebase_crash") {
        return;
    }
    let root = scratch("commit");
    let mut failures = Vec::new();
    for (ci, case) in commit_cases().iter().enumerate() {
        let t0 = std::time::Instant::now();
        let pristine = root.join(format!("pristine{ci}"));
        std::fs::create_dir_all(&pristine).unwrap();
        let mut rng = Rng::seeded(40 + ci as u64);
        chain::build(&pristine, &case.layers, &mut rng);
        // Data over the whole top, so that there is much to commit, and a snapshot in the top
        // whose clusters emptying must keep.
        let top = case.layers.last().unwrap();
        qemu_io(
            &pristine.join(&top.name),
            "qcow2",
            &[
                format!("write -P 0x5a 0 {}", top.size / 3),
                format!("write -z {} 65536", top.size / 2),
            ],
        );
        if !top.opts.contains("lazy") {
            common::run(
                "qemu-img",
                &[
                    "snapshot",
                    "-c",
                    "s",
                    pristine.join(&top.name).to_str().unwrap(),
                ],
            );
        }
        let top_before = contents(&pristine.join(&top.name)).unwrap();
        let base_idx = case.base.unwrap_or(case.layers.len() - 2);
        let base_before = contents(&pristine.join(&case.layers[base_idx].name)).unwrap();
        let work = root.join("work");
        let fresh = |work: &Path| {
            let _ = std::fs::remove_dir_all(work);
            chain::copy_dir(&pristine, work);
        };
        fresh(&work);
        let total = match crashed_commit(&work, case, u64::MAX, Mode::Fail) {
            Ok(n) => n,
            Err(e) => {
                failures.push(format!("{}: without a crash: {e}", case.name));
                continue;
            }
        };
        // Without a crash: the base reads as the top did.
        if let Err(e) = verify_commit(&work, case, &top_before, &base_before, "complete") {
            failures.push(format!("{}: {e}", case.name));
        }
        let base_now = contents(&work.join(&case.layers[base_idx].name)).unwrap();
        if base_now[..top_before.len()] != top_before[..] {
            failures.push(format!("{}: the base does not read as the top", case.name));
        }
        assert!(total > 4, "{}: only {total} writes", case.name);
        // Long sequences are checked in one mode per crash point, to keep the time in bounds.
        let alternate = total > 100;
        for limit in 0..total {
            for mode in [Mode::Fail, Mode::Drop] {
                if alternate && limit.is_multiple_of(2) != matches!(mode, Mode::Fail) {
                    continue;
                }
                fresh(&work);
                let what = format!("{} N={limit} {mode:?}", case.name);
                let r = crashed_commit(&work, case, limit, mode)
                    .and_then(|_| verify_commit(&work, case, &top_before, &base_before, &what));
                if let Err(e) = r {
                    failures.push(e);
                    continue;
                }
                // Every fifth crash point: the commit run again completes the job.
                if limit % 5 == 0 {
                    let again = crashed_commit(&work, case, u64::MAX, Mode::Fail)
                        .and_then(|_| verify_commit(&work, case, &top_before, &base_before, &what))
                        .and_then(|_| {
                            let b = contents(&work.join(&case.layers[base_idx].name))?;
                            if b[..top_before.len()] == top_before[..] {
                                Ok(())
                            } else {
                                Err(format!("{what}: the repeated commit left the base wrong"))
                            }
                        });
                    if let Err(e) = again {
                        failures.push(format!("{what} (run again): {e}"));
                    }
                }
            }
        }
        eprintln!("{}: {total} writes, {:?}", case.name, t0.elapsed());
    }
    let _ = std::fs::remove_dir_all(&root);
    common::assert_no_failures(&failures);
}

/// A rebase scenario: the files of both chains, the image, its new backing file (None: -b ""),
/// and -c.
struct RebaseCase {
    name: &'static str,
    old: Vec<Layer>,
    new: Vec<Layer>,
    /// Rebase onto this layer of the old chain instead of the new chain's top.
    onto_old: Option<usize>,
    flatten: bool,
    compress: bool,
}

fn crashed_rebase(dir: &Path, case: &RebaseCase, limit: u64, mode: Mode) -> Result<u64, String> {
    let crash = Crash::new(limit, mode);
    let img = crash.qcow2(&dir.join(&case.old.last().unwrap().name), true)?;
    let target = new_target(case);
    let new = match &target {
        Some(l) => Some(
            vimg::open::open_image(&dir.join(&l.name), &Default::default())
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let to = NewBacking {
        image: new.as_deref(),
        name: target.as_ref().map(|l| l.name.as_str()),
        format: target.as_ref().map(|l| l.format),
    };
    crash.finish(rebase_image(Box::new(img), &to, case.compress, None).is_ok())
}

fn new_target(case: &RebaseCase) -> Option<Layer> {
    if case.flatten {
        None
    } else if let Some(i) = case.onto_old {
        Some(case.old[i].clone())
    } else {
        case.new.last().cloned()
    }
}

fn verify_rebase(dir: &Path, case: &RebaseCase, before: &[u8], what: &str) -> Result<(), String> {
    let top = case.old.last().unwrap();
    let top_path = dir.join(&top.name);
    check_written(&top_path, what)?;
    let (_, backing, _) = chain::backing_info(&top_path, "qcow2");
    let old = case.old[case.old.len() - 2].name.clone();
    let new = new_target(case).map(|l| l.name);
    if backing != Some(old.clone()) && backing != new {
        return Err(format!(
            "{what}: backing file {backing:?}, neither {old} nor {new:?}"
        ));
    }
    let now = contents(&top_path)?;
    if now != before {
        let i = (0..now.len()).find(|&i| now[i] != before[i]);
        return Err(format!(
            "{what}: the image reads differently through {backing:?} (first at {i:?})"
        ));
    }
    Ok(())
}

#[test]
fn interrupted_rebases_never_corrupt() {
    if !qemu_available("commit_rebase_crash") {
        return;
    }
    let q = |name: &str, size: u64, cluster: u64, extra: &str| Layer {
        name: name.into(),
        format: "qcow2",
        size,
        cluster,
        opts: format!("cluster_size={cluster}{extra}"),
    };
    let cases = [
        RebaseCase {
            name: "onto an unrelated shorter raw chain",
            old: vec![
                q("a.qcow2", 3 << 20, 4096, ""),
                q("top.qcow2", 2 << 20, 65536, ""),
            ],
            new: vec![Layer {
                name: "n.raw".into(),
                format: "raw",
                size: 1 << 20,
                cluster: 512,
                opts: String::new(),
            }],
            onto_old: None,
            flatten: false,
            compress: false,
        },
        RebaseCase {
            name: "flatten, compressed, extended L2",
            old: vec![
                q("a.qcow2", 2 << 20, 65536, ",compat=0.10"),
                q("top.qcow2", 2 << 20, 65536, ",extended_l2=on"),
            ],
            new: vec![],
            onto_old: None,
            flatten: true,
            compress: true,
        },
        RebaseCase {
            name: "onto a deeper layer, v2 image",
            old: vec![
                q("a.qcow2", 2 << 20, 65536, ""),
                q("b.qcow2", 1 << 20, 2 << 20, ""),
                q("top.qcow2", 2 << 20, 16384, ",compat=0.10"),
            ],
            new: vec![],
            onto_old: Some(0),
            flatten: false,
            compress: false,
        },
        RebaseCase {
            name: "lazy refcounts onto an unrelated chain",
            old: vec![
                q("a.qcow2", 2 << 20, 65536, ""),
                q("top.qcow2", 2 << 20, 65536, ",lazy_refcounts=on"),
            ],
            new: vec![q("n.qcow2", 2 << 20, 4096, "")],
            onto_old: None,
            flatten: false,
            compress: false,
        },
    ];
    let root = scratch("rebase");
    let mut failures = Vec::new();
    for (ci, case) in cases.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let pristine = root.join(format!("pristine{ci}"));
        std::fs::create_dir_all(&pristine).unwrap();
        let mut rng = Rng::seeded(70 + ci as u64);
        chain::build(&pristine, &case.old, &mut rng);
        chain::build(&pristine, &case.new, &mut rng);
        // Plenty that differs: the old backing file full of data.
        let b = &case.old[case.old.len() - 2];
        qemu_io(
            &pristine.join(&b.name),
            b.format,
            &[format!("write -P 0x3c 0 {}", b.size / 2)],
        );
        let top = case.old.last().unwrap();
        let before = contents(&pristine.join(&top.name)).unwrap();
        let work = root.join("work");
        let fresh = |work: &Path| {
            let _ = std::fs::remove_dir_all(work);
            chain::copy_dir(&pristine, work);
        };
        fresh(&work);
        let total = match crashed_rebase(&work, case, u64::MAX, Mode::Fail)
            .and_then(|n| verify_rebase(&work, case, &before, "complete").map(|()| n))
        {
            Ok(n) => n,
            Err(e) => {
                failures.push(format!("{}: without a crash: {e}", case.name));
                continue;
            }
        };
        let (_, backing, _) = chain::backing_info(&work.join(&top.name), "qcow2");
        assert_eq!(backing, new_target(case).map(|l| l.name), "{}", case.name);
        // At the least the copied data, a refcount block, an L2 table and the L1 table (data
        // runs of consecutive clusters go in one write), so that crashes fall between them.
        assert!(total >= 4, "{}: only {total} writes", case.name);
        for limit in 0..total {
            for mode in [Mode::Fail, Mode::Drop] {
                fresh(&work);
                let what = format!("{} N={limit} {mode:?}", case.name);
                if let Err(e) = crashed_rebase(&work, case, limit, mode)
                    .and_then(|_| verify_rebase(&work, case, &before, &what))
                {
                    failures.push(e);
                }
            }
        }
        eprintln!("{}: {total} writes, {:?}", case.name, t0.elapsed());
    }
    let _ = std::fs::remove_dir_all(&root);
    common::assert_no_failures(&failures);
}
