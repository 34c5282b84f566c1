//! The destination's half of a migration: Prepare, the side channel, and Finish.
//!
//! Prepare runs the configured hook (which starts the destination QEMU with `-incoming defer`),
//! connects to its QMP socket, starts an NBD server on a private UNIX socket, exports each
//! copied disk, sets the migration capabilities, starts `migrate-incoming` on another private
//! socket, and exposes both sockets as routes for this migration, to the source only.
//!
//! The destination's rule for the invariant: the guest runs here only after an explicit
//! `finish` with success, and only once that decision is in the journal. If the control
//! connection of the migration ends before that (the source agent died, or stopped answering
//! pings), or `finish` reports failure, the destination QEMU is quit and everything the
//! migration made here is removed.
//!
//! `finish` is idempotent: a source that lost its answer (the connection broke, this agent
//! restarted) sends it again and gets the same answer, read from the journal, for a week
//! ([`RETAIN_ENDED`](crate::journal::RETAIN_ENDED)). An agent that starts finishes what its
//! journal says was unfinished ([`Incoming::recover`]): an orphaned QEMU is quit (a verified
//! process, never a reused pid), its directory removed, and a handover that was decided is
//! completed.
//!
//! The parts, by concern: this file holds the [`Incoming`] type, its limits and slots, and the
//! RPC methods it registers; `board` what `migtun status` shows; `prepare` Prepare (the
//! hook's plan, QMP, the NBD exports, the routes); `finish` Finish, its answer given again,
//! and abandonment; `files` the side-channel upload; `recover` what a starting agent
//! finishes; `qemu` the destination QEMU as a process (the hook that starts it, finding,
//! waiting for and quitting it).

mod board;
mod files;
mod finish;
mod prepare;
mod qemu;
mod recover;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use migtun_proxy::agent::{AgentHandle, ExposeGuard};
use tracing::warn;

use crate::destination::{paths, Policy};
use crate::journal::Journal;
use crate::messages::{Cookie, FinishRequest};
use crate::process::ProcessId;
use crate::qmp::Qmp;
use crate::rpc::{MethodError, Router};

use board::Board;
pub use qemu::HOOK_TIMEOUT;

/// One prepared migration on this host.
struct Prepared {
    source: String,
    qmp: Qmp,
    qemu: Option<ProcessId>,
    dir: PathBuf,
    /// Dropping these removes the routes.
    _routes: Vec<ExposeGuard>,
    /// Its place among the incoming migrations, given back when it ends.
    _slot: Slot,
    /// Counted in `migtun_migrations_current` while it lives.
    _gauge: migtun_proxy::metrics::MigrationGauge,
    started: std::time::Instant,
}

/// Gives the destination side, or the refusal to answer with while there is none yet.
pub type IncomingGetter = Arc<dyn Fn() -> Result<Arc<Incoming>, MethodError> + Send + Sync>;

/// What peers may make this host hold at once (`[qemu] max_incoming`, `max_incoming_per_peer`,
/// `max_upload_bytes`).
#[derive(Clone, Copy, Debug)]
pub struct IncomingLimits {
    pub max_incoming: usize,
    pub max_incoming_per_peer: usize,
    pub max_upload_bytes: u64,
}

impl Default for IncomingLimits {
    fn default() -> Self {
        use migtun_proxy::config::{DEFAULT_MAX_INCOMING, DEFAULT_MAX_INCOMING_PER_PEER, DEFAULT_MAX_UPLOAD_BYTES};
        IncomingLimits {
            max_incoming: DEFAULT_MAX_INCOMING,
            max_incoming_per_peer: DEFAULT_MAX_INCOMING_PER_PEER,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
        }
    }
}

/// Incoming migrations being prepared or prepared, by source peer.
#[derive(Default)]
struct Slots {
    total: usize,
    by_peer: HashMap<String, usize>,
}

/// One taken slot; dropping it gives it back.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    peer: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.by_peer.remove(&self.peer);
            }
        }
    }
}

/// The destination side, shared by all control connections.
pub struct Incoming {
    agent: AgentHandle,
    /// `run_dir/<id>`: a migration's sockets, QMP socket, pidfile and QEMU log.
    run_dir: PathBuf,
    /// `image_dir/<id>`: its copied disks and side-channel files.
    image_dir: PathBuf,
    journal: Arc<Journal>,
    hook: Option<PathBuf>,
    /// What an incoming migration may run here (`[qemu]`).
    policy: Policy,
    active: Mutex<HashMap<String, Arc<Prepared>>>,
    limits: IncomingLimits,
    slots: Arc<Mutex<Slots>>,
    /// What `migtun status` shows: the incoming migrations and the last ended ones.
    board: Mutex<Board>,
}

impl Incoming {
    /// A destination with `[qemu]`'s policy (what may run here) and limits (how much at once),
    /// journalling in `journal`.
    pub fn with_config(
        agent: AgentHandle,
        run_dir: PathBuf,
        image_dir: PathBuf,
        journal: Arc<Journal>,
        hook: Option<PathBuf>,
        policy: Policy,
        limits: IncomingLimits,
    ) -> Arc<Incoming> {
        Arc::new(Incoming {
            agent,
            run_dir,
            image_dir,
            journal,
            hook,
            policy,
            active: Mutex::new(HashMap::new()),
            limits,
            slots: Arc::new(Mutex::new(Slots::default())),
            board: Mutex::new(Board::default()),
        })
    }

    /// Takes a slot for an incoming migration from `peer`, or refuses (429) naming the limit.
    fn take_slot(&self, peer: &str) -> Result<Slot, MethodError> {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let host = self.agent.name();
        let from_peer = s.by_peer.get(peer).copied().unwrap_or(0);
        if from_peer >= self.limits.max_incoming_per_peer {
            return Err(MethodError::refused(
                429,
                "max-incoming-per-peer",
                format!("{host} already has {from_peer} incoming migrations from {peer}, the limit of [qemu] max_incoming_per_peer; retry when one has ended"),
            ));
        }
        if s.total >= self.limits.max_incoming {
            return Err(MethodError::refused(
                429,
                "max-incoming",
                format!("{host} already has {} incoming migrations, the limit of [qemu] max_incoming; retry when one has ended", s.total),
            ));
        }
        s.total += 1;
        *s.by_peer.entry(peer.to_string()).or_insert(0) += 1;
        Ok(Slot { slots: self.slots.clone(), peer: peer.to_string() })
    }

    /// Adds `prepare`, `finish` and the side-channel upload to `router`.
    pub fn register(self: &Arc<Self>, router: Router) -> Router {
        let this = self.clone();
        Incoming::register_late(router, Arc::new(move || Ok(this.clone())))
    }

    /// [`Incoming::register`] for a destination side that may not exist yet (the journal is
    /// still held by the agent this one replaces): each request asks `get` for it, and gets
    /// `get`'s refusal meanwhile.
    pub fn register_late(router: Router, get: IncomingGetter) -> Router {
        let (p, f, u) = (get.clone(), get.clone(), get);
        router
            .method("prepare", move |session, args| {
                let get = p.clone();
                async move {
                    let this = get()?;
                    let source = session.peer.name().to_string();
                    let cookie: Cookie = serde_json::from_value(args).map_err(|e| {
                        warn!(%source, error = %e, "refused a prepare: the cookie does not parse");
                        MethodError::bad_request(format!("cookie: {e}"))
                    })?;
                    let id = crate::destination::shorten(&cookie.migration);
                    let reply = this.prepare(session, cookie).await.map_err(|e| {
                        // Refusals are logged where they are decided (and by the router); a
                        // prepare that failed here is logged here, for the destination's operator.
                        if e.refusal.is_none() {
                            warn!(migration = %id, %source, status = e.status, error = %e.message, "prepare failed; nothing of the migration is left here");
                        }
                        e
                    })?;
                    Ok(serde_json::to_value(reply).unwrap_or_default())
                }
            })
            .method("finish", move |session, args| {
                let get = f.clone();
                async move {
                    let this = get()?;
                    let req: FinishRequest = serde_json::from_value(args).map_err(|e| MethodError::bad_request(format!("finish: {e}")))?;
                    let reply = this.finish(&session, req).await?;
                    Ok(serde_json::to_value(reply).unwrap_or_default())
                }
            })
            .upload(move |session, header, upload| {
                let get = u.clone();
                async move { get()?.receive_file(&session, header, upload).await }
            })
    }

    /// Migrations prepared here and not finished yet.
    pub fn active(&self) -> Vec<String> {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// images (`image_dir/<id>`), which no guest uses.
    /// The images go first: the run dir's disappearance is what says the migration left nothing.
    fn remove_dir(&self, dir: &Path) {
        if let Some(id) = dir.file_name() {
            let images = self.image_dir.join(id);
            match paths::remove_migration_dir(&self.image_dir, &images) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    warn!(dir = %images.display(), error = %e, "cannot remove the failed migration's images");
                }
                _ => {}
            }
        }
        if let Err(e) = paths::remove_migration_dir(&self.run_dir, dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "cannot remove the migration's directory");
            }
        }
    }

    /// `image_dir/<id>`: where migration `id`'s disks and side-channel files go.
    fn images_of(&self, id: &str) -> PathBuf {
        self.image_dir.join(id)
    }
}
