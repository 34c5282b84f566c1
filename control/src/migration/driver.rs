//! The source's driver: performs the [`Machine`]'s actions against QMP, the destination's
//! control RPC and the agent's routes, and feeds every result and every QEMU event back.
//!
//! The machine decides everything (order, rollback, the point of no return); this module only
//! translates. One migration is one task: actions run one at a time in the order the machine
//! gave them; between actions the task waits for QEMU events, a progress tick, a cancel
//! request, or the loss of the destination's control connection.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use migtun_proxy::agent::{AgentHandle, DynamicForward, ForwardGuard};
use migtun_proxy::endpoint::Endpoint;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::admin::Tracked;
use crate::migration::journal::{Journal, OutgoingRecord, OutgoingStage, SavedSettings};
use crate::process::ProcessId;
use crate::migration::teardown;
use crate::migration::machine::{
    Action, Disk, DiskSelection, Event, Machine, MigrationId, MigrationSettings, MigrationStatus, Options, Outcome, PerformStep, Phase,
    PrepareRequest, Progress, Report as MachineReport, Routes, SideFile, Step, VmInfo,
};
use crate::messages::{Cookie, DiskSpec, FinishReply, FinishRequest, MigrateArgs, MigrationParams, OutcomeKind, PrepareReply, Report, Totals};
use crate::progress::{eta, RateMeter};
use crate::qmp::{Event as QmpEvent, Qmp};
use crate::rpc::{FileHeader, RpcClient};

/// How often progress is polled (`query-migrate`, `query-block-jobs`) and reported.
const PROGRESS_TICK: Duration = Duration::from_millis(500);
/// A side-channel file may take this long to upload.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// Prepare starts a QEMU on the destination: allow for a slow hook.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// With nothing happening at all (no event, no progress) for this long, the machine is told
/// that time is up, so that it rolls back rather than hang on a stuck QEMU or peer.
const STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// `Finish(failure)` is best effort: the destination also cleans up by itself when the control
/// connection ends, so a rollback never waits longer than this for a stalled peer's answer.
const FINISH_FAILURE_TIMEOUT: Duration = Duration::from_secs(5);
/// `query-yank` and `yank` run out of band in QEMU's monitor thread: they answer at once.
const YANK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the source side needs to run migrations.
pub struct Outgoing {
    pub agent: AgentHandle,
    /// Private sockets of migrations live in `run_dir/<id>/`.
    pub run_dir: PathBuf,
    pub journal: Arc<Journal>,
}

/// Runs one migration to its end, reporting to `tracked`.
pub async fn run(out: Arc<Outgoing>, args: MigrateArgs, tracked: Arc<Tracked>) {
    let metrics = out.agent.metrics();
    let started = std::time::Instant::now();
    let mut gauge = metrics.migrations.begin(&args.to, "outgoing", "begin");
    let (outcome, message, totals) = match drive(&out, &args, &tracked, &mut gauge).await {
        Ok(o) => o,
        Err(reason) => (OutcomeKind::Refused, reason, Totals::default()),
    };
    drop(gauge);
    metrics.migrations.end(&args.to, "outgoing", outcome_label(outcome), started.elapsed().as_secs_f64());
    info!(migration = %tracked.id, outcome = outcome_label(outcome), %message, "migration ended");
    tracked.report(Report::done(outcome, message, totals));
}

/// The fixed word of an outcome in metrics.
pub fn outcome_label(o: OutcomeKind) -> &'static str {
    match o {
        OutcomeKind::Succeeded => "succeeded",
        OutcomeKind::Failed => "failed",
        OutcomeKind::Cancelled => "cancelled",
        OutcomeKind::Refused => "refused",
        OutcomeKind::Unknown => "unknown",
    }
}

/// The fixed word of a phase in metrics.
fn phase_label(p: crate::migration::machine::Phase) -> &'static str {
    use crate::migration::machine::Phase;
    match p {
        Phase::Begin => "begin",
        Phase::Prepare => "prepare",
        Phase::Perform(_) => "perform",
        Phase::Finish => "finish",
        Phase::Confirm | Phase::Done => "confirm",
    }
}

async fn drive(
    out: &Outgoing,
    args: &MigrateArgs,
    tracked: &Tracked,
    gauge: &mut migtun_proxy::metrics::MigrationGauge,
) -> Result<(OutcomeKind, String, Totals), String> {
    let id = tracked.id.clone();
    // The VM's monitor and the destination agent, at the same time.
    let (qmp, rpc) = tokio::try_join!(async { Qmp::connect(&args.qmp).await.map_err(|e| e.to_string()) }, async {
        let io = out.agent.connect_control(&args.to).await.map_err(|e| e.to_string())?;
        RpcClient::connect(io, &args.to, out.agent.name()).await.map_err(|e| e.to_string())
    })?;
    rpc.require("prepare").map_err(|e| e.to_string())?;
    tracked.report(Report::Log {
        message: format!("{} runs migtun {} (control protocol {})", args.to, rpc.peer_hello().agent, rpc.peer_hello().version),
    });

    let options = Options {
        disks: if args.shared_storage {
            DiskSelection::SharedStorage
        } else if let Some(d) = &args.disks {
            DiskSelection::Only(d.clone())
        } else {
            DiskSelection::All
        },
        parallel: match args.parallel {
            Some(n) => Some(n),
            None => {
                let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                let major = qmp.execute("query-version", serde_json::json!({})).await.ok().and_then(|v| v["qemu"]["major"].as_u64());
                crate::migration::machine::default_parallel(cpus, args.postcopy, major)
            }
        },
        postcopy: args.postcopy,
        max_bandwidth: args.max_bandwidth,
        downtime_ms: args.downtime_ms,
        force: args.force,
        files: args
            .files
            .iter()
            .map(|p| SideFile { name: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), path: p.clone() })
            .collect(),
    };
    if let (None, Some(n)) = (args.parallel, options.parallel) {
        tracked.report(Report::Log {
            message: format!("multifd with {n} channels, the default (--parallel 1 for one stream)"),
        });
    }
    let mut exec = Executor {
        id: id.clone(),
        qmp: Arc::new(qmp),
        rpc,
        targets: Arc::default(),
        stream_aborts: Arc::default(),
        agent: out.agent.clone(),
        dir: out.run_dir.join(&id),
        source_qmp: args.qmp.clone(),
        to: args.to.clone(),
        prelaunch: false,
        vm: tracked.vm.clone(),
        cmdline: Vec::new(),
        disks: HashMap::new(),
        forwards: Vec::new(),
        totals: None,
        job_bytes: HashMap::new(),
        ram_bytes: 0,
        mirror_rate: RateMeter::default(),
        ram_rate: RateMeter::default(),
        migration_started: false,
        last_status: String::new(),
        saved_settings: None,
        journal: out.journal.clone(),
        record: None,
    };
    let started = std::time::Instant::now();
    let mut events = exec.qmp.events();
    let (mut machine, first) = Machine::new(MigrationId(id.clone()), options);
    let mut queue: VecDeque<Action> = first.into();
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    // After a stall (a QMP query that took long), one tick, not a burst of them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let _watcher = {
        let (qmp, targets, closed, id) = (exec.qmp.clone(), exec.targets.clone(), exec.rpc.closed_token(), id.clone());
        let streams = exec.stream_aborts.clone();
        AbortOnDrop(tokio::spawn(async move {
            closed.cancelled().await;
            let ours = targets.lock().unwrap_or_else(|p| p.into_inner()).clone();
            cut_peer_connections(&qmp, &ours, &id).await;
            // And the streams themselves: QEMU's NBD clients and migration stream see their
            // sockets close now, not when TCP gives up on the vanished peer.
            for abort in streams.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                abort.cancel();
            }
        }))
    };
    let mut last_phase = None;
    let mut cancel_sent = false;
    let mut peer_lost_sent = false;
    let mut last_activity = tokio::time::Instant::now();
    // The QMP event stream is open until the source QEMU goes away; then it is polled no more
    // (a closed channel is ready at once: polling it is a busy loop).
    let mut qemu_lost_sent = false;
    let mut settled = false;
    loop {
        while let Some(action) = queue.pop_front() {
            if let Some(event) = exec.perform(action, tracked).await {
                queue.extend(machine.handle(event));
            }
            // A command found the QMP connection closed: the machine learns it at once, before
            // it acts on the source QEMU again.
            if !qemu_lost_sent && exec.qmp.is_closed() {
                qemu_lost_sent = true;
                queue.extend(machine.handle(Event::QemuLost(QEMU_GONE.to_string())));
            }
            let phase = machine.phase();
            // An unknown outcome is not the end: `recovery::settle` reports the phase.
            let unsettled = matches!(machine.outcome(), Some(Outcome::Unknown { .. })) && !args.postcopy && !settled;
            if last_phase != Some(phase) && !unsettled {
                tracked.report(phase_report(phase));
                gauge.set_phase(phase_label(phase));
                last_phase = Some(phase);
            }
        }
        if let Some(Outcome::Unknown { reason }) = machine.outcome() {
            if !args.postcopy && !settled {
                // Past the point of no return without an answer: only the destination knows
                // whether the guest runs there. Ask it until it says (or the operator decides).
                settled = true;
                gauge.set_phase("unknown");
                let resume = machine.was_running();
                tracked.report(Report::Log { message: format!("the outcome is not known yet ({reason}); asking {} until it answers", args.to) });
                let answer = crate::migration::recovery::settle(&out.agent, &args.to, &id, resume, tracked).await;
                queue.extend(machine.handle(Event::Finished(answer)));
                continue;
            }
        }
        if let Some(outcome) = machine.outcome() {
            exec.cleanup_dir();
            if !matches!(outcome, Outcome::Unknown { .. }) || args.postcopy {
                if let Err(e) = out.journal.remove_outgoing(&id) {
                    warn!(migration = %id, error = %e, "cannot remove the journal record of an ended migration");
                }
            }
            let rolled_back = matches!(outcome, Outcome::Failed { .. } | Outcome::Cancelled);
            if rolled_back && !exec.qmp.is_closed() {
                // Rolled back: the source runs on as before, with its own migration settings.
                exec.restore_settings().await;
                if exec.prelaunch {
                    if let Err(e) = teardown::restore_prelaunch(&exec.qmp).await {
                        warn!(migration = %id, error = %e, "could not bring the never-run guest back to prelaunch");
                    }
                }
            }
            let (kind, mut message) = summarize(outcome);
            if kind == OutcomeKind::Succeeded {
                message = format!("{message} ({})", exec.summary(started.elapsed()));
                exec.count_success(&out.agent.metrics().migrations);
            }
            if rolled_back {
                if let Some(state) = exec.source_state(machine.was_running()).await {
                    message = format!("{message}; {state}");
                }
            }
            return Ok((kind, message, exec.totals()));
        }
        let event = tokio::select! {
            // The user and the peer first: a stream of QEMU events or ticks never delays them.
            biased;
            _ = tracked.cancel.cancelled(), if !cancel_sent => {
                cancel_sent = true;
                Some(Event::CancelRequested)
            }
            _ = exec.rpc.closed(), if !peer_lost_sent => {
                // The watcher has already cut the source QEMU's connections to the peer.
                peer_lost_sent = true;
                Some(Event::PeerLost(format!("the control connection to {} ended", args.to)))
            }
            ev = events.recv(), if !qemu_lost_sent => match ev {
                Ok(ev) => exec.translate(&ev),
                Err(broadcast::error::RecvError::Lagged(_)) => None,
                // QEMU went away (exited, killed): one event, and the channel is not polled again.
                Err(broadcast::error::RecvError::Closed) => {
                    qemu_lost_sent = true;
                    Some(Event::QemuLost(QEMU_GONE.to_string()))
                }
            },
            _ = tick.tick() => exec.progress(tracked).await,
        };
        match event {
            Some(Event::Progress(_)) | None => {
                if last_activity.elapsed() > STALL_TIMEOUT {
                    last_activity = tokio::time::Instant::now();
                    queue.extend(machine.handle(Event::TimedOut));
                } else if let Some(e) = event {
                    queue.extend(machine.handle(e));
                }
            }
            Some(e) => {
                last_activity = tokio::time::Instant::now();
                queue.extend(machine.handle(e));
            }
        }
    }
}

/// The `phase` report of a machine phase: a kebab id, the perform step apart, and a sentence.
fn phase_report(phase: Phase) -> Report {
    let (id, step, message) = match phase {
        Phase::Begin => ("begin", None, "inspecting the VM"),
        Phase::Prepare => ("prepare", None, "the destination starts its QEMU"),
        Phase::Perform(step) => {
            let message = match step {
                PerformStep::OpeningForwards => "opening this migration's routes through the tunnel",
                PerformStep::StartingMirrors => "starting the disk mirrors",
                PerformStep::SyncingDisks => "copying the disks while the guest runs on",
                PerformStep::StartingMigration => "starting the RAM migration",
                PerformStep::Migrating => "copying RAM",
                PerformStep::CompletingMirrors => "switchover: completing the disk mirrors",
                PerformStep::Switchover => "switchover: the last RAM pages and device state",
            };
            ("perform", Some(step), message)
        }
        Phase::Finish => ("finish", None, "handing the guest over"),
        Phase::Confirm => ("confirm", None, "finishing on the source"),
        Phase::Done => ("done", None, "done"),
    };
    // PerformStep serializes as its kebab-case name.
    let step = step.and_then(|s| serde_json::to_value(s).ok()).and_then(|v| v.as_str().map(str::to_string));
    Report::Phase { phase: id.to_string(), step, message: message.to_string() }
}

/// The destination is gone or stalled: cuts the source QEMU's connections to it (the NBD
/// clients of our targets `ours` and the migration stream) with `yank`, out of band. With NBD
/// requests in flight to a peer that does not answer, QEMU's main loop can block in a drain
/// (the SIGSTOP and link-cut tests saw `query-status` go unanswered), so that no in-band
/// command of the rollback, not even the one that resumes the guest, would run until the peer
/// woke up or TCP gave up. Run by a watcher the moment the control connection ends, whatever
/// the migration's task is waiting for.
async fn cut_peer_connections(qmp: &Qmp, ours: &[String], id: &str) {
    let present = match qmp.execute_oob("query-yank", Value::Null, YANK_TIMEOUT).await {
        Ok(v) => v.as_array().cloned().unwrap_or_default(),
        Err(e) => {
            warn!(migration = %id, error = %e, "query-yank failed; the rollback may wait for the lost destination");
            return;
        }
    };
    // The source QEMU runs one migration at a time: a migration instance present is ours.
    let instances: Vec<Value> = present
        .into_iter()
        .filter(|i| match i["type"].as_str() {
            Some("block-node") => i["node-name"].as_str().is_some_and(|n| ours.iter().any(|o| o == n)),
            Some("migration") => true,
            _ => false,
        })
        .collect();
    if instances.is_empty() {
        return;
    }
    match qmp.execute_oob("yank", json!({ "instances": instances }), YANK_TIMEOUT).await {
        Ok(_) => info!(migration = %id, instances = %serde_json::Value::Array(instances), "cut the source QEMU's connections to the lost destination"),
        Err(e) => warn!(migration = %id, error = %e, "yank failed; the rollback may wait for the lost destination"),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the machine hears [`Event::QemuLost`].
const QEMU_GONE: &str = "its QMP connection closed";

fn summarize(outcome: &Outcome) -> (OutcomeKind, String) {
    let kind = match outcome {
        Outcome::Succeeded => OutcomeKind::Succeeded,
        Outcome::Failed { .. } => OutcomeKind::Failed,
        Outcome::Refused { .. } => OutcomeKind::Refused,
        Outcome::Cancelled => OutcomeKind::Cancelled,
        Outcome::Unknown { .. } => OutcomeKind::Unknown,
    };
    let message = match outcome {
        Outcome::Succeeded => "the guest now lives on the destination; the source QEMU has quit".to_string(),
        // What became of the guest is added from the source QEMU's state
        // ([`Executor::source_state`]), not assumed.
        other => other.to_string(),
    };
    (kind, message)
}

/// The I/O side of one migration.
struct Executor {
    /// `query-migrate` at completion, for the summary.
    totals: Option<Value>,
    /// Bytes each mirror job copied (its offset: last poll or event).
    job_bytes: HashMap<String, u64>,
    /// Bytes the RAM migration sent (last poll).
    ram_bytes: u64,
    mirror_rate: RateMeter,
    ram_rate: RateMeter,
    id: String,
    qmp: Arc<Qmp>,
    rpc: RpcClient,
    /// The NBD target nodes added (or being added): what the watcher yanks when the peer is lost.
    targets: Arc<std::sync::Mutex<Vec<String>>>,
    /// The forwards' stream aborts: what the watcher cuts when the peer is lost.
    stream_aborts: Arc<std::sync::Mutex<Vec<tokio_util::sync::CancellationToken>>>,
    agent: AgentHandle,
    /// `run_dir/<id>`: the forward sockets.
    dir: PathBuf,
    source_qmp: PathBuf,
    /// The destination agent.
    to: String,
    /// The guest had never run when the migration began (`prelaunch`).
    prelaunch: bool,
    vm: String,
    cmdline: Vec<String>,
    /// Disk key (the machine's `Disk::device`) -> (index, disk).
    disks: HashMap<String, (usize, Disk)>,
    forwards: Vec<ForwardGuard>,
    migration_started: bool,
    /// The last migration status seen (event or poll), so each change reaches the machine once.
    last_status: String,
    /// The source's capabilities and parameters before this migration changed them.
    saved_settings: Option<SavedSettings>,
    journal: Arc<Journal>,
    /// This migration's journal record, from Prepare on (before that nothing exists to undo).
    record: Option<OutgoingRecord>,
}

impl Executor {
    fn target_node(&self, disk: &str) -> String {
        format!("mt{}", self.disks.get(disk).map(|d| d.0).unwrap_or(0))
    }

    fn job_id(&self, disk: &str) -> String {
        format!("mj{}", self.disks.get(disk).map(|d| d.0).unwrap_or(0))
    }

    fn disk_of_job(&self, job: &str) -> Option<String> {
        self.disks.iter().find(|(_, (i, _))| format!("mj{i}") == job).map(|(k, _)| k.clone())
    }

    /// Performs one action; the immediate result, if the machine wants one.
    async fn perform(&mut self, action: Action, tracked: &Tracked) -> Option<Event> {
        let step = action.step();
        if let Err(e) = self.journal_before(&action) {
            warn!(migration = %self.id, error = %e, "not going on with a step that cannot be journalled");
            return Some(match action {
                // Not sent: the destination was never told to take the guest, so the source
                // keeps it (the machine rolls back as for a refusal).
                Action::FinishPeer { success: true, .. } => Event::Finished(Err(e)),
                _ => Event::Failed(step.unwrap_or(Step::Inspect), e),
            });
        }
        let started = std::time::Instant::now();
        let result: Result<Option<Event>, String> = match action {
            Action::Report(r) => {
                match r {
                    MachineReport::Info(m) => tracked.report(Report::Log { message: m }),
                    MachineReport::Warning(m) => {
                        warn!(migration = %self.id, "{m}");
                        tracked.report(Report::Log { message: format!("warning: {m}") })
                    }
                    MachineReport::Progress(_) => {}
                }
                return None;
            }
            Action::Inspect => {
                let result = self.inspect().await;
                tracked.set_vm_name(&self.vm);
                result.map(|vm| Some(Event::Inspected(vm)))
            }
            Action::Prepare(req) => self.prepare(req).await.map(|r| Some(Event::Prepared(r))),
            Action::OpenForwards(routes) => self.open_forwards(routes).await.map(|()| None),
            Action::AddNbdTarget(disk) => {
                self.targets.lock().unwrap_or_else(|p| p.into_inner()).push(self.target_node(&disk));
                // The destination exports the disk under its device (the machine's key).
                let args = json!({
                    "driver": "nbd",
                    "server": {"type": "unix", "path": self.dir.join("nbd.sock")},
                    "export": disk,
                    "node-name": self.target_node(&disk),
                });
                self.qmp_do("blockdev-add", args).await
            }
            Action::StartMirror(disk) => {
                let node = self.disks.get(&disk).map(|d| d.1.node_name.clone()).unwrap_or_default();
                let args = json!({
                    "job-id": self.job_id(&disk), "device": node, "target": self.target_node(&disk), "sync": "full",
                });
                self.qmp_do("blockdev-mirror", args).await
            }
            Action::SendFiles(files) => self.send_files(files, tracked).await.map(|()| None),
            Action::SetMigrationSettings(s) => self.set_settings(s).await.map(|()| None),
            Action::StartMigration => {
                // A previous migration of this QEMU may still be cleaning up (its multifd
                // threads): `migrate` would be refused until it has.
                if let Err(e) = teardown::wait_migration_cleaned(&self.qmp).await {
                    return Some(Event::Failed(Step::StartMigration, e));
                }
                self.migration_started = true;
                let uri = format!("unix:{}", self.dir.join("ram.sock").display());
                self.qmp_do("migrate", json!({ "uri": uri })).await
            }
            Action::StartPostcopy => self.qmp_do("migrate-start-postcopy", json!({})).await,
            Action::CompleteMirror(disk) => self.qmp_do("block-job-cancel", json!({"device": self.job_id(&disk)})).await,
            Action::ContinueMigration => self.qmp_do("migrate-continue", json!({"state": "pre-switchover"})).await,
            Action::FinishPeer { success, resume } => {
                if success {
                    crate::failpoint::hit("source-before-finish");
                }
                let req = FinishRequest { migration: self.id.clone(), success, resume };
                let reply = if success {
                    self.rpc.call::<_, FinishReply>("finish", &req).await
                } else {
                    self.rpc.call_with_timeout::<_, FinishReply>("finish", &req, FINISH_FAILURE_TIMEOUT).await
                };
                if success {
                    // The migration has completed on this side: keep its figures for the summary.
                    // Read after the destination's answer, not before it: QEMU fills in
                    // `total-time` and `downtime` a moment after it announces `completed`, and
                    // the destination must not wait for a query it does not need.
                    self.totals = self.qmp.execute("query-migrate", json!({})).await.ok();
                }
                match reply {
                    Ok(r) if r.guest_kept || !success => Ok(Some(Event::Finished(Ok(())))),
                    Ok(r) => Ok(Some(Event::Finished(Err(r.detail)))),
                    Err(e) => Err(e.to_string()),
                }
            }
            Action::QuitSource => {
                // QEMU closes the connection as it quits; that is success.
                let _ = self.qmp.execute("quit", json!({})).await;
                Ok(None)
            }
            Action::ResumeSource => self.qmp_do("cont", json!({})).await,
            Action::CancelMirror(disk) => teardown::cancel_job(&self.qmp, &self.job_id(&disk)).await.map(|()| None),
            Action::CancelMigration => teardown::cancel_migration(&self.qmp).await.map(|()| None),
            Action::RemoveNbdTarget(disk) => {
                // A mirror that failed on an I/O error (the destination went away) is announced
                // by BLOCK_JOB_ERROR before the job has ended, and while it exists it holds the
                // node: QEMU refuses the blockdev-del. So the job is made to end first.
                match teardown::cancel_job(&self.qmp, &self.job_id(&disk)).await {
                    Ok(()) => self.qmp_do("blockdev-del", json!({"node-name": self.target_node(&disk)})).await,
                    Err(e) => Err(e),
                }
            }
            Action::CloseForwards => {
                for f in self.forwards.drain(..) {
                    f.close().await;
                }
                Ok(None)
            }
        };
        let step = step.unwrap_or(Step::Inspect);
        debug!(migration = %self.id, %step, ok = result.is_ok(), ms = started.elapsed().as_secs_f64() * 1e3, "action done");
        match result {
            Ok(Some(e)) => Some(e),
            Ok(None) => Some(Event::Done(step)),
            Err(msg) => Some(Event::Failed(step, msg)),
        }
    }

    async fn qmp_do(&self, cmd: &str, args: Value) -> Result<Option<Event>, String> {
        self.qmp.execute(cmd, args).await.map(|_| None).map_err(|e| e.to_string())
    }

    async fn inspect(&mut self) -> Result<VmInfo, String> {
        // Four queries, one round trip.
        let replies = self
            .qmp
            .execute_pipelined(vec![
                ("query-status", Value::Null),
                ("query-block", Value::Null),
                ("query-block-jobs", Value::Null),
                ("query-migrate", Value::Null),
            ])
            .await
            .map_err(|e| e.to_string())?;
        let [status, blocks, jobs, migrate]: [Value; 4] = replies.try_into().map_err(|_| "QEMU answered four queries with a different number of replies".to_string())?;
        let decode = |what: &str, e: serde_json::Error| format!("unexpected reply to {what}: {e}");
        let status: crate::qmp::Status = serde_json::from_value(status).map_err(|e| decode("query-status", e))?;
        let blocks: Vec<crate::qmp::BlockInfo> = serde_json::from_value(blocks).map_err(|e| decode("query-block", e))?;
        let jobs: Vec<crate::qmp::BlockJobInfo> = serde_json::from_value(jobs).map_err(|e| decode("query-block-jobs", e))?;
        self.prelaunch = status.status == "prelaunch";
        if let Some(pid) = self.qmp.peer_pid() {
            self.cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| b.split(|c| *c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
                .unwrap_or_default();
        }
        if let Some(name) = vm_name(&self.cmdline) {
            self.vm = name;
        }
        let mut disks = Vec::new();
        for b in blocks {
            let Some(ins) = b.inserted else { continue };
            if ins.ro {
                continue;
            }
            let key = disk_key(&b.device, b.qdev.as_deref(), &ins.node_name);
            let format = if ins.image.format.is_empty() { ins.drv.clone() } else { ins.image.format.clone() };
            let disk = Disk { device: key.clone(), node_name: ins.node_name.clone(), size: ins.image.virtual_size, format, file: file_of(&ins.file) };
            self.disks.insert(key, (disks.len(), disk.clone()));
            disks.push(disk);
        }
        let blockers = migrate
            .get("blocked-reasons")
            .and_then(|r| r.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let vfio_devices = self.cmdline.iter().filter(|a| a.contains("vfio-pci")).cloned().collect();
        Ok(VmInfo { running: status.running, disks, has_active_block_jobs: !jobs.is_empty(), blockers, vfio_devices })
    }

    async fn prepare(&mut self, req: PrepareRequest) -> Result<Routes, String> {
        let cookie = Cookie {
            migration: self.id.clone(),
            vm: self.vm.clone(),
            source: self.agent.name().to_string(),
            cmdline: self.cmdline.clone(),
            disks: req
                .disks
                .iter()
                .map(|p| DiskSpec {
                    device: p.disk.device.clone(),
                    // QEMU's automatic names (`#block123`, `-drive` without node-name=) differ
                    // on each host: the destination finds such a disk by its device.
                    node_name: if p.disk.node_name.starts_with('#') { String::new() } else { p.disk.node_name.clone() },
                    size: p.disk.size,
                    format: p.disk.format.clone(),
                    source_file: p.disk.file.clone(),
                    copy: p.copy,
                })
                .collect(),
            params: MigrationParams { multifd_channels: req.multifd_channels, postcopy: req.postcopy },
            image_dir: String::new(),
            running: req.running,
        };
        let reply: PrepareReply = self.rpc.call_with_timeout("prepare", &cookie, PREPARE_TIMEOUT).await.map_err(|e| e.to_string())?;
        info!(migration = %self.id, qemu = %reply.qemu_version, source_qmp = %self.source_qmp.display(), "destination prepared");
        Ok(Routes { ram: reply.ram_route, nbd: reply.nbd_route })
    }

    async fn open_forwards(&mut self, routes: Routes) -> Result<(), String> {
        create_private_dir(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let add = |sock: &str, route: String| DynamicForward {
            listen: Endpoint::Unix(self.dir.join(sock)),
            mode: 0o600,
            peer: self.rpc_peer(),
            route,
            migration: Some(self.id.clone()),
        };
        let mut specs = vec![add("ram.sock", routes.ram)];
        if let Some(nbd) = routes.nbd {
            specs.push(add("nbd.sock", nbd));
        }
        for spec in specs {
            let guard = self.agent.add_forward(spec).await.map_err(|e| e.to_string())?;
            self.stream_aborts.lock().unwrap_or_else(|p| p.into_inner()).push(guard.stream_abort());
            self.forwards.push(guard);
        }
        Ok(())
    }

    fn rpc_peer(&self) -> String {
        self.rpc.peer_hello().name.clone()
    }

    async fn send_files(&self, files: Vec<SideFile>, tracked: &Tracked) -> Result<(), String> {
        for f in files {
            let mut file = tokio::fs::File::open(&f.path).await.map_err(|e| format!("{}: {e}", f.path.display()))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = file.read(&mut buf).await.map_err(|e| format!("{}: {e}", f.path.display()))?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                hasher.update(&buf[..n]);
            }
            let header = FileHeader { migration: self.id.clone(), name: f.name.clone(), size, sha256: hex::encode(hasher.finalize()) };
            let file = tokio::fs::File::open(&f.path).await.map_err(|e| format!("{}: {e}", f.path.display()))?;
            let reply: Value = self.rpc.upload(&header, file, UPLOAD_TIMEOUT).await.map_err(|e| e.to_string())?;
            tracked.report(Report::Log { message: format!("sent {} ({size} bytes, sha256 verified by the destination: {})", f.name, reply["path"]) });
        }
        Ok(())
    }

    /// Sets the source's migration capabilities and parameters, after reading the values they
    /// replace (restored by [`Executor::restore_settings`] if the migration rolls back).
    async fn set_settings(&mut self, s: MigrationSettings) -> Result<(), String> {
        // `events`: without it QEMU sends no MIGRATION events (progress polling would still see
        // the status change, a tick later).
        let mut caps = vec![
            ("events", true),
            ("pause-before-switchover", s.pause_before_switchover),
            ("multifd", s.multifd_channels.is_some()),
        ];
        if s.postcopy {
            caps.push(("postcopy-ram", true));
        }
        let mut params = serde_json::Map::new();
        if let Some(n) = s.multifd_channels {
            params.insert("multifd-channels".into(), json!(n));
        }
        params.insert("max-bandwidth".into(), json!(s.max_bandwidth));
        if let Some(d) = s.downtime_ms {
            params.insert("downtime-limit".into(), json!(d));
        }
        let before = self
            .qmp
            .execute_pipelined(vec![("query-migrate-capabilities", Value::Null), ("query-migrate-parameters", Value::Null)])
            .await
            .map_err(|e| e.to_string())?;
        let old_caps: Vec<Value> = before[0]
            .as_array()
            .map(|all| {
                all.iter()
                    .filter(|c| caps.iter().any(|(name, _)| c["capability"] == *name))
                    .map(|c| json!({"capability": c["capability"], "state": c["state"].as_bool().unwrap_or(false)}))
                    .collect()
            })
            .unwrap_or_default();
        let old_params: serde_json::Map<String, Value> =
            params.keys().filter_map(|k| before[1].get(k).map(|v| (k.clone(), v.clone()))).collect();
        let saved = SavedSettings { capabilities: old_caps, parameters: old_params };
        self.saved_settings = Some(saved.clone());
        self.journal(|r| r.saved_settings = Some(saved))?;
        self.qmp.migrate_set_capabilities(&caps).await.map_err(|e| e.to_string())?;
        if !params.is_empty() {
            self.qmp.migrate_set_parameters(Value::Object(params)).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// After a rollback: puts back the capabilities and parameters this migration changed.
    async fn restore_settings(&mut self) {
        if let Some(saved) = self.saved_settings.take() {
            teardown::restore_settings(&self.qmp, &saved, &self.id).await;
        }
    }

    /// A QEMU event as a machine event.
    fn translate(&mut self, ev: &QmpEvent) -> Option<Event> {
        let device = ev.data.get("device").and_then(|d| d.as_str()).unwrap_or_default();
        if ev.name.starts_with("BLOCK_JOB_") {
            // READY, COMPLETED and CANCELLED carry the job's offset: what it copied, also when
            // it ended between two polls.
            if let Some(offset) = ev.data.get("offset").and_then(|o| o.as_u64()) {
                if self.disk_of_job(device).is_some() {
                    let seen = self.job_bytes.entry(device.to_string()).or_insert(0);
                    *seen = (*seen).max(offset);
                }
            }
        }
        match ev.name.as_str() {
            "MIGRATION" => {
                let status = ev.data.get("status").and_then(|s| s.as_str())?;
                if status == self.last_status {
                    return None;
                }
                self.last_status = status.to_string();
                Some(Event::MigrationState(MigrationStatus::parse(status)))
            }
            "BLOCK_JOB_READY" => self.disk_of_job(device).map(Event::MirrorReady),
            "BLOCK_JOB_COMPLETED" => {
                let disk = self.disk_of_job(device)?;
                match ev.data.get("error").and_then(|e| e.as_str()) {
                    Some(err) => Some(Event::MirrorFailed(disk, err.to_string())),
                    None => Some(Event::MirrorCompleted(disk)),
                }
            }
            "BLOCK_JOB_CANCELLED" => self.disk_of_job(device).map(Event::MirrorCancelled),
            "RESUME" => Some(Event::SourceResumed),
            "BLOCK_JOB_ERROR" => {
                let disk = self.disk_of_job(device)?;
                let op = ev.data.get("operation").and_then(|o| o.as_str()).unwrap_or("I/O");
                Some(Event::MirrorFailed(disk, format!("{op} error on the mirror")))
            }
            _ => None,
        }
    }

    /// Polls progress; reports it and hands RAM progress (or a status change that no event
    /// announced) to the machine.
    async fn progress(&mut self, tracked: &Tracked) -> Option<Event> {
        if self.migration_started {
            let info = self.qmp.query_migrate().await.ok()?;
            if info.status != self.last_status {
                self.last_status = info.status.clone();
                return Some(Event::MigrationState(MigrationStatus::parse(&info.status)));
            }
            let ram = info.ram?;
            // The rate is what `transferred` did over the last seconds: QEMU's `mbps` lags
            // (see `progress`).
            let rate = self.ram_rate.sample(std::time::Instant::now(), ram.transferred);
            self.ram_bytes = ram.transferred;
            tracked.report(Report::Progress {
                stage: "ram".into(),
                done_bytes: ram.transferred,
                total_bytes: ram.total.max(ram.transferred + ram.remaining),
                bytes_per_s: rate,
                eta_s: eta(ram.remaining, rate),
                dirty_bytes_per_s: Some(ram.dirty_pages_rate as f64 * if ram.page_size > 0 { ram.page_size } else { 4096 } as f64),
                expected_downtime_ms: info.expected_downtime,
            });
            return Some(Event::Progress(Progress { transferred: ram.transferred, remaining: ram.remaining, total: ram.total }));
        }
        let jobs = self.qmp.query_block_jobs().await.ok()?;
        let ours: Vec<_> = jobs.iter().filter(|j| self.disk_of_job(&j.device).is_some()).collect();
        if !ours.is_empty() {
            let done: u64 = ours.iter().map(|j| j.offset).sum();
            let total: u64 = ours.iter().map(|j| j.len).sum::<u64>().max(done);
            for j in &ours {
                let seen = self.job_bytes.entry(j.device.clone()).or_insert(0);
                *seen = (*seen).max(j.offset);
            }
            // A job's `speed` is its limit, not its rate: the rate is the offsets over time.
            let rate = self.mirror_rate.sample(std::time::Instant::now(), done);
            tracked.report(Report::Progress {
                stage: "mirror".into(),
                done_bytes: done,
                total_bytes: total,
                bytes_per_s: rate,
                eta_s: eta(total - done, rate),
                dirty_bytes_per_s: None,
                expected_downtime_ms: None,
            });
        }
        None
    }

    /// A succeeded migration's bytes and downtime, into the migration metrics.
    fn count_success(&self, m: &migtun_proxy::metrics::MigrationMetrics) {
        use migtun_proxy::metrics::MigrationBytesLabels;
        let t = self.totals();
        m.bytes.get_or_create(&MigrationBytesLabels { phase: "disk" }).inc_by(t.disk_bytes);
        m.bytes.get_or_create(&MigrationBytesLabels { phase: "ram" }).inc_by(t.ram_bytes);
        if let Some(d) = t.downtime_ms {
            m.downtime.observe(d as f64 / 1000.0);
        }
    }

    /// What the migration moved: the mirrors' bytes, the RAM stream's (QEMU's final figure
    /// once it completed), the downtime QEMU measured.
    fn totals(&self) -> Totals {
        let ram = self.totals.as_ref().and_then(|t| t.pointer("/ram/transferred")).and_then(|v| v.as_u64());
        Totals {
            // QEMU sets `total-time` and `downtime` just after `completed`: 0 means not yet.
            downtime_ms: self
                .totals
                .as_ref()
                .filter(|t| t.get("total-time").and_then(|v| v.as_u64()).is_some_and(|ms| ms > 0))
                .and_then(|t| t.get("downtime"))
                .and_then(|v| v.as_u64()),
            disk_bytes: self.job_bytes.values().sum(),
            ram_bytes: ram.unwrap_or(self.ram_bytes),
        }
    }

    /// "in 5.7 s: disks 384 MiB, RAM 512 MiB in 2.1 s, downtime 35 ms".
    fn summary(&self, took: Duration) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut parts = vec![format!("in {:.1} s", took.as_secs_f64())];
        let disks: u64 = self.job_bytes.values().sum();
        if disks > 0 {
            parts.push(format!("disks {:.0} MiB", mib(disks)));
        }
        if let Some(t) = &self.totals {
            let ram = t.pointer("/ram/transferred").and_then(|v| v.as_u64()).unwrap_or(0);
            // QEMU sets `total-time` and `downtime` just after `completed`: 0 means not yet.
            match t.get("total-time").and_then(|v| v.as_u64()).filter(|ms| *ms > 0) {
                Some(ms) => {
                    parts.push(format!("RAM {:.0} MiB in {:.1} s", mib(ram), ms as f64 / 1000.0));
                    if let Some(d) = t.get("downtime").and_then(|v| v.as_u64()) {
                        parts.push(format!("downtime {d} ms"));
                    }
                }
                None => parts.push(format!("RAM {:.0} MiB", mib(ram))),
            }
        }
        parts.join(", ")
    }

    /// After a rollback: where the guest is, from the source QEMU itself (`query-status`), for
    /// the final report. `None` when the machine's outcome already says it all (QEMU gone).
    async fn source_state(&self, was_running: bool) -> Option<String> {
        if self.qmp.is_closed() {
            return None;
        }
        Some(teardown::source_state(&self.qmp, was_running).await)
    }

    /// Updates this migration's journal record and writes it (fsync'd) before the step that
    /// needs it; a migration that cannot be journalled does not go on.
    fn journal(&mut self, update: impl FnOnce(&mut OutgoingRecord)) -> Result<(), String> {
        let Some(record) = &mut self.record else { return Ok(()) };
        update(record);
        self.journal.put_outgoing(record).map_err(|e| format!("cannot journal the migration: {e}"))
    }

    /// What an action may create in the source QEMU, journalled before it is performed.
    fn journal_before(&mut self, action: &Action) -> Result<(), String> {
        match action {
            Action::Prepare(req) => {
                self.record = Some(OutgoingRecord {
                    id: self.id.clone(),
                    to: self.to.clone(),
                    vm: self.vm.clone(),
                    qmp: self.source_qmp.clone(),
                    qemu: self.qmp.peer_pid().and_then(ProcessId::of),
                    was_running: req.running,
                    prelaunch: self.prelaunch,
                    stage: OutgoingStage::Migrating,
                    nodes: Vec::new(),
                    jobs: Vec::new(),
                    migration_started: false,
                    saved_settings: None,
                    updated: 0,
                });
                self.journal(|_| ())
            }
            Action::AddNbdTarget(d) => {
                let node = self.target_node(d);
                self.journal(|r| r.nodes.push(node))
            }
            Action::StartMirror(d) => {
                let job = self.job_id(d);
                self.journal(|r| r.jobs.push(job))
            }
            Action::StartMigration => self.journal(|r| r.migration_started = true),
            // The point of no return, recorded before it is passed: a source that restarts
            // after this asks the destination instead of resuming the guest.
            Action::FinishPeer { success: true, resume } => {
                let resume = *resume;
                self.journal(|r| r.stage = OutgoingStage::Finishing { resume })
            }
            _ => Ok(()),
        }
    }

    fn cleanup_dir(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The machine's name for a disk: the guest device, else the qdev id, else the node name
/// (`-blockdev` disks have no device name; their qdev path is `/machine/peripheral/ID/...`).
fn disk_key(device: &str, qdev: Option<&str>, node: &str) -> String {
    if !device.is_empty() {
        return device.to_string();
    }
    if let Some(id) = qdev.and_then(|q| q.strip_prefix("/machine/peripheral/")).and_then(|q| q.split('/').next()) {
        return id.to_string();
    }
    if let Some(q) = qdev.filter(|q| !q.is_empty()) {
        return q.to_string();
    }
    node.to_string()
}

/// The image file behind `query-block`'s `file` (a `json:{...}` filename keeps its `filename`).
fn file_of(file: &str) -> String {
    if let Some(j) = file.strip_prefix("json:") {
        if let Ok(v) = serde_json::from_str::<Value>(j) {
            if let Some(f) = v.pointer("/file/filename").and_then(|f| f.as_str()) {
                return f.to_string();
            }
        }
    }
    file.to_string()
}

fn vm_name(cmdline: &[String]) -> Option<String> {
    let i = cmdline.iter().position(|a| a == "-name")?;
    let v = cmdline.get(i + 1)?;
    let first = v.split(',').next()?;
    Some(first.strip_prefix("guest=").unwrap_or(first).to_string())
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_named_by_device_qdev_or_node() {
        assert_eq!(disk_key("drive0", None, "n"), "drive0");
        assert_eq!(disk_key("", Some("/machine/peripheral/vd0/virtio-backend"), "n"), "vd0");
        assert_eq!(disk_key("", None, "node7"), "node7");
        assert_eq!(file_of(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/a.qcow2"}}"#), "/x/a.qcow2");
        assert_eq!(vm_name(&["qemu".into(), "-name".into(), "guest=web1,debug-threads=on".into()]).as_deref(), Some("web1"));
    }
}
