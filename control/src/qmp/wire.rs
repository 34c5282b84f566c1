//! The QMP line protocol: bounded lines, and what each line is (greeting, reply, event). Pure:
//! nothing a peer sends makes it panic.


use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::*;

/// The QMP greeting: QEMU's version and the capabilities it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18`.
    pub package: String,
    /// Offered capabilities, e.g. `["oob"]` (none are enabled by this client).
    pub capabilities: Vec<String>,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// E.g. `STOP`, `RESUME`, `MIGRATION`, `BLOCK_JOB_READY`.
    pub name: String,
    /// The event's `data` member, `Value::Null` when QEMU sent none.
    pub data: Value,
    /// `(seconds, microseconds)` since the epoch, when QEMU sent a valid timestamp.
    pub timestamp: Option<(u64, u64)>,
}

/// One line from QEMU, classified. The output of the pure parser [`parse_message`].
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(Greeting),
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(Event),
}

/// Parses one line (without its line terminator; surrounding whitespace is ignored).
/// Errors are human-readable and quote the offending input.
pub fn parse_message(line: &[u8]) -> Result<Message, String> {
    classify(parse_json(line)?)
}

pub(super) fn parse_json(line: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(line).map_err(|e| format!("invalid JSON ({e}): {}", excerpt(line)))
}

pub(super) fn classify(value: Value) -> Result<Message, String> {
    let Value::Object(mut obj) = value else {
        return Err(format!(
            "expected a JSON object, got {}",
            excerpt_value(&value)
        ));
    };
    if let Some(body) = obj.remove("QMP") {
        return parse_greeting(body).map(Message::Greeting);
    }
    if let Some(name) = obj.get("event") {
        let Some(name) = name.as_str() else {
            return Err(format!(
                "event name is not a string: {}",
                excerpt_value(name)
            ));
        };
        let name = name.to_owned();
        let timestamp = obj.get("timestamp").and_then(|t| {
            Some((
                t.get("seconds")?.as_u64()?,
                t.get("microseconds")?.as_u64()?,
            ))
        });
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event(Event {
            name,
            data,
            timestamp,
        }));
    }
    let id = match obj.get("id") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            format!(
                "reply id is not one we send (an unsigned integer): {}",
                excerpt_value(v)
            )
        })?),
    };
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(error) = obj.get("error") {
        let field = |name: &str| error.get(name).and_then(Value::as_str).map(str::to_owned);
        let (Some(class), Some(desc)) = (field("class"), field("desc")) else {
            return Err(format!(
                "error reply without a string class and desc: {}",
                excerpt_value(error)
            ));
        };
        return Ok(Message::Error { id, class, desc });
    }
    Err(format!(
        "neither a reply, an error nor an event: {}",
        excerpt_value(&Value::Object(obj))
    ))
}

pub(super) fn parse_greeting(body: Value) -> Result<Greeting, String> {
    #[derive(Deserialize)]
    struct Body {
        version: Version,
        #[serde(default)]
        capabilities: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Version {
        qemu: Triple,
        #[serde(default)]
        package: String,
    }
    #[derive(Deserialize)]
    struct Triple {
        major: u32,
        minor: u32,
        micro: u32,
    }
    let b = Body::deserialize(&body)
        .map_err(|e| format!("malformed greeting ({e}): {}", excerpt_value(&body)))?;
    Ok(Greeting {
        major: b.version.qemu.major,
        minor: b.version.qemu.minor,
        micro: b.version.qemu.micro,
        package: b.version.package.trim().to_owned(),
        capabilities: b.capabilities,
    })
}

pub(super) fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

pub(super) fn excerpt_value(v: &Value) -> String {
    excerpt(v.to_string().as_bytes())
}

#[derive(Debug)]
pub(crate) enum LineError {
    Io(std::io::Error),
    TooLong,
    /// EOF after part of a line.
    Truncated,
}

/// Reads one `\n`-terminated line into `buf` (terminator included), at most `max` bytes before
/// the terminator. `Ok(false)` is a clean EOF before any byte of a new line.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, LineError> {
    loop {
        let avail = r.fill_buf().await.map_err(LineError::Io)?;
        if avail.is_empty() {
            return if buf.is_empty() {
                Ok(false)
            } else {
                Err(LineError::Truncated)
            };
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len() + take - usize::from(done) > max {
            return Err(LineError::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        if done {
            return Ok(true);
        }
    }
}
