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

/// An extent kind that maps its own runs (the ESXi deltas plug in here): where its bytes at
/// an offset within it are, read-only.
pub trait ExtentMapping: Send + Sync {
    /// Where the run of at most `max_len` bytes at extent offset `off` is, in `storage` (the
    /// extent's file). `max_len` is at least 1 and the run lies inside the extent.
    fn map(
        &self,
        storage: &dyn crate::storage::Storage,
        off: u64,
        max_len: u64,
    ) -> crate::error::Result<Mapped>;
    /// The extent's grain size in bytes (`cluster-size` in `info`).
    fn grain_size(&self) -> u64;
    /// Guest bytes the extent covers.
    fn capacity(&self) -> u64;
}
