//! Parses arbitrary bytes as every NBD message both sides decode (option requests and
//! replies, simple and extended requests, reply headers and chunk payloads), and as a stream
//! of requests with their payloads as the server reads it: `vimg::nbd::wire::exercise`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::nbd::wire::exercise(data);
});
