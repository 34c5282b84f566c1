//! What `serve` needs from the host beyond a valid config: the files, directories and ports it
//! will use. `migtun check` runs these checks and prints every problem, one line each naming
//! the key and the file; `serve` runs them first, so that it fails with the same lines instead
//! of an OS error without context.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::{Config, ConfigError, Transport};
use crate::endpoint::Endpoint;

/// Every problem found, in config order; empty when `serve` can start.
pub fn check(config: &Config, file: &str) -> Vec<ConfigError> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, what: String| problems.push(ConfigError { file: file.to_string(), key: key.to_string(), problem: what });

    // The private key: readable by its owner only (an agent's key lets anyone be this host).
    match std::fs::metadata(&config.tls.key_path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => problem(
            "tls.key",
            format!(
                "{} is readable or writable by group or others (mode {:04o}); chmod 600 it",
                config.tls.key_path.display(),
                m.permissions().mode() & 0o7777
            ),
        ),
        Ok(_) => {}
        Err(e) => problem("tls.key", format!("{}: {e}", config.tls.key_path.display())),
    }

    // Ports: TCP always, UDP when a peer may use QUIC (the same port number).
    if let Err(e) = bind_tcp(config.listen) {
        problem("listen", bind_problem("TCP", config.listen, &e));
    }
    if config.peers.iter().any(|p| matches!(p.transport, Transport::Quic | Transport::Auto)) {
        if let Err(e) = UdpSocket::bind(config.listen) {
            problem("listen", bind_problem("UDP (QUIC, asked for by a [[peer]] transport)", config.listen, &e));
        }
    }
    if let Some(m) = config.metrics {
        if let Err(e) = bind_tcp(m) {
            problem("metrics", bind_problem("TCP", m, &e));
        }
    }

    // UNIX sockets: their directory must exist (the agent creates the socket, not its parents).
    if let Some(admin) = &config.admin {
        if let Some(why) = socket_dir_problem(admin) {
            problem("admin", why);
        }
    }
    for (i, f) in config.forwards.iter().enumerate() {
        if let Endpoint::Unix(path) = &f.listen {
            if let Some(why) = socket_dir_problem(path) {
                problem(&format!("forward[{i}].listen"), why);
            }
        }
    }

    if let Some(q) = &config.qemu {
        if let Some(hook) = &q.prepare_hook {
            match std::fs::metadata(hook) {
                Ok(m) if !m.is_file() => problem("qemu.prepare_hook", format!("{} is not a regular file", hook.display())),
                Ok(m) if m.permissions().mode() & 0o111 == 0 => {
                    problem("qemu.prepare_hook", format!("{} is not executable; chmod +x it", hook.display()))
                }
                Ok(_) => {}
                Err(e) => problem("qemu.prepare_hook", format!("{}: {e}", hook.display())),
            }
        }
        for (key, dir) in [("qemu.run_dir", &q.run_dir), ("qemu.state_dir", &q.state_dir), ("qemu.image_dir", &q.image_dir)] {
            if let Some(why) = creatable_dir_problem(dir) {
                problem(key, why);
            }
        }
    }
    if let Some(t) = &config.tunnels {
        if let Some(why) = creatable_dir_problem(&t.dir) {
            problem("tunnels.dir", why);
        }
    }
    problems
}

/// Binds as the agent does (`SO_REUSEADDR`: connections of a previous run in TIME_WAIT do not
/// keep a restarted agent from its port), and lets go at once.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1)
}

fn bind_problem(what: &str, addr: SocketAddr, e: &std::io::Error) -> String {
    let hint = if e.kind() == std::io::ErrorKind::AddrInUse { " (is an agent already running with this config?)" } else { "" };
    format!("cannot bind {what} {addr}: {e}{hint}")
}

/// The directory of a UNIX socket path must exist and be a directory.
fn socket_dir_problem(path: &Path) -> Option<String> {
    let dir = path.parent()?;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(format!("{} is not a directory, so {} cannot be created", dir.display(), path.display())),
        Err(e) => Some(format!("directory {} of {}: {e}; create it first", dir.display(), path.display())),
    }
}

/// A directory the agent creates if needed: it, or its nearest existing ancestor, must be a
/// directory (the agent runs as the same user as `check`, usually root).
fn creatable_dir_problem(dir: &Path) -> Option<String> {
    let mut p = Some(dir);
    while let Some(d) = p {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => return None,
            Ok(_) => return Some(format!("{} is not a directory, so {} cannot be created", d.display(), dir.display())),
            Err(_) => p = d.parent(),
        }
    }
    Some(format!("{} cannot be created", dir.display()))
}
