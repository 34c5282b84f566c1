//! Validation: from the TOML shape to a [`Config`], every problem one line naming its key.
//! The `[qemu]` and `[tunnels]` tables are in `qemu.rs`, `[tls]` in `tls.rs`.

mod qemu;
mod tls;

pub use qemu::user_ids;
use self::tls::check_verifiable;

use super::raw::*;
use super::*;

pub(super) struct Validator<'a> {
    pub(super) base: &'a Path,
}

pub(super) fn err<T>(key: impl Into<String>, problem: impl Into<String>) -> Result<T, Problem> {
    Err((key.into(), problem.into()))
}

impl Validator<'_> {
    pub(super) fn path(&self, key: &str, value: &str) -> Result<PathBuf, Problem> {
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

    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, Problem> {
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

    pub(super) fn peers(&self, own_name: &str, raw: Vec<RawPeer>) -> Result<Vec<Peer>, Problem> {
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

    pub(super) fn forwards(
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
                    .or_else(|e: crate::io::endpoint::EndpointParseError| {
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

    pub(super) fn exposes(&self, raw: Vec<RawExpose>, peers: &[Peer]) -> Result<Vec<Expose>, Problem> {
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
                    .or_else(|p: crate::io::endpoint::EndpointParseError| {
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

/// A DNS host name: labels of 1..=63 letters, digits and '-' (not at either end), '.'-separated,
/// at most 253 characters.
pub(super) fn check_dns_name(name: &str) -> Result<(), String> {
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
pub(super) fn check_address(address: &str) -> Result<(), String> {
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
pub(super) fn check_route(route: &str) -> Result<(), String> {
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

pub(super) fn parse_mode(v: &toml::Value) -> Result<u32, String> {
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

/// The id of a user (`user`) or group named by `v`: a name that must exist on this host, or a
/// numeric id (as an integer or a string of digits), taken as it is.
pub(super) fn resolve_id(v: &toml::Value, user: bool) -> Result<u32, String> {
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
