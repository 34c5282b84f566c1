//! The `config` target's fixture directory: certificate files for the TOML under test to name.
//!
//! Shared by the fuzz target (`fuzz_targets/config.rs`) and the corpus test
//! (`tests/fuzz_corpus.rs`) through `#[path]`. Made fresh by each process (certificates
//! expire; nothing secret is checked in). Good files for the host `fuzz-host`, and bad ones so
//! the loader's refusals are reachable too.

use std::path::Path;

use migtun_certs::{Ca, IssueOptions};

/// The host name the fixture certificate is for (`name = "fuzz-host"` in the seeds).
#[allow(dead_code)]
pub const HOST: &str = "fuzz-host";

/// Writes the fixture files into `dir` (which must exist):
/// `cert.pem`, `key.pem`, `ca.pem` (a consistent identity for `fuzz-host`); `chain.pem` (the
/// certificate followed by the CA); `other-key.pem` (a key that does not match); `other-host.pem`
/// (a certificate for `other-host` from the same CA); `other-ca.pem` (an unrelated CA);
/// `garbage.pem` (not PEM) and `empty.pem`. No `missing.pem`: that one is meant to be absent.
pub fn write(dir: &Path) {
    let ca = Ca::generate("migtun fuzz CA").expect("generate the fixture CA");
    let host = ca.issue(HOST, &IssueOptions::default()).expect("issue the fixture certificate");
    let other = ca.issue("other-host", &IssueOptions::default()).expect("issue the other certificate");
    let other_ca = Ca::generate("unrelated CA").expect("generate the unrelated CA");
    let files: [(&str, String); 8] = [
        ("cert.pem", host.cert_pem.clone()),
        ("key.pem", host.key_pem.clone()),
        ("ca.pem", ca.cert_pem()),
        ("chain.pem", format!("{}{}", host.cert_pem, ca.cert_pem())),
        ("other-key.pem", other.key_pem.clone()),
        ("other-host.pem", other.cert_pem.clone()),
        ("other-ca.pem", other_ca.cert_pem()),
        ("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n".to_string()),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write a fixture file");
    }
    std::fs::write(dir.join("empty.pem"), "").expect("write a fixture file");
}
