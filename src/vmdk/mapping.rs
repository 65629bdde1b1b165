//! Where an extent keeps a run of its sectors: the one question every extent kind (hosted
//! sparse, flat, stream-optimized, ESXi's vmfsSparse and seSparse deltas) answers, so that the
//! image's read and block-status paths are written once.

use crate::offsets::HostOffset;

/// What an extent holds for a run of bytes starting at a given offset within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: the bytes come from the parent (backing) disk, or read as zeros
    /// when there is none.
    Unallocated,
    /// Allocated as zeros (a zeroed-grain entry, an seSparse zero grain).
    Zero,
    /// Stored uncompressed in the extent's file, starting at this host offset.
    Data(HostOffset),
    /// Stored compressed (a stream-optimized grain) in the grain that starts at this host
    /// offset; reading it means inflating the whole grain.
    Compressed(HostOffset),
}

/// A run of bytes of an extent with one [`Mapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// Length of the run in bytes (at least 1, at most what the caller asked for).
    pub len: u64,
    /// Where the run's bytes are.
    pub mapping: Mapping,
}
