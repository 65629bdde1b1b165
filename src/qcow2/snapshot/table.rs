//! The internal snapshot table (qcow2.rst "Snapshots"): read and validated.

use crate::error::{Error, Result};
use crate::info::SnapshotInfo;
use crate::qcow2::format::header::{check_table, MAX_L1_BYTES, QEMU_MAX_OFFSET};
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};

/// Largest snapshot table qemu accepts, in bytes.
pub(crate) const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest per-entry extra data qemu accepts, in bytes.
pub(crate) const MAX_EXTRA: u32 = 1024;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of this entry in the snapshot table.
    pub entry_offset: u64,
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra field when present, else the 32-bit one).
    pub vm_state_size: u64,
    /// Virtual disk size at creation, when recorded in the extra data.
    pub disk_size: Option<u64>,
    /// Instruction count, when recorded (u64::MAX means none).
    pub icount: Option<u64>,
    /// Extra data bytes, kept verbatim.
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// Checks that the snapshot's L1 table is within qemu's size limit, cluster-aligned and
    /// inside the file. Listing snapshots does not need this (qemu lists such snapshots too);
    /// anything that reads the L1 table does.
    /// The first two problems are worded as qemu words them ([`Snapshot::qemu_l1_problem`]).
    pub fn validate_l1(&self, img: &Qcow2Image) -> Result<()> {
        let l1_bytes = u64::from(self.l1_size) * 8;
        if let Some((what, _)) = self.qemu_l1_problem(img.header().cluster_size()) {
            return Err(Error::corrupt(what).bare());
        }
        let what = format!("L1 table of snapshot '{}'", self.name);
        check_table(
            &what,
            self.l1_table_offset,
            l1_bytes,
            img.header().cluster_size(),
            img.file_len(),
            self.entry_offset,
        )
    }

    /// What qemu finds wrong with the snapshot's L1 table before reading it, in its order and
    /// words, with the reason (errno text) its callers report: a table over 32 MiB ("too
    /// large", `File too large`), or an offset not aligned to `cluster_size` ("offset
    /// invalid", `Invalid argument`).
    pub fn qemu_l1_problem(&self, cluster_size: u64) -> Option<(&'static str, &'static str)> {
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            Some(("Snapshot L1 table too large", "File too large"))
        } else if !self.l1_table_offset.is_multiple_of(cluster_size) {
            Some(("Snapshot L1 table offset invalid", "Invalid argument"))
        } else {
            None
        }
    }

    /// The entry as `info` shows it.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: u64::from(self.date_sec),
            date_nsec: u64::from(self.date_nsec),
            vm_clock_sec: self.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: self.vm_clock_nsec % 1_000_000_000,
            icount: self.icount,
        }
    }
}

#[cfg(test)]
impl Snapshot {
    /// An entry with this id and name and nothing else, for tests.
    pub(crate) fn named(id: &str, name: &str) -> Self {
        Snapshot {
            entry_offset: 0,
            l1_table_offset: 0,
            l1_size: 0,
            id: id.into(),
            name: name.into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: None,
            icount: None,
            extra: Vec::new(),
        }
    }
}

/// qemu's words for an entry with more extra data than qemu accepts (the entry's index
/// follows).
const TOO_MUCH_EXTRA: &str = "Too much extra metadata in snapshot table entry";

/// qemu's words for a table longer than qemu accepts.
const TABLE_TOO_BIG: &str = "Snapshot table is too big";

/// Whether `e` (from reading a snapshot table) says the table exceeds one of qemu's limits,
/// which qemu's open refuses with EFBIG and its `check` reports as `File too large`; only
/// `check -r all` can read such a table, by dropping what is over the limit.
pub(crate) fn exceeds_qemu_limits(e: &Error) -> bool {
    e.what().starts_with(TOO_MUCH_EXTRA) || e.what().starts_with(TABLE_TOO_BIG)
}

/// Reads the snapshot table of `img`, checking every entry's bounds.
pub(crate) fn read_table(img: &Qcow2Image) -> Result<Vec<Snapshot>> {
    read_table_with_size(img).map(|(entries, _)| entries)
}

/// Reads the snapshot table of `img` like [`read_table`], also returning the table's length
/// in bytes (up to the end of the last entry, without its padding). While a repair holds a
/// table it read with [`read_table_repairing`], that table is returned.
pub(crate) fn read_table_with_size(img: &Qcow2Image) -> Result<(Vec<Snapshot>, u64)> {
    if let Some((entries, bytes)) = &img.snapshot_override {
        return Ok((entries.clone(), *bytes));
    }
    read_entries(img, None)
}

/// A snapshot table as `check -r all` reads it ([`read_table_repairing`]).
#[derive(Debug, Default)]
pub(crate) struct RepairedTable {
    /// The entries kept.
    pub entries: Vec<Snapshot>,
    /// The table's size in bytes as read (up to the end of the last entry kept, with the
    /// whole extra data of entries whose extra data was cut).
    pub bytes: u64,
    /// What was discarded, in qemu's words.
    pub messages: Vec<String>,
    /// Corruptions fixed, as qemu counts them.
    pub fixed: u64,
    /// Whether some entry's extra data was cut (the table must then be written anew; when
    /// entries were only discarded, the header's count is lowered in place, as qemu does).
    pub extra_cut: bool,
}

/// Reads the snapshot table as qemu's `check -r all` does: extra data past 1024 bytes is
/// dropped (the first 1024 bytes are kept, and the entry's id and name are still read after
/// the whole extra data), entries that end past qemu's 64 MiB table limit (measured as qemu
/// would write the table: extra data cut, entries padded) are discarded with every entry
/// after them, and what lies past the end of the file reads as zeros.
pub(crate) fn read_table_repairing(img: &Qcow2Image) -> Result<RepairedTable> {
    let mut t = RepairedTable::default();
    let (entries, bytes) = read_entries(img, Some(&mut t))?;
    t.entries = entries;
    t.bytes = bytes;
    Ok(t)
}

fn read_entries(
    img: &Qcow2Image,
    mut repair: Option<&mut RepairedTable>,
) -> Result<(Vec<Snapshot>, u64)> {
    let h = img.header();
    let n = h.nb_snapshots;
    let mut out = Vec::with_capacity(n.min(1024) as usize);
    let mut off = h.snapshots_offset;
    let mut end = off;
    let mut table_len = 0u64;
    let end_limit = h.snapshots_offset.saturating_add(MAX_TABLE_BYTES);
    // What lies past the end of the file reads as zeros, as in qemu (which opens an image
    // whose table lies there, and refuses only to add a snapshot to a full one).
    let read = |buf: &mut [u8], at: u64| -> Result<()> {
        if at.saturating_add(buf.len() as u64) > QEMU_MAX_OFFSET {
            return Err(Error::corrupt(
                "Failed to read snapshot table: the entry lies beyond the largest offset that can be read",
            )
            .at(at));
        }
        let avail = img.file_len().saturating_sub(at).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail > 0 {
            img.storage()
                .read_at(&mut buf[..avail], at)
                .map_err(|e| Error::io("cannot read snapshot table", e).at(at))?;
        }
        Ok(())
    };
    for i in 0..n {
        let repairing = repair.is_some();
        let mut fixed = [0u8; 40];
        if !repairing && off.checked_add(40).is_none_or(|e| e > end_limit) {
            return Err(Error::corrupt(format!(
                "snapshot table entry {i} lies beyond the end of the table"
            ))
            .at(off));
        }
        read(&mut fixed, off)?;
        let l1_table_offset = BigEndian::read_u64(&fixed[0..8]);
        let l1_size = BigEndian::read_u32(&fixed[8..12]);
        let id_len = u64::from(BigEndian::read_u16(&fixed[12..14]));
        let name_len = u64::from(BigEndian::read_u16(&fixed[14..16]));
        let extra_size = BigEndian::read_u32(&fixed[36..40]);
        let mut kept_extra = extra_size;
        if extra_size > MAX_EXTRA {
            match repair.as_deref_mut() {
                Some(t) => {
                    t.messages.push(format!(
                        "Discarding too much extra metadata in snapshot table entry {i} ({extra_size} > {MAX_EXTRA})"
                    ));
                    t.fixed += 1;
                    t.extra_cut = true;
                    kept_extra = MAX_EXTRA;
                }
                None => {
                    return Err(Error::corrupt(format!(
                        "{TOO_MUCH_EXTRA} {i}\nYou can force-remove this extra metadata with qemu-img check -r all"
                    ))
                    .while_opening())
                }
            }
        }
        let var = u64::from(extra_size) + id_len + name_len;
        // qemu's limit applies to the table as it would write it (extra data cut, each entry
        // padded to 8 bytes); the table in use still spans the whole extra data.
        table_len = table_len.div_ceil(8) * 8 + 40 + u64::from(kept_extra) + id_len + name_len;
        if let Some(t) = repair.as_deref_mut() {
            if table_len > MAX_TABLE_BYTES {
                t.messages.push(format!(
                    "Discarding {} overhanging snapshots (snapshot table is too big)",
                    n - i
                ));
                t.fixed += u64::from(n - i);
                break;
            }
        } else if table_len > MAX_TABLE_BYTES {
            return Err(Error::corrupt(format!(
                "{TABLE_TOO_BIG}\nYou can force-remove all {} overhanging snapshots with qemu-img check -r all",
                n - i
            ))
            .while_opening());
        } else if off.checked_add(40 + var).is_none_or(|e| e > end_limit) {
            // The padding after the last entry does not count: bound the entry itself.
            return Err(Error::corrupt(format!(
                "snapshot table entry {i} lies beyond the end of the table"
            ))
            .at(off));
        }
        let entry_len = (40 + var).div_ceil(8) * 8;
        let mut extra = vec![0u8; kept_extra as usize];
        read(&mut extra, off + 40)?;
        let mut names = vec![0u8; (id_len + name_len) as usize];
        read(&mut names, off + 40 + u64::from(extra_size))?;
        // qemu's ids and names are C strings: they end at the first NUL byte.
        let text = |b: &[u8]| {
            let b = &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())];
            String::from_utf8_lossy(b).into_owned()
        };
        let id = text(&names[..id_len as usize]);
        let name = text(&names[id_len as usize..]);
        let vm_state_32 = u64::from(BigEndian::read_u32(&fixed[32..36]));
        let extra_u64 =
            |o: usize| (extra.len() >= o + 8).then(|| BigEndian::read_u64(&extra[o..o + 8]));
        out.push(Snapshot {
            entry_offset: off,
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: BigEndian::read_u32(&fixed[16..20]),
            date_nsec: BigEndian::read_u32(&fixed[20..24]),
            vm_clock_nsec: BigEndian::read_u64(&fixed[24..32]),
            vm_state_size: extra_u64(0).unwrap_or(vm_state_32),
            disk_size: extra_u64(8),
            icount: extra_u64(16).filter(|&c| c != u64::MAX),
            extra,
        });
        end = off + 40 + var;
        off += entry_len;
    }
    Ok((out, end - h.snapshots_offset))
}
