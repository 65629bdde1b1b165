//! [`VmaReader`]: reads an archive as a stream, extent by extent, in the order the clusters
//! come (vma.md "Extents"), checking everything "What a reader must reject" lists.
//!
//! The main header is checked when the reader is made ([`ArchiveHeader::parse`]); each extent
//! when it is read: its header (magic, md5, uuid, reserved fields, block count), every entry
//! against the devices (known id, cluster inside the device, no data block past its end, no
//! cluster seen before), and its data (all of it present). [`VmaReader::check_complete`] then
//! says whether every cluster of every device was seen. Nothing read is trusted before it is
//! checked, and no allocation is larger than [`MAX_HEADER_SIZE`] or one extent's data.
//!
//! Offsets in errors are byte positions in the archive as read (for a compressed archive, in
//! the decompressed stream).

use super::clusters::ClusterSet;
#[cfg(doc)]
use super::format::MAX_HEADER_SIZE;
use super::format::{
    parse_extent_header, ArchiveHeader, BlockInfo, BLOCK_SIZE, CLUSTER_SIZE, DEV_SLOTS,
    EXTENT_HEADER_SIZE, HEADER_FIXED_SIZE, MAX_EXTENT_DATA,
};
use crate::error::{Error, Result};
use std::io::{self, Read};

/// One cluster of an extent: which it is, which blocks it carries, and where their data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterEntry {
    /// The device (1 to 254).
    pub dev_id: u8,
    /// The cluster number within the device.
    pub cluster: u32,
    /// Bit j set: block j of the cluster is stored; clear bits are zero blocks.
    pub mask: u16,
    /// Where the cluster's first stored block starts in [`Extent::data`]; its blocks follow
    /// each other in block order.
    pub data_start: usize,
}

impl ClusterEntry {
    /// The guest offset of the cluster in its device.
    pub fn offset(&self) -> u64 {
        self.cluster as u64 * CLUSTER_SIZE
    }
}

/// An extent as read: its entries and its data blocks. Reused from one read to the next.
#[derive(Debug, Default)]
pub struct Extent {
    /// Its number in the archive, from 0.
    pub index: u64,
    /// The archive offset of its header.
    pub offset: u64,
    /// Its clusters, in stored order.
    pub entries: Vec<ClusterEntry>,
    /// Its data blocks, 4 KiB each.
    pub data: Vec<u8>,
}

/// Reads an archive from `R`.
pub struct VmaReader<R: Read> {
    input: R,
    header: ArchiveHeader,
    /// Archive bytes consumed so far.
    pos: u64,
    /// Extents read so far.
    extents: u64,
    /// Device sizes by id (0: no device).
    sizes: Vec<u64>,
    /// Clusters seen, by device id.
    seen: Vec<ClusterSet>,
    infos: Vec<BlockInfo>,
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_error(e: io::Error, at: u64) -> Error {
    Error::io("cannot read the archive", e).at(at)
}

impl<R: Read> VmaReader<R> {
    /// Reads and checks the main header from `input` (positioned at the archive's start).
    pub fn new(mut input: R) -> Result<Self> {
        let mut head = vec![0u8; HEADER_FIXED_SIZE];
        let n = read_full(&mut input, &mut head).map_err(|e| read_error(e, 0))?;
        if n >= 4 && head[..4] != super::format::MAGIC {
            return Err(Error::corrupt("not a VMA archive (bad magic)").at(0));
        }
        head.truncate(n);
        let size = ArchiveHeader::header_size(&head)?;
        // Read the rest as it arrives: a truncated archive claiming a large header costs only
        // what it holds.
        let rest = (size - HEADER_FIXED_SIZE) as u64;
        (&mut input)
            .take(rest)
            .read_to_end(&mut head)
            .map_err(|e| read_error(e, HEADER_FIXED_SIZE as u64))?;
        let header = ArchiveHeader::parse(&head)?;
        let mut sizes = vec![0u64; DEV_SLOTS];
        for d in &header.devices {
            sizes[d.id as usize] = d.size;
        }
        Ok(VmaReader {
            input,
            header,
            pos: size as u64,
            extents: 0,
            sizes,
            seen: vec![ClusterSet::new(); DEV_SLOTS],
            infos: Vec::new(),
        })
    }

    /// The archive's main header.
    pub fn header(&self) -> &ArchiveHeader {
        &self.header
    }

    /// Archive bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Extents read so far.
    pub fn extents_read(&self) -> u64 {
        self.extents
    }

    /// Clusters of device `dev_id` seen so far.
    pub fn clusters_seen(&self, dev_id: u8) -> u64 {
        self.seen[dev_id as usize].len()
    }

    /// Reads the next extent into `ext`; returns `false` at the end of the archive (which
    /// must fall on an extent boundary).
    pub fn read_extent(&mut self, ext: &mut Extent) -> Result<bool> {
        let at = self.pos;
        let index = self.extents;
        let mut h = [0u8; EXTENT_HEADER_SIZE];
        let n = read_full(&mut self.input, &mut h).map_err(|e| read_error(e, at))?;
        if n == 0 {
            return Ok(false);
        }
        let block_count = parse_extent_header(&h[..n], &self.header.uuid, &mut self.infos)
            .map_err(|e| {
                let rel = e.offset().unwrap_or(0);
                Error::new(e.kind(), format!("extent {index}: {}", e.what())).at(at + rel)
            })?;
        let data_len = block_count * BLOCK_SIZE as usize;
        if data_len > MAX_EXTENT_DATA {
            // Cannot happen with at most 59 masks of 16 bits; checked so that no count read
            // from the file sizes an allocation unchecked.
            return Err(Error::corrupt(format!(
                "extent {index}: {block_count} blocks is more than an extent can hold"
            ))
            .at(at));
        }
        ext.index = index;
        ext.offset = at;
        ext.entries.clear();
        let mut data_start = 0usize;
        for (i, info) in self.infos.iter().enumerate() {
            let entry_at = at + 40 + 8 * i as u64;
            let bad = |what: String| {
                Err(Error::corrupt(format!("extent {index}, entry {i}: {what}")).at(entry_at))
            };
            let size = self.sizes[info.dev_id as usize];
            if size == 0 {
                return bad(format!("unknown device id {}", info.dev_id));
            }
            let base = info.cluster as u64 * CLUSTER_SIZE;
            if base >= size {
                return bad(format!(
                    "cluster {} lies past the end of device {} ({size} bytes, {} clusters)",
                    info.cluster,
                    info.dev_id,
                    size.div_ceil(CLUSTER_SIZE)
                ));
            }
            // The highest block the mask writes (an empty mask writes none).
            let last_block = 15u64.checked_sub(u64::from(info.mask.leading_zeros()));
            if let Some(last_block) = last_block.filter(|&b| base + b * BLOCK_SIZE >= size) {
                return bad(format!(
                    "data block {last_block} of cluster {} lies past the end of device {} \
                     ({size} bytes)",
                    info.cluster, info.dev_id
                ));
            }
            if !self.seen[info.dev_id as usize].insert(info.cluster as u64) {
                return bad(format!(
                    "cluster {} of device {} appears a second time",
                    info.cluster, info.dev_id
                ));
            }
            ext.entries.push(ClusterEntry {
                dev_id: info.dev_id,
                cluster: info.cluster,
                mask: info.mask,
                data_start,
            });
            data_start += info.blocks() * BLOCK_SIZE as usize;
        }
        ext.data.resize(data_len, 0);
        let data_at = at + EXTENT_HEADER_SIZE as u64;
        let got = read_full(&mut self.input, &mut ext.data).map_err(|e| read_error(e, data_at))?;
        if got < data_len {
            return Err(Error::corrupt(format!(
                "extent {index}: archive ends inside the extent's data ({got} of {data_len} bytes)"
            ))
            .at(data_at + got as u64));
        }
        self.pos = data_at + data_len as u64;
        self.extents += 1;
        Ok(true)
    }

    /// Fails unless every cluster of every device was seen (vma.md "What a reader must
    /// reject": on extract, any cluster never seen), naming the first missing one.
    pub fn check_complete(&self) -> Result<()> {
        for d in &self.header.devices {
            let set = &self.seen[d.id as usize];
            if let Some(c) = set.first_missing(d.clusters()) {
                return Err(Error::corrupt(format!(
                    "archive incomplete: device {} ('{}') lacks {} of its {} clusters, the first \
                     at guest offset {:#x} (cluster {c})",
                    d.id,
                    d.name,
                    d.clusters() - set.len(),
                    d.clusters(),
                    c * CLUSTER_SIZE
                ))
                .at(self.pos));
            }
        }
        Ok(())
    }

    /// Reads the rest of the archive, checking everything, and then its completeness.
    pub fn read_to_end(&mut self) -> Result<()> {
        let mut ext = Extent::default();
        while self.read_extent(&mut ext)? {}
        self.check_complete()
    }
}
