//! What `serve` needs from the host beyond a valid config: the files, directories and ports it
//! will use. `migtun check` runs these checks and prints every problem, one line each naming
//! the key and the file; `serve` runs them first, so that it fails with the same lines instead
//! of an OS error without context.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::{Config, ConfigError, Transport};
use crate::io::endpoint::Endpoint;

/// Every problem found, in config order; empty when `serve` can start.
pub fn check(config: &Config, file: &str) -> Vec<ConfigError> {
    check_with(config, file, true)
}

/// What a reload of a running agent needs: [`check`] without the ports, which the running agent
/// holds (and which a reload cannot change: `Config::restart_needed`).
pub fn check_reload(config: &Config, file: &str) -> Vec<ConfigError> {
    check_with(config, file, false)
}

fn check_with(config: &Config, file: &str, ports: bool) -> Vec<ConfigError> {
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

    // Ports: TCP always, UDP when a peer may use QUIC (the same port number). An agent of this
    // user draining there is no problem: the TCP ports are shared with it (SO_REUSEPORT), the
    // UDP port is taken over once it lets go (`Agent::bind`).
    if ports {
        if let Err(e) = bind_tcp(config.listen) {
            problem("listen", bind_problem("TCP", config.listen, &e));
        }
        if config.peers.iter().any(|p| matches!(p.transport, Transport::Quic | Transport::Auto)) {
            match UdpSocket::bind(config.listen) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && udp_port_is_ours(config.listen.port()) => {}
                Err(e) => problem("listen", bind_problem("UDP (QUIC, asked for by a [[peer]] transport)", config.listen, &e)),
            }
        }
        if let Some(m) = config.metrics {
            if let Err(e) = bind_tcp(m) {
                problem("metrics", bind_problem("TCP", m, &e));
            }
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
/// keep a restarted agent from its port; `SO_REUSEPORT`: nor does an agent of this user that
/// still drains there), and lets go at once.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1)
}

/// Whether every UDP socket bound to `port` belongs to this process's user (read from
/// `/proc/net/udp` and `udp6`): then it is taken to be an agent of the previous run, which
/// lets go when it has drained. Another user's socket (or none found) is a problem.
fn udp_port_is_ours(port: u16) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut found = false;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for uid in udp_holders(&text, port) {
            if uid != me {
                return false;
            }
            found = true;
        }
    }
    found
}

/// The uids of the sockets bound to `port` in a `/proc/net/udp` table (`local_address` is
/// `ADDR:PORT` in hex, `uid` the eighth column).
fn udp_holders(table: &str, port: u16) -> Vec<u32> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port).then_some(())?;
            cols.get(7)?.parse().ok()
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_holders_are_read_from_the_proc_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                     1: 0100007F:1D0B 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 4242 2 0 0\n\
                     2: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 17 2 0 0\n";
        assert_eq!(udp_holders(table, 0x1D0B), [1000]);
        assert_eq!(udp_holders(table, 53), [0]);
        assert!(udp_holders(table, 7443).is_empty());
        assert!(udp_holders("garbage\nmore garbage here\n", 7443).is_empty());
    }
}
