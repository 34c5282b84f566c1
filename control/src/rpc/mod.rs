//! The agent-to-agent control RPC: HTTP/2 over the port's mutually authenticated TLS (ALPN `h2`).
//!
//! Small on purpose: JSON calls by method name (`POST /migtun/v1/call/METHOD`), one streamed
//! upload for the side channel (`POST /migtun/v1/upload`, the file's header in
//! `x-migtun-file`), and a hello exchange first (`POST /migtun/v1/hello`) in which each side
//! states its protocol version and capabilities, so that two versions of migtun can tell what the
//! other supports. Both sides ping every [`KEEPALIVE_INTERVAL`]; a peer that does not answer
//! within [`KEEPALIVE_TIMEOUT`] is declared dead, which the destination uses to abandon a
//! migration whose source vanished and the source uses to stop waiting.
//!
//! The server treats every peer as hostile, also one with a valid certificate: HTTP/2 limits
//! (concurrent streams, header list, request bodies), a per-connection cap on requests in
//! progress, an idle timeout, and an optional [`Policy`] that every request except the hello
//! must pass (the agent's is built from `[qemu] allow_sources`; this module knows no config).
//! Each refusal is answered with a status and a reason, logged with the peer and the method, and counted in
//! `migtun_control_refusals_total`.
//!
//! * `server`: the [`Router`] and one accepted connection's limits and refusals;
//! * `client`: the [`RpcClient`], calls with deadlines and uploads;
//! * `liveness`: keepalive pings, and how the server notices the client's;
//! * `body`: bounded reading of request and reply bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use migtun_proxy::tls::identity::PeerIdentity;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

mod body;
mod client;
mod liveness;
mod server;

pub use client::RpcClient;
pub use server::{Router, Upload};

/// The control protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Ping period on an established control connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// A ping unanswered for this long means the peer is gone: dead peers are noticed within
/// about [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default deadline for a call. Prepare runs the destination's hook and starts QEMU, so this is
/// generous; callers with tighter needs use [`RpcClient::call_with_timeout`].
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest JSON reply body the client reads.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Largest JSON request body the server reads; more is answered with 413. The largest request
/// is a prepare cookie (a command line and a list of disks: a few KiB, tens for a big VM).
pub const MAX_JSON_REQUEST: usize = 256 << 10;
/// Streams a peer may have open at once on one control connection (SETTINGS_MAX_CONCURRENT_STREAMS).
/// A migration uses one at a time (plus one per side-channel file, sent one after the other);
/// 16 leaves room for concurrent migrations over one connection and bounds what one connection
/// can make this agent buffer (16 request bodies of [`MAX_JSON_REQUEST`]).
pub const MAX_CONCURRENT_STREAMS: u32 = 16;
/// Requests in progress at once per connection. A method runs on after its stream is reset (a
/// prepare started is finished or undone), so streams alone do not bound the work a peer can
/// start by opening and resetting streams; over this, requests are answered with 429.
pub const MAX_REQUESTS_PER_CONNECTION: usize = MAX_CONCURRENT_STREAMS as usize;
/// Largest header list of a request (SETTINGS_MAX_HEADER_LIST_SIZE): the biggest header is the
/// upload's `x-migtun-file` (a JSON object of a few hundred bytes).
const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
/// Streams h2 may refuse on one connection (a well-behaved client never opens more than
/// [`MAX_CONCURRENT_STREAMS`], so refused streams only come from a misbehaving one): beyond
/// this the connection is closed with GOAWAY(ENHANCE_YOUR_CALM).
const MAX_REFUSED_STREAMS: usize = 64;
/// A control connection with no open stream and no ping from the peer for this long is closed.
/// The client side pings every [`KEEPALIVE_INTERVAL`], so only connections of something that is
/// not a migtun agent (or a dead one) go idle.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After a refusal, what is left of a request body is read and dropped up to [`DRAIN_LIMIT`]
/// bytes (one stream window: what a client may have in flight) within [`DRAIN_TIMEOUT`].
const DRAIN_LIMIT: usize = STREAM_WINDOW as usize;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const _: () = assert!(
    IDLE_TIMEOUT.as_secs() > 2 * (KEEPALIVE_INTERVAL.as_secs() + KEEPALIVE_TIMEOUT.as_secs()),
    "a pinging client must never look idle"
);
/// Flow-control windows: large enough that a side-channel upload is not bound by round trips.
/// They also bound what a peer can make one connection buffer unread: [`CONNECTION_WINDOW`].
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Upload chunk size.
const UPLOAD_CHUNK: usize = 256 << 10;

const HELLO_PATH: &str = "/migtun/v1/hello";
const CALL_PREFIX: &str = "/migtun/v1/call/";
const UPLOAD_PATH: &str = "/migtun/v1/upload";
const FILE_HEADER: &str = "x-migtun-file";

/// What each side says about itself when a control connection opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// The agent's build version, for logs.
    pub agent: String,
    /// The host name of the agent (its certificate's name).
    pub name: String,
    /// Methods and features this side offers.
    pub capabilities: Vec<String>,
}

/// A file carried with a migration (the side channel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    pub migration: String,
    /// Base name only: no directories.
    pub name: String,
    pub size: u64,
    /// Hex SHA-256 of the content, checked by the receiver.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("control connection to {peer}: HTTP/2 handshake failed: {source}")]
    Handshake { peer: String, source: h2::Error },
    #[error("control connection to {peer} is closed")]
    Closed { peer: String },
    #[error("control connection to {peer}: no answer to keepalive pings; the peer is gone")]
    PeerDead { peer: String },
    #[error("{peer} did not answer {method} within {secs}s")]
    Timeout { peer: String, method: String, secs: u64 },
    #[error("{peer} refused {method}: {message}")]
    Remote {
        peer: String,
        method: String,
        status: u16,
        message: String,
    },
    #[error("{peer} speaks control protocol version {theirs}, this agent {ours}")]
    Version { peer: String, theirs: u32, ours: u32 },
    #[error("{peer} does not support {capability:?} (it offers: {offers})")]
    Unsupported {
        peer: String,
        capability: String,
        offers: String,
    },
    #[error("control protocol error with {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// An error a method returns to the caller: an HTTP status and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodError {
    pub status: u16,
    pub message: String,
    /// Set for refusals (not authorized, over a limit): the fixed reason they are counted and
    /// logged under.
    pub refusal: Option<&'static str>,
}

impl MethodError {
    pub fn new(status: u16, message: impl Into<String>) -> MethodError {
        MethodError { status, message: message.into(), refusal: None }
    }

    /// The request was wrong (bad arguments, unknown migration): 400.
    pub fn bad_request(message: impl Into<String>) -> MethodError {
        MethodError::new(400, message)
    }

    /// The caller may not do this: 403, counted as a refusal with reason `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> MethodError {
        MethodError::refused(403, "forbidden", message)
    }

    /// A refusal (403 not allowed, 413 too large, 429 over a limit) under the fixed `reason`.
    pub fn refused(status: u16, reason: &'static str, message: impl Into<String>) -> MethodError {
        MethodError { status, message: message.into(), refusal: Some(reason) }
    }

    /// It failed on this side: 500.
    pub fn failed(message: impl Into<String>) -> MethodError {
        MethodError::new(500, message)
    }
}

/// Decides whether `peer` may call `method` (a registered method's name, `upload`, or
/// `unknown`); every request except the hello passes it first.
pub type Policy = Arc<dyn Fn(&PeerIdentity, &str) -> Result<(), MethodError> + Send + Sync>;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One accepted control connection, as a method sees it.
#[derive(Clone, Debug)]
pub struct Session {
    /// The authenticated peer.
    pub peer: PeerIdentity,
    /// Cancelled when this connection ends (closed, or the peer stopped answering pings).
    pub closed: CancellationToken,
}

