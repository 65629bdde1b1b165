//! Repairs an in-memory copy of arbitrary bytes as `vimg check -r all` (or `-r leaks`, chosen
//! by one byte) does, including refcount rebuilds, then checks and reads the result:
//! `vimg::qcow2::hostile::repair`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::qcow2::hostile::repair(data);
});
