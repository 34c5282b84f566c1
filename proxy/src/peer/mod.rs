//! Connecting to a peer: outgoing streams to one `[[peer]]`, on the peer's transport.
//!
//! TLS over TCP: each tunnelled stream is one TLS connection (see DESIGN.md for why: per-stream
//! kernel flow control, no head-of-line blocking, multifd spread across cores). The handshake is
//! kept off the critical path twice over: a small pool of idle, already-handshaked connections is
//! kept warm after a peer is first used, and every new connection resumes a TLS 1.3 session.
//!
//! QUIC: one connection per peer, dialled on first use (and again when it dies); each stream is
//! a bidirectional QUIC stream on it, which costs no round trip to open.
//!
//! `auto`: QUIC, unless it does not get through within [`AUTO_QUIC_TIMEOUT`]; then TLS over TCP
//! for new streams (logged once) while QUIC is probed in the background, and QUIC again for new
//! streams once a probe gets through ([`AutoPolicy`] decides).
//!
//! - `mod.rs`: the [`PeerConnector`] and the stream it hands out;
//! - `pool.rs`: TLS over TCP, the warm pool and the dial limit;
//! - `quic.rs`: the peer's one QUIC connection;
//! - `auto.rs`: the `auto` policy (no I/O) and the background probe.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::Transport;
use crate::io::buffers::PooledReader;
use crate::metrics::Metrics;
pub use crate::stream::PeerStream;

mod auto;
mod pool;
mod quic;

pub use auto::{AutoPolicy, Choice, Switch, AUTO_PROBE_MAX, AUTO_PROBE_MIN, AUTO_QUIC_TIMEOUT};
use pool::Idle;
pub use pool::{MAX_CONCURRENT_DIALS, POOL_MAX_IDLE, SERVER_FINISHED_WAIT, WARM_CONNECTIONS};
pub use quic::{QuicClient, QUIC_STREAMS_PER_CONNECTION};

/// TCP connect plus TLS handshake; a peer that cannot do both in this time is treated as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);


/// A TLS client configuration (the data or the control connection's ALPN), with its session
/// store and the verifier that checks a resumed session again.
pub type TlsConnector = Arc<crate::tls::context::ClientSide>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {address}: {source}")]
    Resolve { address: String, source: io::Error },
    #[error("cannot reach {address}: {source}")]
    Unreachable { address: String, source: io::Error },
    #[error("handshake with {address} failed ({reason}): {source}")]
    Handshake { address: String, reason: &'static str, source: io::Error },
    #[error("agent is shutting down")]
    ShuttingDown,
}

impl ConnectError {
    /// Stable reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } => "peer-unresolvable",
            ConnectError::Unreachable { .. } => "peer-unreachable",
            ConnectError::Handshake { reason, .. } => reason,
            ConnectError::ShuttingDown => "draining",
        }
    }
}


/// Connections to one `[[peer]]`.
pub struct PeerConnector {
    pub name: String,
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    metrics: Arc<Metrics>,
    pool: Mutex<VecDeque<Idle>>,
    refilling: AtomicBool,
    /// A task closes pooled connections as they expire ([`PeerConnector::expire_idle`]).
    expiring: AtomicBool,
    /// Bounds this agent's TLS dials in progress to the peer (see [`MAX_CONCURRENT_DIALS`]).
    dials: tokio::sync::Semaphore,
    shutdown: CancellationToken,
    transport: Transport,
    /// The QUIC side, for transports `quic` and `auto`.
    quic: Option<QuicClient>,
    policy: Mutex<AutoPolicy>,
    probing: AtomicBool,
}

impl PeerConnector {
    pub fn new(
        name: &str,
        address: &str,
        tls: TlsConnector,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<PeerConnector>, rustls::pki_types::InvalidDnsNameError> {
        PeerConnector::with_transport(name, address, tls, Transport::Tls, None, metrics, shutdown)
    }

    /// A connector for a peer on `transport`; `quic` is required for `quic` and `auto`.
    pub fn with_transport(
        name: &str,
        address: &str,
        tls: TlsConnector,
        transport: Transport,
        quic: Option<QuicClient>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<PeerConnector>, rustls::pki_types::InvalidDnsNameError> {
        let server_name = ServerName::try_from(name.to_string())?;
        // `/readyz` lists every configured peer with its last connection's outcome.
        metrics.health.peer_configured(name);
        Ok(Arc::new(PeerConnector {
            name: name.to_string(),
            address: address.to_string(),
            server_name,
            tls,
            metrics,
            pool: Mutex::new(VecDeque::new()),
            refilling: AtomicBool::new(false),
            expiring: AtomicBool::new(false),
            dials: tokio::sync::Semaphore::new(MAX_CONCURRENT_DIALS),
            shutdown,
            transport: if quic.is_some() { transport } else { Transport::Tls },
            quic,
            policy: Mutex::new(AutoPolicy::default()),
            probing: AtomicBool::new(false),
        }))
    }

    /// The configured transport (`tls` when no QUIC endpoint was given).
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Which transport a new stream takes now.
    pub fn choice(&self) -> Choice {
        match self.transport {
            Transport::Tls => Choice::Tls,
            Transport::Quic => Choice::Quic,
            Transport::Auto => self.policy.lock().unwrap_or_else(|p| p.into_inner()).choose(),
        }
    }

    /// A stream to the peer: on TLS a warm connection if there is one, else a new one; on QUIC a
    /// new stream on the peer's connection. `true` in the result means the connection existed
    /// before (and may have been closed by the peer meanwhile: then [`PeerConnector::connect`]).
    pub async fn get(self: &Arc<Self>) -> Result<(PeerStream, bool), ConnectError> {
        if self.choice() == Choice::Quic {
            match self.quic_stream(false).await {
                Ok((s, reused)) => return Ok((PeerStream::Quic(PooledReader::new(s)), reused)),
                Err(e) => self.quic_failed(e)?,
            }
        }
        if let Some(s) = self.take_warm() {
            self.refill();
            return Ok((PeerStream::Tls(Box::new(s)), true));
        }
        // No refill yet: the caller calls `refill` once this connection has read its first
        // reply, which carries the session tickets, so that the warm connections resume the
        // session instead of racing it with full handshakes of their own.
        Ok((PeerStream::Tls(Box::new(self.connect_with(&self.tls).await?)), false))
    }

    /// A stream on a new connection (TLS), or on a live one (QUIC: a connection found dead is
    /// dialled again): for when the connection [`PeerConnector::get`] gave turned out stale.
    pub async fn connect(self: &Arc<Self>) -> Result<PeerStream, ConnectError> {
        if self.choice() == Choice::Quic {
            match self.quic_stream(false).await {
                Ok((s, _)) => return Ok(PeerStream::Quic(PooledReader::new(s))),
                Err(e) => self.quic_failed(e)?,
            }
        }
        Ok(PeerStream::Tls(Box::new(self.connect_with(&self.tls).await?)))
    }

    /// Logs a session refused because the peer's certificate no longer verifies; its reason.
    fn refused(&self, e: &rustls::Error) -> &'static str {
        let reason = crate::tls::failure::tls_failure_reason(e);
        warn!(peer = %self.name, address = %self.address, reason, error = %e,
            "resumed TLS session refused: the peer's certificate no longer verifies");
        reason
    }

    /// Closes the idle connections (on shutdown).
    pub fn clear(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
