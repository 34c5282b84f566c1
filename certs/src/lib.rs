//! migtun PKI helpers: a small CA and host certificates for `migtun certs`, tests and the demo.
//!
//! migtun itself accepts certificates from any PKI (see `certs/README.md`): a host certificate
//! carries the host's name as a DNS SAN and is usable for both TLS server and client
//! authentication; every agent trusts one CA bundle file. This crate makes exactly that:
//!
//! ```no_run
//! # fn main() -> Result<(), migtun_certs::CertError> {
//! let dir = std::path::Path::new("/etc/migtun");
//! migtun_certs::init(dir)?; // DIR/ca.pem, DIR/ca.key
//! let (cert, key) = migtun_certs::issue(dir, "host-a")?; // DIR/host-a.pem, DIR/host-a.key
//! # let _ = (cert, key); Ok(()) }
//! ```

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// The `time` crate of [`IssueOptions`]' dates, for users without their own dependency on it.
pub use time;

/// File name of the CA certificate inside a certs directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a certs directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name of the CA made by [`init`].
pub const DEFAULT_CA_NAME: &str = "migtun CA";
/// Validity of a new CA certificate.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// Default validity of a host certificate.
pub const HOST_VALIDITY: Duration = Duration::days(730);
/// File name of the certificate revocation list written by [`revoke`] (the agents' `tls.crl`).
pub const CRL_FILE: &str = "crl.pem";
/// The nextUpdate of a CRL made by [`revoke`] is this far ahead. migtun does not enforce
/// nextUpdate (a CRL from `revoke` only ever grows); tools that do will want `revoke` re-run
/// (any name already revoked re-signs the list) within this time.
pub const CRL_VALIDITY: Duration = Duration::days(365);
/// `notBefore` is set this far in the past, so hosts with slightly slow clocks accept the cert.
pub const CLOCK_SKEW_MARGIN: Duration = Duration::hours(1);

/// Errors of the PKI helpers; every message names the file or host name involved.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid host name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: String },
    #[error("{path} already exists; refusing to replace this host's key (renewing? add --force; the host keeps its old files until the new ones are deployed)")]
    HostExists { path: String },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("{path}: {detail}")]
    BadFile { path: String, detail: String },
    #[error("{path} is not the private key of {cert}")]
    KeyMismatch { path: String, cert: String },
    #[error("invalid validity for {name:?}: not_before {not_before} is not before not_after {not_after}")]
    Validity {
        name: String,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    },
    #[error("cannot make the certificate for {name:?}: {source}")]
    Generate { name: String, source: rcgen::Error },
}

/// A certificate authority: its certificate (as PEM) and its signing key.
pub struct Ca {
    /// The CA certificate exactly as written to / read from `ca.pem`.
    cert_pem: String,
    /// The issuer rebuilt by rcgen (same subject, key and key identifier as `cert_pem`).
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Options of [`Ca::issue`]; the default is a 2-year ECDSA P-256 certificate for just the name.
#[derive(Clone, Debug, Default)]
pub struct IssueOptions {
    /// More DNS SANs besides the host name.
    pub extra_dns: Vec<String>,
    /// Default: now minus [`CLOCK_SKEW_MARGIN`].
    pub not_before: Option<OffsetDateTime>,
    /// Default: now plus [`HOST_VALIDITY`].
    pub not_after: Option<OffsetDateTime>,
    /// An Ed25519 key instead of ECDSA P-256.
    pub ed25519: bool,
    /// IP address SANs (for peers dialled by address; the peer's name stays its DNS SAN).
    pub ips: Vec<std::net::IpAddr>,
}

/// One revoked certificate of a CRL: its serial number (big-endian bytes) and when it was revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub serial: Vec<u8>,
    pub at: OffsetDateTime,
}

/// A host certificate and its private key (PKCS#8), both PEM.
#[derive(Clone)]
pub struct HostCert {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for HostCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCert")
            .field("name", &self.name)
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA: ECDSA P-256, `CA:true`, keyCertSign + cRLSign, valid for 10 years.
    pub fn generate(common_name: &str) -> Result<Ca, CertError> {
        let gen_err = |source| CertError::Generate {
            name: common_name.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_MARGIN;
        params.not_after = now + CA_VALIDITY;
        let issuer = params.self_signed(&key).map_err(gen_err)?;
        Ok(Ca {
            cert_pem: issuer.pem(),
            issuer,
            key,
        })
    }

    /// Reads `DIR/ca.pem` and `DIR/ca.key` (PEM PKCS#8). The CA may come from any PKI as long
    /// as rcgen can sign with its key (ECDSA P-256/P-384, Ed25519, RSA).
    pub fn load(dir: &Path) -> Result<Ca, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
        Ca::from_pem(&cert_pem, &key_pem, &cert_path, &key_path)
    }

    /// A CA from its certificate and PKCS#8 key in PEM; the paths are only used in messages.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Ca, CertError> {
        let cert_file = cert_path.display().to_string();
        let key_file = key_path.display().to_string();
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::BadFile {
            path: key_file.clone(),
            detail: format!("not a usable PEM PKCS#8 private key ({e})"),
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| CertError::BadFile {
                path: cert_file.clone(),
                detail: format!("not a usable PEM CA certificate ({e})"),
            })?;
        // The key must belong to the certificate, or everything we issue would fail to verify.
        let spki = first_cert_spki(cert_pem).ok_or_else(|| CertError::BadFile {
            path: cert_file.clone(),
            detail: "cannot parse the certificate".into(),
        })?;
        if spki != key.public_key_der() {
            return Err(CertError::KeyMismatch {
                path: key_file,
                cert: cert_file,
            });
        }
        let issuer = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate {
                name: cert_file.clone(),
                source,
            })?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer,
            key,
        })
    }

    /// The CA certificate, PEM (the trust bundle for every agent: `tls.ca`).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PEM PKCS#8.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A host certificate for `name`: DNS SAN `name` (+ `opts.extra_dns`), CN `name`,
    /// EKU serverAuth + clientAuth, KeyUsage digitalSignature + keyEncipherment, not a CA.
    pub fn issue(&self, name: &str, opts: &IssueOptions) -> Result<HostCert, CertError> {
        validate_dns_name(name)?;
        for extra in &opts.extra_dns {
            validate_dns_name(extra)?;
        }
        let gen_err = |source| CertError::Generate {
            name: name.to_string(),
            source,
        };
        let alg = if opts.ed25519 {
            &rcgen::PKCS_ED25519
        } else {
            &rcgen::PKCS_ECDSA_P256_SHA256
        };
        let key = KeyPair::generate_for(alg).map_err(gen_err)?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let mut sans: Vec<&str> = vec![name];
        for extra in &opts.extra_dns {
            if !sans.iter().any(|s| s.eq_ignore_ascii_case(extra)) {
                sans.push(extra);
            }
        }
        params.subject_alt_names = sans
            .into_iter()
            .map(|s| Ok(SanType::DnsName(s.try_into().map_err(gen_err)?)))
            .collect::<Result<_, CertError>>()?;
        params.subject_alt_names.extend(opts.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = opts.not_before.unwrap_or(now - CLOCK_SKEW_MARGIN);
        params.not_after = opts.not_after.unwrap_or(now + HOST_VALIDITY);
        if params.not_before >= params.not_after {
            return Err(CertError::Validity {
                name: name.to_string(),
                not_before: params.not_before,
                not_after: params.not_after,
            });
        }
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(gen_err)?;
        Ok(HostCert {
            name: name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CRL (PEM) signed by this CA listing `revoked`, with CRL number `number` (which must
    /// grow with each new list), current from now for [`CRL_VALIDITY`].
    pub fn crl(&self, revoked: &[Revoked], number: u64) -> Result<String, CertError> {
        let gen_err = |source| CertError::Generate {
            name: "CRL".to_string(),
            source,
        };
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - CLOCK_SKEW_MARGIN,
            next_update: now + CRL_VALIDITY,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from(r.serial.clone()),
                    revocation_time: r.at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer, &self.key)
            .and_then(|crl| crl.pem())
            .map_err(gen_err)
    }

    /// The serial number of a certificate (PEM) this CA issued; an error names `path` if the
    /// certificate does not parse or another CA issued it.
    pub fn serial_of(&self, cert_pem: &str, path: &Path) -> Result<Vec<u8>, CertError> {
        let bad = |detail: String| CertError::BadFile {
            path: path.display().to_string(),
            detail,
        };
        let der = pem_der(cert_pem, "CERTIFICATE").ok_or_else(|| bad("no PEM certificate".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| bad(format!("cannot parse the certificate: {e}")))?;
        if cert.issuer().as_raw() != self.subject_der()?.as_slice() {
            return Err(bad(format!(
                "issued by {:?}, not by this CA ({:?})",
                cert.issuer().to_string(),
                self.subject_name()
            )));
        }
        Ok(cert.serial.to_bytes_be())
    }

    fn subject_der(&self) -> Result<Vec<u8>, CertError> {
        let der = pem_der(&self.cert_pem, "CERTIFICATE").unwrap_or_default();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::BadFile {
            path: CA_CERT_FILE.to_string(),
            detail: format!("cannot parse the CA certificate: {e}"),
        })?;
        Ok(cert.subject().as_raw().to_vec())
    }

    fn subject_name(&self) -> String {
        let der = pem_der(&self.cert_pem, "CERTIFICATE").unwrap_or_default();
        x509_parser::parse_x509_certificate(&der)
            .map(|(_, c)| c.subject().to_string())
            .unwrap_or_default()
    }

    /// Writes `DIR/ca.pem` (0644) and `DIR/ca.key` (0600). Refuses to overwrite an existing
    /// `ca.key`: replacing a CA key invalidates every certificate it issued.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.symlink_metadata().is_ok() {
            return Err(CertError::Exists {
                path: key_path.display().to_string(),
            });
        }
        // The key first, created exclusively: two concurrent `init`s cannot both win.
        write_new(&key_path, self.key_pem().as_bytes(), 0o600)?;
        write_replace(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)
    }
}

impl HostCert {
    /// Writes `DIR/NAME.pem` (0644) and `DIR/NAME.key` (0600, never readable by others, not even
    /// briefly). Existing files of that name are replaced atomically (certificate renewal).
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), CertError> {
        validate_dns_name(&self.name)?;
        let cert_path = dir.join(format!("{}.pem", self.name));
        let key_path = dir.join(format!("{}.key", self.name));
        write_replace(&key_path, self.key_pem.as_bytes(), 0o600)?;
        write_replace(&cert_path, self.cert_pem.as_bytes(), 0o644)?;
        Ok((cert_path, key_path))
    }
}

/// `migtun certs init --dir DIR`: creates DIR (0700) if missing, a new CA, and writes it.
pub fn init(dir: &Path) -> Result<(), CertError> {
    if !dir.is_dir() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CertError::Write {
                path: dir.display().to_string(),
                source,
            })?;
    }
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.symlink_metadata().is_ok() {
        return Err(CertError::Exists {
            path: key_path.display().to_string(),
        });
    }
    Ca::generate(DEFAULT_CA_NAME)?.write(dir)
}

/// `migtun certs issue --dir DIR --name HOST`: DIR/HOST.pem and DIR/HOST.key signed by DIR/ca.*.
/// Returns the (certificate, key) paths.
pub fn issue(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), CertError> {
    issue_with(dir, name, &IssueOptions::default(), false)
}

/// [`issue`] with options (`--days`, `--ip`). An existing `DIR/HOST.key` is replaced only with
/// `replace` (`--force`): replacing a host's key by mistake locks that host out until its new
/// files are deployed.
pub fn issue_with(dir: &Path, name: &str, opts: &IssueOptions, replace: bool) -> Result<(PathBuf, PathBuf), CertError> {
    validate_dns_name(name)?;
    let key_path = dir.join(format!("{name}.key"));
    if !replace && key_path.symlink_metadata().is_ok() {
        return Err(CertError::HostExists { path: key_path.display().to_string() });
    }
    let ca = Ca::load(dir)?;
    ca.issue(name, opts)?.write(dir)
}

/// `migtun certs revoke --dir DIR --name HOST`: adds DIR/HOST.pem (which DIR/ca.* must have
/// issued) to DIR/crl.pem, signed by DIR/ca.key, keeping what the list revoked before and
/// raising its CRL number. Returns the CRL's path. Revoking a certificate twice re-signs the
/// list without adding it again.
pub fn revoke(dir: &Path, name: &str) -> Result<PathBuf, CertError> {
    validate_dns_name(name)?;
    let ca = Ca::load(dir)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let serial = ca.serial_of(&read_string(&cert_path)?, &cert_path)?;
    let crl_path = dir.join(CRL_FILE);
    let (mut revoked, number) = match std::fs::read_to_string(&crl_path) {
        Ok(text) => read_crl(&ca, &text, &crl_path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(source) => {
            return Err(CertError::Read {
                path: crl_path.display().to_string(),
                source,
            })
        }
    };
    if !revoked.iter().any(|r| r.serial == serial) {
        revoked.push(Revoked {
            serial,
            at: OffsetDateTime::now_utc(),
        });
    }
    let next = number.checked_add(1).ok_or_else(|| CertError::BadFile {
        path: crl_path.display().to_string(),
        detail: "CRL number cannot grow any more".into(),
    })?;
    write_replace(&crl_path, ca.crl(&revoked, next)?.as_bytes(), 0o644)?;
    Ok(crl_path)
}

/// The entries and CRL number of a CRL (PEM) that `ca` issued.
pub fn read_crl(ca: &Ca, text: &str, path: &Path) -> Result<(Vec<Revoked>, u64), CertError> {
    let bad = |detail: String| CertError::BadFile {
        path: path.display().to_string(),
        detail,
    };
    let der = pem_der(text, "X509 CRL").ok_or_else(|| bad("no PEM CRL (-----BEGIN X509 CRL-----)".into()))?;
    let (_, crl) =
        x509_parser::parse_x509_crl(&der).map_err(|e| bad(format!("cannot parse the CRL: {e}")))?;
    if crl.issuer().as_raw() != ca.subject_der()?.as_slice() {
        return Err(bad(format!(
            "issued by {:?}, not by the CA of this directory",
            crl.issuer().to_string()
        )));
    }
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: r.serial().to_bytes_be(),
            at: r.revocation_date.to_datetime(),
        })
        .collect();
    let number = match crl.crl_number() {
        None => 0,
        Some(n) => {
            let bytes = n.to_bytes_be();
            if bytes.len() > 8 {
                return Err(bad("CRL number larger than 64 bits".into()));
            }
            bytes.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b))
        }
    };
    Ok((revoked, number))
}

/// The DER contents of the first PEM block labelled `label` in `text`.
fn pem_der(text: &str, label: &str) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label == label)
        .map(|p| p.contents)
}

/// Checks that `name` is a DNS host name: labels of 1..=63 letters, digits and '-' (not at
/// either end of a label), separated by '.', at most 253 characters in all.
pub fn validate_dns_name(name: &str) -> Result<(), CertError> {
    let bad = |reason: &str| {
        Err(CertError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return bad(&format!(
            "character {c:?} not allowed (letters, digits, '-' and '.' only)"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("empty label (leading, trailing or double '.')");
        }
        if label.len() > 63 {
            return bad(&format!("label {label:?} is longer than 63 characters"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad(&format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

fn read_string(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The DER SubjectPublicKeyInfo of the first certificate of a PEM text.
fn first_cert_spki(pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.public_key().raw.to_vec())
}

/// Creates `path` exclusively with permission bits `mode` from the start.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let werr = |source| CertError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(CertError::Exists {
                path: path.display().to_string(),
            })
        }
        Err(e) => return Err(werr(e)),
    };
    // The umask may have removed bits (e.g. 0644 -> 0600 under umask 077); set the exact mode.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(werr)?;
    file.write_all(data).map_err(werr)?;
    file.sync_all().map_err(werr)
}

/// Writes `path` via a temporary file created with `mode` in the same directory, then renames
/// it over `path`: readers never see a partial file, and a key is never world-readable.
fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp); // a leftover of a crashed run of this very pid
    if let Err(e) = write_new(&tmp, data, mode) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        CertError::Write {
            path: path.display().to_string(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn der(pem_text: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).unwrap();
        pem.contents
    }

    #[test]
    fn init_and_issue_write_files_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        init(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.pem")), 0o644);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        let (cert, key) = issue(&dir, "host-a").unwrap();
        assert_eq!(cert, dir.join("host-a.pem"));
        assert_eq!(key, dir.join("host-a.key"));
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(mode(&key), 0o600);
        assert!(std::fs::read_to_string(&key)
            .unwrap()
            .contains("BEGIN PRIVATE KEY"));
        // Re-issuing refuses to replace the key; with `replace` (--force) it replaces the files
        // and keeps the modes; no temporary files are left.
        let before = std::fs::read(&key).unwrap();
        assert!(matches!(issue(&dir, "host-a"), Err(CertError::HostExists { .. })));
        assert_eq!(std::fs::read(&key).unwrap(), before, "the refused re-issue leaves the key");
        issue_with(&dir, "host-a", &IssueOptions::default(), true).unwrap();
        assert_ne!(std::fs::read(&key).unwrap(), before);
        assert_eq!(mode(&key), 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn issued_cert_has_san_eku_and_is_signed_by_ca() {
        for ed25519 in [false, true] {
            let ca = Ca::generate("test CA").unwrap();
            let opts = IssueOptions {
                extra_dns: vec!["a.example.org".into()],
                ed25519,
                ..Default::default()
            };
            let host = ca.issue("host-a", &opts).unwrap();
            let ca_der = der(&ca.cert_pem());
            let host_der = der(&host.cert_pem);
            let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
            let (_, cert) = parse_x509_certificate(&host_der).unwrap();

            assert!(ca_cert.is_ca());
            assert!(!cert.is_ca());
            let sans: Vec<String> = cert
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect();
            assert_eq!(sans, ["host-a", "a.example.org"]);
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth);
            let ku = cert.key_usage().unwrap().unwrap().value;
            assert!(ku.digital_signature());
            assert_eq!(cert.issuer(), ca_cert.subject());
            cert.verify_signature(Some(ca_cert.public_key()))
                .expect("signed by the CA");
            assert!(cert.validity().is_valid());
            let left = cert.validity().time_to_expiration().unwrap();
            assert!(
                left > Duration::days(729) && left <= HOST_VALIDITY,
                "{left}"
            );
            assert!(host.key_pem.contains("BEGIN PRIVATE KEY"));
        }
    }

    #[test]
    fn load_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path()).unwrap();
        let ca = Ca::load(tmp.path()).unwrap();
        assert_eq!(
            ca.cert_pem(),
            std::fs::read_to_string(tmp.path().join("ca.pem")).unwrap()
        );
        assert_eq!(
            ca.key_pem(),
            std::fs::read_to_string(tmp.path().join("ca.key")).unwrap()
        );
        // Certificates issued by the loaded CA verify against the original CA certificate.
        let host = ca.issue("host-b", &IssueOptions::default()).unwrap();
        let ca_der = der(&ca.cert_pem());
        let host_der = der(&host.cert_pem);
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        let (_, cert) = parse_x509_certificate(&host_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());

        // A key of another CA is refused, naming the key file.
        let other = Ca::generate("other").unwrap();
        std::fs::write(tmp.path().join("ca.key"), other.key_pem()).unwrap();
        let err = Ca::load(tmp.path()).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn bad_names_refused() {
        let ca = Ca::generate("test CA").unwrap();
        for bad in [
            "a b",
            "",
            "-a",
            "a-",
            "a..b",
            "a.",
            "../x",
            "a/b",
            &"a".repeat(64),
            &["abc"; 70].join("."),
        ] {
            let err = ca.issue(bad, &IssueOptions::default()).unwrap_err();
            assert!(
                matches!(err, CertError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
        }
        let err = ca.issue("a b", &IssueOptions::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid host name \"a b\": "),
            "{err}"
        );
        for good in ["a", "host-a", "h1.example.org", "A-1", &"a".repeat(63)] {
            validate_dns_name(good).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path()).unwrap();
        assert!(matches!(
            issue(tmp.path(), "x/y"),
            Err(CertError::InvalidName { .. })
        ));
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path()).unwrap();
        let before = std::fs::read(tmp.path().join("ca.key")).unwrap();
        let err = init(tmp.path()).unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
        let err = Ca::generate("x").unwrap().write(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert_eq!(std::fs::read(tmp.path().join("ca.key")).unwrap(), before);
    }

    #[test]
    fn missing_ca_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let err = issue(tmp.path(), "host-a").unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn revoke_grows_one_signed_list() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(dir).unwrap();
        issue(dir, "host-a").unwrap();
        issue(dir, "host-b").unwrap();
        let ca = Ca::load(dir).unwrap();
        let serial = |host: &str| {
            let path = dir.join(format!("{host}.pem"));
            ca.serial_of(&std::fs::read_to_string(&path).unwrap(), &path)
                .unwrap()
        };
        let listed = || {
            let path = dir.join(CRL_FILE);
            let (revoked, number) =
                read_crl(&ca, &std::fs::read_to_string(&path).unwrap(), &path).unwrap();
            let serials: Vec<Vec<u8>> = revoked.into_iter().map(|r| r.serial).collect();
            (serials, number)
        };

        let crl = revoke(dir, "host-a").unwrap();
        assert_eq!(crl, dir.join("crl.pem"));
        assert_eq!(mode(&crl), 0o644);
        assert_eq!(listed(), (vec![serial("host-a")], 1));
        // Signed by the CA.
        let crl_der = pem_der(&std::fs::read_to_string(&crl).unwrap(), "X509 CRL").unwrap();
        let (_, parsed) = parse_x509_crl(&crl_der).unwrap();
        let ca_der = der(&ca.cert_pem());
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(parsed.issuer(), ca_cert.subject());

        revoke(dir, "host-b").unwrap();
        assert_eq!(listed(), (vec![serial("host-a"), serial("host-b")], 2));
        // Again: not listed twice, but re-signed with a higher number.
        revoke(dir, "host-a").unwrap();
        assert_eq!(listed(), (vec![serial("host-a"), serial("host-b")], 3));

        // No such host, or a certificate of another CA: refused, naming the file.
        let err = revoke(dir, "host-z").unwrap_err();
        assert!(err.to_string().contains("host-z.pem"), "{err}");
        let other = Ca::generate("other CA").unwrap();
        other
            .issue("host-x", &IssueOptions::default())
            .unwrap()
            .write(dir)
            .unwrap();
        let err = revoke(dir, "host-x").unwrap_err();
        assert!(
            err.to_string().contains("host-x.pem") && err.to_string().contains("not by this CA"),
            "{err}"
        );
        assert_eq!(listed().1, 3, "a refused revoke leaves the list alone");
        assert!(matches!(
            revoke(dir, "../ca"),
            Err(CertError::InvalidName { .. })
        ));
    }

    #[test]
    fn explicit_validity() {
        let ca = Ca::generate("test CA").unwrap();
        let now = OffsetDateTime::now_utc();
        let opts = IssueOptions {
            not_before: Some(now - Duration::days(10)),
            not_after: Some(now - Duration::days(1)),
            ..Default::default()
        };
        let host = ca.issue("old", &opts).unwrap();
        let host_der = der(&host.cert_pem);
        let (_, cert) = parse_x509_certificate(&host_der).unwrap();
        assert!(!cert.validity().is_valid());
        let opts = IssueOptions {
            not_before: Some(now),
            not_after: Some(now),
            ..Default::default()
        };
        assert!(matches!(
            ca.issue("x", &opts),
            Err(CertError::Validity { .. })
        ));
    }
}
