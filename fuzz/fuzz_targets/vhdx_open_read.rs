//! Opens arbitrary bytes as a VHDX (headers, log, region table, metadata, BAT), replays a log
//! it holds on an in-memory copy, and reads the disk: `vimg::vhdx::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::vhdx::exercise(data);
});
