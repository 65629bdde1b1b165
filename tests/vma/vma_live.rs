//! The live-backup hook: while a [`BackupJob`] runs, other threads write to the same images
//! (a raw file and a qcow2 image) through [`GuardedImage`]s. The archive must hold the images
//! exactly as they were when the job was created, the images must end up with every write,
//! and every cluster must have been read at most once (by the job or by the hook, never both).

use crate::common;

use common::Rng;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use vimg::block::{BlockImage, BlockStatus, ImageFormat};
use vimg::open::ChainGuard;
use vimg::qcow2::Qcow2Image;
use vimg::raw::RawImage;
use vimg::vma::restore::{restore, RestoreOptions};
use vimg::vma::{BackupJob, VmaReader};
use vimg::{GuestOffset, Result};

const CS: u64 = 65536;

/// Delegates to an image, recording every read and taking 1 ms per cluster read, so that the
/// job is slow enough for the writers to catch it mid-way.
struct Counting {
    inner: Box<dyn BlockImage>,
    reads: Mutex<Vec<(u64, u64)>>,
}

impl BlockImage for Counting {
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }
    fn filename(&self) -> &Path {
        self.inner.filename()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        self.reads
            .lock()
            .unwrap()
            .push((offset.0, buf.len() as u64));
        std::thread::sleep(Duration::from_micros(
            1000 * (buf.len() as u64).div_ceil(CS),
        ));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: GuestOffset, len: u64, unmap: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        self.inner.block_status(offset, max_len)
    }
    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
    fn actual_size(&self) -> Option<u64> {
        self.inner.actual_size()
    }
    fn layer_info(&self) -> Result<vimg::info::LayerInfo> {
        self.inner.layer_info()
    }
}

fn contents(img: &dyn BlockImage) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut v, GuestOffset(0)).unwrap();
    v
}

/// A raw image and a qcow2 image with random data, zero ranges and holes.
fn images(dir: &Path, rng: &mut Rng) -> Vec<Counting> {
    let raw_path = dir.join("live.raw");
    let raw = RawImage::create(&raw_path, 40 * CS + 3 * 512).unwrap();
    let q_path = dir.join("live.qcow2");
    vimg::ops::create::create(&vimg::ops::create::CreateArgs {
        format: ImageFormat::Qcow2,
        filename: q_path.clone(),
        options: vec![],
        backing_file: None,
        backing_format: None,
        unsafe_backing: false,
        size: Some((48 * CS).to_string()),
        opener: Default::default(),
    })
    .unwrap();
    let q = Qcow2Image::open(&q_path, true, false, &mut ChainGuard::default()).unwrap();
    let imgs: Vec<Box<dyn BlockImage>> = vec![Box::new(raw), Box::new(q)];
    for img in &imgs {
        let size = img.virtual_size();
        for _ in 0..30 {
            let off = rng.below(size / 512) * 512;
            let len = ((rng.below(64) + 1) * 512 * 8).min(size - off);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            img.write_at(&data, GuestOffset(off)).unwrap();
        }
    }
    imgs.into_iter()
        .map(|inner| Counting {
            inner,
            reads: Mutex::new(Vec::new()),
        })
        .collect()
}

/// Restores `archive` into raw files in `dir`; returns each device's contents.
fn restored(archive: &Path, dir: &Path) -> Vec<Vec<u8>> {
    let reader = VmaReader::new(std::fs::File::open(archive).unwrap()).unwrap();
    let devices = reader.header().devices.clone();
    let imgs: Vec<RawImage> = devices
        .iter()
        .map(|d| RawImage::create(&dir.join(format!("restored-{}.raw", d.id)), d.size).unwrap())
        .collect();
    let mut targets: Vec<Option<&dyn BlockImage>> = vec![None; 256];
    for (d, img) in devices.iter().zip(&imgs) {
        targets[d.id as usize] = Some(img);
    }
    restore(reader, &targets, RestoreOptions::default(), None).unwrap();
    imgs.iter().map(|i| contents(i)).collect()
}

/// One guest write of a writer thread, for the model.
enum Op {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Writes by thread `t` of `threads`: only inside its own 4 KiB stripes (stripe % threads ==
/// t), so the threads touch the same clusters but never the same bytes, and the final
/// contents do not depend on how they interleave.
fn writer_ops(rng: &mut Rng, t: u64, threads: u64, sizes: &[u64], n: usize) -> Vec<(usize, Op)> {
    (0..n)
        .map(|_| {
            let dev = rng.below(sizes.len() as u64) as usize;
            let stripes = sizes[dev] / 4096;
            // A stripe of this thread's residue class.
            let s = rng.below(stripes / threads) * threads + t;
            let start = s * 4096 + rng.below(8) * 512;
            let len = (rng.below(8) + 1) * 512;
            let len = len.min((s + 1) * 4096 - start);
            let op = if rng.below(4) == 0 {
                Op::Zero(start, len)
            } else {
                Op::Data(start, (0..len).map(|_| rng.next() as u8 | 1).collect())
            };
            (dev, op)
        })
        .collect()
}

#[test]
fn writes_during_a_backup_do_not_reach_the_archive() {
    for seed in [11u64, 12, 13] {
        let mut rng = Rng::seeded(seed);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let imgs = images(d, &mut rng);
        let before: Vec<Vec<u8>> = imgs.iter().map(|i| contents(i)).collect();
        let sizes: Vec<u64> = imgs.iter().map(|i| i.virtual_size()).collect();
        let threads = 4u64;
        let plans: Vec<Vec<(usize, Op)>> = (0..threads)
            .map(|t| writer_ops(&mut Rng::seeded(seed * 100 + t), t, threads, &sizes, 120))
            .collect();
        let mut after = before.clone();
        for plan in &plans {
            for (dev, op) in plan {
                match op {
                    Op::Data(off, data) => {
                        after[*dev][*off as usize..*off as usize + data.len()].copy_from_slice(data)
                    }
                    Op::Zero(off, len) => {
                        after[*dev][*off as usize..(*off + *len) as usize].fill(0)
                    }
                }
            }
        }
        let archive = d.join("live.vma");
        let mut header = vimg::vma::new_header().unwrap();
        header
            .add_config("qemu-server.conf", b"cores: 1\n".to_vec())
            .unwrap();
        let sources: Vec<(&str, &dyn BlockImage)> =
            vec![("drive-scsi0", &imgs[0]), ("drive-scsi1", &imgs[1])];
        let job = BackupJob::new(
            std::fs::File::create(&archive).unwrap(),
            header,
            &sources,
            true,
        )
        .unwrap();
        for i in &imgs {
            i.reads.lock().unwrap().clear();
        }
        let running = AtomicBool::new(true);
        let during = AtomicU64::new(0);
        std::thread::scope(|s| {
            for plan in &plans {
                let (job, running, during) = (&job, &running, &during);
                s.spawn(move || {
                    let guards = [job.guard(0).unwrap(), job.guard(1).unwrap()];
                    for (dev, op) in plan {
                        match op {
                            Op::Data(off, data) => {
                                guards[*dev].write_at(data, GuestOffset(*off)).unwrap()
                            }
                            Op::Zero(off, len) => guards[*dev]
                                .write_zeroes(GuestOffset(*off), *len, true)
                                .unwrap(),
                        }
                        if running.load(Ordering::SeqCst) {
                            during.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                });
            }
            job.run(None).unwrap();
            running.store(false, Ordering::SeqCst);
        });
        let (_, stats) = job.finish().unwrap();
        assert!(
            during.load(Ordering::SeqCst) > 50,
            "seed {seed}: only {} writes overlapped the job",
            during.load(Ordering::SeqCst)
        );
        assert!(
            stats.clusters_by_hook > 0,
            "seed {seed}: the hook saved nothing: {stats:?}"
        );
        let total: u64 = sizes.iter().map(|s| s.div_ceil(CS)).sum();
        assert_eq!(
            stats.clusters_by_job + stats.clusters_by_hook + stats.clusters_unread,
            total,
            "seed {seed}: {stats:?}"
        );
        // Each cluster read at most once, by whoever claimed it.
        for (i, img) in imgs.iter().enumerate() {
            let mut count = vec![0u32; sizes[i].div_ceil(CS) as usize];
            for &(off, len) in img.reads.lock().unwrap().iter() {
                for c in off / CS..(off + len).div_ceil(CS) {
                    count[c as usize] += 1;
                }
            }
            let twice: Vec<_> = count
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 1)
                .map(|(c, _)| c)
                .collect();
            assert!(
                twice.is_empty(),
                "seed {seed}: device {i}: clusters read twice: {twice:?}"
            );
        }
        // The archive: the images as they were; the images: with every write.
        let back = restored(&archive, d);
        for i in 0..imgs.len() {
            let mut want = before[i].clone();
            want.resize(back[i].len(), 0);
            assert!(
                back[i] == want,
                "seed {seed}: archive of device {i} is not the pre-backup image"
            );
            assert!(
                contents(&imgs[i]) == after[i],
                "seed {seed}: device {i} lost writes"
            );
        }
        imgs[1].flush().unwrap();
        if common::qemu_available("writes_during_a_backup_do_not_reach_the_archive") {
            common::run(
                "qemu-img",
                // -U: the image is still open (for writing) here, and locked.
                &["check", "-q", "-U", d.join("live.qcow2").to_str().unwrap()],
            );
        }
    }
}

/// An output that fails after `limit` bytes.
struct FailAfter {
    written: u64,
    limit: u64,
}

impl std::io::Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other("backup storage full"));
        }
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// When the archive cannot be written, the job fails but writers are not held up: every write
/// lands, nothing hangs, and the error is reported.
#[test]
fn a_failing_archive_does_not_stop_the_writers() {
    let mut rng = Rng::seeded(99);
    let dir = tempfile::tempdir().unwrap();
    let imgs = images(dir.path(), &mut rng);
    let sizes: Vec<u64> = imgs.iter().map(|i| i.virtual_size()).collect();
    let plan = writer_ops(&mut rng, 0, 1, &sizes, 200);
    let sources: Vec<(&str, &dyn BlockImage)> = vec![("a", &imgs[0]), ("b", &imgs[1])];
    let out = FailAfter {
        written: 0,
        limit: 12800 + 100_000,
    };
    let job = BackupJob::new(out, vimg::vma::new_header().unwrap(), &sources, true).unwrap();
    let mut expect: Vec<Vec<u8>> = imgs.iter().map(|i| contents(i)).collect();
    let result = std::thread::scope(|s| {
        let job = &job;
        let plan = &plan;
        s.spawn(move || {
            let guards = [job.guard(0).unwrap(), job.guard(1).unwrap()];
            for (dev, op) in plan {
                match op {
                    Op::Data(off, data) => guards[*dev].write_at(data, GuestOffset(*off)).unwrap(),
                    Op::Zero(off, len) => guards[*dev]
                        .write_zeroes(GuestOffset(*off), *len, true)
                        .unwrap(),
                }
            }
        });
        job.run(None)
    });
    // The writing thread's failure shows at the next extent, or at the end.
    let e = result.and_then(|()| job.finish().map(|_| ())).unwrap_err();
    assert!(e.to_string().contains("backup storage full"), "{e}");
    assert!(job.finish().is_err());
    for (dev, op) in &plan {
        match op {
            Op::Data(off, data) => {
                expect[*dev][*off as usize..*off as usize + data.len()].copy_from_slice(data)
            }
            Op::Zero(off, len) => expect[*dev][*off as usize..(*off + *len) as usize].fill(0),
        }
    }
    for (i, img) in imgs.iter().enumerate() {
        assert!(contents(img) == expect[i], "device {i} lost writes");
    }
    // Out-of-range hook calls: no device, or nothing to save.
    assert!(job.before_write(2, 0, 1).is_err());
    assert!(job.guard(5).is_err());
}
