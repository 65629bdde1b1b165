//! What making a new image asks of a format: the command's request ([`CreateCommand`]), the
//! format's checked plan ([`FormatCreation`]), and what `measure` answers ([`Measurement`]).
//!
//! These types sit below the formats and the commands: `vimg create`, convert's and backup
//! extract's new targets build a [`CreateCommand`] (crate::ops); a format's driver
//! ([`crate::block::FormatDriver::prepare_create`], `create_target`, `measure`) parses the
//! options it takes and writes the image. What needs the layers above the formats, opening a
//! backing file with its chain through the command's opener, the command hands in as a
//! callback ([`CreateCommand::open_backing`]).

use crate::error::Result;
use crate::opener::Opener;
use std::path::Path;

/// Opens the backing file a new image is to record, with its chain, for the checks qemu-img
/// makes before creating (`bdrv_img_create`), and returns its virtual size.
pub type OpenBacking<'a> = dyn Fn(&BackingToOpen<'_>) -> Result<u64> + Sync + 'a;

/// A new image as a command asks for it: the command line's pieces, each format parsing the
/// options it takes.
#[derive(Clone, Copy)]
pub struct CreateCommand<'a> {
    /// The file to create (an existing file is truncated, as qemu-img does).
    pub path: &'a Path,
    /// Each `-o` argument, in command-line order (later options win).
    pub options: &'a [String],
    /// `-b`: the backing file name, recorded as given (relative to the new image).
    pub backing_file: Option<&'a str>,
    /// `-F`: the backing file's format.
    pub backing_format: Option<&'a str>,
    /// SIZE as typed (`64M`, `65536`); `None` takes `-o size` or the backing file's size.
    pub size: Option<&'a str>,
    /// Opens the backing file to check it (and take its size); `None` for qemu-img's `-u`,
    /// where the backing file is only recorded.
    pub open_backing: Option<&'a OpenBacking<'a>>,
    /// What creates the image's files.
    pub opener: &'a Opener,
}

impl CreateCommand<'_> {
    /// The size of a new image of `format`, which records no backing file (a `-b`/`-F` is
    /// refused in qemu's words): SIZE if given, else `option_size` (`-o size`), else qemu's
    /// "needs a size" refusal. Errors name the file, as qemu-img's `create` does.
    pub fn size_without_backing(&self, format: &str, option_size: Option<u64>) -> Result<u64> {
        use crate::error::ResultExt;
        if self.backing_file.is_some() || self.backing_format.is_some() {
            return Err(crate::error::Error::invalid_input(format!(
                "Backing file not supported for file format '{format}'"
            ))
            .with_path(self.path));
        }
        let positional = self
            .size
            .map(crate::size::parse_size)
            .transpose()
            .in_file(self.path)?;
        positional.or(option_size).ok_or_else(|| {
            crate::error::Error::invalid_input("Image creation needs a size parameter")
                .with_path(self.path)
        })
    }
}

impl std::fmt::Debug for CreateCommand<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateCommand")
            .field("path", &self.path)
            .field("options", &self.options)
            .field("backing_file", &self.backing_file)
            .field("backing_format", &self.backing_format)
            .field("size", &self.size)
            .field("open_backing", &self.open_backing.is_some())
            .finish()
    }
}

/// The backing file a new image is to record, as [`OpenBacking`] is asked to open it.
#[derive(Debug, Clone, Copy)]
pub struct BackingToOpen<'a> {
    /// The new image.
    pub image: &'a Path,
    /// The backing file, its recorded name resolved against the new image's directory.
    pub backing: &'a Path,
    /// Its format as given (`-F`), if any.
    pub format: Option<&'a str>,
    /// The new image's external data file as named (`-o data_file`), if it is to have one.
    pub data_file: Option<&'a str>,
}

/// A format's checked create request, ready to write (returned by
/// [`crate::block::FormatDriver::prepare_create`]).
pub trait FormatCreation: std::fmt::Debug + Send + Sync {
    /// The line qemu-img prints before creating, e.g. `Formatting 'disk.qcow2', fmt=qcow2
    /// cluster_size=65536 ...`.
    fn formatting_line(&self) -> String;

    /// Writes the image (truncating an existing file). A failed create removes the files it
    /// made; its own checks that qemu-img makes after the "Formatting" line come first.
    fn execute(&self) -> Result<()>;
}

/// What `measure` reports (qemu's `BlockMeasureInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes a new image holding the source's data needs.
    pub required: u64,
    /// Bytes the image takes with every cluster allocated.
    pub fully_allocated: u64,
    /// Bytes the source's persistent dirty bitmaps would take; `None` when qemu does not
    /// report bitmaps (a raw target or source, or a version 2 image on either side).
    pub bitmaps: Option<u64>,
}
