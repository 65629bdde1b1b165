//! `vimg map`: where each guest range of an image lives, as qemu-img's `map` shows it.
//!
//! [`walk`] asks the image's block-status query for consecutive ranges and merges neighbours
//! whose status is the same ([`BlockStatus::can_merge`]); [`json_entry`] and [`HumanMap`] print
//! the merged ranges in qemu-img's JSON and text layouts.

use crate::block::{BlockImage, BlockStatus};
use crate::error::{Error, ErrorKind, Result};
use crate::info::FormatSpecific;
use crate::offsets::GuestOffset;
use crate::open::resolve_relative;

/// One merged range of the map: `status.len` bytes from guest offset `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset where the range starts.
    pub start: u64,
    /// What the range holds (its `len` is the range's length).
    pub status: BlockStatus,
}

/// Calls `emit` for every merged range of `image` in `[start, start + max_len)`, clipped to the
/// virtual disk, in order.
///
/// When the clipped range is empty (`start` at or past the end, or `max_len` zero), one empty
/// entry is emitted at `start` (status all false, depth 0), as qemu-img does.
pub fn walk(
    image: &dyn BlockImage,
    start: u64,
    max_len: Option<u64>,
    mut emit: impl FnMut(&MapEntry) -> Result<()>,
) -> Result<()> {
    let size = image.virtual_size();
    let end = match max_len {
        Some(n) => start.saturating_add(n).min(size),
        None => size,
    };
    if start >= end {
        return emit(&MapEntry {
            start,
            status: BlockStatus {
                len: 0,
                depth: 0,
                present: false,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
            },
        });
    }
    let mut pending: Option<MapEntry> = None;
    let mut off = start;
    while off < end {
        let s = image.block_status(GuestOffset(off), end - off)?;
        if s.len == 0 || s.len > end - off {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "block status at guest offset {off:#x} returned an invalid length {}",
                    s.len
                ),
            )
            .with_path(image.filename()));
        }
        off += s.len;
        match &mut pending {
            Some(p) if p.status.can_merge(&s) => p.status.len += s.len,
            _ => {
                if let Some(p) = pending.take() {
                    emit(&p)?;
                }
                pending = Some(MapEntry {
                    start: off - s.len,
                    status: s,
                });
            }
        }
    }
    if let Some(p) = pending {
        emit(&p)?;
    }
    Ok(())
}

/// One entry as qemu-img's JSON map prints it (one line, without separator), e.g.
/// `{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true,
/// "compressed": false, "offset": 327680}`. The `offset` member is present only when the range
/// has a host offset.
pub fn json_entry(e: &MapEntry) -> String {
    let s = &e.status;
    let mut line = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
         \"data\": {}, \"compressed\": {}",
        e.start, s.len, s.depth, s.present, s.zero, s.data, s.compressed
    );
    if let Some(o) = s.offset {
        line.push_str(&format!(", \"offset\": {}", o.0));
    }
    line.push('}');
    line
}

/// The JSON map of `image` (see [`walk`]) written to `out` as qemu-img writes it: `[` before the
/// first entry, `,\n` between entries, `]\n` at the end.
pub fn write_json(
    image: &dyn BlockImage,
    start: u64,
    max_len: Option<u64>,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let io = |e| Error::io("cannot write output", e);
    let mut first = true;
    walk(image, start, max_len, |e| {
        let sep = if first { "[" } else { ",\n" };
        first = false;
        write!(out, "{sep}{}", json_entry(e)).map_err(io)
    })?;
    writeln!(out, "]").map_err(io)
}

/// The text map of `image` written to `out` as qemu-img writes it: a header line, then one row
/// per range stored uncompressed in a host file (`Offset`, `Length`, `Mapped to` in hex, then the
/// file). Ranges known to read as zeros, or unallocated, are not listed.
///
/// Compressed ranges have no place in this layout: like qemu-img, vimg stops there with an
/// error (after printing the rows before it), and points at the JSON output.
pub fn write_human(
    image: &dyn BlockImage,
    start: u64,
    max_len: Option<u64>,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let io = |e| Error::io("cannot write output", e);
    let mut files = HumanMap::new(image);
    writeln!(
        out,
        "{:<15} {:<15} {:<15} File",
        "Offset", "Length", "Mapped to"
    )
    .map_err(io)?;
    walk(image, start, max_len, |e| {
        let s = &e.status;
        // Like qemu-img, list only ranges that hold data: not unallocated or zero ranges, nor
        // allocated clusters known to read as zeros (preallocated ones over holes).
        if !s.data || s.zero {
            return Ok(());
        }
        let file = match s.depth {
            0 => match image.file_of(crate::offsets::GuestOffset(e.start)) {
                Some(f) => f,
                None => files.file(0)?,
            },
            d => files.file(d)?,
        };
        let Some(host) = s.offset else {
            return Err(Error::unsupported(format!(
                "File contains external, encrypted or compressed clusters: guest range \
                 {:#x}+{:#x} is stored {} in {file}, which has no host offset to show; \
                 use --output json to map it",
                e.start,
                s.len,
                if s.compressed {
                    "compressed"
                } else {
                    "encrypted"
                }
            ))
            .with_path(image.filename()));
        };
        writeln!(
            out,
            "{:<15} {:<15} {:<15} {file}",
            hex(e.start),
            hex(s.len),
            hex(host.0)
        )
        .map_err(io)
    })
}

/// `0` or `0x...`, as C's `%#x` prints.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// The host file holding guest data for each layer of a chain (the image file, or its external
/// data file), looked up once per layer.
pub struct HumanMap<'a> {
    top: &'a dyn BlockImage,
    files: Vec<Option<String>>,
}

impl<'a> HumanMap<'a> {
    /// A lookup over the chain starting at `top`.
    pub fn new(top: &'a dyn BlockImage) -> Self {
        HumanMap {
            top,
            files: Vec::new(),
        }
    }

    /// The host file name for layer `depth` (0 is the top).
    pub fn file(&mut self, depth: u32) -> Result<String> {
        let d = depth as usize;
        if let Some(Some(name)) = self.files.get(d) {
            return Ok(name.clone());
        }
        let mut layer = self.top;
        for _ in 0..depth {
            layer = layer.backing().ok_or_else(|| {
                Error::corrupt(format!(
                    "block status named layer {depth}, which the chain does not have"
                ))
                .with_path(self.top.filename())
            })?;
        }
        let info = layer.layer_info()?;
        let name = match info.format_specific {
            Some(FormatSpecific::Qcow2(q)) if q.data_file.is_some() => {
                let df = q.data_file.unwrap_or_default();
                resolve_relative(layer.filename(), &df)?
                    .display()
                    .to_string()
            }
            _ => layer.filename().display().to_string(),
        };
        if self.files.len() <= d {
            self.files.resize(d + 1, None);
        }
        self.files[d] = Some(name.clone());
        Ok(name)
    }
}
