//! The host agent: binds everything a [`Config`] names, runs it, and drains it on shutdown.
//!
//! Start-up binds every socket before serving anything, so a taken port or a live socket file
//! is reported at once with the config key it belongs to. Shutdown is explicit: stop accepting
//! (listener sockets are removed), let open streams finish until `drain_timeout`, then cut them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::connect::PeerConnector;
use crate::endpoint::{Endpoint, LocalListener};
use crate::expose::ExposeContext;
use crate::forward::ForwardContext;
use crate::metrics::Metrics;
use crate::routes::{ExposeRoute, RouteError, RouteTable};
use crate::tls::{self, TlsSetupError, ALPN_DATA};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    #[error("`listen`: cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("`forward[{index}].listen`: cannot listen on {endpoint}: {source}")]
    Forward { index: usize, endpoint: Endpoint, source: std::io::Error },
    #[error("`metrics`: cannot listen on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: std::io::Error },
    #[error("`peer`: {name:?} is not a valid DNS name")]
    PeerName { name: String },
    #[error("`expose`: {0}")]
    Route(#[from] RouteError),
}

/// A bound, not yet running agent.
pub struct Agent {
    config: Config,
    metrics: Arc<Metrics>,
    routes: Arc<RouteTable>,
    peers: HashMap<String, Arc<PeerConnector>>,
    port: TcpListener,
    acceptor: TlsAcceptor,
    forwards: Vec<(LocalListener, Arc<ForwardContext>)>,
    metrics_listener: Option<TcpListener>,
    draining: CancellationToken,
    abort: CancellationToken,
}

impl Agent {
    /// Binds the port, the forward listeners and the metrics endpoint.
    pub async fn bind(config: Config) -> Result<Agent, AgentError> {
        let port = TcpListener::bind(config.listen)
            .await
            .map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        Agent::with_port(config, port).await
    }

    /// Like [`Agent::bind`] with the port already bound (tests bind port 0 first and tell each
    /// agent the other's address).
    pub async fn with_port(config: Config, port: TcpListener) -> Result<Agent, AgentError> {
        let metrics = Arc::new(Metrics::new());
        let draining = CancellationToken::new();
        let abort = CancellationToken::new();
        let acceptor = TlsAcceptor::from(tls::server_config(&config.tls, &[ALPN_DATA])?);
        let connector = TlsConnector::from(tls::client_config(&config.tls, &[ALPN_DATA])?);

        let mut peers = HashMap::new();
        for p in &config.peers {
            let c = PeerConnector::new(&p.name, &p.address, connector.clone(), metrics.clone(), draining.clone())
                .map_err(|_| AgentError::PeerName { name: p.name.clone() })?;
            peers.insert(p.name.clone(), c);
        }

        let routes = Arc::new(RouteTable::new(config.exposes.iter().map(|e| ExposeRoute {
            name: e.route.clone(),
            target: e.target.clone(),
            allow: e.allow.clone(),
            migration: None,
        }))?);

        let mut forwards = Vec::new();
        for (index, f) in config.forwards.iter().enumerate() {
            let listener = LocalListener::bind(&f.listen, f.mode)
                .await
                .map_err(|source| AgentError::Forward { index, endpoint: f.listen.clone(), source })?;
            // Config validation guarantees the peer exists.
            let Some(peer) = peers.get(&f.peer).cloned() else {
                return Err(AgentError::PeerName { name: f.peer.clone() });
            };
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

        Ok(Agent { config, metrics, routes, peers, port, acceptor, forwards, metrics_listener, draining, abort })
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
        self.metrics.clone()
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes.clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until `shutdown` is cancelled, then drains: stop accepting, wait for open streams
    /// up to the configured drain timeout, close what is left.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let stop_metrics = CancellationToken::new();
        if let Some(l) = self.metrics_listener {
            tokio::spawn(crate::metrics::serve(l, self.metrics.clone(), stop_metrics.clone()));
        }
        let expose_ctx = Arc::new(ExposeContext {
            metrics: self.metrics.clone(),
            routes: self.routes.clone(),
            draining: self.draining.clone(),
            abort: self.abort.clone(),
        });
        tracker.spawn(crate::port::serve(self.port, self.acceptor, expose_ctx, tracker.clone()));
        for (listener, ctx) in self.forwards {
            tracker.spawn(crate::forward::serve(listener, ctx, self.draining.clone(), tracker.clone()));
        }
        info!(name = %self.config.name, listen = %self.config.listen, "agent serving");

        shutdown.cancelled().await;
        let deadline = self.config.drain_timeout;
        info!(deadline_secs = deadline.as_secs(), "draining: no new streams; waiting for open ones");
        self.draining.cancel();
        for p in self.peers.values() {
            p.clear();
        }
        tracker.close();
        if tokio::time::timeout(deadline, tracker.wait()).await.is_err() {
            warn!(streams = tracker.len(), "drain deadline passed; closing the streams still open");
            self.abort.cancel();
            tracker.wait().await;
        }
        stop_metrics.cancel();
        info!("agent stopped");
    }
}
