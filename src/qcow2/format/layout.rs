//! Which host clusters hold metadata, and which structure owns each (qcow2.rst: the header, the
//! L1 and L2 tables, the refcount table and blocks, the snapshot table and each snapshot's L1
//! table, the bitmap directory and the encryption header each occupy clusters of their own).
//!
//! A write needs the map twice: to keep guest data off metadata (the write path's overlap guard,
//! as qemu's `overlap-check`), and to refuse images whose structures share clusters, where
//! every metadata update would damage another structure. qemu opens such images and marks them
//! corrupt when a write would overwrite metadata; a vimg write open refuses them up front and
//! leaves them untouched, naming the two structures, and `check -r all` rebuilds the refcount
//! structures when they are the ones in the way.
//!
//! What may share: L2 tables, which several L1 entries may name (the active table's and
//! snapshots', after a snapshot was taken). That is consistent as long as the table's refcount
//! counts every reference, since a write then copies the shared table first instead of
//! changing it in place; [`check_metadata_refcounts`] makes sure of it before a write.

use super::header::Header;
use super::l2::L1E_OFFSET_MASK;
use crate::error::{Error, Result};
use crate::qcow2::refcount::table::{REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use crate::qcow2::snapshot::table as snapshot;
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};
use std::collections::{HashMap, HashSet};

/// What a metadata cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Cluster 0: the header, its extensions and the backing file name.
    Header,
    /// The active L1 table.
    ActiveL1,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// An L2 table of the active L1 table.
    ActiveL2,
    /// An L2 table only snapshots use.
    SnapshotL2,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    SnapshotL1,
    /// The bitmap directory.
    BitmapDirectory,
    /// The LUKS header.
    CryptoHeader,
}

impl Owner {
    /// The structure's name, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Owner::Header => "header",
            Owner::ActiveL1 => "active L1 table",
            Owner::RefcountTable => "refcount table",
            Owner::RefcountBlock => "refcount block",
            Owner::ActiveL2 => "active L2 table",
            Owner::SnapshotL2 => "snapshot L2 table",
            Owner::SnapshotTable => "snapshot table",
            Owner::SnapshotL1 => "snapshot L1 table",
            Owner::BitmapDirectory => "bitmap directory",
            Owner::CryptoHeader => "encryption header",
        }
    }
}

/// The metadata clusters of an image and their owners.
#[derive(Debug, Default)]
pub(crate) struct MetadataMap {
    owners: HashMap<u64, Owner>,
    /// How many L1 entries (active and snapshots') name each L2 table.
    l2_refs: HashMap<u64, u64>,
}

impl MetadataMap {
    /// Maps the metadata of `img`, reading the snapshot table and every snapshot's L1 table
    /// (not the L2 tables: their offsets are in the L1 tables). `reftable` is the refcount
    /// table's entries, or `None` to leave the refcount structures out. Fails, naming them,
    /// when two structures share a cluster, or when a snapshot's L1 table is out of bounds.
    pub(crate) fn build(img: &Qcow2Image, reftable: Option<&[u64]>) -> Result<Self> {
        let h = img.header();
        let cs = h.cluster_size();
        let mut m = MetadataMap::default();
        m.add(h, 0, cs, Owner::Header)?;
        m.add(
            h,
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            Owner::ActiveL1,
        )?;
        if let Some(entries) = reftable {
            m.add(
                h,
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
                Owner::RefcountTable,
            )?;
            for (i, &e) in entries.iter().enumerate() {
                if e & REFT_RESERVED_MASK != 0 {
                    return Err(Error::corrupt(format!(
                        "refcount table entry {i} ({e:#x}) has reserved bits set"
                    ))
                    .at(h.refcount_table_offset + 8 * i as u64));
                }
                if e & REFT_OFFSET_MASK != 0 {
                    m.add(h, e & REFT_OFFSET_MASK, cs, Owner::RefcountBlock)?;
                }
            }
        }
        for &e in img.l1().iter() {
            if e & L1E_OFFSET_MASK != 0 {
                m.add_l2(h, e & L1E_OFFSET_MASK, Owner::ActiveL2)?;
            }
        }
        if h.nb_snapshots > 0 {
            let (snaps, bytes) = snapshot::read_table_with_size(img)?;
            m.add(h, h.snapshots_offset, bytes, Owner::SnapshotTable)?;
            for s in &snaps {
                // qemu opens such an image and refuses only what reads this snapshot's L1
                // table (which vimg validates before every read of it): nothing to map.
                if s.qemu_l1_problem(cs).is_some() {
                    continue;
                }
                s.validate_l1(img)?;
                let l1_bytes = u64::from(s.l1_size) * 8;
                m.add(h, s.l1_table_offset, l1_bytes, Owner::SnapshotL1)?;
                let mut raw = vec![0u8; l1_bytes as usize];
                img.storage()
                    .read_at(&mut raw, s.l1_table_offset)
                    .map_err(|e| {
                        Error::io("cannot read a snapshot's L1 table", e).at(s.l1_table_offset)
                    })?;
                for e in raw.chunks_exact(8).map(BigEndian::read_u64) {
                    if e & L1E_OFFSET_MASK != 0 {
                        m.add_l2(h, e & L1E_OFFSET_MASK, Owner::SnapshotL2)?;
                    }
                }
            }
        }
        if let Some(b) = img.bitmaps_ext() {
            m.add(
                h,
                b.directory_offset,
                b.directory_size,
                Owner::BitmapDirectory,
            )?;
        }
        if let Some((off, len)) = h.crypto_header {
            m.add(h, off, len, Owner::CryptoHeader)?;
        }
        Ok(m)
    }

    /// Records one more L1 reference to the L2 table at `offset`.
    fn add_l2(&mut self, h: &Header, offset: u64, owner: Owner) -> Result<()> {
        self.add(h, offset, h.cluster_size(), owner)?;
        *self.l2_refs.entry(offset / h.cluster_size()).or_default() += 1;
        Ok(())
    }

    /// Records that `[offset, offset + bytes)` belongs to `owner`.
    fn add(&mut self, h: &Header, offset: u64, bytes: u64, owner: Owner) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let cs = h.cluster_size();
        let first = offset / cs;
        let last = offset.saturating_add(bytes - 1) / cs;
        for c in first..=last {
            match self.owners.get(&c).copied() {
                None => {
                    self.owners.insert(c, owner);
                }
                Some(prev) => match (prev, owner) {
                    // Named by several L1 entries: allowed (see the module documentation).
                    (Owner::ActiveL2 | Owner::SnapshotL2, Owner::ActiveL2 | Owner::SnapshotL2) => {
                        if owner == Owner::ActiveL2 {
                            self.owners.insert(c, owner);
                        }
                    }
                    _ => {
                        return Err(Error::corrupt(format!(
                            "metadata overlaps: the {} and the {} share host cluster {c} \
                             (offset {:#x})",
                            prev.name(),
                            owner.name(),
                            c * cs
                        ))
                        .at(c * cs))
                    }
                },
            }
        }
        Ok(())
    }

    /// The owner of host cluster `cluster`, if it holds metadata.
    #[cfg(test)]
    pub(crate) fn owner(&self, cluster: u64) -> Option<Owner> {
        self.owners.get(&cluster).copied()
    }

    /// Every metadata cluster.
    pub(crate) fn clusters(&self) -> HashSet<u64> {
        self.owners.keys().copied().collect()
    }

    /// Metadata clusters and their owners, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, Owner)> + '_ {
        self.owners.iter().map(|(&c, &o)| (c, o))
    }
}

/// Refuses to write an image whose stored refcounts call one of its metadata clusters free
/// (refcount 0): the refcounts are then damaged in a way that lets the allocator hand out
/// clusters in use, and a write could overwrite guest data (qemu writes such images anyway).
/// `check -r all` repairs them. Cheap: only the metadata clusters' refcounts are read.
pub(crate) fn check_metadata_refcounts(img: &Qcow2Image) -> Result<()> {
    use crate::qcow2::refcount::table::{RefcountReader, RefcountTable, Strictness};
    let table = RefcountTable::read(img)?;
    let map = MetadataMap::build(img, Some(table.entries()))?;
    let mut clusters: Vec<(u64, Owner)> = map.iter().collect();
    clusters.sort_unstable_by_key(|&(c, _)| c);
    let mut reader = RefcountReader::new(img, &table, Strictness::Lenient);
    let cs = img.header().cluster_size();
    let damaged = |what: String, c: u64| {
        Err(Error::corrupt(format!(
            "{what}: the refcounts are damaged, and a write could overwrite data in use \
             (repair the image with check -r all)"
        ))
        .at(c * cs))
    };
    for (c, owner) in clusters {
        let r = reader.refcount(c)?;
        let refs = map.l2_refs.get(&c).copied().unwrap_or(1);
        if r < refs {
            let uses = match refs {
                1 => "is in use".to_string(),
                n => format!("is referenced {n} times"),
            };
            let what = format!(
                "the {} at {:#x} {uses} but has refcount {r}",
                owner.name(),
                c * cs
            );
            return damaged(what, c);
        }
    }
    // A write changes an L2 table in place when its L1 entry says it is not shared (COPIED).
    for &e in img.l1().iter() {
        let c = (e & L1E_OFFSET_MASK) / cs;
        if c != 0 && e & super::l2::OFLAG_COPIED != 0 && reader.refcount(c)? != 1 {
            let what = format!(
                "the active L2 table at {:#x} is marked unshared but its refcount is not 1",
                c * cs
            );
            return damaged(what, c);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::format::header::fields;

    #[test]
    fn overlaps_name_both_structures_and_shared_l2_tables_pass() {
        let mut raw = vec![0u8; 4096];
        raw[fields::MAGIC as usize..][..4].copy_from_slice(b"QFI\xfb");
        BigEndian::write_u32(&mut raw[fields::VERSION as usize..], 3);
        BigEndian::write_u32(&mut raw[fields::CLUSTER_BITS as usize..], 9);
        BigEndian::write_u64(&mut raw[fields::SIZE as usize..], 1 << 20);
        BigEndian::write_u32(&mut raw[fields::L1_SIZE as usize..], 32);
        BigEndian::write_u64(&mut raw[fields::L1_TABLE_OFFSET as usize..], 1536);
        BigEndian::write_u64(&mut raw[fields::REFCOUNT_TABLE_OFFSET as usize..], 512);
        BigEndian::write_u32(&mut raw[fields::REFCOUNT_TABLE_CLUSTERS as usize..], 1);
        BigEndian::write_u32(&mut raw[fields::REFCOUNT_ORDER as usize..], 4);
        BigEndian::write_u32(&mut raw[fields::HEADER_LENGTH as usize..], 104);
        let h = Header::parse(&raw, 1 << 20).unwrap();
        let mut m = MetadataMap::default();
        m.add(&h, 0, 512, Owner::Header).unwrap();
        m.add(&h, 2048, 512, Owner::ActiveL2).unwrap();
        m.add(&h, 2048, 512, Owner::SnapshotL2).unwrap();
        m.add(&h, 2048, 512, Owner::ActiveL2).unwrap();
        let e = m.add(&h, 2048, 512, Owner::SnapshotL1).unwrap_err();
        assert!(
            e.to_string()
                .contains("the active L2 table and the snapshot L1"),
            "{e}"
        );
        let e = m.add(&h, 100, 1000, Owner::RefcountTable).unwrap_err();
        assert!(
            e.to_string().contains("header and the refcount table"),
            "{e}"
        );
        assert_eq!(m.owner(4), Some(Owner::ActiveL2));
        assert_eq!(m.owner(5), None);
    }
}
