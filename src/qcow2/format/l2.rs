//! L1 and L2 table entries (qcow2.rst "Cluster mapping"), decoded into what they say about a
//! guest cluster. Pure functions of the entry bits and the header, shared by the read path and
//! the consistency check.

use super::compress::CompressedDesc;
use super::header::Header;
use crate::error::{Error, Result};

/// L1 entry bits 9-55: host offset of the L2 table.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero (0-8, 56-62).
pub(crate) const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry bits 9-55: host cluster offset of a standard cluster.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 entry bits that must be zero (1-8, 56-61).
pub(crate) const L2E_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Bit 63 of L1 and L2 entries: the refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3, not extended): reads as zero.
pub const OFLAG_ZERO: u64 = 1;

/// The L2 table offset an L1 entry points to (`None`: unallocated), checked for reserved bits
/// and alignment.
pub(crate) fn l1_entry_target(entry: u64, cluster_size: u64) -> Result<Option<u64>> {
    if entry & L1E_RESERVED_MASK != 0 {
        return Err(Error::corrupt(format!(
            "L1 entry {entry:#x} has reserved bits set"
        )));
    }
    let off = entry & L1E_OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if !off.is_multiple_of(cluster_size) {
        return Err(Error::corrupt(format!(
            "L2 table offset {off:#x} is not cluster-aligned"
        )));
    }
    Ok(Some(off))
}

/// What a (sub)cluster of the guest disk is, according to one L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Not allocated in this layer: read from the backing file (or zeros). With extended L2, an
    /// unallocated subcluster of an allocated cluster still has a `host` offset reserved.
    Unallocated {
        /// Reserved host offset of this subcluster, if any.
        host: Option<u64>,
    },
    /// Reads as zeros; `host` is a preallocated host offset, if any.
    Zero {
        /// Preallocated host offset of this (sub)cluster.
        host: Option<u64>,
    },
    /// Stored uncompressed at host offset `host` (of this (sub)cluster).
    Data {
        /// Host offset of this (sub)cluster.
        host: u64,
    },
    /// Stored compressed (always a whole cluster).
    Compressed(CompressedDesc),
}

/// The decoded standard cluster descriptor of an L2 entry (before subclusters are applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Descriptor {
    /// No host cluster.
    Unallocated,
    /// Zero flag set (non-extended v3), with an optional preallocated offset.
    Zero(Option<u64>),
    /// A host cluster at this offset.
    Normal(u64),
    /// A compressed cluster.
    Compressed(CompressedDesc),
}

/// Decodes the first (standard) word of an L2 entry, checking reserved bits and alignment.
pub(crate) fn decode_descriptor(entry: u64, h: &Header) -> Result<Descriptor> {
    if entry & OFLAG_COMPRESSED != 0 {
        if h.has_data_file() {
            return Err(Error::corrupt(
                "compressed cluster in an image with an external data file",
            ));
        }
        return Ok(Descriptor::Compressed(CompressedDesc::decode(
            entry & !(OFLAG_COPIED | OFLAG_COMPRESSED),
            h.cluster_bits,
        )));
    }
    if entry & L2E_RESERVED_MASK != 0 {
        return Err(Error::corrupt(format!(
            "L2 entry {entry:#x} has reserved bits set"
        )));
    }
    let off = entry & L2E_OFFSET_MASK;
    if !off.is_multiple_of(h.cluster_size()) {
        return Err(Error::corrupt(format!(
            "cluster offset {off:#x} is not cluster-aligned"
        )));
    }
    if entry & OFLAG_ZERO != 0 {
        if h.version < 3 || h.extended_l2() {
            return Err(Error::corrupt(format!(
                "L2 entry {entry:#x} has the zero flag where the format reserves it"
            )));
        }
        return Ok(Descriptor::Zero((off != 0).then_some(off)));
    }
    if off != 0 {
        return Ok(Descriptor::Normal(off));
    }
    // Offset 0 is a valid host offset in an external data file; there the COPIED flag (always
    // set on data-file clusters, whose refcount is 1) tells data from unallocated.
    if h.has_data_file() && entry & OFLAG_COPIED != 0 {
        return Ok(Descriptor::Normal(0));
    }
    Ok(Descriptor::Unallocated)
}

/// What subcluster `sc` (0 for non-extended entries) of a cluster is, given its descriptor
/// and (extended L2 only) the subcluster bitmap.
pub(crate) fn slot(desc: Descriptor, bitmap: Option<u64>, sc: u32, sc_bits: u32) -> Result<Slot> {
    let Some(bitmap) = bitmap else {
        return Ok(match desc {
            Descriptor::Unallocated => Slot::Unallocated { host: None },
            Descriptor::Zero(host) => Slot::Zero { host },
            Descriptor::Normal(host) => Slot::Data { host },
            Descriptor::Compressed(c) => Slot::Compressed(c),
        });
    };
    if let Descriptor::Compressed(c) = desc {
        if bitmap != 0 {
            return Err(Error::corrupt(
                "compressed cluster has a non-zero subcluster bitmap",
            ));
        }
        return Ok(Slot::Compressed(c));
    }
    let host = match desc {
        Descriptor::Normal(h) => Some(h),
        _ => None,
    };
    if bitmap & (bitmap >> 32) & 0xffff_ffff != 0 {
        return Err(Error::corrupt(format!(
            "subcluster bitmap {bitmap:#x} marks subclusters both allocated and zero"
        )));
    }
    let alloc = bitmap & (1 << sc) != 0;
    let zero = bitmap & (1 << (sc + 32)) != 0;
    let sc_host = host.map(|h| h + (u64::from(sc) << sc_bits));
    Ok(if zero {
        Slot::Zero { host: sc_host }
    } else if alloc {
        match sc_host {
            Some(h) => Slot::Data { host: h },
            None => {
                return Err(Error::corrupt(
                    "allocated subcluster in a cluster without a host offset",
                ))
            }
        }
    } else {
        Slot::Unallocated { host: sc_host }
    })
}
