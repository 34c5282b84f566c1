//! Fuzzing entry points: one function per fuzz target, each taking the fuzzer's bytes.
//!
//! Not an API. The same functions run under libFuzzer (`fuzz/`, nightly, `cargo fuzz`) and on
//! stable inside `cargo test` (`tests/fuzz_corpus.rs`), so both exercise what a peer's control
//! messages and whatever sits on a QMP socket reach. Every function must return for any input,
//! never panic; where a decoder promises something (a round trip, a bound) it is asserted, so a
//! broken promise is a crash the fuzzer reports. Each returns a small summary of how deep the
//! input got, which the corpus test uses to check that the seeds still reach the deep paths.
//!
//! Input layouts are described on each function and in `fuzz/README.md`.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::destination::{self, cmdline::Layout, Policy};
use crate::messages::{Cookie, FinishReply, FinishRequest, PrepareReply};
use crate::qmp::{self, BlockDeviceInfo, BlockInfo, BlockJobInfo, LineError, Message, MigrationCapability, MigrationInfo, Status};
use crate::rpc::{FileHeader, Hello, MAX_JSON_BODY};

/// The authenticated peer the fuzzed messages come from (its certificate's name).
pub const FUZZ_PEER: &str = "host-a";

/// The RPC messages [`rpc_message`] decodes, by the input's first byte (modulo their number).
pub const RPC_KINDS: [&str; 7] = ["prepare", "finish", "upload-header", "hello-reply", "prepare-reply", "finish-reply", "error-reply"];

/// What [`rpc_message`] and [`cookie`] got through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcOutcome {
    /// Not JSON, or over [`MAX_JSON_BODY`]: the server answers 400.
    NotJson,
    /// JSON, but not the message's shape: 400 (or a protocol error on the client side).
    BadShape,
    /// Decoded, then refused by the checks that run before anything acts on it.
    Refused(String),
    /// Decoded and accepted.
    Accepted,
}

/// Fuzz target `rpc_message`: a control RPC body from a peer, decoded the way the agent
/// decodes it. Layout: byte 0 picks the message ([`RPC_KINDS`]), the rest is the body (for
/// `upload-header`, the `x-migtun-file` header's value).
///
/// The server side (`prepare`, `finish`, `upload-header`) and the client side (the replies a
/// source reads from the destination) both take these from a peer that may be hostile. What
/// decodes must also re-encode and decode to the same value (the agent re-serializes the
/// cookie for the hook).
pub fn rpc_message(data: &[u8]) -> RpcOutcome {
    let Some((&kind, body)) = data.split_first() else { return RpcOutcome::NotJson };
    match RPC_KINDS[kind as usize % RPC_KINDS.len()] {
        "prepare" => match typed::<Cookie>(body) {
            Ok(c) => cookie_checks(&c),
            Err(o) => o,
        },
        "finish" => match typed::<FinishRequest>(body) {
            // `finish` names a migration; the agent looks it up, it is never a path.
            Ok(_) => RpcOutcome::Accepted,
            Err(o) => o,
        },
        "upload-header" => upload_header(body),
        "hello-reply" => typed::<Hello>(body).map(|_| RpcOutcome::Accepted).unwrap_or_else(|o| o),
        "prepare-reply" => typed::<PrepareReply>(body).map(|_| RpcOutcome::Accepted).unwrap_or_else(|o| o),
        "finish-reply" => typed::<FinishReply>(body).map(|_| RpcOutcome::Accepted).unwrap_or_else(|o| o),
        _ => match json_body(body) {
            // The client reads `error` from a refusal's body, anything else is "no detail".
            Some(v) => {
                let _ = v.get("error").and_then(Value::as_str).unwrap_or("no detail");
                RpcOutcome::Accepted
            }
            None => RpcOutcome::NotJson,
        },
    }
}

/// Fuzz target `cookie`: a `prepare` body (the cookie, JSON) decoded and checked as the
/// destination does before any hook runs, then serialized as the hook reads it.
pub fn cookie(data: &[u8]) -> RpcOutcome {
    match typed::<Cookie>(data) {
        Ok(c) => cookie_checks(&c),
        Err(o) => o,
    }
}

/// The destination's image directory for the fuzzed cookies: a real, empty directory, because
/// the command-line builder canonicalizes it (it must exist, as it does in `prepare`).
fn fuzz_layout() -> Option<&'static Layout> {
    static LAYOUT: std::sync::OnceLock<Option<Layout>> = std::sync::OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("migtun-fuzz-{}", std::process::id())).join("images");
            std::fs::create_dir_all(&dir).ok()?;
            let image_dir = dir.canonicalize().ok()?;
            let run = image_dir.parent()?.to_path_buf();
            Some(Layout { image_dir, qmp: run.join("qmp.sock"), pidfile: run.join("qemu.pid") })
        })
        .as_ref()
}

/// What `Incoming::prepare` checks before it creates anything (the caller is the cookie's
/// source, [`destination::cookie::validate`], [`destination::cmdline::build`]), then the hook's
/// input. Asserted of every plan built: argv[0] is the configured emulator, every image is a
/// file directly inside the image directory, and the sandbox is on.
fn cookie_checks(cookie: &Cookie) -> RpcOutcome {
    if cookie.source != FUZZ_PEER {
        return RpcOutcome::Refused(format!("{FUZZ_PEER} may not prepare a migration from {}", cookie.source));
    }
    let policy = Policy { shared_storage: vec![std::path::PathBuf::from("/nonexistent-migtun-shared")], ..Policy::default() };
    if let Err(e) = destination::cookie::validate(cookie, &policy) {
        return RpcOutcome::Refused(e.to_string());
    }
    let Some(layout) = fuzz_layout() else { return RpcOutcome::Refused("no temporary directory for the fuzz layout".into()) };
    let plan = match destination::cmdline::build(cookie, &policy, layout) {
        Ok(p) => p,
        Err(e) => return RpcOutcome::Refused(e.to_string()),
    };
    assert_eq!(plan.argv.first().map(std::path::Path::new), Some(policy.emulator.as_path()), "argv[0] is not qemu.emulator");
    for image in &plan.images {
        assert_eq!(image.path.parent(), Some(layout.image_dir.as_path()), "image {:?} outside the image directory", image.path);
    }
    assert!(plan.argv.iter().any(|a| a == "-sandbox"), "a plan without -sandbox");

    // The hook reads the cookie re-serialized (`run_hook`): it must say what was accepted.
    let hook_input = match serde_json::to_vec_pretty(cookie) {
        Ok(v) => v,
        Err(e) => panic!("an accepted cookie does not serialize: {e}"),
    };
    match serde_json::from_slice::<Cookie>(&hook_input) {
        Ok(back) => assert_eq!(&back, cookie, "the hook would read a different cookie"),
        Err(e) => panic!("the hook's input does not decode: {e}"),
    }
    RpcOutcome::Accepted
}

/// `x-migtun-file`: an HTTP header value (visible ASCII), JSON, then the file name check of
/// `Incoming::receive_file`.
fn upload_header(value: &[u8]) -> RpcOutcome {
    let Ok(text) = http::HeaderValue::from_bytes(value).map_err(drop).and_then(|v| v.to_str().map(str::to_owned).map_err(drop)) else {
        return RpcOutcome::NotJson;
    };
    let header: FileHeader = match serde_json::from_str(&text) {
        Ok(h) => h,
        Err(_) => return RpcOutcome::BadShape,
    };
    round_trip(&header);
    if let Err(why) = migtun_proxy::route::wire::validate_name(&header.name) {
        return RpcOutcome::Refused(format!("file name {:?}: {why}", header.name));
    }
    assert!(!header.name.contains('/') && header.name != "." && header.name != "..", "file name {:?} passed the check", header.name);
    RpcOutcome::Accepted
}

/// The body as `read_json_body` turns it into JSON: empty is `null`, over the limit refused.
fn json_body(body: &[u8]) -> Option<Value> {
    if body.len() > MAX_JSON_BODY {
        return None;
    }
    if body.is_empty() {
        return Some(Value::Null);
    }
    serde_json::from_slice(body).ok()
}

/// Body → JSON → the typed message, as the router and `Incoming::register` do.
fn typed<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(body: &[u8]) -> Result<T, RpcOutcome> {
    let value = json_body(body).ok_or(RpcOutcome::NotJson)?;
    let t: T = serde_json::from_value(value).map_err(|_| RpcOutcome::BadShape)?;
    round_trip(&t);
    Ok(t)
}

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(t: &T) {
    let value = match serde_json::to_value(t) {
        Ok(v) => v,
        Err(e) => panic!("a decoded message does not encode: {e}"),
    };
    match serde_json::from_value::<T>(value) {
        Ok(back) => assert_eq!(&back, t, "message changed in a round trip"),
        Err(e) => panic!("a re-encoded message does not decode: {e}"),
    }
}

/// What [`qmp_stream`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QmpSummary {
    pub greetings: usize,
    pub returns: usize,
    pub errors: usize,
    pub events: usize,
    /// `return` values that decoded as one of the typed replies migtun reads.
    pub typed: usize,
    /// Why the connection would fail (the reader task's verdict), `None` at a clean end.
    pub failure: Option<String>,
}

/// Fuzz target `qmp`: what the QMP reader task does with the bytes QEMU (or whatever sits on
/// the socket) sends: bounded lines, each parsed by `qmp::parse_message`, replies decoded into
/// the typed replies migtun uses. Layout: byte 0 sets the read buffer's size (1..=64, so that
/// lines cross reads), byte 1 the line limit (`0x80` and up: the real [`qmp::MAX_LINE`]; else
/// 16 + 8 × the byte); the rest is the socket's byte stream.
pub fn qmp_stream(data: &[u8]) -> QmpSummary {
    let mut summary = QmpSummary::default();
    let [cap, max, stream @ ..] = data else { return summary };
    let max = if max & 0x80 != 0 { qmp::MAX_LINE } else { 16 + 8 * *max as usize };
    let mut rd = tokio::io::BufReader::with_capacity(1 + (*cap as usize % 64), stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match ready_now(qmp::read_line(&mut rd, &mut line, max)) {
            Ok(true) => {}
            Ok(false) => return summary,
            Err(LineError::Truncated) => return summary,
            Err(LineError::Io(e)) => panic!("reading memory failed: {e}"),
            Err(LineError::TooLong) => {
                assert!(line.len() <= max + 1, "buffered {} bytes of a line limited to {max}", line.len());
                summary.failure = Some(format!("line longer than {max} bytes"));
                return summary;
            }
        }
        assert!(line.len() <= max + 1 && line.ends_with(b"\n"), "line of {} bytes, limit {max}", line.len());
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match qmp::parse_message(&line) {
            Err(e) => {
                summary.failure = Some(e);
                return summary;
            }
            Ok(Message::Greeting(_)) => summary.greetings += 1,
            Ok(Message::Error { .. }) => summary.errors += 1,
            Ok(Message::Event(_)) => summary.events += 1,
            Ok(Message::Return { value, .. }) => {
                summary.returns += 1;
                let decoded = [
                    decodes::<Status>(&value),
                    decodes::<Vec<BlockInfo>>(&value),
                    decodes::<Vec<BlockDeviceInfo>>(&value),
                    decodes::<Vec<BlockJobInfo>>(&value),
                    decodes::<MigrationInfo>(&value),
                    decodes::<Vec<MigrationCapability>>(&value),
                ];
                if decoded.iter().any(|&d| d) {
                    summary.typed += 1;
                }
            }
        }
    }
}

/// As `qmp::decode` (what `Qmp::call` does with a reply).
fn decodes<T: DeserializeOwned>(value: &Value) -> bool {
    T::deserialize(value).is_ok()
}

/// Polls a future that cannot wait (it reads from memory) to its end.
fn ready_now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("a read from memory never waits"),
    }
}
