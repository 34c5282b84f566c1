//! Fuzz target `record_open`: `migtun_proxy::fuzzing::record_open` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = migtun_proxy::fuzzing::record_open(data);
});
