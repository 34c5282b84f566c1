//! Finish: the guest handed over (journalled before it runs here) or the QEMU quit; the same
//! answer again, from the journal, to a source that lost it; and abandonment, when the source's
//! control connection ends first.

use std::sync::Arc;

use serde_json::json;
use tracing::{debug, info, warn};

use super::qemu::{quit_qemu, wait_incoming_complete};
use super::{Incoming, Prepared};
use crate::destination::paths;
use crate::journal::{IncomingRecord, IncomingState};
use crate::messages::{FinishReply, FinishRequest, OutcomeKind};
use crate::process::Process;
use crate::rpc::{MethodError, Session};

impl Incoming {
    pub(super) async fn finish(&self, session: &Session, req: FinishRequest) -> Result<FinishReply, MethodError> {
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

    /// The handover is done: the guest is this host's. Its images stay; the sockets go, and
    /// the run dir with its QEMU.
    pub(super) fn kept(&self, record: &mut IncomingRecord) {
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

    /// A kept guest's run dir (its QMP socket, pidfile, log) lives as long as its QEMU: removed
    /// when that process exits, whenever that is, so that nothing accumulates under `run_dir`.
    /// The images stay: they are the guest's disks, the operator's to keep or delete.
    pub(super) fn remove_run_dir_when_gone(&self, record: &IncomingRecord) {
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
    pub(super) async fn abandon(&self, id: &str, reason: &str) {
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
}
