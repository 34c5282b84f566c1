//! How the QUIC endpoint is tuned: windows, limits, keep-alive and MTU discovery, the congestion
//! controller, the error codes it closes connections with, the rustls configurations wrapped for QUIC,
//! and the path statistics to look at when QUIC is slow.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{TransportConfig, VarInt};

use crate::tls::context::{ClientSide, TlsContext, TlsSetupError};

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
/// the first ends its last streams ([`crate::peer::QUIC_STREAMS_PER_CONNECTION`]); connection
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_config_builds_for_every_controller() {
        for c in [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr] {
            let _ = transport_config(c);
        }
    }
}
