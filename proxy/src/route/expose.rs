//! The receiving end of a data stream: preamble, authorization, target connect, relay; and what
//! the port hands a control connection to ([`ControlHandler`]).
//!
//! Runs for every authenticated `migtun/1` connection the port accepts. Whatever the outcome
//! the source gets a reply with a reason before the connection closes, and a failure is logged,
//! counted, and touches nothing but this one stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::io::accept::Throttle;
use crate::io::limit::KeyedLimit;
use crate::io::Reset;
use crate::metrics::{Metrics, Side};
use crate::route::wire::{Reply, ReplyCode, Request, WireError, MAX_REQUEST_LEN};
use crate::route::RouteTable;
use crate::tls::identity::PeerIdentity;

/// How long a handshaked connection may sit idle before its preamble starts. Sources keep a
/// few connections warm for up to [`crate::peer::POOL_MAX_IDLE`] (20 s); this is that plus
/// a margin for a stream that waits its turn behind the one accepted before it, and short
/// enough that a peer holding connections without a preamble gives them back soon.
pub const IDLE_PREAMBLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections (or QUIC streams) one peer may have awaiting their preamble at once; more are
/// refused with a reply that names the limit. A source holds a couple of warm connections plus
/// one per stream that is opening: streams of a forward send their preambles in accept order
/// ([`crate::route::forward`]), so a burst of 1,000 opens holds up to 1,000 connections waiting their
/// turn (tests/tls_transport.rs, `a_burst_of_a_thousand_opens_all_arrive`). The cap keeps one
/// peer, or one stolen key, from holding all of the agent's file descriptors.
pub const MAX_AWAITING_PREAMBLE_PER_PEER: usize = 1024;
/// Once the first byte of a preamble has arrived, the rest must follow promptly.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to a local target; a UNIX socket answers at once or not at all, so this is only
/// reached by a listener whose backlog is full or a TCP target that drops SYNs.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A byte stream carrying the control protocol, whatever transport is under it.
pub trait ControlIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ControlIo for T {}
pub type ControlStream = Box<dyn ControlIo>;

/// Serves one accepted control connection from an authenticated peer.
pub type ControlHandler =
    Arc<dyn Fn(ControlStream, PeerIdentity) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The port's rate-limited log lines, one throttle per kind of refusal.
#[derive(Default)]
pub struct PortLog {
    pub address_limit: Throttle,
    pub hello: Throttle,
    pub handshake: Throttle,
    pub not_a_peer: Throttle,
    pub preamble_limit: Throttle,
    pub control_limit: Throttle,
    pub paused: Throttle,
}

/// What the receiving side needs to serve a stream.
pub struct ExposeContext {
    pub metrics: Arc<Metrics>,
    pub routes: Arc<RouteTable>,
    /// Cancelled when the agent starts draining: idle connections close, new preambles are refused.
    pub draining: CancellationToken,
    /// Cancelled when the drain deadline passes: open streams are cut.
    pub abort: CancellationToken,
    /// Serves control connections, when the control plane runs in this agent.
    pub control: Option<ControlHandler>,
    /// The configured `[[peer]]` names: any other certificate gets nothing past the handshake.
    pub peers: std::sync::RwLock<Vec<String>>,
    /// Connections awaiting their preamble, per peer ([`MAX_AWAITING_PREAMBLE_PER_PEER`]).
    pub awaiting_preamble: Arc<KeyedLimit<String>>,
    /// Rate-limited log lines of the port.
    pub log: PortLog,
    /// Checks a resumed session's client certificate again ([`crate::tls::context::TlsContext::recheck_client`]).
    pub tls: Arc<crate::tls::context::TlsContext>,
}

impl ExposeContext {
    pub fn new(
        metrics: Arc<Metrics>,
        routes: Arc<RouteTable>,
        draining: CancellationToken,
        abort: CancellationToken,
        control: Option<ControlHandler>,
        peers: Vec<String>,
        tls: Arc<crate::tls::context::TlsContext>,
    ) -> ExposeContext {
        ExposeContext {
            metrics,
            routes,
            draining,
            abort,
            control,
            peers: std::sync::RwLock::new(peers),
            awaiting_preamble: KeyedLimit::new(MAX_AWAITING_PREAMBLE_PER_PEER),
            log: PortLog::default(),
            tls,
        }
    }
}

/// Route label for requests that name no configured route: keeps metric labels bounded.
const UNKNOWN_ROUTE_LABEL: &str = "<unknown>";

/// Serves one data stream on an authenticated connection; `transport` (`tls` or `quic`) labels
/// its refusals.
pub async fn serve<S>(
    mut conn: S,
    peer: PeerIdentity,
    handshaked: &crate::tls::context::Handshaked,
    transport: &'static str,
    ctx: &ExposeContext,
) where
    S: crate::relay::RelayStream + Reset,
{
    let peer_name = peer.name().to_string();
    let Some(waiting) = ctx.awaiting_preamble.try_acquire(peer_name.clone()) else {
        ctx.metrics.port_refused(transport, "peer-preamble-limit");
        if let Some(n) = ctx.log.preamble_limit.hit() {
            warn!(peer = %peer_name, limit = MAX_AWAITING_PREAMBLE_PER_PEER, refused = n,
                "too many connections of this peer awaiting their preamble; refused");
        }
        let detail = format!(
            "too many connections from {peer_name} awaiting their preamble (limit {MAX_AWAITING_PREAMBLE_PER_PEER})"
        );
        let _ = send_reply(&mut conn, &Reply::refuse(ReplyCode::Internal, detail)).await;
        return;
    };
    ctx.metrics.awaiting_preamble.inc();
    let request = read_request(&mut conn, ctx).await;
    ctx.metrics.awaiting_preamble.dec();
    drop(waiting);
    let (request, leftover) = match request {
        Ok(Some(r)) => r,
        Ok(None) => return, // an idle warm connection closed, or we are draining
        Err(err) => {
            let reason = match &err {
                PreambleError::Timeout => "preamble-timeout",
                PreambleError::Wire(WireError::UnsupportedVersion(_)) => "unsupported-version",
                PreambleError::Wire(_) => "malformed-preamble",
                PreambleError::Io(_) => "preamble-io",
            };
            ctx.metrics.protocol_errors.get_or_create(&crate::metrics::ReasonLabels { reason }).inc();
            warn!(peer = %peer_name, reason, error = %err, "bad stream preamble; closing the connection");
            let code = match err {
                PreambleError::Wire(WireError::UnsupportedVersion(_)) => ReplyCode::UnsupportedVersion,
                _ => ReplyCode::Malformed,
            };
            let _ = send_reply(&mut conn, &Reply::refuse(code, err.to_string())).await;
            return;
        }
    };
    let route_name = request.route.as_str();

    if ctx.draining.is_cancelled() {
        refuse(&mut conn, ctx, &peer_name, route_name, ReplyCode::Draining, "agent is shutting down").await;
        return;
    }
    // A connection made before a reload: the peer's certificate must pass the new verifier.
    if let Err(e) = handshaked.still_valid(&ctx.tls) {
        let detail = format!("the certificate of {peer_name} is no longer accepted here: {e}");
        refuse(&mut conn, ctx, &peer_name, UNKNOWN_ROUTE_LABEL, ReplyCode::Forbidden, &detail).await;
        return;
    }
    let route = match ctx.routes.authorize(route_name, request.migration.as_deref(), &peer) {
        Ok(r) => r,
        Err(refusal) => {
            let label = if refusal.code == ReplyCode::UnknownRoute { UNKNOWN_ROUTE_LABEL } else { route_name };
            refuse(&mut conn, ctx, &peer_name, label, refusal.code, &refusal.detail).await;
            return;
        }
    };
    let mut target = match route.target.connect(TARGET_CONNECT_TIMEOUT).await {
        Ok(t) => crate::io::buffers::PooledReader::new(t),
        Err(e) => {
            let detail = format!("cannot connect to {}: {e}", route.target);
            refuse(&mut conn, ctx, &peer_name, route_name, ReplyCode::TargetUnreachable, &detail).await;
            return;
        }
    };
    if let Err(e) = send_reply(&mut conn, &Reply::ok()).await {
        warn!(peer = %peer_name, route = route_name, error = %e, "peer went away before the stream started");
        ctx.metrics.stream_failed(&peer_name, route_name, Side::Target, "peer-gone");
        return;
    }
    let stream_metrics = ctx.metrics.stream(&peer_name, route_name, Side::Target);
    debug!(peer = %peer_name, route = route_name, target = %route.target, "stream open");
    let result = crate::relay::run(&mut target, &mut conn, &leftover, &stream_metrics, route.received.as_ref(), &ctx.abort).await;
    match result {
        Ok(t) => info!(
            peer = %peer_name, route = route_name, from_peer = t.peer_to_local, to_peer = t.local_to_peer,
            "stream closed"
        ),
        Err(e) => warn!(peer = %peer_name, route = route_name, error = %e, "stream reset"),
    }
}

async fn refuse<S: AsyncWrite + Unpin>(
    conn: &mut S,
    ctx: &ExposeContext,
    peer: &str,
    route: &str,
    code: ReplyCode,
    detail: &str,
) {
    warn!(peer, route, reason = code.reason(), detail, "stream refused");
    ctx.metrics.stream_failed(peer, route, Side::Target, code.reason());
    let _ = send_reply(conn, &Reply::refuse(code, detail)).await;
}

async fn send_reply<S: AsyncWrite + Unpin>(conn: &mut S, reply: &Reply) -> std::io::Result<()> {
    conn.write_all(&reply.encode()).await?;
    conn.flush().await?;
    if reply.code != ReplyCode::Ok {
        // Refused: close our side cleanly so the source reads the reply and then EOF.
        conn.shutdown().await?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum PreambleError {
    #[error("timed out waiting for the preamble")]
    Timeout,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads a request. `Ok(None)` when the connection closed (or the agent began draining) before
/// the first byte: that is how idle warm connections end, and it is not an error.
async fn read_request<S: AsyncRead + Unpin>(
    conn: &mut S,
    ctx: &ExposeContext,
) -> Result<Option<(Request, Vec<u8>)>, PreambleError> {
    let mut buf = [0u8; MAX_REQUEST_LEN];
    let mut have = 0;
    let first = tokio::select! {
        // Bytes already there are read first: a preamble that arrived as the agent began to
        // drain is answered `draining` rather than dropped without a reply.
        biased;
        r = tokio::time::timeout(IDLE_PREAMBLE_TIMEOUT, conn.read(&mut buf)) => r,
        _ = ctx.draining.cancelled() => return Ok(None),
    };
    match first {
        Err(_) => return Ok(None), // idle warm connection expired
        Ok(Ok(0)) => return Ok(None),
        Ok(Ok(n)) => have += n,
        Ok(Err(e)) => return Err(e.into()),
    }
    let deadline = tokio::time::Instant::now() + PREAMBLE_TIMEOUT;
    loop {
        if let Some((req, used)) = Request::decode(&buf[..have])? {
            return Ok(Some((req, buf[used..have].to_vec())));
        }
        if have == buf.len() {
            // decode() rejects anything longer than the longest valid request before this.
            return Err(PreambleError::Wire(WireError::BadName { what: "preamble", why: "too long" }));
        }
        let n = tokio::time::timeout_at(deadline, conn.read(&mut buf[have..]))
            .await
            .map_err(|_| PreambleError::Timeout)??;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed inside the preamble").into());
        }
        have += n;
    }
}
