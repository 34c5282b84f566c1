//! Short, stable reasons for a failed QUIC handshake: the TLS transport's strings, read from quinn's errors.

use quinn::ConnectionError;

/// A short, stable reason for a failed QUIC handshake, the same strings as
/// [`crate::tls::failure::failure_reason`] for the TLS transport.
///
/// quinn turns a rustls error into the TLS alert it sends (`CRYPTO_ERROR` 0x100 + alert) with the
/// error's text as the reason, so the local side's verdict is read from both; a verdict of the
/// peer's arrives as a `CONNECTION_CLOSE` with the alert it sent.
pub fn failure_reason(err: &ConnectionError) -> &'static str {
    match err {
        ConnectionError::TransportError(t) => crypto_reason(u64::from(t.code), &t.reason, false),
        ConnectionError::ConnectionClosed(c) => crypto_reason(u64::from(c.error_code), "", true),
        ConnectionError::TimedOut => "timeout",
        ConnectionError::VersionMismatch => "incompatible",
        ConnectionError::ApplicationClosed(_) | ConnectionError::Reset | ConnectionError::LocallyClosed => "closed",
        ConnectionError::CidsExhausted => "protocol",
    }
}

/// Whether the handshake failed on a certificate or TLS verdict (either side's), as opposed to the
/// network: `auto` falls back to TLS over TCP on the network, never on a verdict.
pub fn is_crypto_error(err: &ConnectionError) -> bool {
    let code = match err {
        ConnectionError::TransportError(t) => u64::from(t.code),
        ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return false,
    };
    (0x100..0x200).contains(&code)
}

fn crypto_reason(code: u64, text: &str, by_peer: bool) -> &'static str {
    if !(0x100..0x200).contains(&code) {
        return "protocol";
    }
    let alert = (code - 0x100) as u8;
    if by_peer {
        return match alert {
            42 | 43 | 44 | 45 | 46 | 48 | 49 | 116 => "rejected-by-peer",
            40 | 70 | 120 => "incompatible",
            _ => "alert",
        };
    }
    let has = |s: &str| text.contains(s);
    match alert {
        116 => "no-client-certificate",
        48 => "unknown-ca",
        51 if has("BadSignature") => "unknown-ca",
        44 if has("Revoked") || has("revoked") => "revoked",
        45 if has("NotValidYet") || has("not valid yet") => "not-yet-valid",
        45 => "expired",
        42 if has("NotValidForName") || has("not valid for name") => "wrong-name",
        43 if has("InvalidPurpose") || has("usage") => "wrong-key-usage",
        42 | 43 | 44 | 46 => "bad-certificate",
        120 => "alpn",
        40 | 70 => "incompatible",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_errors_map_to_the_tls_reasons() {
        assert_eq!(crypto_reason(0x100 + 116, "", false), "no-client-certificate");
        assert_eq!(crypto_reason(0x100 + 48, "invalid peer certificate: UnknownIssuer", false), "unknown-ca");
        assert_eq!(crypto_reason(0x100 + 45, "invalid peer certificate: Expired", false), "expired");
        assert_eq!(crypto_reason(0x100 + 42, "NotValidForName", false), "wrong-name");
        let text =
            "invalid peer certificate: certificate not valid for name \"host-b\"; certificate is only valid for host-c";
        assert_eq!(crypto_reason(0x100 + 42, text, false), "wrong-name");
        assert_eq!(crypto_reason(0x100 + 48, "", true), "rejected-by-peer");
        assert_eq!(crypto_reason(0x0a, "", false), "protocol");
        assert_eq!(failure_reason(&ConnectionError::TimedOut), "timeout");
    }
}
