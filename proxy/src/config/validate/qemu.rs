//! Validation of `[qemu]` and `[tunnels]`: paths, users, limits, ownership.

use super::*;

impl Validator<'_> {
    pub(super) fn tunnels(&self, t: RawTunnels, peers: &[Peer]) -> Result<TunnelsConfig, Problem> {
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

    pub(super) fn qemu(&self, q: RawQemu, peers: &[Peer]) -> Result<QemuConfig, Problem> {
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
}

/// A regular file with an execute bit.
pub(super) fn check_executable(path: &Path) -> Result<(), String> {
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
pub(super) fn check_user(user: &str) -> Result<(), String> {
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

/// `tunnels.mode`: permission bits that leave the owner rwx (it binds its sockets there) and
/// others no write (they could replace a socket QEMU listens on).
pub(super) fn tunnel_dir_mode(v: &toml::Value) -> Result<u32, String> {
    let mode = parse_mode(v)?;
    if mode & 0o700 != 0o700 {
        return Err(format!("{mode:04o} would lock tunnels.owner out of its directories: the owner needs rwx (0700) to bind its sockets there"));
    }
    if mode & 0o002 != 0 {
        return Err(format!("{mode:04o} lets any local user write in a tunnel's directory (and replace its sockets); drop the others' w"));
    }
    Ok(mode)
}
