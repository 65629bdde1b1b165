//! Crash safety of the qcow2 write path. A storage wrapper fails (or silently drops) every
//! write after the Nth; for every N over a sequence of writes, zero writes, compressed writes,
//! discards and flushes, the image left behind must open, `qemu-img check` must find no
//! corruption (leaked clusters are allowed: the protocol trades them for safety), and every
//! byte written before the last flush that completed must read back as written, unless a later
//! write touched it.
//!
//! With lazy refcounts the image left behind may be dirty (refcounts on disk stale, which
//! `qemu-img check` alone would report): it must open read-only as it is with the flushed data
//! intact; a read-write open by vimg repairs it, after which `qemu-img check` exits 0 and the
//! flushed data is still intact; and qemu accepts vimg's dirty images too (its read-write open
//! repairs them, checked on a sample of the crash points).

use crate::common;
use crate::common::header_fields;

use common::crashing::{Crashing, Mode};
use common::{qemu_available, qemu_create, qemu_io, run};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vimg::open::ChainGuard;
use vimg::qcow2::compress_cluster;
use vimg::qcow2::Qcow2Image;
use vimg::storage::FileStorage;
use vimg::{BlockImage, GuestOffset};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Compressed(u64, u8),
    Discard(u64, u64),
    Flush,
}

/// A fixed, varied sequence: allocations in new L2 ranges, copy-on-write over qemu's data and
/// compressed clusters, zero writes that unmap, compressed writes, flushes in between.
fn ops(cs: u64) -> Vec<Op> {
    vec![
        Op::Write(1000, 70_000, 0x11),
        Op::Compressed(4 * cs, 0x21),
        Op::Flush,
        Op::Write(3 * cs + 17, 5000, 0x12),
        Op::Zero(0, 2 * cs, true),
        Op::Compressed(5 * cs, 0x22),
        Op::Write(6 << 20, 3 * cs, 0x13), // a new L2 table for small clusters
        Op::Flush,
        Op::Write(4 * cs + 100, 300, 0x14), // copy-on-write of a compressed cluster
        Op::Zero(6 * cs, cs, false),
        Op::Write(14 << 20, 2 * cs, 0x15),
        Op::Discard(cs / 2, 3 * cs), // frees the whole clusters 1 and 2 (written, then zeroed)
        Op::Discard(8 * cs, cs),     // qemu's compressed cluster
        Op::Flush,
        Op::Write(7 * cs, 4 * cs, 0x16),
    ]
}

/// Applies `ops` until one fails; returns the model as of the last completed flush, the set of
/// bytes written after it (not checked), and whether every op succeeded.
fn apply(
    img: &Qcow2Image,
    ops: &[Op],
    size: u64,
    base: &[u8],
    crashed: &AtomicBool,
) -> (Vec<u8>, Vec<bool>) {
    let cs = img.header().cluster_size();
    let mut model = base.to_vec();
    let mut durable = base.to_vec();
    let mut touched = vec![false; size as usize];
    for o in ops {
        let r = match *o {
            Op::Write(off, len, b) => {
                model[off as usize..(off + len) as usize].fill(b);
                touched[off as usize..(off + len) as usize].fill(true);
                img.write_at(&vec![b; len as usize], GuestOffset(off))
            }
            Op::Zero(off, len, unmap) => {
                model[off as usize..(off + len) as usize].fill(0);
                touched[off as usize..(off + len) as usize].fill(true);
                img.write_zeroes(GuestOffset(off), len, unmap)
            }
            Op::Discard(off, len) => {
                // Afterwards the range's contents are not checked (whole clusters read as
                // zeros, partial ones keep theirs).
                touched[off as usize..(off + len) as usize].fill(true);
                let cs = cs as usize;
                let (a, b) = (
                    (off as usize).div_ceil(cs) * cs,
                    (off + len) as usize / cs * cs,
                );
                if a < b {
                    model[a..b].fill(0);
                }
                img.discard(GuestOffset(off), len)
            }
            Op::Compressed(gc, b) => {
                let data: Vec<u8> = (0..cs).map(|i| (i / 32) as u8 ^ b).collect();
                model[gc as usize..(gc + cs) as usize].copy_from_slice(&data);
                touched[gc as usize..(gc + cs) as usize].fill(true);
                let z = compress_cluster(img.header().compression_type, &data)
                    .unwrap()
                    .unwrap();
                img.write_compressed(gc, &z)
            }
            Op::Flush => {
                let r = img.flush();
                // In drop mode a flush "succeeds" after the crash too; only one that completed
                // before any write was lost made the data durable.
                if r.is_ok() && !crashed.load(Ordering::SeqCst) {
                    durable.clone_from(&model);
                    touched.fill(false);
                }
                r
            }
        };
        if r.is_err() {
            break;
        }
    }
    (durable, touched)
}

/// Whether the flushed bytes of `got` are intact.
fn compare(got: &[u8], durable: &[u8], touched: &[bool], what: &str) -> Result<(), String> {
    match (0..got.len()).find(|&i| !touched[i] && got[i] != durable[i]) {
        Some(i) => Err(format!(
            "{what}: flushed byte at {i} reads {:#x}, expected {:#x}",
            got[i], durable[i]
        )),
        None => Ok(()),
    }
}

fn read_all(path: &Path, size: u64, what: &str) -> Result<Vec<u8>, String> {
    let img = vimg::open::open_image(path, &Default::default())
        .map_err(|e| format!("{what}: reopen: {e}"))?;
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, GuestOffset(0))
        .map_err(|e| format!("{what}: read: {e}"))?;
    Ok(got)
}

fn qemu_check(path: &Path) -> (i32, String) {
    common::run_status(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    )
}

/// How many crashed lazy-refcount images were dirty (so that the checks are not vacuous).
static DIRTY_SEEN: AtomicU64 = AtomicU64::new(0);

/// The lazy-refcount checks of a crashed image (see the module documentation); `with_qemu`
/// also lets qemu repair a copy.
fn check_lazy(
    img_path: &Path,
    size: u64,
    durable: &[u8],
    touched: &[bool],
    what: &str,
    with_qemu: bool,
) -> Result<(), String> {
    let got = read_all(img_path, size, &format!("{what} (read-only, maybe dirty)"))?;
    compare(&got, durable, touched, &format!("{what} (read-only)"))?;
    let header = std::fs::read(img_path).unwrap();
    let dirty = common::header_u64(&header, header_fields::INCOMPATIBLE_FEATURES) & 1 != 0;
    DIRTY_SEEN.fetch_add(u64::from(dirty), Ordering::SeqCst);
    if dirty && with_qemu {
        let copy = img_path.with_extension("qemu.qcow2");
        std::fs::copy(img_path, &copy).unwrap();
        qemu_io(&copy, "qcow2", &["write -P 0x7e 0 512".into()]);
        let (code, out) = qemu_check(&copy);
        if code != 0 {
            return Err(format!(
                "{what}: after qemu's repair, check exit {code}: {out}"
            ));
        }
        std::fs::remove_file(&copy).ok();
    }
    let img = Qcow2Image::open(img_path, true, false, &mut ChainGuard::default())
        .map_err(|e| format!("{what}: read-write open (repair): {e}"))?;
    img.close().map_err(|e| format!("{what}: close: {e}"))?;
    let (code, out) = qemu_check(img_path);
    if code != 0 {
        return Err(format!(
            "{what}: after vimg's repair, check exit {code}: {out}"
        ));
    }
    let got = read_all(img_path, size, what)?;
    compare(&got, durable, touched, &format!("{what} (repaired)"))
}

fn check_one(
    dir: &Path,
    pristine: &Path,
    base: &[u8],
    size: u64,
    limit: u64,
    mode: Mode,
    lazy: bool,
) -> Result<u64, String> {
    let img_path = dir.join(format!("crash-{limit}.qcow2"));
    std::fs::copy(pristine, &img_path).unwrap();
    let storage = Crashing::new(FileStorage::open(&img_path, true).unwrap(), limit, mode);
    let (writes, crashed) = (storage.writes.clone(), storage.crashed.clone());
    let (durable, touched) = {
        let img = Qcow2Image::open_storage(
            Box::new(storage),
            &img_path,
            true,
            false,
            &mut ChainGuard::default(),
        )
        .map_err(|e| format!("open for writing: {e}"))?;
        let cs = img.header().cluster_size();
        apply(&img, &ops(cs), size, base, &crashed)
        // dropped here: the drop's flush meets the crashed storage too
    };
    let what = format!("N={limit} {mode:?}");
    if lazy {
        check_lazy(
            &img_path,
            size,
            &durable,
            &touched,
            &what,
            limit.is_multiple_of(4),
        )?;
    } else {
        let (code, out) = qemu_check(&img_path);
        if code != 0 && code != 3 {
            return Err(format!("{what}: qemu-img check exit {code}: {out}"));
        }
        let got = read_all(&img_path, size, &what)?;
        compare(&got, &durable, &touched, &what)?;
    }
    std::fs::remove_file(&img_path).ok();
    Ok(writes.load(Ordering::SeqCst))
}

#[test]
fn interrupted_writes_never_corrupt_and_flushed_data_survives() {
    if !qemu_available("crash_safety") {
        return;
    }
    // Syncs cost nothing on tmpfs; the crash model does not need the disk.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap_or_else(|_| tempfile::tempdir().unwrap())
    } else {
        tempfile::tempdir().unwrap()
    };
    let mut failures = Vec::new();
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=2",
        "compat=0.10",
        "extended_l2=on,compression_type=zstd",
        "lazy_refcounts=on",
        "lazy_refcounts=on,cluster_size=1024,refcount_bits=64",
    ] {
        let lazy = opts.contains("lazy");
        let t0 = std::time::Instant::now();
        let pristine = dir.path().join("pristine.qcow2");
        let size = 16u64 << 20;
        qemu_create(&pristine, "qcow2", opts, None, size);
        let cs = if opts.contains("4096") {
            4096
        } else if opts.contains("1024") {
            1024
        } else {
            65536
        };
        let mut pre = vec![
            format!("write -c -P 0x61 {} {cs}", 8 * cs),
            "write -P 0x62 0 200k".into(),
        ];
        let mut base = vec![0u8; size as usize];
        if cs == 1024 {
            // Fill the host file up to just below the end of its second refcount block (128
            // one-KiB clusters each at 64-bit refcounts), so that vimg's allocations need a
            // new refcount block: lazy refcounts must write it before any table points past it.
            pre.push("write -P 0x63 15M 47k".into());
            base[15 << 20..(15 << 20) + (47 << 10)].fill(0x63);
        }
        qemu_io(&pristine, "qcow2", &pre);
        base[..200 << 10].fill(0x62);
        base[(8 * cs) as usize..(9 * cs) as usize].fill(0x61);
        // The number of writes the whole sequence makes, then every crash point in it.
        let total = match check_one(
            dir.path(),
            &pristine,
            &base,
            size,
            u64::MAX,
            Mode::Fail,
            lazy,
        ) {
            Ok(n) => n,
            Err(e) => {
                failures.push(format!("{opts}: without a crash: {e}"));
                continue;
            }
        };
        assert!(total > 10, "{opts}: only {total} writes");
        // The long sequence of small clusters is checked in one mode per crash point, to keep
        // the test's time in bounds.
        let alternate = cs == 1024;
        for limit in 0..total {
            for mode in [Mode::Fail, Mode::Drop] {
                if alternate && limit.is_multiple_of(2) != matches!(mode, Mode::Fail) {
                    continue;
                }
                if let Err(e) = check_one(dir.path(), &pristine, &base, size, limit, mode, lazy) {
                    failures.push(format!("{opts}: {e}"));
                }
            }
        }
        run("rm", &["-f", pristine.to_str().unwrap()]);
        let dirty = DIRTY_SEEN.swap(0, Ordering::SeqCst);
        if lazy && dirty < total / 5 {
            failures.push(format!(
                "{opts}: only {dirty} of the crashed images were dirty"
            ));
        }
        eprintln!(
            "{opts}: {total} writes, {dirty} dirty images, {:?}",
            t0.elapsed()
        );
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
