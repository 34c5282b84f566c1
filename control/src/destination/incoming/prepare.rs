//! Prepare: the cookie validated, the hook given exactly the planned command line, QMP
//! connected, the copied disks exported over NBD, `migrate-incoming` started, and both sockets
//! exposed as routes to the source only. Every failure undoes what it made.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use migtun_proxy::agent::ExposeGuard;
use migtun_proxy::io::endpoint::Endpoint;
use migtun_proxy::route::{ByteCount, ExposeRoute};
use serde_json::json;
use tracing::{info, warn};

use super::qemu::{exited_qemu, hook_qemu, quit_qemu, run_hook, wait_gone, HookInput, QUIT_GRACE};
use super::{Incoming, Prepared};
use crate::destination::{cmdline, cookie, paths, Refusal};
use crate::journal::{IncomingRecord, IncomingState};
use crate::messages::{Cookie, OutcomeKind, PrepareReply};
use crate::process::ProcessId;
use crate::qmp::Qmp;
use crate::rpc::{MethodError, Session};

/// A refused cookie: a 403 naming what was refused, and a log line.
fn refused(id: &str, source: &str, e: Refusal) -> MethodError {
    warn!(migration = %crate::destination::shorten(id), %source, reason = %e, "refused an incoming migration");
    MethodError::forbidden(format!("the destination refuses this migration: {e}"))
}

impl Incoming {
    pub(super) async fn prepare(self: &Arc<Self>, session: Session, mut cookie: Cookie) -> Result<PrepareReply, MethodError> {
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
    pub(super) fn forget(&self, dir: &Path, id: &str, why: &str) {
        self.ended(id, OutcomeKind::Failed, &format!("prepare failed: {why}"));
        self.remove_dir(dir);
        if let Err(e) = self.journal.remove_incoming(id) {
            warn!(migration = %id, error = %e, "cannot remove the journal record of a failed prepare");
        }
    }

    /// Kills the QEMU a failed or interrupted hook may have left, found by its pidfile and
    /// verified by its command line (it names this migration's QMP socket), never by pid alone.
    pub(super) async fn kill_hook_qemu(&self, dir: &Path) {
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
}
