//! `vimg measure`: how much host space a new image would take, as `qemu-img measure` reports it.
//!
//! `vimg measure [-O FMT] [-o OPTIONS] [-f FMT] (--size SIZE | IMAGE) [--output human|json]`
//! prints the "required size" (what a new image holding the data needs), the "fully allocated
//! size" (every cluster allocated) and, for qcow2 targets measured from a version 3 qcow2 image,
//! the "bitmaps size" (room for that image's persistent dirty bitmaps). The figures follow
//! qemu-img 10's arithmetic: the qcow2 metadata of a fully allocated image (header cluster, L2
//! and L1 tables, refcount table and blocks; qcow2.rst "Host cluster management" and "Cluster
//! mapping") plus the data clusters that hold data. Compression is not taken into account, as
//! in qemu. Each format does its own arithmetic ([`crate::block::FormatDriver::measure`]:
//! [`crate::qcow2::Qcow2Driver`], [`crate::raw::measure`]). Nothing here prints;
//! [`render`] makes the output text.

use crate::block::{BlockImage, ImageFormat};
pub use crate::creation::Measurement;
use crate::error::{Error, Result};
use crate::ops::OutputFormat;

/// The output text of `m`, byte for byte as qemu-img prints it.
pub fn render(m: &Measurement, style: OutputFormat) -> String {
    match style {
        OutputFormat::Human => {
            let mut s = format!(
                "required size: {}\nfully allocated size: {}\n",
                m.required, m.fully_allocated
            );
            if let Some(b) = m.bitmaps {
                s.push_str(&format!("bitmaps size: {b}\n"));
            }
            s
        }
        OutputFormat::Json => {
            let mut s = String::from("{\n");
            if let Some(b) = m.bitmaps {
                s.push_str(&format!("    \"bitmaps\": {b},\n"));
            }
            s.push_str(&format!(
                "    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
                m.required, m.fully_allocated
            ));
            s
        }
    }
}

/// Parses `--size` as qemu-img does, with its messages: a size with an optional k/M/G/T/P/E
/// suffix, between 0 and `i64::MAX`.
pub fn parse_measure_size(text: &str) -> Result<u64> {
    let range = || {
        Error::invalid_input(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        )
    };
    if text.trim_start().starts_with('-') {
        return Err(range());
    }
    match crate::size::parse_size_checked(text) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) | Err(crate::size::SizeFault::OutOfRange) => Err(range()),
        Err(crate::size::SizeFault::Invalid) => Err(Error::invalid_input(format!(
            "Invalid image size specified: '{text}'."
        ))),
    }
}

/// Measures a new image of format `target` created with the `-o` arguments `options`, for a
/// disk of `size` bytes (`--size`) or holding the data of `source` (IMAGE, opened with its
/// backing chain). Exactly one of `size` and `source` is expected; with neither, the size is
/// taken from `-o size` (0 if absent), as qemu does.
pub fn measure(
    target: ImageFormat,
    options: &[String],
    size: Option<u64>,
    source: Option<&dyn BlockImage>,
    secrets: &crate::secret::Secrets,
) -> Result<Measurement> {
    // qemu-img reads the option list first and adds a line naming the format. (What a
    // format cannot write as a copy target yet, it may still measure.)
    match target.driver().check_target_options(options) {
        Err(e) if e.kind() != crate::error::ErrorKind::Unsupported => {
            return Err(Error::invalid_input(format!(
                "{}\nInvalid options for file format '{}'",
                e.what(),
                target.as_str()
            )))
        }
        _ => {}
    }
    target.driver().measure(options, size, source, secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gigabyte_default_options() {
        // Figures from qemu-img 10.0.2: `measure -O qcow2 --size 1G`.
        let m = measure(
            ImageFormat::Qcow2,
            &[],
            Some(1 << 30),
            None,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(m.required, 393216);
        assert_eq!(m.fully_allocated, 1074135040);
        assert_eq!(m.bitmaps, None);
    }

    #[test]
    fn small_clusters_and_raw() {
        let o = vec!["cluster_size=512".to_string()];
        let m = measure(ImageFormat::Qcow2, &o, Some(1), None, &Default::default()).unwrap();
        assert_eq!((m.required, m.fully_allocated), (2560, 3072));
        let r = measure(ImageFormat::Raw, &[], Some(513), None, &Default::default()).unwrap();
        assert_eq!((r.required, r.fully_allocated), (1024, 1024));
    }

    #[test]
    fn bad_options_are_refused() {
        let bad = |o: &str| {
            measure(
                ImageFormat::Qcow2,
                &[o.to_string()],
                Some(1),
                None,
                &Default::default(),
            )
        };
        assert!(bad("foo=1")
            .unwrap_err()
            .to_string()
            .contains("Invalid parameter 'foo'"));
        assert!(bad("refcount_bits=3").is_err());
        assert!(bad("compat=0.10,refcount_bits=1").is_err());
        assert!(bad("extended_l2=on,cluster_size=4k").is_err());
        let raw = measure(
            ImageFormat::Raw,
            &["cluster_size=1k".into()],
            Some(1),
            None,
            &Default::default(),
        );
        assert!(raw.is_err());
    }

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_measure_size("1.5k").unwrap(), 1536);
        assert!(parse_measure_size("-1")
            .unwrap_err()
            .to_string()
            .contains("Must be between"));
        assert!(parse_measure_size("8E")
            .unwrap_err()
            .to_string()
            .contains("Must be between"));
        assert!(parse_measure_size("1x")
            .unwrap_err()
            .to_string()
            .contains("'1x'"));
    }
}
