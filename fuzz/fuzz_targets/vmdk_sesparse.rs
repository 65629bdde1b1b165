//! Opens arbitrary bytes as an seSparse extent of an ESXi snapshot delta and maps and reads it
//! grain by grain: `vimg::vmdk::sesparse::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::vmdk::sesparse::exercise(data);
});
