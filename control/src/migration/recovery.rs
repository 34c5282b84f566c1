//! The source side after a crash or a lost answer: settling what the journal says is unfinished.
//!
//! * [`settle`] (in its own module, which the driver uses too): past the point of no return
//!   without the destination's answer, ask it again until it answers or the operator decides.
//! * [`recover`]: at start, every outgoing record the journal holds is a migration this agent
//!   was running when it died. Before the point of no return it is rolled back from what the
//!   record says may exist (a migration, mirror jobs, NBD nodes, changed settings; the guest
//!   resumed if it ran); after it, the destination is asked first.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use crate::admin::{Registry, Tracked};
use crate::migration::driver::Outgoing;
use crate::migration::journal::{OutgoingRecord, OutgoingStage};
use crate::messages::{OutcomeKind, Report, Totals};
use crate::process::ProcessId;
use crate::qmp::Qmp;
use crate::migration::settle::settle;
use crate::migration::teardown;

/// Connecting to the source QEMU's monitor during recovery: a live QEMU accepts at once.
const QMP_CONNECT: Duration = Duration::from_secs(5);
/// After `quit`, how long the source QEMU may take to exit.
const QUIT_GRACE: Duration = Duration::from_secs(10);

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
