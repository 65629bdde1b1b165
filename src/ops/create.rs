//! `vimg create`: the library side of `vimg create -f qcow2|raw [-o OPTIONS] [-b BACKING -F FMT]
//! [-u] IMAGE [SIZE]`.
//!
//! [`prepare`] turns the command line's pieces into a [`CreatePlan`] without touching any file
//! but the backing file (opened read-only to check it and, when SIZE is omitted, to take its
//! virtual size); [`CreatePlan::formatting_line`] is the line qemu-img prints before creating;
//! [`CreatePlan::execute`] writes the image. [`options_help`] is the `-o help` text. Nothing
//! here prints.
//!
//! The command hands its pieces to the format's driver as a [`CreateCommand`]
//! ([`crate::block::FormatDriver::prepare_create`] returns its [`FormatCreation`]): the
//! format parses the `-o` options it takes ([`crate::qcow2::CreateRequest`], which also makes
//! qemu-img's checks of a backing file's name), and writes the image: qcow2 images by
//! [`crate::qcow2::create()`] (qcow2.rst "Header", "Host cluster management", "Cluster
//! mapping"), raw images by [`crate::raw::create`]. What needs the command, opening the
//! backing file with its chain through the command's opener, is here ([`prepare`] hands it to
//! the format as [`CreateCommand::open_backing`]).

use crate::block::{BlockImage, ImageFormat};
use crate::chain::same_file_or_name;
use crate::creation::{BackingToOpen, CreateCommand, FormatCreation};
use crate::error::{Error, Result};
use crate::open::{open_image, OpenOptions};
use crate::opener::Opener;
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
    /// What opens the backing file (and its chain) to check it.
    pub opener: Opener,
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

pub use crate::foreign::KNOWN_FORMATS;

/// Whether the `-o` arguments ask for the option list (`help` or `?` as an item, as qemu's
/// `has_help_option` finds it); an argument qemu-img refuses as an option list is refused
/// ([`crate::option_desc::has_help_option`]).
pub fn wants_help(options: &[String]) -> Result<bool> {
    crate::option_desc::has_help_option(options)
}

/// The `-o help` text of `create -f FORMAT` and `convert -O FORMAT`, as qemu-img prints it
/// (`print_block_option_help`): without a file name, the format's options and a note that the
/// protocol may take more; with the new image's `filename`, the format's options and those of
/// the protocol that name is written through, under one heading.
pub fn options_help(format: ImageFormat, filename: Option<&str>) -> Result<String> {
    use crate::option_desc::{help_lines, protocol_options};
    let own = format.driver().create_option_help();
    if own.is_empty() {
        return Err(Error::unsupported(format!(
            "Format driver '{}' does not support image creation",
            format.as_str()
        )));
    }
    Ok(match filename {
        Some(name) => format!(
            "Supported options:\n{}",
            help_lines(&[own, protocol_options(name)?])
        ),
        None => format!(
            "Supported {} options:\n{}\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
            format.as_str(),
            help_lines(&[own])
        ),
    })
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
    let opener = &args.opener;
    let open = move |b: &BackingToOpen<'_>| open_backing(b, opener);
    let command = CreateCommand {
        path: &args.filename,
        options: &args.options,
        backing_file: args.backing_file.as_deref(),
        backing_format: args.backing_format.as_deref(),
        size: args.size.as_deref(),
        open_backing: match args.unsafe_backing {
            true => None,
            false => Some(&open),
        },
        opener,
    };
    Ok(CreatePlan {
        path: args.filename.clone(),
        creation: args.format.driver().prepare_create(&command)?,
    })
}

/// Opens the backing file a new image is to record, with its chain, through `opener`: qemu-img's
/// checks (`bdrv_img_create`) that it opens in the given format (which must be given), that
/// the new image's data file is not the backing file, and that neither the new image nor its
/// data file is a file of that chain. Returns the backing file's virtual size.
fn open_backing(b: &BackingToOpen<'_>, opener: &Opener) -> Result<u64> {
    let file_err = |what: String| Error::invalid_input(what).with_path(b.image);
    let format = b.format.map(ImageFormat::from_name).transpose()?;
    // As qemu-img, without guest I/O (BDRV_O_NO_IO): an encrypted backing file needs no key,
    // nor an external data file its data file.
    let was = opener.metadata_only();
    opener.set_metadata_only(true);
    let img = open_image(
        b.backing,
        &OpenOptions {
            format,
            opener: opener.clone(),
            ..OpenOptions::default()
        },
    );
    opener.set_metadata_only(was);
    let img = img.map_err(|e| {
        Error::new(
            e.kind(),
            format!("{}\nCould not open backing image.", e.while_opening()),
        )
        .with_path(b.image)
    })?;
    if b.format.is_none() {
        return Err(file_err(format!(
            "Backing file specified without backing format\nDetected format of {}.",
            img.format()
        )));
    }
    let data = match b.data_file {
        Some(d) => Some(opener.resolve(b.image, d)?),
        None => None,
    };
    if data
        .as_deref()
        .is_some_and(|d| same_file_or_name(b.backing, d))
    {
        return Err(file_err(
            "the external data file cannot be the backing file".into(),
        ));
    }
    refuse_over_chain(b.image, data.as_deref(), img.as_ref())?;
    Ok(img.virtual_size())
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
            opener: Default::default(),
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
        assert!(wants_help(&["cluster_size=4k,help".to_string()]).unwrap());
        assert!(options_help(q, None).unwrap().contains("refcount_bits"));
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
