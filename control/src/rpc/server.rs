//! The server side of the control RPC: the [`Router`] (methods by name, the upload handler, the
//! policy), one accepted connection's HTTP/2 limits and refusals, and the bounded reading of
//! request bodies.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::{server, RecvStream};
use http::{Method, Request, Response, StatusCode};
use migtun_proxy::agent::{ControlHandler, ControlStream};
use migtun_proxy::metrics::Metrics;
use migtun_proxy::tls::identity::PeerIdentity;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::body::{drain, read_json_body, BodyError};
use super::liveness::{keepalive, Activity, PingWatch};
use super::{
    BoxFuture, FileHeader, Hello, MethodError, Policy, Session, CALL_PREFIX, CONNECTION_WINDOW, DRAIN_LIMIT, DRAIN_TIMEOUT,
    FILE_HEADER, HELLO_PATH, IDLE_TIMEOUT, MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE, MAX_JSON_REQUEST,
    MAX_REFUSED_STREAMS, MAX_REQUESTS_PER_CONNECTION, PROTOCOL_VERSION, STREAM_WINDOW, UPLOAD_PATH,
};

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
