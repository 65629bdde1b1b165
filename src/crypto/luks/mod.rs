//! LUKS1 (cryptsetup's on-disk format 1.2.1, as qemu's `crypto/block-luks.c` implements it):
//! the header, key slots unlocked with PBKDF2 and the anti-forensic merge, and new headers made
//! as qemu makes them.
//!
//! This is vimg's own code because no Rust crate does LUKS1: the `luks` and `luks2` crates read
//! LUKS2 only (LUKS1 is a placeholder in `luks`), and `cryptsetup-rs` / `libcryptsetup-rs` bind
//! libcryptsetup, which handles headers and device-mapper activation but has no in-process
//! sector encryption. The primitives (ciphers, hashes, HMAC, PBKDF2) are RustCrypto's.
//!
//! The header may sit anywhere in a [`Storage`]: at 0 for a raw LUKS image, at the offset of the
//! full-disk-encryption header extension for qcow2. Key slot offsets are relative to it.
//!
//! Secrets: passphrases are borrowed, master and slot keys live in [`Zeroizing`] buffers and
//! the ciphers' key schedules are zeroized on drop; no error message carries any of them.
//!
//! The API, for raw LUKS ([`crate::luks`], header at 0) and qcow2 (header at the FDE extension's
//! offset) alike:
//!
//! - [`Header::read`]`(storage, base)` reads and checks a header; [`Header::info`] is what
//!   `info` shows of it, without the key ([`LuksInfo`], serializable as qemu's JSON);
//! - [`unlock`]`(&header, storage, base, passphrase)` gives the payload's [`SectorCipher`]
//!   (or qemu's `Invalid password, cannot unlock any keyslot`);
//! - [`create`]`(&params, storage, base, passphrase)` writes a new header and key slot 0 and
//!   returns the header's length with the cipher; [`CreateParams`] from `-o` options through
//!   [`crate::luks::LuksOptions::set`] (names without the `encrypt.` prefix);
//! - [`amend`] adds and erases key slots ([`AmendRequest::set`] takes the options);
//! - [`secret_passphrase`] looks a `key-secret` id up among the command line's secrets.

mod afsplit;
pub mod header;
pub mod info;

pub use header::Header;
pub use info::{LuksInfo, LuksSlotInfo};

use crate::crypto::alg::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use crate::crypto::sector::{CipherSpec, SectorCrypt};
use crate::crypto::{SectorCipher, SECTOR};
use crate::error::{Error, Result};
use crate::secret::Secrets;
use crate::storage::Storage;
use header::{key_material_sectors, Slot, DIGEST_LEN, KEY_SLOT_SECTORS, NUM_SLOTS, SALT_LEN};
use zeroize::Zeroizing;

/// The most PBKDF2 iterations vimg runs for one key slot or the master key digest (2^26). qemu
/// and cryptsetup time their counts to about a second (2 s spread over the master key and a
/// slot by default), which gives a few million on today's machines; a header asking for more
/// than this would keep vimg busy for minutes to hours per slot (the field allows 4 billion),
/// so it is refused as corrupt rather than run.
pub const MAX_ITERATIONS: u32 = 1 << 26;

/// qemu's message when no slot opens with the passphrase.
pub const WRONG_PASSPHRASE: &str = "Invalid password, cannot unlock any keyslot";

/// What a new LUKS header is made of (qemu's `QCryptoBlockCreateOptionsLUKS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateParams {
    /// The data cipher, mode and IV generator.
    pub spec: CipherSpec,
    /// The PBKDF2 and anti-forensic hash.
    pub hash: HashAlg,
    /// Milliseconds of PBKDF2 work a slot unlock should take (`iter-time`).
    pub iter_time_ms: u64,
}

impl Default for CreateParams {
    /// qemu's defaults: aes-256, xts, plain64, sha256, 2000 ms.
    fn default() -> Self {
        CreateParams {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: None,
            },
            hash: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

/// The values of the LUKS create options as given (qemu's `QCryptoBlockCreateOptionsLUKS`;
/// raw LUKS names them `cipher-alg`, ..., qcow2 `encrypt.cipher-alg`, ...): `None` for an
/// option not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptionValues {
    /// `cipher-alg`.
    pub cipher_alg: Option<String>,
    /// `cipher-mode`.
    pub cipher_mode: Option<String>,
    /// `ivgen-alg`.
    pub ivgen_alg: Option<String>,
    /// `ivgen-hash-alg`.
    pub ivgen_hash_alg: Option<String>,
    /// `hash-alg`.
    pub hash_alg: Option<String>,
    /// `iter-time`.
    pub iter_time: Option<u64>,
}

impl CreateOptionValues {
    /// Takes one option by its name without prefix: `Ok(false)` if `key` is not one of these,
    /// qemu's refusal of an `iter-time` that is not a number (named `shown`, the key as the
    /// user wrote it).
    pub fn set(&mut self, key: &str, value: &str, shown: &str) -> Result<bool> {
        let v = Some(value.to_string());
        match key {
            "cipher-alg" => self.cipher_alg = v,
            "cipher-mode" => self.cipher_mode = v,
            "ivgen-alg" => self.ivgen_alg = v,
            "ivgen-hash-alg" => self.ivgen_hash_alg = v,
            "hash-alg" => self.hash_alg = v,
            "iter-time" => {
                self.iter_time = Some(value.parse().map_err(|_| {
                    Error::invalid_input(format!("Parameter '{shown}' expects a number"))
                })?)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The header parameters, qemu's defaults for what is not given, or qemu's refusal of a
    /// value (`Parameter 'cipher-alg' does not accept value 'x'`); the combination is not
    /// checked ([`CipherSpec::validate`] does).
    pub fn params(&self) -> Result<CreateParams> {
        fn pick<T>(
            key: &str,
            v: &Option<String>,
            f: impl Fn(&str) -> Option<T>,
        ) -> Result<Option<T>> {
            v.as_deref()
                .map(|s| {
                    f(s).ok_or_else(|| {
                        Error::invalid_input(format!(
                            "Parameter '{key}' does not accept value '{s}'"
                        ))
                    })
                })
                .transpose()
        }
        let mut p = CreateParams::default();
        if let Some(a) = pick("cipher-alg", &self.cipher_alg, CipherAlg::from_name)? {
            p.spec.alg = a;
        }
        if let Some(m) = pick("cipher-mode", &self.cipher_mode, CipherMode::from_name)? {
            p.spec.mode = m;
        }
        if let Some(g) = pick("ivgen-alg", &self.ivgen_alg, IvGenAlg::from_name)? {
            p.spec.ivgen = g;
        }
        p.spec.ivgen_hash = pick("ivgen-hash-alg", &self.ivgen_hash_alg, HashAlg::from_name)?;
        if p.spec.ivgen == IvGenAlg::Essiv && p.spec.ivgen_hash.is_none() {
            p.spec.ivgen_hash = Some(HashAlg::Sha256);
        }
        if let Some(h) = pick("hash-alg", &self.hash_alg, HashAlg::from_name)? {
            p.hash = h;
        }
        if let Some(t) = self.iter_time {
            p.iter_time_ms = t;
        }
        Ok(p)
    }
}

/// Checks a passphrase as qemu's `qcrypto_secret_lookup_as_utf8` does (valid UTF-8 without NUL
/// bytes); `id` names the secret in the message, which never shows its data.
pub fn check_passphrase<'a>(id: &str, data: &'a [u8]) -> Result<&'a [u8]> {
    if std::str::from_utf8(data).is_err() || data.contains(&0) {
        return Err(Error::invalid_input(format!(
            "Data from secret {id} is not valid UTF-8"
        )));
    }
    Ok(data)
}

/// The key material of `slot` as stored: `key_bytes * stripes` bytes, rounded up to whole
/// sectors for the cipher.
fn material_len(key_bytes: usize, stripes: u32) -> (usize, usize) {
    let len = key_bytes * stripes as usize;
    (len, len.next_multiple_of(SECTOR as usize))
}

/// Tries `passphrase` on every active slot; the master key of the first that opens, or qemu's
/// refusal. Slot key material past the end of `storage`, and iteration counts past
/// [`MAX_ITERATIONS`], are refused before any work.
pub fn unlock_master_key(
    header: &Header,
    storage: &dyn Storage,
    base: u64,
    passphrase: &[u8],
) -> Result<(usize, Zeroizing<Vec<u8>>)> {
    let key_bytes = header.key_bytes as usize;
    let end = storage
        .len()
        .map_err(|e| Error::io("Failed to read LUKS header", e))?;
    if header.mk_iterations > MAX_ITERATIONS {
        return Err(Error::corrupt(format!(
            "LUKS master key iteration count {} is more than vimg runs ({MAX_ITERATIONS}): \
             unlocking would take far longer than any real header asks",
            header.mk_iterations
        )));
    }
    for (i, s) in header.slots.iter().enumerate() {
        if !s.is_active() {
            continue;
        }
        if s.iterations > MAX_ITERATIONS {
            return Err(Error::corrupt(format!(
                "Keyslot {i} iteration count {} is more than vimg runs ({MAX_ITERATIONS}): \
                 unlocking would take far longer than any real header asks",
                s.iterations
            )));
        }
        let (_, padded) = material_len(key_bytes, s.stripes);
        let at = base + s.key_offset as u64 * SECTOR;
        if at + padded as u64 > end {
            return Err(Error::corrupt(format!(
                "Keyslot {i} key material (offset {at}, {padded} bytes) lies past the end of the file ({end} bytes)"
            )));
        }
    }
    for (i, s) in header.slots.iter().enumerate() {
        if s.is_active() {
            if let Some(key) = try_slot(header, s, storage, base, passphrase)? {
                return Ok((i, key));
            }
        }
    }
    Err(Error::invalid_input(WRONG_PASSPHRASE))
}

fn try_slot(
    header: &Header,
    s: &Slot,
    storage: &dyn Storage,
    base: u64,
    passphrase: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let key_bytes = header.key_bytes as usize;
    let mut slot_key = Zeroizing::new(vec![0u8; key_bytes]);
    header
        .hash
        .pbkdf2(passphrase, &s.salt, s.iterations, &mut slot_key);
    let (len, padded) = material_len(key_bytes, s.stripes);
    let mut material = Zeroizing::new(vec![0u8; padded]);
    storage
        .read_at(&mut material, base + s.key_offset as u64 * SECTOR)
        .map_err(|e| Error::io("Failed to read LUKS key material", e))?;
    SectorCrypt::new(header.spec, &slot_key)?.decrypt(0, &mut material)?;
    let key = afsplit::merge(header.hash, &material[..len], key_bytes, s.stripes as usize);
    let mut digest = [0u8; DIGEST_LEN];
    header
        .hash
        .pbkdf2(&key, &header.mk_salt, header.mk_iterations, &mut digest);
    Ok((digest == header.mk_digest).then_some(key))
}

/// Unlocks the header at `base` in `storage` with `passphrase`: the payload's sector cipher.
pub fn unlock(
    header: &Header,
    storage: &dyn Storage,
    base: u64,
    passphrase: &[u8],
) -> Result<Box<dyn SectorCipher>> {
    let (_, key) = unlock_master_key(header, storage, base, passphrase)?;
    header.spec.keyed(&key)
}

fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::io(
            "Unable to read random bytes",
            std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })
}

/// This thread's CPU time in milliseconds (what qemu times PBKDF2 with).
fn thread_cpu_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given, which is a valid local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// PBKDF2 iterations per second of CPU time for an output of `out_len` bytes with `hash`.
///
/// PBKDF2 runs its iterations once per block of the hash's output size, so the rate for one
/// block, measured once per hash in a process ([`count_block_iters`]), divided by the number
/// of blocks gives the rate for any length. qemu measures again for each header and each slot
/// (half a second or more each time); measuring once makes a new header and each new slot
/// that much faster to make, with the same counts.
fn count_iters(hash: HashAlg, key: &[u8], salt: &[u8], out_len: usize) -> u64 {
    static RATES: std::sync::Mutex<Vec<(HashAlg, u64)>> = std::sync::Mutex::new(Vec::new());
    let known = RATES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(h, _)| *h == hash)
        .map(|&(_, r)| r);
    let rate = match known {
        Some(r) => r,
        None => {
            let r = count_block_iters(hash, key, salt, hash.digest_len());
            RATES
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((hash, r));
            r
        }
    };
    rate / out_len.div_ceil(hash.digest_len()).max(1) as u64
}

/// PBKDF2 iterations per second of CPU time for this input, measured as qemu's
/// `qcrypto_pbkdf2_count_iters` does: from 2^15 iterations, ten times more while a run takes
/// under 100 ms, scaled to a second while under 500 ms, until a run takes more than 500 ms.
fn count_block_iters(hash: HashAlg, key: &[u8], salt: &[u8], out_len: usize) -> u64 {
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let mut iterations: u64 = 1 << 15;
    loop {
        let start = thread_cpu_ms();
        hash.pbkdf2(key, salt, iterations.min(u32::MAX as u64) as u32, &mut out);
        let delta = thread_cpu_ms().saturating_sub(start);
        if delta > 500 {
            return iterations * 1000 / delta;
        } else if delta < 100 {
            iterations *= 10;
        } else {
            iterations = iterations * 1000 / delta;
        }
    }
}

/// Scales a per-second rate to `iter_time_ms`, as qemu does, refusing what does not fit.
fn scale(iters: u64, iter_time_ms: u64, divide: u64) -> Result<u32> {
    if iter_time_ms > 0 && iters > u64::MAX / iter_time_ms {
        return Err(Error::invalid_input(format!(
            "PBKDF iterations {iters} too large to scale: Numerical result out of range"
        )));
    }
    let n = iters * iter_time_ms / 1000 / divide;
    u32::try_from(n).map_err(|_| {
        Error::invalid_input(format!(
            "PBKDF iterations {n} larger than {}: Numerical result out of range",
            u32::MAX
        ))
    })
}

/// A random version-4 UUID in the usual text form.
fn new_uuid() -> Result<[u8; 40]> {
    let mut r = [0u8; 16];
    random(&mut r)?;
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    let mut u = [0u8; 40];
    u[..36].copy_from_slice(text.as_bytes());
    Ok(u)
}

/// The bytes a new header with `spec` takes, key slots included: the payload offset that
/// [`create`] gives it (8 slots of `spec.key_len() * 4000` bytes of key material, each from a
/// 4 KiB boundary, after the 4 KiB of the header sector area).
pub fn header_len(spec: &CipherSpec) -> u64 {
    let area = key_material_sectors(spec.key_len() as u32, header::STRIPES);
    (KEY_SLOT_SECTORS as u64 + area * NUM_SLOTS as u64) * SECTOR
}

/// Writes a new LUKS1 header with `passphrase` in slot 0 at `base` in `storage`, as qemu's
/// `qcrypto_block_luks_create` makes it (random master key, iteration counts timed, slot key
/// material at 4 KiB-aligned offsets from sector 8, the payload after the eighth slot's area).
/// Returns the header's length (the payload offset in bytes) and the payload's sector cipher.
///
/// Unlike qemu 10.0.2, which aborts on an assertion there, ciphers with 192-bit keys work: their
/// key material (24 x 4000 bytes) is not a whole number of sectors and is padded to one, as
/// cryptsetup does.
pub fn create(
    params: &CreateParams,
    storage: &dyn Storage,
    base: u64,
    passphrase: &[u8],
) -> Result<(u64, Box<dyn SectorCipher>)> {
    let spec = params.spec;
    spec.validate()?;
    let hash = params.hash;
    let key_bytes = spec.key_len();
    let mut mk_salt = [0u8; SALT_LEN];
    random(&mut mk_salt)?;
    let mut master = Zeroizing::new(vec![0u8; key_bytes]);
    random(&mut master)?;
    let data_cipher = spec.keyed(&master)?;

    let rate = count_iters(hash, &master, &mk_salt, DIGEST_LEN);
    let mk_iterations = scale(rate, params.iter_time_ms, 8)?.max(1000);
    let mut mk_digest = [0u8; DIGEST_LEN];
    hash.pbkdf2(&master, &mk_salt, mk_iterations, &mut mk_digest);

    let area = key_material_sectors(key_bytes as u32, header::STRIPES);
    let slots: [Slot; NUM_SLOTS] = std::array::from_fn(|i| Slot {
        active: header::SLOT_DISABLED,
        iterations: 0,
        salt: [0u8; SALT_LEN],
        key_offset: (KEY_SLOT_SECTORS as u64 + area * i as u64) as u32,
        stripes: header::STRIPES,
    });
    let payload_offset = (header_len(&spec) / SECTOR) as u32;

    let cipher_mode = match spec.ivgen_hash {
        Some(h) => format!("{}-{}:{}", spec.mode.name(), spec.ivgen.name(), h.name()),
        None => format!("{}-{}", spec.mode.name(), spec.ivgen.name()),
    };
    let mut h = Header {
        cipher_name: spec.alg.family().to_string(),
        cipher_mode,
        hash_spec: hash.name().to_string(),
        payload_offset,
        key_bytes: key_bytes as u32,
        mk_digest,
        mk_salt,
        mk_iterations,
        uuid: new_uuid()?,
        slots,
        spec,
        hash,
    };
    store_key(
        &mut h,
        0,
        passphrase,
        &master,
        params.iter_time_ms,
        storage,
        base,
    )?;
    Ok((h.payload_offset_bytes(), data_cipher))
}

/// Puts `master` into slot `idx` under `passphrase` (qemu's `qcrypto_block_luks_store_key`):
/// a new salt, iterations timed for `iter_time_ms`, the key split into the slot's stripes and
/// encrypted with the passphrase's key; the key material is written, then the header.
pub fn store_key(
    header: &mut Header,
    idx: usize,
    passphrase: &[u8],
    master: &[u8],
    iter_time_ms: u64,
    storage: &dyn Storage,
    base: u64,
) -> Result<()> {
    let hash = header.hash;
    let key_bytes = header.key_bytes as usize;
    let stripes = header.slots[idx].stripes as usize;
    let mut salt = [0u8; SALT_LEN];
    random(&mut salt)?;
    let rate = count_iters(hash, passphrase, &salt, key_bytes);
    let iterations = scale(rate, iter_time_ms, 1)?.max(1000);
    let mut slot_key = Zeroizing::new(vec![0u8; key_bytes]);
    hash.pbkdf2(passphrase, &salt, iterations, &mut slot_key);
    let mut noise = Zeroizing::new(vec![0u8; (stripes - 1) * key_bytes]);
    random(&mut noise)?;
    let split = afsplit::split(hash, master, stripes, &noise);
    let (_, padded) = material_len(key_bytes, stripes as u32);
    let mut material = Zeroizing::new(vec![0u8; padded]);
    material[..split.len()].copy_from_slice(&split);
    SectorCrypt::new(header.spec, &slot_key)?.encrypt(0, &mut material)?;
    storage
        .write_at(
            &material,
            base + header.slots[idx].key_offset as u64 * SECTOR,
        )
        .map_err(|e| Error::io("Failed to write LUKS key material", e))?;
    let s = &mut header.slots[idx];
    s.active = header::SLOT_ENABLED;
    s.iterations = iterations;
    s.salt = salt;
    header.write(storage, base)
}

/// Empties slot `idx` (qemu's `qcrypto_block_luks_erase_key`): the header first (inactive, no
/// salt, no iterations), then random bytes over its key material.
pub fn erase_key(header: &mut Header, idx: usize, storage: &dyn Storage, base: u64) -> Result<()> {
    let s = &mut header.slots[idx];
    s.active = header::SLOT_DISABLED;
    s.iterations = 0;
    s.salt = [0u8; SALT_LEN];
    header.write(storage, base)?;
    let (len, _) = material_len(header.key_bytes as usize, header.slots[idx].stripes);
    let mut garbage = vec![0u8; len];
    random(&mut garbage)?;
    storage
        .write_at(
            &garbage,
            base + header.slots[idx].key_offset as u64 * SECTOR,
        )
        .map_err(|e| Error::io("Failed to erase LUKS key material", e))
}

/// A key slot change (`amend -o state=...,keyslot=...,new-secret=...,old-secret=...,
/// iter-time=...`; qemu's `QCryptoBlockAmendOptionsLUKS`). Secrets are named by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendRequest {
    /// `state`: `Some(true)` active (add a key), `Some(false)` inactive (erase keys).
    pub state: Option<bool>,
    /// `keyslot`.
    pub keyslot: Option<i64>,
    /// `old-secret`: erase the slots this passphrase opens.
    pub old_secret: Option<String>,
    /// `new-secret`: the passphrase of the new key slot.
    pub new_secret: Option<String>,
    /// `iter-time` for the new slot.
    pub iter_time: Option<u64>,
    /// `secret`: the passphrase that unlocks the master key for a new slot (default: the one
    /// the image was opened with).
    pub secret: Option<String>,
}

impl AmendRequest {
    /// Takes one option by its name without prefix: `Ok(false)` if `key` is not one of these.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        let number =
            |what: &str| Error::invalid_input(format!("Parameter '{what}' expects a number"));
        match key {
            "state" => {
                self.state = Some(match value {
                    "active" => true,
                    "inactive" => false,
                    _ => {
                        return Err(Error::invalid_input(format!(
                            "Parameter 'state' does not accept value '{value}'"
                        )))
                    }
                })
            }
            "keyslot" => self.keyslot = Some(value.parse().map_err(|_| number(key))?),
            "old-secret" => self.old_secret = Some(value.to_string()),
            "new-secret" => self.new_secret = Some(value.to_string()),
            "iter-time" => self.iter_time = Some(value.parse().map_err(|_| number(key))?),
            "secret" => self.secret = Some(value.to_string()),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Whether nothing was asked.
    pub fn is_empty(&self) -> bool {
        *self == AmendRequest::default()
    }
}

/// The passphrase in the secret `id` of `secrets` (the command line's `--object secret`s), as
/// qemu looks it up (`No secret with id 'ID'`, then [`check_passphrase`]).
pub fn secret_passphrase(secrets: &Secrets, id: &str) -> Result<Zeroizing<Vec<u8>>> {
    let data = secrets
        .get(id)
        .ok_or_else(|| Error::invalid_input(format!("No secret with id '{id}'")))?;
    Ok(Zeroizing::new(check_passphrase(id, data)?.to_vec()))
}

/// Applies `req` to the header at `base` in `storage` (qemu's `qcrypto_block_luks_amend_*`,
/// with its checks and words). `current` is the passphrase the image was opened with; `force`
/// allows overwriting an active slot and erasing the last one. Every check comes before the
/// first write. The secrets `req` names are looked up in `secrets`.
pub fn amend(
    header: &mut Header,
    storage: &dyn Storage,
    base: u64,
    current: Option<&[u8]>,
    req: &AmendRequest,
    force: bool,
    secrets: &Secrets,
) -> Result<()> {
    let bad = |m: String| Err(Error::invalid_input(m));
    let max = NUM_SLOTS as i64 - 1;
    let active_count = header.slots.iter().filter(|s| s.is_active()).count();
    match req.state {
        None => bad("Parameter 'state' is missing".into()),
        Some(true) => {
            let Some(new_id) = &req.new_secret else {
                return bad("'new-secret' is required to activate a keyslot".into());
            };
            if req.old_secret.is_some() {
                return bad("'old-secret' must not be given when activating keyslots".into());
            }
            let idx = match req.keyslot {
                Some(k) if !(0..=max).contains(&k) => {
                    return bad(format!(
                        "Invalid keyslot {} specified, must be between 0 and {max}",
                        k as u32
                    ))
                }
                Some(k) => k as usize,
                None => match header.slots.iter().position(|s| !s.is_active()) {
                    Some(i) => i,
                    None => return bad("Can't add a keyslot - all keyslots are in use".into()),
                },
            };
            if !force && header.slots[idx].is_active() {
                return bad(format!(
                    "Refusing to overwrite active keyslot {idx} - please erase it first"
                ));
            }
            let old = match &req.secret {
                Some(id) => secret_passphrase(secrets, id)?,
                None => Zeroizing::new(current.unwrap_or_default().to_vec()),
            };
            let (_, master) = unlock_master_key(header, storage, base, &old)?;
            let new = secret_passphrase(secrets, new_id)?;
            let iter_time = req
                .iter_time
                .unwrap_or(CreateParams::default().iter_time_ms);
            store_key(header, idx, &new, &master, iter_time, storage, base)
        }
        Some(false) => {
            if req.new_secret.is_some() {
                return bad("'new-secret' must not be given when erasing keyslots".into());
            }
            if req.iter_time.is_some() {
                return bad("'iter-time' must not be given when erasing keyslots".into());
            }
            if req.secret.is_some() {
                return bad("'secret' must not be given when erasing keyslots".into());
            }
            let old = req
                .old_secret
                .as_deref()
                .map(|id| secret_passphrase(secrets, id))
                .transpose()?;
            if let Some(k) = req.keyslot {
                if !(0..=max).contains(&k) {
                    return bad(format!(
                        "Invalid keyslot {k} specified, must be between 0 and {max}"
                    ));
                }
                let idx = k as usize;
                if let Some(old) = &old {
                    let opens = header.slots[idx].is_active()
                        && try_slot(header, &header.slots[idx], storage, base, old)?.is_some();
                    if !opens {
                        return bad(format!(
                            "Given keyslot {idx} doesn't contain the given old password for \
                             erase operation"
                        ));
                    }
                }
                if !force && !header.slots[idx].is_active() {
                    return bad(format!("Given keyslot {idx} is already erased (inactive) "));
                }
                if !force && active_count == 1 {
                    return bad(format!(
                        "Attempt to erase the only active keyslot {idx} which will erase all \
                         the data in the image irreversibly - refusing operation"
                    ));
                }
                erase_key(header, idx, storage, base)
            } else if let Some(old) = &old {
                let mut matching = Vec::new();
                for i in 0..NUM_SLOTS {
                    let s = header.slots[i].clone();
                    if s.is_active() && try_slot(header, &s, storage, base, old)?.is_some() {
                        matching.push(i);
                    }
                }
                if matching.is_empty() {
                    return bad("No keyslots match given (old) password for erase operation".into());
                }
                if !force && matching.len() == active_count {
                    return bad("All the active keyslots match the (old) password that was \
                                given and erasing them will erase all the data in the image \
                                irreversibly - refusing operation"
                        .into());
                }
                for i in matching {
                    erase_key(header, i, storage, base)?;
                }
                Ok(())
            } else {
                bad(
                    "To erase keyslot(s), either explicit keyslot index or the password \
                     currently contained in them must be given"
                        .into(),
                )
            }
        }
    }
}

/// What the `luks_header` fuzz target runs on one input (and tests/hostile replays): `data`'s
/// first 592 bytes (zero-padded) parsed as a header; one that parses must write back to itself
/// and give its info, and, when its iteration counts are small, be unlocked against `data` as
/// storage, ending in a cipher or one error (never a panic or an unbounded allocation).
pub fn exercise(data: &[u8]) {
    let mut b = [0u8; header::HEADER_LEN];
    let n = data.len().min(header::HEADER_LEN);
    b[..n].copy_from_slice(&data[..n]);
    let Ok(h) = Header::parse(&b) else { return };
    assert_eq!(Header::parse(&h.to_bytes()).ok().as_ref(), Some(&h));
    let _ = h.info();
    if h.mk_iterations <= 16 && h.slots.iter().all(|s| s.iterations <= 16) {
        let storage = crate::storage::MemStorage::new(data.to_vec());
        let _ = unlock(&h, &storage, 0, b"x");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn fast(spec: CipherSpec, hash: HashAlg) -> CreateParams {
        CreateParams {
            spec,
            hash,
            iter_time_ms: 1,
        }
    }

    #[test]
    fn create_then_unlock_and_refuse_a_wrong_passphrase() {
        let mut spec = CreateParams::default().spec;
        spec.alg = CipherAlg::Aes192; // the case qemu 10.0.2 aborts on
        let s = MemStorage::default();
        let (len, c) = create(&fast(spec, HashAlg::Sha1), &s, 4096, b"pw").unwrap();
        assert_eq!(len, 512 * (8 + 8 * 376));
        let h = Header::read(&s, 4096).unwrap();
        assert_eq!(h.spec, spec);
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
        let info = h.info();
        assert_eq!(info.cipher_alg, "aes-192");
        assert_eq!(info.slots[0].key_offset, 4096);
        assert_eq!(info.slots[1].key_offset, 4096 + 376 * 512);
        assert!(info.slots[0].active && !info.slots[1].active);
        let c2 = unlock(&h, &s, 4096, b"pw").unwrap();
        let mut a = vec![7u8; 1024];
        let mut b = a.clone();
        c.encrypt(3, &mut a).unwrap();
        c2.encrypt(3, &mut b).unwrap();
        assert_eq!(a, b);
        let e = unlock(&h, &s, 4096, b"pW").unwrap_err();
        assert_eq!(e.to_string(), WRONG_PASSPHRASE);
    }

    #[test]
    fn hostile_counts_and_offsets_are_refused_before_work() {
        let s = MemStorage::default();
        create(
            &fast(CreateParams::default().spec, HashAlg::Sha256),
            &s,
            0,
            b"pw",
        )
        .unwrap();
        let good = Header::read(&s, 0).unwrap();
        let mut h = good.clone();
        h.slots[0].iterations = u32::MAX;
        let t = std::time::Instant::now();
        let e = unlock(&h, &s, 0, b"pw").unwrap_err();
        assert!(e.what().contains("Keyslot 0 iteration count"), "{e}");
        h = good.clone();
        h.mk_iterations = u32::MAX;
        assert!(unlock(&h, &s, 0, b"pw").is_err());
        assert!(t.elapsed().as_secs() < 2);
        // Key material past the end: the payload area was never written.
        s.set_len(4096 + 1000).unwrap();
        let e = unlock(&good, &s, 0, b"pw").unwrap_err();
        assert!(e.what().contains("lies past the end of the file"), "{e}");

        let bytes = good.to_bytes();
        let cases: &[(usize, &[u8], &str)] = &[
            (0, b"LUKX", "Volume is not in LUKS format"),
            (6, &[0, 2], "LUKS version 2 is not supported"),
            (
                8,
                &[b'a'; 32],
                "LUKS header cipher name is not NUL terminated",
            ),
            (
                8,
                b"des\0",
                "Algorithm 'des' with key size 32 bytes not supported",
            ),
            (40, b"xts\0", "Unexpected cipher mode string format 'xts'"),
            (40, b"gcm-plain64\0", "Cipher mode 'gcm' not supported"),
            (40, b"xts-foo\0", "IV generator 'foo' not supported"),
            (
                40,
                b"xts-essiv\0\0\0\0",
                "Missing IV generator hash specification",
            ),
            (72, b"sha3\0\0", "Hash algorithm 'sha3' not supported"),
            (
                104,
                &[0, 0, 0, 7],
                "LUKS payload is overlapping with the header",
            ),
            (
                104,
                &[0, 0, 0, 100],
                "Keyslot 0 is overlapping with the encrypted payload",
            ),
            (
                108,
                &[0, 0, 0, 24],
                "Algorithm 'aes' with key size 12 bytes not supported",
            ),
            (164, &[0, 0, 0, 0], "LUKS key iteration count is zero"),
            (
                208,
                &[0, 0, 0, 1],
                "Keyslot 0 state (active/disable) is corrupted",
            ),
            (212, &[0, 0, 0, 0], "Keyslot 0 iteration count is zero"),
            (
                248,
                &[0, 0, 0, 1],
                "Keyslot 0 is overlapping with the LUKS header",
            ),
            (
                248 + 48,
                &[0, 0, 0, 9],
                "Keyslots 0 and 1 are overlapping in the header",
            ),
            (
                252,
                &[0xff, 0xff, 0xff, 0xff],
                "Keyslot 0 is corrupted (stripes -1 != 4000)",
            ),
        ];
        for (at, patch, want) in cases {
            let mut b = bytes;
            b[*at..*at + patch.len()].copy_from_slice(patch);
            let e = Header::parse(&b).unwrap_err();
            assert_eq!(e.what(), *want);
        }
    }

    #[test]
    fn amend_adds_and_erases_slots_with_qemus_checks() {
        let secrets = crate::secret::Secrets::from_objects(&[
            "secret,id=amend-a,data=aaa",
            "secret,id=amend-b,data=bbb",
        ])
        .unwrap();
        let s = MemStorage::default();
        create(
            &fast(CreateParams::default().spec, HashAlg::Sha1),
            &s,
            0,
            b"aaa",
        )
        .unwrap();
        let mut h = Header::read(&s, 0).unwrap();
        let req = |o: &str| {
            let mut r = AmendRequest::default();
            for item in o.split(',') {
                let (k, v) = item.split_once('=').unwrap();
                assert!(r.set(k, v).unwrap());
            }
            r
        };
        let err = |h: &mut Header, o: &str, force: bool| {
            amend(h, &s, 0, Some(b"aaa"), &req(o), force, &secrets)
                .unwrap_err()
                .what()
                .to_string()
        };
        assert_eq!(
            err(&mut h, "state=active,new-secret=amend-b,keyslot=0", false),
            "Refusing to overwrite active keyslot 0 - please erase it first"
        );
        assert_eq!(
            err(&mut h, "state=active", false),
            "'new-secret' is required to activate a keyslot"
        );
        assert_eq!(
            err(&mut h, "state=inactive,keyslot=0", false),
            "Attempt to erase the only active keyslot 0 which will erase all the data in the \
             image irreversibly - refusing operation"
        );
        assert_eq!(Header::read(&s, 0).unwrap(), h, "a refused amend wrote");
        amend(
            &mut h,
            &s,
            0,
            Some(b"aaa"),
            &req("state=active,new-secret=amend-b,iter-time=1"),
            false,
            &secrets,
        )
        .unwrap();
        assert!(h.slots[1].is_active());
        assert_eq!(unlock_master_key(&h, &s, 0, b"bbb").unwrap().0, 1);
        amend(
            &mut h,
            &s,
            0,
            None,
            &req("state=inactive,old-secret=amend-a"),
            false,
            &secrets,
        )
        .unwrap();
        let h2 = Header::read(&s, 0).unwrap();
        assert!(!h2.slots[0].is_active() && h2.slots[1].is_active());
        assert!(unlock_master_key(&h2, &s, 0, b"aaa").is_err());
        assert_eq!(
            err(&mut h, "state=inactive,old-secret=amend-a", false),
            "No keyslots match given (old) password for erase operation"
        );
    }

    #[test]
    fn passphrases_must_be_utf8_without_nul() {
        assert!(check_passphrase("s", b"ok").is_ok());
        let e = check_passphrase("s", b"a\0b").unwrap_err();
        assert_eq!(e.what(), "Data from secret s is not valid UTF-8");
        assert!(check_passphrase("s", &[0xff]).is_err());
    }
}
