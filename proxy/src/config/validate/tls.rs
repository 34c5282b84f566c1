//! Validation of `[tls]`: the files load, the chain verifies as peers will verify it, the
//! CRLs are signed by our CA.

use super::*;
use crate::config::explain::fmt_time;

impl Validator<'_> {
    pub(super) fn tls(&self, raw: &RawTls) -> Result<TlsConfig, Problem> {
        let cert_path = self.path("tls.cert", &raw.cert)?;
        let key_path = self.path("tls.key", &raw.key)?;
        let ca_path = self.path("tls.ca", &raw.ca)?;
        let cert_chain = load_certs(&cert_path).or_else(|e| err("tls.cert", e.to_string()))?;
        let key = load_key(&key_path).or_else(|e| err("tls.key", e.to_string()))?;
        let ca_certs = load_certs(&ca_path).or_else(|e| err("tls.ca", e.to_string()))?;
        let record_layer = match raw.record_layer.as_deref() {
            None | Some("own") => RecordLayer::Own,
            Some("rustls") => RecordLayer::Rustls,
            Some(other) => {
                return err("tls.record_layer", format!("unknown record layer {other:?} (expected \"own\" or \"rustls\")"))
            }
        };

        // The leaf: parseable, within its validity period.
        let (_, leaf) =
            x509_parser::parse_x509_certificate(cert_chain[0].as_ref()).or_else(|e| {
                err(
                    "tls.cert",
                    format!(
                        "{}: cannot parse the first certificate: {e}",
                        cert_path.display()
                    ),
                )
            })?;
        let validity = leaf.validity();
        let now = UnixTime::now().as_secs() as i64;
        let (from, until) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        if now < from {
            return err(
                "tls.cert",
                format!(
                    "{} is not valid yet: valid from {} to {}",
                    cert_path.display(),
                    fmt_time(from),
                    fmt_time(until)
                ),
            );
        }
        if now > until {
            return err(
                "tls.cert",
                format!(
                    "{} has expired: valid from {} to {}",
                    cert_path.display(),
                    fmt_time(from),
                    fmt_time(until)
                ),
            );
        }

        // The key: usable by rustls and the one of the certificate.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .or_else(|e| err("tls", format!("TLS 1.3 is not available: {e}")))?
            .with_no_client_auth();
        if let Err(e) = builder.with_single_cert(cert_chain.clone(), key.clone_key()) {
            let problem = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "{} does not match tls.cert {} ({e})",
                    key_path.display(),
                    cert_path.display()
                ),
                e => format!(
                    "{} is unusable with tls.cert {} ({e})",
                    key_path.display(),
                    cert_path.display()
                ),
            };
            return err("tls.key", problem);
        }

        // The CA bundle: every certificate a usable trust anchor.
        let mut roots = rustls::RootCertStore::empty();
        for (i, ca) in ca_certs.iter().enumerate() {
            if let Err(e) = roots.add(ca.clone()) {
                return err(
                    "tls.ca",
                    format!(
                        "{}: certificate #{} is not a usable trust anchor ({e})",
                        ca_path.display(),
                        i + 1
                    ),
                );
            }
        }

        let (crl_path, crls) = match &raw.crl {
            None => (None, Vec::new()),
            Some(c) => {
                let path = self.path("tls.crl", c)?;
                let crls = check_crls(&path, &ca_certs, &ca_path)?;
                (Some(path), crls)
            }
        };

        Ok(TlsConfig {
            cert_path,
            key_path,
            ca_path,
            cert_chain,
            key,
            ca_certs,
            record_layer,
            crl_path,
            crls,
        })
    }
}

/// Peers verify our certificate against the same CA bundle, for both server and client use:
/// check now what they will check, so a wrong chain or EKU shows up in `migtun check`. The
/// verifiers are the agent's own ([`crate::tls::context::verifiers`]), with `tls.crl`: a revoked own
/// certificate, or a CRL of our issuer with a bad signature, is reported here too.
pub(super) fn check_verifiable(name: &str, tls: &TlsConfig) -> Result<(), Problem> {
    use rustls::client::danger::ServerCertVerifier;

    let now = UnixTime::now();
    let (leaf, intermediates) = (&tls.cert_chain[0], &tls.cert_chain[1..]);
    let cert = tls.cert_path.display();
    let ca = tls.ca_path.display();
    let (client, server) = crate::tls::context::verifiers(tls, crate::tls::context::provider()).or_else(|e| match &tls.crl_path {
        Some(crl) => err("tls.crl", format!("{}: cannot build a certificate verifier with it ({e})", crl.display())),
        None => err("tls.ca", format!("{ca}: cannot build a certificate verifier ({e})")),
    })?;
    let server_name = ServerName::try_from(name.to_string()).or_else(|e| {
        err(
            "name",
            format!("{name:?} is not usable as a TLS server name ({e})"),
        )
    })?;
    let judged = |e: rustls::Error, what: &str| -> Result<(), Problem> {
        let crl = tls.crl_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        match crate::tls::failure::tls_failure_reason(&e) {
            "revoked" => err("tls.cert", format!("{cert} is revoked by tls.crl {crl}")),
            "bad-certificate" | "bad-crl" if !crl.is_empty() => err(
                "tls.crl",
                format!("{crl}: cannot check {cert} against it ({e}); is the CRL signed by the CA of tls.ca?"),
            ),
            _ => err("tls.cert", format!("{cert} does not verify as a TLS {what} under tls.ca {ca} ({e})")),
        }
    };
    if let Err(e) = server.verify_server_cert(leaf, intermediates, &server_name, &[], now) {
        return judged(e, &format!("server certificate for {name}"));
    }
    if let Err(e) = client.verify_client_cert(leaf, intermediates, now) {
        return judged(e, "client certificate; it needs EKU clientAuth");
    }
    Ok(())
}

/// `tls.crl`: every CRL in the PEM file parses, and is issued by a CA of `tls.ca` (a CRL of
/// another issuer would silently revoke nothing).
pub(super) fn check_crls(
    path: &Path,
    ca_certs: &[CertificateDer<'static>],
    ca_path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, Problem> {
    let file = path.display();
    let crls = load_crls(path).or_else(|e| err("tls.crl", e.to_string()))?;
    let subjects: Vec<Vec<u8>> = ca_certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .map(|(_, c)| c.subject().as_raw().to_vec())
        .collect();
    for (i, crl) in crls.iter().enumerate() {
        let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
            .or_else(|e| err("tls.crl", format!("{file}: CRL #{} does not parse: {e}", i + 1)))?;
        if !subjects.iter().any(|s| s.as_slice() == parsed.issuer().as_raw()) {
            return err(
                "tls.crl",
                format!(
                    "{file}: CRL #{} is issued by {:?}, which is not a CA of tls.ca {}",
                    i + 1,
                    parsed.issuer().to_string(),
                    ca_path.display()
                ),
            );
        }
    }
    Ok(crls)
}
