//! The TLS 1.3 record layer of a data connection, done in place (RFC 8446 §5).
//!
//! rustls does the handshake; once it is over, [`crate::session`] takes the traffic secrets
//! (rustls' kernel-connection API, made for kTLS) and protects records here instead. The point is
//! where the bytes live: a record is read from the socket into a buffer, decrypted in that buffer
//! and written to the local socket from it; on the way out, plaintext is sealed where it lies in
//! the outgoing buffer. rustls' own buffered connection copies each byte twice more on the
//! receiving side (into its deframer, then out to the caller), which cost a fifth of the
//! receiving agent's time (see README.md, "What the design does for speed").
//!
//! No I/O here: [`Sealer`] and [`Opener`] work on byte slices, so they are tested against
//! rustls itself without sockets.

use std::ops::Range;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};

/// Largest plaintext in one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of type {0} after the handshake (only protected records are allowed)")]
    UnexpectedOuterType(u8),
    #[error("record with version {0:#06x} (TLS 1.3 records say 0x0303)")]
    BadVersion(u16),
    #[error("record of {0} bytes is over the limit of {MAX_CIPHERTEXT}")]
    TooLong(usize),
    #[error("record too short to hold a tag")]
    TooShort,
    #[error("record failed authentication (corrupted, or not from the peer)")]
    Decrypt,
    #[error("record with inner content type {0}")]
    BadInnerType(u8),
    #[error("cipher suite {0} is not a TLS 1.3 AEAD this record layer knows")]
    UnsupportedSuite(String),
    #[error("traffic secret does not fit the cipher suite")]
    BadKey,
}

/// One direction's key, IV and record sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    /// Records this key may still seal before it must be updated.
    limit: u64,
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
        let limit = match suite {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            #[allow(unreachable_patterns)]
            _ => return Err(RecordError::UnsupportedSuite(format!("{:?}", suite.suite()))),
        };
        Ok(Keys { key, iv, seq, limit: limit.saturating_sub(KEY_UPDATE_MARGIN) })
    }

    /// The per-record nonce (RFC 8446 §5.3), consuming a sequence number. A u64 sequence
    /// number cannot wrap in practice (2^64 records), and [`Sealer::needs_key_update`] retires
    /// keys long before.
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(nonce)
    }
}

fn header(len: usize) -> [u8; HEADER_LEN] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [APPLICATION_DATA, LEGACY_VERSION[0], LEGACY_VERSION[1], hi, lo]
}

/// Seals outgoing records.
pub struct Sealer {
    keys: Keys,
    suite: SupportedCipherSuite,
}

impl Sealer {
    pub fn new(suite: SupportedCipherSuite, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Sealer, RecordError> {
        Ok(Sealer { keys: Keys::new(suite, seq, secrets)?, suite })
    }

    /// Seals the record laid out in `record`: `record[HEADER_LEN..HEADER_LEN + len]` holds the
    /// plaintext (at most [`MAX_PLAINTEXT`]) and `record` has room for [`OVERHEAD`] more.
    /// Writes the header, inner type and tag around it and returns the record's length.
    pub fn seal(&mut self, record: &mut [u8], len: usize, typ: ContentType) -> usize {
        debug_assert!(len <= MAX_PLAINTEXT && record.len() >= len + OVERHEAD);
        let total = len + OVERHEAD;
        let hdr = header(total - HEADER_LEN);
        record[..HEADER_LEN].copy_from_slice(&hdr);
        record[HEADER_LEN + len] = typ.byte();
        let nonce = self.keys.next_nonce();
        let (body, tag_out) = record[HEADER_LEN..total].split_at_mut(len + 1);
        // Cannot fail: the key is valid and the input is far below the AEAD's length limit.
        match self.keys.key.seal_in_place_separate_tag(nonce, Aad::from(hdr), body) {
            Ok(tag) => tag_out.copy_from_slice(tag.as_ref()),
            Err(_) => unreachable!("AEAD seal of a record-sized input cannot fail"),
        }
        total
    }

    /// Seals `payload` (a short message: an alert or a handshake message) into `out`, which
    /// must have room for it plus [`OVERHEAD`]. Returns the record's length.
    pub fn seal_message(&mut self, out: &mut [u8], payload: &[u8], typ: ContentType) -> usize {
        out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        self.seal(out, payload.len(), typ)
    }

    /// Whether this key has sealed as many records as it safely may: the caller sends a key
    /// update and replaces it ([`Sealer::replace`]) before sealing more data.
    pub fn needs_key_update(&self) -> bool {
        self.keys.seq >= self.keys.limit
    }

    /// Installs the next key after a key update.
    pub fn replace(&mut self, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<(), RecordError> {
        self.keys = Keys::new(self.suite, seq, secrets)?;
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
    if len < TAG_LEN + 1 {
        return Err(RecordError::TooShort);
    }
    Ok(Some(HEADER_LEN + len))
}

impl Opener {
    pub fn new(suite: SupportedCipherSuite, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Opener, RecordError> {
        Ok(Opener { keys: Keys::new(suite, seq, secrets)?, suite })
    }

    /// Decrypts the whole record in `record` (as measured by [`record_len`]) in place. Returns
    /// its inner content type and where its content now lies within `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(ContentType, Range<usize>), RecordError> {
        let hdr: [u8; HEADER_LEN] = record[..HEADER_LEN].try_into().map_err(|_| RecordError::TooShort)?;
        let nonce = self.keys.next_nonce();
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(hdr), &mut record[HEADER_LEN..])
            .map_err(|_| RecordError::Decrypt)?;
        // Strip the zero padding; the last non-zero byte is the content type (§5.4).
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::BadInnerType(0));
        };
        let typ = ContentType::from_byte(plain[end]).ok_or(RecordError::BadInnerType(plain[end]))?;
        if end > MAX_PLAINTEXT {
            return Err(RecordError::TooLong(end));
        }
        Ok((typ, HEADER_LEN..HEADER_LEN + end))
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

/// Splits the content of a handshake record into messages: `(type, body)`.
pub fn handshake_messages(mut content: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), RecordError>> {
    std::iter::from_fn(move || {
        if content.is_empty() {
            return None;
        }
        let &[typ, a, b, c, ref rest @ ..] = content else {
            content = &[];
            return Some(Err(RecordError::BadInnerType(22)));
        };
        let len = u32::from_be_bytes([0, a, b, c]) as usize;
        if rest.len() < len {
            content = &[];
            return Some(Err(RecordError::BadInnerType(22)));
        }
        let (body, rest) = rest.split_at(len);
        content = rest;
        Some(Ok((typ, body)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite() -> SupportedCipherSuite {
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384
    }

    fn secrets(k: u8) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm { key: [k; 32].into(), iv: [k ^ 0x5a; 12].into() }
    }

    fn sealed(sealer: &mut Sealer, data: &[u8], typ: ContentType) -> Vec<u8> {
        let mut rec = vec![0; data.len() + OVERHEAD];
        let n = sealer.seal_message(&mut rec, data, typ);
        rec.truncate(n);
        rec
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
            let r = record_len(&bad).and_then(|_| o.open(&mut bad));
            assert!(r.is_err(), "bit flip at byte {i} was accepted");
        }
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(record_len(&[23, 3, 3]), Ok(None));
        assert_eq!(record_len(&[22, 3, 3, 0, 40]), Err(RecordError::UnexpectedOuterType(22)));
        assert_eq!(record_len(&[23, 3, 1, 0, 40]), Err(RecordError::BadVersion(0x0301)));
        assert_eq!(record_len(&[23, 3, 3, 0xff, 0xff]), Err(RecordError::TooLong(0xffff)));
        assert_eq!(record_len(&[23, 3, 3, 0, 16]), Err(RecordError::TooShort));
    }

    #[test]
    fn sealer_asks_for_a_key_update_before_the_confidentiality_limit() {
        let limit = match suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            #[allow(unreachable_patterns)]
            _ => unreachable!(),
        };
        let mut s = Sealer::new(suite(), limit - KEY_UPDATE_MARGIN - 1, secrets(3)).unwrap();
        assert!(!s.needs_key_update());
        sealed(&mut s, b"x", ContentType::ApplicationData);
        assert!(s.needs_key_update());
        s.replace(0, secrets(4)).unwrap();
        assert!(!s.needs_key_update());
    }

    #[test]
    fn handshake_messages_split_and_refuse_truncation() {
        let msgs: Vec<_> = handshake_messages(&[4, 0, 0, 2, 9, 9, 24, 0, 0, 1, 0]).collect();
        assert_eq!(msgs, vec![Ok((4, &[9u8, 9][..])), Ok((24, &[0u8][..]))]);
        let bad: Vec<_> = handshake_messages(&[4, 0, 0, 9, 1]).collect();
        assert!(bad[0].is_err());
    }
}
