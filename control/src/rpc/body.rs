//! Bounded reading of HTTP/2 bodies, for both sides: a JSON body up to a limit, and the draining
//! of what is left of a refused request.

use bytes::BytesMut;
use h2::RecvStream;

/// Why a JSON body was not read.
#[derive(Debug)]
pub(super) enum BodyError {
    /// More than the limit (in bytes); reading stopped there.
    TooLarge(usize),
    Read(String),
    NotJson(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(limit) => write!(f, "body larger than {limit} bytes"),
            BodyError::Read(e) => write!(f, "reading the body: {e}"),
            BodyError::NotJson(e) => write!(f, "body is not JSON: {e}"),
        }
    }
}

/// Reads and drops up to `limit` bytes of what is left of `body`.
pub(super) async fn drain(body: &mut RecvStream, limit: usize) {
    let mut left = limit;
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        match left.checked_sub(chunk.len()) {
            Some(l) => left = l,
            None => return,
        }
    }
}

/// Reads a JSON body of at most `limit` bytes; stops reading at the limit.
pub(super) async fn read_json_body(body: &mut RecvStream, limit: usize) -> Result<serde_json::Value, BodyError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&buf).map_err(|e| BodyError::NotJson(e.to_string()))
}

