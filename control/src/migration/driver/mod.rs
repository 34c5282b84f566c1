//! The source's driver: performs the [`Machine`]'s actions against QMP, the destination's
//! control RPC and the agent's routes, and feeds every result and every QEMU event back.
//!
//! The machine decides everything (order, rollback, the point of no return); this module only
//! translates. One migration is one task: actions run one at a time in the order the machine
//! gave them; between actions the task waits for QEMU events, a progress tick, a cancel
//! request, or the loss of the destination's control connection.
//!
//! This file is the task's loop and what it reports; `executor` performs the actions and
//! `observe` turns what QEMU says (its guest, events, progress) into the machine's events.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use migtun_proxy::agent::AgentHandle;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::admin::Tracked;
use crate::migration::journal::Journal;
use crate::migration::teardown;
use crate::migration::machine::{Action, DiskSelection, Event, Machine, MigrationId, Options, Outcome, PerformStep, Phase, SideFile};
use crate::messages::{MigrateArgs, OutcomeKind, Report, Totals};
use crate::progress::RateMeter;
use crate::qmp::Qmp;
use crate::rpc::RpcClient;

mod executor;
mod observe;

use executor::Executor;

/// How often progress is polled (`query-migrate`, `query-block-jobs`) and reported.
const PROGRESS_TICK: Duration = Duration::from_millis(500);
/// With nothing happening at all (no event, no progress) for this long, the machine is told
/// that time is up, so that it rolls back rather than hang on a stuck QEMU or peer.
const STALL_TIMEOUT: Duration = Duration::from_secs(300);
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
            // An unknown outcome is not the end: `settle::settle` reports the phase.
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
                let answer = crate::migration::settle::settle(&out.agent, &args.to, &id, resume, tracked).await;
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

