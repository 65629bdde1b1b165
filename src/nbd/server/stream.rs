//! A client connection over TCP or a Unix socket, with an optional deadline on reads (the
//! handshake limit).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::nbd::tls::{Relay, ServerTls};

/// The socket of one connection.
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain connection.
    Unix(UnixStream),
}

impl Socket {
    /// Another handle on the same socket (for the reply writer).
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down: blocked reads and writes on every handle return.
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(t),
            Socket::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Sets TCP_NODELAY on TCP sockets (replies are written whole).
    pub fn set_nodelay(&self) {
        if let Socket::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }
}

impl std::os::fd::AsFd for Socket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write_vectored(bufs),
            Socket::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection being read, with an optional deadline: past it, reads fail with `TimedOut`.
pub struct Conn {
    /// The socket (after `NBD_OPT_STARTTLS`, the local end of the TLS relay).
    pub socket: Socket,
    deadline: Option<Instant>,
    /// The server's TLS credentials, if TLS is required (`--tls-creds`).
    tls: Option<ServerTls>,
    /// The relay carrying the connection over TLS, once started (stopped when dropped).
    relay: Option<Relay>,
}

impl Conn {
    /// A connection on `socket`, reads bounded by `deadline` if given.
    pub fn new(socket: Socket, deadline: Option<Instant>) -> Self {
        if let Some(d) = deadline {
            // A client that never reads the handshake's replies cannot block the server past
            // the limit either.
            let left = d.saturating_duration_since(Instant::now());
            let _ = socket.set_write_timeout(Some(left.max(std::time::Duration::from_millis(1))));
        }
        Conn {
            socket,
            deadline,
            tls: None,
            relay: None,
        }
    }

    /// The connection with TLS required (`--tls-creds`): options before `NBD_OPT_STARTTLS`
    /// are refused.
    pub fn with_tls(mut self, tls: Option<ServerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The TLS credentials, if TLS is required and not yet started.
    pub fn tls_pending(&self) -> Option<&ServerTls> {
        self.tls.as_ref().filter(|_| self.relay.is_none())
    }

    /// Whether the connection is over TLS.
    pub fn is_tls(&self) -> bool {
        self.relay.is_some()
    }

    /// Runs the TLS handshake (within the handshake's deadline) and carries the connection
    /// over TLS from now on: the socket becomes the local end of a relay.
    pub fn start_tls(&mut self) -> io::Result<()> {
        let tls = self
            .tls
            .clone()
            .ok_or_else(|| io::Error::other("TLS not configured"))?;
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            self.socket
                .set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))?;
        }
        let session = crate::nbd::tls::accept(&mut self.socket, &tls)?;
        let net = self.socket.try_clone()?;
        let (local, relay) = match net {
            Socket::Tcp(s) => crate::nbd::tls::relay(session, s)?,
            Socket::Unix(s) => crate::nbd::tls::relay(session, s)?,
        };
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            let _ = local.set_write_timeout(Some(left.max(std::time::Duration::from_millis(1))));
        }
        self.socket = Socket::Unix(local);
        self.relay = Some(relay);
        Ok(())
    }

    /// Lifts the deadline (the handshake is over).
    pub fn clear_deadline(&mut self) -> io::Result<()> {
        self.deadline = None;
        self.socket.set_write_timeout(None)?;
        self.socket.set_read_timeout(None)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake time limit reached",
                ));
            }
            self.socket.set_read_timeout(Some(left))?;
        }
        match self.socket.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake time limit reached",
            )),
            r => r,
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.socket.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
