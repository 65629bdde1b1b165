//! What `vimg info` reports about one layer of an image, in qemu-img's terms.
//!
//! Drivers fill a [`LayerInfo`]; the command-line layer renders it as qemu-img's JSON (the
//! field names below follow qemu's `ImageInfo` keys) or as human-readable text.

use serde::Serialize;

/// Everything `info` shows about one layer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LayerInfo {
    /// The file name as given (or as recorded in the overlay for backing layers).
    pub filename: String,
    /// The layer's format, by the name qemu-img gives it.
    pub format: &'static str,
    /// Size of the virtual disk.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// Cluster size, for formats that have clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Whether the image is encrypted (only reported when true, as qemu does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// The backing file name exactly as recorded in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The backing file name resolved against the image's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// The backing format recorded in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// The backing format was not recorded and had to be probed.
    #[serde(skip)]
    pub backing_format_probed: bool,
    /// Internal snapshots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// The dirty bit (qcow2 lazy refcounts) is set.
    pub dirty_flag: bool,
    /// Format-specific information.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
}

/// One internal snapshot, as qemu-img lists it (qcow2.rst "Snapshots").
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Unique id (a decimal number in images qemu writes).
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u64,
    /// Guest clock at creation, seconds part.
    pub vm_clock_sec: u64,
    /// Guest clock at creation, nanoseconds part.
    pub vm_clock_nsec: u64,
    /// Instruction count at creation, if recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

/// Format-specific information, tagged by format as in qemu's JSON (`{"type": .., "data": ..}`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum FormatSpecific {
    /// qcow2 details.
    Qcow2(Qcow2Info),
    /// A raw LUKS image's header ([`crate::crypto::luks`]).
    Luks(crate::crypto::luks::LuksInfo),
    /// A VMDK disk's descriptor and extents.
    Vmdk(VmdkInfo),
}

/// qcow2 header details shown by `info`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Info {
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: String,
    /// "zlib" or "zstd".
    pub compression_type: String,
    /// Lazy refcounts (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Persistent dirty bitmaps (v3 only, shown when the extension is present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    /// Width of a refcount in bits.
    pub refcount_bits: u32,
    /// The corrupt bit is set (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Extended L2 entries (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    /// External data file name, as recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// The external data file is a valid raw image by itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// The encryption (`{"format": "aes"}`; LUKS adds its header's details), when encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<serde_json::Value>,
}

/// One persistent dirty bitmap (qcow2.rst "Bitmaps extension").
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Flags by qemu's names: "in-use", "auto".
    pub flags: Vec<String>,
    /// The bitmap's name.
    pub name: String,
    /// Bytes covered by one bit.
    pub granularity: u64,
}

/// The format-specific part of `info` for a vmdk disk (qemu's `ImageInfoSpecificVmdk`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmdkInfo {
    /// The disk's content ID.
    pub cid: u32,
    /// The parent's content ID (`0xffffffff`: none).
    pub parent_cid: u32,
    /// The subformat.
    pub create_type: String,
    /// One entry per extent.
    pub extents: Vec<VmdkExtentInfo>,
}

/// One extent in `info` (qemu's `VmdkExtentInfo`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmdkExtentInfo {
    /// Set (true) for a compressed extent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<bool>,
    /// Guest bytes the extent covers.
    pub virtual_size: u64,
    /// The extent file's name, as qemu names it.
    pub filename: String,
    /// The grain size of a sparse extent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The extent line's type (empty for the file opened itself).
    pub format: String,
}
