//! Fuzz target `cookie`: `migtun_control::fuzzing::cookie` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = migtun_control::fuzzing::cookie(data);
});
