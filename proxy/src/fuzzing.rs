//! Fuzzing entry points: one function per fuzz target, each taking the fuzzer's bytes.
//!
//! Not an API. The same functions run under libFuzzer (`fuzz/`, nightly, `cargo fuzz`) and on
//! stable inside `cargo test` (`tests/fuzz_corpus.rs`: the checked-in corpus plus seeded random
//! inputs), so both exercise exactly the code a hostile peer or a bad config file reaches. Every
//! function must return for any input, never panic; where a decoder promises something (bounds,
//! round trips, a consistent incremental answer) the function asserts it, so a broken promise
//! is a crash the fuzzer reports. Each returns a small summary of how deep the input got, which
//! the corpus test uses to check that the seeds still reach the interesting paths.
//!
//! Input layouts are described on each function and in `fuzz/README.md`.

use std::path::{Component, Path};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};

use crate::tls::record::{self, ContentType, Opener, HEADER_LEN, MAX_PLAINTEXT, MAX_RECORD, TAG_LEN};
use crate::route::wire::{self, Reply, Request};

/// The fuzzed connection's traffic key and IV: any fixed value does, the point is that the
/// fuzz input can produce records that authenticate, so the opener's work after decryption
/// (padding, inner type, lengths, the messages inside) is reachable.
const KEY: [u8; 32] = [0x42; 32];
const IV: [u8; NONCE_LEN] = [0x17; NONCE_LEN];

/// The two suites with 32-byte keys (AES-128 would need a 16-byte key rustls does not let
/// callers build).
fn suite(selector: u8) -> (SupportedCipherSuite, &'static aead::Algorithm, ConnectionTrafficSecrets) {
    use rustls::crypto::aws_lc_rs::cipher_suite::{TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
    if selector & 1 == 0 {
        (TLS13_AES_256_GCM_SHA384, &aead::AES_256_GCM, ConnectionTrafficSecrets::Aes256Gcm { key: KEY.into(), iv: IV.into() })
    } else {
        (
            TLS13_CHACHA20_POLY1305_SHA256,
            &aead::CHACHA20_POLY1305,
            ConnectionTrafficSecrets::Chacha20Poly1305 { key: KEY.into(), iv: IV.into() },
        )
    }
}

/// What [`record_open`] got through.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    /// Records that authenticated and parsed.
    pub opened: usize,
    /// Of those, handshake records whose messages all split cleanly.
    pub handshake_ok: usize,
    /// Why the stream stopped: a record error (the session would fail the connection), or
    /// `None` when the input simply ran out.
    pub error: Option<String>,
}

/// Fuzz target `record_open`: the receiving side of the record layer, as
/// `TlsSession::open_next` drives it, over a stream of records partly made by the input.
///
/// Layout: byte 0 picks the suite; then chunks `op | len_hi | len_lo | len bytes` (`len` is
/// cut to what is left). `op % 3`: 0 = the bytes go on the wire as they are; 1 = the bytes are
/// a record's *inner plaintext* (content, inner type, zero padding, exactly as the attacker
/// chooses), sealed under the next sequence number with a correct header; 2 = the first five
/// bytes are the header (also the AAD), the rest inner plaintext sealed under it. Every record
/// that authenticates is then taken apart like the session does: alerts, handshake messages.
pub fn record_open(data: &[u8]) -> RecordSummary {
    let Some((&selector, mut rest)) = data.split_first() else { return RecordSummary::default() };
    let (suite, alg, secrets) = suite(selector);
    let sealer = match UnboundKey::new(alg, &KEY) {
        Ok(k) => LessSafeKey::new(k),
        Err(_) => unreachable!("a 32-byte key fits both suites"),
    };
    let mut seq = 0u64;
    let mut wire = Vec::new();
    while let [op, hi, lo, more @ ..] = rest {
        let len = (u16::from_be_bytes([*hi, *lo]) as usize).min(more.len());
        let (bytes, tail) = more.split_at(len);
        rest = tail;
        match op % 3 {
            0 => wire.extend_from_slice(bytes),
            1 => {
                let inner = &bytes[..bytes.len().min(u16::MAX as usize - TAG_LEN)];
                let [h, l] = ((inner.len() + TAG_LEN) as u16).to_be_bytes();
                seal_into(&mut wire, &sealer, seq, [23, 3, 3, h, l], inner);
                seq += 1;
            }
            _ => {
                let Some((hdr, inner)) = bytes.split_first_chunk::<HEADER_LEN>() else {
                    wire.extend_from_slice(bytes);
                    continue;
                };
                seal_into(&mut wire, &sealer, seq, *hdr, inner);
                seq += 1;
            }
        }
    }
    let mut opener = match Opener::new(suite, 0, secrets) {
        Ok(o) => o,
        Err(e) => unreachable!("the fuzz keys fit their suite: {e}"),
    };
    open_all(&mut opener, &mut wire)
}

fn seal_into(wire: &mut Vec<u8>, key: &LessSafeKey, seq: u64, header: [u8; HEADER_LEN], inner: &[u8]) {
    let mut nonce = IV;
    for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    let start = wire.len();
    wire.extend_from_slice(&header);
    wire.extend_from_slice(inner);
    let tag = match key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut wire[start + HEADER_LEN..]) {
        Ok(t) => t,
        Err(_) => unreachable!("AEAD seal of a record-sized input cannot fail"),
    };
    wire.extend_from_slice(tag.as_ref());
}

/// The session's receive loop without the socket: measure, open, act, until an error or the
/// end of the bytes.
fn open_all(opener: &mut Opener, buf: &mut [u8]) -> RecordSummary {
    let mut summary = RecordSummary::default();
    let mut start = 0;
    loop {
        let avail = &mut buf[start..];
        let len = match record::record_len(avail) {
            Err(e) => {
                summary.error = Some(e.to_string());
                return summary;
            }
            Ok(Some(len)) if len <= avail.len() => len,
            Ok(_) => return summary,
        };
        assert!(len >= HEADER_LEN + TAG_LEN && len <= MAX_RECORD, "record_len measured {len} bytes");
        let (typ, range) = match opener.open(&mut avail[..len]) {
            Ok(r) => r,
            Err(e) => {
                summary.error = Some(e.to_string());
                return summary;
            }
        };
        assert!(range.start == HEADER_LEN && range.end <= len - TAG_LEN - 1, "content {range:?} of a {len}-byte record");
        assert!(range.len() <= MAX_PLAINTEXT, "content of {} bytes", range.len());
        let content = &avail[range];
        match typ {
            ContentType::ApplicationData => {}
            // The session reads exactly two-byte alerts and refuses any other length.
            ContentType::Alert => {}
            ContentType::Handshake => {
                if handshake_messages(content).complete {
                    summary.handshake_ok += 1;
                }
            }
        }
        summary.opened += 1;
        start += len;
    }
}

/// What [`handshake_messages`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeSummary {
    pub messages: usize,
    /// Every byte was part of a whole message.
    pub complete: bool,
}

/// Fuzz target `handshake_messages`: [`record::parse_post_handshake`], which takes a
/// post-handshake record's content apart into session tickets and key updates. The input is the
/// record's content.
///
/// Asserted: accepted content is covered exactly by whole messages, each where its header says,
/// a key update (one byte, 0 or 1) only last; a refusal is one the peer caused, so it has the
/// fatal alert the session sends for it.
pub fn handshake_messages(content: &[u8]) -> HandshakeSummary {
    let messages = match record::parse_post_handshake(content) {
        Ok(m) => m,
        Err(e) => {
            assert!(e.alert().is_some(), "a refused handshake record must get an alert: {e}");
            return HandshakeSummary { messages: 0, complete: false };
        }
    };
    assert!(!content.is_empty(), "an empty handshake record was accepted");
    let mut used = 0usize;
    for (i, m) in messages.iter().enumerate() {
        let header = &content[used..used + 4];
        let len = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
        match m {
            record::PostHandshake::NewSessionTicket(body) => {
                assert_eq!(header[0], 4, "not a NewSessionTicket");
                assert_eq!(body.len(), len);
                assert!(std::ptr::eq(body.as_ptr(), content[used + 4..].as_ptr()), "body is not where its header says");
            }
            record::PostHandshake::KeyUpdate { request } => {
                assert_eq!((header[0], len), (24, 1), "not a one-byte KeyUpdate");
                assert_eq!(content[used + 4], u8::from(*request));
                assert_eq!(i, messages.len() - 1, "a key update that is not last in its record");
            }
        }
        used += 4 + len;
    }
    assert_eq!(used, content.len(), "bytes left over without an error");
    HandshakeSummary { messages: messages.len(), complete: true }
}

/// What [`preamble`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PreambleSummary {
    pub request: bool,
    pub reply: bool,
}

/// Fuzz target `preamble`: the stream preamble's request and reply decoders on the same bytes.
///
/// Asserted: a decoded message lies within the buffer and the wire's limits, re-encodes to
/// exactly the bytes it was decoded from, passes the constructor's own validation, decodes
/// the same from just those bytes, and one byte fewer is "need more" (the decoders are
/// incremental: the receiver calls them on whatever has arrived).
pub fn preamble(data: &[u8]) -> PreambleSummary {
    let mut summary = PreambleSummary::default();
    if let Ok(Some((req, used))) = Request::decode(data) {
        assert!(used <= data.len() && used <= wire::MAX_REQUEST_LEN, "request used {used} bytes");
        assert_eq!(req.encode(), &data[..used], "request does not re-encode to its bytes");
        assert_eq!(Request::new(&req.route, req.migration.as_deref()).as_ref(), Ok(&req), "decoded request fails validation");
        assert_eq!(Request::decode(&data[..used]), Ok(Some((req, used))));
        assert_eq!(Request::decode(&data[..used - 1]), Ok(None), "request complete one byte early");
        summary.request = true;
    }
    // Incremental consistency: what a prefix already decided (an error, or a complete
    // request), the whole input decides the same way.
    let full = Request::decode(data);
    for cut in 0..data.len().min(wire::MAX_REQUEST_LEN + 1) {
        match Request::decode(&data[..cut]) {
            Ok(None) => {}
            decided => assert_eq!(decided, full, "a prefix of {cut} bytes decided differently"),
        }
    }
    if let Ok(Some((reply, used))) = Reply::decode(data) {
        assert!(used <= data.len() && used <= wire::MAX_REPLY_LEN, "reply used {used} bytes");
        assert_eq!(reply.encode(), &data[..used], "reply does not re-encode to its bytes");
        assert_eq!(Reply::decode(&data[..used]), Ok(Some((reply.clone(), used))));
        assert_eq!(Reply::decode(&data[..used - 1]), Ok(None), "reply complete one byte early");
        let _ = (reply.code.reason(), reply.code.to_string());
        summary.reply = true;
    }
    summary
}

/// Fuzz target `config`: [`crate::Config::from_toml`] (what `migtun check` and the agent run)
/// on the input as TOML, with relative paths resolved against `base`, then
/// [`crate::Config::explain`] on success. Returns the validation error, if any.
///
/// `base` holds fixture files (`fuzz/fixture.rs` writes a CA, a certificate for `fuzz-host`
/// and its key). The loader reads the files `tls.cert`, `tls.key` and `tls.ca` name: inputs
/// whose TLS paths are absolute or climb out with `..` are skipped (`None`), so that the
/// fuzzer cannot make it read `/dev/zero` or the machine's own files; a non-existent file
/// inside `base` is fine, and a clear error.
pub fn config(data: &[u8], base: &Path) -> Option<Result<(), String>> {
    let text = std::str::from_utf8(data).ok()?;
    if let Ok(table) = text.parse::<toml::Table>() {
        if let Some(tls) = table.get("tls").and_then(toml::Value::as_table) {
            for v in tls.values() {
                let Some(p) = v.as_str() else { continue };
                let p = Path::new(p);
                if p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
                    return None;
                }
            }
        }
    }
    Some(match crate::Config::from_toml(text, "fuzz.toml", base) {
        Ok(c) => {
            let explained = c.explain();
            assert!(explained.contains(&c.name));
            Ok(())
        }
        Err(e) => {
            let shown = e.to_string();
            // One line, naming the file: what `migtun check` prints.
            assert!(!shown.contains('\n') && shown.starts_with("fuzz.toml: "), "error is not one line naming the file: {shown:?}");
            Err(shown)
        }
    })
}
