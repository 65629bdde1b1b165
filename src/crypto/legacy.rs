//! qcow's and qcow2's legacy AES encryption (`crypt_method` 1, qemu's `crypto/block-qcow.c`):
//! AES-128-CBC over each 512-byte sector, the key the first 16 bytes of the passphrase (zero
//! padded when shorter), the IV the sector number as a little-endian 64-bit integer (plain64)
//! padded with zeros.
//!
//! The scheme is weak: the key is the passphrase itself (no key derivation, so at most 16
//! bytes of it count), the IVs are predictable, and nothing detects a wrong passphrase (the
//! data decrypts to garbage, as in qemu). qemu's system emulators refuse such images; qemu-img
//! still reads, writes and creates them, and so does vimg.
//!
//! For qcow2 the sector number is the guest offset / 512 (qemu's `crypt_physical_offset` is
//! false for this method), which the image's cipher binding chooses, not this module.

use super::{SectorCipher, SECTOR};
use crate::error::{Error, Result};
use aes::Aes128;
use cipher::{Array, BlockModeDecrypt, BlockModeEncrypt, InnerIvInit, KeyInit};
use zeroize::Zeroizing;

/// The key length: AES-128.
const KEY_LEN: usize = 16;

/// The legacy AES cipher of one image.
pub struct LegacyAes {
    /// The AES-128 key schedule made from the key. (aes 0.9 has no way to zero it on drop;
    /// the key bytes themselves are zeroed.)
    aes: Aes128,
}

impl std::fmt::Debug for LegacyAes {
    /// Never shows the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LegacyAes")
    }
}

impl LegacyAes {
    /// The cipher for `passphrase` (the secret's bytes): its first 16 bytes, zero-padded, are
    /// the key, as qemu takes them.
    pub fn new(passphrase: &[u8]) -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        let n = passphrase.len().min(KEY_LEN);
        key[..n].copy_from_slice(&passphrase[..n]);
        let aes = Aes128::new(&Array::from(*key));
        LegacyAes { aes }
    }

    /// Runs `f` on each sector of `buf` with its IV: plain64 of `sector` and those after it.
    fn each_sector(
        &self,
        sector: u64,
        buf: &mut [u8],
        mut f: impl FnMut(&Aes128, [u8; 16], &mut [cipher::Block<Aes128>]),
    ) -> Result<()> {
        if !(buf.len() as u64).is_multiple_of(SECTOR) {
            return Err(Error::invalid_input(format!(
                "encryption works on whole 512-byte sectors, not on {} bytes",
                buf.len()
            )));
        }
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            let mut iv = [0u8; 16];
            iv[..8].copy_from_slice(&sector.wrapping_add(i as u64).to_le_bytes());
            let (blocks, rest) = Array::slice_as_chunks_mut(s);
            debug_assert!(rest.is_empty());
            f(&self.aes, iv, blocks);
        }
        Ok(())
    }
}

impl SectorCipher for LegacyAes {
    fn encrypt(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.each_sector(sector, buf, |aes, iv, blocks| {
            cbc::Encryptor::<Aes128>::inner_iv_init(aes.clone(), &Array::from(iv))
                .encrypt_blocks(blocks)
        })
    }

    fn decrypt(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.each_sector(sector, buf, |aes, iv, blocks| {
            cbc::Decryptor::<Aes128>::inner_iv_init(aes.clone(), &Array::from(iv))
                .decrypt_blocks(blocks)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AES-128-CBC by hand from the block cipher alone: C_0 = E(P_0 ^ IV), C_i = E(P_i ^
    /// C_{i-1}), so that the mode and the IV rule are checked against something other than
    /// the cbc crate.
    fn reference(key: &[u8; 16], sector: u64, plain: &[u8]) -> Vec<u8> {
        use cipher::BlockCipherEncrypt;
        let aes = Aes128::new(&Array::from(*key));
        let mut out = Vec::new();
        for (i, s) in plain.chunks(512).enumerate() {
            let mut prev = [0u8; 16];
            prev[..8].copy_from_slice(&(sector + i as u64).to_le_bytes());
            for b in s.chunks(16) {
                let mut x = Array::from([0u8; 16]);
                for j in 0..16 {
                    x[j] = b[j] ^ prev[j];
                }
                aes.encrypt_block(&mut x);
                prev.copy_from_slice(&x);
                out.extend_from_slice(&x);
            }
        }
        out
    }

    #[test]
    fn sectors_are_cbc_with_plain64_ivs_and_round_trip() {
        let plain: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 256) as u8).collect();
        let c = LegacyAes::new(b"abc");
        let mut buf = plain.clone();
        c.encrypt(1000, &mut buf).unwrap();
        let mut key = [0u8; 16];
        key[..3].copy_from_slice(b"abc");
        assert_eq!(buf, reference(&key, 1000, &plain));
        // Each sector on its own gives the same.
        let mut one = plain[512..1024].to_vec();
        c.encrypt(1001, &mut one).unwrap();
        assert_eq!(one, buf[512..1024]);
        c.decrypt(1000, &mut buf).unwrap();
        assert_eq!(buf, plain);
    }

    #[test]
    fn only_the_first_16_bytes_of_the_passphrase_count() {
        let plain = vec![0x5au8; 512];
        let (mut a, mut b, mut c) = (plain.clone(), plain.clone(), plain.clone());
        LegacyAes::new(b"0123456789abcdefXYZ")
            .encrypt(3, &mut a)
            .unwrap();
        LegacyAes::new(b"0123456789abcdef")
            .encrypt(3, &mut b)
            .unwrap();
        LegacyAes::new(b"0123456789abcdeX")
            .encrypt(3, &mut c)
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(b, c);
        assert_eq!(b, reference(b"0123456789abcdef", 3, &plain));
    }

    #[test]
    fn partial_sectors_are_refused() {
        let c = LegacyAes::new(b"k");
        assert!(c.encrypt(0, &mut [0u8; 100]).is_err());
        assert!(c.decrypt(0, &mut [0u8; 513]).is_err());
        c.encrypt(0, &mut []).unwrap();
    }
}
