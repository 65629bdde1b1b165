//! Parses arbitrary text as a qemu image name (`json:{...}`, `file:`, plain) and as an
//! `--image-opts` list: `vimg::image_spec::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::image_spec::exercise(data);
});
