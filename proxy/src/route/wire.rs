//! The stream preamble: the first bytes of every tunnelled data stream, and the receiver's reply.
//!
//! Pure encode/decode, no I/O, so it can be tested and fuzzed on its own. Decoding is
//! incremental: `decode` is called with whatever bytes have arrived and answers "need more",
//! a complete message plus how many bytes it used, or an error. Every size is bounded, so a
//! peer cannot make the receiver buffer more than [`MAX_REQUEST_LEN`] bytes before it decides.
//!
//! ```text
//! request:  "MGTN" | version u8 | route_len u8 | route | id_len u8 | migration id
//! reply:    version u8 | code u8 | detail_len u8 | detail (UTF-8)
//! ```
//!
//! Route names and migration ids are 1..=64 (ids 0..=64) bytes of `[A-Za-z0-9._-]`, other than
//! `.` and `..`, which keeps them safe in logs, metric labels and file names.

use std::fmt;

/// Identifies a migtun data stream; anything else is a protocol error before any byte is relayed.
pub const MAGIC: [u8; 4] = *b"MGTN";
/// The preamble version this build speaks. A receiver answers a newer one with
/// [`ReplyCode::UnsupportedVersion`], carrying its own version, so the sender can tell.
pub const VERSION: u8 = 1;
/// Longest route name or migration id.
pub const MAX_NAME_LEN: usize = 64;
/// Longest request: magic, version, two length bytes and two names.
pub const MAX_REQUEST_LEN: usize = 4 + 1 + 1 + MAX_NAME_LEN + 1 + MAX_NAME_LEN;
/// Longest human-readable detail in a reply.
pub const MAX_DETAIL_LEN: usize = 255;
/// Longest reply.
pub const MAX_REPLY_LEN: usize = 3 + MAX_DETAIL_LEN;

/// What the source asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub route: String,
    /// Set on dynamic routes that belong to one migration.
    pub migration: Option<String>,
}

/// The receiver's verdict on a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyCode {
    Ok,
    UnknownRoute,
    Forbidden,
    TargetUnreachable,
    UnsupportedVersion,
    Malformed,
    Draining,
    Internal,
    /// A code from a newer receiver that this build does not know.
    Other(u8),
}

impl ReplyCode {
    fn to_byte(self) -> u8 {
        match self {
            ReplyCode::Ok => 0,
            ReplyCode::UnknownRoute => 1,
            ReplyCode::Forbidden => 2,
            ReplyCode::TargetUnreachable => 3,
            ReplyCode::UnsupportedVersion => 4,
            ReplyCode::Malformed => 5,
            ReplyCode::Draining => 6,
            ReplyCode::Internal => 7,
            ReplyCode::Other(b) => b,
        }
    }

    fn from_byte(b: u8) -> Self {
        match b {
            0 => ReplyCode::Ok,
            1 => ReplyCode::UnknownRoute,
            2 => ReplyCode::Forbidden,
            3 => ReplyCode::TargetUnreachable,
            4 => ReplyCode::UnsupportedVersion,
            5 => ReplyCode::Malformed,
            6 => ReplyCode::Draining,
            7 => ReplyCode::Internal,
            other => ReplyCode::Other(other),
        }
    }

    /// Short stable name, used in logs and as the `reason` metric label.
    pub fn reason(self) -> &'static str {
        match self {
            ReplyCode::Ok => "ok",
            ReplyCode::UnknownRoute => "unknown-route",
            ReplyCode::Forbidden => "forbidden",
            ReplyCode::TargetUnreachable => "target-unreachable",
            ReplyCode::UnsupportedVersion => "unsupported-version",
            ReplyCode::Malformed => "malformed",
            ReplyCode::Draining => "draining",
            ReplyCode::Internal => "internal",
            ReplyCode::Other(_) => "unknown-reply",
        }
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyCode::Other(b) => write!(f, "unknown-reply({b})"),
            c => f.write_str(c.reason()),
        }
    }
}

/// The receiver's answer: a code, the receiver's preamble version, and a detail for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub version: u8,
    pub code: ReplyCode,
    pub detail: String,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply { version: VERSION, code: ReplyCode::Ok, detail: String::new() }
    }

    pub fn refuse(code: ReplyCode, detail: impl Into<String>) -> Reply {
        Reply { version: VERSION, code, detail: detail.into() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a migtun stream (bad magic)")]
    BadMagic,
    #[error("preamble version {0} is newer than this agent's {VERSION}")]
    UnsupportedVersion(u8),
    #[error("bad {what}: {why}")]
    BadName { what: &'static str, why: &'static str },
    #[error("reply detail is not UTF-8")]
    BadDetail,
}

/// Checks a route name or migration id against the wire's rules.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 64 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err("only letters, digits, '.', '_' and '-' are allowed");
    }
    // Names become path components (a migration's directory, an uploaded file): `.` and `..`
    // would name the directory itself or its parent.
    if name == "." || name == ".." {
        return Err("'.' and '..' are not names");
    }
    Ok(())
}

impl Request {
    pub fn new(route: &str, migration: Option<&str>) -> Result<Request, WireError> {
        validate_name(route).map_err(|why| WireError::BadName { what: "route", why })?;
        if let Some(id) = migration {
            validate_name(id).map_err(|why| WireError::BadName { what: "migration id", why })?;
        }
        Ok(Request { route: route.to_string(), migration: migration.map(str::to_string) })
    }

    pub fn encode(&self) -> Vec<u8> {
        let id = self.migration.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(7 + self.route.len() + id.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        // Lengths fit in a byte: names are validated to at most MAX_NAME_LEN on construction.
        out.push(self.route.len() as u8);
        out.extend_from_slice(self.route.as_bytes());
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out
    }

    /// `Ok(None)`: need more bytes. `Ok(Some((request, used)))`: complete, `used` bytes consumed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Request, usize)>, WireError> {
        let magic_seen = buf.len().min(MAGIC.len());
        if buf[..magic_seen] != MAGIC[..magic_seen] {
            return Err(WireError::BadMagic);
        }
        let mut r = Reader { buf, pos: MAGIC.len() };
        let Some(version) = r.byte() else { return Ok(None) };
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let Some(route) = r.name("route", false)? else { return Ok(None) };
        let Some(id) = r.name("migration id", true)? else { return Ok(None) };
        let migration = (!id.is_empty()).then_some(id);
        Ok(Some((Request { route, migration }, r.pos)))
    }
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut detail = self.detail.as_str();
        if detail.len() > MAX_DETAIL_LEN {
            let mut end = MAX_DETAIL_LEN;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail = &detail[..end];
        }
        let mut out = Vec::with_capacity(3 + detail.len());
        out.push(self.version);
        out.push(self.code.to_byte());
        out.push(detail.len() as u8);
        out.extend_from_slice(detail.as_bytes());
        out
    }

    /// Like [`Request::decode`]. Any version is accepted here: the code tells what happened.
    pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, WireError> {
        let mut r = Reader { buf, pos: 0 };
        let (Some(version), Some(code), Some(len)) = (r.byte(), r.byte(), r.byte()) else {
            return Ok(None);
        };
        let Some(detail) = r.take(len as usize) else { return Ok(None) };
        let detail = std::str::from_utf8(detail).map_err(|_| WireError::BadDetail)?.to_string();
        Ok(Some((Reply { version, code: ReplyCode::from_byte(code), detail }, r.pos)))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }

    fn name(&mut self, what: &'static str, may_be_empty: bool) -> Result<Option<String>, WireError> {
        let Some(len) = self.byte() else { return Ok(None) };
        let len = len as usize;
        if len > MAX_NAME_LEN {
            return Err(WireError::BadName { what, why: "longer than 64 bytes" });
        }
        let Some(bytes) = self.take(len) else { return Ok(None) };
        if len == 0 && may_be_empty {
            return Ok(Some(String::new()));
        }
        let name = std::str::from_utf8(bytes).map_err(|_| WireError::BadName { what, why: "not UTF-8" })?;
        validate_name(name).map_err(|why| WireError::BadName { what, why })?;
        Ok(Some(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_at_every_split() {
        for id in [None, Some("mig-0001")] {
            let req = Request::new("migration.nbd_0", id).unwrap();
            let bytes = req.encode();
            for cut in 0..bytes.len() {
                assert_eq!(Request::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
            }
            let mut with_tail = bytes.clone();
            with_tail.extend_from_slice(b"payload");
            assert_eq!(Request::decode(&with_tail), Ok(Some((req.clone(), bytes.len()))));
        }
    }

    #[test]
    fn reply_round_trips_and_truncates_detail_on_char_boundary() {
        let r = Reply::refuse(ReplyCode::TargetUnreachable, "é".repeat(200));
        let bytes = r.encode();
        assert!(bytes.len() <= MAX_REPLY_LEN);
        for cut in 0..bytes.len() {
            assert_eq!(Reply::decode(&bytes[..cut]), Ok(None));
        }
        let (back, used) = Reply::decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back.code, ReplyCode::TargetUnreachable);
        assert_eq!(back.detail, "é".repeat(127));
        assert_eq!(Reply::decode(&[1, 200, 0]).unwrap().unwrap().0.code, ReplyCode::Other(200));
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        assert_eq!(Request::decode(b"GET / HTTP/1.1"), Err(WireError::BadMagic));
        assert_eq!(Request::decode(b"MX"), Err(WireError::BadMagic));
        assert_eq!(Request::decode(b"MGTN\x02"), Err(WireError::UnsupportedVersion(2)));
        assert!(matches!(Request::decode(b"MGTN\x01\x00\x00"), Err(WireError::BadName { what: "route", .. })));
        assert!(matches!(Request::decode(b"MGTN\x01\xff"), Err(WireError::BadName { .. })));
        assert!(matches!(Request::decode(b"MGTN\x01\x03a/b\x00"), Err(WireError::BadName { .. })));
        assert!(matches!(Request::decode(b"MGTN\x01\x01a\x02\xff\xfe"), Err(WireError::BadName { .. })));
        assert!(Request::new(&"r".repeat(65), None).is_err());
        assert!(Request::new("r", Some("")).is_err());
    }

    /// Found by the `rpc_message` and `cookie` fuzz targets: `.` and `..` passed, and a name
    /// is used as a path component (the migration's directory, an uploaded file's name).
    #[test]
    fn dot_and_dot_dot_are_not_names() {
        for name in [".", ".."] {
            assert_eq!(validate_name(name), Err("'.' and '..' are not names"));
            assert!(Request::new(name, None).is_err());
            assert!(Request::new("r", Some(name)).is_err());
            let mut wire = b"MGTN\x01\x01r".to_vec();
            wire.push(name.len() as u8);
            wire.extend_from_slice(name.as_bytes());
            assert!(matches!(Request::decode(&wire), Err(WireError::BadName { what: "migration id", .. })));
        }
        for name in ["...", ".a", "a..b", "m-0123456789abcdef"] {
            assert_eq!(validate_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_overrun() {
        // A small deterministic fuzz loop: every prefix of pseudo-random input decodes to
        // need-more, a message within the buffer, or an error.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut buf = b"MGTN\x01".to_vec();
            let n = (x % 150) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push((x % 7) as u8 * 17 + b'-');
            }
            if let Ok(Some((_, used))) = Request::decode(&buf) {
                assert!(used <= buf.len() && used <= MAX_REQUEST_LEN);
            }
            if let Ok(Some((_, used))) = Reply::decode(&buf) {
                assert!(used <= buf.len() && used <= MAX_REPLY_LEN);
            }
        }
    }
}
