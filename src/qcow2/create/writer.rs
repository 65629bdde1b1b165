//! Writing a new image from its plan: cluster 0 (the header and its extensions), the refcount
//! structures, the L1 and L2 tables, and the preallocated data.
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
//! - then the L1 table (qcow2.rst "Cluster mapping"), only as long as its entries;
//! - last, for `encrypt.format=luks`, the LUKS header and its key slots in the next free
//!   clusters (qcow2.rst "Full disk encryption header pointer"), which qemu sets up after
//!   everything else (its `qcow2_set_up_encryption`).

use super::options::{Compat, CreateOptions};
use super::plan::{plan, Plan};
use crate::crypto::luks::CreateParams;
use crate::error::{Error, Result};
use crate::open::resolve_relative;
use crate::opener::Opener;
use crate::prealloc::FileWriter as Out;
use crate::prealloc::Preallocation;
use crate::qcow2::format::header::MAX_REFTABLE_BYTES;
use crate::qcow2::format::header::{autoclear, compat, incompat, CompressionType, Header};
use crate::qcow2::format::l2::OFLAG_COPIED;
use crate::qcow2::refcount::table::set_refcount;
use crate::storage::Storage;
use byteorder::{BigEndian, ByteOrder};
use std::path::{Path, PathBuf};

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
        crypt_method: match o.encrypt.format()? {
            Some("aes") => crate::qcow2::crypt::method::AES,
            Some("luks") => crate::qcow2::crypt::method::LUKS,
            _ => crate::qcow2::crypt::method::NONE,
        },
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
        crypto_header: p.crypto.map(|(at, len)| (at << p.geo.cluster_bits, len)),
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
pub(crate) fn create_file(opener: &Opener, path: &Path) -> Result<Box<dyn Storage>> {
    opener
        .create(path)
        .map_err(|e| Error::io("cannot create image", e).with_path(path))
}

/// Creates a qcow2 image at `path` (truncating any file there) as `opts` describes, laid out
/// as qemu-img lays it out (see the module documentation). With a data file, the data file is
/// created too (or truncated), resolved relative to the image's directory, and sized to the
/// virtual size; with `data_file_raw`, or any preallocation, every cluster is mapped to the
/// same offset in it. The backing file is only recorded, never opened. A failed create removes
/// the files it made.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    create_with(&Opener::default(), path, opts)
}

/// [`create`], every file made through `opener`.
pub fn create_with(opener: &Opener, path: &Path, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    // The passphrase must exist (legacy AES writes nothing made from it); LUKS's must be
    // UTF-8 without NUL bytes, as qemu requires.
    let luks = match opts.encrypt.luks()? {
        Some((params, id)) => Some((
            params,
            crate::crypto::luks::secret_passphrase(&opener.secrets(), id)?,
        )),
        None => None,
    };
    if let Some(id) = opts
        .encrypt
        .key_secret
        .as_deref()
        .filter(|_| opts.encrypt.alias == Some(true) || opts.encrypt.format.is_some())
    {
        opener.secret(id)?;
    }
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
    let image = NewImage {
        o: opts,
        p: &p,
        header: &header,
        data_path: data_path.as_deref(),
        luks: luks.as_ref().map(|(params, key)| (params, &key[..])),
    };
    let r = write_all(opener, path, &image, &mut made);
    if r.is_err() {
        for f in made {
            opener.remove_failed_output(&f);
        }
    }
    r
}

/// What a new image's files are made of.
struct NewImage<'a> {
    o: &'a CreateOptions,
    p: &'a Plan,
    /// Cluster 0.
    header: &'a [u8],
    /// The external data file, resolved.
    data_path: Option<&'a Path>,
    /// The LUKS header's parameters and passphrase.
    luks: Option<(&'a CreateParams, &'a [u8])>,
}

fn write_all(
    opener: &Opener,
    path: &Path,
    image: &NewImage<'_>,
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    let NewImage {
        o,
        p,
        header,
        data_path,
        luks,
    } = *image;
    let cs = p.geo.cs();
    let file = create_file(opener, path)?;
    made.push(path.to_path_buf());
    let out = Out {
        storage: file.as_ref(),
        path,
    };
    let data_file = match data_path {
        Some(dp) => {
            let f = create_file(opener, dp).map_err(|e| {
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
    if let (Some((at, len)), Some((params, passphrase))) = (p.crypto, luks) {
        write_luks_header(&out, p, at, len, params, passphrase)?;
    }
    out.flush()?;

    if let (Some(df), Some(dp)) = (&data_file, data_path) {
        let dout = Out {
            storage: df.as_ref(),
            path: dp,
        };
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
        dout.flush()?;
    }
    Ok(())
}

/// Writes the LUKS header into its clusters (from cluster `at`, `len` bytes): the clusters
/// are zeroed first, as qemu zeroes them, so that the key slots left empty read as zeros;
/// then the header with the passphrase in slot 0 ([`crate::crypto::luks::create`]).
fn write_luks_header(
    out: &Out<'_>,
    p: &Plan,
    at: u64,
    len: u64,
    params: &CreateParams,
    passphrase: &[u8],
) -> Result<()> {
    let cs = p.geo.cs();
    let start = at * cs;
    let end = (at * cs + len).next_multiple_of(cs);
    // Clusters past the end of what was written are holes of the file already; a cluster
    // the allocator handed out again (a refcount table given up) may hold old bytes.
    if let Some(stale_end) = p
        .layout
        .stale_tables
        .iter()
        .map(|(t, n, _)| (t + n) * cs)
        .filter(|&e| e > start)
        .max()
    {
        out.zeros(start, stale_end.min(end))?;
    }
    let (payload, _) = crate::crypto::luks::create(params, out.storage, start, passphrase)
        .map_err(|e| e.with_path(out.path))?;
    debug_assert_eq!(payload, len, "the planned LUKS header length");
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
    use crate::qcow2::create::opts;
    use crate::qcow2::format::header::ext;
    use crate::qcow2::format::header::fields;

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
        assert_eq!(
            BigEndian::read_u64(&h[fields::BACKING_FILE_OFFSET as usize..]),
            0x210
        );
        assert_eq!(&h[0x210..0x218], b"base.raw");
        assert_eq!(BigEndian::read_u32(&h[112..]), ext::BACKING_FORMAT);
        assert_eq!(BigEndian::read_u32(&h[128..]), ext::FEATURE_TABLE);
        assert_eq!(BigEndian::read_u32(&h[132..]), 384);
        let parsed = Header::parse(&h, 1 << 20).unwrap();
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
