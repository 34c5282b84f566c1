//! TLS over TCP to a peer: each tunnelled stream is one TLS connection. A small pool of idle,
//! already-handshaked connections is kept warm after the peer is first used, every new
//! connection resumes a TLS 1.3 session, and the dials in progress are bounded.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::debug;

use super::{Choice, ConnectError, PeerConnector, TlsConnector, CONNECT_TIMEOUT};
use crate::tls::session::{self, TlsSession};

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
/// After a failed refill, wait this long before trying to warm the pool again.
const REFILL_BACKOFF: Duration = Duration::from_secs(2);

pub(super) struct Idle {
    stream: TlsSession,
    since: Instant,
}

impl PeerConnector {
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

    pub(super) fn take_warm(&self) -> Option<TlsSession> {
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
}
