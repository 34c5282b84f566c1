//! Host identity: certificates and keys read from PEM files, and the names they carry.
//!
//! A host's name is a DNS SAN of its certificate. Any PKI works (`migtun certs`, cert-manager,
//! SPIFFE, an enterprise CA) as long as host certificates carry DNS SANs and are usable for both
//! client and server authentication.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path}: bad PEM certificate: {detail}")]
    BadCertificate { path: String, detail: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("{path}: bad PEM private key: {detail}")]
    BadKey { path: String, detail: String },
    #[error("{path} holds no PEM CRL (-----BEGIN X509 CRL-----)")]
    NoCrl { path: String },
    #[error("{path}: bad PEM CRL: {detail}")]
    BadCrl { path: String, detail: String },
}

/// The certificates in a PEM file, in order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    load_all(
        path,
        |path, detail| IdentityError::BadCertificate { path, detail },
        |path| IdentityError::NoCertificate { path },
    )
}

/// Every PEM item of type `T` in a file, at least one; `bad` and `none` name the problem.
fn load_all<T: PemObject>(
    path: &Path,
    bad: impl FnOnce(String, String) -> IdentityError,
    none: impl FnOnce(String) -> IdentityError,
) -> Result<Vec<T>, IdentityError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| IdentityError::Read { path: p.clone(), source })?;
    let items = T::pem_slice_iter(&data).collect::<Result<Vec<_>, _>>().map_err(|e| bad(p.clone(), e.to_string()))?;
    if items.is_empty() {
        return Err(none(p));
    }
    Ok(items)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| IdentityError::Read { path: p.clone(), source })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => IdentityError::NoKey { path: p },
        e => IdentityError::BadKey { path: p, detail: e.to_string() },
    })
}

/// The certificate revocation lists in a PEM file (`-----BEGIN X509 CRL-----`), at least one.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, IdentityError> {
    load_all(path, |path, detail| IdentityError::BadCrl { path, detail }, |path| IdentityError::NoCrl { path })
}

/// A DER certificate's notAfter, in unix seconds (`None` if it does not parse).
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The DNS subject alternative names of a DER certificate (empty if it has none or does not parse).
pub fn dns_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
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
