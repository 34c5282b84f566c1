//! The control service an agent runs: the RPC router with its authorization policy, its
//! refusal metrics, (with `[qemu]`) the destination side of migrations and the source side's
//! starter, and the journal both need.
//!
//! [`ControlPlane`] starts in two steps when the journal is still held by the agent this one
//! replaces (a restart hand-over, see `migration::handover`): the agent serves at once, the
//! hello and tunnels included, and the requests that need the journal (prepare, finish, files,
//! `migtun migrate`) are refused naming who holds it until [`ControlPlane::start`] has it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use migtun_proxy::agent::AgentHandle;
use migtun_proxy::config::QemuConfig;
use migtun_proxy::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{Registry, Starter};
use crate::authz::SourcePolicy;
use crate::driver::Outgoing;
use crate::incoming::{Incoming, IncomingGetter, IncomingLimits};
use crate::journal::{Journal, JournalError};
use crate::messages::{OutcomeKind, Report, Totals};
use crate::rpc::{MethodError, Router};
use crate::tunnels::Tunnels;

/// The destination side of this agent, on `[qemu]` `q`, journalling in `journal`.
fn incoming_of(agent: &AgentHandle, q: &QemuConfig, journal: Arc<Journal>) -> Arc<Incoming> {
    let limits = IncomingLimits {
        max_incoming: q.max_incoming,
        max_incoming_per_peer: q.max_incoming_per_peer,
        max_upload_bytes: q.max_upload_bytes,
    };
    let policy = crate::destination::Policy::from_config(q);
    Incoming::with_config(agent.clone(), q.run_dir.clone(), q.image_dir.clone(), journal, q.prepare_hook.clone(), policy, limits)
}

/// The router of the agent's control handler. Every agent answers the hello; every other
/// request must pass `[qemu] allow_sources` (`sources`), `tunnel-*` requests `[tunnels] allow`
/// instead; the destination side's requests go to `incoming` (with `[qemu]`).
fn router_with(agent: &AgentHandle, sources: SourcePolicy, incoming: Option<IncomingGetter>, tunnels: &Arc<Tunnels>) -> Router {
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
        router = Incoming::register_late(router, incoming);
    }
    tunnels.register(router)
}

/// This agent's tunnels (`[tunnels]`; without it, every tunnel request is refused by name).
fn tunnels(agent: &AgentHandle, config: &Config) -> Arc<Tunnels> {
    Tunnels::new(agent.clone(), config.tunnels.clone())
}

/// The control plane of one agent: what answers peers and the admin socket.
pub struct ControlPlane {
    agent: AgentHandle,
    qemu: Option<QemuConfig>,
    sources: SourcePolicy,
    registry: Arc<Registry>,
    tunnels: Arc<Tunnels>,
    /// Filled by [`ControlPlane::start`] (with `[qemu]`).
    incoming: OnceLock<Arc<Incoming>>,
    outgoing: OnceLock<Arc<Outgoing>>,
    journal: OnceLock<Arc<Journal>>,
}

/// Why the journal's parts are not there yet, before [`ControlPlane::waiting`] first says why.
const NOT_OPEN_YET: &str = "the journal is not open yet";

impl ControlPlane {
    /// The control plane of `config` on `agent`, its journal's parts not started.
    pub fn new(agent: &AgentHandle, config: &Config) -> Arc<ControlPlane> {
        let tunnels = tunnels(agent, config);
        let registry = Arc::new(Registry::default());
        registry.set_tunnels(tunnels.clone());
        Arc::new(ControlPlane {
            agent: agent.clone(),
            qemu: config.qemu.clone(),
            sources: SourcePolicy::from_config(config),
            registry,
            tunnels,
            incoming: OnceLock::new(),
            outgoing: OnceLock::new(),
            journal: OnceLock::new(),
        })
    }

    /// What `migtun status` and the admin socket see.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The journal's parts are not there yet, because of `why` (refusals and `/readyz` say it:
    /// the agent's health keeps it, until [`ControlPlane::start`] clears it).
    pub fn waiting(&self, why: &str) {
        self.agent.starting(Some(why.to_string()));
    }

    fn not_started(&self) -> String {
        let why = self.agent.metrics().health.still_starting();
        format!(
            "{} is starting ({}); migrations are served once it has the journal, in seconds: try again then",
            self.agent.name(),
            why.as_deref().unwrap_or(NOT_OPEN_YET)
        )
    }

    /// The agent's control handler: the hello and tunnels at once; with `[qemu]`, the
    /// destination side once started, refused with 503 `starting` before.
    pub fn router(self: &Arc<ControlPlane>) -> Router {
        let getter = self.qemu.as_ref().map(|_| {
            let this = self.clone();
            Arc::new(move || match this.incoming.get() {
                Some(i) => Ok(i.clone()),
                None => Err(MethodError::refused(503, "starting", this.not_started())),
            }) as IncomingGetter
        });
        router_with(&self.agent, self.sources.clone(), getter, &self.tunnels)
    }

    /// Runs migrations submitted on the admin socket (the source side); refused without
    /// `[qemu]`, and until started.
    pub fn starter(self: &Arc<ControlPlane>) -> Starter {
        let this = self.clone();
        Arc::new(move |args, tracked| {
            let this = this.clone();
            Box::pin(async move {
                let refuse = |why: String| tracked.report(Report::done(OutcomeKind::Refused, why, Totals::default()));
                if this.qemu.is_none() {
                    return refuse("this agent has no [qemu] run_dir configured; it cannot run migrations".into());
                }
                match this.outgoing.get() {
                    Some(out) => crate::driver::run(out.clone(), args, tracked.clone()).await,
                    None => refuse(this.not_started()),
                }
            })
        })
    }

    /// With the journal ours: settles the unfinished incoming migrations (before any peer's
    /// request is answered), then serves the destination side, then settles the unfinished
    /// outgoing ones (rolled back, or finished with the destination) and runs new ones.
    pub async fn start(&self, journal: Arc<Journal>) {
        let Some(q) = &self.qemu else { return };
        let _ = self.journal.set(journal.clone());
        let incoming = incoming_of(&self.agent, q, journal.clone());
        incoming.recover().await;
        // `migtun status` lists the incoming migrations with the outgoing ones.
        self.registry.set_incoming(incoming.clone());
        let _ = self.incoming.set(incoming);
        let out = Arc::new(Outgoing { agent: self.agent.clone(), run_dir: q.run_dir.clone(), journal });
        crate::recovery::recover(out.clone(), self.registry.clone());
        let _ = self.outgoing.set(out);
        self.agent.starting(None);
    }

    /// Waits for the journal in `state_dir` that the agent this one replaces holds while it
    /// drains ([`handover::take`](crate::handover::take)), then starts the journal's parts
    /// ([`ControlPlane::start`], on a task of its own). The task ends `Ok` once the journal is
    /// ours, or when `shutdown` comes first; if the journal never comes (that agent is stuck),
    /// it cancels `shutdown`, so that this agent drains, and ends with the reason to exit with.
    pub fn take_over(self: &Arc<ControlPlane>, state_dir: PathBuf, shutdown: CancellationToken) -> JoinHandle<Result<(), JournalError>> {
        let this = self.clone();
        tokio::spawn(async move {
            let waited = crate::handover::take(&state_dir, |why| {
                tracing::info!(state_dir = %state_dir.display(), "{why}");
                this.waiting(why);
            });
            let taken = tokio::select! {
                taken = waited => taken,
                _ = shutdown.cancelled() => return Ok(()),
            };
            match taken {
                Ok(journal) => {
                    tracing::info!(state_dir = %state_dir.display(), "journal taken over: migrations are served");
                    // Not awaited here: the caller hears the outcome of the take-over at once.
                    tokio::spawn(async move { this.start(Arc::new(journal)).await });
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(state_dir = %state_dir.display(), error = %e, "cannot take the journal over; stopping");
                    shutdown.cancel();
                    Err(e)
                }
            }
        })
    }

    /// The agent drains for up to `drain`: the lock file says so, and a new agent on this config
    /// waits that long for the journal (`migration::handover`) instead of refusing to start.
    pub fn draining(&self, drain: std::time::Duration) {
        let Some(journal) = self.journal.get() else { return };
        // The drain's deadline, rounded up to whole seconds.
        let until = crate::journal::now() + drain.as_secs() + 1;
        if let Err(e) = journal.mark_draining(until) {
            tracing::warn!(error = %e, "cannot write the drain into the journal's lock file; an agent started now refuses to start until this one exits");
        }
    }
}
