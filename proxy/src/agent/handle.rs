//! The control plane's hold on a bound or running agent ([`AgentHandle`]): dynamic forwards and
//! routes for one migration, each kept by a guard whose drop removes it, control connections to
//! peers, and what the agent reports (its name, metrics, peers, drain).

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{AgentError, ControlStream, Shared};
use crate::io::endpoint::{Endpoint, LocalListener};
use crate::metrics::Metrics;
use crate::route::forward::ForwardContext;
use crate::route::{ExposeRoute, RouteError, RouteTable};

/// A cheap, cloneable handle on a bound or running agent.
#[derive(Clone)]
pub struct AgentHandle {
    pub(crate) shared: Arc<Shared>,
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
    /// Serves `listener` with `ctx` until the guard is dropped or closed, or the agent drains.
    pub(crate) fn spawn(shared: &Shared, listener: LocalListener, ctx: Arc<ForwardContext>, endpoint: Endpoint) -> ForwardGuard {
        let abort = ctx.abort.clone();
        let stop = shared.draining.child_token();
        let task = shared.tracker.spawn(crate::route::forward::serve(listener, ctx, stop.clone(), shared.tracker.clone()));
        ForwardGuard { stop, task: Some(task), endpoint, abort }
    }

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
        let mut v: Vec<String> = self.shared.peer_map().keys().cloned().collect();
        v.sort();
        v
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.is_cancelled()
    }

    /// How long the drain lets open streams run (`drain_timeout_secs`, as last reloaded).
    pub fn drain_timeout(&self) -> std::time::Duration {
        *self.shared.drain_timeout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start-up work the agent serves without (with `[qemu]`: the journal the agent it replaces
    /// still holds). Said before [`Agent::run`](super::Agent::run), it keeps `/readyz` at 503 with `what` and
    /// holds systemd's `READY=1` (STATUS= says why) until `starting(None)`, which sends it.
    pub fn starting(&self, what: Option<String>) {
        let health = &self.shared.metrics.health;
        let done = what.is_none();
        if let Some(what) = &what {
            crate::notify::status(&format!("starting: {what}"));
        }
        health.starting(what);
        // `run` marks serving, then looks here; this clears, then looks there: whichever
        // comes second sends READY=1 (both may: systemd takes a second READY=1 as a status).
        if done && health.is_serving() && !self.is_draining() {
            crate::notify::ready(&format!("serving on {}", health.listening_on().map(|a| a.to_string()).unwrap_or_default()));
        }
    }

    /// The agent's QUIC endpoint (UDP, same port number as `listen`), if it has one. Tests use it
    /// to rebind the agent to another UDP socket (connection migration).
    pub fn quic_endpoint(&self) -> Option<quinn::Endpoint> {
        self.shared.quic.clone()
    }

    /// The transport new streams to `peer` take now: `tls` or `quic` (for `auto`, whichever it
    /// currently uses). `None` for an unknown peer.
    pub fn peer_transport(&self, peer: &str) -> Option<&'static str> {
        self.shared.peer(peer).map(|p| match p.choice() {
            crate::peer::Choice::Quic => "quic",
            crate::peer::Choice::Tls => "tls",
        })
    }

    /// Starts a dynamic forward; it stops when the guard is dropped or the agent drains.
    pub async fn add_forward(&self, spec: DynamicForward) -> Result<ForwardGuard, AgentError> {
        if self.is_draining() {
            return Err(AgentError::Draining);
        }
        let peer = self.shared.peer(&spec.peer).ok_or_else(|| AgentError::UnknownPeer { name: spec.peer.clone() })?;
        for name in std::iter::once(&spec.route).chain(spec.migration.as_ref()) {
            crate::route::wire::validate_name(name)
                .map_err(|why| AgentError::Route(RouteError::BadName { name: name.clone(), why }))?;
        }
        let listener = LocalListener::bind(&spec.listen, spec.mode).await.map_err(|source| {
            AgentError::DynamicForward { route: spec.route.clone(), endpoint: spec.listen.clone(), source }
        })?;
        let endpoint = listener.endpoint().unwrap_or_else(|_| spec.listen.clone());
        let ctx = Arc::new(ForwardContext {
            metrics: self.shared.metrics.clone(),
            peer,
            route: spec.route,
            migration: spec.migration,
            abort: self.shared.abort.child_token(),
        });
        Ok(ForwardGuard::spawn(&self.shared, listener, ctx, endpoint))
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
        let p = self.shared.peer(peer).ok_or_else(|| AgentError::UnknownPeer { name: peer.to_string() })?;
        p.connect_with(&self.shared.control_connector)
            .await
            .map(|s| Box::new(s) as ControlStream)
            .map_err(|e| AgentError::Control { peer: peer.to_string(), source: e })
    }
}
