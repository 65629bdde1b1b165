//! Raw's side of `measure` ([`crate::ops::measure`]): the virtual size in whole sectors,
//! whatever the data.

use crate::block::BlockImage;
use crate::creation::Measurement;
use crate::error::Result;
use crate::qcow2::parse_target_options;

/// Options `qemu-img measure -O raw -o` accepts.
const RAW_KEYS: &[&str] = &["size", "preallocation", "nocow", "extent_size_hint"];

/// Raw's [`crate::block::FormatDriver::measure`].
pub fn measure(
    options: &[String],
    size: Option<u64>,
    source: Option<&dyn BlockImage>,
) -> Result<Measurement> {
    let u = parse_target_options(options, size, RAW_KEYS, false)?;
    let bytes = match source {
        Some(src) => src.virtual_size().div_ceil(512) * 512,
        None => u.size.unwrap_or(0).div_ceil(512) * 512,
    };
    Ok(Measurement {
        required: bytes,
        fully_allocated: bytes,
        bitmaps: None,
    })
}
