//! The qcow2 consistency check (`vimg check`): a read-only walk of every structure that
//! references host clusters, compared with the stored refcounts (qcow2.rst "Cluster
//! refcounts"), with `qemu-img check`'s counts and exit codes.
//!
//! # What is counted
//!
//! The check computes how often each host cluster of the image file is referenced:
//!
//! - the header (cluster 0);
//! - the active L1 table, every L2 table it points to, and every cluster those L2 tables map:
//!   standard clusters, zero clusters that keep a preallocated offset, and for compressed
//!   clusters every host cluster the descriptor's 512-byte sectors touch (qcow2.rst "Cluster
//!   mapping", "Compressed Clusters Descriptor");
//! - the same for each internal snapshot's L1 table (qcow2.rst "Snapshots"): a cluster shared by
//!   the active state and `n` snapshots is referenced `n + 1` times;
//! - the snapshot table, the refcount table and every refcount block;
//! - the LUKS header area (qcow2.rst "Full disk encryption header pointer");
//! - the bitmap directory, every bitmap table and every bitmap data cluster (qcow2.rst "Bitmaps
//!   extension").
//!
//! With an external data file, guest data clusters live outside the image file and are not
//! refcounted (qcow2.rst "External data file").
//!
//! Then every host cluster of the file is compared with its stored refcount: a stored refcount
//! below the computed one is a corruption (`ERROR cluster N refcount=A reference=B`), above it a
//! leak (`Leaked cluster N ...`). Finally the COPIED flag (bit 63) of every active L1 and L2 entry
//! must be set exactly when the stored refcount of the cluster it points to is 1.
//!
//! # Report fields (as `qemu-img check` 10.0 fills them)
//!
//! - `total-clusters`: guest clusters in the virtual disk, rounded up.
//! - `allocated-clusters`: active L2 entries with a host cluster (standard, zero with a
//!   preallocated offset, or compressed); zero clusters without an offset do not count.
//! - `fragmented-clusters`: compressed clusters always count; a standard or preallocated zero
//!   cluster counts when its host offset does not follow the previous such cluster's in the
//!   same L2 table (contiguity restarts with every L2 table, and compressed clusters do not
//!   break it).
//! - `compressed-clusters`: active compressed L2 entries.
//! - `image-end-offset`: one past the last host cluster whose stored or computed refcount is
//!   non-zero, in bytes (at least one cluster).
//!
//! # Robustness
//!
//! The check never trusts the image: every offset is bounds-checked, reads past the end of the
//! file yield zeros (as qemu's do), references that reach a cluster or more past the end of the
//! file are reported and not counted, and the computed refcounts are kept in chunks allocated
//! only for clusters actually referenced. Only clusters inside the file (plus at most one
//! partially referenced cluster after it) are compared, so memory stays proportional to the
//! file. The message list is capped at [`MAX_MESSAGES`].

use crate::check::{Check, CheckReport};
use crate::error::{Error, Result};
use crate::qcow2::bitmap::directory::{
    self as bitmaps, BME_ALL_ONES, BME_OFFSET_MASK as BME_OFFSET, BME_RESERVED_MASK as BME_RESERVED,
};
use crate::qcow2::format::compress::CompressedDesc;
use crate::qcow2::format::header::{Header, MAX_L1_BYTES};
use crate::qcow2::format::l2::{L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::qcow2::refcount::table::{
    max_refcount, read_padded, RefcountReader, RefcountTable, Strictness, REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
};
use crate::qcow2::snapshot::table as snapshot;
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};
use std::collections::HashMap;

/// Most messages a report keeps; further problems are still counted, and one final line says
/// how many messages were left out.
pub(crate) const MAX_MESSAGES: usize = 10_000;

/// L1 entry bits that must be zero: 0-8 and 56-62 (qcow2.rst "Cluster mapping", L1 table
/// entry). Bit 0 is included, as qemu's check does.
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero: 1-8 and 56-61 (qcow2.rst "Standard Cluster
/// Descriptor"; bit 0 is the zero flag).
const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// L1 entry bits 9-55: the L2 table offset.
const L1E_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// qemu's bound on the number of host clusters a check handles (`INT_MAX`).
const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;
/// Words read at a time when streaming a long table.
const CHUNK_WORDS: u64 = 8192;
/// log2 of the number of clusters per allocation of computed refcounts.
const COUNT_CHUNK_BITS: u32 = 12;

impl Check for Qcow2Image {
    /// Checks the image's metadata against its refcounts without changing anything; see the
    /// module documentation for what is checked and how the report is filled.
    fn check(&self) -> Result<CheckReport> {
        // qemu's check gives up on a snapshot table over qemu's limits (only `-r all` can
        // read it): its report would be wrong.
        if let Err(e) = snapshot::read_table_with_size(self) {
            if snapshot::exceeds_qemu_limits(&e) {
                return Err(
                    Error::new(e.kind(), format!("{SNAPSHOT_READ_FAILED}{}", e.what())).bare(),
                );
            }
        }
        Ok(Checker::new(self).run())
    }
}

/// What qemu's check advises after a cluster with more references than its refcount width
/// can count.
const OVERFLOW_ADVICE: &str = "Use qemu-img amend to increase the refcount entry width or \
     qemu-img convert to create a clean copy if the image cannot be opened for writing";

/// How the message of a check that gave up on the snapshot table starts (qemu's words).
pub(crate) const SNAPSHOT_READ_FAILED: &str = "ERROR failed to read the snapshot table: ";

/// Whether `img`'s file has more clusters than the check handles (it then reports that it
/// could not check, and nothing may be repaired from its findings).
pub(crate) fn too_large_to_check(img: &Qcow2Image) -> bool {
    img.file_len().div_ceil(img.header().cluster_size()) > MAX_CHECK_CLUSTERS
}

/// Checks `img` and also returns the number of references the check counted for each host
/// cluster of the file, for rebuilding the refcount structures ([`super::repair`]).
/// References are counted even when the refcount table is unreadable; `None` when the check
/// could not count them at all (a file with more clusters than the check handles).
pub(crate) fn check_with_references(img: &Qcow2Image) -> (CheckReport, Option<References>) {
    let mut c = Checker::new(img);
    c.walk(true);
    let refs = c.counted.then(|| References {
        counts: std::mem::take(&mut c.counts),
    });
    (c.finish(), refs)
}

/// The references a check counted, per host cluster, kept sparse (only chunks of clusters
/// that are referenced take memory).
pub(crate) struct References {
    counts: Counts,
}

impl References {
    /// The references counted for `cluster`.
    pub(crate) fn get(&self, cluster: u64) -> u64 {
        self.counts.get(cluster)
    }

    /// Removes one reference to `cluster`, if it has any.
    pub(crate) fn drop_one(&mut self, cluster: u64) {
        let c = self.counts.get(cluster);
        if c > 0 {
            self.counts.set(cluster, (c - 1) as u32);
        }
    }

    /// Every referenced cluster and its count, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts.chunks.iter().flat_map(|(&chunk, v)| {
            v.iter()
                .enumerate()
                .filter(|(_, &n)| n != 0)
                .map(move |(i, &n)| ((chunk << COUNT_CHUNK_BITS) + i as u64, u64::from(n)))
        })
    }
}

/// Computed refcounts, one `u32` per host cluster, allocated in chunks on first reference.
#[derive(Default)]
struct Counts {
    chunks: HashMap<u64, Box<[u32]>>,
}

impl Counts {
    fn get(&self, cluster: u64) -> u64 {
        let mask = (1u64 << COUNT_CHUNK_BITS) - 1;
        self.chunks
            .get(&(cluster >> COUNT_CHUNK_BITS))
            .map_or(0, |c| u64::from(c[(cluster & mask) as usize]))
    }

    fn set(&mut self, cluster: u64, value: u32) {
        let mask = (1u64 << COUNT_CHUNK_BITS) - 1;
        let chunk = self
            .chunks
            .entry(cluster >> COUNT_CHUNK_BITS)
            .or_insert_with(|| vec![0u32; 1 << COUNT_CHUNK_BITS].into_boxed_slice());
        chunk[(cluster & mask) as usize] = value;
    }
}

/// What an L2 entry's standard descriptor says (qcow2.rst "Cluster mapping"), classified the
/// way the check needs it: leniently, reserved bits aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unallocated,
    ZeroPlain,
    ZeroAlloc(u64),
    Normal(u64),
    Compressed,
}

fn classify(entry: u64, h: &Header) -> Kind {
    if entry & OFLAG_COMPRESSED != 0 {
        return Kind::Compressed;
    }
    let off = entry & L2E_OFFSET_MASK;
    if entry & OFLAG_ZERO != 0 && !h.extended_l2() {
        return if off != 0 {
            Kind::ZeroAlloc(off)
        } else {
            Kind::ZeroPlain
        };
    }
    if off != 0 || (h.has_data_file() && entry & OFLAG_COPIED != 0) {
        Kind::Normal(off)
    } else {
        Kind::Unallocated
    }
}

/// One snapshot table entry, as far as the check needs it.
struct SnapshotRef {
    id: String,
    name: String,
    l1_offset: u64,
    l1_size: u32,
}

/// The state of one check: the image, the computed refcounts and the report being filled.
struct Checker<'a> {
    img: &'a Qcow2Image,
    h: &'a Header,
    cs: u64,
    file_len: u64,
    /// Host clusters to compare: the file's, plus any partly referenced cluster after it.
    nb_clusters: u64,
    /// Largest computed refcount before an overflow is reported.
    max: u64,
    counts: Counts,
    /// Whether the walk counted references at all.
    counted: bool,
    report: CheckReport,
    dropped_messages: u64,
}

impl<'a> Checker<'a> {
    fn new(img: &'a Qcow2Image) -> Self {
        let h = img.header();
        let cs = h.cluster_size();
        Checker {
            img,
            h,
            cs,
            file_len: img.file_len(),
            nb_clusters: img.file_len().div_ceil(cs),
            max: max_refcount(h.refcount_order).min(u64::from(u32::MAX)),
            counts: Counts::default(),
            counted: false,
            report: CheckReport::default(),
            dropped_messages: 0,
        }
    }

    fn msg(&mut self, text: String) {
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(text);
        } else {
            self.dropped_messages += 1;
        }
    }

    fn corruption(&mut self, text: String) {
        self.report.corruptions += 1;
        self.msg(text);
    }

    fn check_error(&mut self, text: String) {
        self.report.check_errors += 1;
        self.msg(text);
    }

    fn run(mut self) -> CheckReport {
        self.walk(false);
        self.finish()
    }

    /// Fills the report. With `counts_anyway`, references are counted even when the refcount
    /// table cannot be read (as if it were empty), so that they can be rebuilt.
    fn walk(&mut self, counts_anyway: bool) {
        let h = self.h;
        // qemu's guest size is a whole number of 512-byte sectors.
        let size = h.size & !511;
        self.report.total_clusters = size.div_ceil(self.cs);
        if self.nb_clusters > MAX_CHECK_CLUSTERS {
            self.check_error(format!(
                "ERROR the image file has {} clusters, more than the check handles ({MAX_CHECK_CLUSTERS})",
                self.nb_clusters
            ));
            return;
        }
        let table = match RefcountTable::read(self.img) {
            Ok(t) => t,
            Err(e) => {
                self.check_error(format!("ERROR cannot read the refcount table: {e}"));
                if counts_anyway {
                    let empty = RefcountTable::from_entries(
                        Vec::new(),
                        h.cluster_bits,
                        h.refcount_order,
                        self.file_len,
                    );
                    self.count_references(&empty);
                }
                return;
            }
        };

        self.count_references(&table);
        let mut reader = RefcountReader::new(self.img, &table, Strictness::Lenient);
        let highest = self.compare(&mut reader);
        self.check_copied(&mut reader);
        self.report.image_end_offset = Some((highest + 1).saturating_mul(self.cs));
    }

    fn finish(mut self) -> CheckReport {
        if self.dropped_messages > 0 {
            let n = self.dropped_messages;
            self.report
                .messages
                .push(format!("... {n} more problems not listed"));
        }
        self.report
    }

    /// Walks every structure that references host clusters and counts the references.
    fn count_references(&mut self, table: &RefcountTable) {
        self.counted = true;
        let h = self.h;
        self.count(0, self.cs);

        self.check_l1(h.l1_table_offset, h.l1_size, true);

        if let Some((snapshots, table_bytes)) = self.read_snapshots() {
            if h.has_data_file() && !snapshots.is_empty() {
                self.corruption(format!(
                    "ERROR image with an external data file has {} snapshots",
                    snapshots.len()
                ));
            }
            for s in &snapshots {
                if !s.l1_offset.is_multiple_of(self.cs) {
                    self.corruption(format!(
                        "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster \
                         aligned; snapshot table entry corrupted",
                        s.id, s.name, s.l1_offset
                    ));
                    continue;
                }
                if u64::from(s.l1_size) * 8 > MAX_L1_BYTES {
                    self.corruption(format!(
                        "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; \
                         snapshot table entry corrupted",
                        s.id, s.name, s.l1_size
                    ));
                    continue;
                }
                self.check_l1(s.l1_offset, s.l1_size, false);
            }
            self.count(h.snapshots_offset, table_bytes);
        }

        self.count(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * self.cs,
        );
        if let Some((off, len)) = h.crypto_header {
            self.count(off, len);
        }
        self.count_bitmaps();
        self.check_refblocks(table);
    }

    /// Adds one reference to every host cluster `[offset, offset + size)` touches.
    fn count(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        // The last cluster of an image may be partly past the end of the file; a reference that
        // reaches a whole cluster or more past it is broken.
        if u128::from(offset) + u128::from(size) >= u128::from(self.file_len) + u128::from(self.cs)
        {
            self.corruption(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return;
        }
        let cb = self.h.cluster_bits;
        let first = offset >> cb;
        let last = (offset + size - 1) >> cb;
        for k in first..=last {
            if k >= self.nb_clusters {
                self.nb_clusters = k + 1;
            }
            let c = self.counts.get(k);
            if c >= self.max {
                // qemu's words: the refcount width is too narrow for this many references.
                self.corruption(format!(
                    "ERROR: overflow cluster offset={:#x}\n{OVERFLOW_ADVICE}",
                    k << cb
                ));
                continue;
            }
            self.counts.set(k, (c + 1) as u32);
        }
    }

    /// Reads `count` big-endian words at `offset`, zeros past the end of the file.
    fn read_words(&mut self, offset: u64, count: u64) -> Option<Vec<u64>> {
        let mut raw = vec![0u8; (count * 8) as usize];
        match read_padded(self.img, &mut raw, offset) {
            Ok(()) => Some(raw.chunks_exact(8).map(BigEndian::read_u64).collect()),
            Err(e) => {
                self.check_error(format!("ERROR cannot read table at {offset:#x}: {e}"));
                None
            }
        }
    }

    /// Checks the L1 table of `l1_size` entries at `offset` and everything it references;
    /// `active` for the image's own table (which feeds the cluster statistics).
    fn check_l1(&mut self, offset: u64, l1_size: u32, active: bool) {
        let bytes = u64::from(l1_size) * 8;
        self.count(offset, bytes);
        if active {
            let img = self.img;
            for &entry in img.l1().iter() {
                self.check_l1_entry(entry, true);
            }
            return;
        }
        // Entries past the end of the file read as zeros and reference nothing.
        let in_file = self.file_len.saturating_sub(offset).div_ceil(8);
        let count = u64::from(l1_size).min(in_file);
        let mut idx = 0;
        while idx < count {
            let n = (count - idx).min(CHUNK_WORDS);
            let Some(words) = self.read_words(offset + idx * 8, n) else {
                return;
            };
            for entry in words {
                self.check_l1_entry(entry, false);
            }
            idx += n;
        }
    }

    fn check_l1_entry(&mut self, entry: u64, active: bool) {
        // As qemu does, only an all-zero entry is skipped: an entry with nothing but reserved
        // bits set points at offset 0, and the header is then walked as an L2 table.
        if entry == 0 {
            return;
        }
        if entry & L1E_RESERVED != 0 {
            self.corruption(format!("ERROR L1 entry {entry:#x} has reserved bits set"));
        }
        let l2_off = entry & L1E_OFFSET;
        self.count(l2_off, self.cs);
        if !l2_off.is_multiple_of(self.cs) {
            self.corruption(format!(
                "ERROR L2 table offset {l2_off:#x} is not cluster-aligned; L1 entry corrupted"
            ));
        }
        self.check_l2(l2_off, active);
    }

    /// Checks the L2 table at `l2_off` (read from there even if misaligned, as qemu does) and
    /// counts the clusters it references.
    fn check_l2(&mut self, l2_off: u64, active: bool) {
        if l2_off >= self.file_len {
            return; // reads as zeros: all entries unallocated
        }
        let h = self.h;
        let Some(words) = self.read_words(l2_off, self.cs / 8) else {
            return;
        };
        let ext = h.extended_l2();
        let step = if ext { 2 } else { 1 };
        let mut next_contiguous = 0u64;
        for (i, pair) in words.chunks_exact(step).enumerate() {
            let mut entry = pair[0];
            let bitmap = if ext { pair[1] } else { 0 };
            let kind = classify(entry, h);
            if kind != Kind::Compressed && entry & L2E_RESERVED != 0 {
                self.corruption(format!("ERROR L2 entry {entry:#x} has reserved bits set"));
            }
            match kind {
                Kind::Compressed => {
                    if entry & OFLAG_COPIED != 0 {
                        self.corruption(format!(
                            "ERROR compressed cluster entry {entry:#x} has the COPIED flag set"
                        ));
                        entry &= !OFLAG_COPIED;
                    }
                    if h.has_data_file() {
                        self.corruption(format!(
                            "ERROR L2 entry {i} ({entry:#x}) is compressed in an image with an external data file"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        self.corruption(format!(
                            "ERROR compressed L2 entry {i} ({entry:#x}) has a non-zero subcluster bitmap {bitmap:#x}"
                        ));
                        continue;
                    }
                    let desc = CompressedDesc::decode(
                        entry & !(OFLAG_COPIED | OFLAG_COMPRESSED),
                        h.cluster_bits,
                    );
                    self.count(desc.host, desc.len);
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        // Compressed clusters share sectors: never contiguous.
                        self.report.fragmented_clusters += 1;
                    }
                }
                Kind::Normal(off) | Kind::ZeroAlloc(off) => {
                    if ext && bitmap & (bitmap >> 32) & 0xffff_ffff != 0 {
                        self.corruption(format!(
                            "ERROR cluster at {off:#x}: subcluster bitmap {bitmap:#x} marks subclusters both allocated and zero"
                        ));
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = off.wrapping_add(self.cs);
                    }
                    if !off.is_multiple_of(self.cs) {
                        let data = if ext {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            matches!(kind, Kind::Normal(_))
                        };
                        let what = if data { "Data" } else { "Preallocated" };
                        self.corruption(format!(
                            "ERROR offset={off:x}: {what} cluster is not properly aligned; L2 entry corrupted."
                        ));
                    }
                    if !h.has_data_file() {
                        self.count(off, self.cs);
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if ext && bitmap & 0xffff_ffff != 0 {
                        self.corruption(format!(
                            "ERROR unallocated L2 entry {i} has subclusters marked allocated ({bitmap:#x})"
                        ));
                    }
                }
            }
        }
    }

    /// Reads the snapshot table (an L1 table outside the file is reported by the walk, not
    /// here). Returns the entries and the table's size in bytes, or `None` (after recording a
    /// check error) if the table cannot be read.
    fn read_snapshots(&mut self) -> Option<(Vec<SnapshotRef>, u64)> {
        match snapshot::read_table_with_size(self.img) {
            Ok((entries, bytes)) => Some((
                entries
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        // qcow2.rst: version 3 entries carry at least 16 bytes of extra data.
                        if self.h.version >= 3 && s.extra.len() < 16 {
                            self.corruption(format!(
                                "ERROR snapshot table entry {i} is incomplete"
                            ));
                        }
                        s
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|s| SnapshotRef {
                        id: s.id,
                        name: s.name,
                        l1_offset: s.l1_table_offset,
                        l1_size: s.l1_size,
                    })
                    .collect(),
                bytes,
            )),
            Err(e) => {
                self.check_error(format!("ERROR snapshot table cannot be read: {}", e.what()));
                None
            }
        }
    }

    /// Counts the bitmap directory, each bitmap table and each bitmap data cluster.
    fn count_bitmaps(&mut self) {
        let Some(ext) = self.img.bitmaps_ext() else {
            return;
        };
        if ext.nb_bitmaps == 0 {
            return;
        }
        self.count(ext.directory_offset, ext.directory_size);
        let list = match bitmaps::read_directory(self.img) {
            Ok(l) => l,
            Err(e) => {
                self.corruption(format!("ERROR cannot read the bitmap directory: {e}"));
                return;
            }
        };
        for b in list {
            let count = u64::from(b.table_size);
            self.count(b.table_offset, count * 8);
            if !b.table_offset.is_multiple_of(self.cs) {
                self.corruption(format!(
                    "ERROR bitmap '{}' table offset {:#x} is not cluster-aligned",
                    b.name, b.table_offset
                ));
                continue;
            }
            // Entries past the end of the file read as zeros and reference nothing.
            let in_file = self.file_len.saturating_sub(b.table_offset).div_ceil(8);
            let count = count.min(in_file);
            let mut idx = 0;
            while idx < count {
                let n = (count - idx).min(CHUNK_WORDS);
                let Some(words) = self.read_words(b.table_offset + idx * 8, n) else {
                    break;
                };
                for entry in words {
                    let off = entry & BME_OFFSET;
                    let bad = entry & BME_RESERVED != 0
                        || (off != 0
                            && (entry & BME_ALL_ONES != 0 || !off.is_multiple_of(self.cs)));
                    if bad {
                        self.corruption(format!(
                            "ERROR bitmap '{}' table entry {entry:#x} is invalid",
                            b.name
                        ));
                        continue;
                    }
                    if off != 0 {
                        self.count(off, self.cs);
                    }
                }
                idx += n;
            }
        }
    }

    /// Checks the refcount table entries and counts the refcount blocks; each block must be
    /// referenced exactly once.
    fn check_refblocks(&mut self, table: &RefcountTable) {
        for (i, &entry) in table.entries().iter().enumerate() {
            let off = entry & REFT_OFFSET_MASK;
            let cluster = off >> self.h.cluster_bits;
            if entry & REFT_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR refcount table entry {i} ({entry:#x}) has reserved bits set"
                ));
                continue;
            }
            if !off.is_multiple_of(self.cs) {
                self.corruption(format!(
                    "ERROR refcount block {i} offset {off:#x} is not cluster-aligned"
                ));
                continue;
            }
            if cluster >= self.nb_clusters {
                self.corruption(format!(
                    "ERROR refcount block {i} at {off:#x} is outside the image file"
                ));
                continue;
            }
            if off != 0 {
                self.count(off, self.cs);
                let n = self.counts.get(cluster);
                if n != 1 {
                    self.corruption(format!(
                        "ERROR refcount block {i} at {off:#x} is referenced {n} times"
                    ));
                }
            }
        }
    }

    /// Compares computed with stored refcounts; returns the highest cluster in use.
    fn compare(&mut self, reader: &mut RefcountReader<'_>) -> u64 {
        let mut highest = 0;
        for i in 0..self.nb_clusters {
            let stored = match reader.refcount(i) {
                Ok(r) => r,
                Err(e) => {
                    self.check_error(format!("ERROR cannot get the refcount of cluster {i}: {e}"));
                    continue;
                }
            };
            let computed = self.counts.get(i);
            if stored > 0 || computed > 0 {
                highest = i;
            }
            if stored < computed {
                self.corruption(format!(
                    "ERROR cluster {i} refcount={stored} reference={computed}"
                ));
            } else if stored > computed {
                self.report.leaks += 1;
                self.msg(format!(
                    "Leaked cluster {i} refcount={stored} reference={computed}"
                ));
            }
        }
        highest
    }

    /// Checks that the COPIED flag of every active L1 and L2 entry is set exactly when the
    /// stored refcount of the cluster it points to is 1 (qcow2.rst "Cluster mapping").
    fn check_copied(&mut self, reader: &mut RefcountReader<'_>) {
        let h = self.h;
        let img = self.img;
        let cb = h.cluster_bits;
        let step = if h.extended_l2() { 2 } else { 1 };
        for (i, &l1e) in img.l1().clone().iter().enumerate() {
            let l2_off = l1e & L1E_OFFSET;
            if l2_off == 0 {
                continue;
            }
            // Unreadable refcounts were reported by the comparison.
            let Ok(rc) = reader.refcount(l2_off >> cb) else {
                continue;
            };
            if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                self.corruption(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                ));
            }
            if l2_off >= self.file_len {
                continue;
            }
            let Some(words) = self.read_words(l2_off, self.cs / 8) else {
                return;
            };
            for pair in words.chunks_exact(step) {
                let entry = pair[0];
                let off = match classify(entry, h) {
                    Kind::Normal(o) | Kind::ZeroAlloc(o) => o,
                    _ => continue,
                };
                let rc = if h.has_data_file() {
                    1
                } else {
                    match reader.refcount(off >> cb) {
                        Ok(r) => r,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                    self.corruption(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open::ChainGuard;
    use crate::storage::MemStorage;
    use std::path::Path;

    #[test]
    fn counts_are_sparse() {
        let mut c = Counts::default();
        assert_eq!(c.get(123_456_789), 0);
        c.set(123_456_789, 7);
        assert_eq!(c.get(123_456_789), 7);
        assert_eq!(c.get(123_456_788), 0);
        assert_eq!(c.chunks.len(), 1);
        c.set(5, u32::MAX);
        assert_eq!(c.get(5), u64::from(u32::MAX));
    }

    const CS: usize = 512;

    /// A clean v3 image with 512-byte clusters and 16-bit refcounts, 64 KiB virtual:
    /// header, refcount table, refcount block, L1 (2 entries), one L2 table, 3 data clusters
    /// (one of them shared by two guest clusters, refcount 2, COPIED clear) and a compressed
    /// cluster.
    fn clean_image() -> Vec<u8> {
        let mut img = vec![0u8; 10 * CS];
        let put64 = |img: &mut Vec<u8>, off: usize, v: u64| {
            img[off..off + 8].copy_from_slice(&v.to_be_bytes())
        };
        let put32 = |img: &mut Vec<u8>, off: usize, v: u32| {
            img[off..off + 4].copy_from_slice(&v.to_be_bytes())
        };
        img[0..4].copy_from_slice(b"QFI\xfb");
        put32(&mut img, 4, 3);
        put32(&mut img, 20, 9);
        put64(&mut img, 24, 64 << 10);
        put32(&mut img, 36, 2);
        put64(&mut img, 40, 3 * CS as u64);
        put64(&mut img, 48, CS as u64);
        put32(&mut img, 56, 1);
        put32(&mut img, 96, 4);
        put32(&mut img, 100, 104);
        put64(&mut img, CS, 2 * CS as u64);
        // L1: entry 0 -> L2 at cluster 4.
        put64(&mut img, 3 * CS, OFLAG_COPIED | (4 * CS as u64));
        // L2: data at clusters 5, 6, 6 (shared), zero-alloc at 7, compressed in cluster 8.
        put64(&mut img, 4 * CS, OFLAG_COPIED | (5 * CS as u64));
        put64(&mut img, 4 * CS + 8, 6 * CS as u64);
        put64(&mut img, 4 * CS + 16, 6 * CS as u64);
        put64(
            &mut img,
            4 * CS + 24,
            OFLAG_COPIED | (7 * CS as u64) | OFLAG_ZERO,
        );
        // 512-byte clusters: x = 61, one sector at 8 * 512 + 100.
        put64(
            &mut img,
            4 * CS + 32,
            OFLAG_COMPRESSED | (8 * CS as u64 + 100),
        );
        let refs = [1u16, 1, 1, 1, 1, 1, 2, 1, 1, 0];
        for (i, r) in refs.iter().enumerate() {
            img[2 * CS + 2 * i..2 * CS + 2 * i + 2].copy_from_slice(&r.to_be_bytes());
        }
        img.truncate(9 * CS);
        img
    }

    fn check_bytes(bytes: Vec<u8>) -> Option<CheckReport> {
        let img = Qcow2Image::open_storage(
            Box::new(MemStorage::new(bytes)),
            Path::new("mem.qcow2"),
            false,
            true,
            &mut ChainGuard::default(),
        )
        .ok()?;
        Some(img.check().expect("check returns a report"))
    }

    #[test]
    fn clean_image_is_clean() {
        let r = check_bytes(clean_image()).unwrap();
        assert_eq!(r.messages, Vec::<String>::new());
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
        assert_eq!(r.total_clusters, 128);
        assert_eq!(r.allocated_clusters, 5);
        assert_eq!(r.compressed_clusters, 1);
        // 5 -> 6 (contiguous), 6 again (not), 7 (contiguous), compressed (always).
        assert_eq!(r.fragmented_clusters, 2);
        assert_eq!(r.image_end_offset, Some(9 * CS as u64));
    }

    #[test]
    fn mismatches_are_classified() {
        let mut b = clean_image();
        // Cluster 5: refcount 1 -> 0 (corruption, and COPIED now wrong); cluster 6: 2 -> 3
        // (leak).
        b[2 * CS + 10..2 * CS + 12].copy_from_slice(&0u16.to_be_bytes());
        b[2 * CS + 12..2 * CS + 14].copy_from_slice(&3u16.to_be_bytes());
        let r = check_bytes(b).unwrap();
        assert_eq!((r.corruptions, r.leaks), (2, 1), "{:?}", r.messages);
        assert!(r
            .messages
            .contains(&"ERROR cluster 5 refcount=0 reference=1".to_string()));
        assert!(r
            .messages
            .contains(&"Leaked cluster 6 refcount=3 reference=2".to_string()));
        assert_eq!(r.exit_code(), 2);
    }

    /// Random damage to the metadata never makes the check panic or fail.
    #[test]
    fn hostile_metadata_never_panics() {
        let clean = clean_image();
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut b = clean.clone();
            for _ in 0..1 + next() % 6 {
                // Mostly the tables (clusters 1-4), sometimes whole words of random bits.
                let pos = (CS as u64 + next() % (4 * CS as u64)) as usize & !7;
                if next() % 2 == 0 {
                    b[pos..pos + 8].copy_from_slice(&next().to_be_bytes());
                } else {
                    b[pos + (next() % 8) as usize] ^= 1 << (next() % 8);
                }
            }
            if next() % 8 == 0 {
                let len = (next() % b.len() as u64) as usize;
                b.truncate(len.max(CS));
            }
            if let Some(r) = check_bytes(b) {
                assert!(r.image_end_offset.is_some() || r.check_errors > 0);
            }
        }
    }
}
