//! Block ciphers behind one object-safe trait, so that the modes ([`crate::crypto::sector`]) are
//! written once for all of them. Whole runs of blocks go to the cipher in one call, so that
//! AES-NI and the other crates' parallel paths are used where a mode allows it.

use super::alg::CipherAlg;
use crate::error::{Error, Result};
use cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

/// A keyed block cipher working on whole blocks in place.
pub(crate) trait Blocks: Send + Sync {
    /// The block length in bytes.
    fn block_len(&self) -> usize;
    /// Encrypts every block of `buf` (a whole number of blocks) on its own (ECB).
    fn encrypt(&self, buf: &mut [u8]);
    /// Decrypts every block of `buf` (a whole number of blocks) on its own (ECB).
    fn decrypt(&self, buf: &mut [u8]);
}

/// One RustCrypto cipher as [`Blocks`].
struct Keyed<C>(C);

impl<C> Blocks for Keyed<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + Send + Sync,
{
    fn block_len(&self) -> usize {
        <C::BlockSize as cipher::typenum::Unsigned>::USIZE
    }

    fn encrypt(&self, buf: &mut [u8]) {
        let (blocks, rest) = Array::slice_as_chunks_mut(buf);
        debug_assert!(rest.is_empty());
        self.0.encrypt_blocks(blocks);
    }

    fn decrypt(&self, buf: &mut [u8]) {
        let (blocks, rest) = Array::slice_as_chunks_mut(buf);
        debug_assert!(rest.is_empty());
        self.0.decrypt_blocks(blocks);
    }
}

fn keyed<C>(key: &[u8]) -> Result<Box<dyn Blocks>>
where
    C: KeyInit + BlockCipherEncrypt + BlockCipherDecrypt + Send + Sync + 'static,
{
    C::new_from_slice(key)
        .map(|c| Box::new(Keyed(c)) as Box<dyn Blocks>)
        .map_err(|_| Error::invalid_input("Invalid cipher key length"))
}

/// `alg` keyed with `key`, which must be `alg`'s key length (qemu's words otherwise).
pub(crate) fn new_blocks(alg: CipherAlg, key: &[u8]) -> Result<Box<dyn Blocks>> {
    if key.len() != alg.key_len() {
        return Err(Error::invalid_input(format!(
            "Cipher key length {} should be {}",
            key.len(),
            alg.key_len()
        )));
    }
    match alg {
        CipherAlg::Aes128 => keyed::<aes::Aes128>(key),
        CipherAlg::Aes192 => keyed::<aes::Aes192>(key),
        CipherAlg::Aes256 => keyed::<aes::Aes256>(key),
        CipherAlg::Cast5_128 => keyed::<cast5::Cast5>(key),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            keyed::<serpent::Serpent>(key)
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            keyed::<twofish::Twofish>(key)
        }
    }
}
