//! The storage opener: the one place where the storage under images is opened, created,
//! named and told apart.
//!
//! Format drivers never open a file by path. Every file a driver touches (the image, its
//! backing files, its external data file, a file it creates) is reached through the
//! [`Opener`] the open was given ([`crate::open::OpenOptions::opener`], carried down a chain by
//! the [`crate::chain::ChainGuard`]). The opener picks the [`StorageKind`] that claims a
//! [`Locator`] and adds what the command asked for particular files: qemu's blkdebug rules
//! ([`crate::blkdebug`]), a `data-file` given for an image, and whether external data files
//! are needed at all (`info` opens images without guest I/O).
//!
//! # Locators
//!
//! A layer is named by a locator: what qemu calls a filename. Today every locator is a local
//! path (a file or a block device, [`FileKind`]); a storage kind for NBD, HTTP or RBD claims
//! the names it understands (`nbd://...`, `https://...`, `rbd:...`) and resolves, opens and
//! identifies them itself. Locators are carried as [`Path`]s, because a local name need not be
//! UTF-8 and every other kind's names are text a `Path` holds as well.
//!
//! Backing-file names recorded in an image are resolved against the image's locator
//! ([`Opener::resolve`]), and a chain's loops are found by the locator's one spelling
//! ([`Opener::canonical`]); what a command writes is told apart from what it reads by the
//! storage's identity ([`Opener::identity`]).
//!
//! # Adding a storage kind
//!
//! Its module implements [`StorageKind`] and gets one line in [`KINDS`].

use crate::blkdebug;
use crate::error::{Error, Result};
use crate::lock::LockRequest;
use crate::storage::{FileId, FileStorage, Storage};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

mod nbd_kind;

/// The name of some storage (see the module documentation).
pub type Locator = Path;

/// An owned [`Locator`].
pub type LocatorBuf = PathBuf;

/// What tells two pieces of storage apart, whatever names they are reached by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StorageId {
    /// A local file or block device: its device and inode.
    File(FileId),
    /// Storage of another kind: the kind's name and its canonical name for the storage.
    Named(&'static str, String),
}

/// One kind of storage: local files and block devices today; NBD exports, HTTP objects and
/// RBD images later.
pub trait StorageKind: Send + Sync + 'static {
    /// qemu's name of the protocol driver (`file`, `nbd`, `https`, `rbd`).
    fn name(&self) -> &'static str;

    /// Whether `loc` names storage of this kind. [`FileKind`], last in [`KINDS`], claims
    /// everything the others do not.
    fn claims(&self, loc: &Locator) -> bool;

    /// Opens the storage `loc` names as `request` asks.
    fn open(&self, loc: &Locator, request: &OpenRequest) -> io::Result<Box<dyn Storage>>;

    /// Creates the storage `loc` names, or empties it, for writing, with a writer's image
    /// locks taken before anything is emptied; `direct` as in [`OpenRequest::direct`].
    fn create(&self, loc: &Locator, direct: bool) -> io::Result<Box<dyn Storage>>;

    /// What identifies the storage, for refusing to write what is read.
    fn identity(&self, loc: &Locator) -> io::Result<StorageId>;

    /// The one spelling of `loc` (for a file: the path with links and `.` resolved), by which a
    /// backing chain's loops are found, as qemu finds them by name: a file reached again
    /// under another name (a hard link) is not a loop by this (qemu's lock conflict or the
    /// depth bound stops it).
    fn canonical(&self, loc: &Locator) -> io::Result<LocatorBuf>;

    /// Resolves `name`, recorded in the image at `base` (a backing or data file name), as
    /// qemu does for this kind.
    fn resolve(&self, base: &Locator, name: &str) -> Result<LocatorBuf>;

    /// Removes the storage a failed create made, where that undoes it (best effort; never a
    /// block device).
    fn remove_failed_output(&self, loc: &Locator);
}

/// What one open of storage asks for.
#[derive(Debug, Clone, Copy)]
pub struct OpenRequest {
    /// Open for writing.
    pub writable: bool,
    /// The image locks to hold, where the kind has them.
    pub locks: LockRequest,
    /// Bypass the host's cache (qemu's `cache.direct=on`: `O_DIRECT` for a file or device),
    /// where the kind can.
    pub direct: bool,
}

/// Every storage kind, asked in this order; the first that claims a locator opens it.
pub static KINDS: &[&dyn StorageKind] = &[&OvaKind, &nbd_kind::NbdKind, &FileKind];

/// A disk inside an OVA appliance, `ova:PATH[,disk=NAME]` ([`crate::ova`]): a read-only window
/// of the archive file.
pub struct OvaKind;

impl OvaKind {
    fn parse(loc: &Locator) -> io::Result<crate::ova::DiskLocator> {
        crate::ova::DiskLocator::parse(loc)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an ova: locator"))
    }
}

impl StorageKind for OvaKind {
    fn name(&self) -> &'static str {
        "ova"
    }

    fn claims(&self, loc: &Locator) -> bool {
        crate::ova::DiskLocator::parse(loc).is_some()
    }

    fn open(&self, loc: &Locator, r: &OpenRequest) -> io::Result<Box<dyn Storage>> {
        if r.writable {
            return Err(crate::ova::read_only());
        }
        crate::ova::open_disk(&Self::parse(loc)?, |p| {
            Ok(
                Box::new(FileStorage::open_cached(p, false, r.locks, r.direct)?)
                    as Box<dyn Storage>,
            )
        })
    }

    fn create(&self, _loc: &Locator, _direct: bool) -> io::Result<Box<dyn Storage>> {
        Err(crate::ova::read_only())
    }

    fn identity(&self, loc: &Locator) -> io::Result<StorageId> {
        let c = self.canonical(loc)?;
        Ok(StorageId::Named("ova", c.display().to_string()))
    }

    fn canonical(&self, loc: &Locator) -> io::Result<LocatorBuf> {
        crate::ova::canonical(&Self::parse(loc)?, |p| {
            Ok(Box::new(FileStorage::open_with(
                p,
                false,
                LockRequest::force_share(),
            )?) as Box<dyn Storage>)
        })
    }

    fn resolve(&self, base: &Locator, name: &str) -> Result<LocatorBuf> {
        Err(Error::unsupported(format!(
            "the disk refers to file '{name}': files referred to by a disk inside an OVA appliance are not supported"
        ))
        .with_path(base))
    }

    fn remove_failed_output(&self, _loc: &Locator) {}
}

/// Local files and block devices, through [`FileStorage`].
pub struct FileKind;

impl StorageKind for FileKind {
    fn name(&self) -> &'static str {
        "file"
    }

    fn claims(&self, _loc: &Locator) -> bool {
        true
    }

    fn open(&self, loc: &Locator, r: &OpenRequest) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::open_cached(
            loc, r.writable, r.locks, r.direct,
        )?))
    }

    fn create(&self, loc: &Locator, direct: bool) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::create_cached(loc, direct)?))
    }

    fn identity(&self, loc: &Locator) -> io::Result<StorageId> {
        FileId::of_file(loc).map(StorageId::File)
    }

    fn canonical(&self, loc: &Locator) -> io::Result<LocatorBuf> {
        std::fs::canonicalize(loc)
    }

    /// Relative names against the directory of the image that records them; protocol and
    /// `json:` names no kind claims are refused.
    fn resolve(&self, base: &Locator, name: &str) -> Result<LocatorBuf> {
        if name.starts_with("json:") || name.contains("://") {
            return Err(Error::unsupported(format!(
                "file name '{name}' uses a protocol or JSON syntax vimg does not support"
            ))
            .with_path(base));
        }
        let p = Path::new(name);
        if p.is_absolute() {
            return Ok(p.to_path_buf());
        }
        Ok(match base.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
            _ => p.to_path_buf(),
        })
    }

    fn remove_failed_output(&self, loc: &Locator) {
        crate::storage::remove_failed_output(loc)
    }
}

/// The kind that claims `loc`.
fn kind_of(loc: &Locator) -> &'static dyn StorageKind {
    KINDS
        .iter()
        .copied()
        .find(|k| k.claims(loc))
        .unwrap_or(&FileKind)
}

/// Opens the storage under images for one command: the storage kinds of [`KINDS`], with what
/// the command asked for particular files. Clones share their settings.
///
/// An opener also says whether what it opens bypasses the host's cache ([`Opener::direct`]):
/// a command opens what one cache mode covers (qemu-img's `-t` for the images it writes, `-T`
/// for those it reads) through an opener made with [`Opener::with_direct`], and every file of
/// those images (backing files, data files) is opened so, as qemu's children inherit
/// `cache.direct`.
#[derive(Clone, Default)]
pub struct Opener {
    settings: Arc<Settings>,
    direct: bool,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("metadata_only", &self.metadata_only())
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// The settings of an [`Opener`], shared by its clones.
#[derive(Default)]
struct Settings {
    /// blkdebug rules by the file they sit over (its canonical path).
    blkdebug: Mutex<Vec<(PathBuf, Arc<blkdebug::Config>)>>,
    /// External data files given for images (qemu's `data-file` option), by the image's
    /// locator as it will be opened.
    data_files: Mutex<Vec<(LocatorBuf, LocatorBuf)>>,
    /// The options image names gave their images (`key-secret=ID` ...), by the image's
    /// locator as it will be opened.
    image_options: Mutex<Vec<(LocatorBuf, std::collections::BTreeMap<String, String>)>>,
    /// External data files are not needed (see [`Opener::set_metadata_only`]).
    metadata_only: AtomicBool,
    /// `amend --force` (see [`Opener::set_force`]).
    force: AtomicBool,
    /// Where notices go (see [`Opener::set_notices`]).
    notices: Mutex<Option<NoticeSink>>,
    /// The secrets of the command line (`--object secret,...`), for encrypted images.
    secrets: Mutex<Option<Arc<crate::secret::Secrets>>>,
    /// Encryption options given for images (`encrypt.key-secret`, `encrypt.format`), by the
    /// image's locator as it will be opened.
    encryption: Mutex<Vec<(LocatorBuf, EncryptOptions)>>,
    /// Encryption options given for the backing file of an image (`backing.encrypt.*`), by
    /// the image's locator.
    backing_encryption: Mutex<Vec<(LocatorBuf, EncryptOptions)>>,
}

/// The encryption options of one image as qemu takes them (`encrypt.key-secret=ID`,
/// `encrypt.format=aes|luks`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptOptions {
    /// The id of the `--object secret` holding the passphrase.
    pub key_secret: Option<String>,
    /// The encryption format the image must have.
    pub format: Option<String>,
}

impl EncryptOptions {
    /// The options under `prefix` (`encrypt.` or `backing.encrypt.`) of an image spec's
    /// options; `None` if there are none.
    fn from_spec(
        options: &std::collections::BTreeMap<String, String>,
        prefix: &str,
    ) -> Option<Self> {
        let o = EncryptOptions {
            key_secret: options.get(&format!("{prefix}key-secret")).cloned(),
            format: options.get(&format!("{prefix}format")).cloned(),
        };
        (o != EncryptOptions::default()).then_some(o)
    }
}

/// Receives the lines qemu prints on standard error while an image is opened (see
/// [`Opener::set_notices`]).
pub type NoticeSink = Arc<dyn Fn(&str) + Send + Sync>;

impl Opener {
    /// An opener with no settings: storage opened as it is.
    pub fn new() -> Self {
        Self::default()
    }

    /// An opener with the same settings (shared with this one) whose opens bypass the host's
    /// cache if `on` (`O_DIRECT`, qemu's `cache.direct=on`), or do not.
    pub fn with_direct(&self, on: bool) -> Opener {
        Opener {
            settings: self.settings.clone(),
            direct: on,
        }
    }

    /// Whether this opener's opens bypass the host's cache (see [`Opener::with_direct`]).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Takes what an image name asked for its files (`blkdebug` rules, `data-file`).
    pub fn add_spec(&self, spec: &crate::image_spec::ImageSpec) {
        if let Some(c) = &spec.blkdebug {
            self.add_blkdebug(&spec.path, c.clone());
        }
        if let Some(d) = &spec.data_file {
            self.set_data_file(&spec.path, d);
        }
        if !spec.options.is_empty() {
            let mut o = lock(&self.settings.image_options);
            o.retain(|(i, _)| *i != spec.path);
            o.push((spec.path.clone(), spec.options.clone()));
        }
        if let Some(e) = EncryptOptions::from_spec(&spec.options, "encrypt.") {
            self.set_encryption(&spec.path, e);
        }
        if let Some(e) = EncryptOptions::from_spec(&spec.options, "backing.encrypt.") {
            let mut o = lock(&self.settings.backing_encryption);
            o.retain(|(i, _)| i != &spec.path);
            o.push((spec.path.clone(), e));
        }
    }

    /// Gives this opener the secrets of the command line, which the encryption options of
    /// images name by id.
    pub fn set_secrets(&self, secrets: crate::secret::Secrets) {
        *lock(&self.settings.secrets) = Some(Arc::new(secrets));
    }

    /// Makes later opens of the image at `image` use the encryption options `options`.
    pub fn set_encryption(&self, image: &Locator, options: EncryptOptions) {
        let mut o = lock(&self.settings.encryption);
        o.retain(|(i, _)| i != image);
        o.push((image.to_path_buf(), options));
    }

    /// The encryption options given for the image at `image`, if any.
    pub fn encryption_for(&self, image: &Locator) -> Option<EncryptOptions> {
        lock(&self.settings.encryption)
            .iter()
            .find(|(i, _)| i == image)
            .map(|(_, e)| e.clone())
    }

    /// The `encrypt.format` given for the image at `image`, if any.
    pub fn encrypt_format_for(&self, image: &Locator) -> Option<String> {
        self.encryption_for(image).and_then(|e| e.format)
    }

    /// The passphrase of the image at `image`: the secret its `encrypt.key-secret` names;
    /// `None` if it names none, an error (qemu's words) if no such secret was given.
    pub fn key_for(&self, image: &Locator) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>> {
        let Some(id) = self.encryption_for(image).and_then(|e| e.key_secret) else {
            return Ok(None);
        };
        self.secret(&id).map(Some)
    }

    /// The secrets of the command line ([`Opener::set_secrets`]); none if none were given.
    pub fn secrets(&self) -> Arc<crate::secret::Secrets> {
        lock(&self.settings.secrets).clone().unwrap_or_default()
    }

    /// The secret with id `id` (`--object secret,id=ID,...`); an error in qemu's words if
    /// there is none.
    pub fn secret(&self, id: &str) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        let secrets = lock(&self.settings.secrets).clone();
        match secrets.as_ref().and_then(|s| s.get(id)) {
            Some(k) => Ok(zeroize::Zeroizing::new(k.to_vec())),
            None => Err(Error::invalid_input(format!("No secret with id '{id}'"))),
        }
    }

    /// Hands the encryption options given for the backing file of `image`
    /// (`backing.encrypt.*`) to the backing file at `backing`, before it is opened.
    pub fn pass_to_backing(&self, image: &Locator, backing: &Locator) {
        let given = lock(&self.settings.backing_encryption)
            .iter()
            .find(|(i, _)| i == image)
            .map(|(_, e)| e.clone());
        if let Some(e) = given {
            self.set_encryption(backing, e);
        }
    }

    /// The option `key` (dotted, as in `--image-opts`: `key-secret`, `encrypt.key-secret`)
    /// the image name of the image at `image` gave, if any.
    pub fn image_option(&self, image: &Locator, key: &str) -> Option<String> {
        lock(&self.settings.image_options)
            .iter()
            .find(|(i, _)| i == image)
            .and_then(|(_, o)| o.get(key).cloned())
    }

    /// Every option the image name of the image at `image` gave (dotted keys), if it gave any.
    pub fn image_options(
        &self,
        image: &Locator,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        lock(&self.settings.image_options)
            .iter()
            .find(|(i, _)| i == image)
            .map(|(_, o)| o.clone())
    }

    /// The name qemu gives the image at `image` of format `format`, which `filename` names
    /// ([`crate::node_name`]): `json:{...}` when its image name gave strong options. With
    /// `backing` (the backing file's name, when the backing file is opened), a backing file
    /// given strong options is part of it.
    pub fn node_name(
        &self,
        image: &Locator,
        format: &str,
        filename: &str,
        backing: Option<&str>,
    ) -> String {
        let Some(o) = self.image_options(image) else {
            return filename.to_string();
        };
        let mut n = crate::node_name::Node::from_options(format, filename, &o, backing.is_some());
        if let Some(b) = backing {
            n.set_backing_filename(b);
        }
        n.name()
    }

    /// The name qemu gives the backing file (of format `format`, file `filename`) of the image
    /// at `image` when the image's name gave it strong options of its own
    /// (`backing.encrypt.key-secret`): `json:{...}` ([`crate::node_name`]); `None` when it
    /// gave none, and the backing file is named by its file.
    pub fn overridden_backing_name(
        &self,
        image: &Locator,
        format: &str,
        filename: &str,
    ) -> Option<String> {
        let o = self.image_options(image)?;
        let backing: std::collections::BTreeMap<String, String> = o
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("backing.")
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect();
        let n = crate::node_name::Node::from_options(format, filename, &backing, false);
        n.is_json().then(|| n.name())
    }

    /// The first option under `backing.` (`backing.encrypt.key-secret`...) the image name of
    /// the image at `image` gave, if any (`backing` alone, the null backing, is not one).
    pub fn backing_option(&self, image: &Locator) -> Option<String> {
        lock(&self.settings.image_options)
            .iter()
            .find(|(i, _)| i == image)
            .and_then(|(_, o)| o.keys().find(|k| k.starts_with("backing.")).cloned())
    }

    /// Refuses the `backing.*` options given for the image `image` (of format `format`) when
    /// it is opened without its backing file (`info`, `rebase -u`):
    /// qemu's open without the backing file leaves them unused, and it refuses unused
    /// options, in these words.
    pub fn refuse_backing_options(&self, image: &Locator, format: &str) -> Result<()> {
        match self.backing_option(image) {
            Some(key) => Err(Error::invalid_input(format!(
                "Block format '{format}' does not support the option '{key}'"
            ))
            .with_path(image)
            .while_opening()),
            None => Ok(()),
        }
    }

    /// Makes every later open of the file at `path` inject errors by `config`'s rules, each
    /// open with its own state, as each open of a blkdebug node in qemu has. Rules belong to
    /// the file, whatever name it is opened under. A configuration without rules changes
    /// nothing and is not kept.
    pub fn add_blkdebug(&self, path: &Locator, config: blkdebug::Config) {
        if config.is_empty() {
            return;
        }
        let k = blkdebug_key(path);
        let mut reg = lock(&self.settings.blkdebug);
        reg.retain(|(p, _)| *p != k);
        reg.push((k, Arc::new(config)));
    }

    /// Makes every later open of the image at `image` (the locator as it will be opened) use
    /// `data` as its external data file instead of the one its header names (qemu's
    /// `data-file` option).
    pub fn set_data_file(&self, image: &Locator, data: &Locator) {
        let mut o = lock(&self.settings.data_files);
        o.retain(|(i, _)| i != image);
        o.push((image.to_path_buf(), data.to_path_buf()));
    }

    /// The data file given for the image at `image`, if any.
    pub fn data_file_for(&self, image: &Locator) -> Option<LocatorBuf> {
        lock(&self.settings.data_files)
            .iter()
            .find(|(i, _)| i == image)
            .map(|(_, d)| d.clone())
    }

    /// With `true`, later read-only opens do not need an image's external data file: one that
    /// is missing or not named is left out, and guest I/O on such an image fails (qemu-img's
    /// `info`, which opens images without I/O).
    pub fn set_metadata_only(&self, on: bool) {
        self.settings.metadata_only.store(on, Ordering::Relaxed);
    }

    /// With `true`, images opened later allow what `amend --force` allows (overwriting an
    /// active LUKS key slot, erasing the last one).
    pub fn set_force(&self, on: bool) {
        self.settings.force.store(on, Ordering::Relaxed);
    }

    /// Whether [`Opener::set_force`] is on.
    pub fn force(&self) -> bool {
        self.settings.force.load(Ordering::Relaxed)
    }

    /// Whether [`Opener::set_metadata_only`] is on.
    pub fn metadata_only(&self) -> bool {
        self.settings.metadata_only.load(Ordering::Relaxed)
    }

    /// Sends the lines qemu prints on standard error while it opens an image (the repair of a
    /// dirty qcow2 image opened for writing: `Repairing cluster ...`, `Rebuilding refcount
    /// structure`) to `sink`. Without a sink they are dropped: the library prints nothing.
    pub fn set_notices(&self, sink: NoticeSink) {
        *lock(&self.settings.notices) = Some(sink);
    }

    /// Passes `line` to the notice sink, if there is one.
    pub fn notice(&self, line: &str) {
        let sink = lock(&self.settings.notices).clone();
        if let Some(sink) = sink {
            sink(line);
        }
    }

    /// Opens the storage `loc` names, for writing if `writable`, holding the image locks
    /// `locks`; with blkdebug rules for it, wrapped so that its I/O fails by them.
    pub fn open(
        &self,
        loc: &Locator,
        writable: bool,
        locks: LockRequest,
    ) -> io::Result<Box<dyn Storage>> {
        let request = OpenRequest {
            writable,
            locks,
            direct: self.direct,
        };
        let storage = kind_of(loc).open(loc, &request)?;
        Ok(self.with_rules(loc, storage))
    }

    /// Opens the storage `loc` names only to look at it (probing its format): read-only,
    /// without image locks or blkdebug rules.
    pub fn open_to_look(&self, loc: &Locator) -> io::Result<Box<dyn Storage>> {
        let request = OpenRequest {
            writable: false,
            locks: LockRequest::NONE,
            direct: self.direct,
        };
        kind_of(loc).open(loc, &request)
    }

    /// Creates the storage `loc` names, or empties it, holding a writer's image locks.
    pub fn create(&self, loc: &Locator) -> io::Result<Box<dyn Storage>> {
        kind_of(loc).create(loc, self.direct)
    }

    /// Removes what a failed create at `loc` made, where that undoes it (never a device).
    pub fn remove_failed_output(&self, loc: &Locator) {
        kind_of(loc).remove_failed_output(loc)
    }

    /// What identifies the storage `loc` names.
    pub fn identity(&self, loc: &Locator) -> io::Result<StorageId> {
        kind_of(loc).identity(loc)
    }

    /// The one spelling of `loc`, by which a chain's loops are found (see
    /// [`StorageKind::canonical`]).
    pub fn canonical(&self, loc: &Locator) -> io::Result<LocatorBuf> {
        kind_of(loc).canonical(loc)
    }

    /// Whether `a` and `b` name the same storage; `false` if either cannot be looked at.
    pub fn same(&self, a: &Locator, b: &Locator) -> bool {
        match (self.identity(a), self.identity(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }

    /// Resolves `name`, recorded in the image at `base` (a backing or data file name): a
    /// `json:` name with a blkdebug node (as qemu's iotests record them) names its file as
    /// given and brings its rules into this opener; a name another kind claims is taken as
    /// it is; anything else is resolved by the kind of `base`.
    pub fn resolve(&self, base: &Locator, name: &str) -> Result<LocatorBuf> {
        if let Some(spec) = crate::image_spec::parse_json_name(name) {
            let spec = spec.map_err(|e| e.with_path(base))?;
            self.add_spec(&spec);
            return Ok(spec.path);
        }
        if kind_of(Path::new(name)).name() != FileKind.name() {
            return Ok(PathBuf::from(name));
        }
        kind_of(base).resolve(base, name)
    }

    fn with_rules(&self, loc: &Locator, storage: Box<dyn Storage>) -> Box<dyn Storage> {
        let config = {
            let reg = lock(&self.settings.blkdebug);
            if reg.is_empty() {
                return storage;
            }
            let k = blkdebug_key(loc);
            reg.iter().find(|(p, _)| *p == k).map(|(_, c)| c.clone())
        };
        match config {
            Some(c) => blkdebug::wrap_with(c, storage),
            None => storage,
        }
    }
}

/// The key blkdebug rules are kept under: the file's canonical path when it exists.
fn blkdebug_key(path: &Locator) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn relative_names_resolve_against_the_image_directory() {
        let o = Opener::new();
        let img = Path::new("/images/vm/top.qcow2");
        let r = |n| o.resolve(img, n);
        assert_eq!(r("base.qcow2").unwrap(), Path::new("/images/vm/base.qcow2"));
        assert_eq!(r("../b/b.raw").unwrap(), Path::new("/images/vm/../b/b.raw"));
        assert_eq!(r("/abs/x.raw").unwrap(), Path::new("/abs/x.raw"));
        assert_eq!(
            o.resolve(Path::new("top.qcow2"), "b.raw").unwrap(),
            Path::new("b.raw")
        );
        for bad in ["json:{\"driver\":\"raw\"}", "http://x/y"] {
            assert_eq!(r(bad).unwrap_err().kind(), ErrorKind::Unsupported, "{bad}");
        }
        // A name the NBD kind claims is taken as it is.
        assert_eq!(r("nbd://host/x").unwrap(), Path::new("nbd://host/x"));
    }

    #[test]
    fn identity_sees_through_links_and_spellings() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let h = dir.path().join("h");
        std::fs::hard_link(&a, &h).unwrap();
        let b = dir.path().join("b");
        std::fs::write(&b, b"x").unwrap();
        let o = Opener::new();
        assert!(o.same(&a, &h));
        assert!(o.same(&a, &dir.path().join(".").join("a")));
        assert!(!o.same(&a, &b));
        assert!(!o.same(&a, &dir.path().join("missing")));
    }

    #[test]
    fn settings_are_shared_by_clones_and_not_by_other_openers() {
        let o = Opener::new();
        let c = o.clone();
        c.set_data_file(Path::new("/x/a.qcow2"), Path::new("a.data"));
        c.set_data_file(Path::new("/x/a.qcow2"), Path::new("b.data"));
        c.set_metadata_only(true);
        assert_eq!(
            o.data_file_for(Path::new("/x/a.qcow2")).unwrap(),
            Path::new("b.data")
        );
        assert!(o.metadata_only());
        let other = Opener::new();
        assert!(other.data_file_for(Path::new("/x/a.qcow2")).is_none());
        assert!(!other.metadata_only());
    }

    #[test]
    fn blkdebug_rules_reach_only_opens_through_their_opener() {
        use crate::open::{open_image, OpenOptions};
        use crate::GuestOffset;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.raw");
        std::fs::write(&img, vec![7u8; 4096]).unwrap();
        let conf = dir.path().join("rules.ini");
        std::fs::write(
            &conf,
            "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n",
        )
        .unwrap();
        let spec = crate::image_spec::parse_filename(&format!(
            "blkdebug:{}:{}",
            conf.display(),
            img.display()
        ))
        .unwrap();
        assert!(spec.blkdebug.is_some());
        let faulty = Opener::new();
        faulty.add_spec(&spec);
        let read = |opener: &Opener| {
            let opts = OpenOptions {
                opener: opener.clone(),
                ..OpenOptions::default()
            };
            let image = open_image(&img, &opts).unwrap();
            image.read_at(&mut [0u8; 512], GuestOffset(0))
        };
        let e = read(&faulty).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        read(&Opener::new()).unwrap();
        // Each open gets the rules afresh, under any name of the file.
        let mut again = OpenOptions {
            opener: faulty.clone(),
            ..OpenOptions::default()
        };
        again.format = Some(crate::format::ImageFormat::Raw);
        let other_name = dir.path().join(".").join("a.raw");
        let image = open_image(&other_name, &again).unwrap();
        assert!(image.read_at(&mut [0u8; 512], GuestOffset(0)).is_err());
    }
}
