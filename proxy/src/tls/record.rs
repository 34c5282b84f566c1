//! The TLS 1.3 record layer of a data connection, done in place (RFC 8446 §5).
//!
//! rustls does the handshake; once it is over, [`crate::tls::session`] takes the traffic secrets
//! (rustls' kernel-connection API, made for kTLS) and protects records here instead. The point is
//! where the bytes live: a record is read from the socket into a buffer, decrypted in that buffer
//! and written to the local socket from it; on the way out, plaintext is sealed where it lies in
//! the outgoing buffer. rustls' own buffered connection copies each byte twice more on the
//! receiving side (into its deframer, then out to the caller), which cost a fifth of the
//! receiving agent's time (see README.md, "What the design does for speed").
//!
//! No I/O here: [`Sealer`], [`Opener`] and the parsers work on byte slices, so they are tested
//! against rustls itself and RFC 8448's vectors without sockets, and fuzzed the same way. The
//! entry points for a fuzz target are [`Opener::open_next`] (framing, decryption and the inner
//! plaintext checks of the record at the start of a buffer; an opener for any key is
//! `Opener::new(TLS13_AES_256_GCM_SHA384, 0, ConnectionTrafficSecrets::Aes256Gcm { key: [k; 32]
//! .into(), iv: [i; 12].into() })`), [`record_len`] (framing alone), [`parse_inner_plaintext`]
//! (what follows decryption, without the crypto), [`parse_post_handshake`] (the handshake
//! messages of one record after the handshake) and [`parse_alert`]. Every error names the alert
//! it must be answered with ([`RecordError::alert`]).

use std::ops::Range;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{AlertDescription, ConnectionTrafficSecrets, SupportedCipherSuite};

/// Largest plaintext in one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest TLSInnerPlaintext: content, content type and padding together (RFC 8446 §5.4).
pub const MAX_INNER_PLAINTEXT: usize = MAX_PLAINTEXT + 1;
/// Record header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// Every TLS 1.3 AEAD has a 16-byte tag.
pub const TAG_LEN: usize = 16;
/// Largest ciphertext a peer may send in one record (RFC 8446 §5.2: plaintext plus 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest record on the wire.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// What sealing adds to a payload: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;
/// Largest record we send: a full plaintext record.
pub const MAX_SEALED: usize = MAX_PLAINTEXT + OVERHEAD;

/// The outer type of every protected record, and the inner type of data.
const APPLICATION_DATA: u8 = 23;
const LEGACY_VERSION: [u8; 2] = [0x03, 0x03];

/// Records that may be sealed under one key before it must be replaced: rustls' own margin
/// under each suite's confidentiality limit (AES-GCM: 2^24 records, RFC 8446 §5.5, with
/// rustls' 2^24 as the limit), minus room to send the key update itself.
const KEY_UPDATE_MARGIN: u64 = 1 << 16;

/// The content type inside a protected record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    Alert,
    Handshake,
    ApplicationData,
}

impl ContentType {
    fn byte(self) -> u8 {
        match self {
            ContentType::Alert => 21,
            ContentType::Handshake => 22,
            ContentType::ApplicationData => APPLICATION_DATA,
        }
    }

    fn from_byte(b: u8) -> Option<ContentType> {
        match b {
            21 => Some(ContentType::Alert),
            22 => Some(ContentType::Handshake),
            APPLICATION_DATA => Some(ContentType::ApplicationData),
            _ => None,
        }
    }
}

/// What is wrong with a record or with what it carries. Each names the fatal alert the peer
/// is sent for it ([`RecordError::alert`]).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of type {0} after the handshake (only protected records are allowed)")]
    UnexpectedOuterType(u8),
    #[error("record with version {0:#06x} (TLS 1.3 records say 0x0303)")]
    BadVersion(u16),
    #[error("record of {0} bytes is over the limit of {MAX_CIPHERTEXT}")]
    TooLong(usize),
    #[error("record decrypts to {0} bytes of inner plaintext, over the limit of {MAX_INNER_PLAINTEXT}")]
    InnerTooLong(usize),
    #[error("record too short to hold a tag")]
    TooShort,
    #[error("record failed authentication (corrupted, or not from the peer)")]
    Decrypt,
    #[error("record with no content type (its inner plaintext is all zeros)")]
    NoInnerType,
    #[error("record with inner content type {0}")]
    BadInnerType(u8),
    #[error("empty handshake record")]
    EmptyHandshake,
    #[error("handshake message truncated or split across records")]
    TruncatedHandshake,
    #[error("unexpected handshake message type {0} after the handshake")]
    UnexpectedHandshake(u8),
    #[error("key update is not the last message in its record")]
    KeyUpdateNotLast,
    #[error("key update with a body of {0} bytes (it has one)")]
    BadKeyUpdateLength(usize),
    #[error("key update with request_update {0} (only 0 and 1 exist)")]
    BadKeyUpdateRequest(u8),
    #[error("alert record of {0} bytes (an alert is exactly 2)")]
    BadAlert(usize),
    #[error("record sequence number exhausted")]
    SequenceExhausted,
    #[error("key used for as many records as its confidentiality limit allows")]
    KeyExhausted,
    #[error("cipher suite {0} is not a TLS 1.3 AEAD this record layer knows")]
    UnsupportedSuite(String),
    #[error("traffic secret does not fit the cipher suite")]
    BadKey,
}

impl RecordError {
    /// The fatal alert that answers this error (RFC 8446 §5, §6.2); `None` for our own
    /// failures, which the peer did not cause.
    pub fn alert(&self) -> Option<AlertDescription> {
        use RecordError::*;
        Some(match self {
            // §5: "If a TLS implementation receives an unexpected record type, it MUST terminate
            // the connection with an unexpected_message alert"; §5.4: the same for a record
            // without a non-zero octet; §5.1: handshake messages must not span key changes.
            UnexpectedOuterType(_) | NoInnerType | BadInnerType(_) | UnexpectedHandshake(_) | KeyUpdateNotLast => {
                AlertDescription::UnexpectedMessage
            }
            // §5.2 and §5.4.
            TooLong(_) | InnerTooLong(_) => AlertDescription::RecordOverflow,
            // §5.2: "If the decryption fails, the receiver MUST terminate the connection with a
            // bad_record_mac alert"; a record too short for a tag cannot authenticate either.
            TooShort | Decrypt => AlertDescription::BadRecordMac,
            // §6.2: a field out of range or a length that is wrong. An empty handshake record is
            // one (§5.1 forbids sending it); rustls answers it the same way.
            BadVersion(_) | EmptyHandshake | TruncatedHandshake | BadKeyUpdateLength(_) | BadAlert(_) => {
                AlertDescription::DecodeError
            }
            // §4.6.3.
            BadKeyUpdateRequest(_) => AlertDescription::IllegalParameter,
            SequenceExhausted | KeyExhausted | UnsupportedSuite(_) | BadKey => return None,
        })
    }
}

/// One direction's key, IV and record sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(suite: SupportedCipherSuite, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Keys, RecordError> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            #[allow(unreachable_patterns)]
            _ => return Err(RecordError::UnsupportedSuite(format!("{:?}", suite.suite()))),
        };
        let key = LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::BadKey)?);
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| RecordError::BadKey)?;
        Ok(Keys { key, iv, seq })
    }

    /// The per-record nonce (RFC 8446 §5.3), consuming a sequence number. The sequence number
    /// never wraps (§5.3: it "MUST NOT wrap"): the last one is refused instead.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let nonce = nonce(&self.iv, self.seq);
        self.seq = self.seq.checked_add(1).ok_or(RecordError::SequenceExhausted)?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// The nonce of record `seq` under `iv`: the sequence number, big-endian, padded on the left to
/// the IV's length and XORed with it (RFC 8446 §5.3).
pub fn nonce(iv: &[u8; NONCE_LEN], seq: u64) -> [u8; NONCE_LEN] {
    let mut nonce = *iv;
    for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    nonce
}

/// The record header of a protected record whose ciphertext is `len` bytes: also the AEAD's
/// additional data (RFC 8446 §5.2).
pub fn header(len: usize) -> [u8; HEADER_LEN] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [APPLICATION_DATA, LEGACY_VERSION[0], LEGACY_VERSION[1], hi, lo]
}

/// The suite's confidentiality limit: records one key may protect (RFC 8446 §5.5).
fn confidentiality_limit(suite: SupportedCipherSuite) -> Result<u64, RecordError> {
    match suite {
        SupportedCipherSuite::Tls13(s) => Ok(s.common.confidentiality_limit),
        #[allow(unreachable_patterns)]
        _ => Err(RecordError::UnsupportedSuite(format!("{:?}", suite.suite()))),
    }
}

/// Seals outgoing records.
pub struct Sealer {
    keys: Keys,
    suite: SupportedCipherSuite,
    /// Records a key may seal before it is updated ([`Sealer::needs_key_update`]).
    update_at: u64,
    /// Records a key may seal at all: the suite's confidentiality limit. Between `update_at` and
    /// this there is room for the key update record itself.
    hard_limit: u64,
    /// Sequence number the current key started at.
    key_start: u64,
}

impl Sealer {
    pub fn new(suite: SupportedCipherSuite, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Sealer, RecordError> {
        let hard_limit = confidentiality_limit(suite)?;
        let update_at = hard_limit.saturating_sub(KEY_UPDATE_MARGIN);
        Ok(Sealer { keys: Keys::new(suite, seq, secrets)?, suite, update_at, hard_limit, key_start: seq })
    }

    /// Asks for a key update after `records` records under each key instead of near the
    /// suite's confidentiality limit (never later than that): lets tests reach the limit.
    pub fn set_key_update_after(&mut self, records: u64) {
        self.update_at = records.min(self.hard_limit.saturating_sub(KEY_UPDATE_MARGIN));
    }

    /// Records sealed under the current key.
    pub fn sealed(&self) -> u64 {
        self.keys.seq.saturating_sub(self.key_start)
    }

    /// Seals the record laid out in `record`: `record[HEADER_LEN..HEADER_LEN + len]` holds the
    /// plaintext (at most [`MAX_PLAINTEXT`]) and `record` has room for [`OVERHEAD`] more.
    /// Writes the header, inner type and tag around it and returns the record's length.
    /// Fails only when the key may seal no more (the caller should have updated it).
    pub fn seal(&mut self, record: &mut [u8], len: usize, typ: ContentType) -> Result<usize, RecordError> {
        debug_assert!(len <= MAX_PLAINTEXT && record.len() >= len + OVERHEAD);
        if self.sealed() >= self.hard_limit {
            return Err(RecordError::KeyExhausted);
        }
        let total = len + OVERHEAD;
        let hdr = header(total - HEADER_LEN);
        let nonce = self.keys.next_nonce()?;
        record[..HEADER_LEN].copy_from_slice(&hdr);
        record[HEADER_LEN + len] = typ.byte();
        let (body, tag_out) = record[HEADER_LEN..total].split_at_mut(len + 1);
        // Cannot fail: the key is valid and the input is far below the AEAD's length limit.
        let tag = self.keys.key.seal_in_place_separate_tag(nonce, Aad::from(hdr), body).map_err(|_| RecordError::BadKey)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// Seals `payload` (a short message: an alert or a handshake message) into `out`, which
    /// must have room for it plus [`OVERHEAD`]. Returns the record's length.
    pub fn seal_message(&mut self, out: &mut [u8], payload: &[u8], typ: ContentType) -> Result<usize, RecordError> {
        out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        self.seal(out, payload.len(), typ)
    }

    /// Whether this key has sealed as many records as it safely may: the caller sends a key
    /// update and replaces it ([`Sealer::replace`]) before sealing more data.
    pub fn needs_key_update(&self) -> bool {
        self.sealed() >= self.update_at
    }

    /// Data records this key may still seal before it needs an update.
    pub fn records_left(&self) -> u64 {
        self.update_at.saturating_sub(self.sealed())
    }

    /// Installs the next key after a key update.
    pub fn replace(&mut self, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<(), RecordError> {
        self.keys = Keys::new(self.suite, seq, secrets)?;
        self.key_start = seq;
        Ok(())
    }
}

/// Opens incoming records.
pub struct Opener {
    keys: Keys,
    suite: SupportedCipherSuite,
}

/// The length of the record that starts `buf`, once its header is there; `None` if the header
/// is not complete yet.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(h) = buf.get(..HEADER_LEN) else { return Ok(None) };
    if h[0] != APPLICATION_DATA {
        return Err(RecordError::UnexpectedOuterType(h[0]));
    }
    if h[1..3] != LEGACY_VERSION {
        return Err(RecordError::BadVersion(u16::from_be_bytes([h[1], h[2]])));
    }
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::TooLong(len));
    }
    // A ciphertext of just a tag decrypts to an empty inner plaintext, which the opener
    // refuses for its missing content type; anything shorter cannot authenticate.
    if len < TAG_LEN {
        return Err(RecordError::TooShort);
    }
    Ok(Some(HEADER_LEN + len))
}

/// Checks a decrypted TLSInnerPlaintext (RFC 8446 §5.4): at most 2^14 + 1 bytes of content,
/// content type and zero padding together, a content type this layer carries after the
/// padding. Returns the type and the content's length (the content is `plain[..len]`).
pub fn parse_inner_plaintext(plain: &[u8]) -> Result<(ContentType, usize), RecordError> {
    if plain.len() > MAX_INNER_PLAINTEXT {
        return Err(RecordError::InnerTooLong(plain.len()));
    }
    // Strip the zero padding; the last non-zero byte is the content type.
    let Some(end) = plain.iter().rposition(|&b| b != 0) else {
        return Err(RecordError::NoInnerType);
    };
    let typ = ContentType::from_byte(plain[end]).ok_or(RecordError::BadInnerType(plain[end]))?;
    Ok((typ, end))
}

/// A record opened by [`Opener::open_next`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The record's length on the wire: where the next record starts.
    pub len: usize,
    pub typ: ContentType,
    /// Where its content now lies in the buffer.
    pub content: Range<usize>,
}

impl Opener {
    pub fn new(suite: SupportedCipherSuite, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Opener, RecordError> {
        Ok(Opener { keys: Keys::new(suite, seq, secrets)?, suite })
    }

    /// Frames, decrypts and checks the record at the start of `buf`, in place; `Ok(None)` while
    /// it is not complete. Whatever `buf` holds, this returns (never panics).
    pub fn open_next(&mut self, buf: &mut [u8]) -> Result<Option<Opened>, RecordError> {
        let len = match record_len(buf)? {
            Some(len) if len <= buf.len() => len,
            _ => return Ok(None),
        };
        let (typ, content) = self.open(&mut buf[..len])?;
        Ok(Some(Opened { len, typ, content }))
    }

    /// Decrypts the whole record in `record` (as measured by [`record_len`]) in place. Returns
    /// its inner content type and where its content now lies within `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(ContentType, Range<usize>), RecordError> {
        let hdr: [u8; HEADER_LEN] = record.get(..HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or(RecordError::TooShort)?;
        let nonce = self.keys.next_nonce()?;
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(hdr), &mut record[HEADER_LEN..])
            .map_err(|_| RecordError::Decrypt)?;
        let (typ, len) = parse_inner_plaintext(plain)?;
        Ok((typ, HEADER_LEN..HEADER_LEN + len))
    }

    /// Installs the peer's next key after it sent a key update.
    pub fn replace(&mut self, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<(), RecordError> {
        self.keys = Keys::new(self.suite, seq, secrets)?;
        Ok(())
    }
}

/// Handshake message types we meet after the handshake (RFC 8446 §4).
pub const NEW_SESSION_TICKET: u8 = 4;
pub const KEY_UPDATE: u8 = 24;

/// A KeyUpdate message: `request` asks the peer to update its own key too.
pub fn key_update_message(request: bool) -> [u8; 5] {
    [KEY_UPDATE, 0, 0, 1, request as u8]
}

/// The close_notify alert (warning level).
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// Alert level of every alert but close_notify and user_canceled (RFC 8446 §6).
const FATAL: u8 = 2;

/// A fatal alert's two bytes.
pub fn fatal_alert(desc: AlertDescription) -> [u8; 2] {
    [FATAL, u8::from(desc)]
}

/// A handshake message after the handshake, as [`parse_post_handshake`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostHandshake<'a> {
    /// A session ticket (for a client; its body goes to rustls).
    NewSessionTicket(&'a [u8]),
    /// The peer updated its key; `request` asks us to update ours.
    KeyUpdate { request: bool },
}

/// What the peer said with an alert record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alert {
    /// close_notify: the peer sends no more.
    CloseNotify,
    /// user_canceled: a close_notify follows (RFC 8446 §6.1).
    UserCanceled,
    /// Any other alert ends the connection with an error, whatever its level says (§6).
    Fatal(AlertDescription),
}

/// Parses the content of one alert record (RFC 8446 §5.1: exactly one alert).
pub fn parse_alert(content: &[u8]) -> Result<Alert, RecordError> {
    match content {
        [_, 0] => Ok(Alert::CloseNotify),
        [_, 90] => Ok(Alert::UserCanceled),
        [_, desc] => Ok(Alert::Fatal((*desc).into())),
        _ => Err(RecordError::BadAlert(content.len())),
    }
}

/// Largest number of handshake messages in one record: a record holds at most 2^14 bytes and a
/// message takes at least 4.
const MAX_MESSAGES: usize = MAX_PLAINTEXT / 4;

/// Parses the content of one handshake record after the handshake into its messages, checking
/// everything that does not need the connection's state: not empty, whole messages only (we
/// never expect one split across records), only session tickets and key updates, a key update
/// well formed and last in its record (RFC 8446 §5.1, §4.6.3).
pub fn parse_post_handshake(content: &[u8]) -> Result<Vec<PostHandshake<'_>>, RecordError> {
    if content.is_empty() {
        return Err(RecordError::EmptyHandshake);
    }
    let mut out = Vec::new();
    let mut rest = content;
    while !rest.is_empty() {
        let &[typ, a, b, c, ref tail @ ..] = rest else { return Err(RecordError::TruncatedHandshake) };
        let len = u32::from_be_bytes([0, a, b, c]) as usize;
        if tail.len() < len || out.len() >= MAX_MESSAGES {
            return Err(RecordError::TruncatedHandshake);
        }
        let (body, after) = tail.split_at(len);
        rest = after;
        out.push(match typ {
            NEW_SESSION_TICKET => PostHandshake::NewSessionTicket(body),
            KEY_UPDATE => {
                let request = match body {
                    [0] => false,
                    [1] => true,
                    [r] => return Err(RecordError::BadKeyUpdateRequest(*r)),
                    _ => return Err(RecordError::BadKeyUpdateLength(body.len())),
                };
                if !rest.is_empty() {
                    return Err(RecordError::KeyUpdateNotLast);
                }
                PostHandshake::KeyUpdate { request }
            }
            other => return Err(RecordError::UnexpectedHandshake(other)),
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
    use rustls::crypto::tls13::OkmBlock;
    use rustls::Tls13CipherSuite;

    fn suite() -> SupportedCipherSuite {
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384
    }

    fn tls13(suite: SupportedCipherSuite) -> &'static Tls13CipherSuite {
        match suite {
            SupportedCipherSuite::Tls13(s) => s,
            #[allow(unreachable_patterns)]
            _ => unreachable!("TLS 1.3 suites only"),
        }
    }

    fn secrets(k: u8) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm { key: [k; 32].into(), iv: [k ^ 0x5a; 12].into() }
    }

    /// The key and IV of a traffic secret (RFC 8446 §7.3), derived by rustls: the second
    /// implementation the tests compare against, and how tests turn a key log into keys.
    pub(crate) fn traffic_keys(suite: SupportedCipherSuite, secret: &[u8]) -> ConnectionTrafficSecrets {
        let s = tls13(suite);
        let expander = s.hkdf_provider.expander_for_okm(&OkmBlock::new(secret));
        let key = rustls::internal::derive_traffic_key(expander.as_ref(), s.aead_alg);
        let iv = rustls::internal::derive_traffic_iv(expander.as_ref());
        s.aead_alg.extract_keys(key, iv).expect("a TLS 1.3 AEAD")
    }

    fn key_iv(secrets: &ConnectionTrafficSecrets) -> (&[u8], [u8; NONCE_LEN]) {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref().try_into().unwrap()),
            _ => unreachable!(),
        }
    }

    /// A record whose TLSInnerPlaintext is exactly `inner` (content, type and padding as the
    /// test wants them, also malformed), sealed at `seq` with AES-256-GCM: what a peer could send.
    pub(crate) fn raw_record(secrets: &ConnectionTrafficSecrets, seq: u64, inner: &[u8]) -> Vec<u8> {
        let alg = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => &aead::AES_128_GCM,
            ConnectionTrafficSecrets::Aes256Gcm { .. } => &aead::AES_256_GCM,
            _ => &aead::CHACHA20_POLY1305,
        };
        let (key, iv) = key_iv(secrets);
        let key = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
        let hdr = header(inner.len() + TAG_LEN);
        let mut rec = hdr.to_vec();
        let mut body = inner.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce(&iv, seq)), Aad::from(hdr), &mut body).unwrap();
        rec.extend_from_slice(&body);
        rec
    }

    fn sealed(sealer: &mut Sealer, data: &[u8], typ: ContentType) -> Vec<u8> {
        let mut rec = vec![0; data.len() + OVERHEAD];
        let n = sealer.seal_message(&mut rec, data, typ).unwrap();
        rec.truncate(n);
        rec
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 8448 §3 (simple 1-RTT handshake, TLS_AES_128_GCM_SHA256): from the server's
    /// application traffic secret, the key and IV; with them, the server's application data
    /// record (its second record under that key, after the NewSessionTicket: sequence number 1)
    /// sealed by this module is byte for byte the RFC's. That pins the nonce (IV XOR the
    /// sequence number, left-padded) and the additional data (the 5-byte record header with the
    /// ciphertext's length). rustls' own record encrypter, given the same key, IV and sequence
    /// number, is checked to produce the same bytes: a second implementation agreeing with the
    /// RFC text.
    #[test]
    fn rfc8448_server_application_data_record_is_byte_exact() {
        let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
        // {server} derive secret "tls13 s ap traffic":
        let secret = hex("a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43");
        // {server} derive write traffic keys for application data:
        let key = hex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56");
        let iv: [u8; 12] = hex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84").try_into().unwrap();
        let derived = traffic_keys(suite, &secret);
        assert!(matches!(derived, ConnectionTrafficSecrets::Aes128Gcm { .. }));
        assert_eq!(key_iv(&derived), (&key[..], iv), "key and IV derived from the secret");
        // {server} send application_data record: payload 00 01 .. 31, complete record:
        let plaintext: Vec<u8> = (0..50).collect();
        let expected = hex(
            "17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f
             82 aa 1b 36 e3 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2
             1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d",
        );
        assert_eq!(nonce(&iv, 1), hex("cf 78 2b 88 dd 83 54 9a ad f1 e9 85")[..], "nonce: IV XOR 1");
        assert_eq!(header(plaintext.len() + 1 + TAG_LEN), expected[..HEADER_LEN], "additional data: the record header");

        let mut sealer = Sealer::new(suite, 1, derived).unwrap();
        assert!(sealed(&mut sealer, &plaintext, ContentType::ApplicationData) == expected, "sealed as RFC 8448 says");

        let s = tls13(suite);
        let expander = s.hkdf_provider.expander_for_okm(&OkmBlock::new(&secret));
        let mut theirs = s.aead_alg.encrypter(
            rustls::internal::derive_traffic_key(expander.as_ref(), s.aead_alg),
            rustls::internal::derive_traffic_iv(expander.as_ref()),
        );
        let msg = OutboundPlainMessage {
            typ: rustls::ContentType::ApplicationData,
            version: rustls::ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(&plaintext),
        };
        assert!(theirs.encrypt(msg, 1).unwrap().encode() == expected, "rustls agrees with the RFC");

        // And the record opens again, at the same sequence number only.
        let mut o = Opener::new(suite, 1, traffic_keys(suite, &secret)).unwrap();
        let mut rec = expected.clone();
        let opened = o.open_next(&mut rec).unwrap().unwrap();
        assert_eq!((opened.len, opened.typ, &rec[opened.content]), (expected.len(), ContentType::ApplicationData, &plaintext[..]));
        let mut o = Opener::new(suite, 0, traffic_keys(suite, &secret)).unwrap();
        assert_eq!(o.open_next(&mut expected.clone()), Err(RecordError::Decrypt));
    }

    #[test]
    fn records_round_trip_in_order_and_fail_out_of_order() {
        let mut s = Sealer::new(suite(), 0, secrets(1)).unwrap();
        let mut o = Opener::new(suite(), 0, secrets(1)).unwrap();
        let mut a = sealed(&mut s, b"first", ContentType::ApplicationData);
        let mut b = sealed(&mut s, b"second", ContentType::Handshake);
        assert_eq!(record_len(&a).unwrap(), Some(a.len()));
        let (t, r) = o.open(&mut a).unwrap();
        assert_eq!((t, &a[r]), (ContentType::ApplicationData, &b"first"[..]));
        let (t, r) = o.open(&mut b).unwrap();
        assert_eq!((t, &b[r]), (ContentType::Handshake, &b"second"[..]));

        // A replayed or reordered record is refused: the nonce moved on.
        let mut s2 = Sealer::new(suite(), 0, secrets(1)).unwrap();
        let mut replay = sealed(&mut s2, b"first", ContentType::ApplicationData);
        assert_eq!(o.open(&mut replay), Err(RecordError::Decrypt));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let mut s = Sealer::new(suite(), 7, secrets(2)).unwrap();
        let rec = sealed(&mut s, &[0xab; 100], ContentType::ApplicationData);
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x01;
            let mut o = Opener::new(suite(), 7, secrets(2)).unwrap();
            // A longer length waits for bytes that would then fail authentication.
            assert!(!matches!(o.open_next(&mut bad), Ok(Some(_))), "bit flip at byte {i} was accepted");
        }
    }

    #[test]
    fn bad_headers_are_named_with_their_alerts() {
        assert_eq!(record_len(&[23, 3, 3]), Ok(None));
        for (hdr, err, alert) in [
            ([22, 3, 3, 0, 40], RecordError::UnexpectedOuterType(22), AlertDescription::UnexpectedMessage),
            // A plaintext alert, or a change_cipher_spec, after the handshake (RFC 8446 §5).
            ([21, 3, 3, 0, 2], RecordError::UnexpectedOuterType(21), AlertDescription::UnexpectedMessage),
            ([20, 3, 3, 0, 1], RecordError::UnexpectedOuterType(20), AlertDescription::UnexpectedMessage),
            ([23, 3, 1, 0, 40], RecordError::BadVersion(0x0301), AlertDescription::DecodeError),
            ([23, 3, 3, 0xff, 0xff], RecordError::TooLong(0xffff), AlertDescription::RecordOverflow),
            ([23, 3, 3, 0, 15], RecordError::TooShort, AlertDescription::BadRecordMac),
        ] {
            assert_eq!(record_len(&hdr), Err(err.clone()));
            assert_eq!(err.alert(), Some(alert), "{err}");
        }
    }

    /// RFC 8446 §5.2: a ciphertext may be up to 2^14 + 256 bytes; one more is record_overflow.
    /// (With AES-GCM a ciphertext that long cannot hold a valid inner plaintext, §5.4, so
    /// "accepted" means it passes framing and is decrypted: see the next test.)
    #[test]
    fn ciphertext_of_2_14_plus_256_is_framed_and_plus_257_is_an_overflow() {
        let at = header(MAX_CIPHERTEXT);
        assert_eq!(record_len(&at), Ok(Some(HEADER_LEN + MAX_CIPHERTEXT)));
        let over = header(MAX_CIPHERTEXT + 1);
        assert_eq!(record_len(&over), Err(RecordError::TooLong(MAX_CIPHERTEXT + 1)));
        // A full-length record of garbage is decrypted (and fails as such), not refused by size.
        let mut o = Opener::new(suite(), 0, secrets(9)).unwrap();
        let mut rec = at.to_vec();
        rec.resize(HEADER_LEN + MAX_CIPHERTEXT, 0x33);
        assert_eq!(o.open_next(&mut rec), Err(RecordError::Decrypt));
    }

    /// RFC 8446 §5.1 and §5.4: 2^14 bytes of content (2^14 + 1 of inner plaintext with its
    /// type) are accepted; one byte more, of content or of padding, is record_overflow.
    #[test]
    fn plaintext_of_2_14_is_accepted_and_one_byte_more_is_an_overflow() {
        let keys = secrets(5);
        let content = vec![0x61; MAX_PLAINTEXT];
        let mut inner = content.clone();
        inner.push(APPLICATION_DATA);
        let mut rec = raw_record(&keys, 0, &inner);
        let mut o = Opener::new(suite(), 0, secrets(5)).unwrap();
        let opened = o.open_next(&mut rec).unwrap().unwrap();
        assert!(rec[opened.content] == content[..]);

        let mut over = vec![0x61; MAX_PLAINTEXT + 1];
        over.push(APPLICATION_DATA);
        let mut padded = inner.clone();
        padded.push(0);
        for (what, inner) in [("content", over), ("padding", padded)] {
            let mut rec = raw_record(&keys, 0, &inner);
            let mut o = Opener::new(suite(), 0, secrets(5)).unwrap();
            let err = o.open_next(&mut rec).unwrap_err();
            assert_eq!(err, RecordError::InnerTooLong(MAX_PLAINTEXT + 2), "{what}");
            assert_eq!(err.alert(), Some(AlertDescription::RecordOverflow));
        }
        // Our own sealer never makes a record over the limit.
        let mut s = Sealer::new(suite(), 0, secrets(5)).unwrap();
        assert_eq!(sealed(&mut s, &content, ContentType::ApplicationData).len(), MAX_SEALED);
    }

    /// RFC 8446 §5.4: no non-zero octet (no content type) is unexpected_message, and so is an
    /// inner content type this layer does not carry (change_cipher_spec inside, or unknown).
    #[test]
    fn all_zero_and_unknown_inner_types_are_unexpected_messages() {
        let keys = secrets(6);
        for (inner, err) in [
            (vec![], RecordError::NoInnerType),
            (vec![0; 100], RecordError::NoInnerType),
            (b"data\x14".to_vec(), RecordError::BadInnerType(20)),
            (b"data\x42\0\0".to_vec(), RecordError::BadInnerType(0x42)),
        ] {
            let mut rec = raw_record(&keys, 3, &inner);
            let mut o = Opener::new(suite(), 3, secrets(6)).unwrap();
            assert_eq!(o.open_next(&mut rec), Err(err.clone()), "{inner:?}");
            assert_eq!(err.alert(), Some(AlertDescription::UnexpectedMessage));
        }
        // The same checks, without the crypto.
        assert_eq!(parse_inner_plaintext(&[0, 0]), Err(RecordError::NoInnerType));
        assert_eq!(parse_inner_plaintext(b"ab\x16\0"), Ok((ContentType::Handshake, 2)));
        assert_eq!(parse_inner_plaintext(&vec![0x17; MAX_INNER_PLAINTEXT + 1]), Err(RecordError::InnerTooLong(MAX_INNER_PLAINTEXT + 1)));
        // Padding after a known type is fine.
        let mut rec = raw_record(&keys, 3, b"ok\x17\0\0\0");
        let mut o = Opener::new(suite(), 3, secrets(6)).unwrap();
        let opened = o.open_next(&mut rec).unwrap().unwrap();
        assert_eq!(&rec[opened.content], b"ok");
    }

    /// RFC 8446 §5.3: the sequence number must not wrap. It does not: at the end the layer
    /// refuses to seal or open rather than reuse a nonce.
    #[test]
    fn sequence_numbers_never_wrap() {
        let mut s = Sealer::new(suite(), u64::MAX - 1, secrets(7)).unwrap();
        let mut last = sealed(&mut s, b"last", ContentType::ApplicationData);
        let mut rec = vec![0; 4 + OVERHEAD];
        assert_eq!(s.seal_message(&mut rec, b"more", ContentType::ApplicationData), Err(RecordError::SequenceExhausted));
        let mut o = Opener::new(suite(), u64::MAX - 1, secrets(7)).unwrap();
        assert!(o.open(&mut last).is_ok());
        let mut next = raw_record(&secrets(7), u64::MAX, b"x\x17");
        assert_eq!(o.open(&mut next), Err(RecordError::SequenceExhausted));
    }

    #[test]
    fn sealer_asks_for_a_key_update_before_the_confidentiality_limit() {
        let limit = tls13(suite()).common.confidentiality_limit;
        let mut s = Sealer::new(suite(), 0, secrets(3)).unwrap();
        assert_eq!(s.records_left(), limit - KEY_UPDATE_MARGIN);
        s.set_key_update_after(3);
        for left in [3, 2, 1] {
            assert!(!s.needs_key_update());
            assert_eq!(s.records_left(), left);
            sealed(&mut s, b"x", ContentType::ApplicationData);
        }
        assert!(s.needs_key_update());
        // The key update record itself can still be sealed under the old key.
        sealed(&mut s, &key_update_message(false), ContentType::Handshake);
        s.replace(4, secrets(4)).unwrap();
        assert!(!s.needs_key_update(), "a new key starts its count afresh");
        assert_eq!(s.records_left(), 3);
        // A limit above the suite's is capped by it.
        s.set_key_update_after(u64::MAX);
        assert_eq!(s.records_left(), limit - KEY_UPDATE_MARGIN);
    }

    #[test]
    fn post_handshake_messages_are_checked() {
        let ok = parse_post_handshake(&[4, 0, 0, 2, 9, 9, 24, 0, 0, 1, 1]).unwrap();
        assert_eq!(ok, vec![PostHandshake::NewSessionTicket(&[9, 9]), PostHandshake::KeyUpdate { request: true }]);
        for (content, err, alert) in [
            (&[][..], RecordError::EmptyHandshake, AlertDescription::DecodeError),
            (&[4, 0, 0, 9, 1], RecordError::TruncatedHandshake, AlertDescription::DecodeError),
            (&[4, 0, 0], RecordError::TruncatedHandshake, AlertDescription::DecodeError),
            (&[24, 0, 0, 1, 0, 4, 0, 0, 0], RecordError::KeyUpdateNotLast, AlertDescription::UnexpectedMessage),
            (&[24, 0, 0, 1, 0, 24, 0, 0, 1, 0], RecordError::KeyUpdateNotLast, AlertDescription::UnexpectedMessage),
            (&[24, 0, 0, 2, 0, 0], RecordError::BadKeyUpdateLength(2), AlertDescription::DecodeError),
            (&[24, 0, 0, 1, 2], RecordError::BadKeyUpdateRequest(2), AlertDescription::IllegalParameter),
            (&[1, 0, 0, 0], RecordError::UnexpectedHandshake(1), AlertDescription::UnexpectedMessage),
            (&[13, 0, 0, 0], RecordError::UnexpectedHandshake(13), AlertDescription::UnexpectedMessage),
        ] {
            assert_eq!(parse_post_handshake(content), Err(err.clone()), "{content:?}");
            assert_eq!(err.alert(), Some(alert), "{err}");
        }
    }

    #[test]
    fn alerts_are_exactly_two_bytes() {
        assert_eq!(parse_alert(&CLOSE_NOTIFY), Ok(Alert::CloseNotify));
        assert_eq!(parse_alert(&[1, 90]), Ok(Alert::UserCanceled));
        assert_eq!(parse_alert(&fatal_alert(AlertDescription::BadRecordMac)), Ok(Alert::Fatal(AlertDescription::BadRecordMac)));
        assert_eq!(parse_alert(&[1]), Err(RecordError::BadAlert(1)));
        assert_eq!(parse_alert(&[2, 20, 0]), Err(RecordError::BadAlert(3)));
        assert_eq!(RecordError::BadAlert(0).alert(), Some(AlertDescription::DecodeError));
    }
}
