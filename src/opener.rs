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

    /// Opens the storage `loc` names, for writing if `writable`, holding the image locks
    /// `locks` where the kind has them.
    fn open(
        &self,
        loc: &Locator,
        writable: bool,
        locks: LockRequest,
    ) -> io::Result<Box<dyn Storage>>;

    /// Creates the storage `loc` names, or empties it, for writing, with a writer's image
    /// locks taken before anything is emptied.
    fn create(&self, loc: &Locator) -> io::Result<Box<dyn Storage>>;

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

/// Every storage kind, asked in this order; the first that claims a locator opens it.
pub static KINDS: &[&dyn StorageKind] = &[&FileKind];

/// Local files and block devices, through [`FileStorage`].
pub struct FileKind;

impl StorageKind for FileKind {
    fn name(&self) -> &'static str {
        "file"
    }

    fn claims(&self, _loc: &Locator) -> bool {
        true
    }

    fn open(
        &self,
        loc: &Locator,
        writable: bool,
        locks: LockRequest,
    ) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::open_with(loc, writable, locks)?))
    }

    fn create(&self, loc: &Locator) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::create(loc)?))
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
#[derive(Clone, Default)]
pub struct Opener(Arc<Settings>);

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("metadata_only", &self.metadata_only())
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
}

/// Receives the lines qemu prints on standard error while an image is opened (see
/// [`Opener::set_notices`]).
pub type NoticeSink = Arc<dyn Fn(&str) + Send + Sync>;

impl Opener {
    /// An opener with no settings: storage opened as it is.
    pub fn new() -> Self {
        Self::default()
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
            let mut o = lock(&self.0.image_options);
            o.retain(|(i, _)| *i != spec.path);
            o.push((spec.path.clone(), spec.options.clone()));
        }
    }

    /// The option `key` (dotted, as in `--image-opts`: `key-secret`, `encrypt.key-secret`)
    /// the image name of the image at `image` gave, if any.
    pub fn image_option(&self, image: &Locator, key: &str) -> Option<String> {
        lock(&self.0.image_options)
            .iter()
            .find(|(i, _)| i == image)
            .and_then(|(_, o)| o.get(key).cloned())
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
        let mut reg = lock(&self.0.blkdebug);
        reg.retain(|(p, _)| *p != k);
        reg.push((k, Arc::new(config)));
    }

    /// Makes every later open of the image at `image` (the locator as it will be opened) use
    /// `data` as its external data file instead of the one its header names (qemu's
    /// `data-file` option).
    pub fn set_data_file(&self, image: &Locator, data: &Locator) {
        let mut o = lock(&self.0.data_files);
        o.retain(|(i, _)| i != image);
        o.push((image.to_path_buf(), data.to_path_buf()));
    }

    /// The data file given for the image at `image`, if any.
    pub fn data_file_for(&self, image: &Locator) -> Option<LocatorBuf> {
        lock(&self.0.data_files)
            .iter()
            .find(|(i, _)| i == image)
            .map(|(_, d)| d.clone())
    }

    /// With `true`, later read-only opens do not need an image's external data file: one that
    /// is missing or not named is left out, and guest I/O on such an image fails (qemu-img's
    /// `info`, which opens images without I/O).
    pub fn set_metadata_only(&self, on: bool) {
        self.0.metadata_only.store(on, Ordering::Relaxed);
    }

    /// With `true`, images opened later allow what `amend --force` allows (overwriting an
    /// active LUKS key slot, erasing the last one).
    pub fn set_force(&self, on: bool) {
        self.0.force.store(on, Ordering::Relaxed);
    }

    /// Whether [`Opener::set_force`] is on.
    pub fn force(&self) -> bool {
        self.0.force.load(Ordering::Relaxed)
    }

    /// Whether [`Opener::set_metadata_only`] is on.
    pub fn metadata_only(&self) -> bool {
        self.0.metadata_only.load(Ordering::Relaxed)
    }

    /// Sends the lines qemu prints on standard error while it opens an image (the repair of a
    /// dirty qcow2 image opened for writing: `Repairing cluster ...`, `Rebuilding refcount
    /// structure`) to `sink`. Without a sink they are dropped: the library prints nothing.
    pub fn set_notices(&self, sink: NoticeSink) {
        *lock(&self.0.notices) = Some(sink);
    }

    /// Passes `line` to the notice sink, if there is one.
    pub fn notice(&self, line: &str) {
        let sink = lock(&self.0.notices).clone();
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
        let storage = kind_of(loc).open(loc, writable, locks)?;
        Ok(self.with_rules(loc, storage))
    }

    /// Opens the storage `loc` names only to look at it (probing its format): read-only,
    /// without image locks or blkdebug rules.
    pub fn open_to_look(&self, loc: &Locator) -> io::Result<Box<dyn Storage>> {
        kind_of(loc).open(loc, false, LockRequest::NONE)
    }

    /// Creates the storage `loc` names, or empties it, holding a writer's image locks.
    pub fn create(&self, loc: &Locator) -> io::Result<Box<dyn Storage>> {
        kind_of(loc).create(loc)
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
            let reg = lock(&self.0.blkdebug);
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
        for bad in ["json:{\"driver\":\"raw\"}", "nbd://host/x", "http://x/y"] {
            assert_eq!(r(bad).unwrap_err().kind(), ErrorKind::Unsupported, "{bad}");
        }
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
