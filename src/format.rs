//! The format registry: every image format vimg reads and writes is one driver
//! ([`FormatDriver`], declared with the image model in [`crate::block`]) listed once, in
//! [`DRIVERS`]; an [`ImageFormat`] is a handle on one of them. Probing, opening, image locks
//! and `create -o help` ask the driver, and commands reach what only some formats can do
//! through the opened image's capabilities ([`crate::capability`]), so that a new format is
//! its own module plus one line in [`DRIVERS`]. Not yet so: `create`, `measure`, `convert`'s
//! new targets and backup extract's still compare [`ImageFormat`] values (the consts below).
//!
//! A driver says what qemu's block drivers say about themselves: its name, how sure it is that
//! a file is its format (`bdrv_probe`), which image locks a layer of it takes, how to open
//! one, and which creation options it takes (`create_opts`).

pub use crate::block::{FormatDriver, ImageFormat, ProbeInput};
use crate::error::{Error, Result};

/// Every format vimg reads and writes: the one list.
pub static DRIVERS: &[&dyn FormatDriver] = &[&crate::raw::RawDriver, &crate::qcow2::Qcow2Driver];

#[allow(non_upper_case_globals)]
impl ImageFormat {
    /// Raw: the guest disk byte for byte ([`crate::raw`]).
    pub const Raw: ImageFormat = ImageFormat::of(&crate::raw::RawDriver);
    /// qcow2 ([`crate::qcow2`]).
    pub const Qcow2: ImageFormat = ImageFormat::of(&crate::qcow2::Qcow2Driver);

    /// Every registered format, in [`DRIVERS`] order.
    pub fn all() -> impl Iterator<Item = ImageFormat> {
        DRIVERS.iter().map(|d| ImageFormat::of(*d))
    }

    /// Parses a format name as given to `-f`/`-F` or recorded in an image. A format qemu reads
    /// and vimg does not is refused by name.
    pub fn from_name(name: &str) -> Result<Self> {
        match Self::all().find(|f| f.as_str() == name) {
            Some(f) => Ok(f),
            None => Err(match crate::foreign::ForeignFormat::from_name(name) {
                Some(f) => f.not_supported(),
                None => Error::unsupported(format!("unknown or unsupported image format '{name}'")),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_the_registry() {
        for f in ImageFormat::all() {
            assert_eq!(ImageFormat::from_name(f.as_str()).unwrap(), f);
        }
        let names: Vec<_> = ImageFormat::all().map(|f| f.as_str()).collect();
        assert_eq!(names, ["raw", "qcow2"]);
        let e = ImageFormat::from_name("vmdk").unwrap_err();
        assert!(
            e.what().contains("vmdk images are not supported yet"),
            "{e}"
        );
        assert!(ImageFormat::from_name("nope").is_err());
    }
}
