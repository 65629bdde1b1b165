//! The qcow2 header and header extensions (qcow2.rst "Header" and "Header extensions").
//!
//! [`Header::parse`] reads cluster 0 and checks every field against the format's rules and
//! qemu's open-time limits before anything else uses them: a hostile header yields an
//! [`Error`] of kind `Corrupt` or `Unsupported`, never an oversized allocation.

use crate::error::{Error, Result};
use byteorder::{BigEndian, ByteOrder};

/// The four bytes every qcow2 image starts with: `QFI\xfb`.
pub(crate) const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Smallest cluster size qcow2 allows, as a power of two (512 bytes).
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size qcow2 allows, as a power of two (2 MiB).
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table qemu opens, in bytes.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table qemu opens, in bytes.
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest offset qemu's block layer reads (`BDRV_MAX_LENGTH`: `INT64_MAX` aligned down to
/// 1 GiB); a read that reaches past it fails with EIO.
pub(crate) const QEMU_MAX_OFFSET: u64 = 0x7fff_ffff_c000_0000;
/// Longest backing file name qemu accepts.
pub(crate) const MAX_BACKING_NAME: u32 = 1023;
/// Most snapshots qemu accepts.
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;

/// qemu's refusal of a header counting more than [`MAX_SNAPSHOTS`] snapshots.
pub(crate) const SNAPSHOTS_TOO_MANY: &str = "Snapshot table too large";

/// Header extension types (qcow2.rst "Header extensions").
pub(crate) mod ext {
    /// End of the extension area.
    pub(crate) const END: u32 = 0;
    /// Backing file format name.
    pub(crate) const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub(crate) const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Bitmaps extension.
    pub(crate) const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer (LUKS).
    pub(crate) const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub(crate) const DATA_FILE: u32 = 0x4441_5441;
}

/// Incompatible feature bits (header bytes 72-79).
pub(crate) mod incompat {
    /// Dirty bit: refcounts may be inconsistent (lazy refcounts).
    pub(crate) const DIRTY: u64 = 1 << 0;
    /// Corrupt bit: the image must only be opened read-only.
    pub(crate) const CORRUPT: u64 = 1 << 1;
    /// An external data file holds the guest data.
    pub(crate) const DATA_FILE: u64 = 1 << 2;
    /// The compression type field (byte 104) is not zlib.
    pub(crate) const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 16 bytes with subcluster bitmaps.
    pub(crate) const EXTENDED_L2: u64 = 1 << 4;
    /// All incompatible bits vimg understands.
    pub(crate) const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits (header bytes 80-87).
pub(crate) mod compat {
    /// Lazy refcounts: refcount updates may be deferred; the dirty bit records it.
    pub(crate) const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits (header bytes 88-95).
pub(crate) mod autoclear {
    /// The bitmaps extension is consistent with the image.
    pub(crate) const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image by itself.
    pub(crate) const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Byte offsets of the header's fields in cluster 0 (qcow2.rst "Header"), written down once:
/// [`Header::parse`], [`Header::encode`], error positions and every in-place header update use
/// these (and the tests that read or damage headers byte by byte). Fields up to
/// [`SNAPSHOTS_OFFSET`](fields::SNAPSHOTS_OFFSET) are in every version; the rest only in
/// version 3.
pub(crate) mod fields {
    use byteorder::{BigEndian, ByteOrder};

    /// `magic` (4 bytes): `QFI\xfb`.
    pub(crate) const MAGIC: u64 = 0;
    /// `version` (4 bytes): 2 or 3.
    pub(crate) const VERSION: u64 = 4;
    /// `backing_file_offset` (8 bytes): where the backing file name is, 0 for none.
    pub(crate) const BACKING_FILE_OFFSET: u64 = 8;
    /// `backing_file_size` (4 bytes): length of the backing file name.
    pub(crate) const BACKING_FILE_SIZE: u64 = 16;
    /// `cluster_bits` (4 bytes).
    pub(crate) const CLUSTER_BITS: u64 = 20;
    /// `size` (8 bytes): the virtual disk size in bytes.
    pub(crate) const SIZE: u64 = 24;
    /// `crypt_method` (4 bytes).
    pub(crate) const CRYPT_METHOD: u64 = 32;
    /// `l1_size` (4 bytes): entries in the active L1 table.
    pub(crate) const L1_SIZE: u64 = 36;
    /// `l1_table_offset` (8 bytes).
    pub(crate) const L1_TABLE_OFFSET: u64 = 40;
    /// `refcount_table_offset` (8 bytes).
    pub(crate) const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// `refcount_table_clusters` (4 bytes).
    pub(crate) const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    /// `nb_snapshots` (4 bytes).
    pub(crate) const NB_SNAPSHOTS: u64 = 60;
    /// `snapshots_offset` (8 bytes).
    pub(crate) const SNAPSHOTS_OFFSET: u64 = 64;
    /// `incompatible_features` (8 bytes, version 3).
    pub(crate) const INCOMPATIBLE_FEATURES: u64 = 72;
    /// `compatible_features` (8 bytes, version 3).
    pub(crate) const COMPATIBLE_FEATURES: u64 = 80;
    /// `autoclear_features` (8 bytes, version 3).
    pub(crate) const AUTOCLEAR_FEATURES: u64 = 88;
    /// `refcount_order` (4 bytes, version 3).
    pub(crate) const REFCOUNT_ORDER: u64 = 96;
    /// `header_length` (4 bytes, version 3).
    pub(crate) const HEADER_LENGTH: u64 = 100;
    /// `compression_type` (1 byte, version 3 with `header_length` above 104), followed by
    /// padding up to `header_length`.
    pub(crate) const COMPRESSION_TYPE: u64 = 104;

    /// `refcount_table_offset` and `refcount_table_clusters`, adjacent so that one write
    /// switches the image to another refcount table: their bytes and where they go.
    pub(crate) fn reftable(offset: u64, clusters: u32) -> ([u8; 12], u64) {
        let mut f = [0u8; 12];
        let at = |field: u64| (field - REFCOUNT_TABLE_OFFSET) as usize;
        BigEndian::write_u64(&mut f[at(REFCOUNT_TABLE_OFFSET)..], offset);
        BigEndian::write_u32(&mut f[at(REFCOUNT_TABLE_CLUSTERS)..], clusters);
        (f, REFCOUNT_TABLE_OFFSET)
    }

    /// The 4-byte field at `field` of `header` (the first bytes of the file).
    pub(crate) fn be32(header: &[u8], field: u64) -> u32 {
        BigEndian::read_u32(&header[field as usize..][..4])
    }

    /// The 8-byte field at `field` of `header` (the first bytes of the file).
    pub(crate) fn be64(header: &[u8], field: u64) -> u64 {
        BigEndian::read_u64(&header[field as usize..][..8])
    }
}

/// How compressed clusters are compressed (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate with a 4 KiB window (qemu calls it zlib).
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One entry of the feature name table (qcow2.rst "Feature name table").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name, up to 46 bytes.
    pub name: String,
}

/// The bitmaps header extension (qcow2.rst "Bitmaps extension").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

/// A header extension vimg does not interpret, kept so that a header rewrite preserves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExt {
    /// Extension type.
    pub kind: u32,
    /// Extension data (unpadded).
    pub data: Vec<u8>,
}

/// A parsed and validated qcow2 header (qcow2.rst "Header").
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none). Bytes 8-15.
    pub backing_file_offset: u64,
    /// Length of the backing file name. Bytes 16-19.
    pub backing_file_size: u32,
    /// log2 of the cluster size. Bytes 20-23.
    pub cluster_bits: u32,
    /// Virtual disk size. Bytes 24-31.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS. Bytes 32-35.
    pub crypt_method: u32,
    /// Entries in the active L1 table. Bytes 36-39.
    pub l1_size: u32,
    /// Host offset of the active L1 table. Bytes 40-47.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table. Bytes 48-55.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies. Bytes 56-59.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots. Bytes 60-63.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table. Bytes 64-71.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3). Bytes 72-79.
    pub incompatible_features: u64,
    /// Compatible feature bits (v3). Bytes 80-87.
    pub compatible_features: u64,
    /// Autoclear feature bits (v3). Bytes 88-95.
    pub autoclear_features: u64,
    /// refcount_bits = 1 << refcount_order. Bytes 96-99.
    pub refcount_order: u32,
    /// Length of the header structure. Bytes 100-103.
    pub header_length: u32,
    /// Compression type. Byte 104.
    pub compression_type: CompressionType,
    /// Header bytes between the known fields and `header_length`, kept verbatim.
    pub extra_header_bytes: Vec<u8>,
    /// Backing file name, as recorded.
    pub backing_file: Option<String>,
    /// Backing format name, from the extension.
    pub backing_format: Option<String>,
    /// External data file name, from the extension.
    pub data_file: Option<String>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// LUKS header location (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    /// Extensions vimg does not interpret.
    pub unknown_extensions: Vec<UnknownExt>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Width of a refcount in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are extended (16 bytes, with subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Whether an external data file holds the guest data.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Whether the external data file is a raw image by itself (`data_file_raw`).
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries in an L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }

    /// Bytes of guest disk one L2 table covers, as a power of two.
    pub fn l1_shift(&self) -> u32 {
        self.cluster_bits + self.l2_bits()
    }

    /// L1 entries needed to cover the virtual disk.
    pub fn l1_entries_needed(&self) -> u64 {
        let shift = self.l1_shift();
        (self.size >> shift) + u64::from(self.size & ((1 << shift) - 1) != 0)
    }

    /// Name of a feature bit from the image's feature name table, if it names it.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.as_str())
    }

    /// Parses and validates the header in `cluster0` (the first bytes of the file, at least one
    /// cluster or the whole file if shorter), for a file of `file_len` bytes.
    pub fn parse(cluster0: &[u8], file_len: u64) -> Result<Header> {
        if cluster0.len() < 72 {
            return Err(Error::corrupt("file is too short to be a qcow2 image"));
        }
        if cluster0[fields::MAGIC as usize..][..4] != QCOW2_MAGIC {
            return Err(Error::corrupt("not a qcow2 image (bad magic)"));
        }
        let be32 = |field: u64| fields::be32(cluster0, field);
        let be64 = |field: u64| fields::be64(cluster0, field);
        let version = be32(fields::VERSION);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            )));
        }
        let cluster_bits = be32(fields::CLUSTER_BITS);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "cluster size 2^{cluster_bits} is outside qcow2's range (512 B to 2 MiB)"
            ))
            .at(fields::CLUSTER_BITS));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(fields::BACKING_FILE_OFFSET),
            backing_file_size: be32(fields::BACKING_FILE_SIZE),
            cluster_bits,
            size: be64(fields::SIZE),
            crypt_method: be32(fields::CRYPT_METHOD),
            l1_size: be32(fields::L1_SIZE),
            l1_table_offset: be64(fields::L1_TABLE_OFFSET),
            refcount_table_offset: be64(fields::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: be32(fields::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: be32(fields::NB_SNAPSHOTS),
            snapshots_offset: be64(fields::SNAPSHOTS_OFFSET),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Zlib,
            extra_header_bytes: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if cluster0.len() < 104 {
                return Err(Error::corrupt(
                    "file is too short for a qcow2 version 3 header",
                ));
            }
            h.incompatible_features = be64(fields::INCOMPATIBLE_FEATURES);
            h.compatible_features = be64(fields::COMPATIBLE_FEATURES);
            h.autoclear_features = be64(fields::AUTOCLEAR_FEATURES);
            h.refcount_order = be32(fields::REFCOUNT_ORDER);
            h.header_length = be32(fields::HEADER_LENGTH);
            if h.header_length < 104 {
                return Err(Error::corrupt(format!(
                    "header_length {} is below 104",
                    h.header_length
                ))
                .at(fields::HEADER_LENGTH));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(Error::corrupt(format!(
                    "header_length {} is larger than the cluster size {cluster_size}",
                    h.header_length
                ))
                .at(fields::HEADER_LENGTH));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(Error::corrupt(format!(
                    "header_length {} is not a multiple of 8",
                    h.header_length
                ))
                .at(fields::HEADER_LENGTH));
            }
            if cluster0.len() < h.header_length as usize {
                return Err(Error::corrupt("file ends inside the qcow2 header"));
            }
            if h.header_length > 104 {
                h.compression_type = match cluster0[fields::COMPRESSION_TYPE as usize] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => {
                        return Err(Error::unsupported(format!("unknown compression type {t}"))
                            .at(fields::COMPRESSION_TYPE))
                    }
                };
                let extra = fields::COMPRESSION_TYPE as usize + 1;
                h.extra_header_bytes = cluster0[extra..h.header_length as usize].to_vec();
            }
            let has_type_bit = h.incompatible_features & incompat::COMPRESSION != 0;
            if has_type_bit != (h.compression_type != CompressionType::Zlib) {
                return Err(Error::corrupt(
                    "compression type and the compression-type incompatible bit disagree",
                )
                .at(fields::INCOMPATIBLE_FEATURES));
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::corrupt(format!(
                "refcount_order {} is above 6 (64-bit refcounts)",
                h.refcount_order
            ))
            .at(fields::REFCOUNT_ORDER));
        }

        h.parse_extensions(cluster0)?;

        // Unknown incompatible features: refuse, by name where the image names them, in
        // qemu-img's words (the feature table's order, then the bits it does not name).
        let mut unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let mut names = Vec::new();
            for f in &h.feature_names {
                if f.kind == 0 && f.bit < 64 && unknown & (1u64 << f.bit) != 0 {
                    names.push(f.name.clone());
                    unknown &= !(1u64 << f.bit);
                }
            }
            if unknown != 0 {
                names.push(format!("Unknown incompatible feature: {unknown:x}"));
            }
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                names.join(", ")
            )));
        }
        // Legacy AES (1) and LUKS (2) are opened by `crate::qcow2::crypt`, which needs the key.
        if h.crypt_method > 2 {
            return Err(Error::unsupported(format!(
                "Unsupported encryption method: {}",
                h.crypt_method
            ))
            .at(fields::CRYPT_METHOD));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Error::corrupt(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        // An image that needs a data file and names none is valid: the data file must then be
        // given when the image is opened ([`crate::qcow2::data_file`]).
        if !h.has_data_file() {
            // A data file name without the feature bit is meaningless; qemu ignores it too.
            h.data_file = None;
        }

        h.validate_tables(file_len)?;
        h.read_backing_name(cluster0)?;
        Ok(h)
    }

    fn validate_tables(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        // The L1 table must cover the disk and stay within qemu's limit.
        if self.size > (1u64 << 62) {
            return Err(
                Error::corrupt(format!("virtual size {} is absurdly large", self.size))
                    .at(fields::SIZE),
            );
        }
        // qemu-img's words (qcow2_do_open), which scripts match.
        let needed = self.l1_entries_needed();
        if needed > i32::MAX as u64 {
            return Err(Error::corrupt("Image is too big"));
        }
        if u64::from(self.l1_size) < needed {
            return Err(Error::corrupt("L1 table is too small"));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "L1 table of {l1_bytes} bytes exceeds the 32 MiB limit"
            ))
            .at(fields::L1_SIZE));
        }
        check_table(
            "L1 table",
            self.l1_table_offset,
            l1_bytes,
            cs,
            file_len,
            fields::L1_TABLE_OFFSET,
        )?;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(format!(
                "refcount table of {rt_bytes} bytes exceeds the 8 MiB limit"
            ))
            .at(fields::REFCOUNT_TABLE_CLUSTERS));
        }
        if self.refcount_table_clusters == 0 {
            return Err(
                Error::corrupt("refcount table is empty").at(fields::REFCOUNT_TABLE_CLUSTERS)
            );
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
            fields::REFCOUNT_TABLE_OFFSET,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            // qemu's words, alone: `check` recognizes them ([`SNAPSHOTS_TOO_MANY`]).
            return Err(Error::corrupt(SNAPSHOTS_TOO_MANY));
        }
        if self.nb_snapshots > 0 {
            // Each entry is at least 40 bytes; the table's full size is checked when it is read.
            // Like qemu, the table may lie past the end of the file (it reads as zeros there,
            // [`crate::qcow2::snapshot::table::read_table`]): only its alignment and range are
            // checked here.
            let bytes = u64::from(self.nb_snapshots) * 40;
            check_table(
                "snapshot table",
                self.snapshots_offset,
                bytes,
                cs,
                i64::MAX as u64,
                fields::SNAPSHOTS_OFFSET,
            )?;
            if self.snapshots_offset + bytes > QEMU_MAX_OFFSET {
                // qemu's read of it fails (EIO), and so does its open.
                return Err(Error::corrupt(format!(
                    "snapshot table at {:#x} ({bytes} bytes) lies beyond the largest offset \
                     that can be read ({QEMU_MAX_OFFSET:#x})",
                    self.snapshots_offset
                ))
                .at(fields::SNAPSHOTS_OFFSET));
            }
        }
        if let Some(b) = &self.bitmaps {
            check_table(
                "bitmap directory",
                b.directory_offset,
                b.directory_size,
                cs,
                file_len,
                0,
            )?;
        }
        Ok(())
    }

    fn read_backing_name(&mut self, cluster0: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            if self.backing_file_size != 0 {
                return Err(Error::corrupt("backing file name has a size but no offset")
                    .at(fields::BACKING_FILE_SIZE));
            }
            return Ok(());
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(Error::corrupt(format!(
                "backing file name of {} bytes is longer than {MAX_BACKING_NAME}",
                self.backing_file_size
            ))
            .at(fields::BACKING_FILE_SIZE));
        }
        let end = self
            .backing_file_offset
            .checked_add(u64::from(self.backing_file_size));
        match end {
            Some(e) if e <= self.cluster_size() && e <= cluster0.len() as u64 => {
                let s = self.backing_file_offset as usize;
                let bytes = &cluster0[s..e as usize];
                let name = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    Error::corrupt("backing file name is not valid UTF-8").at(s as u64)
                })?;
                if name.contains('\0') {
                    return Err(
                        Error::corrupt("backing file name contains a NUL byte").at(s as u64)
                    );
                }
                // An empty name is no backing file, as qemu reads it.
                self.backing_file = (!name.is_empty()).then_some(name);
                Ok(())
            }
            _ => Err(
                Error::corrupt("backing file name lies outside the first cluster")
                    .at(fields::BACKING_FILE_OFFSET),
            ),
        }
    }

    fn parse_extensions(&mut self, cluster0: &[u8]) -> Result<()> {
        let limit = (self.cluster_size() as usize).min(cluster0.len());
        let mut off = self.header_length as usize;
        // Extensions end at type 0, or when the backing name (stored after them) begins.
        let stop = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(limit)
        } else {
            limit
        };
        // An extension that appears more than once is not an error: as qemu reads them
        // (block/qcow2.c, qcow2_read_extensions), each occurrence replaces what the one
        // before it said, so the last one wins (backing format, data file name, feature
        // table, bitmaps, encryption header); unknown extensions are all kept. A header
        // rewrite then stores each known extension once, which is how `rebase -u` repairs
        // such an image.
        while off + 8 <= stop {
            let kind = BigEndian::read_u32(&cluster0[off..off + 4]);
            let len = BigEndian::read_u32(&cluster0[off + 4..off + 8]) as usize;
            if kind == ext::END {
                break;
            }
            let data_start = off + 8;
            let Some(data_end) = data_start.checked_add(len).filter(|&e| e <= limit) else {
                return Err(Error::corrupt(format!(
                    "header extension {kind:#x} of {len} bytes runs past the first cluster"
                ))
                .at(off as u64));
            };
            let data = &cluster0[data_start..data_end];
            match kind {
                ext::BACKING_FORMAT => {
                    let s = String::from_utf8(data.to_vec()).map_err(|_| {
                        Error::corrupt("backing format name is not UTF-8").at(off as u64)
                    })?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                ext::DATA_FILE => {
                    let s = String::from_utf8(data.to_vec()).map_err(|_| {
                        Error::corrupt("data file name is not UTF-8").at(off as u64)
                    })?;
                    let name = s.trim_end_matches('\0');
                    if name.contains('\0') {
                        return Err(
                            Error::corrupt("data file name contains a NUL byte").at(off as u64)
                        );
                    }
                    // An empty name names nothing (an image needing a data file then fails).
                    self.data_file = (!name.is_empty()).then(|| name.to_string());
                }
                ext::FEATURE_TABLE => {
                    // A later table replaces an earlier one, as in qemu.
                    self.feature_names.clear();
                    // Entries of 48 bytes; a short last entry reads as if padded with zeros,
                    // and an entry with an empty name ends the table, as qemu reads it.
                    for part in data.chunks(48) {
                        let mut e = [0u8; 48];
                        e[..part.len()].copy_from_slice(part);
                        let raw = &e[2..48];
                        let n = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                        if n == 0 {
                            break;
                        }
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        });
                    }
                }
                ext::BITMAPS => {
                    if data.len() < 24 {
                        return Err(Error::corrupt("bitmaps extension is shorter than 24 bytes")
                            .at(off as u64));
                    }
                    // Only meaningful while the autoclear bit says it is consistent.
                    if self.autoclear_features & autoclear::BITMAPS != 0 {
                        self.bitmaps = Some(BitmapsExt {
                            nb_bitmaps: BigEndian::read_u32(&data[0..4]),
                            directory_size: BigEndian::read_u64(&data[8..16]),
                            directory_offset: BigEndian::read_u64(&data[16..24]),
                        });
                    }
                }
                ext::CRYPTO => {
                    if data.len() != 16 {
                        return Err(Error::corrupt(format!(
                            "CRYPTO header extension size {}, but expected size 16",
                            data.len()
                        )));
                    }
                    self.crypto_header = Some((
                        BigEndian::read_u64(&data[0..8]),
                        BigEndian::read_u64(&data[8..16]),
                    ));
                }
                _ => self.unknown_extensions.push(UnknownExt {
                    kind,
                    data: data.to_vec(),
                }),
            }
            off = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }
}

/// Checks that a table at `offset` of `bytes` bytes is cluster-aligned and inside the file.
/// `field` is the header offset of the field naming it, for the message.
pub(crate) fn check_table(
    what: &str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
    field: u64,
) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(
            Error::corrupt(format!("{what} offset {offset:#x} is not cluster-aligned")).at(field),
        );
    }
    if offset == 0 && bytes > 0 {
        return Err(Error::corrupt(format!("{what} overlaps the header at offset 0")).at(field));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(format!(
            "{what} at {offset:#x} ({bytes} bytes) lies beyond the end of the file ({file_len} bytes)"
        ))
        .at(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A minimal valid v3 header: 64 KiB clusters, 1 GiB disk, L1 at 0x30000 (2 entries),
    /// refcount table at 0x10000 (1 cluster), in a 0x40000-byte file.
    fn base() -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        h[fields::MAGIC as usize..][..4].copy_from_slice(&QCOW2_MAGIC);
        BigEndian::write_u32(&mut h[fields::VERSION as usize..], 3);
        BigEndian::write_u32(&mut h[fields::CLUSTER_BITS as usize..], 16);
        BigEndian::write_u64(&mut h[fields::SIZE as usize..], 1 << 30);
        BigEndian::write_u32(&mut h[fields::L1_SIZE as usize..], 2);
        BigEndian::write_u64(&mut h[fields::L1_TABLE_OFFSET as usize..], 0x30000);
        BigEndian::write_u64(&mut h[fields::REFCOUNT_TABLE_OFFSET as usize..], 0x10000);
        BigEndian::write_u32(&mut h[fields::REFCOUNT_TABLE_CLUSTERS as usize..], 1);
        BigEndian::write_u32(&mut h[fields::REFCOUNT_ORDER as usize..], 4);
        BigEndian::write_u32(&mut h[fields::HEADER_LENGTH as usize..], 112);
        h
    }
    const LEN: u64 = 0x40000;

    fn err(h: &[u8]) -> Error {
        Header::parse(h, LEN).unwrap_err()
    }

    #[test]
    fn minimal_header_parses() {
        let h = Header::parse(&base(), LEN).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.l1_entries_needed(), 2);
        assert_eq!(h.compression_type, CompressionType::Zlib);
    }

    #[test]
    fn unknown_incompatible_features_are_refused_by_name() {
        let mut h = base();
        BigEndian::write_u64(
            &mut h[fields::INCOMPATIBLE_FEATURES as usize..],
            1 << 10 | 1 << 11,
        );
        // Feature name table naming bit 11.
        BigEndian::write_u32(&mut h[112..], ext::FEATURE_TABLE);
        BigEndian::write_u32(&mut h[116..], 48);
        h[120] = 0;
        h[121] = 11;
        h[122..122 + 9].copy_from_slice(b"quantum-x");
        let e = err(&h);
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let m = e.to_string();
        assert!(
            m.contains(
                "Unsupported qcow2 feature(s): quantum-x, Unknown incompatible feature: 400"
            ),
            "{m}"
        );
    }

    /// Writes extension `kind` with `data` at `off` of `h`; returns where the next one goes.
    fn put_ext(h: &mut [u8], off: usize, kind: u32, data: &[u8]) -> usize {
        BigEndian::write_u32(&mut h[off..], kind);
        BigEndian::write_u32(&mut h[off + 4..], data.len() as u32);
        h[off + 8..off + 8 + data.len()].copy_from_slice(data);
        off + 8 + data.len().div_ceil(8) * 8
    }

    #[test]
    fn a_repeated_extension_is_read_as_qemu_does_the_last_one_wins() {
        let mut h = base();
        BigEndian::write_u64(
            &mut h[fields::INCOMPATIBLE_FEATURES as usize..],
            1 << 10 | incompat::DATA_FILE,
        );
        BigEndian::write_u64(
            &mut h[fields::AUTOCLEAR_FEATURES as usize..],
            autoclear::BITMAPS,
        );
        let mut off = 112;
        off = put_ext(&mut h, off, ext::BACKING_FORMAT, b"raw");
        off = put_ext(&mut h, off, ext::DATA_FILE, b"first.img");
        let mut feature = [0u8; 48];
        feature[1] = 10;
        feature[2..7].copy_from_slice(b"old-x");
        off = put_ext(&mut h, off, ext::FEATURE_TABLE, &feature);
        let mut bitmaps = [0u8; 24];
        BigEndian::write_u32(&mut bitmaps[0..], 1);
        BigEndian::write_u64(&mut bitmaps[8..], 64);
        BigEndian::write_u64(&mut bitmaps[16..], 0x20000);
        off = put_ext(&mut h, off, ext::BITMAPS, &bitmaps);
        off = put_ext(&mut h, off, 0x1234_5678, b"a");
        off = put_ext(&mut h, off, ext::BACKING_FORMAT, b"qcow2");
        off = put_ext(&mut h, off, ext::DATA_FILE, b"second.img");
        feature[2..7].copy_from_slice(b"new-x");
        off = put_ext(&mut h, off, ext::FEATURE_TABLE, &feature);
        BigEndian::write_u32(&mut bitmaps[0..], 2);
        off = put_ext(&mut h, off, ext::BITMAPS, &bitmaps);
        put_ext(&mut h, off, 0x1234_5678, b"b");
        // Unknown incompatible bit 10 is named by the last feature table only.
        let m = err(&h).to_string();
        assert!(m.contains("new-x") && !m.contains("old-x"), "{m}");
        BigEndian::write_u64(
            &mut h[fields::INCOMPATIBLE_FEATURES as usize..],
            incompat::DATA_FILE,
        );
        let p = Header::parse(&h, LEN).unwrap();
        assert_eq!(p.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(p.data_file.as_deref(), Some("second.img"));
        assert_eq!(p.feature_names.len(), 1);
        assert_eq!(p.bitmaps.as_ref().map(|b| b.nb_bitmaps), Some(2));
        // Unknown extensions are all kept, in order.
        let unknown: Vec<_> = p.unknown_extensions.iter().map(|u| &u.data[..]).collect();
        assert_eq!(unknown, [&b"a"[..], &b"b"[..]]);
    }

    #[test]
    fn encryption_methods_parse_and_unknown_ones_are_refused() {
        for method in [1, 2] {
            let mut h = base();
            BigEndian::write_u32(&mut h[fields::CRYPT_METHOD as usize..], method);
            assert_eq!(Header::parse(&h, LEN).unwrap().crypt_method, method);
        }
        let mut h = base();
        BigEndian::write_u32(&mut h[fields::CRYPT_METHOD as usize..], 3);
        let e = err(&h);
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.to_string().contains("Unsupported encryption method: 3"),
            "{e}"
        );
    }

    #[test]
    fn limits_and_bounds_are_enforced() {
        type Poke = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Poke, &str)> = vec![
            (
                Box::new(|h| BigEndian::write_u32(&mut h[fields::L1_SIZE as usize..], 1)),
                "L1 table is too small",
            ),
            (
                Box::new(|h| BigEndian::write_u32(&mut h[fields::L1_SIZE as usize..], 0x0800_0000)),
                "32 MiB",
            ),
            (
                Box::new(|h| {
                    BigEndian::write_u64(&mut h[fields::L1_TABLE_OFFSET as usize..], 0x30200)
                }),
                "not cluster-aligned",
            ),
            (
                Box::new(|h| {
                    BigEndian::write_u64(&mut h[fields::L1_TABLE_OFFSET as usize..], 0x50000)
                }),
                "beyond the end",
            ),
            (
                Box::new(|h| {
                    BigEndian::write_u32(&mut h[fields::REFCOUNT_TABLE_CLUSTERS as usize..], 200)
                }),
                "8 MiB",
            ),
            (
                Box::new(|h| BigEndian::write_u32(&mut h[fields::CLUSTER_BITS as usize..], 30)),
                "outside qcow2's range",
            ),
            (
                Box::new(|h| {
                    BigEndian::write_u32(&mut h[fields::HEADER_LENGTH as usize..], 0x20000)
                }),
                "larger than the cluster size",
            ),
            (
                Box::new(|h| BigEndian::write_u32(&mut h[fields::REFCOUNT_ORDER as usize..], 7)),
                "refcount_order",
            ),
            (
                Box::new(|h| BigEndian::write_u32(&mut h[fields::VERSION as usize..], 4)),
                "version 4",
            ),
            (Box::new(|h| h[104] = 1), "disagree"),
            (
                Box::new(|h| {
                    BigEndian::write_u64(&mut h[fields::BACKING_FILE_OFFSET as usize..], 65530);
                    BigEndian::write_u32(&mut h[fields::BACKING_FILE_SIZE as usize..], 10)
                }),
                "outside the first cluster",
            ),
            (
                Box::new(|h| {
                    BigEndian::write_u32(&mut h[112..], 0x1234);
                    BigEndian::write_u32(&mut h[116..], 70000)
                }),
                "runs past",
            ),
        ];
        for (poke, want) in cases {
            let mut h = base();
            poke(&mut h);
            let m = err(&h).to_string();
            assert!(m.contains(want), "expected '{want}' in '{m}'");
        }
    }

    #[test]
    fn data_file_without_a_name_parses() {
        // qemu-img amend -o data_file= leaves such an image; the data file is then given at
        // each open.
        let mut h = base();
        BigEndian::write_u64(
            &mut h[fields::INCOMPATIBLE_FEATURES as usize..],
            incompat::DATA_FILE,
        );
        let p = Header::parse(&h, LEN).unwrap();
        assert!(p.has_data_file() && p.data_file.is_none());
    }
}
