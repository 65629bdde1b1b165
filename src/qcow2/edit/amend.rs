//! Changing the format options of an existing qcow2 image in place (`vimg amend`, qemu-img's
//! `amend`): qcow2.rst "Header" fields that can change after creation.
//!
//! - `compat=1.1` upgrades a version 2 image (the header grows to version 3's layout; snapshot
//!   table entries get the extra data version 3 requires, 24 bytes as qemu writes them),
//!   `compat=0.10` downgrades a version 3 one ([`super::downgrade`]: zero clusters are expanded in
//!   the active tree and in every snapshot's, then the header shrinks to version 2's);
//! - `refcount_bits` rewrites the refcount table and blocks at the new width
//!   ([`crate::qcow2::refcount::rewrite`]);
//! - `lazy_refcounts` sets or clears compatible feature bit 0 (the image is made clean first,
//!   so a dirty image gets its refcounts written before the bit goes);
//! - `size` grows or shrinks the disk through [`crate::qcow2::write::resize`];
//! - `backing_file`/`backing_fmt` are refused unless they name the current backing file and
//!   format, as qemu-img 10 refuses them (pointing to `rebase`);
//! - `data_file` renames the external data file, `data_file_raw=off` clears autoclear bit 1.
//!
//! Options qemu only accepts at creation (`cluster_size`, `preallocation`, `compression_type`,
//! `extended_l2`, encryption) are refused with qemu-img's messages.
//!
//! [`Qcow2Image::plan_amend`] checks a request against the image before anything changes,
//! with qemu-img's messages and in qemu's order, so that a refused amend leaves the image
//! untouched; [`Qcow2Image::amend`] then runs the steps in qemu's order (upgrade, refcount
//! width, size, header fields, downgrade). Each step leaves a valid image when it is
//! interrupted: new structures are written and synced before the one header write that
//! switches to them, and old ones are freed afterwards, so the worst a crash leaves is leaked
//! clusters.

use crate::crypto::luks::AmendRequest;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::option_desc::{OptDesc, OptType, BACKING_FILE, SIZE};
use crate::qcow2::create::{
    parse_options, Compat, OptionUpdates, BACKING_FMT, COMPAT, DATA_FILE, DATA_FILE_RAW,
    ENCRYPT_ITER_TIME, LAZY_REFCOUNTS, REFCOUNT_BITS,
};
use crate::qcow2::format::header::{autoclear, compat, incompat, CompressionType, Header};
use crate::qcow2::snapshot::table::read_table;
use crate::qcow2::write::resize::V2_SNAPSHOTS;
use crate::qcow2::Qcow2Image;

/// The options of `amend -o` for qcow2, as qemu's qcow2 driver describes them.
pub(crate) const AMEND_OPTIONS: &[OptDesc] = &[
    BACKING_FILE,
    BACKING_FMT,
    COMPAT,
    DATA_FILE,
    DATA_FILE_RAW,
    ENCRYPT_ITER_TIME,
    OptDesc::new(
        "encrypt.keyslot",
        OptType::Num,
        "Select a single keyslot to modify explicitly",
    ),
    OptDesc::new(
        "encrypt.new-secret",
        OptType::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    OptDesc::new(
        "encrypt.old-secret",
        OptType::Str,
        "Select all keyslots that match this password",
    ),
    OptDesc::new(
        "encrypt.state",
        OptType::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
    LAZY_REFCOUNTS,
    REFCOUNT_BITS,
    SIZE,
];

/// Options qemu-img accepts for qcow2 only when creating an image.
const CREATION_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "compression_type",
    "extended_l2",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
];

/// Encryption options qemu-img amends (LUKS key slots); they need an encrypted image.
const ENCRYPTION_AMEND: &[&str] = &[
    "encrypt.new-secret",
    "encrypt.old-secret",
    "encrypt.state",
    "encrypt.keyslot",
    "encrypt.iter-time",
];

/// Options that [`parse_options`] reads the values of for amend too.
const AMENDABLE: &[&str] = &[
    "size",
    "compat",
    "refcount_bits",
    "lazy_refcounts",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
];

/// qemu's message for a refcount width that is not a power of two up to 64.
pub(crate) const BAD_REFCOUNT_WIDTH: &str =
    "Refcount width must be a power of two and may not exceed 64 bits";

/// What one or more `-o` arguments of `amend` ask for (later arguments win). Values are read
/// as `create -o` reads them ([`parse_options`]); only the amendable options are accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// The amendable options given (creation-only fields are never set).
    pub updates: OptionUpdates,
    /// An encryption key slot option (`encrypt.new-secret`, ...) was given.
    pub encryption: bool,
    /// The key slot options given (without their `encrypt.` prefix).
    pub luks: AmendRequest,
}

impl AmendOptions {
    /// Parses one `-o` argument: comma-separated `key=value` items (`,,` for a comma), `help`
    /// or `?` to ask for the option list. Unknown and creation-only options are refused with
    /// qemu-img's messages.
    pub fn parse(s: &str) -> Result<Self> {
        let mut o = AmendOptions::default();
        for item in crate::option_list::split(s)? {
            let (key, _) = crate::option_list::key_value(&item);
            if let Some(("compat", level)) = item.split_once('=') {
                if !["0.10", "v2", "1.1", "v3"].contains(&level) {
                    return Err(refuse(format!("Unknown compatibility level {level}")));
                }
            }
            if AMENDABLE.contains(&key) || ((key == "help" || key == "?") && key == item) {
                o.updates.merge(parse_options(&item.replace(',', ",,"))?);
            } else if ENCRYPTION_AMEND.contains(&key) {
                o.encryption = true;
                let value = item.split_once('=').map_or("", |(_, v)| v);
                o.luks.set(&key["encrypt.".len()..], value)?;
            } else if CREATION_ONLY.contains(&key) {
                return Err(Error::invalid_input(format!(
                    "Invalid parameter '{key}'\nThis option is only supported for image creation"
                ))
                .bare());
            } else {
                return Err(Error::invalid_input(format!("Invalid parameter '{key}'")));
            }
        }
        Ok(o)
    }

    /// Parses every `-o` argument, in order (see [`AmendOptions::parse`]).
    pub fn parse_all(args: &[String]) -> Result<Self> {
        let mut o = AmendOptions::default();
        for a in args {
            let later = Self::parse(a)?;
            o.updates.merge(later.updates);
            o.encryption |= later.encryption;
            merge_luks(&mut o.luks, later.luks);
        }
        Ok(o)
    }

    /// Whether `help` or `?` was given.
    pub fn wants_help(&self) -> bool {
        self.updates.help
    }
}

/// Takes the key slot options of `later` into `into` (later wins).
fn merge_luks(into: &mut AmendRequest, later: AmendRequest) {
    into.state = later.state.or(into.state);
    into.keyslot = later.keyslot.or(into.keyslot);
    into.old_secret = later.old_secret.or(into.old_secret.take());
    into.new_secret = later.new_secret.or(into.new_secret.take());
    into.iter_time = later.iter_time.or(into.iter_time);
}

/// A change of the backing file pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingChange {
    /// No backing file any more (`backing_file=` with an empty name).
    Remove,
    /// This backing file name (recorded as given) and format.
    Set {
        /// The name, as the header records it.
        file: String,
        /// The format name.
        format: String,
    },
}

/// What an amend will do, worked out and checked by [`Qcow2Image::plan_amend`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendPlan {
    /// Version 2 to version 3 (first step).
    pub upgrade: bool,
    /// The new `refcount_order`, when it changes.
    pub refcount_order: Option<u32>,
    /// The new virtual size, when it changes.
    pub size: Option<u64>,
    /// The new backing file pointer.
    pub backing: Option<BackingChange>,
    /// Lazy refcounts on or off, when that changes.
    pub lazy_refcounts: Option<bool>,
    /// The new external data file name.
    pub data_file: Option<String>,
    /// Clear the raw external data bit (autoclear bit 1).
    pub data_file_raw_off: bool,
    /// Version 3 to version 2 (last step).
    pub downgrade: bool,
    /// Why the downgrade is refused, when it is refused only after the other steps have run
    /// (qemu-img checks a downgrade last, after resizing: the image keeps its new size).
    pub downgrade_refused: Option<String>,
    /// A change of the LUKS key slots (after an upgrade, before anything else, as in qemu).
    pub luks: Option<AmendRequest>,
}

impl AmendPlan {
    /// Whether the amend changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == AmendPlan::default()
    }

    /// Whether fields that are rewritten in one header write change.
    fn changes_header_fields(&self) -> bool {
        self.backing.is_some()
            || self.lazy_refcounts.is_some()
            || self.data_file.is_some()
            || self.data_file_raw_off
    }

    /// How many operations of [`Qcow2Image::amend`] report progress ([`Operation`]).
    fn operations(&self) -> u64 {
        // qemu counts the key slot change too, though it reports no progress of its own.
        u64::from(self.upgrade || self.downgrade)
            + u64::from(self.refcount_order.is_some())
            + u64::from(self.luks.is_some())
    }

    /// Applies the header-field changes (backing pointer, lazy refcounts, data file) to `h`.
    fn apply_fields(&self, h: &mut Header) {
        match &self.backing {
            Some(BackingChange::Remove) => {
                h.backing_file = None;
                h.backing_format = None;
            }
            Some(BackingChange::Set { file, format }) => {
                h.backing_file = Some(file.clone());
                h.backing_format = Some(format.clone());
            }
            None => {}
        }
        match self.lazy_refcounts {
            Some(true) => h.compatible_features |= compat::LAZY_REFCOUNTS,
            Some(false) => h.compatible_features &= !compat::LAZY_REFCOUNTS,
            None => {}
        }
        if let Some(d) = &self.data_file {
            h.data_file = (!d.is_empty()).then(|| d.clone());
        }
        if self.data_file_raw_off {
            h.autoclear_features &= !autoclear::DATA_FILE_RAW;
        }
    }
}

/// The operations of an amend that report progress, as qemu counts them: changing the
/// version (an upgrade or a downgrade) and changing the refcount width. The other changes
/// (size, header fields) report nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::qcow2) enum Operation {
    /// Upgrading or downgrading the image.
    Version,
    /// Rewriting the refcount structures at another width.
    RefcountWidth,
}

/// Reports the progress of an amend as qemu's qcow2 driver does: each operation reports
/// (done, work) in its own units; the work of the operations finished so far is added up,
/// and the operations not started yet are projected to be as big on average as those seen.
pub(in crate::qcow2) struct Progress<'a> {
    report: &'a mut dyn FnMut(u64, u64),
    /// Operations that report progress in this amend.
    operations: u64,
    /// The operation running now.
    current: Option<Operation>,
    /// The operation that reported last.
    last: Option<Operation>,
    /// Operations finished (that reported before the one reporting now).
    completed: u64,
    /// The work of the finished operations.
    work_completed: u64,
    /// The work of the operation that reported last.
    last_work: u64,
}

impl<'a> Progress<'a> {
    fn new(report: &'a mut dyn FnMut(u64, u64), operations: u64) -> Self {
        Progress {
            report,
            operations,
            current: None,
            last: None,
            completed: 0,
            work_completed: 0,
            last_work: 0,
        }
    }

    /// Starts `op`: what [`Progress::within`] reports from now on is its progress.
    fn start(&mut self, op: Operation) {
        self.current = Some(op);
    }

    /// Reports `done` of `work` of the current operation.
    pub(in crate::qcow2) fn within(&mut self, done: u64, work: u64) {
        let Some(op) = self.current else {
            return;
        };
        if self.last != Some(op) {
            if self.last.is_some() {
                self.work_completed += self.last_work;
                self.completed += 1;
            }
            self.last = Some(op);
        }
        if self.completed >= self.operations {
            return;
        }
        self.last_work = work;
        let seen = self.work_completed as u128 + work as u128;
        let left = (self.operations - self.completed - 1) as u128;
        let projected = seen * left / (self.completed as u128 + 1);
        let total = u64::try_from(seen + projected).unwrap_or(u64::MAX);
        (self.report)(self.work_completed.saturating_add(done.min(work)), total);
    }
}

/// A qemu-style amend error (kind `InvalidInput`), printed without the file as qemu-img
/// prints it.
fn refuse(what: impl Into<String>) -> Error {
    Error::invalid_input(what).bare()
}

/// qemu-img's message for a `backing_file`/`backing_fmt` that is not the current one.
pub(crate) const NO_BACKING_AMEND: &str =
    "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.";

impl Qcow2Image {
    /// Works out what amending this image with `opts` does, refusing (with qemu-img's
    /// messages, in qemu's order) what cannot be done, before anything is changed. The image
    /// may be open read-only.
    pub fn plan_amend(&self, opts: &AmendOptions) -> Result<AmendPlan> {
        self.plan_inner(opts).in_file(&self.path)
    }

    fn plan_inner(&self, opts: &AmendOptions) -> Result<AmendPlan> {
        let h = &self.header;
        let u = &opts.updates;
        if h.is_corrupt() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "image is marked corrupt: it can only be opened read-only (repair it with check -r)",
            ));
        }
        let mut plan = AmendPlan::default();
        if opts.encryption {
            match h.crypt_method {
                crate::qcow2::crypt::method::NONE => {
                    return Err(refuse(
                        "Can't amend encryption options - encryption not present",
                    ))
                }
                // Legacy AES has no key slots.
                crate::qcow2::crypt::method::AES => {
                    return Err(refuse("Only LUKS encryption options can be amended"))
                }
                _ => plan.luks = Some(opts.luks.clone()),
            }
        }
        let old_version = h.version;
        let new_version = u.compat.map_or(old_version, Compat::version);
        if new_version < 3 && self.bitmaps_ext().is_some_and(|b| b.nb_bitmaps > 0) {
            // Version 2 has no bitmaps. qemu 10 downgrades such images anyway, leaving a
            // bitmaps extension in a version 2 header and leaked clusters.
            return Err(refuse(
                "Cannot downgrade an image with persistent dirty bitmaps (remove them first \
                 with 'bitmap --remove')",
            ));
        }
        plan.upgrade = new_version > old_version;
        plan.downgrade = new_version < old_version;

        let mut order = h.refcount_order;
        if let Some(bits) = u.refcount_bits {
            if bits == 0 || !bits.is_power_of_two() || bits > 64 {
                return Err(refuse(BAD_REFCOUNT_WIDTH));
            }
            order = bits.trailing_zeros();
            if order != h.refcount_order && order != 4 && new_version < 3 {
                return Err(refuse(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                ));
            }
        }
        plan.refcount_order = (order != h.refcount_order).then_some(order);

        let lazy_now = h.version >= 3 && h.lazy_refcounts();
        if let Some(lazy) = u.lazy_refcounts.filter(|&l| l != lazy_now) {
            if lazy && new_version < 3 {
                return Err(refuse(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                     compat=1.1 or greater)",
                ));
            }
            // Turning them off is implied by a downgrade, which clears every compatible bit.
            plan.lazy_refcounts = (lazy || !plan.downgrade).then_some(lazy);
        }

        plan.backing = self.plan_backing(u)?;

        if let Some(name) = &u.data_file {
            if !h.has_data_file() {
                return Err(refuse(
                    "data-file can only be set for images that use an external data file",
                ));
            }
            if Some(name) != h.data_file.as_ref() {
                self.check_new_data_file(name)?;
                plan.data_file = Some(name.clone());
            }
        }
        match u.data_file_raw {
            Some(true) if !h.data_file_raw() => {
                return Err(refuse("data-file-raw cannot be set on existing images"))
            }
            Some(false) => plan.data_file_raw_off = h.data_file_raw(),
            _ => {}
        }

        // qemu takes size=0 for "not given".
        if let Some(size) = u.size.filter(|&s| s != 0) {
            if !size.is_multiple_of(512) {
                return Err(refuse("The new size must be a multiple of 512"));
            }
            if size != h.size {
                // Resizing runs after an upgrade and before a downgrade.
                let version = old_version.max(new_version);
                if h.nb_snapshots > 0 && version < 3 {
                    return Err(refuse(V2_SNAPSHOTS));
                }
                if h.has_data_file() {
                    return Err(Error::unsupported(
                        "resizing qcow2 images with an external data file is not supported yet",
                    ));
                }
                plan.size = Some(size);
            }
        }

        if plan.downgrade {
            match self.check_downgrade(order, plan.size.unwrap_or(h.size)) {
                Err(e)
                    if e.kind() == ErrorKind::InvalidInput
                        && (plan.refcount_order.is_some()
                            || plan.size.is_some()
                            || plan.changes_header_fields()) =>
                {
                    plan.downgrade = false;
                    plan.downgrade_refused = Some(e.what().to_string());
                }
                r => r?,
            }
        }

        // The final header must fit in cluster 0 (a long backing name in a small cluster).
        let mut last = h.clone();
        if plan.upgrade {
            set_version_3(&mut last);
        }
        plan.apply_fields(&mut last);
        if plan.downgrade {
            set_version_2(&mut last);
        }
        last.encode()?;
        Ok(plan)
    }

    /// The backing pointer change `u` asks for: none, as in qemu-img 10, which accepts
    /// `backing_file`/`backing_fmt` only when both are given and name the current backing
    /// file and format, and otherwise refuses them (pointing to `rebase`).
    fn plan_backing(&self, u: &OptionUpdates) -> Result<Option<BackingChange>> {
        let h = &self.header;
        if u.backing_file.is_none() && u.backing_fmt.is_none() {
            return Ok(None);
        }
        if u.backing_file != h.backing_file || u.backing_fmt != h.backing_format {
            return Err(refuse(NO_BACKING_AMEND));
        }
        Ok(None)
    }

    /// Refuses a new external data file name that would have guest data overwrite the
    /// image's own metadata or its backing file. An empty name clears the name (the data file
    /// must then be given at each open), and a file that does not exist is recorded as it is,
    /// as qemu-img does (`--image-opts data-file.filename=...` opens the image meanwhile).
    fn check_new_data_file(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Ok(());
        }
        let p = crate::open::resolve_relative(&self.path, name)?;
        // Compared by device and inode, so links are caught.
        if same_file(&p, &self.path) {
            return Err(refuse("the image cannot be its own data file"));
        }
        if let Some(b) = &self.header.backing_file {
            if same_file(&p, &crate::open::resolve_relative(&self.path, b)?) {
                return Err(refuse(format!(
                    "the data file cannot be the image's backing file '{b}'"
                )));
            }
        }
        Ok(())
    }

    /// The checks qemu makes before a downgrade to version 2, in its order, for a final
    /// refcount order `order` and a final virtual size `size`.
    fn check_downgrade(&self, order: u32, size: u64) -> Result<()> {
        let h = &self.header;
        if order != 4 {
            return Err(refuse("compat=0.10 requires refcount_bits=16"));
        }
        if h.has_data_file() {
            return Err(refuse("Cannot downgrade an image with a data file"));
        }
        // Version 2 snapshot entries have no room for a VM state beyond 4 GiB or a disk size
        // other than the image's.
        for s in read_table(self)? {
            if s.vm_state_size != 0 || s.disk_size.unwrap_or(h.size) != size {
                return Err(refuse("Internal snapshots prevent downgrade of image"));
            }
        }
        let other = h.incompatible_features & !(incompat::DIRTY | incompat::COMPRESSION);
        if other != 0 {
            return Err(refuse(format!(
                "Cannot downgrade an image with incompatible features {other:#x} set"
            )));
        }
        if h.compression_type != CompressionType::Zlib && self.has_compressed_clusters()? {
            return Err(refuse(
                "Cannot downgrade an image with zstd compression type and existing compressed \
                 clusters",
            ));
        }
        Ok(())
    }

    /// Amends the image (opened read-write) as `opts` asks: checks the request
    /// ([`Qcow2Image::plan_amend`]), then upgrades, changes the refcount width, resizes, rewrites
    /// the header fields and downgrades, in that order. `progress` is called with (done, total) as
    /// the work advances, as qemu's driver reports it (the version change and the refcount width
    /// change report; see `Operation`). The image is left clean, with lazy refcounts deferred no
    /// more until it is closed.
    pub fn amend(&mut self, opts: &AmendOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let plan = self.plan_amend(opts)?;
        self.run_plan(&plan, progress).in_file(&self.path)
    }

    fn run_plan(&mut self, plan: &AmendPlan, report: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let mut progress = Progress::new(report, plan.operations());
        if plan.is_empty() {
            return Ok(());
        }
        self.settle()?;
        if plan.upgrade {
            progress.start(Operation::Version);
            progress.within(0, 2);
            self.extend_snapshot_extra()?;
            progress.within(1, 2);
            let mut h = self.disk_header()?;
            set_version_3(&mut h);
            self.rewrite_header(h)?;
            progress.within(2, 2);
        }
        if let Some(req) = &plan.luks {
            self.amend_key_slots(req)?;
        }
        if let Some(order) = plan.refcount_order {
            progress.start(Operation::RefcountWidth);
            self.change_refcount_order(order, &mut progress)?;
        }
        if let Some(size) = plan.size {
            self.resize_to(size)?;
            self.settle()?;
        }
        if plan.changes_header_fields() {
            let mut h = self.disk_header()?;
            plan.apply_fields(&mut h);
            self.rewrite_header(h)?;
        }
        if plan.downgrade {
            progress.start(Operation::Version);
            self.downgrade_to_v2(&mut progress)?;
        }
        if let Some(why) = &plan.downgrade_refused {
            return Err(refuse(why.clone()));
        }
        Ok(())
    }

    /// Brings the image to a clean state on disk and keeps it there for the rest of the
    /// session: every pending metadata change is written with every refcount, the dirty bit
    /// this session set is cleared, lazy refcounts stop deferring, and the in-memory header is
    /// reloaded from the disk (the write path may have moved the refcount table).
    pub(in crate::qcow2) fn settle(&mut self) -> Result<()> {
        self.close_inner()?;
        self.write_state()?.lazy = false;
        self.header = self.disk_header()?;
        Ok(())
    }

    /// The header as it is on disk now.
    pub(in crate::qcow2) fn disk_header(&self) -> Result<Header> {
        let len = self
            .storage
            .len()
            .map_err(|e| Error::io("cannot get file size", e))?;
        let mut cluster0 =
            vec![0u8; len.min(1 << crate::qcow2::format::header::MAX_CLUSTER_BITS) as usize];
        self.storage
            .read_at(&mut cluster0, 0)
            .map_err(|e| Error::io("cannot read header", e))?;
        Header::parse(&cluster0, len.max(self.file_len()))
    }

    /// Version 2 to 3: snapshot entries get the extra data version 3 requires, then the header
    /// is rewritten in version 3's layout (no feature bits, 16-bit refcounts, zlib).
    /// Gives every snapshot table entry with less than 16 bytes of extra data the 64-bit VM
    /// state size and the disk size (taken to be the image's, as qemu does for such entries),
    /// writing the table anew as qemu writes it (every entry with at least the 24 bytes of
    /// extra data qemu knows) and switching the header to it (qcow2.rst "Snapshots": version
    /// 3 requires the first two fields).
    fn extend_snapshot_extra(&mut self) -> Result<()> {
        let snaps = read_table(self)?;
        if snaps.iter().all(|s| s.extra.len() >= 16) {
            return Ok(());
        }
        let size = self.header.size;
        let entries: Vec<Vec<u8>> = snaps
            .iter()
            .map(|s| crate::qcow2::snapshot::write::encode_entry(s, size))
            .collect();
        self.with_write_state(|img, st| img.replace_snapshot_table(st, &entries))?;
        self.settle()
    }
}

impl Qcow2Image {
    /// Changes the key slots of the LUKS header (qemu's `qcrypto_block_amend_options` through
    /// qcow2's header read and write functions): the header where the FDE header extension
    /// says, amended with the passphrase the image was opened with. qemu-img prints the key
    /// slot refusals without the file name.
    fn amend_key_slots(&mut self, req: &AmendRequest) -> Result<()> {
        let keys = self
            .crypt
            .as_ref()
            .and_then(|c| c.keys())
            .ok_or_else(|| Error::invalid_input(crate::qcow2::crypt::KEY_REQUIRED))?;
        let (base, mut header) = crate::qcow2::crypt::luks_header_at(&self.header, &*self.storage)?;
        crate::crypto::luks::amend(
            &mut header,
            &*self.storage,
            base,
            Some(&keys.passphrase),
            req,
            keys.force,
            &keys.secrets,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidInput => e.bare(),
            _ => e,
        })?;
        self.storage
            .flush()
            .map_err(|e| Error::io("flush failed", e))
    }
}

/// Sets `h` to version 3 as a fresh upgrade writes it: 112-byte header, no feature bits,
/// 16-bit refcounts, zlib compression.
fn set_version_3(h: &mut Header) {
    h.version = 3;
    h.header_length = 112;
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.refcount_order = 4;
    h.compression_type = CompressionType::Zlib;
    h.extra_header_bytes.clear();
}

/// Sets `h` to version 2: the 72-byte header, with the version 3 fields (at their fresh values,
/// as [`set_version_3`] leaves them) and the bitmaps extension gone.
pub(in crate::qcow2) fn set_version_2(h: &mut Header) {
    set_version_3(h);
    h.version = 2;
    h.header_length = crate::qcow2::format::header_write::V2_HEADER_LEN;
    h.bitmaps = None;
    h.feature_names.clear();
}

/// Whether `a` and `b` are the same file (device and inode, so that links are caught).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use crate::identity::FileId;
    FileId::of(a).is_some_and(|x| FileId::of(b) == Some(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::create::CreateOptions;

    /// A new image `t.qcow2` in `dir`, made with `o` (4 MiB unless it says otherwise), and its
    /// parsed header.
    fn new_image(dir: &std::path::Path, o: CreateOptions) -> (std::path::PathBuf, Header) {
        let p = dir.join("t.qcow2");
        let o = CreateOptions {
            size: if o.size == 0 { 4 << 20 } else { o.size },
            ..o
        };
        crate::qcow2::create::create(&p, &o).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
        (p, h)
    }

    #[test]
    fn options_parse_like_qemu_img_amend() {
        let o = AmendOptions::parse_all(&[
            "compat=1.1,refcount_bits=8".into(),
            "refcount_bits=64,lazy_refcounts=on".into(),
            "backing_file=a,,b.qcow2,backing_fmt=qcow2".into(),
        ])
        .unwrap();
        assert_eq!(o.updates.compat, Some(Compat::V3));
        assert_eq!(o.updates.refcount_bits, Some(64));
        assert_eq!(o.updates.lazy_refcounts, Some(true));
        assert_eq!(o.updates.backing_file.as_deref(), Some("a,b.qcow2"));
        assert!(!o.wants_help() && !o.encryption);
        assert!(AmendOptions::parse("help").unwrap().wants_help());
        assert!(
            AmendOptions::parse("encrypt.new-secret=s")
                .unwrap()
                .encryption
        );
        for (text, want) in [
            (
                "cluster_size=4k",
                "This option is only supported for image creation",
            ),
            (
                "preallocation=full",
                "This option is only supported for image creation",
            ),
            (
                "encrypt.format=luks",
                "This option is only supported for image creation",
            ),
            ("foo=bar", "Invalid parameter 'foo'"),
            ("nocow=on", "Invalid parameter 'nocow'"),
            ("lazy_refcounts=maybe", "lazy_refcounts"),
            ("", "invalid option list"),
        ] {
            let e = AmendOptions::parse(text).unwrap_err();
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }

    /// A version 2 image whose snapshot entries have no extra data (as old qemu versions
    /// wrote them): the upgrade gives them the VM state and disk size fields version 3 needs.
    #[test]
    fn upgrading_fills_in_snapshot_extra_data() {
        use crate::check::Check;
        use crate::open::ChainGuard;
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = new_image(
            dir.path(),
            CreateOptions {
                compat: Compat::V2,
                ..Default::default()
            },
        );
        let open = || Qcow2Image::open(&p, true, true, &mut ChainGuard::default()).unwrap();
        let mut img = open();
        crate::BlockImage::write_at(&img, &[7u8; 70000], crate::GuestOffset(5000)).unwrap();
        img.snapshot_create("a", Default::default()).unwrap();
        img.snapshot_create("b", Default::default()).unwrap();
        let bare: Vec<Vec<u8>> = read_table(&img)
            .unwrap()
            .into_iter()
            .map(|mut s| {
                s.extra.clear();
                crate::qcow2::snapshot::write::encode_verbatim(&s)
            })
            .collect();
        img.with_write_state(|i, st| i.replace_snapshot_table(st, &bare))
            .unwrap();
        img.close().unwrap();

        let mut img = open();
        assert!(read_table(&img).unwrap().iter().all(|s| s.extra.is_empty()));
        let opts = AmendOptions::parse("compat=1.1").unwrap();
        let mut reports = Vec::new();
        img.amend(&opts, &mut |d, t| reports.push((d, t))).unwrap();
        img.close().unwrap();
        assert_eq!(reports.last().map(|&(d, t)| d == t), Some(true));
        let img = Qcow2Image::open(&p, false, true, &mut ChainGuard::default()).unwrap();
        assert_eq!(img.header().version, 3);
        let snaps = read_table(&img).unwrap();
        assert_eq!(snaps.len(), 2);
        for s in &snaps {
            assert_eq!(s.extra.len(), 24, "{}", s.name);
            assert_eq!(s.icount, None);
            assert_eq!(s.disk_size, Some(4 << 20));
            assert_eq!(s.vm_state_size, 0);
        }
        let report = img.check().unwrap();
        assert_eq!(report.exit_code(), 0, "{:?}", report.messages);
        let mut buf = vec![0u8; 70000];
        crate::BlockImage::read_at(&img, &mut buf, crate::GuestOffset(5000)).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
    }

    /// Header bytes and extensions vimg does not know survive every header rewrite of an
    /// amend (the extensions a downgrade too; version 2 has no room for the bytes).
    #[test]
    fn unknown_header_parts_survive() {
        use crate::open::ChainGuard;
        use crate::storage::Storage;
        let dir = tempfile::tempdir().unwrap();
        let (p, mut h) = new_image(dir.path(), CreateOptions::default());
        let ext = crate::qcow2::format::header::UnknownExt {
            kind: 0x7777_0001,
            data: b"future".to_vec(),
        };
        h.unknown_extensions.push(ext.clone());
        h.extra_header_bytes = vec![0, 0, 0, 0xab, 0xcd, 0, 0, 0, 0, 0, 0, 0xef, 0, 0, 0];
        h.header_length = 120;
        let storage = crate::storage::FileStorage::open(&p, true).unwrap();
        storage.write_at(&h.encode().unwrap(), 0).unwrap();
        drop(storage);
        for (opts, v3) in [
            ("lazy_refcounts=on", true),
            ("refcount_bits=8", true),
            ("size=8M,lazy_refcounts=off", true),
            ("compat=0.10,refcount_bits=16", false),
        ] {
            let mut img = Qcow2Image::open(&p, true, true, &mut ChainGuard::default()).unwrap();
            img.amend(&AmendOptions::parse(opts).unwrap(), &mut |_, _| {})
                .unwrap();
            img.close().unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let now = Header::parse(&bytes, bytes.len() as u64).unwrap();
            assert_eq!(now.unknown_extensions, vec![ext.clone()], "{opts}");
            if v3 {
                assert_eq!(now.header_length, 120, "{opts}");
                assert_eq!(now.extra_header_bytes, h.extra_header_bytes, "{opts}");
            } else {
                assert_eq!(now.version, 2);
            }
        }
    }

    #[test]
    fn version_changes_keep_what_both_versions_hold() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut h) = new_image(
            dir.path(),
            CreateOptions {
                backing_file: Some("b.raw".into()),
                backing_fmt: Some("raw".into()),
                ..Default::default()
            },
        );
        h.compatible_features = compat::LAZY_REFCOUNTS;
        h.unknown_extensions
            .push(crate::qcow2::format::header::UnknownExt {
                kind: 0x1234_5678,
                data: vec![7; 5],
            });
        set_version_2(&mut h);
        let v2 = Header::parse(&h.encode().unwrap(), 1 << 20).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(v2.backing_file.as_deref(), Some("b.raw"));
        assert_eq!(v2.backing_format.as_deref(), Some("raw"));
        assert_eq!(v2.unknown_extensions, h.unknown_extensions);
        let mut back = v2.clone();
        set_version_3(&mut back);
        let v3 = Header::parse(&back.encode().unwrap(), 1 << 20).unwrap();
        assert_eq!((v3.version, v3.header_length), (3, 112));
        assert!(!v3.lazy_refcounts());
        assert_eq!(v3.unknown_extensions, h.unknown_extensions);
    }
}
