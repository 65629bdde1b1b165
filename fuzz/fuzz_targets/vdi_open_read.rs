//! Opens arbitrary bytes as a VDI image (in memory) and reads its disk through block status:
//! `vimg::vdi::exercise`. Must never panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::vdi::exercise(data);
});
