//! Image names as qemu-img takes them: plain file names, `file:NAME`, `json:{...}` and, with
//! `--image-opts`, `key=value,...` option lists (`driver=qcow2,file.filename=x.qcow2`).
//!
//! vimg opens raw and qcow2 images on local files and block devices, so a spec may name the
//! drivers `raw` and `qcow2` as the format and `file` or `host_device` as the protocol, or
//! qemu's null driver (`null-co://`, `driver=null-co`: a read-only source, [`crate::null`]),
//! or an NBD export (`nbd://...`, `nbd+unix://...`, `driver=nbd` or `file.driver=nbd` with
//! qemu's options; [`crate::nbd::client::locator`]), which becomes the export's URL.
//! Other drivers and protocols are refused with one line saying so. The block-layer options qemu
//! takes that change nothing for vimg (cache modes, `aio`, `discard`, `node-name`, qcow2
//! cache sizes...) are accepted and kept; `locking`, `force-share`, `read-only` and
//! `backing: null` are interpreted.

use crate::blkdebug::Config as BlkdebugConfig;
use crate::block::ImageFormat;
use crate::error::{Error, Result};
use crate::null::NullSpec;
use crate::option_list::boolean;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::path::PathBuf;

/// An image named by a qemu image spec, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSpec {
    /// The file (or block device) holding the image.
    pub path: PathBuf,
    /// The format the spec names (`driver=raw|qcow2`, or raw for a bare `file` driver);
    /// `None` when it is to be probed.
    pub format: Option<ImageFormat>,
    /// `file.locking` (or `locking`): `Some(false)` for `off`, `None` for `auto`/not given.
    pub locking: Option<bool>,
    /// `force-share=on`.
    pub force_share: bool,
    /// `read-only=on`.
    pub read_only: bool,
    /// `backing: null` (json) or `backing=` with no value: do not open a backing file.
    pub no_backing: bool,
    /// `data-file.filename` (or `data-file` as a string): the external data file to use
    /// instead of the one the image names.
    pub data_file: Option<PathBuf>,
    /// Every option of the spec, with dotted keys (`file.filename`), as given.
    pub options: BTreeMap<String, String>,
    /// The rules of a blkdebug node over the image's file ([`crate::blkdebug`]), to be given
    /// to the command's [`crate::opener::Opener`] with [`crate::opener::Opener::add_spec`].
    pub blkdebug: Option<BlkdebugConfig>,
    /// The spec names qemu's null driver (`null-co://`, `driver=null-co`): a read-only disk
    /// of zeros rather than a file ([`crate::null`]); `path` then holds its name.
    pub null: Option<NullSpec>,
}

impl ImageSpec {
    /// `cache.direct=on` (or `file.cache.direct=on`): qemu opens the file with `O_DIRECT`,
    /// which changes how it reports block status (see [`crate::raw::RawImage::direct`]).
    pub fn cache_direct(&self) -> bool {
        ["cache.direct", "file.cache.direct"].iter().any(|k| {
            self.options
                .get(*k)
                .is_some_and(|v| boolean(k, v).is_ok_and(|b| b))
        })
    }
}

/// The protocol names of qemu's null driver.
const NULL_DRIVERS: &[&str] = &["null-co", "null-aio"];

/// Protocols qemu knows that vimg does not open (a name `PROTO:...` using one is refused).
const FOREIGN_PROTOCOLS: &[&str] = &[
    "nbd",
    "nbd+unix",
    "http",
    "https",
    "ftp",
    "ftps",
    "ssh",
    "iscsi",
    "iser",
    "rbd",
    "gluster",
    "nfs",
    "vvfat",
    "blkdebug",
    "blkverify",
    "throttle",
    "quorum",
    "fat",
];

/// Image formats qemu has that vimg does not read.
const FOREIGN_FORMATS: &[&str] = &[
    "vmdk",
    "vhdx",
    "vpc",
    "vdi",
    "qed",
    "qcow",
    "parallels",
    "dmg",
    "bochs",
    "cloop",
    "luks",
];

/// Filter and test drivers of qemu (not image formats) that vimg does not have.
const FOREIGN_DRIVERS: &[&str] = &[
    "vvfat",
    "copy-before-write",
    "preallocate",
    "compress",
    "snapshot-access",
    "blkdebug",
    "blkverify",
    "blklogwrites",
    "throttle",
    "quorum",
    "replication",
];

/// Options accepted and kept without changing what vimg does (qemu block-layer and qcow2
/// runtime options), at the top level of a spec or under `file.`.
const IGNORED: &[&str] = &[
    "node-name",
    "auto-read-only",
    "cache.direct",
    "cache.no-flush",
    "discard",
    "detect-zeroes",
    "aio",
    "aio-max-batch",
    "drop-cache",
    "x-check-cache-dropped",
    "pr-manager",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "encrypt.key-secret",
    "encrypt.format",
    "backing.encrypt.key-secret",
    "backing.encrypt.format",
    "key-secret",
    "offset",
    "size",
];

/// Parses an image name as qemu-img does without `--image-opts`: `json:{...}`, `file:NAME`,
/// or a plain file name.
pub fn parse_filename(name: &str) -> Result<ImageSpec> {
    if let Some(json) = name.strip_prefix("json:") {
        let json = strict_json(json);
        let value: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| Error::invalid_input(format!("Could not parse the JSON options: {e}")))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(Error::invalid_input("Invalid JSON object given"));
        };
        let blkdebug = unwrap_json(&mut map)?;
        let mut flat = BTreeMap::new();
        flatten("", &map, &mut flat)?;
        let mut spec = interpret(flat)?;
        spec.blkdebug = blkdebug.filter(|c| !c.is_empty());
        return Ok(spec);
    }
    if let Some(rest) = name.strip_prefix("blkdebug:") {
        return parse_prefixed(rest);
    }
    if let Some(rest) = name.strip_prefix("file:") {
        // A relative name with a colon before any slash is written `./NAME`, as qemu writes
        // it, so that it can never be read back as a protocol prefix.
        let path = match rest.find(':') {
            Some(c) if !rest.starts_with('/') && !rest[..c].contains('/') => {
                PathBuf::from(format!("./{rest}"))
            }
            _ => PathBuf::from(rest),
        };
        return Ok(ImageSpec {
            path,
            ..Default::default()
        });
    }
    if let Some(proto) = NULL_DRIVERS
        .iter()
        .find(|p| name.starts_with(&format!("{p}:")))
    {
        // qemu's null driver takes exactly one file name.
        if name != format!("{proto}://") {
            return Err(Error::invalid_input(format!(
                "The only allowed filename for this driver is '{proto}://'"
            )));
        }
        return Ok(ImageSpec {
            path: PathBuf::from(name),
            null: Some(NullSpec::default()),
            ..Default::default()
        });
    }
    if let Some(nbd) = crate::nbd::client::locator::NbdLocator::parse(name) {
        let nbd =
            nbd.map_err(|e| Error::invalid_input(format!("Could not open '{name}': {e}")).bare())?;
        return Ok(ImageSpec {
            path: PathBuf::from(nbd.locator()),
            ..Default::default()
        });
    }
    if let Some(rest) = name.strip_prefix("host_device:") {
        return Ok(ImageSpec {
            path: PathBuf::from(rest),
            ..Default::default()
        });
    }
    if let Some((proto, _)) = name.split_once(':') {
        if FOREIGN_PROTOCOLS.contains(&proto) {
            return Err(unsupported_protocol(proto));
        }
    }
    Ok(ImageSpec {
        path: PathBuf::from(name),
        ..Default::default()
    })
}

/// qemu's JSON with its single-quoted strings (`{'driver': 'qcow2'}`, which its parser takes
/// and its iotests use) rewritten as standard JSON; double-quoted strings are kept as they are.
fn strict_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(d) = chars.next() {
                    out.push(d);
                    match d {
                        '\\' => out.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' => {
                out.push('"');
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => match chars.next() {
                            Some('\'') => out.push('\''),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => {}
                        },
                        '\'' => break,
                        '"' => out.push_str("\\\""),
                        _ => out.push(d),
                    }
                }
                out.push('"');
            }
            _ => out.push(c),
        }
    }
    out
}

/// Parses an `--image-opts` argument: `key=value` items separated by commas, `,,` standing
/// for a comma inside a value, dotted keys for nested options.
pub fn parse_image_opts(text: &str) -> Result<ImageSpec> {
    let mut flat = BTreeMap::new();
    for item in split_opts(text) {
        if item.is_empty() {
            continue;
        }
        let Some((k, v)) = item.split_once('=') else {
            return Err(Error::invalid_input(format!(
                "Invalid parameter '{item}' (expected key=value)"
            )));
        };
        if k.is_empty() {
            return Err(Error::invalid_input(format!("Invalid parameter '{item}'")));
        }
        flat.insert(k.to_string(), v.to_string());
    }
    let blkdebug = unwrap_opts(&mut flat)?;
    let mut spec = interpret(flat)?;
    spec.blkdebug = blkdebug.filter(|c| !c.is_empty());
    Ok(spec)
}

/// Splits `text` at single commas; `,,` is a comma.
fn split_opts(text: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                items.last_mut().expect("never empty").push(',');
            } else {
                items.push(String::new());
            }
        } else {
            items.last_mut().expect("never empty").push(c);
        }
    }
    items
}

/// Flattens a JSON object into dotted keys (`{"file":{"filename":"x"}}` is `file.filename=x`).
fn flatten(
    prefix: &str,
    map: &serde_json::Map<String, serde_json::Value>,
    out: &mut BTreeMap<String, String>,
) -> Result<()> {
    use serde_json::Value as V;
    for (k, v) in map {
        let key = format!("{prefix}{k}");
        match v {
            V::Object(inner) => flatten(&format!("{key}."), inner, out)?,
            V::String(s) => {
                out.insert(key, s.clone());
            }
            V::Bool(b) => {
                out.insert(key, if *b { "on" } else { "off" }.to_string());
            }
            V::Number(n) => {
                out.insert(key, n.to_string());
            }
            V::Null => {
                out.insert(key, String::new());
            }
            V::Array(_) => {
                return Err(Error::unsupported(format!(
                    "option '{key}': lists are not supported"
                )))
            }
        }
    }
    Ok(())
}

fn unsupported_protocol(p: &str) -> Error {
    Error::unsupported(format!(
        "Unknown protocol '{p}' (vimg opens local files and block devices only)"
    ))
}

/// Works out the file, format and interpreted options from flattened options.
fn interpret(mut flat: BTreeMap<String, String>) -> Result<ImageSpec> {
    nbd_options(&mut flat)?;
    let mut spec = ImageSpec::default();
    let driver = flat.get("driver").map(String::as_str);
    if let Some(null) = null_device(&flat)? {
        spec.path = PathBuf::from(format!("{}://", null.0));
        spec.format = Some(ImageFormat::Raw);
        spec.null = Some(null.1);
        spec.options = flat;
        return Ok(spec);
    }
    // The protocol layer's options live under `file.` when a format driver is named, at the
    // top level when the driver is the protocol itself (or not named at all).
    let registered = driver.and_then(|d| ImageFormat::all().find(|f| f.as_str() == d));
    let (protocol_prefix, format) = match driver {
        // A format driver of the registry.
        Some(_) if registered.is_some() => ("file.", registered),
        // Without a format driver the file's bytes are the disk, as in qemu.
        Some("file") | Some("host_device") => ("", Some(ImageFormat::Raw)),
        None => ("file.", None),
        Some(d) if FOREIGN_FORMATS.contains(&d) => {
            return Err(Error::unsupported(format!(
                "{d} images are not supported yet (driver '{d}')"
            )))
        }
        Some(d) if FOREIGN_PROTOCOLS.contains(&d) => return Err(unsupported_protocol(d)),
        Some(d) if FOREIGN_DRIVERS.contains(&d) => {
            return Err(Error::unsupported(format!(
                "driver '{d}' is not supported by vimg (only raw and qcow2 over file or \
                 host_device)"
            )))
        }
        Some(d) => return Err(Error::invalid_input(format!("Unknown driver '{d}'"))),
    };
    spec.format = format;
    let inner = |k: &str| flat.get(&format!("{protocol_prefix}{k}"));
    if !protocol_prefix.is_empty() {
        if let Some(d) = flat.get("file.driver") {
            if d != "file" && d != "host_device" {
                return Err(if FOREIGN_PROTOCOLS.contains(&d.as_str()) {
                    unsupported_protocol(d)
                } else {
                    Error::unsupported(format!(
                        "driver '{d}' for the file layer is not supported (use file or \
                         host_device)"
                    ))
                });
            }
        }
    }
    // `file` as a string (json: "file": "x.qcow2", or --image-opts file=x.qcow2) names the
    // file; `filename` does at the top level, with or without a format driver.
    let path = inner("filename")
        .or_else(|| flat.get("file").filter(|_| !protocol_prefix.is_empty()))
        .or_else(|| flat.get("filename"));
    let Some(path) = path else {
        return Err(Error::invalid_input(match driver {
            Some("file") | Some("host_device") => {
                "The 'file' block driver requires a file name".to_string()
            }
            _ => "A block device must be specified for \"file\"".to_string(),
        }));
    };
    spec.path = PathBuf::from(path);
    for (k, v) in &flat {
        let bare = k.strip_prefix("file.").unwrap_or(k);
        match bare {
            "driver" | "filename" | "file" => {}
            "locking" => {
                spec.locking = match v.as_str() {
                    "auto" => None,
                    _ => Some(boolean(k, v)?),
                }
            }
            "force-share" => spec.force_share = boolean(k, v)?,
            "read-only" => spec.read_only = boolean(k, v)?,
            "backing" if k == "backing" && v.is_empty() => spec.no_backing = true,
            "data-file" | "data-file.filename" if k == bare => {
                spec.data_file = Some(PathBuf::from(v))
            }
            "data-file.driver" if k == bare && (v == "file" || v == "host_device") => {}
            // The backing file named by options (read by the format driver when it opens
            // the backing file): a format, over a file or a device.
            "backing.driver" if k == bare && ImageFormat::from_name(v).is_ok() => {}
            "backing.file.filename" if k == bare => {}
            "backing.file.driver" if k == bare && (v == "file" || v == "host_device") => {}
            // raw's window on its file: vimg reads the whole file, so taking them would give
            // other data than qemu's without a word. qcow2 has no such options (qemu's words).
            "offset" | "size" if k == bare => {
                return Err(Error::unsupported(match driver {
                    Some("raw") | None => {
                        format!("Block format 'raw': option '{k}' is not supported by vimg")
                    }
                    Some(fmt) => format!("Block format '{fmt}' does not support the option '{k}'"),
                }));
            }
            b if IGNORED.contains(&b) || b.starts_with("overlap-check.") => {}
            _ => {
                let fmt = driver.unwrap_or("file");
                return Err(Error::invalid_input(format!(
                    "Block format '{fmt}' does not support the option '{k}'"
                )));
            }
        }
    }
    spec.options = flat;
    Ok(spec)
}

/// Brings the options of qemu's `nbd` driver, at the top level (`driver=nbd`) or under
/// `file.` (`file.driver=nbd`), to the export's locator ([`crate::nbd::client::locator`]):
/// `driver=raw,file.filename=LOCATOR` with the format's own options kept.
fn nbd_options(flat: &mut BTreeMap<String, String>) -> Result<()> {
    let prefix = match (
        flat.get("driver").map(String::as_str),
        flat.get("file.driver").map(String::as_str),
    ) {
        (Some("nbd"), _) => "",
        (_, Some("nbd")) => "file.",
        _ => return Ok(()),
    };
    /// Options of the block layer a protocol node takes, kept at the top level.
    const GENERIC: &[&str] = &["read-only", "force-share", "auto-read-only", "node-name"];
    let mut own = BTreeMap::new();
    let mut kept = BTreeMap::new();
    for (k, v) in std::mem::take(flat) {
        match k.strip_prefix(prefix) {
            Some(bare) if prefix.is_empty() && GENERIC.contains(&bare) => {
                kept.insert(k, v);
            }
            Some(bare) => {
                own.insert(bare.to_string(), v);
            }
            None => {
                kept.insert(k, v);
            }
        }
    }
    let loc = crate::nbd::client::locator::NbdLocator::from_options(&own)
        .map_err(Error::invalid_input)?;
    if prefix.is_empty() {
        kept.insert("driver".into(), "raw".into());
        crate::nbd::client::mark_protocol_node(&loc.url());
    }
    if let Some(ctx) = &loc.dirty_bitmap {
        crate::nbd::client::use_context(&loc.url(), ctx);
    }
    if let Some(creds) = &loc.tls_creds {
        crate::nbd::client::use_tls(&loc.url(), creds, loc.tls_hostname.as_deref());
    }
    kept.insert("file.filename".into(), loc.url());
    *flat = kept;
    Ok(())
}

/// The null device a spec names, with its protocol name: `driver=null-co` (options at the top
/// level) or a `raw` (or unnamed) format over `file.driver=null-co` (options under `file.`).
/// Takes qemu's options of the driver: `size` (rounded up to whole sectors), `read-zeroes`,
/// `latency-ns` (ignored) and `filename` (only its own `null-co://`).
fn null_device(flat: &BTreeMap<String, String>) -> Result<Option<(&'static str, NullSpec)>> {
    let find = |key: &str| {
        let d = flat.get(key)?;
        NULL_DRIVERS.iter().copied().find(|n| n == d)
    };
    let (proto, prefix) = match (find("driver"), find("file.driver")) {
        (Some(p), _) => (p, ""),
        (None, Some(p)) if matches!(flat.get("driver").map(String::as_str), None | Some("raw")) => {
            (p, "file.")
        }
        _ => return Ok(None),
    };
    let mut spec = NullSpec::default();
    for (k, v) in flat {
        let Some(bare) = k.strip_prefix(prefix) else {
            continue;
        };
        match bare {
            "driver" | "latency-ns" | "read-only" | "force-share" => {}
            "size" => {
                let size = crate::size::parse_size(v).map_err(|_| {
                    Error::invalid_input(
                        "Parameter 'size' expects a non-negative number below 2^64",
                    )
                })?;
                spec.size = size.div_ceil(512) * 512;
            }
            "read-zeroes" => spec.read_zeroes = boolean(k, v)?,
            "filename" if v == &format!("{proto}://") => {}
            "filename" => {
                return Err(Error::invalid_input(format!(
                    "The only allowed filename for this driver is '{proto}://'"
                )))
            }
            b if IGNORED.contains(&b) => {}
            _ => {
                return Err(Error::invalid_input(format!(
                    "Block protocol '{proto}' doesn't support the option '{bare}'"
                )))
            }
        }
    }
    // The format layer over it takes only the options that change nothing.
    if prefix == "file." {
        for k in flat.keys().filter(|k| !k.starts_with(prefix)) {
            let ok = IGNORED.contains(&k.as_str()) && k != "size";
            if !ok && !matches!(k.as_str(), "driver" | "read-only" | "force-share") {
                return Err(Error::invalid_input(format!(
                    "Block format 'raw' does not support the option '{k}'"
                )));
            }
        }
    }
    Ok(Some((proto, spec)))
}

/// Parses arbitrary bytes (as UTF-8, lossily) both as an image name and as an `--image-opts`
/// list: the fuzz target `image_spec` and its replay in `tests/hostile/hostile.rs`. Never panics.
pub fn exercise(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = parse_filename(&text);
    let _ = parse_image_opts(&text);
}

// qemu's blkdebug nodes in image names ([`crate::blkdebug`]): unwrapped here, their rules
// kept in the spec for the file they sit over.

/// Parses what follows `blkdebug:` in an image name: `CONFIG:IMAGE`, `CONFIG` possibly empty.
/// The image is itself an image name; the rules are kept for its file.
pub fn parse_prefixed(rest: &str) -> Result<ImageSpec> {
    parse_prefixed_inner(rest).map_err(|e| {
        // As qemu frames it: `Could not open 'blkdebug:...': WHY`, the OS cause kept.
        let what = format!("Could not open 'blkdebug:{rest}'");
        let os = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error);
        match os {
            Some(code) if e.what().is_empty() => {
                Error::io(what, io::Error::from_raw_os_error(code))
            }
            Some(code) => Error::io(
                format!("{what}: {}", e.what()),
                io::Error::from_raw_os_error(code),
            ),
            None => Error::new(e.kind(), format!("{what}: {e}")),
        }
        .bare()
    })
}

fn parse_prefixed_inner(rest: &str) -> Result<ImageSpec> {
    let Some((config, image)) = rest.split_once(':') else {
        return Err(Error::invalid_input(
            "blkdebug requires both config file and image path",
        ));
    };
    let config = if config.is_empty() {
        BlkdebugConfig::default()
    } else {
        BlkdebugConfig::from_file(Path::new(config))?
    };
    let mut spec = parse_filename(image)?;
    if !config.is_empty() {
        spec.blkdebug = Some(config);
    }
    Ok(spec)
}

/// If the json: options `map` have a blkdebug node at the top or as `file`, takes it out (its
/// `image` takes its place) and returns its rules, to be kept for the file once the rest is
/// resolved.
pub fn unwrap_json(
    map: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Option<BlkdebugConfig>> {
    use serde_json::Value as V;
    let is_blkdebug =
        |m: &serde_json::Map<String, V>| m.get("driver").and_then(V::as_str) == Some("blkdebug");
    if is_blkdebug(map) {
        let node = std::mem::take(map);
        let (config, image) = node_from_json(node)?;
        *map = image;
        return Ok(config);
    }
    if let Some(V::Object(file)) = map.get_mut("file") {
        if is_blkdebug(file) {
            let node = std::mem::take(file);
            let (config, image) = node_from_json(node)?;
            map.insert("file".into(), V::Object(image));
            return Ok(config);
        }
    }
    Ok(None)
}

/// A blkdebug node given as JSON: its rules (`None` when it sits over a format driver, where
/// they could never fire) and its `image`.
fn node_from_json(
    node: serde_json::Map<String, serde_json::Value>,
) -> Result<(
    Option<BlkdebugConfig>,
    serde_json::Map<String, serde_json::Value>,
)> {
    use serde_json::Value as V;
    let mut flat = BTreeMap::new();
    let mut image = None;
    for (k, v) in node {
        match (k.as_str(), v) {
            ("image", V::Object(m)) => image = Some(m),
            ("image", V::String(s)) => {
                image = Some(serde_json::Map::from_iter([(
                    "filename".to_string(),
                    V::String(s),
                )]))
            }
            ("inject-error" | "set-state", V::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    let V::Object(fields) = item else {
                        return Err(Error::invalid_input(format!(
                            "Invalid parameter type for '{k}.{i}', expected: object"
                        )));
                    };
                    for (f, fv) in fields {
                        flat.insert(format!("{k}.{i}.{f}"), scalar(&fv, &f)?);
                    }
                }
            }
            (_, v) => {
                flat.insert(k.clone(), scalar(&v, &k)?);
            }
        }
    }
    let image = image
        .ok_or_else(|| Error::invalid_input("A block device must be specified for \"image\""))?;
    let config = from_node_options(&flat)?;
    let over_format = image
        .get("driver")
        .and_then(V::as_str)
        .is_some_and(|d| d != "file" && d != "host_device");
    Ok(((!over_format).then_some(config), image))
}

/// A JSON scalar as qemu's option strings spell it.
fn scalar(v: &serde_json::Value, key: &str) -> Result<String> {
    use serde_json::Value as V;
    Ok(match v {
        V::String(s) => s.clone(),
        V::Bool(b) => if *b { "on" } else { "off" }.to_string(),
        V::Number(n) => n.to_string(),
        _ => {
            return Err(Error::invalid_input(format!(
                "Invalid parameter type for '{key}'"
            )))
        }
    })
}

/// The configuration of a node from its options: its `config` file's rules, then those given
/// as options.
fn from_node_options(opts: &BTreeMap<String, String>) -> Result<BlkdebugConfig> {
    let mut config = match opts.get("config") {
        Some(file) => BlkdebugConfig::from_file(Path::new(file))?,
        None => BlkdebugConfig::default(),
    };
    let mut rest = opts.clone();
    rest.remove("config");
    config.add_options(&rest)?;
    Ok(config)
}

/// If the `--image-opts` options `flat` describe a blkdebug node at the top or as `file`,
/// takes it out (its `image.` options take its place) and returns its rules, as
/// [`unwrap_json`] does.
pub fn unwrap_opts(flat: &mut BTreeMap<String, String>) -> Result<Option<BlkdebugConfig>> {
    let prefix = if flat.get("driver").map(String::as_str) == Some("blkdebug") {
        ""
    } else if flat.get("file.driver").map(String::as_str) == Some("blkdebug") {
        "file."
    } else {
        return Ok(None);
    };
    let mut node = BTreeMap::new();
    let mut image = BTreeMap::new();
    let mut kept = BTreeMap::new();
    for (k, v) in std::mem::take(flat) {
        let Some(own) = k.strip_prefix(prefix) else {
            kept.insert(k, v);
            continue;
        };
        if let Some(sub) = own.strip_prefix("image.") {
            image.insert(format!("{prefix}{sub}"), v);
        } else if own == "image" {
            image.insert(format!("{prefix}filename"), v);
        } else {
            node.insert(own.to_string(), v);
        }
    }
    let config = from_node_options(&node)?;
    let over_format = image
        .get(&format!("{prefix}driver"))
        .is_some_and(|d| d != "file" && d != "host_device");
    kept.extend(image);
    *flat = kept;
    Ok((!over_format).then_some(config))
}

/// Whether an image name (a backing file name recorded in an image) is a `json:` name with a
/// blkdebug node, which vimg opens; its spec is returned (the file it names, and its rules).
pub fn parse_json_name(name: &str) -> Option<Result<ImageSpec>> {
    let json = name.strip_prefix("json:")?;
    if !json.contains("blkdebug") {
        return None;
    }
    Some(parse_filename(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_offset_and_size_are_refused_not_ignored() {
        for text in [
            "driver=raw,file.filename=r.raw,offset=512",
            "driver=raw,file.filename=r.raw,size=1024",
            "file.filename=r.raw,offset=0",
        ] {
            let e = parse_image_opts(text).unwrap_err().to_string();
            assert!(e.contains("is not supported by vimg"), "{text}: {e}");
        }
        let e = parse_image_opts("driver=qcow2,file.filename=q,offset=0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Block format 'qcow2' does not support the option 'offset'"
        );
        // A null device's size is its own option.
        assert!(parse_image_opts("driver=null-co,size=4k").is_ok());
    }

    #[test]
    fn json_with_nested_file() {
        let s = parse_filename(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a,b.qcow2","locking":"off"}}"#,
        )
        .unwrap();
        assert_eq!(s.path, PathBuf::from("a,b.qcow2"));
        assert_eq!(s.format, Some(ImageFormat::Qcow2));
        assert_eq!(s.locking, Some(false));
    }

    #[test]
    fn single_quoted_json_as_qemu_takes_it() {
        let s = parse_filename(
            "json:{ 'driver': 'qcow2',\n 'file': {'driver':'file','filename':'it\\'s \"x\"'}}",
        )
        .unwrap();
        assert_eq!(s.path, PathBuf::from("it's \"x\""));
        assert_eq!(strict_json(r#"{"a'b": 'c'}"#), r#"{"a'b": "c"}"#);
    }

    #[test]
    fn json_dotted_keys_and_bare_file_driver() {
        let s = parse_filename(r#"json:{"driver":"qcow2","file.filename":"x"}"#).unwrap();
        assert_eq!(s.path, PathBuf::from("x"));
        let s = parse_filename(r#"json:{"driver":"file","filename":"y"}"#).unwrap();
        assert_eq!(
            (s.path, s.format),
            (PathBuf::from("y"), Some(ImageFormat::Raw))
        );
        let s = parse_filename(r#"json:{"file":{"filename":"z"}}"#).unwrap();
        assert_eq!((s.path, s.format), (PathBuf::from("z"), None));
    }

    #[test]
    fn image_opts_with_escaped_comma() {
        let s = parse_image_opts("driver=raw,file.filename=a,,b.img,file.locking=auto").unwrap();
        assert_eq!(s.path, PathBuf::from("a,b.img"));
        assert_eq!(s.format, Some(ImageFormat::Raw));
        assert_eq!(s.locking, None);
        let s = parse_image_opts("driver=qcow2,file=x.qcow2,backing=").unwrap();
        assert!(s.no_backing);
    }

    #[test]
    fn data_file_option() {
        let s = parse_image_opts("data-file.filename=d.raw,file.filename=x.qcow2").unwrap();
        assert_eq!(s.path, PathBuf::from("x.qcow2"));
        assert_eq!(s.data_file, Some(PathBuf::from("d.raw")));
        let s = parse_filename(r#"json:{"driver":"qcow2","data-file":"e.raw","file":"y"}"#);
        assert_eq!(s.unwrap().data_file, Some(PathBuf::from("e.raw")));
        assert!(parse_image_opts("data-file.driver=nbd,file.filename=x").is_err());
    }

    #[test]
    fn null_driver_specs() {
        let s = parse_filename("null-aio://").unwrap();
        assert_eq!(s.null, Some(NullSpec::default()));
        let s =
            parse_filename(r#"json:{"driver":"null-co","size":1000,"read-zeroes":true}"#).unwrap();
        let want = NullSpec {
            size: 1024,
            read_zeroes: true,
        };
        assert_eq!((s.null, s.format), (Some(want), Some(ImageFormat::Raw)));
        let s = parse_image_opts("driver=raw,file.driver=null-co,file.size=64k").unwrap();
        assert_eq!(s.null.map(|n| n.size), Some(65536));
        assert!(!s.cache_direct());
        for bad in [
            "null-co://x",
            r#"json:{"driver":"null-co","size":"-1"}"#,
            r#"json:{"driver":"null-co","read-zeroes":"maybe"}"#,
            r#"json:{"driver":"null-co","filename":"other"}"#,
        ] {
            assert!(parse_filename(bad).is_err(), "{bad}");
        }
        assert!(parse_image_opts("driver=raw,file.driver=null-co,bogus=1").is_err());
        let s = parse_image_opts("driver=raw,file.filename=x,cache.direct=on").unwrap();
        assert!(s.cache_direct() && s.null.is_none());
    }

    #[test]
    fn nbd_names_and_options_come_to_the_export_url() {
        let p = |n: &str| parse_filename(n).unwrap().path;
        assert_eq!(p("nbd://h/e"), PathBuf::from("nbd://h:10809/e"));
        assert_eq!(
            p(r#"json:{"driver":"nbd","server":{"type":"unix","path":"/s"},"export":"e"}"#),
            PathBuf::from("nbd+unix:///e?socket=/s")
        );
        let s = parse_filename(
            r#"json:{"driver":"qcow2","file":{"driver":"nbd","server":{"type":"inet","host":"h","port":"99"}}}"#,
        )
        .unwrap();
        assert_eq!(
            (s.path, s.format),
            (PathBuf::from("nbd://h:99"), Some(ImageFormat::Qcow2))
        );
        let s = parse_image_opts(
            "driver=nbd,server.type=unix,server.path=/s,export=e,x-dirty-bitmap=qemu:dirty-bitmap:b",
        )
        .unwrap();
        assert_eq!(s.format, Some(ImageFormat::Raw));
        assert_eq!(s.path, PathBuf::from("nbd+unix:///e?socket=/s"));
        let s = parse_image_opts("driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=h,file.export=x,read-only=on").unwrap();
        assert_eq!(s.path, PathBuf::from("nbd://h:10809/x"));
        assert!(s.read_only);
        assert!(parse_image_opts("driver=nbd,server.type=inet").is_err());
        assert!(parse_image_opts("driver=nbd,server.type=unix,server.path=/s,bogus=1").is_err());
        assert!(parse_filename("nbd+unix:///e").is_err());
    }

    #[test]
    fn refusals() {
        for bad in [
            r#"json:{"driver":"qed","file":{"filename":"x"}}"#,
            r#"json:{"driver":"qcow2"}"#,
            r#"json:{"driver":"qcow2","file.filename":"x","bogus":1}"#,
            r#"json:[1]"#,
            "json:{",
            "nbd://host:port/x",
        ] {
            assert!(parse_filename(bad).is_err(), "{bad}");
        }
        assert!(parse_image_opts("driver=qcow2,x.qcow2").is_err());
        assert_eq!(
            parse_filename("file:a:b").unwrap().path,
            PathBuf::from("./a:b")
        );
        assert_eq!(
            parse_filename("plain").unwrap().path,
            PathBuf::from("plain")
        );
    }
}
