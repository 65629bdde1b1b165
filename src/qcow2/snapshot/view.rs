//! Reading an internal snapshot (qemu-img convert's `-l`): a read-only [`Qcow2Image`] whose
//! active L1 table is a snapshot's (qcow2.rst "Snapshots": each entry names the L1 table of
//! the disk as it was), so that block status and reads work unchanged.
//!
//! Snapshots are selected as qemu-img's `-l` does: `snapshot.id=ID`, `snapshot.name=NAME`
//! (both: the snapshot must have both), or a bare `ID_OR_NAME`, which matches an id first and a
//! name otherwise.
//!
//! The view's virtual size is the disk size the snapshot recorded (its extra data), or the
//! image's current size for snapshots that record none. qemu-img 10 keeps the current size
//! instead: after a resize its copy of a snapshot is cut or padded with zeros, where vimg's is
//! the disk as it was when the snapshot was taken.

use super::table::{read_table, Snapshot};
use crate::block::{BlockImage, ImageFormat};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::lock::LockRequest;
use crate::open::{probe_format_with, ChainGuard, Sharing};
use crate::opener::Opener;
use crate::qcow2::format::header::MAX_L1_BYTES;
use crate::qcow2::Qcow2Image;
use crate::storage::Storage;
use byteorder::{BigEndian, ByteOrder};
use std::path::Path;

/// Which internal snapshot to read, as qemu-img's `-l` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSelector {
    /// A bare `-l ARG`: the snapshot whose id is ARG, else the first whose name is ARG.
    IdOrName(String),
    /// `snapshot.id=ID` and/or `snapshot.name=NAME`: the snapshot matching all that is given.
    Exact {
        /// The id to match, if given.
        id: Option<String>,
        /// The name to match, if given.
        name: Option<String>,
    },
}

/// qemu-img's message when no snapshot matches.
pub(crate) const NOT_FOUND: &str = "Failed to load snapshot: Can't find snapshot";

impl SnapshotSelector {
    /// Parses a `-l` argument: `snapshot.id=ID[,snapshot.name=NAME]` (either key alone, in
    /// either order), or anything else as a bare id or name.
    pub fn parse(arg: &str) -> Result<Self> {
        if !arg.starts_with("snapshot.") {
            return Ok(SnapshotSelector::IdOrName(arg.to_string()));
        }
        let fail = |what: String| {
            Error::invalid_input(format!(
                "{what}; failed in parsing snapshot param '{arg}' (use snapshot.id=ID, \
                 snapshot.name=NAME, or an id or name alone)"
            ))
        };
        let (mut id, mut name) = (None, None);
        for part in arg.split(',') {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let slot = match key {
                "snapshot.id" => &mut id,
                "snapshot.name" => &mut name,
                _ => return Err(fail(format!("Invalid parameter '{key}'"))),
            };
            if slot.is_some() {
                return Err(fail(format!("Parameter '{key}' given twice")));
            }
            *slot = Some(value.to_string());
        }
        Ok(SnapshotSelector::Exact { id, name })
    }

    /// The snapshot this selects among `snaps`, if any.
    pub fn find<'a>(&self, snaps: &'a [Snapshot]) -> Option<&'a Snapshot> {
        match self {
            SnapshotSelector::IdOrName(s) => snaps
                .iter()
                .find(|x| x.id == *s)
                .or_else(|| snaps.iter().find(|x| x.name == *s)),
            SnapshotSelector::Exact { id, name } => snaps.iter().find(|x| {
                id.as_ref().is_none_or(|i| x.id == *i) && name.as_ref().is_none_or(|n| x.name == *n)
            }),
        }
    }
}

/// Opens the image at `path` (format probed when `format` is `None`) read-only, as the disk
/// was when the snapshot `selector` names was taken, its storage opened through `opener`; only
/// qcow2 images have snapshots.
pub fn open_image_snapshot(
    path: &Path,
    format: Option<ImageFormat>,
    selector: &SnapshotSelector,
    opener: &Opener,
) -> Result<Box<dyn BlockImage>> {
    let format = match format {
        Some(f) => f,
        None => probe_format_with(opener, path)?,
    };
    if format != ImageFormat::of(&crate::qcow2::Qcow2Driver) {
        return Err(Error::unsupported(format!(
            "Failed to load snapshot: the {format} format has no internal snapshots"
        ))
        .with_path(path));
    }
    Ok(Box::new(Qcow2Image::open_snapshot(
        path,
        selector,
        &mut ChainGuard::with_opener(Sharing::Normal, opener.clone()),
    )?))
}

impl Qcow2Image {
    /// Opens the qcow2 image at `path` read-only, with its backing chain, as the disk was when
    /// the snapshot `selector` names was taken (see the module documentation).
    pub fn open_snapshot(
        path: &Path,
        selector: &SnapshotSelector,
        guard: &mut ChainGuard,
    ) -> Result<Self> {
        let storage = guard
            .opener()
            .open(path, false, LockRequest::exclusive(false))
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
        Self::open_snapshot_storage(storage, path, selector, guard)
    }

    /// [`Qcow2Image::open_snapshot`] over `storage`; `path` names it in messages and anchors
    /// relative backing file names.
    pub fn open_snapshot_storage(
        storage: Box<dyn Storage>,
        path: &Path,
        selector: &SnapshotSelector,
        guard: &mut ChainGuard,
    ) -> Result<Self> {
        let mut img = Self::open_storage(storage, path, false, false, guard)?;
        img.load_snapshot(selector).in_file(path)?;
        Ok(img)
    }

    /// Replaces the active L1 table and virtual size of this read-only image with those of the
    /// selected snapshot.
    fn load_snapshot(&mut self, selector: &SnapshotSelector) -> Result<()> {
        if self.write.is_some() {
            return Err(Error::invalid_input(
                "a snapshot can only be loaded into an image opened read-only",
            ));
        }
        let snaps = read_table(self)?;
        let snap = selector
            .find(&snaps)
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, NOT_FOUND))?
            .clone();
        if let Some((what, _)) = snap.qemu_l1_problem(self.header.cluster_size()) {
            return Err(Error::corrupt(format!("Failed to load snapshot: {what}")).bare());
        }
        snap.validate_l1(self)?;
        let size = snap.disk_size.unwrap_or(self.header.size);
        let per_entry = 1u64 << self.header.l1_shift();
        let needed = size.div_ceil(per_entry);
        if needed > MAX_L1_BYTES / 8 {
            return Err(Error::corrupt(format!(
                "snapshot '{}' records a disk size of {size} bytes, more than an L1 table \
                 within qemu's 32 MiB limit can map",
                snap.name
            ))
            .at(snap.entry_offset));
        }
        let mut raw = vec![0u8; snap.l1_size as usize * 8];
        self.storage
            .read_at(&mut raw, snap.l1_table_offset)
            .map_err(|e| {
                Error::io("cannot read the snapshot's L1 table", e).at(snap.l1_table_offset)
            })?;
        let mut l1: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        // A snapshot's table may be shorter than its disk needs (qemu allocates L1 tables
        // lazily): the missing entries are unallocated.
        if (l1.len() as u64) < needed {
            l1.resize(needed as usize, 0);
        }
        *self.l1.get_mut().unwrap_or_else(|e| e.into_inner()) = l1;
        self.header.size = size;
        self.header.l1_table_offset = snap.l1_table_offset;
        self.header.l1_size = snap.l1_size;
        self.l2_cache = crate::qcow2::cache::TableCache::new(self.l2_cache.capacity());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_as_qemu_img_does() {
        let snaps = [
            Snapshot::named("1", "s1"),
            Snapshot::named("2", "1"),
            Snapshot::named("3", "s1"),
        ];
        let pick = |arg: &str| {
            SnapshotSelector::parse(arg)
                .unwrap()
                .find(&snaps)
                .map(|s| s.id.clone())
        };
        // A bare argument is an id first, a name otherwise.
        assert_eq!(pick("1").as_deref(), Some("1"));
        assert_eq!(pick("s1").as_deref(), Some("1"));
        assert_eq!(pick("snapshot.name=1").as_deref(), Some("2"));
        assert_eq!(pick("snapshot.id=3").as_deref(), Some("3"));
        assert_eq!(pick("snapshot.id=3,snapshot.name=s1").as_deref(), Some("3"));
        assert_eq!(pick("snapshot.name=s1,snapshot.id=3").as_deref(), Some("3"));
        assert_eq!(pick("snapshot.id=1,snapshot.name=1"), None);
        assert_eq!(pick("snapshot.id=9"), None);
        assert_eq!(pick(""), None);
        for bad in [
            "snapshot.foo=9",
            "snapshot.id=1,x=2",
            "snapshot.id=1,snapshot.id=2",
        ] {
            let e = SnapshotSelector::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        }
    }
}
