//! `--object secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]`: secrets given on the
//! command line, kept by id for the commands that need one (encrypted images name theirs with
//! `encrypt.key-secret=ID`).
//!
//! Only `secret` objects are kept here, and the text of `tls-creds-x509` objects, which the NBD
//! layer loads (`nbd::tls::register_objects`, above this module); qemu's encrypted secrets
//! (`keyid`, `iv`) and other object types are refused with one line.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// The secrets of a command line, by id. Their bytes are zeroed when dropped and never shown
/// (`Debug` lists the ids only).
#[derive(Clone, Default)]
pub struct Secrets {
    /// Zeroed when dropped.
    by_id: BTreeMap<String, zeroize::Zeroizing<Vec<u8>>>,
    /// The `tls-creds-x509` objects, as given.
    tls: Vec<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("ids", &self.by_id.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secrets {
    /// Parses every `--object` argument, in order.
    pub fn from_objects<S: AsRef<str>>(objects: &[S]) -> Result<Self> {
        let mut s = Secrets::default();
        for o in objects {
            s.add(o.as_ref())?;
        }
        Ok(s)
    }

    /// Parses one `--object` argument and keeps the secret it defines (a `tls-creds-x509`
    /// object is kept as text: see [`Secrets::tls_objects`]).
    pub fn add(&mut self, object: &str) -> Result<()> {
        let ty = object.split(',').next().unwrap_or_default();
        if ty.strip_prefix("qom-type=").unwrap_or(ty) == "tls-creds-x509" {
            self.tls.push(object.to_string());
            return Ok(());
        }
        let (id, value) = parse_object(object)?;
        if self.by_id.contains_key(&id) {
            return Err(Error::invalid_input(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        self.by_id.insert(id, zeroize::Zeroizing::new(value));
        Ok(())
    }

    /// The `tls-creds-x509` objects of the command line, in order, for the NBD layer to load.
    pub fn tls_objects(&self) -> &[String] {
        &self.tls
    }

    /// The secret with this id.
    pub fn get(&self, id: &str) -> Option<&[u8]> {
        self.by_id.get(id).map(|v| v.as_slice())
    }

    /// How many secrets there are.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Parses `secret,id=...,...` into the id and the secret's bytes.
fn parse_object(text: &str) -> Result<(String, Vec<u8>)> {
    let bad = |m: String| Error::invalid_input(m);
    let mut items = split(text).into_iter();
    let first = items.next().unwrap_or_default();
    // The type comes first, alone or as qom-type=TYPE.
    let ty = first
        .strip_prefix("qom-type=")
        .map(str::to_string)
        .unwrap_or(first);
    if ty.is_empty() || ty.contains('=') {
        return Err(bad("Parameter 'qom-type' is missing".into()));
    }
    if ty != "secret" {
        return Err(bad(match ty.as_str() {
            "secret_keyring" | "tls-creds-psk" | "tls-creds-anon" | "iothread" | "authz-simple"
            | "authz-list" | "authz-listfile" | "authz-pam" | "throttle-group" => {
                format!("object type '{ty}' is not supported by vimg (only 'secret' and 'tls-creds-x509' are)")
            }
            _ => format!("invalid object type: {ty}"),
        }));
    }
    let (mut id, mut data, mut file, mut format) = (None, None, None, None);
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            return Err(bad(format!("Invalid parameter '{item}'")));
        };
        match k {
            "id" => id = Some(v.to_string()),
            "data" => data = Some(v.to_string()),
            "file" => file = Some(v.to_string()),
            "format" => format = Some(v.to_string()),
            "keyid" | "iv" => {
                return Err(Error::unsupported(format!(
                    "secret parameter '{k}' (encrypted secrets) is not supported"
                )))
            }
            _ => return Err(bad(format!("Invalid parameter '{k}'"))),
        }
    }
    let id = id.ok_or_else(|| bad("Parameter 'id' is missing".into()))?;
    let raw = match (data, file) {
        (Some(_), Some(_)) => return Err(bad("'data' and 'file' are mutually exclusive".into())),
        (None, None) => return Err(bad("Either 'data' or 'file' must be provided".into())),
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| {
            Error::io(format!("Unable to read {f}"), e).with_path(std::path::Path::new(&f))
        })?,
    };
    let value = match format.as_deref() {
        None | Some("raw") => raw,
        Some("base64") => {
            decode_base64(&raw).ok_or_else(|| bad(format!("secret '{id}': invalid base64 data")))?
        }
        Some(other) => {
            return Err(bad(format!(
                "Parameter 'format' does not accept value '{other}'"
            )))
        }
    };
    Ok((id, value))
}

/// Splits at single commas; `,,` is a comma.
pub(crate) fn split(text: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let last = items.last_mut().expect("never empty");
        if c == ',' && chars.peek() == Some(&',') {
            chars.next();
            last.push(',');
        } else if c == ',' {
            items.push(String::new());
        } else {
            last.push(c);
        }
    }
    items
}

/// Standard base64 (with padding optional, whitespace refused).
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = text.strip_suffix(b"==").or_else(|| text.strip_suffix(b"="));
    let body = body.unwrap_or(text);
    if body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_and_base64() {
        let s = Secrets::from_objects(&[
            "secret,id=a,data=pass,,word",
            "secret,id=b,data=aGVsbG8=,format=base64",
            "qom-type=secret,id=c,data=x",
        ])
        .unwrap();
        assert_eq!(s.get("a"), Some(&b"pass,word"[..]));
        assert_eq!(s.get("b"), Some(&b"hello"[..]));
        assert_eq!(s.get("c"), Some(&b"x"[..]));
        assert_eq!(s.len(), 3);
        // Debug output names the ids, never the secrets.
        let shown = format!("{s:?}");
        // (Bytes would show as numbers: 'p' is 112.)
        assert!(shown.contains("\"a\"") && !shown.contains("112"), "{shown}");
    }

    #[test]
    fn refusals() {
        for bad in [
            "secret,data=x",
            "secret,id=a",
            "secret,id=a,data=x,file=y",
            "secret,id=a,data=x,format=hex",
            "secret,id=a,data=!!,format=base64",
            "secret,id=a,data=x,bogus=1",
            "bogus,id=a",
            "secret,id=a,file=/nonexistent/vimg-secret",
        ] {
            assert!(Secrets::from_objects(&[bad]).is_err(), "{bad}");
        }
        assert!(Secrets::from_objects(&["secret,id=a,data=x", "secret,id=a,data=y"]).is_err());
    }

    #[test]
    fn tls_objects_are_kept_for_the_nbd_layer() {
        let s =
            Secrets::from_objects(&["secret,id=a,data=x", "tls-creds-x509,id=t,dir=/d"]).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.tls_objects(), ["tls-creds-x509,id=t,dir=/d".to_string()]);
    }
}
