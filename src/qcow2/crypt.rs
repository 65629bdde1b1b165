//! Encrypted qcow2 images (qcow2.rst `crypt_method`): the cipher an open image encrypts its
//! guest data with, and which sector number each 512-byte sector's IV is made from.
//!
//! - `crypt_method` 1, legacy AES ([`crate::crypto::legacy`]): the IV comes from the **guest**
//!   offset / 512. A cluster that moves to another host offset keeps its ciphertext.
//! - `crypt_method` 2, LUKS (the full disk encryption header extension names the LUKS header's
//!   place in the file): the IV comes from the **host** offset / 512 (qemu's
//!   `crypt_physical_offset`), so a cluster that moves (copy-on-write from a shared cluster,
//!   repair, preallocation moving a cluster) is decrypted at its old place and encrypted again at
//!   its new one ([`Encryption::recrypt`]). Its key slots are unlocked with
//!   [`crate::crypto::luks::unlock`].
//!
//! Only uncompressed data clusters hold ciphertext: metadata is plain, zero and unallocated
//! clusters read as plaintext zeros, and compression with encryption is refused, as by qemu.
//!
//! The key comes from the secret that the image's `encrypt.key-secret` option names
//! ([`crate::opener::Opener::key_for`]). Without it an image opens only for `info` (qemu
//! opens it without I/O then); every other open fails with qemu's message.

use crate::crypto::{legacy::LegacyAes, luks, SectorCipher, SECTOR};
use crate::error::{Error, Result};
use crate::opener::Opener;
use crate::qcow2::format::header::Header;
use crate::storage::Storage;
use std::path::Path;
use std::sync::Arc;

/// qcow2's `crypt_method` values.
pub(crate) mod method {
    /// No encryption.
    pub(crate) const NONE: u32 = 0;
    /// Legacy AES-128-CBC.
    pub(crate) const AES: u32 = 1;
    /// LUKS, its header in the file where the FDE header extension says.
    pub(crate) const LUKS: u32 = 2;
}

/// qemu's words when an encrypted image is opened for I/O without a key.
pub(crate) const KEY_REQUIRED: &str = "Parameter 'encrypt.key-secret' is required for cipher";

/// qemu's refusal of compressed writes into an encrypted image.
pub(crate) const NO_COMPRESSION: &str = "Compression and encryption not supported at the same time";

/// Which offset a sector's IV is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IvRule {
    /// The guest offset / 512 (legacy AES).
    Guest,
    /// The host offset / 512 in the file holding the data (LUKS).
    Host,
}

/// The cipher of an open encrypted image, with its IV rule.
#[derive(Debug, Clone)]
pub(crate) struct Encryption {
    cipher: Arc<dyn SectorCipher>,
    rule: IvRule,
    /// For LUKS, what `amend` of the key slots needs.
    keys: Option<Arc<LuksKeys>>,
}

/// What amending the key slots of an open LUKS image needs: the passphrase it was opened
/// with (zeroed when dropped), `amend --force`, and the command line's secrets, which
/// `encrypt.new-secret` and `encrypt.old-secret` name.
pub(crate) struct LuksKeys {
    pub(crate) passphrase: zeroize::Zeroizing<Vec<u8>>,
    pub(crate) force: bool,
    pub(crate) secrets: Arc<crate::secret::Secrets>,
}

impl std::fmt::Debug for LuksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LuksKeys { .. }")
    }
}

impl Encryption {
    /// `cipher` with the IV rule `rule`.
    pub(crate) fn new(cipher: Arc<dyn SectorCipher>, rule: IvRule) -> Self {
        Encryption {
            cipher,
            rule,
            keys: None,
        }
    }

    /// The keys of a LUKS image, for amending its key slots.
    pub(crate) fn keys(&self) -> Option<&LuksKeys> {
        self.keys.as_deref()
    }

    /// Whether the IVs follow the guest offset (so that data can be encrypted before it has a
    /// host offset).
    pub(crate) fn follows_guest(&self) -> bool {
        self.rule == IvRule::Guest
    }

    fn sector(&self, guest: u64, host: u64) -> u64 {
        match self.rule {
            IvRule::Guest => guest / SECTOR,
            IvRule::Host => host / SECTOR,
        }
    }

    /// Encrypts `buf`, whole sectors of guest data at guest offset `guest` to be stored at host
    /// offset `host`.
    pub(crate) fn encrypt(&self, guest: u64, host: u64, buf: &mut [u8]) -> Result<()> {
        check_aligned(guest, host, buf.len())?;
        self.cipher.encrypt(self.sector(guest, host), buf)
    }

    /// Decrypts `buf`, whole sectors stored at host offset `host` holding the guest data at
    /// guest offset `guest`.
    pub(crate) fn decrypt(&self, guest: u64, host: u64, buf: &mut [u8]) -> Result<()> {
        check_aligned(guest, host, buf.len())?;
        self.cipher.decrypt(self.sector(guest, host), buf)
    }

    /// Makes `buf`, read from host offset `from` (guest offset `guest`), fit host offset `to`:
    /// nothing to do when the IV follows the guest offset, decrypted and encrypted again when
    /// it follows the host offset.
    pub(crate) fn recrypt(&self, guest: u64, from: u64, to: u64, buf: &mut [u8]) -> Result<()> {
        if self.rule == IvRule::Guest || from == to {
            return Ok(());
        }
        self.decrypt(guest, from, buf)?;
        self.encrypt(guest, to, buf)
    }
}

fn check_aligned(guest: u64, host: u64, len: usize) -> Result<()> {
    if !guest.is_multiple_of(SECTOR)
        || !host.is_multiple_of(SECTOR)
        || !(len as u64).is_multiple_of(SECTOR)
    {
        return Err(Error::invalid_input(format!(
            "encrypted data is read and written in whole 512-byte sectors, not {len} bytes at \
             guest offset {guest:#x} (host offset {host:#x})"
        )));
    }
    Ok(())
}

/// The `encrypt.format` name of a `crypt_method`.
pub(crate) fn format_name(crypt_method: u32) -> Option<&'static str> {
    match crypt_method {
        method::AES => Some("aes"),
        method::LUKS => Some("luks"),
        _ => None,
    }
}

/// The encryption of the image at `path` with header `header`, held in `storage`, opened
/// through `opener`: `None` for an unencrypted image, or for an encrypted one opened without a
/// key where that is allowed (a read-only open for metadata only, as qemu-img `info` opens); an
/// error where the key is missing, the options name another format, or the method cannot be
/// opened.
///
/// LUKS plugs in here: its header lies in `storage` at the offset the FDE extension gives
/// (`header.crypto_header`), its key slots are unlocked with the passphrase into a
/// [`SectorCipher`], bound with [`IvRule::Host`].
pub(crate) fn bind(
    header: &Header,
    storage: &dyn Storage,
    path: &Path,
    writable: bool,
    opener: &Opener,
) -> Result<Option<Encryption>> {
    if header.crypto_header.is_some() && header.crypt_method != method::LUKS {
        return Err(Error::corrupt(
            "CRYPTO header extension only expected with LUKS encryption method",
        ));
    }
    if header.crypt_method == method::NONE {
        if let Some(given) = opener.encrypt_format_for(path) {
            return Err(Error::invalid_input(format!(
                "No encryption in image header, but options specified format '{given}'"
            )));
        }
        return Ok(None);
    }
    let Some(name) = format_name(header.crypt_method) else {
        return Err(Error::unsupported(format!(
            "Unsupported encryption method: {}",
            header.crypt_method
        )));
    };
    if let Some(given) = opener.encrypt_format_for(path) {
        if given != name {
            return Err(Error::invalid_input(format!(
                "Header reported '{name}' encryption format but options specify '{given}'"
            )));
        }
    }
    // A metadata-only open (`info`) looks no secret up and unlocks nothing, as qemu's opens
    // without I/O; a LUKS header is still read (info shows it).
    if !writable && opener.metadata_only() {
        if header.crypt_method == method::LUKS {
            luks_header(header, storage)?;
        }
        return Ok(None);
    }
    let key = opener.key_for(path)?;
    if header.crypt_method == method::LUKS {
        let luks = luks_header(header, storage)?;
        let Some(key) = key else {
            return Err(Error::invalid_input(KEY_REQUIRED));
        };
        let id = opener
            .encryption_for(path)
            .and_then(|e| e.key_secret)
            .unwrap_or_default();
        let passphrase = luks::check_passphrase(&id, &key)?;
        let base = header.crypto_header.map_or(0, |(off, _)| off);
        let cipher = luks::unlock(&luks, storage, base, passphrase)?;
        let mut e = Encryption::new(Arc::from(cipher), IvRule::Host);
        e.keys = Some(Arc::new(LuksKeys {
            passphrase: zeroize::Zeroizing::new(passphrase.to_vec()),
            force: opener.force(),
            secrets: opener.secrets(),
        }));
        return Ok(Some(e));
    }
    let Some(key) = key else {
        return Err(Error::invalid_input(KEY_REQUIRED));
    };
    Ok(Some(Encryption::new(
        Arc::new(LegacyAes::new(&key)),
        IvRule::Guest,
    )))
}

/// What `info` shows of the encryption of an image with header `header`, held in `storage`
/// (qemu's `encrypt` object of the format-specific data): `{"format": "aes"}` for legacy AES;
/// for LUKS its header's details (read without the key) join the format. `None` when the image
/// is not encrypted.
pub(crate) fn info(header: &Header, storage: &dyn Storage) -> Result<Option<serde_json::Value>> {
    let Some(name) = format_name(header.crypt_method) else {
        return Ok(None);
    };
    let mut object = serde_json::json!({ "format": name });
    if header.crypt_method == method::LUKS {
        let details = serde_json::to_value(luks_header(header, storage)?.info())
            .map_err(|e| Error::invalid_input(format!("LUKS header details: {e}")))?;
        if let (Some(o), serde_json::Value::Object(d)) = (object.as_object_mut(), details) {
            o.extend(d);
        }
    }
    Ok(Some(object))
}

/// The offset and the LUKS header of a `crypt_method` 2 image (see [`luks_header`]).
pub(crate) fn luks_header_at(
    header: &Header,
    storage: &dyn Storage,
) -> Result<(u64, luks::Header)> {
    let h = luks_header(header, storage)?;
    Ok((header.crypto_header.map_or(0, |(off, _)| off), h))
}

/// The LUKS header of a `crypt_method` 2 image, where its FDE header extension says; qemu's
/// words when the extension is missing or too short for the header.
fn luks_header(header: &Header, storage: &dyn Storage) -> Result<luks::Header> {
    let Some((offset, length)) = header.crypto_header else {
        return Err(Error::corrupt("Missing CRYPTO header for crypt method 2"));
    };
    if !offset.is_multiple_of(header.cluster_size()) {
        return Err(Error::corrupt(format!(
            "Encryption header offset '{offset}' is not a multiple of cluster size '{}'",
            header.cluster_size()
        )));
    }
    if length < luks::header::HEADER_LEN as u64 {
        return Err(Error::corrupt(
            "Request for data outside of extension header",
        ));
    }
    luks::Header::read(storage, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_iv_follows_the_rule() {
        let c: Arc<dyn SectorCipher> = Arc::new(LegacyAes::new(b"k"));
        let plain = vec![9u8; 1024];
        let guest = Encryption::new(c.clone(), IvRule::Guest);
        let host = Encryption::new(c.clone(), IvRule::Host);
        let (mut a, mut b, mut want) = (plain.clone(), plain.clone(), plain.clone());
        guest.encrypt(512, 4096, &mut a).unwrap();
        host.encrypt(512, 4096, &mut b).unwrap();
        c.encrypt(1, &mut want).unwrap();
        assert_eq!(a, want);
        let mut want = plain.clone();
        c.encrypt(8, &mut want).unwrap();
        assert_eq!(b, want);
        // Moving host offsets: the guest rule keeps the bytes, the host rule re-encrypts.
        let mut moved = a.clone();
        guest.recrypt(512, 4096, 8192, &mut moved).unwrap();
        assert_eq!(moved, a);
        let mut moved = b.clone();
        host.recrypt(512, 4096, 8192, &mut moved).unwrap();
        host.decrypt(512, 8192, &mut moved).unwrap();
        assert_eq!(moved, plain);
        assert!(guest.encrypt(100, 0, &mut [0u8; 512]).is_err());
    }

    /// The write path with IVs that follow the host offset (LUKS's rule, whose cipher is to
    /// come), on legacy AES images whose binding is swapped for one: random writes, then copy-on-
    /// write of clusters an internal snapshot shares (which move to new host offsets and must
    /// be encrypted again there, subclusters kept from the old cluster included), read back
    /// the same, and again after the image is closed and opened.
    #[test]
    fn host_offset_ivs_survive_copy_on_write_of_shared_clusters() {
        use crate::block::BlockImage;
        use crate::capability::{SnapshotTime, Snapshots};
        use crate::offsets::GuestOffset;
        use crate::qcow2::{create_with, CreateOptions, Qcow2Image};
        let dir = tempfile::tempdir().unwrap();
        let mut seed = 0x1234_5678_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (cluster, ext) in [(65536u64, false), (16384, true), (4096, false)] {
            let path = dir.path().join(format!("h{cluster}.qcow2"));
            let opener = Opener::new();
            opener.set_secrets(
                crate::secret::Secrets::from_objects(&["secret,id=k,data=pw"]).unwrap(),
            );
            let key = crate::opener::EncryptOptions {
                key_secret: Some("k".into()),
                format: None,
            };
            opener.set_encryption(&path, key);
            let mut o = CreateOptions {
                size: 1 << 20,
                cluster_size: cluster,
                extended_l2: ext,
                ..CreateOptions::default()
            };
            o.encrypt.format = Some("aes".into());
            o.encrypt.key_secret = Some("k".into());
            create_with(&opener, &path, &o).unwrap();
            let open = || {
                let mut guard =
                    crate::chain::ChainGuard::with_opener(Default::default(), opener.clone());
                let mut img = Qcow2Image::open(&path, true, true, &mut guard).unwrap();
                let c: Arc<dyn SectorCipher> = Arc::new(LegacyAes::new(b"pw"));
                img.crypt = Some(Encryption::new(c, IvRule::Host));
                img
            };
            let mut img = open();
            let mut model = vec![0u8; 1 << 20];
            let mut write = |img: &Qcow2Image, model: &mut [u8], n: usize| {
                for _ in 0..n {
                    let off = next() % (1 << 20);
                    let len = 1 + next() % ((1 << 20) - off).min(100_000);
                    let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                    img.write_at(&data, GuestOffset(off)).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            };
            write(&img, &mut model, 20);
            let at = SnapshotTime {
                date_sec: 0,
                date_nsec: 0,
            };
            img.create_snapshot("s", at).unwrap();
            write(&img, &mut model, 20);
            let mut got = vec![0u8; 1 << 20];
            img.read_at(&mut got, GuestOffset(0)).unwrap();
            assert!(got == model, "cluster {cluster}");
            img.close().unwrap();
            let img = open();
            img.read_at(&mut got, GuestOffset(0)).unwrap();
            assert!(got == model, "cluster {cluster}, reopened");
        }
    }
}
