//! Sector encryption as qemu's `qcrypto_block_cipher_{en,de}crypt_helper` does it: each 512-byte
//! sector on its own, the cipher mode restarted with the IV the IV generator makes from the
//! sector number.
//!
//! The modes are written here over one block-cipher trait (`Blocks`) rather than taken from the
//! `cbc`/`ctr`/`xts-mode` crates so that one code path serves every cipher and block size
//! (CAST5's blocks are 8 bytes)
//! and so that each sector goes to the cipher as one run of blocks where the mode allows it
//! (ECB, CBC decryption, CTR's key stream, XTS after the tweaks are applied): that is where
//! AES-NI's parallel rounds pay. The unit tests check every mode against those crates.

use super::alg::{essiv_cipher, CipherAlg, CipherMode, HashAlg, IvGenAlg};
use super::blocks::{new_blocks, Blocks};
use super::{SectorCipher, SECTOR};
use crate::error::{Error, Result};

const SECTOR_LEN: usize = SECTOR as usize;

/// What a sector cipher is: the cipher, the mode, the IV generator and (for ESSIV) its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CipherSpec {
    /// The block cipher.
    pub alg: CipherAlg,
    /// The mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGenAlg,
    /// The hash ESSIV makes its key with (ignored by the other generators, as by dm-crypt).
    pub ivgen_hash: Option<HashAlg>,
}

impl CipherSpec {
    /// The length of the key this spec takes: the cipher's, twice for XTS.
    pub fn key_len(&self) -> usize {
        match self.mode {
            CipherMode::Xts => 2 * self.alg.key_len(),
            _ => self.alg.key_len(),
        }
    }

    /// Checks that qemu can use the combination: XTS needs 16-byte blocks, ESSIV a hash whose
    /// digest is a key length of the cipher's family. qemu's words on failure.
    pub fn validate(&self) -> Result<()> {
        if self.mode == CipherMode::Xts && self.alg.block_len() != 16 {
            return Err(Error::unsupported(format!(
                "Unsupported cipher mode {}",
                self.mode.name()
            )));
        }
        if self.ivgen == IvGenAlg::Essiv {
            let hash = self
                .ivgen_hash
                .ok_or_else(|| Error::unsupported("Missing IV generator hash specification"))?;
            essiv_cipher(self.alg, hash)?;
        }
        Ok(())
    }

    /// The sector cipher of this spec keyed with `key` (of [`CipherSpec::key_len`] bytes).
    pub fn keyed(&self, key: &[u8]) -> Result<Box<dyn SectorCipher>> {
        Ok(Box::new(SectorCrypt::new(*self, key)?))
    }
}

/// Makes the IV of a sector.
enum IvGen {
    None,
    Plain,
    Plain64,
    Essiv(Box<dyn Blocks>),
}

impl IvGen {
    fn fill(&self, sector: u64, iv: &mut [u8]) {
        iv.fill(0);
        match self {
            IvGen::None => {}
            IvGen::Plain => {
                let b = (sector as u32).to_le_bytes();
                let n = b.len().min(iv.len());
                iv[..n].copy_from_slice(&b[..n]);
            }
            IvGen::Plain64 | IvGen::Essiv(_) => {
                let b = sector.to_le_bytes();
                let n = b.len().min(iv.len());
                iv[..n].copy_from_slice(&b[..n]);
                if let IvGen::Essiv(c) = self {
                    c.encrypt(iv);
                }
            }
        }
    }
}

/// A keyed [`CipherSpec`]: encrypts and decrypts sectors.
pub struct SectorCrypt {
    spec: CipherSpec,
    data: Box<dyn Blocks>,
    /// XTS's second key, which encrypts the IV into the first tweak.
    tweak: Option<Box<dyn Blocks>>,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCrypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SectorCrypt")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl SectorCrypt {
    /// `spec` keyed with `key`.
    pub fn new(spec: CipherSpec, key: &[u8]) -> Result<Self> {
        spec.validate()?;
        if key.len() != spec.key_len() {
            return Err(Error::invalid_input(format!(
                "Cipher key length {} should be {}",
                key.len(),
                spec.key_len()
            )));
        }
        let (data, tweak) = match spec.mode {
            CipherMode::Xts => {
                let (a, b) = key.split_at(key.len() / 2);
                (new_blocks(spec.alg, a)?, Some(new_blocks(spec.alg, b)?))
            }
            _ => (new_blocks(spec.alg, key)?, None),
        };
        let ivgen = if !spec.mode.needs_iv() {
            IvGen::None
        } else {
            match spec.ivgen {
                IvGenAlg::Plain => IvGen::Plain,
                IvGenAlg::Plain64 => IvGen::Plain64,
                IvGenAlg::Essiv => {
                    let hash = spec.ivgen_hash.expect("validated");
                    let alg = essiv_cipher(spec.alg, hash)?;
                    let salt = hash.digest(&[key]);
                    IvGen::Essiv(new_blocks(alg, &salt[..alg.key_len()])?)
                }
            }
        };
        Ok(SectorCrypt {
            spec,
            data,
            tweak,
            ivgen,
        })
    }

    /// What this cipher is.
    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    fn run(&self, sector: u64, buf: &mut [u8], encrypt: bool) -> Result<()> {
        if !buf.len().is_multiple_of(SECTOR_LEN) {
            return Err(Error::invalid_input(format!(
                "Length {} must be a multiple of the encryption sector size {SECTOR}",
                buf.len()
            )));
        }
        if let (CipherMode::Xts, Some(t)) = (self.spec.mode, &self.tweak) {
            self.run_xts(t.as_ref(), sector, buf, encrypt);
            return Ok(());
        }
        let bl = self.data.block_len();
        let mut iv = [0u8; 16];
        let iv = &mut iv[..bl];
        let mut scratch = [0u8; SECTOR_LEN];
        for (i, s) in buf.chunks_exact_mut(SECTOR_LEN).enumerate() {
            self.ivgen.fill(sector.wrapping_add(i as u64), iv);
            match (self.spec.mode, encrypt) {
                (CipherMode::Ecb, true) => self.data.encrypt(s),
                (CipherMode::Ecb, false) => self.data.decrypt(s),
                (CipherMode::Cbc, true) => {
                    let mut prev: &[u8] = iv;
                    let mut prev_copy = [0u8; 16];
                    for b in s.chunks_exact_mut(bl) {
                        xor(b, prev);
                        self.data.encrypt(b);
                        prev_copy[..bl].copy_from_slice(b);
                        prev = &prev_copy[..bl];
                    }
                }
                (CipherMode::Cbc, false) => {
                    scratch.copy_from_slice(s);
                    self.data.decrypt(s);
                    xor(&mut s[..bl], iv);
                    xor(&mut s[bl..], &scratch[..SECTOR_LEN - bl]);
                }
                (CipherMode::Ctr, _) => {
                    for k in scratch.chunks_exact_mut(bl) {
                        k.copy_from_slice(iv);
                        increment_be(iv);
                    }
                    self.data.encrypt(&mut scratch);
                    xor(s, &scratch);
                }
                // XTS went to `run_xts` above (its tweak key always exists).
                (CipherMode::Xts, _) => {
                    return Err(Error::invalid_input("XTS without its tweak key"));
                }
            }
        }
        scratch.fill(0);
        Ok(())
    }
}

/// Sectors XTS handles together: their first tweaks are encrypted in one call, and their
/// blocks in another, so that the cipher's parallel rounds (AES-NI, VAES) have long runs.
const XTS_GROUP: usize = 8;

impl SectorCrypt {
    /// XTS (16-byte blocks, checked by [`CipherSpec::validate`]) over `buf`, whose first sector
    /// is `sector`, with `tweak` the second key's cipher: [`XTS_GROUP`] sectors at a time, the
    /// tweaks worked out as 128-bit numbers.
    fn run_xts(&self, tweak: &dyn Blocks, sector: u64, buf: &mut [u8], encrypt: bool) {
        let mut ivs = [0u8; 16 * XTS_GROUP];
        let mut masks = [0u8; SECTOR_LEN * XTS_GROUP];
        for (g, group) in buf.chunks_mut(SECTOR_LEN * XTS_GROUP).enumerate() {
            let n = group.len() / SECTOR_LEN;
            let first = sector.wrapping_add((g * XTS_GROUP) as u64);
            for (i, iv) in ivs.chunks_exact_mut(16).take(n).enumerate() {
                self.ivgen.fill(first.wrapping_add(i as u64), iv);
            }
            tweak.encrypt(&mut ivs[..16 * n]);
            for (iv, mask) in ivs
                .chunks_exact(16)
                .zip(masks.chunks_exact_mut(SECTOR_LEN))
                .take(n)
            {
                let mut t = u128::from_le_bytes(iv.try_into().unwrap_or([0; 16]));
                for k in mask.chunks_exact_mut(16) {
                    k.copy_from_slice(&t.to_le_bytes());
                    // Times x in GF(2^128), little-endian, polynomial 0x87.
                    t = (t << 1) ^ ((t >> 127) * 0x87);
                }
            }
            let masks = &masks[..group.len()];
            xor(group, masks);
            if encrypt {
                self.data.encrypt(group);
            } else {
                self.data.decrypt(group);
            }
            xor(group, masks);
        }
        masks.fill(0);
    }
}

impl SectorCipher for SectorCrypt {
    fn encrypt(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.run(sector, buf, true)
    }

    fn decrypt(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.run(sector, buf, false)
    }
}

fn xor(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

/// Adds one to `block` read as a big-endian number, wrapping (nettle's `ctr_crypt`).
fn increment_be(block: &mut [u8]) {
    for b in block.iter_mut().rev() {
        *b = b.wrapping_add(1);
        if *b != 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyInit, KeyIvInit, StreamCipher};

    fn key(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    fn spec(alg: CipherAlg, mode: CipherMode, ivgen: IvGenAlg) -> CipherSpec {
        CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash: Some(HashAlg::Sha256),
        }
    }

    /// Our CBC, CTR, XTS and ECB against the RustCrypto mode crates, with plain64 IVs.
    #[test]
    fn modes_match_the_mode_crates() {
        let k = key(32, 1);
        // More sectors than XTS handles in one group, and a partial group.
        let plain = data((2 * XTS_GROUP + 3) * 512);
        let first = 0x1_0000_00ffu64;
        let iv_of = |s: u64| {
            let mut iv = [0u8; 16];
            iv[..8].copy_from_slice(&s.to_le_bytes());
            iv
        };
        // CBC
        let c = SectorCrypt::new(
            spec(CipherAlg::Aes256, CipherMode::Cbc, IvGenAlg::Plain64),
            &k,
        )
        .unwrap();
        let mut ours = plain.clone();
        c.encrypt(first, &mut ours).unwrap();
        for (i, s) in plain.chunks(512).enumerate() {
            let mut theirs = s.to_vec();
            let iv = iv_of(first + i as u64);
            let mut e = cbc::Encryptor::<aes::Aes256>::new_from_slices(&k, &iv).unwrap();
            let (blocks, _) = cipher::Array::slice_as_chunks_mut(&mut theirs);
            e.encrypt_blocks(blocks);
            assert_eq!(&ours[i * 512..][..512], &theirs[..]);
            let mut d = cbc::Decryptor::<aes::Aes256>::new_from_slices(&k, &iv).unwrap();
            let (blocks, _) = cipher::Array::slice_as_chunks_mut(&mut theirs);
            d.decrypt_blocks(blocks);
            assert_eq!(&theirs[..], s);
        }
        c.decrypt(first, &mut ours).unwrap();
        assert_eq!(ours, plain);

        // CTR
        let c = SectorCrypt::new(
            spec(CipherAlg::Aes128, CipherMode::Ctr, IvGenAlg::Plain64),
            &k[..16],
        )
        .unwrap();
        let mut ours = plain.clone();
        c.encrypt(first, &mut ours).unwrap();
        for (i, s) in plain.chunks(512).enumerate() {
            let mut theirs = s.to_vec();
            let iv = iv_of(first + i as u64);
            let mut e = ctr::Ctr128BE::<aes::Aes128>::new_from_slices(&k[..16], &iv).unwrap();
            e.apply_keystream(&mut theirs);
            assert_eq!(&ours[i * 512..][..512], &theirs[..]);
        }
        // CTR with CAST5's 8-byte blocks: the whole block is the counter.
        let c = SectorCrypt::new(
            spec(CipherAlg::Cast5_128, CipherMode::Ctr, IvGenAlg::Plain64),
            &k[..16],
        )
        .unwrap();
        let mut ours = plain.clone();
        c.encrypt(first, &mut ours).unwrap();
        for (i, s) in plain.chunks(512).enumerate() {
            let mut theirs = s.to_vec();
            let iv = &iv_of(first + i as u64)[..8];
            let mut e = ctr::Ctr64BE::<cast5::Cast5>::new_from_slices(&k[..16], iv).unwrap();
            e.apply_keystream(&mut theirs);
            assert_eq!(&ours[i * 512..][..512], &theirs[..]);
        }

        // XTS
        let c = SectorCrypt::new(
            spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64),
            &key(64, 9),
        )
        .unwrap();
        let k64 = key(64, 9);
        let x = xts_mode::Xts128::new(
            aes::Aes256::new_from_slice(&k64[..32]).unwrap(),
            aes::Aes256::new_from_slice(&k64[32..]).unwrap(),
        );
        let mut ours = plain.clone();
        c.encrypt(first, &mut ours).unwrap();
        let mut theirs = plain.clone();
        x.encrypt_area(&mut theirs, 512, first as u128, xts_mode::get_tweak_default);
        assert_eq!(ours, theirs);
        c.decrypt(first, &mut ours).unwrap();
        assert_eq!(ours, plain);

        // ECB
        let c = SectorCrypt::new(
            spec(CipherAlg::Twofish192, CipherMode::Ecb, IvGenAlg::Plain64),
            &k[..24],
        )
        .unwrap();
        let mut ours = plain.clone();
        c.encrypt(first, &mut ours).unwrap();
        let e = ecb::Encryptor::<twofish::Twofish>::new_from_slice(&k[..24]).unwrap();
        let mut theirs = plain.clone();
        let (blocks, _) = cipher::Array::slice_as_chunks_mut(&mut theirs);
        let mut e = e;
        e.encrypt_blocks(blocks);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn every_combination_round_trips_and_depends_on_the_sector() {
        for alg in CipherAlg::ALL {
            for mode in CipherMode::ALL {
                for ivgen in IvGenAlg::ALL {
                    for h in HashAlg::ALL {
                        let s = CipherSpec {
                            alg,
                            mode,
                            ivgen,
                            ivgen_hash: Some(h),
                        };
                        if s.validate().is_err() {
                            continue;
                        }
                        let c = SectorCrypt::new(s, &key(s.key_len(), 3)).unwrap();
                        let plain = data(1024);
                        let mut a = plain.clone();
                        c.encrypt(5, &mut a).unwrap();
                        assert_ne!(a, plain, "{s:?}");
                        let mut b = plain.clone();
                        c.encrypt(6, &mut b).unwrap();
                        assert_eq!(mode == CipherMode::Ecb, a == b, "{s:?}");
                        c.decrypt(5, &mut a).unwrap();
                        assert_eq!(a, plain, "{s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn plain_truncates_and_plain64_does_not() {
        let k = key(16, 4);
        let p = SectorCrypt::new(
            spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Plain),
            &k,
        )
        .unwrap();
        let p64 = SectorCrypt::new(
            spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Plain64),
            &k,
        )
        .unwrap();
        let enc = |c: &SectorCrypt, s: u64| {
            let mut b = data(512);
            c.encrypt(s, &mut b).unwrap();
            b
        };
        assert_eq!(enc(&p, 7), enc(&p, (1 << 32) + 7));
        assert_ne!(enc(&p64, 7), enc(&p64, (1 << 32) + 7));
        assert_eq!(enc(&p, 7), enc(&p64, 7));
    }

    #[test]
    fn refusals_in_qemus_words() {
        let e = spec(CipherAlg::Cast5_128, CipherMode::Xts, IvGenAlg::Plain64)
            .validate()
            .unwrap_err();
        assert_eq!(e.what(), "Unsupported cipher mode xts");
        let mut s = spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv);
        s.ivgen_hash = Some(HashAlg::Sha1);
        assert_eq!(
            s.validate().unwrap_err().what(),
            "No AES cipher with key size 20 available"
        );
        s.alg = CipherAlg::Cast5_128;
        s.ivgen_hash = Some(HashAlg::Sha256);
        assert_eq!(
            s.validate().unwrap_err().what(),
            "Cipher cast5-128 not supported with essiv"
        );
        s.ivgen_hash = Some(HashAlg::Md5);
        assert!(s.validate().is_ok());
        let c = SectorCrypt::new(
            spec(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64),
            &key(32, 0),
        )
        .unwrap();
        assert!(c.encrypt(0, &mut [0u8; 100]).is_err());
        assert!(SectorCrypt::new(
            spec(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64),
            &key(16, 0)
        )
        .is_err());
    }
}
