//! `vimg amend [-f FMT] [-t CACHE] [-p] [-q] [--force] -o OPTIONS IMAGE`: changes the format
//! options of an existing qcow2 image in place, as `qemu-img amend` does (`-o help` lists
//! them). The work is in [`Qcow2Image::amend`](crate::qcow2::Qcow2Image::amend).
//!
//! The request is checked on a read-only open first, so that a refused amend (with qemu-img's
//! message and exit code 1) leaves the image untouched, dirty bit included; only then is the
//! image opened for writing (with its backing chain only when the disk grows, so that a longer
//! backing file does not show through the new area).

use crate::block::ImageFormat;
use crate::error::{Error, Result};
use crate::open::{open_image, probe_format, OpenOptions};
use crate::opener::Opener;
use std::path::Path;

/// qemu-img's message when no `-o` is given.
pub const NO_OPTIONS: &str = "Must specify options (-o)";
/// qemu-img's message when the image argument is missing.
pub const NO_IMAGE: &str = "Expecting one image file name";

/// The pieces of a `vimg amend` command line.
#[derive(Debug, Clone, Default)]
pub struct AmendArgs<'a> {
    /// `-f`: the image's format; probed when `None`.
    pub format: Option<ImageFormat>,
    /// Each `-o` argument, in order (later options win).
    pub options: &'a [String],
    /// `-t`: the cache mode (`None`: writeback).
    pub cache: Option<&'a str>,
    /// What opens the image's storage.
    pub opener: Opener,
}

/// Whether a cache mode (`-t`) skips syncs: `unsafe` does; `writeback` (the default),
/// `writethrough`, `none` and `directsync` wait for the disk. Other names are refused with
/// qemu-img's message.
pub fn cache_is_unsafe(mode: &str) -> Result<bool> {
    match mode {
        "unsafe" => Ok(true),
        "writeback" | "writethrough" | "none" | "directsync" => Ok(false),
        _ => Err(Error::invalid_input(format!(
            "Invalid cache option: {mode}"
        ))),
    }
}

/// Whether the `-o` arguments ask for the option list ([`crate::ops::create::wants_help`]).
pub fn wants_help(options: &[String]) -> Result<bool> {
    crate::ops::create::wants_help(options)
}

/// The `-o help` text for the image at `path` (format `format`, probed when `None`); without
/// an image, `format` must be given.
pub fn help(format: Option<ImageFormat>, path: Option<&Path>) -> Result<String> {
    let format = match (format, path) {
        (Some(f), _) => f,
        (None, Some(p)) => probe_format(p)?,
        (None, None) => return Err(Error::invalid_input(NO_IMAGE)),
    };
    let rows = format
        .driver()
        .amend_option_help()
        .ok_or_else(|| not_amendable(format))?;
    Ok(format!(
        "Amend options for '{}':\n{}",
        format.as_str(),
        crate::option_desc::help_lines(&[rows])
    ))
}

/// qemu-img's refusal for a format that cannot amend its options.
fn not_amendable(format: ImageFormat) -> Error {
    Error::unsupported(format!(
        "Format driver '{}' does not support option amendment",
        format.as_str()
    ))
}

/// Amends the image at `path` as `args` says, reporting progress as (done, total) to
/// `progress`.
pub fn amend(path: &Path, args: &AmendArgs<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    if args.options.is_empty() {
        return Err(Error::invalid_input(NO_OPTIONS));
    }
    let unsafe_cache = cache_is_unsafe(args.cache.unwrap_or("writeback"))?;
    // Look first, read-only: a refused amend must not change the image at all.
    let img = open_image(
        path,
        &OpenOptions {
            format: args.format,
            no_backing: true,
            opener: args.opener.clone(),
            ..OpenOptions::default()
        },
    )?;
    let Some(check) = img.as_amend() else {
        return Err(not_amendable(img.format()));
    };
    let plan = check.check_amend(args.options)?;
    if plan.is_empty {
        progress(0, 1);
        progress(1, 1);
        return Ok(());
    }
    let format = Some(img.format());
    drop(img);
    let mut img = open_image(
        path,
        &OpenOptions {
            format,
            writable: true,
            no_backing: !plan.grows,
            opener: args.opener.clone(),
            ..OpenOptions::default()
        },
    )?;
    img.set_unsafe_cache(unsafe_cache);
    let format = img.format();
    // qemu-img prints 0% before the amend starts and 100% after it, whatever the driver
    // reports in between.
    progress(0, 1);
    img.as_amend_mut()
        .ok_or_else(|| not_amendable(format))?
        .amend(args.options, progress)?;
    progress(1, 1);
    img.finish()
}

/// qemu-img's progress text for amend (`-p`): a percentage is printed when it is 0 or 100
/// or more than one point past the last one printed, so 100% may show twice (once as the
/// driver finishes, once as qemu-img does).
#[derive(Debug, Default)]
pub struct AmendProgressText {
    last: f32,
}

impl AmendProgressText {
    /// A renderer that has printed nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The text to print for `done` of `total`, if it is time to print.
    pub fn update(&mut self, done: u64, total: u64) -> Option<String> {
        let pct = if total == 0 {
            100.0
        } else {
            100.0 * done as f32 / total as f32
        };
        if pct - self.last > 1.0 || pct == 100.0 || pct == 0.0 {
            self.last = pct;
            return Some(format!("    ({pct:.2}/100%)\r"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_text_as_qemu_img_prints_it() {
        let mut p = AmendProgressText::new();
        let shown: Vec<String> = [(0, 1), (1, 8), (1, 800), (2, 8), (8, 8), (1, 1)]
            .iter()
            .filter_map(|&(d, t)| p.update(d, t))
            .collect();
        assert_eq!(
            shown,
            [
                "    (0.00/100%)\r",
                "    (12.50/100%)\r",
                "    (25.00/100%)\r",
                "    (100.00/100%)\r",
                "    (100.00/100%)\r"
            ]
        );
    }

    #[test]
    fn cache_modes_and_help() {
        assert!(cache_is_unsafe("unsafe").unwrap());
        assert!(!cache_is_unsafe("none").unwrap());
        assert_eq!(
            cache_is_unsafe("foo").unwrap_err().what(),
            "Invalid cache option: foo"
        );
        let h = help(Some(ImageFormat::Qcow2), None).unwrap();
        assert!(h.starts_with("Amend options for 'qcow2':\n"), "{h}");
        assert!(h.contains("refcount_bits=<num>") && h.contains("size=<size>"));
        assert!(!h.contains("cluster_size"));
        assert_eq!(help(None, None).unwrap_err().what(), NO_IMAGE);
        assert!(help(Some(ImageFormat::Raw), None)
            .unwrap_err()
            .what()
            .contains("does not support option amendment"));
    }
}
