//! `[tls]` as the config validated it: the file paths, the certificates and key loaded from
//! them, and the record layer. Defined here so that the rustls configurations ([`super::context`])
//! need nothing of the config; [`crate::config`] fills it in.

use std::path::PathBuf;

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// `[tls]`: file paths and the material loaded from them.
#[derive(Debug)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub ca_path: PathBuf,
    /// Leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors for peers (both directions).
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// `tls.record_layer`: who protects records after the handshake.
    pub record_layer: RecordLayer,
    /// `tls.crl`: revoked peer certificates (both directions), when configured.
    pub crl_path: Option<PathBuf>,
    /// The CRLs of `tls.crl` (DER), each parsed and issued by a CA of `tls.ca`.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

/// `tls.record_layer`: whose TLS record layer carries data streams and control connections
/// after rustls' handshake, on both the server and the client side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecordLayer {
    /// migtun's own, in place ([`crate::tls::record`]): the default, and the faster.
    #[default]
    Own,
    /// tokio-rustls' (rustls' buffered connection): the fallback, if ours is ever in doubt.
    Rustls,
}

impl RecordLayer {
    pub fn name(self) -> &'static str {
        match self {
            RecordLayer::Own => "own",
            RecordLayer::Rustls => "rustls",
        }
    }
}
