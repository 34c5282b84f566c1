//! The UDP endpoint: its socket (buffers sized for bulk transfer), the quinn endpoint on it
//! ([`bind`]), and what an established connection says of its peer. The server side that accepts
//! connections on it is the port's ([`crate::port::quic`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tracing::{info, warn};

use crate::tls::identity::PeerIdentity;

use super::tuning::{Congestion, MTU_UPPER_BOUND, UDP_BUFFER};

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
pub fn bind(socket: std::net::UdpSocket) -> io::Result<quinn::Endpoint> {
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

/// The application protocol the handshake agreed on.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
}
