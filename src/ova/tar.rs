//! A bounded, checked reader of the members of a tar archive (ustar, with pax extended headers
//! and GNU long names), enough to find the files of an OVA appliance without unpacking it.
//!
//! Hand-written rather than the `tar` crate, which vimg does not depend on: an OVA needs only
//! the member list (name, offset, size), and every field is checked here before use. Each
//! header's checksum must match; a size must be octal (or GNU base-256) and the member must end
//! inside the file; names come from the ustar prefix and name fields, or a pax `path` record or
//! a GNU `L` long name (each bounded); at most [`MAX_MEMBERS`] members are read. Any other
//! damage is a one-line error naming the header's offset.

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Tar's block size.
pub const BLOCK: u64 = 512;
/// The most members read from one archive.
pub const MAX_MEMBERS: usize = 10_000;
/// The largest pax or long-name header read.
const MAX_META: u64 = 1 << 20;

/// One regular file in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name in the archive.
    pub name: String,
    /// Where its data starts in the archive file.
    pub offset: u64,
    /// Its length in bytes.
    pub size: u64,
}

/// Whether the 512-byte block `h` is a tar header whose checksum matches.
pub fn header_checks_out(h: &[u8]) -> bool {
    if h.len() < BLOCK as usize {
        return false;
    }
    let Some(want) = octal(&h[148..156]) else {
        return false;
    };
    let sum: u64 = h[..BLOCK as usize]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    sum == want
}

/// The name a header block gives (ustar prefix `/` name, or the name field).
pub fn header_name(h: &[u8]) -> String {
    let field = |r: std::ops::Range<usize>| {
        let f = &h[r];
        let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
        String::from_utf8_lossy(&f[..end]).into_owned()
    };
    let name = field(0..100);
    if &h[257..262] == b"ustar" {
        let prefix = field(345..500);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// An octal field (NUL- or space-terminated, leading spaces allowed); `None` if it is not one.
fn octal(f: &[u8]) -> Option<u64> {
    let s: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v = 0u64;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// A size field: octal, or GNU base-256 (high bit of the first byte set).
fn size_field(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        if f[0] != 0x80 || f[1..4].iter().any(|&b| b != 0) {
            return None;
        }
        return Some(u64::from_be_bytes(f[4..12].try_into().ok()?));
    }
    octal(f)
}

/// The `path` (and `size`) records of a pax extended header.
fn pax_records(data: &[u8]) -> Result<(Option<String>, Option<u64>)> {
    let bad = || Error::corrupt("malformed pax extended header");
    let (mut path, mut size) = (None, None);
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= rest.len())
            .ok_or_else(bad)?;
        let record = &rest[sp + 1..len];
        let record = record.strip_suffix(b"\n").ok_or_else(bad)?;
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let (k, v) = (&record[..eq], &record[eq + 1..]);
        match k {
            b"path" => path = Some(String::from_utf8_lossy(v).into_owned()),
            b"size" => {
                size = Some(
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(bad)?,
                )
            }
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok((path, size))
}

/// The regular files of the tar archive in `storage` (`len` bytes), in archive order.
pub fn members(storage: &dyn Storage, len: u64) -> Result<Vec<Member>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    let (mut next_name, mut next_size): (Option<String>, Option<u64>) = (None, None);
    let mut h = [0u8; BLOCK as usize];
    loop {
        if at + BLOCK > len {
            if at == len && !out.is_empty() {
                // No end-of-archive blocks: accepted, as GNU tar does with a warning.
                break;
            }
            return Err(Error::corrupt(format!(
                "tar archive truncated: header at offset {at} lies past the end of the file ({len} bytes)"
            )));
        }
        storage
            .read_at(&mut h, at)
            .map_err(|e| Error::io("cannot read the tar archive", e).at(at))?;
        if h.iter().all(|&b| b == 0) {
            break;
        }
        if !header_checks_out(&h) {
            return Err(Error::corrupt(format!(
                "not a tar archive, or damaged: the header at offset {at} has a wrong checksum"
            )));
        }
        let size = size_field(&h[124..136])
            .ok_or_else(|| Error::corrupt(format!("tar header at offset {at}: bad size field")))?;
        let size = match h[156] {
            b'0' | 0 | b'7' => next_size.take().unwrap_or(size),
            _ => size,
        };
        let data = at + BLOCK;
        let end = data
            .checked_add(size)
            .filter(|&e| e <= len)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "tar member '{}' ({size} bytes at offset {data}) lies past the end of the file ({len} bytes)",
                    header_name(&h)
                ))
            })?;
        match h[156] {
            b'x' | b'L' => {
                if size > MAX_META {
                    return Err(Error::corrupt(format!(
                        "tar header at offset {at}: extended header of {size} bytes is too large"
                    )));
                }
                let mut meta = vec![0u8; size as usize];
                storage
                    .read_at(&mut meta, data)
                    .map_err(|e| Error::io("cannot read the tar archive", e).at(data))?;
                if h[156] == b'L' {
                    let n = meta.iter().position(|&b| b == 0).unwrap_or(meta.len());
                    next_name = Some(String::from_utf8_lossy(&meta[..n]).into_owned());
                } else {
                    let (p, s) = pax_records(&meta)
                        .map_err(|e| Error::corrupt(format!("tar header at offset {at}: {e}")))?;
                    next_name = p.or(next_name);
                    next_size = s.or(next_size);
                }
            }
            b'0' | 0 | b'7' => {
                let name = next_name.take().unwrap_or_else(|| header_name(&h));
                if out.len() >= MAX_MEMBERS {
                    return Err(Error::corrupt(format!(
                        "tar archive has more than {MAX_MEMBERS} members"
                    )));
                }
                out.push(Member {
                    name,
                    offset: data,
                    size,
                });
            }
            _ => {
                next_name = None;
                next_size = None;
            }
        }
        at = end.next_multiple_of(BLOCK);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut t = Vec::new();
        for (n, d) in files {
            t.extend(header(n, d.len() as u64, b'0'));
            t.extend(*d);
            t.resize(t.len().next_multiple_of(512), 0);
        }
        t.extend(vec![0u8; 1024]);
        t
    }

    fn list(t: Vec<u8>) -> Result<Vec<Member>> {
        let len = t.len() as u64;
        members(&MemStorage::new(t), len)
    }

    #[test]
    fn members_are_listed_and_damage_refused() {
        let t = archive(&[("vm.ovf", b"<x/>"), ("d.img", &[7u8; 1000])]);
        let m = list(t.clone()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[1].name.as_str(), m[1].offset, m[1].size),
            ("d.img", 1536, 1000)
        );
        let mut bad = t.clone();
        bad[1030] ^= 1; // the second header's name
        let e = list(bad).unwrap_err().to_string();
        assert!(e.contains("wrong checksum"), "{e}");
        let e = list(t[..1800].to_vec()).unwrap_err().to_string();
        assert!(e.contains("lies past the end of the file"), "{e}");
        // A pax path record names the next member.
        let body = " path=long/nm.vmdk\n";
        let rec = format!("{}{body}", body.len() + 2);
        let mut p = header("PaxHeaders/x", rec.len() as u64, b'x');
        p.extend(rec.as_bytes());
        assert_eq!(rec.len(), body.len() + 2);
        p.resize(1024, 0);
        p.extend(archive(&[("short", b"abc")]));
        assert_eq!(list(p).unwrap()[0].name, "long/nm.vmdk");
    }
}
