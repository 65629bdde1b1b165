//! The VHDX metadata log ([MS-VHDX] 2.3): a circular buffer of 4 KiB sectors holding entries
//! (`loge` header, `desc`/`zero` descriptors, `data` sectors) that describe metadata writes.
//! A header with a non-zero log GUID says the log may hold writes not yet applied: they must be
//! replayed before the file is read. qemu replays on a read-write open and refuses a read-only
//! one; vimg does the same ([`Log::find_active`], [`Log::replay`]).
//!
//! vimg also writes through the log, as qemu does, when it changes the BAT ([`entry`]):
//! an entry per batch of BAT sectors, flushed, applied, flushed, then the log GUID cleared.

use super::layout::{guid_at, le32, le64, Crc32c, HEADER_SECTION_END};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// A log sector.
pub const SECTOR: u64 = 4096;
/// Where no log write may land: far past qemu's largest disk (an entry may also grow the file
/// by at most 1 GiB past its length).
const MAX_FILE_END: u64 = 1 << 50;

/// Reads `buf.len()` bytes at `at`, zeros past the end of a `len`-byte file (as qemu reads).
pub fn read_padded(storage: &dyn Storage, buf: &mut [u8], at: u64, len: u64) -> Result<()> {
    let avail = len.saturating_sub(at).min(buf.len() as u64) as usize;
    buf[avail..].fill(0);
    if avail > 0 {
        storage
            .read_at(&mut buf[..avail], at)
            .map_err(|e| Error::io("read failed", e).at(at))?;
    }
    Ok(())
}

/// One descriptor of an entry.
#[derive(Debug, Clone, Copy)]
enum Desc {
    /// Write a data sector: its first 8 and last 4 bytes, where.
    Data {
        leading: [u8; 8],
        trailing: [u8; 4],
        offset: u64,
    },
    /// Write `len` zero bytes at `offset`.
    Zero { len: u64, offset: u64 },
}

/// A valid entry, as read.
#[derive(Debug)]
struct Entry {
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    descs: Vec<Desc>,
    /// The data sectors' payloads (4084 bytes each, in order of the data descriptors).
    data: Vec<Vec<u8>>,
    /// Sectors the entry takes.
    sectors: u64,
}

/// The log as the current header describes it.
pub struct Log<'a> {
    storage: &'a dyn Storage,
    file_len: u64,
    offset: u64,
    length: u64,
    guid: [u8; 16],
}

/// The active sequence found in a log: its entries in order.
#[derive(Debug)]
pub struct Sequence {
    entries: Vec<Entry>,
}

impl Sequence {
    /// The highest sequence number in it.
    pub fn last_sequence(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.sequence)
    }
}

/// Sectors the header and `n` descriptors take.
fn desc_sectors(n: u64) -> u64 {
    (n + 2).div_ceil(128)
}

impl<'a> Log<'a> {
    /// The log at `offset`, `length` bytes long, of log GUID `guid` in a `file_len`-byte file;
    /// checked as qemu checks it (offset and length multiples of 1 MiB, offset past the header
    /// section, version 0).
    pub fn new(
        storage: &'a dyn Storage,
        file_len: u64,
        header: &super::layout::Header,
    ) -> Result<Self> {
        let (offset, length) = (header.log_offset, u64::from(header.log_length));
        if offset < HEADER_SECTION_END || !offset.is_multiple_of(1 << 20) {
            return Err(Error::corrupt(format!("invalid log offset {offset}")));
        }
        if header.log_version != 0 {
            return Err(Error::corrupt(format!(
                "unsupported log version {}",
                header.log_version
            )));
        }
        if !length.is_multiple_of(1 << 20) {
            return Err(Error::corrupt(format!("invalid log length {length}")));
        }
        Ok(Log {
            storage,
            file_len,
            offset,
            length,
            guid: header.log_guid,
        })
    }

    /// Whether the header says the log may hold entries (non-zero GUID and length).
    pub fn present(&self) -> bool {
        self.guid != [0; 16] && self.length != 0
    }

    fn read_sector(&self, idx: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; SECTOR as usize];
        let at = self.offset + (idx % (self.length / SECTOR)) * SECTOR;
        read_padded(self.storage, &mut b, at, self.file_len)?;
        Ok(b)
    }

    /// The entry starting at sector `idx` if it is valid (header, descriptors, data sectors and
    /// checksum) and, with `prev`, numbered `prev + 1`; otherwise the sectors to skip, as qemu's
    /// search skips them: one past a bad header, the whole entry past a bad checksum.
    fn entry_at(&self, idx: u64, prev: Option<u64>) -> Result<std::result::Result<Entry, u64>> {
        let total = self.length / SECTOR;
        let h = self.read_sector(idx)?;
        let entry_length = u64::from(le32(&h, 8));
        let sequence = le64(&h, 16);
        let count = u64::from(le32(&h, 24));
        if &h[..4] != b"loge"
            || entry_length > self.length
            || !entry_length.is_multiple_of(SECTOR)
            || sequence == 0
            || guid_at(&h, 32) != self.guid
            || count * 32 > entry_length
            || prev.is_some_and(|p| sequence != p.wrapping_add(1))
        {
            return Ok(Err(1));
        }
        let nd = desc_sectors(count);
        let sectors = (entry_length / SECTOR).max(nd);
        // An entry lies in the log and in the file (what is read is bounded by the file).
        if sectors > total || sectors * SECTOR > self.file_len {
            return Ok(Err(1));
        }
        let mut crc = Crc32c::default();
        let mut descs = Vec::with_capacity(count as usize);
        let mut raw_descs = Vec::with_capacity((nd * SECTOR) as usize);
        for i in 0..nd {
            let s = if i == 0 {
                h.clone()
            } else {
                self.read_sector(idx + i)?
            };
            raw_descs.extend_from_slice(&s);
        }
        let mut first = raw_descs[..SECTOR as usize].to_vec();
        first[4..8].fill(0);
        crc.update(&first);
        crc.update(&raw_descs[SECTOR as usize..]);
        for i in 0..count as usize {
            let d = &raw_descs[64 + i * 32..96 + i * 32];
            let offset = le64(d, 16);
            if le64(d, 24) != sequence || !offset.is_multiple_of(SECTOR) {
                return Ok(Err(sectors));
            }
            descs.push(match &d[..4] {
                b"desc" => Desc::Data {
                    trailing: d[4..8].try_into().unwrap_or([0; 4]),
                    leading: d[8..16].try_into().unwrap_or([0; 8]),
                    offset,
                },
                b"zero" if le64(d, 8).is_multiple_of(SECTOR) => Desc::Zero {
                    len: le64(d, 8),
                    offset,
                },
                _ => return Ok(Err(sectors)),
            });
        }
        let mut data = Vec::new();
        for i in nd..sectors {
            let s = self.read_sector(idx + i)?;
            crc.update(&s);
            data.push(s);
        }
        if crc.finish() != le32(&h, 4) {
            return Ok(Err(sectors));
        }
        let ndata = descs
            .iter()
            .filter(|d| matches!(d, Desc::Data { .. }))
            .count();
        if ndata > data.len() {
            return Ok(Err(sectors));
        }
        let mut payloads = Vec::with_capacity(ndata);
        for s in data.into_iter().take(ndata) {
            let seq = u64::from(le32(&s, 4)) << 32 | u64::from(le32(&s, 4092));
            if &s[..4] != b"data" || seq != sequence {
                return Ok(Err(sectors));
            }
            payloads.push(s[8..4092].to_vec());
        }
        Ok(Ok(Entry {
            sequence,
            flushed_file_offset: le64(&h, 48),
            last_file_offset: le64(&h, 56),
            descs,
            data: payloads,
            sectors,
        }))
    }

    /// Searches the whole log for the active sequence of entries, as qemu does: every run of
    /// valid, consecutively numbered entries is a candidate, and the one whose first entry has
    /// the highest sequence number wins. `None` if there is none.
    pub fn find_active(&self) -> Result<Option<Sequence>> {
        if !self.present() {
            return Ok(None);
        }
        let total = self.length / SECTOR;
        let mut best: Option<Sequence> = None;
        let mut idx = 0u64;
        // Each step moves past at least one sector; a run may wrap once past the end.
        let mut budget = 4 * total + 16;
        // Sectors past the end of the file read as zeros: no entry starts there.
        while idx < total && self.offset + idx * SECTOR < self.file_len {
            let first = match self.entry_at(idx, None)? {
                Ok(e) => e,
                Err(skip) => {
                    idx += skip.max(1);
                    continue;
                }
            };
            let mut pos = idx + first.sectors;
            let mut run = vec![first];
            while budget > 0 {
                budget -= 1;
                let prev = run.last().map(|e| e.sequence);
                match self.entry_at(pos % total, prev)? {
                    Ok(e) => {
                        pos += e.sectors;
                        run.push(e);
                    }
                    Err(_) => break,
                }
            }
            if budget == 0 {
                return Err(Error::corrupt("the log's entries never end"));
            }
            if best
                .as_ref()
                .is_none_or(|b| run[0].sequence > b.entries[0].sequence)
            {
                best = Some(Sequence { entries: run });
            }
            idx = pos;
        }
        Ok(best)
    }

    /// Applies the writes of `seq` to the file, as qemu's replay: data sectors and zeros where
    /// the descriptors say, the file grown to the entry's last file offset (rounded up to 1 MiB)
    /// if it is shorter. Refuses an entry whose flushed file offset lies past the end of the
    /// file (the file was truncated) and writes into the header section or the log itself. The
    /// caller flushes and clears the log GUID afterwards.
    pub fn replay(&self, seq: &Sequence) -> Result<()> {
        let mut len = self.file_len;
        for e in &seq.entries {
            if e.flushed_file_offset > len {
                return Err(Error::corrupt(format!(
                    "log entry {} was written to a {}-byte file, but the file is {len} bytes long: the image has been truncated",
                    e.sequence, e.flushed_file_offset
                )));
            }
            if e.last_file_offset > MAX_FILE_END.min(len.saturating_add(1 << 30)) {
                return Err(Error::corrupt(format!(
                    "log entry {} has an impossible file length {}",
                    e.sequence, e.last_file_offset
                )));
            }
            let limit = len.max(e.last_file_offset.next_multiple_of(1 << 20));
            let mut data = e.data.iter();
            for d in &e.descs {
                let (offset, n) = match d {
                    Desc::Data { offset, .. } => (*offset, SECTOR),
                    Desc::Zero { len, offset } => (*offset, *len),
                };
                let end = offset
                    .checked_add(n)
                    .filter(|&end| end <= limit.max(offset));
                let log_end = self.offset + self.length;
                let bad_target = offset < HEADER_SECTION_END
                    || (offset < log_end && end.is_none_or(|e| e > self.offset))
                    || end.is_none_or(|end| end > MAX_FILE_END);
                if bad_target {
                    return Err(Error::corrupt(format!(
                        "log entry {} writes {n} bytes at offset {offset}, outside the image's metadata",
                        e.sequence
                    )));
                }
                let write = |b: &[u8], at: u64| {
                    self.storage
                        .write_at(b, at)
                        .map_err(|err| Error::io("cannot replay the log", err).at(at))
                };
                match d {
                    Desc::Data {
                        leading, trailing, ..
                    } => {
                        let payload = data
                            .next()
                            .ok_or_else(|| Error::corrupt("log entry lacks a data sector"))?;
                        let mut s = Vec::with_capacity(SECTOR as usize);
                        s.extend_from_slice(leading);
                        s.extend_from_slice(payload);
                        s.extend_from_slice(trailing);
                        write(&s, offset)?;
                    }
                    Desc::Zero { len: n, .. } => {
                        let zeros = vec![0u8; (*n).min(1 << 20) as usize];
                        let mut done = 0;
                        while done < *n {
                            let k = (*n - done).min(zeros.len() as u64);
                            write(&zeros[..k as usize], offset + done)?;
                            done += k;
                        }
                    }
                }
                if let Some(end) = end {
                    len = len.max(end);
                }
            }
            if len < e.last_file_offset {
                let new_len = e.last_file_offset.next_multiple_of(1 << 20);
                self.storage
                    .set_len(new_len)
                    .map_err(|err| Error::io("cannot replay the log", err))?;
                len = new_len;
            }
        }
        Ok(())
    }
}

/// The most sectors one entry may write in a log of `log_length` bytes (one sector of the log
/// stays free, the circular buffer's "full" mark).
pub fn max_sectors(log_length: u64) -> usize {
    let total = log_length / SECTOR;
    let mut n = total.saturating_sub(2);
    while n > 0 && desc_sectors(n) + n + 1 > total {
        n -= 1;
    }
    n.min(4096) as usize
}

/// Builds the log entry numbered `seq` of log GUID `guid` (for a file of `file_len` bytes,
/// at the start of the log) that writes each `(offset, 4 KiB sector)` of `writes` (at most
/// [`max_sectors`] of them).
pub fn entry(writes: &[(u64, Vec<u8>)], seq: u64, guid: [u8; 16], file_len: u64) -> Vec<u8> {
    let count = writes.len() as u64;
    let nd = desc_sectors(count);
    let sectors = nd + count;
    let mut e = vec![0u8; (sectors * SECTOR) as usize];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&((sectors * SECTOR) as u32).to_le_bytes());
    // The tail (the sequence's first entry) is this entry, at the start of the log.
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    e[32..48].copy_from_slice(&guid);
    e[48..56].copy_from_slice(&file_len.to_le_bytes());
    e[56..64].copy_from_slice(&file_len.to_le_bytes());
    for (i, (offset, s)) in writes.iter().enumerate() {
        let d = 64 + i * 32;
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&s[4092..4096]);
        e[d + 8..d + 16].copy_from_slice(&s[..8]);
        e[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        let ds = ((nd + i as u64) * SECTOR) as usize;
        e[ds..ds + 4].copy_from_slice(b"data");
        e[ds + 4..ds + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        e[ds + 8..ds + 4092].copy_from_slice(&s[8..4092]);
        e[ds + 4092..ds + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    super::layout::set_checksum(&mut e, 4);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;
    use crate::vhdx::layout::Header;

    fn header(guid: [u8; 16]) -> Header {
        Header {
            sequence_number: 1,
            file_write_guid: [0; 16],
            data_write_guid: [0; 16],
            log_guid: guid,
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        }
    }

    #[test]
    fn entries_written_are_found_and_replayed() {
        let guid = [7u8; 16];
        let mut file = vec![0u8; 4 << 20];
        let sector: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        let log = entry(
            &[(3 << 20, sector.clone()), (3 << 20 | 8192, sector.clone())],
            1,
            guid,
            4 << 20,
        );
        file[1 << 20..(1 << 20) + log.len()].copy_from_slice(&log);
        let st = MemStorage::new(file);
        let l = Log::new(&st, 4 << 20, &header(guid)).unwrap();
        let seq = l.find_active().unwrap().unwrap();
        assert_eq!(seq.last_sequence(), 1);
        l.replay(&seq).unwrap();
        let mut b = vec![0u8; 4096];
        st.read_at(&mut b, 3 << 20 | 8192).unwrap();
        assert_eq!(b, sector);

        // Another GUID: the entries are not this log's.
        let l = Log::new(&st, 4 << 20, &header([8; 16])).unwrap();
        assert!(l.find_active().unwrap().is_none());
        // A damaged entry is not valid.
        let mut b = [0u8; 1];
        st.read_at(&mut b, (1 << 20) + 5000).unwrap();
        st.write_at(&[b[0] ^ 1], (1 << 20) + 5000).unwrap();
        let l = Log::new(&st, 4 << 20, &header(guid)).unwrap();
        assert!(l.find_active().unwrap().is_none());
    }

    #[test]
    fn entries_larger_than_the_file_are_not_read() {
        // A 4095 MiB log in a 2 MiB file, whose one header claims the whole log.
        let guid = [3u8; 16];
        let mut file = vec![0u8; 2 << 20];
        let h = &mut file[1 << 20..];
        h[..4].copy_from_slice(b"loge");
        h[8..12].copy_from_slice(&0xfff0_0000u32.to_le_bytes());
        h[16..24].copy_from_slice(&1u64.to_le_bytes());
        h[24..28].copy_from_slice(&(0xfff0_0000u32 / 32).to_le_bytes());
        h[32..48].copy_from_slice(&guid);
        let st = MemStorage::new(file);
        let mut hd = header(guid);
        hd.log_length = 0xfff0_0000;
        let l = Log::new(&st, 2 << 20, &hd).unwrap();
        let t = std::time::Instant::now();
        assert!(l.find_active().unwrap().is_none());
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn the_largest_entry_fits_the_log() {
        let n = max_sectors(1 << 20);
        assert!(n > 200);
        let writes: Vec<_> = (0..n as u64).map(|i| (i * 4096, vec![1u8; 4096])).collect();
        assert!(entry(&writes, 1, [1; 16], 0).len() as u64 + SECTOR <= 1 << 20);
    }
}
