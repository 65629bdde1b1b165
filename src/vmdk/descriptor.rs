//! The text descriptor of a VMDK disk: its keys (`CID`, `parentCID`, `createType`,
//! `parentFileNameHint`), its extent lines, and the descriptor qemu writes for a new disk.
//!
//! The keys are found as qemu finds them: the first occurrence of the key's name anywhere in
//! the text (qemu's `strstr`), the value after `=` (hexadecimal for the CIDs, in quotes for the
//! others). Extent lines are scanned as qemu's `sscanf` pattern scans them
//! (`ACCESS SECTORS TYPE "FILE" [OFFSET]`): lines that are not read-write or name a type qemu
//! does not open are skipped, as qemu skips them (so `RDONLY`, `NOACCESS` and `ZERO` extents
//! add nothing to the disk), and a malformed line of a known shape is refused with qemu's words.

use crate::error::{Error, Result};

/// The most bytes of a descriptor qemu reads (`vmdk_read_desc`: 1 MiB minus one).
pub const MAX_DESC_LEN: usize = (1 << 20) - 1;
/// The bytes of an embedded descriptor qemu reads for its CIDs and parent (20 sectors).
pub const DESC_SIZE: usize = 20 * 512;

/// One extent line, as scanned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// `RW` (other lines are skipped).
    pub access: String,
    /// Size in sectors.
    pub sectors: u64,
    /// `SPARSE`, `FLAT`, `VMFS`, `VMFSSPARSE` or `SESPARSE`.
    pub kind: String,
    /// The extent's file name, as written.
    pub file: String,
    /// Where a flat extent's data starts in its file, in sectors.
    pub flat_offset: u64,
}

/// The text of `bytes` up to its first NUL (qemu reads descriptors as C strings).
pub fn c_str(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == 0) {
        Some(n) => &bytes[..n],
        None => bytes,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The quoted value of `name` (qemu's `vmdk_parse_description`: the first occurrence of
/// the name, then two characters (`="`), then up to the next quote); `None` if absent,
/// unterminated, or not shorter than `max`.
pub fn quoted_value(desc: &[u8], name: &str, max: usize) -> Option<String> {
    let at = find(desc, name.as_bytes())? + name.len() + 2;
    if at >= desc.len() {
        return None;
    }
    let rest = &desc[at..];
    let end = rest.iter().position(|&b| b == b'"')?;
    if end + 1 > max {
        return None;
    }
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// `CID` (or with `parent` `parentCID`): after the first occurrence of the name and one more
/// character, a hexadecimal number (qemu's `vmdk_read_cid`).
pub fn cid(desc: &[u8], parent: bool) -> Option<u32> {
    let name: &[u8] = if parent { b"parentCID" } else { b"CID" };
    let at = find(desc, name)? + name.len() + 1;
    let mut s = Scanner {
        b: desc.get(at..).unwrap_or(&[]),
        i: 0,
    };
    s.hex().map(|v| v as u32)
}

/// `parentFileNameHint`, if the descriptor names a parent: `Err` for a hint qemu refuses
/// (unterminated, or longer than its 4095-byte buffer).
pub fn parent_hint(desc: &[u8]) -> Result<Option<String>> {
    let name = b"parentFileNameHint";
    let Some(at) = find(desc, name) else {
        return Ok(None);
    };
    let bad = || {
        Error::corrupt(
            "Invalid argument: the parentFileNameHint of the descriptor is unterminated or too long",
        )
    };
    let start = at + name.len() + 2;
    let rest = desc.get(start..).ok_or_else(bad)?;
    let end = rest.iter().position(|&b| b == b'"').ok_or_else(bad)?;
    if end > 4095 {
        return Err(bad());
    }
    Ok(Some(String::from_utf8_lossy(&rest[..end]).into_owned()))
}

/// A cursor with `sscanf`'s conversions.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    /// `%Ns`.
    fn word(&mut self, max: usize) -> Option<String> {
        self.skip_ws();
        let start = self.i;
        while self.i < self.b.len() && !self.b[self.i].is_ascii_whitespace() && self.i - start < max
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.b[start..self.i]).into_owned())
    }

    /// `%ld` (saturating).
    fn int(&mut self) -> Option<i64> {
        self.skip_ws();
        let mut neg = false;
        if self.i < self.b.len() && (self.b[self.i] == b'-' || self.b[self.i] == b'+') {
            neg = self.b[self.i] == b'-';
            self.i += 1;
        }
        let start = self.i;
        let mut v: i64 = 0;
        while self.i < self.b.len() && self.b[self.i].is_ascii_digit() {
            v = v
                .saturating_mul(10)
                .saturating_add((self.b[self.i] - b'0') as i64);
            self.i += 1;
        }
        (self.i > start).then_some(if neg { -v } else { v })
    }

    /// `%x`.
    fn hex(&mut self) -> Option<u64> {
        self.skip_ws();
        if self.b[self.i..].starts_with(b"0x") || self.b[self.i..].starts_with(b"0X") {
            self.i += 2;
        }
        let start = self.i;
        let mut v: u64 = 0;
        while self.i < self.b.len() && self.b[self.i].is_ascii_hexdigit() {
            let d = (self.b[self.i] as char).to_digit(16).unwrap_or(0) as u64;
            v = v.wrapping_mul(16).wrapping_add(d);
            self.i += 1;
        }
        (self.i > start).then_some(v)
    }

    /// A literal character after optional white space.
    fn lit(&mut self, c: u8, skip: bool) -> bool {
        if skip {
            self.skip_ws();
        }
        if self.i < self.b.len() && self.b[self.i] == c {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// `%N[^\n\r"]`.
    fn name(&mut self, max: usize) -> Option<String> {
        let start = self.i;
        while self.i < self.b.len()
            && !matches!(self.b[self.i], b'\n' | b'\r' | b'"')
            && self.i - start < max
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.b[start..self.i]).into_owned())
    }
}

/// The extent lines qemu opens, in order (see the module documentation).
pub fn extent_lines(desc: &[u8]) -> Result<Vec<ExtentLine>> {
    let mut out = Vec::new();
    let mut p = 0usize;
    while p < desc.len() {
        let line_end = desc[p..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(desc.len(), |n| p + n + 1);
        let mut s = Scanner {
            b: &desc[p..],
            i: 0,
        };
        let mut matches = 0;
        let (mut access, mut sectors, mut kind, mut file, mut offset) =
            (String::new(), 0i64, String::new(), String::new(), -1i64);
        if let Some(a) = s.word(10) {
            access = a;
            matches += 1;
            if let Some(n) = s.int() {
                sectors = n;
                matches += 1;
                if let Some(t) = s.word(10) {
                    kind = t;
                    matches += 1;
                    if s.lit(b'"', true) {
                        if let Some(f) = s.name(511) {
                            file = f;
                            matches += 1;
                            if s.lit(b'"', false) {
                                if let Some(o) = s.int() {
                                    offset = o;
                                    matches += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        let line = &desc[p..line_end];
        p = line_end;
        if matches < 4 || access != "RW" {
            continue;
        }
        let invalid = || {
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            Err(Error::corrupt(format!(
                "Invalid extent line: {}",
                String::from_utf8_lossy(text)
            )))
        };
        match kind.as_str() {
            "FLAT" if matches != 5 || offset < 0 => return invalid(),
            "FLAT" => {}
            "VMFS" if matches == 4 => offset = 0,
            "VMFS" => return invalid(),
            _ if matches != 4 => return invalid(),
            _ => {}
        }
        let known = matches!(
            kind.as_str(),
            "FLAT" | "SPARSE" | "VMFS" | "VMFSSPARSE" | "SESPARSE"
        );
        if sectors <= 0 || !known {
            continue;
        }
        out.push(ExtentLine {
            access,
            sectors: sectors as u64,
            kind,
            file,
            flat_offset: offset.max(0) as u64,
        });
    }
    Ok(out)
}

/// What a new disk's descriptor says (qemu's `vmdk_co_do_create` template).
#[derive(Debug, Clone)]
pub struct NewDescriptor<'a> {
    /// The disk's content ID.
    pub cid: u32,
    /// The parent's CID (`ffffffff` without a parent).
    pub parent_cid: u32,
    /// The subformat's name.
    pub create_type: &'a str,
    /// `parentFileNameHint`, as given.
    pub parent_hint: Option<&'a str>,
    /// The extent lines, each ending with a newline.
    pub extents: &'a str,
    /// `ddb.virtualHWVersion`.
    pub hw_version: &'a str,
    /// The disk size in bytes (the geometry is derived from it).
    pub size: u64,
    /// `ddb.adapterType`.
    pub adapter_type: &'a str,
    /// `ddb.toolsVersion`.
    pub tools_version: &'a str,
}

impl NewDescriptor<'_> {
    /// The descriptor text.
    pub fn render(&self) -> String {
        let heads: u64 = if self.adapter_type == "ide" { 16 } else { 255 };
        let parent = self
            .parent_hint
            .map(|h| format!("parentFileNameHint=\"{h}\""))
            .unwrap_or_default();
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\ncreateType=\"{}\"\n{}\n\
             # Extent description\n{}\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\n\
             ddb.geometry.heads = \"{}\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            self.cid,
            self.parent_cid,
            self.create_type,
            parent,
            self.extents,
            self.hw_version,
            self.size / (63 * heads * 512),
            heads,
            self.adapter_type,
            self.tools_version
        )
    }
}

/// `desc` with its `CID` replaced by `cid`, as qemu's `vmdk_write_cid` rewrites it (the text
/// from `parentCID` on kept), padded with zeros to `desc.len()`; `None` if it has no
/// `parentCID`.
pub fn with_cid(desc: &[u8], cid: u32) -> Option<Vec<u8>> {
    let text = c_str(&desc[..desc.len().saturating_sub(1)]);
    let tail_at = find(text, b"parentCID")?;
    let tail = text[tail_at..].to_vec();
    let mut out = text.to_vec();
    if let Some(at) = find(text, b"CID") {
        let at = at + 4;
        out.truncate(at.min(out.len()));
        out.extend_from_slice(format!("{cid:x}\n").as_bytes());
        out.extend_from_slice(&tail);
    }
    out.truncate(desc.len().saturating_sub(1));
    out.resize(desc.len(), 0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: &[u8] = b"# Disk DescriptorFile\nversion=1\nCID=b37f33d7\nparentCID=ffffffff\n\
createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\nRW 4194304 FLAT \"big-f001.vmdk\" 0\n\
RDONLY 10 FLAT \"ro.vmdk\" 0\nRW 2048 ZERO\nRW 100 SPARSE \"s.vmdk\"\nRW 8 VMFS \"v.vmdk\"\n";

    #[test]
    fn keys_and_extents_are_read_as_qemu_reads_them() {
        assert_eq!(cid(DESC, false), Some(0xb37f33d7));
        assert_eq!(cid(DESC, true), Some(0xffffffff));
        assert_eq!(
            quoted_value(DESC, "createType", 128).as_deref(),
            Some("twoGbMaxExtentFlat")
        );
        assert_eq!(parent_hint(DESC).unwrap(), None);
        let e = extent_lines(DESC).unwrap();
        let names: Vec<_> = e.iter().map(|l| (l.kind.as_str(), l.sectors)).collect();
        assert_eq!(names, [("FLAT", 4194304), ("SPARSE", 100), ("VMFS", 8)]);
    }

    #[test]
    fn malformed_lines_are_refused_in_qemus_words() {
        let e = extent_lines(b"RW 12 FLAT \"a\"\n").unwrap_err();
        assert_eq!(e.what(), "Invalid extent line: RW 12 FLAT \"a\"");
        assert!(extent_lines(b"RW 12 SPARSE \"a\" 4\n").is_err());
    }

    #[test]
    fn a_new_cid_keeps_the_rest() {
        let mut d = DESC.to_vec();
        d.resize(DESC_SIZE, 0);
        let n = with_cid(&d, 0x1234).unwrap();
        assert_eq!(n.len(), DESC_SIZE);
        assert_eq!(cid(&n, false), Some(0x1234));
        assert_eq!(cid(&n, true), Some(0xffffffff));
        assert!(find(&n, b"createType=\"twoGbMaxExtentFlat\"").is_some());
    }
}
