//! The exports of one server, by name, and the clients connected to each: what OPT_GO, INFO and
//! LIST look up, and what the control socket adds to and removes from while the server runs.

use super::export::Export;
use super::stream::Socket;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// A connected client: its socket (to disconnect it) and the export it chose, once it has.
struct Client {
    socket: Socket,
    export: Option<String>,
}

/// Both maps sit under one lock, so that choosing an export and removing it are ordered: a
/// client either chose it before the removal (and is counted) or does not find it.
#[derive(Default)]
struct Inner {
    exports: BTreeMap<String, Arc<Export>>,
    clients: HashMap<u64, Client>,
}

/// The exports of a server and its clients.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

impl Registry {
    /// A registry with no exports (a server started with `--control` and no image).
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry serving `export` alone (qemu-nbd's command line).
    pub fn single(export: Export) -> Self {
        let r = Self::new();
        r.lock()
            .exports
            .insert(export.name().to_string(), Arc::new(export));
        r
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The export named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.lock().exports.get(name).cloned()
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.lock().exports.values().cloned().collect()
    }

    /// Adds `export`; an error if its name is taken.
    pub fn add(&self, export: Export) -> Result<Arc<Export>> {
        let mut g = self.lock();
        let name = export.name().to_string();
        if g.exports.contains_key(&name) {
            return Err(Error::invalid_input(format!(
                "Block export id '{name}' is already in use"
            ))
            .bare());
        }
        let e = Arc::new(export);
        g.exports.insert(name, e.clone());
        Ok(e)
    }

    /// Removes export `name`. With clients connected to it, refused unless `force`, which
    /// disconnects them (as qemu's `block-export-del` with `mode=hard`). Returns the export,
    /// for the caller to finish once the clients are gone.
    pub fn remove(&self, name: &str, force: bool) -> Result<Arc<Export>> {
        let mut g = self.lock();
        if !g.exports.contains_key(name) {
            return Err(Error::invalid_input(format!("Export '{name}' is not found")).bare());
        }
        let users: Vec<u64> = g
            .clients
            .iter()
            .filter(|(_, c)| c.export.as_deref() == Some(name))
            .map(|(id, _)| *id)
            .collect();
        if !users.is_empty() && !force {
            return Err(Error::invalid_input(format!(
                "export '{name}' has {} client(s) connected (use force to disconnect them)",
                users.len()
            ))
            .bare());
        }
        for id in users {
            if let Some(c) = g.clients.get(&id) {
                c.socket.shutdown();
            }
        }
        Ok(g.exports.remove(name).expect("checked above"))
    }

    /// The clients connected to export `name`.
    pub fn clients_of(&self, name: &str) -> usize {
        self.lock()
            .clients
            .values()
            .filter(|c| c.export.as_deref() == Some(name))
            .count()
    }

    /// Clients connected (in the handshake or serving).
    pub fn client_count(&self) -> usize {
        self.lock().clients.len()
    }

    /// Records client `id` (its socket, to disconnect it on a forced removal or at exit).
    pub fn connect(&self, id: u64, socket: Socket) {
        self.lock().clients.insert(
            id,
            Client {
                socket,
                export: None,
            },
        );
    }

    /// Client `id` chooses export `name`: the export, if there is one by that name.
    pub fn choose(&self, id: u64, name: &str) -> Option<Arc<Export>> {
        let mut g = self.lock();
        let e = g.exports.get(name).cloned()?;
        if let Some(c) = g.clients.get_mut(&id) {
            c.export = Some(name.to_string());
        }
        Some(e)
    }

    /// Client `id` has left; its socket is shut down.
    pub fn disconnect(&self, id: u64) {
        if let Some(c) = self.lock().clients.remove(&id) {
            c.socket.shutdown();
        }
    }

    /// Disconnects every client (the server is stopping).
    pub fn disconnect_all(&self) {
        for c in self.lock().clients.values() {
            c.socket.shutdown();
        }
    }

    /// Removes every export, for the server's exit.
    pub fn drain(&self) -> Vec<Arc<Export>> {
        std::mem::take(&mut self.lock().exports)
            .into_values()
            .collect()
    }
}
