//! Round-trips of every message and the refusal of malformed ones.

use super::*;

fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    f(&mut v);
    v
}

/// Every proper prefix of a valid encoding is refused (truncation), never a panic.
fn truncations_fail<T: std::fmt::Debug>(bytes: &[u8], decode: impl Fn(&[u8]) -> WireResult<T>) {
    for n in 0..bytes.len() {
        assert!(
            decode(&bytes[..n]).is_err(),
            "prefix {n} of {bytes:?} accepted"
        );
    }
}

#[test]
fn greeting_round_trip_and_malformed() {
    let g = Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    };
    let b = enc(|o| g.encode(o));
    assert_eq!(b.len(), GREETING_LEN);
    assert_eq!(&b[..8], b"NBDMAGIC");
    assert_eq!(&b[8..16], b"IHAVEOPT");
    assert_eq!(Greeting::decode(&b).unwrap(), g);
    truncations_fail(&b, Greeting::decode);
    let mut bad_magic = b.clone();
    bad_magic[0] ^= 1;
    assert!(Greeting::decode(&bad_magic).is_err());
    let mut old = b[..8].to_vec();
    old.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
    old.extend_from_slice(&[0, 0]);
    assert!(Greeting::decode(&old).unwrap_err().0.contains("oldstyle"));
    let mut long = b.clone();
    long.push(0);
    assert!(Greeting::decode(&long).is_err());
}

#[test]
fn client_flags() {
    let b = enc(|o| ClientFlags(3).encode(o));
    assert_eq!(ClientFlags::decode(&b).unwrap(), ClientFlags(3));
    assert!(ClientFlags::decode(&[0, 0, 0, 4]).is_err());
    truncations_fail(&b, ClientFlags::decode);
}

#[test]
fn option_headers() {
    let h = OptionHeader {
        option: OPT_GO,
        len: 77,
    };
    let b = enc(|o| h.encode(o));
    assert_eq!(b.len(), OPTION_HEADER_LEN);
    assert_eq!(OptionHeader::decode(&b).unwrap(), h);
    truncations_fail(&b, OptionHeader::decode);
    let mut m = b.clone();
    m[3] ^= 0x40;
    assert!(OptionHeader::decode(&m).is_err());

    let r = OptionReplyHeader {
        option: OPT_LIST,
        reply: REP_ERR_UNSUP,
        len: 5,
    };
    let b = enc(|o| r.encode(o));
    assert_eq!(b.len(), OPTION_REPLY_HEADER_LEN);
    let d = OptionReplyHeader::decode(&b).unwrap();
    assert_eq!(d, r);
    assert!(d.is_error());
    truncations_fail(&b, OptionReplyHeader::decode);
    let huge = enc(|o| OptionReplyHeader { len: u32::MAX, ..r }.encode(o));
    assert!(OptionReplyHeader::decode(&huge).is_err());
    let mut whole = Vec::new();
    encode_option_reply(&mut whole, OPT_GO, REP_ACK, b"xy");
    assert_eq!(whole.len(), OPTION_REPLY_HEADER_LEN + 2);
    assert_eq!(
        OptionReplyHeader::decode(&whole[..20]).unwrap().len,
        2,
        "payload length"
    );
}

#[test]
fn export_name_reply() {
    let r = ExportNameReply {
        size: 1 << 40,
        flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
    };
    for nz in [false, true] {
        let b = enc(|o| r.encode(o, nz));
        assert_eq!(b.len(), ExportNameReply::wire_len(nz));
        assert_eq!(ExportNameReply::decode(&b).unwrap(), r);
    }
    assert!(ExportNameReply::decode(&[0; 9]).is_err());
    assert!(ExportNameReply::decode(&[0; 11]).is_err());
}

#[test]
fn info_request() {
    let r = InfoRequest {
        name: "exp".into(),
        requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
    };
    let b = enc(|o| r.encode(o));
    assert_eq!(InfoRequest::decode(&b).unwrap(), r);
    truncations_fail(&b, InfoRequest::decode);
    let mut extra = b.clone();
    extra.push(0);
    assert!(InfoRequest::decode(&extra).is_err());
    // A name length beyond the bound or the bytes present.
    let mut long = vec![0, 0, 0x10, 1];
    long.extend(std::iter::repeat_n(b'a', 4097));
    long.extend([0, 0]);
    assert!(InfoRequest::decode(&long).unwrap_err().0.contains("longer"));
    assert!(InfoRequest::decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
    // Not UTF-8.
    assert!(InfoRequest::decode(&[0, 0, 0, 1, 0xff, 0, 0]).is_err());
    // A count larger than the bytes present.
    assert!(InfoRequest::decode(&[0, 0, 0, 0, 0xff, 0xff, 0, 1]).is_err());
}

#[test]
fn info_replies() {
    let all = [
        Info::Export {
            size: 12345,
            flags: 0x1ff,
        },
        Info::Name("n".into()),
        Info::Description("a disk".into()),
        Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        },
        Info::Unknown {
            kind: 77,
            data: vec![1, 2, 3],
        },
    ];
    for i in &all {
        let b = enc(|o| i.encode(o));
        assert_eq!(&Info::decode(&b).unwrap(), i);
    }
    let exp = enc(|o| all[0].encode(o));
    truncations_fail(&exp, Info::decode);
    let mut extra = exp.clone();
    extra.push(0);
    assert!(Info::decode(&extra).is_err());
    let bs = enc(|o| all[3].encode(o));
    truncations_fail(&bs, Info::decode);
    for (min, pref, max) in [
        (3, 4096, 1 << 20),
        (1 << 17, 1 << 17, 1 << 20),
        (512, 256, 4096),
        (4096, 4096, 512),
    ] {
        let b = enc(|o| {
            Info::BlockSize {
                min,
                preferred: pref,
                max,
            }
            .encode(o)
        });
        assert!(Info::decode(&b).is_err(), "{min}/{pref}/{max}");
    }
    assert!(Info::decode(&[0, 1, 0xc3]).is_err(), "name not UTF-8");
}

#[test]
fn server_entry() {
    let e = ServerEntry {
        name: "a".into(),
        description: "desc".into(),
    };
    let b = enc(|o| e.encode(o));
    assert_eq!(ServerEntry::decode(&b).unwrap(), e);
    truncations_fail(&b[..5], ServerEntry::decode);
    assert!(ServerEntry::decode(&[0, 0, 0, 9, b'a']).is_err());
}

#[test]
fn meta_context_messages() {
    let r = MetaContextRequest {
        export: "e".into(),
        queries: vec![CONTEXT_BASE_ALLOCATION.into(), "qemu:".into()],
    };
    let b = enc(|o| r.encode(o));
    assert_eq!(MetaContextRequest::decode(&b).unwrap(), r);
    truncations_fail(&b, MetaContextRequest::decode);
    let mut extra = b.clone();
    extra.push(0);
    assert!(MetaContextRequest::decode(&extra).is_err());
    // A count of 4 billion queries in a few bytes: refused before allocating.
    let lie = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
    assert!(MetaContextRequest::decode(&lie).is_err());
    let rep = MetaContextReply {
        id: 7,
        name: "qemu:dirty-bitmap:b0".into(),
    };
    let b = enc(|o| rep.encode(o));
    assert_eq!(MetaContextReply::decode(&b).unwrap(), rep);
    truncations_fail(&b[..4], MetaContextReply::decode);
}

#[test]
fn requests_both_forms() {
    let r = Request {
        flags: CMD_FLAG_FUA,
        kind: CMD_WRITE,
        cookie: 0xdead_beef_1234,
        offset: 1 << 33,
        length: 65536,
    };
    let s = enc(|o| r.encode(o, false).unwrap());
    assert_eq!(s.len(), REQUEST_LEN);
    assert_eq!(Request::decode(&s, false).unwrap(), r);
    assert!(
        Request::decode(&s, true).is_err(),
        "simple magic when extended"
    );
    truncations_fail(&s, |b| Request::decode(b, false));
    let x = enc(|o| r.encode(o, true).unwrap());
    assert_eq!(x.len(), EXTENDED_REQUEST_LEN);
    assert_eq!(Request::decode(&x, true).unwrap(), r);
    assert!(Request::decode(&x, false).is_err());
    truncations_fail(&x, |b| Request::decode(b, true));
    assert_eq!(r.payload_len(), 65536);
    let big = Request {
        length: 1 << 32,
        ..r
    };
    assert!(enc(|o| {
        assert!(big.encode_simple(o).is_err());
    })
    .is_empty());
    let bs = Request {
        kind: CMD_BLOCK_STATUS,
        flags: CMD_FLAG_PAYLOAD_LEN,
        length: 12,
        ..r
    };
    assert_eq!(bs.payload_len(), 12);
    let rd = Request {
        kind: CMD_READ,
        flags: 0,
        ..r
    };
    assert_eq!(rd.payload_len(), 0);
}

#[test]
fn block_status_payload() {
    let p = BlockStatusPayload {
        effect_length: 1 << 30,
        ids: vec![1, 2],
    };
    let b = enc(|o| p.encode(o));
    assert_eq!(BlockStatusPayload::decode(&b).unwrap(), p);
    assert!(BlockStatusPayload::decode(&b[..8]).is_err(), "no ids");
    assert!(BlockStatusPayload::decode(&b[..13]).is_err(), "partial id");
    truncations_fail(&b[..8], BlockStatusPayload::decode);
}

#[test]
fn reply_headers() {
    let mut s = Vec::new();
    ReplyHeader::encode_simple(&mut s, NBD_EIO, 42);
    assert_eq!(s.len(), SIMPLE_REPLY_LEN);
    assert_eq!(
        ReplyHeader::decode(&s).unwrap(),
        ReplyHeader::Simple {
            error: NBD_EIO,
            cookie: 42
        }
    );
    truncations_fail(&s, ReplyHeader::decode);
    let h = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_OFFSET_DATA,
        cookie: 9,
        offset: 4096,
        length: 520,
    };
    let st = enc(|o| h.encode(o, false));
    assert_eq!(st.len(), STRUCTURED_REPLY_LEN);
    assert_eq!(
        ReplyHeader::decode(&st).unwrap(),
        ReplyHeader::Chunk(ChunkHeader { offset: 0, ..h })
    );
    truncations_fail(&st, ReplyHeader::decode);
    let ex = enc(|o| h.encode(o, true));
    assert_eq!(ex.len(), EXTENDED_REPLY_LEN);
    let d = ReplyHeader::decode(&ex).unwrap();
    assert_eq!(d, ReplyHeader::Chunk(h));
    assert_eq!(d.cookie(), 9);
    truncations_fail(&ex, ReplyHeader::decode);
    for m in [
        SIMPLE_REPLY_MAGIC,
        STRUCTURED_REPLY_MAGIC,
        EXTENDED_REPLY_MAGIC,
    ] {
        assert!(ReplyHeader::len_for_magic(m).is_some());
    }
    assert_eq!(ReplyHeader::len_for_magic(0), None);
    assert!(ReplyHeader::decode(&[0u8; 16]).is_err());
    let huge = enc(|o| {
        ChunkHeader {
            length: 1 << 40,
            ..h
        }
        .encode(o, true)
    });
    assert!(ReplyHeader::decode(&huge).is_err());
}

#[test]
fn chunk_payloads() {
    let mut d = Vec::new();
    encode_offset_data_prefix(&mut d, 512);
    d.extend_from_slice(b"abc");
    assert_eq!(decode_offset_data(&d).unwrap(), (512, &b"abc"[..]));
    assert!(decode_offset_data(&d[..8]).is_err());
    assert!(decode_offset_data(&d[..7]).is_err());

    let h = OffsetHole {
        offset: 4096,
        length: 1 << 20,
    };
    let b = enc(|o| h.encode(o));
    assert_eq!(OffsetHole::decode(&b).unwrap(), h);
    truncations_fail(&b, OffsetHole::decode);
    let z = enc(|o| OffsetHole { length: 0, ..h }.encode(o));
    assert!(OffsetHole::decode(&z).is_err());

    let c = BlockStatusChunk {
        context_id: 1,
        extents: vec![
            Extent {
                length: 65536,
                flags: (STATE_HOLE | STATE_ZERO) as u64,
            },
            Extent {
                length: 4096,
                flags: 0,
            },
        ],
    };
    for ext in [false, true] {
        let k = BlockStatusChunk::chunk_type(ext);
        let b = enc(|o| c.encode(o, ext));
        assert_eq!(BlockStatusChunk::decode(&b, k).unwrap(), c);
        if ext {
            truncations_fail(&b, |x| BlockStatusChunk::decode(x, k));
        } else {
            // A narrow chunk's extent count is its length: only whole extents parse.
            for n in 0..b.len() {
                let ok = BlockStatusChunk::decode(&b[..n], k).is_ok();
                assert_eq!(ok, n > 4 && (n - 4) % 8 == 0, "prefix {n}");
            }
        }
        let mut extra = b.clone();
        extra.extend([0; 3]);
        assert!(BlockStatusChunk::decode(&extra, k).is_err());
        assert!(BlockStatusChunk::decode(&b, REPLY_TYPE_ERROR).is_err());
        let zero = enc(|o| {
            BlockStatusChunk {
                context_id: 1,
                extents: vec![Extent {
                    length: 0,
                    flags: 0,
                }],
            }
            .encode(o, ext)
        });
        assert!(BlockStatusChunk::decode(&zero, k).is_err());
    }
    // An extended count that lies about the bytes present.
    assert!(BlockStatusChunk::decode(
        &[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff],
        REPLY_TYPE_BLOCK_STATUS_EXT
    )
    .is_err());

    let e = ErrorChunk {
        error: NBD_EINVAL,
        message: "bad".into(),
        offset: None,
    };
    let b = enc(|o| e.encode(o));
    assert_eq!(ErrorChunk::decode(&b, e.chunk_type()).unwrap(), e);
    truncations_fail(&b, |x| ErrorChunk::decode(x, REPLY_TYPE_ERROR));
    let eo = ErrorChunk {
        offset: Some(99),
        ..e.clone()
    };
    let b = enc(|o| eo.encode(o));
    assert_eq!(eo.chunk_type(), REPLY_TYPE_ERROR_OFFSET);
    assert_eq!(ErrorChunk::decode(&b, REPLY_TYPE_ERROR_OFFSET).unwrap(), eo);
    truncations_fail(&b, |x| ErrorChunk::decode(x, REPLY_TYPE_ERROR_OFFSET));
    assert!(ErrorChunk::decode(&b, REPLY_TYPE_OFFSET_DATA).is_err());
    // Unknown error types carry extra bytes to ignore.
    assert_eq!(
        ErrorChunk::decode(&b, REPLY_TYPE_FLAG_ERROR | 9)
            .unwrap()
            .error,
        NBD_EINVAL
    );
    let zero = enc(|o| {
        ErrorChunk {
            error: 0,
            ..e.clone()
        }
        .encode(o)
    });
    assert!(ErrorChunk::decode(&zero, REPLY_TYPE_ERROR).is_err());
    // Long messages are cut to the bound on a character boundary.
    let long = ErrorChunk {
        message: "é".repeat(3000),
        ..e
    };
    let b = enc(|o| long.encode(o));
    let d = ErrorChunk::decode(&b, REPLY_TYPE_ERROR).unwrap();
    assert!(d.message.len() <= MAX_STRING && d.message.chars().all(|c| c == 'é'));
}

#[test]
fn errnos_map_to_the_allowed_ones() {
    for code in 1..200 {
        let e = io::Error::from_raw_os_error(code);
        assert!(WIRE_ERRNOS.contains(&errno_from_io(&e)), "errno {code}");
    }
    assert_eq!(
        errno_from_io(&io::Error::from_raw_os_error(libc::EROFS)),
        NBD_EPERM
    );
    assert_eq!(
        errno_from_io(&io::Error::from_raw_os_error(libc::ENOSPC)),
        NBD_ENOSPC
    );
    assert_eq!(errno_from_io(&io::Error::other("x")), NBD_EIO);
    for w in WIRE_ERRNOS {
        assert_eq!(errno_from_io(&io_from_errno(w)), w, "round trip {w}");
    }
    assert_eq!(io_from_errno(4242).raw_os_error(), Some(libc::EIO));
    let ro = crate::Error::new(crate::ErrorKind::ReadOnly, "read-only");
    assert_eq!(errno_from_error(&ro), NBD_EPERM);
}

#[test]
fn exercise_never_panics_on_junk() {
    let mut x: u32 = 1;
    for len in 0..300 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        exercise(&bytes);
    }
}
