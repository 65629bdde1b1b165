//! `vimg backup create|extract|verify|list|config`: VMA archives of images (see
//! [`crate::vma`]), as Proxmox's `vma` tool makes and reads them.
//!
//! - [`create`] backs up opened images (raw, qcow2, chains) with a [`BackupJob`] into a file
//!   or standard output, optionally compressed as a whole stream. A file is written under a
//!   temporary name and renamed into place only when complete, so a failed backup leaves no
//!   partial archive under the final name.
//! - [`prepare_extract`] and [`ExtractPlan::run`] restore an archive (a file or standard
//!   input, compressed or not) into a new directory: each device as a sparse raw file
//!   (`disk-NAME.raw`) or straight into a qcow2 image (`disk-NAME.qcow2`, zero clusters left
//!   unallocated), the config files beside them. Images are written under temporary names and
//!   renamed at the end; on failure everything made is removed, the directory too.
//!   Devices can instead go into existing images or block devices ([`DeviceTarget`]: from
//!   `--target`, or from the map of `-r` read by [`read_restore_map`], as Proxmox's
//!   `vma extract -r` reads it), opened and written in place, never created or removed; what
//!   the archive holds as zeros is zeroed there unless the target reads as zeros already.
//!   [`begin_extract`] and [`ExtractStart::plan`] split the preparation so that `-r` can print
//!   the archive's contents before it reads the map.
//! - [`verify`] reads a whole archive, checking every structure and its completeness.
//! - [`open_archive`] reads the header for `list` ([`crate::vma::listing::render_list`]) and
//!   `config` ([`find_config`]).
//!
//! Names read from an archive are untrusted: a device or config name becomes a file name only
//! if it is a plain name (no `/`, not `.` or `..`), and no two outputs may share a name.

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, Result, ResultExt};
use crate::opener::Opener;
use crate::ops::output::{rename_tmp, TempFile};
use crate::vma::format::{ArchiveHeader, ConfigFile};
use crate::vma::job::{BackupJob, BackupStats, Progress};
use crate::vma::reader::VmaReader;
use crate::vma::restore::{self, ArchiveTally, RestoreOptions};
use crate::vma::stream::{open_input, ArchiveOutput, Compression};
use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

pub mod live;
mod targets;
pub use targets::{parse_target_spec, read_restore_map, DeviceTarget, DeviceTargets};

/// Where an archive is read from or written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchivePath {
    /// Standard input or output (`-` on the command line).
    Stdio,
    /// A file.
    File(PathBuf),
}

impl ArchivePath {
    /// `-` is standard input or output; anything else a file.
    pub fn from_arg(arg: &Path) -> Self {
        if arg == Path::new("-") {
            ArchivePath::Stdio
        } else {
            ArchivePath::File(arg.to_path_buf())
        }
    }

    /// The name errors use.
    pub fn display_path(&self, reading: bool) -> &Path {
        match self {
            ArchivePath::File(p) => p,
            ArchivePath::Stdio if reading => Path::new("<stdin>"),
            ArchivePath::Stdio => Path::new("<stdout>"),
        }
    }
}

/// A device of `backup create -d [format=FMT:]DEVNAME=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The image's format; probed when `None`.
    pub format: Option<ImageFormat>,
    /// The device name stored in the archive.
    pub name: String,
    /// The image.
    pub path: PathBuf,
}

/// Parses `[format=FMT:]DEVNAME=PATH`, as Proxmox's `vma create -d` takes it.
pub fn parse_device_spec(spec: &str) -> Result<DeviceSpec> {
    let (format, rest) = match spec.strip_prefix("format=") {
        Some(r) => {
            let (f, rest) = r.split_once(':').ok_or_else(|| {
                Error::invalid_input(format!(
                    "device '{spec}': 'format=FMT' must be followed by ':DEVNAME=PATH'"
                ))
            })?;
            (Some(ImageFormat::from_name(f)?), rest)
        }
        None => (None, spec),
    };
    let (name, path) = rest.split_once('=').ok_or_else(|| {
        Error::invalid_input(format!(
            "device '{spec}': expected [format=FMT:]DEVNAME=PATH"
        ))
    })?;
    if name.is_empty() || path.is_empty() {
        return Err(Error::invalid_input(format!(
            "device '{spec}': both DEVNAME and PATH must be given"
        )));
    }
    if name == crate::vma::format::VMSTATE_NAME {
        return Err(Error::invalid_input(
            "device name 'vmstate' is reserved for the VM's RAM state",
        ));
    }
    Ok(DeviceSpec {
        format,
        name: name.to_string(),
        path: PathBuf::from(path),
    })
}

/// How to create an archive.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Config files to store, by their base name (`-c`).
    pub configs: Vec<PathBuf>,
    /// Whole-stream compression (`--compress`).
    pub compression: Compression,
}

/// Reads config file `path` for an archive (stored by its base name).
pub fn read_config(path: &Path) -> Result<ConfigFile> {
    ConfigFile::read(path)
}

/// A duplicate of standard output or input as a file, so that large writes and reads go
/// straight to the descriptor.
fn stdio_file(output: bool) -> Result<File> {
    use std::os::fd::AsFd;
    let fd = if output {
        std::io::stdout().as_fd().try_clone_to_owned()
    } else {
        std::io::stdin().as_fd().try_clone_to_owned()
    };
    fd.map(File::from)
        .map_err(|e| Error::io("cannot use standard input/output", e))
}

/// Backs up `sources` (device name, opened image) into `archive`, with `opts`. Device sizes
/// are the images' sizes rounded up to 512 bytes. A file archive must not exist yet.
pub fn create(
    archive: &ArchivePath,
    sources: &[(&str, &dyn BlockImage)],
    opts: &CreateOptions,
    progress: Option<Progress<'_>>,
) -> Result<BackupStats> {
    let shown = archive.display_path(false).to_path_buf();
    let mut header = crate::vma::new_header()?;
    for c in &opts.configs {
        let cfg = read_config(c)?;
        header.add_config(&cfg.name, cfg.data).in_file(c)?;
    }
    match archive {
        ArchivePath::Stdio => {
            if std::io::stdout().is_terminal() {
                return Err(Error::invalid_input(
                    "refusing to write an archive to a terminal (redirect standard output)",
                ));
            }
            write_archive(stdio_file(true)?, header, sources, opts, progress).in_file(&shown)
        }
        ArchivePath::File(path) => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(Error::invalid_input("archive already exists").with_path(path));
            }
            let tmp = TempFile::create_near(path)?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&tmp.path)
                .map_err(|e| Error::io("cannot open the archive for writing", e))
                .in_file(path)?;
            let stats = write_archive(file, header, sources, opts, progress)
                .map_err(|e| rename_tmp(e, &tmp.path, path))
                .in_file(path)?;
            tmp.persist(path, false)?;
            Ok(stats)
        }
    }
}

/// Runs the backup job into `file` (compressed as `opts` says) and ends the stream.
fn write_archive(
    file: File,
    header: ArchiveHeader,
    sources: &[(&str, &dyn BlockImage)],
    opts: &CreateOptions,
    progress: Option<Progress<'_>>,
) -> Result<BackupStats> {
    let out = ArchiveOutput::new(file, opts.compression)?;
    let job = BackupJob::new(out, header, sources, true)?;
    job.run(progress)?;
    let (out, stats) = job.finish()?;
    out.finish()
        .map_err(|e| Error::io("cannot write to the archive", e))?;
    Ok(stats)
}

/// Opens an archive for reading (decompressing it if its magic says so) and reads its header.
/// Errors name the archive.
pub fn open_archive(archive: &ArchivePath) -> Result<VmaReader<Box<dyn Read + Send>>> {
    let shown = archive.display_path(true);
    let input = match archive {
        ArchivePath::Stdio => stdio_file(false)?,
        ArchivePath::File(p) => {
            File::open(p).map_err(|e| Error::io("cannot open archive", e).with_path(p))?
        }
    };
    let (reader, _) = open_input(input).in_file(shown)?;
    VmaReader::new(reader).in_file(shown)
}

/// The config file `name` of an archive, or the reference tool's error when it has none.
pub fn find_config<'h>(header: &'h ArchiveHeader, name: &str) -> Result<&'h [u8]> {
    header
        .config(name)
        .map(|c| c.data.as_slice())
        .ok_or_else(|| Error::invalid_input(format!("unable to find configuration data '{name}'")))
}

/// Reads the whole archive, checking every structure and that every cluster of every device
/// is there exactly once. Returns the header and what the archive held.
pub fn verify(
    archive: &ArchivePath,
    progress: Option<Progress<'_>>,
) -> Result<(ArchiveHeader, ArchiveTally)> {
    let reader = open_archive(archive)?;
    let header = reader.header().clone();
    let tally = restore::verify(reader, progress).in_file(archive.display_path(true))?;
    Ok((header, tally))
}

/// How to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Restore only these devices (`-d dev1,dev2`); all when `None`.
    pub devices: Option<Vec<String>>,
    /// Format of the restored images (`-O`): raw or qcow2. The VM state is always raw.
    pub format: ImageFormat,
    /// Options of new qcow2 images (`-o`), as `vimg create -o` takes them.
    pub options: Vec<String>,
    /// What creates the restored images and opens the targets.
    pub opener: Opener,
    /// Existing images or devices to restore devices into, in place ([`prepare_extract`] uses
    /// these; [`ExtractStart::plan`] is given its own).
    pub targets: DeviceTargets,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            devices: None,
            format: ImageFormat::Raw,
            options: Vec::new(),
            opener: Opener::default(),
            targets: DeviceTargets::default(),
        }
    }
}

/// A device an extract restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDevice {
    /// Its id in the archive.
    pub id: u8,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The image it is restored to.
    pub path: PathBuf,
    /// The format of that image.
    pub format: ImageFormat,
    /// Whether that image is an existing target written in place (not a new image in the
    /// target directory).
    pub in_place: bool,
}

/// Files and the directory an extract made, removed on drop unless kept.
#[derive(Debug, Default)]
struct Made {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    keep: bool,
    /// The same files and directory, registered to be removed if a signal stops the process
    /// ([`crate::interrupt`]); unregistered when dropped.
    on_signal: Vec<crate::interrupt::Registered>,
}

impl Made {
    /// Records a file this extract made.
    fn file(&mut self, p: &Path) {
        self.on_signal.push(crate::interrupt::remove_on_signal(p));
        self.files.push(p.to_path_buf());
    }

    /// Records the directory this extract made.
    fn dir(&mut self, d: &Path) {
        self.on_signal
            .push(crate::interrupt::remove_dir_on_signal(d));
        self.dir = Some(d.to_path_buf());
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for f in self.files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            // Only if empty: nothing but what this extract made is removed.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Where one device goes.
enum Output {
    /// A new image in the target directory, under its temporary name until the end.
    New(Box<dyn BlockImage>, PathBuf),
    /// An existing target, written in place; `zeroed`: zero clusters are written as zeros.
    InPlace(Box<dyn BlockImage>, bool),
}

impl Output {
    fn image(&self) -> &dyn BlockImage {
        match self {
            Output::New(i, _) | Output::InPlace(i, _) => i.as_ref(),
        }
    }
}

/// A prepared extract: the archive's header read and checked, the target directory and config
/// files made, the devices' temporary images created and the targets opened. Dropping it
/// without running removes what it made (never a target).
pub struct ExtractPlan {
    reader: VmaReader<Box<dyn Read + Send>>,
    shown: PathBuf,
    devices: Vec<PlannedDevice>,
    /// Per planned device: where it goes.
    outputs: Vec<Output>,
    made: Made,
}

/// Whether `name` can be used as one file name in the target directory.
fn plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

/// What a file is, to tell two names of one target apart: a block device by its device
/// number (two nodes of one device are one target), anything else by device and inode.
fn target_identity(path: &Path) -> Option<(bool, u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    Some(match m.file_type().is_block_device() {
        true => (true, m.rdev(), 0),
        false => (false, m.dev(), m.ino()),
    })
}

/// An extract begun: the archive's header read and checked, the target directory (if any)
/// made with the config files in it. [`ExtractStart::plan`] then takes the targets (for
/// `-r`, read from the map only now, after the caller has printed the archive's contents, as
/// Proxmox's `vma extract -r` does). Dropping it removes what it made.
pub struct ExtractStart {
    reader: VmaReader<Box<dyn Read + Send>>,
    shown: PathBuf,
    /// The archive's identity, to refuse it as a target.
    archive_id: Option<(bool, u64, u64)>,
    dir: Option<PathBuf>,
    opts: ExtractOptions,
    made: Made,
}

/// Reads the header of `archive` and prepares restoring it into `dir`, which must not exist
/// (it is created), with the targets of `opts`. Nothing is written before the header has been
/// checked, and nothing is left behind if preparing fails.
pub fn prepare_extract(
    archive: &ArchivePath,
    dir: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractPlan> {
    begin_extract(archive, Some(dir), opts)?.plan(&opts.targets)
}

/// The first half of [`prepare_extract`]: checks the options, reads and checks the header,
/// makes `dir` (which must not exist) and writes the config files into it. Without `dir`,
/// nothing is made and every device must be given a target in [`ExtractStart::plan`].
pub fn begin_extract(
    archive: &ArchivePath,
    dir: Option<&Path>,
    opts: &ExtractOptions,
) -> Result<ExtractStart> {
    let shown = archive.display_path(true).to_path_buf();
    if !opts.format.driver().target_takes_options() && !opts.options.is_empty() {
        return Err(Error::invalid_input(
            "-o options are for qcow2 images (-O qcow2)",
        ));
    }
    for o in &opts.options {
        let u = crate::qcow2::parse_options(o)?;
        if u.backing_file.is_some() {
            return Err(Error::invalid_input(
                "restored images cannot have a backing file (zero clusters would show its data)",
            ));
        }
    }
    if let Some(dir) = dir {
        if std::fs::symlink_metadata(dir).is_ok() {
            return Err(Error::invalid_input("target directory already exists").with_path(dir));
        }
    }
    let archive_id = match archive {
        ArchivePath::File(p) => target_identity(p),
        ArchivePath::Stdio => target_identity(Path::new("/dev/stdin")),
    };
    let reader = open_archive(archive)?;
    let header = reader.header();
    if let Some(wanted) = &opts.devices {
        for w in wanted {
            if !header.devices.iter().any(|d| &d.name == w) {
                return Err(
                    Error::invalid_input(format!("the archive has no device named '{w}'"))
                        .with_path(&shown),
                );
            }
        }
    }
    let mut made = Made::default();
    if let Some(dir) = dir {
        let mut names: Vec<&str> = Vec::new();
        for c in &header.configs {
            if !plain_file_name(&c.name) || names.contains(&c.name.as_str()) {
                return Err(Error::corrupt(format!(
                    "config name '{}' cannot be restored as a file name in the target \
                     directory{}",
                    c.name.escape_debug(),
                    if names.contains(&c.name.as_str()) {
                        format!(" ('{}' is taken)", c.name.escape_debug())
                    } else {
                        String::new()
                    }
                ))
                .with_path(&shown));
            }
            names.push(&c.name);
        }
        std::fs::create_dir(dir)
            .map_err(|e| Error::io("cannot create target directory", e).with_path(dir))?;
        made.dir(dir);
        for c in &header.configs {
            let p = dir.join(&c.name);
            made.file(&p);
            std::fs::write(&p, &c.data)
                .map_err(|e| Error::io("cannot write config file", e).with_path(&p))?;
        }
    }
    Ok(ExtractStart {
        reader,
        shown,
        archive_id,
        dir: dir.map(Path::to_path_buf),
        opts: opts.clone(),
        made,
    })
}

impl ExtractStart {
    /// The archive's header.
    pub fn header(&self) -> &ArchiveHeader {
        self.reader.header()
    }

    /// Decides where each device goes (its target, or a new image in the directory), opens
    /// and checks the targets and creates the new images.
    ///
    /// A target is opened for writing, never created, truncated, renamed or removed, and
    /// must be at least the device's size; it cannot be the archive, have a backing file, or
    /// be given for two devices.
    pub fn plan(mut self, targets: &DeviceTargets) -> Result<ExtractPlan> {
        let header = self.reader.header().clone();
        let shown = self.shown.clone();
        let opts = &self.opts;
        for t in &targets.list {
            if !header.devices.iter().any(|d| d.name == t.name) {
                return Err(Error::invalid_input(format!(
                    "the archive has no device named '{}'",
                    t.name.escape_debug()
                ))
                .with_path(&shown));
            }
            if targets.list.iter().filter(|o| o.name == t.name).count() > 1 {
                return Err(Error::invalid_input(format!(
                    "device '{}' is given more than one target",
                    t.name.escape_debug()
                )));
            }
            let selected = opts.devices.as_ref().is_none_or(|w| w.contains(&t.name));
            if !selected && !targets.complete {
                return Err(Error::invalid_input(format!(
                    "device '{}' has a target but is not among the devices to restore (-d)",
                    t.name.escape_debug()
                )));
            }
        }
        // Every output name in the directory, checked before anything is written.
        let mut names: Vec<String> = header.configs.iter().map(|c| c.name.clone()).collect();
        let mut claim = |file: String, name: &str| -> Result<String> {
            if !plain_file_name(name) || !plain_file_name(&file) || names.contains(&file) {
                return Err(Error::corrupt(format!(
                    "device name '{}' cannot be restored as a file name in the target \
                     directory{}",
                    name.escape_debug(),
                    if names.contains(&file) {
                        format!(" ('{}' is taken)", file.escape_debug())
                    } else {
                        String::new()
                    }
                ))
                .with_path(&shown));
            }
            names.push(file.clone());
            Ok(file)
        };
        // Per restored device: where it goes (a target, or the temporary name of a new image).
        enum Place<'t> {
            Target(&'t DeviceTarget, &'t Path),
            New(PathBuf),
        }
        let mut devices = Vec::new();
        let mut places = Vec::new();
        for d in &header.devices {
            let selected = opts.devices.as_ref().is_none_or(|w| w.contains(&d.name));
            if !selected {
                continue;
            }
            let target = targets.list.iter().find(|t| t.name == d.name);
            if d.is_vmstate() {
                if target.is_some() {
                    return Err(Error::invalid_input(
                        "the VM state (vmstate) is always restored into the target directory",
                    ));
                }
            } else if let Some(t) = target {
                let Some(path) = &t.path else {
                    continue; // skip=NAME
                };
                devices.push(PlannedDevice {
                    id: d.id,
                    name: d.name.clone(),
                    size: d.size,
                    path: path.clone(),
                    format: t.format,
                    in_place: true,
                });
                places.push(Place::Target(t, path));
                continue;
            } else if targets.complete {
                return Err(Error::invalid_input(format!(
                    "no device name mapping for {}",
                    d.name.escape_debug()
                )));
            }
            let Some(dir) = &self.dir else {
                return Err(Error::invalid_input(format!(
                    "device '{}' has no target, and no target directory is given",
                    d.name.escape_debug()
                )));
            };
            let (file, tmp, format) = if d.is_vmstate() {
                (
                    "vmstate.bin".to_string(),
                    "tmp-vmstate.bin".to_string(),
                    ImageFormat::Raw,
                )
            } else {
                let ext = opts.format.as_str();
                (
                    format!("disk-{}.{ext}", d.name),
                    format!("tmp-disk-{}.{ext}", d.name),
                    opts.format,
                )
            };
            let file = claim(file, &d.name)?;
            let tmp = claim(tmp, &d.name)?;
            devices.push(PlannedDevice {
                id: d.id,
                name: d.name.clone(),
                size: d.size,
                path: dir.join(file),
                format,
                in_place: false,
            });
            places.push(Place::New(dir.join(tmp)));
        }
        // The targets: each once, none the archive.
        let mut seen: Vec<((bool, u64, u64), &str)> = Vec::new();
        for (d, place) in devices.iter().zip(&places) {
            let Place::Target(_, path) = place else {
                continue;
            };
            let Some(id) = target_identity(path) else {
                continue; // Opening it says why not.
            };
            if Some(id) == self.archive_id {
                return Err(Error::invalid_input(format!(
                    "the target of device '{}' is the archive being read",
                    d.name.escape_debug()
                ))
                .with_path(path));
            }
            if let Some((_, other)) = seen.iter().find(|(i, _)| *i == id) {
                return Err(Error::invalid_input(format!(
                    "the target of device '{}' is also the target of device '{}'",
                    d.name.escape_debug(),
                    other.escape_debug()
                ))
                .with_path(path));
            }
            seen.push((id, &d.name));
        }
        // The new images' options are checked before any is made (the vmstate is a plain
        // file of bytes, made without options).
        let options_of = |d: &PlannedDevice| match d.format == opts.format {
            true => opts.options.clone(),
            false => Vec::new(),
        };
        for (d, place) in devices.iter().zip(&places) {
            let Place::New(tmp) = place else { continue };
            crate::ops::create::prepare(&crate::ops::create::CreateArgs {
                format: d.format,
                filename: tmp.to_path_buf(),
                options: options_of(d),
                backing_file: None,
                backing_format: None,
                unsafe_backing: false,
                size: Some(d.size.to_string()),
                opener: opts.opener.clone(),
            })
            .in_file(&d.path)?;
        }
        let mut outputs: Vec<Output> = Vec::new();
        for (d, place) in devices.iter().zip(&places) {
            match place {
                Place::Target(t, path) => {
                    let image = open_target(path, t.format, &opts.opener)?;
                    if image.virtual_size() < d.size {
                        return Err(Error::invalid_input(format!(
                            "target is smaller than device '{}' of the archive ({} < {} bytes)",
                            d.name.escape_debug(),
                            image.virtual_size(),
                            d.size
                        ))
                        .with_path(path));
                    }
                    outputs.push(Output::InPlace(image, !t.reads_zeros));
                }
                Place::New(tmp) => {
                    self.made.file(tmp);
                    let image = d
                        .format
                        .driver()
                        .create_target(
                            tmp,
                            d.size,
                            &options_of(d),
                            (None, None),
                            true,
                            &opts.opener,
                        )
                        .map_err(|e| rename_tmp(e, tmp, &d.path))?;
                    // Metadata is written once, at the end, and nothing waits for the disk
                    // (raw files are not synced, as `convert` does not sync by default); a
                    // failed restore removes the image.
                    image.set_unsafe_cache(true);
                    outputs.push(Output::New(image, tmp.clone()));
                }
            }
        }
        Ok(ExtractPlan {
            reader: self.reader,
            shown,
            devices,
            outputs,
            made: std::mem::take(&mut self.made),
        })
    }
}

/// Opens an existing target for writing in place: never created, and refused if it has a
/// backing file (zero clusters left unwritten would show the backing file's data).
fn open_target(path: &Path, format: ImageFormat, opener: &Opener) -> Result<Box<dyn BlockImage>> {
    if std::fs::symlink_metadata(path).is_err() && !crate::nbd::client::claims(path) {
        return Err(Error::invalid_input(
            "target does not exist (targets are written in place, never created)",
        )
        .with_path(path));
    }
    let image = crate::open::open_image(
        path,
        &crate::open::OpenOptions {
            format: Some(format),
            writable: true,
            no_backing: true,
            opener: opener.clone(),
            ..Default::default()
        },
    )?;
    if image.layer_info()?.backing_filename.is_some() {
        return Err(Error::invalid_input(
            "a restore target cannot have a backing file (zero clusters would show its data)",
        )
        .with_path(path));
    }
    Ok(image)
}

impl ExtractPlan {
    /// The devices to be restored, and where.
    pub fn devices(&self) -> &[PlannedDevice] {
        &self.devices
    }

    /// The archive's header.
    pub fn header(&self) -> &ArchiveHeader {
        self.reader.header()
    }

    /// Restores the archive. Only when every cluster of every device was read, checked and
    /// written are the new images flushed and renamed to their final names; otherwise
    /// everything the extract made is removed. Targets are written in place and flushed at
    /// the end; a failed restore leaves them holding part of the archive.
    pub fn run(mut self, progress: Option<Progress<'_>>) -> Result<ArchiveTally> {
        let mut targets: Vec<Option<&dyn BlockImage>> = vec![None; 256];
        let mut opts = RestoreOptions::default();
        for (d, out) in self.devices.iter().zip(&self.outputs) {
            targets[d.id as usize] = Some(out.image());
            if let Output::InPlace(_, true) = out {
                opts.zero_devices.push(d.id);
            }
        }
        let shown = self.shown.clone();
        let tally = restore::restore(self.reader, &targets, opts, progress).map_err(|e| {
            // A write error names the temporary image; the user knows the final name.
            let mut e = e;
            for (d, out) in self.devices.iter().zip(&self.outputs) {
                if let Output::New(_, tmp) = out {
                    e = rename_tmp(e, tmp, &d.path);
                }
            }
            e.with_path(&shown)
        })?;
        drop(targets);
        for (d, out) in self.devices.iter().zip(self.outputs.drain(..)) {
            match out {
                Output::InPlace(img, _) => img.finish()?,
                Output::New(img, tmp) => {
                    // An image with metadata writes it here (its cache is unsafe: no waiting
                    // for the disk).
                    img.finish().map_err(|e| rename_tmp(e, &tmp, &d.path))?;
                    drop(img);
                    std::fs::rename(&tmp, &d.path)
                        .map_err(|e| Error::io("cannot rename the restored image into place", e))
                        .in_file(&d.path)?;
                    self.made.file(&d.path);
                }
            }
        }
        self.made.keep = true;
        Ok(tally)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_options_are_checked_before_the_archive_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ArchivePath::File(dir.path().join("none.vma"));
        let out = dir.path().join("out");
        let refusal = |format, options: &[&str]| {
            let opts = ExtractOptions {
                format,
                options: options.iter().map(|o| o.to_string()).collect(),
                ..ExtractOptions::default()
            };
            match prepare_extract(&missing, &out, &opts) {
                Ok(_) => panic!("extracted a missing archive"),
                Err(e) => e.to_string(),
            }
        };
        // Raw images take no -o, not even one that convert accepts as changing nothing.
        for o in ["extent_size_hint=1M", "cluster_size=4k"] {
            let e = refusal(ImageFormat::Raw, &[o]);
            assert!(
                e.contains("-o options are for qcow2 images (-O qcow2)"),
                "{e}"
            );
        }
        let e = refusal(ImageFormat::Qcow2, &["backing_file=x"]);
        assert!(e.contains("cannot have a backing file"), "{e}");
        // qcow2 takes its options: what fails then is the missing archive.
        let e = refusal(ImageFormat::Qcow2, &["cluster_size=4k"]);
        assert!(!e.contains("-o") && e.contains("none.vma"), "{e}");
        assert!(!out.exists());
    }
}
