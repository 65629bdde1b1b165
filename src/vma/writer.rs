//! [`VmaWriter`]: writes an archive from 64 KiB clusters handed to it in any order, for any of
//! its devices (vma.md "Extents": "every cluster ... appears exactly once, in any order,
//! interleaved across devices").
//!
//! Clusters are gathered into extents of [`WRITER_EXTENT_ENTRIES`] entries, as Proxmox's writer
//! makes them; 4 KiB blocks that are all zeros are left out (their mask bit is clear), so an
//! all-zero cluster costs an 8-byte entry. Each extent is written with one `write_all` of its
//! header and data, built in place in one buffer (the data is copied once, from the caller's
//! cluster into the extent). With a background thread ([`VmaWriter::new`]'s `background`), that
//! write, and any compression the output does, runs while the caller reads the next clusters.
//!
//! The writer refuses a cluster given twice or past its device's end, and [`VmaWriter::finish`]
//! refuses to end an archive that lacks a cluster, so every archive it completes is whole.

use super::clusters::ClusterSet;
use super::format::{
    cluster_count, encode_extent_header, ArchiveHeader, BlockInfo, BLOCKS_PER_CLUSTER, BLOCK_SIZE,
    CLUSTER_SIZE, DEV_SLOTS, EXTENT_HEADER_SIZE, WRITER_EXTENT_ENTRIES,
};
use crate::error::{Error, Result};
use crate::zeros::is_zero;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Extent buffers in use at once in background mode: one being filled, one queued, one being
/// written.
const BACKGROUND_BUFFERS: usize = 3;

/// What a finished archive holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Clusters written (all devices).
    pub clusters: u64,
    /// Clusters stored without data (all blocks zero).
    pub zero_clusters: u64,
    /// 4 KiB data blocks stored.
    pub data_blocks: u64,
    /// Extents written.
    pub extents: u64,
    /// Bytes of archive written (before any compression of the output).
    pub bytes: u64,
}

/// Where finished extents go: straight to the output, or to a thread that writes them.
enum Sink<W: Write + Send + 'static> {
    /// Written by the caller's thread; `None` once finished.
    Direct(Option<W>),
    Background {
        /// Full buffers to write; `None` once closed.
        tx: Option<SyncSender<Vec<u8>>>,
        /// Written buffers coming back for reuse.
        back: Receiver<Vec<u8>>,
        /// The writing thread; it returns the output when done.
        handle: Option<JoinHandle<io::Result<W>>>,
        /// Buffers made so far.
        made: usize,
    },
}

impl<W: Write + Send + 'static> Sink<W> {
    fn new(out: W, background: bool) -> Result<Self> {
        if !background {
            return Ok(Sink::Direct(Some(out)));
        }
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(1);
        let (back_tx, back) = mpsc::channel::<Vec<u8>>();
        let handle = std::thread::Builder::new()
            .name("vma-writer".into())
            .spawn(move || {
                let mut out = out;
                for buf in rx {
                    out.write_all(&buf)?;
                    let _ = back_tx.send(buf);
                }
                out.flush()?;
                Ok(out)
            })
            .map_err(|e| Error::io("cannot start the archive writer thread", e))?;
        Ok(Sink::Background {
            tx: Some(tx),
            back,
            handle: Some(handle),
            made: 1,
        })
    }

    /// Writes `buf` and returns an empty buffer for the next extent.
    fn put(&mut self, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        match self {
            Sink::Direct(w) => {
                w.as_mut()
                    .ok_or_else(|| io::Error::other("the archive is finished"))?
                    .write_all(&buf)?;
                buf.clear();
                Ok(buf)
            }
            Sink::Background {
                tx,
                back,
                handle,
                made,
            } => {
                let sent = tx.as_ref().map(|t| t.send(buf).is_ok()).unwrap_or(false);
                if !sent {
                    return Err(Self::thread_error(tx, handle));
                }
                let next = match back.try_recv() {
                    Ok(b) => Some(b),
                    Err(_) if *made < BACKGROUND_BUFFERS => {
                        *made += 1;
                        Some(Vec::new())
                    }
                    Err(_) => back.recv().ok(),
                };
                match next {
                    Some(mut b) => {
                        b.clear();
                        Ok(b)
                    }
                    None => Err(Self::thread_error(tx, handle)),
                }
            }
        }
    }

    /// The error that stopped the writing thread.
    fn thread_error(
        tx: &mut Option<SyncSender<Vec<u8>>>,
        handle: &mut Option<JoinHandle<io::Result<W>>>,
    ) -> io::Error {
        tx.take();
        match handle.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("the archive writer thread panicked"),
            _ => io::Error::other("the archive writer thread stopped"),
        }
    }

    /// Flushes everything and returns the output.
    fn finish(mut self) -> io::Result<W> {
        match &mut self {
            Sink::Direct(w) => {
                let mut w = w
                    .take()
                    .ok_or_else(|| io::Error::other("the archive is finished"))?;
                w.flush()?;
                Ok(w)
            }
            Sink::Background { tx, handle, .. } => {
                tx.take();
                match handle.take().map(|h| h.join()) {
                    Some(Ok(r)) => r,
                    Some(Err(_)) => Err(io::Error::other("the archive writer thread panicked")),
                    None => Err(io::Error::other("the archive writer thread stopped")),
                }
            }
        }
    }

    /// A sink with nothing behind it (what `finish` leaves in place).
    fn empty() -> Self {
        Sink::Direct(None)
    }
}

impl<W: Write + Send + 'static> Drop for Sink<W> {
    /// An unfinished background sink stops its thread and waits for it, so nothing writes to
    /// the output after the writer is gone (a failed backup removes its file afterwards).
    fn drop(&mut self) {
        if let Sink::Background { tx, handle, .. } = self {
            tx.take();
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// Writes a VMA archive to `W`: the header at once, then clusters as they are given.
pub struct VmaWriter<W: Write + Send + 'static> {
    header: ArchiveHeader,
    sink: Sink<W>,
    /// The extent being filled: room for its header, then the data of its entries.
    buf: Vec<u8>,
    /// Its block-info entries.
    entries: Vec<u64>,
    /// Device sizes by id (0 for no device).
    sizes: Vec<u64>,
    /// Clusters written, by device id.
    seen: Vec<ClusterSet>,
    stats: WriterStats,
}

impl<W: Write + Send + 'static> VmaWriter<W> {
    /// Starts an archive with `header` on `out`. With `background`, extents are written by a
    /// thread of their own while the caller goes on.
    pub fn new(out: W, header: ArchiveHeader, background: bool) -> Result<Self> {
        let head = header.encode()?;
        let mut sizes = vec![0u64; DEV_SLOTS];
        for d in &header.devices {
            sizes[d.id as usize] = d.size;
        }
        let mut sink = Sink::new(out, background)?;
        let stats = WriterStats {
            bytes: head.len() as u64,
            ..WriterStats::default()
        };
        let mut buf = sink
            .put(head)
            .map_err(|e| Error::io("cannot write the archive header", e))?;
        buf.resize(EXTENT_HEADER_SIZE, 0);
        Ok(VmaWriter {
            header,
            sink,
            buf,
            entries: Vec::with_capacity(WRITER_EXTENT_ENTRIES),
            sizes,
            seen: vec![ClusterSet::new(); DEV_SLOTS],
            stats,
        })
    }

    /// The archive's header.
    pub fn header(&self) -> &ArchiveHeader {
        &self.header
    }

    /// What has been written so far.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Adds cluster `cluster` of device `dev_id`. `data` holds the cluster's first bytes (at
    /// most [`CLUSTER_SIZE`]); what it lacks reads as zeros, so an empty slice is an all-zero
    /// cluster. Bytes past the device's end must be zero. Fails for an unknown device, a cluster
    /// past the device's end, or one written before.
    pub fn write_cluster(&mut self, dev_id: u8, cluster: u32, data: &[u8]) -> Result<()> {
        let size = self.sizes.get(dev_id as usize).copied().unwrap_or(0);
        if size == 0 {
            return Err(Error::invalid_input(format!(
                "no device {dev_id} in this archive"
            )));
        }
        let base = cluster as u64 * CLUSTER_SIZE;
        if cluster as u64 >= cluster_count(size) || data.len() as u64 > CLUSTER_SIZE {
            return Err(Error::invalid_input(format!(
                "cluster {cluster} ({} bytes) lies past the end of device {dev_id} ({size} bytes)",
                data.len()
            )));
        }
        let in_device = (size - base).min(CLUSTER_SIZE) as usize;
        if data.len() > in_device && !is_zero(&data[in_device..]) {
            return Err(Error::invalid_input(format!(
                "cluster {cluster} of device {dev_id} holds data past the device's end"
            )));
        }
        if !self.seen[dev_id as usize].insert(cluster as u64) {
            return Err(Error::invalid_input(format!(
                "cluster {cluster} of device {dev_id} was already written"
            )));
        }
        let data = &data[..data.len().min(in_device)];
        let mut mask = 0u16;
        for (j, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            if is_zero(block) {
                continue;
            }
            mask |= 1 << j;
            self.buf.extend_from_slice(block);
            // The block holding the device's end is padded (vma.md "Extents").
            let pad = BLOCK_SIZE as usize - block.len();
            self.buf.resize(self.buf.len() + pad, 0);
        }
        debug_assert!(data.len() <= BLOCKS_PER_CLUSTER * BLOCK_SIZE as usize);
        self.stats.clusters += 1;
        self.stats.data_blocks += mask.count_ones() as u64;
        self.stats.zero_clusters += (mask == 0) as u64;
        self.entries.push(
            BlockInfo {
                mask,
                dev_id,
                cluster,
            }
            .encode(),
        );
        if self.entries.len() == WRITER_EXTENT_ENTRIES {
            self.flush_extent()?;
        }
        Ok(())
    }

    /// Writes the extent being filled (even if it has no entries).
    fn flush_extent(&mut self) -> Result<()> {
        encode_extent_header(&self.header.uuid, &self.entries, &mut self.buf);
        self.stats.bytes += self.buf.len() as u64;
        self.stats.extents += 1;
        let full = std::mem::take(&mut self.buf);
        self.buf = self
            .sink
            .put(full)
            .map_err(|e| Error::io("cannot write to the archive", e))?;
        self.buf.resize(EXTENT_HEADER_SIZE, 0);
        self.entries.clear();
        Ok(())
    }

    /// The first cluster not written yet, as `(device id, cluster)`, if any.
    pub fn first_missing(&self) -> Option<(u8, u64)> {
        self.header.devices.iter().find_map(|d| {
            self.seen[d.id as usize]
                .first_missing(d.clusters())
                .map(|c| (d.id, c))
        })
    }

    /// Ends the archive: writes the last extent (an empty one for an archive without devices,
    /// vma.md "Extents") and returns the output, flushed. Fails if a cluster of some device was
    /// never written.
    pub fn finish(mut self) -> Result<(W, WriterStats)> {
        if let Some((id, c)) = self.first_missing() {
            let name = self
                .header
                .device(id)
                .map(|d| d.name.as_str())
                .unwrap_or("?");
            return Err(Error::invalid_input(format!(
                "archive incomplete: cluster {c} of device '{name}' was never written"
            )));
        }
        if !self.entries.is_empty() || self.stats.extents == 0 {
            self.flush_extent()?;
        }
        let stats = self.stats.clone();
        let out = std::mem::replace(&mut self.sink, Sink::empty())
            .finish()
            .map_err(|e| Error::io("cannot write to the archive", e))?;
        Ok((out, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ArchiveHeader {
        let mut h = ArchiveHeader::new([1; 16], 0);
        h.add_device("a", 3 * CLUSTER_SIZE - 512).unwrap();
        h
    }

    #[test]
    fn refuses_duplicates_out_of_range_and_incomplete_archives() {
        let mut w = VmaWriter::new(Vec::new(), header(), false).unwrap();
        w.write_cluster(1, 0, &[]).unwrap();
        assert!(w.write_cluster(1, 0, &[]).is_err());
        assert!(w.write_cluster(1, 3, &[]).is_err());
        assert!(w.write_cluster(2, 0, &[]).is_err());
        // Data past the device's end (the last 512 bytes of cluster 2).
        let mut c = vec![0u8; CLUSTER_SIZE as usize];
        c[CLUSTER_SIZE as usize - 1] = 1;
        assert!(w.write_cluster(1, 2, &c).is_err());
        w.write_cluster(1, 2, &c[..1000]).unwrap();
        let e = w.finish().unwrap_err();
        assert!(e.to_string().contains("cluster 1"), "{e}");
    }

    #[test]
    fn zero_blocks_are_left_out_and_extents_hold_58_entries() {
        for background in [false, true] {
            let mut h = ArchiveHeader::new([2; 16], 0);
            h.add_device("a", 60 * CLUSTER_SIZE).unwrap();
            let mut w = VmaWriter::new(Vec::new(), h, background).unwrap();
            let mut c = vec![0u8; CLUSTER_SIZE as usize];
            c[4096 * 3] = 9;
            for n in 0..60 {
                w.write_cluster(1, n, if n % 2 == 0 { &c } else { &[] })
                    .unwrap();
            }
            let (out, stats) = w.finish().unwrap();
            assert_eq!(stats.extents, 2);
            assert_eq!(stats.data_blocks, 30);
            assert_eq!(stats.zero_clusters, 30);
            let expect = 12288 + 512 + 2 * 512 + 30 * 4096;
            assert_eq!(out.len(), expect);
            assert_eq!(stats.bytes, expect as u64);
        }
    }

    #[test]
    fn a_diskless_archive_is_the_header_and_one_empty_extent() {
        let h = ArchiveHeader::new([3; 16], 0);
        let (out, _) = VmaWriter::new(Vec::new(), h, false)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(out.len(), 12288 + 512 + 512);
        assert_eq!(&out[12800..12804], b"VMAE");
    }

    /// A failing output is reported, in both modes, and nothing hangs.
    #[test]
    fn output_errors_are_reported() {
        struct Fail;
        impl Write for Fail {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert!(VmaWriter::new(Fail, header(), false).is_err());
        // In background mode the header is queued; the error shows at a later write.
        match VmaWriter::new(Fail, header(), true) {
            Err(e) => assert!(e.to_string().contains("disk full")),
            Ok(mut w) => {
                let mut r = Ok(());
                for n in 0..3 {
                    r = r.and(w.write_cluster(1, n, &[1]));
                }
                let e = r.and_then(|_| w.finish().map(|_| ())).unwrap_err();
                assert!(e.to_string().contains("disk full"), "{e}");
            }
        }
    }
}
