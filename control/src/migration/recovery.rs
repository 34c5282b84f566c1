//! The source side after a crash or a lost answer: settling what the journal says is unfinished.
//!
//! * [`settle`]: past the point of no return without the destination's answer, ask it again
//!   (`finish` is idempotent there, answered from its journal) over a fresh connection, with
//!   back-off, until it answers or the operator decides (`migtun resolve`). The guest stays
//!   paused meanwhile: resuming it could make two copies run.
//! * [`recover`]: at start, every outgoing record the journal holds is a migration this agent
//!   was running when it died. Before the point of no return it is rolled back from what the
//!   record says may exist (a migration, mirror jobs, NBD nodes, changed settings; the guest
//!   resumed if it ran); after it, the destination is asked first.

use std::sync::Arc;
use std::time::Duration;

use migtun_proxy::agent::AgentHandle;
use serde_json::json;
use tracing::{info, warn};

use crate::admin::{GuestOn, Registry, Tracked};
use crate::migration::driver::Outgoing;
use crate::migration::journal::{OutgoingRecord, OutgoingStage};
use crate::messages::{FinishReply, FinishRequest, OutcomeKind, Report, Totals};
use crate::process::ProcessId;
use crate::qmp::Qmp;
use crate::rpc::RpcClient;
use crate::migration::teardown;

/// First wait before asking the destination again; doubled after each failed attempt.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between two attempts: a destination that comes back is heard from within this.
const MAX_RETRY: Duration = Duration::from_secs(15);
/// One attempt: connect, hello, `finish`. The destination's `finish` may wait up to 30 s for
/// its incoming migration to complete.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(45);
/// Connecting to the source QEMU's monitor during recovery: a live QEMU accepts at once.
const QMP_CONNECT: Duration = Duration::from_secs(5);
/// After `quit`, how long the source QEMU may take to exit.
const QUIT_GRACE: Duration = Duration::from_secs(10);

/// Asks the destination `to` what became of migration `id` until it answers: `Ok` = the guest
/// runs (or is held) there, `Err(why)` = it does not and the source must keep it. An operator's
/// `migtun resolve` answers instead.
pub async fn settle(agent: &AgentHandle, to: &str, id: &str, resume: bool, tracked: &Tracked) -> Result<(), String> {
    tracked.report(Report::Phase {
        phase: "unknown".into(),
        step: None,
        message: format!(
            "waiting for {to}'s answer: the guest stays paused on the source. If {to} is gone for good: \
             `migtun resolve {id} --guest-on source` (or `destination`)"
        ),
    });
    let _awaiting = tracked.await_resolution();
    let mut delay = FIRST_RETRY;
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        match tokio::time::timeout(ATTEMPT_TIMEOUT, ask(agent, to, id, resume)).await {
            Ok(Ok(reply)) if reply.guest_kept => {
                info!(migration = %id, %to, attempt, "the destination answers: the guest runs there");
                tracked.report(Report::Log { message: format!("{to} answers: the guest runs there") });
                return Ok(());
            }
            Ok(Ok(reply)) => {
                info!(migration = %id, %to, attempt, detail = %reply.detail, "the destination answers: it does not have the guest");
                tracked.report(Report::Log { message: format!("{to} answers: {}", reply.detail) });
                return Err(reply.detail);
            }
            Ok(Err(e)) => note_attempt(tracked, id, to, attempt, delay, &e),
            Err(_) => note_attempt(tracked, id, to, attempt, delay, &format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs())),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            decision = tracked.resolution() => {
                warn!(migration = %id, guest_on = decision.as_str(), "the operator resolved the unknown outcome");
                return match decision {
                    GuestOn::Destination => Ok(()),
                    GuestOn::Source => Err("the operator decided (migtun resolve) that the guest is not on the destination".into()),
                };
            }
        }
        delay = (delay * 2).min(MAX_RETRY);
    }
}

fn note_attempt(tracked: &Tracked, id: &str, to: &str, attempt: u64, delay: Duration, why: &str) {
    // Every attempt at first, then one line in ten: the log says it is still asking.
    if attempt <= 3 || attempt % 10 == 0 {
        warn!(migration = %id, %to, attempt, error = %why, "no answer yet from the destination; the guest stays paused");
        tracked.report(Report::Log {
            message: format!("attempt {attempt}: no answer from {to} ({why}); asking again in {} s", delay.as_secs()),
        });
    }
}

/// One `finish(success)` on a fresh control connection.
async fn ask(agent: &AgentHandle, to: &str, id: &str, resume: bool) -> Result<FinishReply, String> {
    let io = agent.connect_control(to).await.map_err(|e| e.to_string())?;
    let rpc = RpcClient::connect(io, to, agent.name()).await.map_err(|e| e.to_string())?;
    let req = FinishRequest { migration: id.to_string(), success: true, resume };
    rpc.call_with_timeout::<_, FinishReply>("finish", &req, ATTEMPT_TIMEOUT).await.map_err(|e| e.to_string())
}

/// Settles every migration the journal found unfinished, each in its own task, visible in
/// `migtun status` under its id.
pub fn recover(out: Arc<Outgoing>, registry: Arc<Registry>) {
    for r in out.journal.outgoing() {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "skipping an unreadable journal record");
                continue;
            }
        };
        let tracked = registry.track(&r.id, &r.vm, &r.to);
        tracked.set_vm_name(&r.vm);
        let out = out.clone();
        tokio::spawn(async move {
            warn!(migration = %r.id, vm = %r.vm, to = %r.to, stage = r.stage.as_str(), "recovery: this agent stopped during the migration; settling it");
            let metrics = out.agent.metrics();
            let started = std::time::Instant::now();
            let gauge = metrics.migrations.begin(&r.to, "outgoing", "recovering");
            let (outcome, message) = recover_one(&out, &r, &tracked).await;
            drop(gauge);
            metrics.migrations.end(&r.to, "outgoing", crate::migration::driver::outcome_label(outcome), started.elapsed().as_secs_f64());
            let _ = std::fs::remove_dir_all(out.run_dir.join(&r.id));
            if let Err(e) = out.journal.remove_outgoing(&r.id) {
                warn!(migration = %r.id, error = %e, "cannot remove the journal record");
            }
            info!(migration = %r.id, outcome = crate::migration::driver::outcome_label(outcome), %message, "recovery: migration settled");
            tracked.report(Report::done(outcome, message, Totals::default()));
        });
    }
}

async fn recover_one(out: &Outgoing, r: &OutgoingRecord, tracked: &Tracked) -> (OutcomeKind, String) {
    let restarted = "the source agent restarted during the migration";
    match r.stage {
        OutgoingStage::Migrating => {
            tracked.report(Report::Phase { phase: "recovering".into(), step: None, message: "rolling back on the source".into() });
            (OutcomeKind::Failed, format!("{restarted}; rolled back: {}", roll_back(r).await))
        }
        OutgoingStage::Finishing { resume } => match settle(&out.agent, &r.to, &r.id, resume, tracked).await {
            Ok(()) => (OutcomeKind::Succeeded, format!("{restarted}, after the handover; {}", quit_source(r).await)),
            Err(why) => (OutcomeKind::Failed, format!("{restarted} at the handover, and {}: {why}; rolled back: {}", r.to, roll_back(r).await)),
        },
    }
}

/// The source QEMU of a record, if that very process still answers on its monitor.
async fn source_qemu(r: &OutgoingRecord) -> Result<Qmp, String> {
    let qmp = tokio::time::timeout(QMP_CONNECT, Qmp::connect(&r.qmp))
        .await
        .map_err(|_| format!("the source QEMU's monitor {} does not answer", r.qmp.display()))?
        .map_err(|e| format!("the source QEMU is gone ({e})"))?;
    let now = qmp.peer_pid().and_then(ProcessId::of);
    if r.qemu.is_some() && now != r.qemu {
        return Err(format!(
            "another QEMU answers on {} than the one that was migrating (pid {:?}, was {:?}); not touching it",
            r.qmp.display(),
            now.map(|p| p.pid),
            r.qemu.map(|p| p.pid)
        ));
    }
    Ok(qmp)
}

/// Undoes in the source QEMU what the record says may exist, and resumes a guest that ran.
/// Says where the guest is afterwards.
async fn roll_back(r: &OutgoingRecord) -> String {
    let qmp = match source_qemu(r).await {
        Ok(q) => q,
        Err(why) => return format!("{why}; nothing to undo there"),
    };
    let mut problems = Vec::new();
    if r.migration_started {
        match teardown::migration_live(&qmp).await {
            Ok(true) => {
                if let Err(e) = teardown::cancel_migration(&qmp).await {
                    problems.push(e);
                }
            }
            Ok(false) => {
                if let Err(e) = teardown::wait_migration_cleaned(&qmp).await {
                    problems.push(e);
                }
            }
            Err(e) => problems.push(e),
        }
    }
    for job in &r.jobs {
        if let Err(e) = teardown::cancel_job(&qmp, job).await {
            problems.push(e);
        }
    }
    if let Err(e) = teardown::remove_nodes(&qmp, &r.nodes).await {
        problems.push(e);
    }
    if let Some(saved) = &r.saved_settings {
        teardown::restore_settings(&qmp, saved, &r.id).await;
    }
    if r.prelaunch {
        if let Err(e) = teardown::restore_prelaunch(&qmp).await {
            problems.push(e);
        }
    }
    if r.was_running {
        let running = qmp.query_status().await.map(|s| s.running).unwrap_or(false);
        if !running {
            if let Err(e) = qmp.execute("cont", json!({})).await {
                problems.push(format!("cont: {e}"));
            }
        }
    }
    let state = teardown::source_state(&qmp, r.was_running).await;
    if problems.is_empty() {
        state
    } else {
        format!("{state} (problems: {})", problems.join("; "))
    }
}

/// The destination has the guest: the source QEMU (that very process) quits.
async fn quit_source(r: &OutgoingRecord) -> String {
    let qmp = match source_qemu(r).await {
        Ok(q) => q,
        Err(why) => return format!("{why}"),
    };
    let _ = teardown::remove_nodes(&qmp, &r.nodes).await;
    let _ = qmp.execute("quit", json!({})).await;
    let gone = wait_exit(r.qemu, QUIT_GRACE).await;
    if gone {
        "the guest lives on the destination; the source QEMU has quit".to_string()
    } else {
        "the guest lives on the destination; the source QEMU did not quit: it stays paused, do not resume it".to_string()
    }
}

async fn wait_exit(qemu: Option<ProcessId>, grace: Duration) -> bool {
    match qemu {
        Some(p) => p.wait_exit(grace).await,
        None => true,
    }
}
