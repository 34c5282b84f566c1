//! TCP sockets on the port: options and abortive close.

use std::time::Duration;

use tokio::net::TcpStream;

/// TCP keepalive: notice a peer host that vanished within ~25 s even on an idle stream.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// Tunes a connection on the port (either direction): no Nagle delay (records are written
/// whole, several at a time), keepalive.
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = sock.set_tcp_keepalive(&keepalive);
}

/// SO_LINGER 0: dropping the socket sends a TCP RST instead of a FIN.
pub fn reset_on_drop(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}
