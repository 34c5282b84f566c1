//! Tunnels on demand: a per-migration pair of routes for tooling that drives QEMU itself
//! (libvirt's `--migrateuri unix://...`, `--disks-uri unix://...`).
//!
//! `migtun tunnel open --to host-b --name vm1` asks this agent (the admin socket), which asks
//! host-b (`tunnel-open` on the control RPC) to expose `t-vm1.<socket>` to this host only, with
//! targets `dir/vm1/<socket>.sock` under host-b's `[tunnels] dir`; then this agent listens on
//! the same paths under its own `dir`, each a forward to that route. libvirt gives both QEMUs the
//! same path: the destination QEMU listens there, the source QEMU connects there. Several
//! migrations to one host at once each get their own paths.
//!
//! Both sides hold a tunnel until it is closed (`migtun tunnel close`) or its TTL passes, each
//! on its own clock: an agent that dies leaves nothing open on its peer past the TTL. The
//! destination decides: only peers in its `[tunnels] allow`, names it validates, at most
//! `max_open` tunnels and `max_ttl` each, paths only under its own `dir`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migtun_proxy::agent::{AgentHandle, DynamicForward, ExposeGuard, ForwardGuard};
use migtun_proxy::config::{TunnelsConfig, TUNNEL_SOCKET_MODE};
use migtun_proxy::io::endpoint::Endpoint;
use migtun_proxy::route::ExposeRoute;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::rpc::{MethodError, RpcClient, Router, Session};

/// Longest tunnel name: it becomes a directory and part of route names (at most
/// `wire::MAX_NAME_LEN`, 64 bytes, with the `t-` prefix, the `.` and a socket name) and of
/// socket paths (which must stay under 108 bytes).
pub const MAX_NAME: usize = 32;

/// Longest socket name (`migration`, `nbd`, ...).
pub const MAX_SOCKET_NAME: usize = 16;

// `t-<name>.<socket>` is a valid route name at the longest.
const _: () = assert!(2 + MAX_NAME + 1 + MAX_SOCKET_NAME <= migtun_proxy::route::wire::MAX_NAME_LEN);

/// Most sockets one tunnel carries: libvirt needs two (migration, disks).
pub const MAX_SOCKETS: usize = 8;

/// What `migtun tunnel open` carries when `--socket` is not given: the migration stream (with
/// its multifd channels) and the NBD storage stream.
pub const DEFAULT_SOCKETS: [&str; 2] = ["migration", "nbd"];

/// Lifetime a tunnel gets when none is asked for (10 minutes). It bounds the listeners and
/// routes only: streams already open outlive them, and QEMU opens every channel of a migration
/// (and the mirror its NBD connection) when it starts, so the TTL must cover until then.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// `tunnel-open`: the source's request to the destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    pub name: String,
    pub sockets: Vec<String>,
    pub ttl_secs: u64,
}

/// The destination's answer: the routes it exposes and for how long.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpenReply {
    pub routes: Vec<TunnelSocket>,
    pub ttl_secs: u64,
}

/// One socket of a tunnel: its route and its path (on the host that reports it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelSocket {
    pub socket: String,
    pub route: String,
    pub path: PathBuf,
}

/// `tunnel-close`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    pub name: String,
}

/// A tunnel as `migtun tunnel open` / `list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TunnelInfo {
    pub name: String,
    /// `outgoing` (this host listens, the peer's QEMU listens at the other end) or `incoming`.
    pub direction: String,
    pub peer: String,
    /// This host's sockets.
    pub sockets: Vec<TunnelSocket>,
    /// The peer's paths (outgoing tunnels: where the destination's QEMU must listen).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_sockets: Vec<TunnelSocket>,
    pub expires_in_secs: u64,
}

/// Why a tunnel cannot be opened or closed. Each message names the key, the peer or the name.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("this agent has no [tunnels] section: it neither opens nor accepts tunnels")]
    NotConfigured,
    #[error("tunnel name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error("tunnel {name:?} is open already on {host}")]
    Exists { name: String, host: String },
    #[error("no tunnel {name:?} on {host}")]
    Unknown { name: String, host: String },
    #[error("{host} has {max} tunnels open, its [tunnels] max_open")]
    TooMany { host: String, max: usize },
    #[error("{path}: {why}")]
    Path { path: String, why: String },
    #[error("tunnel {name:?}: {why}")]
    Agent { name: String, why: String },
    #[error("{0}")]
    Peer(String),
}

impl TunnelError {
    fn to_method_error(&self) -> MethodError {
        match self {
            TunnelError::NotConfigured => MethodError::refused(403, "no-tunnels", self.to_string()),
            TunnelError::BadName { .. } => MethodError::bad_request(self.to_string()),
            TunnelError::Exists { .. } => MethodError::refused(409, "tunnel-exists", self.to_string()),
            TunnelError::Unknown { .. } => MethodError::new(404, self.to_string()),
            TunnelError::TooMany { .. } => MethodError::refused(429, "too-many-tunnels", self.to_string()),
            _ => MethodError::failed(self.to_string()),
        }
    }
}

/// Tunnel and socket names: what a directory, a route and a path may carry.
pub fn validate_name(what: &str, name: &str) -> Result<(), TunnelError> {
    let bad = |why: &str| Err(TunnelError::BadName { name: name.to_string(), why: format!("{what}: {why}") });
    let max = if what == "socket" { MAX_SOCKET_NAME } else { MAX_NAME };
    if name.is_empty() || name.len() > max {
        return bad(&format!("must have 1 to {max} characters"));
    }
    if !name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric()) {
        return bad("must start with a letter or digit");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return bad("only letters, digits, '-' and '_'");
    }
    Ok(())
}

/// The route of socket `socket` of tunnel `name`, and the scope its streams must name.
fn route_of(name: &str, socket: &str) -> (String, String) {
    (format!("t-{name}.{socket}"), format!("t-{name}"))
}

/// One open tunnel, either side.
struct Open {
    direction: &'static str,
    peer: String,
    dir: PathBuf,
    sockets: Vec<TunnelSocket>,
    peer_sockets: Vec<TunnelSocket>,
    expires: Instant,
    /// What keeps it open: dropping these removes the routes / stops the listeners.
    _exposes: Vec<ExposeGuard>,
    forwards: Vec<ForwardGuard>,
}

/// The tunnels of this agent, both directions.
pub struct Tunnels {
    agent: AgentHandle,
    config: Option<TunnelsConfig>,
    open: Mutex<HashMap<String, Open>>,
}

impl Tunnels {
    pub fn new(agent: AgentHandle, config: Option<TunnelsConfig>) -> Arc<Tunnels> {
        Arc::new(Tunnels { agent, config, open: Mutex::new(HashMap::new()) })
    }

    fn config(&self) -> Result<&TunnelsConfig, TunnelError> {
        self.config.as_ref().ok_or(TunnelError::NotConfigured)
    }

    /// May `peer` open tunnels here (`[tunnels] allow`)? For the router's policy.
    pub fn check_peer(&self, peer: &str, method: &str) -> Result<(), MethodError> {
        let host = self.agent.name();
        let refuse = |why: String| Err(MethodError::refused(403, "not-allowed", format!("{peer} may not open tunnels to {host} ({method} refused): {why}")));
        match &self.config {
            None => refuse(format!("{host} has no [tunnels] section")),
            Some(c) if c.allow.iter().any(|a| a == peer) => Ok(()),
            Some(_) => refuse(format!("not in [tunnels] allow of {host}")),
        }
    }

    /// The destination's RPC methods.
    pub fn register(self: &Arc<Self>, router: Router) -> Router {
        let (o, c) = (self.clone(), self.clone());
        router
            .method("tunnel-open", move |session: Session, args| {
                let this = o.clone();
                async move {
                    let req: OpenRequest = serde_json::from_value(args).map_err(|e| MethodError::bad_request(format!("tunnel-open: {e}")))?;
                    let reply = this.accept(session.peer.name(), req).map_err(|e| {
                        warn!(peer = %session.peer.name(), error = %e, "refused a tunnel");
                        e.to_method_error()
                    })?;
                    Ok(serde_json::to_value(reply).unwrap_or_default())
                }
            })
            .method("tunnel-close", move |session: Session, args| {
                let this = c.clone();
                async move {
                    let req: CloseRequest = serde_json::from_value(args).map_err(|e| MethodError::bad_request(format!("tunnel-close: {e}")))?;
                    this.close_incoming(session.peer.name(), &req.name).map_err(|e| e.to_method_error())?;
                    Ok(serde_json::json!({ "ok": true }))
                }
            })
    }

    /// Destination: exposes the tunnel's routes to `peer`, targets under `[tunnels] dir`.
    fn accept(self: &Arc<Self>, peer: &str, req: OpenRequest) -> Result<OpenReply, TunnelError> {
        let config = self.config()?.clone();
        validate_name("tunnel", &req.name)?;
        let sockets = validate_sockets(&req.sockets)?;
        let ttl = Duration::from_secs(req.ttl_secs.max(1)).min(config.max_ttl);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        self.room_for(&open, &config, &req.name)?;
        let dir = create_dir(&config, &req.name)?;
        let mut exposes = Vec::new();
        let mut socks = Vec::new();
        for socket in &sockets {
            let (route, scope) = route_of(&req.name, socket);
            let path = dir.join(format!("{socket}.sock"));
            let guard = self.agent.add_expose(ExposeRoute {
                name: route.clone(),
                target: Endpoint::Unix(path.clone()),
                allow: vec![peer.to_string()],
                migration: Some(scope),
                received: None,
            });
            match guard {
                Ok(g) => exposes.push(g),
                Err(e) => {
                    drop(exposes);
                    remove_dir(&config, &dir);
                    return Err(TunnelError::Agent { name: req.name.clone(), why: e.to_string() });
                }
            }
            socks.push(TunnelSocket { socket: socket.clone(), route, path });
        }
        info!(tunnel = %req.name, %peer, ttl_secs = ttl.as_secs(), dir = %dir.display(), "tunnel opened for a peer");
        open.insert(
            req.name.clone(),
            Open {
                direction: "incoming",
                peer: peer.to_string(),
                dir,
                sockets: socks.clone(),
                peer_sockets: Vec::new(),
                expires: Instant::now() + ttl,
                _exposes: exposes,
                forwards: Vec::new(),
            },
        );
        drop(open);
        self.expire_after(&req.name, ttl);
        Ok(OpenReply { routes: socks, ttl_secs: ttl.as_secs() })
    }

    /// Source: asks `to` for the tunnel, then listens on the same paths here.
    pub async fn open(self: &Arc<Self>, to: &str, name: &str, sockets: &[String], ttl: Duration) -> Result<TunnelInfo, TunnelError> {
        let config = self.config()?.clone();
        validate_name("tunnel", name)?;
        let sockets = validate_sockets(sockets)?;
        let ttl = ttl.min(config.max_ttl).max(Duration::from_secs(1));
        {
            let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            self.room_for(&open, &config, name)?;
        }
        let rpc = self.rpc(to).await?;
        let req = OpenRequest { name: name.to_string(), sockets: sockets.clone(), ttl_secs: ttl.as_secs() };
        let reply: OpenReply = rpc.call("tunnel-open", &req).await.map_err(|e| TunnelError::Peer(e.to_string()))?;
        // The peer holds the tunnel now: whatever fails here closes it there too.
        let local = self.listen(&config, to, name, &sockets).await;
        let (dir, forwards, socks) = match local {
            Ok(l) => l,
            Err(e) => {
                let _ = rpc.call::<_, serde_json::Value>("tunnel-close", &CloseRequest { name: name.to_string() }).await;
                return Err(e);
            }
        };
        let ttl = Duration::from_secs(reply.ttl_secs.max(1)).min(ttl);
        let info = TunnelInfo {
            name: name.to_string(),
            direction: "outgoing".into(),
            peer: to.to_string(),
            sockets: socks.clone(),
            peer_sockets: reply.routes.clone(),
            expires_in_secs: ttl.as_secs(),
        };
        let entry = Open {
            direction: "outgoing",
            peer: to.to_string(),
            dir: dir.clone(),
            sockets: socks,
            peer_sockets: reply.routes,
            expires: Instant::now() + ttl,
            _exposes: Vec::new(),
            forwards,
        };
        let raced = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if open.contains_key(name) {
                Some(entry)
            } else {
                open.insert(name.to_string(), entry);
                None
            }
        };
        if let Some(entry) = raced {
            // Opened meanwhile by another request: keep that one.
            drop(entry);
            remove_dir(&config, &dir);
            let _ = rpc.call::<_, serde_json::Value>("tunnel-close", &CloseRequest { name: name.to_string() }).await;
            return Err(TunnelError::Exists { name: name.to_string(), host: self.agent.name().to_string() });
        }
        info!(tunnel = %name, peer = %to, ttl_secs = ttl.as_secs(), "tunnel opened to a peer");
        self.expire_after(name, ttl);
        Ok(info)
    }

    /// The forwards of an outgoing tunnel: `dir/<name>/<socket>.sock`, given to `[tunnels]
    /// owner` and `group` like their directory.
    async fn listen(&self, config: &TunnelsConfig, to: &str, name: &str, sockets: &[String]) -> Result<(PathBuf, Vec<ForwardGuard>, Vec<TunnelSocket>), TunnelError> {
        let dir = create_dir(config, name)?;
        let mut forwards = Vec::new();
        let mut socks = Vec::new();
        for socket in sockets {
            let (route, scope) = route_of(name, socket);
            let path = dir.join(format!("{socket}.sock"));
            let spec = DynamicForward { listen: Endpoint::Unix(path.clone()), mode: TUNNEL_SOCKET_MODE, peer: to.to_string(), route: route.clone(), migration: Some(scope) };
            match self.agent.add_forward(spec).await {
                Ok(g) => forwards.push(g),
                Err(e) => {
                    drop(forwards);
                    remove_dir(config, &dir);
                    return Err(TunnelError::Agent { name: name.to_string(), why: e.to_string() });
                }
            }
            if let Err(why) = give_to_owner(config, &path) {
                drop(forwards);
                remove_dir(config, &dir);
                return Err(TunnelError::Path { path: path.display().to_string(), why });
            }
            socks.push(TunnelSocket { socket: socket.clone(), route, path });
        }
        Ok((dir, forwards, socks))
    }

    /// Source: closes the tunnel here, then asks the peer to close its side.
    pub async fn close(self: &Arc<Self>, name: &str) -> Result<(), TunnelError> {
        let config = self.config()?.clone();
        let entry = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            match open.get(name) {
                Some(o) if o.direction == "outgoing" => open.remove(name),
                Some(_) => return Err(TunnelError::BadName { name: name.into(), why: "an incoming tunnel: its source closes it".into() }),
                None => None,
            }
        };
        let Some(entry) = entry else {
            return Err(TunnelError::Unknown { name: name.to_string(), host: self.agent.name().to_string() });
        };
        let peer = entry.peer.clone();
        shut(&config, entry).await;
        info!(tunnel = %name, %peer, "tunnel closed");
        let rpc = self.rpc(&peer).await?;
        match rpc.call::<_, serde_json::Value>("tunnel-close", &CloseRequest { name: name.to_string() }).await {
            Ok(_) => Ok(()),
            // Expired there already: closed all the same.
            Err(crate::rpc::RpcError::Remote { status: 404, .. }) => Ok(()),
            Err(e) => Err(TunnelError::Peer(format!("closed here; {peer} did not close its side (it will when its TTL passes): {e}"))),
        }
    }

    /// Destination: `peer` closes its tunnel.
    fn close_incoming(self: &Arc<Self>, peer: &str, name: &str) -> Result<(), TunnelError> {
        let config = self.config()?.clone();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        match open.get(name) {
            Some(o) if o.direction == "incoming" && o.peer == peer => {}
            _ => return Err(TunnelError::Unknown { name: name.to_string(), host: self.agent.name().to_string() }),
        }
        let Some(entry) = open.remove(name) else { return Ok(()) };
        drop(open);
        info!(tunnel = %name, %peer, "tunnel closed by its peer");
        tokio::spawn(async move { shut(&config, entry).await });
        Ok(())
    }

    /// Every open tunnel.
    pub fn list(&self) -> Vec<TunnelInfo> {
        let now = Instant::now();
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<TunnelInfo> = open
            .iter()
            .map(|(name, o)| TunnelInfo {
                name: name.clone(),
                direction: o.direction.into(),
                peer: o.peer.clone(),
                sockets: o.sockets.clone(),
                peer_sockets: o.peer_sockets.clone(),
                expires_in_secs: o.expires.saturating_duration_since(now).as_secs(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn room_for(&self, open: &HashMap<String, Open>, config: &TunnelsConfig, name: &str) -> Result<(), TunnelError> {
        let host = self.agent.name().to_string();
        if open.contains_key(name) {
            return Err(TunnelError::Exists { name: name.to_string(), host });
        }
        if open.len() >= config.max_open {
            return Err(TunnelError::TooMany { host, max: config.max_open });
        }
        Ok(())
    }

    /// Closes tunnel `name` when its TTL passes (unless it was closed, or replaced, before).
    fn expire_after(self: &Arc<Self>, name: &str, ttl: Duration) {
        let (this, name) = (Arc::downgrade(self), name.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let Some(this) = this.upgrade() else { return };
            let Ok(config) = this.config().cloned() else { return };
            let entry = {
                let mut open = this.open.lock().unwrap_or_else(|p| p.into_inner());
                match open.get(&name) {
                    Some(o) if o.expires <= Instant::now() => open.remove(&name),
                    _ => None,
                }
            };
            if let Some(entry) = entry {
                info!(tunnel = %name, peer = %entry.peer, direction = entry.direction, "tunnel expired (its TTL passed)");
                shut(&config, entry).await;
            }
        });
    }

    async fn rpc(&self, peer: &str) -> Result<RpcClient, TunnelError> {
        let io = self.agent.connect_control(peer).await.map_err(|e| TunnelError::Peer(e.to_string()))?;
        let rpc = RpcClient::connect(io, peer, self.agent.name()).await.map_err(|e| TunnelError::Peer(e.to_string()))?;
        Ok(rpc)
    }
}

fn validate_sockets(sockets: &[String]) -> Result<Vec<String>, TunnelError> {
    let sockets: Vec<String> = if sockets.is_empty() { DEFAULT_SOCKETS.iter().map(|s| s.to_string()).collect() } else { sockets.to_vec() };
    if sockets.len() > MAX_SOCKETS {
        return Err(TunnelError::BadName { name: sockets.join(","), why: format!("at most {MAX_SOCKETS} sockets per tunnel") });
    }
    for (i, s) in sockets.iter().enumerate() {
        validate_name("socket", s)?;
        if sockets[..i].contains(s) {
            return Err(TunnelError::BadName { name: s.clone(), why: "socket listed twice".into() });
        }
    }
    Ok(sockets)
}

/// Creates `dir/<name>` (and `dir` if needed), exclusively: a name in use by anything there
/// (another tunnel, a leftover) is refused, never reused or removed. `dir` itself, if the
/// agent creates it, is the agent's, 0711 (anyone may pass, nobody else may list or write); `dir/<name>` is created
/// 0700, given to `[tunnels] owner` and `group`, and only then opened up to `[tunnels] mode`,
/// so that it is never reachable by more than the configured owner and group.
fn create_dir(config: &TunnelsConfig, name: &str) -> Result<PathBuf, TunnelError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |p: &Path, e: std::io::Error| TunnelError::Path { path: p.display().to_string(), why: format!("tunnels.dir: {e}") };
    std::fs::DirBuilder::new().recursive(true).mode(0o711).create(&config.dir).map_err(|e| fail(&config.dir, e))?;
    let dir = config.dir.join(name);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TunnelError::Exists { name: name.to_string(), host: format!("this host ({} exists)", dir.display()) }
        } else {
            fail(&dir, e)
        }
    })?;
    // Set explicitly: the mode given to mkdir is cut by the agent's umask.
    let opened = give_to_owner(config, &dir).and_then(|()| {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(config.mode)).map_err(|e| format!("chmod {:04o} (tunnels.mode): {e}", config.mode))
    });
    if let Err(why) = opened {
        let _ = std::fs::remove_dir(&dir);
        return Err(TunnelError::Path { path: dir.display().to_string(), why });
    }
    Ok(dir)
}

/// Gives `path` (not following a symlink) to `[tunnels] owner` and `group` (ids resolved when
/// the config was loaded); with neither, it stays the agent's.
fn give_to_owner(config: &TunnelsConfig, path: &Path) -> Result<(), String> {
    let id = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "unchanged".into());
    let ids = config.ownership;
    ids.apply(path).map_err(|e| format!("chown to tunnels.owner/tunnels.group (uid {}, gid {}): {e}", id(ids.uid), id(ids.gid)))
}

/// Removes a tunnel's directory: only a direct child of `[tunnels] dir` that is a real
/// directory (not a symlink), with what QEMU left in it (its sockets).
fn remove_dir(config: &TunnelsConfig, dir: &Path) {
    if dir.parent() != Some(config.dir.as_path()) {
        warn!(dir = %dir.display(), "not removing a tunnel directory outside tunnels.dir");
        return;
    }
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                warn!(dir = %dir.display(), error = %e, "cannot remove the tunnel's directory");
            }
        }
        _ => {}
    }
}

/// Ends an open tunnel: its listeners stop (open streams go on), its routes go, its directory
/// goes.
async fn shut(config: &TunnelsConfig, entry: Open) {
    let Open { dir, forwards, _exposes, .. } = entry;
    for f in forwards {
        f.close().await;
    }
    drop(_exposes);
    remove_dir(config, &dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_or_collide_are_refused() {
        for bad in ["", ".", "..", "a/b", "-x", "a.b", "a b", &"x".repeat(MAX_NAME + 1), "é"] {
            assert!(validate_name("tunnel", bad).is_err(), "{bad:?}");
        }
        for good in ["vm1", "web-01", "a_b", "9"] {
            validate_name("tunnel", good).unwrap();
        }
        assert_eq!(validate_sockets(&[]).unwrap(), ["migration", "nbd"]);
        assert!(validate_sockets(&["a".into(), "a".into()]).is_err());
        assert!(validate_sockets(&(0..9).map(|i| format!("s{i}")).collect::<Vec<_>>()).is_err());
        assert!(validate_sockets(&["x".repeat(MAX_SOCKET_NAME + 1)]).is_err());
        validate_name("tunnel", &"x".repeat(MAX_NAME)).unwrap();
    }
}
