//! The client end of a control socket, for the CLI (`vimg control`, `vimg backup create
//! --server`).

use super::proto::MAX_LINE;
use crate::live::fdpass::send_with_fd;
use crate::{Error, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// A connection to a server's control socket, past the capabilities negotiation.
pub struct ControlClient {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    path: PathBuf,
    next_id: u64,
    /// Events received while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl ControlClient {
    /// Connects to the socket at `path`, reads the greeting and negotiates.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::io("Failed to connect to the control socket", e).with_path(path))?;
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| Error::io("cannot use the control socket", e).with_path(path))?,
        );
        let mut c = ControlClient {
            stream,
            reader,
            path: path.to_path_buf(),
            next_id: 0,
            events: Vec::new(),
        };
        let greeting = c.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(c.protocol("the server did not greet with QMP"));
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn protocol(&self, what: &str) -> Error {
        Error::invalid_input(format!("control socket: {what}")).with_path(&self.path)
    }

    /// Reads one JSON line.
    fn read_message(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| {
                Error::io("cannot read from the control socket", e).with_path(&self.path)
            })?;
        if n == 0 {
            return Err(self.protocol("the server closed the connection"));
        }
        serde_json::from_slice(&line)
            .map_err(|e| self.protocol(&format!("the server sent malformed JSON ({e})")))
    }

    /// Runs `command` with `args`; its return value, or its error's description as the error.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value> {
        self.execute_inner(command, args, None)
    }

    /// Runs `command` with the descriptor `fd` passed alongside (as QMP's `getfd` wants).
    pub fn execute_with_fd(&mut self, command: &str, args: Value, fd: RawFd) -> Result<Value> {
        self.execute_inner(command, args, Some(fd))
    }

    fn execute_inner(&mut self, command: &str, args: Value, fd: Option<RawFd>) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut line = json!({"execute": command, "arguments": args, "id": id}).to_string();
        line.push('\n');
        let sent = match fd {
            Some(fd) => send_with_fd(&self.stream, line.as_bytes(), fd),
            None => (&self.stream).write_all(line.as_bytes()),
        };
        sent.map_err(|e| Error::io("cannot write to the control socket", e).with_path(&self.path))?;
        loop {
            let mut v = self.read_message()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if v.get("id").and_then(|i| i.as_u64()) != Some(id) {
                continue;
            }
            if let Some(r) = v.get_mut("return") {
                return Ok(r.take());
            }
            let desc = v["error"]["desc"]
                .as_str()
                .unwrap_or("the server answered neither a return nor an error")
                .to_string();
            return Err(Error::invalid_input(desc).bare());
        }
    }
}
