//! The one port: TCP accept, the TLS 1.3 handshake with client authentication, ALPN dispatch.
//!
//! Handshakes are bounded in number and time, so that idle, slow or hostile connections cannot
//! pile up; each failure is logged with the peer address and reason and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::expose::{self, ExposeContext};
use crate::metrics::ReasonLabels;
use crate::session::{self, TlsSession};
use crate::tls::{failure_reason, PeerIdentity, ALPN_CONTROL, ALPN_DATA};

/// What an accepted connection carries, by its ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alpn {
    /// One tunnelled data stream.
    Data,
    /// The agent-to-agent control RPC.
    Control,
}

/// A client must finish its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections are closed at once and counted. A busy
/// host opens a few dozen streams per migration, so this only bites a flood.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Pause after an accept error (out of file descriptors, say) so we do not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts on the port until `ctx.draining` is cancelled.
pub async fn serve(listener: TcpListener, acceptor: Arc<rustls::ServerConfig>, ctx: Arc<ExposeContext>, tracker: TaskTracker) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let (tcp, addr) = tokio::select! {
            _ = ctx.draining.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "port: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            warn!(%addr, "too many handshakes in progress; connection dropped");
            ctx.metrics.handshake_failed("server", "-", "overload");
            continue;
        };
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        tracker.spawn(async move {
            let conn = handshake(tcp, addr, &acceptor, &ctx).await;
            drop(permit);
            let Some((conn, peer, alpn)) = conn else { return };
            match (alpn, &ctx.control) {
                (Alpn::Data, _) => expose::serve(conn, peer, &ctx).await,
                (Alpn::Control, Some(handler)) => {
                    // Control connections live as long as the control plane wants them; only
                    // the drain deadline cuts them.
                    tokio::select! {
                        _ = handler(Box::new(conn), peer) => {}
                        _ = ctx.abort.cancelled() => {}
                    }
                }
                (Alpn::Control, None) => {}
            }
        });
    }
}

async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: &Arc<rustls::ServerConfig>,
    ctx: &ExposeContext,
) -> Option<(TlsSession, PeerIdentity, Alpn)> {
    crate::socket::tune(&tcp);
    let result = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, session::accept(acceptor.clone(), tcp)) => r,
        _ = ctx.draining.cancelled() => return None,
    };
    let conn = match result {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            warn!(%addr, reason, error = %e, "TLS handshake refused");
            ctx.metrics.handshake_failed("server", "-", reason);
            return None;
        }
        Err(_) => {
            warn!(%addr, reason = "timeout", "TLS handshake timed out");
            ctx.metrics.handshake_failed("server", "-", "timeout");
            return None;
        }
    };
    let info = conn.info();
    let peer = PeerIdentity::from_certs(info.peer_certificates.as_deref());
    // rustls took a resumed session's certificates from the session: check them again, now.
    if let Err(e) = info.resumed.then(|| ctx.tls.recheck_client(info.peer_certificates.as_deref())).unwrap_or(Ok(())) {
        let reason = crate::tls::tls_failure_reason(&e);
        warn!(%addr, peer = peer.name(), reason, error = %e, "resumed TLS session refused: the peer's certificate no longer verifies");
        ctx.metrics.handshake_failed("server", peer.name(), reason);
        return None;
    }
    ctx.metrics.handshake_done("server", info.resumed);
    let alpn = match info.alpn.as_deref() {
        Some(p) if p == ALPN_DATA => Alpn::Data,
        Some(p) if p == ALPN_CONTROL && ctx.control.is_some() => Alpn::Control,
        other => {
            let alpn = other.map(|p| String::from_utf8_lossy(p).into_owned());
            warn!(%addr, peer = peer.name(), ?alpn, "unsupported application protocol; closing");
            ctx.metrics.protocol_errors.get_or_create(&ReasonLabels { reason: "alpn" }).inc();
            return None;
        }
    };
    debug!(%addr, peer = peer.name(), ?alpn, "peer connected");
    Some((conn, peer, alpn))
}
