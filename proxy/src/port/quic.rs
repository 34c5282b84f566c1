//! The port's QUIC side: accepts connections on the agent's UDP endpoint, with the same bounds as
//! the TCP side (handshakes at once, per source address, in time; connections per peer), checks
//! each peer's certificate and ALPN, and serves each bidirectional stream as one data stream
//! ([`expose::serve`]), like a TLS connection on the TCP side.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{is_configured_peer, HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_ADDRESS};
use crate::io::limit::{source_key, KeyedLimit};
use crate::metrics::ReasonLabels;
use crate::quic::endpoint::{alpn, peer_certificates, peer_identity};
use crate::quic::failure::failure_reason;
use crate::quic::stream::QuicStream;
use crate::quic::tuning::{codes, MAX_CONNECTIONS_PER_PEER};
use crate::route::expose::{self, ExposeContext};
use crate::tls::identity::PeerIdentity;
use crate::tls::ALPN_DATA;

/// Accepts QUIC connections on `endpoint` until `ctx.draining` is cancelled; each authenticated
/// connection's streams are served like the TLS transport's connections ([`expose::serve`]).
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<ExposeContext>, tracker: TaskTracker) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let per_address = KeyedLimit::<IpAddr>::new(MAX_PENDING_PER_ADDRESS);
    let per_peer = KeyedLimit::<String>::new(MAX_CONNECTIONS_PER_PEER);
    let gauge = ctx.metrics.pending_handshakes("quic");
    loop {
        let incoming = tokio::select! {
            _ = ctx.draining.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return, // endpoint closed
            },
        };
        let addr = incoming.remote_address();
        // UDP source addresses are easy to forge: under load, make the client prove its address
        // (a stateless Retry) before it may count against anything.
        if !incoming.remote_address_validated() && pending.available_permits() < MAX_PENDING_HANDSHAKES / 2 {
            let _ = incoming.retry();
            continue;
        }
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            ctx.metrics.handshake_failed_on("quic", "server", "-", "overload");
            if let Some(n) = ctx.log.paused.hit() {
                warn!(%addr, refused = n, "too many QUIC handshakes in progress; connections refused");
            }
            incoming.refuse();
            continue;
        };
        let Some(address_permit) = per_address.try_acquire(source_key(addr.ip())) else {
            ctx.metrics.port_refused("quic", "address-limit");
            if let Some(n) = ctx.log.address_limit.hit() {
                warn!(%addr, limit = MAX_PENDING_PER_ADDRESS, refused = n,
                    "too many QUIC handshakes in progress from this address; connections refused");
            }
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        let streams = tracker.clone();
        let gauge = gauge.clone();
        let per_peer = per_peer.clone();
        gauge.inc();
        // Connections live as long as the peer keeps them: not tracked, so that the drain
        // waits for streams, not for idle connections. Their streams are tracked.
        tokio::spawn(async move {
            let conn = handshake(incoming, addr, &ctx).await;
            gauge.dec();
            drop((permit, address_permit));
            let Some((conn, peer)) = conn else { return };
            let Some(_slot) = per_peer.try_acquire(peer.name().to_string()) else {
                ctx.metrics.port_refused("quic", "peer-connection-limit");
                if let Some(n) = ctx.log.control_limit.hit() {
                    warn!(%addr, peer = peer.name(), limit = MAX_CONNECTIONS_PER_PEER, refused = n,
                        "too many QUIC connections from this peer; connection closed");
                }
                conn.close(codes::REFUSED, b"too many connections from this peer");
                return;
            };
            serve_connection(conn, peer, ctx, streams).await;
        });
    }
    // Draining: refuse new connections at once rather than letting them time out.
    endpoint.set_server_config(None);
}

async fn handshake(
    incoming: quinn::Incoming,
    addr: SocketAddr,
    ctx: &ExposeContext,
) -> Option<(quinn::Connection, PeerIdentity)> {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            let reason = failure_reason(&e);
            if let Some(n) = ctx.log.handshake.hit() {
                warn!(%addr, reason, error = %e, refused = n, "QUIC handshake refused (one line per interval)");
            }
            ctx.metrics.handshake_failed_on("quic", "server", "-", reason);
            return None;
        }
    };
    let result = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting) => r,
        _ = ctx.draining.cancelled() => return None,
    };
    let conn = match result {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            if let Some(n) = ctx.log.handshake.hit() {
                warn!(%addr, reason, error = %e, refused = n, "QUIC handshake refused (one line per interval)");
            }
            ctx.metrics.handshake_failed_on("quic", "server", "-", reason);
            return None;
        }
        Err(_) => {
            if let Some(n) = ctx.log.handshake.hit() {
                warn!(%addr, reason = "timeout", refused = n, "QUIC handshake timed out (one line per interval)");
            }
            ctx.metrics.handshake_failed_on("quic", "server", "-", "timeout");
            return None;
        }
    };
    let peer = peer_identity(&conn);
    // quinn does not say whether the session was resumed, whose certificates rustls did not
    // verify: check every connection's (a full handshake's pass again, cheaply).
    if let Err(e) = ctx.tls.recheck_client(peer_certificates(&conn).as_deref()) {
        let reason = crate::tls::failure::tls_failure_reason(&e);
        warn!(%addr, peer = peer.name(), reason, error = %e, "QUIC session refused: the peer's certificate no longer verifies");
        ctx.metrics.handshake_failed_on("quic", "server", peer.name(), reason);
        conn.close(codes::CERTIFICATE_REFUSED, reason.as_bytes());
        return None;
    }
    ctx.metrics.handshake_done_on("quic", "server", false);
    if !is_configured_peer(ctx, "quic", addr, &peer) {
        conn.close(codes::REFUSED, b"not a configured peer");
        return None;
    }
    if alpn(&conn).as_deref() != Some(ALPN_DATA) {
        let alpn = alpn(&conn).map(|p| String::from_utf8_lossy(&p).into_owned()).unwrap_or_else(|| "none".into());
        warn!(%addr, peer = peer.name(), %alpn, "unsupported application protocol over QUIC; closing");
        ctx.metrics.protocol_errors.get_or_create(&ReasonLabels { reason: "alpn" }).inc();
        conn.close(codes::UNSUPPORTED_ALPN, b"unsupported application protocol");
        return None;
    }
    debug!(%addr, peer = peer.name(), "peer connected over QUIC");
    Some((conn, peer))
}

async fn serve_connection(conn: quinn::Connection, peer: PeerIdentity, ctx: Arc<ExposeContext>, tracker: TaskTracker) {
    let addr = conn.remote_address();
    let handshaked = crate::tls::context::Handshaked::now(&ctx.tls, peer_certificates(&conn));
    // Streams of this connection still open. Once the agent drains, the connection is closed as
    // soon as none is: the peer dials again, finds the port refusing QUIC (or, after a restart,
    // the new agent), and a peer on `auto` carries its new streams over TLS meanwhile instead
    // of having them refused `draining` on a connection that has nothing left to carry.
    let open = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let mut count = open.subscribe();
    loop {
        let (send, recv) = tokio::select! {
            r = conn.accept_bi() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!(%addr, peer = peer.name(), reason = %e, "QUIC connection closed");
                    return;
                }
            },
            // Past the drain deadline nothing is served any more.
            _ = ctx.abort.cancelled() => return,
            _ = count.wait_for(|n| *n == 0), if ctx.draining.is_cancelled() => {
                conn.close(codes::SHUTDOWN, b"agent draining");
                return;
            }
            _ = ctx.draining.cancelled(), if !ctx.draining.is_cancelled() => continue,
        };
        let ctx = ctx.clone();
        let peer = peer.clone();
        let handshaked = handshaked.clone();
        let open = open.clone();
        open.send_modify(|n| *n += 1);
        tracker.spawn(async move {
            expose::serve(crate::io::buffers::PooledReader::new(QuicStream::new(send, recv)), peer, &handshaked, "quic", &ctx).await;
            open.send_modify(|n| *n -= 1);
        });
    }
}
