//! vimg's NBD client: exports named `nbd://...` opened as [`crate::storage::Storage`].
//!
//! [`locator`] reads the names, [`connect`] negotiates, [`transport`] carries requests and
//! replies (several in flight from several threads), [`storage`] is the export as storage.
//! One connection per export is shared by everything open on it in the process ([`open`]),
//! and kept open until [`close_all`] (the binary calls it when a command ends) even when
//! nothing has the export open: a server serving one client at a time (qemu-nbd without
//! `-e`) would never answer a second connection, and one without `-t` exits when its client
//! goes, after the format probe's open.

pub mod connect;
pub mod locator;
pub mod storage;
pub mod transport;
mod wire_io;

use locator::NbdLocator;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use storage::{Connection, NbdStorage};

/// Whether `loc` is an NBD locator (valid or not).
pub fn claims(loc: &Path) -> bool {
    loc.to_str().is_some_and(locator::is_nbd_name)
}

/// The export `loc` names, or why it names none.
pub fn parse(loc: &Path) -> io::Result<NbdLocator> {
    let text = loc
        .to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an NBD name"))?;
    match NbdLocator::from_locator(text) {
        Some(Ok(l)) => Ok(l),
        Some(Err(e)) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an NBD name",
        )),
    }
}

/// The open connections, by locator.
static CONNECTIONS: Mutex<Vec<(String, Arc<Connection>)>> = Mutex::new(Vec::new());

/// Closes every connection no storage uses any more (`NBD_CMD_DISC`, then the socket): the
/// end of a command. A connection still in use closes when its last storage is dropped.
pub fn close_all() {
    let all = std::mem::take(&mut *CONNECTIONS.lock().unwrap_or_else(|e| e.into_inner()));
    drop(all);
}

/// The size of exports connected to in this process, by locator (for `info`, which asks
/// after the image is closed or while it is open, without connecting again).
static SIZES: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// The meta contexts asked for exports in place of `base:allocation` (qemu's
/// `x-dirty-bitmap`), by the export's URL.
static CONTEXTS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Makes block status on the export `url` names (opened later in this process) report the
/// meta context `context` (qemu's `x-dirty-bitmap=qemu:dirty-bitmap:NAME`) in place of
/// `base:allocation`: dirty extents then read as unallocated, as qemu reports them.
pub fn use_context(url: &str, context: &str) {
    let mut c = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    c.retain(|(u, _)| u != url);
    c.push((url.to_string(), context.to_string()));
}

/// The exports named by a protocol node alone (`driver=nbd` at the top level), by URL.
static PROTOCOL_NODES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records that the export `url` names was given as a protocol node alone (`driver=nbd` at
/// the top level of an image's options): `info` then reports it as qemu-img does, as the
/// `nbd` node itself.
pub fn mark_protocol_node(url: &str) {
    let mut n = PROTOCOL_NODES.lock().unwrap_or_else(|e| e.into_inner());
    if !n.iter().any(|u| u == url) {
        n.push(url.to_string());
    }
}

/// Whether the export `url` names was given as a protocol node alone.
pub fn is_protocol_node(url: &str) -> bool {
    PROTOCOL_NODES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|u| u == url)
}

/// The TLS settings asked for exports (`tls-creds`, `tls-hostname`), by the export's URL.
static TLS: Mutex<Vec<(String, TlsSettings)>> = Mutex::new(Vec::new());

/// qemu's `tls-creds` (the id of a `tls-creds-x509` object) and `tls-hostname`.
type TlsSettings = (String, Option<String>);

/// Makes connections to the export `url` names (opened later in this process) start TLS with
/// the `tls-creds-x509` object `creds`, checking the server's certificate against `hostname`
/// (the host by default): qemu's `tls-creds` and `tls-hostname` options.
pub fn use_tls(url: &str, creds: &str, hostname: Option<&str>) {
    let mut t = TLS.lock().unwrap_or_else(|e| e.into_inner());
    t.retain(|(u, _)| u != url);
    t.push((
        url.to_string(),
        (creds.to_string(), hostname.map(str::to_string)),
    ));
}

/// The connection to the export `loc` names: the one open already, or a new one.
pub fn connection(loc: &Path) -> io::Result<Arc<Connection>> {
    let mut l = parse(loc)?;
    if l.dirty_bitmap.is_none() {
        let url = l.url();
        l.dirty_bitmap = CONTEXTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(u, _)| *u == url)
            .map(|(_, c)| c.clone());
    }
    if l.tls_creds.is_none() {
        let url = l.url();
        if let Some((_, (creds, host))) = TLS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(u, _)| *u == url)
        {
            l.tls_creds = Some(creds.clone());
            l.tls_hostname = host.clone();
        }
    }
    let key = l.locator();
    let mut reg = CONNECTIONS.lock().unwrap_or_else(|e| e.into_inner());
    // A connection the server has ended is not reused.
    reg.retain(|(_, c)| !c.is_dead());
    if let Some((_, c)) = reg.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let (stream, info) = connect::connect(&l)?;
    let transport = transport::Transport::new(stream, info.mode, info.context)?;
    SIZES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key.clone(), info.size);
    let c = Arc::new(Connection::new(transport, info, PathBuf::from(l.url())));
    reg.push((key, c.clone()));
    Ok(c)
}

/// Opens the export `loc` names as storage, for writing if `writable`.
pub fn open(loc: &Path, writable: bool) -> io::Result<Box<dyn crate::storage::Storage>> {
    Ok(Box::new(NbdStorage::new(connection(loc)?, writable)?))
}

/// The size of the export `loc` names: known if it was connected to in this process,
/// otherwise asked of the server.
pub fn export_size(loc: &Path) -> io::Result<u64> {
    let key = parse(loc)?.locator();
    if let Some(s) = SIZES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key).copied())
    {
        return Ok(s);
    }
    Ok(connection(loc)?.info().size)
}

/// The name qemu prints for the export `loc` names.
pub fn display_name(loc: &Path) -> io::Result<String> {
    Ok(parse(loc)?.url())
}
