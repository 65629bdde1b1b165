//! `vimg bitmap`: adds, removes, clears, enables, disables and merges the persistent dirty
//! bitmaps of an image, as `qemu-img bitmap` does: several operations in one call run in the
//! order given, each stored before the next, and the first that fails stops the rest (those
//! before it stay done), with qemu-img's message `Operation OP on bitmap NAME failed: WHY`.
//!
//! The work is the format's ([`crate::bitmap::PersistentBitmaps`]); this module checks the
//! arguments as qemu-img does and runs the operations.

use crate::bitmap::{inconsistent, not_found, DirtyBitmap, PersistentBitmaps};
use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, ErrorKind, Result};
use crate::open::{open_image, OpenOptions};
use crate::opener::Opener;
use std::path::PathBuf;

/// One operation, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapAction {
    /// `--add`: create the bitmap (empty).
    Add,
    /// `--remove`: delete it.
    Remove,
    /// `--clear`: clear all its bits.
    Clear,
    /// `--enable`: track writes in it.
    Enable,
    /// `--disable`: stop tracking writes in it.
    Disable,
    /// `--merge SRC`: set every bit set in bitmap SRC (of the image, or of `-b FILE`).
    Merge(String),
}

impl BitmapAction {
    /// The operation's name in qemu-img's messages.
    pub fn name(&self) -> &'static str {
        match self {
            BitmapAction::Add => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge(_) => "merge",
        }
    }
}

/// What `vimg bitmap` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct BitmapArgs {
    /// The image.
    pub filename: PathBuf,
    /// Its format (`-f`); probed when `None`.
    pub format: Option<ImageFormat>,
    /// The bitmap the operations apply to.
    pub name: String,
    /// The operations, in order.
    pub actions: Vec<BitmapAction>,
    /// Granularity of an added bitmap (`-g`, bytes); the format's default when `None`.
    pub granularity: Option<u64>,
    /// The image holding the `--merge` sources (`-b`); the image itself when `None`.
    pub source_file: Option<PathBuf>,
    /// Format of `source_file` (`-F`); probed when `None`.
    pub source_format: Option<ImageFormat>,
    /// What opens the images' storage.
    pub opener: Opener,
}

impl BitmapArgs {
    /// Whether an added bitmap starts disabled: `--disable` anywhere in the call, as in
    /// qemu-img.
    pub fn add_disabled(&self) -> bool {
        self.actions.contains(&BitmapAction::Disable)
    }
}

/// Refuses the argument combinations qemu-img refuses, with its messages.
pub fn validate(a: &BitmapArgs) -> Result<()> {
    let bad = |m: &str| Err(Error::invalid_input(m.to_string()));
    if a.actions.is_empty() {
        return bad(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        );
    }
    let has = |f: fn(&BitmapAction) -> bool| a.actions.iter().any(f);
    if a.granularity.is_some() && !has(|x| *x == BitmapAction::Add) {
        return bad("granularity only supported with --add");
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        return bad("-F only supported with -b");
    }
    if a.source_file.is_some() && !has(|x| matches!(x, BitmapAction::Merge(_))) {
        return bad("Merge bitmap source file only supported with --merge");
    }
    Ok(())
}

/// Opens the image read-write (and the `-b` image read-only) and runs the operations in
/// order; see the module documentation.
pub fn run(a: &BitmapArgs) -> Result<()> {
    validate(a)?;
    let open = |path: &PathBuf, format, writable| {
        open_image(
            path,
            &OpenOptions {
                format,
                writable,
                no_backing: true,
                opener: a.opener.clone(),
                ..OpenOptions::default()
            },
        )
    };
    let image = open(&a.filename, a.format, true)?;
    let source = match &a.source_file {
        Some(p) => Some(open(p, a.source_format, false)?),
        None => None,
    };
    let src_image: &dyn BlockImage = source.as_deref().unwrap_or(image.as_ref());
    for action in &a.actions {
        run_one(image.as_ref(), src_image, a, action).map_err(|e| {
            let why = match e.kind() {
                ErrorKind::Io | ErrorKind::Corrupt => e.to_string(),
                _ => e.what().to_string(),
            };
            Error::new(
                e.kind(),
                format!(
                    "Operation {} on bitmap {} failed: {why}",
                    action.name(),
                    a.name
                ),
            )
        })?;
    }
    image.finish()
}

fn run_one(
    image: &dyn BlockImage,
    source: &dyn BlockImage,
    a: &BitmapArgs,
    action: &BitmapAction,
) -> Result<()> {
    let Some(bm): Option<&dyn PersistentBitmaps> = image.as_bitmaps() else {
        return Err(match action {
            BitmapAction::Add => Error::unsupported(format!(
                "Can't store persistent bitmaps to {}: Operation not supported",
                image.filename().display()
            )),
            _ => not_found(&a.name),
        });
    };
    let name = a.name.as_str();
    match action {
        BitmapAction::Add => bm.add_bitmap(name, a.granularity, !a.add_disabled()),
        BitmapAction::Remove => bm.remove_bitmap(name),
        BitmapAction::Clear => bm.clear_bitmap(name),
        BitmapAction::Enable => bm.enable_bitmap(name, true),
        BitmapAction::Disable => bm.enable_bitmap(name, false),
        BitmapAction::Merge(src) => {
            // The destination is checked first, as by qemu.
            match bm.list_bitmaps()?.iter().find(|b| b.name == name) {
                None => return Err(not_found(name)),
                Some(b) if b.in_use => return Err(inconsistent(name)),
                Some(_) => {}
            }
            let contents: DirtyBitmap = match source.as_bitmaps() {
                Some(s) => s.read_bitmap(src)?,
                None => return Err(not_found(src)),
            };
            bm.merge_into_bitmap(name, &contents)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_errors_are_qemus() {
        let mut a = BitmapArgs::default();
        assert!(validate(&a)
            .unwrap_err()
            .what()
            .starts_with("Need at least one"));
        a.actions = vec![BitmapAction::Remove];
        a.granularity = Some(4096);
        assert_eq!(
            validate(&a).unwrap_err().what(),
            "granularity only supported with --add"
        );
        a.granularity = None;
        a.source_format = Some(ImageFormat::Qcow2);
        assert_eq!(
            validate(&a).unwrap_err().what(),
            "-F only supported with -b"
        );
        a.source_file = Some("x".into());
        assert_eq!(
            validate(&a).unwrap_err().what(),
            "Merge bitmap source file only supported with --merge"
        );
        a.actions.push(BitmapAction::Merge("s".into()));
        validate(&a).unwrap();
        a.actions.push(BitmapAction::Disable);
        assert!(a.add_disabled());
    }
}
