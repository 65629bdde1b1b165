//! Probes arbitrary bytes as a whole file for every format qemu recognises (vmdk, vhdx, vpc and
//! a fixed VHD's footer, vdi, qed, qcow, parallels, dmg, bochs, cloop, luks, qcow2):
//! `vimg::probe::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::probe::exercise(data);
});
