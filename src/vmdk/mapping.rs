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

/// Where a map request lands in a delta extent of two levels (a grain directory of grain
/// tables, each of `gtes` grains of `grain` bytes): the preamble the ESXi deltas' `map`
/// share, with its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrainLookup {
    /// The request's length, clamped to the extent.
    pub max_len: u64,
    /// The grain directory entry covering the offset.
    pub index: u64,
    /// The entry of the offset's grain in its grain table.
    pub slot: usize,
    /// Bytes from the grain's start.
    pub in_grain: u64,
    /// The request's bytes in its first grain.
    pub first_len: u64,
    /// The request's bytes in its grain table.
    pub table_len: u64,
}

/// Extent geometry for [`GrainLookup::new`].
pub struct Geometry<'a> {
    /// The extent file, named in errors.
    pub path: &'a std::path::Path,
    /// Guest bytes the extent covers.
    pub size: u64,
    /// Bytes of a grain.
    pub grain: u64,
    /// Grain entries of a grain table.
    pub gtes: u64,
    /// Entries of the grain directory.
    pub gd_entries: u64,
    /// Where the grain directory is (for errors).
    pub gd_offset: u64,
}

impl GrainLookup {
    /// Locates `max_len` bytes at extent offset `offset`: a request outside the extent is
    /// refused, and an offset past what the grain directory covers is a corruption.
    pub fn new(g: &Geometry<'_>, offset: u64, max_len: u64) -> crate::error::Result<Self> {
        use crate::error::Error;
        if offset >= g.size || max_len == 0 {
            return Err(Error::invalid_input(format!(
                "cannot map {max_len} bytes at offset {offset} of a {}-byte extent",
                g.size
            ))
            .with_path(g.path));
        }
        let max_len = max_len.min(g.size - offset);
        let cover = g.gtes * g.grain;
        let index = offset / cover;
        if index >= g.gd_entries {
            return Err(Error::corrupt(format!(
                "offset {offset} lies past what the grain directory's {} entries cover",
                g.gd_entries
            ))
            .with_path(g.path)
            .at(g.gd_offset));
        }
        let in_gt = offset % cover;
        let in_grain = in_gt % g.grain;
        Ok(GrainLookup {
            max_len,
            index,
            slot: (in_gt / g.grain) as usize,
            in_grain,
            first_len: (g.grain - in_grain).min(max_len),
            table_len: (cover - in_gt).min(max_len),
        })
    }

    /// The run when the grain directory has no table for the offset: unallocated to the end
    /// of what the table would cover.
    pub fn without_table(&self) -> Mapped {
        Mapped {
            len: self.table_len,
            mapping: Mapping::Unallocated,
        }
    }
}
