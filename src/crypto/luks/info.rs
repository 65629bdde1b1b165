//! What `info` shows of a LUKS header without the key: qemu's `QCryptoBlockInfoLUKS`, as plain
//! data. Serialized with qemu's JSON member names; the same block appears under a qcow2 image's
//! `encrypt` (with `format: luks` next to it) and as a raw LUKS image's format-specific data.

use serde::Serialize;

/// The LUKS header's details, as `qemu-img info` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksInfo {
    /// The cipher (`aes-256`).
    pub cipher_alg: String,
    /// The mode (`xts`).
    pub cipher_mode: String,
    /// The IV generator (`plain64`).
    pub ivgen_alg: String,
    /// ESSIV's hash, shown for ESSIV only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<String>,
    /// The PBKDF2 and anti-forensic hash.
    pub hash_alg: String,
    /// Whether the header is in a file of its own (never, for vimg's images).
    pub detached_header: bool,
    /// Where the payload starts, in bytes.
    pub payload_offset: u64,
    /// PBKDF2 iterations of the master key digest.
    pub master_key_iters: u32,
    /// The UUID.
    pub uuid: String,
    /// The eight key slots.
    pub slots: Vec<LuksSlotInfo>,
}

/// One key slot as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksSlotInfo {
    /// Whether it holds a key.
    pub active: bool,
    /// PBKDF2 iterations (active slots only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    /// Where its key material starts, in bytes from the header.
    pub key_offset: u64,
    /// Anti-forensic stripes (active slots only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
}
