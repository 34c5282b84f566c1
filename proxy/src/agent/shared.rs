//! What the running agent shares with its tasks, its handles and a reload: the peers'
//! connectors, the TLS context, the QUIC endpoint, the drain tokens, and the running config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{AgentError, ForwardGuard};
use crate::config::{Config, Transport};
use crate::metrics::Metrics;
use crate::peer::{PeerConnector, QuicClient, TlsConnector};
use crate::route::expose::ExposeContext;
use crate::route::RouteTable;
use crate::tls::context::TlsContext;
use crate::tls::ALPN_DATA;

/// What the running agent shares with its tasks and with the control plane.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) routes: Arc<RouteTable>,
    /// The configured peers' connectors; a reload adds, replaces and removes them (streams
    /// that hold a replaced one keep it).
    pub(crate) peers: std::sync::RwLock<HashMap<String, Arc<PeerConnector>>>,
    /// What new peers' connectors are made from (a reload).
    pub(crate) data_connector: TlsConnector,
    pub(crate) quic_client: std::sync::Mutex<Option<(quinn::ClientConfig, TlsConnector)>>,
    /// The receiving side's context, once the agent runs: its list of configured peers.
    pub(crate) expose: std::sync::OnceLock<Arc<ExposeContext>>,
    pub(crate) control_connector: TlsConnector,
    /// Verifiers and identity every rustls configuration is made from; a reload replaces what
    /// is inside it ([`TlsContext::replace`]).
    pub(crate) tls: Arc<TlsContext>,
    /// The QUIC endpoint on the port number, when UDP could be bound.
    pub(crate) quic: Option<quinn::Endpoint>,
    /// The port's UDP address while another agent (draining) still holds it: the endpoint runs
    /// on a temporary socket (outgoing QUIC only) until it can take the port.
    pub(crate) udp_wait: Option<SocketAddr>,
    pub(crate) tracker: TaskTracker,
    pub(crate) draining: CancellationToken,
    pub(crate) abort: CancellationToken,
    /// `drain_timeout_secs`, which a reload may change.
    pub(crate) drain_timeout: std::sync::Mutex<std::time::Duration>,
    /// The config and static forwards of the running agent (`None` until it runs). Its lock is
    /// also what keeps two reloads from running at once.
    pub(crate) running: tokio::sync::Mutex<Option<Running>>,
}

/// What a reload compares the new config with and changes.
pub(crate) struct Running {
    pub(crate) config: Config,
    /// The `[[forward]]`s that listen now, in config order.
    pub(crate) forwards: Vec<StaticForward>,
}

/// One `[[forward]]` of the config, listening.
pub(crate) struct StaticForward {
    pub(crate) spec: crate::config::Forward,
    pub(crate) guard: ForwardGuard,
}

impl Shared {
    pub(crate) fn peer_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<PeerConnector>>> {
        self.peers.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn peer(&self, name: &str) -> Option<Arc<PeerConnector>> {
        self.peer_map().get(name).cloned()
    }
}

/// The QUIC client configuration for peers on `quic` or `auto`, and the TLS side it wraps.
pub(crate) fn quic_client_config(tls: &Arc<TlsContext>) -> Result<(quinn::ClientConfig, TlsConnector), AgentError> {
    let side = tls.client_config(&[ALPN_DATA])?;
    Ok((crate::quic::tuning::client_config(&side)?, side))
}

/// The connector of one `[[peer]]`.
pub(crate) fn connector(
    p: &crate::config::Peer,
    data: &TlsConnector,
    quic: Option<&quinn::Endpoint>,
    quic_client: Option<&(quinn::ClientConfig, TlsConnector)>,
    metrics: &Arc<Metrics>,
    draining: &CancellationToken,
) -> Result<Arc<PeerConnector>, AgentError> {
    let quic = match (quic, quic_client, p.transport) {
        (Some(e), Some((c, side)), Transport::Quic | Transport::Auto) => Some(QuicClient::new(e.clone(), c.clone(), side.clone())),
        _ => None,
    };
    PeerConnector::with_transport(&p.name, &p.address, data.clone(), p.transport, quic, metrics.clone(), draining.clone())
        .map_err(|_| AgentError::PeerName { name: p.name.clone() })
}
