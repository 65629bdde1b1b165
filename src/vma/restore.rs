//! Restoring an archive into images, in the order its clusters come (vma.md "Extents"), and
//! verifying one without writing anything.
//!
//! [`restore`] runs two threads: one reads and checks extents (and decompresses, when the input
//! does), the other writes their clusters to the target images, so reading and writing overlap.
//! Writes are coalesced: the data blocks of consecutive clusters of one device that follow each
//! other in an extent go out as one write. Zero blocks are not written (the targets are fresh
//! and read as zeros), unless [`RestoreOptions::write_zeroes`] says the targets may hold old
//! data. A device without a target is read and checked but not written.

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
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Write zero blocks as zeros (targets that may hold old data). Otherwise they are skipped.
    pub write_zeroes: bool,
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
    opts: RestoreOptions,
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
        opts: RestoreOptions,
    ) -> Applier<'a, 't> {
        let mut sizes = vec![0u64; DEV_SLOTS];
        for d in &header.devices {
            sizes[d.id as usize] = d.size;
        }
        Applier {
            targets,
            sizes,
            opts,
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
    /// lies inside it and has its data present).
    fn apply(&self, ext: &Extent) -> Result<()> {
        let mut run: Option<Run> = None;
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
                if zero && !self.opts.write_zeroes {
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
        self.flush(run, &ext.data)
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
    let applier = Applier::new(reader.header(), targets, opts);
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
        for ext in full_rx.iter() {
            written = applier.apply(&ext);
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
        read
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
