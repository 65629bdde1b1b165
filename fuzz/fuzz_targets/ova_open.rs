//! Reads arbitrary bytes as an OVA appliance (in memory): its tar members, OVF descriptor and
//! disks, each disk through its read-only window: `vimg::ova::exercise`. Must never panic, hang
//! or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::ova::exercise(data);
});
