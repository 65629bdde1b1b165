//! The format registry: every image format vimg reads and writes is one driver
//! ([`FormatDriver`], declared with the image model in [`crate::block`]) listed once, in
//! [`DRIVERS`]; an [`ImageFormat`] is a handle on one of them. Commands never compare formats:
//! they ask the driver, and reach what only some images can do through the opened image's
//! capabilities ([`crate::capability`]).
//!
//! A driver says what qemu's block drivers say about themselves, and a new format (vmdk, say)
//! is its own module implementing [`FormatDriver`] plus one line in [`DRIVERS`]:
//!
//! - `name`, `probe` (`bdrv_probe`: how sure it is that a file is its format), `lock_request`
//!   (the image locks a layer takes) and `open`, which returns its [`crate::block::BlockImage`]
//!   (whose `layer_info` is its part of `info`, and whose capability accessors say what else
//!   it offers: check, bitmaps, snapshots, resize, amend, ...);
//! - `create_option_help` and `prepare_create` for `create -f` (`create_opts`, and
//!   `bdrv_img_create` up to the "Formatting" line: its options, size and backing file checks,
//!   the line, then the write; the types are in [`crate::creation`], the command in
//!   [`crate::ops::create`]); `create_target` for the new image
//!   `convert` and backup extract write into; `target_takes_options` and
//!   `check_target_options` for the `-o` options that image takes;
//! - `measure` (`bdrv_measure`) and, if it has any, `amend_option_help` and `repair`;
//! - its answers to the capability questions commands ask before anything is opened:
//!   `supports_backing_file`, `supports_compressed_writes`, `supports_persistent_bitmaps`,
//!   `writes_in_order`.
//!
//! Each method but the first four has a default that says "not this format" (with qemu's
//! words where it has some), so a read-only format implements only those. What still names a
//! format outside the drivers: a vmstate restored from a backup is a raw file of bytes
//! ([`crate::ops::backup`]); qemu's null driver reads as a raw image and may sit under a `raw`
//! format ([`crate::image_spec`], [`crate::null`]); an O_DIRECT open of a raw file reports
//! whole sectors (`open_named` in the command-line program); and the probe falls back on raw
//! ([`crate::probe`]).

pub use crate::block::{FormatDriver, ImageFormat, ProbeInput};
use crate::error::{Error, Result};

/// Every format vimg reads and writes: the one list.
pub static DRIVERS: &[&dyn FormatDriver] = &[
    &crate::raw::RawDriver,
    &crate::qcow2::Qcow2Driver,
    &crate::luks::LuksDriver,
    &crate::vdi::VdiDriver,
    &crate::vpc::VpcDriver,
    &crate::vhdx::VhdxDriver,
    &crate::vmdk::VmdkDriver,
];

#[allow(non_upper_case_globals)]
impl ImageFormat {
    /// Raw: the guest disk byte for byte ([`crate::raw`]).
    pub const Raw: ImageFormat = ImageFormat::of(&crate::raw::RawDriver);
    /// qcow2 ([`crate::qcow2`]).
    pub const Qcow2: ImageFormat = ImageFormat::of(&crate::qcow2::Qcow2Driver);
    /// Raw LUKS: a LUKS1 container holding a raw disk ([`crate::luks`]).
    pub const Luks: ImageFormat = ImageFormat::of(&crate::luks::LuksDriver);
    /// VirtualBox's VDI ([`crate::vdi`]).
    pub const Vdi: ImageFormat = ImageFormat::of(&crate::vdi::VdiDriver);
    /// Virtual PC's VHD ([`crate::vpc`]).
    pub const Vpc: ImageFormat = ImageFormat::of(&crate::vpc::VpcDriver);
    /// Hyper-V's VHDX ([`crate::vhdx`]).
    pub const Vhdx: ImageFormat = ImageFormat::of(&crate::vhdx::VhdxDriver);
    /// VMware's VMDK ([`crate::vmdk`]).
    pub const Vmdk: ImageFormat = ImageFormat::of(&crate::vmdk::VmdkDriver);

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
    use crate::block::BlockImage;
    use crate::chain::{ChainGuard, Sharing};
    use crate::lock::LockRequest;
    use crate::open::{open_image, OpenOptions};
    use crate::ops::create::{create, CreateArgs};
    use std::path::Path;

    fn create_args(format: ImageFormat, path: &Path, options: &[&str]) -> CreateArgs {
        CreateArgs {
            format,
            filename: path.to_path_buf(),
            options: options.iter().map(|o| o.to_string()).collect(),
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
            size: Some("1M".into()),
            opener: Default::default(),
        }
    }

    #[test]
    fn every_registered_format_creates_measures_and_makes_targets() {
        let dir = tempfile::tempdir().unwrap();
        // LUKS needs a key to create and open: its own tests cover it (crate::luks). vpc
        // rounds sizes to its geometry and, as qemu's, cannot measure (tests/oracle/vpc.rs);
        // nor can vdi (tests/oracle/vdi.rs), vhdx (tests/oracle/vhdx.rs) and vmdk
        // (tests/oracle/vmdk.rs).
        for f in ImageFormat::all().filter(|f| {
            ![
                ImageFormat::Luks,
                ImageFormat::Vdi,
                ImageFormat::Vpc,
                ImageFormat::Vhdx,
                ImageFormat::Vmdk,
            ]
            .contains(f)
        }) {
            let path = dir.path().join(format!("c.{f}"));
            let line = create(&create_args(f, &path, &[])).unwrap();
            let want = format!("Formatting '{}', fmt={f} ", path.display());
            assert!(line.starts_with(&want), "{line}");
            let img = open_image(&path, &OpenOptions::default()).unwrap();
            assert_eq!((img.format(), img.virtual_size()), (f, 1 << 20));

            let m = crate::ops::measure::measure(f, &[], Some(1 << 20), None, &Default::default())
                .unwrap();
            assert!(m.fully_allocated >= 1 << 20, "{f}: {m:?}");
            let m2 =
                crate::ops::measure::measure(f, &[], None, Some(img.as_ref()), &Default::default())
                    .unwrap();
            assert_eq!(m2.fully_allocated, m.fully_allocated, "{f}");

            let target = dir.path().join(format!("t.{f}"));
            let t = f
                .driver()
                .create_target(
                    &target,
                    1 << 20,
                    &[],
                    (None, None),
                    true,
                    &Default::default(),
                )
                .unwrap();
            assert_eq!((t.format(), t.virtual_size()), (f, 1 << 20));
            assert!(t.is_writable());
        }
    }

    #[test]
    fn capability_answers_agree_with_the_images() {
        let dir = tempfile::tempdir().unwrap();
        for f in ImageFormat::all().filter(|f| *f != ImageFormat::Luks) {
            let d = f.driver();
            let path = dir.path().join(format!("c.{f}"));
            create(&create_args(f, &path, &[])).unwrap();
            let img = open_image(&path, &OpenOptions::default()).unwrap();
            assert_eq!(
                d.supports_compressed_writes(),
                img.as_compressed_writes().is_some(),
                "{f}"
            );
            assert_eq!(
                d.supports_persistent_bitmaps(),
                img.as_bitmaps().is_some_and(|b| b.bitmaps_supported()),
                "{f}"
            );
            // A format that records no backing file refuses one at creation.
            let base = dir.path().join(format!("c.{f}"));
            let top = dir.path().join(format!("top.{f}"));
            let mut a = create_args(f, &top, &[]);
            a.backing_file = Some(base.display().to_string());
            a.backing_format = Some(f.to_string());
            assert_eq!(create(&a).is_ok(), d.supports_backing_file(), "{f}");
            if d.supports_backing_file() {
                let img = open_image(&top, &OpenOptions::default()).unwrap();
                assert!(img.backing().is_some(), "{f}");
            }
        }
    }

    /// A format that only reads: what it does not implement is refused by name.
    struct ReadOnlyFormat;

    impl FormatDriver for ReadOnlyFormat {
        fn name(&self) -> &'static str {
            "readonly"
        }
        fn probe(&self, _: &ProbeInput<'_>) -> u32 {
            0
        }
        fn lock_request(&self, _: Sharing, w: bool, _: bool) -> LockRequest {
            LockRequest::exclusive(w)
        }
        fn open(
            &self,
            path: &Path,
            _: bool,
            _: bool,
            _: &mut ChainGuard,
        ) -> Result<Box<dyn BlockImage>> {
            Err(Error::unsupported("no").with_path(path))
        }
        fn create_option_help(&self) -> &'static [crate::option_desc::OptDesc] {
            &[]
        }
    }

    #[test]
    fn a_format_that_only_reads_refuses_the_rest_by_name() {
        static RO: ReadOnlyFormat = ReadOnlyFormat;
        let f = ImageFormat::of(&RO);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let e = create(&create_args(f, &path, &[])).unwrap_err();
        assert!(
            e.to_string()
                .contains("Format driver 'readonly' does not support image creation"),
            "{e}"
        );
        assert!(!path.exists());
        let e =
            crate::ops::measure::measure(f, &[], Some(1), None, &Default::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("Block driver 'readonly' does not support size measurement"),
            "{e}"
        );
        assert!(RO
            .create_target(&path, 1, &[], (None, None), true, &Default::default())
            .is_err());
        assert!(!path.exists());
        assert!(RO.repair(&path, true, &Default::default()).is_none());
        assert!(RO.amend_option_help().is_none());
        assert!(RO.check_target_options(&["x=1".into()]).is_ok());
        assert!(!RO.target_takes_options());
        assert!(
            !RO.supports_backing_file()
                && !RO.supports_compressed_writes()
                && !RO.supports_persistent_bitmaps()
                && !RO.writes_in_order()
        );
    }

    #[test]
    fn names_round_trip_through_the_registry() {
        for f in ImageFormat::all() {
            assert_eq!(ImageFormat::from_name(f.as_str()).unwrap(), f);
        }
        let names: Vec<_> = ImageFormat::all().map(|f| f.as_str()).collect();
        assert_eq!(
            names,
            ["raw", "qcow2", "luks", "vdi", "vpc", "vhdx", "vmdk"]
        );
        let e = ImageFormat::from_name("qed").unwrap_err();
        assert!(e.what().contains("qed images are not supported yet"), "{e}");
        assert!(ImageFormat::from_name("nope").is_err());
    }
}
