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
//! must pass (the agent's is `[qemu] allow_sources`, see [`crate::authz`]). Each refusal is
//! answered with a status and a reason, logged with the peer and the method, and counted in
//! `migtun_control_refusals_total`.

use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::{client, server, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use migtun_proxy::agent::{ControlHandler, ControlStream};
use migtun_proxy::metrics::Metrics;
use migtun_proxy::tls::identity::PeerIdentity;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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

type MethodFn =
    Arc<dyn Fn(Session, serde_json::Value) -> BoxFuture<Result<serde_json::Value, MethodError>> + Send + Sync>;
type UploadFn =
    Arc<dyn Fn(Session, FileHeader, Upload) -> BoxFuture<Result<serde_json::Value, MethodError>> + Send + Sync>;

/// Where refusals are counted: the agent's metrics, and the configured peers (any other
/// caller is counted as `unknown`, so that strangers cannot create series).
struct RefusalMetrics {
    metrics: Arc<Metrics>,
    peers: HashSet<String>,
}

/// The server side: methods by name, an optional upload handler.
#[derive(Clone)]
pub struct Router {
    name: String,
    methods: HashMap<String, MethodFn>,
    upload: Option<UploadFn>,
    policy: Option<Policy>,
    refusals: Option<Arc<RefusalMetrics>>,
    idle_timeout: Duration,
}

impl Router {
    /// `name` is this agent's host name, told to peers in the hello.
    pub fn new(name: &str) -> Router {
        Router {
            name: name.to_string(),
            methods: HashMap::new(),
            upload: None,
            policy: None,
            refusals: None,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// Every request except the hello must pass `policy` (without one, every authenticated
    /// peer may call every method).
    pub fn authorize(mut self, policy: Policy) -> Router {
        self.policy = Some(policy);
        self
    }

    /// Counts refusals in `metrics` (`migtun_control_refusals_total`), labelled with the
    /// caller's name only if it is one of `peers`.
    pub fn count_refusals(mut self, metrics: Arc<Metrics>, peers: impl IntoIterator<Item = String>) -> Router {
        self.refusals = Some(Arc::new(RefusalMetrics { metrics, peers: peers.into_iter().collect() }));
        self
    }

    /// Closes connections idle for `timeout` (default [`IDLE_TIMEOUT`]; tests shorten it).
    pub fn idle_timeout(mut self, timeout: Duration) -> Router {
        self.idle_timeout = timeout;
        self
    }

    /// Registers `method`; it takes and returns JSON.
    pub fn method<F, Fut>(mut self, method: &str, f: F) -> Router
    where
        F: Fn(Session, serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, MethodError>> + Send + 'static,
    {
        self.methods
            .insert(method.to_string(), Arc::new(move |s, v| Box::pin(f(s, v))));
        self
    }

    /// Registers the upload handler (the `files` capability).
    pub fn upload<F, Fut>(mut self, f: F) -> Router
    where
        F: Fn(Session, FileHeader, Upload) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, MethodError>> + Send + 'static,
    {
        self.upload = Some(Arc::new(move |s, h, u| Box::pin(f(s, h, u))));
        self
    }

    fn hello(&self) -> Hello {
        let mut capabilities: Vec<String> = self.methods.keys().cloned().collect();
        if self.upload.is_some() {
            capabilities.push("files".to_string());
        }
        capabilities.sort();
        Hello {
            version: PROTOCOL_VERSION,
            agent: env!("CARGO_PKG_VERSION").to_string(),
            name: self.name.clone(),
            capabilities,
        }
    }

    /// The handler to register with the agent (`Agent::set_control_handler`).
    pub fn into_handler(self) -> ControlHandler {
        let router = Arc::new(self);
        Arc::new(move |io, peer| {
            let router = router.clone();
            Box::pin(async move { router.serve(io, peer).await })
        })
    }

    /// Serves one control connection until it closes, goes idle, or the peer stops answering.
    pub async fn serve(self: Arc<Self>, io: ControlStream, peer: PeerIdentity) {
        let activity = Arc::new(Activity::new());
        let io = PingWatch::new(io, activity.clone());
        let handshake = server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_local_error_reset_streams(Some(MAX_REFUSED_STREAMS))
            .handshake::<_, Bytes>(io);
        // A peer that never completes the HTTP/2 preface holds nothing for long.
        let mut conn = match tokio::time::timeout(self.idle_timeout, handshake).await {
            Err(_) => {
                warn!(peer = peer.name(), "control connection: no HTTP/2 preface within {}s; closing", self.idle_timeout.as_secs());
                return;
            }
            Ok(r) => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(peer = peer.name(), error = %e, "control connection: HTTP/2 handshake failed");
                    return;
                }
            },
        };
        let session = Session {
            peer: peer.clone(),
            closed: CancellationToken::new(),
        };
        if let Some(pp) = conn.ping_pong() {
            tokio::spawn(keepalive(pp, session.closed.clone(), peer.name().to_string()));
        }
        let in_progress = Arc::new(Semaphore::new(MAX_REQUESTS_PER_CONNECTION));
        let mut idle_check = tokio::time::interval((self.idle_timeout / 4).max(Duration::from_millis(100)));
        let mut closing = false;
        loop {
            let next = tokio::select! {
                r = conn.accept() => Some(r),
                _ = session.closed.cancelled() => break,
                _ = idle_check.tick(), if !closing => None,
            };
            let Some(next) = next else {
                let busy = conn.has_streams() || in_progress.available_permits() < MAX_REQUESTS_PER_CONNECTION;
                if busy {
                    activity.touch();
                } else if activity.idle_for() >= self.idle_timeout {
                    info!(peer = peer.name(), "control connection idle for {}s (no request, no ping); closing", self.idle_timeout.as_secs());
                    conn.graceful_shutdown();
                    closing = true;
                }
                continue;
            };
            match next {
                Some(Ok((req, mut respond))) => {
                    activity.touch();
                    let Ok(permit) = in_progress.clone().try_acquire_owned() else {
                        let method = self.method_label(req.uri().path());
                        let e = MethodError::refused(
                            429,
                            "busy-connection",
                            format!("{MAX_REQUESTS_PER_CONNECTION} requests are in progress on this control connection; wait for one to end"),
                        );
                        self.answer(&session, method, &mut respond, Err(e));
                        continue;
                    };
                    let router = self.clone();
                    let session = session.clone();
                    let activity = activity.clone();
                    tokio::spawn(async move {
                        router.handle(session, req, respond, permit).await;
                        activity.touch();
                    });
                }
                Some(Err(e)) => {
                    debug!(peer = peer.name(), error = %e, "control connection ended");
                    break;
                }
                None => break,
            }
        }
        session.closed.cancel();
    }

    /// The method name a request is logged and counted under: a registered method, `hello`,
    /// `upload`, or `unknown` (a bounded set, whatever the peer sends).
    fn method_label(&self, path: &str) -> &str {
        if path == HELLO_PATH {
            "hello"
        } else if path == UPLOAD_PATH {
            "upload"
        } else {
            match path.strip_prefix(CALL_PREFIX).and_then(|m| self.methods.get_key_value(m)) {
                Some((name, _)) => name.as_str(),
                None => "unknown",
            }
        }
    }

    /// Serves one request. `permit` (its place among the connection's requests in progress) is
    /// given back just before the answer goes out, i.e. before h2 counts the stream as closed:
    /// a client that opens a new stream as soon as one closes is never told 429.
    async fn handle(
        &self,
        session: Session,
        req: Request<RecvStream>,
        mut respond: server::SendResponse<Bytes>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let path = req.uri().path().to_string();
        let method = self.method_label(&path).to_string();
        let is_post = req.method() == Method::POST;
        let allowed = match (&self.policy, path.as_str()) {
            (_, HELLO_PATH) | (None, _) => Ok(()),
            (Some(policy), _) => policy(&session.peer, &method),
        };
        if path == UPLOAD_PATH && is_post {
            // Refused uploads are answered at once: their body is never read.
            let result = match allowed {
                Ok(()) => self.handle_upload(session.clone(), req).await,
                Err(e) => Err(e),
            };
            drop(permit);
            return self.answer(&session, &method, &mut respond, result);
        }
        // Read the whole request (up to the limit) before answering, whatever the answer: a
        // server that answers early resets the rest of the request stream, and the client would
        // see a reset instead of the answer.
        let mut body = req.into_body();
        let args = read_json_body(&mut body, MAX_JSON_REQUEST).await;
        let result = if let Err(e) = allowed {
            Err(e)
        } else if let Err(BodyError::TooLarge(limit)) = args {
            Err(MethodError::refused(413, "body-too-large", format!("{method}: request body larger than {limit} bytes")))
        } else if !is_post {
            Err(MethodError::new(405, "only POST"))
        } else if path == HELLO_PATH {
            Ok(serde_json::to_value(self.hello()).unwrap_or_default())
        } else if let Some(name) = path.strip_prefix(CALL_PREFIX) {
            match (self.methods.get(name).cloned(), args) {
                (None, _) => Err(MethodError::new(404, format!("unknown method {name:?}"))),
                (Some(_), Err(e)) => Err(MethodError::bad_request(e.to_string())),
                (Some(f), Ok(args)) => f(session.clone(), args).await,
            }
        } else {
            Err(MethodError::new(404, format!("no such path {path:?}")))
        };
        drop(permit);
        self.answer(&session, &method, &mut respond, result);
        // After a 413 the client may still be sending: take (and drop) a bounded amount more
        // so that the stream ends cleanly rather than by a reset the client could mistake for
        // a lost answer; beyond that bound, the stream is reset.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain(&mut body, DRAIN_LIMIT)).await;
    }

    /// Sends `result`; a refusal is also logged (peer, method, reason) and counted.
    fn answer(
        &self,
        session: &Session,
        method: &str,
        respond: &mut server::SendResponse<Bytes>,
        result: Result<serde_json::Value, MethodError>,
    ) {
        if let Err(MethodError { status, message, refusal: Some(reason) }) = &result {
            warn!(peer = session.peer.name(), method, reason, status, "control request refused: {message}");
            if let Some(r) = &self.refusals {
                let name = session.peer.name();
                let peer = if r.peers.contains(name) { name } else { "unknown" };
                r.metrics.control_refused(peer, method, reason);
            }
        }
        respond_json(respond, result);
    }

    async fn handle_upload(
        &self,
        session: Session,
        req: Request<RecvStream>,
    ) -> Result<serde_json::Value, MethodError> {
        let Some(f) = self.upload.clone() else {
            return Err(MethodError::new(404, "this agent does not accept files"));
        };
        let header: FileHeader = req
            .headers()
            .get(FILE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| serde_json::from_str(v).ok())
            .ok_or_else(|| MethodError::bad_request(format!("missing or bad {FILE_HEADER} header")))?;
        f(session, header, Upload { body: req.into_body() }).await
    }
}

/// The body of an upload, read chunk by chunk with HTTP/2 flow control.
pub struct Upload {
    body: RecvStream,
}

impl Upload {
    /// The next chunk, `None` at the end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        let r = self.body.data().await?;
        Some(match r {
            Ok(b) => {
                let _ = self.body.flow_control().release_capacity(b.len());
                Ok(b)
            }
            Err(e) => Err(std::io::Error::other(e)),
        })
    }
}

/// Sends `result` as the JSON answer of a request.
fn respond_json(respond: &mut server::SendResponse<Bytes>, result: Result<serde_json::Value, MethodError>) {
    let (status, body) = match result {
        Ok(v) => (StatusCode::OK, v),
        Err(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            serde_json::json!({ "error": e.message }),
        ),
    };
    let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(());
    let Ok(response) = response else { return };
    if let Ok(mut send) = respond.send_response(response, false) {
        let _ = send.send_data(body, true);
    }
}

#[derive(Debug)]
enum BodyError {
    /// More than the limit (in bytes); reading stopped there.
    TooLarge(usize),
    Read(String),
    NotJson(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(limit) => write!(f, "body larger than {limit} bytes"),
            BodyError::Read(e) => write!(f, "reading the body: {e}"),
            BodyError::NotJson(e) => write!(f, "body is not JSON: {e}"),
        }
    }
}

/// Reads a JSON body of at most `limit` bytes; stops reading at the limit.
/// Reads and drops up to `limit` bytes of what is left of `body`.
async fn drain(body: &mut RecvStream, limit: usize) {
    let mut left = limit;
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        match left.checked_sub(chunk.len()) {
            Some(l) => left = l,
            None => return,
        }
    }
}

async fn read_json_body(body: &mut RecvStream, limit: usize) -> Result<serde_json::Value, BodyError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&buf).map_err(|e| BodyError::NotJson(e.to_string()))
}

/// When the peer last showed life: a PING it sent, or a request. Milliseconds since `base`.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { base: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let now = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// The client's connection preface, which precedes its first frame.
const H2_PREFACE_LEN: usize = 24;
/// An HTTP/2 frame header: length (3 bytes), type, flags, stream id (4 bytes).
const H2_FRAME_HEADER_LEN: usize = 9;
const H2_FRAME_PING: u8 = 0x6;
const H2_FLAG_ACK: u8 = 0x1;

/// Passes a server connection's bytes through unchanged, following the client's frame
/// boundaries to notice the PINGs it sends (not the ACKs of ours): h2 answers pings itself and
/// does not tell, but a client's keepalive is what keeps an otherwise idle connection open.
/// Only frame headers are looked at; what h2 makes of the bytes is up to h2.
struct PingWatch<T> {
    io: T,
    /// Bytes of the preface or of a frame payload still to pass.
    skip: usize,
    head: [u8; H2_FRAME_HEADER_LEN],
    have: usize,
    activity: Arc<Activity>,
}

impl<T> PingWatch<T> {
    fn new(io: T, activity: Arc<Activity>) -> PingWatch<T> {
        PingWatch { io, skip: H2_PREFACE_LEN, head: [0; H2_FRAME_HEADER_LEN], have: 0, activity }
    }

    fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (H2_FRAME_HEADER_LEN - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == H2_FRAME_HEADER_LEN {
                self.have = 0;
                let [l0, l1, l2, kind, flags, ..] = self.head;
                if kind == H2_FRAME_PING && flags & H2_FLAG_ACK == 0 {
                    self.activity.touch();
                }
                self.skip = u32::from_be_bytes([0, l0, l1, l2]) as usize;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PingWatch<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let this = &mut *self;
            this.scan(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PingWatch<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Pings until the connection fails or a ping goes unanswered, then cancels `closed`.
async fn keepalive(mut pp: h2::PingPong, closed: CancellationToken, peer: String) {
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(KEEPALIVE_INTERVAL) => {}
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "control connection: ping failed");
                break;
            }
            Err(_) => {
                warn!(%peer, "control connection: no answer to a ping within {}s; the peer is gone", KEEPALIVE_TIMEOUT.as_secs());
                break;
            }
        }
    }
    closed.cancel();
}

/// The client side of a control connection to one peer.
#[derive(Clone)]
pub struct RpcClient {
    peer: String,
    send: client::SendRequest<Bytes>,
    hello: Hello,
    closed: CancellationToken,
}

impl RpcClient {
    /// Runs the HTTP/2 handshake and the hello exchange on `io` (from
    /// `AgentHandle::connect_control`), and starts the keepalive.
    pub async fn connect(io: ControlStream, peer: &str, me: &str) -> Result<RpcClient, RpcError> {
        let (send, mut conn) = client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| RpcError::Handshake {
                peer: peer.to_string(),
                source,
            })?;
        let closed = CancellationToken::new();
        let pp = conn.ping_pong();
        {
            let closed = closed.clone();
            let peer = peer.to_string();
            tokio::spawn(async move {
                tokio::select! {
                    r = conn => if let Err(e) = r { debug!(%peer, error = %e, "control connection ended") },
                    _ = closed.cancelled() => {}
                }
                closed.cancel();
            });
        }
        if let Some(pp) = pp {
            tokio::spawn(keepalive(pp, closed.clone(), peer.to_string()));
        }
        let mut client = RpcClient {
            peer: peer.to_string(),
            send,
            hello: Hello {
                version: 0,
                agent: String::new(),
                name: String::new(),
                capabilities: Vec::new(),
            },
            closed,
        };
        let mine = Hello {
            version: PROTOCOL_VERSION,
            agent: env!("CARGO_PKG_VERSION").to_string(),
            name: me.to_string(),
            capabilities: Vec::new(),
        };
        let theirs: Hello = client.request(HELLO_PATH, "hello", &mine, CALL_TIMEOUT).await?;
        if theirs.version != PROTOCOL_VERSION {
            return Err(RpcError::Version {
                peer: peer.to_string(),
                theirs: theirs.version,
                ours: PROTOCOL_VERSION,
            });
        }
        client.hello = theirs;
        Ok(client)
    }

    /// What the peer said about itself.
    pub fn peer_hello(&self) -> &Hello {
        &self.hello
    }

    pub fn supports(&self, capability: &str) -> bool {
        self.hello.capabilities.iter().any(|c| c == capability)
    }

    /// Fails unless the peer offers `capability`.
    pub fn require(&self, capability: &str) -> Result<(), RpcError> {
        if self.supports(capability) {
            return Ok(());
        }
        Err(RpcError::Unsupported {
            peer: self.peer.clone(),
            capability: capability.to_string(),
            offers: self.hello.capabilities.join(", "),
        })
    }

    /// Resolves when the connection is closed or the peer stopped answering pings.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Cancelled when the connection ends, for a task that must react at once.
    pub fn closed_token(&self) -> tokio_util::sync::CancellationToken {
        self.closed.clone()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: &str,
        args: &Req,
    ) -> Result<Resp, RpcError> {
        self.call_with_timeout(method, args, CALL_TIMEOUT).await
    }

    pub async fn call_with_timeout<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: &str,
        args: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        self.request(&format!("{CALL_PREFIX}{method}"), method, args, timeout)
            .await
    }

    async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        method: &str,
        args: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        let body = serde_json::to_vec(args).map_err(|e| self.protocol(format!("encoding {method}: {e}")))?;
        let exchange = async {
            let mut send = self.send.clone().ready().await.map_err(|_| self.gone())?;
            let req = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header("content-type", "application/json")
                .body(())
                .map_err(|e| self.protocol(e.to_string()))?;
            let (response, mut stream) = send.send_request(req, false).map_err(|_| self.gone())?;
            // If the peer has already answered (and reset the rest of the request), the answer
            // below says why; a dead connection fails there too.
            let _ = stream.send_data(Bytes::from(body), true);
            self.read_response(method, response).await
        };
        self.bounded(method, timeout, exchange).await
    }

    /// Streams `size` bytes from `reader` to the peer as `header.name`; the peer checks the
    /// SHA-256 and answers with its verdict.
    pub async fn upload<R: AsyncRead + Unpin, Resp: DeserializeOwned>(
        &self,
        header: &FileHeader,
        mut reader: R,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        self.require("files")?;
        let header_json = serde_json::to_string(header).map_err(|e| self.protocol(e.to_string()))?;
        let exchange = async {
            let mut send = self.send.clone().ready().await.map_err(|_| self.gone())?;
            let req = Request::builder()
                .method(Method::POST)
                .uri(UPLOAD_PATH)
                .header(FILE_HEADER, header_json)
                .body(())
                .map_err(|e| self.protocol(e.to_string()))?;
            let (response, mut stream) = send.send_request(req, false).map_err(|_| self.gone())?;
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    let _ = stream.send_data(Bytes::new(), true);
                    break;
                }
                if send_all(&mut stream, Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    // The peer refused the upload early, or is gone: its answer says which.
                    break;
                }
            }
            self.read_response("upload", response).await
        };
        self.bounded("upload", timeout, exchange).await
    }

    async fn read_response<Resp: DeserializeOwned>(
        &self,
        method: &str,
        response: client::ResponseFuture,
    ) -> Result<Resp, RpcError> {
        let response = response.await.map_err(|_| self.gone())?;
        let status = response.status();
        let value = read_json_body(&mut response.into_body(), MAX_JSON_BODY)
            .await
            .map_err(|e| self.protocol(format!("reply to {method}: {e}")))?;
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(|m| m.as_str())
                .unwrap_or("no detail")
                .to_string();
            return Err(RpcError::Remote {
                peer: self.peer.clone(),
                method: method.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_value(value).map_err(|e| self.protocol(format!("reply to {method}: {e}")))
    }

    async fn bounded<T>(
        &self,
        method: &str,
        timeout: Duration,
        fut: impl Future<Output = Result<T, RpcError>>,
    ) -> Result<T, RpcError> {
        tokio::select! {
            r = tokio::time::timeout(timeout, fut) => r.unwrap_or_else(|_| Err(RpcError::Timeout {
                peer: self.peer.clone(), method: method.to_string(), secs: timeout.as_secs(),
            })),
            _ = self.closed.cancelled() => Err(self.gone()),
        }
    }

    fn gone(&self) -> RpcError {
        if self.closed.is_cancelled() {
            RpcError::PeerDead {
                peer: self.peer.clone(),
            }
        } else {
            RpcError::Closed {
                peer: self.peer.clone(),
            }
        }
    }

    fn protocol(&self, detail: String) -> RpcError {
        RpcError::Protocol {
            peer: self.peer.clone(),
            detail,
        }
    }
}

/// Sends `data` on an HTTP/2 stream, waiting for flow-control capacity as needed.
async fn send_all(stream: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(c) => c?,
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        stream.send_data(chunk, false)?;
    }
    Ok(())
}
