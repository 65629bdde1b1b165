//! Where `backup extract` writes archived devices other than new images in its directory:
//! existing images and block devices named by `--target`, or by the map `-r` reads as
//! Proxmox's `vma extract -r` reads it (vma.c: `skip=DEV` and
//! `[format=..:][throttling.bps=..:][throttling.group=..:][cache=..:]0|1:DEV=PATH` lines).

use super::parse_device_spec;
use crate::block::ImageFormat;
use crate::error::{Error, Result};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// Where an extract writes one archived device instead of a new image in the target
/// directory: an existing image or block device, written in place (`--target`, or a line of
/// the map of `-r`, as Proxmox's `vma extract -r` reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTarget {
    /// The archived device's name.
    pub name: String,
    /// The existing image written in place; `None` skips the device (a map's `skip=DEV`).
    pub path: Option<PathBuf>,
    /// The target's format: raw unless `format=FMT:` says otherwise.
    pub format: ImageFormat,
    /// Whether the target reads as zeros already, so that only data is written (a map's
    /// `0:`, `--target-is-zero`); otherwise what the archive stores as zeros is zeroed.
    pub reads_zeros: bool,
}

/// The targets of an extract.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTargets {
    /// One per device at most.
    pub list: Vec<DeviceTarget>,
    /// Every restored device must have a target (a map: `vma extract -r` fails on a device
    /// it has no line for, with `no device name mapping for NAME`); otherwise devices
    /// without one are restored into the target directory as new images.
    pub complete: bool,
}

/// Parses `--target [format=FMT:]DEVNAME=PATH`; the format is raw unless given.
pub fn parse_target_spec(spec: &str, reads_zeros: bool) -> Result<DeviceTarget> {
    let d = parse_device_spec(spec)?;
    Ok(DeviceTarget {
        name: d.name,
        path: Some(d.path),
        format: d.format.unwrap_or(ImageFormat::Raw),
        reads_zeros,
    })
}

/// Longest line of a restore map (Proxmox's `vma` reads lines of up to 8 KiB).
const MAX_MAP_LINE: u64 = 64 * 1024;

/// Reads the map of `backup extract -r MAP`, as Proxmox's `vma extract -r` does: lines until
/// the end, an empty line or `done`, each `skip=DEVNAME` or
/// `[format=FMT:][throttling.bps=N:][throttling.group=G:][cache=MODE:]0|1:DEVNAME=PATH`, in
/// which `1:` says the target may hold old data (zeros are written) and `0:` that it reads as
/// zeros. Throttling and cache are checked but have no effect. Errors name `shown`.
pub fn read_restore_map<R: BufRead>(mut input: R, shown: &Path) -> Result<DeviceTargets> {
    let mut list: Vec<DeviceTarget> = Vec::new();
    loop {
        let mut raw = Vec::new();
        let n = (&mut input)
            .take(MAX_MAP_LINE + 1)
            .read_until(b'\n', &mut raw)
            .map_err(|e| Error::io("read map failed", e).with_path(shown))?;
        if n == 0 {
            break;
        }
        if raw.len() as u64 > MAX_MAP_LINE {
            return Err(Error::invalid_input(format!(
                "read map failed - line longer than {MAX_MAP_LINE} bytes"
            ))
            .with_path(shown));
        }
        if raw.last() == Some(&b'\n') {
            raw.pop();
        }
        let line = String::from_utf8(raw).map_err(|_| {
            Error::invalid_input("read map failed - a line is not valid UTF-8").with_path(shown)
        })?;
        if line.is_empty() || line == "done" {
            break;
        }
        let t = parse_map_line(&line).map_err(|m| Error::invalid_input(m).with_path(shown))?;
        if list.iter().any(|o| o.name == t.name) {
            return Err(Error::invalid_input(format!(
                "read map failed - device '{}' is mapped twice",
                t.name.escape_debug()
            ))
            .with_path(shown));
        }
        list.push(t);
    }
    Ok(DeviceTargets {
        list,
        complete: true,
    })
}

/// One line of a restore map (see [`read_restore_map`]); the error is the message.
fn parse_map_line(line: &str) -> std::result::Result<DeviceTarget, String> {
    let quoted = line.escape_debug();
    if let Some(rest) = line.strip_prefix("skip") {
        return match rest.strip_prefix('=') {
            Some(name) if !name.is_empty() => Ok(DeviceTarget {
                name: name.to_string(),
                path: None,
                format: ImageFormat::Raw,
                reads_zeros: false,
            }),
            _ => Err(format!(
                "read map failed - option 'skip' has no value ('{quoted}')"
            )),
        };
    }
    const OPTIONS: [&str; 4] = ["format", "throttling.bps", "throttling.group", "cache"];
    let mut values: [Option<&str>; 4] = [None; 4];
    let mut rest = line;
    'options: loop {
        for (i, name) in OPTIONS.iter().enumerate() {
            let Some(after) = rest.strip_prefix(name).and_then(|r| r.strip_prefix('=')) else {
                continue;
            };
            if values[i].is_some() {
                return Err(format!(
                    "read map failed - duplicate value for option '{name}'"
                ));
            }
            let (value, tail) = after.split_once(':').ok_or_else(|| {
                format!("read map failed - option '{name}' not terminated ('{quoted}')")
            })?;
            values[i] = Some(value);
            rest = tail;
            continue 'options;
        }
        break;
    }
    let [format, bps, _group, cache] = values;
    let reads_zeros = match rest.get(..2) {
        Some("0:") => true,
        Some("1:") => false,
        _ => return Err(format!("read map failed - parse error ('{quoted}')")),
    };
    let (name, path) = rest[2..]
        .split_once('=')
        .ok_or_else(|| format!("read map failed - no dev name specified ('{quoted}')"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("read map failed - parse error ('{quoted}')"));
    }
    if let Some(b) = bps {
        let number = match b.strip_prefix("0x").or_else(|| b.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => b.parse::<u64>().ok(),
        };
        if number.is_none() {
            return Err(format!(
                "read map failed - not a number: {}",
                b.escape_debug()
            ));
        }
    }
    if let Some(c) = cache {
        if !["none", "writeback", "writethrough", "directsync", "unsafe"].contains(&c) {
            return Err(format!("invalid cache option: {}", c.escape_debug()));
        }
    }
    let format = match format {
        Some(f) => ImageFormat::from_name(f).map_err(|e| format!("read map failed - {e}"))?,
        None => ImageFormat::Raw,
    };
    Ok(DeviceTarget {
        name: name.to_string(),
        path: Some(PathBuf::from(path)),
        format,
        reads_zeros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_maps_read_as_vma_reads_them() {
        let shown = Path::new("map");
        let read = |text: &str| read_restore_map(text.as_bytes(), shown);
        let m = read(
            "format=qcow2:throttling.bps=0x100:cache=none:0:drive-scsi0=/dev/vg/a=b\n\
             1:drive-scsi1=/dev/loop7\nskip=drive-virtio0\ndone\n1:ignored=after-done\n",
        )
        .unwrap();
        assert!(m.complete);
        assert_eq!(m.list.len(), 3);
        assert_eq!(m.list[0].name, "drive-scsi0");
        // The name ends at the first '='; the path keeps the rest.
        assert_eq!(m.list[0].path.as_deref(), Some(Path::new("/dev/vg/a=b")));
        assert_eq!(m.list[0].format, ImageFormat::Qcow2);
        assert!(m.list[0].reads_zeros);
        assert_eq!(m.list[1].format, ImageFormat::Raw);
        assert!(!m.list[1].reads_zeros);
        assert_eq!(m.list[2].path, None);
        // An empty line ends the map too, and so does the end of the input.
        assert_eq!(read("1:a=b\n\n1:c=d\n").unwrap().list.len(), 1);
        assert_eq!(read("1:a=b").unwrap().list.len(), 1);
        for (text, want) in [
            ("2:a=b\n", "read map failed - parse error ('2:a=b')"),
            ("1:ab\n", "read map failed - no dev name specified ('1:ab')"),
            ("skip\n", "option 'skip' has no value"),
            ("format=raw\n", "option 'format' not terminated"),
            (
                "format=raw:format=raw:1:a=b\n",
                "duplicate value for option 'format'",
            ),
            ("throttling.bps=12x:1:a=b\n", "not a number: 12x"),
            ("cache=fast:1:a=b\n", "invalid cache option: fast"),
            ("format=qed:1:a=b\n", "read map failed"),
            ("1:a=b\n0:a=c\n", "device 'a' is mapped twice"),
        ] {
            let e = read(text).unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("map: "), "{text:?}: {e}");
        }
    }
}
