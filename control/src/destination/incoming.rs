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

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use migtun_proxy::agent::{AgentHandle, ExposeGuard};
use migtun_proxy::io::endpoint::Endpoint;
use migtun_proxy::route::{ByteCount, ExposeRoute};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::admin::{Direction, IncomingStatus, MigrationSummary, ProgressSummary, HISTORY};
use crate::destination::{cmdline, cookie, paths, Policy, Refusal};
use crate::journal::{IncomingRecord, IncomingState, Journal};
use crate::messages::{rfc3339, Cookie, FinishReply, FinishRequest, OutcomeKind, PrepareReply};
use crate::progress::{eta, RateMeter};
use crate::process::{Process, ProcessId};
use crate::qmp::Qmp;
use crate::rpc::{FileHeader, MethodError, Router, Session, Upload};

/// The prepare hook must have started QEMU and printed its QMP socket within this time.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// After the source reports `completed`, the destination must finish loading within this time.
const INCOMING_COMPLETE_TIMEOUT: Duration = Duration::from_secs(30);
/// Waiting for a status change is driven by QEMU's events; without one for this long, the
/// status is queried anyway (a safety net, not the mechanism).
const STATUS_RECHECK: Duration = Duration::from_millis(250);
/// After `quit`, how long QEMU may take to exit before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How long a QEMU whose QMP socket refused or dropped the agent may take to finish exiting
/// before its exit is reported as the reason: one that failed to drop privileges exits within
/// milliseconds; one still running after this is not the reason.
const EXITED_QEMU_WAIT: Duration = Duration::from_secs(2);
/// How much of a QEMU's log ends up in an error: its last lines, not a whole log.
const LOG_TAIL_BYTES: u64 = 2048;
/// Recovery connects to an orphaned QEMU's monitor: a live QEMU accepts at once.
const RECOVERY_CONNECT: Duration = Duration::from_secs(5);
/// How often a running incoming migration's received bytes are sampled for its rate.
const RATE_SAMPLE: Duration = Duration::from_millis(500);

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

/// The incoming migrations as `migtun status` sees them: from the moment prepare has
/// something to undo (its journal record) to their end, then the last [`HISTORY`] ended ones.
#[derive(Default)]
struct Board {
    live: HashMap<String, View>,
    ended: VecDeque<(String, View)>,
}

struct View {
    vm: String,
    source: String,
    started: SystemTime,
    t0: Instant,
    phase: &'static str,
    step: Option<&'static str>,
    /// What this migration's routes received from the source.
    received: ByteCount,
    /// The copied disks, and (once QEMU said) the guest's RAM.
    disk_bytes: u64,
    ram_bytes: u64,
    meter: RateMeter,
    rate: Option<f64>,
    ended: Option<(OutcomeKind, String, Instant)>,
}

impl View {
    fn summary(&self, id: &str) -> MigrationSummary {
        let received = self.received.get();
        let total = (self.disk_bytes + self.ram_bytes).max(received);
        let progress = (self.ended.is_none() && self.phase != "prepare").then(|| ProgressSummary {
            stage: "receiving".into(),
            done_bytes: received,
            total_bytes: total,
            bytes_per_s: self.rate,
            eta_s: if self.phase == "perform" { eta(total - received, self.rate) } else { None },
        });
        let until = self.ended.as_ref().map(|e| e.2).unwrap_or_else(Instant::now);
        MigrationSummary {
            id: id.to_string(),
            vm: self.vm.clone(),
            direction: Direction::Incoming,
            peer: self.source.clone(),
            phase: if self.ended.is_some() { "done".into() } else { self.phase.into() },
            step: self.step.filter(|_| self.ended.is_none()).map(str::to_string),
            outcome: self.ended.as_ref().map(|e| e.0),
            message: self.ended.as_ref().map(|e| e.1.clone()),
            started: rfc3339(self.started),
            duration_s: until.duration_since(self.t0).as_secs_f64(),
            progress,
        }
    }
}

impl IncomingStatus for Incoming {
    fn summaries(&self) -> Vec<(SystemTime, MigrationSummary)> {
        let board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        board.live.iter().chain(board.ended.iter().map(|(id, v)| (id, v))).map(|(id, v)| (v.started, v.summary(id))).collect()
    }
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

    /// An incoming migration shows in `migtun status` from now on.
    fn show(&self, cookie: &Cookie, received: ByteCount) {
        let view = View {
            vm: cookie.vm.clone(),
            source: cookie.source.clone(),
            started: SystemTime::now(),
            t0: Instant::now(),
            phase: "prepare",
            step: None,
            received,
            disk_bytes: cookie.disks.iter().filter(|d| d.copy).map(|d| d.size).sum(),
            ram_bytes: 0,
            meter: RateMeter::default(),
            rate: None,
            ended: None,
        };
        self.board.lock().unwrap_or_else(|p| p.into_inner()).live.insert(cookie.migration.clone(), view);
    }

    /// Changes what `migtun status` shows of a running incoming migration; false once it ended.
    fn update(&self, id: &str, f: impl FnOnce(&mut View)) -> bool {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        match board.live.get_mut(id) {
            Some(v) => {
                f(v);
                true
            }
            None => false,
        }
    }

    /// An incoming migration ended: it moves to the history (the last [`HISTORY`]).
    fn ended(&self, id: &str, outcome: OutcomeKind, message: &str) {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut v) = board.live.remove(id) {
            v.ended = Some((outcome, message.to_string(), Instant::now()));
            board.ended.push_back((id.to_string(), v));
            while board.ended.len() > HISTORY {
                board.ended.pop_front();
            }
        }
    }

    /// While the migration runs: its rate from the bytes its routes received, and (once) the
    /// guest's RAM size from its QEMU.
    async fn sample(self: Arc<Self>, id: String, prepared: std::sync::Weak<Prepared>) {
        // Not held beyond the query: the migration's routes and slot go when it ends.
        let memory = match prepared.upgrade() {
            Some(p) => p.qmp.execute_with_timeout("query-memory-size-summary", json!({}), RECOVERY_CONNECT).await.ok(),
            None => None,
        };
        if let Some(v) = memory {
            let ram = v.get("base-memory").and_then(|b| b.as_u64()).unwrap_or(0) + v.get("plugged-memory").and_then(|b| b.as_u64()).unwrap_or(0);
            self.update(&id, |view| view.ram_bytes = ram);
        }
        let mut tick = tokio::time::interval(RATE_SAMPLE);
        loop {
            tick.tick().await;
            let alive = self.update(&id, |view| {
                let now = view.received.get();
                view.rate = view.meter.sample(Instant::now(), now);
            });
            if !alive {
                return;
            }
        }
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

    async fn prepare(self: &Arc<Self>, session: Session, mut cookie: Cookie) -> Result<PrepareReply, MethodError> {
        let id = cookie.migration.clone();
        migtun_proxy::route::wire::validate_name(&id).map_err(|why| MethodError::bad_request(format!("migration id {id:?}: {why}")))?;
        let source = session.peer.name().to_string();
        if source != cookie.source {
            return Err(MethodError::refused(403, "wrong-source", format!("{source} may not prepare a migration from {}", cookie.source)));
        }
        let slot = self.take_slot(&source)?;
        if self.active.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&id) {
            return Err(MethodError::bad_request(format!("migration {id} is already prepared")));
        }
        let hook = self.hook.clone().ok_or_else(|| MethodError::failed("this agent has no qemu.prepare_hook configured"))?;
        // The cookie is data from a peer: validated before anything is created or run.
        cookie::validate(&cookie, &self.policy).map_err(|e| refused(&id, &source, e))?;
        // A guest that migrated in under this id keeps its disks in image_dir/<id>, also after
        // its run dir and journal record are gone: this prepare must neither reuse them nor, on
        // failure, remove them.
        let images = self.images_of(&id);
        if std::fs::symlink_metadata(&images).is_ok() {
            let why = format!("{} exists: this id was used on this host before", images.display());
            return Err(refused(&id, &source, crate::destination::Refusal::MigrationId { id: id.clone(), why }));
        }
        self.journal.prune_incoming();
        if self.journal.incoming_record(&id).is_some() {
            return Err(MethodError::bad_request(format!("migration {id} was prepared here before (it is in the journal)")));
        }
        let dir = paths::create_migration_dir(&self.run_dir, &id).map_err(|e| refused(&id, &source, e))?;
        // Journalled before the hook runs: a crash from here on leaves a record that makes the
        // next start quit the QEMU the hook may have started and remove the directory.
        let mut record =
            IncomingRecord { id: id.clone(), source: source.clone(), dir: dir.clone(), qemu: None, state: IncomingState::Preparing, detail: String::new(), updated: 0 };
        if let Err(e) = self.journal.put_incoming(&record) {
            self.remove_dir(&dir);
            return Err(MethodError::failed(format!("cannot journal the migration: {e}")));
        }
        let received = ByteCount::default();
        self.show(&cookie, received.clone());
        let t0 = std::time::Instant::now();
        let qmp_path = match self.plan_and_run_hook(&hook, &mut cookie, &dir).await {
            Ok(p) => p,
            Err(e) => {
                self.kill_hook_qemu(&dir).await;
                self.forget(&dir, &id, &e.message);
                return Err(e);
            }
        };
        let hook_ms = t0.elapsed().as_secs_f64() * 1e3;
        let qmp = match Qmp::connect(&qmp_path).await {
            Ok(q) => q,
            Err(e) => {
                // Refused or dropped: if the QEMU the hook started has exited, that is the
                // reason, whichever of the two the connect happened to see.
                let why = match exited_qemu(&dir).await {
                    Some(exited) => exited,
                    None => e.to_string(),
                };
                self.kill_hook_qemu(&dir).await;
                let e = MethodError::failed(format!("prepare hook printed {}, but: {why}", qmp_path.display()));
                self.forget(&dir, &id, &e.message);
                return Err(e);
            }
        };
        let qemu = qmp.peer_pid().and_then(ProcessId::of);
        record.qemu = qemu;
        record.state = IncomingState::Prepared;
        if let Err(e) = self.journal.put_incoming(&record) {
            quit_qemu(&qmp, qemu).await;
            let e = MethodError::failed(format!("cannot journal the migration: {e}"));
            self.forget(&dir, &id, &e.message);
            return Err(e);
        }
        let pid = qemu.map(|q| q.pid);
        let qmp_ms = t0.elapsed().as_secs_f64() * 1e3 - hook_ms;
        match self.start_incoming(&session, &cookie, &qmp, &dir, &received).await {
            Ok((reply, routes)) => {
                let total_ms = t0.elapsed().as_secs_f64() * 1e3;
                info!(migration = %id, %source, qemu_pid = pid.unwrap_or(0), hook_ms, qmp_ms, total_ms, "prepared: destination QEMU waits for the migration");
                self.update(&id, |v| {
                    v.phase = "perform";
                    v.step = Some("receiving");
                });
                let gauge = self.agent.metrics().migrations.begin(&source, "incoming", "prepared");
                let prepared = Arc::new(Prepared { source, qmp, qemu, dir, _routes: routes, _slot: slot, _gauge: gauge, started: t0 });
                tokio::spawn(self.clone().sample(id.clone(), Arc::downgrade(&prepared)));
                self.active.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), prepared);
                // The destination's rule: no finish on this connection, no guest here.
                let this = self.clone();
                tokio::spawn(async move {
                    session.closed.cancelled().await;
                    this.abandon(&id, "the source's control connection ended before finish").await;
                });
                Ok(reply)
            }
            Err(e) => {
                quit_qemu(&qmp, qemu).await;
                self.forget(&dir, &id, &e.message);
                Err(e)
            }
        }
    }

    /// A prepare that failed: its directory and its record go (the source knows it failed and
    /// never sends `finish`).
    fn forget(&self, dir: &Path, id: &str, why: &str) {
        self.ended(id, OutcomeKind::Failed, &format!("prepare failed: {why}"));
        self.remove_dir(dir);
        if let Err(e) = self.journal.remove_incoming(id) {
            warn!(migration = %id, error = %e, "cannot remove the journal record of a failed prepare");
        }
    }

    /// Kills the QEMU a failed or interrupted hook may have left, found by its pidfile and
    /// verified by its command line (it names this migration's QMP socket), never by pid alone.
    async fn kill_hook_qemu(&self, dir: &Path) {
        let Some(p) = hook_qemu(dir) else { return };
        warn!(dir = %dir.display(), pid = p.id().pid, "killing the QEMU the prepare hook left");
        let _ = p.signal(libc::SIGKILL);
        wait_gone(&p, QUIT_GRACE).await;
    }

    /// Builds what runs from the validated cookie (images in `image_dir/<id>`, the allow-listed
    /// command line) and hands exactly that to the hook.
    async fn plan_and_run_hook(&self, hook: &Path, cookie: &mut Cookie, dir: &Path) -> Result<PathBuf, MethodError> {
        let (id, source) = (cookie.migration.clone(), cookie.source.clone());
        let image_dir = paths::create_migration_dir_in("qemu.image_dir", &self.image_dir, &id).map_err(|e| refused(&id, &source, e))?;
        if let Some(user) = &self.policy.run_as {
            // QEMU binds the NBD and migration sockets here after -runas dropped to `user`.
            // The images stay root's: QEMU opens them before it drops privileges.
            let (uid, gid) = migtun_proxy::config::user_ids(user).map_err(|e| MethodError::failed(format!("qemu.run_as {user:?}: {e}")))?;
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| MethodError::failed(format!("chown {} to {user}: {e}", dir.display())))?;
            // ... and must reach it: run_dir searchable (not listable) by others.
            if let Some(run_dir) = dir.parent() {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(run_dir).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o700);
                if mode & 0o011 != 0o011 {
                    let _ = std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(mode | 0o011));
                }
            }
        }
        cookie.image_dir = image_dir.display().to_string();
        cookie::check_free_space(&image_dir, cookie).map_err(|e| refused(&id, &source, e))?;
        let layout = cmdline::Layout { image_dir: image_dir.clone(), qmp: dir.join("qmp.sock"), pidfile: dir.join("qemu.pid") };
        let plan = cmdline::build(cookie, &self.policy, &layout).map_err(|e| refused(&id, &source, e))?;
        let input = HookInput {
            cookie,
            emulator: &self.policy.emulator,
            argv: &plan.argv,
            images: &plan.images,
            qmp: &layout.qmp,
            pidfile: &layout.pidfile,
            log: &dir.join("qemu.log"),
        };
        run_hook(hook, &input).await.map_err(MethodError::failed)
    }

    /// Removes a failed migration's directories: `dir` (only ever `run_dir/<valid id>`) and its
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

    /// A kept guest's run dir (its QMP socket, pidfile, log) lives as long as its QEMU: removed
    /// when that process exits, whenever that is, so that nothing accumulates under `run_dir`.
    /// The images stay: they are the guest's disks, the operator's to keep or delete.
    fn remove_run_dir_when_gone(&self, record: &IncomingRecord) {
        let (run_dir, dir, id) = (self.run_dir.clone(), record.dir.clone(), record.id.clone());
        let remove = move || match paths::remove_migration_dir(&run_dir, &dir) {
            Ok(()) => info!(migration = %id, dir = %dir.display(), "the migrated guest's QEMU has exited; removed its run directory"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(migration = %id, dir = %dir.display(), error = %e, "cannot remove the exited guest's run directory"),
        };
        match record.qemu.and_then(Process::open) {
            None => remove(),
            Some(p) => {
                tokio::spawn(async move {
                    if let Err(e) = p.exited().await {
                        warn!(error = %e, "cannot watch the migrated guest's QEMU; its run directory stays");
                        return;
                    }
                    remove();
                });
            }
        }
    }

    async fn start_incoming(
        &self,
        session: &Session,
        cookie: &Cookie,
        qmp: &Qmp,
        dir: &Path,
        received: &ByteCount,
    ) -> Result<(PrepareReply, Vec<ExposeGuard>), MethodError> {
        let qemu = |e: crate::qmp::QmpError| MethodError::failed(e.to_string());
        let id = &cookie.migration;
        let (major, minor, micro) = qmp.version();
        let ram_sock = dir.join("migration.sock");
        let nbd_sock = dir.join("nbd.sock");
        let copied: Vec<_> = cookie.disks.iter().filter(|d| d.copy).collect();
        // A disk whose node QEMU named itself (`-drive`) is found here by its device.
        let nodes = self.export_nodes(qmp, &copied).await?;
        // One pipelined batch (QEMU runs it in order): on any failure the caller quits this
        // QEMU, so commands after a failed one need no undoing.
        let mut commands = Vec::new();
        if !copied.is_empty() {
            commands.push(("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": nbd_sock}}})));
            // The export's name is the disk's device, which the source names too.
            for (i, (d, node)) in copied.iter().zip(&nodes).enumerate() {
                commands.push(("block-export-add", json!({"type": "nbd", "id": format!("mig{i}"), "node-name": node, "writable": true, "name": d.device})));
            }
        }
        // `events`: Finish waits for this side's `completed` on the MIGRATION event.
        let mut caps = vec![
            json!({"capability": "events", "state": true}),
            json!({"capability": "multifd", "state": cookie.params.multifd_channels.is_some()}),
        ];
        if cookie.params.postcopy {
            caps.push(json!({"capability": "postcopy-ram", "state": true}));
        }
        commands.push(("migrate-set-capabilities", json!({ "capabilities": caps })));
        if let Some(n) = cookie.params.multifd_channels {
            commands.push(("migrate-set-parameters", json!({"multifd-channels": n})));
        }
        commands.push(("migrate-incoming", json!({"uri": format!("unix:{}", ram_sock.display())})));
        qmp.execute_pipelined(commands).await.map_err(qemu)?;
        let allow = vec![session.peer.name().to_string()];
        let mut routes = Vec::new();
        if !copied.is_empty() {
            routes.push(self.expose(format!("{id}.nbd"), &nbd_sock, &allow, id, received)?);
        }
        routes.push(self.expose(format!("{id}.ram"), &ram_sock, &allow, id, received)?);
        let reply = PrepareReply {
            ram_route: format!("{id}.ram"),
            nbd_route: (!copied.is_empty()).then(|| format!("{id}.nbd")),
            qemu_version: format!("{major}.{minor}.{micro}"),
        };
        Ok((reply, routes))
    }

    /// The node to export for each copied disk: its node name, or, when the source's QEMU had
    /// named it automatically, the node this QEMU's device of the same name uses.
    async fn export_nodes(&self, qmp: &Qmp, disks: &[&crate::messages::DiskSpec]) -> Result<Vec<String>, MethodError> {
        let blocks = if disks.iter().any(|d| d.node_name.is_empty()) {
            let v = qmp.execute("query-block", json!({})).await.map_err(|e| MethodError::failed(e.to_string()))?;
            serde_json::from_value::<Vec<crate::qmp::BlockInfo>>(v).map_err(|e| MethodError::failed(format!("query-block: {e}")))?
        } else {
            Vec::new()
        };
        disks
            .iter()
            .map(|d| {
                if !d.node_name.is_empty() {
                    return Ok(d.node_name.clone());
                }
                blocks
                    .iter()
                    .find(|b| b.device == d.device || b.qdev.as_deref() == Some(d.device.as_str()))
                    .and_then(|b| b.inserted.as_ref())
                    .map(|i| i.node_name.clone())
                    .ok_or_else(|| MethodError::failed(format!("disk {}: the destination QEMU has no drive {:?} with a medium", d.device, d.device)))
            })
            .collect()
    }

    fn expose(&self, name: String, sock: &Path, allow: &[String], id: &str, received: &ByteCount) -> Result<ExposeGuard, MethodError> {
        self.agent
            .add_expose(ExposeRoute {
                name,
                target: Endpoint::Unix(sock.to_path_buf()),
                allow: allow.to_vec(),
                migration: Some(id.to_string()),
                received: Some(received.clone()),
            })
            .map_err(|e| MethodError::failed(e.to_string()))
    }

    async fn finish(&self, session: &Session, req: FinishRequest) -> Result<FinishReply, MethodError> {
        if req.success {
            crate::failpoint::hit("destination-at-finish");
        }
        let prepared = match self.take(&req.migration, session.peer.name())? {
            Some(p) => p,
            // Not waiting for a finish (any more): the answer is the journal's.
            None => return self.answer_again(&req, session.peer.name()),
        };
        if !req.success {
            self.cleanup(&req.migration, &prepared, "the source reported failure").await;
            return Ok(FinishReply { guest_kept: false, detail: "destination QEMU quit".into() });
        }
        let qmp = &prepared.qmp;
        let t0 = std::time::Instant::now();
        self.update(&req.migration, |v| {
            v.phase = "finish";
            v.step = None;
        });
        let mut record = self.record_of(&req.migration, &prepared);
        let result = async {
            // The source reports `completed` as soon as it has sent everything; this side may
            // still be loading device state. Take over only a fully loaded guest.
            wait_incoming_complete(qmp).await?;
            debug!(migration = %req.migration, ms = t0.elapsed().as_secs_f64() * 1e3, "incoming migration completed");
            if qmp.execute("nbd-server-stop", json!({})).await.is_err() {
                // No NBD server when no disk was copied: nothing to stop.
            }
            // The decision, durably, before the guest runs a single instruction here: from
            // this record on, a restarted agent completes the handover instead of quitting.
            record.state = IncomingState::Handover { resume: req.resume };
            self.journal.put_incoming(&record).map_err(|e| crate::qmp::QmpError::Protocol(format!("cannot journal the handover: {e}")))?;
            crate::failpoint::hit("destination-after-handover-record");
            if req.resume {
                qmp.execute("cont", json!({})).await?;
            }
            crate::failpoint::hit("destination-after-cont");
            Ok::<_, crate::qmp::QmpError>(())
        }
        .await;
        match result {
            Ok(()) => {
                info!(migration = %req.migration, resumed = req.resume, ms = t0.elapsed().as_secs_f64() * 1e3, "finished: the guest lives here now");
                self.agent.metrics().migrations.end(&prepared.source, "incoming", "succeeded", prepared.started.elapsed().as_secs_f64());
                self.kept(&mut record);
                let how = if req.resume { "the guest runs here" } else { "the guest is held here, paused as on the source" };
                self.ended(&req.migration, OutcomeKind::Succeeded, how);
                Ok(FinishReply { guest_kept: true, detail: String::new() })
            }
            Err(e) => {
                warn!(migration = %req.migration, error = %e, "finish failed; quitting the destination QEMU so the source can resume");
                self.cleanup(&req.migration, &prepared, &format!("finish failed: {e}")).await;
                Ok(FinishReply { guest_kept: false, detail: format!("destination could not resume the guest: {e}") })
            }
        }
    }

    /// The handover is done: the guest is this host's. Its images stay; the sockets go, and
    /// the run dir with its QEMU.
    fn kept(&self, record: &mut IncomingRecord) {
        let _ = std::fs::remove_file(record.dir.join("migration.sock"));
        let _ = std::fs::remove_file(record.dir.join("nbd.sock"));
        record.state = IncomingState::Kept;
        record.detail = "the guest runs here".into();
        if let Err(e) = self.journal.put_incoming(record) {
            // The Handover record already says the guest is ours: recovery reaches the same end.
            warn!(migration = %record.id, error = %e, "cannot journal the end of the handover");
        }
        self.remove_run_dir_when_gone(record);
    }

    fn record_of(&self, id: &str, p: &Prepared) -> IncomingRecord {
        IncomingRecord {
            id: id.to_string(),
            source: p.source.clone(),
            dir: p.dir.clone(),
            qemu: p.qemu,
            state: IncomingState::Prepared,
            detail: String::new(),
            updated: 0,
        }
    }

    /// `finish` for a migration that no longer waits for one: the same answer as the first
    /// time, from the journal; "ask again" (409) while another `finish` or the cleanup is
    /// still deciding.
    fn answer_again(&self, req: &FinishRequest, peer: &str) -> Result<FinishReply, MethodError> {
        let id = &req.migration;
        let Some(r) = self.journal.incoming_record(id) else {
            return Err(MethodError::refused(
                404,
                "no-record",
                format!("{} has no record of migration {id} (never prepared here, or its journal was lost)", self.agent.name()),
            ));
        };
        if r.source != peer {
            return Err(MethodError::refused(403, "not-its-source", "another host's migration"));
        }
        match r.state {
            IncomingState::Kept if req.success => {
                info!(migration = %id, "finish again: the guest runs here (answered from the journal)");
                Ok(FinishReply { guest_kept: true, detail: String::new() })
            }
            IncomingState::Kept => Err(MethodError::refused(
                409,
                "guest-kept",
                format!("the guest of migration {id} runs on {} since its handover; it is not quit on a later failure report", self.agent.name()),
            )),
            IncomingState::Abandoned => {
                info!(migration = %id, detail = %r.detail, "finish again: the migration was abandoned here (answered from the journal)");
                Ok(FinishReply { guest_kept: false, detail: format!("the destination abandoned the migration: {}", r.detail) })
            }
            IncomingState::Preparing | IncomingState::Prepared | IncomingState::Handover { .. } => Err(MethodError::refused(
                409,
                "deciding",
                format!("migration {id} is still being finished or cleaned up on {}; ask again", self.agent.name()),
            )),
        }
    }

    async fn receive_file(&self, session: &Session, header: FileHeader, mut upload: Upload) -> Result<serde_json::Value, MethodError> {
        let dir = {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            let p = active
                .get(&header.migration)
                .ok_or_else(|| MethodError::bad_request(format!("no migration {} here", header.migration)))?;
            if p.source != session.peer.name() {
                return Err(MethodError::refused(403, "not-its-source", "another host's migration"));
            }
            self.images_of(&header.migration)
        };
        migtun_proxy::route::wire::validate_name(&header.name)
            .map_err(|why| MethodError::bad_request(format!("file name {:?}: {why}", header.name)))?;
        let limit = self.limits.max_upload_bytes;
        let too_large = |what: String| {
            MethodError::refused(413, "upload-too-large", format!("{}: {what}, more than [qemu] max_upload_bytes = {limit} of {}", header.name, self.agent.name()))
        };
        if header.size > limit {
            return Err(too_large(format!("{} bytes announced", header.size)));
        }
        // Plain (no `.`/`..`), and never over an existing file (a disk image, an earlier upload).
        let dest = paths::file_in(&dir, &header.name, "uploaded file").map_err(|e| MethodError::forbidden(e.to_string()))?;
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(MethodError::forbidden(format!("{}: exists already; the destination never overwrites a file", header.name)));
        }
        let tmp = dir.join(format!(".{}.partial", header.name));
        // Whatever ends the upload early (a refusal, a reset stream, a full disk), the partial
        // file goes.
        let partial = RemoveOnDrop(Some(tmp.clone()));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(|e| MethodError::failed(format!("{}: {e}", tmp.display())))?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = upload.chunk().await {
            let chunk = chunk.map_err(|e| MethodError::failed(format!("receiving {}: {e}", header.name)))?;
            n += chunk.len() as u64;
            if n > limit {
                return Err(too_large(format!("more than {limit} bytes sent")));
            }
            if n > header.size {
                return Err(MethodError::bad_request(format!("{}: more than the announced {} bytes", header.name, header.size)));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| MethodError::failed(format!("{}: {e}", tmp.display())))?;
        }
        file.sync_all().await.map_err(|e| MethodError::failed(e.to_string()))?;
        let sha = hex::encode(hasher.finalize());
        if n != header.size || sha != header.sha256 {
            return Err(MethodError::bad_request(format!("{}: received {n} bytes with sha256 {sha}, expected {} bytes {}", header.name, header.size, header.sha256)));
        }
        // A link, not a rename: it fails instead of replacing a file already there.
        std::fs::hard_link(&tmp, &dest).map_err(|e| MethodError::bad_request(format!("{}: {e}", dest.display())))?;
        drop(partial);
        Ok(json!({ "path": dest, "bytes": n, "sha256": sha }))
    }

    /// The prepared migration `id` of `peer`, taken out of the active ones (so that exactly
    /// one of `finish` and the abandonment deals with it); `None` if it is not active.
    fn take(&self, id: &str, peer: &str) -> Result<Option<Arc<Prepared>>, MethodError> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        match active.get(id) {
            None => Ok(None),
            Some(p) if p.source != peer => Err(MethodError::refused(403, "not-its-source", "another host's migration")),
            Some(_) => Ok(active.remove(id)),
        }
    }

    /// Ends a prepared migration that will not finish: quit QEMU, remove routes and files.
    async fn abandon(&self, id: &str, reason: &str) {
        let prepared = self.active.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        if let Some(p) = prepared {
            self.cleanup(id, &p, reason).await;
        }
    }

    async fn cleanup(&self, id: &str, p: &Prepared, reason: &str) {
        warn!(migration = %id, source = %p.source, reason, "abandoning the migration: quitting the destination QEMU");
        self.ended(id, OutcomeKind::Failed, &format!("abandoned: {reason}; the destination QEMU was quit"));
        quit_qemu(&p.qmp, p.qemu).await;
        self.remove_dir(&p.dir);
        self.agent.metrics().migrations.end(&p.source, "incoming", "failed", p.started.elapsed().as_secs_f64());
        let mut record = self.record_of(id, p);
        record.state = IncomingState::Abandoned;
        record.detail = reason.to_string();
        if let Err(e) = self.journal.put_incoming(&record) {
            warn!(migration = %id, error = %e, "cannot journal the abandonment");
        }
    }

    /// Finishes what the journal says was unfinished when this agent last stopped. Runs before
    /// the agent answers any peer, so that every answer `finish` gives comes from a settled
    /// record.
    pub async fn recover(&self) {
        self.journal.prune_incoming();
        for r in self.journal.incoming() {
            let mut r = match r {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "skipping an unreadable journal record");
                    continue;
                }
            };
            match r.state {
                IncomingState::Kept => self.remove_run_dir_when_gone(&r),
                IncomingState::Abandoned => continue,
                IncomingState::Preparing => {
                    // Prepare never answered: the source rolled back. A QEMU the hook started
                    // is found by its pidfile and verified by its command line.
                    warn!(migration = %r.id, source = %r.source, "recovery: the agent stopped during prepare; removing what it started");
                    self.kill_hook_qemu(&r.dir).await;
                    self.forget(&r.dir, &r.id, "the destination agent restarted during prepare");
                }
                IncomingState::Prepared => {
                    warn!(migration = %r.id, source = %r.source, "recovery: the agent stopped before finish; quitting the orphaned destination QEMU");
                    self.stop_orphan(&r).await;
                    self.remove_dir(&r.dir);
                    r.state = IncomingState::Abandoned;
                    r.detail = "the destination agent restarted before finish; its QEMU was quit".into();
                    if let Err(e) = self.journal.put_incoming(&r) {
                        warn!(migration = %r.id, error = %e, "cannot journal the abandonment");
                    }
                }
                IncomingState::Handover { resume } => match self.complete_handover(&r, resume).await {
                    Ok(()) => {
                        info!(migration = %r.id, source = %r.source, resumed = resume, "recovery: completed the handover; the guest lives here now");
                        self.kept(&mut r);
                    }
                    Err(why) => {
                        // The guest ran here for at most a moment (between `cont` and the next
                        // journal write), or not at all: the source's copy is whole and is the
                        // one to run.
                        warn!(migration = %r.id, source = %r.source, %why, "recovery: the handover cannot be completed; the source keeps the guest");
                        self.stop_orphan(&r).await;
                        self.remove_dir(&r.dir);
                        r.state = IncomingState::Abandoned;
                        r.detail = format!("the destination agent restarted during the handover and {why}");
                        if let Err(e) = self.journal.put_incoming(&r) {
                            warn!(migration = %r.id, error = %e, "cannot journal the abandonment");
                        }
                    }
                },
            }
        }
    }

    /// Quits (or kills) the QEMU of a journalled migration, if that very process still runs.
    async fn stop_orphan(&self, r: &IncomingRecord) {
        let Some(p) = r.qemu.and_then(Process::open) else { return };
        if let Ok(Ok(qmp)) = tokio::time::timeout(RECOVERY_CONNECT, Qmp::connect(&r.dir.join("qmp.sock"))).await {
            if qmp.peer_pid() == Some(p.id().pid) {
                let _ = qmp.execute_with_timeout("quit", json!({}), QUIT_GRACE).await;
            }
        }
        if !wait_gone(&p, QUIT_GRACE).await {
            warn!(migration = %r.id, pid = p.id().pid, "the orphaned QEMU did not quit; killing it");
            let _ = p.signal(libc::SIGKILL);
            wait_gone(&p, QUIT_GRACE).await;
        }
    }

    /// A decided handover whose agent died: the QEMU must still be the journalled one, its
    /// incoming migration completed; then it is resumed (if the guest ran on the source).
    async fn complete_handover(&self, r: &IncomingRecord, resume: bool) -> Result<(), String> {
        let p = r.qemu.and_then(Process::open).ok_or("its QEMU has exited")?;
        let qmp = tokio::time::timeout(RECOVERY_CONNECT, Qmp::connect(&r.dir.join("qmp.sock")))
            .await
            .map_err(|_| "its QEMU's monitor does not answer".to_string())?
            .map_err(|e| format!("its QEMU's monitor: {e}"))?;
        if qmp.peer_pid() != Some(p.id().pid) {
            return Err("another process answers on its QEMU's monitor".into());
        }
        let info = qmp.query_migrate().await.map_err(|e| e.to_string())?;
        if info.status != "completed" {
            return Err(format!("its incoming migration is {:?}, not completed", info.status));
        }
        if resume {
            qmp.execute("cont", json!({})).await.map_err(|e| format!("cont failed: {e}"))?;
        }
        Ok(())
    }
}

/// The QEMU a prepare hook started for the migration in `dir`: its pidfile's pid, if that
/// process's command line names `dir`'s QMP socket.
fn hook_qemu(dir: &Path) -> Option<Process> {
    hook_qemu_of(dir, pidfile(dir)?)
}

/// The pid the prepare hook's QEMU wrote into `dir/qemu.pid`.
fn pidfile(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("qemu.pid")).ok()?.trim().parse().ok()
}

/// [`hook_qemu`] for a pid already read.
fn hook_qemu_of(dir: &Path, pid: u32) -> Option<Process> {
    let p = Process::open(ProcessId::of(pid)?)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let qmp = dir.join("qmp.sock");
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(&*qmp.to_string_lossy()));
    ours.then_some(p)
}

/// Why the QMP connect to the QEMU in `dir` failed, if that QEMU has exited (or exits within
/// [`EXITED_QEMU_WAIT`]): the same words whether the connect was refused (QEMU was gone) or
/// dropped (QEMU was going), with its pid and the end of its log. `None` if it still runs.
async fn exited_qemu(dir: &Path) -> Option<String> {
    let pid = pidfile(dir);
    if let Some(p) = pid.and_then(|pid| hook_qemu_of(dir, pid)) {
        if !wait_gone(&p, EXITED_QEMU_WAIT).await {
            return None;
        }
    }
    let who = match pid {
        Some(pid) => format!("the QEMU the prepare hook started (pid {pid}) has exited"),
        None => "no QEMU is left (it wrote no pidfile)".to_string(),
    };
    let log = dir.join("qemu.log");
    let tail = log_tail(&log);
    let tail = if tail.is_empty() { String::new() } else { format!("; {}: {tail}", log.display()) };
    Some(format!("QEMU closed the QMP socket: {who}{tail}"))
}

/// The last lines of a log, at most [`LOG_TAIL_BYTES`] of it, joined with " / ".
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(LOG_TAIL_BYTES).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

/// Waits until `p` has exited; false if it still runs after `grace`.
async fn wait_gone(p: &Process, grace: Duration) -> bool {
    p.id().wait_exit(grace).await
}

/// Waits until the incoming migration has completed here (or fails if it did not): on the
/// destination's `MIGRATION` events (Prepare enables the `events` capability), with
/// `query-migrate` as the source of truth.
async fn wait_incoming_complete(qmp: &Qmp) -> Result<(), crate::qmp::QmpError> {
    let result = qmp.wait_until("the incoming migration to complete", &["MIGRATION"], STATUS_RECHECK, INCOMING_COMPLETE_TIMEOUT, || async {
        let info = qmp.query_migrate().await?;
        match info.status.as_str() {
            "completed" => Ok(Some(())),
            "failed" | "cancelled" => Err(crate::qmp::QmpError::Protocol(format!(
                "the incoming migration {}: {}",
                info.status,
                info.error_desc.unwrap_or_default()
            ))),
            _ => Ok(None),
        }
    })
    .await;
    match result {
        Err(crate::qmp::QmpError::Timeout { .. }) => {
            let status = qmp.query_migrate().await.map(|i| i.status).unwrap_or_else(|e| e.to_string());
            Err(crate::qmp::QmpError::Protocol(format!(
                "the incoming migration is still {status:?} after {}s",
                INCOMING_COMPLETE_TIMEOUT.as_secs()
            )))
        }
        other => other,
    }
}

/// Removes a file when dropped (a partial upload).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A refused cookie: a 403 naming what was refused, and a log line.
fn refused(id: &str, source: &str, e: Refusal) -> MethodError {
    warn!(migration = %crate::destination::shorten(id), %source, reason = %e, "refused an incoming migration");
    MethodError::forbidden(format!("the destination refuses this migration: {e}"))
}

/// What the prepare hook reads on stdin: the cookie's fields, plus what the destination
/// decided (README.md, "The prepare hook"). The hook runs `argv` as given and creates `images`.
#[derive(serde::Serialize)]
struct HookInput<'a> {
    #[serde(flatten)]
    cookie: &'a Cookie,
    /// `qemu.emulator`; `argv[0]`.
    emulator: &'a Path,
    argv: &'a [String],
    /// Fresh files to create (none exists yet) before QEMU starts.
    images: &'a [cmdline::Image],
    /// The QMP socket `argv` makes; the hook prints it.
    qmp: &'a Path,
    pidfile: &'a Path,
    /// Where QEMU's stdout and stderr go.
    log: &'a Path,
}

/// Runs the prepare hook: its input on stdin, the QMP socket path on the last line of stdout.
async fn run_hook(hook: &Path, input: &HookInput<'_>) -> Result<PathBuf, String> {
    let input = serde_json::to_vec_pretty(input).map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new(hook)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run the prepare hook {}: {e}", hook.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its input gets EPIPE here; its exit status tells the story.
        let _ = stdin.write_all(&input).await;
    }
    let output = tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("the prepare hook {} did not finish within {}s", hook.display(), HOOK_TIMEOUT.as_secs()))?
        .map_err(|e| format!("the prepare hook {}: {e}", hook.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
    if !output.status.success() {
        return Err(format!("the prepare hook {} failed ({}): {}", hook.display(), output.status, tail.join(" / ")));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).map(str::trim).unwrap_or_default();
    if !line.starts_with('/') {
        return Err(format!("the prepare hook {} must print the destination QMP socket's absolute path; it printed {line:?}", hook.display()));
    }
    Ok(PathBuf::from(line))
}

/// Quits QEMU over QMP; kills it if it does not go (that very process: a pidfd).
async fn quit_qemu(qmp: &Qmp, qemu: Option<ProcessId>) {
    let process = qemu.and_then(Process::open);
    let _ = qmp.execute_with_timeout("quit", json!({}), QUIT_GRACE).await;
    let Some(p) = process else { return };
    if !wait_gone(&p, QUIT_GRACE).await {
        warn!(pid = p.id().pid, "QEMU did not quit; killing it");
        let _ = p.signal(libc::SIGKILL);
        wait_gone(&p, QUIT_GRACE).await;
    }
}
