//! Short, stable reasons for a failed handshake or re-check, for logs and the `reason` metric label.

/// A short, stable reason for a failed handshake, for logs and the `reason` metric label.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    tls_failure_reason(tls)
}

/// [`failure_reason`] of a rustls error (a handshake's, or a re-check's).
pub fn tls_failure_reason(err: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match err {
        E::NoCertificatesPresented => "no-client-certificate",
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => "unknown-ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not-yet-valid",
            C::NotValidForName | C::NotValidForNameContext { .. } => "wrong-name",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "wrong-key-usage",
            C::Revoked => "revoked",
            C::UnknownRevocationStatus => "revocation-unknown",
            C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => "crl-expired",
            _ => "bad-certificate",
        },
        E::InvalidCertRevocationList(_) => "bad-crl",
        E::NoApplicationProtocol => "alpn",
        E::PeerIncompatible(_) => "incompatible",
        E::AlertReceived(a) => match a {
            A::UnknownCA | A::BadCertificate | A::CertificateRequired | A::CertificateExpired
            | A::CertificateRevoked | A::CertificateUnknown | A::AccessDenied => "rejected-by-peer",
            A::ProtocolVersion | A::HandshakeFailure | A::NoApplicationProtocol => "incompatible",
            _ => "alert",
        },
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_reasons() {
        use rustls::CertificateError as C;
        assert_eq!(tls_failure_reason(&rustls::Error::InvalidCertificate(C::Revoked)), "revoked");
        assert_eq!(tls_failure_reason(&rustls::Error::InvalidCertificate(C::Expired)), "expired");
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked);
        assert_eq!(tls_failure_reason(&alert), "rejected-by-peer");
    }
}
