//! `convert --bitmaps`: the persistent dirty bitmaps of the (single) source are copied to the
//! qcow2 target after the data, as qemu-img 10 does: same names, granularities, enabled state
//! and dirty bits, appended to the bitmaps a `-n` target already has. Inconsistent source
//! bitmaps are refused, or skipped with a warning under `--skip-broken-bitmaps`.
//!
//! Unlike qemu-img, everything that would make the copy fail (a source or target that cannot
//! hold bitmaps, an inconsistent source bitmap, a name the target already uses) is checked
//! before any data is written, so that a refused conversion leaves no half-made target.

use super::ConvertOptions;
use crate::bitmap::{BitmapDesc, PersistentBitmaps};
use crate::block::BlockImage;
use crate::error::{Error, ErrorKind, Result};

/// qemu-img's refusals of the `--bitmaps` options themselves, for `sources` source images
/// written as `opts.output_format`.
pub(super) fn validate(sources: usize, opts: &ConvertOptions) -> Result<()> {
    let bad = |m: String| Err(Error::invalid_input(m));
    if opts.skip_broken_bitmaps && !opts.bitmaps {
        return bad("Use of --skip-broken-bitmaps requires --bitmaps".into());
    }
    if !opts.bitmaps {
        return Ok(());
    }
    if sources > 1 {
        return bad("Copying bitmaps only possible with single source".into());
    }
    if !opts.output_format.driver().supports_persistent_bitmaps() {
        return bad(format!(
            "Format driver '{}' does not support bitmaps",
            opts.output_format.as_str()
        ));
    }
    Ok(())
}

/// The source's bitmaps that `--bitmaps` copies, in directory order, and a warning for each
/// inconsistent one skipped (in qemu-img's order: last bitmap first). Fails, as qemu-img does,
/// for a source that cannot hold bitmaps and (without `--skip-broken-bitmaps`) for an
/// inconsistent bitmap.
pub fn source_bitmaps(
    src: &dyn BlockImage,
    opts: &ConvertOptions,
) -> Result<(Vec<BitmapDesc>, Vec<String>)> {
    let Some(bm) = src.as_bitmaps().filter(|b| b.bitmaps_supported()) else {
        return Err(Error::unsupported("Source lacks bitmap support"));
    };
    let list = bm.list_bitmaps()?;
    let mut warnings = Vec::new();
    for b in list.iter().rev().filter(|b| b.in_use) {
        if !opts.skip_broken_bitmaps {
            return Err(Error::invalid_input(format!(
                "Cannot copy inconsistent bitmap '{}' (try --skip-broken-bitmaps, or use \
                 'bitmap --remove' to delete it)",
                b.name
            )));
        }
        warnings.push(format!("Skipping inconsistent bitmap '{}'", b.name));
    }
    Ok((list.into_iter().filter(|b| !b.in_use).collect(), warnings))
}

/// The target's bitmaps, failing if it cannot hold bitmaps or already has one of `names`
/// (qemu-img finds that out after copying the data, checking the last name first).
pub(super) fn check_target<'a>(
    target: &'a dyn BlockImage,
    names: &[BitmapDesc],
) -> Result<&'a dyn PersistentBitmaps> {
    let Some(bm) = target.as_bitmaps().filter(|b| b.bitmaps_supported()) else {
        return Err(Error::unsupported(format!(
            "Format driver '{}' does not support bitmaps",
            target.format().as_str()
        )));
    };
    let existing = bm.list_bitmaps()?;
    if let Some(b) = names
        .iter()
        .rev()
        .find(|b| existing.iter().any(|e| e.name == b.name))
    {
        return Err(Error::invalid_input(format!(
            "Failed to create bitmap {}: Bitmap already exists: {}",
            b.name, b.name
        )));
    }
    Ok(bm)
}

/// Adds each of `list` (bitmaps of `src`) to `target` with its granularity, enabled state and
/// contents, one at a time (only one bitmap's contents are in memory at once).
pub(super) fn copy(
    src: &dyn BlockImage,
    target: &dyn PersistentBitmaps,
    list: &[BitmapDesc],
) -> Result<()> {
    let Some(from) = src.as_bitmaps() else {
        return Ok(());
    };
    let wrap = |what: &str, name: &str, e: Error| {
        let why = match e.kind() {
            ErrorKind::Io | ErrorKind::Corrupt => e.to_string(),
            _ => e.what().to_string(),
        };
        Error::new(e.kind(), format!("Failed to {what} bitmap {name}: {why}"))
    };
    for b in list {
        target
            .add_bitmap(&b.name, Some(b.granularity), b.enabled)
            .map_err(|e| wrap("create", &b.name, e))?;
        let filled = from
            .read_bitmap(&b.name)
            .and_then(|contents| target.merge_into_bitmap(&b.name, &contents));
        if let Err(e) = filled {
            let _ = target.remove_bitmap(&b.name);
            return Err(wrap("populate", &b.name, e));
        }
    }
    Ok(())
}
