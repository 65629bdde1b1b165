//! The one public error type of the library: a small, stable [`ErrorKind`] plus context
//! (the file, the offset, what was wrong) and the underlying I/O error where there is one.
//!
//! Library code never panics on image content: every check on a value read from a file turns
//! into an [`Error`] of kind [`ErrorKind::Corrupt`] (or [`ErrorKind::Unsupported`] for a valid
//! feature vimg does not implement), and the command-line layer prints it on one line.

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong, in a form callers can match on. Kept small and stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The operating system refused an operation (open, read, write, ...).
    Io,
    /// The image's content breaks the format (bad magic, an offset outside the file, a table
    /// larger than the format's limits, ...). Also used for hostile input.
    Corrupt,
    /// The image uses a feature vimg does not support (yet), such as encryption or an unknown
    /// incompatible feature bit.
    Unsupported,
    /// The caller asked for something that cannot be done (bad option, offset past the end).
    InvalidInput,
    /// A write was attempted on an image opened read-only, or on a format whose write path is
    /// not available.
    ReadOnly,
    /// A backing chain refers back to one of its own members, or is deeper than allowed.
    BackingChain,
    /// Another process (qemu, qemu-io, another vimg) has the file open in a way that conflicts
    /// with this open: its image locks say so (see [`crate::lock`]).
    Locked,
}

impl ErrorKind {
    /// A short lower-case name for the kind, used in JSON output and debugging.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::BackingChain => "backing chain",
            ErrorKind::Locked => "locked",
        }
    }
}

/// How an error's message names its file.
///
/// qemu-img's messages are matched by scripts (and by qemu's own iotests), so where qemu-img
/// words a failure a certain way, vimg's message starts with the same words: a failure to open
/// an image reads `Could not open 'FILE': REASON`, as in qemu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `FILE: what` (vimg's own messages).
    Prefixed,
    /// `Could not open 'FILE': what`: the failure happened while opening the image.
    Opening,
    /// `what` alone: the message is complete as it stands (qemu-img's words, which already say
    /// which file, or concern the command rather than one file).
    Bare,
}

/// Separates two reports in one error message: qemu-img reports some inner failures on a line
/// of their own before the outer one, and vimg's command line prints each part as its own
/// message line (starting with the program's name).
pub const REPORT_BREAK: &str = "\n\u{1e}";

/// A library error: kind, the file it concerns, the byte offset where it was found (host
/// offset in that file, or guest offset where stated in the message) and a sentence saying what
/// is wrong.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    offset: Option<u64>,
    what: String,
    source: Option<std::io::Error>,
    framing: Framing,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` saying `what`, without file or offset context yet.
    pub fn new(kind: ErrorKind, what: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            offset: None,
            what: what.into(),
            source: None,
            framing: Framing::Prefixed,
        }
    }

    /// An image-content error (see [`ErrorKind::Corrupt`]).
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, what)
    }

    /// An unsupported-feature error (see [`ErrorKind::Unsupported`]).
    pub fn unsupported(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, what)
    }

    /// A bad-argument error (see [`ErrorKind::InvalidInput`]).
    pub fn invalid_input(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, what)
    }

    /// An I/O error while doing `what`; of kind [`ErrorKind::Locked`] when the source is an
    /// image lock conflict ([`crate::lock::Conflict`]).
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        let locked = crate::lock::conflict_of(&source).is_some();
        Error {
            kind: if locked {
                ErrorKind::Locked
            } else {
                ErrorKind::Io
            },
            path: None,
            offset: None,
            what: what.into(),
            source: Some(source),
            framing: Framing::Prefixed,
        }
    }

    /// Marks the error as a failure to open its file, printed as qemu-img prints those:
    /// `Could not open 'FILE': REASON` (an I/O error's reason is the operating system's).
    /// Errors already framed otherwise are left as they are.
    pub fn while_opening(mut self) -> Self {
        if self.framing == Framing::Prefixed {
            self.framing = Framing::Opening;
        }
        self
    }

    /// Marks the message as complete: it is printed as it stands, without the file (for
    /// qemu-img's own words, which scripts match).
    pub fn bare(mut self) -> Self {
        self.framing = Framing::Bare;
        self
    }

    /// Attaches the file this error concerns, unless one is already attached (the innermost
    /// file is the most precise, e.g. a backing file rather than the overlay).
    pub fn with_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    /// The same error about `new` instead of `old` when it concerns `old` (e.g. a temporary
    /// file the user never named); everything else, the OS cause included, is kept.
    pub fn moved_to(mut self, old: &Path, new: &Path) -> Self {
        if self.path.as_deref() == Some(old) {
            self.path = Some(new.to_path_buf());
        }
        self
    }

    /// The same error with `what` in place of its sentence; file, offset and OS cause are kept.
    pub fn reworded(mut self, what: impl Into<String>) -> Self {
        self.what = what.into();
        self
    }

    /// Attaches the byte offset where the problem was found, unless one is already attached.
    pub fn at(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// What went wrong, as a kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file this error concerns, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The offset where the problem was found, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The sentence describing the problem, without file or offset.
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.framing) {
            (Some(p), Framing::Opening) => {
                write!(f, "Could not open '{}': ", p.display())?;
                // "Could not open 'F': cannot open image: No such file" says it twice: the
                // operating system's reason alone is qemu-img's message.
                if let (Some(s), None) = (&self.source, self.offset) {
                    if self.what.starts_with("cannot open") {
                        return f.write_str(&os_reason(s));
                    }
                }
            }
            (Some(p), Framing::Prefixed) => write!(f, "{}: ", p.display())?,
            _ => {}
        }
        f.write_str(&self.what)?;
        if let Some(o) = self.offset {
            write!(f, " (at offset {o:#x})")?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {}", os_reason(s))?;
        }
        Ok(())
    }
}

/// An I/O error's text as the C library words it (`No space left on device`), without the
/// `(os error 28)` Rust appends, as qemu-img prints it.
pub fn os_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match (e.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(i)) => text[..i].to_string(),
        _ => text,
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Adds file context to results, so that call sites read `op().in_file(path)?`.
pub trait ResultExt<T> {
    /// Attaches `path` to the error, if any (see [`Error::with_path`]).
    fn in_file(self, path: &Path) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn in_file(self, path: &Path) -> Result<T> {
        self.map_err(|e| e.with_path(path))
    }
}
