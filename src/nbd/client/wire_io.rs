//! Reading off the socket: whole buffers, and the offset that starts a data chunk (read on
//! its own so that the data can go straight into the caller's buffer).

use std::io::{self, Read};

/// Fills `buf` (an early end of the stream is `UnexpectedEof`).
pub fn read_exact(s: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    s.read_exact(buf)
}

/// A big-endian u64.
pub fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
