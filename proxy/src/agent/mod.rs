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
//!
//! A running agent can be reloaded ([`AgentHandle::reload`], in [`reload`]), and a new
//! agent can take over the port of one that drains: the TCP port and the metrics listener are
//! bound with `SO_REUSEPORT`, the UDP (QUIC) port only once the old agent has let it go
//! (docs/DESIGN.md, "Restart hand-over").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, Transport};
use crate::io::endpoint::{Endpoint, LocalListener};
use crate::metrics::Metrics;
use crate::peer::ConnectError;
use crate::peer::TlsConnector;
use crate::route::expose::ExposeContext;
use crate::route::forward::ForwardContext;
use crate::route::{ExposeRoute, RouteError, RouteTable};
use crate::tls::context::{TlsContext, TlsSetupError};
use crate::tls::{ALPN_CONTROL, ALPN_DATA};

mod handle;
pub mod ops;
pub mod preflight;
pub mod reload;
mod shared;

pub use handle::{AgentHandle, DynamicForward, ExposeGuard, ForwardGuard};
pub(crate) use shared::{connector, quic_client_config, Running, Shared, StaticForward};

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

pub use crate::route::expose::{ControlHandler, ControlIo, ControlStream};

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
    /// Binds the port, the forward listeners and the metrics endpoint, as `migtun serve` does:
    /// the TCP port with `SO_REUSEPORT`, so that it starts while an agent of the previous run
    /// drains there, and the UDP port as soon as that agent has let it go (see
    /// [`Agent::with_port`] for what happens when UDP is taken by anything else).
    pub async fn bind(config: Config) -> Result<Agent, AgentError> {
        let port = crate::io::socket::listen_reuseport(config.listen)
            .map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let addr = port.local_addr().map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let quic = match crate::quic::endpoint::bind_udp(addr).and_then(crate::quic::endpoint::bind) {
            Ok(endpoint) => Some((endpoint, None)),
            // Taken: by the agent this one replaces, while it drains (preflight refuses a port
            // held by another user's process). Outgoing QUIC runs on a temporary socket until
            // the port is free.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let temporary = SocketAddr::new(addr.ip(), 0);
                let endpoint = crate::quic::endpoint::bind_udp(temporary)
                    .and_then(crate::quic::endpoint::bind)
                    .map_err(|source| AgentError::Listen { addr: temporary, source })?;
                warn!(udp = %addr, "UDP port held by another process (an agent draining?): QUIC is served once it is free; \
                    peers with transport \"auto\" use TLS meanwhile");
                Some((endpoint, Some(addr)))
            }
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

    /// Like [`Agent::bind`] with the TCP port already bound (tests bind port 0 first and tell
    /// each agent the other's address). The QUIC endpoint is bound on UDP at the same address.
    ///
    /// If that UDP port cannot be bound, the agent refuses to start when a peer uses QUIC
    /// (`transport = "quic"` or `"auto"`); otherwise it logs a warning and serves TLS only.
    pub async fn with_port(config: Config, port: TcpListener) -> Result<Agent, AgentError> {
        let addr = port.local_addr().map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let quic = match crate::quic::endpoint::bind_udp(addr).and_then(crate::quic::endpoint::bind) {
            Ok(endpoint) => Some(endpoint),
            Err(source) => {
                if let Some(peer) = config.peers.iter().position(|p| p.transport != Transport::Tls) {
                    return Err(AgentError::ListenUdp { addr, peer, source });
                }
                warn!(udp = %addr, error = %source, "cannot listen on UDP: QUIC is not served, only TLS over TCP");
                None
            }
        };
        Agent::with_sockets(config, port, quic.map(|e| (e, None))).await
    }

    /// `quic`: the endpoint, and the port's UDP address if the endpoint still waits for it.
    async fn with_sockets(
        config: Config,
        port: TcpListener,
        quic: Option<(quinn::Endpoint, Option<SocketAddr>)>,
    ) -> Result<Agent, AgentError> {
        let (quic, udp_wait) = match quic {
            Some((e, wait)) => (Some(e), wait),
            None => (None, None),
        };
        let metrics = Arc::new(Metrics::new());
        let draining = CancellationToken::new();
        let abort = CancellationToken::new();
        let tls = TlsContext::new(&config.tls)?;
        let data_connector: TlsConnector = tls.client_config(&[ALPN_DATA])?;
        let control_connector: TlsConnector = tls.client_config(&[ALPN_CONTROL])?;
        let ca_chain = config.tls.cert_chain.iter().skip(1).chain(&config.tls.ca_certs);
        metrics.certificates_expire(
            config.tls.cert_chain.first().and_then(crate::tls::identity::not_after),
            ca_chain.filter_map(crate::tls::identity::not_after).min(),
        );

        let quic_client = match &quic {
            Some(_) if config.peers.iter().any(|p| p.transport != Transport::Tls) => Some(quic_client_config(&tls)?),
            _ => None,
        };
        let mut peers = HashMap::new();
        for p in &config.peers {
            let c = connector(p, &data_connector, quic.as_ref(), quic_client.as_ref(), &metrics, &draining)?;
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
            let listener = LocalListener::bind_owned(&f.listen, f.mode, f.owner)
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
            // SO_REUSEPORT like the port: a new agent binds while the old one drains.
            Some(addr) => Some(crate::io::socket::listen_reuseport(addr).map_err(|source| AgentError::Metrics { addr, source })?),
            None => None,
        };

        let shared = Shared {
            name: config.name.clone(),
            metrics,
            routes,
            peers: std::sync::RwLock::new(peers),
            data_connector,
            quic_client: std::sync::Mutex::new(quic_client),
            expose: std::sync::OnceLock::new(),
            control_connector,
            tls,
            quic,
            udp_wait,
            tracker: TaskTracker::new(),
            draining,
            abort,
            drain_timeout: std::sync::Mutex::new(config.drain_timeout),
            running: tokio::sync::Mutex::new(None),
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
            tokio::spawn(crate::agent::ops::serve(l, shared.metrics.clone(), stop_metrics.clone()));
        }
        tokio::spawn(crate::io::buffers::sweep(stop_metrics.clone()));
        let expose_ctx = Arc::new(ExposeContext::new(
            shared.metrics.clone(),
            shared.routes.clone(),
            shared.draining.clone(),
            shared.abort.clone(),
            self.control,
            self.config.peers.iter().map(|p| p.name.clone()).collect(),
            shared.tls.clone(),
        ));
        let _ = shared.expose.set(expose_ctx.clone());
        if let Some(endpoint) = &shared.quic {
            let server = crate::quic::tuning::server_config(&shared.tls, &[ALPN_DATA])?;
            match shared.udp_wait {
                None => endpoint.set_server_config(Some(server)),
                Some(addr) => {
                    tokio::spawn(take_udp_port(endpoint.clone(), addr, server, shared.draining.clone()));
                }
            }
            tracker.spawn(crate::port::quic::serve(endpoint.clone(), expose_ctx.clone(), tracker.clone()));
        }
        let listen = self.port.local_addr().unwrap_or(self.config.listen);
        tracker.spawn(crate::port::serve(self.port, acceptor, expose_ctx, tracker.clone()));
        let mut forwards = Vec::new();
        for ((listener, ctx), spec) in self.forwards.into_iter().zip(&self.config.forwards) {
            let endpoint = listener.endpoint().unwrap_or_else(|_| spec.listen.clone());
            forwards.push(StaticForward { spec: spec.clone(), guard: ForwardGuard::spawn(&shared, listener, ctx, endpoint) });
        }
        info!(name = %self.config.name, listen = %self.config.listen, quic = shared.quic.is_some(), "agent serving");
        *shared.running.lock().await = Some(Running { config: self.config, forwards });
        shared.metrics.health.serving(listen);
        // Every listener was bound before `run` (the admin socket too, by `serve`): systemd may
        // start what depends on this agent, unless start-up work is left (`starting`).
        match shared.metrics.health.still_starting() {
            None => crate::notify::ready(&format!("serving on {listen}")),
            Some(what) => {
                info!(%what, "serving; not ready yet");
                crate::notify::status(&format!("serving on {listen}; starting: {what}"));
            }
        }

        shutdown.cancelled().await;
        // A reload in progress finishes first; none starts after this.
        let running = shared.running.lock().await.take();
        let deadline = *shared.drain_timeout.lock().unwrap_or_else(|p| p.into_inner());
        info!(deadline_secs = deadline.as_secs(), "draining: no new streams; waiting for open ones");
        shared.draining.cancel();
        shared.metrics.health.draining();
        crate::notify::stopping(&format!("draining (up to {} s)", deadline.as_secs()));
        for p in shared.peer_map().values() {
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
            endpoint.close(crate::quic::tuning::codes::SHUTDOWN, b"agent stopped");
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        stop_metrics.cancel();
        drop(running);
        info!("agent stopped");
        Ok(())
    }
}

/// How often a new agent tries to take the UDP port from the agent draining there. Its QUIC
/// peers wait at most this long beyond the old agent's exit; binding is cheap.
const UDP_RETRY: std::time::Duration = std::time::Duration::from_millis(200);
/// How often the wait for the UDP port is logged.
const UDP_WAIT_LOG: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds the port's UDP address once nobody holds it, moves the QUIC endpoint onto it and
/// starts serving QUIC there. Until then the old agent keeps its QUIC connections: with
/// `SO_REUSEPORT` on UDP the kernel would hash their packets to either agent's socket, and the
/// new agent, knowing none of those connections, would reset them.
async fn take_udp_port(endpoint: quinn::Endpoint, addr: SocketAddr, server: quinn::ServerConfig, draining: CancellationToken) {
    let started = tokio::time::Instant::now();
    let mut logged = started;
    loop {
        match crate::quic::endpoint::bind_udp(addr) {
            Ok(socket) => match endpoint.rebind(socket) {
                Ok(()) => {
                    endpoint.set_server_config(Some(server));
                    info!(udp = %addr, waited_ms = started.elapsed().as_millis() as u64, "UDP port taken over: QUIC served");
                    return;
                }
                Err(e) => warn!(udp = %addr, error = %e, "cannot move the QUIC endpoint onto the UDP port; retrying"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => warn!(udp = %addr, error = %e, "cannot bind the UDP port; retrying"),
        }
        if logged.elapsed() >= UDP_WAIT_LOG {
            logged = tokio::time::Instant::now();
            info!(udp = %addr, waited_secs = started.elapsed().as_secs(), "still waiting for the UDP port (QUIC not served yet)");
        }
        tokio::select! {
            _ = tokio::time::sleep(UDP_RETRY) => {}
            _ = draining.cancelled() => return,
        }
    }
}
