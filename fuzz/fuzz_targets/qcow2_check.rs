//! Runs the read-only consistency check (`vimg check`) on arbitrary bytes opened as a qcow2
//! image in memory: L1/L2 tables, refcount table and blocks, snapshot tables, bitmap tables,
//! COPIED flags. `vimg::qcow2::hostile::check`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::qcow2::hostile::check(data);
});
