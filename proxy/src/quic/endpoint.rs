//! The UDP endpoint: its socket (buffers sized for bulk transfer), and the server side that accepts
//! authenticated connections and serves their streams like the TLS transport's connections.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::route::expose::{self, ExposeContext};
use crate::metrics::ReasonLabels;
use crate::io::limit::{source_key, KeyedLimit};
use crate::port::{HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_ADDRESS};
use crate::tls::identity::PeerIdentity;
use crate::tls::ALPN_DATA;

use super::failure::failure_reason;
use super::stream::QuicStream;
use super::tuning::{codes, Congestion, MAX_CONNECTIONS_PER_PEER, MTU_UPPER_BOUND, UDP_BUFFER};

/// What a UDP socket got when we asked for [`UDP_BUFFER`] bytes each way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpBuffers {
    pub recv: usize,
    pub send: usize,
}

/// Binds the endpoint's UDP socket at `addr` and sizes its buffers (see [`tune_udp_socket`]).
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    tune_udp_socket(&socket);
    Ok(socket)
}

/// Asks for [`UDP_BUFFER`] bytes of socket buffer each way: first with `SO_RCVBUFFORCE` /
/// `SO_SNDBUFFORCE` (allowed with CAP_NET_ADMIN, which the agent has when it runs as root), else
/// within `net.core.rmem_max` / `wmem_max`. Logs a warning when the kernel clamps the size.
pub fn tune_udp_socket(socket: &std::net::UdpSocket) -> UdpBuffers {
    let sock = socket2::SockRef::from(socket);
    let recv =
        set_buffer(socket, libc::SO_RCVBUFFORCE, || sock.set_recv_buffer_size(UDP_BUFFER), || sock.recv_buffer_size());
    let send =
        set_buffer(socket, libc::SO_SNDBUFFORCE, || sock.set_send_buffer_size(UDP_BUFFER), || sock.send_buffer_size());
    if recv < UDP_BUFFER || send < UDP_BUFFER {
        warn!(
            wanted = UDP_BUFFER,
            recv,
            send,
            "UDP socket buffers clamped by the kernel; QUIC may drop packets at high rates \
             (raise net.core.rmem_max and net.core.wmem_max, or run the agent with CAP_NET_ADMIN)"
        );
    }
    UdpBuffers { recv, send }
}

fn set_buffer(
    socket: &std::net::UdpSocket,
    force: libc::c_int,
    normal: impl FnOnce() -> io::Result<()>,
    get: impl FnOnce() -> io::Result<usize>,
) -> usize {
    let value = UDP_BUFFER as libc::c_int;
    // SAFETY: setsockopt on a socket we own with a pointer to a live c_int and its size.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            force,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = normal();
    }
    // Linux reports twice what was set (the doubling covers its bookkeeping overhead).
    get().map(|n| n / 2).unwrap_or(0)
}

/// Creates the agent's QUIC endpoint on an already bound UDP socket. The server side is off
/// until [`quinn::Endpoint::set_server_config`] is called (the agent does that when it runs).
pub fn endpoint(socket: std::net::UdpSocket) -> io::Result<quinn::Endpoint> {
    let addr = socket.local_addr()?;
    let offload = quinn::udp::UdpSocketState::new((&socket).into()).ok();
    let buffers = {
        let sock = socket2::SockRef::from(&socket);
        (sock.recv_buffer_size().unwrap_or(0) / 2, sock.send_buffer_size().unwrap_or(0) / 2)
    };
    let mut config = quinn::EndpointConfig::default();
    // The largest UDP payload we accept, announced to peers; quinn's default (1472) would cap
    // path-MTU discovery at Ethernet size whatever [`MTU_UPPER_BOUND`] says.
    config.max_udp_payload_size(MTU_UPPER_BOUND).map_err(|e| io::Error::other(e.to_string()))?;
    let endpoint = quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime))?;
    info!(
        udp = %addr,
        gso_segments = offload.as_ref().map(|o| o.max_gso_segments()).unwrap_or(1),
        gro_segments = offload.as_ref().map(|o| o.gro_segments()).unwrap_or(1),
        recv_buffer = buffers.0,
        send_buffer = buffers.1,
        congestion = ?Congestion::from_env(),
        "QUIC endpoint ready"
    );
    Ok(endpoint)
}

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
    if !crate::port::is_configured_peer(ctx, "quic", addr, &peer) {
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

/// Who the peer of an established connection is, from its certificate chain.
pub fn peer_identity(conn: &quinn::Connection) -> PeerIdentity {
    PeerIdentity::from_certs(peer_certificates(conn).as_deref())
}

/// The certificate chain the peer of an established connection presented (or resumed with).
pub fn peer_certificates(conn: &quinn::Connection) -> Option<Vec<rustls_pki_types::CertificateDer<'static>>> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
        .map(|certs| *certs)
}

fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
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
