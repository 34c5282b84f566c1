//! Recovery at start-up: what the journal says was unfinished when this agent last stopped is
//! finished before any peer is answered (an orphaned QEMU quit, a decided handover completed).

use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use super::qemu::{wait_gone, QUIT_GRACE};
use super::Incoming;
use crate::journal::{IncomingRecord, IncomingState};
use crate::process::Process;
use crate::qmp::Qmp;

/// Recovery connects to an orphaned QEMU's monitor: a live QEMU accepts at once.
pub(super) const RECOVERY_CONNECT: Duration = Duration::from_secs(5);

impl Incoming {
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
