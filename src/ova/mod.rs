//! OVA appliances read in place: a tar archive (ustar, the OVF descriptor first) holding the
//! descriptor, a manifest and the disks. vimg reads a disk straight out of the archive, without
//! unpacking it: the disk's member is a read-only window of the `.ova` file ([`Window`]), and
//! the disk's own format (streamOptimized vmdk usually; qcow2, raw, ...) is probed in that
//! window as in any file.
//!
//! Naming a disk: the locator `ova:PATH,disk=NAME` (NAME the disk's member name in the archive,
//! or its `ovf:diskId`) reaches one disk; `ova:PATH` or the plain `PATH` of a file the probe
//! recognises as an OVA reach its only disk, and an appliance with several disks is refused
//! with the list of them and the locator to give. The `ova:` prefix is a protocol prefix as
//! qemu's `nbd:` or `rbd:` are, so it cannot be taken for a local file's name. The opener
//! ([`crate::opener`]) claims these locators; the members are found by [`tar`], the disks by
//! [`ovf`]. Everything is read-only: writing into an appliance is refused.

pub mod ovf;
pub mod tar;

use crate::error::{Error, Result};
use crate::storage::Storage;
use std::io;
use std::path::{Path, PathBuf};

/// The locator prefix of a disk inside an OVA.
pub const PREFIX: &str = "ova:";
/// What separates the archive's path from the disk's name in a locator.
pub const DISK_SEP: &str = ",disk=";

/// Whether `head` (a file's first bytes) starts a tar archive whose first member is an OVF
/// descriptor (a name ending in `.ovf`; a pax or GNU long-name header before it is looked
/// through when it fits in `head`).
pub fn is_appliance(head: &[u8]) -> bool {
    let mut at = 0usize;
    for _ in 0..2 {
        let Some(h) = head.get(at..at + tar::BLOCK as usize) else {
            return false;
        };
        if &h[257..262] != b"ustar" || !tar::header_checks_out(h) {
            return false;
        }
        if matches!(h[156], b'x' | b'L') {
            let size = u64::from_str_radix(
                std::str::from_utf8(&h[124..135])
                    .unwrap_or("x")
                    .trim_matches(['\0', ' ']),
                8,
            );
            match size {
                Ok(s) if s < 1024 => {
                    at += tar::BLOCK as usize + (s as usize).next_multiple_of(tar::BLOCK as usize);
                    continue;
                }
                _ => return false,
            }
        }
        return tar::header_name(h).to_ascii_lowercase().ends_with(".ovf");
    }
    false
}

/// A locator of a disk inside an appliance, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLocator {
    /// The `.ova` file.
    pub archive: PathBuf,
    /// The disk asked for, if one was named.
    pub disk: Option<String>,
}

impl DiskLocator {
    /// Parses `ova:PATH[,disk=NAME]`; `None` for a locator without the prefix.
    pub fn parse(loc: &Path) -> Option<Self> {
        let s = loc.to_str()?.strip_prefix(PREFIX)?;
        Some(match s.rsplit_once(DISK_SEP) {
            Some((a, d)) => DiskLocator {
                archive: PathBuf::from(a),
                disk: Some(d.to_string()),
            },
            None => DiskLocator {
                archive: PathBuf::from(s),
                disk: None,
            },
        })
    }

    /// The locator naming disk `member` of `archive`.
    pub fn name(archive: &Path, member: &str) -> PathBuf {
        PathBuf::from(format!("{PREFIX}{}{DISK_SEP}{member}", archive.display()))
    }
}

/// An appliance's disks, each with its member.
#[derive(Debug, Clone)]
pub struct Appliance {
    /// The disks, in the descriptor's order.
    pub disks: Vec<(ovf::Disk, tar::Member)>,
}

impl Appliance {
    /// Reads the members and the descriptor of the archive in `storage` (`len` bytes): the
    /// first `.ovf` member, each disk it declares matched with its member.
    pub fn read(storage: &dyn Storage, len: u64) -> Result<Self> {
        let members = tar::members(storage, len)?;
        let ovf_member = members
            .iter()
            .find(|m| m.name.to_ascii_lowercase().ends_with(".ovf"))
            .ok_or_else(|| Error::corrupt("the OVA archive holds no .ovf descriptor"))?;
        if ovf_member.size > ovf::MAX_OVF {
            return Err(Error::corrupt(format!(
                "OVF descriptor '{}' is {} bytes, more than vimg reads ({} bytes)",
                ovf_member.name,
                ovf_member.size,
                ovf::MAX_OVF
            )));
        }
        let mut xml = vec![0u8; ovf_member.size as usize];
        storage
            .read_at(&mut xml, ovf_member.offset)
            .map_err(|e| Error::io("cannot read the OVF descriptor", e))?;
        let xml = String::from_utf8(xml).map_err(|_| {
            Error::corrupt(format!(
                "OVF descriptor '{}' is not UTF-8 text",
                ovf_member.name
            ))
        })?;
        let mut disks = Vec::new();
        for d in ovf::disks(&xml)? {
            let m = members
                .iter()
                .find(|m| m.name == d.href || m.name.strip_prefix("./") == Some(&d.href))
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "OVF disk '{}' is in file '{}', which the archive lacks",
                        d.id, d.href
                    ))
                })?;
            disks.push((d, m.clone()));
        }
        if disks.is_empty() {
            return Err(Error::corrupt("the OVF descriptor declares no disk"));
        }
        Ok(Appliance { disks })
    }

    /// The disk `name` names (its member name or disk id), or the only one when `name` is
    /// `None`; refused with the list of disks and how to name one otherwise.
    pub fn pick(&self, archive: &Path, name: Option<&str>) -> Result<&(ovf::Disk, tar::Member)> {
        let list = || {
            self.disks
                .iter()
                .map(|(d, m)| format!("{} ({})", m.name, d.id))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(n) => self
                .disks
                .iter()
                .find(|(d, m)| m.name == n || d.href == n || d.id == n)
                .ok_or_else(|| {
                    Error::invalid_input(format!(
                        "the appliance has no disk '{n}'; its disks: {}",
                        list()
                    ))
                }),
            None if self.disks.len() == 1 => Ok(&self.disks[0]),
            None => Err(Error::invalid_input(format!(
                "the appliance holds {} disks: {}; name one as '{}'",
                self.disks.len(),
                list(),
                DiskLocator::name(archive, &self.disks[0].1.name).display()
            ))),
        }
    }
}

/// Opens the disk `loc` names: the archive `open_archive` opens (read-only), the disk's member
/// as a [`Window`].
pub fn open_disk(
    loc: &DiskLocator,
    open_archive: impl FnOnce(&Path) -> io::Result<Box<dyn Storage>>,
) -> io::Result<Box<dyn Storage>> {
    let archive = open_archive(&loc.archive)?;
    let len = archive.len()?;
    let app = Appliance::read(archive.as_ref(), len).map_err(io::Error::other)?;
    let (_, m) = app
        .pick(&loc.archive, loc.disk.as_deref())
        .map_err(io::Error::other)?;
    let (offset, size) = (m.offset, m.size);
    Ok(Box::new(Window {
        inner: archive,
        offset,
        len: size,
    }))
}

/// The canonical locator of the disk `loc` names: the archive's canonical path and the disk's
/// member name.
pub fn canonical(
    loc: &DiskLocator,
    open_archive: impl FnOnce(&Path) -> io::Result<Box<dyn Storage>>,
) -> io::Result<PathBuf> {
    let archive = open_archive(&loc.archive)?;
    let len = archive.len()?;
    let app = Appliance::read(archive.as_ref(), len).map_err(io::Error::other)?;
    let (_, m) = app
        .pick(&loc.archive, loc.disk.as_deref())
        .map_err(io::Error::other)?;
    Ok(DiskLocator::name(
        &std::fs::canonicalize(&loc.archive)?,
        &m.name,
    ))
}

/// The length of the disk `loc` names (its member's size), the archive opened to look only.
pub fn disk_len(loc: &DiskLocator) -> io::Result<u64> {
    let storage = crate::storage::FileStorage::open_with(
        &loc.archive,
        false,
        crate::lock::LockRequest::force_share(),
    )?;
    let app = Appliance::read(&storage, storage.len()?).map_err(io::Error::other)?;
    let (_, m) = app
        .pick(&loc.archive, loc.disk.as_deref())
        .map_err(io::Error::other)?;
    Ok(m.size)
}

/// The error of a write into an appliance.
pub fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "an OVA appliance is read-only: convert its disk to an image of its own to change it",
    )
}

/// `len` bytes of `inner` from `offset`: a disk inside an archive, read-only. Reads past its
/// end are zeros, as for any storage.
pub struct Window {
    inner: Box<dyn Storage>,
    offset: u64,
    len: u64,
}

impl Window {
    /// The window `[offset, offset + len)` of `inner` (which must hold it).
    pub fn new(inner: Box<dyn Storage>, offset: u64, len: u64) -> Self {
        Window { inner, offset, len }
    }
}

impl Storage for Window {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inside = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (data, past) = buf.split_at_mut(inside);
        if !data.is_empty() {
            self.inner.read_at(data, self.offset + offset)?;
        }
        past.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero_range(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn extent_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        if offset >= self.len {
            return Ok((false, u64::MAX));
        }
        let (data, n) = self.inner.extent_at(self.offset + offset)?;
        Ok((data, n.min(self.len - offset).max(1)))
    }
}

/// Reads arbitrary bytes as an OVA: its members, descriptor and disks, and every disk's bytes
/// through its window (the fuzz target `ova_open`). Never panics, and allocates at most about
/// the input's size.
pub fn exercise(data: &[u8]) {
    let _ = is_appliance(data);
    let len = data.len() as u64;
    let storage = crate::storage::MemStorage::new(data.to_vec());
    let Ok(app) = Appliance::read(&storage, len) else {
        return;
    };
    let _ = app.pick(Path::new("fuzz.ova"), None);
    for (_, m) in &app.disks {
        let w = Window::new(
            Box::new(crate::storage::MemStorage::new(data.to_vec())),
            m.offset,
            m.size,
        );
        let mut buf = vec![0u8; 4096];
        let mut at = 0;
        while at < m.size.min(1 << 20) {
            let _ = w.read_at(&mut buf, at);
            let _ = w.extent_at(at);
            at += buf.len() as u64;
        }
        assert!(w.write_at(&buf, 0).is_err());
    }
}
