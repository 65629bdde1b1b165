//! The view against a model (the disk as it was at the start), under concurrent writers and
//! readers, with its memory bound, a failing store, and the frozen bitmap.

use super::*;
use crate::nbd::server::contexts::ID_FIRST_BITMAP;
use crate::nbd::server::ExportSettings;
use crate::BlockImage;
use std::collections::HashSet;
use std::path::Path;

/// A small seeded generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn settings() -> ExportSettings {
    ExportSettings {
        discard_unmap: true,
        ..Default::default()
    }
}

/// A writable raw export of `size` bytes holding `fill`.
fn raw_export(dir: &Path, size: u64, fill: &[u8]) -> Arc<Export> {
    let p = dir.join("live.raw");
    std::fs::write(&p, fill).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(size)
        .unwrap();
    let image = crate::raw::RawImage::open(&p, true).unwrap();
    Arc::new(Export::new(
        Box::new(image),
        settings(),
        Contexts::default(),
        None,
    ))
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

fn read_all(image: &dyn BlockImage) -> Result<Vec<u8>> {
    let mut v = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut v, GuestOffset(0))?;
    Ok(v)
}

use crate::offsets::GuestOffset;

#[test]
fn reads_the_disk_as_it_was_at_the_start_against_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let size = (4 << 20) + 100_000; // a partial chunk at the end
    let start = pattern(7, size as usize);
    let live = raw_export(dir.path(), size, &start);
    let view = PointInTimeView::start(&live, &ViewOptions::default(), None).unwrap();
    let image = view.image();
    let chunk = view.chunk_size();
    let mut model = start.clone();
    let mut touched = HashSet::new();
    let mut log = Vec::new();
    let mut rng = Rng(42);
    for i in 0..300 {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(300_000));
        match rng.below(3) {
            0 => {
                let data = pattern(i + 100, len as usize);
                live.write(&data, off, false).unwrap();
                log.push(format!("write {off} {len}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            1 => {
                live.write_zeroes(off, len, false, false).unwrap();
                log.push(format!("zero {off} {len}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                // A discard leaves the range unspecified in the live disk: re-read it.
                live.trim(off, len, false).unwrap();
                log.push(format!("trim {off} {len}"));
                let mut back = vec![0u8; len as usize];
                live.read(&mut back, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&back);
            }
        }
        for c in off / chunk..=(off + len - 1) / chunk {
            touched.insert(c);
        }
        let (a, b) = (rng.below(size), rng.below(size));
        let (a, b) = (a.min(b), a.max(b) + 1);
        let mut got = vec![0u8; (b - a) as usize];
        image.read_at(&mut got, GuestOffset(a)).unwrap();
        assert!(
            got == start[a as usize..b as usize],
            "view read {a}..{b} after op {i}"
        );
    }
    let all = read_all(image.as_ref()).unwrap();
    let first_diff = all.iter().zip(&start).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "the whole view differs from the start after {log:?}"
    );
    let now = read_all(live.image()).unwrap();
    let first_diff = now.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "the live disk differs from the model after {log:?}"
    );
    let stats = view.stats();
    assert_eq!(
        stats.chunks_kept,
        touched.len() as u64,
        "each overwritten chunk is kept, once"
    );
    assert!(stats.save_reads <= stats.chunks_kept);
    assert!(stats.broken.is_none() && stats.file.is_none());
    // Block status of the view: the start's data everywhere (the file was all data).
    let mut pos = 0;
    while pos < size {
        let st = image.block_status(GuestOffset(pos), size - pos).unwrap();
        assert!(st.data && !st.zero, "at {pos}: {st:?}");
        pos += st.len;
    }
}

#[test]
fn concurrent_writers_never_show_through_to_a_reader_of_the_view() {
    // Many views, one after the other, each copied by a reader while three writers write at
    // random: the races are at a chunk's first write after a view's start. The writers pause
    // (a write lock) while the disk is read and a view started, so the start is known.
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 2 << 20;
    let live = raw_export(dir.path(), size, &pattern(3, size as usize));
    let opts = ViewOptions {
        memory_bound: 256 << 10,
        temp_dir: Some(dir.path().to_path_buf()),
    };
    let pause = std::sync::RwLock::new(());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut failure = None;
    let (mut kept, mut spilled) = (0, 0);
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (live, stop, pause) = (&live, &stop, &pause);
            s.spawn(move || {
                let mut rng = Rng(1000 + t);
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let off = rng.below(size);
                    let len = 1 + rng.below((size - off).min(100_000));
                    let _g = pause.read().unwrap();
                    match rng.below(4) {
                        0 => live.write_zeroes(off, len, false, false).unwrap(),
                        _ => live
                            .write(&vec![(t * 50 + i % 50) as u8 | 1; len as usize], off, false)
                            .unwrap(),
                    }
                    i += 1;
                }
            });
        }
        let mut rng = Rng(9);
        for round in 0..60 {
            let (start, view) = {
                let _g = pause.write().unwrap();
                let start = read_all(live.image()).unwrap();
                (start, PointInTimeView::start(&live, &opts, None).unwrap())
            };
            let image = view.image();
            let mut copy = vec![0u8; size as usize];
            let mut pos = 0;
            while pos < size && failure.is_none() {
                let n = (1 + rng.below(300_000)).min(size - pos);
                let piece = &mut copy[pos as usize..(pos + n) as usize];
                if let Err(e) = image.read_at(piece, GuestOffset(pos)) {
                    failure = Some(format!("copy {round}: {e}"));
                }
                pos += n;
            }
            if failure.is_none() && copy != start {
                let at = copy.iter().zip(&start).position(|(a, b)| a != b);
                failure = Some(format!("copy {round} differs from the start at {at:?}"));
            }
            let stats = view.stats();
            kept += stats.chunks_kept;
            spilled += stats.file_bytes;
            if stats.peak_memory_bytes > opts.memory_bound {
                failure = Some(format!("memory bound exceeded: {stats:?}"));
            }
            if failure.is_some() {
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(failure, None);
    assert!(kept > 0 && spilled > 0, "kept {kept}, spilled {spilled}");
}

#[test]
fn memory_is_bounded_and_the_temporary_file_removed_when_the_view_stops() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    let start = pattern(5, size as usize);
    let live = raw_export(dir.path(), size, &start);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let bound = 3 * MIN_CHUNK;
    let opts = ViewOptions {
        memory_bound: bound,
        temp_dir: Some(tmp.clone()),
    };
    let view = PointInTimeView::start(&live, &opts, None).unwrap();
    for i in 0..16u64 {
        live.write(&[0xee; 65536], i * 131072, false).unwrap();
    }
    let stats = view.stats();
    assert_eq!(stats.chunks_kept, 16);
    assert!(stats.peak_memory_bytes <= bound, "{stats:?}");
    assert_eq!(stats.memory_bytes, bound);
    assert_eq!(stats.file_bytes, 13 * MIN_CHUNK);
    let file = stats.file.clone().unwrap();
    assert!(file.starts_with(&tmp) && file.exists());
    assert!(read_all(view.image().as_ref()).unwrap() == start);
    let image = view.image();
    drop(view);
    assert!(!file.exists(), "the temporary file outlived the view");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let e = read_all(image.as_ref()).unwrap_err().to_string();
    assert!(e.contains("point-in-time view was stopped"), "{e}");
    // The hook is gone: writes go on, nothing kept.
    live.write(&[1; 512], 0, false).unwrap();
}

#[test]
fn a_failing_store_breaks_the_view_but_not_the_writes() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 1 << 20;
    let start = pattern(11, size as usize);
    let live = raw_export(dir.path(), size, &start);
    let opts = ViewOptions {
        memory_bound: MIN_CHUNK,
        temp_dir: Some(dir.path().join("missing")),
    };
    let view = PointInTimeView::start(&live, &opts, None).unwrap();
    live.write(&[2; 4096], 0, false).unwrap(); // kept in memory
    live.write(&[3; 4096], 3 * MIN_CHUNK, false).unwrap(); // the file cannot be created
    live.write(&[4; 4096], 5 * MIN_CHUNK, false).unwrap();
    let mut back = [0u8; 4096];
    live.read(&mut back, 5 * MIN_CHUNK).unwrap();
    assert_eq!(back, [4; 4096], "the guest's write was lost");
    let e = read_all(view.image().as_ref()).unwrap_err().to_string();
    assert!(
        e.contains("point-in-time view is broken")
            && e.contains("cannot create the temporary store"),
        "{e}"
    );
    assert!(view.stats().broken.is_some());
    assert_eq!(view.stats().memory_bytes, 0, "a broken view keeps nothing");
}

#[test]
fn the_export_offers_the_bitmap_frozen_at_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("live.qcow2");
    let size: u64 = 2 << 20;
    crate::qcow2::create(
        &p,
        &crate::qcow2::CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let opts = crate::open::OpenOptions {
        writable: true,
        ..Default::default()
    };
    let image = crate::open::open_image(&p, &opts).unwrap();
    image
        .as_bitmaps()
        .unwrap()
        .add_bitmap("b", Some(65536), true)
        .unwrap();
    let live = Arc::new(Export::new(image, settings(), Contexts::default(), None));
    live.write(&[1; 100], 10, false).unwrap();
    live.write(&[1; 70000], 5 * 65536, false).unwrap();
    let (export, view) = start(&live, "snap", &ViewOptions::default(), Some("b")).unwrap();
    live.write(&[2; 100], 9 * 65536, false).unwrap();
    assert_eq!(export.name(), "snap");
    assert!(export.readonly());
    let names: Vec<String> = export.contexts().all().into_iter().map(|c| c.1).collect();
    assert!(
        names.contains(&"qemu:dirty-bitmap:b".to_string()),
        "{names:?}"
    );
    let ext = export.block_status(ID_FIRST_BITMAP, 0, size, 100).unwrap();
    let mut dirty = Vec::new();
    let mut pos = 0;
    for e in ext {
        if e.flags != 0 {
            dirty.push((pos, pos + e.length));
        }
        pos += e.length;
    }
    assert_eq!(dirty, vec![(0, 65536), (5 * 65536, 7 * 65536)]);
    assert_eq!(
        view.frozen_bitmap().unwrap().dirty_ranges(),
        vec![(0, 65536), (5 * 65536, 7 * 65536)]
    );
    // The live bitmap goes on tracking.
    let now = live.image().as_bitmaps().unwrap().read_bitmap("b").unwrap();
    assert!(now.dirty_ranges().contains(&(9 * 65536, 10 * 65536)));
    // The view reads the start: the later write is not in it.
    let mut back = [0u8; 100];
    export.read(&mut back, 9 * 65536).unwrap();
    assert_eq!(back, [0; 100]);
    // Asking for a bitmap the image lacks fails and leaves no hook behind.
    assert!(start(&live, "x", &ViewOptions::default(), Some("nope")).is_err());
    drop(view);
    live.finish().unwrap();
}

/// How long [`PointInTimeView::start_group`] waits between attaching its hooks and reading
/// the bitmaps, so that a test can write in between.
pub(super) static FREEZE_DELAY_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

#[test]
fn the_frozen_bitmap_is_exactly_the_bitmap_at_the_start_point() {
    // A write arriving while the bitmap is being frozen waits until it is: it is in neither
    // the frozen bitmap nor the view (it is after the start point).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("live.qcow2");
    let size: u64 = 1 << 20;
    crate::qcow2::create(
        &p,
        &crate::qcow2::CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let opts = crate::open::OpenOptions {
        writable: true,
        ..Default::default()
    };
    let image = crate::open::open_image(&p, &opts).unwrap();
    image
        .write_at(&vec![0x11; size as usize], GuestOffset(0))
        .unwrap();
    image
        .as_bitmaps()
        .unwrap()
        .add_bitmap("b", Some(65536), true)
        .unwrap();
    let live = Arc::new(Export::new(image, settings(), Contexts::default(), None));
    live.write(&[0xcc; 4096], 3 * 65536, false).unwrap(); // before the start
    FREEZE_DELAY_MS.store(300, std::sync::atomic::Ordering::Relaxed);
    let view = std::thread::scope(|s| {
        let live2 = &live;
        s.spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            live2.write(&[0xdd; 4096], 5 * 65536, false).unwrap(); // while freezing
        });
        PointInTimeView::start(&live, &ViewOptions::default(), Some("b")).unwrap()
    });
    FREEZE_DELAY_MS.store(0, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        view.frozen_bitmap().unwrap().dirty_ranges(),
        vec![(3 * 65536, 4 * 65536)]
    );
    let mut back = [0u8; 4096];
    view.image()
        .read_at(&mut back, GuestOffset(5 * 65536))
        .unwrap();
    assert_eq!(back, [0x11; 4096], "the view shows a write after the start");
    view.image()
        .read_at(&mut back, GuestOffset(3 * 65536))
        .unwrap();
    assert_eq!(back, [0xcc; 4096]);
    live.read(&mut back, 5 * 65536).unwrap();
    assert_eq!(back, [0xdd; 4096]);
}
