//! The one `Config`: parsed from TOML, validated (every error names its key), explained.
//!
//! Parsing is strict: every table denies unknown keys, and every problem is reported as one
//! line naming the file, the TOML key (`peer[1].transport`, `expose[0].allow[2]`, 0-based) and
//! what is wrong with it. Relative paths are resolved against the config file's directory.
//!
//! - `mod.rs`: the validated types, `load`, and what a reload cannot change (`restart_needed`);
//! - `raw.rs`: the TOML shape and the parse that names the key and line of a serde error;
//! - `validate/`: from the shape to a `Config` (`tls.rs` the certificate files and chain,
//!   `qemu.rs` `[qemu]` and `[tunnels]`);
//! - `explain.rs`: what `migtun check` prints.
//!
//! The children use this module's imports and constants through `use super::*`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};

use crate::io::endpoint::{Endpoint, Ownership, DEFAULT_SOCKET_MODE};
use crate::tls::identity::{dns_sans, load_certs, load_crls, load_key};
pub use crate::tls::settings::{RecordLayer, TlsConfig};

mod explain;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use raw::{one_line, parse};
use validate::Validator;

pub use validate::user_ids;

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
