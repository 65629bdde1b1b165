//! Guest ranges stored byte for byte in one host file, for a reader that passes the bytes on
//! without reading them: the NBD server sends them from the file to the socket with
//! `sendfile(2)`, so they never cross user space.
//!
//! [`host_run`] answers for a range whose [`BlockStatus`] the caller has just asked the top of
//! the chain for: the range is a host run when its layer (the status's `depth`) stores it as
//! it is ([`BlockImage::copyable_data`]: raw, uncompressed clusters of an unencrypted qcow2,
//! the same data `convert -C` copies in the kernel), in a host file read through the page cache
//! ([`crate::storage::Storage::send_fd`]), wholly inside that file. Everything else (holes and
//! zero clusters, compressed or encrypted clusters, other formats, blkdebug, `O_DIRECT`, a run
//! reaching past the end of the file, which reads as zeros or is an error) gets `None`, and the
//! caller reads it as before.
//!
//! # Why the run stays valid while it is sent
//!
//! A sender holds the run's bytes for longer than the call that queued them: `sendfile` to a
//! TCP socket hands the page-cache pages themselves to the network stack, which reads them
//! when it transmits (or retransmits) and, on loopback, when the receiver copies them out. A
//! write to the file meanwhile changes what is sent. That is harmless as long as the bytes at
//! the run's host offset stay the guest bytes of the same guest range: a write then is a write
//! of that range which was not ordered before the read (its client cannot have seen the read's
//! reply yet), and a read racing a write may return old or new bytes, as with `pread`. It would
//! not be harmless if the host bytes could come to hold *another* guest range (a qcow2 cluster
//! freed by a discard and reused by a write elsewhere): the reply would carry data of a range
//! that was never read. So a run is given only from a layer whose mapping from guest to host
//! cannot change while it is open:
//!
//! - a layer opened read-only (nothing in this process writes it; another process that writes
//!   it is kept out by the image locks, as for every read);
//! - a layer that holds guest byte `g` at host offset `g` ([`BlockImage::linear_storage`]: a
//!   raw file), whose writes, zero writes and discards change the bytes of that range only.
//!
//! A writable qcow2 layer (a served image without `-r`, the `-s` overlay) is therefore read,
//! not sent; its read-only backing files are sent.

use crate::block::{BlockImage, BlockStatus};
use crate::offsets::HostOffset;
use std::os::fd::BorrowedFd;

/// A guest range stored byte for byte at `host` of the open file `fd` (see the module
/// documentation for what keeps it valid).
#[derive(Debug, Clone, Copy)]
pub struct HostRun<'a> {
    /// The host file (read through the page cache).
    pub fd: BorrowedFd<'a>,
    /// Where the range starts in it.
    pub host: HostOffset,
    /// The range's length in bytes; the run lies wholly inside the file.
    pub len: u64,
}

/// The host run of the range that `top`'s block status answered `status` for (the range
/// starting where it was asked, `status.len` bytes), or `None` when the range must be read
/// (see the module documentation).
pub fn host_run<'a>(top: &'a dyn BlockImage, status: &BlockStatus) -> Option<HostRun<'a>> {
    if !status.data || status.zero || status.compressed || status.len == 0 {
        return None;
    }
    let host = status.offset?;
    let mut layer = top;
    for _ in 0..status.depth {
        layer = layer.backing()?;
    }
    if layer.is_writable() && layer.linear_storage().is_none() {
        return None;
    }
    let storage = layer.copyable_data()?;
    let fd = storage.send_fd()?;
    let end = host.0.checked_add(status.len)?;
    if end > storage.len().ok()? {
        return None;
    }
    Some(HostRun {
        fd,
        host,
        len: status.len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offsets::GuestOffset;
    use crate::raw::RawImage;
    use std::io::Write;

    fn status(img: &dyn BlockImage, off: u64, len: u64) -> BlockStatus {
        img.block_status(GuestOffset(off), len).unwrap()
    }

    #[test]
    fn raw_data_is_a_run_and_its_tail_past_the_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        // 1000 bytes: the disk is 1024 bytes, its last 24 past the end of the file.
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&[7u8; 1000])
            .unwrap();
        for writable in [false, true] {
            let img = RawImage::open(&p, writable).unwrap();
            let st = status(&img, 0, 1000);
            let run = host_run(&img, &st).expect("raw data is a run");
            assert_eq!((run.host.0, run.len), (0, st.len));
            let st = status(&img, 0, 1024);
            if st.len > 1000 {
                assert!(
                    host_run(&img, &st).is_none(),
                    "a run past the end of the file"
                );
            }
        }
    }

    #[test]
    fn writable_qcow2_clusters_are_not_runs_read_only_ones_are() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        crate::qcow2::create(
            &p,
            &crate::qcow2::CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let writable = crate::open::OpenOptions {
            writable: true,
            ..Default::default()
        };
        {
            let img = crate::open::open_image(&p, &writable).unwrap();
            img.write_at(&[9u8; 65536], GuestOffset(65536)).unwrap();
            let st = status(img.as_ref(), 65536, 65536);
            assert!(st.data && st.offset.is_some());
            assert!(host_run(img.as_ref(), &st).is_none());
            img.finish().unwrap();
        }
        let img = crate::open::open_image(&p, &crate::open::OpenOptions::default()).unwrap();
        let st = status(img.as_ref(), 65536, 65536);
        let run = host_run(img.as_ref(), &st).expect("a read-only data cluster is a run");
        assert_eq!(run.len, 65536);
        let mut back = vec![0u8; 65536];
        rustix::io::pread(run.fd, &mut back, run.host.0).unwrap();
        assert_eq!(back, vec![9u8; 65536]);
        // A hole is not a run.
        let st = status(img.as_ref(), 0, 65536);
        assert!(host_run(img.as_ref(), &st).is_none());
    }
}
