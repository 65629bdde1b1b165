//! File descriptors passed over a Unix socket with `SCM_RIGHTS`, as QMP's `getfd` receives
//! them: the CLI passes its archive (or its standard output) to the server.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors taken from one message.
const MAX_FDS: usize = 4;

/// Room for the control message of [`MAX_FDS`] descriptors (aligned as `cmsghdr` wants).
#[repr(C)]
struct CmsgBuf {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; 128],
}

/// Sends `data` on `stream` with `fd` attached. The whole of `data` is sent (the descriptor
/// with its first byte).
pub fn send_with_fd(stream: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<()> {
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a descriptor needs at least one byte to go with",
        ));
    }
    let mut cbuf = CmsgBuf {
        _align: [],
        bytes: [0; 128],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below points to memory that outlives
    // the sendmsg call (iov, cbuf), with the lengths given; CMSG_* compute offsets inside
    // cbuf, which is large enough for one descriptor (CMSG_SPACE(4) <= 128).
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.bytes.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let sent = sent as usize;
    if sent < data.len() {
        io::Write::write_all(&mut &*stream, &data[sent..])?;
    }
    Ok(())
}

/// Reads into `buf` from `stream`, collecting the descriptors that came with the bytes
/// (close-on-exec). Returns the bytes read (0 at the end of the stream).
pub fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut cbuf = CmsgBuf {
        _align: [],
        bytes: [0; 128],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: as in send_with_fd, the pointers are to live buffers with their lengths; the
    // kernel writes at most msg_controllen bytes of control data. Each descriptor read from
    // an SCM_RIGHTS message is a new descriptor of this process, owned by nobody else, so
    // wrapping it in an OwnedFd (which closes it) is sound.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.bytes.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cbuf.bytes.len() as _;
        let n = loop {
            let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = data as usize - cmsg as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    let owned = OwnedFd::from_raw_fd(fd);
                    if fds.len() < MAX_FDS {
                        fds.push(owned);
                    }
                    // More than MAX_FDS: the extra ones are closed (dropped) here.
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_descriptor_crosses_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"passed").unwrap();
        send_with_fd(&a, b"{}\n", f.as_raw_fd()).unwrap();
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"{}\n");
        assert_eq!(fds.len(), 1);
        let mut g = std::fs::File::from(fds.pop().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "passed");
        // Plain bytes come without descriptors.
        (&a).write_all(b"x").unwrap();
        let n = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
    }
}
