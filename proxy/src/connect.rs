//! Outgoing streams to one peer, on the peer's transport.
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

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Transport;
use crate::metrics::Metrics;
use crate::quic::stream::QuicStream;
use crate::io::buffers::PooledReader;
use crate::tls::session::{self, TlsSession};
pub use crate::transport::PeerStream;
use crate::transport::{AutoPolicy, Choice, Switch, AUTO_QUIC_TIMEOUT};

/// Idle pre-handshaked connections kept per peer: enough for a migration's RAM stream and a
/// disk or two to open without waiting; more streams at once get freshly resumed sessions.
pub const WARM_CONNECTIONS: usize = 2;
/// TLS dials in progress to one peer at once. Half the receiver's per-address cap on handshakes
/// in progress ([`crate::port::MAX_PENDING_PER_ADDRESS`], 64), so that one busy source never has
/// its own handshakes refused by the peer's flood protection; a resumed handshake takes about a
/// millisecond, so 32 at a time still opens 1,000 streams in well under a second.
///
/// A dial counts until the receiver is done with it, not only until we are
/// ([`TlsSession::server_finished`]): a TLS 1.3 client finishes first, and on a busy receiver
/// (1,000 streams opened at once by two agents on two cores, `tests/load.rs`) the receiver's
/// unfinished handshakes piled up behind the source's finished ones, past its cap of 64, and it
/// reset 17 of the 1,000.
pub const MAX_CONCURRENT_DIALS: usize = 32;
/// How long a dial waits for the receiver to finish its side of the handshake (its session
/// tickets) before the next dial may go. migtun's receivers always send tickets, within a round
/// trip plus their own handshake work; the bound only keeps a receiver that sends none from
/// stalling a dial for longer.
pub const SERVER_FINISHED_WAIT: Duration = Duration::from_secs(1);
/// Age after which an idle pooled connection is closed rather than used. Well under the
/// receiver's [`crate::route::expose::IDLE_PREAMBLE_TIMEOUT`], so we never hand out a connection the
/// peer is about to close. Closed when it is reached, not when the pool is next used: an agent
/// that fell idle kept its last two warm connections for good, in CLOSE_WAIT once the receiver
/// had closed its side after 30 s (`tests/load.rs`).
pub const POOL_MAX_IDLE: Duration = Duration::from_secs(20);
/// Closing an expired pooled connection: its close_notify, so that the receiver sees an orderly
/// end (not a truncated preamble), bounded in case the peer no longer reads.
const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// TCP connect plus TLS handshake; a peer that cannot do both in this time is treated as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams opened on one QUIC connection before new streams go on a fresh one (the old one
/// ends with its last stream). quinn does not give back every ended stream's slot: after 300
/// short streams a connection had 42 of its 1,024 slots fewer, after 1,500 it had 81 fewer,
/// although both sides read each stream to its end and had their FIN acknowledged
/// (tests/quic_transport.rs, `ended_streams_give_their_slots_back`). A fresh connection every
/// 256 streams costs one handshake (about a millisecond) and keeps nearly all slots usable.
pub const QUIC_STREAMS_PER_CONNECTION: usize = 256;
/// After a failed refill, wait this long before trying to warm the pool again.
const REFILL_BACKOFF: Duration = Duration::from_secs(2);

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

struct Idle {
    stream: TlsSession,
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

/// The client side of QUIC for one peer: the agent's endpoint and the peer's one connection.
pub struct QuicClient {
    pub endpoint: quinn::Endpoint,
    pub config: quinn::ClientConfig,
    /// What `config` was made from: re-checks the server's certificate, forgets its tickets.
    tls: TlsConnector,
    conn: Mutex<Option<quinn::Connection>>,
    /// Streams opened on `conn` so far (see [`QUIC_STREAMS_PER_CONNECTION`]).
    opened: AtomicUsize,
    /// One handshake at a time: streams that arrive meanwhile wait for it and share it.
    dialing: tokio::sync::Mutex<()>,
}

impl QuicClient {
    pub fn new(endpoint: quinn::Endpoint, config: quinn::ClientConfig, tls: TlsConnector) -> QuicClient {
        QuicClient {
            endpoint,
            config,
            tls,
            conn: Mutex::new(None),
            opened: AtomicUsize::new(0),
            dialing: tokio::sync::Mutex::new(()),
        }
    }

    /// The connection new streams go on: alive, and not yet through its share of streams.
    fn alive(&self) -> Option<quinn::Connection> {
        if self.opened.load(Ordering::Relaxed) >= QUIC_STREAMS_PER_CONNECTION {
            return None;
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }
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

    /// After a QUIC failure: `Ok` means "use TLS for this stream" (`auto` and UDP does not get
    /// through); anything else is the stream's error.
    fn quic_failed(self: &Arc<Self>, err: ConnectError) -> Result<(), ConnectError> {
        if self.transport != Transport::Auto || !matches!(err, ConnectError::Unreachable { .. }) {
            return Err(err);
        }
        let switch = self.policy.lock().unwrap_or_else(|p| p.into_inner()).quic_unreachable();
        if switch == Switch::ToTls {
            warn!(peer = %self.name, address = %self.address, error = %err,
                "QUIC does not get through; new streams use TLS over TCP until it does (retrying QUIC in the background)");
            self.metrics.transport_switched(&self.name, "tls");
            self.spawn_probe();
        }
        Ok(())
    }

    /// While `auto` has fallen back: tries QUIC again with a growing interval until it works.
    fn spawn_probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let delay = this.policy.lock().unwrap_or_else(|p| p.into_inner()).next_probe_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = this.shutdown.cancelled() => break,
                }
                match this.quic_connection(true).await {
                    Ok(_) => {
                        if this.policy.lock().unwrap_or_else(|p| p.into_inner()).quic_up() == Switch::ToQuic {
                            info!(peer = %this.name, address = %this.address, "QUIC gets through again; new streams use QUIC");
                            this.metrics.transport_switched(&this.name, "quic");
                        }
                        break;
                    }
                    Err(e) => debug!(peer = %this.name, error = %e, "QUIC probe failed"),
                }
            }
            this.probing.store(false, Ordering::Release);
        });
    }

    /// A new bidirectional stream on the peer's QUIC connection, dialling it if needed.
    async fn quic_stream(&self, probe: bool) -> Result<(QuicStream, bool), ConnectError> {
        let (conn, reused) = self.quic_connection(probe).await?;
        match conn.open_bi().await {
            Ok((send, recv)) => {
                if let Some(q) = &self.quic {
                    q.opened.fetch_add(1, Ordering::Relaxed);
                }
                return Ok((QuicStream::new(send, recv), reused));
            }
            Err(e) if !reused => return Err(self.lost(e)),
            Err(_) => {} // the connection died since it was last used: dial again, once
        }
        let (conn, _) = self.quic_connection(probe).await?;
        let (send, recv) = conn.open_bi().await.map_err(|e| self.lost(e))?;
        if let Some(q) = &self.quic {
            q.opened.fetch_add(1, Ordering::Relaxed);
        }
        Ok((QuicStream::new(send, recv), false))
    }

    fn lost(&self, e: quinn::ConnectionError) -> ConnectError {
        ConnectError::Unreachable { address: self.address.clone(), source: io::Error::new(io::ErrorKind::ConnectionAborted, e) }
    }

    /// The peer's live QUIC connection, or a new one; `true` if it existed before.
    async fn quic_connection(&self, probe: bool) -> Result<(quinn::Connection, bool), ConnectError> {
        let Some(q) = &self.quic else {
            return Err(ConnectError::Unreachable {
                address: self.address.clone(),
                source: io::Error::new(io::ErrorKind::Unsupported, "no QUIC endpoint"),
            });
        };
        if let Some(c) = q.alive() {
            return Ok((c, true));
        }
        let _dialing = q.dialing.lock().await;
        if let Some(c) = q.alive() {
            return Ok((c, true));
        }
        if !probe && self.choice() == Choice::Tls {
            // `auto` fell back while this stream waited for another stream's handshake.
            return Err(ConnectError::Unreachable {
                address: self.address.clone(),
                source: io::Error::new(io::ErrorKind::TimedOut, "QUIC does not get through"),
            });
        }
        if self.shutdown.is_cancelled() {
            return Err(ConnectError::ShuttingDown);
        }
        let timeout = if self.transport == Transport::Auto { AUTO_QUIC_TIMEOUT } else { CONNECT_TIMEOUT };
        let result = tokio::time::timeout(timeout, self.dial_quic(q)).await.unwrap_or_else(|_| {
            Err(ConnectError::Unreachable {
                address: self.address.clone(),
                source: io::Error::new(io::ErrorKind::TimedOut, "QUIC handshake timed out"),
            })
        });
        match &result {
            Ok(c) => {
                self.metrics.handshake_done_on("quic", "client", false);
                debug!(peer = %self.name, remote = %c.remote_address(), "QUIC connection up");
                *q.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                q.opened.store(0, Ordering::Relaxed);
                crate::quic::tuning::trace_stats(c.clone(), self.name.clone());
            }
            Err(ConnectError::Handshake { reason, .. }) => self.metrics.handshake_failed_on("quic", "client", &self.name, reason),
            Err(_) => {}
        }
        self.metrics.health.peer_dialed(&self.name, result.as_ref().err().map(|e| e as &dyn std::fmt::Display));
        Ok((result?, false))
    }

    async fn dial_quic(&self, q: &QuicClient) -> Result<quinn::Connection, ConnectError> {
        let unreachable = |source| ConnectError::Unreachable { address: self.address.clone(), source };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&self.address)
            .await
            .map_err(|source| ConnectError::Resolve { address: self.address.clone(), source })?
            .collect();
        let v6 = q.endpoint.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv6() == v6)
            .or(addrs.first())
            .copied()
            .ok_or_else(|| unreachable(io::Error::new(io::ErrorKind::NotFound, "no addresses")))?;
        let connecting = q
            .endpoint
            .connect_with(q.config.clone(), addr, &self.name)
            .map_err(|e| unreachable(io::Error::other(e)))?;
        let conn = connecting.await.map_err(|e| {
            let reason = crate::quic::failure::failure_reason(&e);
            if crate::quic::failure::is_crypto_error(&e) {
                ConnectError::Handshake { address: self.address.clone(), reason, source: io::Error::other(e) }
            } else {
                unreachable(io::Error::other(e))
            }
        })?;
        // quinn does not say whether the session was resumed (rustls then did not verify the
        // certificates): check every connection's again.
        if let Err(e) = q.tls.recheck(crate::quic::endpoint::peer_certificates(&conn).as_deref(), &self.server_name) {
            let reason = self.refused(&e);
            conn.close(crate::quic::tuning::codes::CERTIFICATE_REFUSED, reason.as_bytes());
            return Err(ConnectError::Handshake { address: self.address.clone(), reason, source: io::Error::other(e) });
        }
        Ok(conn)
    }

    /// Logs a session refused because the peer's certificate no longer verifies; its reason.
    fn refused(&self, e: &rustls::Error) -> &'static str {
        let reason = crate::tls::failure::tls_failure_reason(e);
        warn!(peer = %self.name, address = %self.address, reason, error = %e,
            "resumed TLS session refused: the peer's certificate no longer verifies");
        reason
    }

    /// Opens a new TLS connection with a TLS client configuration (this peer's data connector, or
    /// the control connection's ALPN): resolve, TCP connect, TLS handshake, all within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect_with(&self, tls: &TlsConnector) -> Result<TlsSession, ConnectError> {
        if self.shutdown.is_cancelled() {
            return Err(ConnectError::ShuttingDown);
        }
        // A burst of opens (1,000 streams at once) waits here, in order, rather than overflowing
        // the peer's cap on handshakes in progress, which drops what is over it.
        let _permit = self.dials.acquire().await.map_err(|_| ConnectError::ShuttingDown)?;
        let result = tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(tls)).await.unwrap_or_else(|_| {
            Err(ConnectError::Unreachable {
                address: self.address.clone(),
                source: io::Error::new(io::ErrorKind::TimedOut, "connect and handshake timed out"),
            })
        });
        match &result {
            Ok(s) => self.metrics.handshake_done("client", s.info().resumed),
            Err(ConnectError::Handshake { reason, .. }) => self.metrics.handshake_failed("client", &self.name, reason),
            Err(_) => {}
        }
        if !matches!(result, Err(ConnectError::ShuttingDown)) {
            self.metrics.health.peer_dialed(&self.name, result.as_ref().err().map(|e| e as &dyn std::fmt::Display));
        }
        result
    }

    async fn connect_inner(&self, tls: &TlsConnector) -> Result<TlsSession, ConnectError> {
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
        crate::io::socket::tune(&tcp);
        let mut session = session::connect(tls.config.clone(), self.server_name.clone(), tcp).await.map_err(|source| {
            ConnectError::Handshake { address: self.address.clone(), reason: crate::tls::failure::failure_reason(&source), source }
        })?;
        // rustls took a resumed session's certificates from the session: check them again, now.
        let info = session.info();
        if info.resumed {
            if let Err(e) = tls.recheck(info.peer_certificates.as_deref(), &self.server_name) {
                let reason = self.refused(&e);
                return Err(ConnectError::Handshake {
                    address: self.address.clone(),
                    reason,
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                });
            }
        }
        // The dial (and its place among MAX_CONCURRENT_DIALS) lasts until the receiver is done
        // too. A refusal that arrives meanwhile is left for the stream's first read to report.
        session.server_finished(SERVER_FINISHED_WAIT).await;
        Ok(session)
    }

    fn take_warm(&self) -> Option<TlsSession> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(idle) = pool.pop_front() {
            if idle.since.elapsed() < POOL_MAX_IDLE {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Tops the TLS pool up to [`WARM_CONNECTIONS`] in the background (one refill at a time).
    /// Nothing to do while streams go over QUIC.
    pub fn refill(self: &Arc<Self>) {
        if self.choice() == Choice::Quic || self.shutdown.is_cancelled() || self.refilling.swap(true, Ordering::AcqRel) {
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
                match this.connect_with(&this.tls).await {
                    Ok(stream) => {
                        this.pool.lock().unwrap_or_else(|p| p.into_inner()).push_back(Idle { stream, since: Instant::now() });
                        this.expire_idle();
                    }
                    Err(e) => {
                        debug!(peer = %this.name, error = %e, "could not warm a connection");
                        tokio::time::sleep(REFILL_BACKOFF).await;
                        break;
                    }
                }
            }
            this.refilling.store(false, Ordering::Release);
        });
    }

    /// Closes pooled connections when they reach [`POOL_MAX_IDLE`], in the background, while
    /// the pool holds any (one task per peer; it ends when the pool is empty).
    fn expire_idle(self: &Arc<Self>) {
        if self.expiring.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let (expired, next) = {
                    let mut pool = this.pool.lock().unwrap_or_else(|p| p.into_inner());
                    let (expired, live): (VecDeque<Idle>, VecDeque<Idle>) =
                        pool.drain(..).partition(|i| i.since.elapsed() >= POOL_MAX_IDLE);
                    *pool = live;
                    (expired, pool.iter().map(|i| i.since + POOL_MAX_IDLE).min())
                };
                for mut idle in expired {
                    let _ = tokio::time::timeout(POOL_CLOSE_TIMEOUT, tokio::io::AsyncWriteExt::shutdown(&mut idle.stream)).await;
                }
                match next {
                    Some(at) => tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = this.shutdown.cancelled() => break,
                    },
                    None => {
                        this.expiring.store(false, Ordering::Release);
                        // A connection pooled since the pool was found empty found this task
                        // still running: look again, unless another task took over.
                        let empty = this.pool.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                        if empty || this.expiring.swap(true, Ordering::AcqRel) {
                            return;
                        }
                    }
                }
            }
            this.expiring.store(false, Ordering::Release);
        });
    }

    /// New streams no longer go on the current QUIC connection (its open streams go on): the
    /// next stream dials again. For a peer that answered `draining` on it.
    pub fn retire_quic(&self) {
        if let Some(q) = &self.quic {
            q.opened.store(QUIC_STREAMS_PER_CONNECTION, Ordering::Relaxed);
        }
    }

    /// Closes the idle connections (on shutdown).
    pub fn clear(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
