//! Outgoing TLS connections to one peer, with a few of them handshaked ahead of need.
//!
//! Each tunnelled stream is one TLS connection (see DESIGN.md for why: per-stream kernel flow
//! control, no head-of-line blocking, multifd spread across cores). The handshake is kept off
//! the critical path twice over: a small pool of idle, already-handshaked connections is kept
//! warm after a peer is first used, and every new connection resumes a TLS 1.3 session.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Idle pre-handshaked connections kept per peer: enough for a migration's RAM stream and a
/// disk or two to open without waiting; more streams at once get freshly resumed sessions.
pub const WARM_CONNECTIONS: usize = 2;
/// Age after which an idle pooled connection is closed rather than used. Well under the
/// receiver's [`crate::expose::IDLE_PREAMBLE_TIMEOUT`], so we never hand out a connection the
/// peer is about to close.
pub const POOL_MAX_IDLE: Duration = Duration::from_secs(20);
/// TCP connect plus TLS handshake; a peer that cannot do both in this time is treated as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed refill, wait this long before trying to warm the pool again.
const REFILL_BACKOFF: Duration = Duration::from_secs(2);

pub type PeerStream = TlsStream<crate::socket::TlsTransport>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {address}: {source}")]
    Resolve { address: String, source: io::Error },
    #[error("cannot reach {address}: {source}")]
    Unreachable { address: String, source: io::Error },
    #[error("TLS handshake with {address} failed ({reason}): {source}")]
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

struct Idle {
    stream: PeerStream,
    since: Instant,
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
    shutdown: CancellationToken,
}

impl PeerConnector {
    pub fn new(
        name: &str,
        address: &str,
        tls: TlsConnector,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<PeerConnector>, rustls::pki_types::InvalidDnsNameError> {
        Ok(Arc::new(PeerConnector {
            name: name.to_string(),
            address: address.to_string(),
            server_name: ServerName::try_from(name.to_string())?,
            tls,
            metrics,
            pool: Mutex::new(VecDeque::new()),
            refilling: AtomicBool::new(false),
            shutdown,
        }))
    }

    /// A connection for a new stream: a warm one if there is one, else a new one. `true` in the
    /// result means it came from the pool (and may have been closed by the peer meanwhile).
    pub async fn get(self: &Arc<Self>) -> Result<(PeerStream, bool), ConnectError> {
        if let Some(s) = self.take_warm() {
            self.refill();
            return Ok((s, true));
        }
        // No refill yet: the caller calls `refill` once this connection has read its first
        // reply, which carries the session tickets, so that the warm connections resume the
        // session instead of racing it with full handshakes of their own.
        Ok((self.connect().await?, false))
    }

    /// Opens a new data connection: resolve, TCP connect, TLS handshake, all within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<PeerStream, ConnectError> {
        self.connect_with(&self.tls).await
    }

    /// Opens a new connection with another TLS client configuration (the control connection's
    /// ALPN), same peer, same checks, same metrics.
    pub async fn connect_with(&self, tls: &TlsConnector) -> Result<PeerStream, ConnectError> {
        if self.shutdown.is_cancelled() {
            return Err(ConnectError::ShuttingDown);
        }
        let result = tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(tls)).await.unwrap_or_else(|_| {
            Err(ConnectError::Unreachable {
                address: self.address.clone(),
                source: io::Error::new(io::ErrorKind::TimedOut, "connect and handshake timed out"),
            })
        });
        match &result {
            Ok(s) => self.metrics.handshake_done("client", s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)),
            Err(ConnectError::Handshake { reason, .. }) => self.metrics.handshake_failed("client", &self.name, reason),
            Err(_) => {}
        }
        result
    }

    async fn connect_inner(&self, tls: &TlsConnector) -> Result<PeerStream, ConnectError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&self.address)
            .await
            .map_err(|source| ConnectError::Resolve { address: self.address.clone(), source })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or_else(|| ConnectError::Unreachable { address: self.address.clone(), source: last })?;
        tls.connect(self.server_name.clone(), crate::socket::transport(tcp)).await.map_err(|source| ConnectError::Handshake {
            address: self.address.clone(),
            reason: crate::tls::failure_reason(&source),
            source,
        })
    }

    fn take_warm(&self) -> Option<PeerStream> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(idle) = pool.pop_front() {
            if idle.since.elapsed() < POOL_MAX_IDLE {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Tops the pool up to [`WARM_CONNECTIONS`] in the background (one refill at a time).
    pub fn refill(self: &Arc<Self>) {
        if self.shutdown.is_cancelled() || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let missing = {
                    let mut pool = this.pool.lock().unwrap_or_else(|p| p.into_inner());
                    pool.retain(|i| i.since.elapsed() < POOL_MAX_IDLE);
                    WARM_CONNECTIONS.saturating_sub(pool.len())
                };
                if missing == 0 || this.shutdown.is_cancelled() {
                    break;
                }
                match this.connect().await {
                    Ok(stream) => {
                        let mut pool = this.pool.lock().unwrap_or_else(|p| p.into_inner());
                        pool.push_back(Idle { stream, since: Instant::now() });
                    }
                    Err(e) => {
                        tracing::debug!(peer = %this.name, error = %e, "could not warm a connection");
                        tokio::time::sleep(REFILL_BACKOFF).await;
                        break;
                    }
                }
            }
            this.refilling.store(false, Ordering::Release);
        });
    }

    /// Closes the idle connections (on shutdown).
    pub fn clear(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
