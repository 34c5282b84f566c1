//! The client side of the control RPC: [`RpcClient`], one control connection to one peer (the
//! hello, calls by name with deadlines, side-channel uploads).

use std::future::{poll_fn, Future};
use std::time::Duration;

use bytes::Bytes;
use h2::{client, SendStream};
use http::{Method, Request};
use migtun_proxy::agent::ControlStream;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::liveness::keepalive;
use super::body::read_json_body;
use super::{
    FileHeader, Hello, RpcError, CALL_PREFIX, CALL_TIMEOUT, CONNECTION_WINDOW, FILE_HEADER, HELLO_PATH, MAX_JSON_BODY,
    PROTOCOL_VERSION, STREAM_WINDOW, UPLOAD_CHUNK, UPLOAD_PATH,
};

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
