//! `create -f qcow2`: a checked request ([`Qcow2Creation`]), its "Formatting" line, and the
//! write, by [`super::create`].

use super::options::{parse_options, CreateOptions, OptionUpdates};
use crate::chain::{resolve_relative, same_file_or_name};
use crate::creation::{BackingToOpen, CreateCommand, FormatCreation, OpenBacking};
use crate::error::{Error, Result, ResultExt};
use crate::foreign::KNOWN_FORMATS;
use crate::opener::Opener;
use crate::qcow2::format::header::CompressionType;
use crate::size::parse_size;
use std::path::{Path, PathBuf};

/// A create request parsed for a format: the `-o` options merged in order, `-b`/`-F` over
/// `backing_file`/`backing_fmt`, and the size, with qemu-img's checks and words. The `-o`
/// options are qcow2's set (the widest); a format refuses those it does not take. Built by
/// [`CreateRequest::parse`] from a [`CreateCommand`].
#[derive(Clone, Copy)]
pub struct CreateRequest<'a> {
    /// The file to create.
    pub path: &'a Path,
    /// The `-o` options merged in order, with `-b`/`-F` applied over `backing_file` and
    /// `backing_fmt`.
    pub given: &'a OptionUpdates,
    /// The size given as SIZE or `-o size`, if any.
    pub size: Option<u64>,
    /// Opens the backing file to check it; `None` for `-u`.
    pub open_backing: Option<&'a OpenBacking<'a>>,
    /// What creates the image's files.
    pub opener: &'a Opener,
}

impl<'a> CreateRequest<'a> {
    /// Parses `command`'s options into `given` (which the request borrows) as qemu-img does:
    /// the `-o` arguments merged in order (an invalid one refused first), `-o help` refused
    /// (it asks for the option list), `-b`/`-F` over `-o backing_file`/`backing_fmt`, then
    /// SIZE, which may not be given twice.
    pub fn parse(command: &CreateCommand<'a>, given: &'a mut OptionUpdates) -> Result<Self> {
        *given = OptionUpdates::default();
        for o in command.options {
            // qemu-img create names the file in every error of bdrv_img_create.
            given.merge(parse_options(o).in_file(command.path)?);
        }
        if given.help {
            return Err(Error::invalid_input(
                "-o help asks for the option list, not an image (see options_help)",
            ));
        }
        if let Some(b) = command.backing_file {
            given.backing_file = Some(b.to_string());
        }
        if let Some(f) = command.backing_format {
            given.backing_fmt = Some(f.to_string());
        }
        let positional = match command.size {
            Some(t) => Some(parse_size(t)?),
            None => None,
        };
        if positional.is_some() && given.size.is_some() {
            return Err(Error::invalid_input(
                "the image size must be given only once (SIZE or -o size)",
            ));
        }
        let size = positional.or(given.size);
        Ok(CreateRequest {
            path: command.path,
            given,
            size,
            open_backing: command.open_backing,
            opener: command.opener,
        })
    }

    /// An error about the new image, as qemu-img words it (the file named first).
    pub fn file_error(&self, what: impl Into<String>) -> Error {
        Error::invalid_input(what.into()).with_path(self.path)
    }

    /// The size of the new image: as given, else refused in qemu-img's words.
    pub fn required_size(&self, size: Option<u64>) -> Result<u64> {
        size.ok_or_else(|| self.file_error("Image creation needs a size parameter"))
    }

    /// The checks qemu-img makes on a backing file before it prints its "Formatting" line, in
    /// its order and words (`bdrv_img_create`), for a format that records one: the name, the
    /// format, and unless `-u` the backing file itself, opened with its chain by the command
    /// ([`CreateCommand::open_backing`], which also proves the format right and refuses a
    /// chain the new image or its data file would overwrite). Returns the size of the new
    /// image: as given, else the backing file's.
    pub fn check_backing(&self) -> Result<u64> {
        let given = self.given;
        let mut size = self.size;
        let file_err = |what: String| self.file_error(what);
        if let Some(name) = &given.backing_file {
            if name.is_empty() {
                return Err(file_err(
                    "Expected backing file name, got empty string".into(),
                ));
            }
            let bpath = resolve_relative(self.path, name)?;
            if same_file_or_name(&bpath, self.path) || Path::new(name) == self.path {
                return Err(file_err(
                    "Error: Trying to create an image with the same filename as the \
                     backing file"
                        .into(),
                ));
            }
            if let Some(fmt) = &given.backing_fmt {
                if !KNOWN_FORMATS.contains(&fmt.as_str()) {
                    return Err(file_err(if self.open_backing.is_none() {
                        format!("Parameter 'backing-fmt' does not accept value '{fmt}'")
                    } else {
                        format!("Unknown driver '{fmt}'\nCould not open backing image.")
                    }));
                }
            }
            if let Some(open) = self.open_backing {
                let virtual_size = open(&BackingToOpen {
                    image: self.path,
                    backing: &bpath,
                    format: given.backing_fmt.as_deref(),
                    data_file: given.data_file.as_deref(),
                })?;
                size = size.or(Some(virtual_size));
            }
        }
        self.required_size(size)
    }
}

/// Options accepted but irrelevant to the figures; they are dropped before parsing.
const IGNORED_KEYS: &[&str] = &["encryption", "nocow", "extent_size_hint"];

/// Checks the `-o` arguments against the target format's option names `keys` (qemu's
/// "Invalid parameter" message) and parses the relevant ones; `size` (`--size`), if given,
/// wins over `-o size`. With `encryption`, `encrypt.*` options are taken (the format's
/// creation options include them). For a driver's
/// [`crate::block::FormatDriver::measure`].
pub(crate) fn parse_target_options(
    options: &[String],
    size: Option<u64>,
    keys: &[&str],
    encryption: bool,
) -> Result<OptionUpdates> {
    let mut u = OptionUpdates::default();
    for o in options {
        let mut kept = Vec::new();
        for item in crate::option_list::split(o)? {
            let (key, _) = crate::option_list::key_value(&item);
            if key.starts_with("encrypt.") && encryption {
                // The LUKS header adds to the figures; legacy AES adds nothing.
                kept.push(item.replace(',', ",,"));
                continue;
            }
            if !keys.contains(&key) {
                return Err(Error::invalid_input(format!("Invalid parameter '{key}'")));
            }
            if !IGNORED_KEYS.contains(&key) {
                kept.push(item.replace(',', ",,"));
            }
        }
        if !kept.is_empty() {
            u.merge(parse_options(&kept.join(","))?);
        }
    }
    if let Some(s) = size {
        u.size = Some(s);
    }
    Ok(u)
}

/// A checked `create -f qcow2` request.
#[derive(Debug, Clone)]
pub(crate) struct Qcow2Creation {
    /// The file to create.
    path: PathBuf,
    /// The complete options.
    options: Box<CreateOptions>,
    /// What creates the files.
    opener: Opener,
    /// The `-o` options as given (the formatting line shows some only when given).
    given: Box<OptionUpdates>,
}

impl Qcow2Creation {
    /// The checks qemu-img makes before it prints its "Formatting" line, in its order and
    /// words (`bdrv_img_create`: the backing file, then the size); the format's own checks
    /// ([`CreateOptions::validate`]) follow when the image is written, after that line, as in
    /// qemu-img.
    pub(crate) fn prepare(request: &CreateRequest<'_>) -> Result<Self> {
        let mut options = CreateOptions::default();
        options.apply(request.given);
        options.size = request.check_backing()?;
        Ok(Qcow2Creation {
            path: request.path.to_path_buf(),
            options: Box::new(options),
            opener: request.opener.clone(),
            given: Box::new(request.given.clone()),
        })
    }
}

impl FormatCreation for Qcow2Creation {
    /// E.g. `Formatting 'disk.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off
    /// compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16`: the main
    /// options in qemu-img's order, with `preallocation`, `compat` and `data_file_raw` only
    /// when given. Values are shown normalised (`compat=1.1` for `v3`, `on`/`off` for
    /// booleans).
    fn formatting_line(&self) -> String {
        let onoff = |b: bool| if b { "on" } else { "off" };
        let (o, given) = (&self.options, &self.given);
        let mut s = format!(
            "Formatting '{}', fmt=qcow2{} cluster_size={} extended_l2={}",
            self.path.display(),
            o.encrypt.formatting(),
            o.cluster_size,
            onoff(o.extended_l2)
        );
        if given.preallocation.is_some() {
            s.push_str(&format!(" preallocation={}", o.preallocation.as_str()));
        }
        let ct = match o.compression_type {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        };
        s.push_str(&format!(" compression_type={ct} size={}", o.size));
        if given.compat.is_some() {
            s.push_str(&format!(" compat={}", o.compat.as_str()));
        }
        if let Some(b) = &o.backing_file {
            // qemu prints option values with their commas doubled.
            s.push_str(&format!(" backing_file={}", b.replace(',', ",,")));
        }
        if let Some(f) = &o.backing_fmt {
            s.push_str(&format!(" backing_fmt={f}"));
        }
        if let Some(d) = &o.data_file {
            s.push_str(&format!(" data_file={d}"));
        }
        if given.data_file_raw.is_some() {
            s.push_str(&format!(" data_file_raw={}", onoff(o.data_file_raw)));
        }
        s.push_str(&format!(
            " lazy_refcounts={} refcount_bits={}",
            onoff(o.lazy_refcounts),
            // Signed, as qemu prints it (a negative width given wrapped around).
            o.refcount_bits as i64
        ));
        s
    }

    fn execute(&self) -> Result<()> {
        super::create_with(&self.opener, &self.path, &self.options)
            .map_err(|e| e.with_path(&self.path))
    }
}
