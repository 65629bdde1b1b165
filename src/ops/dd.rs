//! `dd`: copy a piece of an image into a new image, as `qemu-img dd` does.
//!
//! The operands are dd(1)'s: `if=`, `of=`, `bs=` (block size, default 512), `count=` and
//! `skip=` (in blocks). As in qemu-img, `count` bounds the copy at `count * bs` bytes from the
//! start of the input (not from the skipped offset), the new image's size is what remains
//! after skipping, and a skip past the end gives an empty image with an error message but
//! exit status 0. Every byte is written (zeros included), so the output is fully allocated.

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, Result};
use crate::offsets::GuestOffset;
use crate::open::{open_image, OpenOptions};
use crate::opener::Opener;
use crate::ops::create::{create, CreateArgs};
use crate::ops::size::parse_size;
use std::path::{Path, PathBuf};

/// The parsed operands of `dd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdOperands {
    /// `if=`: the input image.
    pub input: String,
    /// `of=`: the image to create.
    pub output: PathBuf,
    /// `bs=`: bytes per block (1 to 2^31-1; default 512).
    pub block_size: u64,
    /// `count=`: blocks to copy from the start of the input, `None` for all.
    pub count: Option<u64>,
    /// `skip=`: blocks of the input to skip.
    pub skip: Option<u64>,
}

/// Parses `dd`'s `key=value` operands, with qemu-img's messages.
pub fn parse_operands<S: AsRef<str>>(operands: &[S]) -> Result<DdOperands> {
    let bad = |m: String| Error::invalid_input(m);
    let (mut input, mut output, mut bs, mut count, mut skip) = (None, None, 512u64, None, None);
    let number = |name: &str, v: &str, max: u64| -> Result<u64> {
        match parse_size(v) {
            Ok(n) if n <= max => Ok(n),
            Ok(_) => Err(bad(format!(
                "Invalid {name} specified. Must be between 0 and {max}."
            ))),
            Err(_) => Err(bad(format!("Invalid {name} specified: '{v}'."))),
        }
    };
    for op in operands {
        let op = op.as_ref();
        let Some((k, v)) = op.split_once('=') else {
            return Err(bad(format!("unrecognized operand {op}")));
        };
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(PathBuf::from(v)),
            "bs" => {
                bs = match parse_size(v) {
                    Ok(n) if (1..=i32::MAX as u64).contains(&n) => n,
                    Ok(_) => {
                        return Err(bad(format!(
                            "Invalid bs specified. Must be between 1 and {}.",
                            i32::MAX
                        )))
                    }
                    Err(_) => return Err(bad(format!("Invalid bs specified: '{v}'."))),
                }
            }
            "count" => count = Some(number("count", v, i64::MAX as u64)?),
            "skip" => skip = Some(number("skip", v, i64::MAX as u64)?),
            _ => return Err(bad(format!("unrecognized operand {op}"))),
        }
    }
    match (input, output) {
        (Some(input), Some(output)) => Ok(DdOperands {
            input,
            output,
            block_size: bs,
            count,
            skip,
        }),
        _ => Err(bad("Must specify both input and output files".into())),
    }
}

/// What `dd` did: a message to print on standard error (a skip past the end), if any.
#[derive(Debug, Clone, Default)]
pub struct DdOutcome {
    /// qemu-img's `cannot skip to specified offset` message, when the skip passed the end.
    pub warning: Option<String>,
}

/// Copies from `src` (named `input_name` in messages) into a new `format` image at
/// `ops.output`, as `qemu-img dd` does.
pub fn dd(
    src: &dyn BlockImage,
    ops: &DdOperands,
    format: ImageFormat,
    opener: &Opener,
) -> Result<DdOutcome> {
    let bs = ops.block_size;
    let mut size = src.virtual_size();
    if let Some(c) = ops.count {
        if let Some(bytes) = c.checked_mul(bs).filter(|&b| b < size) {
            size = bytes;
        }
    }
    let skip_bytes = ops.skip.map(|s| s.checked_mul(bs));
    let past_end =
        matches!(skip_bytes, Some(None)) || matches!(skip_bytes, Some(Some(b)) if b > size);
    let start = match skip_bytes {
        Some(Some(b)) if !past_end => b,
        Some(_) => size,
        None => 0,
    };
    create(&CreateArgs {
        format,
        filename: ops.output.clone(),
        options: Vec::new(),
        backing_file: None,
        backing_format: None,
        unsafe_backing: false,
        size: Some((size - start).to_string()),
        opener: opener.clone(),
    })
    .map_err(|e| {
        Error::invalid_input(format!(
            "{}: error while creating output image: {}",
            ops.output.display(),
            e
        ))
    })?;
    let out = open_image(
        &ops.output,
        &OpenOptions {
            format: Some(format),
            writable: true,
            opener: opener.clone(),
            ..Default::default()
        },
    )?;
    copy(src, out.as_ref(), start, size, bs)?;
    out.flush()?;
    Ok(DdOutcome {
        warning: past_end.then(|| format!("{}: cannot skip to specified offset", ops.input)),
    })
}

/// Copies `src[start..end]` to `dst` from offset 0, `bs` bytes at a time (in bigger reads
/// when `bs` is small; the result is the same).
fn copy(src: &dyn BlockImage, dst: &dyn BlockImage, start: u64, end: u64, bs: u64) -> Result<()> {
    let piece = bs.max(1).saturating_mul((1 << 20) / bs.max(1)).max(bs);
    let mut buf = vec![0u8; piece.min(end - start) as usize];
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(piece) as usize;
        src.read_at(&mut buf[..n], GuestOffset(pos)).map_err(|e| {
            Error::invalid_input(format!("error while reading from input image file: {e}"))
        })?;
        dst.write_at(&buf[..n], GuestOffset(pos - start))
            .map_err(|e| {
                Error::invalid_input(format!("error while writing to output image file: {e}"))
            })?;
        pos += n as u64;
    }
    Ok(())
}

/// The output path of `dd` as a [`Path`].
pub fn output_path(ops: &DdOperands) -> &Path {
    &ops.output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands() {
        let o = parse_operands(&["if=a", "of=b", "bs=4k", "count=3", "skip=1"]).unwrap();
        assert_eq!(
            (o.block_size, o.count, o.skip, o.input.as_str()),
            (4096, Some(3), Some(1), "a")
        );
        assert_eq!(parse_operands(&["if=a", "of=b"]).unwrap().block_size, 512);
        for bad in [
            &["if=a"][..],
            &["if=a", "of=b", "bs=0"],
            &["if=a", "of=b", "bs=x"],
            &["if=a", "of=b", "foo=1"],
            &["if=a", "of=b", "x"],
        ] {
            assert!(parse_operands(bad).is_err(), "{bad:?}");
        }
    }
}
