//! The local admin API: what `migtun migrate` and `migtun status` talk to.
//!
//! JSON lines on a UNIX socket (mode 0600, so only the agent's user may drive migrations). A
//! connection sends one request line and reads answer lines:
//!
//! ```text
//! {"op":"migrate","args":{...}}   -> Report lines ("accepted" first, "done" last)
//! {"op":"watch","id":"m-..."}     -> the same stream for a running migration (history first)
//! {"op":"cancel","id":"m-..."}    -> {"ok":true} | {"error":"..."}
//! {"op":"status"}                 -> one Status line
//! {"op":"resolve","id":"m-...","guest_on":"source"|"destination"}
//!                                 -> {"ok":true} | {"error":"..."}  (only while the outcome is unknown)
//! ```
//!
//! The migration belongs to the agent: a client that disconnects (or dies) does not stop it.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use migtun_proxy::agent::AgentHandle;
use migtun_proxy::endpoint::{Endpoint, LocalListener, LocalStream};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::messages::{MigrateArgs, OutcomeKind, Report};

/// Longest request line.
const MAX_REQUEST: usize = 64 * 1024;
/// Reports buffered per watcher; a watcher that falls further behind skips progress lines (it
/// gets the final `done` line regardless, from the history).
const WATCH_CAPACITY: usize = 256;
/// Reports kept per migration for late watchers; progress lines beyond this are dropped from
/// the history (phase changes and the outcome are always kept).
const HISTORY_PROGRESS: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Migrate { args: MigrateArgs },
    Watch { id: String },
    Cancel { id: String },
    Status,
    /// The operator's answer when the destination cannot say where the guest is.
    Resolve { id: String, guest_on: GuestOn },
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
    pub name: String,
    pub migrations: Vec<MigrationSummary>,
    pub routes: Vec<String>,
    /// Open streams by peer, route and side.
    pub streams: Vec<StreamSummary>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub id: String,
    pub vm: String,
    pub to: String,
    pub phase: String,
    pub outcome: Option<OutcomeKind>,
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
    events: broadcast::Sender<Report>,
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
    outcome: Option<OutcomeKind>,
    history: Vec<Report>,
}

impl Tracked {
    /// Records and broadcasts a report.
    pub fn report(&self, r: Report) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match &r {
                Report::Phase { phase, .. } => s.phase = phase.clone(),
                Report::Done { outcome, .. } => {
                    s.outcome = Some(*outcome);
                    s.phase = "done".into();
                }
                _ => {}
            }
            if matches!(r, Report::Progress { .. }) {
                let progress = s.history.iter().filter(|h| matches!(h, Report::Progress { .. })).count();
                if progress >= HISTORY_PROGRESS {
                    if let Some(i) = s.history.iter().position(|h| matches!(h, Report::Progress { .. })) {
                        s.history.remove(i);
                    }
                }
            }
            s.history.push(r.clone());
        }
        // No watcher is fine.
        let _ = self.events.send(r);
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
        MigrationSummary { id: self.id.clone(), vm, to: self.to.clone(), phase: s.phase.clone(), outcome: s.outcome }
    }

    fn subscribe(&self) -> (Vec<Report>, broadcast::Receiver<Report>) {
        // Subscribe under the lock so no report falls between history and live stream.
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.history.clone(), self.events.subscribe())
    }
}

/// Starts a migration: given the args and its tracker, runs it to the end.
pub type Starter = Arc<dyn Fn(MigrateArgs, Arc<Tracked>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The migrations this agent runs or ran (since it started).
#[derive(Default)]
pub struct Registry {
    migrations: Mutex<HashMap<String, Arc<Tracked>>>,
}

impl Registry {
    pub fn track(&self, id: &str, vm: &str, to: &str) -> Arc<Tracked> {
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        let t = Arc::new(Tracked {
            id: id.to_string(),
            vm: vm.to_string(),
            to: to.to_string(),
            cancel: CancellationToken::new(),
            events,
            state: Mutex::new(TrackedState { phase: "begin".into(), ..Default::default() }),
            resolution: tokio::sync::watch::channel(None).0,
            awaiting: std::sync::atomic::AtomicBool::new(false),
        });
        self.migrations.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), t.clone());
        t
    }

    pub fn get(&self, id: &str) -> Option<Arc<Tracked>> {
        self.migrations.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    pub fn summaries(&self) -> Vec<MigrationSummary> {
        let mut v: Vec<_> = self.migrations.lock().unwrap_or_else(|p| p.into_inner()).values().map(|t| t.summary()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
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
    let listener = LocalListener::bind(&Endpoint::Unix(path.to_path_buf()), 0o600).await?;
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
        Request::Watch { id } => match registry.get(&id) {
            Some(t) => stream_reports(&t, &mut write).await,
            None => send(&mut write, &serde_json::json!({ "error": format!("no migration {id}") })).await,
        },
        Request::Migrate { args } => {
            let id = crate::messages::new_migration_id();
            let vm = args.qmp.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let tracked = registry.track(&id, &vm, &args.to);
            tracked.report(Report::Accepted { id: id.clone(), vm, to: args.to.clone() });
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
        if matches!(r, Report::Done { .. }) {
            return Ok(());
        }
    }
    loop {
        match live.recv().await {
            Ok(r) => {
                let done = matches!(r, Report::Done { .. });
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
