//! Creating qcow2 images (`qemu-img create -f qcow2`).
//!
//! The image is laid out the way qemu-img 10 lays out a new image, so that `qemu-img info`,
//! `qemu-img check` and `qemu-img map` see the same image whichever tool made it:
//!
//! - cluster 0: the header (qcow2.rst "Header"), then the header extensions (qcow2.rst "Header
//!   extensions": backing file format name, external data file name, and, for version 3 images
//!   with clusters of at least 8 KiB, the feature name table), the end marker, and the backing
//!   file name;
//! - cluster 1: the refcount table; cluster 2: the first refcount block (qcow2.rst "Host cluster
//!   management");
//! - then the L1 table (qcow2.rst "Cluster mapping"), only as long as its entries.
//!
//! Preallocation adds L2 tables and data clusters. Where they go depends on the order in which
//! qemu allocates clusters, so the planner replays that order: clusters are handed out first-fit
//! from a moving cursor, a refcount block is created on demand in the first free cluster (it
//! describes itself when it falls into its own range), and a refcount table that is too small
//! is replaced by a larger one in a fresh area holding the new table and the refcount blocks
//! that area needs. `metadata` allocates an L2 table and then its data clusters, table by
//! table; `falloc` and `full` first build refcount structures covering everything (placed at
//! the end of the file), then the data area after them, then the L2 tables in the first free
//! clusters. The whole layout is computed in memory before anything is written.

use super::header::MIN_CLUSTER_BITS;
use super::header::{autoclear, compat, incompat, CompressionType, Header};
use super::header::{MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use super::l2::OFLAG_COPIED;
use super::refcount::table::set_refcount;
use crate::error::{Error, Result};
use crate::open::resolve_relative;
use crate::size::parse_size;
use byteorder::{BigEndian, ByteOrder};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The qcow2 version to write (`compat=`): qcow2.rst "Header", bytes 4-7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// Version 2 (`compat=0.10` or `v2`): a 72-byte header, no feature bits, 16-bit refcounts.
    V2,
    /// Version 3 (`compat=1.1` or `v3`), the default.
    #[default]
    V3,
}

impl Compat {
    /// The name `qemu-img info` reports (`0.10` or `1.1`).
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }

    /// The header's version field.
    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

use crate::prealloc::FileWriter as Out;
pub(super) use crate::prealloc::Preallocation;

/// Everything that defines a new qcow2 image. [`Default`] gives qemu-img's defaults: version
/// 3, 64 KiB clusters, 16-bit refcounts, zlib compression, no preallocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual disk size in bytes (qcow2.rst "Header", bytes 24-31). Rounded up to a multiple
    /// of 512 when the image is written, as qemu does.
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 B to 2 MiB (bytes 20-23 hold its log2).
    pub cluster_size: u64,
    /// The qcow2 version.
    pub compat: Compat,
    /// Width of a refcount: a power of two from 1 to 64 (version 2 only has 16). Bytes 96-99
    /// hold its log2 (`refcount_order`).
    pub refcount_bits: u64,
    /// Set the lazy refcounts compatible feature (bit 0 of bytes 80-87; version 3 only).
    pub lazy_refcounts: bool,
    /// Compression type of compressed clusters (byte 104; zstd needs version 3).
    pub compression_type: CompressionType,
    /// Extended L2 entries with subcluster bitmaps (incompatible bit 4; version 3 and clusters
    /// of at least 16 KiB).
    pub extended_l2: bool,
    /// Backing file name, recorded as given (relative names are relative to the image).
    pub backing_file: Option<String>,
    /// Backing file format, recorded in the backing format header extension.
    pub backing_fmt: Option<String>,
    /// External data file name (incompatible bit 2 and the data file header extension),
    /// recorded as given; the file is created (or truncated) next to the image.
    pub data_file: Option<String>,
    /// The data file stays a valid raw image (autoclear bit 1): every cluster is mapped to the
    /// same offset in the data file.
    pub data_file_raw: bool,
    /// What to allocate up front.
    pub preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            compat: Compat::V3,
            refcount_bits: 16,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            extended_l2: false,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
        }
    }
}

/// The options one or more `-o` arguments set, in qemu-img's syntax: each field is `None`
/// unless an option named it. Merge several with [`OptionUpdates::merge`] (later wins) and
/// apply them with [`CreateOptions::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptionUpdates {
    /// `size=`
    pub size: Option<u64>,
    /// `cluster_size=`
    pub cluster_size: Option<u64>,
    /// `compat=`
    pub compat: Option<Compat>,
    /// `refcount_bits=`
    pub refcount_bits: Option<u64>,
    /// `lazy_refcounts=`
    pub lazy_refcounts: Option<bool>,
    /// `compression_type=`
    pub compression_type: Option<CompressionType>,
    /// `extended_l2=`
    pub extended_l2: Option<bool>,
    /// `backing_file=`
    pub backing_file: Option<String>,
    /// `backing_fmt=`
    pub backing_fmt: Option<String>,
    /// `data_file=`
    pub data_file: Option<String>,
    /// `data_file_raw=`
    pub data_file_raw: Option<bool>,
    /// `preallocation=`
    pub preallocation: Option<Preallocation>,
    /// `help` or `?` was given: list the options instead of creating anything.
    pub help: bool,
}

impl OptionUpdates {
    /// Adds the options of a later `-o` argument; where both set an option, `later` wins.
    pub fn merge(&mut self, later: OptionUpdates) {
        fn take<T>(a: &mut Option<T>, b: Option<T>) {
            if b.is_some() {
                *a = b;
            }
        }
        take(&mut self.size, later.size);
        take(&mut self.cluster_size, later.cluster_size);
        take(&mut self.compat, later.compat);
        take(&mut self.refcount_bits, later.refcount_bits);
        take(&mut self.lazy_refcounts, later.lazy_refcounts);
        take(&mut self.compression_type, later.compression_type);
        take(&mut self.extended_l2, later.extended_l2);
        take(&mut self.backing_file, later.backing_file);
        take(&mut self.backing_fmt, later.backing_fmt);
        take(&mut self.data_file, later.data_file);
        take(&mut self.data_file_raw, later.data_file_raw);
        take(&mut self.preallocation, later.preallocation);
        self.help |= later.help;
    }

    /// The names of the options that are set, in qemu-img's option order.
    pub fn given_keys(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |set: bool, k| {
            if set {
                v.push(k)
            }
        };
        add(self.size.is_some(), "size");
        add(self.cluster_size.is_some(), "cluster_size");
        add(self.compat.is_some(), "compat");
        add(self.refcount_bits.is_some(), "refcount_bits");
        add(self.lazy_refcounts.is_some(), "lazy_refcounts");
        add(self.compression_type.is_some(), "compression_type");
        add(self.extended_l2.is_some(), "extended_l2");
        add(self.backing_file.is_some(), "backing_file");
        add(self.backing_fmt.is_some(), "backing_fmt");
        add(self.data_file.is_some(), "data_file");
        add(self.data_file_raw.is_some(), "data_file_raw");
        add(self.preallocation.is_some(), "preallocation");
        v
    }
}

/// The options [`parse_options`] knows, with a one-line description each (for `-o help`).
pub(super) const OPTION_HELP: &[(&str, &str)] = &[
    (
        "backing_file=<str>",
        "name of the backing file (needs backing_fmt)",
    ),
    (
        "backing_fmt=<str>",
        "format of the backing file (raw, qcow2, ...)",
    ),
    (
        "cluster_size=<size>",
        "cluster size, a power of two from 512 to 2M (default 64k)",
    ),
    (
        "compat=<str>",
        "qcow2 version: 1.1 or v3 (default), 0.10 or v2",
    ),
    (
        "compression_type=<str>",
        "compression of compressed clusters: zlib (default) or zstd",
    ),
    (
        "data_file=<str>",
        "keep guest data in this external file (created or truncated)",
    ),
    (
        "data_file_raw=<bool>",
        "keep the data file a valid raw image by itself (on/off)",
    ),
    (
        "extended_l2=<bool>",
        "subcluster allocation with 16-byte L2 entries (on/off)",
    ),
    (
        "extent_size_hint=<size>",
        "accepted for qemu-img compatibility (an xfs extent size hint; not set)",
    ),
    (
        "lazy_refcounts=<bool>",
        "defer refcount updates, marking the image dirty (on/off)",
    ),
    (
        "preallocation=<str>",
        "off (default), metadata, falloc or full",
    ),
    (
        "refcount_bits=<num>",
        "width of a refcount: 1, 2, 4, 8, 16 (default), 32 or 64",
    ),
    ("size=<size>", "virtual disk size"),
];

/// Splits a qemu-style option list into its items: items are separated by commas, and `,,`
/// stands for a comma inside an item. An empty item (a leading, trailing or doubled separator
/// where no escaped comma is meant) makes the list invalid, as in qemu.
pub fn split_option_list(s: &str) -> Result<Vec<String>> {
    let invalid = || Error::invalid_input(format!("invalid option list: '{s}'"));
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                if cur.is_empty() {
                    return Err(invalid());
                }
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if cur.is_empty() {
        return Err(invalid());
    }
    items.push(cur);
    Ok(items)
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool> {
    match v {
        None | Some("on") | Some("yes") | Some("true") => Ok(true),
        Some("off") | Some("no") | Some("false") => Ok(false),
        Some(other) => Err(Error::invalid_input(format!(
            "option '{key}' expects 'on' or 'off', not '{other}'"
        ))),
    }
}

/// Parses one `-o` argument of `qemu-img create` for qcow2 (and raw, which takes `size` and
/// `preallocation` only; the caller refuses the rest): comma-separated `key=value` items,
/// `,,` for a comma inside a value, sizes with `k`/`M`/`G`/`T` suffixes, booleans as
/// `on`/`off` (a boolean key alone means `on`), `help` or `?` to ask for the option list.
/// Unknown keys are refused; encryption options are refused as unsupported. Combinations are
/// checked later, by [`CreateOptions::validate`].
pub fn parse_options(s: &str) -> Result<OptionUpdates> {
    let mut u = OptionUpdates::default();
    for item in split_option_list(s)? {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (item.clone(), None),
        };
        let v = value.as_deref();
        let need = |what: &str| -> Result<&str> {
            v.ok_or_else(|| Error::invalid_input(format!("option '{key}' needs a value ({what})")))
        };
        match key.as_str() {
            "help" | "?" if v.is_none() => u.help = true,
            "size" => {
                let text = need("a size")?;
                u.size =
                    Some(parse_size(text).map_err(|e| {
                        Error::invalid_input(format!("option 'size': {}", e.what()))
                    })?);
            }
            "cluster_size" => {
                let text = need("a size")?;
                u.cluster_size = Some(parse_size(text).map_err(|e| {
                    Error::invalid_input(format!("option 'cluster_size': {}", e.what()))
                })?);
            }
            "compat" => {
                u.compat = Some(match need("0.10, v2, 1.1 or v3")? {
                    "0.10" | "v2" => Compat::V2,
                    "1.1" | "v3" => Compat::V3,
                    other => {
                        return Err(Error::invalid_input(format!(
                            "invalid compat value '{other}' (use 0.10, v2, 1.1 or v3)"
                        )))
                    }
                })
            }
            "refcount_bits" => {
                let text = need("a number")?;
                // As qemu's option parser (strtoull), a negative number wraps around: it is
                // then refused as a width, after the "Formatting" line shows it.
                let (neg, digits) = match text.strip_prefix('-') {
                    Some(d) => (true, d),
                    None => (false, text),
                };
                let n = digits
                    .parse::<u64>()
                    .ok()
                    .filter(|_| !digits.starts_with('+'))
                    .ok_or_else(|| {
                        Error::invalid_input(format!(
                            "option 'refcount_bits' expects a number, not '{text}'"
                        ))
                    })?;
                u.refcount_bits = Some(if neg { n.wrapping_neg() } else { n });
            }
            "lazy_refcounts" => u.lazy_refcounts = Some(parse_bool(&key, v)?),
            "extended_l2" => u.extended_l2 = Some(parse_bool(&key, v)?),
            "data_file_raw" => u.data_file_raw = Some(parse_bool(&key, v)?),
            "compression_type" => {
                u.compression_type = Some(match need("zlib or zstd")? {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    other => {
                        return Err(Error::invalid_input(format!(
                            "invalid compression type '{other}' (use zlib or zstd)"
                        )))
                    }
                })
            }
            "preallocation" => {
                u.preallocation = Some(Preallocation::from_name(need("a mode")?)?);
            }
            "backing_file" => u.backing_file = Some(need("a file name")?.to_string()),
            "backing_fmt" => u.backing_fmt = Some(need("a format name")?.to_string()),
            "data_file" => u.data_file = Some(need("a file name")?.to_string()),
            k if k == "encryption" || k.starts_with("encrypt.") => {
                return Err(Error::unsupported(format!(
                    "option '{k}': creating encrypted images is not supported"
                )))
            }
            // qemu sets it as the xfs extent size hint of the image file (FS_IOC_FSSETXATTR)
            // and ignores it on other file systems; vimg accepts and checks it, and leaves the
            // file system's default (it only affects how the host file's space is grouped).
            "extent_size_hint" => {
                let text = need("a size")?;
                let hint = parse_size(text).map_err(|e| {
                    Error::invalid_input(format!("option 'extent_size_hint': {}", e.what()))
                })?;
                if hint > u64::from(u32::MAX) {
                    return Err(Error::invalid_input("Extent size hint is too large"));
                }
            }
            "nocow" => {
                return Err(Error::unsupported(format!(
                    "option '{key}' (a host file system hint) is not supported"
                )))
            }
            _ => {
                return Err(Error::invalid_input(format!(
                    "unknown option '{key}' (see -o help)"
                )))
            }
        }
    }
    Ok(u)
}

impl CreateOptions {
    /// Sets every option `u` names.
    pub fn apply(&mut self, u: &OptionUpdates) {
        if let Some(v) = u.size {
            self.size = v;
        }
        if let Some(v) = u.cluster_size {
            self.cluster_size = v;
        }
        if let Some(v) = u.compat {
            self.compat = v;
        }
        if let Some(v) = u.refcount_bits {
            self.refcount_bits = v;
        }
        if let Some(v) = u.lazy_refcounts {
            self.lazy_refcounts = v;
        }
        if let Some(v) = u.compression_type {
            self.compression_type = v;
        }
        if let Some(v) = u.extended_l2 {
            self.extended_l2 = v;
        }
        if let Some(v) = &u.backing_file {
            self.backing_file = Some(v.clone());
        }
        if let Some(v) = &u.backing_fmt {
            self.backing_fmt = Some(v.clone());
        }
        if let Some(v) = &u.data_file {
            self.data_file = Some(v.clone());
        }
        if let Some(v) = u.data_file_raw {
            self.data_file_raw = v;
        }
        if let Some(v) = u.preallocation {
            self.preallocation = v;
        }
    }

    /// Checks the options against qcow2.rst's rules and qemu-img's: cluster and refcount sizes,
    /// features that need version 3, extended L2 with small clusters, a backing file without a
    /// format, a data-file flag without a data file, preallocation under a backing file
    /// (which needs extended L2, whose unallocated subclusters still read from the backing
    /// file), and a disk too large for the L1 table limit.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::invalid_input(m.to_string()));
        let cs = self.cluster_size;
        if !cs.is_power_of_two()
            || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs)
        {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.compat == Compat::V2 {
            // qemu-img's words (qcow2_co_create), which scripts match.
            let v3_only = |what: &str| {
                Err(Error::invalid_input(format!(
                    "{what} (use version=v3 or greater)"
                )))
            };
            if rb != 16 {
                return v3_only(
                    "Different refcount widths than 16 bits require compatibility level 1.1 \
                     or above",
                );
            }
            if self.lazy_refcounts {
                return v3_only(
                    "Lazy refcounts only supported with compatibility level 1.1 and above",
                );
            }
            if self.compression_type != CompressionType::Zlib {
                return v3_only(
                    "Non-zlib compression type is only supported with compatibility level 1.1 \
                     and above",
                );
            }
            if self.extended_l2 {
                return v3_only(
                    "Extended L2 entries are only supported with compatibility level 1.1 and \
                     above",
                );
            }
            if self.data_file.is_some() {
                return v3_only(
                    "External data files are only supported with compatibility level 1.1 and \
                     above",
                );
            }
        }
        if self.extended_l2 && cs < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_file.is_some() && self.backing_fmt.is_none() {
            return bad("Backing file specified without backing format");
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file");
        }
        if let Some(b) = &self.backing_file {
            if b.is_empty() {
                return bad("Expected backing file name, got empty string");
            }
            if b.len() > MAX_BACKING_NAME as usize {
                return bad("backing file name is longer than 1023 bytes");
            }
        }
        if let Some(d) = &self.data_file {
            if d.is_empty() {
                return bad("data file name is empty");
            }
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return bad("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return bad(
                "Backing file and preallocation can only be used at the same time if \
                 extended_l2 is on",
            );
        }
        if self.size > i64::MAX as u64 - 511 {
            return bad("image size is too large");
        }
        let g = Geometry::new(self);
        if g.l1_size(round_size(self.size)) * 8 > MAX_L1_BYTES {
            return bad(
                "The image size is too large for file format 'qcow2' (try using a larger \
                 cluster size)",
            );
        }
        Ok(())
    }
}

/// The virtual size as qemu records it: rounded up to whole 512-byte sectors.
pub(crate) fn round_size(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

/// Cluster arithmetic for one image.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    cluster_bits: u32,
    refcount_order: u32,
    /// Bytes per L2 entry (8, or 16 with extended L2).
    l2_entry: u64,
}

impl Geometry {
    fn new(o: &CreateOptions) -> Self {
        Geometry {
            cluster_bits: o
                .cluster_size
                .max(512)
                .trailing_zeros()
                .min(MAX_CLUSTER_BITS),
            refcount_order: o.refcount_bits.max(1).trailing_zeros().min(6),
            l2_entry: if o.extended_l2 { 16 } else { 8 },
        }
    }
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Clusters one L2 table maps.
    fn l2_entries(&self) -> u64 {
        self.cs() / self.l2_entry
    }
    /// Refcounts per refcount block.
    fn rb_entries(&self) -> u64 {
        (self.cs() * 8) >> self.refcount_order
    }
    /// The unit of allocation inside a cluster: a subcluster (1/32 of a cluster) with extended
    /// L2 entries, else the cluster.
    fn subcluster(&self) -> u64 {
        if self.l2_entry == 16 {
            self.cs() / 32
        } else {
            self.cs()
        }
    }
    fn l1_size(&self, size: u64) -> u64 {
        size.div_ceil(self.cs()).div_ceil(self.l2_entries())
    }
}

/// A set of host clusters, as disjoint half-open ranges keyed by their start.
#[derive(Debug, Default, Clone)]
struct ClusterSet {
    ranges: BTreeMap<u64, u64>,
}

impl ClusterSet {
    /// The range holding `c`, if any.
    fn range_of(&self, c: u64) -> Option<(u64, u64)> {
        self.ranges
            .range(..=c)
            .next_back()
            .filter(|(_, &e)| e > c)
            .map(|(&s, &e)| (s, e))
    }

    /// The first cluster of the set in `[start, end)`.
    fn first_in(&self, start: u64, end: u64) -> Option<u64> {
        if self.range_of(start).is_some() {
            return Some(start);
        }
        self.ranges.range(start..end).next().map(|(&s, _)| s)
    }

    fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        if let Some((ps, pe)) = self.ranges.range(..=s).next_back().map(|(&a, &b)| (a, b)) {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.ranges.remove(&ps);
            }
        }
        while let Some((ns, ne)) = self.ranges.range(s..=e).next().map(|(&a, &b)| (a, b)) {
            e = e.max(ne);
            self.ranges.remove(&ns);
        }
        self.ranges.insert(s, e);
    }

    fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, start);
            }
            if e > end {
                self.ranges.insert(end, e);
            }
        }
    }

    /// The ranges intersecting `[start, end)`, clipped to it.
    fn clipped(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some((s, e)) = self.range_of(start) {
            out.push((s.max(start), e.min(end)));
        }
        for (&s, &e) in self.ranges.range(start..end) {
            if s != start {
                out.push((s, e.min(end)));
            }
        }
        out
    }
}

/// An allocation had to be abandoned because the refcount table was replaced; the caller
/// allocates again.
#[derive(Debug)]
struct Retry;

/// A run of guest clusters mapped to consecutive host clusters.
#[derive(Debug, Clone, Copy)]
struct Run {
    guest: u64,
    host: u64,
    len: u64,
}

/// The allocation state of the image being built, replaying qemu's cluster allocator (see the
/// module documentation). Cluster numbers are host cluster indices.
#[derive(Debug)]
struct Layout {
    geo: Geometry,
    /// Clusters with refcount 1 (qcow2.rst "Host cluster management": a new image has no
    /// shared clusters).
    used: ClusterSet,
    /// Where the next first-fit search starts.
    free_index: u64,
    /// The refcount table: the refcount block cluster of each entry, 0 for none. Its length is
    /// the table's capacity.
    table: Vec<u64>,
    table_at: u64,
    table_clusters: u64,
    /// Refcount tables given up when a larger one replaced them: cluster, length in clusters,
    /// and entries. qemu leaves their contents in place; so does vimg.
    stale_tables: Vec<(u64, u64, Vec<u64>)>,
    /// Length of the file written so far, in bytes.
    file_end: u64,
}

impl Layout {
    /// The state after the first step of creation: header (cluster 0), refcount table
    /// (cluster 1) and the first refcount block (cluster 2), all with refcount 1.
    fn new(geo: Geometry) -> Self {
        let cs = geo.cs();
        let mut table = vec![0u64; (cs / 8) as usize];
        table[0] = 2;
        let mut used = ClusterSet::default();
        used.insert(0, 3);
        Layout {
            geo,
            used,
            free_index: 3,
            table,
            table_at: 1,
            table_clusters: 1,
            stale_tables: Vec::new(),
            file_end: 3 * cs,
        }
    }

    fn wrote(&mut self, end_byte: u64) {
        self.file_end = self.file_end.max(end_byte);
    }

    /// Finds `n` free clusters first-fit from the cursor, without taking them.
    fn find_free(&mut self, n: u64) -> u64 {
        loop {
            let start = self.free_index;
            match self.used.first_in(start, start + n) {
                Some(c) => {
                    let (_, e) = self.used.range_of(c).expect("cluster is in the set");
                    self.free_index = e;
                }
                None => {
                    self.free_index = start + n;
                    return start;
                }
            }
        }
    }

    /// Allocates `n` consecutive clusters.
    fn alloc(&mut self, n: u64) -> u64 {
        loop {
            let start = self.find_free(n);
            if self.take(start, n).is_ok() {
                return start;
            }
        }
    }

    /// Gives clusters `[start, start + n)` refcount 1, creating refcount blocks as needed.
    /// When the refcount table had to be replaced, undoes what it did and asks for a retry.
    fn take(&mut self, start: u64, n: u64) -> Result<(), Retry> {
        let e = self.geo.rb_entries();
        let end = start + n;
        let mut c = start;
        while c < end {
            let idx = c / e;
            if let Err(r) = self.ensure_block(idx) {
                if c > start {
                    self.used.remove(start, c);
                    self.free_index = self.free_index.min(start);
                }
                return Err(r);
            }
            let chunk_end = end.min((idx + 1) * e);
            self.used.insert(c, chunk_end);
            c = chunk_end;
        }
        Ok(())
    }

    /// Makes sure refcount block `idx` exists.
    fn ensure_block(&mut self, idx: u64) -> Result<(), Retry> {
        if self.table.get(idx as usize).is_some_and(|&b| b != 0) {
            return Ok(());
        }
        let cs = self.geo.cs();
        let new = self.find_free(1);
        let self_describing = new / self.geo.rb_entries() == idx;
        if self_describing {
            self.used.insert(new, new + 1);
        } else {
            self.take(new, 1)?;
        }
        self.wrote((new + 1) * cs);
        if (idx as usize) < self.table.len() {
            self.table[idx as usize] = new;
            return Ok(());
        }
        // The table is full: replace it by a larger one, placed with the refcount blocks it
        // needs after the range the new block covers.
        let area = ((idx + 1) * self.geo.rb_entries())
            .max(self.highest_used().next_multiple_of(self.geo.rb_entries()));
        self.refcount_area(area, 0, false, Some((idx, new)));
        Err(Retry)
    }

    fn highest_used(&self) -> u64 {
        self.used.ranges.iter().next_back().map_or(0, |(_, &e)| e)
    }

    /// Refcount blocks and table clusters needed so that `clusters` clusters, the blocks and
    /// the table are all covered; `generous` leaves room in the table for half as many entries
    /// again.
    fn metadata_size(&self, clusters: u64, generous: bool) -> (u64, u64) {
        let e = self.geo.rb_entries();
        let per_table_cluster = self.geo.cs() / 8;
        let mut blocks = clusters.div_ceil(e).max(1);
        loop {
            let entries = if generous {
                blocks + blocks.div_ceil(2)
            } else {
                blocks
            };
            let table = entries.div_ceil(per_table_cluster);
            let need = (clusters + blocks + table).div_ceil(e);
            if need <= blocks {
                return (blocks, table);
            }
            blocks = need;
        }
    }

    /// Builds a new refcount table at cluster `start`, after the refcount blocks that cover
    /// `start` onwards and are still missing, sized for `start + additional` clusters plus the
    /// new structures; the old table is freed. `pending` is a refcount block that was created
    /// but found no room in the old table. Returns the first cluster after the area.
    fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        pending: Option<(u64, u64)>,
    ) -> u64 {
        let cs = self.geo.cs();
        let e = self.geo.rb_entries();
        let (blocks, mut table_clusters) = self.metadata_size(start + additional, !exact);
        let per_table_cluster = cs / 8;
        let highest_entry = self
            .table
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i as u64 + 1)
            .max(pending.map_or(0, |(i, _)| i + 1));
        table_clusters = table_clusters.max(highest_entry.div_ceil(per_table_cluster));
        let mut table = self.table.clone();
        table.resize((table_clusters * per_table_cluster) as usize, 0);
        if let Some((i, b)) = pending {
            table[i as usize] = b;
        }
        let mut next = start;
        for i in start / e..blocks {
            if table[i as usize] == 0 {
                table[i as usize] = next;
                next += 1;
            }
        }
        let table_at = next;
        next += table_clusters;
        self.used.insert(start, next);
        self.wrote(next * cs);
        let old = std::mem::replace(&mut self.table, table);
        self.stale_tables
            .push((self.table_at, self.table_clusters, old));
        self.used
            .remove(self.table_at, self.table_at + self.table_clusters);
        self.free_index = self.free_index.min(self.table_at);
        self.table_at = table_at;
        self.table_clusters = table_clusters;
        next
    }
}

/// The planned image: where everything goes and what the file holds.
#[derive(Debug)]
struct Plan {
    geo: Geometry,
    size: u64,
    layout: Layout,
    l1_size: u64,
    l1_at: u64,
    /// Host cluster of each L2 table (0: none).
    l2_at: Vec<u64>,
    /// Data runs (guest cluster to host cluster), sorted by guest cluster.
    runs: Vec<Run>,
    /// Guest clusters map to the same offsets of the external data file.
    identity_map: bool,
    /// Host byte range to fallocate (`falloc`) or write zeros to (`full`).
    data_area: Option<(u64, u64)>,
    /// Byte range of the last (sub)cluster's tail beyond the disk, written with zeros: in the
    /// image file, or in the data file with `identity_map`.
    tail: Option<(u64, u64)>,
    /// The file's minimum final length in bytes.
    min_len: u64,
}

fn plan(o: &CreateOptions) -> Plan {
    let geo = Geometry::new(o);
    let cs = geo.cs();
    let size = round_size(o.size);
    let mut layout = Layout::new(geo);
    let l1_size = geo.l1_size(size);
    let mut l1_at = 0;
    if l1_size > 0 {
        l1_at = layout.alloc((l1_size * 8).div_ceil(cs));
        layout.wrote(l1_at * cs + l1_size * 8);
    }
    let mut p = Plan {
        geo,
        size,
        l1_size,
        l1_at,
        l2_at: vec![0; l1_size as usize],
        runs: Vec::new(),
        identity_map: false,
        data_area: None,
        tail: None,
        min_len: 0,
        layout,
    };
    let mode = match o.preallocation {
        Preallocation::Off if o.data_file_raw => Preallocation::Metadata,
        m => m,
    };
    let data_clusters = size.div_ceil(cs);
    let per_l2 = geo.l2_entries();
    // qemu allocates at most this many clusters in one request.
    let max_run = ((i32::MAX as u64) >> geo.cluster_bits).max(1);
    match mode {
        Preallocation::Off => {}
        Preallocation::Metadata | Preallocation::Falloc | Preallocation::Full
            if mode == Preallocation::Metadata || o.data_file.is_some() =>
        {
            let mut last_end = 0;
            for li in 0..l1_size {
                let l2 = p.layout.alloc(1);
                p.layout.wrote((l2 + 1) * cs);
                p.l2_at[li as usize] = l2;
                let first = li * per_l2;
                let count = per_l2.min(data_clusters - first);
                if o.data_file.is_some() {
                    continue;
                }
                let mut k = 0;
                while k < count {
                    let n = max_run.min(count - k);
                    let host = p.layout.alloc(n);
                    p.runs.push(Run {
                        guest: first + k,
                        host,
                        len: n,
                    });
                    k += n;
                    last_end = (host + n - 1) * cs + (size - (first + k - 1) * cs).min(cs);
                }
            }
            // qemu zeroes the rest of the last (sub)cluster past the end of the disk.
            let rem = size % cs;
            let tail_end = rem.next_multiple_of(geo.subcluster());
            if o.data_file.is_some() {
                p.identity_map = true;
                if rem != tail_end {
                    p.tail = Some((size, size - rem + tail_end));
                }
            } else if let Some(last) = p.runs.last() {
                let host_last = last.host + last.len - 1;
                if rem != tail_end {
                    p.tail = Some((host_last * cs + rem, host_last * cs + tail_end));
                }
                p.min_len = last_end;
            }
        }
        Preallocation::Metadata | Preallocation::Falloc | Preallocation::Full => {
            let start = p.layout.file_end.div_ceil(cs);
            let tables = data_clusters.div_ceil(per_l2) + 1;
            let data_at = p
                .layout
                .refcount_area(start, data_clusters + tables, true, None);
            p.layout.used.insert(data_at, data_at + data_clusters);
            p.data_area = Some((data_at * cs, (data_at + data_clusters) * cs));
            p.min_len = (data_at + data_clusters) * cs;
            for li in 0..l1_size {
                let l2 = p.layout.alloc(1);
                p.layout.wrote((l2 + 1) * cs);
                p.l2_at[li as usize] = l2;
                let first = li * per_l2;
                let count = per_l2.min(data_clusters - first);
                p.runs.push(Run {
                    guest: first,
                    host: data_at + first,
                    len: count,
                });
            }
        }
    }
    p
}

/// The bytes of cluster 0: header, extensions, backing file name (qcow2.rst "Header" and
/// "Header extensions"), laid out by [`Header::encode`].
fn header_cluster(o: &CreateOptions, p: &Plan) -> Result<Vec<u8>> {
    let v3 = o.compat == Compat::V3;
    let mut incompatible_features = 0;
    if o.data_file.is_some() {
        incompatible_features |= incompat::DATA_FILE;
    }
    if o.compression_type != CompressionType::Zlib {
        incompatible_features |= incompat::COMPRESSION;
    }
    if o.extended_l2 {
        incompatible_features |= incompat::EXTENDED_L2;
    }
    let h = Header {
        version: o.compat.version(),
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: p.geo.cluster_bits,
        size: p.size,
        crypt_method: 0,
        l1_size: p.l1_size as u32,
        l1_table_offset: p.l1_at << p.geo.cluster_bits,
        refcount_table_offset: p.layout.table_at << p.geo.cluster_bits,
        refcount_table_clusters: p.layout.table_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if v3 { incompatible_features } else { 0 },
        compatible_features: if v3 && o.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if v3 && o.data_file_raw {
            autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: p.geo.refcount_order,
        header_length: if v3 { 112 } else { 72 },
        compression_type: o.compression_type,
        extra_header_bytes: if v3 { vec![0; 7] } else { Vec::new() },
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_fmt.clone(),
        data_file: o.data_file.clone(),
        feature_names: Vec::new(),
        bitmaps: None,
        crypto_header: None,
        unknown_extensions: Vec::new(),
    };
    h.encode().map_err(|_| {
        Error::invalid_input(
            "the backing and data file names do not fit in the first cluster (use a larger \
             cluster size or shorter names)",
        )
    })
}

fn table_bytes(entries: &[u64], clusters: u64, cs: u64) -> Vec<u8> {
    let mut buf = vec![0u8; (clusters * cs) as usize];
    for (i, &b) in entries
        .iter()
        .enumerate()
        .take((clusters * cs / 8) as usize)
    {
        BigEndian::write_u64(&mut buf[i * 8..], b * cs);
    }
    buf
}

/// Creates `path`, or truncates the file there, for reading and writing, holding a writer's
/// image locks (a file another process has open is refused and left as it is).
pub(crate) fn create_file(path: &Path) -> Result<crate::lock::LockedFile> {
    crate::storage::create_file(path)
        .map_err(|e| Error::io("cannot create image", e).with_path(path))
}

/// Creates a qcow2 image at `path` (truncating any file there) as `opts` describes, laid out
/// as qemu-img lays it out (see the module documentation). With a data file, the data file is
/// created too (or truncated), resolved relative to the image's directory, and sized to the
/// virtual size; with `data_file_raw`, or any preallocation, every cluster is mapped to the
/// same offset in it. The backing file is only recorded, never opened. A failed create removes
/// the files it made.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let p = plan(opts);
    if p.layout.table_clusters * p.geo.cs() > MAX_REFTABLE_BYTES {
        return Err(Error::invalid_input(
            "the image would need a refcount table larger than 8 MiB (use a larger cluster \
             size)",
        ));
    }
    let header = header_cluster(opts, &p)?;
    let data_path = match &opts.data_file {
        Some(d) => Some(resolve_relative(path, d)?),
        None => None,
    };
    let mut made: Vec<PathBuf> = Vec::new();
    let r = write_all(path, opts, &p, &header, data_path.as_deref(), &mut made);
    if r.is_err() {
        for f in made {
            crate::storage::remove_failed_output(&f);
        }
    }
    r
}

fn write_all(
    path: &Path,
    o: &CreateOptions,
    p: &Plan,
    header: &[u8],
    data_path: Option<&Path>,
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    let cs = p.geo.cs();
    let file = create_file(path)?;
    made.push(path.to_path_buf());
    let out = Out { file: &file, path };
    let data_file = match data_path {
        Some(dp) => {
            let f = create_file(dp).map_err(|e| {
                let what = format!("cannot create data file '{}': {}", dp.display(), e.what());
                e.reworded(what)
            })?;
            made.push(dp.to_path_buf());
            Some(f)
        }
        None => None,
    };

    out.write(header, 0)?;
    for (at, clusters, entries) in &p.layout.stale_tables {
        out.write(&table_bytes(entries, *clusters, cs), at * cs)?;
    }
    let l = &p.layout;
    out.write(
        &table_bytes(&l.table, l.table_clusters, cs),
        l.table_at * cs,
    )?;
    write_refcount_blocks(&out, p)?;
    if let Some((start, end)) = p.data_area {
        match o.preallocation {
            Preallocation::Full => out.zeros(start, end)?,
            _ => out.fallocate(start, end)?,
        }
    }
    if p.l1_size > 0 {
        let mut l1 = vec![0u8; (p.l1_size * 8) as usize];
        for (i, &t) in p.l2_at.iter().enumerate() {
            if t != 0 {
                BigEndian::write_u64(&mut l1[i * 8..], (t * cs) | OFLAG_COPIED);
            }
        }
        out.write(&l1, p.l1_at * cs)?;
    }
    write_l2_tables(&out, p)?;
    if let (Some((start, end)), false) = (p.tail, p.identity_map) {
        out.zeros(start, end)?;
    }
    if out.len()? < p.min_len {
        out.set_len(p.min_len)?;
    }
    file.sync_all()
        .map_err(|e| Error::io("flush failed", e).with_path(path))?;

    if let (Some(df), Some(dp)) = (&data_file, data_path) {
        let dout = Out { file: df, path: dp };
        let mode = if p.identity_map {
            // qemu zeroes the tail of the last (sub)cluster past the disk, then grows the file
            // to the disk size if it is still shorter.
            if let Some((start, end)) = p.tail {
                dout.zeros(start, end)?;
            }
            match o.preallocation {
                Preallocation::Off | Preallocation::Metadata => Preallocation::Off,
                m => m,
            }
        } else {
            Preallocation::Off
        };
        dout.grow(p.size, mode)?;
        df.sync_all()
            .map_err(|e| Error::io("flush failed", e).with_path(dp))?;
    }
    Ok(())
}

fn write_refcount_blocks(out: &Out<'_>, p: &Plan) -> Result<()> {
    let l = &p.layout;
    let cs = p.geo.cs();
    let e = p.geo.rb_entries();
    let mut buf = vec![0u8; cs as usize];
    for (i, &b) in l.table.iter().enumerate() {
        if b == 0 {
            continue;
        }
        buf.fill(0);
        let first = i as u64 * e;
        for (s, t) in l.used.clipped(first, first + e) {
            for c in s..t {
                set_refcount(&mut buf, c - first, p.geo.refcount_order, 1);
            }
        }
        out.write(&buf, b * cs)?;
    }
    Ok(())
}

fn write_l2_tables(out: &Out<'_>, p: &Plan) -> Result<()> {
    let cs = p.geo.cs();
    let per_l2 = p.geo.l2_entries();
    let data_clusters = p.size.div_ceil(cs);
    let esize = p.geo.l2_entry as usize;
    let mut buf = vec![0u8; cs as usize];
    let mut runs = p.runs.iter().peekable();
    for (li, &at) in p.l2_at.iter().enumerate() {
        if at == 0 {
            continue;
        }
        buf.fill(0);
        let first = li as u64 * per_l2;
        let count = per_l2.min(data_clusters - first);
        if p.identity_map {
            for k in 0..count {
                BigEndian::write_u64(
                    &mut buf[k as usize * esize..],
                    ((first + k) * cs) | OFLAG_COPIED,
                );
            }
        } else {
            while let Some(r) = runs.peek() {
                if r.guest >= first + count {
                    break;
                }
                for k in 0..r.len {
                    let g = r.guest + k - first;
                    BigEndian::write_u64(
                        &mut buf[g as usize * esize..],
                        ((r.host + k) * cs) | OFLAG_COPIED,
                    );
                }
                runs.next();
            }
        }
        out.write(&buf, at * cs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::qcow2::format::header::ext;

    fn opts(f: impl FnOnce(&mut CreateOptions)) -> CreateOptions {
        let mut o = CreateOptions::default();
        f(&mut o);
        o
    }

    #[test]
    fn option_lists_split_like_qemu() {
        assert_eq!(
            split_option_list("a=1,b=x,,y").unwrap(),
            vec!["a=1", "b=x,y"]
        );
        assert_eq!(split_option_list("a=,,,,").unwrap(), vec!["a=,,"]);
        for bad in ["", ",a=1", "a=1,", "a=1,,,"] {
            assert!(split_option_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_parse_and_merge() {
        let mut u =
            parse_options("cluster_size=4k,compat=v2,lazy_refcounts,data_file=a,,b").unwrap();
        assert_eq!(u.cluster_size, Some(4096));
        assert_eq!(u.compat, Some(Compat::V2));
        assert_eq!(u.lazy_refcounts, Some(true));
        assert_eq!(u.data_file.as_deref(), Some("a,b"));
        u.merge(parse_options("cluster_size=8k,preallocation=full").unwrap());
        assert_eq!(u.cluster_size, Some(8192));
        assert_eq!(u.preallocation, Some(Preallocation::Full));
        assert!(parse_options("help").unwrap().help);
        for bad in [
            "bogus=1",
            "cluster_size",
            "cluster_size=1x",
            "compat=1.2",
            "lazy_refcounts=1",
            "compression_type=lz4",
            "preallocation=bogus",
            "refcount_bits=x",
        ] {
            assert_eq!(
                parse_options(bad).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{bad}"
            );
        }
        assert_eq!(
            parse_options("encrypt.format=luks").unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let cases: Vec<(CreateOptions, &str)> = vec![
            (opts(|o| o.cluster_size = 1000), "power of two"),
            (opts(|o| o.cluster_size = 256), "power of two"),
            (opts(|o| o.cluster_size = 4 << 20), "power of two"),
            (opts(|o| o.refcount_bits = 3), "Refcount width"),
            (opts(|o| o.refcount_bits = 128), "Refcount width"),
            (opts(|o| o.refcount_bits = 0), "Refcount width"),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.refcount_bits = 8
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.lazy_refcounts = true
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.compression_type = CompressionType::Zstd
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.extended_l2 = true
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.data_file = Some("d".into())
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.cluster_size = 8192;
                    o.extended_l2 = true
                }),
                "16384 bytes",
            ),
            (
                opts(|o| o.backing_file = Some("b".into())),
                "without backing format",
            ),
            (
                opts(|o| o.backing_fmt = Some("raw".into())),
                "without backing file",
            ),
            (opts(|o| o.data_file_raw = true), "requires data-file"),
            (
                opts(|o| {
                    o.backing_file = Some("b".into());
                    o.backing_fmt = Some("raw".into());
                    o.preallocation = Preallocation::Metadata;
                }),
                "extended_l2 is on",
            ),
            (
                opts(|o| {
                    o.backing_file = Some("b".into());
                    o.backing_fmt = Some("raw".into());
                    o.data_file = Some("d".into());
                    o.data_file_raw = true;
                }),
                "data-file-raw",
            ),
            (
                opts(|o| {
                    o.cluster_size = 512;
                    o.size = 1 << 50
                }),
                "too large",
            ),
        ];
        for (o, want) in cases {
            let e = o.validate().unwrap_err();
            assert!(e.to_string().contains(want), "{o:?}: {e}");
        }
        assert!(opts(|o| o.size = 1 << 50).validate().is_ok());
    }

    #[test]
    fn cluster_sets_merge_split_and_search() {
        let mut s = ClusterSet::default();
        s.insert(0, 3);
        s.insert(5, 8);
        s.insert(3, 5);
        assert_eq!(s.ranges.len(), 1);
        s.remove(2, 4);
        assert_eq!(s.first_in(2, 10), Some(4));
        assert_eq!(s.first_in(2, 4), None);
        assert_eq!(s.clipped(1, 6), vec![(1, 2), (4, 6)]);
        assert_eq!(s.range_of(5), Some((4, 8)));
    }

    /// Layouts observed from qemu-img 10.0.2 (cluster numbers), as regression checks that need
    /// no qemu: a 3 GiB image with 512-byte clusters needs six more refcount blocks after the
    /// L1 table, one of them describing the block before it.
    #[test]
    fn refcount_blocks_follow_the_l1_table() {
        let p = plan(&opts(|o| {
            o.cluster_size = 512;
            o.size = 3 << 30;
        }));
        assert_eq!(p.l1_at, 3);
        assert_eq!(
            &p.layout.table[..8],
            &[2, 1539, 1541, 1542, 1543, 1544, 1540, 0]
        );
    }

    /// A 16 GiB image with 512-byte clusters and 64-bit refcounts outgrows its refcount table
    /// while allocating the L1 table.
    #[test]
    fn refcount_table_growth_matches_qemu() {
        let p = plan(&opts(|o| {
            o.cluster_size = 512;
            o.refcount_bits = 64;
            o.size = 16 << 30;
        }));
        let l = &p.layout;
        assert_eq!((l.table_at, l.table_clusters), (8259, 4));
        assert_eq!(&l.table[..4], &[2, 8195, 8197, 8198]);
        assert_eq!(&l.table[60..62], &[8255, 8263]);
        assert_eq!(&l.table[127..133], &[8329, 8196, 8256, 8257, 8258, 0]);
        assert_eq!(l.file_end, 8330 * 512);
        for (size, at, clusters) in [
            (9u64, 4674, 2),
            (12, 6210, 3),
            (32, 16453, 7),
            (100, 51278, 20),
        ] {
            let p = plan(&opts(|o| {
                o.cluster_size = 512;
                o.refcount_bits = 64;
                o.size = size << 30;
            }));
            assert_eq!(
                (p.layout.table_at, p.layout.table_clusters),
                (at, clusters),
                "{size}G"
            );
        }
    }

    #[test]
    fn falloc_builds_refcounts_then_data_then_l2() {
        let p = plan(&opts(|o| {
            o.size = 3 << 30;
            o.preallocation = Preallocation::Falloc;
        }));
        assert_eq!((p.layout.table_at, p.layout.table[1]), (5, 4));
        assert_eq!(p.data_area, Some((0x60000, 0xc006_0000)));
        assert_eq!(&p.l2_at[..3], &[1, 0xc006, 0xc007]);
        let p = plan(&opts(|o| {
            o.size = 16 << 20;
            o.cluster_size = 512;
            o.preallocation = Preallocation::Falloc;
        }));
        assert_eq!(
            (p.layout.table_at, p.layout.table_clusters),
            (0x11a00 / 512, 3)
        );
        assert_eq!(p.data_area.unwrap().0, 73728);
    }

    #[test]
    fn metadata_interleaves_l2_tables_and_data() {
        let p = plan(&opts(|o| {
            o.size = 3 << 20;
            o.cluster_size = 4096;
            o.preallocation = Preallocation::Metadata;
        }));
        assert_eq!(p.l2_at, vec![4, 0x205]);
        assert_eq!(p.runs[0].host, 5);
        assert_eq!(p.runs[1].host, 0x206);
        assert_eq!(p.min_len, 0x306000);
    }

    #[test]
    fn a_failed_create_removes_what_it_made() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.qcow2");
        let o = opts(|o| {
            o.size = 1 << 20;
            o.data_file = Some("no/such/dir/d.raw".into());
        });
        assert!(create(&img, &o).is_err());
        assert!(!img.exists());
        // Option errors are found before any file is touched.
        std::fs::write(&img, b"keep").unwrap();
        assert!(create(&img, &opts(|o| o.cluster_size = 3)).is_err());
        assert_eq!(std::fs::read(&img).unwrap(), b"keep");
    }

    #[test]
    fn header_extensions_and_backing_name() {
        let o = opts(|o| {
            o.size = 1 << 20;
            o.backing_file = Some("base.raw".into());
            o.backing_fmt = Some("raw".into());
        });
        let p = plan(&o);
        let h = header_cluster(&o, &p).unwrap();
        assert_eq!(BigEndian::read_u64(&h[8..]), 0x210);
        assert_eq!(&h[0x210..0x218], b"base.raw");
        assert_eq!(BigEndian::read_u32(&h[112..]), ext::BACKING_FORMAT);
        assert_eq!(BigEndian::read_u32(&h[128..]), ext::FEATURE_TABLE);
        assert_eq!(BigEndian::read_u32(&h[132..]), 384);
        let parsed = super::super::header::Header::parse(&h, 1 << 20).unwrap();
        assert_eq!(parsed.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(parsed.backing_format.as_deref(), Some("raw"));
        assert_eq!(parsed.feature_names.len(), 8);
        // A name that cannot fit in a 512-byte cluster 0 is refused.
        let o = opts(|o| {
            o.cluster_size = 512;
            o.backing_file = Some("b".repeat(400));
            o.backing_fmt = Some("raw".into());
        });
        assert!(header_cluster(&o, &plan(&o)).is_err());
    }
}
