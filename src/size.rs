//! Byte sizes on the command line and in human-readable output.
//!
//! [`parse_size`] accepts what qemu-img users type: plain byte counts, or a number (optionally
//! with a fraction) followed by a 1024-based unit suffix (`k`, `M`, `G`, `T`, `P`, `E`, case
//! insensitive; `b` means bytes). [`human_size`] renders sizes the way qemu-img's `info` does:
//! three significant digits in the largest binary unit whose value stays below 1000.

use crate::error::{Error, Result};

/// The unit suffixes in increasing powers of 1024, as accepted by [`parse_size`].
const SUFFIXES: &[u8] = b"bkmgtpe";

/// Parses a size such as `65536`, `64k`, `1.5M`, `2G` or `0x1000` into bytes.
///
/// Units are powers of 1024. A fraction needs a unit and must come out as a whole number of
/// bytes (`1.5k` is 1536, `0.1k` is refused). Negative values and values beyond `i64::MAX`
/// (qemu's limit for sizes and offsets) are refused.
pub fn parse_size(text: &str) -> Result<u64> {
    parse(text).map_err(|why| Error::invalid_input(format!("invalid size '{text}': {why}")))
}

/// Why a text is not a size, as qemu's option parser tells the two apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeFault {
    /// A number, but negative or beyond `i64::MAX`.
    OutOfRange,
    /// Not a size at all.
    Invalid,
}

/// [`parse_size`], saying only whether the text was out of range or not a size.
pub fn parse_size_checked(text: &str) -> std::result::Result<u64, SizeFault> {
    parse(text).map_err(|why| match why {
        NEGATIVE | TOO_LARGE => SizeFault::OutOfRange,
        _ => SizeFault::Invalid,
    })
}

/// The reason [`parse`] gives for a negative size.
const NEGATIVE: &str = "must not be negative";
/// The reason [`parse`] gives for a size beyond `i64::MAX`.
const TOO_LARGE: &str = "too large";

/// Parses a size, or says why the text is not one.
fn parse(text: &str) -> std::result::Result<u64, &'static str> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty");
    }
    if s.starts_with('-') {
        return Err(NEGATIVE);
    }
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let v = u64::from_str_radix(hex, 16).map_err(|_| "not a hexadecimal number")?;
        return limit(v).ok_or(TOO_LARGE);
    }
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    let shift = match suffix.as_bytes() {
        [] => 0,
        [c] => match SUFFIXES.iter().position(|u| *u == c.to_ascii_lowercase()) {
            Some(i) => 10 * i as u32,
            None => return Err("unknown unit (use k, M, G, T, P or E)"),
        },
        _ => return Err("unknown unit (use k, M, G, T, P or E)"),
    };
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a number");
    }
    let int: u64 = int_part.parse().map_err(|_| TOO_LARGE)?;
    let mut bytes = int
        .checked_mul(1u64 << shift)
        .and_then(limit)
        .ok_or(TOO_LARGE)?;
    if let Some(frac) = frac_part {
        if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err("not a number");
        }
        if shift == 0 {
            return Err("a fraction needs a unit");
        }
        // frac / 10^len * 2^shift must be a whole number of bytes.
        let digits = &frac[..frac.len().min(18)];
        if frac[digits.len()..].bytes().any(|b| b != b'0') {
            return Err("not a whole number of bytes");
        }
        let num: u128 = digits.parse().map_err(|_| "not a number")?;
        let den = 10u128.pow(digits.len() as u32);
        let scaled = num << shift;
        if !scaled.is_multiple_of(den) {
            return Err("not a whole number of bytes");
        }
        let add = u64::try_from(scaled / den).map_err(|_| TOO_LARGE)?;
        bytes = bytes.checked_add(add).and_then(limit).ok_or(TOO_LARGE)?;
    }
    Ok(bytes)
}

fn limit(v: u64) -> Option<u64> {
    (v <= i64::MAX as u64).then_some(v)
}

/// Renders `bytes` as qemu-img's `info` does: `0 B`, `512 B`, `64 KiB`, `1.5 MiB`,
/// `0.977 MiB`, ...
///
/// The unit is the largest power of 1024 such that the value in that unit, rounded, is below
/// 1000 of the next-smaller unit (so 1000 KiB is shown as `0.977 MiB`); the number is printed
/// like C's `%0.3g` (three significant digits, trailing zeros dropped, exponent form when the
/// rounded value reaches 1000).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // Switch to unit i once bytes >= 1000 * 1024^(i-1), i.e. bytes * 1024 / 1000 >= 1024^i.
    let scaled = u128::from(bytes) * 1024 / 1000;
    let mut i = 0usize;
    while i + 1 < UNITS.len() && scaled >= 1u128 << (10 * (i + 1)) {
        i += 1;
    }
    let value = bytes as f64 / (1u64 << (10 * i)) as f64;
    format!("{} {}", format_g3(value), UNITS[i])
}

/// Formats a non-negative `v` like C's `printf("%0.3g", v)`.
fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    // Round to three significant digits first; the exponent of the rounded value decides the
    // notation.
    let sci = format!("{v:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let m = trim_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("100b").unwrap(), 100);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        for bad in [
            "",
            "k",
            "1x",
            "-1",
            "1.5",
            "0.1k",
            "1kk",
            "9E",
            "1.2.3M",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    proptest::proptest! {
        #[test]
        fn plain_and_suffixed_numbers_parse(n in 0u64..(1 << 50), k in 0u64..(1 << 20)) {
            proptest::prop_assert_eq!(parse_size(&n.to_string()).unwrap(), n);
            for (i, unit) in ["k", "M", "G", "T"].iter().enumerate() {
                let shift = 10 * (i as u32 + 1);
                let expected = k << shift;
                proptest::prop_assert_eq!(parse_size(&format!("{k}{unit}")).unwrap(), expected);
            }
        }

        #[test]
        fn human_size_never_panics(n: u64) {
            let s = human_size(n);
            proptest::prop_assert!(s.ends_with('B'));
        }
    }

    #[test]
    fn renders_sizes_like_qemu() {
        for (n, s) in [
            (0, "0 B"),
            (512, "512 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (1024, "1 KiB"),
            (69632, "68 KiB"),
            (352256, "344 KiB"),
            (590336, "576 KiB"),
            (1023488, "1e+03 KiB"),
            (1024000, "0.977 MiB"),
            (1048576, "1 MiB"),
            (2297856, "2.19 MiB"),
            (3 << 19, "1.5 MiB"),
            (64 << 30, "64 GiB"),
            (u64::MAX, "16 EiB"),
        ] {
            assert_eq!(human_size(n), s, "{n}");
        }
    }
}
