//! Sector encryption of image data: the ciphers, modes and IV generators qemu's `QCryptoBlock`
//! uses for qcow2 (LUKS and legacy AES) and raw LUKS images, and LUKS1's key material handling.
//!
//! Data is encrypted in 512-byte sectors (qemu's `QCRYPTO_BLOCK_*_SECTOR_SIZE`), each with an IV
//! made from its sector number: for qcow2 LUKS the host offset / 512, for legacy AES the guest
//! offset / 512, for raw LUKS the offset in the payload / 512.

use crate::error::Result;

pub mod legacy;

/// The size of an encryption sector, in bytes.
pub const SECTOR: u64 = 512;

/// Encrypts and decrypts whole 512-byte sectors in place (qemu's `qcrypto_block_encrypt` /
/// `qcrypto_block_decrypt`). Shared by the worker threads of a copy.
pub trait SectorCipher: Send + Sync + std::fmt::Debug {
    /// Encrypts `buf` (a whole number of sectors) in place; its first sector is `sector`.
    fn encrypt(&self, sector: u64, buf: &mut [u8]) -> Result<()>;
    /// Decrypts `buf` (a whole number of sectors) in place; its first sector is `sector`.
    fn decrypt(&self, sector: u64, buf: &mut [u8]) -> Result<()>;
}

pub mod alg;
mod blocks;
pub mod luks;
pub mod sector;

pub use alg::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
pub use sector::{CipherSpec, SectorCrypt};
