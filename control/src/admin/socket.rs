//! The admin socket: serving it (one request line per connection, answer lines back) and the
//! client side that `migtun migrate` and `migtun status` use ([`request`]).

use std::path::Path;
use std::sync::Arc;

use migtun_proxy::agent::AgentHandle;
use migtun_proxy::io::endpoint::{Endpoint, LocalListener, LocalStream};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::messages::{Report, EVENTS_VERSION};
use super::{Registry, Request, Starter, Status, StreamSummary, Tracked};

/// Longest request line.
const MAX_REQUEST: usize = 64 * 1024;

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
    let mut accept = migtun_proxy::io::accept::AcceptLoop::new("admin", Some(agent.metrics()));
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
