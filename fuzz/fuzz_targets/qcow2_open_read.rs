//! Opens arbitrary bytes as a qcow2 image (in memory, no backing or data files touched), then
//! reads its snapshot table, every snapshot's tree, the bitmap directory, and the whole disk
//! through block status: `vimg::qcow2::hostile::open_and_read`. Must never panic, hang or
//! allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::qcow2::hostile::open_and_read(data);
});
