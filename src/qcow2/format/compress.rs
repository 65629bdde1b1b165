//! Compressed clusters (qcow2.rst "Compressed Clusters Descriptor" and the compression type
//! header field): decoding the descriptor and decompressing deflate and zstd data.

use super::header::CompressionType;
use crate::error::{Error, Result};
use std::io::Read;

/// Where a compressed cluster's bytes live, decoded from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompressedDesc {
    /// Host byte offset of the compressed data (not aligned).
    pub host: u64,
    /// Bytes to read: whole 512-byte sectors from the start of the sector holding `host`,
    /// minus the part of the first sector before `host`.
    pub len: u64,
}

impl CompressedDesc {
    /// Decodes an L2 entry with the compressed bit set (bit 62), for `cluster_bits`.
    pub(crate) fn decode(entry: u64, cluster_bits: u32) -> CompressedDesc {
        let x = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        CompressedDesc {
            host,
            len: sectors * 512 - (host & 511),
        }
    }

    /// The host clusters (of `cluster_bits`) the descriptor's sectors touch, first and last.
    pub(crate) fn host_clusters(&self, cluster_bits: u32) -> (u64, u64) {
        let start_sector = self.host & !511;
        let end = self.host + self.len; // sector-aligned end
        (start_sector >> cluster_bits, (end - 1) >> cluster_bits)
    }
}

/// Compresses one cluster for storage, or returns `None` when compression would not save at
/// least one 512-byte sector (qemu then stores the cluster uncompressed too). Deflate uses a
/// 4 KiB window and no header, because qemu inflates with exactly that.
pub fn compress_cluster(kind: CompressionType, data: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = data.len().saturating_sub(512);
    let mut out = vec![0u8; limit];
    let written = match kind {
        CompressionType::Zlib => DEFLATE.with(|cell| {
            let mut slot = cell.borrow_mut();
            let c = slot.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            c.reset();
            match c.compress(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Ok(Some(c.total_out() as usize)),
                // Output buffer full: it does not shrink enough.
                Ok(_) => Ok(None),
                Err(e) => Err(Error::corrupt(format!("deflate failed: {e}"))),
            }
        })?,
        CompressionType::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let c = match slot.as_mut() {
                Some(c) => c,
                None => slot.insert(
                    zstd::bulk::Compressor::new(ZSTD_LEVEL)
                        .map_err(|e| Error::corrupt(format!("zstd compressor: {e}")))?,
                ),
            };
            // A destination too small for the frame is zstd's way of saying "does not shrink".
            Ok(c.compress_to_buffer(data, &mut out[..]).ok())
        })?,
    };
    Ok(written.map(|n| {
        out.truncate(n);
        out
    }))
}

/// The zstd level qemu compresses with (its default).
const ZSTD_LEVEL: i32 = 3;

thread_local! {
    /// Each thread's deflate state, reset for every cluster: building one costs more than
    /// compressing a cluster, and keeping one per thread bounds memory by the thread count.
    static DEFLATE: std::cell::RefCell<Option<flate2::Compress>> =
        const { std::cell::RefCell::new(None) };
    /// Each thread's zstd context, reused the same way.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses `input` into `out`, which must be filled exactly (one whole cluster); trailing
/// input is ignored, as qemu ignores it.
pub(crate) fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                Ok(_) => Err(Error::corrupt(format!(
                    "compressed cluster inflates to {} bytes instead of {}",
                    d.total_out(),
                    out.len()
                ))),
                Err(e) => Err(Error::corrupt(format!(
                    "compressed cluster does not inflate: {e}"
                ))),
            }
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| Error::corrupt(format!("zstd decoder: {e}")))?;
            let mut filled = 0;
            while filled < out.len() {
                match dec.read(&mut out[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        return Err(Error::corrupt(format!(
                            "compressed cluster does not decompress (zstd): {e}"
                        )))
                    }
                }
            }
            if filled != out.len() {
                return Err(Error::corrupt(format!(
                    "compressed cluster decompresses to {filled} bytes instead of {}",
                    out.len()
                )));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_descriptors_from_the_reference_notes() {
        let d = CompressedDesc::decode(0x4280000000050000 & !(1 << 62), 16);
        assert_eq!(d.host, 0x50000);
        assert_eq!(d.len, 11 * 512);
        let d = CompressedDesc::decode(0x428e000000a00000 & !(1 << 62), 21);
        assert_eq!(d.host, 0xa00000);
        assert_eq!(d.len, 328 * 512);
    }

    #[test]
    fn compress_cluster_round_trips_and_refuses_incompressible_data() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7 % 13) as u8).collect();
        let mut noise = vec![0u8; 65536];
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let z = compress_cluster(kind, &data)
                .unwrap()
                .expect("compressible");
            assert!(z.len() < data.len() / 4);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &z, &mut out).unwrap();
            assert_eq!(out, data);
            assert!(compress_cluster(kind, &noise).unwrap().is_none());
        }
        // The deflate stream must decode with a 4 KiB window, as qemu decodes it.
        let z = compress_cluster(CompressionType::Zlib, &data)
            .unwrap()
            .unwrap();
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut out = vec![0u8; data.len()];
        d.decompress(&z, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn deflate_and_zstd_round_trip_and_short_output_fails() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut z = vec![0u8; 70000];
        c.compress(&data, &mut z, flate2::FlushCompress::Finish)
            .unwrap();
        z.truncate(c.total_out() as usize);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zlib, &z, &mut out).unwrap();
        assert_eq!(out, data);
        let zs = zstd::bulk::compress(&data, 3).unwrap();
        let mut out2 = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &zs, &mut out2).unwrap();
        assert_eq!(out2, data);
        let mut big = vec![0u8; 65537];
        assert!(decompress(CompressionType::Zstd, &zs, &mut big).is_err());
        assert!(decompress(CompressionType::Zlib, &z[..z.len() / 2], &mut out).is_err());
    }
}
