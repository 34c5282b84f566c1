//! TCP sockets on the port: options, abortive close, and listeners another agent can share.

use std::time::Duration;

use tokio::net::TcpStream;

/// TCP keepalive: notice a peer host that vanished within ~25 s even on an idle stream.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;
/// TCP_USER_TIMEOUT: the same bound for a connection with data (or its FIN) unacknowledged.
/// Keepalive probes only an idle connection; a stream that was sending when its peer vanished
/// (a RAM or NBD stream when the link is cut) is retransmitted by Linux for ~15 minutes
/// (`tcp_retries2`) before it fails, and the relay, the peer's QEMU-facing socket and the
/// migration's route stay open that long on both hosts. A live receiver that only closed its
/// window keeps the connection: it answers the zero-window probes.
pub const USER_TIMEOUT: Duration = Duration::from_secs(25);

/// Tunes a connection on the port (either direction): no Nagle delay (records are written
/// whole, several at a time), keepalive, and a bound on unacknowledged data.
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Backlog of the port and metrics listeners (tokio's own default for `TcpListener::bind`).
const LISTEN_BACKLOG: i32 = 1024;

/// A TCP listener with `SO_REUSEADDR` (connections of a previous run in TIME_WAIT do not keep a
/// restarted agent from its port) and `SO_REUSEPORT`: a new agent binds while the old one still
/// drains, and the kernel gives new connections to the listeners in the group. The old agent
/// closes its listener as it starts draining, so from then on all go to the new one. Linux only
/// lets sockets of the same user share a port this way.
pub fn listen_reuseport(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// SO_LINGER 0: dropping the socket sends a TCP RST instead of a FIN.
pub fn reset_on_drop(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tuned_connections_bound_unacknowledged_data_like_idle_ones() {
        assert_eq!(USER_TIMEOUT, KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_RETRIES);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        tune(&tcp);
        let sock = socket2::SockRef::from(&tcp);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), KEEPALIVE_IDLE);
    }
}
