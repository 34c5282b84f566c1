//! rustls configurations for both ends of the port, and what a handshake tells us.
//!
//! TLS 1.3 only, mutual authentication against the configured CA, aws-lc-rs crypto with
//! AES-128-GCM preferred (the cheapest AEAD on hosts with AES-NI, which every hypervisor has).
//! Session resumption is on in both directions so that opening a stream to a peer seen before
//! costs an abbreviated handshake.

use std::sync::Arc;

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{RecordLayer, TlsConfig};
use crate::identity::dns_sans;

/// ALPN of one tunnelled data stream per TLS connection.
pub const ALPN_DATA: &[u8] = b"migtun/1";
/// ALPN of the agent-to-agent control RPC (HTTP/2).
pub const ALPN_CONTROL: &[u8] = b"h2";

/// How many TLS 1.3 sessions a client remembers (one or two per peer is what is used).
const CLIENT_SESSION_CACHE: usize = 1024;
/// How many resumption tickets a server sends after each full handshake: one per warm
/// connection a client is likely to open next, so resumptions do not run dry.
const TLS13_TICKETS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("tls.ca: no usable CA certificate: {0}")]
    Roots(String),
    #[error("tls.cert/tls.key: {0}")]
    Identity(rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("TLS 1.3 is not available from the crypto provider: {0}")]
    Protocol(rustls::Error),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(String),
}

/// The crypto provider: aws-lc-rs, TLS 1.3 suites only, AES-128-GCM first.
pub fn provider() -> Arc<CryptoProvider> {
    use aws_lc_rs::cipher_suite::*;
    Arc::new(CryptoProvider {
        cipher_suites: vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256],
        ..aws_lc_rs::default_provider()
    })
}

fn roots(tls: &TlsConfig) -> Result<Arc<RootCertStore>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in &tls.ca_certs {
        roots.add(cert.clone()).map_err(|e| TlsSetupError::Roots(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// The port's server side: requires a client certificate from the CA.
pub fn server_config(tls: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(tls)?, provider.clone())
        .build()
        .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsSetupError::Protocol)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(TlsSetupError::Identity)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.ignore_client_order = true;
    config.send_tls13_tickets = TLS13_TICKETS;
    // `tls.record_layer = "own"`: the record layer after the handshake is ours (crate::session),
    // rustls hands over the keys; crate::session picks the layer by this flag.
    config.enable_secret_extraction = tls.record_layer == RecordLayer::Own;
    Ok(Arc::new(config))
}

/// The client side, for connections to peers; the server name checked is the peer's name.
pub fn client_config(tls: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsSetupError::Protocol)?
        .with_root_certificates(roots(tls)?)
        .with_client_auth_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(TlsSetupError::Identity)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::in_memory_sessions(CLIENT_SESSION_CACHE);
    // As for the server: the record layer follows this flag (crate::session).
    config.enable_secret_extraction = tls.record_layer == RecordLayer::Own;
    Ok(Arc::new(config))
}

/// Who is on the other end, from the certificate the peer presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// DNS SANs of the peer's certificate, lowercase.
    pub names: Vec<String>,
}

impl PeerIdentity {
    pub fn from_certs(certs: Option<&[rustls_pki_types::CertificateDer<'static>]>) -> PeerIdentity {
        let names = certs.and_then(|c| c.first()).map(dns_sans).unwrap_or_default();
        PeerIdentity { names }
    }

    /// The name to log and label metrics with.
    pub fn name(&self) -> &str {
        self.names.first().map(String::as_str).unwrap_or("<no-dns-san>")
    }

    /// Whether any of the peer's names is in `allow`.
    pub fn is_any_of(&self, allow: &[String]) -> bool {
        self.names.iter().any(|n| allow.iter().any(|a| a.eq_ignore_ascii_case(n)))
    }
}

/// A short, stable reason for a failed handshake, for logs and the `reason` metric label.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return match err.kind() {
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match tls {
        E::NoCertificatesPresented => "no-client-certificate",
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => "unknown-ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not-yet-valid",
            C::NotValidForName | C::NotValidForNameContext { .. } => "wrong-name",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "wrong-key-usage",
            _ => "bad-certificate",
        },
        E::NoApplicationProtocol => "alpn",
        E::PeerIncompatible(_) => "incompatible",
        E::AlertReceived(a) => match a {
            A::UnknownCA | A::BadCertificate | A::CertificateRequired | A::CertificateExpired
            | A::CertificateUnknown | A::AccessDenied => "rejected-by-peer",
            A::ProtocolVersion | A::HandshakeFailure | A::NoApplicationProtocol => "incompatible",
            _ => "alert",
        },
        _ => "protocol",
    }
}
