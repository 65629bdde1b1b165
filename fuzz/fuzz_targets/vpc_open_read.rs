//! Opens arbitrary bytes as a VHD (footer, dynamic header, BAT) and reads it through its block
//! status: `vimg::vpc::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::vpc::exercise(data);
});
