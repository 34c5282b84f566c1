//! Fuzz target `config`: `migtun_proxy::fuzzing::config` (see fuzz/README.md), with relative
//! paths resolved against a fixture directory of certificate files made once per process.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

#[path = "../fixture.rs"]
mod fixture;

/// Under `$TMPDIR` (fuzz/run points it into fuzz/target), one per process.
static BASE: OnceLock<PathBuf> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let base = BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("migtun-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fixture directory");
        fixture::write(&dir);
        dir
    });
    let _ = migtun_proxy::fuzzing::config(data, base);
});
