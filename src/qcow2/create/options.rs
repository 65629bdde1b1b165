//! The options of a new qcow2 image: [`CreateOptions`] with qemu-img's defaults, qemu's `-o`
//! option lists ([`parse_options`], through [`crate::option_list`], into [`OptionUpdates`], applied with
//! [`CreateOptions::apply`]) and the combinations qemu refuses ([`CreateOptions::validate`]).

use super::plan::Geometry;
use crate::crypto::luks::{CreateOptionValues, CreateParams};
use crate::error::{Error, Result};
use crate::option_desc::{OptDesc, OptType, BACKING_FILE, SIZE};
use crate::prealloc::Preallocation;
use crate::qcow2::format::header::{
    CompressionType, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS,
};

/// The qcow2 version to write (`compat=`): qcow2.rst "Header", bytes 4-7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// Version 2 (`compat=0.10` or `v2`): a 72-byte header, no feature bits, 16-bit refcounts.
    V2,
    /// Version 3 (`compat=1.1` or `v3`), the default.
    #[default]
    V3,
}

impl Compat {
    /// The name `qemu-img info` reports (`0.10` or `1.1`).
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }

    /// The header's version field.
    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// Everything that defines a new qcow2 image. [`Default`] gives qemu-img's defaults: version
/// 3, 64 KiB clusters, 16-bit refcounts, zlib compression, no preallocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual disk size in bytes (qcow2.rst "Header", bytes 24-31). Rounded up to a multiple
    /// of 512 when the image is written, as qemu does.
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 B to 2 MiB (bytes 20-23 hold its log2).
    pub cluster_size: u64,
    /// The qcow2 version.
    pub compat: Compat,
    /// Width of a refcount: a power of two from 1 to 64 (version 2 only has 16). Bytes 96-99
    /// hold its log2 (`refcount_order`).
    pub refcount_bits: u64,
    /// Set the lazy refcounts compatible feature (bit 0 of bytes 80-87; version 3 only).
    pub lazy_refcounts: bool,
    /// Compression type of compressed clusters (byte 104; zstd needs version 3).
    pub compression_type: CompressionType,
    /// Extended L2 entries with subcluster bitmaps (incompatible bit 4; version 3 and clusters
    /// of at least 16 KiB).
    pub extended_l2: bool,
    /// Backing file name, recorded as given (relative names are relative to the image).
    pub backing_file: Option<String>,
    /// Backing file format, recorded in the backing format header extension.
    pub backing_fmt: Option<String>,
    /// External data file name (incompatible bit 2 and the data file header extension),
    /// recorded as given; the file is created (or truncated) next to the image.
    pub data_file: Option<String>,
    /// The data file stays a valid raw image (autoclear bit 1): every cluster is mapped to the
    /// same offset in the data file.
    pub data_file_raw: bool,
    /// What to allocate up front.
    pub preallocation: Preallocation,
    /// The encryption options (`encryption=`, `encrypt.*`), as given.
    pub encrypt: EncryptOptions,
}

/// The encryption options of a new image as given (`encrypt.format=aes|luks`,
/// `encrypt.key-secret=ID`, the LUKS options, and the old `encryption=on|off` spelling of
/// `encrypt.format=aes`). Checked by [`CreateOptions::validate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptOptions {
    /// `encryption=` (the alias of `encrypt.format=aes`).
    pub alias: Option<bool>,
    /// `encrypt.format=`
    pub format: Option<String>,
    /// `encrypt.key-secret=`: the id of the `--object secret` holding the passphrase.
    pub key_secret: Option<String>,
    /// The other `encrypt.*` options given (the LUKS ones), as `key=value`, in order.
    pub other: Vec<(String, String)>,
}

impl EncryptOptions {
    /// Whether any encryption option was given.
    pub fn is_given(&self) -> bool {
        *self != EncryptOptions::default()
    }

    /// The encryption format the options ask for (`aes` or `luks`), checked as qemu checks
    /// it; `None` for no encryption.
    pub fn format(&self) -> Result<Option<&str>> {
        let bad = |m: String| Err(Error::invalid_input(m));
        if self.alias == Some(true) && self.format.is_some() {
            return bad(
                "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
            );
        }
        let format = match (&self.format, self.alias) {
            (Some(f), _) => f.as_str(),
            (None, Some(true)) => "aes",
            (None, _) if self.key_secret.is_some() || !self.other.is_empty() => {
                return bad("Parameter 'encrypt.format' is missing".into())
            }
            (None, _) => return Ok(None),
        };
        match format {
            "aes" => {
                if let Some((k, _)) = self.other.first() {
                    return bad(format!("Parameter '{k}' is unexpected"));
                }
                if self.key_secret.is_none() {
                    return bad(crate::qcow2::crypt::KEY_REQUIRED.into());
                }
                Ok(Some("aes"))
            }
            "luks" => {
                if self.key_secret.is_none() {
                    return bad(crate::qcow2::crypt::KEY_REQUIRED.into());
                }
                Ok(Some("luks"))
            }
            other => bad(format!(
                "Parameter 'format' does not accept value '{other}'"
            )),
        }
    }

    /// For `encrypt.format=luks`, the LUKS header to write ([`crate::crypto::luks::create`])
    /// and the id of the secret holding the passphrase; `None` for another or no format. The
    /// values are checked as qemu checks them (`Parameter 'cipher-alg' does not accept value
    /// ...`, `Unsupported cipher mode xts` for cast5-128).
    pub fn luks(&self) -> Result<Option<(CreateParams, &str)>> {
        if self.format()? != Some("luks") {
            return Ok(None);
        }
        let mut o = CreateOptionValues::default();
        for (k, v) in &self.other {
            let key = k.strip_prefix("encrypt.").unwrap_or(k);
            if !o.set(key, v, k)? {
                return Err(Error::invalid_input(format!("Invalid parameter '{k}'")));
            }
        }
        let params = o.params()?;
        params.spec.validate()?;
        Ok(Some((
            params,
            self.key_secret.as_deref().unwrap_or_default(),
        )))
    }

    /// The options as qemu-img's "Formatting" line shows them (each ` key=value`, the LUKS
    /// ones in qemu's order).
    pub fn formatting(&self) -> String {
        let mut s = String::new();
        if let Some(a) = self.alias {
            s.push_str(&format!(" encryption={}", if a { "on" } else { "off" }));
        }
        if let Some(f) = &self.format {
            s.push_str(&format!(" encrypt.format={f}"));
        }
        if let Some(k) = &self.key_secret {
            s.push_str(&format!(" encrypt.key-secret={k}"));
        }
        let mut other: Vec<&(String, String)> = self.other.iter().collect();
        other.sort_by_key(|(k, _)| {
            let key = k.strip_prefix("encrypt.").unwrap_or(k);
            LUKS_KEYS.iter().position(|&x| x == key)
        });
        for (k, v) in other {
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }
}

/// The LUKS options qcow2 takes after `encrypt.` when creating an image, in qemu's order
/// (qcow2's creation option list).
const LUKS_KEYS: &[&str] = &[
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "iter-time",
];

/// What vimg says of legacy AES encryption when it creates such an image, and in `-o help`.
pub const WEAK_AES: &str = "legacy qcow2 AES encryption (encrypt.format=aes) is weak: the key is \
     the first 16 bytes of the passphrase, the IVs are predictable and a wrong passphrase goes \
     unnoticed; qemu's system emulators refuse such images (use encrypt.format=luks)";

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            compat: Compat::V3,
            refcount_bits: 16,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            extended_l2: false,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            encrypt: EncryptOptions::default(),
        }
    }
}

/// The options one or more `-o` arguments set, in qemu-img's syntax: each field is `None`
/// unless an option named it. Merge several with [`OptionUpdates::merge`] (later wins) and
/// apply them with [`CreateOptions::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptionUpdates {
    /// `size=`
    pub size: Option<u64>,
    /// `cluster_size=`
    pub cluster_size: Option<u64>,
    /// `compat=`
    pub compat: Option<Compat>,
    /// `refcount_bits=`
    pub refcount_bits: Option<u64>,
    /// `lazy_refcounts=`
    pub lazy_refcounts: Option<bool>,
    /// `compression_type=`
    pub compression_type: Option<CompressionType>,
    /// `extended_l2=`
    pub extended_l2: Option<bool>,
    /// `backing_file=`
    pub backing_file: Option<String>,
    /// `backing_fmt=`
    pub backing_fmt: Option<String>,
    /// `data_file=`
    pub data_file: Option<String>,
    /// `data_file_raw=`
    pub data_file_raw: Option<bool>,
    /// `preallocation=`
    pub preallocation: Option<Preallocation>,
    /// `encryption=` and `encrypt.*`: later ones win, each on its own.
    pub encrypt: EncryptOptions,
    /// `help` or `?` was given: list the options instead of creating anything.
    pub help: bool,
}

impl OptionUpdates {
    /// Adds the options of a later `-o` argument; where both set an option, `later` wins.
    pub fn merge(&mut self, later: OptionUpdates) {
        fn take<T>(a: &mut Option<T>, b: Option<T>) {
            if b.is_some() {
                *a = b;
            }
        }
        take(&mut self.size, later.size);
        take(&mut self.cluster_size, later.cluster_size);
        take(&mut self.compat, later.compat);
        take(&mut self.refcount_bits, later.refcount_bits);
        take(&mut self.lazy_refcounts, later.lazy_refcounts);
        take(&mut self.compression_type, later.compression_type);
        take(&mut self.extended_l2, later.extended_l2);
        take(&mut self.backing_file, later.backing_file);
        take(&mut self.backing_fmt, later.backing_fmt);
        take(&mut self.data_file, later.data_file);
        take(&mut self.data_file_raw, later.data_file_raw);
        take(&mut self.preallocation, later.preallocation);
        take(&mut self.encrypt.alias, later.encrypt.alias);
        take(&mut self.encrypt.format, later.encrypt.format);
        take(&mut self.encrypt.key_secret, later.encrypt.key_secret);
        for (k, v) in later.encrypt.other {
            self.encrypt.other.retain(|(o, _)| *o != k);
            self.encrypt.other.push((k, v));
        }
        self.help |= later.help;
    }

    /// The names of the options that are set, in qemu-img's option order.
    pub fn given_keys(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut add = |set: bool, k| {
            if set {
                v.push(String::from(k))
            }
        };
        add(self.size.is_some(), "size");
        add(self.cluster_size.is_some(), "cluster_size");
        add(self.compat.is_some(), "compat");
        add(self.refcount_bits.is_some(), "refcount_bits");
        add(self.lazy_refcounts.is_some(), "lazy_refcounts");
        add(self.compression_type.is_some(), "compression_type");
        add(self.extended_l2.is_some(), "extended_l2");
        add(self.backing_file.is_some(), "backing_file");
        add(self.backing_fmt.is_some(), "backing_fmt");
        add(self.data_file.is_some(), "data_file");
        add(self.data_file_raw.is_some(), "data_file_raw");
        add(self.preallocation.is_some(), "preallocation");
        add(self.encrypt.alias.is_some(), "encryption");
        add(self.encrypt.format.is_some(), "encrypt.format");
        add(self.encrypt.key_secret.is_some(), "encrypt.key-secret");
        v.extend(self.encrypt.other.iter().map(|(k, _)| k.clone()));
        v
    }
}

/// The options of `create -o` for qcow2, as qemu's qcow2 driver describes them.
pub(crate) const CREATE_OPTIONS: &[OptDesc] = &[
    BACKING_FILE,
    BACKING_FMT,
    OptDesc::new("cluster_size", OptType::Size, "qcow2 cluster size"),
    COMPAT,
    OptDesc::new(
        "compression_type",
        OptType::Str,
        "Compression method used for image cluster compression",
    ),
    DATA_FILE,
    DATA_FILE_RAW,
    OptDesc::new(
        "encrypt.cipher-alg",
        OptType::Str,
        "Name of encryption cipher algorithm",
    ),
    OptDesc::new(
        "encrypt.cipher-mode",
        OptType::Str,
        "Name of encryption cipher mode",
    ),
    OptDesc::new(
        "encrypt.format",
        OptType::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    OptDesc::new(
        "encrypt.hash-alg",
        OptType::Str,
        "Name of encryption hash algorithm",
    ),
    ENCRYPT_ITER_TIME,
    OptDesc::new(
        "encrypt.ivgen-alg",
        OptType::Str,
        "Name of IV generator algorithm",
    ),
    OptDesc::new(
        "encrypt.ivgen-hash-alg",
        OptType::Str,
        "Name of IV generator hash algorithm",
    ),
    OptDesc::new(
        "encrypt.key-secret",
        OptType::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    OptDesc::new(
        "encryption",
        OptType::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    OptDesc::new("extended_l2", OptType::Bool, "Extended L2 tables"),
    LAZY_REFCOUNTS,
    OptDesc::new(
        "preallocation",
        OptType::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    REFCOUNT_BITS,
    SIZE,
];

/// `backing_fmt`, as qemu's qcow2 driver describes it for `create` and `amend`.
pub(crate) const BACKING_FMT: OptDesc = OptDesc::new(
    "backing_fmt",
    OptType::Str,
    "Image format of the base image",
);
/// `compat`, as qemu's qcow2 driver describes it.
pub(crate) const COMPAT: OptDesc = OptDesc::new(
    "compat",
    OptType::Str,
    "Compatibility level (v2 [0.10] or v3 [1.1])",
);
/// `data_file`, as qemu's qcow2 driver describes it.
pub(crate) const DATA_FILE: OptDesc = OptDesc::new(
    "data_file",
    OptType::Str,
    "File name of an external data file",
);
/// `data_file_raw`, as qemu's qcow2 driver describes it.
pub(crate) const DATA_FILE_RAW: OptDesc = OptDesc::new(
    "data_file_raw",
    OptType::Bool,
    "The external data file must stay valid as a raw image",
);
/// `encrypt.iter-time`, as qemu's qcow2 driver describes it.
pub(crate) const ENCRYPT_ITER_TIME: OptDesc = OptDesc::new(
    "encrypt.iter-time",
    OptType::Num,
    "Time to spend in PBKDF in milliseconds",
);
/// `lazy_refcounts`, as qemu's qcow2 driver describes it.
pub(crate) const LAZY_REFCOUNTS: OptDesc =
    OptDesc::new("lazy_refcounts", OptType::Bool, "Postpone refcount updates");
/// `refcount_bits`, as qemu's qcow2 driver describes it.
pub(crate) const REFCOUNT_BITS: OptDesc = OptDesc::new(
    "refcount_bits",
    OptType::Num,
    "Width of a reference count entry in bits",
);

/// Parses one `-o` argument of `qemu-img create` for qcow2 (and raw, which takes `size` and
/// `preallocation` only; the caller refuses the rest): comma-separated `key=value` items,
/// `,,` for a comma inside a value, sizes with `k`/`M`/`G`/`T` suffixes, booleans as
/// `on`/`off` (a boolean key alone means `on`), `help` or `?` to ask for the option list.
/// Unknown keys are refused; encryption options are refused as unsupported. Combinations are
/// checked later, by [`CreateOptions::validate`].
pub fn parse_options(s: &str) -> Result<OptionUpdates> {
    use crate::option_list::{boolean, invalid_parameter, key_value, not_accepted, number, size};
    let mut u = OptionUpdates::default();
    for item in crate::option_list::split(s)? {
        let (key, v) = key_value(&item);
        match key {
            "help" | "?" if !item.contains('=') => u.help = true,
            "size" => u.size = Some(size(key, v)?),
            "cluster_size" => u.cluster_size = Some(size(key, v)?),
            "compat" => {
                u.compat = Some(match v {
                    "0.10" | "v2" => Compat::V2,
                    "1.1" | "v3" => Compat::V3,
                    // qemu's words name the QAPI field behind the option.
                    other => return Err(not_accepted("version", other)),
                })
            }
            // As qemu's option parser (strtoull), a negative number wraps around: it is then
            // refused as a width, after the "Formatting" line shows it.
            "refcount_bits" => u.refcount_bits = Some(number(key, v)?),
            "lazy_refcounts" => u.lazy_refcounts = Some(boolean(key, v)?),
            "extended_l2" => u.extended_l2 = Some(boolean(key, v)?),
            "data_file_raw" => u.data_file_raw = Some(boolean(key, v)?),
            "compression_type" => {
                u.compression_type = Some(match v {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    other => return Err(not_accepted("compression-type", other)),
                })
            }
            "preallocation" => {
                u.preallocation = Some(
                    Preallocation::from_name(v).map_err(|_| not_accepted("preallocation", v))?,
                )
            }
            "backing_file" => u.backing_file = Some(v.to_string()),
            "backing_fmt" => u.backing_fmt = Some(v.to_string()),
            "data_file" => u.data_file = Some(v.to_string()),
            "encryption" => u.encrypt.alias = Some(boolean(key, v)?),
            "encrypt.format" => u.encrypt.format = Some(v.to_string()),
            "encrypt.key-secret" => u.encrypt.key_secret = Some(v.to_string()),
            k if k.starts_with("encrypt.") => {
                if !LUKS_KEYS.contains(&&k["encrypt.".len()..]) {
                    return Err(invalid_parameter(k));
                }
                if k == "encrypt.iter-time" {
                    number(k, v)?;
                }
                u.encrypt.other.retain(|(o, _)| o != k);
                u.encrypt.other.push((k.to_string(), v.to_string()));
            }
            // qemu sets it as the xfs extent size hint of the image file (FS_IOC_FSSETXATTR)
            // and ignores it on other file systems; vimg accepts and checks it, and leaves the
            // file system's default (it only affects how the host file's space is grouped).
            "extent_size_hint" => {
                if size(key, v)? > u64::from(u32::MAX) {
                    return Err(Error::invalid_input("Extent size hint is too large"));
                }
            }
            "nocow" => {
                return Err(Error::unsupported(format!(
                    "option '{key}' (a host file system hint) is not supported"
                )))
            }
            _ => return Err(invalid_parameter(key)),
        }
    }
    Ok(u)
}

impl CreateOptions {
    /// Sets every option `u` names.
    pub fn apply(&mut self, u: &OptionUpdates) {
        if let Some(v) = u.size {
            self.size = v;
        }
        if let Some(v) = u.cluster_size {
            self.cluster_size = v;
        }
        if let Some(v) = u.compat {
            self.compat = v;
        }
        if let Some(v) = u.refcount_bits {
            self.refcount_bits = v;
        }
        if let Some(v) = u.lazy_refcounts {
            self.lazy_refcounts = v;
        }
        if let Some(v) = u.compression_type {
            self.compression_type = v;
        }
        if let Some(v) = u.extended_l2 {
            self.extended_l2 = v;
        }
        if let Some(v) = &u.backing_file {
            self.backing_file = Some(v.clone());
        }
        if let Some(v) = &u.backing_fmt {
            self.backing_fmt = Some(v.clone());
        }
        if let Some(v) = &u.data_file {
            self.data_file = Some(v.clone());
        }
        if let Some(v) = u.data_file_raw {
            self.data_file_raw = v;
        }
        if let Some(v) = u.preallocation {
            self.preallocation = v;
        }
        if u.encrypt.is_given() {
            let later = OptionUpdates {
                encrypt: u.encrypt.clone(),
                ..OptionUpdates::default()
            };
            let mut mine = OptionUpdates {
                encrypt: std::mem::take(&mut self.encrypt),
                ..OptionUpdates::default()
            };
            mine.merge(later);
            self.encrypt = mine.encrypt;
        }
    }

    /// Checks the options against qcow2.rst's rules and qemu-img's: cluster and refcount sizes,
    /// features that need version 3, extended L2 with small clusters, a backing file without a
    /// format, a data-file flag without a data file, preallocation under a backing file
    /// (which needs extended L2, whose unallocated subclusters still read from the backing
    /// file), and a disk too large for the L1 table limit.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::invalid_input(m.to_string()));
        let cs = self.cluster_size;
        if !cs.is_power_of_two()
            || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs)
        {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.compat == Compat::V2 {
            // qemu-img's words (qcow2_co_create), which scripts match.
            let v3_only = |what: &str| {
                Err(Error::invalid_input(format!(
                    "{what} (use version=v3 or greater)"
                )))
            };
            if rb != 16 {
                return v3_only(
                    "Different refcount widths than 16 bits require compatibility level 1.1 \
                     or above",
                );
            }
            if self.lazy_refcounts {
                return v3_only(
                    "Lazy refcounts only supported with compatibility level 1.1 and above",
                );
            }
            if self.compression_type != CompressionType::Zlib {
                return v3_only(
                    "Non-zlib compression type is only supported with compatibility level 1.1 \
                     and above",
                );
            }
            if self.extended_l2 {
                return v3_only(
                    "Extended L2 entries are only supported with compatibility level 1.1 and \
                     above",
                );
            }
            if self.data_file.is_some() {
                return v3_only(
                    "External data files are only supported with compatibility level 1.1 and \
                     above",
                );
            }
        }
        if self.extended_l2 && cs < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_file.is_some() && self.backing_fmt.is_none() {
            return bad("Backing file specified without backing format");
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file");
        }
        if let Some(b) = &self.backing_file {
            if b.is_empty() {
                return bad("Expected backing file name, got empty string");
            }
            if b.len() > MAX_BACKING_NAME as usize {
                return bad("backing file name is longer than 1023 bytes");
            }
        }
        if let Some(d) = &self.data_file {
            if d.is_empty() {
                return bad("data file name is empty");
            }
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return bad("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return bad(
                "Backing file and preallocation can only be used at the same time if \
                 extended_l2 is on",
            );
        }
        self.encrypt.luks()?;
        if self.size > i64::MAX as u64 - 511 {
            return bad("image size is too large");
        }
        let g = Geometry::new(self);
        if g.l1_size(round_size(self.size)) * 8 > MAX_L1_BYTES {
            return bad(
                "The image size is too large for file format 'qcow2' (try using a larger \
                 cluster size)",
            );
        }
        Ok(())
    }
}

/// The virtual size as qemu records it: rounded up to whole 512-byte sectors.
pub(crate) fn round_size(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::qcow2::create::opts;

    #[test]
    fn options_parse_and_merge() {
        let mut u =
            parse_options("cluster_size=4k,compat=v2,lazy_refcounts,data_file=a,,b").unwrap();
        assert_eq!(u.cluster_size, Some(4096));
        assert_eq!(u.compat, Some(Compat::V2));
        assert_eq!(u.lazy_refcounts, Some(true));
        assert_eq!(u.data_file.as_deref(), Some("a,b"));
        u.merge(parse_options("cluster_size=8k,preallocation=full").unwrap());
        assert_eq!(u.cluster_size, Some(8192));
        assert_eq!(u.preallocation, Some(Preallocation::Full));
        assert!(parse_options("help").unwrap().help);
        for bad in [
            "bogus=1",
            "cluster_size",
            "cluster_size=1x",
            "compat=1.2",
            "lazy_refcounts=1",
            "compression_type=lz4",
            "preallocation=bogus",
            "refcount_bits=x",
        ] {
            assert_eq!(
                parse_options(bad).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{bad}"
            );
        }
        // Encryption options parse; their combinations are checked by validate, as qemu
        // checks them after its "Formatting" line.
        let check = |o: &str| {
            let mut c = CreateOptions::default();
            c.apply(&parse_options(o).unwrap());
            c.validate()
        };
        check("encrypt.format=aes,encrypt.key-secret=s").unwrap();
        check("encryption=on,encrypt.key-secret=s").unwrap();
        check("encryption=off").unwrap();
        check("encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=twofish-128").unwrap();
        for bad in [
            "encrypt.detached-header=on",
            "encrypt.iter-time=x",
            "encrypt.foo=1",
        ] {
            let e = parse_options(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
        }
        for (o, kind, words) in [
            (
                "encrypt.format=luks",
                ErrorKind::InvalidInput,
                "'encrypt.key-secret' is required",
            ),
            (
                "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=foo",
                ErrorKind::InvalidInput,
                "Parameter 'cipher-alg' does not accept value 'foo'",
            ),
            (
                "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=cast5-128",
                ErrorKind::Unsupported,
                "Unsupported cipher mode xts",
            ),
            (
                "encrypt.format=aes",
                ErrorKind::InvalidInput,
                "'encrypt.key-secret' is required",
            ),
            (
                "encrypt.key-secret=s",
                ErrorKind::InvalidInput,
                "'encrypt.format' is missing",
            ),
            (
                "encrypt.format=x,encrypt.key-secret=s",
                ErrorKind::InvalidInput,
                "value 'x'",
            ),
            (
                "encryption=on,encrypt.format=aes",
                ErrorKind::InvalidInput,
                "alias",
            ),
            (
                "encrypt.format=aes,encrypt.key-secret=s,encrypt.cipher-alg=aes-256",
                ErrorKind::InvalidInput,
                "'encrypt.cipher-alg' is unexpected",
            ),
        ] {
            let e = check(o).unwrap_err();
            assert_eq!(e.kind(), kind, "{o}: {e}");
            assert!(e.to_string().contains(words), "{o}: {e}");
        }
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let cases: Vec<(CreateOptions, &str)> = vec![
            (opts(|o| o.cluster_size = 1000), "power of two"),
            (opts(|o| o.cluster_size = 256), "power of two"),
            (opts(|o| o.cluster_size = 4 << 20), "power of two"),
            (opts(|o| o.refcount_bits = 3), "Refcount width"),
            (opts(|o| o.refcount_bits = 128), "Refcount width"),
            (opts(|o| o.refcount_bits = 0), "Refcount width"),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.refcount_bits = 8
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.lazy_refcounts = true
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.compression_type = CompressionType::Zstd
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.extended_l2 = true
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.compat = Compat::V2;
                    o.data_file = Some("d".into())
                }),
                "1.1",
            ),
            (
                opts(|o| {
                    o.cluster_size = 8192;
                    o.extended_l2 = true
                }),
                "16384 bytes",
            ),
            (
                opts(|o| o.backing_file = Some("b".into())),
                "without backing format",
            ),
            (
                opts(|o| o.backing_fmt = Some("raw".into())),
                "without backing file",
            ),
            (opts(|o| o.data_file_raw = true), "requires data-file"),
            (
                opts(|o| {
                    o.backing_file = Some("b".into());
                    o.backing_fmt = Some("raw".into());
                    o.preallocation = Preallocation::Metadata;
                }),
                "extended_l2 is on",
            ),
            (
                opts(|o| {
                    o.backing_file = Some("b".into());
                    o.backing_fmt = Some("raw".into());
                    o.data_file = Some("d".into());
                    o.data_file_raw = true;
                }),
                "data-file-raw",
            ),
            (
                opts(|o| {
                    o.cluster_size = 512;
                    o.size = 1 << 50
                }),
                "too large",
            ),
        ];
        for (o, want) in cases {
            let e = o.validate().unwrap_err();
            assert!(e.to_string().contains(want), "{o:?}: {e}");
        }
        assert!(opts(|o| o.size = 1 << 50).validate().is_ok());
    }
}
