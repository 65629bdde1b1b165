//! qemu's `-o` option lists (`QemuOpts`), as `create`, `convert -o`, `measure` and `amend` take
//! them for every format: splitting a list into items, and reading an item's value with the
//! words qemu-img uses when it refuses one (`util/qemu-option.c`: `parse_option_bool`,
//! `parse_option_number`, `parse_option_size`; `qapi_bool_parse`). A format's driver reads
//! its own keys through these, so that `-o lazy_refcounts=x`, `-o force_size`, `-o
//! static=maybe` and `-o cluster_size=abc` are accepted and refused alike in every format.

use crate::error::{Error, Result};

/// Splits a qemu-style option list into its items: items are separated by commas, and `,,`
/// stands for a comma inside an item. An empty item (a leading, trailing or doubled separator
/// where no escaped comma is meant) makes the list invalid, as in qemu.
pub fn split(s: &str) -> Result<Vec<String>> {
    let invalid = || Error::invalid_input(format!("invalid option list: '{s}'"));
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                if cur.is_empty() {
                    return Err(invalid());
                }
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if cur.is_empty() {
        return Err(invalid());
    }
    items.push(cur);
    Ok(items)
}

/// An item split into its key and its value. A key given alone has the value `on`, as in
/// qemu, whatever its type (`-o force_size` turns it on; `-o backing_file` names a file
/// `on`), and one starting with `no` is the rest set `off` (`-o nostatic`; so `-o nocow`
/// alone sets an unknown `cow`, as qemu-img finds).
pub fn key_value(item: &str) -> (&str, &str) {
    match item.split_once('=') {
        Some(kv) => kv,
        None => match item.strip_prefix("no") {
            Some(rest) => (rest, "off"),
            None => (item, "on"),
        },
    }
}

/// A boolean option's value: `on`, `yes`, `true`, `y`; `off`, `no`, `false`, `n` (qemu's
/// `qapi_bool_parse`); anything else in qemu's words.
pub fn boolean(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::invalid_input(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// A size option's value (`64k`, `1.5M`, `0x1000`; see [`crate::size::parse_size`]), refused
/// in qemu's words: a negative or too large number is out of range, anything else is not a
/// size.
pub fn size(key: &str, text: &str) -> Result<u64> {
    match crate::size::parse_size_checked(text) {
        Ok(n) => Ok(n),
        Err(crate::size::SizeFault::OutOfRange) => Err(Error::invalid_input(format!(
            "Value '{text}' is out of range for parameter '{key}'"
        ))),
        Err(crate::size::SizeFault::Invalid) => Err(Error::invalid_input(format!(
            "Parameter '{key}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        ))),
    }
}

/// A number option's value (decimal, or hexadecimal with `0x`, as `strtoull` reads it; a
/// negative number wraps around as it does there), refused in qemu's words.
pub fn number(key: &str, text: &str) -> Result<u64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    let parsed = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse::<u64>().ok()
        }
        None => None,
    };
    match parsed {
        Some(n) if negative => Ok(n.wrapping_neg()),
        Some(n) => Ok(n),
        None => Err(Error::invalid_input(format!(
            "Parameter '{key}' expects a number"
        ))),
    }
}

/// An option with a fixed set of values given another one, in qemu's words.
pub fn not_accepted(key: &str, value: &str) -> Error {
    Error::invalid_input(format!("Parameter '{key}' does not accept value '{value}'"))
}

/// An option the format does not take, in qemu's words.
pub fn invalid_parameter(key: &str) -> Error {
    Error::invalid_input(format!("Invalid parameter '{key}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_read_and_refused_as_qemu_does() {
        assert_eq!(split("a=1,b=x,,y").unwrap(), ["a=1", "b=x,y"]);
        assert_eq!(split("a=,,,,").unwrap(), ["a=,,"]);
        for bad in ["", ",a=1", "a=1,", "a=1,,,"] {
            assert!(split(bad).is_err(), "{bad}");
        }
        assert_eq!(key_value("a=b=c"), ("a", "b=c"));
        assert_eq!(key_value("flag"), ("flag", "on"));
        assert_eq!(key_value("noflag"), ("flag", "off"));
        assert_eq!(key_value("nocow=on"), ("nocow", "on"));
        for (v, want) in [("on", true), ("y", true), ("off", false), ("n", false)] {
            assert_eq!(boolean("k", v).unwrap(), want, "{v:?}");
        }
        for v in ["", "Y", "1", "maybe"] {
            let e = boolean("k", v).unwrap_err().to_string();
            assert!(e.contains("Parameter 'k' expects 'on' or 'off'"), "{e}");
        }
        assert_eq!(size("s", "1.5k").unwrap(), 1536);
        let e = size("s", "-1").unwrap_err().to_string();
        assert!(
            e.contains("Value '-1' is out of range for parameter 's'"),
            "{e}"
        );
        let e = size("s", "16E").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        for v in ["", "on", "abc", "1x"] {
            let e = size("s", v).unwrap_err().to_string();
            assert!(
                e.contains("Parameter 's' expects a non-negative number below 2^64"),
                "{e}"
            );
        }
        assert_eq!(number("n", "0x10").unwrap(), 16);
        assert_eq!(number("n", "-1").unwrap(), u64::MAX);
        for v in ["", "on", "abc", "+1", "0x"] {
            let e = number("n", v).unwrap_err().to_string();
            assert!(e.contains("Parameter 'n' expects a number"), "{e}");
        }
    }
}
