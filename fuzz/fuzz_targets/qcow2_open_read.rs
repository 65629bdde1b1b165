//! Opens arbitrary bytes as a qcow2 image (no backing files), walks block status over the
//! disk, reads what it reports, and runs the consistency check. Must never panic, hang or
//! allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::qcow2::exercise(data);
});
