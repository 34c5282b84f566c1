//! Undoing a migration in the source QEMU, one QMP step at a time: shared by the driver (the
//! machine's rollback actions) and by recovery (a migration the journal found unfinished).
//!
//! Each step tolerates what is already gone: a job that ended, a node never added, a migration
//! that is not running. Each wait is bounded ([`TEARDOWN_WAIT`]) and follows QEMU's events, with
//! a query as the source of truth.

use std::time::Duration;

use serde_json::{json, Value};
use tracing::warn;

use crate::migration::journal::SavedSettings;
use crate::qmp::{BlockJobInfo, Qmp, QmpError};

/// How long a cancelled mirror job or migration may take to end before the rollback goes on
/// without it.
pub const TEARDOWN_WAIT: Duration = Duration::from_secs(30);
/// Waiting for a job or the migration to end is driven by QEMU's events; without one for this
/// long, the state is queried anyway (a safety net, not the mechanism).
const STATUS_RECHECK: Duration = Duration::from_millis(250);
/// The source's `query-status` for a report; QEMU answers in milliseconds.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// The events that announce a block job's state changes.
const JOB_EVENTS: &[&str] = &["JOB_STATUS_CHANGE", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"];
/// `query-migrate` statuses in which a migration is under way (and `migrate_cancel` applies).
const LIVE_STATUSES: &[&str] =
    &["setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling", "postcopy-active", "postcopy-paused", "postcopy-recover"];

/// Forced `block-job-cancel` of `job`, then waits until it is gone (an NBD target can only be
/// deleted once no job uses it). A job that already ended counts as cancelled.
pub async fn cancel_job(qmp: &Qmp, job: &str) -> Result<(), String> {
    let exists = |jobs: &[BlockJobInfo]| jobs.iter().any(|j| j.device == job);
    let jobs = qmp.query_block_jobs().await.map_err(|e| e.to_string())?;
    if !exists(&jobs) {
        return Ok(());
    }
    if let Err(e) = qmp.execute("block-job-cancel", json!({"device": job, "force": true})).await {
        // It may have ended between the query and the cancel.
        let jobs = qmp.query_block_jobs().await.map_err(|e| e.to_string())?;
        return if exists(&jobs) { Err(e.to_string()) } else { Ok(()) };
    }
    let gone = qmp
        .wait_until("the cancelled mirror job to end", JOB_EVENTS, STATUS_RECHECK, TEARDOWN_WAIT, || async {
            let jobs = qmp.query_block_jobs().await?;
            Ok((!exists(&jobs)).then_some(()))
        })
        .await;
    match gone {
        Ok(()) => Ok(()),
        Err(QmpError::Timeout { .. }) => {
            Err(format!("the mirror job {job} still exists {}s after it was cancelled", TEARDOWN_WAIT.as_secs()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `migrate_cancel`, then waits for a terminal status (the guest may only be resumed, and the
/// forwards closed, once QEMU has stopped migrating).
pub async fn cancel_migration(qmp: &Qmp) -> Result<(), String> {
    qmp.execute("migrate_cancel", json!({})).await.map_err(|e| e.to_string())?;
    let ended = qmp
        .wait_until("the cancelled migration to end", &["MIGRATION"], STATUS_RECHECK, TEARDOWN_WAIT, || async {
            let info = qmp.query_migrate().await?;
            Ok((!LIVE_STATUSES.contains(&info.status.as_str())).then_some(()))
        })
        .await;
    match ended {
        Ok(()) => wait_migration_cleaned(qmp).await,
        Err(QmpError::Timeout { .. }) => {
            let status = qmp.query_migrate().await.map(|i| i.status).unwrap_or_default();
            Err(format!("the migration is still {status:?} {}s after migrate_cancel", TEARDOWN_WAIT.as_secs()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Waits until QEMU has cleaned up after its last migration: its `migration` yank instance is
/// unregistered only when the cleanup (with multifd: every channel's thread joined) is done,
/// after the status is already terminal, and a `migrate` before that is refused ("duplicate
/// yank instance"), as the fault matrix found after a cancelled `--parallel 4` migration.
///
/// A multifd channel thread can stay blocked on its socket after the migration failed (the
/// source agent, holding the other ends, was killed), and then the cleanup never ends: once the
/// migration is no longer live, its channels are yanked, which unblocks them.
pub async fn wait_migration_cleaned(qmp: &Qmp) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + TEARDOWN_WAIT;
    let mut yanked = false;
    loop {
        let present = qmp.execute_oob("query-yank", Value::Null, STATUS_TIMEOUT).await.map_err(|e| e.to_string())?;
        let busy = present.as_array().is_some_and(|a| a.iter().any(|i| i["type"] == "migration"));
        if !busy {
            return Ok(());
        }
        if !yanked && !migration_live(qmp).await.unwrap_or(true) {
            yanked = true;
            let _ = qmp.execute_oob("yank", serde_json::json!({"instances": [{"type": "migration"}]}), STATUS_TIMEOUT).await;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("QEMU has not finished cleaning up the migration {}s after it ended", TEARDOWN_WAIT.as_secs()));
        }
        tokio::time::sleep(STATUS_RECHECK).await;
    }
}

/// Whether a migration is under way in this QEMU.
pub async fn migration_live(qmp: &Qmp) -> Result<bool, String> {
    let info = qmp.query_migrate().await.map_err(|e| e.to_string())?;
    Ok(LIVE_STATUSES.contains(&info.status.as_str()))
}

/// `blockdev-del` of those of `nodes` that exist.
pub async fn remove_nodes(qmp: &Qmp, nodes: &[String]) -> Result<(), String> {
    if nodes.is_empty() {
        return Ok(());
    }
    let present = qmp.execute("query-named-block-nodes", json!({"flat": true})).await.map_err(|e| e.to_string())?;
    let present: Vec<&str> = present.as_array().map(|a| a.iter().filter_map(|n| n["node-name"].as_str()).collect()).unwrap_or_default();
    for n in nodes.iter().filter(|n| present.contains(&n.as_str())) {
        qmp.execute("blockdev-del", json!({"node-name": n})).await.map_err(|e| format!("blockdev-del {n}: {e}"))?;
    }
    Ok(())
}

/// Puts back the capabilities and parameters a migration changed, so that the source QEMU is
/// left as it was (a `pause-before-switchover` left on would stall the next migration of a tool
/// that does not expect it). Best effort: a failure is logged.
pub async fn restore_settings(qmp: &Qmp, saved: &SavedSettings, migration: &str) {
    let mut commands = vec![("migrate-set-capabilities", json!({ "capabilities": saved.capabilities }))];
    if !saved.parameters.is_empty() {
        commands.push(("migrate-set-parameters", Value::Object(saved.parameters.clone())));
    }
    if let Err(e) = qmp.execute_pipelined(commands).await {
        warn!(%migration, error = %e, "could not restore the source's migration capabilities and parameters");
    }
}

/// A guest that had never run (`prelaunch`, started with `-S`) whose migration was stopped in
/// its last stage is left by QEMU in `postmigrate`, from which QEMU 7.2 migrates it again only
/// after it has run. A `system_reset` brings it back to `prelaunch` without running it, and
/// loses nothing: the CPUs and devices are still in their reset state and the ROMs rewritten
/// are the ones the first reset wrote. Never used for a guest that ran, and never after a
/// *completed* migration: QEMU has then inactivated the guest's images, which only `cont`
/// reactivates in 7.2 (`blockdev-set-active` came with QEMU 10.0), and migrating a reset guest
/// with inactive images trips an assertion in QEMU (`bdrv_inactivate_recurse`) that kills it.
/// Such a guest stays in `postmigrate`, and the report says so.
pub async fn restore_prelaunch(qmp: &Qmp) -> Result<(), String> {
    let status = qmp.query_status().await.map_err(|e| e.to_string())?;
    if status.status != "postmigrate" {
        return Ok(());
    }
    let migration = qmp.query_migrate().await.map_err(|e| e.to_string())?;
    if migration.status == "completed" {
        return Ok(());
    }
    qmp.execute("system_reset", json!({})).await.map_err(|e| format!("system_reset: {e}"))?;
    let deadline = tokio::time::Instant::now() + STATUS_TIMEOUT;
    loop {
        let status = qmp.query_status().await.map_err(|e| e.to_string())?;
        if status.status == "prelaunch" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("still {} after system_reset", status.status));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the guest is after a rollback, from the source QEMU itself (`query-status`), in words
/// for the final report.
pub async fn source_state(qmp: &Qmp, was_running: bool) -> String {
    let status = match qmp.execute_with_timeout("query-status", Value::Null, STATUS_TIMEOUT).await {
        Ok(v) => match serde_json::from_value::<crate::qmp::Status>(v) {
            Ok(s) => s,
            Err(e) => return format!("the source guest's state is unknown (query-status: {e})"),
        },
        Err(e) => return format!("the source guest's state is unknown ({e})"),
    };
    match (status.running, status.status.as_str()) {
        (true, _) if was_running => "the guest runs on the source as before".to_string(),
        (true, _) => "the guest runs on the source (it was resumed there during the migration)".to_string(),
        (false, "postmigrate") => "the guest is paused on the source, in QEMU state postmigrate: QEMU 7.2 migrates it \
                                   again only after it has run (cont)"
            .to_string(),
        (false, s) if !was_running => format!("the guest is paused on the source as before ({s})"),
        (false, s) => format!("the guest is NOT running on the source (QEMU state {s}); resume it with cont"),
    }
}
