//! Parses arbitrary bytes as a LUKS1 header (`vimg::crypto::luks::Header::parse`, the first 592
//! bytes, zero-padded): a header that parses must write back to the same bytes' meaning, and,
//! when its iteration counts are small, unlocking it against the input as storage must end in
//! a result (a cipher or one error), never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vimg::crypto::luks::{self, header::HEADER_LEN, Header};

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; HEADER_LEN];
    let n = data.len().min(HEADER_LEN);
    b[..n].copy_from_slice(&data[..n]);
    let Ok(h) = Header::parse(&b) else { return };
    assert_eq!(Header::parse(&h.to_bytes()).ok().as_ref(), Some(&h));
    let _ = h.info();
    let small = h.mk_iterations <= 16 && h.slots.iter().all(|s| s.iterations <= 16);
    if small {
        let storage = vimg::storage::MemStorage::new(data.to_vec());
        let _ = luks::unlock(&h, &storage, 0, b"x");
    }
});
