//! The [`Executor`]: one migration's I/O. It performs each action of the machine against the
//! source QEMU (QMP), the destination (control RPC, side-channel uploads) and this agent's
//! forwards, and journals before every action what it may leave behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use migtun_proxy::agent::{AgentHandle, DynamicForward, ForwardGuard};
use migtun_proxy::io::endpoint::Endpoint;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use crate::admin::Tracked;
use crate::migration::journal::{Journal, OutgoingRecord, OutgoingStage, SavedSettings};
use crate::process::ProcessId;
use crate::migration::teardown;
use crate::migration::machine::{Action, Disk, Event, MigrationSettings, PrepareRequest, Report as MachineReport, Routes, SideFile, Step};
use crate::messages::{Cookie, DiskSpec, FinishReply, FinishRequest, MigrationParams, PrepareReply, Report};
use crate::progress::RateMeter;
use crate::qmp::Qmp;
use crate::rpc::{FileHeader, RpcClient};


/// A side-channel file may take this long to upload.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// Prepare starts a QEMU on the destination: allow for a slow hook.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// `Finish(failure)` is best effort: the destination also cleans up by itself when the control
/// connection ends, so a rollback never waits longer than this for a stalled peer's answer.
const FINISH_FAILURE_TIMEOUT: Duration = Duration::from_secs(5);

/// The I/O side of one migration.
pub(super) struct Executor {
    /// `query-migrate` at completion, for the summary.
    pub(super) totals: Option<Value>,
    /// Bytes each mirror job copied (its offset: last poll or event).
    pub(super) job_bytes: HashMap<String, u64>,
    /// Bytes the RAM migration sent (last poll).
    pub(super) ram_bytes: u64,
    pub(super) mirror_rate: RateMeter,
    pub(super) ram_rate: RateMeter,
    pub(super) id: String,
    pub(super) qmp: Arc<Qmp>,
    pub(super) rpc: RpcClient,
    /// The NBD target nodes added (or being added): what the watcher yanks when the peer is lost.
    pub(super) targets: Arc<std::sync::Mutex<Vec<String>>>,
    /// The forwards' stream aborts: what the watcher cuts when the peer is lost.
    pub(super) stream_aborts: Arc<std::sync::Mutex<Vec<tokio_util::sync::CancellationToken>>>,
    pub(super) agent: AgentHandle,
    /// `run_dir/<id>`: the forward sockets.
    pub(super) dir: PathBuf,
    pub(super) source_qmp: PathBuf,
    /// The destination agent.
    pub(super) to: String,
    /// The guest had never run when the migration began (`prelaunch`).
    pub(super) prelaunch: bool,
    pub(super) vm: String,
    pub(super) cmdline: Vec<String>,
    /// Disk key (the machine's `Disk::device`) -> (index, disk).
    pub(super) disks: HashMap<String, (usize, Disk)>,
    pub(super) forwards: Vec<ForwardGuard>,
    pub(super) migration_started: bool,
    /// The last migration status seen (event or poll), so each change reaches the machine once.
    pub(super) last_status: String,
    /// The source's capabilities and parameters before this migration changed them.
    pub(super) saved_settings: Option<SavedSettings>,
    pub(super) journal: Arc<Journal>,
    /// This migration's journal record, from Prepare on (before that nothing exists to undo).
    pub(super) record: Option<OutgoingRecord>,
}
impl Executor {
    pub(super) fn target_node(&self, disk: &str) -> String {
        format!("mt{}", self.disks.get(disk).map(|d| d.0).unwrap_or(0))
    }

    pub(super) fn job_id(&self, disk: &str) -> String {
        format!("mj{}", self.disks.get(disk).map(|d| d.0).unwrap_or(0))
    }

    pub(super) fn disk_of_job(&self, job: &str) -> Option<String> {
        self.disks.iter().find(|(_, (i, _))| format!("mj{i}") == job).map(|(k, _)| k.clone())
    }

    /// Performs one action; the immediate result, if the machine wants one.
    pub(super) async fn perform(&mut self, action: Action, tracked: &Tracked) -> Option<Event> {
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

    pub(super) async fn qmp_do(&self, cmd: &str, args: Value) -> Result<Option<Event>, String> {
        self.qmp.execute(cmd, args).await.map(|_| None).map_err(|e| e.to_string())
    }

    pub(super) async fn prepare(&mut self, req: PrepareRequest) -> Result<Routes, String> {
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

    pub(super) async fn open_forwards(&mut self, routes: Routes) -> Result<(), String> {
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

    pub(super) fn rpc_peer(&self) -> String {
        self.rpc.peer_hello().name.clone()
    }

    pub(super) async fn send_files(&self, files: Vec<SideFile>, tracked: &Tracked) -> Result<(), String> {
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
    pub(super) async fn set_settings(&mut self, s: MigrationSettings) -> Result<(), String> {
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
    pub(super) async fn restore_settings(&mut self) {
        if let Some(saved) = self.saved_settings.take() {
            teardown::restore_settings(&self.qmp, &saved, &self.id).await;
        }
    }

    /// After a rollback: where the guest is, from the source QEMU itself (`query-status`), for
    /// the final report. `None` when the machine's outcome already says it all (QEMU gone).
    pub(super) async fn source_state(&self, was_running: bool) -> Option<String> {
        if self.qmp.is_closed() {
            return None;
        }
        Some(teardown::source_state(&self.qmp, was_running).await)
    }

    /// Updates this migration's journal record and writes it (fsync'd) before the step that
    /// needs it; a migration that cannot be journalled does not go on.
    pub(super) fn journal(&mut self, update: impl FnOnce(&mut OutgoingRecord)) -> Result<(), String> {
        let Some(record) = &mut self.record else { return Ok(()) };
        update(record);
        self.journal.put_outgoing(record).map_err(|e| format!("cannot journal the migration: {e}"))
    }

    /// What an action may create in the source QEMU, journalled before it is performed.
    pub(super) fn journal_before(&mut self, action: &Action) -> Result<(), String> {
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

    pub(super) fn cleanup_dir(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}
