//! Fuzz target `qmp`: `migtun_control::fuzzing::qmp_stream` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = migtun_control::fuzzing::qmp_stream(data);
});
