//! Live pull backup (fleecing) and incremental backups of a disk written while it is backed
//! up (issue 19): the guest stand-in writes through the live [`Export`] in-process; the
//! fleecing export is served by `nbd::server::run` on a Unix socket and read by nbdcopy,
//! `qemu-img convert` and nbdinfo; incremental overlays are restored and checked by qemu-img.

use crate::common;
use crate::common::nbd_serve::nbd_tools_available;
use crate::common::Rng;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vimg::live::fleece::{self, ViewOptions};
use vimg::live::incremental::{self, BackupRequest};
use vimg::nbd::server::{Address, Contexts, Export, ExportSettings, ListenConfig};
use vimg::open::{open_image, OpenOptions};
use vimg::{BlockImage, ImageFormat};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 65536;
const A: u8 = 0xaa;
const B: u8 = 0xbb;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 image of `size` bytes made by qemu-img, all of it written with `A` by qemu-io, with
/// an empty enabled bitmap `bitmap` (granularity 64 KiB).
fn live_image(dir: &Path, size: u64, bitmap: &str) -> PathBuf {
    let p = dir.join("live.qcow2");
    common::qemu_create(&p, "qcow2", "", None, size);
    common::qemu_io(&p, "qcow2", &[format!("write -P {A} 0 {size}")]);
    common::run(
        "qemu-img",
        &["bitmap", "--add", "-g", "65536", s(&p), bitmap],
    );
    p
}

/// The live image opened by vimg and exported (writable, discard on).
fn live_export(p: &Path) -> Arc<Export> {
    let image = open_image(
        p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let settings = ExportSettings {
        discard_unmap: true,
        ..Default::default()
    };
    Arc::new(Export::new(image, settings, Contexts::default(), None))
}

fn read_all(image: &dyn BlockImage) -> Vec<u8> {
    let mut v = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut v, vimg::GuestOffset(0)).unwrap();
    v
}

/// Serves `export` on a Unix socket in a thread of its own (for the rest of the test
/// process: the server is persistent) and returns the socket once it listens.
fn serve(export: Export, socket: &Path) -> String {
    let cfg = ListenConfig {
        address: Address::Unix(socket.to_path_buf()),
        persistent: true,
        shared: 0,
        handshake_limit: None,
        fork: false,
        pid_file: None,
        tls: None,
    };
    std::thread::spawn(move || vimg::nbd::server::run(export, &cfg));
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(socket.exists(), "the server did not listen");
    format!("nbd+unix:///fleece?socket={}", s(socket))
}

/// The dirty ranges `nbdinfo --map=qemu:dirty-bitmap:NAME` prints, merged.
fn nbdinfo_dirty(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let out = common::run(
        "nbdinfo",
        &[&format!("--map=qemu:dirty-bitmap:{bitmap}"), uri],
    );
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, ty): (u64, u64, u64) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        if ty & 1 != 0 {
            match dirty.last_mut() {
                Some(l) if l.1 == off => l.1 = off + len,
                _ => dirty.push((off, off + len)),
            }
        }
    }
    dirty
}

/// Merged `[start, end)` byte ranges of a set of chunks.
fn chunk_ranges(chunks: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        match v.last_mut() {
            Some(l) if l.1 == c * CHUNK => l.1 += CHUNK,
            _ => v.push((c * CHUNK, (c + 1) * CHUNK)),
        }
    }
    v
}

#[test]
fn the_fleecing_export_holds_the_start_while_the_guest_writes() {
    if !nbd_tools_available("fleecing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let p = live_image(dir.path(), size, "b");
    // Before the start: pattern A everywhere, some chunks written again (still A) so that
    // the bitmap marks them.
    let before: BTreeSet<u64> = [1, 4, 5, 9, 200].into_iter().collect();
    common::qemu_io(
        &p,
        "qcow2",
        &before
            .iter()
            .map(|c| format!("write -P {A} {} 4096", c * CHUNK + 512))
            .collect::<Vec<_>>(),
    );
    let live = live_export(&p);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let bound = 8 * CHUNK;
    let opts = ViewOptions {
        memory_bound: bound,
        temp_dir: Some(tmp.clone()),
    };
    let (export, view) = fleece::start(&live, "fleece", &opts, Some("b")).unwrap();
    let uri = serve(export, &dir.path().join("fleece.sock"));

    // The guest writes pattern B while nbdcopy copies the view.
    let written = Mutex::new(BTreeSet::new());
    let done = AtomicBool::new(false);
    let copy1 = dir.path().join("nbdcopy.raw");
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut rng = Rng::seeded(19);
            let mut n = 0;
            while n < 150 || (!done.load(Ordering::Relaxed) && n < 3000) {
                let off = rng.below(size - 1);
                let len = (1 + rng.below(3 * CHUNK)).min(size - off);
                live.write(&vec![B; len as usize], off, false).unwrap();
                let mut w = written.lock().unwrap();
                for c in off / CHUNK..=(off + len - 1) / CHUNK {
                    w.insert(c);
                }
                n += 1;
            }
        });
        common::run("nbdcopy", &[&uri, s(&copy1)]);
        done.store(true, Ordering::Relaxed);
    });
    let copy2 = dir.path().join("convert.raw");
    common::run("qemu-img", &["convert", "-O", "raw", &uri, s(&copy2)]);
    for c in [&copy1, &copy2] {
        let data = std::fs::read(c).unwrap();
        assert_eq!(data.len() as u64, size);
        let bad = data.iter().position(|&b| b != A);
        assert_eq!(
            bad,
            None,
            "{}: not pattern A at the offset given",
            c.display()
        );
    }
    // The live disk: B where written, A elsewhere.
    let written = written.into_inner().unwrap();
    let now = read_all(live.image());
    let mut b_bytes = 0;
    for (c, piece) in now.chunks(CHUNK as usize).enumerate() {
        assert!(piece.iter().all(|&x| x == A || x == B), "chunk {c}");
        if !written.contains(&(c as u64)) {
            assert!(piece.iter().all(|&x| x == A), "chunk {c} never written");
        }
        b_bytes += piece.iter().filter(|&&x| x == B).count();
    }
    assert!(b_bytes > 0);
    // Each overwritten chunk was read once from the live disk and kept.
    let stats = view.stats();
    assert_eq!(stats.chunks_kept, written.len() as u64, "{stats:?}");
    assert_eq!(stats.bytes_saved, written.len() as u64 * CHUNK);
    // The store's memory bound held; the rest went to the temporary file.
    assert!(stats.peak_memory_bytes <= bound, "{stats:?}");
    assert!(stats.file_bytes >= stats.bytes_saved - bound, "{stats:?}");
    let file = stats.file.clone().expect("a temporary file");
    assert!(file.starts_with(&tmp) && file.exists());
    // The bitmap as it was at the start: the chunks written before it, not those since.
    assert_eq!(nbdinfo_dirty(&uri, "b"), chunk_ranges(&before));
    let live_bitmap = live.image().as_bitmaps().unwrap().read_bitmap("b").unwrap();
    let union: BTreeSet<u64> = before.union(&written).copied().collect();
    assert_eq!(live_bitmap.dirty_ranges(), chunk_ranges(&union));
    // Stopping the view removes its file; the export then fails its reads.
    view.stop();
    assert!(!file.exists(), "the temporary file outlived the view");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let (code, _) = common::run_status("nbdcopy", &[&uri, s(&dir.path().join("late.raw"))]);
    assert_ne!(code, 0, "a stopped view was still read");
    live.finish().unwrap();
}

/// Writes pattern `byte` over `count` random ranges through `live`, returning the chunks.
fn guest_writes(live: &Export, rng: &mut Rng, count: usize, byte: u8) -> BTreeSet<u64> {
    let size = live.size();
    let mut chunks = BTreeSet::new();
    for _ in 0..count {
        let off = rng.below(size - 1);
        let len = (1 + rng.below(2 * CHUNK)).min(size - off);
        if rng.below(5) == 0 {
            live.write_zeroes(off, len, false, false).unwrap();
        } else {
            live.write(&vec![byte; len as usize], off, false).unwrap();
        }
        for c in off / CHUNK..=(off + len - 1) / CHUNK {
            chunks.insert(c);
        }
    }
    chunks
}

fn bitmap_chunks(live: &Export, name: &str) -> BTreeSet<u64> {
    let b = live
        .image()
        .as_bitmaps()
        .unwrap()
        .read_bitmap(name)
        .unwrap();
    let mut out = BTreeSet::new();
    for (s, e) in b.dirty_ranges() {
        for c in s / CHUNK..e.div_ceil(CHUNK) {
            out.insert(c);
        }
    }
    out
}

/// One backup with writes during it (from the progress callback, so they fall between the
/// start and the bitmap's reset, and from a thread); returns the chunks written since the
/// start.
fn backup_during_writes(
    live: &Arc<Export>,
    target: &Path,
    previous: Option<&str>,
    seed: u64,
) -> (vimg::Result<incremental::BackupStats>, BTreeSet<u64>) {
    let during = Mutex::new(BTreeSet::new());
    let rng = Mutex::new(Rng::seeded(seed));
    // The thread writes only once the backup has started (told by the first progress call):
    // a write before the start belongs in this backup.
    let started = AtomicBool::new(false);
    let progress = |_: u64, _: u64| {
        started.store(true, Ordering::SeqCst);
        let w = guest_writes(live, &mut rng.lock().unwrap(), 3, 0x30 + seed as u8);
        during.lock().unwrap().extend(w);
    };
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut rng = Rng::seeded(seed + 1000);
            while !started.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            for _ in 0..20 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let w = guest_writes(live, &mut rng, 1, 0x60 + seed as u8);
                during.lock().unwrap().extend(w);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        let mut req = BackupRequest::new(
            live,
            "inc",
            target,
            previous.map(|p| (p, ImageFormat::Qcow2)),
        );
        req.progress = Some(&progress);
        let r = incremental::run(&req);
        stop.store(true, Ordering::Relaxed);
        r
    });
    (result, during.into_inner().unwrap())
}

#[test]
fn incremental_backups_restore_each_round_and_a_failed_one_keeps_the_bitmap() {
    if !common::qemu_available("incremental") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB + 3 * 4096; // a partial cluster at the end
    let p = live_image(dir.path(), size, "inc");
    let live = live_export(&p);
    let mut rng = Rng::seeded(7);
    let mut previous: Option<String> = None;
    for round in 0..4u64 {
        // The guest writes (round 0: the disk as qemu-io left it), then the state at the
        // start point is copied, with nothing writing.
        if round > 0 {
            guest_writes(&live, &mut rng, 40, 0x10 + round as u8);
        }
        let expected = read_all(live.image());
        if round == 2 {
            // Two failed backups first: the target's directory missing, then the view
            // breaking during the copy (its store cannot be created). Neither leaves a target
            // nor clears a bit.
            let dirty = bitmap_chunks(&live, "inc");
            assert!(!dirty.is_empty());
            let missing = dir.path().join("missing").join("x.qcow2");
            let prev = previous.as_deref().map(|p| (p, ImageFormat::Qcow2));
            let e = incremental::run(&BackupRequest::new(&live, "inc", &missing, prev))
                .unwrap_err()
                .to_string();
            assert!(e.contains("missing"), "{e}");
            assert!(bitmap_chunks(&live, "inc").is_superset(&dirty));
            let broken_target = dir.path().join("broken.qcow2");
            let mut req = BackupRequest::new(&live, "inc", &broken_target, prev);
            req.view = ViewOptions {
                memory_bound: 0,
                temp_dir: Some(dir.path().join("no-such-dir")),
            };
            req.cluster_size = Some(CHUNK);
            let writes = Mutex::new(Rng::seeded(99));
            let kept = Mutex::new(BTreeSet::new());
            let progress = |_: u64, _: u64| {
                // A guest write of a chunk still to copy: its old data cannot be kept.
                let w = guest_writes(&live, &mut writes.lock().unwrap(), 2, 0x77);
                kept.lock().unwrap().extend(w);
            };
            req.progress = Some(&progress);
            let e = incremental::run(&req).unwrap_err().to_string();
            assert!(e.contains("point-in-time view is broken"), "{e}");
            assert!(!broken_target.exists(), "a failed backup left its target");
            let kept = kept.into_inner().unwrap();
            let now = bitmap_chunks(&live, "inc");
            assert!(now.is_superset(&dirty) && now.is_superset(&kept));
            // Those writes are part of this round.
            let expected_now = read_all(live.image());
            assert!(expected_now != expected);
            let target = dir.path().join(format!("b{round}.qcow2"));
            let (r, during) = backup_during_writes(&live, &target, previous.as_deref(), round);
            r.unwrap();
            check_round(dir.path(), &target, &expected_now, round);
            assert_eq!(
                bitmap_chunks(&live, "inc"),
                during,
                "round {round}: next generation"
            );
            previous = Some(format!("b{round}.qcow2"));
            continue;
        }
        let target = dir.path().join(format!("b{round}.qcow2"));
        let (r, during) = backup_during_writes(&live, &target, previous.as_deref(), round);
        let stats = r.unwrap();
        assert_eq!(stats.full, round == 0);
        if round > 0 {
            assert!(stats.bytes_to_copy < size, "{stats:?}");
        }
        check_round(dir.path(), &target, &expected, round);
        // The bitmap's new generation holds exactly what was written since the start.
        assert_eq!(
            bitmap_chunks(&live, "inc"),
            during,
            "round {round}: next generation"
        );
        previous = Some(format!("b{round}.qcow2"));
    }
    live.finish().unwrap();
    drop(live);
    let out = common::run("qemu-img", &["check", s(&p)]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// The overlay of `round` restores the disk as it was at the round's start, passes qemu-img
/// check, and names the previous backup.
fn check_round(dir: &Path, target: &Path, expected: &[u8], round: u64) {
    let out = common::run("qemu-img", &["check", s(target)]);
    assert!(out.contains("No errors were found"), "{out}");
    let info = common::run("qemu-img", &["info", "--output=json", s(target)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    match round {
        0 => assert!(v.get("backing-filename").is_none(), "{info}"),
        _ => assert_eq!(v["backing-filename"], format!("b{}.qcow2", round - 1)),
    }
    let restored = dir.join(format!("restored{round}.raw"));
    common::run(
        "qemu-img",
        &["convert", "-O", "raw", s(target), s(&restored)],
    );
    let data = std::fs::read(&restored).unwrap();
    assert_eq!(data.len(), expected.len());
    let bad = data.iter().zip(expected).position(|(a, b)| a != b);
    if let Some(b) = bad {
        let end = (b..data.len())
            .find(|&i| data[i] == expected[i])
            .unwrap_or(data.len());
        eprintln!(
            "differs {b}..{end}: restored {:#x} expected {:#x}",
            data[b], expected[b]
        );
    }
    assert_eq!(
        bad, None,
        "round {round}: the restored disk differs at this offset"
    );
}
