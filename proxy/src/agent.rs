//! The host agent: binds everything a [`Config`] names, runs it, and drains it on shutdown.
//!
//! Start-up binds every socket before serving anything, so a taken port or a live socket file
//! is reported at once with the config key it belongs to. Shutdown is explicit: stop accepting
//! (listener sockets are removed), let open streams finish until `drain_timeout`, then cut them.
//!
//! An [`AgentHandle`] is what the control plane holds: it adds and removes dynamic routes for
//! one migration (scoped to one peer and one migration id) and opens control connections to
//! peers. The data plane never depends on the control plane; the control plane registers a
//! [`ControlHandler`] for the control connections the port accepts.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, Transport};
use crate::connect::{ConnectError, PeerConnector, QuicClient};
use crate::endpoint::{Endpoint, LocalListener};
use crate::expose::ExposeContext;
use crate::forward::ForwardContext;
use crate::metrics::Metrics;
use crate::routes::{ExposeRoute, RouteError, RouteTable};
use crate::connect::TlsConnector;
use crate::tls::{PeerIdentity, TlsContext, TlsSetupError, ALPN_CONTROL, ALPN_DATA};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    #[error("`listen`: cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("`listen`: cannot listen on UDP {addr} for QUIC, which `peer[{peer}].transport` asks for: {source}")]
    ListenUdp { addr: SocketAddr, peer: usize, source: std::io::Error },
    #[error("`forward[{index}].listen`: cannot listen on {endpoint}: {source}")]
    Forward { index: usize, endpoint: Endpoint, source: std::io::Error },
    #[error("dynamic forward for route {route:?}: cannot listen on {endpoint}: {source}")]
    DynamicForward { route: String, endpoint: Endpoint, source: std::io::Error },
    #[error("`metrics`: cannot listen on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: std::io::Error },
    #[error("`peer`: {name:?} is not a valid DNS name")]
    PeerName { name: String },
    #[error("unknown peer {name:?}")]
    UnknownPeer { name: String },
    #[error("`expose`: {0}")]
    Route(#[from] RouteError),
    #[error("control connection to {peer}: {source}")]
    Control { peer: String, source: ConnectError },
    #[error("agent is shutting down")]
    Draining,
}

/// A byte stream carrying the control protocol, whatever transport is under it.
pub trait ControlIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ControlIo for T {}
pub type ControlStream = Box<dyn ControlIo>;

/// Serves one accepted control connection from an authenticated peer.
pub type ControlHandler =
    Arc<dyn Fn(ControlStream, PeerIdentity) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What the running agent shares with its tasks and with the control plane.
struct Shared {
    name: String,
    metrics: Arc<Metrics>,
    routes: Arc<RouteTable>,
    peers: HashMap<String, Arc<PeerConnector>>,
    control_connector: TlsConnector,
    /// Verifiers and identity every rustls configuration is made from (one value, so that a
    /// reload can replace it).
    tls: Arc<TlsContext>,
    /// The QUIC endpoint on the port number, when UDP could be bound.
    quic: Option<quinn::Endpoint>,
    tracker: TaskTracker,
    draining: CancellationToken,
    abort: CancellationToken,
}

/// A cheap, cloneable handle on a bound or running agent.
#[derive(Clone)]
pub struct AgentHandle {
    shared: Arc<Shared>,
}

/// A dynamic forward: a local listener whose connections go to `route` on `peer`, naming
/// `migration` in their preamble.
#[derive(Clone, Debug)]
pub struct DynamicForward {
    pub listen: Endpoint,
    pub mode: u32,
    pub peer: String,
    pub route: String,
    pub migration: Option<String>,
}

/// Keeps a dynamic forward listening. Dropping it stops accepting (open streams continue);
/// [`ForwardGuard::close`] also waits until the listener is gone and its socket file removed.
pub struct ForwardGuard {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    endpoint: Endpoint,
    /// Cuts this forward's open streams (a child of the agent's drain abort).
    abort: CancellationToken,
}

impl ForwardGuard {
    /// Where the forward listens (with the real port for `tcp:...:0`).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A token that, cancelled, cuts the forward's open streams at once: their local ends are
    /// closed, so that the local side (QEMU) learns at once that the peer is gone instead of
    /// when TCP gives up on it.
    pub fn stream_abort(&self) -> CancellationToken {
        self.abort.clone()
    }

    pub async fn close(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps a dynamic route exposed; dropping it removes the route (open streams continue).
pub struct ExposeGuard {
    routes: Arc<RouteTable>,
    name: String,
}

impl ExposeGuard {
    pub fn route(&self) -> &str {
        &self.name
    }
}

impl Drop for ExposeGuard {
    fn drop(&mut self) {
        self.routes.remove(&self.name);
    }
}

impl AgentHandle {
    /// This host's name (a DNS SAN of its certificate).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.shared.routes.clone()
    }

    /// Configured peers, by name.
    pub fn peer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.peers.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.is_cancelled()
    }

    /// The agent's QUIC endpoint (UDP, same port number as `listen`), if it has one. Tests use it
    /// to rebind the agent to another UDP socket (connection migration).
    pub fn quic_endpoint(&self) -> Option<quinn::Endpoint> {
        self.shared.quic.clone()
    }

    /// The transport new streams to `peer` take now: `tls` or `quic` (for `auto`, whichever it
    /// currently uses). `None` for an unknown peer.
    pub fn peer_transport(&self, peer: &str) -> Option<&'static str> {
        self.shared.peers.get(peer).map(|p| match p.choice() {
            crate::transport::Choice::Quic => "quic",
            crate::transport::Choice::Tls => "tls",
        })
    }

    /// Starts a dynamic forward; it stops when the guard is dropped or the agent drains.
    pub async fn add_forward(&self, spec: DynamicForward) -> Result<ForwardGuard, AgentError> {
        if self.is_draining() {
            return Err(AgentError::Draining);
        }
        let peer = self
            .shared
            .peers
            .get(&spec.peer)
            .cloned()
            .ok_or_else(|| AgentError::UnknownPeer { name: spec.peer.clone() })?;
        for name in std::iter::once(&spec.route).chain(spec.migration.as_ref()) {
            crate::wire::validate_name(name)
                .map_err(|why| AgentError::Route(RouteError::BadName { name: name.clone(), why }))?;
        }
        let listener = LocalListener::bind(&spec.listen, spec.mode).await.map_err(|source| {
            AgentError::DynamicForward { route: spec.route.clone(), endpoint: spec.listen.clone(), source }
        })?;
        let endpoint = listener.endpoint().unwrap_or_else(|_| spec.listen.clone());
        let abort = self.shared.abort.child_token();
        let ctx = Arc::new(ForwardContext {
            metrics: self.shared.metrics.clone(),
            peer,
            route: spec.route,
            migration: spec.migration,
            abort: abort.clone(),
        });
        let stop = self.shared.draining.child_token();
        let task = self.shared.tracker.spawn(crate::forward::serve(listener, ctx, stop.clone(), self.shared.tracker.clone()));
        Ok(ForwardGuard { stop, task: Some(task), endpoint, abort })
    }

    /// Exposes a dynamic route until the guard is dropped.
    pub fn add_expose(&self, route: ExposeRoute) -> Result<ExposeGuard, AgentError> {
        if self.is_draining() {
            return Err(AgentError::Draining);
        }
        let name = route.name.clone();
        self.shared.routes.add(route)?;
        Ok(ExposeGuard { routes: self.shared.routes.clone(), name })
    }

    /// Opens a control connection (ALPN `h2`) to a configured peer.
    pub async fn connect_control(&self, peer: &str) -> Result<ControlStream, AgentError> {
        let p = self.shared.peers.get(peer).ok_or_else(|| AgentError::UnknownPeer { name: peer.to_string() })?;
        p.connect_with(&self.shared.control_connector)
            .await
            .map(|s| Box::new(s) as ControlStream)
            .map_err(|e| AgentError::Control { peer: peer.to_string(), source: e })
    }
}

/// A bound, not yet running agent.
pub struct Agent {
    config: Config,
    handle: AgentHandle,
    port: TcpListener,
    forwards: Vec<(LocalListener, Arc<ForwardContext>)>,
    metrics_listener: Option<TcpListener>,
    control: Option<ControlHandler>,
}

impl Agent {
    /// Binds the port, the forward listeners and the metrics endpoint.
    pub async fn bind(config: Config) -> Result<Agent, AgentError> {
        let port = TcpListener::bind(config.listen)
            .await
            .map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        Agent::with_port(config, port).await
    }

    /// Like [`Agent::bind`] with the TCP port already bound (tests bind port 0 first and tell
    /// each agent the other's address). The QUIC endpoint is bound on UDP at the same address.
    ///
    /// If that UDP port cannot be bound, the agent refuses to start when a peer uses QUIC
    /// (`transport = "quic"` or `"auto"`); otherwise it logs a warning and serves TLS only.
    pub async fn with_port(config: Config, port: TcpListener) -> Result<Agent, AgentError> {
        let addr = port.local_addr().map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let quic = match crate::quic::bind_udp(addr).and_then(crate::quic::endpoint) {
            Ok(endpoint) => Some(endpoint),
            Err(source) => {
                if let Some(peer) = config.peers.iter().position(|p| p.transport != Transport::Tls) {
                    return Err(AgentError::ListenUdp { addr, peer, source });
                }
                warn!(udp = %addr, error = %source, "cannot listen on UDP: QUIC is not served, only TLS over TCP");
                None
            }
        };
        Agent::with_sockets(config, port, quic).await
    }

    async fn with_sockets(config: Config, port: TcpListener, quic: Option<quinn::Endpoint>) -> Result<Agent, AgentError> {
        let metrics = Arc::new(Metrics::new());
        let draining = CancellationToken::new();
        let abort = CancellationToken::new();
        let tls = TlsContext::new(&config.tls)?;
        let data_connector: TlsConnector = tls.client_config(&[ALPN_DATA])?;
        let control_connector: TlsConnector = tls.client_config(&[ALPN_CONTROL])?;
        let ca_chain = config.tls.cert_chain.iter().skip(1).chain(&config.tls.ca_certs);
        metrics.certificates_expire(
            config.tls.cert_chain.first().and_then(crate::identity::not_after),
            ca_chain.filter_map(crate::identity::not_after).min(),
        );

        let quic_client = match &quic {
            Some(_) if config.peers.iter().any(|p| p.transport != Transport::Tls) => {
                let side = tls.client_config(&[ALPN_DATA])?;
                Some((crate::quic::client_config(&side)?, side))
            }
            _ => None,
        };
        let mut peers = HashMap::new();
        for p in &config.peers {
            let quic = match (&quic, &quic_client, p.transport) {
                (Some(e), Some((c, side)), Transport::Quic | Transport::Auto) => {
                    Some(QuicClient::new(e.clone(), c.clone(), side.clone()))
                }
                _ => None,
            };
            let c = PeerConnector::with_transport(
                &p.name,
                &p.address,
                data_connector.clone(),
                p.transport,
                quic,
                metrics.clone(),
                draining.clone(),
            )
            .map_err(|_| AgentError::PeerName { name: p.name.clone() })?;
            peers.insert(p.name.clone(), c);
        }

        let routes = Arc::new(RouteTable::new(config.exposes.iter().map(|e| ExposeRoute {
            name: e.route.clone(),
            target: e.target.clone(),
            allow: e.allow.clone(),
            migration: None,
            received: None,
        }))?);

        let mut forwards = Vec::new();
        for (index, f) in config.forwards.iter().enumerate() {
            let listener = LocalListener::bind(&f.listen, f.mode)
                .await
                .map_err(|source| AgentError::Forward { index, endpoint: f.listen.clone(), source })?;
            // Config validation guarantees the peer exists.
            let peer = peers.get(&f.peer).cloned().ok_or_else(|| AgentError::UnknownPeer { name: f.peer.clone() })?;
            let ctx = ForwardContext {
                metrics: metrics.clone(),
                peer,
                route: f.route.clone(),
                migration: None,
                abort: abort.clone(),
            };
            forwards.push((listener, Arc::new(ctx)));
        }

        let metrics_listener = match config.metrics {
            Some(addr) => Some(
                crate::metrics::bind(addr)
                    .await
                    .map_err(|source| AgentError::Metrics { addr, source })?,
            ),
            None => None,
        };

        let shared = Shared {
            name: config.name.clone(),
            metrics,
            routes,
            peers,
            control_connector,
            tls,
            quic,
            tracker: TaskTracker::new(),
            draining,
            abort,
        };
        let handle = AgentHandle { shared: Arc::new(shared) };
        Ok(Agent { config, handle, port, forwards, metrics_listener, control: None })
    }

    /// The handle the control plane keeps.
    pub fn handle(&self) -> AgentHandle {
        self.handle.clone()
    }

    /// Accepts control connections (ALPN `h2`) and hands them to `handler`. Without a handler the
    /// port offers only data streams.
    pub fn set_control_handler(&mut self, handler: ControlHandler) {
        self.control = Some(handler);
    }

    /// The port's address (with the real port number if the config said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.port.local_addr().unwrap_or(self.config.listen)
    }

    /// The metrics endpoint's address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.handle.metrics()
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.handle.routes()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until `shutdown` is cancelled, then drains: stop accepting, wait for open streams
    /// up to the configured drain timeout, close what is left.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let shared = self.handle.shared.clone();
        let tracker = shared.tracker.clone();
        let alpn: &[&[u8]] = if self.control.is_some() { &[ALPN_DATA, ALPN_CONTROL] } else { &[ALPN_DATA] };
        let acceptor = shared.tls.server_config(alpn)?;
        let stop_metrics = CancellationToken::new();
        if let Some(l) = self.metrics_listener {
            tokio::spawn(crate::metrics::serve(l, shared.metrics.clone(), stop_metrics.clone()));
        }
        tokio::spawn(crate::buffers::sweep(stop_metrics.clone()));
        let expose_ctx = Arc::new(ExposeContext::new(
            shared.metrics.clone(),
            shared.routes.clone(),
            shared.draining.clone(),
            shared.abort.clone(),
            self.control,
            self.config.peers.iter().map(|p| p.name.clone()).collect(),
            shared.tls.clone(),
        ));
        if let Some(endpoint) = &shared.quic {
            endpoint.set_server_config(Some(crate::quic::server_config(&shared.tls, &[ALPN_DATA])?));
            tracker.spawn(crate::quic::serve(endpoint.clone(), expose_ctx.clone(), tracker.clone()));
        }
        let listen = self.port.local_addr().unwrap_or(self.config.listen);
        tracker.spawn(crate::port::serve(self.port, acceptor, expose_ctx, tracker.clone()));
        for (listener, ctx) in self.forwards {
            tracker.spawn(crate::forward::serve(listener, ctx, shared.draining.clone(), tracker.clone()));
        }
        info!(name = %self.config.name, listen = %self.config.listen, quic = shared.quic.is_some(), "agent serving");
        shared.metrics.health.serving(listen);
        // Every listener was bound before `run` (the admin socket too, by `serve`): systemd may
        // start what depends on this agent.
        crate::notify::ready(&format!("serving on {listen}"));

        shutdown.cancelled().await;
        let deadline = self.config.drain_timeout;
        info!(deadline_secs = deadline.as_secs(), "draining: no new streams; waiting for open ones");
        shared.draining.cancel();
        shared.metrics.health.draining();
        crate::notify::stopping(&format!("draining (up to {} s)", deadline.as_secs()));
        for p in shared.peers.values() {
            p.clear();
        }
        tracker.close();
        if tokio::time::timeout(deadline, tracker.wait()).await.is_err() {
            warn!(streams = tracker.len(), "drain deadline passed; closing the streams still open");
            shared.abort.cancel();
            tracker.wait().await;
        }
        if let Some(endpoint) = &shared.quic {
            // Tell peers at once (their streams to us are done or cut), then give the close
            // frames a moment to leave.
            endpoint.close(crate::quic::codes::SHUTDOWN, b"agent stopped");
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        stop_metrics.cancel();
        info!("agent stopped");
        Ok(())
    }
}
