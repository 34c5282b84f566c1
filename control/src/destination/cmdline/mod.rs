//! Builds the destination QEMU's command line from the source's, through an allow-list.
//!
//! The source's command line says what the guest looks like (machine, CPUs, RAM, devices, the
//! block graph): the destination needs the same to load the migration stream. It is read
//! option by option; only options on the allow-list pass, each one's keys checked against the
//! allow-list of its driver, and written back by us (never copied as text). What the
//! destination decides itself is dropped from the source's line and added by us: the emulator
//! (`qemu.emulator`), the monitor (`-qmp` on the migration's socket), `-S`, `-incoming defer`,
//! `-pidfile`, `-sandbox`, `-runas`, `-daemonize` (never: see [`sandbox_arg`]).
//!
//! File paths: an image of a copied disk becomes a fresh file in the migration's image
//! directory; file-backed RAM (`mem-path`) moves there too; every other file the guest opens
//! (a shared disk, a backing file, firmware) must be under a `qemu.shared_storage` prefix
//! after canonicalization (the one I/O this module does).
//!
//! This file walks the line and owns the per-migration state (`Ctx`: ids seen, files claimed);
//! `options` is the allow-list of options and the check of each, `keys` the `key=value`
//! checker they share.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::opts;
use super::{cookie, paths, shorten, Policy, Refusal};
use crate::messages::Cookie;

mod keys;
mod options;
#[cfg(test)]
mod tests;

use options::{rule, Rule};

/// Where the destination's files of one migration go.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The migration's image directory (exists, canonical).
    pub image_dir: PathBuf,
    /// The destination QEMU's QMP socket.
    pub qmp: PathBuf,
    pub pidfile: PathBuf,
}

/// An image the prepare step must create before QEMU starts: a file that does not exist yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Image {
    pub node_name: String,
    pub device: String,
    pub path: PathBuf,
    pub format: String,
    pub size: u64,
}

/// What the destination runs: `argv[0]` is `qemu.emulator`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub argv: Vec<String>,
    pub images: Vec<Image>,
}

/// The sandbox QEMU 7.2 can run with here. Measured with QEMU 7.2 on Debian 12: the seccomp
/// filter is installed before `-daemonize` forks and calls setsid(), so `spawn=deny` kills
/// `-daemonize` (SIGSYS on fork) and `elevateprivileges=deny` kills it too (setsid); the
/// destination therefore never daemonizes (the hook starts QEMU in its own session). `-runas`
/// calls setgid()/setuid() after the filter too, so with `qemu.run_as` privilege changes stay
/// allowed (`elevateprivileges=allow`): QEMU can only use them to drop to that user, since an
/// unprivileged process cannot regain root by set*id, and `spawn=deny` forbids exec of a
/// set-uid program. `children` does not help: it still refuses the set*id calls.
pub fn sandbox_arg(run_as: bool) -> String {
    format!(
        "on,obsolete=deny,elevateprivileges={},spawn=deny,resourcecontrol=deny",
        if run_as { "allow" } else { "deny" }
    )
}

/// Validates and translates `cookie.cmdline` (the cookie must have passed
/// [`cookie::validate`]) into the destination's [`Plan`].
pub fn build(cookie: &Cookie, policy: &Policy, layout: &Layout) -> Result<Plan, Refusal> {
    let args = &cookie.cmdline;
    let Some(argv0) = args.first() else {
        return Err(Refusal::field("cmdline", "", "empty: the source sent no QEMU command line"));
    };
    let base = Path::new(argv0).file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !(base.starts_with("qemu-system-") || base == "qemu-kvm" || base == "kvm") {
        return Err(Refusal::field(
            "cmdline[0]",
            argv0,
            "not a QEMU emulator; the destination runs its own qemu.emulator and only reads the source's QEMU options",
        ));
    }
    let mut ctx = Ctx::new(cookie, policy, layout)?;
    let mut argv = vec![policy.emulator.display().to_string()];
    let mut i = 1;
    while i < args.len() {
        let raw = args[i].as_str();
        if !raw.starts_with('-') || raw == "-" {
            return Err(Refusal::option(raw, "a positional argument (QEMU would open it as a disk image); use -blockdev or -drive"));
        }
        // QEMU accepts `--opt` for `-opt`.
        let opt = if raw.starts_with("--") { &raw[1..] } else { raw };
        let value = args.get(i + 1).map(String::as_str);
        let need = |v: Option<&'_ str>| -> Result<(), Refusal> { v.map(|_| ()).ok_or_else(|| Refusal::option(opt, "has no value")) };
        match rule(opt) {
            Rule::Keep => argv.push(opt.to_string()),
            Rule::Replace(with) => argv.extend(with.iter().map(|s| s.to_string())),
            Rule::DropFlag => {}
            Rule::DropValue => {
                need(value)?;
                i += 1;
            }
            Rule::Value(check) => {
                need(value)?;
                let v = value.unwrap_or_default();
                let out = check(&mut ctx, opt, v)?;
                argv.push(opt.to_string());
                argv.push(out);
                i += 1;
            }
            Rule::Refuse(why) => return Err(Refusal::option(opt, why)),
            Rule::Unknown => return Err(Refusal::option(opt, "not on the destination's allow-list of QEMU options")),
        }
        i += 1;
    }
    for d in cookie.disks.iter().filter(|d| d.copy) {
        if !ctx.used.contains(d.source_file.as_str()) {
            return Err(Refusal::Disk {
                disk: d.name().to_string(),
                why: format!("its image {} does not appear as a file of -blockdev or -drive on the command line", d.source_file),
            });
        }
    }
    argv.push("-S".into());
    argv.push("-qmp".into());
    argv.push(format!("unix:{},server=on,wait=off", opts::escape(&layout.qmp.display().to_string())));
    argv.extend(["-incoming".to_string(), "defer".to_string()]);
    argv.push("-pidfile".into());
    argv.push(layout.pidfile.display().to_string());
    if policy.sandbox {
        argv.push("-sandbox".into());
        argv.push(sandbox_arg(policy.run_as.is_some()));
    }
    if let Some(user) = &policy.run_as {
        argv.push("-runas".into());
        argv.push(user.clone());
    }
    Ok(Plan { argv, images: ctx.images })
}

/// Is `path` (canonicalized: it must exist) under one of the `shared_storage` prefixes?
pub fn on_shared_storage(policy: &Policy, path: &str) -> Result<PathBuf, String> {
    let configured = if policy.shared_storage.is_empty() {
        "qemu.shared_storage is not set on the destination, so only copied disks are allowed".to_string()
    } else {
        format!(
            "not under qemu.shared_storage ({})",
            policy.shared_storage.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    };
    if !path.starts_with('/') {
        return Err(format!("{:?} is not an absolute path", shorten(path)));
    }
    let canon = Path::new(path).canonicalize().map_err(|e| format!("{}: {e} ({configured})", shorten(path)))?;
    let ok = policy.shared_storage.iter().any(|p| p.canonicalize().is_ok_and(|p| canon.starts_with(p)));
    if ok {
        Ok(canon)
    } else {
        Err(format!("{}: {configured}", shorten(path)))
    }
}

struct Ctx<'a> {
    policy: &'a Policy,
    image_dir: &'a Path,
    /// A copied disk's source image → its fresh file on this host.
    copied: HashMap<&'a str, PathBuf>,
    /// Source images the command line referred to.
    used: HashSet<&'a str>,
    /// Names taken in the image directory.
    names: HashSet<String>,
    images: Vec<Image>,
}

impl<'a> Ctx<'a> {
    fn new(cookie: &'a Cookie, policy: &'a Policy, layout: &'a Layout) -> Result<Ctx<'a>, Refusal> {
        let mut ctx = Ctx { policy, image_dir: &layout.image_dir, copied: HashMap::new(), used: HashSet::new(), names: HashSet::new(), images: Vec::new() };
        for d in &cookie.disks {
            if !d.copy {
                on_shared_storage(policy, &d.source_file).map_err(|why| Refusal::Disk { disk: d.name().to_string(), why: format!("not copied, and {why}") })?;
                continue;
            }
            if ctx.copied.contains_key(d.source_file.as_str()) {
                return Err(Refusal::Disk { disk: d.name().to_string(), why: format!("{} is the image of another disk too", d.source_file) });
            }
            let base = cookie::base_name(&d.source_file);
            // Two disks with one file name (from different directories): never one image.
            let name = if ctx.names.contains(base) { format!("{}-{base}", d.name().replace('/', "_")) } else { base.to_string() };
            let path = ctx.claim(&name, "disk image")?;
            ctx.copied.insert(d.source_file.as_str(), path.clone());
            ctx.images.push(Image { node_name: d.node_name.clone(), device: d.device.clone(), path, format: d.format.clone(), size: d.size });
        }
        Ok(ctx)
    }

    /// A fresh name in the image directory.
    fn claim(&mut self, name: &str, what: &str) -> Result<PathBuf, Refusal> {
        let path = paths::file_in(self.image_dir, name, what)?;
        if !self.names.insert(name.to_string()) {
            return Err(Refusal::Path { what: what.into(), path: path.display().to_string(), why: "two files of the migration would have this name".into() });
        }
        Ok(path)
    }

    /// A file the guest opens: a copied disk's image moves to its fresh file; anything else
    /// must be on shared storage.
    fn file(&mut self, value: &str) -> Result<String, String> {
        if let Some((&k, p)) = self.copied.get_key_value(value) {
            let p = p.display().to_string();
            self.used.insert(k);
            return Ok(p);
        }
        on_shared_storage(self.policy, value).map(|_| value.to_string())
    }

    /// File-backed RAM: the same file name in the image directory.
    fn mem_path(&mut self, value: &str) -> Result<String, String> {
        let name = cookie::base_name(value).to_string();
        self.claim(&name, "mem-path").map(|p| p.display().to_string()).map_err(|e| e.to_string())
    }
}
