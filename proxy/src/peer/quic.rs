//! QUIC to a peer: one connection per peer, dialled on first use (and again when it dies), shared
//! by all its streams; each stream is a bidirectional QUIC stream on it, which costs no round
//! trip to open.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tracing::debug;

use super::{Choice, ConnectError, PeerConnector, TlsConnector, AUTO_QUIC_TIMEOUT, CONNECT_TIMEOUT};
use crate::config::Transport;
use crate::quic::stream::QuicStream;

/// Streams opened on one QUIC connection before new streams go on a fresh one (the old one
/// ends with its last stream). quinn does not give back every ended stream's slot: after 300
/// short streams a connection had 42 of its 1,024 slots fewer, after 1,500 it had 81 fewer,
/// although both sides read each stream to its end and had their FIN acknowledged
/// (tests/quic_transport.rs, `ended_streams_give_their_slots_back`). A fresh connection every
/// 256 streams costs one handshake (about a millisecond) and keeps nearly all slots usable.
pub const QUIC_STREAMS_PER_CONNECTION: usize = 256;

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
    /// A new bidirectional stream on the peer's QUIC connection, dialling it if needed.
    pub(super) async fn quic_stream(&self, probe: bool) -> Result<(QuicStream, bool), ConnectError> {
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
    pub(super) async fn quic_connection(&self, probe: bool) -> Result<(quinn::Connection, bool), ConnectError> {
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

    /// New streams no longer go on the current QUIC connection (its open streams go on): the
    /// next stream dials again. For a peer that answered `draining` on it.
    pub fn retire_quic(&self) {
        if let Some(q) = &self.quic {
            q.opened.store(QUIC_STREAMS_PER_CONNECTION, Ordering::Relaxed);
        }
    }
}
