//! Fuzz target `handshake_messages`: `migtun_proxy::fuzzing::handshake_messages` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = migtun_proxy::fuzzing::handshake_messages(data);
});
