//! Opens arbitrary bytes as a one-file VMDK (sparse header, footer, grain directory and tables,
//! compressed grains) and reads it through its block status: `vimg::vmdk::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::vmdk::exercise(data);
});
