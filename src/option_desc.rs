//! The `-o` options a format or protocol takes, as tables (qemu's `QemuOptDesc` lists: a name,
//! a type and a line of help), and what is made from them: the `-o help` text
//! (`util/qemu-option.c`: `qemu_opts_print_help`), the help request itself (`has_help_option`,
//! and qemu-img's check of each `-o` argument, `is_valid_option_list`), the options of the
//! protocol a new image's file name selects (qemu's `bdrv_find_protocol`), and a parser that
//! reads an option list against tables, each value by its table's type, in qemu's words
//! ([`parse`]).

use crate::error::{Error, Result};
use crate::option_list::{boolean, invalid_parameter, key_value, number, size, split};

/// The type of an option's value (qemu's `QemuOptType`), which `-o help` shows and by which
/// [`parse`] reads the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptType {
    /// Any text.
    Str,
    /// `on`/`off` (and qemu's other spellings, [`crate::option_list::boolean`]).
    Bool,
    /// A number ([`crate::option_list::number`]).
    Num,
    /// A size with an optional suffix ([`crate::option_list::size`]).
    Size,
}

impl OptType {
    /// The type's name in `-o help` (qemu's `opt_type_to_string`).
    pub fn name(self) -> &'static str {
        match self {
            OptType::Str => "str",
            OptType::Bool => "bool (on/off)",
            OptType::Num => "num",
            OptType::Size => "size",
        }
    }
}

/// One option: its name, the type of its value and qemu's line of help for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptDesc {
    /// The key (`cluster_size`, `encrypt.format`).
    pub name: &'static str,
    /// How its value is read.
    pub kind: OptType,
    /// The help text qemu prints for it.
    pub help: &'static str,
}

impl OptDesc {
    /// An option named `name` of type `kind`, described by `help`.
    pub const fn new(name: &'static str, kind: OptType, help: &'static str) -> Self {
        OptDesc { name, kind, help }
    }
}

/// `size`, as most formats describe it.
pub const SIZE: OptDesc = OptDesc::new("size", OptType::Size, "Virtual disk size");
/// `backing_file`, as the formats that record one describe it.
pub const BACKING_FILE: OptDesc =
    OptDesc::new("backing_file", OptType::Str, "File name of a base image");

/// The options of a new image's file on a local file system (qemu's `file` protocol driver).
pub const FILE_PROTOCOL: &[OptDesc] = &[
    OptDesc::new(
        "extent_size_hint",
        OptType::Size,
        "Extent size hint for the image file, 0 to disable",
    ),
    OptDesc::new(
        "nocow",
        OptType::Bool,
        "Turn off copy-on-write (valid only on btrfs)",
    ),
    OptDesc::new(
        "preallocation",
        OptType::Str,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    SIZE,
];

/// The options of a new image on a device or an NBD export, which qemu "creates" by checking
/// it is large enough (its `bdrv_create_opts_simple`).
pub const SIMPLE_PROTOCOL: &[OptDesc] = &[
    OptDesc::new(
        "preallocation",
        OptType::Str,
        "Preallocation mode (allowed values: off)",
    ),
    SIZE,
];

/// The help lines of the options of `tables`, the first table's description of a name winning
/// over later ones (qemu's `qemu_opts_append`), sorted as qemu sorts them, each with a newline:
/// `  name=<type>`, padded to 24 columns, then ` - ` and the help.
pub fn help_lines(tables: &[&[OptDesc]]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    for d in tables.iter().flat_map(|t| t.iter()) {
        if seen.contains(&d.name) {
            continue;
        }
        seen.push(d.name);
        let head = format!("  {}=<{}>", d.name, d.kind.name());
        lines.push(format!("{head:<24} - {}", d.help));
    }
    lines.sort();
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Whether one `-o` argument is an option list qemu-img takes (its `is_valid_option_list`):
/// not empty, not starting with a comma, and not ending in an odd number of commas.
pub fn is_valid_option_list(list: &str) -> bool {
    let trailing = list.len() - list.trim_end_matches(',').len();
    !list.is_empty() && !list.starts_with(',') && trailing.is_multiple_of(2)
}

/// Checks each `-o` argument as qemu-img does when it reads its command line, in its words.
pub fn check_option_lists(options: &[String]) -> Result<()> {
    match options.iter().find(|o| !is_valid_option_list(o)) {
        Some(bad) => Err(Error::invalid_input(format!("Invalid option list: {bad}"))),
        None => Ok(()),
    }
}

/// Whether the `-o` arguments ask for the option list, as qemu's `has_help_option` reads
/// them (joined by commas): an item without `=` named `help` or `?`. An item's name ends at
/// the first `=` or comma, a value at a single comma (`,,` stands for a comma in a value),
/// so `a,,help` asks for help and `a=,,help` does not. An argument qemu-img refuses is refused
/// first ([`check_option_lists`]).
pub fn has_help_option(options: &[String]) -> Result<bool> {
    check_option_lists(options)?;
    let joined = options.join(",");
    let mut rest = joined.as_str();
    while !rest.is_empty() {
        let name_end = rest.find(['=', ',']).unwrap_or(rest.len());
        if rest[name_end..].starts_with('=') {
            // A value: up to a comma that is not doubled.
            let mut value = &rest[name_end + 1..];
            loop {
                match value.find(',') {
                    Some(c) if value[c + 1..].starts_with(',') => value = &value[c + 2..],
                    Some(c) => {
                        value = &value[c..];
                        break;
                    }
                    None => {
                        value = "";
                        break;
                    }
                }
            }
            rest = value;
        } else {
            if matches!(&rest[..name_end], "help" | "?") {
                return Ok(true);
            }
            rest = &rest[name_end..];
        }
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(false)
}

/// The creation options of the protocol a new image named `filename` is written through, as
/// qemu-img finds it (`bdrv_find_protocol`): a device (a character or block device, or a name
/// under `/dev/cdrom`) or a `host_device:`, `host_cdrom:` or NBD name takes qemu's simple
/// options; a name without a protocol prefix (none before the first `/`) or `file:` the file
/// protocol's. Other protocols are refused in qemu's words.
pub fn protocol_options(filename: &str) -> Result<&'static [OptDesc]> {
    let device = filename.starts_with("/dev/cdrom")
        || std::fs::metadata(filename).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device() || m.file_type().is_char_device()
        });
    if device {
        return Ok(SIMPLE_PROTOCOL);
    }
    let Some(colon) = filename
        .find([':', '/'])
        .filter(|&i| filename[i..].starts_with(':'))
    else {
        return Ok(FILE_PROTOCOL);
    };
    match &filename[..colon] {
        "file" => Ok(FILE_PROTOCOL),
        "host_device" | "host_cdrom" | "nbd" | "nbd+tcp" | "nbd+unix" => Ok(SIMPLE_PROTOCOL),
        p @ ("null-co" | "null-aio") => Err(Error::unsupported(format!(
            "Protocol driver '{p}' does not support image creation"
        ))),
        p => Err(Error::invalid_input(format!("Unknown protocol '{p}'"))),
    }
}

/// The file protocol's `preallocation` for a format whose new images vimg writes without
/// preallocating: `off` only, anything else refused naming `format`.
pub fn preallocation_off(format: &str, given: &str) -> Result<()> {
    match given {
        "off" => Ok(()),
        v => Err(Error::unsupported(format!(
            "preallocation={v} is not supported by vimg for {format} images"
        ))),
    }
}

/// A value read by [`parse`], of its option's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptValue {
    /// A [`OptType::Str`] option's text.
    Str(String),
    /// A [`OptType::Bool`] option's value.
    Bool(bool),
    /// A [`OptType::Num`] option's value.
    Num(u64),
    /// A [`OptType::Size`] option's value in bytes.
    Size(u64),
}

/// One item of an option list read by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOpt {
    /// The option's name, as its table spells it.
    pub name: &'static str,
    /// The value as given (`on` for a key given alone, `off` for `noKEY`).
    pub given: String,
    /// The value, read by the option's type.
    pub value: OptValue,
}

impl ParsedOpt {
    /// The value of a [`OptType::Size`] or [`OptType::Num`] option (0 for any other).
    pub fn number(&self) -> u64 {
        match self.value {
            OptValue::Size(n) | OptValue::Num(n) => n,
            _ => 0,
        }
    }

    /// The value of a [`OptType::Bool`] option (false for any other).
    pub fn flag(&self) -> bool {
        self.value == OptValue::Bool(true)
    }
}

/// Reads the `-o` arguments `options` (in order; later items win when the caller keeps the
/// last) against `tables`: each item's key must be named by a table (else qemu's "Invalid
/// parameter"), and its value is read by the type of the first table naming it, refused in
/// qemu's words.
pub fn parse(options: &[String], tables: &[&[OptDesc]]) -> Result<Vec<ParsedOpt>> {
    let mut out = Vec::new();
    for arg in options {
        for item in split(arg)? {
            let (k, v) = key_value(&item);
            let desc = tables
                .iter()
                .flat_map(|t| t.iter())
                .find(|d| d.name == k)
                .ok_or_else(|| invalid_parameter(k))?;
            let value = match desc.kind {
                OptType::Str => OptValue::Str(v.to_string()),
                OptType::Bool => OptValue::Bool(boolean(k, v)?),
                OptType::Num => OptValue::Num(number(k, v)?),
                OptType::Size => OptValue::Size(size(k, v)?),
            };
            out.push(ParsedOpt {
                name: desc.name,
                given: v.to_string(),
                value,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn help_lines_are_padded_sorted_and_first_wins() {
        const A: &[OptDesc] = &[
            OptDesc::new("zeta", OptType::Bool, "z"),
            OptDesc::new("size", OptType::Size, "first"),
            OptDesc::new("a_very_long_option_name", OptType::Num, "long"),
        ];
        let text = help_lines(&[A, FILE_PROTOCOL]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "  a_very_long_option_name=<num> - long");
        assert!(lines.contains(&"  size=<size>            - first"));
        assert!(lines.contains(&"  zeta=<bool (on/off)>   - z"));
        assert_eq!(lines.len(), 6, "{text}");
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted);
    }

    #[test]
    fn help_requests_are_found_as_qemu_finds_them() {
        for yes in [
            &["help"][..],
            &["?"],
            &["a=1,help"],
            &["foo,,help"],
            &["a,,help,,b"],
            &["help,,a"],
            &["x=1", "help"],
        ] {
            assert!(has_help_option(&opts(yes)).unwrap(), "{yes:?}");
        }
        for no in [&["help=1"][..], &["a=,,help"], &["x=a,,help"], &["nohelp"]] {
            assert!(!has_help_option(&opts(no)).unwrap(), "{no:?}");
        }
        for bad in [&[",help"][..], &["help,"], &[""], &["help", "a,,,"]] {
            let e = has_help_option(&opts(bad)).unwrap_err().to_string();
            assert!(e.contains("Invalid option list: "), "{bad:?}: {e}");
        }
        assert!(is_valid_option_list("a=,,"));
    }

    #[test]
    fn protocols_are_found_by_the_file_name() {
        assert_eq!(protocol_options("x.img").unwrap(), FILE_PROTOCOL);
        assert_eq!(protocol_options("a/b:c").unwrap(), FILE_PROTOCOL);
        assert_eq!(protocol_options("file:/dev/null").unwrap(), FILE_PROTOCOL);
        assert_eq!(protocol_options("/dev/null").unwrap(), SIMPLE_PROTOCOL);
        assert_eq!(protocol_options("nbd://h/x").unwrap(), SIMPLE_PROTOCOL);
        let e = protocol_options("foo:bar").unwrap_err().to_string();
        assert!(e.contains("Unknown protocol 'foo'"), "{e}");
        let e = protocol_options("null-co://").unwrap_err().to_string();
        assert!(e.contains("does not support image creation"), "{e}");
    }

    #[test]
    fn values_are_read_by_the_tables_type() {
        const T: &[OptDesc] = &[
            OptDesc::new("flag", OptType::Bool, ""),
            OptDesc::new("n", OptType::Num, ""),
        ];
        let p = parse(
            &opts(&["flag,n=0x10", "size=1k,noflag"]),
            &[T, FILE_PROTOCOL],
        )
        .unwrap();
        let got: Vec<_> = p.iter().map(|o| (o.name, o.value.clone())).collect();
        assert_eq!(
            got,
            [
                ("flag", OptValue::Bool(true)),
                ("n", OptValue::Num(16)),
                ("size", OptValue::Size(1024)),
                ("flag", OptValue::Bool(false)),
            ]
        );
        assert_eq!(p[3].given, "off");
        let e = parse(&opts(&["bogus=1"]), &[T]).unwrap_err().to_string();
        assert!(e.contains("Invalid parameter 'bogus'"), "{e}");
        let e = parse(&opts(&["flag=maybe"]), &[T]).unwrap_err().to_string();
        assert!(e.contains("Parameter 'flag' expects 'on' or 'off'"), "{e}");
    }
}
