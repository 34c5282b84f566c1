//! rustls configurations for both ends of the port, and what a handshake tells us.
//!
//! TLS 1.3 only, mutual authentication against the configured CA (and `tls.crl`, when set),
//! aws-lc-rs crypto with AES-128-GCM preferred (the cheapest AEAD on hosts with AES-NI, which
//! every hypervisor has). Session resumption is on in both directions so that opening a stream
//! to a peer seen before costs an abbreviated handshake.
//!
//! rustls does not call the certificate verifiers on a resumed handshake: the peer's
//! certificates come from the session, as they were when it was made. [`TlsContext`] keeps the
//! verifiers, so that the port and the connector check a resumed session's certificates again
//! with [`TlsContext::recheck_client`] / [`TlsContext::recheck_server`] (validity now, the CRL),
//! and a session that fails is refused and never resumed again.
//!
//! A reload ([`TlsContext::replace`]) swaps the identity and the verifiers behind every rustls
//! configuration already made (TLS and QUIC, server and client): the configurations hold a
//! resolver and verifiers that read the current `Material` at each handshake, so new
//! handshakes use the new files, while established connections, the session caches and the
//! configurations themselves stay as they are.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::server::danger::ClientCertVerified;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, WebPkiServerVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls::settings::{RecordLayer, TlsConfig};

/// How many TLS 1.3 sessions a client remembers (one or two per peer is what is used).
const CLIENT_SESSION_CACHE: usize = 1024;
/// Sessions a server remembers for resumption (rustls' default size, made explicit because we
/// wrap the cache).
const SERVER_SESSION_CACHE: usize = 256;
/// How many resumption tickets a server sends after each full handshake: one per warm
/// connection a client is likely to open next, so resumptions do not run dry.
const TLS13_TICKETS: usize = 4;
/// Certificates whose sessions a server refuses to resume, remembered (oldest forgotten first):
/// far more than the peers of one host, so a refused certificate stays refused.
const MAX_REFUSED_CERTIFICATES: usize = 1024;
/// Tickets a client may hold for one server (rustls keeps 8); forgetting takes at most this many.
const MAX_TICKETS_PER_SERVER: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("tls.ca: no usable CA certificate: {0}")]
    Roots(String),
    #[error("tls.cert/tls.key: {0}")]
    Identity(rustls::Error),
    #[error("certificate verifier (tls.ca, tls.crl): {0}")]
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

/// The peer certificate verifiers for one `[tls]` config: both directions use the same trust
/// anchors and CRLs. A CRL lists what is revoked: a certificate whose issuer has no CRL in
/// `tls.crl` is not revoked (unknown status is allowed), and a CRL past its next update still
/// counts (it only ever grows; an operator replaces it).
pub fn verifiers(
    tls: &TlsConfig,
    provider: Arc<CryptoProvider>,
) -> Result<(Arc<dyn ClientCertVerifier>, Arc<WebPkiServerVerifier>), TlsSetupError> {
    let roots = roots(tls)?;
    let mut client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
    let mut server = WebPkiServerVerifier::builder_with_provider(roots, provider);
    if !tls.crls.is_empty() {
        client = client.with_crls(tls.crls.iter().cloned()).allow_unknown_revocation_status();
        server = server.with_crls(tls.crls.iter().cloned()).allow_unknown_revocation_status();
    }
    let client = client.build().map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
    let server = server.build().map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
    Ok((client, server))
}

/// What a reload replaces: this host's certificate and key, and the verifiers of peers'
/// certificates (`tls.ca`, `tls.crl`).
struct Material {
    identity: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
}

impl Material {
    fn new(tls: &TlsConfig, provider: &Arc<CryptoProvider>) -> Result<Material, TlsSetupError> {
        let (client_verifier, server_verifier) = verifiers(tls, provider.clone())?;
        let identity = CertifiedKey::from_der(tls.cert_chain.clone(), tls.key.clone_key(), provider)
            .map_err(TlsSetupError::Identity)?;
        Ok(Material { identity: Arc::new(identity), client_verifier, server_verifier })
    }
}

/// The current [`Material`], shared by the context and the resolvers and verifiers inside every
/// rustls configuration made from it.
#[derive(Clone)]
struct Live(Arc<RwLock<Arc<Material>>>);

impl Live {
    fn get(&self) -> Arc<Material> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

/// Everything TLS the agent derives from its `[tls]` config: identity, verifiers, and the
/// certificates it will no longer resume sessions of. Every rustls configuration (TLS and QUIC,
/// server and client) is made from one `TlsContext`; [`TlsContext::replace`] swaps the identity
/// and verifiers under all of them (a reload of certificates, key, CA or CRL).
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    live: Live,
    /// Bumped by every [`TlsContext::replace`]: connections made under an older generation have
    /// their peer's certificate checked again before they carry a new stream.
    generation: AtomicU64,
    /// Told each new generation, for connections that live long (control connections).
    replaced: tokio::sync::watch::Sender<u64>,
    refused: Arc<RefusedCertificates>,
    /// `tls.record_layer`: whether rustls hands the keys over to our record layer.
    record_layer: RecordLayer,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext").field("generation", &self.generation()).finish_non_exhaustive()
    }
}

impl TlsContext {
    pub fn new(tls: &TlsConfig) -> Result<Arc<TlsContext>, TlsSetupError> {
        let provider = provider();
        let material = Material::new(tls, &provider)?;
        Ok(Arc::new(TlsContext {
            provider,
            live: Live(Arc::new(RwLock::new(Arc::new(material)))),
            generation: AtomicU64::new(0),
            replaced: tokio::sync::watch::Sender::new(0),
            refused: Arc::new(RefusedCertificates::default()),
            record_layer: tls.record_layer,
        }))
    }

    /// Makes every configuration made from this context use `tls`'s certificate, key, CA and
    /// CRL for the handshakes that start from now on. Nothing changes if `tls` is unusable.
    /// `tls.record_layer` is fixed for the life of the context (it shapes the configurations).
    pub fn replace(&self, tls: &TlsConfig) -> Result<(), TlsSetupError> {
        let material = Arc::new(Material::new(tls, &self.provider)?);
        *self.live.0.write().unwrap_or_else(|p| p.into_inner()) = material;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.replaced.send_replace(generation);
        Ok(())
    }

    /// Changes whenever [`TlsContext::replace`] ran.
    pub fn replaced(&self) -> tokio::sync::watch::Receiver<u64> {
        self.replaced.subscribe()
    }

    /// How many times the material was replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The port's server side: requires a client certificate from the CA.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsSetupError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsSetupError::Protocol)?
            .with_client_cert_verifier(Arc::new(LiveClientVerifier(self.live.clone())))
            .with_cert_resolver(Arc::new(LiveIdentity(self.live.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.ignore_client_order = true;
        config.send_tls13_tickets = TLS13_TICKETS;
        config.session_storage = Arc::new(ServerSessions {
            inner: ServerSessionMemoryCache::new(SERVER_SESSION_CACHE),
            refused: self.refused.clone(),
        });
        // `tls.record_layer = "own"`: the record layer after the handshake is ours
        // (crate::tls::session), rustls hands over the keys; crate::tls::session picks the layer by this flag.
        config.enable_secret_extraction = self.record_layer == RecordLayer::Own;
        Ok(Arc::new(config))
    }

    /// The client side, for connections to peers; the server name checked is the peer's name.
    pub fn client_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<Arc<ClientSide>, TlsSetupError> {
        let sessions = Arc::new(ClientSessions { inner: ClientSessionMemoryCache::new(CLIENT_SESSION_CACHE) });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsSetupError::Protocol)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LiveServerVerifier(self.live.clone())))
            .with_client_cert_resolver(Arc::new(LiveIdentity(self.live.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = rustls::client::Resumption::store(sessions.clone());
        // As for the server: the record layer follows this flag (crate::tls::session).
        config.enable_secret_extraction = self.record_layer == RecordLayer::Own;
        Ok(Arc::new(ClientSide { config: Arc::new(config), sessions, context: self.clone() }))
    }

    /// Checks a client's certificates again, now: for a resumed session, whose certificates
    /// rustls took from the session rather than verifying them, and for a connection made
    /// before a reload. On failure the leaf's sessions are not resumed again (the next
    /// handshake is a full one, refused by the verifier).
    pub fn recheck_client(&self, certs: Option<&[CertificateDer<'static>]>) -> Result<(), rustls::Error> {
        let Some((leaf, intermediates)) = certs.and_then(<[_]>::split_first) else {
            return Err(rustls::Error::NoCertificatesPresented);
        };
        let result = self.live.get().client_verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).map(|_| ());
        if result.is_err() {
            self.refused.add(leaf);
        }
        result
    }

    /// Checks a server's certificates again, now, for `name`: the client's side of
    /// [`TlsContext::recheck_client`].
    pub fn recheck_server(&self, certs: Option<&[CertificateDer<'static>]>, name: &ServerName<'_>) -> Result<(), rustls::Error> {
        let Some((leaf, intermediates)) = certs.and_then(<[_]>::split_first) else {
            return Err(rustls::Error::NoCertificatesPresented);
        };
        self.live.get().server_verifier.verify_server_cert(leaf, intermediates, name, &[], UnixTime::now()).map(|_| ())
    }
}

/// What a connection's handshake established about the client, kept for the streams that
/// connection carries later: a stream that arrives after a reload on a connection made before
/// it is served only if the peer's certificate passes the new verifier (a CRL that now revokes
/// it, a CA that no longer signs it).
#[derive(Clone, Debug)]
pub struct Handshaked {
    generation: u64,
    certs: Option<Vec<CertificateDer<'static>>>,
}

impl Handshaked {
    /// The client certificates of a connection handshaked under `tls`'s current material.
    pub fn now(tls: &TlsContext, certs: Option<Vec<CertificateDer<'static>>>) -> Handshaked {
        Handshaked { generation: tls.generation(), certs }
    }

    /// Resolves once a reload has made the peer's certificate unacceptable (never otherwise):
    /// a long-lived connection (control) is closed then.
    pub async fn revoked(&self, tls: &TlsContext) -> rustls::Error {
        let mut replaced = tls.replaced();
        loop {
            if replaced.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Err(e) = self.still_valid(tls) {
                return e;
            }
        }
    }

    /// Whether the connection may carry a new stream: always under the material it was
    /// handshaked with, else if its client certificate verifies under the current one.
    pub fn still_valid(&self, tls: &TlsContext) -> Result<(), rustls::Error> {
        if self.generation == tls.generation() {
            return Ok(());
        }
        tls.recheck_client(self.certs.as_deref())
    }
}

/// This host's certificate and key as they are now, for both sides of a handshake.
#[derive(Debug)]
struct LiveIdentity(Live);

impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().identity.clone())
    }
}

impl ResolvesClientCert for LiveIdentity {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().identity.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The server's verifier of client certificates as it is now.
#[derive(Debug)]
struct LiveClientVerifier(Live);

impl ClientCertVerifier for LiveClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA names in the CertificateRequest (they would have to outlive a reload); migtun
    /// clients have one certificate and send it whatever the hints.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.get().client_verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().client_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().client_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().client_verifier.supported_verify_schemes()
    }
}

/// The client's verifier of server certificates as it is now.
#[derive(Debug)]
struct LiveServerVerifier(Live);

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.get().server_verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().server_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().server_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().server_verifier.supported_verify_schemes()
    }
}

/// A client configuration and its session store, so that the tickets of a server whose
/// certificate failed its re-check can be forgotten.
pub struct ClientSide {
    pub config: Arc<ClientConfig>,
    sessions: Arc<ClientSessions>,
    context: Arc<TlsContext>,
}

impl std::fmt::Debug for ClientSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSide").field("alpn", &self.config.alpn_protocols).finish_non_exhaustive()
    }
}

impl ClientSide {
    /// [`TlsContext::recheck_server`]; on failure the server's tickets are forgotten, so the
    /// next connection makes a full handshake (which the verifier judges).
    pub fn recheck(&self, certs: Option<&[CertificateDer<'static>]>, name: &ServerName<'static>) -> Result<(), rustls::Error> {
        let result = self.context.recheck_server(certs, name);
        if result.is_err() {
            self.forget(name);
        }
        result
    }

    /// Drops every session ticket held for `name`.
    pub fn forget(&self, name: &ServerName<'static>) {
        for _ in 0..MAX_TICKETS_PER_SERVER {
            if self.sessions.inner.take_tls13_ticket(name).is_none() {
                break;
            }
        }
    }
}

/// Leaf certificates (DER) whose sessions the server no longer resumes.
#[derive(Debug, Default)]
struct RefusedCertificates {
    leaves: Mutex<VecDeque<Vec<u8>>>,
}

impl RefusedCertificates {
    fn add(&self, leaf: &CertificateDer<'_>) {
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if leaves.iter().any(|l| l.as_slice() == leaf.as_ref()) {
            return;
        }
        if leaves.len() >= MAX_REFUSED_CERTIFICATES {
            leaves.pop_front();
        }
        leaves.push_back(leaf.as_ref().to_vec());
    }

    /// Whether an encoded server session holds one of the refused certificates. rustls' session
    /// encoding is private, but it carries the client's certificates as DER bytes verbatim.
    fn in_session(&self, session: &[u8]) -> bool {
        let leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        leaves.iter().any(|l| !l.is_empty() && session.windows(l.len()).any(|w| w == l.as_slice()))
    }
}

/// The server's session cache, which neither stores nor hands back a session of a refused
/// certificate.
#[derive(Debug)]
struct ServerSessions {
    inner: Arc<ServerSessionMemoryCache>,
    refused: Arc<RefusedCertificates>,
}

impl StoresServerSessions for ServerSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        !self.refused.in_session(&value) && self.inner.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(key).filter(|v| !self.refused.in_session(v))
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.take(key).filter(|v| !self.refused.in_session(v))
    }

    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// The client's session cache, with a handle kept by [`ClientSide`].
#[derive(Debug)]
struct ClientSessions {
    inner: ClientSessionMemoryCache,
}

impl ClientSessionStore for ClientSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: rustls::client::Tls12ClientSessionValue) {
        self.inner.set_tls12_session(server_name, value)
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: rustls::client::Tls13ClientSessionValue) {
        self.inner.insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

/// The port's server side, from `tls` alone (tests, tools); the agent uses [`TlsContext`].
pub fn server_config(tls: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsSetupError> {
    TlsContext::new(tls)?.server_config(alpn)
}

/// The client side, from `tls` alone (tests, tools); the agent uses [`TlsContext`].
pub fn client_config(tls: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsSetupError> {
    Ok(TlsContext::new(tls)?.client_config(alpn)?.config.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once a certificate is refused, the server's cache neither hands back nor stores a
    /// session holding it (so the client's next handshake is a full one), and other sessions
    /// stay; the refused list is bounded.
    #[test]
    fn sessions_of_a_refused_certificate_are_neither_resumed_nor_stored() {
        let refused = Arc::new(RefusedCertificates::default());
        let store = ServerSessions { inner: ServerSessionMemoryCache::new(8), refused: refused.clone() };
        let leaf = CertificateDer::from(vec![0x30, 0x82, 0x01, 0x02, 0xaa, 0xbb, 0xcc]);
        let session = |tag: &[u8]| [b"session:".as_slice(), leaf.as_ref(), tag].concat();
        assert!(store.put(b"k1".to_vec(), session(b"1")));
        assert!(store.put(b"k2".to_vec(), b"another peer's session".to_vec()));
        assert_eq!(store.get(b"k1"), Some(session(b"1")));

        refused.add(&leaf);
        refused.add(&leaf);
        assert_eq!(store.take(b"k1"), None, "not resumed");
        assert_eq!(store.take(b"k2"), Some(b"another peer's session".to_vec()));
        assert!(!store.put(b"k3".to_vec(), session(b"3")), "no new ticket for it");

        for i in 0..MAX_REFUSED_CERTIFICATES + 10 {
            refused.add(&CertificateDer::from((i as u64).to_be_bytes().to_vec()));
        }
        assert_eq!(refused.leaves.lock().unwrap().len(), MAX_REFUSED_CERTIFICATES);
    }
}
