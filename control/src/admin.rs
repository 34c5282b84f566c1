//! The local admin API: what `migtun migrate` and `migtun status` talk to.
//!
//! JSON lines on a UNIX socket (mode 0600, so only the agent's user may drive migrations). A
//! connection sends one request line and reads answer lines:
//!
//! ```text
//! {"op":"migrate","args":{...}}   -> Event lines ("accepted" first, "done" last)
//! {"op":"watch","id":"m-..."}     -> the same stream for a running migration (history first)
//! {"op":"cancel","id":"m-..."}    -> {"ok":true} | {"error":"..."}
//! {"op":"status"}                 -> one Status line
//! {"op":"resolve","id":"m-...","guest_on":"source"|"destination"}
//!                                 -> {"ok":true} | {"error":"..."}  (only while the outcome is unknown)
//! ```
//!
//! Event lines are [`Event`]s (`v`, `ts`, `id` and the [`Report`]'s fields): what `migtun
//! migrate --json` prints. The agent keeps the running migrations and the last [`HISTORY`]
//! ended ones (outgoing here; incoming ones are the destination side's, [`IncomingStatus`]).
//!
//! The migration belongs to the agent: a client that disconnects (or dies) does not stop it.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use migtun_proxy::agent::AgentHandle;
use migtun_proxy::endpoint::{Endpoint, LocalListener, LocalStream};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::messages::{rfc3339, Event, MigrateArgs, OutcomeKind, Report, EVENTS_VERSION};

/// Longest request line.
const MAX_REQUEST: usize = 64 * 1024;
/// Reports buffered per watcher; a watcher that falls further behind skips progress lines (it
/// gets the final `done` line regardless, from the history).
const WATCH_CAPACITY: usize = 256;
/// Reports kept per migration for late watchers; progress lines beyond this are dropped from
/// the history (phase changes and the outcome are always kept).
const HISTORY_PROGRESS: usize = 32;
/// Ended migrations `migtun status` keeps (per direction); older ones are dropped.
pub const HISTORY: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Migrate { args: MigrateArgs },
    Watch { id: String },
    Cancel { id: String },
    Status,
    /// The operator's answer when the destination cannot say where the guest is.
    Resolve { id: String, guest_on: GuestOn },
    /// `migtun tunnel open`: a per-migration pair of routes to `to` (see `tunnels.rs`).
    TunnelOpen { to: String, name: String, sockets: Vec<String>, ttl_secs: u64 },
    /// `migtun tunnel close`.
    TunnelClose { name: String },
    /// `migtun tunnel list`.
    TunnelList,
    /// Re-read the config file and the `[tls]` files (`migtun reload`, like SIGHUP). Answered
    /// with `{"ok": true, "changes": [...]}` or `{"error": "..."}`.
    Reload,
}

/// Where the operator says the guest is (`migtun resolve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestOn {
    /// The destination does not run the guest: resume it on the source.
    Source,
    /// The destination runs the guest: quit the source QEMU.
    Destination,
}

impl GuestOn {
    pub fn as_str(&self) -> &'static str {
        match self {
            GuestOn::Source => "source",
            GuestOn::Destination => "destination",
        }
    }
}

/// `migtun status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// [`EVENTS_VERSION`].
    #[serde(default)]
    pub v: u32,
    pub name: String,
    /// Running migrations and the last [`HISTORY`] ended ones of each direction, oldest first.
    pub migrations: Vec<MigrationSummary>,
    pub routes: Vec<String>,
    /// Open streams by peer, route and side.
    pub streams: Vec<StreamSummary>,
}

/// Which side of a migration this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// This host is the source.
    Outgoing,
    /// This host is the destination.
    Incoming,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub id: String,
    pub vm: String,
    pub direction: Direction,
    /// The other host: the destination of an outgoing migration, the source of an incoming one.
    pub peer: String,
    /// As in the `phase` events, `done` once ended.
    pub phase: String,
    pub step: Option<String>,
    /// `null` while it runs.
    pub outcome: Option<OutcomeKind>,
    /// The last word on an ended migration.
    pub message: Option<String>,
    /// RFC 3339, UTC.
    pub started: String,
    /// Until now, or until it ended.
    pub duration_s: f64,
    /// The last progress of a running migration.
    pub progress: Option<ProgressSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressSummary {
    /// `mirror`, `ram`; on the destination `receiving` (everything its routes received).
    pub stage: String,
    pub done_bytes: u64,
    /// On the destination an estimate (RAM size plus copied disks: zero pages are not sent,
    /// pages the guest dirties are sent again).
    pub total_bytes: u64,
    pub bytes_per_s: Option<f64>,
    pub eta_s: Option<f64>,
}

/// Where the agent's incoming migrations come from (the destination side).
pub trait IncomingStatus: Send + Sync {
    /// The incoming migrations: prepared or running, and the last [`HISTORY`] ended ones.
    fn summaries(&self) -> Vec<(SystemTime, MigrationSummary)>;
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamSummary {
    pub peer: String,
    pub route: String,
    pub side: String,
    pub open: u64,
}

/// One migration as the admin API sees it.
pub struct Tracked {
    pub id: String,
    pub vm: String,
    pub to: String,
    pub cancel: CancellationToken,
    /// When it was accepted (or found in the journal by recovery).
    started: SystemTime,
    t0: Instant,
    events: broadcast::Sender<Event>,
    state: Mutex<TrackedState>,
    /// The operator's decision, sent while the migration awaits one.
    resolution: tokio::sync::watch::Sender<Option<GuestOn>>,
    awaiting: std::sync::atomic::AtomicBool,
}

/// Marks a migration as awaiting the operator's decision while it lives.
pub struct Awaiting<'a>(&'a Tracked);

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.0.awaiting.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Default)]
struct TrackedState {
    /// The VM's real name (`-name`), once Begin has read it.
    vm_name: Option<String>,
    phase: String,
    step: Option<String>,
    outcome: Option<OutcomeKind>,
    /// The `done` message, and when it came.
    ended: Option<(String, Instant)>,
    progress: Option<ProgressSummary>,
    history: Vec<Event>,
}

impl Tracked {
    /// Records and broadcasts a report, stamped with the time; `done` gets its duration here.
    pub fn report(&self, mut r: Report) {
        let event = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.ended.is_some() {
                // One `done` per migration; nothing after it.
                return;
            }
            match &mut r {
                Report::Phase { phase, step, .. } => {
                    s.phase = phase.clone();
                    s.step = step.clone();
                    s.progress = None;
                }
                Report::Done { outcome, message, duration_s, .. } => {
                    *duration_s = self.t0.elapsed().as_secs_f64();
                    s.outcome = Some(*outcome);
                    s.phase = "done".into();
                    s.step = None;
                    s.progress = None;
                    s.ended = Some((message.clone(), Instant::now()));
                }
                Report::Progress { stage, done_bytes, total_bytes, bytes_per_s, eta_s, .. } => {
                    s.progress = Some(ProgressSummary {
                        stage: stage.clone(),
                        done_bytes: *done_bytes,
                        total_bytes: *total_bytes,
                        bytes_per_s: *bytes_per_s,
                        eta_s: *eta_s,
                    });
                }
                _ => {}
            }
            if matches!(r, Report::Progress { .. }) {
                let progress = s.history.iter().filter(|h| matches!(h.report, Report::Progress { .. })).count();
                if progress >= HISTORY_PROGRESS {
                    if let Some(i) = s.history.iter().position(|h| matches!(h.report, Report::Progress { .. })) {
                        s.history.remove(i);
                    }
                }
            }
            let event = Event::now(&self.id, r);
            s.history.push(event.clone());
            event
        };
        // No watcher is fine.
        let _ = self.events.send(event);
    }

    /// From now until the guard is dropped, `migtun resolve` may decide for this migration.
    pub fn await_resolution(&self) -> Awaiting<'_> {
        self.awaiting.store(true, std::sync::atomic::Ordering::SeqCst);
        Awaiting(self)
    }

    /// The operator's decision, when it comes.
    pub async fn resolution(&self) -> GuestOn {
        let mut rx = self.resolution.subscribe();
        loop {
            if let Some(g) = *rx.borrow_and_update() {
                return g;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Records the operator's decision; refused unless the migration awaits one.
    pub fn resolve(&self, guest_on: GuestOn) -> Result<(), String> {
        if !self.awaiting.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(format!(
                "migration {} does not wait for a decision (only a migration whose outcome is unknown does; see migtun status)",
                self.id
            ));
        }
        self.resolution.send_replace(Some(guest_on));
        Ok(())
    }

    /// Names the VM by what Begin found (its `-name`) rather than its QMP socket's file name.
    pub fn set_vm_name(&self, name: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).vm_name = Some(name.to_string());
    }

    fn summary(&self) -> MigrationSummary {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let vm = s.vm_name.clone().unwrap_or_else(|| self.vm.clone());
        let until = s.ended.as_ref().map(|(_, at)| *at).unwrap_or_else(Instant::now);
        MigrationSummary {
            id: self.id.clone(),
            vm,
            direction: Direction::Outgoing,
            peer: self.to.clone(),
            phase: s.phase.clone(),
            step: s.step.clone(),
            outcome: s.outcome,
            message: s.ended.as_ref().map(|(m, _)| m.clone()),
            started: rfc3339(self.started),
            duration_s: until.duration_since(self.t0).as_secs_f64(),
            progress: s.progress.clone(),
        }
    }

    /// When it ended, if it has.
    fn ended(&self) -> Option<Instant> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).ended.as_ref().map(|(_, at)| *at)
    }

    fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        // Subscribe under the lock so no report falls between history and live stream.
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.history.clone(), self.events.subscribe())
    }
}

/// Starts a migration: given the args and its tracker, runs it to the end.
pub type Starter = Arc<dyn Fn(MigrateArgs, Arc<Tracked>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Reloads the agent (`serve` provides it): the changes, one line each, or the problems, one
/// line each naming the file and the key.
pub type Reloader = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send>> + Send + Sync>;

/// The migrations this agent runs, and the last [`HISTORY`] it ran (since it started).
#[derive(Default)]
pub struct Registry {
    migrations: Mutex<HashMap<String, Arc<Tracked>>>,
    incoming: OnceLock<Arc<dyn IncomingStatus>>,
    /// The tunnels `migtun tunnel` opens, closes and lists.
    tunnels: OnceLock<Arc<crate::tunnels::Tunnels>>,
    reloader: OnceLock<Reloader>,
}

impl Registry {
    /// What the admin op `reload` runs.
    pub fn set_reloader(&self, reloader: Reloader) {
        let _ = self.reloader.set(reloader);
    }

    pub fn track(&self, id: &str, vm: &str, to: &str) -> Arc<Tracked> {
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        let t = Arc::new(Tracked {
            id: id.to_string(),
            vm: vm.to_string(),
            to: to.to_string(),
            cancel: CancellationToken::new(),
            started: SystemTime::now(),
            t0: Instant::now(),
            events,
            state: Mutex::new(TrackedState { phase: "begin".into(), ..Default::default() }),
            resolution: tokio::sync::watch::channel(None).0,
            awaiting: std::sync::atomic::AtomicBool::new(false),
        });
        let mut all = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(id.to_string(), t.clone());
        prune(&mut all);
        t
    }

    /// The destination side, listed by `migtun status` with the outgoing migrations.
    pub fn set_incoming(&self, incoming: Arc<dyn IncomingStatus>) {
        let _ = self.incoming.set(incoming);
    }

    /// The agent's tunnels, for `migtun tunnel`.
    pub fn set_tunnels(&self, tunnels: Arc<crate::tunnels::Tunnels>) {
        let _ = self.tunnels.set(tunnels);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Tracked>> {
        self.migrations.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Outgoing and incoming migrations, oldest first.
    pub fn summaries(&self) -> Vec<MigrationSummary> {
        let mut v: Vec<(SystemTime, MigrationSummary)> = {
            let mut all = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
            prune(&mut all);
            all.values().map(|t| (t.started, t.summary())).collect()
        };
        if let Some(incoming) = self.incoming.get() {
            v.extend(incoming.summaries());
        }
        v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        v.into_iter().map(|(_, s)| s).collect()
    }
}

/// Drops the ended migrations beyond the last [`HISTORY`].
fn prune(all: &mut HashMap<String, Arc<Tracked>>) {
    let mut ended: Vec<(Instant, String)> = all.values().filter_map(|t| t.ended().map(|at| (at, t.id.clone()))).collect();
    if ended.len() <= HISTORY {
        return;
    }
    ended.sort();
    for (_, id) in &ended[..ended.len() - HISTORY] {
        all.remove(id);
    }
}

/// Serves the admin socket until `stop`.
pub async fn serve(
    path: &Path,
    agent: AgentHandle,
    registry: Arc<Registry>,
    starter: Starter,
    stop: CancellationToken,
) -> std::io::Result<()> {
    serve_on(bind(path).await?, agent, registry, starter, stop).await
}

/// Binds the admin socket (mode 0600), so that `serve` can report a failure at start-up and
/// tell systemd it is ready only once the socket accepts connections.
pub async fn bind(path: &Path) -> std::io::Result<LocalListener> {
    LocalListener::bind(&Endpoint::Unix(path.to_path_buf()), 0o600).await
}

/// Serves an admin socket bound by [`bind`] until `stop`.
pub async fn serve_on(
    listener: LocalListener,
    agent: AgentHandle,
    registry: Arc<Registry>,
    starter: Starter,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut accept = migtun_proxy::accept::AcceptLoop::new("admin", Some(agent.metrics()));
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            c = accept.accept(|| listener.accept()) => c,
        };
        let (agent, registry, starter) = (agent.clone(), registry.clone(), starter.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(conn, agent, registry, starter).await {
                warn!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn handle(conn: LocalStream, agent: AgentHandle, registry: Arc<Registry>, starter: Starter) -> std::io::Result<()> {
    let (read, mut write) = tokio::io::split(conn);
    let mut limited = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64));
    let mut line = String::new();
    let n = limited.read_line(&mut line).await?;
    if n == 0 {
        return Ok(());
    }
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return send(&mut write, &serde_json::json!({ "error": format!("bad request: {e}") })).await,
    };
    match request {
        Request::Status => {
            let metrics = agent.metrics().encode();
            let status = Status {
                v: EVENTS_VERSION,
                name: agent.name().to_string(),
                migrations: registry.summaries(),
                routes: agent.routes().list().iter().map(|r| r.name.clone()).collect(),
                streams: open_streams(&metrics),
            };
            send(&mut write, &status).await
        }
        Request::Cancel { id } => match registry.get(&id) {
            Some(t) => {
                t.cancel.cancel();
                send(&mut write, &serde_json::json!({ "ok": true })).await
            }
            None => send(&mut write, &serde_json::json!({ "error": format!("no migration {id}") })).await,
        },
        Request::Resolve { id, guest_on } => match registry.get(&id).ok_or_else(|| format!("no migration {id}")).and_then(|t| t.resolve(guest_on)) {
            Ok(()) => {
                warn!(migration = %id, guest_on = guest_on.as_str(), "the operator resolves the migration's unknown outcome");
                send(&mut write, &serde_json::json!({ "ok": true })).await
            }
            Err(e) => send(&mut write, &serde_json::json!({ "error": e })).await,
        },
        Request::Reload => match registry.reloader.get().cloned() {
            Some(reload) => match reload().await {
                Ok(changes) => send(&mut write, &serde_json::json!({ "ok": true, "changes": changes })).await,
                Err(e) => send(&mut write, &serde_json::json!({ "error": e })).await,
            },
            None => send(&mut write, &serde_json::json!({ "error": "this agent cannot reload" })).await,
        },
        Request::Watch { id } => match registry.get(&id) {
            Some(t) => stream_reports(&t, &mut write).await,
            None => send(&mut write, &serde_json::json!({ "error": format!("no migration {id}") })).await,
        },
        Request::TunnelOpen { to, name, sockets, ttl_secs } => {
            let Some(tunnels) = registry.tunnels.get().cloned() else {
                return send(&mut write, &serde_json::json!({ "error": crate::tunnels::TunnelError::NotConfigured.to_string() })).await;
            };
            match tunnels.open(&to, &name, &sockets, std::time::Duration::from_secs(ttl_secs)).await {
                Ok(info) => send(&mut write, &info).await,
                Err(e) => send(&mut write, &serde_json::json!({ "error": e.to_string() })).await,
            }
        }
        Request::TunnelClose { name } => {
            let Some(tunnels) = registry.tunnels.get().cloned() else {
                return send(&mut write, &serde_json::json!({ "error": crate::tunnels::TunnelError::NotConfigured.to_string() })).await;
            };
            match tunnels.close(&name).await {
                Ok(()) => send(&mut write, &serde_json::json!({ "ok": true })).await,
                Err(e) => send(&mut write, &serde_json::json!({ "error": e.to_string() })).await,
            }
        }
        Request::TunnelList => {
            let list = registry.tunnels.get().map(|t| t.list()).unwrap_or_default();
            send(&mut write, &serde_json::json!({ "tunnels": list })).await
        }
        Request::Migrate { args } => {
            let id = crate::messages::new_migration_id();
            let vm = args.qmp.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let tracked = registry.track(&id, &vm, &args.to);
            tracked.report(Report::Accepted { vm, to: args.to.clone() });
            // Subscribe before the migration starts so the client sees every report.
            let t = tracked.clone();
            tokio::spawn(starter(args, t));
            stream_reports(&tracked, &mut write).await
        }
    }
}

/// Sends history then live reports until `done` (or the client goes away: the migration
/// continues regardless).
async fn stream_reports<W: tokio::io::AsyncWrite + Unpin>(t: &Tracked, write: &mut W) -> std::io::Result<()> {
    let (history, mut live) = t.subscribe();
    for r in &history {
        send(write, r).await?;
        if matches!(r.report, Report::Done { .. }) {
            return Ok(());
        }
    }
    loop {
        match live.recv().await {
            Ok(r) => {
                let done = matches!(r.report, Report::Done { .. });
                send(write, &r).await?;
                if done {
                    return Ok(());
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

async fn send<W: tokio::io::AsyncWrite + Unpin, T: Serialize>(write: &mut W, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.flush().await
}

/// Open streams from the metrics text (`migtun_streams_open`).
fn open_streams(metrics: &str) -> Vec<StreamSummary> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("migtun_streams_open{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            let open = value.trim().parse::<f64>().ok()? as u64;
            let get = |k: &str| {
                labels.split(',').find_map(|kv| kv.strip_prefix(&format!("{k}=\""))).map(|v| v.trim_end_matches('"').to_string())
            };
            if open == 0 {
                return None;
            }
            Some(StreamSummary { peer: get("peer")?, route: get("route")?, side: get("side")?, open })
        })
        .collect()
}

/// Client side: sends `request` to the admin socket and calls `on_line` for every answer line.
pub async fn request<F: FnMut(serde_json::Value) -> bool>(socket: &Path, request: &Request, mut on_line: F) -> std::io::Result<()> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot reach the agent at {}: {e}", socket.display())))?;
    let (read, mut write) = stream.into_split();
    send(&mut write, request).await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let value: serde_json::Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        if !on_line(value) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Totals;

    fn end(t: &Tracked, outcome: OutcomeKind) {
        t.report(Report::done(outcome, format!("{outcome:?}"), Totals { downtime_ms: Some(7), disk_bytes: 1, ram_bytes: 2 }));
    }

    #[test]
    fn status_keeps_the_running_and_the_last_ended_migrations() {
        let r = Registry::default();
        let running = r.track("m-running", "vm", "host-b");
        running.report(Report::Phase { phase: "perform".into(), step: Some("migrating".into()), message: "copying RAM".into() });
        running.report(Report::Progress {
            stage: "ram".into(),
            done_bytes: 10,
            total_bytes: 40,
            bytes_per_s: Some(5.0),
            eta_s: Some(6.0),
            dirty_bytes_per_s: None,
            expected_downtime_ms: None,
        });
        for i in 0..HISTORY + 8 {
            let t = r.track(&format!("m-{i:03}"), "vm", "host-b");
            end(&t, if i % 2 == 0 { OutcomeKind::Refused } else { OutcomeKind::Succeeded });
        }
        let all = r.summaries();
        assert_eq!(all.len(), HISTORY + 1, "the running one and the last {HISTORY} ended");
        assert!(all.iter().all(|m| m.id != "m-000" && m.id != "m-007"), "the oldest ended ones are dropped");
        assert!(all.iter().any(|m| m.id == format!("m-{:03}", HISTORY + 7)));
        let m = all.iter().find(|m| m.id == "m-running").expect("a running migration is never dropped");
        assert_eq!((m.phase.as_str(), m.step.as_deref(), m.outcome), ("perform", Some("migrating"), None));
        assert_eq!(m.direction, Direction::Outgoing);
        assert_eq!(m.peer, "host-b");
        let p = m.progress.as_ref().expect("the last progress");
        assert_eq!((p.stage.as_str(), p.done_bytes, p.total_bytes, p.bytes_per_s, p.eta_s), ("ram", 10, 40, Some(5.0), Some(6.0)));
        assert!(m.started.ends_with('Z') && m.started.len() == 24, "{}", m.started);
        let ended = all.iter().find(|m| m.outcome == Some(OutcomeKind::Succeeded)).unwrap();
        assert_eq!(ended.phase, "done");
        assert!(ended.progress.is_none());
        assert_eq!(ended.message.as_deref(), Some("Succeeded"));
    }

    #[test]
    fn events_are_stamped_and_done_is_final() {
        let r = Registry::default();
        let t = r.track("m-1", "vm", "host-b");
        t.report(Report::Log { message: "hello".into() });
        end(&t, OutcomeKind::Failed);
        t.report(Report::Log { message: "after the end".into() });
        end(&t, OutcomeKind::Succeeded);
        let (history, _) = t.subscribe();
        assert_eq!(history.len(), 2, "nothing after done: {history:?}");
        for e in &history {
            assert_eq!((e.v, e.id.as_str()), (EVENTS_VERSION, "m-1"));
            assert!(e.ts.ends_with('Z'));
        }
        match &history[1].report {
            Report::Done { outcome, error, duration_s, downtime_ms, disk_bytes, ram_bytes, .. } => {
                assert_eq!(*outcome, OutcomeKind::Failed);
                assert_eq!(error.as_deref(), Some("Failed"));
                assert!(*duration_s >= 0.0);
                assert_eq!((*downtime_ms, *disk_bytes, *ram_bytes), (Some(7), 1, 2));
            }
            other => panic!("{other:?}"),
        }
        let v = serde_json::to_value(&history[1]).unwrap();
        for key in ["v", "ts", "id", "event", "outcome", "message", "error", "duration_s", "downtime_ms", "disk_bytes", "ram_bytes"] {
            assert!(v.get(key).is_some(), "done has {key}: {v}");
        }
    }
}
