//! The QUIC transport: one UDP endpoint on the port number of the TCP listener, serving peers
//! (server role) and dialling them (client role); one bidirectional QUIC stream per tunnelled
//! connection, on one QUIC connection per peer.
//!
//! The crypto is the TLS transport's: the same rustls configurations (TLS 1.3, aws-lc-rs,
//! client certificates required, ALPN `migtun/1`) wrapped for QUIC, so identity, authorization
//! (by [`crate::routes::RouteTable::authorize`]), handshake failure reasons and metrics are the
//! same whichever transport a stream takes. The stream semantics are the TLS transport's too:
//! the same preamble and replies, EOF as a QUIC `FIN` ([`quinn::SendStream::finish`]), a reset
//! as `RESET_STREAM` plus `STOP_SENDING` ([`QuicStream`]'s [`Reset`]).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportConfig, VarInt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use quinn;

use crate::expose::{self, ExposeContext};
use crate::metrics::ReasonLabels;
use crate::limit::{source_key, KeyedLimit};
use crate::port::{HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_ADDRESS};
use crate::tls::context::{ClientSide, TlsContext, TlsSetupError};
use crate::tls::identity::PeerIdentity;
use crate::tls::ALPN_DATA;
use crate::Reset;

/// Per-stream receive window: how far a sender may run ahead of a reader on one stream. At
/// 16 MiB a single stream fills a 10 Gbit/s path with up to ~13 ms of round trip.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Per-connection receive window, shared by all streams to a peer: a few streams at full speed.
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Bytes a connection may hold unacknowledged in its send buffers, across its streams.
pub const SEND_WINDOW: u64 = 64 << 20;
/// UDP socket buffers we ask for (each direction). Bursts of a bulk QUIC sender arrive faster
/// than one thread drains them; the Linux default (208 KiB) drops packets at a few Gbit/s.
pub const UDP_BUFFER: usize = 8 << 20;
/// Streams a peer may have open at once on one connection (a migration uses a few dozen).
pub const MAX_STREAMS: u32 = 1024;
/// QUIC connections one peer may hold at once. An agent keeps one per peer, and a second while
/// the first ends its last streams ([`crate::connect::QUIC_STREAMS_PER_CONNECTION`]); connection
/// migration keeps the connection. More is a misbehaving peer holding the agent's memory.
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// A PING this often keeps NAT and firewall state alive and proves the peer is still there.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// No packet from the peer for this long: the connection (and its streams) is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Largest UDP payload path-MTU discovery probes for. Discovery starts at 1200 bytes and only
/// keeps sizes the path carries, so on 1500-byte networks this costs a few lost probes, and on
/// jumbo-frame networks (and loopback) it saves most of the per-packet work: measured on
/// loopback, 1472-byte packets carried 0.31 GB/s, 6500-byte packets see README.md.
///
/// Not 8952 (jumbo frames): quinn sends up to 10 packets per GSO `sendmsg`, and the kernel
/// refuses a GSO batch over 64 KiB (EMSGSIZE), so packets over 6550 bytes are all lost once GSO
/// batches them (measured: 1777 of 1.85 M packets lost, the congestion window collapsed).
pub const MTU_UPPER_BOUND: u16 = 6500;

/// After path-MTU discovery suspects a black hole, it starts again after this long.
pub const MTU_BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(5);

/// QUIC application error codes (for `RESET_STREAM`, `STOP_SENDING`, `CONNECTION_CLOSE`).
pub mod codes {
    use quinn::VarInt;
    /// A tunnelled stream was reset: the local side of it failed or was reset.
    pub const STREAM_RESET: VarInt = VarInt::from_u32(1);
    /// The agent is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(2);
    /// The connection carries an application protocol this agent does not serve.
    pub const UNSUPPORTED_ALPN: VarInt = VarInt::from_u32(3);
    /// The certificate is not a configured peer's, or the peer holds too many connections.
    pub const REFUSED: VarInt = VarInt::from_u32(4);
    /// The peer's certificate failed its check after the handshake (expired or revoked since the
    /// session it resumed was made); the reason text says which.
    pub const CERTIFICATE_REFUSED: VarInt = VarInt::from_u32(5);
}

/// The congestion controller.
///
/// CUBIC, chosen by measurement: `cargo bench --bench throughput -- --size-gib 4 --reps 3 --only
/// migtun-quic` with `MIGTUN_QUIC_CONGESTION` set, 2-core VM, loopback, GB/s (median; reps):
/// CUBIC 0.92 (0.92, 0.93, 0.69), NewReno 0.67 (0.67, 0.59, 0.95), BBR 0.76 (0.75, 0.79, 0.76).
/// On loopback nothing is lost once the MTU is right (0 of 2 M packets), so the window never
/// binds and the three are within the machine's noise: CPU is the limit (see README.md). CUBIC
/// is also what the kernel uses for the TLS transport, and quinn's BBR is marked experimental.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    #[default]
    Cubic,
    NewReno,
    Bbr,
}

impl Congestion {
    /// `MIGTUN_QUIC_CONGESTION=cubic|newreno|bbr` overrides the default; meant for measuring
    /// (the benchmark compares them), not for configuration.
    pub fn from_env() -> Congestion {
        match std::env::var("MIGTUN_QUIC_CONGESTION").as_deref() {
            Ok("cubic") => Congestion::Cubic,
            Ok("newreno") => Congestion::NewReno,
            Ok("bbr") => Congestion::Bbr,
            _ => Congestion::default(),
        }
    }
}

/// The transport parameters of every QUIC connection, tuned for bulk transfer.
pub fn transport_config(congestion: Congestion) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits a VarInt")))
        // Streams of one connection share it round-robin; a RAM stream must not starve NBD.
        .send_fairness(true);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    // quinn takes a burst of lost large packets for a black hole and falls back to 1200 bytes
    // for a minute; on a fast path such a burst is usually the receiver's socket buffer
    // overflowing in slow start, not the path, so probe again soon.
    mtu.black_hole_cooldown(MTU_BLACK_HOLE_COOLDOWN);
    t.mtu_discovery_config(Some(mtu));
    match congestion {
        Congestion::Cubic => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        Congestion::NewReno => t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default())),
        Congestion::Bbr => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
    };
    Arc::new(t)
}

/// The QUIC server side, from the TLS transport's rustls server configuration.
pub fn server_config(tls: &TlsContext, alpn: &[&[u8]]) -> Result<quinn::ServerConfig, TlsSetupError> {
    let rustls = tls.server_config(alpn)?;
    let crypto = QuicServerConfig::try_from(rustls).map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(Congestion::from_env()));
    // Connection migration: a peer whose address changes (rebinding, failover) keeps its streams.
    config.migration(true);
    Ok(config)
}

/// The QUIC client side, from the TLS transport's rustls client configuration.
pub fn client_config(tls: &ClientSide) -> Result<quinn::ClientConfig, TlsSetupError> {
    let rustls = tls.config.clone();
    let crypto = QuicClientConfig::try_from(rustls).map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(Congestion::from_env()));
    Ok(config)
}

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

/// One tunnelled stream on a QUIC connection: a bidirectional QUIC stream.
///
/// Shutdown is `FIN` ([`quinn::SendStream::finish`]). Dropping it after [`Reset::set_reset_on_drop`],
/// or before it was shut down, resets both halves (`RESET_STREAM` and `STOP_SENDING`), so the
/// other side's reads and writes fail as a TCP reset would make them fail. Only a shutdown is an
/// orderly EOF: quinn's default, finishing the send half of a stream dropped without one, would
/// make a stream cut short (a task cancelled, an error path that forgot the reset) look complete.
pub struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reset: AtomicBool,
    /// After `finish`: resolves when the peer has acknowledged every byte (or stopped the stream).
    finishing: Option<Pin<Box<Finishing>>>,
    finished: bool,
}

type Finishing = dyn Future<Output = Result<Option<VarInt>, quinn::StoppedError>> + Send + Sync;

impl QuicStream {
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> QuicStream {
        QuicStream { send, recv, reset: AtomicBool::new(false), finishing: None, finished: false }
    }
}

impl std::fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStream").field("id", &self.send.id()).finish()
    }
}

impl Reset for QuicStream {
    fn set_reset_on_drop(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        let shut_down = self.finished || self.finishing.is_some();
        if self.reset.load(Ordering::Relaxed) || !shut_down {
            let _ = self.send.reset(codes::STREAM_RESET);
            let _ = self.recv.stop(codes::STREAM_RESET);
        }
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }
    /// Sends `FIN`, then waits until the peer has acknowledged all the stream's data. Unlike TCP,
    /// whose kernel keeps delivering after `close`, quinn's buffered data goes with the
    /// connection: waiting here keeps a stream "open" (for the drain, and for the endpoint close
    /// at shutdown) until its bytes have arrived.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(Ok(()));
        }
        if this.finishing.is_none() {
            if this.send.finish().is_err() {
                // Already finished or reset: nothing more to send.
                this.finished = true;
                return Poll::Ready(Ok(()));
            }
            this.finishing = Some(Box::pin(this.send.stopped()));
        }
        let Some(finishing) = this.finishing.as_mut() else { return Poll::Ready(Ok(())) };
        let result = std::task::ready!(finishing.as_mut().poll(cx));
        this.finishing = None;
        this.finished = true;
        Poll::Ready(match result {
            Ok(None) => Ok(()),
            Ok(Some(code)) => {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("peer stopped reading (code {code})")))
            }
            Err(e) => Err(io::Error::new(io::ErrorKind::NotConnected, e)),
        })
    }
}

/// With `RUST_LOG=migtun_proxy::quic=trace`, logs the connection's path statistics (congestion
/// window, RTT, MTU, losses) every second while it lives: what to look at when QUIC is slow.
pub fn trace_stats(conn: quinn::Connection, peer: String) {
    if !tracing::enabled!(tracing::Level::TRACE) {
        return;
    }
    tokio::spawn(async move {
        while conn.close_reason().is_none() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = conn.stats();
            tracing::trace!(
                peer,
                rtt_us = s.path.rtt.as_micros() as u64,
                cwnd = s.path.cwnd,
                mtu = s.path.current_mtu,
                sent_packets = s.path.sent_packets,
                lost_packets = s.path.lost_packets,
                congestion_events = s.path.congestion_events,
                udp_tx_datagrams = s.udp_tx.datagrams,
                udp_tx_ios = s.udp_tx.ios,
                udp_rx_datagrams = s.udp_rx.datagrams,
                udp_rx_ios = s.udp_rx.ios,
                "QUIC path"
            );
        }
    });
}

/// A short, stable reason for a failed QUIC handshake, the same strings as
/// [`crate::tls::failure::failure_reason`] for the TLS transport.
///
/// quinn turns a rustls error into the TLS alert it sends (`CRYPTO_ERROR` 0x100 + alert) with the
/// error's text as the reason, so the local side's verdict is read from both; a verdict of the
/// peer's arrives as a `CONNECTION_CLOSE` with the alert it sent.
pub fn failure_reason(err: &ConnectionError) -> &'static str {
    match err {
        ConnectionError::TransportError(t) => crypto_reason(u64::from(t.code), &t.reason, false),
        ConnectionError::ConnectionClosed(c) => crypto_reason(u64::from(c.error_code), "", true),
        ConnectionError::TimedOut => "timeout",
        ConnectionError::VersionMismatch => "incompatible",
        ConnectionError::ApplicationClosed(_) | ConnectionError::Reset | ConnectionError::LocallyClosed => "closed",
        ConnectionError::CidsExhausted => "protocol",
    }
}

/// Whether the handshake failed on a certificate or TLS verdict (either side's), as opposed to the
/// network: `auto` falls back to TLS over TCP on the network, never on a verdict.
pub fn is_crypto_error(err: &ConnectionError) -> bool {
    let code = match err {
        ConnectionError::TransportError(t) => u64::from(t.code),
        ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return false,
    };
    (0x100..0x200).contains(&code)
}

fn crypto_reason(code: u64, text: &str, by_peer: bool) -> &'static str {
    if !(0x100..0x200).contains(&code) {
        return "protocol";
    }
    let alert = (code - 0x100) as u8;
    if by_peer {
        return match alert {
            42 | 43 | 44 | 45 | 46 | 48 | 49 | 116 => "rejected-by-peer",
            40 | 70 | 120 => "incompatible",
            _ => "alert",
        };
    }
    let has = |s: &str| text.contains(s);
    match alert {
        116 => "no-client-certificate",
        48 => "unknown-ca",
        51 if has("BadSignature") => "unknown-ca",
        44 if has("Revoked") || has("revoked") => "revoked",
        45 if has("NotValidYet") || has("not valid yet") => "not-yet-valid",
        45 => "expired",
        42 if has("NotValidForName") || has("not valid for name") => "wrong-name",
        43 if has("InvalidPurpose") || has("usage") => "wrong-key-usage",
        42 | 43 | 44 | 46 => "bad-certificate",
        120 => "alpn",
        40 | 70 => "incompatible",
        _ => "protocol",
    }
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
            expose::serve(crate::buffers::PooledReader::new(QuicStream::new(send, recv)), peer, &handshaked, "quic", &ctx).await;
            open.send_modify(|n| *n -= 1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_errors_map_to_the_tls_reasons() {
        assert_eq!(crypto_reason(0x100 + 116, "", false), "no-client-certificate");
        assert_eq!(crypto_reason(0x100 + 48, "invalid peer certificate: UnknownIssuer", false), "unknown-ca");
        assert_eq!(crypto_reason(0x100 + 45, "invalid peer certificate: Expired", false), "expired");
        assert_eq!(crypto_reason(0x100 + 42, "NotValidForName", false), "wrong-name");
        let text =
            "invalid peer certificate: certificate not valid for name \"host-b\"; certificate is only valid for host-c";
        assert_eq!(crypto_reason(0x100 + 42, text, false), "wrong-name");
        assert_eq!(crypto_reason(0x100 + 48, "", true), "rejected-by-peer");
        assert_eq!(crypto_reason(0x0a, "", false), "protocol");
        assert_eq!(failure_reason(&ConnectionError::TimedOut), "timeout");
    }

    /// A QUIC server and client endpoint on loopback with certificates from one test CA.
    async fn endpoints() -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
        let ca = migtun_certs::Ca::generate("test CA").unwrap();
        let server_tls = crate::tls::session::tests::tls_config(&ca, "host-b");
        let client_tls = crate::tls::session::tests::tls_config(&ca, "host-a");
        let server_ctx = TlsContext::new(&server_tls).unwrap();
        let server = quinn::Endpoint::server(server_config(&server_ctx, &[ALPN_DATA]).unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
        let addr = server.local_addr().unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let client_side = TlsContext::new(&client_tls).unwrap().client_config(&[ALPN_DATA]).unwrap();
        client.set_default_client_config(client_config(&client_side).unwrap());
        (server, client, addr)
    }

    /// A stream dropped in the middle of a transfer, before any shutdown (a task cancelled, an
    /// error path that did not ask for a reset), is reset: the far end's read fails, it never
    /// sees a FIN, so a truncated stream cannot look complete. One that was shut down ends with
    /// an EOF after all its bytes.
    #[tokio::test]
    async fn a_stream_dropped_before_shutdown_is_reset_not_finished() {
        use tokio::io::AsyncWriteExt;
        let (server, client, addr) = endpoints().await;
        let far = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut ends = Vec::new();
            for _ in 0..2 {
                let (_send, mut recv) = conn.accept_bi().await.unwrap();
                let mut got = Vec::new();
                ends.push(tokio::io::AsyncReadExt::read_to_end(&mut recv, &mut got).await.map(|_| got.len()).map_err(|e| e.to_string()));
            }
            ends
        });
        let conn = client.connect(addr, "host-b").unwrap().await.unwrap();
        let data = vec![0x5a; 200_000];
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut cut = QuicStream::new(send, recv);
        cut.write_all(&data).await.unwrap();
        cut.flush().await.unwrap();
        drop(cut);
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut whole = QuicStream::new(send, recv);
        whole.write_all(&data).await.unwrap();
        whole.shutdown().await.unwrap();
        drop(whole);
        let ends = far.await.unwrap();
        let reset = ends[0].as_ref().expect_err("the stream cut short is an error at the far end, not an EOF");
        assert!(reset.contains("reset"), "{reset}");
        assert_eq!(ends[1], Ok(data.len()), "the stream shut down ends with every byte and an EOF");
    }

    #[test]
    fn transport_config_builds_for_every_controller() {
        for c in [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr] {
            let _ = transport_config(c);
        }
    }
}
