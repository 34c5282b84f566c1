//! The TCP sockets under TLS: options, buffered reads, abortive close.
//!
//! rustls pulls ciphertext from its transport 4 KiB at a time, which on a bulk stream means four
//! or five `recv` calls per 16 KiB record and as many wake-ups of the sending side. A read
//! buffer under TLS turns that into one `recv` per [`READ_BUFFER`] bytes; the extra copy from
//! it is cheaper than the system calls it saves (measured with `cargo bench --bench throughput`).

use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::TcpStream;

/// Ciphertext read per `recv`: four full TLS records.
pub const READ_BUFFER: usize = 64 * 1024;
/// TCP keepalive: notice a peer host that vanished within ~25 s even on an idle stream.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// What TLS runs on: a TCP connection with a read buffer.
pub type TlsTransport = BufReader<TcpStream>;

/// Tunes a connection on the port (either direction) and puts the read buffer under it.
pub fn transport(tcp: TcpStream) -> TlsTransport {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(&tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = sock.set_tcp_keepalive(&keepalive);
    BufReader::with_capacity(READ_BUFFER, tcp)
}

/// SO_LINGER 0: dropping the socket sends a TCP RST instead of a FIN.
pub fn reset_on_drop(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}
