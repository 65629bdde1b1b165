//! Compressed clusters (qcow2.rst "Compressed Clusters Descriptor" and the compression type
//! header field): decoding the descriptor and decompressing deflate and zstd data.

use super::header::CompressionType;
use crate::error::{Error, Result};
use std::io::Read;

/// Where a compressed cluster's bytes live, decoded from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDesc {
    /// Host byte offset of the compressed data (not aligned).
    pub host: u64,
    /// Bytes to read: whole 512-byte sectors from the start of the sector holding `host`,
    /// minus the part of the first sector before `host`.
    pub len: u64,
}

impl CompressedDesc {
    /// Decodes an L2 entry with the compressed bit set (bit 62), for `cluster_bits`.
    pub fn decode(entry: u64, cluster_bits: u32) -> CompressedDesc {
        let x = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        CompressedDesc {
            host,
            len: sectors * 512 - (host & 511),
        }
    }

    /// The host clusters (of `cluster_bits`) the descriptor's sectors touch, first and last.
    pub fn host_clusters(&self, cluster_bits: u32) -> (u64, u64) {
        let start_sector = self.host & !511;
        let end = self.host + self.len; // sector-aligned end
        (start_sector >> cluster_bits, (end - 1) >> cluster_bits)
    }
}

/// Decompresses `input` into `out`, which must be filled exactly (one whole cluster); trailing
/// input is ignored, as qemu ignores it.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
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
