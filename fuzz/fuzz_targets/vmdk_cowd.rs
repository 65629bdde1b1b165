//! Opens arbitrary bytes as a vmfsSparse (COWD) extent of an ESXi snapshot delta and maps and reads it
//! grain by grain: `vimg::vmdk::cowd::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::vmdk::cowd::exercise(data);
});
