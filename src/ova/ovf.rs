//! The part of an OVF descriptor an OVA import needs: the files of its `References` section
//! (`File ovf:id`, `ovf:href`) and the disks of its `DiskSection` (`Disk ovf:diskId`,
//! `ovf:fileRef`, `ovf:capacity`, `ovf:capacityAllocationUnits`).
//!
//! A careful minimal scanner of XML start tags rather than an XML crate (vimg has none): it
//! reads element and attribute names without their namespace prefix, attribute values in
//! single or double quotes with the five predefined entities and numeric character references,
//! and skips comments, processing instructions, CDATA and the document type declaration. Text
//! content is never needed. A malformed tag is a one-line error.

use crate::error::{Error, Result};

/// The largest descriptor read.
pub const MAX_OVF: u64 = 16 << 20;

/// One disk of the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `ovf:diskId`.
    pub id: String,
    /// The archive member holding it (`ovf:href` of the file it names).
    pub href: String,
    /// The capacity the descriptor gives, in bytes, if it gives one.
    pub capacity: Option<u64>,
}

/// A start (or empty-element) tag: its local name and its attributes' local names and values.
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: Vec<(String, String)>,
}

impl Tag {
    fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn local(name: &str) -> &str {
    name.rsplit(':').next().unwrap_or(name)
}

fn malformed(at: usize, what: &str) -> Error {
    Error::corrupt(format!("malformed OVF descriptor at byte {at}: {what}"))
}

fn unescape(v: &str, at: usize) -> Result<String> {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find(';')
            .ok_or_else(|| malformed(at, "unterminated entity"))?;
        let ent = &rest[i + 1..i + end];
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let n = if let Some(h) = ent.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse().ok()
                } else {
                    None
                };
                n.and_then(char::from_u32)
                    .ok_or_else(|| malformed(at, "unknown entity"))?
            }
        };
        out.push(c);
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every start tag of `xml`, in document order.
fn tags(xml: &str) -> Result<Vec<Tag>> {
    let b = xml.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = xml[i..].find('<') {
        let at = i + off;
        let rest = &xml[at..];
        let skip_to = |end: &str| {
            rest.find(end)
                .map(|e| at + e + end.len())
                .ok_or_else(|| malformed(at, "unterminated markup"))
        };
        if rest.starts_with("<!--") {
            i = skip_to("-->")?;
            continue;
        }
        if rest.starts_with("<![CDATA[") {
            i = skip_to("]]>")?;
            continue;
        }
        if rest.starts_with("<?") {
            i = skip_to("?>")?;
            continue;
        }
        if rest.starts_with("<!") || rest.starts_with("</") {
            i = skip_to(">")?;
            continue;
        }
        // A start tag: name, then attributes up to '>' or '/>'.
        let mut p = at + 1;
        let name_end = xml[p..]
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .map(|n| p + n)
            .ok_or_else(|| malformed(at, "unterminated tag"))?;
        let name = local(&xml[p..name_end]).to_string();
        if name.is_empty() {
            return Err(malformed(at, "empty tag name"));
        }
        p = name_end;
        let mut attrs = Vec::new();
        loop {
            while p < b.len() && b[p].is_ascii_whitespace() {
                p += 1;
            }
            match b.get(p) {
                None => return Err(malformed(at, "unterminated tag")),
                Some(b'>') => {
                    p += 1;
                    break;
                }
                Some(b'/') if b.get(p + 1) == Some(&b'>') => {
                    p += 2;
                    break;
                }
                _ => {}
            }
            let eq = xml[p..]
                .find('=')
                .map(|n| p + n)
                .ok_or_else(|| malformed(p, "attribute without a value"))?;
            let key = xml[p..eq].trim();
            if key.is_empty() || key.contains(|c: char| c.is_whitespace() || c == '>') {
                return Err(malformed(p, "bad attribute name"));
            }
            let mut q = eq + 1;
            while q < b.len() && b[q].is_ascii_whitespace() {
                q += 1;
            }
            let quote = match b.get(q) {
                Some(&c @ (b'"' | b'\'')) => c as char,
                _ => return Err(malformed(q, "unquoted attribute value")),
            };
            let close = xml[q + 1..]
                .find(quote)
                .map(|n| q + 1 + n)
                .ok_or_else(|| malformed(q, "unterminated attribute value"))?;
            attrs.push((local(key).to_string(), unescape(&xml[q + 1..close], q)?));
            p = close + 1;
        }
        out.push(Tag { name, attrs });
        i = p;
    }
    Ok(out)
}

/// `ovf:capacity` in bytes, with `ovf:capacityAllocationUnits` (`byte`, `byte * 2^N`, or a
/// product of such factors as `byte * 1024 * 1024`), refused when it is not a number or
/// overflows 64 bits.
fn capacity(disk: &str, value: &str, units: Option<&str>) -> Result<u64> {
    let bad = || {
        Error::corrupt(format!(
            "OVF disk '{disk}': capacity '{value}' ({}) is not a size vimg can read",
            units.unwrap_or("bytes")
        ))
    };
    let mut n: u64 = value.trim().parse().map_err(|_| bad())?;
    if let Some(u) = units {
        let mut parts = u.split('*').map(str::trim);
        if parts.next() != Some("byte") {
            return Err(bad());
        }
        for f in parts {
            let mult = match f.split_once('^') {
                Some((base, exp)) => {
                    let base: u64 = base.trim().parse().map_err(|_| bad())?;
                    let exp: u32 = exp.trim().parse().map_err(|_| bad())?;
                    base.checked_pow(exp).ok_or_else(bad)?
                }
                None => f.parse().map_err(|_| bad())?,
            };
            n = n.checked_mul(mult).ok_or_else(bad)?;
        }
    }
    Ok(n)
}

/// The disks the descriptor `xml` declares, in its order, each with the archive member it is
/// in. A disk naming a file the descriptor lacks is refused.
pub fn disks(xml: &str) -> Result<Vec<Disk>> {
    let tags = tags(xml)?;
    let files: Vec<(&str, &str)> = tags
        .iter()
        .filter(|t| t.name == "File")
        .filter_map(|t| Some((t.get("id")?, t.get("href")?)))
        .collect();
    let mut out = Vec::new();
    for t in tags.iter().filter(|t| t.name == "Disk") {
        let id = t
            .get("diskId")
            .ok_or_else(|| Error::corrupt("OVF Disk element without ovf:diskId"))?;
        let Some(file_ref) = t.get("fileRef") else {
            // A blank disk the appliance creates at import: nothing to read.
            continue;
        };
        let href = files
            .iter()
            .find(|(fid, _)| *fid == file_ref)
            .map(|(_, h)| h.to_string())
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "OVF disk '{id}' names file '{file_ref}', which the References section lacks"
                ))
            })?;
        let capacity = t
            .get("capacity")
            .map(|c| capacity(id, c, t.get("capacityAllocationUnits")))
            .transpose()?;
        out.push(Disk {
            id: id.to_string(),
            href,
            capacity,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF: &str = r#"<?xml version="1.0"?>
<!-- made by hand -->
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="disk1.vmdk" ovf:id="file1" ovf:size="123"/>
    <ovf:File ovf:id='file2' ovf:href="a&amp;b.qcow2"></ovf:File>
  </References>
  <DiskSection><Info>Disks</Info>
    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1"/>
    <Disk ovf:capacity="1048576" ovf:diskId="vmdisk2" ovf:fileRef="file2" />
    <Disk ovf:capacity="1" ovf:diskId="blank" />
  </DiskSection>
</Envelope>"#;

    #[test]
    fn disks_and_their_files() {
        let d = disks(OVF).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].id.as_str(), d[0].href.as_str(), d[0].capacity),
            ("vmdisk1", "disk1.vmdk", Some(16 << 30))
        );
        assert_eq!(
            (d[1].href.as_str(), d[1].capacity),
            ("a&b.qcow2", Some(1 << 20))
        );
    }

    #[test]
    fn damage_is_refused() {
        let e = disks(&OVF.replace("\"file2\" />", "\"nope\" />"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("names file 'nope'"), "{e}");
        let e = disks(&OVF.replace("2^30", "2^70")).unwrap_err().to_string();
        assert!(e.contains("is not a size"), "{e}");
        let e = disks(&OVF.replace("\"16\"", "\"99999999999999999999\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a size"), "{e}");
        assert!(disks("<Disk ovf:diskId=\"x").is_err());
        assert!(disks("<a b=c>").is_err());
        assert!(disks("<a b=\"&bogus;\">").is_err());
        assert_eq!(disks("").unwrap(), vec![]);
    }
}
