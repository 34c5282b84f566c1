//! The sending end: a local listener whose connections become streams to a route on a peer.
//!
//! Connections reach the target in the order this listener accepted them. QEMU before 8.0
//! takes the first connection on its migration socket as the main channel, so a multifd
//! channel whose TLS connection happens to be ready first must never overtake it. Connections
//! are obtained concurrently (warm or freshly handshaked), but each stream sends its preamble
//! only after the stream accepted before it has its reply, and the reply is sent by the peer
//! only once the target has accepted the connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::peer::{ConnectError, PeerConnector, PeerStream};
use crate::io::endpoint::{LocalListener, LocalStream};
use crate::metrics::{Metrics, Side};
use crate::route::wire::{Reply, ReplyCode, Request, MAX_REPLY_LEN};

/// The reply must come within the peer's target connect timeout plus a margin for the network.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// One forward: where its streams go.
pub struct ForwardContext {
    pub metrics: Arc<Metrics>,
    pub peer: Arc<PeerConnector>,
    pub route: String,
    pub migration: Option<String>,
    /// Cancelled when the drain deadline passes: open streams are cut.
    pub abort: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("peer refused: {}: {}", .0.code, .0.detail)]
    Refused(Reply),
    #[error("no reply from the peer within {}s", REPLY_TIMEOUT.as_secs())]
    ReplyTimeout,
    #[error("peer closed the connection without a reply")]
    NoReply,
    #[error("bad reply from the peer: {0}")]
    BadReply(crate::route::wire::WireError),
    #[error("{0}")]
    Io(std::io::Error),
}

impl OpenError {
    pub fn reason(&self) -> &'static str {
        match self {
            OpenError::Connect(e) => e.reason(),
            OpenError::Refused(r) => r.code.reason(),
            OpenError::ReplyTimeout => "reply-timeout",
            OpenError::NoReply => "no-reply",
            OpenError::BadReply(_) => "bad-reply",
            // A peer that rejects our certificate says so with an alert on the first read.
            OpenError::Io(e) => match crate::tls::failure::failure_reason(e) {
                // Over QUIC the peer's verdict on our certificate closes the connection.
                "io" | "eof" => quic_lost_reason(e).unwrap_or("peer-io"),
                r => r,
            },
        }
    }
}

/// The reason a QUIC connection was lost under a stream's I/O error, if it was.
fn quic_lost_reason(e: &std::io::Error) -> Option<&'static str> {
    let inner = e.get_ref()?;
    let lost = match (inner.downcast_ref::<quinn::ReadError>(), inner.downcast_ref::<quinn::WriteError>()) {
        (Some(quinn::ReadError::ConnectionLost(c)), _) | (_, Some(quinn::WriteError::ConnectionLost(c))) => c,
        _ => return None,
    };
    match crate::quic::failure::failure_reason(lost) {
        "closed" | "protocol" => None,
        r => Some(r),
    }
}

/// Accepts local connections until `draining` is cancelled.
pub async fn serve(listener: LocalListener, ctx: Arc<ForwardContext>, draining: CancellationToken, tracker: TaskTracker) {
    // The receiver that the next accepted stream waits on before it may send its preamble.
    let mut previous: Option<oneshot::Receiver<()>> = None;
    let mut accept = crate::io::accept::AcceptLoop::new("forward", Some(ctx.metrics.clone()));
    loop {
        let local = tokio::select! {
            _ = draining.cancelled() => return,
            s = accept.accept(|| listener.accept()) => s,
        };
        let (my_turn_done, next_waits_on) = oneshot::channel();
        let my_turn = previous.replace(next_waits_on);
        let ctx = ctx.clone();
        tracker.spawn(async move { stream(local, &ctx, my_turn, my_turn_done).await });
    }
}

/// One accepted local connection, from open to close.
async fn stream(local: LocalStream, ctx: &ForwardContext, my_turn: Option<oneshot::Receiver<()>>, done: oneshot::Sender<()>) {
    let peer_name = ctx.peer.name.as_str();
    let route = ctx.route.as_str();
    let opened = open(ctx, my_turn).await;
    // Whatever happened, the next stream on this route may go now.
    drop(done);
    let (mut conn, early) = match opened {
        Ok(c) => c,
        Err(e) => {
            warn!(peer = peer_name, route, reason = e.reason(), error = %e, "stream not opened; closing the local connection");
            ctx.metrics.stream_failed(peer_name, route, Side::Source, e.reason());
            return;
        }
    };
    let m = ctx.metrics.stream(peer_name, route, Side::Source);
    debug!(peer = peer_name, route, transport = conn.transport(), "stream open");
    let mut local = crate::io::buffers::PooledReader::new(local);
    let result = crate::relay::run(&mut local, &mut conn, &early, &m, None, &ctx.abort).await;
    match result {
        Ok(t) => info!(
            peer = peer_name, route, transport = conn.transport(), to_peer = t.local_to_peer, from_peer = t.peer_to_local,
            "stream closed"
        ),
        Err(e) => warn!(peer = peer_name, route, error = %e, "stream reset"),
    }
}

/// Gets a connection, waits for this stream's turn, and asks the peer for the route. Returns the
/// connection and any stream bytes that arrived together with the reply.
async fn open(ctx: &ForwardContext, my_turn: Option<oneshot::Receiver<()>>) -> Result<(PeerStream, Vec<u8>), OpenError> {
    let request = Request { route: ctx.route.clone(), migration: ctx.migration.clone() };
    let (mut conn, pooled) = ctx.peer.get().await?;
    if let Some(turn) = my_turn {
        // An error only means the previous stream is finished with its turn.
        let _ = turn.await;
    }
    let mut reply = exchange(&mut conn, &request).await;
    if pooled && matches!(reply, Err(OpenError::Io(_) | OpenError::NoReply)) {
        // A warm connection may have been closed by the peer meanwhile (restart, idle limit):
        // nothing reached the target, so a fresh connection is safe.
        debug!(peer = %ctx.peer.name, route = %ctx.route, "warm connection was stale; reconnecting");
        conn = ctx.peer.connect().await?;
        reply = exchange(&mut conn, &request).await;
    }
    if matches!(&reply, Ok((r, _)) if r.code == ReplyCode::Draining) {
        // The agent there drains (a restart: its successor may already serve the port). Nothing
        // reached the target, so a fresh connection is safe; a QUIC connection to the draining
        // agent is not used for new streams again (the next dial finds the new agent, or
        // `auto` falls back to TLS while the old one still holds the UDP port).
        debug!(peer = %ctx.peer.name, route = %ctx.route, transport = conn.transport(), "peer is draining; trying a fresh connection");
        ctx.peer.retire_quic();
        match ctx.peer.connect().await {
            Ok(fresh) => {
                conn = fresh;
                reply = exchange(&mut conn, &request).await;
            }
            // Nobody else serves the port: the stream stays refused `draining`.
            Err(e) => debug!(peer = %ctx.peer.name, route = %ctx.route, error = %e, "no other agent on the peer's port"),
        }
    }
    let (reply, early) = reply?;
    if !pooled {
        ctx.peer.refill();
    }
    if reply.code != ReplyCode::Ok {
        return Err(OpenError::Refused(reply));
    }
    Ok((conn, early))
}

async fn exchange(conn: &mut PeerStream, request: &Request) -> Result<(Reply, Vec<u8>), OpenError> {
    conn.write_all(&request.encode()).await.map_err(OpenError::Io)?;
    conn.flush().await.map_err(OpenError::Io)?;
    let read_reply = async {
        let mut buf = vec![0u8; MAX_REPLY_LEN + 4096];
        let mut have = 0;
        loop {
            if let Some((reply, used)) = Reply::decode(&buf[..have]).map_err(OpenError::BadReply)? {
                return Ok((reply, buf[used..have].to_vec()));
            }
            let n = conn.read(&mut buf[have..]).await.map_err(OpenError::Io)?;
            if n == 0 {
                return Err(OpenError::NoReply);
            }
            have += n;
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, read_reply).await.map_err(|_| OpenError::ReplyTimeout)?
}
