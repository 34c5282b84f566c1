//! The one `Config`: parsed from TOML, validated (every error names its key), explained.
//!
//! Parsing is strict: every table denies unknown keys, and every problem is reported as one
//! line naming the file, the TOML key (`peer[1].transport`, `expose[0].allow[2]`, 0-based) and
//! what is wrong with it. Relative paths are resolved against the config file's directory.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Deserialize;

use crate::endpoint::{Endpoint, Ownership, DEFAULT_SOCKET_MODE};
use crate::tls::identity::{dns_sans, load_certs, load_crls, load_key};

/// Default for `drain_timeout_secs`: how long open streams may run on after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest accepted `drain_timeout_secs`.
const MAX_DRAIN_TIMEOUT_SECS: i64 = 3600;
/// Longest route name; the wire format enforces the same limit.
const MAX_ROUTE_LEN: usize = 64;
/// `sun_path` is 108 bytes on Linux, including the terminating NUL.
const MAX_UNIX_PATH: usize = 107;

/// A validated agent configuration.
#[derive(Debug)]
pub struct Config {
    /// This host's name; a DNS SAN of `tls.cert`.
    pub name: String,
    /// TCP (TLS) and UDP (QUIC) listening address: one port number for both.
    pub listen: SocketAddr,
    /// Local control API socket for the CLI.
    pub admin: Option<PathBuf>,
    /// Prometheus `/metrics` HTTP address.
    pub metrics: Option<SocketAddr>,
    /// How long open streams may continue after SIGTERM/SIGINT before they are closed.
    pub drain_timeout: Duration,
    pub tls: TlsConfig,
    pub peers: Vec<Peer>,
    pub forwards: Vec<Forward>,
    pub exposes: Vec<Expose>,
    pub qemu: Option<QemuConfig>,
    /// `[tunnels]`: routes opened on demand for tooling that drives QEMU itself.
    pub tunnels: Option<TunnelsConfig>,
}

/// `[tls]`: file paths and the material loaded from them.
#[derive(Debug)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub ca_path: PathBuf,
    /// Leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors for peers (both directions).
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// `tls.record_layer`: who protects records after the handshake.
    pub record_layer: RecordLayer,
    /// `tls.crl`: revoked peer certificates (both directions), when configured.
    pub crl_path: Option<PathBuf>,
    /// The CRLs of `tls.crl` (DER), each parsed and issued by a CA of `tls.ca`.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

/// `tls.record_layer`: whose TLS record layer carries data streams and control connections
/// after rustls' handshake, on both the server and the client side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecordLayer {
    /// migtun's own, in place ([`crate::tls::record`]): the default, and the faster.
    #[default]
    Own,
    /// tokio-rustls' (rustls' buffered connection): the fallback, if ours is ever in doubt.
    Rustls,
}

impl RecordLayer {
    pub fn name(self) -> &'static str {
        match self {
            RecordLayer::Own => "own",
            RecordLayer::Rustls => "rustls",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tls,
    Quic,
    Auto,
}

/// `[[peer]]`
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    /// `host:port` or `ip:port`; resolved when connecting.
    pub address: String,
    pub transport: Transport,
}

/// `[[forward]]`
#[derive(Clone, Debug)]
pub struct Forward {
    pub listen: Endpoint,
    pub peer: String,
    pub route: String,
    /// Permission bits of a UNIX listen socket (key `mode`, an octal string such as "0660").
    pub mode: u32,
    /// Owner and group of a UNIX listen socket (keys `owner`, `group`: names or numeric ids).
    pub owner: Ownership,
}

/// `[[expose]]`
#[derive(Clone, Debug)]
pub struct Expose {
    pub route: String,
    pub target: Endpoint,
    pub allow: Vec<String>,
}

/// Default for `qemu.state_dir`: persistent (FHS `/var/lib`), unlike `run_dir`, which may be on
/// a tmpfs. After a reboot the journal still tells whether a guest that was migrating ran here.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/migtun";

/// Default for `qemu.image_dir`: beside the journal on persistent storage (like libvirt's
/// `/var/lib/libvirt/images`), never the run dir, which the README puts on a tmpfs: a migrated
/// guest's disks live here for as long as the guest runs on this host.
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/migtun/images";

/// Default for `qemu.emulator`: Debian's (and most distributions') system emulator.
pub const DEFAULT_EMULATOR: &str = "/usr/bin/qemu-system-x86_64";

/// Default for `qemu.max_disk_bytes` (4 TiB): larger than the disks one migrates by copying
/// (4 TiB at 10 Gbit/s is about an hour of mirroring), small enough that a mistaken or hostile
/// size (1 EiB) is refused before an image is created. Free space is checked on top of it.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 4 << 40;

/// Longest `qemu.run_as` user name (useradd's limit).
const MAX_USER_NAME: usize = 32;

/// `[tunnels]`: per-migration routes that tooling which drives QEMU itself (libvirt) asks the
/// agent for (`migtun tunnel open`): a forward here and an expose on the peer, under `dir`.
#[derive(Clone, Debug)]
pub struct TunnelsConfig {
    /// Tunnel `<name>`'s sockets are `dir/<name>/<socket>.sock` on both hosts: libvirt gives
    /// the source and the destination QEMU the same path, so both hosts configure the same `dir`.
    pub dir: PathBuf,
    /// Configured peers that may open tunnels to this host. Empty: none may.
    pub allow: Vec<String>,
    /// Tunnels open at once on this host, in both directions.
    pub max_open: usize,
    /// Longest lifetime a tunnel may ask for; it closes then even if nobody closes it.
    pub max_ttl: Duration,
    /// `owner`: the user (not root) that gets tunnel directories and this host's tunnel sockets:
    /// the QEMU that listens or connects there (`libvirt-qemu` under Debian's libvirt).
    pub owner: Option<String>,
    /// What `dir/<name>` and this host's sockets in it are chowned to, resolved when validated:
    /// `owner`'s uid, and `group`'s gid (a name or numeric id) or else `owner`'s primary group.
    /// Unset ids stay the agent's.
    pub ownership: Ownership,
    /// `mode`: permission bits of each `dir/<name>` (an octal string; the owner keeps rwx).
    pub mode: u32,
}

/// Mode of the sockets the agent listens on in a tunnel's directory (the source side): owner
/// and group (the QEMU user and its group) may connect; the directory's mode decides who reaches them.
pub const TUNNEL_SOCKET_MODE: u32 = 0o660;

/// Default for `tunnels.mode`: the owner (QEMU) binds its sockets in the directory, its group
/// may enter and connect, others may not even list it.
pub const DEFAULT_TUNNEL_DIR_MODE: u32 = 0o750;

/// Default for `tunnels.max_open`: a handful of concurrent migrations per host, with room.
pub const DEFAULT_TUNNELS_MAX_OPEN: usize = 16;
/// Largest `tunnels.max_open`: each tunnel is a few listeners and routes.
const MAX_TUNNELS_LIMIT: usize = 1024;
/// Default for `tunnels.max_ttl_secs` (1 hour): longer than a large storage migration takes
/// to set up and run at 10 Gbit/s, short enough that a tunnel nobody closed does not linger.
pub const DEFAULT_TUNNELS_MAX_TTL_SECS: u64 = 3600;
/// Largest `tunnels.max_ttl_secs` (1 day).
const MAX_TUNNEL_TTL_SECS: u64 = 86_400;

/// `[qemu]`
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub run_dir: PathBuf,
    /// The migration journal (`state_dir/migrations/<id>.json`), durable across agent restarts
    /// and reboots: what each unfinished migration created and decided (`state_dir`).
    pub state_dir: PathBuf,
    /// Where an incoming migration's copied disks (and side-channel files) go:
    /// `image_dir/<id>/`. They stay there while the migrated guest runs; a failed migration's go.
    pub image_dir: PathBuf,
    pub prepare_hook: Option<PathBuf>,
    /// The only binary a destination QEMU is started from (never the source's).
    pub emulator: PathBuf,
    /// Absolute prefixes where disks that are not copied (and other guest files) may live.
    pub shared_storage: Vec<PathBuf>,
    /// Largest copied disk, in bytes.
    pub max_disk_bytes: u64,
    /// Unprivileged user the destination QEMU runs as (`-runas`).
    pub run_as: Option<String>,
    /// Start the destination QEMU with `-sandbox on` (seccomp).
    pub sandbox: bool,
    /// Configured peers that may migrate guests to this host (`allow_sources`). Empty: this
    /// host accepts no incoming migration.
    pub allow_sources: Vec<String>,
    /// Incoming migrations (prepared or preparing) at once, from all peers (`max_incoming`).
    pub max_incoming: usize,
    /// Incoming migrations at once from one peer (`max_incoming_per_peer`).
    pub max_incoming_per_peer: usize,
    /// Largest side-channel file a peer may upload (`max_upload_bytes`).
    pub max_upload_bytes: u64,
}

/// Default for `[qemu] max_incoming`. Each incoming migration starts a QEMU holding the guest's
/// RAM and writes its disks here; a host being filled by an evacuation takes a few at a time
/// (libvirt-based stacks default to one or two per host), so 8 leaves room without letting a
/// peer start QEMUs without bound.
pub const DEFAULT_MAX_INCOMING: usize = 8;
/// Default for `[qemu] max_incoming_per_peer`: half of [`DEFAULT_MAX_INCOMING`], so that one
/// source (or one compromised peer) cannot take every slot.
pub const DEFAULT_MAX_INCOMING_PER_PEER: usize = 4;
/// Default for `[qemu] max_upload_bytes`: 1 GiB. Side-channel files are NVRAM, TPM state and
/// the like (KiB to a few MiB); 1 GiB is far above those and still bounded on a small disk.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 1 << 30;
/// Largest accepted `max_incoming` / `max_incoming_per_peer`: beyond this the limit means
/// nothing (each migration is a QEMU process with its sockets and files).
const MAX_INCOMING_LIMIT: i64 = 1024;

/// A config problem, naming the key it is about (none for the file as a whole).
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.problem)
        } else {
            write!(f, "{}: `{}`: {}", self.file, self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates the config file at `path`; relative paths inside it are resolved
    /// against its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: origin.clone(),
            key: String::new(),
            problem: one_line(&format!("cannot read the config file: {e}")),
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Config::from_toml(&text, &origin, &base)
    }

    /// Parses and validates config text. `origin` names the file in errors; relative paths are
    /// resolved against `base`.
    pub fn from_toml(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw = parse(text).map_err(|(key, problem)| ConfigError {
            file: origin.to_string(),
            key,
            problem: one_line(&problem),
        })?;
        Validator { base }
            .validate(raw)
            .map_err(|(key, problem)| ConfigError {
                file: origin.to_string(),
                key,
                problem: one_line(&problem),
            })
    }

    /// What this config means, in words: printed by `migtun check`.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let leaf = self.tls.cert_chain.first();
        let sans = leaf.map(dns_sans).unwrap_or_default();
        let _ = writeln!(out, "identity: {}", self.name);
        let _ = writeln!(
            out,
            "  certificate {} (DNS SANs: {}; {})",
            self.tls.cert_path.display(),
            if sans.is_empty() {
                "none".to_string()
            } else {
                sans.join(", ")
            },
            leaf.map(|c| validity_summary(c.as_ref()))
                .unwrap_or_default()
        );
        if self.tls.cert_chain.len() > 1 {
            let _ = writeln!(
                out,
                "  chain       {} intermediate certificate(s)",
                self.tls.cert_chain.len() - 1
            );
        }
        let _ = writeln!(out, "  key         {}", self.tls.key_path.display());
        let subjects: Vec<String> = self
            .tls
            .ca_certs
            .iter()
            .map(|c| subject(c.as_ref()))
            .collect();
        let _ = writeln!(
            out,
            "  trusts      {} ({} CA certificate(s): {})",
            self.tls.ca_path.display(),
            self.tls.ca_certs.len(),
            subjects.join("; ")
        );
        let _ = writeln!(
            out,
            "  records     {} ({})",
            self.tls.record_layer.name(),
            match self.tls.record_layer {
                RecordLayer::Own => "tls.record_layer: migtun's own TLS record layer after rustls' handshake",
                RecordLayer::Rustls => "tls.record_layer: rustls' record layer (tokio-rustls), the fallback",
            }
        );
        if let Some(crl) = &self.tls.crl_path {
            let _ = writeln!(
                out,
                "  revokes     {} ({} CRL(s); checked on every handshake, resumed ones too)",
                crl.display(),
                self.tls.crls.len()
            );
        }
        let _ = writeln!(out, "listen: TCP {} (TLS 1.3, mutual TLS; peers must present a certificate from the CA above)", self.listen);
        let _ = writeln!(
            out,
            "        UDP {} (QUIC, same TLS 1.3 identity and checks)",
            self.listen
        );

        if self.peers.is_empty() {
            let _ = writeln!(out, "peers: none");
        } else {
            let _ = writeln!(out, "peers:");
            for p in &self.peers {
                let _ = writeln!(
                    out,
                    "  {} at {} over {}",
                    p.name,
                    p.address,
                    transport_name(p.transport)
                );
            }
        }
        if self.forwards.is_empty() {
            let _ = writeln!(out, "forwards: none");
        } else {
            let _ = writeln!(out, "forwards (local listener → peer route):");
            for f in &self.forwards {
                let mode = match f.listen {
                    Endpoint::Unix(_) => {
                        let id = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "the agent's".into());
                        if f.owner == Ownership::default() {
                            format!(" (mode {:04o})", f.mode)
                        } else {
                            format!(" (mode {:04o}, uid {}, gid {})", f.mode, id(f.owner.uid), id(f.owner.gid))
                        }
                    }
                    Endpoint::Tcp(_) => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {}{} → peer {}, route {}",
                    f.listen, mode, f.peer, f.route
                );
            }
        }
        if self.exposes.is_empty() {
            let _ = writeln!(out, "exposes: none (peers can open no static route here)");
        } else {
            let _ = writeln!(out, "exposes (route → local target):");
            for e in &self.exposes {
                let _ = writeln!(
                    out,
                    "  route {} → {} allowed for {}",
                    e.route,
                    e.target,
                    e.allow.join(", ")
                );
            }
        }
        match &self.admin {
            Some(a) => {
                let _ = writeln!(out, "admin: {} (mode 0600)", a.display());
            }
            None => {
                let _ = writeln!(
                    out,
                    "admin: none (migtun migrate/status cannot reach this agent)"
                );
            }
        }
        match &self.metrics {
            Some(m) => {
                let _ = writeln!(out, "metrics: http://{m}/metrics (Prometheus text format)");
            }
            None => {
                let _ = writeln!(out, "metrics: off");
            }
        }
        let _ = writeln!(
            out,
            "drain: open streams may run {} s after SIGTERM/SIGINT before they are closed",
            self.drain_timeout.as_secs()
        );
        match &self.qemu {
            Some(q) => {
                let hook = match &q.prepare_hook {
                    Some(h) => format!("prepare hook {}", h.display()),
                    None => {
                        "no prepare hook (this host cannot be a migration destination)".to_string()
                    }
                };
                let _ = writeln!(out, "qemu: run_dir {}, {}", q.run_dir.display(), hook);
                let shared = if q.shared_storage.is_empty() {
                    "none (migrations with disks that are not copied are refused)".to_string()
                } else {
                    q.shared_storage.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                };
                let _ = writeln!(
                    out,
                    "qemu: destination QEMU is {}, sandbox {}, runs as {}; copied disks up to {} bytes each; shared storage: {shared}",
                    q.emulator.display(),
                    if q.sandbox { "on" } else { "off" },
                    q.run_as.as_deref().unwrap_or("the agent's user"),
                    q.max_disk_bytes,
                );
                if q.allow_sources.is_empty() {
                    let _ = writeln!(
                        out,
                        "  incoming migrations: none accepted (qemu.allow_sources is empty)"
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "  incoming migrations from: {} (at most {} at once, {} per peer; side-channel files up to {} bytes)",
                        q.allow_sources.join(", "),
                        q.max_incoming,
                        q.max_incoming_per_peer,
                        q.max_upload_bytes
                    );
                }
            }
            None => {
                let _ = writeln!(out, "qemu: not configured (no orchestrated migrations)");
            }
        }
        match &self.tunnels {
            Some(t) => {
                let from = if t.allow.is_empty() { "accepted from no peer (tunnels.allow is empty)".to_string() } else { format!("accepted from {}", t.allow.join(", ")) };
                let _ = writeln!(out, "tunnels: dir {}, {from}; at most {} open at once, TTL up to {} s", t.dir.display(), t.max_open, t.max_ttl.as_secs());
                let uid = match (&t.owner, t.ownership.uid) {
                    (Some(user), Some(uid)) => format!("owner {user} (uid {uid})"),
                    _ => "the agent's user".to_string(),
                };
                let gid = t.ownership.gid.map(|g| format!("gid {g}")).unwrap_or_else(|| "the agent's group".into());
                let _ = writeln!(out, "  each tunnel's directory: mode {:04o}, {uid}, {gid}; its sockets on the listening side: mode {TUNNEL_SOCKET_MODE:04o}, the same owner and group", t.mode);
            }
            None => {
                let _ = writeln!(out, "tunnels: not configured (migtun tunnel open is refused)");
            }
        }
        out
    }

    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The keys whose value in `new` differs from this (running) config and that a running
    /// agent cannot take without a restart, each as a line naming the key. Everything else
    /// (`[tls]` files, `[[peer]]`, `[[forward]]`, `[[expose]]`, `drain_timeout_secs`) a reload
    /// applies.
    pub fn restart_needed(&self, new: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |key: &str, old: String, new: String| {
            if old != new {
                out.push(format!("`{key}`: changed from {old} to {new}; needs a restart"));
            }
        };
        let opt = |v: Option<String>| v.unwrap_or_else(|| "(none)".into());
        differ("name", format!("{:?}", self.name), format!("{:?}", new.name));
        differ("listen", self.listen.to_string(), new.listen.to_string());
        differ("admin", opt(self.admin.as_ref().map(|p| p.display().to_string())), opt(new.admin.as_ref().map(|p| p.display().to_string())));
        differ("metrics", opt(self.metrics.map(|m| m.to_string())), opt(new.metrics.map(|m| m.to_string())));
        differ("tls.record_layer", self.tls.record_layer.name().into(), new.tls.record_layer.name().into());
        match (&self.qemu, &new.qemu) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                let has = |q: &Option<QemuConfig>| if q.is_some() { "a [qemu] section" } else { "no [qemu] section" }.to_string();
                differ("qemu", has(&self.qemu), has(&new.qemu));
            }
            (Some(a), Some(b)) => {
                let path = |p: &Path| p.display().to_string();
                let paths = |v: &[PathBuf]| format!("[{}]", v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
                differ("qemu.run_dir", path(&a.run_dir), path(&b.run_dir));
                differ("qemu.state_dir", path(&a.state_dir), path(&b.state_dir));
                differ("qemu.image_dir", path(&a.image_dir), path(&b.image_dir));
                differ("qemu.prepare_hook", opt(a.prepare_hook.as_deref().map(path)), opt(b.prepare_hook.as_deref().map(path)));
                differ("qemu.emulator", path(&a.emulator), path(&b.emulator));
                differ("qemu.shared_storage", paths(&a.shared_storage), paths(&b.shared_storage));
                differ("qemu.max_disk_bytes", a.max_disk_bytes.to_string(), b.max_disk_bytes.to_string());
                differ("qemu.run_as", opt(a.run_as.clone()), opt(b.run_as.clone()));
                differ("qemu.sandbox", a.sandbox.to_string(), b.sandbox.to_string());
                differ("qemu.allow_sources", format!("{:?}", a.allow_sources), format!("{:?}", b.allow_sources));
                differ("qemu.max_incoming", a.max_incoming.to_string(), b.max_incoming.to_string());
                differ("qemu.max_incoming_per_peer", a.max_incoming_per_peer.to_string(), b.max_incoming_per_peer.to_string());
                differ("qemu.max_upload_bytes", a.max_upload_bytes.to_string(), b.max_upload_bytes.to_string());
            }
        }
        // The tunnels' limits and directory are read once, when the control plane is built.
        let tunnels = |t: &Option<TunnelsConfig>| match t {
            None => "no [tunnels] section".to_string(),
            Some(t) => format!("dir {}, allow {:?}, max_open {}, max_ttl_secs {}, owner {:?}, ids {:?}, mode {:04o}", t.dir.display(), t.allow, t.max_open, t.max_ttl.as_secs(), t.owner, t.ownership, t.mode),
        };
        differ("tunnels", tunnels(&self.tunnels), tunnels(&new.tunnels));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The TOML shape.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    listen: String,
    admin: Option<String>,
    metrics: Option<String>,
    drain_timeout_secs: Option<i64>,
    tls: RawTls,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    forward: Vec<RawForward>,
    #[serde(default)]
    expose: Vec<RawExpose>,
    qemu: Option<RawQemu>,
    tunnels: Option<RawTunnels>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    ca: String,
    record_layer: Option<String>,
    crl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    address: String,
    transport: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: String,
    peer: String,
    route: String,
    /// A string ("0660"); an integer is caught to explain how to write it.
    mode: Option<toml::Value>,
    /// A user name or a numeric uid.
    owner: Option<toml::Value>,
    /// A group name or a numeric gid.
    group: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpose {
    route: String,
    target: String,
    allow: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnels {
    dir: String,
    allow: Option<Vec<String>>,
    max_open: Option<i64>,
    max_ttl_secs: Option<i64>,
    owner: Option<String>,
    /// A group name or a numeric gid.
    group: Option<toml::Value>,
    /// A string ("0750"), as a forward's `mode`.
    mode: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQemu {
    run_dir: String,
    state_dir: Option<String>,
    image_dir: Option<String>,
    prepare_hook: Option<String>,
    emulator: Option<String>,
    shared_storage: Option<Vec<String>>,
    max_disk_bytes: Option<i64>,
    run_as: Option<String>,
    sandbox: Option<bool>,
    allow_sources: Option<Vec<String>>,
    max_incoming: Option<i64>,
    max_incoming_per_peer: Option<i64>,
    max_upload_bytes: Option<i64>,
}

type Problem = (String, String);

/// A regular file with an execute bit.
fn check_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| one_line(&e.to_string()))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    Ok(())
}

/// A user name that exists on this host and is not root.
fn check_user(user: &str) -> Result<(), String> {
    user_ids(user).map(|_| ())
}

/// The uid and gid of `user`, an unprivileged user of this host (`qemu.run_as`).
pub fn user_ids(user: &str) -> Result<(u32, u32), String> {
    let ok = user.len() <= MAX_USER_NAME
        && user.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && user.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if !ok {
        return Err(format!("not a user name (lower-case letters, digits, '_', '-'; at most {MAX_USER_NAME})"));
    }
    let name = std::ffi::CString::new(user).map_err(|_| "contains NUL".to_string())?;
    let mut pwd = std::mem::MaybeUninit::<libc::passwd>::zeroed();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `name` is NUL-terminated, `pwd` and `buf`
    // (with its true length) are writable and outlive it, `result` is a local out-pointer.
    // Only `pw_uid` and `pw_gid` are read afterwards, and only when getpwnam_r reported a match.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), pwd.as_mut_ptr(), buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err("no such user on this host".into());
    }
    // SAFETY: getpwnam_r succeeded and `result` points to `pwd`, which it filled in.
    let (uid, gid) = unsafe { ((*result).pw_uid, (*result).pw_gid) };
    if uid == 0 {
        return Err("is root; name an unprivileged user".into());
    }
    Ok((uid, gid))
}

fn one_line(s: &str) -> String {
    let s = s.trim();
    if !s.contains(['\n', '\r']) {
        return s.to_string();
    }
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn with_line(problem: String, text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => format!("{problem} (line {})", line_of(text, s.start)),
        None => problem,
    }
}

/// The keys of the top level, before any `[table]`.
const TOP_LEVEL_KEYS: &[&str] = &["name", "listen", "admin", "metrics", "drain_timeout_secs"];

fn parse(text: &str) -> Result<RawConfig, Problem> {
    // Syntax first, so that a syntax error is not mistaken for a problem with some key.
    if let Err(e) = text.parse::<toml::Table>() {
        let first = e
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_string();
        let key = e
            .span()
            .map(|s| key_at_line(text, line_of(text, s.start)))
            .unwrap_or_default();
        return Err((
            key,
            with_line(format!("TOML syntax error: {first}"), text, e.span()),
        ));
    }
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let mut key = render_path(e.path());
        let inner = e.inner();
        let full = inner.message();
        let msg = full.lines().next().unwrap_or("invalid value").to_string();
        // A quoted TOML key may hold a newline: the field's name is taken from the whole
        // message, not its first line.
        let problem = if let Some(rest) = full.strip_prefix("unknown field `") {
            // "unknown field `adress`, expected one of `name`, `address`, `transport`"
            let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
            if !key.ends_with(field) {
                key = join_key(&key, field);
            }
            let expected = expected.trim_start_matches(',').trim().replace('`', "");
            if key.contains('.') && TOP_LEVEL_KEYS.contains(&field) {
                // `admin = ...` appended at the end of the file lands in the last table.
                format!(
                    "unknown key: `{field}` is a top-level key, but in TOML every key after a [table] header belongs to that table; move it above the first [table]"
                )
            } else if expected.is_empty() {
                "unknown key".to_string()
            } else {
                format!("unknown key ({expected})")
            }
        } else if let Some(rest) = full.strip_prefix("missing field `") {
            let field = rest.split('`').next().unwrap_or(rest);
            key = join_key(&key, field);
            "missing key".to_string()
        } else if key.ends_with("mode") && msg.starts_with("invalid type") {
            format!("{msg}; write the mode as an octal string, e.g. mode = \"0660\"")
        } else {
            msg
        };
        (printable_key(&key), with_line(problem, text, inner.span()))
    })
}

/// A key as shown in an error: control characters (possible in quoted TOML keys) escaped, so
/// that the error stays one line.
fn printable_key(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

fn join_key(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// Best-effort key for a syntax error on `line` (1-based): the enclosing table header plus the
/// key written at the start of that line, e.g. `peer[1].address`.
fn key_at_line(text: &str, line: usize) -> String {
    let mut table = String::new();
    let mut last_key: Option<String> = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        let is_error_line = i + 1 == line;
        if let Some(h) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let h = h.trim().to_string();
            let n = counts.entry(h.clone()).or_insert(0);
            table = format!("{h}[{n}]");
            *n += 1;
            if is_error_line {
                return table;
            }
        } else if let Some(h) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = h.trim().to_string();
            if is_error_line {
                return table;
            }
        } else {
            let k: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            let assigns = !k.is_empty() && l[k.len()..].trim_start().starts_with('=');
            if assigns {
                last_key = Some(join_key(&table, &k));
            }
            if is_error_line {
                // A line that assigns nothing continues the value of the last key (a
                // multi-line array or string); before any key it is the table's.
                return if assigns { join_key(&table, &k) } else { last_key.unwrap_or(table) };
            }
            continue;
        }
        last_key = None;
    }
    table
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct Validator<'a> {
    base: &'a Path,
}

fn err<T>(key: impl Into<String>, problem: impl Into<String>) -> Result<T, Problem> {
    Err((key.into(), problem.into()))
}

impl Validator<'_> {
    fn path(&self, key: &str, value: &str) -> Result<PathBuf, Problem> {
        if value.is_empty() {
            return err(key, "empty path");
        }
        let p = Path::new(value);
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        })
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, Problem> {
        check_dns_name(&raw.name).or_else(|p| err("name", p))?;
        let listen: SocketAddr = raw.listen.parse().or_else(|_| {
            err(
                "listen",
                format!(
                    "not an IP:PORT address: {:?} (e.g. \"0.0.0.0:7443\")",
                    raw.listen
                ),
            )
        })?;
        let admin = match &raw.admin {
            None => None,
            Some(a) => {
                if !a.starts_with('/') {
                    return err("admin", format!("must be an absolute path, got {a:?}"));
                }
                if a.len() > MAX_UNIX_PATH {
                    return err(
                        "admin",
                        format!(
                            "a UNIX socket path must be shorter than 108 bytes, got {} bytes",
                            a.len()
                        ),
                    );
                }
                Some(PathBuf::from(a))
            }
        };
        let metrics = match &raw.metrics {
            None => None,
            Some(m) => Some(m.parse::<SocketAddr>().or_else(|_| {
                err(
                    "metrics",
                    format!("not an IP:PORT address: {m:?} (e.g. \"127.0.0.1:9477\")"),
                )
            })?),
        };
        let drain_timeout = match raw.drain_timeout_secs {
            None => DEFAULT_DRAIN_TIMEOUT,
            Some(s) if (0..=MAX_DRAIN_TIMEOUT_SECS).contains(&s) => Duration::from_secs(s as u64),
            Some(s) => {
                return err(
                    "drain_timeout_secs",
                    format!("must be between 0 and {MAX_DRAIN_TIMEOUT_SECS} seconds, got {s}"),
                )
            }
        };

        let tls = self.tls(&raw.tls)?;
        let sans = dns_sans(&tls.cert_chain[0]);
        if !sans.iter().any(|s| s.eq_ignore_ascii_case(&raw.name)) {
            let has = if sans.is_empty() {
                "none".to_string()
            } else {
                sans.join(", ")
            };
            return err(
                "name",
                format!(
                    "{} is not a DNS SAN of {} (it has: {has})",
                    raw.name,
                    tls.cert_path.display()
                ),
            );
        }
        check_verifiable(&raw.name, &tls)?;

        let peers = self.peers(&raw.name, raw.peer)?;
        let forwards = self.forwards(raw.forward, &peers, admin.as_deref())?;
        let exposes = self.exposes(raw.expose, &peers)?;
        let qemu = match raw.qemu {
            None => None,
            Some(q) => Some(self.qemu(q, &peers)?),
        };
        let tunnels = match raw.tunnels {
            None => None,
            Some(t) => Some(self.tunnels(t, &peers)?),
        };

        Ok(Config {
            name: raw.name,
            listen,
            admin,
            metrics,
            drain_timeout,
            tls,
            peers,
            forwards,
            exposes,
            qemu,
            tunnels,
        })
    }

    fn tunnels(&self, t: RawTunnels, peers: &[Peer]) -> Result<TunnelsConfig, Problem> {
        let dir = self.path("tunnels.dir", &t.dir)?;
        if dir.parent().is_none() {
            return err("tunnels.dir", "must not be `/`: each tunnel gets a directory inside it");
        }
        let allow = t.allow.unwrap_or_default();
        for (i, name) in allow.iter().enumerate() {
            let key = format!("tunnels.allow[{i}]");
            if !peers.iter().any(|p| &p.name == name) {
                let known: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
                let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                return err(key, format!("unknown peer {name:?}: only a configured [[peer]] may open tunnels to this host (known peers: {known})"));
            }
            if allow[..i].contains(name) {
                return err(key, format!("{name:?} is listed twice"));
            }
        }
        let max_open = match t.max_open {
            None => DEFAULT_TUNNELS_MAX_OPEN,
            Some(n) if (1..=MAX_TUNNELS_LIMIT as i64).contains(&n) => n as usize,
            Some(n) => return err("tunnels.max_open", format!("must be between 1 and {MAX_TUNNELS_LIMIT}, got {n}")),
        };
        let max_ttl = match t.max_ttl_secs {
            None => Duration::from_secs(DEFAULT_TUNNELS_MAX_TTL_SECS),
            Some(n) if (1..=MAX_TUNNEL_TTL_SECS as i64).contains(&n) => Duration::from_secs(n as u64),
            Some(n) => return err("tunnels.max_ttl_secs", format!("must be between 1 and {MAX_TUNNEL_TTL_SECS} seconds, got {n}")),
        };
        let mut ownership = Ownership::default();
        if let Some(user) = &t.owner {
            let (uid, gid) = user_ids(user).or_else(|why| err("tunnels.owner", format!("{user:?}: {why}")))?;
            ownership = Ownership { uid: Some(uid), gid: Some(gid) };
        }
        if let Some(v) = &t.group {
            ownership.gid = Some(resolve_id(v, false).or_else(|e| err("tunnels.group", e))?);
        }
        let mode = match &t.mode {
            None => DEFAULT_TUNNEL_DIR_MODE,
            Some(v) => tunnel_dir_mode(v).or_else(|e| err("tunnels.mode", e))?,
        };
        Ok(TunnelsConfig { dir, allow, max_open, max_ttl, owner: t.owner, ownership, mode })
    }

    fn qemu(&self, q: RawQemu, peers: &[Peer]) -> Result<QemuConfig, Problem> {
        let run_dir = self.path("qemu.run_dir", &q.run_dir)?;
        let state_dir = match &q.state_dir {
            None => PathBuf::from(DEFAULT_STATE_DIR),
            Some(s) => self.path("qemu.state_dir", s)?,
        };
        if state_dir == run_dir {
            return err("qemu.state_dir", "must differ from qemu.run_dir: run_dir holds each migration's sockets, state_dir the journal that outlives them");
        }
        let image_dir = match &q.image_dir {
            None => PathBuf::from(DEFAULT_IMAGE_DIR),
            Some(s) => self.path("qemu.image_dir", s)?,
        };
        if image_dir == run_dir || image_dir == state_dir {
            return err(
                "qemu.image_dir",
                "must differ from qemu.run_dir and qemu.state_dir: it holds migrated guests' disks, which outlive the migration's sockets and are not journal records",
            );
        }
        let prepare_hook = match q.prepare_hook {
            None => None,
            Some(h) => Some(self.path("qemu.prepare_hook", &h)?),
        };
        // The emulator is checked when this host can be a destination (a hook) or it is named;
        // a source-only host need not have QEMU where the default says.
        let emulator = match &q.emulator {
            None => PathBuf::from(DEFAULT_EMULATOR),
            Some(e) if !e.starts_with('/') => {
                return err("qemu.emulator", format!("must be an absolute path, got {e:?}"))
            }
            Some(e) => PathBuf::from(e),
        };
        if q.emulator.is_some() || prepare_hook.is_some() {
            check_executable(&emulator).or_else(|why| {
                let default = if q.emulator.is_none() { " (the default; set qemu.emulator to your QEMU)" } else { "" };
                err("qemu.emulator", format!("{}{default}: {why}", emulator.display()))
            })?;
        }
        let mut shared_storage = Vec::new();
        for (i, p) in q.shared_storage.unwrap_or_default().iter().enumerate() {
            let key = format!("qemu.shared_storage[{i}]");
            let path = Path::new(p);
            if !path.is_absolute() {
                return err(&key, format!("must be an absolute path, got {p:?}"));
            }
            if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return err(&key, format!("{p:?} contains `..`"));
            }
            if path.parent().is_none() {
                return err(&key, "`/` would let a peer open any file of this host; name the directories of shared images");
            }
            shared_storage.push(path.to_path_buf());
        }
        let max_disk_bytes = match q.max_disk_bytes {
            None => DEFAULT_MAX_DISK_BYTES,
            Some(n) if n > 0 => n as u64,
            Some(n) => return err("qemu.max_disk_bytes", format!("must be a positive number of bytes, got {n}")),
        };
        if let Some(user) = &q.run_as {
            check_user(user).or_else(|why| err("qemu.run_as", format!("{user:?}: {why}")))?;
        }
        let allow_sources = q.allow_sources.unwrap_or_default();
        for (i, name) in allow_sources.iter().enumerate() {
            let key = format!("qemu.allow_sources[{i}]");
            if !peers.iter().any(|p| &p.name == name) {
                let known: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
                let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                return err(key, format!("unknown peer {name:?}: only a configured [[peer]] may migrate guests here (known peers: {known})"));
            }
            if allow_sources[..i].contains(name) {
                return err(key, format!("{name:?} is listed twice"));
            }
        }
        let limit = |key: &str, v: Option<i64>, default: usize| match v {
            None => Ok(default),
            Some(n) if (1..=MAX_INCOMING_LIMIT).contains(&n) => Ok(n as usize),
            Some(n) => err(key, format!("must be between 1 and {MAX_INCOMING_LIMIT}, got {n}")),
        };
        let max_incoming = limit("qemu.max_incoming", q.max_incoming, DEFAULT_MAX_INCOMING)?;
        let max_incoming_per_peer = limit(
            "qemu.max_incoming_per_peer",
            q.max_incoming_per_peer,
            DEFAULT_MAX_INCOMING_PER_PEER.min(max_incoming),
        )?;
        if max_incoming_per_peer > max_incoming {
            return err(
                "qemu.max_incoming_per_peer",
                format!("{max_incoming_per_peer} is more than qemu.max_incoming ({max_incoming})"),
            );
        }
        let max_upload_bytes = match q.max_upload_bytes {
            None => DEFAULT_MAX_UPLOAD_BYTES,
            Some(n) if n >= 0 => n as u64,
            Some(n) => return err("qemu.max_upload_bytes", format!("must not be negative, got {n}")),
        };
        Ok(QemuConfig {
            run_dir,
            state_dir,
            image_dir,
            prepare_hook,
            emulator,
            shared_storage,
            max_disk_bytes,
            run_as: q.run_as,
            allow_sources,
            max_incoming,
            max_incoming_per_peer,
            max_upload_bytes,
            sandbox: q.sandbox.unwrap_or(true),
        })
    }

    fn tls(&self, raw: &RawTls) -> Result<TlsConfig, Problem> {
        let cert_path = self.path("tls.cert", &raw.cert)?;
        let key_path = self.path("tls.key", &raw.key)?;
        let ca_path = self.path("tls.ca", &raw.ca)?;
        let cert_chain = load_certs(&cert_path).or_else(|e| err("tls.cert", e.to_string()))?;
        let key = load_key(&key_path).or_else(|e| err("tls.key", e.to_string()))?;
        let ca_certs = load_certs(&ca_path).or_else(|e| err("tls.ca", e.to_string()))?;
        let record_layer = match raw.record_layer.as_deref() {
            None | Some("own") => RecordLayer::Own,
            Some("rustls") => RecordLayer::Rustls,
            Some(other) => {
                return err("tls.record_layer", format!("unknown record layer {other:?} (expected \"own\" or \"rustls\")"))
            }
        };

        // The leaf: parseable, within its validity period.
        let (_, leaf) =
            x509_parser::parse_x509_certificate(cert_chain[0].as_ref()).or_else(|e| {
                err(
                    "tls.cert",
                    format!(
                        "{}: cannot parse the first certificate: {e}",
                        cert_path.display()
                    ),
                )
            })?;
        let validity = leaf.validity();
        let now = UnixTime::now().as_secs() as i64;
        let (from, until) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        if now < from {
            return err(
                "tls.cert",
                format!(
                    "{} is not valid yet: valid from {} to {}",
                    cert_path.display(),
                    fmt_time(from),
                    fmt_time(until)
                ),
            );
        }
        if now > until {
            return err(
                "tls.cert",
                format!(
                    "{} has expired: valid from {} to {}",
                    cert_path.display(),
                    fmt_time(from),
                    fmt_time(until)
                ),
            );
        }

        // The key: usable by rustls and the one of the certificate.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .or_else(|e| err("tls", format!("TLS 1.3 is not available: {e}")))?
            .with_no_client_auth();
        if let Err(e) = builder.with_single_cert(cert_chain.clone(), key.clone_key()) {
            let problem = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "{} does not match tls.cert {} ({e})",
                    key_path.display(),
                    cert_path.display()
                ),
                e => format!(
                    "{} is unusable with tls.cert {} ({e})",
                    key_path.display(),
                    cert_path.display()
                ),
            };
            return err("tls.key", problem);
        }

        // The CA bundle: every certificate a usable trust anchor.
        let mut roots = rustls::RootCertStore::empty();
        for (i, ca) in ca_certs.iter().enumerate() {
            if let Err(e) = roots.add(ca.clone()) {
                return err(
                    "tls.ca",
                    format!(
                        "{}: certificate #{} is not a usable trust anchor ({e})",
                        ca_path.display(),
                        i + 1
                    ),
                );
            }
        }

        let (crl_path, crls) = match &raw.crl {
            None => (None, Vec::new()),
            Some(c) => {
                let path = self.path("tls.crl", c)?;
                let crls = check_crls(&path, &ca_certs, &ca_path)?;
                (Some(path), crls)
            }
        };

        Ok(TlsConfig {
            cert_path,
            key_path,
            ca_path,
            cert_chain,
            key,
            ca_certs,
            record_layer,
            crl_path,
            crls,
        })
    }

    fn peers(&self, own_name: &str, raw: Vec<RawPeer>) -> Result<Vec<Peer>, Problem> {
        let mut peers: Vec<Peer> = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            let k = |f: &str| format!("peer[{i}].{f}");
            check_dns_name(&p.name).or_else(|e| err(k("name"), e))?;
            if p.name.eq_ignore_ascii_case(own_name) {
                return err(k("name"), format!("{:?} is this host's own name", p.name));
            }
            if let Some(j) = peers
                .iter()
                .position(|q| q.name.eq_ignore_ascii_case(&p.name))
            {
                return err(
                    k("name"),
                    format!("duplicate peer {:?} (also peer[{j}])", p.name),
                );
            }
            check_address(&p.address).or_else(|e| err(k("address"), e))?;
            let transport = match p.transport.as_deref() {
                None | Some("tls") => Transport::Tls,
                Some("quic") => Transport::Quic,
                Some("auto") => Transport::Auto,
                Some(t) => {
                    return err(
                        k("transport"),
                        format!("unknown transport {t:?} (expected \"tls\", \"quic\" or \"auto\")"),
                    )
                }
            };
            peers.push(Peer {
                name: p.name,
                address: p.address,
                transport,
            });
        }
        Ok(peers)
    }

    fn forwards(
        &self,
        raw: Vec<RawForward>,
        peers: &[Peer],
        admin: Option<&Path>,
    ) -> Result<Vec<Forward>, Problem> {
        let mut forwards: Vec<Forward> = Vec::with_capacity(raw.len());
        for (i, f) in raw.into_iter().enumerate() {
            let k = |f: &str| format!("forward[{i}].{f}");
            let listen: Endpoint =
                f.listen
                    .parse()
                    .or_else(|e: crate::endpoint::EndpointParseError| {
                        err(k("listen"), e.to_string())
                    })?;
            match &listen {
                Endpoint::Tcp(a) if !a.ip().is_loopback() => {
                    return err(
                        k("listen"),
                        format!(
                            "a tcp listen must be on a loopback address (127.0.0.1 or [::1]), got {a}: \
                             forward listeners are unauthenticated entry points into the tunnel"
                        ),
                    )
                }
                Endpoint::Unix(p) if Some(p.as_path()) == admin => {
                    return err(k("listen"), format!("{} is also the admin socket", p.display()))
                }
                _ => {}
            }
            let ephemeral = matches!(listen, Endpoint::Tcp(a) if a.port() == 0);
            if !ephemeral {
                if let Some(j) = forwards.iter().position(|o| o.listen == listen) {
                    return err(
                        k("listen"),
                        format!("duplicate listen endpoint {listen} (also forward[{j}])"),
                    );
                }
            }
            if !peers.iter().any(|p| p.name == f.peer) {
                let known: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
                let known = if known.is_empty() {
                    "no [[peer]] is configured".to_string()
                } else {
                    format!("known peers: {}", known.join(", "))
                };
                return err(k("peer"), format!("unknown peer {:?} ({known})", f.peer));
            }
            check_route(&f.route).or_else(|e| err(k("route"), e))?;
            let mode = match f.mode {
                None => DEFAULT_SOCKET_MODE,
                Some(v) => {
                    if !matches!(listen, Endpoint::Unix(_)) {
                        return err(k("mode"), "mode only applies to a unix: listen endpoint");
                    }
                    parse_mode(&v).or_else(|e| err(k("mode"), e))?
                }
            };
            let mut owner = Ownership::default();
            for (key, value, user) in [("owner", &f.owner, true), ("group", &f.group, false)] {
                let Some(v) = value else { continue };
                if !matches!(listen, Endpoint::Unix(_)) {
                    return err(k(key), format!("{key} only applies to a unix: listen endpoint"));
                }
                let id = resolve_id(v, user).or_else(|e| err(k(key), e))?;
                if user {
                    owner.uid = Some(id);
                } else {
                    owner.gid = Some(id);
                }
            }
            forwards.push(Forward {
                listen,
                peer: f.peer,
                route: f.route,
                mode,
                owner,
            });
        }
        Ok(forwards)
    }

    fn exposes(&self, raw: Vec<RawExpose>, peers: &[Peer]) -> Result<Vec<Expose>, Problem> {
        let mut exposes: Vec<Expose> = Vec::with_capacity(raw.len());
        for (i, e) in raw.into_iter().enumerate() {
            let k = |f: &str| format!("expose[{i}].{f}");
            check_route(&e.route).or_else(|p| err(k("route"), p))?;
            if let Some(j) = exposes.iter().position(|o| o.route == e.route) {
                return err(
                    k("route"),
                    format!("duplicate route {:?} (also expose[{j}])", e.route),
                );
            }
            let target: Endpoint =
                e.target
                    .parse()
                    .or_else(|p: crate::endpoint::EndpointParseError| {
                        err(k("target"), p.to_string())
                    })?;
            if e.allow.is_empty() {
                return err(
                    k("allow"),
                    "empty: list the peer names that may open this route",
                );
            }
            for (j, a) in e.allow.iter().enumerate() {
                check_dns_name(a).or_else(|p| err(format!("expose[{i}].allow[{j}]"), p))?;
                // Only a configured peer gets past the handshake: any other name never matches.
                if !peers.iter().any(|p: &Peer| &p.name == a) {
                    let known: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
                    let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                    return err(
                        format!("expose[{i}].allow[{j}]"),
                        format!("unknown peer {a:?}: only a configured [[peer]] can connect (known peers: {known}); add a [[peer]] for it or remove it"),
                    );
                }
            }
            exposes.push(Expose {
                route: e.route,
                target,
                allow: e.allow,
            });
        }
        Ok(exposes)
    }
}

/// Peers verify our certificate against the same CA bundle, for both server and client use:
/// check now what they will check, so a wrong chain or EKU shows up in `migtun check`. The
/// verifiers are the agent's own ([`crate::tls::context::verifiers`]), with `tls.crl`: a revoked own
/// certificate, or a CRL of our issuer with a bad signature, is reported here too.
fn check_verifiable(name: &str, tls: &TlsConfig) -> Result<(), Problem> {
    use rustls::client::danger::ServerCertVerifier;

    let now = UnixTime::now();
    let (leaf, intermediates) = (&tls.cert_chain[0], &tls.cert_chain[1..]);
    let cert = tls.cert_path.display();
    let ca = tls.ca_path.display();
    let (client, server) = crate::tls::context::verifiers(tls, crate::tls::context::provider()).or_else(|e| match &tls.crl_path {
        Some(crl) => err("tls.crl", format!("{}: cannot build a certificate verifier with it ({e})", crl.display())),
        None => err("tls.ca", format!("{ca}: cannot build a certificate verifier ({e})")),
    })?;
    let server_name = ServerName::try_from(name.to_string()).or_else(|e| {
        err(
            "name",
            format!("{name:?} is not usable as a TLS server name ({e})"),
        )
    })?;
    let judged = |e: rustls::Error, what: &str| -> Result<(), Problem> {
        let crl = tls.crl_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        match crate::tls::failure::tls_failure_reason(&e) {
            "revoked" => err("tls.cert", format!("{cert} is revoked by tls.crl {crl}")),
            "bad-certificate" | "bad-crl" if !crl.is_empty() => err(
                "tls.crl",
                format!("{crl}: cannot check {cert} against it ({e}); is the CRL signed by the CA of tls.ca?"),
            ),
            _ => err("tls.cert", format!("{cert} does not verify as a TLS {what} under tls.ca {ca} ({e})")),
        }
    };
    if let Err(e) = server.verify_server_cert(leaf, intermediates, &server_name, &[], now) {
        return judged(e, &format!("server certificate for {name}"));
    }
    if let Err(e) = client.verify_client_cert(leaf, intermediates, now) {
        return judged(e, "client certificate; it needs EKU clientAuth");
    }
    Ok(())
}

/// `tls.crl`: every CRL in the PEM file parses, and is issued by a CA of `tls.ca` (a CRL of
/// another issuer would silently revoke nothing).
fn check_crls(
    path: &Path,
    ca_certs: &[CertificateDer<'static>],
    ca_path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, Problem> {
    let file = path.display();
    let crls = load_crls(path).or_else(|e| err("tls.crl", e.to_string()))?;
    let subjects: Vec<Vec<u8>> = ca_certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .map(|(_, c)| c.subject().as_raw().to_vec())
        .collect();
    for (i, crl) in crls.iter().enumerate() {
        let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
            .or_else(|e| err("tls.crl", format!("{file}: CRL #{} does not parse: {e}", i + 1)))?;
        if !subjects.iter().any(|s| s.as_slice() == parsed.issuer().as_raw()) {
            return err(
                "tls.crl",
                format!(
                    "{file}: CRL #{} is issued by {:?}, which is not a CA of tls.ca {}",
                    i + 1,
                    parsed.issuer().to_string(),
                    ca_path.display()
                ),
            );
        }
    }
    Ok(crls)
}

/// A DNS host name: labels of 1..=63 letters, digits and '-' (not at either end), '.'-separated,
/// at most 253 characters.
fn check_dns_name(name: &str) -> Result<(), String> {
    let bad = |reason: String| Err(format!("invalid name {name:?}: {reason}"));
    if name.is_empty() {
        return bad("empty".into());
    }
    if name.len() > 253 {
        return bad("longer than 253 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return bad(format!(
            "character {c:?} not allowed (letters, digits, '-' and '.' only)"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("empty label (leading, trailing or double '.')".into());
        }
        if label.len() > 63 {
            return bad(format!("label {label:?} is longer than 63 characters"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// `host:port`, `ip:port` or `[v6]:port`.
fn check_address(address: &str) -> Result<(), String> {
    if address.is_empty() {
        return Err("empty; expected host:port, e.g. \"192.0.2.2:7443\"".into());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "{address:?} has no port; expected host:port, e.g. \"192.0.2.2:7443\""
        ));
    };
    match port.parse::<u16>() {
        Ok(0) => return Err(format!("{address:?}: port 0 cannot be connected to")),
        Ok(_) => {}
        Err(_) => {
            return Err(format!(
                "{address:?}: {port:?} is not a port number (1..65535)"
            ))
        }
    }
    if host.is_empty() {
        return Err(format!("{address:?} has no host; expected host:port"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(ip) = inner.strip_suffix(']') else {
            return Err(format!("{address:?}: unbalanced '[' in an IPv6 address"));
        };
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("{address:?}: {ip:?} is not an IPv6 address"))?;
        return Ok(());
    }
    if host.contains(':') {
        return Err(format!(
            "{address:?}: write an IPv6 address in brackets, e.g. \"[2001:db8::2]:7443\""
        ));
    }
    check_dns_name(host).map_err(|e| format!("{address:?}: bad host: {e}"))
}

/// Route names: 1..=64 characters of `[A-Za-z0-9._-]` (the wire format has the same limit).
fn check_route(route: &str) -> Result<(), String> {
    if route.is_empty() || route.len() > MAX_ROUTE_LEN {
        return Err(format!(
            "route name {route:?} must be 1 to {MAX_ROUTE_LEN} characters long"
        ));
    }
    if let Some(c) = route
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "route name {route:?}: character {c:?} not allowed (letters, digits, '.', '_', '-')"
        ));
    }
    if route == "." || route == ".." {
        return Err(format!("route name {route:?} is not allowed (the wire refuses '.' and '..')"));
    }
    Ok(())
}

fn parse_mode(v: &toml::Value) -> Result<u32, String> {
    let toml::Value::String(s) = v else {
        return Err(format!(
            "expected an octal string such as \"0660\", got {}; write it in quotes",
            v.type_str()
        ));
    };
    if s.is_empty() || s.len() > 4 || !s.chars().all(|c| ('0'..='7').contains(&c)) {
        return Err(format!("{s:?} is not an octal mode such as \"0660\""));
    }
    let mode = u32::from_str_radix(s, 8).map_err(|e| format!("{s:?}: {e}"))?;
    if mode > 0o777 {
        return Err(format!(
            "{s:?}: only permission bits (at most 0777) are allowed"
        ));
    }
    Ok(mode)
}

/// `tunnels.mode`: permission bits that leave the owner rwx (it binds its sockets there) and
/// others no write (they could replace a socket QEMU listens on).
fn tunnel_dir_mode(v: &toml::Value) -> Result<u32, String> {
    let mode = parse_mode(v)?;
    if mode & 0o700 != 0o700 {
        return Err(format!("{mode:04o} would lock tunnels.owner out of its directories: the owner needs rwx (0700) to bind its sockets there"));
    }
    if mode & 0o002 != 0 {
        return Err(format!("{mode:04o} lets any local user write in a tunnel's directory (and replace its sockets); drop the others' w"));
    }
    Ok(mode)
}

/// The id of a user (`user`) or group named by `v`: a name that must exist on this host, or a
/// numeric id (as an integer or a string of digits), taken as it is.
fn resolve_id(v: &toml::Value, user: bool) -> Result<u32, String> {
    let what = if user { "user" } else { "group" };
    let text = match v {
        toml::Value::Integer(i) => return u32::try_from(*i).map_err(|_| format!("{i} is not a {what} id")),
        toml::Value::String(s) => s.as_str(),
        other => return Err(format!("expected a {what} name or a numeric id, got {}", other.type_str())),
    };
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u32>().map_err(|_| format!("{text:?} is not a {what} id"));
    }
    let ok = !text.is_empty()
        && text.len() <= MAX_USER_NAME
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !ok {
        return Err(format!("{text:?} is not a {what} name (letters, digits, '_', '-', '.'; at most {MAX_USER_NAME})"));
    }
    let name = std::ffi::CString::new(text).map_err(|_| "contains NUL".to_string())?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let found = if user {
        let mut pwd = std::mem::MaybeUninit::<libc::passwd>::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: as in `user_ids`: `name` is NUL-terminated, `pwd` and `buf` (with its true
        // length) are writable and outlive the call, `result` is a local out-pointer; only
        // `pw_uid` is read, and only when getpwnam_r reported a match.
        let rc = unsafe { libc::getpwnam_r(name.as_ptr(), pwd.as_mut_ptr(), buf.as_mut_ptr(), buf.len(), &mut result) };
        // SAFETY: on success `result` points to `pwd`, which getpwnam_r filled in.
        (rc == 0 && !result.is_null()).then(|| unsafe { (*result).pw_uid })
    } else {
        let mut grp = std::mem::MaybeUninit::<libc::group>::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: the same contract for getgrnam_r with a `group` record; only `gr_gid` is read,
        // and only when it reported a match.
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), grp.as_mut_ptr(), buf.as_mut_ptr(), buf.len(), &mut result) };
        // SAFETY: on success `result` points to `grp`, which getgrnam_r filled in.
        (rc == 0 && !result.is_null()).then(|| unsafe { (*result).gr_gid })
    };
    found.ok_or_else(|| format!("no {what} {text:?} on this host"))
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tls => "TLS/TCP",
        Transport::Quic => "QUIC",
        Transport::Auto => "QUIC, falling back to TLS/TCP",
    }
}

/// "valid until 2027-01-01 12:00:00 UTC (729 days left)" for a DER certificate.
fn validity_summary(der: &[u8]) -> String {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return "unparseable".into();
    };
    let until = cert.validity().not_after.timestamp();
    let now = UnixTime::now().as_secs() as i64;
    let left = until - now;
    if left < 0 {
        format!("EXPIRED on {}", fmt_time(until))
    } else {
        format!(
            "valid until {} ({} days left)",
            fmt_time(until),
            left / 86_400
        )
    }
}

fn subject(der: &[u8]) -> String {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => c.subject().to_string(),
        Err(_) => "unparseable certificate".into(),
    }
}

/// Unix seconds as "YYYY-MM-DD HH:MM:SS UTC".
fn fmt_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use migtun_certs::{Ca, IssueOptions};

    /// A PKI in a tempdir: ca.pem, host-a.{pem,key}, host-b.{pem,key}.
    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            migtun_certs::init(dir.path()).unwrap();
            migtun_certs::issue(dir.path(), "host-a").unwrap();
            migtun_certs::issue(dir.path(), "host-b").unwrap();
            Pki { dir }
        }
        fn path(&self, f: &str) -> String {
            self.dir.path().join(f).display().to_string()
        }
        /// A config for host-a with the given tls.cert/tls.key, one peer (host-b), and `tail`
        /// appended at the end.
        fn config(&self, cert: &str, key: &str, tail: &str) -> String {
            format!(
                r#"name = "host-a"
listen = "0.0.0.0:7443"

[tls]
cert = "{cert}"
key = "{key}"
ca = "{ca}"

[[peer]]
name = "host-b"
address = "192.0.2.2:7443"

{tail}"#,
                ca = self.path("ca.pem"),
            )
        }
        fn valid(&self, tail: &str) -> String {
            self.config(&self.path("host-a.pem"), &self.path("host-a.key"), tail)
        }
        fn load(&self, text: &str) -> Result<Config, ConfigError> {
            Config::from_toml(text, "test.toml", self.dir.path())
        }
        fn err(&self, text: &str) -> ConfigError {
            let e = self.load(text).expect_err("config must be refused");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
            e
        }
    }

    /// What a reload may change live and what it refuses, naming the key.
    #[test]
    fn restart_needed_names_each_key_a_reload_cannot_change() {
        let pki = Pki::new();
        let base = pki.load(&pki.valid("")).unwrap();
        let live = pki
            .load(&format!(
                "drain_timeout_secs = 5\n{}",
                pki.valid("[[expose]]\nroute = \"r\"\ntarget = \"tcp:127.0.0.1:22\"\nallow = [\"host-b\"]\n")
            ))
            .unwrap();
        assert!(base.restart_needed(&live).is_empty(), "{:?}", base.restart_needed(&live));
        let text = pki.valid("").replace("0.0.0.0:7443", "0.0.0.0:7444").replace("192.0.2.2:7443", "192.0.2.3:7443");
        let other = pki.load(&format!("metrics = \"127.0.0.1:9477\"\n{text}")).unwrap();
        let lines = base.restart_needed(&other);
        for key in ["`listen`", "`metrics`"] {
            assert!(lines.iter().any(|l| l.starts_with(key) && l.ends_with("needs a restart")), "{key}: {lines:?}");
        }
        assert_eq!(lines.len(), 2, "a peer's address changes live: {lines:?}");
        let qemu = pki.load(&pki.valid("[qemu]\nrun_dir = \"/run/x\"\n")).unwrap();
        assert_eq!(base.restart_needed(&qemu), ["`qemu`: changed from no [qemu] section to a [qemu] section; needs a restart"]);
        let qemu2 = pki.load(&pki.valid("[qemu]\nrun_dir = \"/run/y\"\nsandbox = false\n")).unwrap();
        let lines = qemu.restart_needed(&qemu2);
        assert!(lines.iter().any(|l| l.starts_with("`qemu.run_dir`")) && lines.iter().any(|l| l.starts_with("`qemu.sandbox`")), "{lines:?}");
    }

    /// Found by the `config` fuzz target: a quoted key with a newline made a two-line error
    /// naming a key that does not exist (`a\nb.a`).
    #[test]
    fn a_key_with_control_characters_is_named_on_one_line() {
        let pki = Pki::new();
        let e = pki.err(&format!("\"a\\nb\\tc\" = 1\n{}", pki.valid("")));
        assert_key(&e, "a\\nb\\tc", "unknown key");
        let e = pki.err(&pki.valid("[[expose]]\nroute = \"r\"\ntarget = \"tcp:127.0.0.1:22\"\nallow = [\"host-b\"]\n\"x\\ny\" = 2\n"));
        assert_key(&e, "expose[0].x\\ny", "unknown key");
    }

    /// The wire refuses `.` and `..` as route names: a config naming one would never work.
    #[test]
    fn dot_routes_are_refused() {
        let pki = Pki::new();
        for route in [".", ".."] {
            let e = pki.err(&pki.valid(&format!("[[expose]]\nroute = \"{route}\"\ntarget = \"tcp:127.0.0.1:22\"\nallow = [\"host-b\"]\n")));
            assert_key(&e, "expose[0].route", "not allowed");
        }
    }

    /// `tls.crl`: relative to the config file, loaded, explained; a missing or malformed file,
    /// or one revoking this host's own certificate, is an error naming the key.
    #[test]
    fn tls_crl() {
        let pki = Pki::new();
        let with_crl = |crl: &str| pki.valid("").replace("[[peer]]", &format!("crl = \"{crl}\"\n\n[[peer]]"));
        migtun_certs::issue(pki.dir.path(), "host-c").unwrap();
        migtun_certs::revoke(pki.dir.path(), "host-c").unwrap();
        let c = pki.load(&with_crl("crl.pem")).expect("relative tls.crl");
        assert_eq!(c.tls.crl_path, Some(pki.dir.path().join("crl.pem")));
        assert_eq!(c.tls.crls.len(), 1);
        assert!(c.explain().contains("revokes     "), "{}", c.explain());
        assert!(pki.load(&pki.valid("")).unwrap().tls.crls.is_empty(), "no tls.crl: nothing revoked");

        assert_key(&pki.err(&with_crl("missing.pem")), "tls.crl", "missing.pem: No such file");
        std::fs::write(pki.dir.path().join("junk.pem"), "junk").unwrap();
        assert_key(&pki.err(&with_crl("junk.pem")), "tls.crl", "holds no PEM CRL");
        migtun_certs::revoke(pki.dir.path(), "host-a").unwrap();
        assert_key(&pki.err(&with_crl("crl.pem")), "tls.cert", "is revoked by tls.crl");
    }

    #[test]
    fn allow_names_a_configured_peer_and_top_level_keys_after_a_table_are_explained() {
        let pki = Pki::new();
        let e = pki.err(&pki.valid("[[expose]]\nroute = \"r\"\ntarget = \"unix:/t\"\nallow = [\"host-x\"]\n"));
        assert_key(&e, "expose[0].allow[0]", "unknown peer \"host-x\"");
        assert!(e.problem.contains("known peers: host-b"), "{e}");
        let e = pki.err(&pki.valid("[[expose]]\nroute = \"r\"\ntarget = \"unix:/t\"\nallow = [\"host-b\"]\nadmin = \"/run/a.sock\"\n"));
        assert_key(&e, "expose[0].admin", "top-level key");
        assert!(e.problem.contains("move it above the first [table]"), "{e}");
        let missing = Config::load(&pki.dir.path().join("nope.toml")).unwrap_err().to_string();
        assert!(!missing.contains("``"), "no empty key: {missing}");
        assert!(missing.contains("nope.toml: cannot read the config file"), "{missing}");
    }

    #[test]
    fn syntax_errors_name_the_key_whose_value_they_are_in() {
        let at = |text: &str| parse(text).err().map(|(k, _)| k).unwrap_or_default();
        assert_eq!(at("name = \"a\"\n[tls]\ncert = \"x\"\n[qemu]\nrun_dir = \"/run/q\n"), "qemu.run_dir");
        assert_eq!(at("name = \"a\"\n[tls]\ncert = \"x\" junk\n[qemu]\nrun_dir = \"q\"\n"), "tls.cert");
        assert_eq!(at("name = \"a\"\n[tls]\ncert = \"x\"\n[qemu\nrun_dir = \"q\"\n"), "qemu");
        // An error on a continuation line of a multi-line value is the value's key's.
        assert_eq!(at("name = \"a\"\n[tls]\nca = [\"x\",\n\"y\" \"z\"]\n[qemu]\n"), "tls.ca");
        assert_eq!(at("name = \"a\"\n[[peer]]\nname = \"b\"\n[[peer]]\nname = b\n"), "peer[1].name");
    }

    fn assert_key(e: &ConfigError, key: &str, contains: &str) {
        assert_eq!(e.key, key, "{e}");
        assert!(
            e.problem.contains(contains),
            "problem {:?} should contain {contains:?}",
            e.problem
        );
    }

    const FULL: &str = r#"
[[peer]]
name = "host-c.example.org"
address = "192.0.2.3:7443"

[[forward]]
listen = "unix:/run/migtun/host-b/migration.sock"
peer = "host-b"
route = "migration"
mode = "0660"

[[forward]]
listen = "tcp:127.0.0.1:49152"
peer = "host-b"
route = "nbd.disk-0"

[[expose]]
route = "migration"
target = "unix:/run/libvirt/qemu/incoming.sock"
allow = ["host-b", "host-c.example.org"]

[qemu]
run_dir = "qemu-run"
prepare_hook = "/etc/migtun/prepare"
emulator = "/bin/true"
shared_storage = ["/srv/vm", "/var/lib/images"]
max_disk_bytes = 1099511627776
sandbox = true
allow_sources = ["host-b"]
max_incoming = 6
max_incoming_per_peer = 3
max_upload_bytes = 1048576
"#;

    #[test]
    fn full_valid_config_loads() {
        let pki = Pki::new();
        let text = pki.valid(FULL).replacen(
            "listen = \"0.0.0.0:7443\"\n",
            "listen = \"0.0.0.0:7443\"\nadmin = \"/run/migtun/admin.sock\"\nmetrics = \"127.0.0.1:9477\"\ndrain_timeout_secs = 5\n",
            1,
        );
        let c = pki.load(&text).unwrap();
        assert_eq!(c.name, "host-a");
        assert_eq!(c.listen, "0.0.0.0:7443".parse().unwrap());
        assert_eq!(
            c.admin.as_deref(),
            Some(Path::new("/run/migtun/admin.sock"))
        );
        assert_eq!(c.metrics, Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.tls.cert_chain.len(), 1);
        assert_eq!(c.tls.ca_certs.len(), 1);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peer("host-b").unwrap().address, "192.0.2.2:7443");
        assert_eq!(c.peers[0].transport, Transport::Tls);
        assert_eq!(c.forwards.len(), 2);
        assert_eq!(
            c.forwards[0].listen,
            Endpoint::Unix("/run/migtun/host-b/migration.sock".into())
        );
        assert_eq!(c.forwards[0].mode, 0o660);
        assert_eq!(
            c.forwards[1].listen,
            Endpoint::Tcp("127.0.0.1:49152".parse().unwrap())
        );
        assert_eq!(c.forwards[1].mode, DEFAULT_SOCKET_MODE);
        assert_eq!(c.forwards[1].route, "nbd.disk-0");
        assert_eq!(c.exposes[0].allow, ["host-b", "host-c.example.org"]);
        let q = c.qemu.as_ref().unwrap();
        assert_eq!(q.run_dir, pki.dir.path().join("qemu-run"));
        assert_eq!(
            q.prepare_hook.as_deref(),
            Some(Path::new("/etc/migtun/prepare"))
        );
        assert_eq!(q.emulator, Path::new("/bin/true"));
        assert_eq!(q.shared_storage, [PathBuf::from("/srv/vm"), PathBuf::from("/var/lib/images")]);
        assert_eq!(q.max_disk_bytes, 1 << 40);
        assert!(q.sandbox && q.run_as.is_none());
        assert_eq!(q.allow_sources, ["host-b"]);
        assert_eq!((q.max_incoming, q.max_incoming_per_peer, q.max_upload_bytes), (6, 3, 1 << 20));

        let text = c.explain();
        for want in [
            "identity: host-a",
            "DNS SANs: host-a",
            "days left",
            "CN=migtun CA",
            "TCP 0.0.0.0:7443 (TLS 1.3, mutual TLS",
            "host-b at 192.0.2.2:7443 over TLS/TCP",
            "unix:/run/migtun/host-b/migration.sock (mode 0660) → peer host-b, route migration",
            "tcp:127.0.0.1:49152 → peer host-b, route nbd.disk-0",
            "route migration → unix:/run/libvirt/qemu/incoming.sock allowed for host-b, host-c.example.org",
            "admin: /run/migtun/admin.sock",
            "metrics: http://127.0.0.1:9477/metrics",
            "drain: open streams may run 5 s",
            "destination QEMU is /bin/true, sandbox on, runs as the agent's user; copied disks up to 1099511627776 bytes each; shared storage: /srv/vm, /var/lib/images",
            "incoming migrations from: host-b (at most 6 at once, 3 per peer; side-channel files up to 1048576 bytes)",
        ] {
            assert!(text.contains(want), "explain lacks {want:?}:\n{text}");
        }
    }

    #[test]
    fn defaults() {
        let pki = Pki::new();
        let c = pki.load(&pki.valid("")).unwrap();
        assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert!(c.admin.is_none() && c.metrics.is_none() && c.qemu.is_none());
        assert!(c.forwards.is_empty() && c.exposes.is_empty());
        assert!(c.explain().contains("admin: none"));
    }

    #[test]
    fn relative_paths_resolved_against_config_dir() {
        let pki = Pki::new();
        let text = pki
            .config("host-a.pem", "./host-a.key", "")
            .replace(&pki.path("ca.pem"), "ca.pem");
        let file = pki.dir.path().join("migtun.toml");
        std::fs::write(&file, text).unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.tls.cert_path, pki.dir.path().join("host-a.pem"));
        assert_eq!(c.tls.key_path, pki.dir.path().join("./host-a.key"));
        assert_eq!(c.tls.ca_path, pki.dir.path().join("ca.pem"));
        // Not relative to the current directory.
        let e = Config::from_toml(
            &std::fs::read_to_string(&file).unwrap(),
            "x.toml",
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert_key(&e, "tls.cert", "/nonexistent/host-a.pem");
        let e = Config::load(&pki.dir.path().join("missing.toml")).unwrap_err();
        assert!(e.problem.contains("cannot read"), "{e}");
    }

    #[test]
    fn unknown_keys() {
        let pki = Pki::new();
        let e = pki.err(&format!("nmae = \"x\"\n{}", pki.valid("")));
        assert_key(&e, "nmae", "unknown key (expected one of");
        assert!(e.problem.contains("(line 1)"), "{e}");
        let e = pki.err(&pki.valid("").replace("address =", "adress ="));
        assert_key(
            &e,
            "peer[0].adress",
            "unknown key (expected one of name, address, transport)",
        );
        assert!(e.problem.contains("(line 11)"), "{e}");
        let e =
            pki.err(&pki.valid("[[peer]]\nname = \"c\"\naddress = \"c:1\"\ntransprot = \"tls\"\n"));
        assert_key(&e, "peer[1].transprot", "unknown key");
        let e = pki.err(&pki.valid("[tls2]\n"));
        assert_key(&e, "tls2", "unknown key");
    }

    #[test]
    fn missing_keys_and_wrong_types() {
        let pki = Pki::new();
        let e = pki.err(
            &pki.valid("")
                .replace(&format!("ca = \"{}\"\n", pki.path("ca.pem")), ""),
        );
        assert_key(&e, "tls.ca", "missing key");
        let e = pki.err(&pki.valid("").replace("name = \"host-a\"\n", ""));
        assert_key(&e, "name", "missing key");
        let e = pki.err(
            &pki.valid("")
                .replace("listen = \"0.0.0.0:7443\"", "listen = 7443"),
        );
        assert_key(&e, "listen", "invalid type");
        let e = pki.err(
            &pki.valid("[[expose]]\nroute = \"m\"\ntarget = \"unix:/t\"\nallow = [\"a\", 5]\n"),
        );
        assert_key(&e, "expose[0].allow[1]", "invalid type");
        let e = pki.err(&pki.valid(
            "[[forward]]\nlisten = \"unix:/a\"\npeer = \"host-b\"\nroute = \"m\"\nmode = 0o660\n",
        ));
        assert_key(&e, "forward[0].mode", "octal string");
    }

    #[test]
    fn syntax_error_has_line() {
        let pki = Pki::new();
        let e = pki.err(
            &pki.valid("")
                .replace("address = \"192.0.2.2:7443\"", "address = 192.0.2.2:7443"),
        );
        assert!(
            e.problem.contains("TOML syntax error") && e.problem.contains("(line 11)"),
            "{e}"
        );
        assert_eq!(e.key, "peer[0].address");
    }

    #[test]
    fn missing_and_unreadable_files() {
        let pki = Pki::new();
        let e = pki.err(&pki.config("/nonexistent/x.pem", &pki.path("host-a.key"), ""));
        assert_key(&e, "tls.cert", "/nonexistent/x.pem");
        let e = pki.err(&pki.config(&pki.path("host-a.pem"), &pki.path("nope.key"), ""));
        assert_key(&e, "tls.key", "nope.key");
        // A directory as key.
        let e = pki.err(&pki.config(&pki.path("host-a.pem"), &pki.path(""), ""));
        assert_key(&e, "tls.key", "cannot read");
        // A file without a key.
        let e = pki.err(&pki.config(&pki.path("host-a.pem"), &pki.path("host-a.pem"), ""));
        assert_key(&e, "tls.key", "no PEM private key");
        // A key file as certificate.
        let e = pki.err(&pki.config(&pki.path("host-a.key"), &pki.path("host-a.key"), ""));
        assert_key(&e, "tls.cert", "no PEM certificate");
        let e = pki.err(&pki.valid("").replace("ca.pem", "host-a.key"));
        assert_key(&e, "tls.ca", "no PEM certificate");
    }

    #[test]
    fn key_must_match_cert() {
        let pki = Pki::new();
        let e = pki.err(&pki.config(&pki.path("host-a.pem"), &pki.path("host-b.key"), ""));
        assert_key(&e, "tls.key", "does not match tls.cert");
    }

    #[test]
    fn name_must_be_a_san() {
        let pki = Pki::new();
        let e = pki.err(
            &pki.valid("")
                .replace("name = \"host-a\"", "name = \"host-c\""),
        );
        assert_key(&e, "name", "host-c is not a DNS SAN of");
        assert!(e.problem.contains("(it has: host-a)"), "{e}");
        // Case-insensitive.
        pki.load(
            &pki.valid("")
                .replace("name = \"host-a\"", "name = \"HOST-A\""),
        )
        .unwrap();
        let e = pki.err(
            &pki.valid("")
                .replace("name = \"host-a\"", "name = \"host a\""),
        );
        assert_key(&e, "name", "invalid name");
    }

    #[test]
    fn expired_and_foreign_certs() {
        let pki = Pki::new();
        let ca = Ca::load(pki.dir.path()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let at = |s: i64| migtun_certs::time::OffsetDateTime::from_unix_timestamp(s).unwrap();
        let opts = IssueOptions {
            not_before: Some(at(now - 864_000)),
            not_after: Some(at(now - 86_400)),
            ..Default::default()
        };
        let old = ca.issue("host-a", &opts).unwrap();
        let old_dir = tempfile::tempdir().unwrap();
        let (cert, key) = old.write(old_dir.path()).unwrap();
        let e = pki.err(&pki.config(&cert.display().to_string(), &key.display().to_string(), ""));
        assert_key(&e, "tls.cert", "has expired: valid from ");
        assert!(e.problem.contains(" UTC"), "{e}");

        // A certificate of another CA: peers would refuse it.
        let other = Ca::generate("other CA")
            .unwrap()
            .issue("host-a", &IssueOptions::default())
            .unwrap();
        let (cert, key) = other.write(old_dir.path()).unwrap();
        let e = pki.err(&pki.config(&cert.display().to_string(), &key.display().to_string(), ""));
        assert_key(&e, "tls.cert", "does not verify");
    }

    #[test]
    fn peers() {
        let pki = Pki::new();
        let e = pki.err(&pki.valid("").replace(
            "address = \"192.0.2.2:7443\"",
            "address = \"192.0.2.2:7443\"\ntransport = \"udp\"",
        ));
        assert_key(&e, "peer[0].transport", "unknown transport \"udp\"");
        assert_key(
            &e,
            "peer[0].transport",
            "expected \"tls\", \"quic\" or \"auto\"",
        );
        for (name, t) in [("quic", Transport::Quic), ("auto", Transport::Auto)] {
            let c = pki
                .load(&pki.valid("").replace(
                    "address = \"192.0.2.2:7443\"",
                    &format!("address = \"192.0.2.2:7443\"\ntransport = \"{name}\""),
                ))
                .unwrap();
            assert_eq!(c.peers[0].transport, t);
        }
        let c = pki
            .load(&pki.valid("").replace(
                "address = \"192.0.2.2:7443\"",
                "address = \"192.0.2.2:7443\"\ntransport = \"tls\"",
            ))
            .unwrap();
        assert_eq!(c.peers[0].transport, Transport::Tls);

        let e = pki.err(&pki.valid("[[peer]]\nname = \"host-b\"\naddress = \"x:1\"\n"));
        assert_key(
            &e,
            "peer[1].name",
            "duplicate peer \"host-b\" (also peer[0])",
        );
        let e = pki.err(&pki.valid("[[peer]]\nname = \"host-a\"\naddress = \"x:1\"\n"));
        assert_key(&e, "peer[1].name", "own name");
        for (addr, ok) in [
            ("b.example.org:7443", true),
            ("[2001:db8::2]:7443", true),
            ("10.0.0.1:65535", true),
            ("", false),
            ("host", false),
            ("host:", false),
            ("host:70000", false),
            (":7443", false),
            ("2001:db8::2:7443", false),
            ("[2001:db8::zz]:7443", false),
            ("a b:1", false),
        ] {
            let r = pki.load(&pki.valid("").replace("192.0.2.2:7443", addr));
            match (r, ok) {
                (Ok(_), true) => {}
                (Err(e), false) => assert_eq!(e.key, "peer[0].address", "{addr}: {e}"),
                (r, _) => panic!("{addr}: {r:?}"),
            }
        }
    }

    #[test]
    fn forwards() {
        let pki = Pki::new();
        let fwd = |listen: &str, peer: &str, route: &str| {
            format!("[[forward]]\nlisten = \"{listen}\"\npeer = \"{peer}\"\nroute = \"{route}\"\n")
        };
        let e = pki.err(&pki.valid(&fwd("unix:/run/a.sock", "host-x", "m")));
        assert_key(
            &e,
            "forward[0].peer",
            "unknown peer \"host-x\" (known peers: host-b)",
        );
        let e = pki.err(&pki.valid(&fwd("tcp:0.0.0.0:49152", "host-b", "m")));
        assert_key(&e, "forward[0].listen", "loopback");
        pki.load(&pki.valid(&fwd("tcp:[::1]:49152", "host-b", "m")))
            .unwrap();
        let e = pki.err(&pki.valid(&fwd("unix:rel.sock", "host-b", "m")));
        assert_key(&e, "forward[0].listen", "absolute");
        let e = pki.err(&pki.valid(&format!(
            "{}{}",
            fwd("unix:/a", "host-b", "m"),
            fwd("unix:/a", "host-b", "n")
        )));
        assert_key(
            &e,
            "forward[1].listen",
            "duplicate listen endpoint unix:/a (also forward[0])",
        );
        let e = pki.err(&pki.valid(&fwd("unix:/a", "host-b", "bad route")));
        assert_key(&e, "forward[0].route", "not allowed");
        let e = pki.err(&pki.valid(&fwd("unix:/a", "host-b", &"r".repeat(65))));
        assert_key(&e, "forward[0].route", "1 to 64");
        pki.load(&pki.valid(&fwd("unix:/a", "host-b", &"r".repeat(64))))
            .unwrap();
        let e = pki.err(&pki.valid(&format!(
            "{}mode = \"0660\"\n",
            fwd("tcp:127.0.0.1:1", "host-b", "m")
        )));
        assert_key(&e, "forward[0].mode", "unix");
        for bad in ["0999", "1777", "rw", "", "07777"] {
            let e = pki.err(&pki.valid(&format!(
                "{}mode = \"{bad}\"\n",
                fwd("unix:/a", "host-b", "m")
            )));
            assert_key(&e, "forward[0].mode", "");
        }
    }

    #[test]
    fn exposes() {
        let pki = Pki::new();
        let exp = |route: &str, target: &str, allow: &str| {
            format!("[[expose]]\nroute = \"{route}\"\ntarget = \"{target}\"\nallow = [{allow}]\n")
        };
        let e = pki.err(&pki.valid(&format!(
            "{}{}",
            exp("migration", "unix:/a", "\"host-b\""),
            exp("migration", "unix:/b", "\"host-b\"")
        )));
        assert_key(
            &e,
            "expose[1].route",
            "duplicate route \"migration\" (also expose[0])",
        );
        let e = pki.err(&pki.valid(&exp("m", "udp:1.2.3.4:5", "\"host-b\"")));
        assert_key(
            &e,
            "expose[0].target",
            "expected \"unix:/absolute/path\" or \"tcp:IP:PORT\"",
        );
        let e = pki.err(&pki.valid(&exp("m", "unix:/a", "")));
        assert_key(&e, "expose[0].allow", "empty");
        let e = pki.err(&pki.valid(&exp("m", "unix:/a", "\"host-b\", \"not a name\"")));
        assert_key(&e, "expose[0].allow[1]", "invalid name");
        let e = pki.err(&pki.valid(&exp("", "unix:/a", "\"host-b\"")));
        assert_key(&e, "expose[0].route", "1 to 64");
    }

    #[test]
    fn top_level_values() {
        let pki = Pki::new();
        let set = |line: &str| {
            pki.valid("").replacen(
                "listen = \"0.0.0.0:7443\"\n",
                &format!("listen = \"0.0.0.0:7443\"\n{line}\n"),
                1,
            )
        };
        assert_key(
            &pki.err(&set("drain_timeout_secs = 3601")),
            "drain_timeout_secs",
            "between 0 and 3600",
        );
        assert_key(
            &pki.err(&set("drain_timeout_secs = -1")),
            "drain_timeout_secs",
            "between 0 and 3600",
        );
        assert_key(
            &pki.err(&set("admin = \"admin.sock\"")),
            "admin",
            "absolute",
        );
        assert_key(
            &pki.err(&set("metrics = \"localhost:9477\"")),
            "metrics",
            "IP:PORT",
        );
        let e = pki.err(&pki.valid("").replace("0.0.0.0:7443", "0.0.0.0"));
        assert_key(&e, "listen", "IP:PORT");
        let e = pki.err(&pki.valid("[qemu]\nrun_dir = \"\"\n"));
        assert_key(&e, "qemu.run_dir", "empty");
        assert_key(
            &pki.err(&pki.valid("[qemu]\n")),
            "qemu.run_dir",
            "missing key",
        );
    }

    #[test]
    fn qemu_destination_keys_are_validated() {
        let pki = Pki::new();
        let q = |tail: &str| pki.valid(&format!("[qemu]\nrun_dir = \"r\"\n{tail}"));
        let c = pki.load(&q("")).unwrap();
        let d = c.qemu.as_ref().unwrap();
        assert_eq!(d.emulator, Path::new(DEFAULT_EMULATOR));
        assert_eq!(d.max_disk_bytes, DEFAULT_MAX_DISK_BYTES);
        assert!(d.sandbox && d.shared_storage.is_empty() && d.run_as.is_none());
        assert!(c.explain().contains("shared storage: none (migrations with disks that are not copied are refused)"));

        let not_exec = pki.dir.path().join("not-exec");
        std::fs::write(&not_exec, "").unwrap();
        assert_key(&pki.err(&q("emulator = \"qemu-system-x86_64\"")), "qemu.emulator", "absolute path");
        assert_key(&pki.err(&q(&format!("emulator = \"{}\"", not_exec.display()))), "qemu.emulator", "not executable");
        assert_key(&pki.err(&q(&format!("emulator = \"{}\"", pki.dir.path().display()))), "qemu.emulator", "not a regular file");
        assert_key(&pki.err(&q("emulator = \"/nonexistent/qemu\"")), "qemu.emulator", "No such file");
        assert_key(&pki.err(&q("shared_storage = [\"/srv\", \"vm\"]")), "qemu.shared_storage[1]", "absolute");
        assert_key(&pki.err(&q("shared_storage = [\"/\"]")), "qemu.shared_storage[0]", "any file");
        assert_key(&pki.err(&q("shared_storage = [\"/srv/../etc\"]")), "qemu.shared_storage[0]", "`..`");
        assert_key(&pki.err(&q("max_disk_bytes = 0")), "qemu.max_disk_bytes", "positive");
        assert_key(&pki.err(&q("run_as = \"root\"")), "qemu.run_as", "unprivileged");
        assert_key(&pki.err(&q("run_as = \"no-such-user-migtun\"")), "qemu.run_as", "no such user");
        assert_key(&pki.err(&q("run_as = \"Bad Name\"")), "qemu.run_as", "not a user name");
        let c = pki.load(&q("sandbox = false")).unwrap();
        assert!(!c.qemu.unwrap().sandbox);
    }

    #[test]
    fn qemu_allow_sources_and_limits() {
        let pki = Pki::new();
        let qemu = |extra: &str| pki.valid(&format!("[qemu]\nrun_dir = \"/run/q\"\n{extra}"));
        // Absent: no incoming migration, defaults for the limits.
        let c = pki.load(&qemu("")).unwrap();
        let q = c.qemu.as_ref().unwrap();
        assert!(q.allow_sources.is_empty());
        assert_eq!(
            (q.max_incoming, q.max_incoming_per_peer, q.max_upload_bytes),
            (DEFAULT_MAX_INCOMING, DEFAULT_MAX_INCOMING_PER_PEER, DEFAULT_MAX_UPLOAD_BYTES)
        );
        assert!(c.explain().contains("incoming migrations: none accepted (qemu.allow_sources is empty)"), "{}", c.explain());
        // A per-peer default never exceeds a smaller total.
        let c = pki.load(&qemu("max_incoming = 2")).unwrap();
        assert_eq!(c.qemu.as_ref().unwrap().max_incoming_per_peer, 2);

        assert_key(&pki.err(&qemu("allow_sources = [\"host-x\"]")), "qemu.allow_sources[0]", "unknown peer \"host-x\"");
        assert_key(
            &pki.err(&qemu("allow_sources = [\"host-b\", \"host-b\"]")),
            "qemu.allow_sources[1]",
            "listed twice",
        );
        assert_key(&pki.err(&qemu("max_incoming = 0")), "qemu.max_incoming", "between 1 and 1024");
        assert_key(&pki.err(&qemu("max_incoming_per_peer = 5000")), "qemu.max_incoming_per_peer", "between 1 and 1024");
        assert_key(
            &pki.err(&qemu("max_incoming = 2\nmax_incoming_per_peer = 3")),
            "qemu.max_incoming_per_peer",
            "more than qemu.max_incoming (2)",
        );
        assert_key(&pki.err(&qemu("max_upload_bytes = -1")), "qemu.max_upload_bytes", "negative");
    }

    #[test]
    fn tunnels_owner_group_and_mode_are_resolved_and_explained() {
        let pki = Pki::new();
        let t = |extra: &str| pki.valid(&format!("[tunnels]\ndir = \"/run/migtun/tunnels\"\nallow = [\"host-b\"]\n{extra}"));
        let c = pki.load(&t("")).unwrap();
        let d = c.tunnels.as_ref().unwrap();
        assert_eq!((d.ownership, d.mode), (Ownership::default(), DEFAULT_TUNNEL_DIR_MODE));
        assert!(c.explain().contains("tunnels: dir /run/migtun/tunnels, accepted from host-b; at most 16 open at once, TTL up to 3600 s"), "{}", c.explain());
        assert!(c.explain().contains("each tunnel's directory: mode 0750, the agent's user, the agent's group; its sockets on the listening side: mode 0660"), "{}", c.explain());
        // The owner's primary group unless `group` says otherwise (a name or a numeric id).
        let c = pki.load(&t("owner = \"nobody\"")).unwrap();
        assert_eq!(c.tunnels.as_ref().unwrap().ownership, Ownership { uid: Some(65534), gid: Some(65534) });
        let c = pki.load(&t("owner = \"nobody\"\ngroup = 0\nmode = \"0770\"")).unwrap();
        let d = c.tunnels.as_ref().unwrap();
        assert_eq!((d.ownership, d.mode), (Ownership { uid: Some(65534), gid: Some(0) }, 0o770));
        assert!(c.explain().contains("mode 0770, owner nobody (uid 65534), gid 0;"), "{}", c.explain());
        let c = pki.load(&t("group = \"root\"")).unwrap();
        assert_eq!(c.tunnels.as_ref().unwrap().ownership, Ownership { uid: None, gid: Some(0) });
        assert!(pki.load(&pki.valid("")).unwrap().explain().contains("tunnels: not configured"));

        assert_key(&pki.err(&t("group = \"no-such-group-migtun\"")), "tunnels.group", "no group \"no-such-group-migtun\"");
        assert_key(&pki.err(&t("group = -1")), "tunnels.group", "not a group id");
        assert_key(&pki.err(&t("owner = \"root\"")), "tunnels.owner", "unprivileged");
        for (bad, why) in [("0650", "lock tunnels.owner out"), ("0057", "lock tunnels.owner out"), ("0772", "any local user"), ("0999", "octal"), ("4750", "0777"), ("", "octal")] {
            assert_key(&pki.err(&t(&format!("mode = \"{bad}\""))), "tunnels.mode", why);
        }
        assert_key(&pki.err(&t("mode = 0o750")), "tunnels.mode", "octal string");
    }

    #[test]
    fn display_is_one_line_naming_the_key() {
        let pki = Pki::new();
        let e = pki.err(&pki.valid("").replace(
            "address = \"192.0.2.2:7443\"",
            "address = \"192.0.2.2:7443\"\ntransport = \"udp\"",
        ));
        let s = e.to_string();
        assert!(
            s.starts_with("test.toml: `peer[0].transport`: unknown transport \"udp\""),
            "{s}"
        );
        assert_eq!(s.lines().count(), 1);
    }

    #[test]
    fn record_layer_defaults_to_own_is_explained_and_a_bad_value_names_the_key() {
        let pki = Pki::new();
        let c = pki.load(&pki.valid("")).unwrap();
        assert_eq!(c.tls.record_layer, RecordLayer::Own);
        assert!(c.explain().contains("records     own (tls.record_layer:"), "{}", c.explain());
        for (value, layer) in [("own", RecordLayer::Own), ("rustls", RecordLayer::Rustls)] {
            let text = pki.valid("").replacen("[tls]\n", &format!("[tls]\nrecord_layer = \"{value}\"\n"), 1);
            let c = pki.load(&text).unwrap();
            assert_eq!(c.tls.record_layer, layer);
            assert!(c.explain().contains(&format!("records     {value} (tls.record_layer:")), "{}", c.explain());
        }
        let e = pki.err(&pki.valid("").replacen("[tls]\n", "[tls]\nrecord_layer = \"kernel\"\n", 1));
        assert_key(&e, "tls.record_layer", "unknown record layer \"kernel\" (expected \"own\" or \"rustls\")");
        let e = pki.err(&pki.valid("").replacen("[tls]\n", "[tls]\nrecord_layer = 1\n", 1));
        assert_eq!(e.key, "tls.record_layer", "{e}");
    }

    #[test]
    fn time_format() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_time(1_767_225_599), "2025-12-31 23:59:59 UTC");
    }
}
