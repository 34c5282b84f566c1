//! The agent-to-agent control RPC: HTTP/2 over the port's mutually authenticated TLS (ALPN `h2`).
//!
//! Small on purpose: JSON calls by method name (`POST /migtun/v1/call/METHOD`), one streamed
//! upload for the side channel (`POST /migtun/v1/upload`, the file's header in
//! `x-migtun-file`), and a hello exchange first (`POST /migtun/v1/hello`) in which each side
//! states its protocol version and capabilities, so that two versions of migtun can tell what the
//! other supports. Both sides ping every [`KEEPALIVE_INTERVAL`]; a peer that does not answer
//! within [`KEEPALIVE_TIMEOUT`] is declared dead, which the destination uses to abandon a
//! migration whose source vanished and the source uses to stop waiting.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{client, server, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use migtun_proxy::agent::{ControlHandler, ControlStream};
use migtun_proxy::tls::PeerIdentity;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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
/// Largest JSON request or reply body.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Flow-control windows: large enough that a side-channel upload is not bound by round trips.
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
}

impl MethodError {
    /// The request was wrong (bad arguments, unknown migration): 400.
    pub fn bad_request(message: impl Into<String>) -> MethodError {
        MethodError {
            status: 400,
            message: message.into(),
        }
    }

    /// The caller may not do this: 403.
    pub fn forbidden(message: impl Into<String>) -> MethodError {
        MethodError {
            status: 403,
            message: message.into(),
        }
    }

    /// It failed on this side: 500.
    pub fn failed(message: impl Into<String>) -> MethodError {
        MethodError {
            status: 500,
            message: message.into(),
        }
    }
}

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

/// The server side: methods by name, an optional upload handler.
#[derive(Clone, Default)]
pub struct Router {
    name: String,
    methods: HashMap<String, MethodFn>,
    upload: Option<UploadFn>,
}

impl Router {
    /// `name` is this agent's host name, told to peers in the hello.
    pub fn new(name: &str) -> Router {
        Router {
            name: name.to_string(),
            ..Router::default()
        }
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

    /// Serves one control connection until it closes or the peer stops answering.
    pub async fn serve(self: Arc<Self>, io: ControlStream, peer: PeerIdentity) {
        let mut conn = match server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(io)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(peer = peer.name(), error = %e, "control connection: HTTP/2 handshake failed");
                return;
            }
        };
        let session = Session {
            peer: peer.clone(),
            closed: CancellationToken::new(),
        };
        if let Some(pp) = conn.ping_pong() {
            tokio::spawn(keepalive(pp, session.closed.clone(), peer.name().to_string()));
        }
        loop {
            let next = tokio::select! {
                r = conn.accept() => r,
                _ = session.closed.cancelled() => break,
            };
            match next {
                Some(Ok((req, respond))) => {
                    let router = self.clone();
                    let session = session.clone();
                    tokio::spawn(async move { router.handle(session, req, respond).await });
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

    async fn handle(&self, session: Session, req: Request<RecvStream>, mut respond: server::SendResponse<Bytes>) {
        let path = req.uri().path().to_string();
        if path == UPLOAD_PATH && req.method() == Method::POST {
            let result = self.handle_upload(session, req).await;
            return respond_json(&mut respond, result);
        }
        // Read the whole request before answering, whatever the answer: a server that answers
        // early resets the rest of the request stream, and the client would see a reset instead
        // of the answer.
        let is_post = req.method() == Method::POST;
        let args = read_json_body(req.into_body()).await;
        let result = if !is_post {
            Err(MethodError {
                status: 405,
                message: "only POST".into(),
            })
        } else if path == HELLO_PATH {
            Ok(serde_json::to_value(self.hello()).unwrap_or_default())
        } else if let Some(method) = path.strip_prefix(CALL_PREFIX) {
            match (self.methods.get(method).cloned(), args) {
                (None, _) => Err(MethodError {
                    status: 404,
                    message: format!("unknown method {method:?}"),
                }),
                (Some(_), Err(e)) => Err(MethodError::bad_request(e)),
                (Some(f), Ok(args)) => f(session, args).await,
            }
        } else {
            Err(MethodError {
                status: 404,
                message: format!("no such path {path:?}"),
            })
        };
        respond_json(&mut respond, result);
    }
    async fn handle_upload(
        &self,
        session: Session,
        req: Request<RecvStream>,
    ) -> Result<serde_json::Value, MethodError> {
        let Some(f) = self.upload.clone() else {
            return Err(MethodError {
                status: 404,
                message: "this agent does not accept files".into(),
            });
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

async fn read_json_body(mut body: RecvStream) -> Result<serde_json::Value, String> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("reading the request: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > MAX_JSON_BODY {
            return Err(format!("request larger than {MAX_JSON_BODY} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&buf).map_err(|e| format!("request is not JSON: {e}"))
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
        let value = read_json_body(response.into_body())
            .await
            .map_err(|e| self.protocol(e))?;
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
