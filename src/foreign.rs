//! The formats qemu reads and vimg does not (yet): their names, and the refusal that names
//! them ([`crate::probe`] recognises their files).

use crate::error::Error;

/// A format qemu reads and vimg does not (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForeignFormat {
    /// VMware's disk format.
    Vmdk,
    /// Hyper-V's VHDX.
    Vhdx,
    /// Virtual PC's VHD (qemu's `vpc`).
    Vpc,
    /// VirtualBox's VDI.
    Vdi,
    /// QEMU Enhanced Disk.
    Qed,
    /// QEMU copy-on-write version 1.
    Qcow,
    /// Parallels' disk format.
    Parallels,
    /// Apple's disk image.
    Dmg,
    /// Bochs' growing redolog.
    Bochs,
    /// Linux's compressed loopback format.
    Cloop,
    /// A LUKS encrypted container.
    Luks,
}

impl ForeignFormat {
    /// Every foreign format, in the order they are described above.
    pub const ALL: [ForeignFormat; 11] = [
        ForeignFormat::Vmdk,
        ForeignFormat::Vhdx,
        ForeignFormat::Vpc,
        ForeignFormat::Vdi,
        ForeignFormat::Qed,
        ForeignFormat::Qcow,
        ForeignFormat::Parallels,
        ForeignFormat::Dmg,
        ForeignFormat::Bochs,
        ForeignFormat::Cloop,
        ForeignFormat::Luks,
    ];

    /// qemu's name for the format (what `-f` takes).
    pub fn as_str(self) -> &'static str {
        match self {
            ForeignFormat::Vmdk => "vmdk",
            ForeignFormat::Vhdx => "vhdx",
            ForeignFormat::Vpc => "vpc",
            ForeignFormat::Vdi => "vdi",
            ForeignFormat::Qed => "qed",
            ForeignFormat::Qcow => "qcow",
            ForeignFormat::Parallels => "parallels",
            ForeignFormat::Dmg => "dmg",
            ForeignFormat::Bochs => "bochs",
            ForeignFormat::Cloop => "cloop",
            ForeignFormat::Luks => "luks",
        }
    }

    /// The format qemu calls `name`, if it is one of these.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The refusal for an image of this format: what it is, and how to copy its bytes anyway.
    /// The caller attaches the file.
    pub fn not_supported(self) -> Error {
        Error::unsupported(format!(
            "{} images are not supported yet; use -f raw to copy the container bytes",
            self.as_str()
        ))
    }
}

impl std::fmt::Display for ForeignFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Formats qemu-img knows as backing formats; with `-u` any of them may be recorded, since the
/// backing file is not opened. Without `-u` vimg must open it, so only raw and qcow2 work.
pub const KNOWN_FORMATS: &[&str] = &[
    "raw",
    "qcow2",
    "qcow",
    "qed",
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "parallels",
    "luks",
    "dmg",
    "bochs",
    "cloop",
    "vvfat",
    "file",
    "host_device",
    "nbd",
];
