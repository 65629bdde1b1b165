//! The algorithms qemu's LUKS support names: block ciphers (with their key sizes), cipher modes,
//! IV generators and hashes, with qemu's names for them (`aes-256`, `xts`, `plain64`, `sha256`).

use crate::error::{Error, Result};

/// A block cipher with a fixed key size (qemu's `QCryptoCipherAlgo`, the subset LUKS uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
    /// CAST-128 (CAST5) with a 128-bit key.
    Cast5_128,
    /// Serpent with a 128-bit key.
    Serpent128,
    /// Serpent with a 192-bit key.
    Serpent192,
    /// Serpent with a 256-bit key.
    Serpent256,
    /// Twofish with a 128-bit key.
    Twofish128,
    /// Twofish with a 192-bit key.
    Twofish192,
    /// Twofish with a 256-bit key.
    Twofish256,
}

impl CipherAlg {
    /// Every cipher, in qemu's order.
    pub const ALL: [CipherAlg; 10] = [
        CipherAlg::Aes128,
        CipherAlg::Aes192,
        CipherAlg::Aes256,
        CipherAlg::Cast5_128,
        CipherAlg::Serpent128,
        CipherAlg::Serpent192,
        CipherAlg::Serpent256,
        CipherAlg::Twofish128,
        CipherAlg::Twofish192,
        CipherAlg::Twofish256,
    ];

    /// qemu's name (`aes-256`), as in `cipher-alg=` and `info`.
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
            CipherAlg::Cast5_128 => "cast5-128",
            CipherAlg::Serpent128 => "serpent-128",
            CipherAlg::Serpent192 => "serpent-192",
            CipherAlg::Serpent256 => "serpent-256",
            CipherAlg::Twofish128 => "twofish-128",
            CipherAlg::Twofish192 => "twofish-192",
            CipherAlg::Twofish256 => "twofish-256",
        }
    }

    /// The cipher named `name` in qemu's spelling.
    pub fn from_name(name: &str) -> Option<CipherAlg> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The family name a LUKS header records (`aes`, `cast5`, `serpent`, `twofish`).
    pub fn family(self) -> &'static str {
        match self {
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256 => "aes",
            CipherAlg::Cast5_128 => "cast5",
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => "serpent",
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => "twofish",
        }
    }

    /// The member of `family` with a `key_len`-byte key (qemu's LUKS cipher name map).
    pub fn from_family(family: &str, key_len: usize) -> Option<CipherAlg> {
        Self::ALL
            .into_iter()
            .find(|c| c.family() == family && c.key_len() == key_len)
    }

    /// The key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128
            | CipherAlg::Cast5_128
            | CipherAlg::Serpent128
            | CipherAlg::Twofish128 => 16,
            CipherAlg::Aes192 | CipherAlg::Serpent192 | CipherAlg::Twofish192 => 24,
            CipherAlg::Aes256 | CipherAlg::Serpent256 | CipherAlg::Twofish256 => 32,
        }
    }

    /// The block length in bytes.
    pub fn block_len(self) -> usize {
        match self {
            CipherAlg::Cast5_128 => 8,
            _ => 16,
        }
    }
}

/// A cipher mode (qemu's `QCryptoCipherMode`, without the modes LUKS cannot use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherMode {
    /// Each block on its own.
    Ecb,
    /// Cipher block chaining, the IV before the first block.
    Cbc,
    /// XEX with ciphertext stealing: two keys, the IV is the tweak (16-byte blocks only).
    Xts,
    /// Counter mode: the IV is the first counter block, incremented as one big-endian number.
    Ctr,
}

impl CipherMode {
    /// Every mode.
    pub const ALL: [CipherMode; 4] = [
        CipherMode::Ecb,
        CipherMode::Cbc,
        CipherMode::Xts,
        CipherMode::Ctr,
    ];

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }

    /// The mode named `name`.
    pub fn from_name(name: &str) -> Option<CipherMode> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the mode takes an IV per sector (all but ECB).
    pub fn needs_iv(self) -> bool {
        self != CipherMode::Ecb
    }
}

/// An IV generator (qemu's `QCryptoIVGenAlgo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IvGenAlg {
    /// The sector number truncated to 32 bits, little-endian, zero-padded.
    Plain,
    /// The sector number as 64 bits, little-endian, zero-padded.
    Plain64,
    /// The plain64 IV encrypted with a key that is the hash of the data key.
    Essiv,
}

impl IvGenAlg {
    /// Every IV generator.
    pub const ALL: [IvGenAlg; 3] = [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv];

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }

    /// The IV generator named `name`.
    pub fn from_name(name: &str) -> Option<IvGenAlg> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A hash (qemu's `QCryptoHashAlgo`, those LUKS can use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// MD5.
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// RIPEMD-160.
    Ripemd160,
}

impl HashAlg {
    /// Every hash.
    pub const ALL: [HashAlg; 7] = [
        HashAlg::Md5,
        HashAlg::Sha1,
        HashAlg::Sha224,
        HashAlg::Sha256,
        HashAlg::Sha384,
        HashAlg::Sha512,
        HashAlg::Ripemd160,
    ];

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Md5 => "md5",
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
        }
    }

    /// The hash named `name`.
    pub fn from_name(name: &str) -> Option<HashAlg> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Md5 => 16,
            HashAlg::Sha1 | HashAlg::Ripemd160 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> zeroize::Zeroizing<Vec<u8>> {
        fn run<D: digest::Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        zeroize::Zeroizing::new(match self {
            HashAlg::Md5 => run::<md5::Md5>(parts),
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
            HashAlg::Ripemd160 => run::<ripemd::Ripemd160>(parts),
        })
    }

    /// PBKDF2 with HMAC of this hash: fills `out` from `password`, `salt` and `iterations`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Md5 => pbkdf2_hmac::<md5::Md5>(password, salt, iterations, out),
            HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
            HashAlg::Ripemd160 => pbkdf2_hmac::<ripemd::Ripemd160>(password, salt, iterations, out),
        }
    }
}

/// The cipher ESSIV encrypts IVs with, as qemu (after dm-crypt) picks it: the member of the data
/// cipher's family whose key length is the hash's digest length (so aes-128 with sha256 gives
/// aes-256). Refused in qemu's words where the family has no such member.
pub fn essiv_cipher(cipher: CipherAlg, hash: HashAlg) -> Result<CipherAlg> {
    let n = hash.digest_len();
    if n == cipher.key_len() {
        return Ok(cipher);
    }
    let label = match cipher.family() {
        "aes" => "AES",
        "serpent" => "Serpent",
        "twofish" => "Twofish",
        _ => {
            return Err(Error::unsupported(format!(
                "Cipher {} not supported with essiv",
                cipher.name()
            )))
        }
    };
    CipherAlg::from_family(cipher.family(), n)
        .ok_or_else(|| Error::unsupported(format!("No {label} cipher with key size {n} available")))
}
