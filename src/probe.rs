//! Telling image formats apart by their bytes, as qemu's block drivers' probes do.
//!
//! qemu reads the first [`PROBE_LEN`] bytes of a file (zeros past its end) and asks every
//! driver how sure it is that the file is its format; the surest wins, and raw, the least
//! sure, wins only when nobody else claims the file. vimg reads raw and qcow2; every other
//! format qemu probes is recognised here too, so that such an image is refused by name
//! ([`ForeignFormat`]) instead of being taken for a raw disk and its container bytes copied as
//! if they were the guest's.
//!
//! The checks, each written from the format's own definition of its header:
//!
//! | format    | recognised by |
//! |-----------|---------------|
//! | qcow2     | `QFI\xfb`, version (big-endian at 4) other than 1 |
//! | qcow      | `QFI\xfb`, version 1 |
//! | vmdk      | `KDMV` or `COWD` at 0, or a text descriptor: comment lines (`#`) and blank lines (spaces only) before a `version=1`, `2` or `3` line |
//! | vhdx      | `vhdxfile` at 0 |
//! | vpc (VHD) | `conectix` at 0 (dynamic and differencing disks, whose footer copy starts the file); a fixed disk only has the footer, in its last 512 bytes: recognised there when the footer's disk type is "fixed", its checksum is right and its current size is the file's length less the footer (vimg's own check: qemu probes it as raw) |
//! | qed       | `QED\0` at 0 |
//! | parallels | `WithoutFreeSpace` or `WithouFreSpacExt` at 0, version 2 (little-endian at 16) |
//! | bochs     | NUL-terminated `Bochs Virtual HD Image` at 0, `Redolog` at 32, `Growing` at 48, version 1.0 or 2.0 (little-endian at 64) |
//! | luks      | `LUKS\xba\xbe` at 0, version 1 (big-endian at 6) |
//! | cloop     | the V2.0 shell-script header at 0 (qemu gives it a low score) |
//! | dmg       | a file name ending in `.dmg` (qemu looks at nothing else; low score) |
//! | OVA       | a ustar header (`ustar` at 257, checksum right) whose member name ends in `.ovf` (after a pax or long-name header): vimg's own, qemu reads the tar as raw; its disk is read ([`crate::ova`]) |
//!
//! The fixed-VHD check is vimg's own: qemu probes a fixed VHD as raw (its reads then include
//! the 512-byte footer as the disk's last sector, a disk 512 bytes too large). vimg reads such a
//! file as vpc, saying so on stderr ([`crate::open::probe_format_with`]); a file whose footer
//! checks out but whose size does not match is refused, naming `-f vpc` and `-f raw`. An empty
//! file is raw, as in qemu.

pub use crate::foreign::ForeignFormat;
use crate::format::ImageFormat;
pub use crate::format::ProbeInput;
use std::path::Path;

/// How many bytes from the start of a file the probe looks at (qemu's `BLOCK_PROBE_BUF_SIZE`).
pub const PROBE_LEN: usize = 2048;

/// The length of a VHD footer, found at the end of every VHD file.
pub const VHD_FOOTER_LEN: usize = 512;

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// A format vimg reads.
    Supported(ImageFormat),
    /// A format qemu reads and vimg does not.
    Foreign(ForeignFormat),
    /// An OVA appliance: a tar archive whose first member is an OVF descriptor; its disk is
    /// opened through the `ova:` locator ([`crate::ova`]).
    Ova,
    /// A file ending with a fixed VHD's footer: qemu probes it as raw. When the footer's
    /// current size is the file's length less the footer (`size_matches`), vimg reads it as
    /// vpc (and says so); otherwise it makes the user say which (`-f vpc` for the disk, `-f raw`
    /// for the file's bytes).
    FixedVhd {
        /// The footer's current size plus the footer is the file's length.
        size_matches: bool,
    },
}

/// Finds the format of a file from `input`. Never fails: what nothing claims is raw.
pub fn probe(input: &ProbeInput<'_>) -> Probed {
    let mut buf = [0u8; PROBE_LEN];
    let n = input.head.len().min(PROBE_LEN);
    buf[..n].copy_from_slice(&input.head[..n]);
    let b = &buf[..];
    // Every registered format is asked, with the head padded with zeros as qemu reads it; the
    // surest wins (the first listed on a tie), and raw, which claims everything with the
    // lowest score, wins only when nobody else claims the file.
    let padded = ProbeInput { head: b, ..*input };
    let (score, best) = ImageFormat::all()
        .map(|f| (f.driver().probe(&padded), f))
        .fold(
            (0, None),
            |acc, (sc, f)| if sc > acc.0 { (sc, Some(f)) } else { acc },
        );
    let best = best.unwrap_or(ImageFormat::Raw);
    if input.len == 0 || score >= 100 {
        return Probed::Supported(best);
    }
    if crate::ova::is_appliance(input.head) {
        return Probed::Ova;
    }
    // The foreign formats qemu is sure of (score 100); their magics exclude each other and the
    // registered formats'.
    let sure = [
        (
            b.starts_with(b"QFI\xfb") && be32(b, 4) == 1,
            ForeignFormat::Qcow,
        ),
        (is_vmdk(b), ForeignFormat::Vmdk),
        (b.starts_with(b"QED\0"), ForeignFormat::Qed),
        (is_parallels(b), ForeignFormat::Parallels),
        (is_bochs(b), ForeignFormat::Bochs),
        (
            b.starts_with(b"LUKS\xba\xbe") && be16(b, 6) == 1,
            ForeignFormat::Luks,
        ),
    ];
    if let Some((_, f)) = sure.iter().find(|(hit, _)| *hit) {
        return Probed::Foreign(*f);
    }
    // The formats qemu only guesses at (score 2), then vimg's fixed-VHD footer check.
    if b.starts_with(CLOOP_V2_HEADER) {
        return Probed::Foreign(ForeignFormat::Cloop);
    }
    if input
        .name
        .is_some_and(|n| n.len() > 4 && n.ends_with(".dmg"))
    {
        return Probed::Foreign(ForeignFormat::Dmg);
    }
    if let Some(tail) = input.tail.filter(|t| is_fixed_vhd_footer(t)) {
        let current_size = u64::from_be_bytes(tail[48..56].try_into().unwrap_or([0xff; 8]));
        return Probed::FixedVhd {
            size_matches: current_size.checked_add(VHD_FOOTER_LEN as u64) == Some(input.len),
        };
    }
    Probed::Supported(best)
}

/// The first lines of a cloop V2.0 image.
const CLOOP_V2_HEADER: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A binary VMDK (sparse extent: `KDMV`; ESX's `COWD`) or a text descriptor: lines that are
/// comments (`#`) or blank (spaces, maybe a `\r`) before a `version=1|2|3` line.
pub fn is_vmdk(b: &[u8]) -> bool {
    if b.starts_with(b"KDMV") || b.starts_with(b"COWD") {
        return true;
    }
    let mut p = 0;
    while p < b.len() {
        match b[p] {
            b'#' => {
                // A comment: skip to just past the end of the line.
                p += b[p..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .unwrap_or(b.len() - p)
                    + 1;
            }
            b' ' => {
                while p < b.len() && b[p] == b' ' {
                    p += 1;
                }
                if p < b.len() && b[p] == b'\r' {
                    p += 1;
                }
                if p >= b.len() || b[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &b[p..];
                return [b"1", b"2", b"3"].iter().any(|v| {
                    let line = |end: &[u8]| [&b"version="[..], &v[..], end].concat();
                    rest.starts_with(&line(b"\n")) || rest.starts_with(&line(b"\r\n"))
                });
            }
        }
    }
    false
}

/// A Parallels header: one of its two magics and version 2.
fn is_parallels(b: &[u8]) -> bool {
    (b.starts_with(b"WithoutFreeSpace") || b.starts_with(b"WithouFreSpacExt")) && le32(b, 16) == 2
}

/// A Bochs growing redolog header (version 1.0 or 2.0). The strings are C strings in
/// fixed-size fields: each must end with a NUL inside its field.
fn is_bochs(b: &[u8]) -> bool {
    let field = |at: usize, len: usize, s: &[u8]| {
        let f = &b[at..at + len];
        f.starts_with(s) && f.get(s.len()) == Some(&0)
    };
    field(0, 32, b"Bochs Virtual HD Image")
        && field(32, 16, b"Redolog")
        && field(48, 16, b"Growing")
        && matches!(le32(b, 64), 0x0001_0000 | 0x0002_0000)
}

/// A fixed VHD's footer (the last 512 bytes of the file): the `conectix` cookie, disk type 2
/// (fixed) and a checksum (the ones' complement of the byte sum, taken with the checksum field
/// as zeros) that matches. The checksum keeps a raw disk that merely ends with the cookie from
/// being refused.
fn is_fixed_vhd_footer(f: &[u8]) -> bool {
    if f.len() != VHD_FOOTER_LEN || !f.starts_with(b"conectix") || be32(f, 60) != 2 {
        return false;
    }
    let sum: u32 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, &c)| u32::from(c))
        .sum();
    !sum == be32(f, 64)
}

/// Probes the file at `path`: reads its first [`PROBE_LEN`] bytes and its last 512, through
/// `read_at` (positioned reads; bytes past the end read as zeros), given its length `len`.
pub fn probe_storage(
    storage: &dyn crate::storage::Storage,
    len: u64,
    path: &Path,
) -> std::io::Result<Probed> {
    let mut head = [0u8; PROBE_LEN];
    storage.read_at(&mut head, 0)?;
    let mut tail = [0u8; VHD_FOOTER_LEN];
    let has_tail = len >= VHD_FOOTER_LEN as u64;
    if has_tail {
        storage.read_at(&mut tail, len - VHD_FOOTER_LEN as u64)?;
    }
    let name = path.to_str();
    Ok(probe(&ProbeInput {
        head: &head,
        tail: has_tail.then_some(&tail[..]),
        len,
        name,
    }))
}

/// Runs the probe on arbitrary bytes taken as a whole file (with and without a name that
/// ends in `.dmg`): the fuzz target `probe` and its replay in `tests/hostile/hostile.rs`. Never
/// panics; returns nothing.
pub fn exercise(data: &[u8]) {
    let tail = (data.len() >= VHD_FOOTER_LEN).then(|| &data[data.len() - VHD_FOOTER_LEN..]);
    for name in [None, Some("image.dmg")] {
        let _ = probe(&ProbeInput {
            head: data,
            tail,
            len: data.len() as u64,
            name,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> Probed {
        probe(&ProbeInput {
            head: bytes,
            tail: None,
            len: bytes.len().max(1) as u64,
            name: None,
        })
    }

    fn at(mut base: Vec<u8>, off: usize, bytes: &[u8]) -> Vec<u8> {
        if base.len() < off + bytes.len() {
            base.resize(off + bytes.len(), 0);
        }
        base[off..off + bytes.len()].copy_from_slice(bytes);
        base
    }

    const RAW: Probed = Probed::Supported(ImageFormat::Raw);

    fn foreign(f: ForeignFormat) -> Probed {
        Probed::Foreign(f)
    }

    #[test]
    fn magics() {
        use ForeignFormat::*;
        assert_eq!(
            head(b"QFI\xfb\0\0\0\x03"),
            Probed::Supported(ImageFormat::Qcow2)
        );
        assert_eq!(head(b"QFI\xfb\0\0\0\x01"), foreign(Qcow));
        assert_eq!(
            head(b"KDMV\x01\0\0\0"),
            Probed::Supported(ImageFormat::Vmdk)
        );
        assert_eq!(head(b"COWD"), Probed::Supported(ImageFormat::Vmdk));
        assert_eq!(head(b"vhdxfile"), Probed::Supported(ImageFormat::Vhdx));
        assert_eq!(head(b"vhdxfil"), RAW);
        assert_eq!(head(b"conectix"), Probed::Supported(ImageFormat::Vpc));
        assert_eq!(
            head(&at(vec![], 64, &0xbeda107fu32.to_le_bytes())),
            Probed::Supported(ImageFormat::Vdi)
        );
        assert_eq!(head(&at(vec![], 64, &0xbeda107fu32.to_be_bytes())), RAW);
        assert_eq!(head(b"QED\0"), foreign(Qed));
        assert_eq!(head(b"QED\x01"), RAW);
        let par = at(b"WithoutFreeSpace".to_vec(), 16, &2u32.to_le_bytes());
        assert_eq!(head(&par), foreign(Parallels));
        let par2 = at(b"WithouFreSpacExt".to_vec(), 16, &2u32.to_le_bytes());
        assert_eq!(head(&par2), foreign(Parallels));
        assert_eq!(head(&at(par, 16, &3u32.to_le_bytes())), RAW);
        assert_eq!(
            head(b"LUKS\xba\xbe\0\x01"),
            Probed::Supported(ImageFormat::Luks)
        );
        assert_eq!(head(b"LUKS\xba\xbe\0\x02"), RAW);
        assert_eq!(head(CLOOP_V2_HEADER), foreign(Cloop));
        assert_eq!(head(&CLOOP_V2_HEADER[..20]), RAW);
    }

    #[test]
    fn bochs_strings_must_end_inside_their_fields() {
        let good = at(
            at(
                at(
                    at(vec![0; 512], 0, b"Bochs Virtual HD Image"),
                    32,
                    b"Redolog",
                ),
                48,
                b"Growing",
            ),
            64,
            &0x0002_0000u32.to_le_bytes(),
        );
        assert_eq!(head(&good), foreign(ForeignFormat::Bochs));
        let v1 = at(good.clone(), 64, &0x0001_0000u32.to_le_bytes());
        assert_eq!(head(&v1), foreign(ForeignFormat::Bochs));
        assert_eq!(head(&at(good.clone(), 64, &3u32.to_le_bytes())), RAW);
        assert_eq!(head(&at(good.clone(), 39, b"X")), RAW, "Redolog not ended");
        assert_eq!(head(&at(good, 48, b"Undoable")), RAW);
    }

    #[test]
    fn vmdk_descriptors() {
        let vmdk = Probed::Supported(ImageFormat::Vmdk);
        assert_eq!(head(b"# Disk DescriptorFile\nversion=1\n"), vmdk);
        assert_eq!(head(b"#a\r\n   \r\n  \nversion=3\r\nCID=1"), vmdk);
        assert_eq!(head(b"version=2\n"), vmdk);
        assert_eq!(head(b"version=4\n"), RAW);
        assert_eq!(head(b"\nversion=1\n"), RAW, "an empty line ends the search");
        assert_eq!(head(b"  x\nversion=1\n"), RAW);
        assert_eq!(head(b"version=1"), RAW);
        assert_eq!(head(b"# only a comment"), RAW);
        // A comment filling the whole probe buffer.
        assert_eq!(head(&[b'#'; PROBE_LEN]), RAW);
        assert_eq!(head(&[b' '; PROBE_LEN + 10]), RAW);
    }

    fn footer(disk_type: u32, good_sum: bool) -> Vec<u8> {
        let mut f = at(vec![0; 512], 0, b"conectix");
        f = at(f, 60, &disk_type.to_be_bytes());
        f = at(f, 48, &(4u64 << 20).to_be_bytes());
        let sum: u32 = f.iter().map(|&c| u32::from(c)).sum();
        let sum = if good_sum { !sum } else { !sum ^ 1 };
        at(f, 64, &sum.to_be_bytes())
    }

    #[test]
    fn fixed_vhd_by_its_footer_only_when_it_checks_out() {
        let data = [0xabu8; PROBE_LEN];
        let probe_tail = |tail: &[u8]| {
            probe(&ProbeInput {
                head: &data,
                tail: Some(tail),
                len: (4 << 20) + 512,
                name: None,
            })
        };
        assert_eq!(
            probe_tail(&footer(2, true)),
            Probed::FixedVhd { size_matches: true }
        );
        let other_len = probe(&ProbeInput {
            head: &data,
            tail: Some(&footer(2, true)),
            len: 1 << 20,
            name: None,
        });
        assert_eq!(
            other_len,
            Probed::FixedVhd {
                size_matches: false
            }
        );
        assert_eq!(probe_tail(&footer(2, false)), RAW);
        assert_eq!(probe_tail(&footer(3, true)), RAW, "dynamic: header at 0");
        assert_eq!(probe_tail(&[0u8; 512]), RAW);
    }

    #[test]
    fn dmg_by_name_and_magics_first() {
        let named = |h: &[u8], n: &str| {
            probe(&ProbeInput {
                head: h,
                tail: None,
                len: 4096,
                name: Some(n),
            })
        };
        assert_eq!(named(b"", "a/b.dmg"), foreign(ForeignFormat::Dmg));
        assert_eq!(named(b"", ".dmg"), RAW);
        assert_eq!(named(b"", "x.dmg.raw"), RAW);
        assert_eq!(
            named(b"QFI\xfb\0\0\0\x02", "x.dmg"),
            Probed::Supported(ImageFormat::Qcow2)
        );
    }

    #[test]
    fn short_and_empty_files_are_raw() {
        for n in [0usize, 1, 3, 4, 7, 511, 512] {
            let zeros = vec![0u8; n];
            assert_eq!(head(&zeros), RAW, "{n} zeros");
            let ff = vec![0xffu8; n];
            assert_eq!(head(&ff), RAW, "{n} 0xff");
        }
        assert_eq!(
            probe(&ProbeInput {
                head: b"KDMV",
                tail: None,
                len: 0,
                name: Some("e.dmg"),
            }),
            RAW,
            "an empty file is raw whatever its name"
        );
    }

    #[test]
    fn names_round_trip() {
        for f in ForeignFormat::ALL {
            assert_eq!(ForeignFormat::from_name(f.as_str()), Some(f));
            assert!(f.not_supported().to_string().starts_with(f.as_str()));
        }
        assert_eq!(ForeignFormat::from_name("raw"), None);
    }
}
