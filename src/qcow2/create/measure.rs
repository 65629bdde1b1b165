//! qcow2's side of `measure` ([`crate::ops::measure`]): qemu-img 10's arithmetic for a new
//! qcow2 image, the metadata of a fully allocated image (header cluster, L2 and L1 tables,
//! refcount table and blocks; qcow2.rst "Host cluster management" and "Cluster mapping") plus
//! the data clusters that hold data, and room for a version 3 source's persistent bitmaps.

use super::options::{Compat, OptionUpdates};
use super::request::parse_target_options;
use crate::block::BlockImage;
use crate::creation::Measurement;
use crate::error::{Error, Result};
use crate::info::FormatSpecific;
use crate::offsets::GuestOffset;
use crate::prealloc::Preallocation;

/// The largest L1 table qemu accepts, in bytes (qemu's `QCOW_MAX_L1_SIZE`).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Size of one refcount table entry (qcow2.rst "Refcount table").
const REFTABLE_ENTRY: u64 = 8;
/// Size of one L1 table entry (qcow2.rst "Cluster mapping").
const L1_ENTRY: u64 = 8;
/// Size of a bitmap directory entry without its name (qcow2.rst "Bitmap directory").
const BITMAP_DIR_ENTRY: u64 = 24;
/// Size of a bitmap table entry (qcow2.rst "Bitmap table").
const BITMAP_TABLE_ENTRY: u64 = 8;

/// Options `qemu-img measure -O qcow2 -o` accepts (qcow2's creation options and those of the
/// `file` protocol).
const QCOW2_KEYS: &[&str] = &[
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "encryption",
    "data_file",
    "data_file_raw",
    "cluster_size",
    "preallocation",
    "lazy_refcounts",
    "refcount_bits",
    "compression_type",
    "extended_l2",
    "nocow",
    "extent_size_hint",
];

/// qcow2's [`crate::block::FormatDriver::measure`].
pub(crate) fn measure(
    options: &[String],
    size: Option<u64>,
    source: Option<&dyn BlockImage>,
    secrets: &crate::secret::Secrets,
) -> Result<Measurement> {
    let u = parse_target_options(options, size, QCOW2_KEYS, true)?;
    measure_qcow2(&u, source, secrets)
}

/// The figures for the options `u`.
fn measure_qcow2(
    u: &OptionUpdates,
    source: Option<&dyn BlockImage>,
    secrets: &crate::secret::Secrets,
) -> Result<Measurement> {
    let extended_l2 = u.extended_l2.unwrap_or(false);
    let cs = u.cluster_size.unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::invalid_input(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cs < 16384 {
        return Err(Error::invalid_input(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let compat = u.compat.unwrap_or(Compat::V3);
    let refcount_bits = u.refcount_bits.unwrap_or(16);
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Error::invalid_input(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if compat == Compat::V2 && refcount_bits != 16 {
        return Err(Error::invalid_input(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    let prealloc = u.preallocation.unwrap_or_default();
    // The LUKS header's clusters (only LUKS adds to the figures); qemu makes the header in
    // memory to measure it, so the passphrase must exist.
    let luks = match u.encrypt.format.as_deref() {
        Some("luks") => u.encrypt.luks()?,
        _ => None,
    };
    let luks_payload = match luks {
        Some((params, id)) => {
            crate::crypto::luks::secret_passphrase(secrets, id)?;
            round_up(crate::crypto::luks::header_len(&params.spec), cs)
        }
        None => 0,
    };
    let has_backing = u.backing_file.is_some();
    let l2e: u64 = if extended_l2 { 16 } else { 8 };

    let mut virtual_size = round_up(u.size.unwrap_or(0), cs);
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e);
    if l2_tables.saturating_mul(L1_ENTRY) > MAX_L1_BYTES {
        return Err(Error::invalid_input(
            "The image size is too large (try using a larger cluster size)",
        ));
    }

    let mut required = 0;
    let mut bitmaps = None;
    if let Some(src) = source {
        let ssize = src.virtual_size().div_ceil(512) * 512;
        virtual_size = round_up(ssize, cs);
        required = if has_backing {
            // The new image's backing file may share nothing with the source: count it all.
            virtual_size
        } else {
            data_clusters(src, cs)? * cs
        };
        if compat == Compat::V3 {
            bitmaps = source_bitmaps_size(src, ssize, cs)?;
        }
    }
    if matches!(prealloc, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    let fully_allocated = luks_payload + prealloc_size(virtual_size, cs, refcount_bits, l2e);
    Ok(Measurement {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// The number of `cs`-sized clusters of `src`'s guest space that hold data somewhere in its
/// backing chain. Ranges that read as zeros (unallocated ranges, zero clusters, holes, data
/// clusters over host holes) are not counted; compressed clusters are.
fn data_clusters(src: &dyn BlockImage, cs: u64) -> Result<u64> {
    let end = src.virtual_size();
    let mut offset = 0;
    let mut clusters = 0;
    while offset < end {
        let st = src.block_status(GuestOffset(offset), end - offset)?;
        let len = st.len.clamp(1, end - offset);
        if !st.zero && st.data {
            // Count every cluster the range touches, then skip to the end of the last one.
            let first = offset / cs;
            let next = round_up(offset + len, cs);
            clusters += next / cs - first;
            offset = next;
        } else {
            offset += len;
        }
    }
    Ok(clusters)
}

/// Room for `src`'s persistent dirty bitmaps in a new qcow2 image with clusters of `cs`
/// bytes, or `None` when `src` cannot hold such bitmaps (it is not a version 3 qcow2 image).
/// Each bitmap counts as fully allocated (qcow2.rst "Bitmaps extension"), with its bitmap
/// table; the directory counts once, rounded to whole clusters.
fn source_bitmaps_size(src: &dyn BlockImage, ssize: u64, cs: u64) -> Result<Option<u64>> {
    if src.format() != crate::qcow2::QCOW2 {
        return Ok(None);
    }
    let info = src.layer_info()?;
    let Some(FormatSpecific::Qcow2(q)) = info.format_specific else {
        return Ok(None);
    };
    if q.compat != "1.1" {
        return Ok(None);
    }
    let mut total = 0u64;
    let mut dir = 0u64;
    for bm in q.bitmaps.unwrap_or_default() {
        let granularity = bm.granularity.max(1);
        let bytes = ssize.div_ceil(granularity).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total = total
            .saturating_add(clusters.saturating_mul(cs))
            .saturating_add(round_up(clusters.saturating_mul(BITMAP_TABLE_ENTRY), cs));
        dir = dir.saturating_add(round_up(BITMAP_DIR_ENTRY + bm.name.len() as u64, 8));
    }
    Ok(Some(total.saturating_add(round_up(dir, cs))))
}

/// The size of a fully allocated qcow2 image of `size` bytes (a multiple of `cs`): header
/// cluster, L2 tables, L1 table (whole clusters), refcount structures and data.
fn prealloc_size(size: u64, cs: u64, refcount_bits: u64, l2e: u64) -> u64 {
    let mut meta = cs;
    let l2_entries = round_up(size / cs, cs / l2e);
    meta += l2_entries * l2e;
    let l1_entries = round_up(l2_entries * l2e / cs, cs / L1_ENTRY);
    meta += l1_entries * L1_ENTRY;
    meta += refcount_metadata_size((meta + size) / cs, cs, refcount_bits);
    meta + size
}

/// Bytes of refcount table and refcount blocks needed to count `clusters` clusters plus the
/// refcount structures themselves (the fixed point where adding them needs no more).
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_bits: u64) -> u64 {
    let per_table_cluster = cs / REFTABLE_ENTRY;
    let per_block = cs * 8 / refcount_bits;
    let (mut table, mut blocks) = (0u64, 0u64);
    let mut last = u64::MAX;
    loop {
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        let n = clusters + blocks + table;
        if n == last {
            break;
        }
        last = n;
    }
    (blocks + table) * cs
}
