//! LUKS1's anti-forensic splitter (cryptsetup's AF_split/AF_merge, qemu's `crypto/afsplit.c`):
//! a key of n bytes is stored as `stripes` blocks of n bytes, all of which are needed to get it
//! back, so that destroying any part of the key material destroys the key.

use crate::crypto::alg::HashAlg;
use zeroize::Zeroizing;

/// The diffusion step: each digest-sized piece of `block` (the last one possibly shorter) is
/// replaced by the hash of its big-endian 32-bit index followed by the piece, truncated to the
/// piece's length.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let d = hash.digest_len();
    for (i, piece) in block.chunks_mut(d).enumerate() {
        let h = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&h[..n]);
    }
}

/// Splits `key` into `stripes` blocks: the first `stripes - 1` are `random`'s bytes, the last
/// is the key XORed with the diffused XOR chain of the others. `random` must hold
/// `(stripes - 1) * key.len()` bytes.
pub fn split(hash: HashAlg, key: &[u8], stripes: usize, random: &[u8]) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    assert_eq!(random.len(), (stripes - 1) * n);
    let mut out = Zeroizing::new(Vec::with_capacity(stripes * n));
    out.extend_from_slice(random);
    let mut block = Zeroizing::new(vec![0u8; n]);
    for s in random.chunks_exact(n) {
        xor(&mut block, s);
        diffuse(hash, &mut block);
    }
    xor(&mut block, key);
    out.extend_from_slice(&block);
    out
}

/// Joins `stripes` blocks of `key_len` bytes from `material` back into the key.
pub fn merge(hash: HashAlg, material: &[u8], key_len: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    let mut block = Zeroizing::new(vec![0u8; key_len]);
    let blocks = &material[..stripes * key_len];
    let (head, last) = blocks.split_at((stripes - 1) * key_len);
    for s in head.chunks_exact(key_len) {
        xor(&mut block, s);
        diffuse(hash, &mut block);
    }
    xor(&mut block, last);
    block
}

fn xor(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back_for_every_hash() {
        for h in HashAlg::ALL {
            // 33 bytes: the last diffused piece is shorter than any digest.
            let key: Vec<u8> = (0..33u8).collect();
            let random: Vec<u8> = (0..(9 * 33)).map(|i| (i * 13 % 251) as u8).collect();
            let m = split(h, &key, 10, &random);
            assert_eq!(m.len(), 330);
            assert_eq!(&merge(h, &m, 33, 10)[..], &key[..], "{h:?}");
            let mut broken = m.to_vec();
            broken[5] ^= 1;
            assert_ne!(&merge(h, &broken, 33, 10)[..], &key[..], "{h:?}");
        }
    }
}
