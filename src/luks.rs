//! Raw LUKS images (`-f luks`, qemu's `block/crypto.c`): a LUKS1 header at the start of the
//! file, the guest disk encrypted after it from the payload offset on. The IV of a sector is its
//! guest offset / 512.
//!
//! The key comes from `--object secret,id=ID,...` named by `key-secret=ID` (an `--image-opts`
//! or `json:` option of the image, or a create option). `info` opens the image without it, as
//! qemu-img does (the header's details need no key); everything that reads or writes the disk
//! needs it.

use crate::block::{check_request, BlockImage, BlockStatus, FormatDriver, ImageFormat, ProbeInput};
use crate::chain::{ChainGuard, Sharing};
use crate::crypto::luks::{create, unlock, CreateOptionValues, CreateParams, Header};
use crate::crypto::{SectorCipher, SECTOR};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::info::{FormatSpecific, LayerInfo};
use crate::lock::LockRequest;
use crate::offsets::GuestOffset;
use crate::opener::Opener;
use crate::option_desc::{OptDesc, OptType};
use crate::prealloc::Preallocation;
use crate::storage::Storage;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroizing;

/// The raw LUKS format's driver.
pub struct LuksDriver;

/// This format's handle.
const LUKS: ImageFormat = ImageFormat::of(&LuksDriver);

/// How much is encrypted or decrypted at a time (bounds the bounce buffers).
const CHUNK: u64 = 1 << 20;

/// The image option naming the secret (`key-secret=ID`).
pub const KEY_SECRET: &str = "key-secret";

/// The passphrase in the secret `id` of `opener`'s secrets, checked as qemu checks it (`No
/// secret with id 'ID'`).
pub fn passphrase(opener: &Opener, id: &str) -> Result<Zeroizing<Vec<u8>>> {
    crate::crypto::luks::secret_passphrase(&opener.secrets(), id)
}

fn required_secret() -> Error {
    Error::invalid_input(format!("Parameter '{KEY_SECRET}' is required for cipher"))
}

/// The options of `create -o`, as qemu's luks driver describes them (`detached-header` is
/// refused when given: vimg makes no detached headers).
pub const CREATE_OPTIONS: &[OptDesc] = &[
    OptDesc::new(
        "cipher-alg",
        OptType::Str,
        "Name of encryption cipher algorithm",
    ),
    OptDesc::new(
        "cipher-mode",
        OptType::Str,
        "Name of encryption cipher mode",
    ),
    OptDesc::new(
        "detached-header",
        OptType::Bool,
        "Create a detached LUKS header",
    ),
    OptDesc::new(
        "hash-alg",
        OptType::Str,
        "Name of encryption hash algorithm",
    ),
    OptDesc::new(
        "iter-time",
        OptType::Num,
        "Time to spend in PBKDF in milliseconds",
    ),
    OptDesc::new("ivgen-alg", OptType::Str, "Name of IV generator algorithm"),
    OptDesc::new(
        "ivgen-hash-alg",
        OptType::Str,
        "Name of IV generator hash algorithm",
    ),
    OptDesc::new(
        "key-secret",
        OptType::Str,
        "ID of the secret that provides the keyslot passphrase",
    ),
    crate::option_desc::SIZE,
];

/// The options of `amend -o`, as qemu's luks driver describes them.
pub const AMEND_OPTIONS: &[OptDesc] = &[
    OptDesc::new(
        "iter-time",
        OptType::Num,
        "Time to spend in PBKDF in milliseconds",
    ),
    OptDesc::new(
        "keyslot",
        OptType::Num,
        "Select a single keyslot to modify explicitly",
    ),
    OptDesc::new(
        "new-secret",
        OptType::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    OptDesc::new(
        "old-secret",
        OptType::Str,
        "Select all keyslots that match this password",
    ),
    OptDesc::new(
        "state",
        OptType::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
];

impl FormatDriver for LuksDriver {
    fn name(&self) -> &'static str {
        "luks"
    }

    /// Certain for a LUKS1 header (magic and version 1), as qemu's probe.
    fn probe(&self, input: &ProbeInput<'_>) -> u32 {
        if Header::probe(input.head) {
            100
        } else {
            0
        }
    }

    /// As for raw images.
    fn lock_request(&self, sharing: Sharing, writable: bool, top: bool) -> LockRequest {
        crate::raw::RawDriver.lock_request(sharing, writable, top)
    }

    fn open(
        &self,
        path: &Path,
        writable: bool,
        _no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Box<dyn BlockImage>> {
        let locks = LUKS
            .locks(guard.sharing(), writable, guard.depth() == 1)
            .map_err(|e| e.with_path(path))?;
        let opener = guard.opener();
        let storage = opener
            .open(path, writable, locks)
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
        let secret = opener.image_option(path, KEY_SECRET);
        // qemu-img info opens without I/O: it neither needs nor checks the key.
        let key = match (secret, opener.metadata_only() && !writable) {
            (_, true) => None,
            (Some(id), false) => {
                Some(passphrase(opener, &id).map_err(|e| e.while_opening().with_path(path))?)
            }
            (None, false) => return Err(required_secret().while_opening().with_path(path)),
        };
        let mut image = LuksImage::open(storage, path, writable, key.as_deref().map(|k| &k[..]))?;
        image.passphrase = key;
        image.force = opener.force();
        image.secrets = opener.secrets();
        Ok(Box::new(image))
    }

    fn amend_option_help(&self) -> Option<&'static [OptDesc]> {
        Some(AMEND_OPTIONS)
    }

    fn create_option_help(&self) -> &'static [OptDesc] {
        CREATE_OPTIONS
    }

    fn prepare_create(
        &self,
        command: &crate::creation::CreateCommand<'_>,
    ) -> Result<Box<dyn crate::creation::FormatCreation>> {
        let path = command.path;
        let mut opts = LuksOptions::parse(command.options).in_file(path)?;
        let twice = command.size.is_some() && opts.size.is_some();
        let size = command.size_without_backing("luks", opts.size)?;
        if twice {
            return Err(Error::invalid_input(
                "the image size must be given only once (SIZE or -o size)",
            )
            .with_path(path));
        }
        opts.size = Some(size);
        Ok(Box::new(LuksCreation {
            path: path.to_path_buf(),
            opts,
            opener: command.opener.clone(),
        }))
    }

    /// The header (which depends on the key length) plus the disk, all of it allocated.
    fn measure(
        &self,
        options: &[String],
        size: Option<u64>,
        source: Option<&dyn BlockImage>,
        secrets: &crate::secret::Secrets,
    ) -> Result<crate::creation::Measurement> {
        let opts = LuksOptions::parse(options)?;
        let (params, id) = opts.params()?;
        // qemu makes a header in memory to measure it, which needs the passphrase.
        let id = id.ok_or_else(required_secret)?;
        crate::crypto::luks::secret_passphrase(secrets, id)?;
        let size = match (source, size.or(opts.size)) {
            (Some(s), _) => s.virtual_size(),
            (None, Some(n)) => n,
            (None, None) => {
                return Err(Error::invalid_input(
                    "Either --size N or one filename must be specified.",
                ))
            }
        };
        let total = header_len(&params) + size.next_multiple_of(SECTOR);
        Ok(crate::creation::Measurement {
            required: total,
            fully_allocated: total,
            bitmaps: None,
        })
    }

    /// The option list as qemu-img reads it first (unknown keys, malformed sizes); the
    /// values of the cipher options are checked when the image is made.
    fn check_target_options(&self, options: &[String]) -> Result<()> {
        LuksOptions::parse(options).map(|_| ())
    }

    fn target_takes_options(&self) -> bool {
        true
    }

    fn create_target(
        &self,
        path: &Path,
        size: u64,
        options: &[String],
        _backing: (Option<String>, Option<String>),
        _no_backing: bool,
        opener: &Opener,
    ) -> Result<Box<dyn BlockImage>> {
        let mut opts = LuksOptions::parse(options).in_file(path)?;
        opts.size = Some(size);
        let storage = create_image(opener, path, &opts)?;
        let key = passphrase(opener, opts.key_secret.as_deref().unwrap_or_default())?;
        Ok(Box::new(LuksImage::open(storage, path, true, Some(&key))?))
    }
}

/// The bytes the header of a new image with `params` takes (the payload offset).
fn header_len(params: &CreateParams) -> u64 {
    crate::crypto::luks::header_len(&params.spec)
}

/// The `-o` options of a new LUKS image, as given (checked when the image is made, as qemu
/// checks them after its "Formatting" line).
#[derive(Debug, Clone, Default)]
pub struct LuksOptions {
    /// `size`.
    pub size: Option<u64>,
    /// `key-secret`.
    pub key_secret: Option<String>,
    /// The header's options (`cipher-alg`, ..., `iter-time`).
    pub values: CreateOptionValues,
    /// `preallocation`.
    pub preallocation: Option<Preallocation>,
}

impl LuksOptions {
    /// Parses `-o` arguments (later ones win); unknown keys and malformed numbers are refused
    /// in qemu's words.
    pub fn parse(options: &[String]) -> Result<Self> {
        let mut o = LuksOptions::default();
        for arg in options {
            for item in crate::option_list::split(arg)? {
                let (k, v) = crate::option_list::key_value(&item);
                if k == "size" {
                    o.size = Some(crate::option_list::size(k, v)?);
                } else if !o.set(k, v)? {
                    return Err(crate::option_list::invalid_parameter(k));
                }
            }
        }
        Ok(o)
    }

    /// Takes one LUKS option by its name without prefix (`cipher-alg`, as qcow2's
    /// `encrypt.cipher-alg` names it after `encrypt.`): `Ok(false)` if `key` is not one, an
    /// error for a malformed number or a detached header.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "key-secret" => self.key_secret = Some(value.to_string()),
            "preallocation" => self.preallocation = Some(Preallocation::from_name(value)?),
            "detached-header" => {
                return Err(Error::unsupported(
                    "detached LUKS headers are not supported by vimg",
                ))
            }
            _ => return self.values.set(key, value, key),
        }
        Ok(true)
    }

    /// The header parameters and the secret's id, or qemu's refusal of a value (the
    /// combination unchecked).
    pub fn parsed(&self) -> Result<(CreateParams, Option<&str>)> {
        Ok((self.values.params()?, self.key_secret.as_deref()))
    }

    /// [`LuksOptions::parsed`], the combination checked too (qemu's words).
    pub fn params(&self) -> Result<(CreateParams, Option<&str>)> {
        let r = self.parsed()?;
        r.0.spec.validate()?;
        Ok(r)
    }
}

/// Creates the LUKS image `opts` describe at `path`: the header with the key of the secret
/// `key-secret` names, then the (encrypted, unwritten) disk. A failed create removes the file.
fn create_image(opener: &Opener, path: &Path, opts: &LuksOptions) -> Result<Box<dyn Storage>> {
    // A value qemu cannot parse leaves an existing file alone; any later failure removes the
    // file, which qemu has created (truncated) by then.
    let (params, secret) = opts.parsed().in_file(path)?;
    let size = opts.size.unwrap_or(0);
    let prealloc = opts.preallocation.unwrap_or_default();
    let storage = opener
        .create(path)
        .map_err(|e| Error::io("cannot create image", e).with_path(path))?;
    let r = (|| {
        // qemu's order: the secret, then the cipher.
        let id = secret.ok_or_else(required_secret)?;
        let key = passphrase(opener, id)?;
        params.spec.validate()?;
        if prealloc == Preallocation::Metadata {
            return Err(Error::invalid_input(
                "Unsupported preallocation mode: metadata",
            ));
        }
        let (len, _) = create(&params, storage.as_ref(), 0, &key)?;
        crate::prealloc::grow_file(storage.as_ref(), path, len + size, prealloc)?;
        storage
            .set_len(len + size)
            .and_then(|_| storage.flush())
            .map_err(|e| Error::io("cannot set image size", e))
    })()
    .in_file(path);
    match r {
        Ok(()) => Ok(storage),
        Err(e) => {
            drop(storage);
            opener.remove_failed_output(path);
            Err(e)
        }
    }
}

/// A checked `create -f luks` request.
#[derive(Debug)]
struct LuksCreation {
    path: PathBuf,
    opts: LuksOptions,
    opener: Opener,
}

impl crate::creation::FormatCreation for LuksCreation {
    /// `Formatting 'x.luks', fmt=luks size=N key-secret=... cipher-alg=...`: the options given,
    /// in qemu's order.
    fn formatting_line(&self) -> String {
        let o = &self.opts;
        let mut s = format!(
            "Formatting '{}', fmt=luks size={}",
            self.path.display(),
            o.size.unwrap_or(0)
        );
        let text = [
            ("key-secret", &o.key_secret),
            ("cipher-alg", &o.values.cipher_alg),
            ("cipher-mode", &o.values.cipher_mode),
            ("ivgen-alg", &o.values.ivgen_alg),
            ("ivgen-hash-alg", &o.values.ivgen_hash_alg),
            ("hash-alg", &o.values.hash_alg),
        ];
        for (k, v) in text {
            if let Some(v) = v {
                s.push_str(&format!(" {k}={v}"));
            }
        }
        if let Some(t) = o.values.iter_time {
            s.push_str(&format!(" iter-time={t}"));
        }
        if let Some(p) = o.preallocation {
            s.push_str(&format!(" preallocation={}", p.as_str()));
        }
        s
    }

    fn execute(&self) -> Result<()> {
        create_image(&self.opener, &self.path, &self.opts).map(|_| ())
    }
}

/// An opened raw LUKS image.
pub struct LuksImage {
    storage: Box<dyn Storage>,
    path: PathBuf,
    writable: bool,
    header: Header,
    /// Where the payload starts in the file.
    payload: u64,
    /// The file's length less the payload offset.
    size: u64,
    /// The payload's cipher; `None` when opened without a key (info only).
    cipher: Option<Box<dyn SectorCipher>>,
    unsafe_cache: AtomicBool,
    /// The passphrase it was opened with (a new key slot's master key comes from it).
    passphrase: Option<Zeroizing<Vec<u8>>>,
    /// `amend --force`.
    force: bool,
    /// The command line's secrets, which an amend's `new-secret` and `old-secret` name.
    secrets: std::sync::Arc<crate::secret::Secrets>,
}

impl LuksImage {
    /// Opens the LUKS image in `storage` (`path` for messages), unlocking it with `passphrase`
    /// if given (without one, only [`BlockImage::layer_info`] works).
    pub fn open(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
        passphrase: Option<&[u8]>,
    ) -> Result<Self> {
        let opening = |e: Error| e.while_opening().with_path(path);
        let header = Header::read(storage.as_ref(), 0).map_err(opening)?;
        let len = storage
            .len()
            .map_err(|e| Error::io("cannot get image size", e).with_path(path))?;
        let payload = header.payload_offset_bytes();
        if payload > len {
            return Err(opening(Error::corrupt(format!(
                "LUKS payload offset {payload} lies past the end of the file ({len} bytes)"
            ))));
        }
        let cipher = match passphrase {
            Some(p) => Some(unlock(&header, storage.as_ref(), 0, p).map_err(opening)?),
            None => None,
        };
        Ok(LuksImage {
            storage,
            path: path.to_path_buf(),
            writable,
            header,
            payload,
            size: len - payload,
            cipher,
            unsafe_cache: AtomicBool::new(false),
            passphrase: passphrase.map(|p| Zeroizing::new(p.to_vec())),
            force: false,
            secrets: Default::default(),
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn cipher(&self) -> Result<&dyn SectorCipher> {
        self.cipher
            .as_deref()
            .ok_or_else(|| required_secret().with_path(&self.path))
    }

    fn writable_check(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only").with_path(&self.path))
        }
    }

    /// Reads and decrypts the whole sectors `[start, start + buf.len())` of the payload.
    fn read_sectors(&self, cipher: &dyn SectorCipher, buf: &mut [u8], start: u64) -> Result<()> {
        self.storage
            .read_at(buf, self.payload + start)
            .map_err(|e| Error::io("read failed", e).with_path(&self.path).at(start))?;
        cipher.decrypt(start / SECTOR, buf).in_file(&self.path)
    }

    /// Encrypts (in place) and writes the whole sectors `buf` at payload offset `start`.
    fn write_sectors(&self, cipher: &dyn SectorCipher, buf: &mut [u8], start: u64) -> Result<()> {
        cipher.encrypt(start / SECTOR, buf).in_file(&self.path)?;
        self.storage
            .write_at(buf, self.payload + start)
            .map_err(|e| Error::io("write failed", e).with_path(&self.path).at(start))
    }

    /// Writes `len` bytes at `offset`, taking them from `data` (zeros where `None`): whole
    /// sectors are encrypted from a bounce buffer, partial ones read, decrypted and merged first.
    fn write_range(&self, data: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        let cipher = self.cipher()?;
        let end = offset + len;
        let mut pos = offset / SECTOR * SECTOR;
        let mut bounce = Zeroizing::new(Vec::new());
        while pos < end {
            let chunk_end = (pos + CHUNK).min(end.next_multiple_of(SECTOR));
            let n = (chunk_end - pos) as usize;
            bounce.clear();
            bounce.resize(n, 0);
            let head = offset.max(pos);
            let tail = end.min(chunk_end);
            if head > pos || tail < chunk_end {
                // A partial sector at either end: start from what is there.
                self.read_sectors(cipher, &mut bounce, pos)?;
            }
            let dst = &mut bounce[(head - pos) as usize..(tail - pos) as usize];
            match data {
                Some(d) => {
                    dst.copy_from_slice(&d[(head - offset) as usize..(tail - offset) as usize])
                }
                None => dst.fill(0),
            }
            self.write_sectors(cipher, &mut bounce, pos)?;
            pos = chunk_end;
        }
        Ok(())
    }
}

impl BlockImage for LuksImage {
    fn format(&self) -> ImageFormat {
        LUKS
    }

    fn filename(&self) -> &Path {
        &self.path
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64).in_file(&self.path)?;
        let cipher = self.cipher()?;
        let (offset, end) = (offset.0, offset.0 + buf.len() as u64);
        if offset.is_multiple_of(SECTOR) && (buf.len() as u64).is_multiple_of(SECTOR) {
            for (i, c) in buf.chunks_mut(CHUNK as usize).enumerate() {
                self.read_sectors(cipher, c, offset + i as u64 * CHUNK)?;
            }
            return Ok(());
        }
        let mut pos = offset / SECTOR * SECTOR;
        let mut bounce = Zeroizing::new(Vec::new());
        while pos < end {
            let chunk_end = (pos + CHUNK).min(end.next_multiple_of(SECTOR));
            bounce.clear();
            bounce.resize((chunk_end - pos) as usize, 0);
            self.read_sectors(cipher, &mut bounce, pos)?;
            let (head, tail) = (offset.max(pos), end.min(chunk_end));
            buf[(head - offset) as usize..(tail - offset) as usize]
                .copy_from_slice(&bounce[(head - pos) as usize..(tail - pos) as usize]);
            pos = chunk_end;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        self.writable_check()?;
        check_request(self.size, offset, buf.len() as u64).in_file(&self.path)?;
        self.write_range(Some(buf), offset.0, buf.len() as u64)
    }

    /// Zeros are encrypted like any data: a hole in the file would read as garbage.
    fn write_zeroes(&self, offset: GuestOffset, len: u64, _unmap: bool) -> Result<()> {
        self.writable_check()?;
        check_request(self.size, offset, len).in_file(&self.path)?;
        self.write_range(None, offset.0, len)
    }

    /// Unwritten sectors decrypt to noise.
    fn zero_initialized(&self) -> bool {
        false
    }

    fn flush(&self) -> Result<()> {
        if self.unsafe_cache.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.storage
            .flush()
            .map_err(|e| Error::io("flush failed", e).with_path(&self.path))
    }

    /// Everything is data, as qemu reports it: ciphertext says nothing about zeros.
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        check_request(self.size, offset, max_len.max(1)).in_file(&self.path)?;
        let mut s = BlockStatus::data(max_len.max(1), 0, crate::offsets::HostOffset(0));
        s.offset = None;
        Ok(s)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn set_unsafe_cache(&self, on: bool) {
        self.unsafe_cache.store(on, Ordering::Relaxed);
    }

    fn as_resize(&self) -> Option<&dyn crate::capability::Resize> {
        Some(self)
    }

    fn as_amend(&self) -> Option<&dyn crate::capability::Amend> {
        Some(self)
    }

    fn as_amend_mut(&mut self) -> Option<&mut dyn crate::capability::Amend> {
        Some(self)
    }

    fn as_resize_mut(&mut self) -> Option<&mut dyn crate::capability::Resize> {
        Some(self)
    }

    fn actual_size(&self) -> Option<u64> {
        self.storage.allocated_bytes()
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            filename: self.path.display().to_string(),
            format: LUKS.as_str(),
            virtual_size: self.size,
            actual_size: self.actual_size(),
            cluster_size: None,
            encrypted: Some(true),
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            backing_format_probed: false,
            snapshots: Vec::new(),
            dirty_flag: false,
            format_specific: Some(FormatSpecific::Luks(self.header.info())),
        })
    }
}

/// The key slot options of `amend -o` (qemu's raw LUKS amend options).
fn amend_request(options: &[String]) -> Result<crate::crypto::luks::AmendRequest> {
    let mut req = crate::crypto::luks::AmendRequest::default();
    for arg in options {
        for item in crate::option_list::split(arg)? {
            let (k, v) = crate::option_list::key_value(&item);
            if k == "secret" || !req.set(k, v)? {
                return Err(crate::option_list::invalid_parameter(k));
            }
        }
    }
    Ok(req)
}

impl crate::capability::Amend for LuksImage {
    fn check_amend(&self, options: &[String]) -> Result<crate::capability::AmendSummary> {
        let req = amend_request(options).in_file(&self.path)?;
        Ok(crate::capability::AmendSummary {
            is_empty: req.is_empty(),
            grows: false,
        })
    }

    fn amend(&mut self, options: &[String], progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.writable_check()?;
        let req = amend_request(options).in_file(&self.path)?;
        crate::crypto::luks::amend(
            &mut self.header,
            self.storage.as_ref(),
            0,
            self.passphrase.as_deref().map(|p| &p[..]),
            &req,
            self.force,
            &self.secrets,
        )
        // qemu-img prints the key slot refusals as they stand, without the file.
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidInput => e.bare(),
            _ => e.with_path(&self.path),
        })?;
        progress(1, 1);
        self.storage
            .flush()
            .map_err(|e| Error::io("flush failed", e).with_path(&self.path))
    }
}

impl crate::capability::Resize for LuksImage {
    fn resize_base(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn check_resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if new_size > self.size && prealloc == Preallocation::Metadata {
            return Err(
                Error::invalid_input("Unsupported preallocation mode: metadata")
                    .with_path(&self.path),
            );
        }
        Ok(())
    }

    /// The file becomes the payload offset plus `new_size` bytes long, grown as a raw file is.
    fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.writable_check()?;
        let len = self.payload + new_size;
        if new_size > self.size && prealloc != Preallocation::Off {
            crate::prealloc::grow_file(self.storage.as_ref(), &self.path, len, prealloc)?;
        }
        self.storage
            .set_len(len)
            .and_then(|_| self.storage.flush())
            .map_err(|e| Error::io("cannot resize image", e).with_path(&self.path))?;
        self.size = new_size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::luks::*;
    use crate::storage::MemStorage;

    #[test]
    fn unaligned_reads_and_writes_round_trip_through_the_cipher() {
        let s = MemStorage::default();
        let params = CreateParams {
            iter_time_ms: 1,
            ..Default::default()
        };
        let (len, _) = create(&params, &s, 0, b"k").unwrap();
        s.set_len(len + (3 << 20)).unwrap();
        let img = LuksImage::open(Box::new(s), Path::new("t.luks"), true, Some(b"k")).unwrap();
        assert_eq!(img.virtual_size(), 3 << 20);
        let data: Vec<u8> = (0..(CHUNK as usize + 3000))
            .map(|i| (i % 251) as u8)
            .collect();
        img.write_at(&data, GuestOffset(777)).unwrap();
        let mut back = vec![0u8; data.len()];
        img.read_at(&mut back, GuestOffset(777)).unwrap();
        assert_eq!(back, data);
        img.write_zeroes(GuestOffset(1000), 100, true).unwrap();
        let mut z = vec![1u8; 300];
        img.read_at(&mut z, GuestOffset(900)).unwrap();
        assert_eq!(&z[..100], &data[123..223]);
        assert!(z[100..200].iter().all(|&b| b == 0));
        assert_eq!(&z[200..], &data[323..423]);
        // The ciphertext is not the data.
        let mut raw = vec![0u8; 512];
        img.storage.read_at(&mut raw, len + 1024).unwrap();
        assert_ne!(&raw[..], &data[1024 - 777..][..512]);
        let info = img.layer_info().unwrap();
        assert_eq!(info.encrypted, Some(true));
    }
}
