//! The control service an agent runs: the RPC router with its authorization policy, its
//! refusal metrics, and (with `[qemu]`) the destination side of migrations.

use migtun_proxy::agent::AgentHandle;
use migtun_proxy::Config;

use crate::authz::SourcePolicy;
use crate::incoming::{Incoming, IncomingLimits};
use crate::rpc::Router;

/// The router `migtun serve` registers as the agent's control handler. Every agent answers the
/// hello; every other request must pass `[qemu] allow_sources`.
pub fn router(agent: &AgentHandle, config: &Config) -> Router {
    let mut router = Router::new(agent.name())
        .authorize(SourcePolicy::from_config(config).into_policy())
        .count_refusals(agent.metrics(), agent.peer_names());
    if let Some(q) = &config.qemu {
        let limits = IncomingLimits {
            max_incoming: q.max_incoming,
            max_incoming_per_peer: q.max_incoming_per_peer,
            max_upload_bytes: q.max_upload_bytes,
        };
        let policy = crate::destination::Policy::from_config(q);
        router = Incoming::with_config(agent.clone(), q.run_dir.clone(), q.prepare_hook.clone(), policy, limits).register(router);
    }
    router
}
