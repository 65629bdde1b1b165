//! Reads arbitrary bytes as a VMA archive: the main header, every extent (with all the
//! reader's checks) and completeness, discarding the data. Must never panic, hang or allocate
//! without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::vma::exercise(data);
});
