//! Restoring an archive into images, in the order its clusters come (vma.md "Extents"), and
//! verifying one without writing anything.
//!
//! [`restore`] runs two threads: one reads and checks extents (and decompresses, when the input
//! does), the other writes their clusters to the target images, so reading and writing overlap.
//! Writes are coalesced: the data blocks of consecutive clusters of one device that follow each
//! other in an extent go out as one write. Zero blocks are not written (the targets are fresh
//! and read as zeros), unless [`RestoreOptions::write_zeroes`] or
//! [`RestoreOptions::zero_devices`] says a target may hold old data: then they are zeroed, a
//! run of zero blocks carried from one extent into the next so that a long zero stretch is one
//! [`BlockImage::write_zeroes`]. A device without a target is read and checked but not written.

use super::format::{ArchiveHeader, BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE, DEV_SLOTS};
use super::reader::{Extent, VmaReader};
use crate::block::BlockImage;
use crate::error::{Error, Result};
use crate::offsets::GuestOffset;
use std::io::Read;
use std::sync::mpsc;

/// Told how far a restore or verify has got: `(device bytes done, device bytes in total)`.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Extent buffers a restore keeps at most: one being read, one queued, one being written.
const PIPELINE_BUFFERS: usize = 3;

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Write zero blocks as zeros on every target (targets that may hold old data). Otherwise
    /// they are skipped, except on [`RestoreOptions::zero_devices`].
    pub write_zeroes: bool,
    /// Devices (by id) whose zero blocks are written as zeros whatever `write_zeroes` says
    /// (targets that may hold old data among fresh ones).
    pub zero_devices: Vec<u8>,
}

/// What an archive held, per device, as a restore or verify read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTally {
    /// Clusters of the device in the archive.
    pub clusters: u64,
    /// Of those, clusters stored without data (all zero).
    pub zero_clusters: u64,
    /// 4 KiB data blocks stored for the device.
    pub data_blocks: u64,
}

/// The result of reading a whole archive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveTally {
    /// Extents read.
    pub extents: u64,
    /// Archive bytes read (decompressed).
    pub bytes: u64,
    /// Per device id (index = id; entries of absent devices stay zero).
    pub devices: Vec<DeviceTally>,
}

impl ArchiveTally {
    fn new() -> Self {
        ArchiveTally {
            devices: vec![DeviceTally::default(); DEV_SLOTS],
            ..Self::default()
        }
    }

    fn count(&mut self, ext: &Extent) {
        for e in &ext.entries {
            let t = &mut self.devices[e.dev_id as usize];
            t.clusters += 1;
            t.zero_clusters += (e.mask == 0) as u64;
            t.data_blocks += e.mask.count_ones() as u64;
        }
    }
}

/// Where to write each device: `targets[id]`, `None` to skip the device.
pub type Targets<'a> = [Option<&'a dyn BlockImage>];

/// Writes the clusters of one extent to their targets.
struct Applier<'a, 't> {
    targets: &'t Targets<'a>,
    sizes: Vec<u64>,
    /// Per device id: whether its zero blocks are written.
    zeroes: Vec<bool>,
}

/// A pending write: `len` bytes at guest offset `off` of device `dev`, from `data[at..]` (or
/// zeros, for a zero run).
#[derive(Debug, Clone, Copy)]
struct Run {
    dev: u8,
    off: u64,
    at: usize,
    len: u64,
    zero: bool,
}

impl Applier<'_, '_> {
    fn new<'a, 't>(
        header: &ArchiveHeader,
        targets: &'t Targets<'a>,
        opts: &RestoreOptions,
    ) -> Applier<'a, 't> {
        let mut sizes = vec![0u64; DEV_SLOTS];
        for d in &header.devices {
            sizes[d.id as usize] = d.size;
        }
        let mut zeroes = vec![opts.write_zeroes; DEV_SLOTS];
        for &id in &opts.zero_devices {
            zeroes[id as usize] = true;
        }
        Applier {
            targets,
            sizes,
            zeroes,
        }
    }

    fn target(&self, dev: u8) -> Option<&dyn BlockImage> {
        self.targets.get(dev as usize).copied().flatten()
    }

    /// Writes `run`, if there is one.
    fn flush(&self, run: Option<Run>, data: &[u8]) -> Result<()> {
        let Some(r) = run else { return Ok(()) };
        let Some(t) = self.target(r.dev) else {
            return Ok(());
        };
        if r.zero {
            t.write_zeroes(GuestOffset(r.off), r.len, true)
        } else {
            t.write_at(&data[r.at..r.at + r.len as usize], GuestOffset(r.off))
        }
    }

    /// Writes the clusters of `ext` (already checked by the reader: every entry names a device,
    /// lies inside it and has its data present). `carried` is a run of zeros left over from
    /// the extent before, continued or written here; a run of zeros this extent ends with is
    /// left in it for the next one (the caller writes the last).
    fn apply(&self, ext: &Extent, carried: &mut Option<Run>) -> Result<()> {
        let mut run: Option<Run> = carried.take();
        for e in &ext.entries {
            if self.target(e.dev_id).is_none() {
                continue;
            }
            let size = self.sizes[e.dev_id as usize];
            let mut at = e.data_start;
            for j in 0..BLOCKS_PER_CLUSTER {
                let off = e.offset() + j as u64 * BLOCK_SIZE;
                if off >= size {
                    break;
                }
                let len = (size - off).min(BLOCK_SIZE);
                let zero = e.mask & (1 << j) == 0;
                if zero && !self.zeroes[e.dev_id as usize] {
                    continue;
                }
                let next = Run {
                    dev: e.dev_id,
                    off,
                    at,
                    len,
                    zero,
                };
                run = match run {
                    Some(r)
                        if r.dev == next.dev
                            && r.zero == zero
                            && r.off + r.len == off
                            && (zero || r.at + r.len as usize == at) =>
                    {
                        Some(Run {
                            len: r.len + len,
                            ..r
                        })
                    }
                    other => {
                        self.flush(other, &ext.data)?;
                        Some(next)
                    }
                };
                if !zero {
                    at += BLOCK_SIZE as usize;
                }
            }
        }
        match run {
            Some(r) if r.zero => {
                *carried = Some(r);
                Ok(())
            }
            other => self.flush(other, &ext.data),
        }
    }
}

/// Bytes of device data an extent covers (for progress).
fn covered(ext: &Extent, sizes: &[u64]) -> u64 {
    ext.entries
        .iter()
        .map(|e| (sizes[e.dev_id as usize] - e.offset()).min(CLUSTER_SIZE))
        .sum()
}

/// Restores the rest of the archive `reader` into `targets` (indexed by device id), then
/// checks that every cluster of every device was present. Returns what the archive held.
pub fn restore<R: Read + Send>(
    mut reader: VmaReader<R>,
    targets: &Targets<'_>,
    opts: RestoreOptions,
    progress: Option<Progress<'_>>,
) -> Result<ArchiveTally> {
    let applier = Applier::new(reader.header(), targets, &opts);
    let total: u64 = reader.header().devices.iter().map(|d| d.size).sum();
    let (full_tx, full_rx) = mpsc::sync_channel::<Extent>(1);
    let (free_tx, free_rx) = mpsc::channel::<Extent>();
    std::thread::scope(|s| {
        let sizes = &applier.sizes;
        let producer = s.spawn(move || -> Result<ArchiveTally> {
            let mut tally = ArchiveTally::new();
            let mut made = 0usize;
            loop {
                let mut ext = match free_rx.try_recv() {
                    Ok(e) => e,
                    Err(_) if made < PIPELINE_BUFFERS => {
                        made += 1;
                        Extent::default()
                    }
                    Err(_) => match free_rx.recv() {
                        Ok(e) => e,
                        // The writer stopped (it failed); its error is the one to report.
                        Err(_) => return Ok(tally),
                    },
                };
                if !reader.read_extent(&mut ext)? {
                    break;
                }
                tally.count(&ext);
                if full_tx.send(ext).is_err() {
                    return Ok(tally);
                }
            }
            drop(full_tx);
            reader.check_complete()?;
            tally.extents = reader.extents_read();
            tally.bytes = reader.position();
            Ok(tally)
        });
        let mut done = 0u64;
        if let Some(p) = progress {
            p(0, total);
        }
        let mut written: Result<()> = Ok(());
        let mut carried: Option<Run> = None;
        for ext in full_rx.iter() {
            written = applier.apply(&ext, &mut carried);
            if written.is_err() {
                break;
            }
            done += covered(&ext, sizes);
            if let Some(p) = progress {
                p(done, total);
            }
            let _ = free_tx.send(ext);
        }
        // Dropping the receiving ends stops a producer that is still reading.
        drop(full_rx);
        drop(free_tx);
        let read = producer
            .join()
            .unwrap_or_else(|_| Err(Error::corrupt("the archive reader thread panicked")));
        written?;
        let tally = read?;
        // The zeros the last extent ended with (only once the archive proved complete: a
        // damaged archive fails as before, with nothing more written).
        applier.flush(carried, &[])?;
        Ok(tally)
    })
}

/// Reads the rest of the archive, checking every structure and that every cluster of every
/// device is there exactly once, without writing anything.
pub fn verify<R: Read>(
    mut reader: VmaReader<R>,
    progress: Option<Progress<'_>>,
) -> Result<ArchiveTally> {
    let mut sizes = vec![0u64; DEV_SLOTS];
    for d in &reader.header().devices {
        sizes[d.id as usize] = d.size;
    }
    let total: u64 = sizes.iter().sum();
    let mut tally = ArchiveTally::new();
    let mut ext = Extent::default();
    let mut done = 0u64;
    while reader.read_extent(&mut ext)? {
        tally.count(&ext);
        done += covered(&ext, &sizes);
        if let Some(p) = progress {
            p(done, total);
        }
    }
    reader.check_complete()?;
    tally.extents = reader.extents_read();
    tally.bytes = reader.position();
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::RawImage;
    use crate::storage::MemStorage;
    use crate::vma::{ArchiveHeader, VmaWriter};
    use proptest::prelude::*;
    use std::path::Path;

    /// A device's contents from a seed: blocks of zeros, of one byte, or of noise.
    fn contents(size: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut v = vec![0u8; size];
        for block in v.chunks_mut(4096) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 3 {
                0 => {}
                1 => block.fill((x >> 8) as u8 | 1),
                _ => block
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = (x >> (i % 56)) as u8),
            }
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any devices, any cluster order, either writer mode: restoring gives the model back,
        /// into fresh targets and (writing zeros) into targets full of old data.
        #[test]
        fn write_then_restore_matches_the_model(
            sizes in proptest::collection::vec(1usize..(6 * 128), 1..5),
            seed in any::<u64>(),
            order_seed in any::<u64>(),
            background in any::<bool>(),
        ) {
            let mut header = ArchiveHeader::new([9; 16], 0);
            let model: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, s)| contents(s * 512, seed.wrapping_add(i as u64)))
                .collect();
            let mut order = Vec::new();
            for (i, m) in model.iter().enumerate() {
                let id = header.add_device(&format!("d{i}"), m.len() as u64).unwrap();
                for c in 0..(m.len() as u64).div_ceil(CLUSTER_SIZE) {
                    order.push((id, c as u32));
                }
            }
            let mut x = order_seed | 1;
            for i in (1..order.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                order.swap(i, (x >> 33) as usize % (i + 1));
            }
            let mut w = VmaWriter::new(Vec::new(), header, background).unwrap();
            for &(id, c) in &order {
                let m = &model[id as usize - 1];
                let from = c as usize * CLUSTER_SIZE as usize;
                let to = (from + CLUSTER_SIZE as usize).min(m.len());
                w.write_cluster(id, c, &m[from..to]).unwrap();
            }
            let (archive, _) = w.finish().unwrap();
            // Fresh targets; targets full of old data, all zeroed; and a mix, only the
            // devices with old data zeroed (zero_devices).
            for mode in 0..3 {
                let old_data = |i: usize| mode == 1 || (mode == 2 && i % 2 == 1);
                let imgs: Vec<RawImage> = model
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let fill = if old_data(i) { 0xee } else { 0 };
                        let s = MemStorage::new(vec![fill; m.len()]);
                        RawImage::from_storage(Box::new(s), Path::new("mem"), true).unwrap()
                    })
                    .collect();
                let mut targets: Vec<Option<&dyn BlockImage>> = vec![None; DEV_SLOTS];
                for (i, img) in imgs.iter().enumerate() {
                    targets[i + 1] = Some(img);
                }
                let opts = RestoreOptions {
                    write_zeroes: mode == 1,
                    zero_devices: (0..model.len())
                        .filter(|&i| mode == 2 && old_data(i))
                        .map(|i| i as u8 + 1)
                        .collect(),
                };
                let reader = VmaReader::new(&archive[..]).unwrap();
                let tally = restore(reader, &targets, opts, None).unwrap();
                prop_assert_eq!(tally.bytes, archive.len() as u64);
                for (img, m) in imgs.iter().zip(&model) {
                    let mut got = vec![0u8; m.len()];
                    img.read_at(&mut got, GuestOffset(0)).unwrap();
                    prop_assert!(&got == m);
                }
            }
            // And verify agrees.
            let tally = verify(VmaReader::new(&archive[..]).unwrap(), None).unwrap();
            prop_assert_eq!(tally.devices[1].clusters, (model[0].len() as u64).div_ceil(CLUSTER_SIZE));
        }
    }

    /// A raw image in memory that counts its zero writes.
    struct CountingZeroes {
        inner: RawImage,
        zero_writes: std::sync::atomic::AtomicUsize,
    }

    impl BlockImage for CountingZeroes {
        fn format(&self) -> crate::block::ImageFormat {
            self.inner.format()
        }
        fn filename(&self) -> &Path {
            self.inner.filename()
        }
        fn virtual_size(&self) -> u64 {
            self.inner.virtual_size()
        }
        fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: GuestOffset, len: u64, unmap: bool) -> Result<()> {
            self.zero_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.write_zeroes(offset, len, unmap)
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()
        }
        fn block_status(
            &self,
            offset: GuestOffset,
            max_len: u64,
        ) -> Result<crate::block::BlockStatus> {
            self.inner.block_status(offset, max_len)
        }
        fn is_writable(&self) -> bool {
            true
        }
        fn actual_size(&self) -> Option<u64> {
            None
        }
        fn layer_info(&self) -> Result<crate::info::LayerInfo> {
            self.inner.layer_info()
        }
    }

    /// A long stretch of zeros over several extents is zeroed with one write, not one per
    /// extent (the run is carried from extent to extent).
    #[test]
    fn zero_runs_continue_across_extents() {
        let size = 10usize << 20; // 160 clusters: three extents.
        let mut header = ArchiveHeader::new([9; 16], 0);
        let id = header.add_device("d", size as u64).unwrap();
        let mut model = vec![0u8; size];
        model[..4096].fill(0x5a);
        model[size - 4096..].fill(0x6b);
        let mut w = VmaWriter::new(Vec::new(), header, false).unwrap();
        for (c, chunk) in model.chunks(CLUSTER_SIZE as usize).enumerate() {
            w.write_cluster(id, c as u32, chunk).unwrap();
        }
        let (archive, _) = w.finish().unwrap();
        let storage = MemStorage::new(vec![0xee; size]);
        let img = CountingZeroes {
            inner: RawImage::from_storage(Box::new(storage), Path::new("mem"), true).unwrap(),
            zero_writes: Default::default(),
        };
        let mut targets: Vec<Option<&dyn BlockImage>> = vec![None; DEV_SLOTS];
        targets[id as usize] = Some(&img);
        let opts = RestoreOptions {
            zero_devices: vec![id],
            ..Default::default()
        };
        let tally = restore(VmaReader::new(&archive[..]).unwrap(), &targets, opts, None).unwrap();
        assert!(tally.extents >= 3, "{} extents", tally.extents);
        let mut got = vec![0u8; size];
        img.read_at(&mut got, GuestOffset(0)).unwrap();
        assert!(got == model);
        assert_eq!(img.zero_writes.into_inner(), 1);
    }
}
