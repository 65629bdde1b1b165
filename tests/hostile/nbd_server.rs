//! `vimg serve` under hostile clients: a bounded, seeded loop of malformed handshakes and
//! requests against one server, which must then still serve a well-behaved client the right
//! data, be alive, and have bounded memory.

use crate::common;
use common::nbd_serve::{nbd_tools_available, Server};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use vimg::nbd::wire::*;

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn read_n(s: &mut UnixStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Sends option `opt` and reads replies until a final one (ACK or error); returns the types.
fn option(s: &mut UnixStream, opt: u32, payload: &[u8]) -> std::io::Result<Vec<u32>> {
    let mut out = Vec::new();
    OptionHeader {
        option: opt,
        len: payload.len() as u32,
    }
    .encode(&mut out);
    out.extend_from_slice(payload);
    s.write_all(&out)?;
    let mut types = Vec::new();
    loop {
        let h = OptionReplyHeader::decode(&read_n(s, OPTION_REPLY_HEADER_LEN)?)
            .map_err(std::io::Error::from)?;
        read_n(s, h.len as usize)?;
        types.push(h.reply);
        if h.reply == REP_ACK || h.is_error() {
            return Ok(types);
        }
    }
}

/// A client through the handshake: extended headers or structured replies, then GO.
fn handshake(sock: &Path, extended: bool, contexts: &[&str]) -> std::io::Result<UnixStream> {
    let mut s = connect(sock);
    Greeting::decode(&read_n(&mut s, GREETING_LEN)?).map_err(std::io::Error::from)?;
    s.write_all(&3u32.to_be_bytes())?;
    let opt = if extended {
        OPT_EXTENDED_HEADERS
    } else {
        OPT_STRUCTURED_REPLY
    };
    assert_eq!(option(&mut s, opt, &[])?, vec![REP_ACK]);
    if !contexts.is_empty() {
        let mut p = Vec::new();
        MetaContextRequest {
            export: "exp".into(),
            queries: contexts.iter().map(|c| c.to_string()).collect(),
        }
        .encode(&mut p);
        option(&mut s, OPT_SET_META_CONTEXT, &p)?;
    }
    let mut p = Vec::new();
    InfoRequest {
        name: "exp".into(),
        requests: vec![],
    }
    .encode(&mut p);
    let t = option(&mut s, OPT_GO, &p)?;
    assert_eq!(t.last(), Some(&REP_ACK), "{t:?}");
    Ok(s)
}

fn request(extended: bool, kind: u16, flags: u16, offset: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let r = Request {
        flags,
        kind,
        cookie: 0x1234,
        offset,
        length,
    };
    if extended {
        r.encode_extended(&mut out);
    } else {
        let _ = r.encode_simple(&mut out);
    }
    out
}

/// qemu-nbd 10.0.2 aborts on this: extended headers, no meta context, BLOCK_STATUS with the
/// payload-length flag. vimg answers with an error chunk and keeps the connection.
fn block_status_payload_without_context(sock: &Path) {
    let mut s = handshake(sock, true, &[]).unwrap();
    let mut msg = request(true, CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 12);
    BlockStatusPayload {
        effect_length: 4096,
        ids: vec![1],
    }
    .encode(&mut msg);
    s.write_all(&msg).unwrap();
    let h = ReplyHeader::decode(&read_n(&mut s, EXTENDED_REPLY_LEN).unwrap()).unwrap();
    let ReplyHeader::Chunk(c) = h else {
        panic!("simple reply with extended headers: {h:?}")
    };
    assert!(c.is_error() && c.is_done() && c.cookie == 0x1234, "{c:?}");
    let e = ErrorChunk::decode(&read_n(&mut s, c.length as usize).unwrap(), c.kind).unwrap();
    assert_eq!(e.error, NBD_EINVAL, "{e:?}");
    // The connection still works: a read.
    s.write_all(&request(true, CMD_READ, 0, 0, 512)).unwrap();
    let h = ReplyHeader::decode(&read_n(&mut s, EXTENDED_REPLY_LEN).unwrap()).unwrap();
    assert!(matches!(h, ReplyHeader::Chunk(c) if !c.is_error()), "{h:?}");
}

/// One hostile client, chosen by `rng`. Errors (the server hanging up) are expected.
fn hostile_client(sock: &Path, rng: &mut common::Rng, size: u64) -> std::io::Result<()> {
    let junk = |rng: &mut common::Rng, n: u64| -> Vec<u8> {
        (0..rng.below(n)).map(|_| rng.next() as u8).collect()
    };
    match rng.below(8) {
        // Random bytes instead of the client flags and options.
        0 => {
            let mut s = connect(sock);
            read_n(&mut s, GREETING_LEN)?;
            s.write_all(&junk(rng, 300))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = s.read(&mut [0u8; 64]);
        }
        // Options: random numbers and payloads, lying lengths, truncated headers.
        1 => {
            let mut s = connect(sock);
            read_n(&mut s, GREETING_LEN)?;
            s.write_all(&1u32.to_be_bytes())?;
            for _ in 0..rng.below(6) {
                let mut m = b"IHAVEOPT".to_vec();
                m.extend_from_slice(&(rng.below(14) as u32).to_be_bytes());
                let p = junk(rng, 64);
                let len = match rng.below(4) {
                    0 => u32::MAX,
                    1 => p.len() as u32 + 7,
                    _ => p.len() as u32,
                };
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(&p);
                if rng.below(5) == 0 {
                    m.truncate(rng.below(m.len() as u64) as usize);
                }
                s.write_all(&m)?;
            }
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = s.read(&mut [0u8; 256]);
        }
        // Requests after a good handshake: junk, bad flags and commands, past the end,
        // oversized lengths, truncated headers, disconnect mid-payload.
        _ => {
            let extended = rng.below(2) == 0;
            let mut s = handshake(sock, extended, &["base:allocation"])?;
            for _ in 0..1 + rng.below(8) {
                let kind = rng.below(10) as u16;
                let flags = rng.below(64) as u16;
                let off = match rng.below(3) {
                    0 => rng.next(),
                    1 => size - rng.below(4096),
                    _ => rng.below(size),
                };
                let len = match rng.below(4) {
                    0 => rng.next() >> rng.below(64),
                    1 => (32 << 20) + 1,
                    _ => rng.below(1 << 16),
                };
                let mut m = request(extended, kind, flags, off, len);
                match rng.below(6) {
                    0 => m = junk(rng, 40),
                    1 => m.truncate(rng.below(m.len() as u64) as usize),
                    2 if kind == CMD_WRITE => m.extend(junk(rng, len.min(4096))),
                    _ => {}
                }
                if s.write_all(&m).is_err() {
                    break;
                }
            }
            // Read a little of the replies, or leave without reading.
            if rng.below(2) == 0 {
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                let _ = s.read(&mut [0u8; 4096]);
            }
        }
    }
    Ok(())
}

#[test]
fn hostile_clients_then_a_good_one_is_served_correctly() {
    if !nbd_tools_available("nbd_server hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    let size: u64 = 64 << 20;
    common::qemu_create(&img, "qcow2", "", None, size);
    common::qemu_io(
        &img,
        "qcow2",
        &["write -P 0x5a 0 33M".into(), "write -P 0xa5 40M 1M".into()],
    );
    let sock = dir.path().join("h.sock");
    let mut v = Server::vimg(
        &img,
        &sock,
        "exp",
        &["-r", "-e", "0", "--handshake-limit", "1"],
    );
    // Clients that never finish the handshake.
    let mut idle: Vec<UnixStream> = (0..4).map(|_| connect(&sock)).collect();

    block_status_payload_without_context(&sock);
    let mut rng = common::Rng::seeded(0x4e4244);
    for _ in 0..300 {
        let _ = hostile_client(&sock, &mut rng, size);
    }
    assert!(v.alive(), "the server died under hostile clients");

    // The idle clients were dropped at the handshake limit: their reads end.
    for s in &mut idle {
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        assert!(r.is_ok(), "idle client not disconnected: {r:?}");
        assert_eq!(buf.len(), GREETING_LEN);
    }

    // Many 32 MiB requests in flight while the client reads no reply: four reads whose
    // replies block the server's writer, then 24 writes (refused by the read-only export, but
    // their payloads are read). Memory stays bounded by the bytes-in-flight budget, not by
    // what the client sends (24 x 32 MiB).
    let mut s = handshake(&sock, false, &[]).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
        let data = vec![0x11u8; 32 << 20];
        for _ in 0..4 {
            w.write_all(&request(false, CMD_READ, 0, 0, 32 << 20))?;
        }
        for _ in 0..24 {
            w.write_all(&request(false, CMD_WRITE, 0, 0, 32 << 20))?;
            w.write_all(&data)?;
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    std::thread::sleep(Duration::from_secs(3));
    let hwm = v.hwm_kib();
    eprintln!("server peak RSS with the client not reading: {hwm} KiB");
    assert!(
        hwm < 300 << 10,
        "server peak RSS {hwm} KiB with 28 x 32 MiB requests in flight"
    );
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let replied = std::io::copy(&mut s, &mut std::io::sink()).unwrap();
    writer.join().unwrap().unwrap();
    assert!(replied >= 4 * (32 << 20), "{replied} bytes of replies");
    let hwm = v.hwm_kib();
    assert!(hwm < 300 << 10, "server peak RSS {hwm} KiB");

    // A well-behaved client gets the right data.
    let out = common::run(
        "qemu-img",
        &["compare", "-F", "raw", img.to_str().unwrap(), &v.uri()],
    );
    assert!(out.contains("identical"), "{out}");
    let out = common::run("nbdinfo", &["--map", &v.uri()]);
    assert!(out.contains("data"), "{out}");
    assert!(v.alive());
    let rss = v.rss_kib();
    assert!(
        rss < 400 << 10,
        "server RSS {rss} KiB after the hostile loop"
    );
    assert_eq!(v.stop(), 0);
}
