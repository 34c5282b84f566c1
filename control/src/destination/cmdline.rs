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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::opts::{self, Part};
use super::{cookie, paths, Policy, Refusal};
use crate::messages::Cookie;

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
        return Err(format!("{:?} is not an absolute path", super::shorten(path)));
    }
    let canon = Path::new(path).canonicalize().map_err(|e| format!("{}: {e} ({configured})", super::shorten(path)))?;
    let ok = policy.shared_storage.iter().any(|p| p.canonicalize().is_ok_and(|p| canon.starts_with(p)));
    if ok {
        Ok(canon)
    } else {
        Err(format!("{}: {configured}", super::shorten(path)))
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

type Check = fn(&mut Ctx, &str, &str) -> Result<String, Refusal>;

enum Rule {
    /// A flag passed on.
    Keep,
    /// A flag replaced by these arguments.
    Replace(&'static [&'static str]),
    /// The source's own plumbing, replaced by the destination's.
    DropFlag,
    DropValue,
    Value(Check),
    Refuse(&'static str),
    Unknown,
}

fn rule(opt: &str) -> Rule {
    match opt {
        "-nodefaults" | "-enable-kvm" | "-no-user-config" | "-no-reboot" | "-no-shutdown" | "-usb" | "-mem-prealloc" | "-no-hpet" => Rule::Keep,
        // -nographic puts the serial port and monitor on stdio, which a background QEMU has not.
        "-nographic" => Rule::Replace(&["-display", "none"]),
        "-S" | "-daemonize" => Rule::DropFlag,
        "-qmp" | "-qmp-pretty" | "-monitor" | "-mon" | "-pidfile" | "-incoming" | "-sandbox" | "-runas" => Rule::DropValue,
        "-name" => Rule::Value(name),
        "-machine" | "-M" => Rule::Value(machine),
        "-cpu" => Rule::Value(cpu),
        "-m" => Rule::Value(memory),
        "-smp" => Rule::Value(smp),
        "-accel" => Rule::Value(accel),
        "-blockdev" => Rule::Value(blockdev),
        "-drive" => Rule::Value(drive),
        "-device" => Rule::Value(device),
        "-object" => Rule::Value(object),
        "-netdev" => Rule::Value(netdev),
        "-chardev" => Rule::Value(chardev),
        "-global" => Rule::Value(global),
        "-boot" => Rule::Value(boot),
        "-rtc" => Rule::Value(rtc),
        "-uuid" => Rule::Value(uuid),
        "-vga" => Rule::Value(vga),
        "-display" => Rule::Value(display),
        "-serial" | "-parallel" => Rule::Value(serial),
        "-nic" | "-net" => Rule::Value(nic),
        "-numa" => Rule::Value(numa),
        "-smbios" => Rule::Value(smbios),
        "-overcommit" => Rule::Value(overcommit),
        "-msg" => Rule::Value(msg),
        "-k" => Rule::Value(keymap),
        "-mem-path" => Rule::Value(top_mem_path),
        "-kernel" | "-initrd" | "-bios" | "-dtb" => Rule::Value(shared_file),
        "-append" => Rule::Value(append),
        "-chroot" | "-run-with" => Rule::Refuse("the destination decides QEMU's confinement itself (qemu.run_as, qemu.sandbox)"),
        "-plugin" => Rule::Refuse("loads a shared object into QEMU"),
        "-add-fd" => Rule::Refuse("passes file descriptors of the host"),
        "-readconfig" => Rule::Refuse("reads further options from a host file"),
        "-writeconfig" => Rule::Refuse("writes a host file"),
        "-loadvm" => Rule::Refuse("loads a snapshot instead of the migration"),
        "-L" => Rule::Refuse("sets the firmware search directory"),
        "-fsdev" | "-virtfs" => Rule::Refuse("shares a host directory with the guest"),
        "-D" | "-trace" => Rule::Refuse("writes a host file"),
        "-snapshot" => Rule::Refuse("writes disk changes to temporary host files"),
        "-hda" | "-hdb" | "-hdc" | "-hdd" | "-cdrom" | "-fda" | "-fdb" | "-mtdblock" | "-sd" | "-pflash" => {
            Rule::Refuse("a disk given as a bare file; use -blockdev or -drive")
        }
        "-option-rom" => Rule::Refuse("loads a host file as an option ROM"),
        "-gdb" | "-s" | "-vnc" | "-spice" => Rule::Refuse("opens a listening port on the destination"),
        _ => Rule::Unknown,
    }
}

/// What a key of an option may hold.
#[derive(Clone, Copy)]
enum Kind {
    /// Any printable text that is not a path.
    Text,
    /// A QEMU identifier (a reference to another node, device or object).
    Id,
    /// A file the guest opens (see [`Ctx::file`]).
    File,
    /// File-backed RAM, moved to the image directory.
    MemPath,
    OneOf(&'static [&'static str]),
}

/// Keys allowed for one option or driver.
type Keys = &'static [(&'static str, Kind)];

use Kind::{File, Id, MemPath, OneOf, Text};

const CACHE: [(&str, Kind); 2] = [("cache.direct", Text), ("cache.no-flush", Text)];

fn check_value(ctx: &mut Ctx, opt: &str, key: &str, kind: Kind, value: &str) -> Result<String, Refusal> {
    let bad = |why: String| Refusal::option(opt, format!("{key}={:?}: {why}", super::shorten(value)));
    match kind {
        Kind::Text if value.starts_with('/') => Err(bad("a path is not allowed here".into())),
        Kind::Text if value.chars().any(char::is_control) => Err(bad("control characters".into())),
        Kind::Text => Ok(value.to_string()),
        Kind::Id if cookie::is_identifier(value) => Ok(value.to_string()),
        Kind::Id => Err(bad("not a QEMU identifier".into())),
        Kind::OneOf(set) if set.contains(&value) => Ok(value.to_string()),
        Kind::OneOf(set) => Err(bad(format!("allowed: {}", set.join(", ")))),
        Kind::File => ctx.file(value).map_err(bad),
        Kind::MemPath => ctx.mem_path(value).map_err(bad),
    }
}

/// Checks `value` as `key=value,...` against `keys`; a bare first part is the `implied` key.
fn keyed(ctx: &mut Ctx, opt: &str, value: &str, implied: Option<&str>, keys: &[(&str, Kind)]) -> Result<String, Refusal> {
    let mut parts = opts::parse(value);
    for (n, p) in parts.iter_mut().enumerate() {
        let key = match (&p.key, n, implied) {
            (Some(k), _, _) => k.clone(),
            (None, 0, Some(k)) => {
                p.key = Some(k.to_string());
                k.to_string()
            }
            // `key` alone is QemuOpts' `key=on`.
            (None, _, _) => {
                let k = std::mem::replace(&mut p.value, "on".into());
                p.key = Some(k.clone());
                k
            }
        };
        let Some(&(_, kind)) = keys.iter().find(|(k, _)| *k == key) else {
            let allowed = keys.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ");
            return Err(Refusal::option(opt, format!("key {:?} is not allowed (allowed: {allowed})", super::shorten(&key))));
        };
        p.value = check_value(ctx, opt, &key, kind, &p.value)?;
    }
    Ok(opts::render(&parts))
}

/// For options whose keys depend on a driver: finds it (`driver_key`, or the bare first part),
/// names the refusal after it, and checks the rest against its keys.
fn with_driver(
    ctx: &mut Ctx,
    opt: &str,
    value: &str,
    driver_key: &str,
    drivers: &[(&str, Keys)],
    refused: &[(&str, &str)],
) -> Result<String, Refusal> {
    if value.trim_start().starts_with('{') {
        return Err(Refusal::option(opt, "the JSON form is not supported; use key=value"));
    }
    let parts = opts::parse(value);
    let driver = parts
        .iter()
        .enumerate()
        .find_map(|(n, p)| match &p.key {
            Some(k) if k == driver_key => Some(p.value.clone()),
            None if n == 0 => Some(p.value.clone()),
            _ => None,
        })
        .ok_or_else(|| Refusal::option(opt, format!("no {driver_key}")))?;
    let named = format!("{opt} {}", super::shorten(&driver));
    if let Some((_, why)) = refused.iter().find(|(prefix, _)| driver.starts_with(prefix)) {
        return Err(Refusal::option(&named, *why));
    }
    let Some((_, keys)) = drivers.iter().find(|(d, _)| *d == driver) else {
        let allowed = drivers.iter().map(|(d, _)| *d).collect::<Vec<_>>().join(", ");
        return Err(Refusal::option(&named, format!("{driver_key} {driver:?} is not allowed (allowed: {allowed})")));
    };
    let mut all: Vec<(&str, Kind)> = vec![(driver_key, Text)];
    all.extend_from_slice(keys);
    keyed(ctx, &named, value, Some(driver_key), &all)
}

fn name(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, Some("guest"), &[("guest", Text), ("process", Text), ("debug-threads", Text)])
}

fn machine(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    const ONOFF: Kind = Text;
    keyed(ctx, opt, v, Some("type"), &[
        ("type", Text), ("accel", OneOf(&["kvm", "tcg", "kvm:tcg"])), ("memory-backend", Id), ("kernel-irqchip", Text),
        ("usb", ONOFF), ("dump-guest-core", ONOFF), ("mem-merge", ONOFF), ("smm", ONOFF), ("vmport", ONOFF), ("hpet", ONOFF),
        ("pit", ONOFF), ("graphics", ONOFF), ("suppress-vmdesc", ONOFF), ("i8042", ONOFF), ("sata", ONOFF), ("smbus", ONOFF),
        ("acpi", ONOFF), ("pic", ONOFF), ("max-ram-below-4g", Text), ("pflash0", Id), ("pflash1", Id),
    ])
}

fn cpu(_: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    // A model and +flag/-flag/key=value features: QEMU's own syntax, no paths.
    let ok = !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b'=' | b','));
    if ok { Ok(v.to_string()) } else { Err(Refusal::option(opt, format!("{:?}: a CPU model and features only", super::shorten(v)))) }
}

fn memory(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, Some("size"), &[("size", Text), ("slots", Text), ("maxmem", Text)])
}

fn smp(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    let keys = [("cpus", Text), ("sockets", Text), ("dies", Text), ("clusters", Text), ("cores", Text), ("threads", Text), ("maxcpus", Text), ("books", Text), ("drawers", Text)];
    keyed(ctx, opt, v, Some("cpus"), &keys)
}

fn accel(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, Some("accel"), &[
        ("accel", OneOf(&["kvm", "tcg"])), ("thread", Text), ("tb-size", Text), ("kernel-irqchip", Text), ("dirty-ring-size", Text), ("split-wx", Text),
    ])
}

const BLOCKDEV_FILE: Keys = &[
    ("node-name", Id), ("filename", File), ("aio", Text), ("locking", Text), ("discard", Text), CACHE[0], CACHE[1],
    ("read-only", Text), ("auto-read-only", Text), ("detect-zeroes", Text), ("force-share", Text), ("aio-max-batch", Text),
];
const BLOCKDEV_RAW: Keys = &[
    ("node-name", Id), ("file", Id), ("read-only", Text), ("auto-read-only", Text), ("discard", Text), ("detect-zeroes", Text),
    CACHE[0], CACHE[1], ("offset", Text), ("size", Text), ("force-share", Text),
];
const BLOCKDEV_QCOW2: Keys = &[
    ("node-name", Id), ("file", Id), ("backing", Id), ("data-file", Id), ("read-only", Text), ("auto-read-only", Text),
    ("discard", Text), ("detect-zeroes", Text), CACHE[0], CACHE[1], ("lazy-refcounts", Text), ("cache-size", Text),
    ("l2-cache-size", Text), ("l2-cache-entry-size", Text), ("refcount-cache-size", Text), ("cache-clean-interval", Text),
    ("pass-discard-request", Text), ("pass-discard-snapshot", Text), ("pass-discard-other", Text), ("overlap-check", Text),
    ("force-share", Text),
];

fn blockdev(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    let drivers: &[(&str, Keys)] = &[("file", BLOCKDEV_FILE), ("host_device", BLOCKDEV_FILE), ("raw", BLOCKDEV_RAW), ("qcow2", BLOCKDEV_QCOW2)];
    with_driver(ctx, opt, v, "driver", drivers, &[])
}

fn drive(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    if opts::parse(v).first().is_some_and(|p| p.key.is_none()) {
        return Err(Refusal::option(opt, "a bare first value; write file=..."));
    }
    keyed(ctx, opt, v, None, &[
        ("file", File), ("format", OneOf(&["raw", "qcow2"])), ("if", OneOf(&["none", "virtio", "ide", "scsi", "pflash"])),
        ("id", Id), ("node-name", Id), ("cache", Text), ("aio", Text), ("discard", Text), ("detect-zeroes", Text),
        ("readonly", Text), ("read-only", Text), ("auto-read-only", Text), ("media", OneOf(&["disk", "cdrom"])), ("index", Text),
        ("bus", Text), ("unit", Text), ("werror", Text), ("rerror", Text), CACHE[0], CACHE[1], ("copy-on-read", Text),
    ])
}

/// Device properties that name no host resource (no `romfile`, no file, no host device).
const DEVICE_PROPS: Keys = &[
    ("id", Id), ("bus", Text), ("addr", Text), ("multifunction", Text), ("drive", Id), ("netdev", Id), ("chardev", Id),
    ("rng", Id), ("iothread", Id), ("serial", Text), ("bootindex", Text), ("mac", Text), ("num-queues", Text),
    ("queue-size", Text), ("disable-legacy", Text), ("disable-modern", Text), ("logical_block_size", Text),
    ("physical_block_size", Text), ("min_io_size", Text), ("opt_io_size", Text), ("write-cache", Text), ("discard", Text),
    ("discard_granularity", Text), ("scsi-id", Text), ("lun", Text), ("channel", Text), ("unit", Text), ("chassis", Text),
    ("slot", Text), ("port", Text), ("config-wce", Text), ("share-rw", Text), ("vectors", Text), ("mq", Text),
    ("event_idx", Text), ("indirect_desc", Text), ("ioeventfd", Text), ("werror", Text), ("rerror", Text), ("wwn", Text),
    ("ver", Text), ("model", Text), ("name", Text), ("max_ports", Text), ("iobase", Text), ("irq", Text), ("index", Text),
    ("deflate-on-oom", Text), ("free-page-reporting", Text), ("guest-stats-polling-interval", Text), ("rombar", Text),
    ("romfile", OneOf(&[""])), ("vgamem_mb", Text), ("x-pcie-lnksta-dllla", Text), ("ats", Text), ("packed", Text),
];

const DEVICES: &[&str] = &[
    "virtio-blk-pci", "virtio-scsi-pci", "scsi-hd", "scsi-cd", "ide-hd", "ide-cd", "virtio-net-pci", "e1000", "e1000e",
    "virtio-balloon-pci", "virtio-rng-pci", "virtio-serial-pci", "virtconsole", "virtserialport", "isa-serial", "qemu-xhci",
    "usb-tablet", "usb-kbd", "usb-mouse", "pcie-root-port", "pci-bridge", "VGA", "virtio-vga", "virtio-gpu-pci", "cirrus-vga",
    "i6300esb", "pvpanic", "virtio-keyboard-pci", "virtio-mouse-pci", "virtio-tablet-pci",
];

fn device(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    let drivers: Vec<(&str, Keys)> = DEVICES.iter().map(|d| (*d, DEVICE_PROPS)).collect();
    with_driver(ctx, opt, v, "driver", &drivers, &[
        ("vfio", "passes a host device to the guest (VFIO)"),
        ("vhost-user", "connects to a host socket"),
        ("vhost-", "opens host kernel devices"),
        ("usb-host", "passes a host USB device to the guest"),
        ("pci-assign", "passes a host device to the guest"),
    ])
}

const BACKEND_COMMON: [(&str, Kind); 7] =
    [("id", Id), ("size", Text), ("share", Text), ("prealloc", Text), ("merge", Text), ("dump", Text), ("policy", Text)];

fn object(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    const FILE: Keys = &[
        BACKEND_COMMON[0], BACKEND_COMMON[1], BACKEND_COMMON[2], BACKEND_COMMON[3], BACKEND_COMMON[4], BACKEND_COMMON[5],
        BACKEND_COMMON[6], ("host-nodes", Text), ("prealloc-threads", Text), ("reserve", Text), ("mem-path", MemPath),
        ("discard-data", Text), ("align", Text),
    ];
    const RAM: Keys = &[
        BACKEND_COMMON[0], BACKEND_COMMON[1], BACKEND_COMMON[2], BACKEND_COMMON[3], BACKEND_COMMON[4], BACKEND_COMMON[5],
        BACKEND_COMMON[6], ("host-nodes", Text), ("prealloc-threads", Text), ("reserve", Text), ("hugetlb", Text),
        ("hugetlbsize", Text), ("seal", Text),
    ];
    const RNG: Keys = &[("id", Id)];
    const IOTHREAD: Keys = &[("id", Id), ("poll-max-ns", Text), ("poll-grow", Text), ("poll-shrink", Text), ("aio-max-batch", Text)];
    with_driver(ctx, opt, v, "qom-type", &[
        ("memory-backend-file", FILE), ("memory-backend-ram", RAM), ("memory-backend-memfd", RAM), ("rng-builtin", RNG),
        ("iothread", IOTHREAD),
    ], &[])
}

fn netdev(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    const USER: Keys = &[
        ("id", Id), ("restrict", Text), ("net", Text), ("host", Text), ("dns", Text), ("ipv4", Text), ("ipv6", Text),
        ("hostname", Text), ("domainname", Text), ("dhcpstart", Text),
    ];
    with_driver(ctx, opt, v, "type", &[("user", USER)], &[
        ("tap", "uses host network devices and runs scripts; the destination attaches networks itself"),
        ("bridge", "uses host bridges and runs a helper"),
        ("vhost", "opens host kernel devices"),
        ("socket", "opens host sockets"),
        ("stream", "opens host sockets"),
        ("dgram", "opens host sockets"),
        ("l2tpv3", "opens host sockets"),
        ("vde", "connects to a host switch"),
    ])
}

fn chardev(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    const NULL: Keys = &[("id", Id)];
    const RINGBUF: Keys = &[("id", Id), ("size", Text)];
    let host = "opens host files, sockets, pipes or terminals; the destination's QEMU gets only null and ringbuf character devices";
    with_driver(ctx, opt, v, "backend", &[("null", NULL), ("ringbuf", RINGBUF), ("memory", RINGBUF)], &[
        ("file", host), ("socket", host), ("pipe", host), ("pty", host), ("serial", host), ("tty", host), ("parallel", host),
        ("udp", host), ("stdio", host), ("vc", host), ("spice", host), ("mux", host),
    ])
}

fn global(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    // `driver.property=value`, or `driver=D,property=P,value=V`.
    let parts = opts::parse(v);
    let (prop, value) = match parts.as_slice() {
        [Part { key: Some(k), value }] => match k.split_once('.') {
            Some((_, p)) => (p.to_string(), value.clone()),
            None => return Err(Refusal::option(opt, "write driver.property=value")),
        },
        _ => {
            let get = |name: &str| parts.iter().find(|p| p.key.as_deref() == Some(name)).map(|p| p.value.clone());
            match (get("driver"), get("property"), get("value")) {
                (Some(_), Some(p), Some(v)) if parts.len() == 3 => (p, v),
                _ => return Err(Refusal::option(opt, "write driver.property=value")),
            }
        }
    };
    let extra: Keys = &[("disable_s3", Text), ("disable_s4", Text), ("lost_tick_policy", Text), ("x-vga-vram-size", Text)];
    let Some(&(_, kind)) = DEVICE_PROPS.iter().chain(extra.iter()).find(|(k, _)| *k == prop) else {
        return Err(Refusal::option(opt, format!("property {:?} is not allowed", super::shorten(&prop))));
    };
    check_value(ctx, opt, &prop, kind, &value)?;
    Ok(v.to_string())
}

fn boot(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, Some("order"), &[("order", Text), ("once", Text), ("menu", Text), ("strict", Text), ("reboot-timeout", Text), ("splash-time", Text)])
}

fn rtc(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, None, &[("base", Text), ("clock", Text), ("driftfix", Text)])
}

fn uuid(_: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    let ok = v.len() == 36 && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if ok { Ok(v.to_string()) } else { Err(Refusal::option(opt, format!("{:?} is not a UUID", super::shorten(v)))) }
}

fn one_of(opt: &str, v: &str, set: &[&str]) -> Result<String, Refusal> {
    if set.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(Refusal::option(opt, format!("{:?}: allowed: {}", super::shorten(v), set.join(", "))))
    }
}

fn vga(_: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    one_of(opt, v, &["none", "std", "virtio", "cirrus"])
}

fn display(_: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    one_of(opt, v, &["none"])
}

fn nic(_: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    one_of(opt, v, &["none"])
}

fn serial(_: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    if v == "none" || v == "null" || v.strip_prefix("chardev:").is_some_and(cookie::is_identifier) {
        Ok(v.to_string())
    } else {
        Err(Refusal::option(opt, format!("{:?}: only none, null or chardev:ID (a host file, pipe or socket is not allowed)", super::shorten(v))))
    }
}

fn numa(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, Some("type"), &[
        ("type", OneOf(&["node", "dist", "cpu"])), ("nodeid", Text), ("cpus", Text), ("memdev", Id), ("src", Text), ("dst", Text),
        ("val", Text), ("node-id", Text), ("socket-id", Text), ("die-id", Text), ("core-id", Text), ("thread-id", Text),
    ])
}

fn smbios(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, None, &[
        ("type", Text), ("manufacturer", Text), ("product", Text), ("version", Text), ("serial", Text), ("uuid", Text),
        ("sku", Text), ("family", Text), ("vendor", Text), ("date", Text), ("release", Text), ("asset", Text),
    ])
}

fn overcommit(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, None, &[("mem-lock", Text), ("cpu-pm", Text)])
}

fn msg(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    keyed(ctx, opt, v, None, &[("timestamp", Text), ("guest-name", Text)])
}

fn keymap(_: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    let ok = !v.is_empty() && v.len() <= 16 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok { Ok(v.to_string()) } else { Err(Refusal::option(opt, "not a keyboard layout name")) }
}

fn top_mem_path(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    ctx.mem_path(v).map_err(|why| Refusal::option(opt, why))
}

fn shared_file(ctx: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    on_shared_storage(ctx.policy, v).map(|_| v.to_string()).map_err(|why| Refusal::option(opt, why))
}

fn append(_: &mut Ctx, opt: &str, v: &str) -> Result<String, Refusal> {
    if v.chars().any(char::is_control) {
        return Err(Refusal::option(opt, "control characters"));
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{DiskSpec, MigrationParams};

    struct Site {
        _tmp: tempfile::TempDir,
        src: PathBuf,
        shared: PathBuf,
        layout: Layout,
        policy: Policy,
    }

    fn site() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let (src, shared, images) = (root.join("src"), root.join("shared"), root.join("run/m-0123456789abcdef/images"));
        for d in [&src, &shared, &images] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(shared.join("base.qcow2"), b"").unwrap();
        let run = images.parent().unwrap();
        let layout = Layout { image_dir: images.clone(), qmp: run.join("qmp.sock"), pidfile: run.join("qemu.pid") };
        let policy = Policy { emulator: "/usr/bin/qemu-system-x86_64".into(), shared_storage: vec![shared.clone()], ..Policy::default() };
        Site { _tmp: tmp, src, shared, layout, policy }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| a.to_string()).collect()
    }

    /// The guest tests/vm/mod.rs and `migtun demo` start: file-backed RAM, a raw and a qcow2
    /// disk on -blockdev, two QMP monitors.
    fn test_guest(site: &Site) -> Cookie {
        let f = |n: &str| site.src.join(n).display().to_string();
        let cmdline = s(&[
            "qemu-system-x86_64", "-name", "guest=testvm", "-machine", "pc,memory-backend=ram0", "-accel", "kvm", "-m", "256M",
            "-nodefaults", "-display", "none", "-object",
            &format!("memory-backend-file,id=ram0,size=256M,mem-path={},share=on", f("ram-src")),
            "-blockdev", &format!("driver=file,filename={},node-name=f0", f("disk0.raw")),
            "-blockdev", "driver=raw,file=f0,node-name=d0", "-device", "virtio-blk-pci,drive=d0,id=vd0",
            "-blockdev", &format!("driver=file,filename={},node-name=f1", f("disk1.qcow2")),
            "-blockdev", "driver=qcow2,file=f1,node-name=d1", "-device", "virtio-blk-pci,drive=d1,id=vd1",
            "-qmp", &format!("unix:{},server=on,wait=off", f("src.qmp")), "-qmp", &format!("unix:{},server=on,wait=off", f("mon.qmp")),
            "-S",
        ]);
        let disk = |dev: &str, node: &str, file: &str, format: &str| DiskSpec {
            device: dev.into(),
            node_name: node.into(),
            size: 64 << 20,
            format: format.into(),
            source_file: f(file),
            copy: true,
        };
        Cookie {
            migration: "m-0123456789abcdef".into(),
            vm: "testvm".into(),
            source: "host-a".into(),
            cmdline,
            disks: vec![disk("vd0", "d0", "disk0.raw", "raw"), disk("vd1", "d1", "disk1.qcow2", "qcow2")],
            params: MigrationParams::default(),
            image_dir: String::new(),
            running: false,
        }
    }

    fn build_ok(site: &Site, c: &Cookie) -> Plan {
        super::super::cookie::validate(c, &site.policy).unwrap();
        build(c, &site.policy, &site.layout).unwrap_or_else(|e| panic!("{e}"))
    }

    fn refusal(site: &Site, c: &Cookie) -> String {
        build(c, &site.policy, &site.layout).expect_err("must be refused").to_string()
    }

    /// `extra` appended to the ordinary guest's command line.
    fn with(site: &Site, extra: &[&str]) -> Cookie {
        let mut c = test_guest(site);
        c.cmdline.extend(s(extra));
        c
    }

    #[test]
    fn the_test_guest_becomes_the_expected_destination_command_line() {
        let site = site();
        let plan = build_ok(&site, &test_guest(&site));
        let img = |n: &str| site.layout.image_dir.join(n).display().to_string();
        let run = site.layout.image_dir.parent().unwrap();
        let want = s(&[
            "/usr/bin/qemu-system-x86_64", "-name", "guest=testvm", "-machine", "type=pc,memory-backend=ram0", "-accel", "accel=kvm",
            "-m", "size=256M", "-nodefaults", "-display", "none", "-object",
            &format!("qom-type=memory-backend-file,id=ram0,size=256M,mem-path={},share=on", img("ram-src")),
            "-blockdev", &format!("driver=file,filename={},node-name=f0", img("disk0.raw")),
            "-blockdev", "driver=raw,file=f0,node-name=d0", "-device", "driver=virtio-blk-pci,drive=d0,id=vd0",
            "-blockdev", &format!("driver=file,filename={},node-name=f1", img("disk1.qcow2")),
            "-blockdev", "driver=qcow2,file=f1,node-name=d1", "-device", "driver=virtio-blk-pci,drive=d1,id=vd1",
            "-S", "-qmp", &format!("unix:{},server=on,wait=off", run.join("qmp.sock").display()), "-incoming", "defer",
            "-pidfile", &run.join("qemu.pid").display().to_string(),
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        assert_eq!(plan.argv, want);
        assert_eq!(plan.images.len(), 2);
        assert_eq!(plan.images[0].path, site.layout.image_dir.join("disk0.raw"));
        assert_eq!((plan.images[1].node_name.as_str(), plan.images[1].format.as_str()), ("d1", "qcow2"));
    }

    #[test]
    fn the_emulator_is_the_configured_one_and_run_as_adds_runas() {
        let site = site();
        let mut c = test_guest(&site);
        c.cmdline[0] = "/opt/evil/qemu-system-x86_64".into();
        let policy = Policy { run_as: Some("qemu".into()), emulator: "/usr/local/bin/qemu-system-x86_64".into(), ..site.policy.clone() };
        let plan = build(&c, &policy, &site.layout).unwrap();
        assert_eq!(plan.argv[0], "/usr/local/bin/qemu-system-x86_64");
        assert!(plan.argv.ends_with(&s(&["-sandbox", &sandbox_arg(true), "-runas", "qemu"])), "{:?}", plan.argv);
        let policy = Policy { sandbox: false, ..site.policy.clone() };
        assert!(!build(&c, &policy, &site.layout).unwrap().argv.contains(&"-sandbox".to_string()));
    }

    #[test]
    fn a_shell_as_cmdline0_is_refused() {
        let site = site();
        let mut c = test_guest(&site);
        c.cmdline = s(&["/bin/sh", "-c", "touch /tmp/pwned"]);
        let e = refusal(&site, &c);
        assert!(e.contains("cmdline[0]") && e.contains("/bin/sh"), "{e}");
        c.cmdline = s(&["qemu-system-x86_64", "-c", "x"]);
        assert!(refusal(&site, &c).contains("QEMU option -c"), "unknown options are refused");
    }

    #[test]
    fn every_forbidden_option_is_refused_by_name() {
        let site = site();
        let cases: &[(&[&str], &str)] = &[
            (&["-drive", "file=/etc/shadow,format=raw,if=virtio"], "-drive"),
            (&["-chardev", "file,id=c0,path=/etc/cron.d/x"], "-chardev file"),
            (&["-chardev", "socket,id=c0,path=/run/x.sock,server=on"], "-chardev socket"),
            (&["-chardev", "pipe,id=c0,path=/tmp/p"], "-chardev pipe"),
            (&["-netdev", "tap,id=n0,script=/tmp/evil.sh"], "-netdev tap"),
            (&["-netdev", "bridge,id=n0,br=br0"], "-netdev bridge"),
            (&["-netdev", "user,id=n0,hostfwd=tcp::2222-:22"], "-netdev user"),
            (&["-plugin", "/tmp/evil.so"], "-plugin"),
            (&["-add-fd", "fd=3,set=1"], "-add-fd"),
            (&["-readconfig", "/tmp/x.cfg"], "-readconfig"),
            (&["-writeconfig", "/etc/passwd"], "-writeconfig"),
            (&["-loadvm", "snap"], "-loadvm"),
            (&["-run-with", "user=root"], "-run-with"),
            (&["-chroot", "/"], "-chroot"),
            (&["-L", "/tmp"], "-L"),
            (&["-bios", "/tmp/evil.bin"], "-bios"),
            (&["-kernel", "/tmp/vmlinuz"], "-kernel"),
            (&["-initrd", "/tmp/initrd"], "-initrd"),
            (&["-fsdev", "local,id=f,path=/,security_model=none"], "-fsdev"),
            (&["-virtfs", "local,path=/,mount_tag=r,security_model=none"], "-virtfs"),
            (&["-device", "vfio-pci,host=01:00.0"], "-device vfio-pci"),
            (&["-device", "virtio-net-pci,romfile=/etc/shadow"], "-device virtio-net-pci"),
            (&["-serial", "file:/etc/motd"], "-serial"),
            (&["-serial", "pipe:/tmp/p"], "-serial"),
            (&["-object", "memory-backend-file,id=m1,size=1M,mem-path=/etc/../etc/x/.."], "-object memory-backend-file"),
            (&["-object", "secret,id=s0,file=/etc/shadow"], "-object secret"),
            (&["-mem-path", "/"], "-mem-path"),
            (&["-D", "/tmp/log"], "-D"),
            (&["-global", "virtio-net-pci.romfile=/etc/shadow"], "-global"),
            (&["-blockdev", "{\"driver\":\"file\",\"filename\":\"/etc/shadow\"}"], "-blockdev"),
            (&["-blockdev", "driver=nbd,server.type=inet,server.host=evil,node-name=x"], "-blockdev nbd"),
            (&["-vnc", ":0"], "-vnc"),
            (&["/etc/shadow"], "/etc/shadow"),
            (&["-no-such-option"], "-no-such-option"),
        ];
        for (extra, name) in cases {
            let e = refusal(&site, &with(&site, extra));
            assert!(e.contains(&format!("QEMU option {name}")), "{extra:?}: {e}");
        }
    }

    #[test]
    fn the_destination_plumbing_of_the_source_is_replaced_not_passed() {
        let site = site();
        let c = with(&site, &["-daemonize", "-pidfile", "/etc/passwd", "-incoming", "tcp:0:1", "-monitor", "unix:/etc/x,server=on",
            "-sandbox", "off", "-runas", "root"]);
        let plan = build_ok(&site, &c);
        for bad in ["-daemonize", "/etc/passwd", "tcp:0:1", "unix:/etc/x,server=on", "off", "root"] {
            assert!(!plan.argv.contains(&bad.to_string()), "{bad} passed through: {:?}", plan.argv);
        }
        assert_eq!(plan.argv.iter().filter(|a| *a == "-qmp").count(), 1, "only the destination's QMP");
    }

    #[test]
    fn shared_disks_must_be_on_shared_storage() {
        let site = site();
        let mut c = test_guest(&site);
        c.disks[1].copy = false;
        let e = refusal(&site, &c);
        assert!(e.contains("disk d1") && e.contains("qemu.shared_storage"), "{e}");
        let policy = Policy { shared_storage: vec![], ..site.policy.clone() };
        let e = build(&c, &policy, &site.layout).unwrap_err().to_string();
        assert!(e.contains("qemu.shared_storage is not set"), "{e}");
        // On shared storage: the destination opens the same file.
        let shared = site.shared.join("disk1.qcow2");
        std::fs::write(&shared, b"").unwrap();
        let old = c.disks[1].source_file.clone();
        c.disks[1].source_file = shared.display().to_string();
        for a in &mut c.cmdline {
            *a = a.replace(&old, &c.disks[1].source_file);
        }
        let plan = build_ok(&site, &c);
        assert!(plan.argv.iter().any(|a| a.contains(&format!("filename={}", shared.display()))));
        assert_eq!(plan.images.len(), 1);
        // A symlink from shared storage to elsewhere does not count.
        std::os::unix::fs::symlink("/etc/shadow", site.shared.join("link")).unwrap();
        let e = refusal(&site, &with(&site, &["-blockdev", &format!("driver=file,filename={},node-name=x0", site.shared.join("link").display())]));
        assert!(e.contains("not under qemu.shared_storage"), "{e}");
        // A backing file on shared storage is fine.
        build_ok(&site, &with(&site, &["-blockdev", &format!("driver=file,filename={},node-name=b0,read-only=on", site.shared.join("base.qcow2").display())]));
    }

    #[test]
    fn a_copied_disk_must_be_on_the_command_line() {
        let site = site();
        let mut c = test_guest(&site);
        // The command line opens a shared file; the cookie says another file is copied.
        let shared = site.shared.join("disk0.raw").display().to_string();
        std::fs::write(&shared, b"").unwrap();
        let src = c.disks[0].source_file.clone();
        c.cmdline = c.cmdline.iter().map(|a| a.replace(&src, &shared)).collect();
        let e = refusal(&site, &c);
        assert!(e.contains("disk d0") && e.contains("does not appear"), "{e}");
    }

    #[test]
    fn image_names_never_collide() {
        let site = site();
        let mut c = test_guest(&site);
        // Same file name in another directory: a second name, never one image.
        let other = "/other/disk0.raw";
        c.cmdline = c.cmdline.iter().map(|a| a.replace(&site.src.join("disk1.qcow2").display().to_string(), other)).collect();
        c.disks[1].source_file = other.into();
        let plan = build_ok(&site, &c);
        assert_eq!(plan.images[1].path, site.layout.image_dir.join("d1-disk0.raw"));
        // mem-path named like a disk image: refused.
        let mut c = test_guest(&site);
        c.cmdline = c.cmdline.iter().map(|a| a.replace("ram-src", "disk0.raw")).collect();
        assert!(refusal(&site, &c).contains("would have this name"));
    }

    #[test]
    fn commas_cannot_smuggle_keys() {
        let site = site();
        // `,,` is a literal comma: this is one value of `guest`, and is written back escaped.
        let plan = build_ok(&site, &with(&site, &["-name", "guest=a,,readconfig=/x"]));
        assert!(plan.argv.contains(&"guest=a,,readconfig=/x".to_string()));
        let e = refusal(&site, &with(&site, &["-name", "guest=a,readconfig=/x"]));
        assert!(e.contains("readconfig"), "{e}");
    }

    #[test]
    fn ordinary_extras_pass() {
        let site = site();
        build_ok(&site, &with(&site, &[
            "-cpu", "host,+vmx", "-smp", "2,sockets=1,cores=2", "-enable-kvm", "-nographic", "-vga", "none", "-uuid",
            "6f1c8b8a-1d2e-4f3a-9b7c-0a1b2c3d4e5f", "-boot", "order=c", "-rtc", "base=utc", "-global", "kvm-pit.lost_tick_policy=delay",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56", "-chardev", "null,id=c0",
            "-serial", "chardev:c0", "-object", "rng-builtin,id=rng0", "-device", "virtio-rng-pci,rng=rng0",
        ]));
    }
}
