//! `vimg create`: the library side of `vimg create -f qcow2|raw [-o OPTIONS] [-b BACKING -F FMT]
//! [-u] IMAGE [SIZE]`.
//!
//! [`prepare`] turns the command line's pieces into a [`CreatePlan`] without touching any file
//! but the backing file (opened read-only to check it and, when SIZE is omitted, to take its
//! virtual size); [`CreatePlan::formatting_line`] is the line qemu-img prints before creating;
//! [`CreatePlan::execute`] writes the image. [`options_help`] is the `-o help` text. Nothing
//! here prints.
//!
//! qcow2 images are written by [`crate::qcow2::create`] (qcow2.rst "Header", "Host cluster
//! management", "Cluster mapping"); raw images by [`create_raw`].

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, Result};
use crate::open::{open_image, resolve_relative, OpenOptions};
use crate::ops::size::parse_size;
use crate::prealloc::{grow_file, Preallocation};
use crate::qcow2::{
    create_file, parse_options, round_size, CompressionType, CreateOptions, OptionUpdates,
};
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

/// A validated create request, ready to run.
#[derive(Debug, Clone)]
pub enum CreatePlan {
    /// A raw image.
    Raw {
        /// The file to create.
        path: PathBuf,
        /// Size in bytes as requested (rounded up to 512 bytes when written).
        size: u64,
        /// Preallocation mode.
        preallocation: Preallocation,
        /// Whether `preallocation` was given explicitly (it is then shown in the
        /// formatting line).
        preallocation_given: bool,
    },
    /// A qcow2 image.
    Qcow2 {
        /// The file to create.
        path: PathBuf,
        /// The complete options.
        options: Box<CreateOptions>,
        /// The `-o` options as given (the formatting line shows some only when given).
        given: Box<OptionUpdates>,
    },
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
    let mut size = positional.or(given.size);

    if args.format == ImageFormat::Raw {
        // qemu-img's checks before its "Formatting" line, in its words.
        let file_err = |what: String| Error::invalid_input(what).with_path(&args.filename);
        let extra: Vec<&str> = given
            .given_keys()
            .into_iter()
            .filter(|k| *k != "size" && *k != "preallocation")
            .collect();
        if let Some(k) = extra.first() {
            return Err(file_err(if k.starts_with("backing") {
                "Backing file not supported for file format 'raw'".to_string()
            } else {
                format!("Invalid parameter '{k}'")
            }));
        }
        let preallocation = given.preallocation.unwrap_or_default();
        let size = size.ok_or_else(|| file_err("Image creation needs a size parameter".into()))?;
        Ok(CreatePlan::Raw {
            path: args.filename.clone(),
            size,
            preallocation,
            preallocation_given: given.preallocation.is_some(),
        })
    } else {
        let mut opts = CreateOptions::default();
        opts.apply(&given);
        // The checks qemu-img makes before it prints its "Formatting" line, in its order
        // and words (bdrv_img_create); the format's own checks (CreateOptions::validate)
        // follow when the plan is executed, after that line, as in qemu-img.
        let file_err = |what: String| Error::invalid_input(what).with_path(&args.filename);
        if let Some(name) = &opts.backing_file {
            if name.is_empty() {
                return Err(file_err(
                    "Expected backing file name, got empty string".into(),
                ));
            }
            let bpath = resolve_relative(&args.filename, name)?;
            if same_file(&bpath, &args.filename) || Path::new(name) == args.filename {
                return Err(file_err(
                    "Error: Trying to create an image with the same filename as the \
                     backing file"
                        .into(),
                ));
            }
            if let Some(fmt) = &opts.backing_fmt {
                if !KNOWN_FORMATS.contains(&fmt.as_str()) {
                    return Err(file_err(if args.unsafe_backing {
                        format!("Parameter 'backing-fmt' does not accept value '{fmt}'")
                    } else {
                        format!("Unknown driver '{fmt}'\nCould not open backing image.")
                    }));
                }
            }
            if !args.unsafe_backing {
                let format = opts
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
                    .with_path(&args.filename)
                })?;
                if opts.backing_fmt.is_none() {
                    return Err(file_err(format!(
                        "Backing file specified without backing format\nDetected format of \
                         {}.",
                        img.format()
                    )));
                }
                let data = match &opts.data_file {
                    Some(d) => Some(resolve_relative(&args.filename, d)?),
                    None => None,
                };
                if data.as_deref().is_some_and(|d| same_file(&bpath, d)) {
                    return Err(file_err(
                        "the external data file cannot be the backing file".into(),
                    ));
                }
                refuse_over_chain(&args.filename, data.as_deref(), img.as_ref())?;
                size = size.or(Some(img.virtual_size()));
            }
        }
        let size = size.ok_or_else(|| file_err("Image creation needs a size parameter".into()))?;
        opts.size = size;
        Ok(CreatePlan::Qcow2 {
            path: args.filename.clone(),
            options: Box::new(opts),
            given: Box::new(given),
        })
    }
}

impl CreatePlan {
    /// The line qemu-img prints before creating, e.g. `Formatting 'disk.qcow2', fmt=qcow2
    /// cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824
    /// lazy_refcounts=off refcount_bits=16`: the format's main options in qemu-img's order,
    /// with `preallocation`, `compat` and `data_file_raw` only when given. Values are shown
    /// normalised (`compat=1.1` for `v3`, `on`/`off` for booleans).
    pub fn formatting_line(&self) -> String {
        let onoff = |b: bool| if b { "on" } else { "off" };
        match self {
            CreatePlan::Raw {
                path,
                size,
                preallocation,
                preallocation_given,
            } => {
                let mut s = format!("Formatting '{}', fmt=raw size={size}", path.display());
                if *preallocation_given {
                    s.push_str(&format!(" preallocation={}", preallocation.as_str()));
                }
                s
            }
            CreatePlan::Qcow2 {
                path,
                options: o,
                given,
            } => {
                let mut s = format!(
                    "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={}",
                    path.display(),
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
        }
    }

    /// Creates the image (truncating an existing file, as qemu-img does). A failed create
    /// removes the files it made.
    pub fn execute(&self) -> Result<()> {
        // A file this makes is removed if a signal stops it half-made; an existing one (already
        // truncated by then) is left.
        let path = match self {
            CreatePlan::Raw { path, .. } | CreatePlan::Qcow2 { path, .. } => path,
        };
        let _partial = match std::fs::symlink_metadata(path) {
            Err(_) => crate::interrupt::remove_on_signal(path),
            Ok(_) => crate::interrupt::Registered::none(),
        };
        match self {
            CreatePlan::Raw {
                path,
                size,
                preallocation,
                ..
            } => {
                // After the "Formatting" line, as qemu-img refuses it.
                if *preallocation == Preallocation::Metadata {
                    return Err(
                        Error::invalid_input("Unsupported preallocation mode: metadata")
                            .with_path(path),
                    );
                }
                create_raw(path, *size, *preallocation)
            }
            CreatePlan::Qcow2 { path, options, .. } => {
                crate::qcow2::create(path, options).map_err(|e| e.with_path(path))
            }
        }
    }
}

/// Prepares and runs a create request; returns the formatting line to print on success.
pub fn create(args: &CreateArgs) -> Result<String> {
    let plan = prepare(args)?;
    plan.execute()?;
    Ok(plan.formatting_line())
}

/// Creates (or truncates) the raw image at `path` with `size` bytes, rounded up to whole
/// 512-byte sectors as qemu does, preallocated as `mode` says: `Off` sparse, `Falloc`
/// fallocated, `Full` written with zeros (`Metadata` has no meaning for raw files and is
/// refused). Like qemu-img, the first 4 KiB are written so that the file's block size can be
/// probed. A failed create removes the file.
pub fn create_raw(path: &Path, size: u64, mode: Preallocation) -> Result<()> {
    if mode == Preallocation::Metadata {
        return Err(Error::invalid_input(
            "preallocation=metadata is not supported for raw images (use falloc or full)",
        ));
    }
    let file = create_file(path)?;
    let r = grow_file(&file, path, round_size(size), mode).and_then(|()| {
        file.sync_all()
            .map_err(|e| Error::io("flush failed", e).with_path(path))
    });
    if r.is_err() {
        drop(file);
        crate::storage::remove_failed_output(path);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

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
