//! `vimg create`: the library side of `vimg create -f qcow2|raw [-o OPTIONS] [-b BACKING -F FMT]
//! [-u] IMAGE [SIZE]`.
//!
//! [`prepare`] turns the command line's pieces into a [`CreatePlan`] without touching any file
//! but the backing file (opened read-only to check it and, when SIZE is omitted, to take its
//! virtual size); [`CreatePlan::formatting_line`] is the line qemu-img prints before creating;
//! [`CreatePlan::execute`] writes the image. [`options_help`] is the `-o help` text. Nothing
//! here prints.
//!
//! What is common to every format is here: the `-o` options merged, `-b`/`-F`, the size, and
//! the checks of a backing file ([`CreateRequest::check_backing`], for a format that records
//! one). The rest is the format's ([`crate::block::FormatDriver::prepare_create`] returns its
//! [`FormatCreation`]): qcow2 images are written by [`crate::qcow2::create()`] (qcow2.rst
//! "Header", "Host cluster management", "Cluster mapping"), raw images by
//! [`crate::raw::create`].

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, Result};
use crate::open::{open_image, resolve_relative, OpenOptions};
use crate::ops::size::parse_size;
use crate::qcow2::{parse_options, OptionUpdates};
use std::path::{Path, PathBuf};

/// The pieces of a `vimg create` command line.
#[derive(Debug, Clone)]
pub struct CreateArgs {
    /// `-f`: the format of the new image.
    pub format: ImageFormat,
    /// IMAGE: the file to create (an existing file is truncated, as qemu-img does).
    pub filename: PathBuf,
    /// Each `-o` argument, in command-line order (later options win).
    pub options: Vec<String>,
    /// `-b`: the backing file name, recorded as given (relative names are relative to IMAGE).
    pub backing_file: Option<String>,
    /// `-F`: the backing file's format.
    pub backing_format: Option<String>,
    /// `-u`: do not open the backing file (it need not exist; SIZE is then required).
    pub unsafe_backing: bool,
    /// SIZE as typed (`64M`, `1.5G`, `65536`); `None` takes the backing file's size.
    pub size: Option<String>,
}

/// A validated create request, ready to run: the format's part of it
/// ([`crate::block::FormatDriver::prepare_create`]).
#[derive(Debug)]
pub struct CreatePlan {
    /// The file to create.
    path: PathBuf,
    /// What the format writes.
    creation: Box<dyn FormatCreation>,
}

/// A format's checked create request, ready to write (returned by
/// [`crate::block::FormatDriver::prepare_create`]).
pub trait FormatCreation: std::fmt::Debug + Send + Sync {
    /// The line qemu-img prints before creating (see [`CreatePlan::formatting_line`]).
    fn formatting_line(&self) -> String;

    /// Writes the image (truncating an existing file). A failed create removes the files it
    /// made; its own checks that qemu-img makes after the "Formatting" line come first.
    fn execute(&self) -> Result<()>;
}

/// What a format's [`crate::block::FormatDriver::prepare_create`] is given: the command line's pieces that
/// are common to every format, parsed.
#[derive(Debug, Clone, Copy)]
pub struct CreateRequest<'a> {
    /// The file to create.
    pub path: &'a Path,
    /// The `-o` options merged in order, with `-b`/`-F` applied over `backing_file` and
    /// `backing_fmt`.
    pub given: &'a OptionUpdates,
    /// The size given as SIZE or `-o size`, if any.
    pub size: Option<u64>,
    /// `-u`: the backing file is not opened.
    pub unsafe_backing: bool,
}

impl CreateRequest<'_> {
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
    /// format, and unless `-u` the backing file itself, opened with its chain (which also
    /// proves the format right; the new image and its data file may not be part of that
    /// chain). Returns the size of the new image: as given, else the backing file's.
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
            if same_file(&bpath, self.path) || Path::new(name) == self.path {
                return Err(file_err(
                    "Error: Trying to create an image with the same filename as the \
                     backing file"
                        .into(),
                ));
            }
            if let Some(fmt) = &given.backing_fmt {
                if !KNOWN_FORMATS.contains(&fmt.as_str()) {
                    return Err(file_err(if self.unsafe_backing {
                        format!("Parameter 'backing-fmt' does not accept value '{fmt}'")
                    } else {
                        format!("Unknown driver '{fmt}'\nCould not open backing image.")
                    }));
                }
            }
            if !self.unsafe_backing {
                let format = given
                    .backing_fmt
                    .as_deref()
                    .map(ImageFormat::from_name)
                    .transpose()?;
                let img = open_image(
                    &bpath,
                    &OpenOptions {
                        format,
                        writable: false,
                        no_backing: false,
                        ..OpenOptions::default()
                    },
                )
                .map_err(|e| {
                    Error::new(
                        e.kind(),
                        format!("{}\nCould not open backing image.", e.while_opening()),
                    )
                    .with_path(self.path)
                })?;
                if given.backing_fmt.is_none() {
                    return Err(file_err(format!(
                        "Backing file specified without backing format\nDetected format of \
                         {}.",
                        img.format()
                    )));
                }
                let data = match &given.data_file {
                    Some(d) => Some(resolve_relative(self.path, d)?),
                    None => None,
                };
                if data.as_deref().is_some_and(|d| same_file(&bpath, d)) {
                    return Err(file_err(
                        "the external data file cannot be the backing file".into(),
                    ));
                }
                refuse_over_chain(self.path, data.as_deref(), img.as_ref())?;
                size = size.or(Some(img.virtual_size()));
            }
        }
        self.required_size(size)
    }
}

/// Formats qemu-img knows as backing formats; with `-u` any of them may be recorded, since the
/// backing file is not opened. Without `-u` vimg must open it, so only raw and qcow2 work.
pub const KNOWN_FORMATS: &[&str] = &[
    "raw",
    "qcow2",
    "qcow",
    "qed",
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "parallels",
    "luks",
    "dmg",
    "bochs",
    "cloop",
    "vvfat",
    "file",
    "host_device",
    "nbd",
];

/// Whether any `-o` argument asks for the option list (`help` or `?`).
pub fn wants_help(options: &[String]) -> bool {
    options.iter().any(|o| {
        crate::qcow2::split_option_list(o)
            .map(|items| items.iter().any(|i| i == "help" || i == "?"))
            .unwrap_or(false)
    })
}

/// The `-o help` text for `format`: the options `vimg create` accepts, one per line with a
/// short description.
pub fn options_help(format: ImageFormat) -> String {
    let rows = format.driver().create_option_help();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = format!("Options for creating {} images:\n", format.as_str());
    for (k, d) in rows {
        s.push_str(&format!("  {k:<width$}  {d}\n"));
    }
    s
}

fn parse_all(options: &[String]) -> Result<OptionUpdates> {
    let mut u = OptionUpdates::default();
    for o in options {
        u.merge(parse_options(o)?);
    }
    Ok(u)
}

/// Whether `a` and `b` are the same file: by device and inode (so that links are caught), or
/// by name where either does not exist.
fn same_file(a: &Path, b: &Path) -> bool {
    use crate::identity::FileId;
    match (FileId::of(a), FileId::of(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Refuses to create `path` (or its external data file `data`) over a file the new image's
/// backing chain `backing` reads: creating it would destroy that chain.
fn refuse_over_chain(path: &Path, data: Option<&Path>, backing: &dyn BlockImage) -> Result<()> {
    for (target, what) in [(Some(path), "image"), (data, "external data file")] {
        let Some(target) = target else { continue };
        if let Some(f) = crate::identity::read_by(target, &[backing]) {
            return Err(Error::new(
                crate::error::ErrorKind::Locked,
                format!(
                    "Error: Trying to create an {what} over a file of its own backing chain: \
                     it is {} ({})",
                    match f.role {
                        crate::identity::Role::DataFile => "an external data file",
                        _ => "a backing file",
                    },
                    f.path.display()
                ),
            )
            .with_path(target));
        }
    }
    Ok(())
}

/// Checks the command line and works out what to create: parses and merges the `-o` options,
/// applies `-b`/`-F` (which win over `-o backing_file`/`backing_fmt`), takes the size from
/// SIZE, `-o size` or the backing file, and validates the result. Unless `-u` is given, the
/// backing file is opened with the given format (relative to the image's directory), which
/// also proves that the format is right.
pub fn prepare(args: &CreateArgs) -> Result<CreatePlan> {
    let mut given = parse_all(&args.options)?;
    if given.help {
        return Err(Error::invalid_input(
            "-o help asks for the option list, not an image (see options_help)",
        ));
    }
    if let Some(b) = &args.backing_file {
        given.backing_file = Some(b.clone());
    }
    if let Some(f) = &args.backing_format {
        given.backing_fmt = Some(f.clone());
    }
    let positional = match &args.size {
        Some(t) => Some(parse_size(t)?),
        None => None,
    };
    if positional.is_some() && given.size.is_some() {
        return Err(Error::invalid_input(
            "the image size must be given only once (SIZE or -o size)",
        ));
    }
    let size = positional.or(given.size);
    let request = CreateRequest {
        path: &args.filename,
        given: &given,
        size,
        unsafe_backing: args.unsafe_backing,
    };
    Ok(CreatePlan {
        path: args.filename.clone(),
        creation: args.format.driver().prepare_create(&request)?,
    })
}

impl CreatePlan {
    /// The line qemu-img prints before creating, e.g. `Formatting 'disk.qcow2', fmt=qcow2
    /// cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824
    /// lazy_refcounts=off refcount_bits=16`: the format's main options in qemu-img's order,
    /// with `preallocation`, `compat` and `data_file_raw` only when given. Values are shown
    /// normalised (`compat=1.1` for `v3`, `on`/`off` for booleans).
    pub fn formatting_line(&self) -> String {
        self.creation.formatting_line()
    }

    /// Creates the image (truncating an existing file, as qemu-img does). A failed create
    /// removes the files it made.
    pub fn execute(&self) -> Result<()> {
        // A file this makes is removed if a signal stops it half-made; an existing one (already
        // truncated by then) is left.
        let _partial = match std::fs::symlink_metadata(&self.path) {
            Err(_) => crate::interrupt::remove_on_signal(&self.path),
            Ok(_) => crate::interrupt::Registered::none(),
        };
        self.creation.execute()
    }
}

/// Prepares and runs a create request; returns the formatting line to print on success.
pub fn create(args: &CreateArgs) -> Result<String> {
    let plan = prepare(args)?;
    plan.execute()?;
    Ok(plan.formatting_line())
}

pub use crate::raw::create::create_raw;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prealloc::Preallocation;

    fn args(format: ImageFormat, file: &Path, opts: &[&str], size: Option<&str>) -> CreateArgs {
        CreateArgs {
            format,
            filename: file.to_path_buf(),
            options: opts.iter().map(|s| s.to_string()).collect(),
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
            size: size.map(str::to_string),
        }
    }

    #[test]
    fn formatting_lines_follow_qemu() {
        let p = Path::new("a.qcow2");
        let plan = prepare(&args(ImageFormat::Qcow2, p, &[], Some("1G"))).unwrap();
        assert_eq!(
            plan.formatting_line(),
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
             compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"
        );
        let plan = prepare(&args(
            ImageFormat::Qcow2,
            p,
            &[
                "data_file=d.raw,data_file_raw=on",
                "preallocation=falloc,compat=v3",
            ],
            Some("1M"),
        ))
        .unwrap();
        assert_eq!(
            plan.formatting_line(),
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
             preallocation=falloc compression_type=zlib size=1048576 compat=1.1 \
             data_file=d.raw data_file_raw=on lazy_refcounts=off refcount_bits=16"
        );
        let plan = prepare(&args(
            ImageFormat::Raw,
            Path::new("a.raw"),
            &["preallocation=full"],
            Some("1000"),
        ))
        .unwrap();
        assert_eq!(
            plan.formatting_line(),
            "Formatting 'a.raw', fmt=raw size=1000 preallocation=full"
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let p = Path::new("/nonexistent-dir/a.qcow2");
        let q = ImageFormat::Qcow2;
        for (a, want) in [
            (args(q, p, &[], None), "needs a size"),
            (args(q, p, &["size=1M"], Some("1M")), "only once"),
            (
                args(ImageFormat::Raw, p, &["cluster_size=4k"], Some("1M")),
                "Invalid parameter 'cluster_size'",
            ),
            (
                args(q, p, &["backing_file=b"], Some("1M")),
                "Could not open backing image",
            ),
        ] {
            let e = prepare(&a).unwrap_err();
            assert!(e.to_string().contains(want), "{a:?}: {e}");
        }
        // Refused after the "Formatting" line, as by qemu-img, before anything is created.
        let a = args(ImageFormat::Raw, p, &["preallocation=metadata"], Some("1M"));
        let e = prepare(&a).unwrap().execute().unwrap_err();
        assert!(
            e.to_string()
                .contains("Unsupported preallocation mode: metadata"),
            "{e}"
        );
        let mut a = args(q, p, &[], None);
        a.backing_file = Some("b.raw".into());
        a.backing_format = Some("raw".into());
        a.unsafe_backing = true;
        assert!(prepare(&a)
            .unwrap_err()
            .to_string()
            .contains("needs a size"));
        a.size = Some("1M".into());
        assert!(prepare(&a).is_ok());
        a.backing_format = Some("foo".into());
        assert!(prepare(&a)
            .unwrap_err()
            .to_string()
            .contains("Parameter 'backing-fmt' does not accept value 'foo'"));
        assert!(wants_help(&["cluster_size=4k,help".to_string()]));
        assert!(options_help(q).contains("refcount_bits"));
    }

    #[test]
    fn size_comes_from_the_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        create_raw(&base, 3 << 20, Preallocation::Off).unwrap();
        let top = dir.path().join("top.qcow2");
        let mut a = args(ImageFormat::Qcow2, &top, &[], None);
        a.backing_file = Some("base.raw".into());
        a.backing_format = Some("raw".into());
        let line = create(&a).unwrap();
        assert!(
            line.contains("size=3145728 backing_file=base.raw backing_fmt=raw"),
            "{line}"
        );
        let img = open_image(&top, &OpenOptions::default()).unwrap();
        assert_eq!(img.virtual_size(), 3 << 20);
        // The wrong format for the backing file is an error, and nothing is created.
        let other = dir.path().join("other.qcow2");
        let mut a = args(ImageFormat::Qcow2, &other, &[], None);
        a.backing_file = Some("base.raw".into());
        a.backing_format = Some("qcow2".into());
        assert!(create(&a).is_err());
        assert!(!other.exists());
        // An image cannot back itself.
        let mut a = args(ImageFormat::Qcow2, &top, &[], Some("1M"));
        a.backing_file = Some("top.qcow2".into());
        a.backing_format = Some("qcow2".into());
        assert!(create(&a)
            .unwrap_err()
            .to_string()
            .contains("same filename as the backing file"));
    }
}
