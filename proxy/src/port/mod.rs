//! The one port: TCP accept, the TLS 1.3 handshake with client authentication, ALPN dispatch;
//! and on the same port number over UDP, QUIC ([`quic`]) with the same bounds.
//!
//! Handshakes are bounded in number, per source address and in time, so that idle, slow or
//! hostile connections cannot pile up or take the places of other hosts:
//!
//! - at most [`MAX_PENDING_HANDSHAKES`] at once; when all are taken the port stops accepting
//!   and new connections wait in the kernel's backlog (nothing accepted is dropped for it);
//! - at most [`MAX_PENDING_PER_ADDRESS`] of them from one source address (one IPv6 /64): a
//!   connection over it is closed at once with a reset, before any TLS work;
//! - the ClientHello must have arrived [`CLIENT_HELLO_TIMEOUT`] after the accept, the whole
//!   handshake [`HANDSHAKE_TIMEOUT`] after it;
//! - a certificate of the CA that is not one of the configured `[[peer]]`s gets nothing beyond
//!   the handshake, whatever its ALPN.
//!
//! Refusals are counted (`migtun_port_refusals_total`, `migtun_handshake_failures_total`) and
//! logged at most once per [`crate::io::accept::LOG_INTERVAL`] per kind, with counts.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::io::accept::AcceptLoop;
use crate::route::expose::{self, ExposeContext};
use crate::io::limit::{source_key, KeyedLimit};
use crate::metrics::ReasonLabels;
use crate::tls::session::{self, TlsSession};
use crate::tls::failure::failure_reason;
use crate::tls::identity::PeerIdentity;
use crate::tls::{ALPN_CONTROL, ALPN_DATA};

pub mod quic;

/// What an accepted connection carries, by its ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alpn {
    /// One tunnelled data stream.
    Data,
    /// The agent-to-agent control RPC.
    Control,
}

/// A client must finish its handshake within this time of the accept.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must have sent its whole ClientHello within this time of the accept. Agents send it
/// at once; 5 s leaves room for two TCP retransmissions of a lost segment (1 s, then 2 s) and
/// halves the time a silent or trickling connection holds a handshake slot.
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once. A busy host opens a few dozen streams per migration and each
/// source dials at most [`crate::peer::MAX_CONCURRENT_DIALS`] at a time, so this only bites a
/// flood from several addresses; then the port stops accepting until a slot is free.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Handshakes in progress from one source address (IPv4, or IPv6 /64). Twice what one agent
/// dials at once ([`crate::peer::MAX_CONCURRENT_DIALS`]), so that a source whose handshakes
/// finish on its side a moment before ours is never refused, and a quarter of
/// [`MAX_PENDING_HANDSHAKES`], so that one address can never take the slots of the others.
pub const MAX_PENDING_PER_ADDRESS: usize = 64;
/// Control connections (ALPN `h2`) one peer may hold at once. The control plane opens one per
/// migration and RPC burst; a peer holding more is misbehaving, and each costs a descriptor.
pub const MAX_CONTROL_CONNECTIONS_PER_PEER: usize = 32;

const _: () = assert!(MAX_PENDING_PER_ADDRESS >= 2 * crate::peer::MAX_CONCURRENT_DIALS);
const _: () = assert!(MAX_PENDING_PER_ADDRESS * 4 <= MAX_PENDING_HANDSHAKES);

/// A TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// Largest plaintext record (RFC 8446 5.1): a ClientHello record longer than this is not TLS.
const MAX_RECORD: usize = 1 << 14;
/// Content type of a handshake record.
const HANDSHAKE_RECORD: u8 = 22;

/// Accepts on the port until `ctx.draining` is cancelled.
pub async fn serve(listener: TcpListener, acceptor: Arc<rustls::ServerConfig>, ctx: Arc<ExposeContext>, tracker: TaskTracker) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let per_address = KeyedLimit::<IpAddr>::new(MAX_PENDING_PER_ADDRESS);
    let control_per_peer = KeyedLimit::<String>::new(MAX_CONTROL_CONNECTIONS_PER_PEER);
    let gauge = ctx.metrics.pending_handshakes("tls");
    let mut accept = AcceptLoop::new("port", Some(ctx.metrics.clone()));
    loop {
        // A slot first, then the accept: while every slot is taken, connections wait in the
        // kernel's backlog instead of being accepted and dropped.
        let permit = match pending.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                ctx.metrics.port_paused.inc();
                if let Some(n) = ctx.log.paused.hit() {
                    warn!(slots = MAX_PENDING_HANDSHAKES, times = n, "every handshake slot is taken; the port stops accepting until one is free");
                }
                tokio::select! {
                    _ = ctx.draining.cancelled() => return,
                    p = pending.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return, // never closed
                    },
                }
            }
        };
        let (tcp, addr) = tokio::select! {
            _ = ctx.draining.cancelled() => return,
            c = accept.accept(|| listener.accept()) => c,
        };
        let Some(address_permit) = per_address.try_acquire(source_key(addr.ip())) else {
            // Cheap: no TLS work, and a reset leaves no TIME_WAIT behind.
            crate::io::socket::reset_on_drop(&tcp);
            drop(tcp);
            ctx.metrics.port_refused("tls", "address-limit");
            if let Some(n) = ctx.log.address_limit.hit() {
                warn!(%addr, limit = MAX_PENDING_PER_ADDRESS, refused = n,
                    "too many handshakes in progress from this address; connections refused");
            }
            continue;
        };
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        let gauge = gauge.clone();
        let control_per_peer = control_per_peer.clone();
        gauge.inc();
        tracker.spawn(async move {
            let conn = handshake(tcp, addr, &acceptor, &ctx).await;
            gauge.dec();
            drop((permit, address_permit));
            let Some((conn, peer, alpn, handshaked)) = conn else { return };
            match (alpn, &ctx.control) {
                (Alpn::Data, _) => expose::serve(conn, peer, &handshaked, "tls", &ctx).await,
                (Alpn::Control, Some(handler)) => {
                    let Some(_slot) = control_per_peer.try_acquire(peer.name().to_string()) else {
                        crate::io::socket::reset_on_drop(conn.tcp());
                        ctx.metrics.port_refused("tls", "peer-control-limit");
                        if let Some(n) = ctx.log.control_limit.hit() {
                            warn!(%addr, peer = peer.name(), limit = MAX_CONTROL_CONNECTIONS_PER_PEER, refused = n,
                                "too many control connections from this peer; connection closed");
                        }
                        return;
                    };
                    // Control connections live as long as the control plane wants them; only
                    // the drain deadline cuts them, or a reload after which the peer's
                    // certificate is refused (revoked): its migrations then roll back.
                    let name = peer.name().to_string();
                    tokio::select! {
                        _ = handler(Box::new(conn), peer) => {}
                        _ = ctx.abort.cancelled() => {}
                        e = handshaked.revoked(&ctx.tls) => {
                            warn!(%addr, peer = %name, error = %e, "control connection closed: the peer's certificate is no longer accepted");
                        }
                    }
                }
                (Alpn::Control, None) => {}
            }
        });
    }
}

/// Whether a handshaked peer is one of the configured `[[peer]]`s; if not, the refusal is
/// counted and logged (rate-limited) and the caller closes the connection.
pub fn is_configured_peer(ctx: &ExposeContext, transport: &'static str, addr: SocketAddr, peer: &PeerIdentity) -> bool {
    if peer.is_any_of(&ctx.peers.read().unwrap_or_else(|p| p.into_inner())) {
        return true;
    }
    ctx.metrics.port_refused(transport, "not-a-peer");
    if let Some(n) = ctx.log.not_a_peer.hit() {
        warn!(%addr, transport, peer = peer.name(), names = %peer.names.join(","), refused = n,
            "certificate of the CA but not a configured [[peer]]; closed after the handshake");
    }
    false
}

/// How the first record of a connection looked.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    /// A whole handshake record is there (not consumed: rustls reads it).
    Complete,
    /// Not a TLS handshake record: wrong content type or an impossible length.
    NotTls,
    /// Closed before a whole record arrived.
    Closed,
}

/// Waits until the connection's first TLS record has fully arrived, without reading it.
async fn client_hello(tcp: &TcpStream) -> std::io::Result<Hello> {
    let mut buf = vec![0u8; RECORD_HEADER];
    loop {
        tcp.readable().await?;
        // Inside `try_io`, an incomplete record (our WouldBlock) clears the readiness we saw, so
        // the next `readable` waits for more bytes instead of spinning; tokio keeps readiness
        // that arrived after it, so no wake-up is lost.
        match tcp.try_io(Interest::READABLE, || judge_first_record(tcp, &mut buf)) {
            Ok(h) => return Ok(h),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn judge_first_record(tcp: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Hello> {
    let n = peek(tcp, buf)?;
    if n == 0 {
        return Ok(Hello::Closed);
    }
    if buf[0] != HANDSHAKE_RECORD {
        return Ok(Hello::NotTls);
    }
    if n < RECORD_HEADER {
        return Err(std::io::ErrorKind::WouldBlock.into());
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len == 0 || len > MAX_RECORD {
        return Ok(Hello::NotTls);
    }
    let need = RECORD_HEADER + len;
    if buf.len() < need {
        buf.resize(need, 0);
        if peek(tcp, buf)? >= need {
            return Ok(Hello::Complete);
        }
    } else if n >= need {
        return Ok(Hello::Complete);
    }
    Err(std::io::ErrorKind::WouldBlock.into())
}

/// `recv(MSG_PEEK)`: copies what has arrived (up to `buf.len()`) without consuming it.
fn peek(tcp: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a valid, writable, initialised buffer of `buf.len()` bytes for the whole
    // call and recv(2) writes at most `buf.len()` bytes into it; the descriptor belongs to `tcp`,
    // which is borrowed, so it stays open (and is not reused) during the call. MSG_DONTWAIT makes
    // the call non-blocking whatever the socket's mode.
    let n = unsafe { libc::recv(tcp.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Counts and (rate-limited) logs a connection refused before or during the handshake.
fn refused(ctx: &ExposeContext, addr: SocketAddr, reason: &'static str, error: &dyn std::fmt::Display) {
    ctx.metrics.handshake_failed("server", "-", reason);
    if let Some(n) = ctx.log.handshake.hit() {
        warn!(%addr, reason, error = %error, refused = n, "TLS handshake refused (one line per interval; `refused` counts all reasons)");
    }
}

async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: &Arc<rustls::ServerConfig>,
    ctx: &ExposeContext,
) -> Option<(TlsSession, PeerIdentity, Alpn, crate::tls::context::Handshaked)> {
    crate::io::socket::tune(&tcp);
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let hello = tokio::select! {
        r = tokio::time::timeout(CLIENT_HELLO_TIMEOUT, client_hello(&tcp)) => r,
        _ = ctx.draining.cancelled() => return None,
    };
    match hello {
        Ok(Ok(Hello::Complete)) => {}
        Ok(Ok(Hello::Closed)) => {
            refused(ctx, addr, "eof", &"closed before the ClientHello");
            return None;
        }
        Ok(Ok(Hello::NotTls)) => {
            crate::io::socket::reset_on_drop(&tcp);
            ctx.metrics.port_refused("tls", "not-tls");
            refused(ctx, addr, "protocol", &"the first record is not a TLS handshake record");
            return None;
        }
        Ok(Err(e)) => {
            refused(ctx, addr, "io", &e);
            return None;
        }
        Err(_) => {
            crate::io::socket::reset_on_drop(&tcp);
            ctx.metrics.port_refused("tls", "client-hello-timeout");
            if let Some(n) = ctx.log.hello.hit() {
                warn!(%addr, secs = CLIENT_HELLO_TIMEOUT.as_secs(), refused = n, "no complete ClientHello in time; connection closed");
            }
            return None;
        }
    }
    let result = tokio::select! {
        r = tokio::time::timeout_at(deadline, session::accept(acceptor.clone(), tcp)) => r,
        _ = ctx.draining.cancelled() => return None,
    };
    let conn = match result {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            refused(ctx, addr, failure_reason(&e), &e);
            return None;
        }
        Err(_) => {
            refused(ctx, addr, "timeout", &"TLS handshake timed out");
            return None;
        }
    };
    let info = conn.info();
    let peer = PeerIdentity::from_certs(info.peer_certificates.as_deref());
    // rustls took a resumed session's certificates from the session: check them again, now.
    if let Err(e) = info.resumed.then(|| ctx.tls.recheck_client(info.peer_certificates.as_deref())).unwrap_or(Ok(())) {
        let reason = crate::tls::failure::tls_failure_reason(&e);
        warn!(%addr, peer = peer.name(), reason, error = %e, "resumed TLS session refused: the peer's certificate no longer verifies");
        ctx.metrics.handshake_failed("server", peer.name(), reason);
        return None;
    }
    ctx.metrics.handshake_done("server", info.resumed);
    if !is_configured_peer(ctx, "tls", addr, &peer) {
        crate::io::socket::reset_on_drop(conn.tcp());
        return None;
    }
    let alpn = match info.alpn.as_deref() {
        Some(p) if p == ALPN_DATA => Alpn::Data,
        Some(p) if p == ALPN_CONTROL && ctx.control.is_some() => Alpn::Control,
        other => {
            let alpn = other.map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_else(|| "none".into());
            warn!(%addr, peer = peer.name(), %alpn, "unsupported application protocol; closing");
            ctx.metrics.protocol_errors.get_or_create(&ReasonLabels { reason: "alpn" }).inc();
            return None;
        }
    };
    debug!(%addr, peer = peer.name(), ?alpn, "peer connected");
    let handshaked = crate::tls::context::Handshaked::now(&ctx.tls, info.peer_certificates.clone());
    Some((conn, peer, alpn, handshaked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    /// Not done until the record is whole, whatever the pieces it arrives in; nothing consumed.
    #[tokio::test]
    async fn client_hello_waits_for_the_whole_first_record_without_reading_it() {
        let (mut client, server) = pair().await;
        let record: Vec<u8> = [&[HANDSHAKE_RECORD, 3, 1, 0, 4][..], b"abcd"].concat();
        for piece in [&record[..1], &record[1..5], &record[5..8]] {
            client.write_all(piece).await.unwrap();
            let waited = tokio::time::timeout(Duration::from_millis(200), client_hello(&server)).await;
            assert!(waited.is_err(), "incomplete after {} bytes", piece.len());
        }
        client.write_all(&record[8..]).await.unwrap();
        assert_eq!(client_hello(&server).await.unwrap(), Hello::Complete);
        let mut all = vec![0u8; record.len()];
        assert_eq!(peek(&server, &mut all).unwrap(), record.len(), "the record is still there for rustls");
    }

    #[tokio::test]
    async fn not_tls_and_closed_are_told_apart() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(client_hello(&server).await.unwrap(), Hello::NotTls);

        let (mut client, server) = pair().await;
        client.write_all(&[HANDSHAKE_RECORD, 3, 1, 0x40, 1]).await.unwrap(); // 16385 bytes: too long
        assert_eq!(client_hello(&server).await.unwrap(), Hello::NotTls);

        let (client, server) = pair().await;
        drop(client);
        assert_eq!(client_hello(&server).await.unwrap(), Hello::Closed);
    }
}
