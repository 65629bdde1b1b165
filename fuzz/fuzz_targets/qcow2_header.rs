//! Parses arbitrary bytes as a qcow2 header with its extensions (feature names, backing format,
//! data file, bitmaps, encryption, unknown ones), as the start of a file of their own length
//! and of a much longer one: `vimg::qcow2::hostile::parse_header`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::qcow2::hostile::parse_header(data);
});
