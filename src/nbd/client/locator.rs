//! The names of NBD exports as qemu takes them: `nbd://HOST[:PORT][/EXPORT]`,
//! `nbd+tcp://...`, `nbd+unix:///EXPORT?socket=PATH`, the legacy `nbd:HOST:PORT[:exportname=E]`
//! and `nbd:unix:PATH[:exportname=E]`, and the options of qemu's `nbd` driver (`server.type`,
//! `server.host`, `server.port`, `server.path`, `export`, `x-dirty-bitmap`, `tls-creds`,
//! `tls-hostname`), and libnbd's TLS URIs `nbds://...?tls-certificates=DIR[&tls-hostname=H]`
//! and `nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR` (qemu has no TLS URI; the CA
//! directory is required, as vimg reads no system CA store).
//!
//! Every spelling is brought to qemu's one ([`NbdLocator::url`]): `nbd://HOST:PORT/EXPORT`
//! (the port always written) or `nbd+unix:///EXPORT?socket=PATH`, the name qemu-img prints
//! for the export and the locator vimg carries.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// NBD's registered TCP port, used when a name gives none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Server {
    /// A TCP host and port.
    Inet {
        /// The host name or address (an IPv6 address without brackets).
        host: String,
        /// The port.
        port: u16,
    },
    /// A unix socket.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

/// One NBD export, and what vimg asks of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdLocator {
    /// The server.
    pub server: Server,
    /// The export's name (empty: the server's default export).
    pub export: String,
    /// qemu's `x-dirty-bitmap` option: a meta context (`qemu:dirty-bitmap:NAME`) whose
    /// extents block status reports instead of `base:allocation`'s (dirty as unallocated).
    pub dirty_bitmap: Option<String>,
    /// qemu's `tls-creds`: the id of the `tls-creds-x509` object to start TLS with.
    pub tls_creds: Option<String>,
    /// qemu's `tls-hostname`: the name the server's certificate must carry (the host by
    /// default).
    pub tls_hostname: Option<String>,
    /// libnbd's `nbds://...?tls-certificates=DIR`: TLS with the certificates of DIR (named as
    /// in a `tls-creds-x509` directory).
    pub tls_certificates: Option<PathBuf>,
}

impl fmt::Display for NbdLocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

/// Why a name that is an NBD name cannot be used, in qemu's words where it has them.
pub type ParseError = String;

/// Whether `name` is spelt as an NBD name (its scheme or prefix), valid or not.
pub fn is_nbd_name(name: &str) -> bool {
    name.starts_with("nbd://")
        || name.starts_with("nbd+tcp://")
        || name.starts_with("nbd+unix://")
        || name.starts_with("nbd:")
        || name.starts_with("nbds://")
        || name.starts_with("nbds+tcp://")
        || name.starts_with("nbds+unix://")
}

/// Decodes `%XX` escapes (as qemu's URI parser does for the path and query).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Escapes what would be read back as URL syntax in an export name.
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl NbdLocator {
    /// Parses an NBD name; `None` if `name` is not one.
    pub fn parse(name: &str) -> Option<Result<Self, ParseError>> {
        if !is_nbd_name(name) {
            return None;
        }
        Some(if name.contains("://") {
            Self::parse_url(name).ok_or_else(|| "No valid URL specified".to_string())
        } else {
            Self::parse_legacy(name)
        })
    }

    fn parse_url(name: &str) -> Option<Self> {
        let (scheme, rest) = name.split_once("://")?;
        let (unix, tls) = match scheme {
            "nbd" | "nbd+tcp" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" | "nbds+tcp" => (false, true),
            "nbds+unix" => (true, true),
            _ => return None,
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return None;
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))?;
        // The query: `socket=` for a unix socket; libnbd's `tls-certificates=` and
        // `tls-hostname=` for nbds.
        let (mut socket, mut certs, mut hostname) = (None, None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=')?;
            let v = percent_decode(v)?;
            match k {
                "socket" if unix => socket = Some(v),
                "tls-certificates" if tls => certs = Some(PathBuf::from(v)),
                "tls-hostname" if tls => hostname = Some(v),
                _ => return None,
            }
        }
        if tls && certs.is_none() {
            // vimg does not read the system's CA store: the CA must be named.
            return None;
        }
        let server = if unix {
            if !authority.is_empty() {
                return None;
            }
            Server::Unix {
                path: PathBuf::from(socket?),
            }
        } else {
            let (host, port) = split_host_port(authority)?;
            if host.is_empty() {
                return None;
            }
            Server::Inet { host, port }
        };
        Some(NbdLocator {
            server,
            export,
            dirty_bitmap: None,
            tls_creds: None,
            tls_hostname: hostname,
            tls_certificates: certs,
        })
    }

    fn parse_legacy(name: &str) -> Result<Self, ParseError> {
        let rest = name.strip_prefix("nbd:").unwrap_or(name);
        let (spec, export) = match rest.find(":exportname=") {
            Some(i) => (&rest[..i], rest[i + ":exportname=".len()..].to_string()),
            None => (rest, String::new()),
        };
        let server = if let Some(path) = spec.strip_prefix("unix:") {
            Server::Unix {
                path: PathBuf::from(path),
            }
        } else {
            let (host, port) = split_host_port(spec)
                .filter(|(h, _)| !h.is_empty())
                .ok_or_else(|| format!("address '{spec}' is not host:port"))?;
            Server::Inet { host, port }
        };
        Ok(NbdLocator {
            server,
            export,
            dirty_bitmap: None,
            tls_creds: None,
            tls_hostname: None,
            tls_certificates: None,
        })
    }

    /// The export the options of qemu's `nbd` driver name (`server.type` with
    /// `server.host`/`server.port` or `server.path`, `export`, `x-dirty-bitmap`, or a
    /// `filename` that is an NBD name, or the legacy `host`/`port`/`path`); `keys` are
    /// the option names without their prefix. Unknown options are refused in qemu's words.
    pub fn from_options(opts: &BTreeMap<String, String>) -> Result<Self, ParseError> {
        let get = |k: &str| opts.get(k).map(String::as_str);
        let mut loc = match get("filename") {
            Some(f) => match Self::parse(f) {
                Some(r) => r?,
                None => return Err("File name string for NBD must start with 'nbd:'".to_string()),
            },
            None => {
                let kind = get("server.type").or_else(|| get("server.data.type"));
                let path = get("server.path")
                    .or_else(|| get("server.data.path"))
                    .or_else(|| get("path"));
                let host = get("server.host")
                    .or_else(|| get("server.data.host"))
                    .or_else(|| get("host"));
                let port = get("server.port")
                    .or_else(|| get("server.data.port"))
                    .or_else(|| get("port"));
                let server = match (kind, path, host) {
                    (Some("unix"), Some(p), _) | (None, Some(p), None) => Server::Unix {
                        path: PathBuf::from(p),
                    },
                    (Some("inet"), _, Some(h)) | (None, None, Some(h)) => Server::Inet {
                        host: h.to_string(),
                        port: match port {
                            Some(p) => p
                                .parse()
                                .map_err(|_| format!("port '{p}' is not a port number"))?,
                            None => DEFAULT_PORT,
                        },
                    },
                    (Some(t), _, _) if t != "unix" && t != "inet" => {
                        return Err(format!(
                            "server.type '{t}' is not supported (use inet or unix)"
                        ))
                    }
                    _ => return Err("NBD server address missing".to_string()),
                };
                NbdLocator {
                    server,
                    export: String::new(),
                    dirty_bitmap: None,
                    tls_creds: None,
                    tls_hostname: None,
                    tls_certificates: None,
                }
            }
        };
        if let Some(e) = get("export") {
            loc.export = e.to_string();
        }
        loc.dirty_bitmap = get("x-dirty-bitmap").map(str::to_string);
        loc.tls_creds = get("tls-creds").map(str::to_string);
        loc.tls_hostname = get("tls-hostname").map(str::to_string);
        for k in opts.keys() {
            let known = matches!(
                k.as_str(),
                "driver"
                    | "filename"
                    | "export"
                    | "x-dirty-bitmap"
                    | "tls-creds"
                    | "tls-hostname"
                    | "host"
                    | "port"
                    | "path"
                    | "read-only"
                    | "force-share"
                    | "auto-read-only"
                    | "node-name"
                    | "reconnect-delay"
                    | "open-timeout"
                    | "cache.direct"
                    | "cache.no-flush"
                    | "discard"
                    | "detect-zeroes"
            ) || k.starts_with("server.");
            if !known {
                return Err(format!(
                    "Block protocol 'nbd' doesn't support the option '{k}'"
                ));
            }
        }
        Ok(loc)
    }

    /// qemu's name of the export: `nbd://HOST:PORT[/EXPORT]` or
    /// `nbd+unix:///[EXPORT]?socket=PATH` (`nbd+unix://?socket=PATH` for the default export).
    pub fn url(&self) -> String {
        let export = percent_encode(&self.export);
        if let Some(dir) = &self.tls_certificates {
            // libnbd's spelling (qemu has none for TLS).
            let mut q = format!("tls-certificates={}", dir.display());
            if let Some(h) = &self.tls_hostname {
                q.push_str(&format!("&tls-hostname={h}"));
            }
            return match &self.server {
                Server::Inet { host, port } => {
                    let host = match host.contains(':') {
                        true => format!("[{host}]"),
                        false => host.clone(),
                    };
                    format!("nbds://{host}:{port}/{export}?{q}")
                }
                Server::Unix { path } => {
                    format!("nbds+unix:///{export}?socket={}&{q}", path.display())
                }
            };
        }
        match &self.server {
            Server::Inet { host, port } => {
                let host = match host.contains(':') {
                    true => format!("[{host}]"),
                    false => host.clone(),
                };
                match export.is_empty() {
                    true => format!("nbd://{host}:{port}"),
                    false => format!("nbd://{host}:{port}/{export}"),
                }
            }
            Server::Unix { path } => match export.is_empty() {
                true => format!("nbd+unix://?socket={}", path.display()),
                false => format!("nbd+unix:///{export}?socket={}", path.display()),
            },
        }
    }

    /// The locator vimg carries for the export: its [`NbdLocator::url`], with the dirty
    /// bitmap asked for (`x-dirty-bitmap`) kept after a `#`, which no NBD name can hold.
    pub fn locator(&self) -> String {
        match &self.dirty_bitmap {
            Some(b) => format!("{}#x-dirty-bitmap={b}", self.url()),
            None => self.url(),
        }
    }

    /// Parses what [`NbdLocator::locator`] made (or any NBD name).
    pub fn from_locator(loc: &str) -> Option<Result<Self, ParseError>> {
        match loc.split_once("#x-dirty-bitmap=") {
            Some((url, bitmap)) => Some(Self::parse(url)?.map(|mut l| {
                l.dirty_bitmap = Some(bitmap.to_string());
                l
            })),
            None => Self::parse(loc),
        }
    }
}

/// Splits `HOST[:PORT]` (`[V6ADDR][:PORT]` for IPv6), the port defaulting to NBD's.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            a => (h, Some(a.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return None,
            None => (s, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().ok()?,
    };
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(name: &str) -> String {
        NbdLocator::parse(name).unwrap().unwrap().url()
    }

    #[test]
    fn spellings_come_to_qemus_one() {
        assert_eq!(url("nbd://127.0.0.1/exp"), "nbd://127.0.0.1:10809/exp");
        assert_eq!(url("nbd+tcp://h:99/a/b"), "nbd://h:99/a/b");
        assert_eq!(url("nbd://h:99"), "nbd://h:99");
        assert_eq!(url("nbd://h:99/"), "nbd://h:99");
        assert_eq!(url("nbd://[::1]:5/e"), "nbd://[::1]:5/e");
        assert_eq!(
            url("nbd+unix:///exp?socket=/tmp/s"),
            "nbd+unix:///exp?socket=/tmp/s"
        );
        assert_eq!(
            url("nbd+unix://?socket=/tmp/s"),
            "nbd+unix://?socket=/tmp/s"
        );
        assert_eq!(url("nbd:localhost:77"), "nbd://localhost:77");
        assert_eq!(
            url("nbd:unix:/run/s:exportname=x"),
            "nbd+unix:///x?socket=/run/s"
        );
        assert_eq!(url("nbd://h/a%20b"), "nbd://h:10809/a%20b");
        assert_eq!(
            url("nbds://h/e?tls-certificates=/c"),
            "nbds://h:10809/e?tls-certificates=/c"
        );
        assert_eq!(
            url("nbds+unix:///e?socket=/s&tls-certificates=/c&tls-hostname=x"),
            "nbds+unix:///e?socket=/s&tls-certificates=/c&tls-hostname=x"
        );
        let l = NbdLocator::parse("nbds+tcp://h:5?tls-certificates=/c")
            .unwrap()
            .unwrap();
        assert_eq!(l.tls_certificates, Some(PathBuf::from("/c")));
        assert_eq!(NbdLocator::parse(&l.url()).unwrap().unwrap(), l);
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "nbd://",
            "nbd://h:notaport/e",
            "nbd://h/e?socket=/x",
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/s",
            "nbd+unix:///e?sock=/s",
            "nbd+unix:///e?socket=/s&tls-certificates=/c",
            "nbds://h/e",
            "nbds://h/e?tls-certificates=/c&bogus=1",
            "nbd:",
        ] {
            assert!(NbdLocator::parse(bad).unwrap().is_err(), "{bad}");
        }
        assert!(NbdLocator::parse("/tmp/nbd.img").is_none());
        assert!(NbdLocator::parse("nbdx://h").is_none());
        assert!(NbdLocator::parse("nbd+ssh://h/e").is_none());
    }

    #[test]
    fn driver_options() {
        let o = |pairs: &[(&str, &str)]| {
            let m: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            NbdLocator::from_options(&m)
        };
        let l = o(&[
            ("server.type", "inet"),
            ("server.host", "h"),
            ("server.port", "7"),
            ("export", "e"),
        ])
        .unwrap();
        assert_eq!(l.url(), "nbd://h:7/e");
        let l = o(&[
            ("server.type", "unix"),
            ("server.path", "/s"),
            ("x-dirty-bitmap", "qemu:dirty-bitmap:b0"),
        ])
        .unwrap();
        assert_eq!(l.url(), "nbd+unix://?socket=/s");
        let back = NbdLocator::from_locator(&l.locator()).unwrap().unwrap();
        assert_eq!(back, l);
        assert!(o(&[("server.type", "inet")]).is_err());
        assert!(o(&[("server.type", "vsock"), ("server.host", "h")]).is_err());
        assert!(o(&[("filename", "nbd://h/e"), ("bogus", "1")]).is_err());
    }
}
