//! Reading big-endian integers off the socket.

use std::io::{self, Read};

/// Fills `buf` (an early end of the stream is `UnexpectedEof`).
pub fn read_exact(s: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    s.read_exact(buf)
}

/// A big-endian u16.
pub fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// A big-endian u32.
pub fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// A big-endian u64.
pub fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
