//! The control service an agent runs: the RPC router with its authorization policy, its
//! refusal metrics, and (with `[qemu]`) the destination side of migrations.

use std::sync::Arc;

use migtun_proxy::agent::AgentHandle;
use migtun_proxy::Config;

use crate::authz::SourcePolicy;
use crate::incoming::{Incoming, IncomingLimits};
use crate::journal::Journal;
use crate::rpc::Router;
use crate::tunnels::Tunnels;

/// The destination side of this agent, when it has `[qemu]` (and so a journal).
pub fn incoming(agent: &AgentHandle, config: &Config, journal: Arc<Journal>) -> Option<Arc<Incoming>> {
    let q = config.qemu.as_ref()?;
    let limits = IncomingLimits {
        max_incoming: q.max_incoming,
        max_incoming_per_peer: q.max_incoming_per_peer,
        max_upload_bytes: q.max_upload_bytes,
    };
    let policy = crate::destination::Policy::from_config(q);
    Some(Incoming::with_config(agent.clone(), q.run_dir.clone(), q.image_dir.clone(), journal, q.prepare_hook.clone(), policy, limits))
}

/// The router `migtun serve` registers as the agent's control handler. Every agent answers the
/// hello; every other request must pass `[qemu] allow_sources`.
/// `tunnel-*` requests must pass `[tunnels] allow` instead.
pub fn router(agent: &AgentHandle, config: &Config, incoming: Option<&Arc<Incoming>>, tunnels: &Arc<Tunnels>) -> Router {
    let sources = SourcePolicy::from_config(config);
    let t = tunnels.clone();
    let policy: crate::rpc::Policy = Arc::new(move |peer, method| {
        if method.starts_with("tunnel-") {
            t.check_peer(peer.name(), method)
        } else {
            sources.check(peer.name(), method)
        }
    });
    let mut router = Router::new(agent.name()).authorize(policy).count_refusals(agent.metrics(), agent.peer_names());
    if let Some(incoming) = incoming {
        router = incoming.register(router);
    }
    tunnels.register(router)
}

/// This agent's tunnels (`[tunnels]`; without it, every tunnel request is refused by name).
pub fn tunnels(agent: &AgentHandle, config: &Config) -> Arc<Tunnels> {
    Tunnels::new(agent.clone(), config.tunnels.clone())
}

/// The journal of an agent with `[qemu]` (`qemu.state_dir`), locked for this agent.
pub fn open_journal(config: &Config) -> Result<Option<Arc<Journal>>, crate::journal::JournalError> {
    match &config.qemu {
        Some(q) => Ok(Some(Arc::new(Journal::open(&q.state_dir)?))),
        None => Ok(None),
    }
}
