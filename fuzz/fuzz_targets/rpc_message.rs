//! Fuzz target `rpc_message`: `migtun_control::fuzzing::rpc_message` (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = migtun_control::fuzzing::rpc_message(data);
});
