//! Reloading a running agent: a new, already validated [`Config`] replaces the running one.
//!
//! What a reload applies: the `[tls]` files (certificate, key, CA, CRL: new handshakes use
//! them, see [`crate::tls::context::TlsContext::replace`]), the `[[peer]]`s (added, removed, a changed
//! address or transport: a new connector, and the forwards to that peer listen again), the
//! `[[expose]]` routes, the `[[forward]]` listeners and `drain_timeout_secs`. Open streams, warm-pool and QUIC connections and the
//! control plane's migrations go on untouched. What it cannot apply (the port, the peers,
//! `[qemu]`, ...) is refused, naming each key, and nothing changes: a reload is all or
//! nothing, except that a changed forward (same listen endpoint, another peer, route or mode)
//! is closed before its replacement is bound, and that replacement binding failing is reported.

use std::sync::Arc;

use tracing::{info, warn};

use std::collections::{HashMap, HashSet};

use crate::agent::{AgentError, AgentHandle, ForwardGuard, Running, StaticForward};
use crate::config::{Config, Forward, Transport};
use crate::io::endpoint::{Endpoint, LocalListener};
use crate::route::forward::ForwardContext;
use crate::route::{ExposeRoute, RouteError};
use crate::tls::context::{TlsContext, TlsSetupError};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Each line names a key that changed and cannot change while the agent runs.
    #[error("{}", .0.join("\n"))]
    NeedsRestart(Vec<String>),
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    #[error("`forward[{index}].listen`: cannot listen on {endpoint}: {source}")]
    Forward { index: usize, endpoint: Endpoint, source: std::io::Error },
    #[error("`expose`: {0}")]
    Route(#[from] RouteError),
    #[error("`peer[{index}].transport`: QUIC needs the UDP port, which this agent could not bind at start; needs a restart")]
    NoQuic { index: usize },
    #[error("`peer[{index}]`: {source}")]
    Peer { index: usize, source: AgentError },
    #[error("the agent is not serving yet (or any more); nothing reloaded")]
    NotRunning,
}

impl ReloadError {
    /// One line per problem, each naming its key (what `migtun check` would print after the
    /// file name).
    pub fn lines(&self) -> Vec<String> {
        match self {
            ReloadError::NeedsRestart(lines) => lines.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// A forward and how the new config treats it.
fn same_forward(a: &Forward, b: &Forward) -> bool {
    a.listen == b.listen && a.peer == b.peer && a.route == b.route && a.mode == b.mode && a.owner == b.owner
}

fn describe(f: &Forward) -> String {
    format!("{} -> peer {}, route {}", f.listen, f.peer, f.route)
}

impl AgentHandle {
    /// Applies `new` to the running agent and returns what changed, one line each (also
    /// logged). On an error nothing changed (see the module's doc for the one exception).
    pub async fn reload(&self, new: Config) -> Result<Vec<String>, ReloadError> {
        let shared = &self.shared;
        let mut running = shared.running.lock().await;
        let Some(Running { config: old, forwards }) = running.as_mut() else {
            return Err(ReloadError::NotRunning);
        };
        if shared.draining.is_cancelled() {
            return Err(ReloadError::NotRunning);
        }
        let restart = old.restart_needed(&new);
        if !restart.is_empty() {
            return Err(ReloadError::NeedsRestart(restart));
        }
        // Everything that can fail, before anything changes: the TLS material, and the
        // listeners of forwards on endpoints nothing listens on yet.
        TlsContext::new(&new.tls)?;
        // Peers added, or whose address or transport changed: their new connectors.
        let mut connectors: HashMap<String, Arc<crate::peer::PeerConnector>> = HashMap::new();
        let mut peer_changes = Vec::new();
        for (index, p) in new.peers.iter().enumerate() {
            let was = old.peers.iter().find(|o| o.name == p.name);
            if was.is_some_and(|o| o.address == p.address && o.transport == p.transport) {
                continue;
            }
            let mut quic_client = shared.quic_client.lock().unwrap_or_else(|e| e.into_inner());
            if p.transport != Transport::Tls {
                if shared.quic.is_none() {
                    return Err(ReloadError::NoQuic { index });
                }
                if quic_client.is_none() {
                    *quic_client = Some(crate::agent::quic_client_config(&shared.tls).map_err(|source| ReloadError::Peer { index, source })?);
                }
            }
            let c = crate::agent::connector(p, &shared.data_connector, shared.quic.as_ref(), quic_client.as_ref(), &shared.metrics, &shared.draining)
                .map_err(|source| ReloadError::Peer { index, source })?;
            connectors.insert(p.name.clone(), c);
            peer_changes.push(match was {
                None => format!("peer {}: added ({}, {:?})", p.name, p.address, p.transport),
                Some(o) => format!("peer {}: {} {:?} -> {} {:?} (its open streams keep the old connection)", p.name, o.address, o.transport, p.address, p.transport),
            });
        }
        let removed_peers: Vec<String> =
            old.peers.iter().filter(|o| !new.peers.iter().any(|p| p.name == o.name)).map(|o| o.name.clone()).collect();
        // Forwards to a peer whose connector changes listen again with the new one.
        let renewed: HashSet<String> = connectors.keys().cloned().collect();
        let same_forward = |a: &Forward, b: &Forward| same_forward(a, b) && !renewed.contains(&a.peer);
        let mut bound: Vec<(usize, LocalListener)> = Vec::new();
        for (index, f) in new.forwards.iter().enumerate() {
            if forwards.iter().any(|o| o.spec.listen == f.listen) {
                continue;
            }
            let listener = LocalListener::bind_owned(&f.listen, f.mode, f.owner)
                .await
                .map_err(|source| ReloadError::Forward { index, endpoint: f.listen.clone(), source })?;
            bound.push((index, listener));
        }
        let statics: Vec<ExposeRoute> = new
            .exposes
            .iter()
            .map(|e| ExposeRoute { name: e.route.clone(), target: e.target.clone(), allow: e.allow.clone(), migration: None, received: None })
            .collect();

        // Commit. Routes first: the one step left that can refuse (a name a migration took).
        let routes = shared.routes.replace_static(statics)?;
        let mut changes = Vec::new();
        if let Err(e) = shared.tls.replace(&new.tls) {
            // Checked above; only a race with the files could get here. Put the routes back.
            let back = old
                .exposes
                .iter()
                .map(|e| ExposeRoute { name: e.route.clone(), target: e.target.clone(), allow: e.allow.clone(), migration: None, received: None })
                .collect();
            let _ = shared.routes.replace_static(back);
            return Err(e.into());
        }
        {
            let mut peers = shared.peers.write().unwrap_or_else(|p| p.into_inner());
            for name in &removed_peers {
                if let Some(p) = peers.remove(name) {
                    p.clear();
                }
                changes.push(format!("peer {name}: removed (its open streams finish)"));
            }
            for (name, c) in connectors {
                if let Some(old) = peers.insert(name, c) {
                    old.clear();
                }
            }
            changes.extend(peer_changes);
        }
        if let Some(expose) = shared.expose.get() {
            *expose.peers.write().unwrap_or_else(|p| p.into_inner()) = new.peers.iter().map(|p| p.name.clone()).collect();
        }
        let tls_changed = tls_differs(&old.tls, &new.tls);
        if tls_changed {
            let ca_chain = new.tls.cert_chain.iter().skip(1).chain(&new.tls.ca_certs);
            shared.metrics.certificates_expire(
                new.tls.cert_chain.first().and_then(crate::tls::identity::not_after),
                ca_chain.filter_map(crate::tls::identity::not_after).min(),
            );
            // Idle connections made under the old material are not used for new streams.
            for p in shared.peer_map().values() {
                p.clear();
            }
            changes.push(format!(
                "tls: new handshakes use {} / {} / {}{}",
                new.tls.cert_path.display(),
                new.tls.key_path.display(),
                new.tls.ca_path.display(),
                new.tls.crl_path.as_ref().map(|c| format!(" / {}", c.display())).unwrap_or_default()
            ));
        }
        for r in &routes.added {
            changes.push(format!("expose: route {r:?} added"));
        }
        for r in &routes.changed {
            changes.push(format!("expose: route {r:?} changed (its open streams finish as they began)"));
        }
        for r in &routes.removed {
            changes.push(format!("expose: route {r:?} removed (its open streams finish)"));
        }

        // Forwards: close those the new config drops or changes (their socket files go, their
        // open streams finish), then listen on the new and changed ones.
        let mut kept = Vec::new();
        let mut closing = Vec::new();
        for f in std::mem::take(forwards) {
            if new.forwards.iter().any(|n| same_forward(n, &f.spec)) {
                kept.push(f);
            } else {
                closing.push(f);
            }
        }
        for f in closing {
            let changed = new.forwards.iter().any(|n| n.listen == f.spec.listen);
            f.guard.close().await;
            if !changed {
                changes.push(format!("forward: {} removed (its open streams finish)", describe(&f.spec)));
            }
        }
        let mut failures = Vec::new();
        for (index, f) in new.forwards.iter().enumerate() {
            if kept.iter().any(|k: &StaticForward| same_forward(&k.spec, f)) {
                continue;
            }
            let listener = match bound.iter().position(|(i, _)| *i == index) {
                Some(at) => bound.swap_remove(at).1,
                None => match LocalListener::bind_owned(&f.listen, f.mode, f.owner).await {
                    Ok(l) => l,
                    Err(source) => {
                        let e = ReloadError::Forward { index, endpoint: f.listen.clone(), source };
                        warn!(error = %e, "reload: a changed forward could not listen again");
                        failures.push(e.to_string());
                        continue;
                    }
                },
            };
            let Some(peer) = shared.peer(&f.peer) else {
                continue; // config validation: forwards name configured peers, all in the map now
            };
            let ctx = Arc::new(ForwardContext {
                metrics: shared.metrics.clone(),
                peer,
                route: f.route.clone(),
                migration: None,
                abort: shared.abort.clone(),
            });
            let endpoint = listener.endpoint().unwrap_or_else(|_| f.listen.clone());
            let was = old.forwards.iter().any(|o| o.listen == f.listen);
            changes.push(format!("forward: {} {}", describe(f), if was { "changed" } else { "added" }));
            kept.push(StaticForward { spec: f.clone(), guard: ForwardGuard::spawn(shared, listener, ctx, endpoint) });
        }
        // Config order, so that the next reload compares like with like.
        kept.sort_by_key(|k| new.forwards.iter().position(|f| same_forward(f, &k.spec)));
        *forwards = kept;

        let mut drain = shared.drain_timeout.lock().unwrap_or_else(|p| p.into_inner());
        if *drain != new.drain_timeout {
            changes.push(format!("drain_timeout_secs: {} -> {}", drain.as_secs(), new.drain_timeout.as_secs()));
            *drain = new.drain_timeout;
        }
        drop(drain);
        *old = new;
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        for c in &changes {
            info!(change = %c, "reload");
        }
        changes.extend(failures.into_iter().map(|f| format!("FAILED: {f}")));
        Ok(changes)
    }
}

/// Whether the files' contents differ (a reload re-reads them whether or not they did).
fn tls_differs(a: &crate::config::TlsConfig, b: &crate::config::TlsConfig) -> bool {
    a.cert_chain != b.cert_chain
        || a.key.secret_der() != b.key.secret_der()
        || a.ca_certs != b.ca_certs
        || a.crls != b.crls
        || a.cert_path != b.cert_path
        || a.key_path != b.key_path
        || a.ca_path != b.ca_path
        || a.crl_path != b.crl_path
}
