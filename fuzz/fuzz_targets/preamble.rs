//! Fuzz target `preamble`: `migtun_proxy::fuzzing::preamble` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = migtun_proxy::fuzzing::preamble(data);
});
