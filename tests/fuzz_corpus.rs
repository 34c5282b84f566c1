//! The fuzz targets of `fuzz/` on stable Rust: every target function runs over its checked-in
//! corpus (`fuzz/corpus/<target>/`) and over seeded random inputs (fresh bytes, and mutations
//! of the corpus seeds), and must return without panicking. The functions are the same ones
//! libFuzzer drives (`migtun_proxy::fuzzing`, `migtun_control::fuzzing`), so CI exercises them
//! without nightly; `fuzz/run` adds coverage-guided runs where nightly is present.
//!
//! The corpus is made by [`generated_seeds`] (rewrite it with
//! `MIGTUN_WRITE_CORPUS=1 cargo test --locked -p migtun --test fuzz_corpus regenerate -- --ignored`);
//! files not named `gen-*` are regression seeds added by hand (inputs a fuzzer once crashed on)
//! and are never rewritten. Each test also checks that the corpus still reaches the deep paths
//! (records that authenticate, configs that validate, cookies that are accepted), so a change
//! that made every seed fail early would be noticed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use migtun_control::fuzzing::{self as cf, RpcOutcome, FUZZ_PEER};
use migtun_proxy::fuzzing as pf;
use migtun_proxy::route::wire::{Reply, ReplyCode, Request};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[path = "../fuzz/fixture.rs"]
mod fixture;

/// Random inputs per target. Bounded so that the whole file runs in seconds; coverage-guided
/// depth is `fuzz/run`'s job.
const RANDOM_INPUTS: usize = 20_000;
/// Longest fresh random input.
const MAX_RANDOM_LEN: usize = 300;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

/// The checked-in corpus of `target`, sorted by file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("read the corpus directory");
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read a seed"))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 15, "{}: only {} seeds", dir.display(), files.len());
    files
}

/// Runs `f` on `input`; on a panic, names the target and the input so it can be reproduced
/// (save it as a regression seed in `fuzz/corpus/<target>/`).
fn run<T>(target: &str, what: &str, input: &[u8], f: &dyn Fn(&[u8]) -> T) -> T {
    match catch_unwind(AssertUnwindSafe(|| f(input))) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fuzz target {target} panicked on {what}: {} bytes: \"{}\"", input.len(), input.escape_ascii());
            std::panic::resume_unwind(e)
        }
    }
}

/// Fresh random bytes and mutations of the seeds, `n` in all, from a fixed seed.
fn random_inputs(target: &str, seeds: &[Vec<u8>], n: usize, mut each: impl FnMut(&[u8])) {
    // One stream per target, so adding a target does not change the others' inputs.
    let seed = target.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut rng = SmallRng::seed_from_u64(seed);
    for i in 0..n {
        let input = if i % 4 == 0 {
            let mut v = vec![0u8; rng.gen_range(0..=MAX_RANDOM_LEN)];
            rng.fill(&mut v[..]);
            v
        } else {
            mutate(&mut rng, seeds)
        };
        each(&input);
    }
}

/// Bytes that tend to matter to the parsers: lengths at their limits, JSON and TOML syntax,
/// path separators.
const INTERESTING: &[u8] = b"\x00\x01\x03\x04\x10\x16\x17\x18\x40\x41\x7f\x80\xff\"\\\n\r.,/:=[]{}-_ 0";

fn mutate(rng: &mut SmallRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..=4) {
        let at = |rng: &mut SmallRng, v: &Vec<u8>| rng.gen_range(0..=v.len());
        match rng.gen_range(0..8) {
            0 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] = if rng.gen_bool(0.7) { INTERESTING[rng.gen_range(0..INTERESTING.len())] } else { rng.gen() };
            }
            2 => {
                let i = at(rng, &v);
                let b = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                v.insert(i, b);
            }
            3 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                let j = rng.gen_range(i..=v.len().min(i + 16));
                v.drain(i..j);
            }
            4 => {
                let i = at(rng, &v);
                v.truncate(i);
            }
            5 => {
                let other = &seeds[rng.gen_range(0..seeds.len())];
                let a = rng.gen_range(0..=other.len());
                let b = rng.gen_range(a..=other.len());
                let i = at(rng, &v);
                v.splice(i..i, other[a..b].iter().copied());
            }
            6 if !v.is_empty() => {
                let a = rng.gen_range(0..v.len());
                let b = rng.gen_range(a..=v.len().min(a + 64));
                let piece = v[a..b].to_vec();
                let i = at(rng, &v);
                v.splice(i..i, piece);
            }
            _ => {
                let i = at(rng, &v);
                v.splice(i..i, rng.gen::<[u8; 4]>());
            }
        }
    }
    v
}

/// Runs `f` over the corpus and the random inputs of `target`; returns the corpus results.
fn exercise<T>(target: &str, n: usize, f: &dyn Fn(&[u8]) -> T) -> Vec<(String, T)> {
    let seeds = corpus(target);
    let results: Vec<(String, T)> = seeds.iter().map(|(name, data)| (name.clone(), run(target, name, data, f))).collect();
    let bytes: Vec<Vec<u8>> = seeds.into_iter().map(|(_, d)| d).collect();
    let mut i = 0;
    random_inputs(target, &bytes, n, |input| {
        run(target, &format!("random input #{i}"), input, f);
        i += 1;
    });
    results
}

#[test]
fn record_open_corpus_and_random_inputs() {
    let results = exercise("record_open", RANDOM_INPUTS, &pf::record_open);
    let deepest = results.iter().map(|(_, s)| s.opened).max().unwrap_or(0);
    assert!(deepest >= 3, "no seed opens three records in a row: {results:?}");
    assert!(results.iter().any(|(_, s)| s.handshake_ok > 0), "no seed reaches a handshake message");
    assert!(results.iter().any(|(_, s)| s.opened > 0 && s.error.is_some()), "no seed fails after an authentic record");
    assert!(results.iter().any(|(_, s)| s.opened > 0 && s.error.is_none()), "no seed ends cleanly");
}

#[test]
fn handshake_messages_corpus_and_random_inputs() {
    let results = exercise("handshake_messages", RANDOM_INPUTS, &pf::handshake_messages);
    assert!(results.iter().any(|(_, s)| s.complete && s.messages >= 2), "no seed with two whole messages");
    assert!(results.iter().any(|(_, s)| !s.complete), "no truncated seed");
}

#[test]
fn preamble_corpus_and_random_inputs() {
    let results = exercise("preamble", RANDOM_INPUTS, &pf::preamble);
    assert!(results.iter().any(|(_, s)| s.request), "no seed decodes as a request");
    assert!(results.iter().any(|(_, s)| s.reply && !s.request), "no seed decodes as a reply only");
    assert!(results.iter().any(|(_, s)| !s.reply && !s.request), "no seed is refused by both");
}

#[test]
fn config_corpus_and_random_inputs() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    fixture::write(dir.path());
    let base = dir.path().to_path_buf();
    let results = exercise("config", RANDOM_INPUTS, &|data| pf::config(data, &base));
    let ok = results.iter().filter(|(_, r)| matches!(r, Some(Ok(())))).count();
    let refused: Vec<&String> = results.iter().filter_map(|(_, r)| match r {
        Some(Err(e)) => Some(e),
        _ => None,
    }).collect();
    assert!(ok >= 2, "fewer than two seeds validate: {results:?}");
    assert!(refused.len() >= 20, "fewer than twenty seeds are refused: {results:?}");
    // The refusals name their key, as `migtun check` shows them.
    for key in ["`tls.key`", "`tls.cert`", "`tls.ca`", "`name`", "`listen`"] {
        assert!(refused.iter().any(|e| e.contains(key)), "no seed is refused for {key}: {refused:#?}");
    }
    assert!(results.iter().any(|(_, r)| r.is_none()), "no seed shows the sandbox skipping an absolute TLS path");
}

#[test]
fn rpc_message_corpus_and_random_inputs() {
    let results = exercise("rpc_message", RANDOM_INPUTS, &cf::rpc_message);
    let seeds = corpus("rpc_message");
    for (k, kind) in cf::RPC_KINDS.iter().enumerate() {
        let accepted = results.iter().zip(&seeds).any(|((_, r), (_, d))| {
            d.first().map(|&b| b as usize % cf::RPC_KINDS.len()) == Some(k) && *r == RpcOutcome::Accepted
        });
        assert!(accepted, "no seed of kind {kind} is accepted");
    }
    for want in ["refused", "bad shape", "not JSON"] {
        let found = results.iter().any(|(_, r)| match want {
            "refused" => matches!(r, RpcOutcome::Refused(_)),
            "bad shape" => *r == RpcOutcome::BadShape,
            _ => *r == RpcOutcome::NotJson,
        });
        assert!(found, "no seed is {want}");
    }
}

#[test]
fn cookie_corpus_and_random_inputs() {
    let results = exercise("cookie", RANDOM_INPUTS, &cf::cookie);
    assert!(results.iter().any(|(_, r)| *r == RpcOutcome::Accepted), "no cookie is accepted");
    let refused = results.iter().filter(|(_, r)| matches!(r, RpcOutcome::Refused(_))).count();
    assert!(refused >= 4, "fewer than four cookies are refused: {results:?}");
    assert!(results.iter().any(|(_, r)| *r == RpcOutcome::BadShape));
    assert!(results.iter().any(|(_, r)| *r == RpcOutcome::NotJson));
    // Today's checks, which the validator extends: `.`, `..` and paths are not migration ids.
    for (name, r) in &results {
        if name.contains("id-dot") || name.contains("id-path") {
            assert!(matches!(r, RpcOutcome::Refused(_)), "{name} was not refused: {r:?}");
        }
    }
}

#[test]
fn qmp_corpus_and_random_inputs() {
    let results = exercise("qmp", RANDOM_INPUTS, &cf::qmp_stream);
    let sum = |f: fn(&cf::QmpSummary) -> usize| results.iter().map(|(_, s)| f(s)).sum::<usize>();
    assert!(sum(|s| s.greetings) >= 1 && sum(|s| s.events) >= 3 && sum(|s| s.errors) >= 1, "{results:?}");
    assert!(sum(|s| s.typed) >= 6, "the typed replies are not reached: {results:?}");
    assert!(results.iter().any(|(_, s)| s.failure.as_deref().is_some_and(|f| f.contains("longer than"))), "no seed hits the line limit");
}

#[test]
fn checked_in_corpus_matches_the_generator() {
    for (target, name, data) in generated_seeds() {
        let path = corpus_dir(target).join(format!("gen-{name}"));
        let have = std::fs::read(&path).unwrap_or_default();
        assert!(
            have == data,
            "{} differs from the generator (tests/fuzz_corpus.rs); rewrite the corpus with \
             MIGTUN_WRITE_CORPUS=1 cargo test --locked -p migtun --test fuzz_corpus regenerate -- --ignored",
            path.display()
        );
    }
}

/// Rewrites the `gen-*` seeds (only with `MIGTUN_WRITE_CORPUS=1`, so `--ignored` runs alone do
/// not touch the tree).
#[test]
#[ignore = "writes fuzz/corpus; run with MIGTUN_WRITE_CORPUS=1"]
fn regenerate() {
    if std::env::var_os("MIGTUN_WRITE_CORPUS").is_none() {
        eprintln!("MIGTUN_WRITE_CORPUS is not set: nothing written");
        return;
    }
    for target in ["record_open", "handshake_messages", "preamble", "config", "rpc_message", "cookie", "qmp"] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for e in std::fs::read_dir(&dir).expect("read the corpus directory").flatten() {
            if e.file_name().to_string_lossy().starts_with("gen-") {
                std::fs::remove_file(e.path()).expect("remove an old generated seed");
            }
        }
    }
    for (target, name, data) in generated_seeds() {
        std::fs::write(corpus_dir(target).join(format!("gen-{name}")), data).expect("write a seed");
    }
}

// ---------------------------------------------------------------------------------------------
// The seeds: valid inputs and near misses, each named for what it is.

fn generated_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, data: Vec<u8>| out.push((target, name.to_string(), data));
    for (n, d) in record_seeds() {
        add("record_open", n, d);
    }
    for (n, d) in handshake_seeds() {
        add("handshake_messages", n, d);
    }
    for (n, d) in preamble_seeds() {
        add("preamble", &n, d);
    }
    for (n, d) in config_seeds() {
        add("config", n, d.into_bytes());
    }
    for (n, d) in rpc_seeds() {
        add("rpc_message", &n, d);
    }
    for (n, d) in cookie_seeds() {
        add("cookie", &n, d.into_bytes());
    }
    for (n, d) in qmp_seeds() {
        add("qmp", n, d);
    }
    out
}

/// `record_open` chunk: op (0 raw, 1 sealed inner plaintext, 2 sealed with the given header).
fn chunk(op: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![op];
    v.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    v.extend_from_slice(bytes);
    v
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn record_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const APP: u8 = 23;
    const HS: u8 = 22;
    const ALERT: u8 = 21;
    let inner = |content: &[u8], typ: u8, pad: usize| {
        let mut v = content.to_vec();
        v.push(typ);
        v.extend(std::iter::repeat_n(0, pad));
        v
    };
    let aes = |chunks: &[Vec<u8>]| cat(&[vec![0], chunks.concat()]);
    let chacha = |chunks: &[Vec<u8>]| cat(&[vec![1], chunks.concat()]);
    let app = |s: &[u8]| chunk(1, &inner(s, APP, 0));
    vec![
        ("app-data-aes", aes(&[app(b"hello, migtun")])),
        ("app-data-chacha", chacha(&[app(b"hello, migtun")])),
        ("three-app-records", aes(&[app(b"one"), app(b"two"), app(b"three")])),
        ("empty-app-record", aes(&[app(b""), app(b"after")])),
        ("padded-app-data", aes(&[chunk(1, &inner(b"data", APP, 40))])),
        ("all-zero-inner-plaintext", aes(&[chunk(1, &[0; 24])])),
        ("empty-inner-plaintext", aes(&[chunk(1, &[])])),
        ("unknown-inner-type", aes(&[chunk(1, &inner(b"x", 99, 0))])),
        ("change-cipher-spec-inner-type", aes(&[chunk(1, &inner(&[1], 20, 0))])),
        ("plaintext-at-2-14", aes(&[chunk(1, &inner(&[0x61; 16384], APP, 0))])),
        ("plaintext-at-2-14-plus-1", aes(&[chunk(1, &inner(&[0x61; 16385], APP, 0))])),
        ("ciphertext-at-2-14-plus-256", aes(&[chunk(1, &inner(&[0x61; 16384], APP, 16640 - 16 - 16385))])),
        ("ciphertext-at-2-14-plus-257", aes(&[chunk(1, &inner(&[0x61; 16384], APP, 16641 - 16 - 16385))])),
        ("key-update", aes(&[app(b"a"), chunk(1, &inner(&[24, 0, 0, 1, 0], HS, 0))])),
        ("key-update-requested", chacha(&[chunk(1, &inner(&[24, 0, 0, 1, 1], HS, 0))])),
        ("key-update-not-last", aes(&[chunk(1, &inner(&[24, 0, 0, 1, 0, 24, 0, 0, 1, 1], HS, 0))])),
        ("session-ticket", aes(&[chunk(1, &inner(&ticket(), HS, 0)), app(b"x")])),
        ("empty-handshake-record", aes(&[chunk(1, &inner(&[], HS, 0))])),
        ("truncated-handshake-message", aes(&[chunk(1, &inner(&[4, 0, 0, 9, 1], HS, 0))])),
        ("close-notify", aes(&[app(b"last"), chunk(1, &inner(&[1, 0], ALERT, 0))])),
        ("data-after-close-notify", aes(&[chunk(1, &inner(&[1, 0], ALERT, 0)), app(b"late")])),
        ("fatal-alert", aes(&[chunk(1, &inner(&[2, 20], ALERT, 0))])),
        ("short-alert", aes(&[chunk(1, &inner(&[1], ALERT, 0))])),
        ("long-alert", aes(&[chunk(1, &inner(&[1, 0, 0], ALERT, 0))])),
        ("header-bad-version", aes(&[chunk(2, &cat(&[vec![23, 3, 1, 0, 22], inner(b"v", APP, 0)]))])),
        ("header-wrong-length", aes(&[app(b"ok"), chunk(2, &cat(&[vec![23, 3, 3, 0, 40], inner(b"ten bytes", APP, 0)]))])),
        ("header-handshake-outer-type", aes(&[chunk(2, &cat(&[vec![22, 3, 3, 0, 18], inner(b"x", APP, 0)]))])),
        ("plaintext-handshake-after-handshake", aes(&[chunk(0, b"\x16\x03\x03\x00\x05hello")])),
        ("plaintext-alert-after-handshake", aes(&[app(b"a"), chunk(0, &[21, 3, 3, 0, 2, 2, 40])])),
        ("header-too-short-for-tag", aes(&[chunk(0, &[23, 3, 3, 0, 16])])),
        ("header-only", aes(&[app(b"a"), chunk(0, &[23, 3, 3])])),
        ("garbage-record", aes(&[chunk(0, &cat(&[vec![23, 3, 3, 0, 30], vec![0x5a; 30]]))])),
        ("record-split-mid-tag", aes(&[app(b"whole"), chunk(0, &[23, 3, 3, 0, 40, 1, 2, 3])])),
        ("ciphertext-length-max", aes(&[chunk(0, &[23, 3, 3, 0xff, 0xff])])),
        ("no-input-after-selector", vec![0]),
    ]
}

/// A NewSessionTicket body as a TLS 1.3 server sends it (RFC 8446 §4.6.1), with its header.
fn ticket() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&86400u32.to_be_bytes()); // ticket_lifetime
    body.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // ticket_age_add
    body.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0, 1]); // ticket_nonce
    body.extend_from_slice(&[0, 32]);
    body.extend_from_slice(&[0xab; 32]); // ticket
    body.extend_from_slice(&[0, 0]); // no extensions
    let mut msg = vec![4];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    msg
}

fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("key-update", vec![24, 0, 0, 1, 0]),
        ("key-update-requested", vec![24, 0, 0, 1, 1]),
        ("key-update-bad-body", vec![24, 0, 0, 1, 2]),
        ("key-update-long-body", vec![24, 0, 0, 2, 0, 0]),
        ("key-update-empty-body", vec![24, 0, 0, 0]),
        ("ticket", ticket()),
        ("two-tickets", cat(&[ticket(), ticket()])),
        ("ticket-then-key-update", cat(&[ticket(), vec![24, 0, 0, 1, 0]])),
        ("two-key-updates", vec![24, 0, 0, 1, 0, 24, 0, 0, 1, 1]),
        ("empty", vec![]),
        ("type-only", vec![4]),
        ("header-only", vec![4, 0, 0]),
        ("length-past-end", vec![4, 0, 0, 9, 1]),
        ("length-max", vec![4, 0xff, 0xff, 0xff]),
        ("trailing-byte", vec![24, 0, 0, 1, 0, 24]),
        ("server-hello-after-handshake", vec![2, 0, 0, 4, 3, 3, 0, 0]),
        ("certificate-request", vec![13, 0, 0, 5, 0, 0, 2, 0, 0]),
        ("zero-length-messages", vec![0, 0, 0, 0, 0, 0, 0, 0]),
    ]
}

fn preamble_seeds() -> Vec<(String, Vec<u8>)> {
    let req = |r: &str, id: Option<&str>| Request::new(r, id).expect("a valid seed request").encode();
    let mut seeds: Vec<(String, Vec<u8>)> = vec![
        ("request-static-route".into(), req("migration", None)),
        ("request-dynamic-route".into(), req("m-0123456789abcdef.ram", Some("m-0123456789abcdef"))),
        ("request-longest-names".into(), req(&"r".repeat(64), Some(&"i".repeat(64)))),
        ("request-with-payload".into(), cat(&[req("migration.nbd_0", None), b"QEMU migration stream".to_vec()])),
        ("request-truncated".into(), req("migration", Some("m-1"))[..9].to_vec()),
        ("request-bad-magic".into(), b"GET / HTTP/1.1\r\n".to_vec()),
        ("request-partial-bad-magic".into(), b"MX".to_vec()),
        ("request-newer-version".into(), b"MGTN\x02\x09migration\x00".to_vec()),
        ("request-empty-route".into(), b"MGTN\x01\x00\x00".to_vec()),
        ("request-route-65".into(), cat(&[b"MGTN\x01\x41".to_vec(), vec![b'r'; 65], vec![0]])),
        ("request-route-slash".into(), b"MGTN\x01\x03a/b\x00".to_vec()),
        ("request-route-dotdot".into(), b"MGTN\x01\x02..\x00".to_vec()),
        ("request-id-not-utf8".into(), b"MGTN\x01\x01a\x02\xff\xfe".to_vec()),
        ("request-id-nul".into(), b"MGTN\x01\x01a\x01\x00".to_vec()),
        ("empty".into(), vec![]),
        ("reply-ok".into(), Reply::ok().encode()),
        ("reply-ok-then-data".into(), cat(&[Reply::ok().encode(), b"stream bytes".to_vec()])),
        ("reply-detail-255".into(), Reply::refuse(ReplyCode::TargetUnreachable, "x".repeat(255)).encode()),
        ("reply-detail-multibyte".into(), Reply::refuse(ReplyCode::Malformed, "é".repeat(100)).encode()),
        ("reply-detail-not-utf8".into(), vec![1, 5, 2, 0xc3, 0x28]),
        ("reply-unknown-code".into(), vec![1, 200, 0]),
        ("reply-newer-version".into(), vec![9, 4, 3, b'v', b'1', b'!']),
        ("reply-truncated-detail".into(), vec![1, 2, 10, b'f', b'o']),
    ];
    for code in [ReplyCode::UnknownRoute, ReplyCode::Forbidden, ReplyCode::UnsupportedVersion, ReplyCode::Draining, ReplyCode::Internal] {
        seeds.push((format!("reply-{}", code.reason()), Reply::refuse(code, format!("refused: {code}")).encode()));
    }
    seeds
}

const TLS: &str = "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nca = \"ca.pem\"\n";

fn config_seeds() -> Vec<(&'static str, String)> {
    let head = "name = \"fuzz-host\"\nlisten = \"0.0.0.0:7443\"\n";
    let minimal = format!("{head}{TLS}");
    let full = format!(
        "{head}admin = \"/run/migtun/admin.sock\"\nmetrics = \"127.0.0.1:9477\"\ndrain_timeout_secs = 30\n{TLS}\n\
         [[peer]]\nname = \"host-a\"\naddress = \"192.0.2.1:7443\"\n\n\
         [[peer]]\nname = \"host-b\"\naddress = \"host-b.example:7443\"\ntransport = \"quic\"\n\n\
         [[peer]]\nname = \"host-c\"\naddress = \"[2001:db8::3]:7443\"\ntransport = \"auto\"\n\n\
         [[forward]]\nlisten = \"unix:/run/migtun/to-a.sock\"\npeer = \"host-a\"\nroute = \"migration\"\nmode = \"0660\"\n\n\
         [[forward]]\nlisten = \"tcp:127.0.0.1:4444\"\npeer = \"host-b\"\nroute = \"nbd\"\n\n\
         [[expose]]\nroute = \"migration\"\ntarget = \"unix:/run/qemu/migration.sock\"\nallow = [\"host-a\", \"host-b\"]\n\n\
         [qemu]\nrun_dir = \"/run/migtun\"\nprepare_hook = \"/usr/lib/migtun/prepare-hook\"\n"
    );
    let with_tls = |cert: &str, key: &str, ca: &str| format!("{head}[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{ca}\"\n");
    let peer = |body: &str| format!("{minimal}\n[[peer]]\n{body}\n");
    vec![
        ("minimal", minimal.clone()),
        ("full", full),
        ("chain", with_tls("chain.pem", "key.pem", "ca.pem")),
        ("inline-tls-table", format!("{head}tls = {{ cert = \"cert.pem\", key = \"key.pem\", ca = \"ca.pem\" }}\n")),
        ("dotted-tls-keys", format!("{head}tls.cert = \"cert.pem\"\ntls.key = \"key.pem\"\ntls.ca = \"ca.pem\"\n")),
        ("missing-cert-file", with_tls("missing.pem", "key.pem", "ca.pem")),
        ("missing-key-file", with_tls("cert.pem", "missing.pem", "ca.pem")),
        ("missing-ca-file", with_tls("cert.pem", "key.pem", "missing.pem")),
        ("key-of-another-host", with_tls("cert.pem", "other-key.pem", "ca.pem")),
        ("certificate-of-another-host", with_tls("other-host.pem", "key.pem", "ca.pem")),
        ("unrelated-ca", with_tls("cert.pem", "key.pem", "other-ca.pem")),
        ("cert-not-pem", with_tls("garbage.pem", "key.pem", "ca.pem")),
        ("cert-empty", with_tls("empty.pem", "key.pem", "ca.pem")),
        ("key-is-a-certificate", with_tls("cert.pem", "cert.pem", "ca.pem")),
        ("ca-is-a-key", with_tls("cert.pem", "key.pem", "key.pem")),
        ("empty-cert-path", with_tls("", "key.pem", "ca.pem")),
        ("absolute-cert-path-skipped", with_tls("/dev/zero", "key.pem", "ca.pem")),
        ("name-not-dns", minimal.replace("fuzz-host", "fuzz_host")),
        ("name-not-in-certificate", minimal.replace("\"fuzz-host\"", "\"other-host\"")),
        ("listen-no-port", minimal.replace("0.0.0.0:7443", "0.0.0.0")),
        ("listen-host-name", minimal.replace("0.0.0.0:7443", "localhost:7443")),
        ("admin-relative", format!("admin = \"admin.sock\"\n{minimal}")),
        ("admin-too-long", format!("admin = \"/{}\"\n{minimal}", "a".repeat(120))),
        ("metrics-bad", format!("metrics = \"9477\"\n{minimal}")),
        ("drain-negative", format!("drain_timeout_secs = -1\n{minimal}")),
        ("drain-too-long", format!("drain_timeout_secs = 3601\n{minimal}")),
        ("drain-not-integer", format!("drain_timeout_secs = \"30\"\n{minimal}")),
        ("peer-own-name", peer("name = \"fuzz-host\"\naddress = \"192.0.2.1:7443\"")),
        ("peer-duplicate", format!("{}[[peer]]\nname = \"HOST-A\"\naddress = \"192.0.2.2:7443\"\n", peer("name = \"host-a\"\naddress = \"192.0.2.1:7443\""))),
        ("peer-port-zero", peer("name = \"host-a\"\naddress = \"192.0.2.1:0\"")),
        ("peer-ipv6-unbracketed", peer("name = \"host-a\"\naddress = \"2001:db8::1:7443\"")),
        ("peer-unbalanced-bracket", peer("name = \"host-a\"\naddress = \"[2001:db8::1:7443\"")),
        ("peer-unknown-transport", peer("name = \"host-a\"\naddress = \"192.0.2.1:7443\"\ntransport = \"udp\"")),
        ("peer-misspelt-key", peer("name = \"host-a\"\nadress = \"192.0.2.1:7443\"")),
        ("forward-not-loopback", format!("{}[[forward]]\nlisten = \"tcp:0.0.0.0:4444\"\npeer = \"host-a\"\nroute = \"r\"\n", peer("name = \"host-a\"\naddress = \"192.0.2.1:7443\""))),
        ("forward-unknown-peer", format!("{minimal}[[forward]]\nlisten = \"tcp:127.0.0.1:4444\"\npeer = \"nobody\"\nroute = \"r\"\n")),
        ("forward-mode-integer", format!("{}[[forward]]\nlisten = \"unix:/tmp/f.sock\"\npeer = \"host-a\"\nroute = \"r\"\nmode = 660\n", peer("name = \"host-a\"\naddress = \"192.0.2.1:7443\""))),
        ("forward-mode-not-octal", format!("{}[[forward]]\nlisten = \"unix:/tmp/f.sock\"\npeer = \"host-a\"\nroute = \"r\"\nmode = \"0999\"\n", peer("name = \"host-a\"\naddress = \"192.0.2.1:7443\""))),
        ("forward-route-slash", format!("{}[[forward]]\nlisten = \"tcp:127.0.0.1:0\"\npeer = \"host-a\"\nroute = \"a/b\"\n", peer("name = \"host-a\"\naddress = \"192.0.2.1:7443\""))),
        ("expose-empty-allow", format!("{minimal}[[expose]]\nroute = \"r\"\ntarget = \"tcp:127.0.0.1:22\"\nallow = []\n")),
        ("expose-relative-unix-target", format!("{minimal}[[expose]]\nroute = \"r\"\ntarget = \"unix:rel.sock\"\nallow = [\"host-a\"]\n")),
        ("expose-duplicate-route", format!("{minimal}[[expose]]\nroute = \"r\"\ntarget = \"tcp:127.0.0.1:22\"\nallow = [\"host-a\"]\n[[expose]]\nroute = \"r\"\ntarget = \"tcp:127.0.0.1:23\"\nallow = [\"host-a\"]\n")),
        ("qemu-empty-run-dir", format!("{minimal}[qemu]\nrun_dir = \"\"\n")),
        ("unknown-top-level-key", format!("listne = \"0.0.0.0:1\"\n{minimal}")),
        ("unknown-key-with-newline", format!("\"a\\nb\" = 1\n{minimal}")),
        ("syntax-error", format!("{minimal}[[peer]\nname = \"host-a\"\n")),
        ("tls-not-a-table", format!("{head}tls = \"cert.pem\"\n")),
        ("missing-tls", head.to_string()),
        ("empty", String::new()),
    ]
}

const COOKIE_ID: &str = "m-0123456789abcdef";

fn cookie_json(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v = serde_json::json!({
        "migration": COOKIE_ID,
        "vm": "vm1",
        "source": FUZZ_PEER,
        "cmdline": ["/usr/bin/qemu-system-x86_64", "-name", "vm1", "-m", "512",
                    "-blockdev", "driver=file,filename=/var/lib/vm/disk.qcow2,node-name=drive0-file",
                    "-blockdev", "driver=qcow2,file=drive0-file,node-name=drive0",
                    "-device", "virtio-blk-pci,drive=drive0,id=vd0"],
        "disks": [{"device": "vd0", "node_name": "drive0", "size": 1073741824u64, "format": "qcow2",
                   "source_file": "/var/lib/vm/disk.qcow2", "copy": true}],
        "params": {"multifd_channels": 4, "postcopy": false},
        "image_dir": "",
        "running": true
    });
    edit(&mut v);
    serde_json::to_string(&v).expect("a seed serializes")
}

fn cookie_seeds() -> Vec<(String, String)> {
    use serde_json::json;
    let set = |key: &'static str, val: serde_json::Value| cookie_json(move |v| v[key] = val);
    let disk = |key: &'static str, val: serde_json::Value| cookie_json(move |v| v["disks"][0][key] = val);
    let mut seeds: Vec<(String, String)> = vec![
        ("valid".into(), cookie_json(|_| {})),
        ("valid-shared-storage".into(), cookie_json(|v| v["disks"][0]["copy"] = json!(false))),
        ("valid-no-disks-paused".into(), cookie_json(|v| {
            v["disks"] = json!([]);
            v["running"] = json!(false);
            v["params"] = json!({"multifd_channels": null, "postcopy": true});
        })),
        ("valid-without-image-dir".into(), cookie_json(|v| {
            v.as_object_mut().map(|o| o.remove("image_dir"));
        })),
        ("id-dot".into(), set("migration", json!("."))),
        ("id-dotdot".into(), set("migration", json!(".."))),
        ("id-path-traversal".into(), set("migration", json!("../../etc"))),
        ("id-path-absolute".into(), set("migration", json!("/run/migtun"))),
        ("id-empty".into(), set("migration", json!(""))),
        ("id-65".into(), set("migration", json!("m".repeat(65)))),
        ("another-source".into(), set("source", json!("host-z"))),
        ("emulator-shell".into(), set("cmdline", json!(["/bin/sh", "-c", "id > /tmp/pwned"]))),
        ("forbidden-options".into(), set("cmdline", json!(["/usr/bin/qemu-system-x86_64", "-drive", "file=/etc/shadow",
            "-chardev", "file,id=c,path=/etc/passwd", "-netdev", "tap,id=n,script=/tmp/x", "-plugin", "/tmp/p.so",
            "-add-fd", "fd=3,set=1", "-readconfig", "/tmp/c", "-object", "memory-backend-file,id=m,mem-path=/dev/shm/x"]))),
        ("node-name-traversal".into(), disk("node_name", json!("../../escape"))),
        ("device-id-with-comma".into(), disk("device", json!("vd0,drive=x"))),
        ("disk-1-eib".into(), disk("size", json!(1u64 << 60))),
        ("disk-size-max".into(), disk("size", json!(u64::MAX))),
        ("disk-size-negative".into(), disk("size", json!(-1))),
        ("disk-size-float".into(), disk("size", json!(1.5))),
        ("disk-format-unknown".into(), disk("format", json!("vmdk;rm -rf"))),
        ("multifd-256".into(), cookie_json(|v| v["params"]["multifd_channels"] = json!(256))),
        ("unknown-field".into(), set("emulator", json!("/bin/sh"))),
        ("missing-source".into(), cookie_json(|v| {
            v.as_object_mut().map(|o| o.remove("source"));
        })),
        ("wrong-types".into(), set("cmdline", json!("qemu -m 512"))),
        ("nul-in-strings".into(), set("vm", json!("vm\u{0}1"))),
    ];
    seeds.extend([
        ("null".into(), "null".into()),
        ("array".into(), "[]".into()),
        ("empty".into(), String::new()),
        ("not-json".into(), "migration=m-1".into()),
        ("lone-surrogate".into(), format!("{{\"migration\":\"\\ud800\",{}", &cookie_json(|_| {})[1..])),
        ("duplicate-key".into(), format!("{{\"migration\":\"..\",{}", &cookie_json(|_| {})[1..])),
        ("deeply-nested".into(), format!("{}{}", "[".repeat(200), "]".repeat(200))),
    ]);
    seeds
}

fn rpc_seeds() -> Vec<(String, Vec<u8>)> {
    let kind = |name: &str| cf::RPC_KINDS.iter().position(|k| *k == name).expect("a known kind") as u8;
    let msg = |k: &str, body: &str| cat(&[vec![kind(k)], body.as_bytes().to_vec()]);
    let sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let header = |name: &str, size: &str| format!("{{\"migration\":\"{COOKIE_ID}\",\"name\":\"{name}\",\"size\":{size},\"sha256\":\"{sha}\"}}");
    vec![
        ("prepare-valid".into(), msg("prepare", &cookie_json(|_| {}))),
        ("prepare-id-dotdot".into(), msg("prepare", &cookie_json(|v| v["migration"] = "..".into()))),
        ("prepare-empty-body".into(), msg("prepare", "")),
        ("finish-success".into(), msg("finish", &format!("{{\"migration\":\"{COOKIE_ID}\",\"success\":true,\"resume\":true}}"))),
        ("finish-failure".into(), msg("finish", &format!("{{\"migration\":\"{COOKIE_ID}\",\"success\":false,\"resume\":false}}"))),
        ("finish-missing-field".into(), msg("finish", "{\"migration\":\"m-1\"}")),
        ("finish-string-bool".into(), msg("finish", "{\"migration\":\"m-1\",\"success\":\"yes\",\"resume\":true}")),
        ("upload-header-valid".into(), msg("upload-header", &header("vm1.nvram", "0"))),
        ("upload-header-traversal".into(), msg("upload-header", &header("../../etc/cron.d/x", "10"))),
        ("upload-header-dot".into(), msg("upload-header", &header(".", "10"))),
        ("upload-header-slash".into(), msg("upload-header", &header("a/b", "10"))),
        ("upload-header-huge-size".into(), msg("upload-header", &header("big.img", "18446744073709551615"))),
        ("upload-header-not-ascii".into(), cat(&[vec![kind("upload-header")], header("é.img", "1").into_bytes()])),
        ("upload-header-newline".into(), msg("upload-header", "{\"migration\":\"m-1\",\n\"name\":\"x\",\"size\":1,\"sha256\":\"\"}")),
        ("hello-reply".into(), msg("hello-reply", "{\"version\":1,\"agent\":\"0.1.0\",\"name\":\"host-b\",\"capabilities\":[\"files\",\"finish\",\"prepare\"]}")),
        ("hello-reply-version-overflow".into(), msg("hello-reply", "{\"version\":4294967296,\"agent\":\"\",\"name\":\"\",\"capabilities\":[]}")),
        ("prepare-reply".into(), msg("prepare-reply", &format!("{{\"ram_route\":\"{COOKIE_ID}.ram\",\"nbd_route\":\"{COOKIE_ID}.nbd\",\"qemu_version\":\"7.2.0\"}}"))),
        ("prepare-reply-no-nbd".into(), msg("prepare-reply", "{\"ram_route\":\"m-1.ram\",\"nbd_route\":null,\"qemu_version\":\"7.2.0\"}")),
        ("finish-reply-kept".into(), msg("finish-reply", "{\"guest_kept\":true,\"detail\":\"\"}")),
        ("finish-reply-quit".into(), msg("finish-reply", "{\"guest_kept\":false,\"detail\":\"destination QEMU quit\"}")),
        ("error-reply".into(), msg("error-reply", "{\"error\":\"host-z may not prepare a migration from host-a\"}")),
        ("error-reply-not-string".into(), msg("error-reply", "{\"error\":{\"nested\":true}}")),
        ("error-reply-empty".into(), msg("error-reply", "")),
        ("error-reply-not-json".into(), msg("error-reply", "<html>502 Bad Gateway</html>")),
        ("float-overflow".into(), msg("finish", "{\"migration\":1e999}")),
        ("empty".into(), vec![]),
    ]
}

fn qmp_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;
    let stream = |cap: u8, max: u8, lines: &[&str]| {
        let mut v = vec![cap, max];
        for l in lines {
            v.extend_from_slice(l.as_bytes());
            v.extend_from_slice(b"\r\n");
        }
        v
    };
    let real = 0x80;
    vec![
        ("session", stream(63, real, &[GREETING, r#"{"return": {}, "id": 0}"#, r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 1}"#])),
        ("query-status-small-reads", stream(0, real, &[r#"{"return": {"status": "inmigrate", "running": false}, "id": 7}"#])),
        ("query-block", stream(20, real, &[r#"{"return": [{"io-status": "ok", "device": "", "locked": false, "removable": false, "inserted": {"iops_rd": 0, "detect_zeroes": "off", "image": {"virtual-size": 1073741824, "filename": "/var/lib/vm/disk.qcow2", "cluster-size": 65536, "format": "qcow2", "actual-size": 200704, "dirty-flag": false}, "iops_wr": 0, "ro": false, "node-name": "drive0", "backing_file_depth": 0, "drv": "qcow2", "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0, "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/var/lib/vm/disk.qcow2"}, "qdev": "/machine/peripheral/vd0/virtio-backend", "type": "unknown"}], "id": 2}"#])),
        ("query-named-block-nodes", stream(33, real, &[r##"{"return": [{"node-name": "drive0", "file": "/var/lib/vm/disk.qcow2", "drv": "qcow2", "ro": false, "backing_file": "/var/lib/vm/base.raw", "image": {"filename": "/var/lib/vm/disk.qcow2", "format": "qcow2", "virtual-size": 1073741824}}, {"node-name": "#block123", "drv": "file", "image": {"virtual-size": 1073741824}}], "id": 3}"##])),
        ("query-block-jobs", stream(9, real, &[r#"{"return": [{"auto-finalize": true, "io-status": "ok", "device": "mirror-drive0", "auto-dismiss": true, "busy": false, "len": 1073741824, "offset": 1073741824, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "mirror"}], "id": 4}"#])),
        ("query-migrate-active", stream(48, real, &[r#"{"return": {"expected-downtime": 300, "status": "active", "setup-time": 2, "total-time": 1534, "ram": {"total": 554172416, "postcopy-requests": 0, "dirty-sync-count": 1, "multifd-bytes": 0, "pages-per-second": 31200, "downtime-bytes": 0, "page-size": 4096, "remaining": 416555008, "postcopy-bytes": 0, "mbps": 893.2, "transferred": 137984000, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 137984000, "duplicate": 1200, "dirty-pages-rate": 0, "skipped": 0, "normal-bytes": 137000000, "normal": 33447}}, "id": 5}"#])),
        ("query-migrate-failed", stream(48, real, &[r#"{"return": {"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}, "id": 6}"#])),
        ("query-migrate-none", stream(48, real, &[r#"{"return": {}, "id": 6}"#])),
        ("query-migrate-capabilities", stream(48, real, &[r#"{"return": [{"state": false, "capability": "xbzrle"}, {"state": true, "capability": "events"}, {"state": false, "capability": "multifd"}], "id": 8}"#])),
        ("error-reply", stream(48, real, &[r#"{"id": 9, "error": {"class": "GenericError", "desc": "Duplicate nodes with node-name='mt0'"}}"#])),
        ("events", stream(12, real, &[
            r#"{"timestamp": {"seconds": 1733046000, "microseconds": 123456}, "event": "STOP"}"#,
            r#"{"timestamp": {"seconds": 1733046001, "microseconds": 1}, "event": "MIGRATION", "data": {"status": "completed"}}"#,
            r#"{"timestamp": {"seconds": 1733046002, "microseconds": 2}, "event": "BLOCK_JOB_READY", "data": {"device": "mirror-drive0", "len": 1073741824, "offset": 1073741824, "speed": 0, "type": "mirror"}}"#,
            r#"{"event": "RESUME"}"#,
        ])),
        ("event-bad-timestamp", stream(48, real, &[r#"{"timestamp": {"seconds": -1, "microseconds": "x"}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "host-qmp-quit"}}"#])),
        ("event-name-not-string", stream(48, real, &[r#"{"event": 5}"#])),
        ("reply-string-id", stream(48, real, &[r#"{"return": {}, "id": "1"}"#])),
        ("reply-negative-id", stream(48, real, &[r#"{"return": {}, "id": -1}"#])),
        ("reply-without-id", stream(48, real, &[r#"{"return": {}}"#])),
        ("error-without-desc", stream(48, real, &[r#"{"error": {"class": "GenericError"}, "id": 1}"#])),
        ("second-greeting", stream(48, real, &[GREETING, GREETING])),
        ("greeting-malformed", stream(48, real, &[r#"{"QMP": {"version": {"qemu": {"major": "seven"}}}}"#])),
        ("not-an-object", stream(48, real, &["[1, 2, 3]"])),
        ("invalid-json", stream(48, real, &[r#"{"return": {"#])),
        ("whitespace-lines", stream(48, real, &["", "   ", "\t", r#"{"return": {}, "id": 1}"#])),
        ("line-over-limit", stream(5, 2, &[r#"{"return": {"status": "running", "running": true}, "id": 1}"#])),
        ("line-near-limit", stream(5, 3, &[r#"{"return": {"status": "running"}, "id": 1}"#])),
        ("truncated-at-eof", cat(&[vec![48, real], br#"{"return": {}, "id": 1"#.to_vec()])),
        ("nul-bytes", cat(&[vec![48, real], b"\0\0\0\n{\"return\": {}, \"id\": 1}\n".to_vec()])),
        ("deeply-nested", cat(&[vec![48, real], format!("{{\"return\": {}{}, \"id\": 1}}\n", "[".repeat(200), "]".repeat(200)).into_bytes()])),
        ("huge-number", stream(48, real, &[r#"{"return": {"status": "active", "ram": {"total": 1e400, "mbps": 1e308}}, "id": 1}"#])),
    ]
}
