//! Parses arbitrary bytes as a LUKS1 header and, when its iteration counts are small, unlocks
//! it against the input: `vimg::crypto::luks::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::crypto::luks::exercise(data);
});
