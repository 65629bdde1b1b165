//! Option haggling (proto.md "Fixed newstyle negotiation"): the greeting, the client's flags,
//! and every option until the client picks the export (GO or EXPORT_NAME) or leaves.
//!
//! Unknown or malformed options are answered with the protocol's errors (`ERR_UNSUP`,
//! `ERR_INVALID`, `ERR_UNKNOWN`, `ERR_TOO_BIG`), never with a hang-up; only a bad magic, bad
//! client flags, an option payload too large to drain, a wrong name given to EXPORT_NAME (which
//! has no error reply) or the handshake time limit end the connection.
//!
//! With TLS required (`--tls-creds`), every option before `NBD_OPT_STARTTLS` is refused with
//! `ERR_TLS_REQD` as qemu-nbd refuses it; STARTTLS is acknowledged, the TLS handshake runs,
//! and the haggling starts over on the TLS session.

use super::export::Export;
use super::registry::Registry;
use super::stream::Conn;
use crate::nbd::wire::*;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies are in use.
    pub structured: bool,
    /// Extended headers are in use (implies structured replies).
    pub extended: bool,
    /// The metadata contexts selected with SET_META_CONTEXT, as (id, name).
    pub contexts: Vec<(u32, String)>,
}

/// The block sizes advertised (as qemu-nbd: any alignment, 4 KiB preferred, 32 MiB max).
const BLOCK_SIZE: Info = Info::BlockSize {
    min: 1,
    preferred: 4096,
    max: MAX_PAYLOAD as u32,
};

/// Largest option payload drained (and answered `ERR_TOO_BIG`) rather than hung up on.
const MAX_DRAIN: u32 = 32 << 20;

/// Runs the handshake of client `client_id` on `conn`, looking exports up in `exports`.
/// `Ok(Some(_))`: enter transmission with the export chosen; `Ok(None)`: the client left
/// (ABORT or end of stream); `Err`: the connection is to be dropped.
pub fn negotiate(
    conn: &mut Conn,
    exports: &Registry,
    client_id: u64,
) -> io::Result<Option<(Negotiated, Arc<Export>)>> {
    let mut out = Vec::new();
    Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .encode(&mut out);
    conn.write_all(&out)?;
    conn.flush()?;
    let mut b4 = [0u8; 4];
    conn.read_exact(&mut b4)?;
    let client = ClientFlags::decode(&b4)?;
    let fixed = client.0 & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client.0 & FLAG_C_NO_ZEROES != 0;
    let mut st = Negotiated::default();
    // The export the selected contexts belong to: going to another drops them.
    let mut contexts_of = String::new();
    loop {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        match conn.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let h = OptionHeader::decode(&hb)?;
        if h.len > MAX_OPTION_LEN {
            if h.len > MAX_DRAIN || !fixed {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("option {} with a payload of {} bytes", h.option, h.len),
                ));
            }
            io::copy(&mut (&mut *conn).take(h.len as u64), &mut io::sink())?;
            reply_err(conn, h.option, REP_ERR_TOO_BIG, "option payload too large")?;
            continue;
        }
        let mut payload = vec![0u8; h.len as usize];
        conn.read_exact(&mut payload)?;
        if conn.tls_pending().is_some() {
            match before_tls(conn, fixed, h.option, &payload)? {
                true => continue,
                false => return Ok(None),
            }
        }
        match h.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&payload);
                let found = match payload.len() > MAX_STRING {
                    true => None,
                    false => exports.choose(client_id, &name),
                };
                let Some(export) = found else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("export '{name}' not found"),
                    ));
                };
                let mut out = Vec::new();
                ExportNameReply {
                    size: export.size(),
                    flags: export.transmission_flags(st.extended),
                }
                .encode(&mut out, no_zeroes);
                conn.write_all(&out)?;
                conn.flush()?;
                if contexts_of != name {
                    st.contexts.clear();
                }
                return Ok(Some((st, export)));
            }
            OPT_ABORT => {
                // The client may already be gone: the ACK is a courtesy.
                let _ = reply(conn, h.option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !payload.is_empty() {
                    reply_err(conn, h.option, REP_ERR_INVALID, "LIST takes no payload")?;
                    continue;
                }
                for export in exports.list() {
                    let mut p = Vec::new();
                    ServerEntry {
                        name: export.name().to_string(),
                        description: export.description().unwrap_or("").to_string(),
                    }
                    .encode(&mut p);
                    reply(conn, h.option, REP_SERVER, &p)?;
                }
                reply(conn, h.option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let req = match InfoRequest::decode(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        reply_err(conn, h.option, REP_ERR_INVALID, &e.0)?;
                        continue;
                    }
                };
                let found = match h.option {
                    OPT_GO => exports.choose(client_id, &req.name),
                    _ => exports.get(&req.name),
                };
                let Some(export) = found else {
                    let msg = format!("export '{}' not present", req.name);
                    reply_err(conn, h.option, REP_ERR_UNKNOWN, &msg)?;
                    continue;
                };
                let mut infos = vec![Info::Export {
                    size: export.size(),
                    flags: export.transmission_flags(st.extended),
                }];
                if req.requests.contains(&INFO_NAME) {
                    infos.push(Info::Name(export.name().to_string()));
                }
                if let Some(d) = export.description() {
                    infos.push(Info::Description(d.to_string()));
                }
                infos.push(BLOCK_SIZE);
                for i in infos {
                    let mut p = Vec::new();
                    i.encode(&mut p);
                    reply(conn, h.option, REP_INFO, &p)?;
                }
                reply(conn, h.option, REP_ACK, &[])?;
                if h.option == OPT_GO {
                    if contexts_of != req.name {
                        st.contexts.clear();
                    }
                    return Ok(Some((st, export)));
                }
            }
            OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
                let what = if h.option == OPT_STRUCTURED_REPLY {
                    "structured replies"
                } else {
                    "extended headers"
                };
                if !payload.is_empty() {
                    reply_err(conn, h.option, REP_ERR_INVALID, "option takes no payload")?;
                } else if st.extended || (st.structured && h.option == OPT_STRUCTURED_REPLY) {
                    let msg = format!("{what} already negotiated");
                    reply_err(conn, h.option, REP_ERR_INVALID, &msg)?;
                } else {
                    st.structured = true;
                    st.extended |= h.option == OPT_EXTENDED_HEADERS;
                    // Contexts chosen before a change of header form are forgotten.
                    st.contexts.clear();
                    reply(conn, h.option, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = h.option == OPT_LIST_META_CONTEXT;
                if !st.structured {
                    let msg = "meta contexts need structured replies first";
                    reply_err(conn, h.option, REP_ERR_INVALID, msg)?;
                    continue;
                }
                let req = match MetaContextRequest::decode(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        reply_err(conn, h.option, REP_ERR_INVALID, &e.0)?;
                        continue;
                    }
                };
                let Some(export) = exports.get(&req.export) else {
                    let msg = format!("export '{}' not present", req.export);
                    reply_err(conn, h.option, REP_ERR_UNKNOWN, &msg)?;
                    continue;
                };
                let mut found: Vec<(u32, String)> = Vec::new();
                if list && req.queries.is_empty() {
                    found = export.contexts().all();
                }
                for q in &req.queries {
                    for c in export.contexts().matching(q, list) {
                        if !found.contains(&c) {
                            found.push(c);
                        }
                    }
                }
                for (id, name) in &found {
                    let mut p = Vec::new();
                    MetaContextReply {
                        id: *id,
                        name: name.clone(),
                    }
                    .encode(&mut p);
                    reply(conn, h.option, REP_META_CONTEXT, &p)?;
                }
                if !list {
                    st.contexts = found;
                    contexts_of = req.export.clone();
                }
                reply(conn, h.option, REP_ACK, &[])?;
            }
            OPT_STARTTLS => match conn.is_tls() {
                true => reply_err(conn, h.option, REP_ERR_INVALID, "TLS already enabled")?,
                false => reply_err(conn, h.option, REP_ERR_POLICY, "TLS not configured")?,
            },
            _ => {
                if !fixed {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "unknown option {} from a client without fixed newstyle",
                            h.option
                        ),
                    ));
                }
                let msg = format!("option {} not supported", h.option);
                reply_err(conn, h.option, REP_ERR_UNSUP, &msg)?;
            }
        }
    }
}

/// An option while TLS is required and not yet started, as qemu-nbd answers it: STARTTLS
/// starts TLS, EXPORT_NAME (which has no error reply) drops the client, any other option is
/// refused with `ERR_TLS_REQD` (ABORT too, and the client is then let go). `Ok(true)`: go on
/// haggling; `Ok(false)`: the client left.
fn before_tls(conn: &mut Conn, fixed: bool, option: u32, payload: &[u8]) -> io::Result<bool> {
    let refuse = |m: String| Err(io::Error::new(io::ErrorKind::InvalidData, m));
    if !fixed {
        return refuse(format!("Unsupported option 0x{option:x}"));
    }
    match option {
        OPT_STARTTLS if !payload.is_empty() => {
            let msg = "option 'starttls' has unexpected length";
            let _ = reply_err(conn, option, REP_ERR_INVALID, msg);
            refuse(msg.to_string())
        }
        OPT_STARTTLS => {
            reply(conn, option, REP_ACK, &[])?;
            conn.start_tls()?;
            Ok(true)
        }
        OPT_EXPORT_NAME => refuse(format!("Option 0x{option:x} not permitted before TLS")),
        _ => {
            let msg = format!("Option 0x{option:x} not permitted before TLS");
            if option == OPT_ABORT {
                // The client may be gone already.
                let _ = reply_err(conn, option, REP_ERR_TLS_REQD, &msg);
                return Ok(false);
            }
            reply_err(conn, option, REP_ERR_TLS_REQD, &msg)?;
            Ok(true)
        }
    }
}

fn reply(conn: &mut Conn, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + payload.len());
    encode_option_reply(&mut out, option, kind, payload);
    conn.write_all(&out)?;
    conn.flush()
}

fn reply_err(conn: &mut Conn, option: u32, kind: u32, message: &str) -> io::Result<()> {
    reply(conn, option, kind, message.as_bytes())
}
