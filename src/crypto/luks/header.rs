//! The LUKS1 partition header: 592 big-endian bytes (magic, version, cipher name, cipher mode,
//! hash, payload offset, key length, master key digest, salt and iterations, UUID, eight key
//! slots), parsed and checked as qemu's `qcrypto_block_luks_check_header` and
//! `qcrypto_block_luks_parse_header` do, with qemu's messages.

use super::info::{LuksInfo, LuksSlotInfo};
use crate::crypto::alg::{essiv_cipher, CipherAlg, CipherMode, HashAlg, IvGenAlg};
use crate::crypto::sector::CipherSpec;
use crate::crypto::SECTOR;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// `LUKS\xba\xbe`.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The size of the header on disk.
pub const HEADER_LEN: usize = 592;
/// The number of key slots.
pub const NUM_SLOTS: usize = 8;
/// The anti-forensic stripes of every key slot (qemu accepts no other count).
pub const STRIPES: u32 = 4000;
/// A slot in use.
pub const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// A slot not in use.
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// The length of the master key digest.
pub const DIGEST_LEN: usize = 20;
/// The length of the salts.
pub const SALT_LEN: usize = 32;
/// The first key material sector (after the 4 KiB header area), and the alignment of key slots
/// in sectors.
pub const KEY_SLOT_SECTORS: u32 = 4096 / SECTOR as u32;

/// One key slot.
#[derive(Clone, PartialEq, Eq)]
pub struct Slot {
    /// [`SLOT_ENABLED`] or [`SLOT_DISABLED`].
    pub active: u32,
    /// PBKDF2 iterations for the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt for the passphrase.
    pub salt: [u8; SALT_LEN],
    /// The first sector of the key material (relative to the header).
    pub key_offset: u32,
    /// Anti-forensic stripes ([`STRIPES`]).
    pub stripes: u32,
}

impl Slot {
    /// Whether the slot holds a key.
    pub fn is_active(&self) -> bool {
        self.active == SLOT_ENABLED
    }
}

/// A parsed and checked LUKS1 header.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// The cipher family as recorded (`aes`).
    pub cipher_name: String,
    /// The mode string as recorded (`xts-plain64`, `cbc-essiv:sha256`).
    pub cipher_mode: String,
    /// The PBKDF2 / AF hash as recorded (`sha256`).
    pub hash_spec: String,
    /// Where the encrypted data starts, in sectors from the header.
    pub payload_offset: u32,
    /// The master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that PBKDF2.
    pub mk_salt: [u8; SALT_LEN],
    /// Iterations of that PBKDF2.
    pub mk_iterations: u32,
    /// The UUID as recorded (ASCII, NUL-padded).
    pub uuid: [u8; 40],
    /// The key slots.
    pub slots: [Slot; NUM_SLOTS],
    /// The cipher, mode and IV generator the names above give.
    pub spec: CipherSpec,
    /// The hash `hash_spec` names.
    pub hash: HashAlg,
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("spec", &self.spec)
            .field("hash", &self.hash)
            .field("payload_offset", &self.payload_offset)
            .finish_non_exhaustive()
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The NUL-terminated string in `field`, or qemu's complaint that it is not terminated.
fn c_string(field: &[u8], what: &str) -> Result<String> {
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| Error::corrupt(format!("LUKS header {what} is not NUL terminated")))?;
    Ok(String::from_utf8_lossy(&field[..end]).into_owned())
}

/// The sectors slot key material takes: `key_bytes * stripes` rounded up to whole sectors and
/// then to [`KEY_SLOT_SECTORS`] (qemu's `qcrypto_block_luks_splitkeylen_sectors`).
pub fn key_material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let len = key_bytes as u64 * stripes as u64;
    len.div_ceil(SECTOR)
        .next_multiple_of(KEY_SLOT_SECTORS as u64)
}

impl Header {
    /// Reads the header at `base` in `storage`.
    pub fn read(storage: &dyn Storage, base: u64) -> Result<Header> {
        let mut b = [0u8; HEADER_LEN];
        storage
            .read_at(&mut b, base)
            .map_err(|e| Error::io("Failed to read LUKS header", e))?;
        Header::parse(&b)
    }

    /// Whether `buf` starts like a LUKS1 header (qemu's probe: magic and version 1).
    pub fn probe(buf: &[u8]) -> bool {
        buf.len() >= 8 && buf[..6] == MAGIC && buf[6..8] == [0, 1]
    }

    /// Parses and checks a header.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header> {
        if b[..6] != MAGIC {
            return Err(Error::corrupt("Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::unsupported(format!(
                "LUKS version {version} is not supported"
            )));
        }
        let cipher_name = c_string(&b[8..40], "cipher name")?;
        let cipher_mode = c_string(&b[40..72], "cipher mode")?;
        let hash_spec = c_string(&b[72..104], "hash spec")?;
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; SALT_LEN];
        mk_salt.copy_from_slice(&b[132..164]);
        let mk_iterations = be32(b, 164);
        let mut uuid = [0u8; 40];
        uuid.copy_from_slice(&b[168..208]);
        let slots: [Slot; NUM_SLOTS] = std::array::from_fn(|i| {
            let s = &b[208 + 48 * i..][..48];
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&s[8..40]);
            Slot {
                active: be32(s, 0),
                iterations: be32(s, 4),
                salt,
                key_offset: be32(s, 40),
                stripes: be32(s, 44),
            }
        });

        if payload_offset < KEY_SLOT_SECTORS {
            return Err(Error::corrupt(
                "LUKS payload is overlapping with the header",
            ));
        }
        if mk_iterations == 0 {
            return Err(Error::corrupt("LUKS key iteration count is zero"));
        }
        let len = |s: &Slot| key_material_sectors(key_bytes, s.stripes);
        for (i, s) in slots.iter().enumerate() {
            if s.stripes != STRIPES {
                return Err(Error::corrupt(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes as i32
                )));
            }
            if s.active != SLOT_DISABLED && s.active != SLOT_ENABLED {
                return Err(Error::corrupt(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if s.is_active() && s.iterations == 0 {
                return Err(Error::corrupt(format!(
                    "Keyslot {i} iteration count is zero"
                )));
            }
            if s.key_offset < KEY_SLOT_SECTORS {
                return Err(Error::corrupt(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            if s.key_offset as u64 + len(s) > payload_offset as u64 {
                return Err(Error::corrupt(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for (j, t) in slots.iter().enumerate().skip(i + 1) {
                let (a, b) = (s.key_offset as u64, t.key_offset as u64);
                if a < b + len(t) && b < a + len(s) {
                    return Err(Error::corrupt(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }

        // qemu's parse_header: the names.
        let (mode_name, rest) = cipher_mode.split_once('-').ok_or_else(|| {
            Error::unsupported(format!(
                "Unexpected cipher mode string format '{cipher_mode}'"
            ))
        })?;
        let (ivgen_name, ivhash_name) = match rest.split_once(':') {
            Some((g, h)) => (g, Some(h)),
            None => (rest, None),
        };
        let not_supported =
            |what: &str, name: &str| Error::unsupported(format!("{what} '{name}' not supported"));
        let ivgen_hash = match ivhash_name {
            Some(h) => {
                Some(HashAlg::from_name(h).ok_or_else(|| not_supported("Hash algorithm", h))?)
            }
            None => None,
        };
        let mode = CipherMode::from_name(mode_name)
            .ok_or_else(|| not_supported("Cipher mode", mode_name))?;
        let alg_key = if mode == CipherMode::Xts {
            key_bytes / 2
        } else {
            key_bytes
        };
        let alg = CipherAlg::from_family(&cipher_name, alg_key as usize)
            .filter(|_| mode != CipherMode::Xts || key_bytes.is_multiple_of(2))
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "Algorithm '{cipher_name}' with key size {} bytes not supported",
                    alg_key as i32
                ))
            })?;
        let hash = HashAlg::from_name(&hash_spec)
            .ok_or_else(|| not_supported("Hash algorithm", &hash_spec))?;
        let ivgen = IvGenAlg::from_name(ivgen_name)
            .ok_or_else(|| not_supported("IV generator", ivgen_name))?;
        if ivgen == IvGenAlg::Essiv {
            let h = ivgen_hash
                .ok_or_else(|| Error::unsupported("Missing IV generator hash specification"))?;
            essiv_cipher(alg, h)?;
        }
        let spec = CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash,
        };
        spec.validate()?;
        Ok(Header {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid,
            slots,
            spec,
            hash,
        })
    }

    /// The 592 bytes on disk.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        let put_str = |b: &mut [u8], s: &str| b[..s.len()].copy_from_slice(s.as_bytes());
        put_str(&mut b[8..40], &self.cipher_name);
        put_str(&mut b[40..72], &self.cipher_mode);
        put_str(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = &mut b[208 + 48 * i..][..48];
            o[0..4].copy_from_slice(&s.active.to_be_bytes());
            o[4..8].copy_from_slice(&s.iterations.to_be_bytes());
            o[8..40].copy_from_slice(&s.salt);
            o[40..44].copy_from_slice(&s.key_offset.to_be_bytes());
            o[44..48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Writes the header at `base` in `storage`.
    pub fn write(&self, storage: &dyn Storage, base: u64) -> Result<()> {
        storage
            .write_at(&self.to_bytes(), base)
            .map_err(|e| Error::io("Failed to write LUKS header", e))
    }

    /// Where the encrypted data starts, in bytes from the header.
    pub fn payload_offset_bytes(&self) -> u64 {
        self.payload_offset as u64 * SECTOR
    }

    /// The UUID as text.
    pub fn uuid_string(&self) -> String {
        let end = self.uuid.iter().position(|&b| b == 0).unwrap_or(40);
        String::from_utf8_lossy(&self.uuid[..end]).into_owned()
    }

    /// What `info` shows of the header (qemu's `QCryptoBlockInfoLUKS`); needs no key.
    pub fn info(&self) -> LuksInfo {
        LuksInfo {
            cipher_alg: self.spec.alg.name().to_string(),
            cipher_mode: self.spec.mode.name().to_string(),
            ivgen_alg: self.spec.ivgen.name().to_string(),
            ivgen_hash_alg: match self.spec.ivgen {
                IvGenAlg::Essiv => self.spec.ivgen_hash.map(|h| h.name().to_string()),
                _ => None,
            },
            hash_alg: self.hash.name().to_string(),
            detached_header: false,
            payload_offset: self.payload_offset_bytes(),
            master_key_iters: self.mk_iterations,
            uuid: self.uuid_string(),
            slots: self
                .slots
                .iter()
                .map(|s| LuksSlotInfo {
                    active: s.is_active(),
                    iters: s.is_active().then_some(s.iterations),
                    key_offset: s.key_offset as u64 * SECTOR,
                    stripes: s.is_active().then_some(s.stripes),
                })
                .collect(),
        }
    }
}
