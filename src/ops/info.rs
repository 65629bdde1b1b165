//! `vimg info`: what an image is (format, sizes, backing file, snapshots, format details), as
//! qemu-img's `info` shows it, in JSON or as text.
//!
//! [`collect`] opens the image (and, for `--backing-chain`, every layer below it) and gathers one
//! [`LayerReport`] per layer; [`render_json`] and [`render_human`] print them. The JSON carries
//! qemu-img's keys, including the `children` entry describing the host file under each layer.

use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, Result};
use crate::info::LayerInfo;
use crate::open::{open_image, probe_format, OpenOptions, Sharing};
use crate::opener::Opener;
use crate::ops::json::{ordered, to_qemu_json};
use crate::ops::size::human_size;
use serde_json::{json, Value};
use std::fmt::Write;
use std::path::Path;

/// What to report.
#[derive(Debug, Clone, Default)]
pub struct InfoOptions {
    /// The image's format; `None` probes it.
    pub format: Option<ImageFormat>,
    /// Report every layer of the backing chain, top first (and require the chain to open).
    pub backing_chain: bool,
    /// How the image's files are shared with other programs (`-U`: [`Sharing::ForceShare`]).
    pub sharing: Sharing,
    /// What opens the image's storage.
    pub opener: Opener,
}

/// Everything reported about one layer.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// The layer's own description.
    pub info: LayerInfo,
    /// The name of the host file holding the layer (its `file` child's), which qemu prints
    /// as it is even where it names the image by its options (`json:{...}`).
    pub file_name: String,
    /// Length of the host file holding the layer (the `file` child's virtual size), rounded up
    /// to a multiple of 512 bytes as qemu-img reports it. For a block device, its size.
    pub file_length: u64,
    /// qemu's name for the protocol driver of the host file: `file`, or `host_device` for a
    /// block device.
    pub protocol: &'static str,
    /// Things the user should know that are not errors, one sentence each (printed to stderr).
    pub warnings: Vec<String>,
    /// The layer's other files (a vmdk descriptor's extents), listed as children before
    /// `file`; with them, the `file` child's own allocation.
    pub extra: Vec<ExtraFile>,
    /// The image was named by its protocol node alone (`driver=nbd` at the top level): qemu
    /// reports that node (`file format: nbd`), with no format layer and no child.
    pub protocol_node: bool,
}

/// A file besides its own that holds a layer's data, as `info` lists it.
#[derive(Debug, Clone)]
pub struct ExtraFile {
    /// The child's name (`extents.0`).
    pub child: String,
    /// The file's name.
    pub filename: String,
    /// Its length, rounded up to a sector.
    pub length: u64,
    /// Bytes allocated to it.
    pub actual: Option<u64>,
}

fn allocated(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// Opens the image at `path` and describes it (with `backing_chain`, every layer of its chain,
/// top first).
///
/// Without `backing_chain` the backing file is not opened, so an image whose backing file is
/// missing can still be inspected, as with qemu-img.
pub fn collect(path: &Path, opts: &InfoOptions) -> Result<Vec<LayerReport>> {
    let image = open_image(
        path,
        &OpenOptions {
            format: opts.format,
            writable: false,
            no_backing: !opts.backing_chain,
            sharing: opts.sharing,
            opener: opts.opener.clone(),
            ..OpenOptions::default()
        },
    )?;
    // Each layer is opened on its own (also with --backing-chain), as qemu-img does.
    opts.opener
        .refuse_backing_options(path, image.format().as_str())?;
    let mut layers = Vec::new();
    let mut layer: Option<&dyn BlockImage> = Some(image.as_ref());
    while let Some(l) = layer {
        let mut report = describe(l)?;
        report.protocol_node = layers.is_empty()
            && report.protocol == "nbd"
            && report.info.format == "raw"
            && crate::nbd::client::is_protocol_node(&report.file_name);
        if layers.is_empty() {
            // qemu names an image opened with strong options by them (`json:{...}`).
            let info = &mut report.info;
            info.filename = opts
                .opener
                .node_name(path, l.format().as_str(), &info.filename, None);
        }
        layers.push(report);
        if !opts.backing_chain {
            break;
        }
        layer = l.backing();
    }
    Ok(layers)
}

/// The warning for a layer whose backing format is not recorded (and was probed, or would be),
/// if that is the case.
pub fn backing_format_warning(layer: &dyn BlockImage, info: &LayerInfo) -> Option<String> {
    let (Some(name), None) = (&info.backing_filename, &info.backing_filename_format) else {
        return None;
    };
    let probed = match layer.backing() {
        Some(b) if info.backing_format_probed => Some(b.format()),
        _ => info
            .full_backing_filename
            .as_ref()
            .and_then(|full| probe_format(Path::new(full)).ok()),
    };
    Some(match probed {
        Some(f) => format!(
            "{}: the format of backing file '{name}' is not recorded in the image; \
             probed as {f} (record it with a rebase, giving the format)",
            layer.filename().display()
        ),
        None => format!(
            "{}: the format of backing file '{name}' is not recorded in the image",
            layer.filename().display()
        ),
    })
}

/// Describes one opened layer.
pub fn describe(layer: &dyn BlockImage) -> Result<LayerReport> {
    let info = layer.layer_info()?;
    let in_ova = crate::ova::DiskLocator::parse(layer.filename());
    let on_nbd = crate::nbd::client::claims(layer.filename());
    let file_length = match &in_ova {
        Some(loc) => crate::ova::disk_len(loc),
        None if on_nbd => crate::nbd::client::export_size(layer.filename()),
        None => crate::storage::path_len(layer.filename()),
    }
    .map_err(|e| Error::io("cannot get file size", e).with_path(layer.filename()))?
    .div_ceil(512)
    .saturating_mul(512);
    let protocol = if in_ova.is_some() {
        "ova"
    } else if on_nbd {
        "nbd"
    } else if crate::storage::is_block_device(layer.filename()) {
        "host_device"
    } else {
        "file"
    };
    let warnings = backing_format_warning(layer, &info).into_iter().collect();
    let mut extra = Vec::new();
    for (child, filename) in layer.extra_files().into_iter().rev() {
        let p = Path::new(&filename);
        let length = crate::storage::path_len(p)
            .map_err(|e| Error::io("cannot get file size", e).with_path(p))?
            .div_ceil(512)
            .saturating_mul(512);
        extra.push(ExtraFile {
            child,
            actual: allocated(p),
            filename,
            length,
        });
    }
    Ok(LayerReport {
        file_name: info.filename.clone(),
        info,
        file_length,
        protocol,
        warnings,
        extra,
        protocol_node: false,
    })
}

/// The allocation `info` shows for the layer's own file.
fn file_actual(layer: &LayerReport) -> Option<u64> {
    match layer.extra.is_empty() {
        true => layer.info.actual_size,
        false => allocated(Path::new(&layer.file_name)),
    }
}

/// The JSON object qemu-img prints for one layer (with its `children` entry).
pub fn layer_json(layer: &LayerReport) -> Value {
    if layer.protocol_node {
        return json!({
            "children": [],
            "virtual-size": layer.info.virtual_size,
            "filename": layer.file_name,
            "format": layer.protocol,
        });
    }
    let mut v = serde_json::to_value(&layer.info).unwrap_or(Value::Null);
    let mut file = json!({
        "children": [],
        "virtual-size": layer.file_length,
        "filename": layer.file_name,
        "format": layer.protocol,
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": false,
    });
    if let (Some(size), Some(obj)) = (file_actual(layer), file.as_object_mut()) {
        obj.insert("actual-size".into(), json!(size));
    }
    if layer.protocol == "nbd" {
        // qemu's nbd node has no format-specific data and no dirty flag.
        if let Some(obj) = file.as_object_mut() {
            obj.remove("format-specific");
            obj.remove("dirty-flag");
        }
        // raw asks its file for the dirty flag, which an nbd node does not have.
        if let Some(obj) = v.as_object_mut().filter(|_| layer.info.format == "raw") {
            obj.remove("dirty-flag");
        }
    }
    let mut children: Vec<Value> = layer
        .extra
        .iter()
        .map(|x| {
            let mut c = json!({
                "children": [],
                "virtual-size": x.length,
                "filename": x.filename,
                "format": "file",
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false,
            });
            if let (Some(a), Some(o)) = (x.actual, c.as_object_mut()) {
                o.insert("actual-size".into(), json!(a));
            }
            json!({"name": x.child, "info": c})
        })
        .collect();
    children.push(json!({"name": "file", "info": file}));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("children".into(), Value::Array(children));
    }
    v
}

/// qemu-img's JSON for `layers`: one object, or with `chain` a list of objects (top first).
/// Ends with a newline.
pub fn render_json(layers: &[LayerReport], chain: bool) -> String {
    let value = if chain {
        Value::Array(layers.iter().map(layer_json).collect())
    } else {
        layers.first().map(layer_json).unwrap_or(Value::Null)
    };
    let mut out = to_qemu_json(&value);
    out.push('\n');
    out
}

/// qemu-img's text output for `layers`, separated by blank lines.
pub fn render_human(layers: &[LayerReport]) -> String {
    layers
        .iter()
        .map(human_layer)
        .collect::<Vec<_>>()
        .join("\n")
}

fn human_layer(layer: &LayerReport) -> String {
    let i = &layer.info;
    let mut o = String::new();
    if layer.protocol_node {
        let _ = writeln!(o, "image: {}", layer.file_name);
        let _ = writeln!(o, "file format: {}", layer.protocol);
        let _ = writeln!(
            o,
            "virtual size: {} ({} bytes)",
            human_size(i.virtual_size),
            i.virtual_size
        );
        let _ = writeln!(o, "disk size: unavailable");
        return o;
    }
    let _ = writeln!(o, "image: {}", i.filename);
    let _ = writeln!(o, "file format: {}", i.format);
    let _ = writeln!(
        o,
        "virtual size: {} ({} bytes)",
        human_size(i.virtual_size),
        i.virtual_size
    );
    let disk = i
        .actual_size
        .map_or_else(|| "unavailable".to_string(), human_size);
    let _ = writeln!(o, "disk size: {disk}");
    if i.encrypted == Some(true) {
        let _ = writeln!(o, "encrypted: yes");
    }
    if let Some(cs) = i.cluster_size {
        let _ = writeln!(o, "cluster_size: {cs}");
    }
    if i.dirty_flag {
        let _ = writeln!(o, "cleanly shut down: no");
    }
    if let Some(b) = &i.backing_filename {
        match &i.full_backing_filename {
            Some(full) if full != b => {
                let _ = writeln!(o, "backing file: {b} (actual path: {full})");
            }
            _ => {
                let _ = writeln!(o, "backing file: {b}");
            }
        }
    }
    if let Some(f) = &i.backing_filename_format {
        let _ = writeln!(o, "backing file format: {f}");
    }
    o.push_str(&crate::ops::snapshot::render_list(&i.snapshots));
    if let Some(data) = serde_json::to_value(&i.format_specific)
        .ok()
        .as_ref()
        .and_then(|v| v.get("data"))
    {
        o.push_str("Format specific information:\n");
        dump_human(&mut o, data, 1);
    }
    for x in &layer.extra {
        let _ = writeln!(o, "Child node '/{}':", x.child);
        let _ = writeln!(o, "    filename: {}", x.filename);
        let _ = writeln!(o, "    protocol type: file");
        let _ = writeln!(
            o,
            "    file length: {} ({} bytes)",
            human_size(x.length),
            x.length
        );
        let xd = x
            .actual
            .map_or_else(|| "unavailable".to_string(), human_size);
        let _ = writeln!(o, "    disk size: {xd}");
    }
    let disk = file_actual(layer).map_or_else(|| "unavailable".to_string(), human_size);
    let _ = writeln!(o, "Child node '/file':");
    let _ = writeln!(o, "    filename: {}", layer.file_name);
    let _ = writeln!(o, "    protocol type: {}", layer.protocol);
    let _ = writeln!(
        o,
        "    file length: {} ({} bytes)",
        human_size(layer.file_length),
        layer.file_length
    );
    let _ = writeln!(o, "    disk size: {disk}");
    o
}

/// Prints the members of a JSON object as qemu-img prints format-specific information: one
/// `key: value` line each (dashes in keys become spaces), nested objects and lists indented by
/// four spaces, list items numbered `[i]:`.
fn dump_human(o: &mut String, v: &Value, level: usize) {
    let pad = "    ".repeat(level);
    match v {
        Value::Object(map) => {
            for (k, val) in ordered(map) {
                let key = k.replace('-', " ");
                if is_container(val) {
                    let _ = writeln!(o, "{pad}{key}:");
                    dump_human(o, val, level + 1);
                } else {
                    let _ = writeln!(o, "{pad}{key}: {}", scalar(val));
                }
            }
        }
        Value::Array(items) => {
            for (n, val) in items.iter().enumerate() {
                if is_container(val) {
                    let _ = writeln!(o, "{pad}[{n}]:");
                    dump_human(o, val, level + 1);
                } else {
                    let _ = writeln!(o, "{pad}[{n}]: {}", scalar(val));
                }
            }
        }
        other => {
            let _ = writeln!(o, "{pad}{}", scalar(other));
        }
    }
}

fn is_container(v: &Value) -> bool {
    matches!(v, Value::Object(_) | Value::Array(_))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
