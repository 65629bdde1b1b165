//! Writing the qcow2 header back: [`Header::encode`] lays out cluster 0 as qemu's
//! `qcow2_update_header` does (qcow2.rst "Header", "Header extensions"), and
//! [`Qcow2Image::rewrite_header`] replaces the header of an open image in one write.
//!
//! Commands that change what the header records (amend, rebase, bitmaps) build a changed copy of
//! the parsed [`Header`] and hand it here; the bytes are parsed back before they are written, so a
//! header vimg writes is one vimg (and qemu) accepts.

use super::header::{ext, fields, Header, QCOW2_MAGIC};
use crate::error::{Error, Result, ResultExt};
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};

/// Bytes of the version 2 header (qcow2.rst "Header", bytes 0-71).
pub(crate) const V2_HEADER_LEN: u32 = 72;

/// The feature name table qemu writes into version 3 images (qcow2.rst "Feature name table"):
/// every feature bit qcow2 defines, whether or not the image uses it.
pub(crate) fn standard_feature_table() -> Vec<u8> {
    const FEATURES: &[(u8, u8, &str)] = &[
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut t = vec![0u8; FEATURES.len() * 48];
    for (i, (kind, bit, name)) in FEATURES.iter().enumerate() {
        let e = &mut t[i * 48..(i + 1) * 48];
        e[0] = *kind;
        e[1] = *bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
    }
    t
}

/// Whether qemu puts the feature name table into a version 3 image with this cluster size:
/// it does so only where cluster 0 has room to spare.
pub(crate) fn writes_feature_table(version: u32, cluster_size: u64) -> bool {
    version >= 3 && cluster_size >= 8192
}

impl Header {
    /// The bytes of cluster 0 for this header: the fixed fields (72 bytes for version 2,
    /// `header_length` for version 3, with the bytes vimg does not interpret kept), then the
    /// extensions in qemu's order (backing format, external data file, crypto header, feature
    /// table, bitmaps, unknown extensions), the end marker and the backing file name.
    ///
    /// `backing_file_offset`/`backing_file_size` are recomputed from `backing_file`. Fails when
    /// the result does not fit in one cluster.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut h = vec![0u8; cs];
        let at = |field: u64| field as usize;
        h[at(fields::MAGIC)..][..4].copy_from_slice(&QCOW2_MAGIC);
        BigEndian::write_u32(&mut h[at(fields::VERSION)..], self.version);
        BigEndian::write_u32(&mut h[at(fields::CLUSTER_BITS)..], self.cluster_bits);
        BigEndian::write_u64(&mut h[at(fields::SIZE)..], self.size);
        BigEndian::write_u32(&mut h[at(fields::CRYPT_METHOD)..], self.crypt_method);
        BigEndian::write_u32(&mut h[at(fields::L1_SIZE)..], self.l1_size);
        BigEndian::write_u64(&mut h[at(fields::L1_TABLE_OFFSET)..], self.l1_table_offset);
        let rt_offset = at(fields::REFCOUNT_TABLE_OFFSET);
        BigEndian::write_u64(&mut h[rt_offset..], self.refcount_table_offset);
        let rt_clusters = at(fields::REFCOUNT_TABLE_CLUSTERS);
        BigEndian::write_u32(&mut h[rt_clusters..], self.refcount_table_clusters);
        BigEndian::write_u32(&mut h[at(fields::NB_SNAPSHOTS)..], self.nb_snapshots);
        BigEndian::write_u64(
            &mut h[at(fields::SNAPSHOTS_OFFSET)..],
            self.snapshots_offset,
        );
        let mut off = V2_HEADER_LEN as usize;
        if self.version >= 3 {
            let len =
                (self.header_length.max(104) as usize).max(105 + self.extra_header_bytes.len());
            let len = len.div_ceil(8) * 8;
            if len > cs {
                return Err(too_long());
            }
            let features = at(fields::INCOMPATIBLE_FEATURES);
            BigEndian::write_u64(&mut h[features..], self.incompatible_features);
            let features = at(fields::COMPATIBLE_FEATURES);
            BigEndian::write_u64(&mut h[features..], self.compatible_features);
            let features = at(fields::AUTOCLEAR_FEATURES);
            BigEndian::write_u64(&mut h[features..], self.autoclear_features);
            BigEndian::write_u32(&mut h[at(fields::REFCOUNT_ORDER)..], self.refcount_order);
            BigEndian::write_u32(&mut h[at(fields::HEADER_LENGTH)..], len as u32);
            if len > 104 {
                h[at(fields::COMPRESSION_TYPE)] = match self.compression_type {
                    super::header::CompressionType::Zlib => 0,
                    super::header::CompressionType::Zstd => 1,
                };
                let extra = at(fields::COMPRESSION_TYPE) + 1;
                h[extra..extra + self.extra_header_bytes.len()]
                    .copy_from_slice(&self.extra_header_bytes);
            }
            off = len;
        }

        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
            exts.push((ext::BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if let Some(d) = self.data_file.as_ref().filter(|_| self.has_data_file()) {
            exts.push((ext::DATA_FILE, d.as_bytes().to_vec()));
        }
        if let Some((offset, length)) = self.crypto_header {
            let mut d = vec![0u8; 16];
            BigEndian::write_u64(&mut d[0..], offset);
            BigEndian::write_u64(&mut d[8..], length);
            exts.push((ext::CRYPTO, d));
        }
        if writes_feature_table(self.version, self.cluster_size()) {
            exts.push((ext::FEATURE_TABLE, standard_feature_table()));
        }
        if let Some(b) = self.bitmaps.filter(|b| b.nb_bitmaps > 0) {
            let mut d = vec![0u8; 24];
            BigEndian::write_u32(&mut d[0..], b.nb_bitmaps);
            BigEndian::write_u64(&mut d[8..], b.directory_size);
            BigEndian::write_u64(&mut d[16..], b.directory_offset);
            exts.push((ext::BITMAPS, d));
        }
        for u in &self.unknown_extensions {
            exts.push((u.kind, u.data.clone()));
        }
        for (kind, data) in exts {
            let padded = data.len().div_ceil(8) * 8;
            if off + 8 + padded + 8 > cs {
                return Err(too_long());
            }
            BigEndian::write_u32(&mut h[off..], kind);
            BigEndian::write_u32(&mut h[off + 4..], data.len() as u32);
            h[off + 8..off + 8 + data.len()].copy_from_slice(&data);
            off += 8 + padded;
        }
        off += 8; // end marker: type 0, length 0
        if let Some(b) = &self.backing_file {
            if off + b.len() > cs {
                return Err(too_long());
            }
            h[off..off + b.len()].copy_from_slice(b.as_bytes());
            BigEndian::write_u64(&mut h[at(fields::BACKING_FILE_OFFSET)..], off as u64);
            BigEndian::write_u32(&mut h[at(fields::BACKING_FILE_SIZE)..], b.len() as u32);
        }
        Ok(h)
    }
}

fn too_long() -> Error {
    Error::invalid_input(
        "the header, its extensions and the backing file name do not fit in the first cluster",
    )
}

impl Qcow2Image {
    /// Replaces the image's header with `new`: encodes it, parses the bytes back (so that a
    /// header vimg could not open again is never written), writes cluster 0 in one write and
    /// syncs. Pending metadata of the write path is flushed first, so the header never points
    /// at tables that are not on disk yet.
    ///
    /// The caller keeps the invariants the header states (tables where it says, feature bits
    /// that match the image); this only guarantees the bytes are a well-formed header. The
    /// bitmaps extension and its autoclear bit are always the image's current ones.
    pub fn rewrite_header(&mut self, new: Header) -> Result<()> {
        if !self.writable {
            return Err(Error::invalid_input("image is not open for writing")).in_file(&self.path);
        }
        self.flush_metadata()?;
        let mut new = self.with_on_disk_state(new).in_file(&self.path)?;
        // The bitmaps extension is the bitmap code's (the flush may just have moved it).
        let live = self.bitmaps_ext();
        if new.version < 3 && live.is_some() {
            return Err(Error::unsupported(
                "a version 2 header cannot keep the image's persistent dirty bitmaps",
            ))
            .in_file(&self.path);
        }
        new.bitmaps = live;
        if live.is_some() {
            new.autoclear_features |= super::header::autoclear::BITMAPS;
        }
        let bytes = new.encode().in_file(&self.path)?;
        let file_len = self.file_len();
        let parsed = Header::parse(&bytes, file_len.max(bytes.len() as u64))
            .map_err(|e| Error::invalid_input(format!("the new header would not be valid: {e}")))
            .in_file(&self.path)?;
        self.storage
            .write_at(&bytes, 0)
            .map_err(|e| Error::io("cannot write the qcow2 header", e))
            .in_file(&self.path)?;
        self.storage
            .flush()
            .map_err(|e| Error::io("cannot sync the qcow2 header", e))
            .in_file(&self.path)?;
        self.set_bitmaps_ext(parsed.bitmaps);
        self.header = parsed;
        Ok(())
    }

    /// `new` with the header fields the write path changes on disk without updating the parsed
    /// header (the refcount table's location when it moved, the dirty and corrupt bits) taken
    /// from the disk, wherever the caller left them as the parsed header has them. Without
    /// this, a header built from [`Qcow2Image::header`] after writes that moved the refcount
    /// table would point back at the freed old table.
    fn with_on_disk_state(&self, mut new: Header) -> Result<Header> {
        let disk = self.disk_header()?;
        let old = &self.header;
        if new.refcount_table_offset == old.refcount_table_offset
            && new.refcount_table_clusters == old.refcount_table_clusters
        {
            new.refcount_table_offset = disk.refcount_table_offset;
            new.refcount_table_clusters = disk.refcount_table_clusters;
        }
        let bits = super::header::incompat::DIRTY | super::header::incompat::CORRUPT;
        if new.incompatible_features & bits == old.incompatible_features & bits {
            new.incompatible_features =
                (new.incompatible_features & !bits) | (disk.incompatible_features & bits);
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::create::{Compat, CreateOptions};
    use crate::qcow2::format::header::{BitmapsExt, CompressionType, UnknownExt};

    fn parsed_image(f: impl FnOnce(&mut CreateOptions)) -> (tempfile::TempDir, Header, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let mut o = CreateOptions {
            size: 1 << 30,
            ..Default::default()
        };
        f(&mut o);
        crate::qcow2::create::create(&p, &o).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
        let cs = h.cluster_size() as usize;
        (dir, h, bytes[..cs].to_vec())
    }

    #[test]
    fn encoding_a_created_header_gives_back_its_bytes() {
        type Edit = Box<dyn FnOnce(&mut CreateOptions)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("v3", Box::new(|_| {})),
            ("v2", Box::new(|o| o.compat = Compat::V2)),
            ("512", Box::new(|o| o.cluster_size = 512)),
            (
                "2M zstd extended lazy",
                Box::new(|o| {
                    o.cluster_size = 2 << 20;
                    o.compression_type = CompressionType::Zstd;
                    o.extended_l2 = true;
                    o.lazy_refcounts = true;
                }),
            ),
            ("refcount_bits=1", Box::new(|o| o.refcount_bits = 1)),
        ];
        for (name, f) in cases {
            let (_d, h, cluster0) = parsed_image(f);
            assert_eq!(h.encode().unwrap(), cluster0, "{name}");
        }
    }

    #[test]
    fn every_field_survives_a_round_trip() {
        let (_d, mut h, _) = parsed_image(|_| {});
        h.backing_file = Some("base image.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: 2,
            directory_size: 64,
            directory_offset: 0x30000,
        });
        h.unknown_extensions.push(UnknownExt {
            kind: 0x1234_5678,
            data: vec![1, 2, 3],
        });
        h.compatible_features = 1;
        // The bitmaps extension counts only while its autoclear bit says it is consistent.
        h.autoclear_features |= crate::qcow2::format::header::autoclear::BITMAPS;
        let bytes = h.encode().unwrap();
        let back = Header::parse(&bytes, 1 << 30).unwrap();
        assert_eq!(back.backing_file.as_deref(), Some("base image.qcow2"));
        assert_eq!(back.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(back.bitmaps, h.bitmaps);
        assert_eq!(back.unknown_extensions, h.unknown_extensions);
        assert_eq!(back.compatible_features, 1);
        assert_eq!(back.l1_table_offset, h.l1_table_offset);
        assert_eq!(back.encode().unwrap(), bytes);
    }

    #[test]
    fn a_name_too_long_for_cluster_zero_is_refused() {
        let (_d, mut h, _) = parsed_image(|o| o.cluster_size = 512);
        h.backing_file = Some("x".repeat(600));
        let e = h.encode().unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
    }

    #[test]
    fn version_2_headers_stay_72_bytes() {
        let (_d, mut h, _) = parsed_image(|o| o.compat = Compat::V2);
        h.backing_file = Some("b.raw".into());
        h.backing_format = Some("raw".into());
        let bytes = h.encode().unwrap();
        assert_eq!(BigEndian::read_u32(&bytes[72..]), ext::BACKING_FORMAT);
        let back = Header::parse(&bytes, 1 << 30).unwrap();
        assert_eq!(back.version, 2);
        assert_eq!(back.backing_file.as_deref(), Some("b.raw"));
    }
}
