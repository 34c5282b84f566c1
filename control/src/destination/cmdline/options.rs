//! The allow-list itself: what each QEMU option of the source's command line becomes
//! ([`rule`]: kept, replaced, dropped, checked or refused), and the check of each option that
//! takes a value, with the keys each of its drivers may have.

use super::keys::{check_value, keyed, with_driver, File, Id, Keys, Kind, MemPath, OneOf, Text};
use super::opts::{self, Part};
use super::{cookie, on_shared_storage, shorten, Ctx, Refusal};

pub(super) type Check = fn(&mut Ctx, &str, &str) -> Result<String, Refusal>;

pub(super) enum Rule {
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

pub(super) fn rule(opt: &str) -> Rule {
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

const CACHE: [(&str, Kind); 2] = [("cache.direct", Text), ("cache.no-flush", Text)];

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
    if ok { Ok(v.to_string()) } else { Err(Refusal::option(opt, format!("{:?}: a CPU model and features only", shorten(v)))) }
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
        return Err(Refusal::option(opt, format!("property {:?} is not allowed", shorten(&prop))));
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
    if ok { Ok(v.to_string()) } else { Err(Refusal::option(opt, format!("{:?} is not a UUID", shorten(v)))) }
}

fn one_of(opt: &str, v: &str, set: &[&str]) -> Result<String, Refusal> {
    if set.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(Refusal::option(opt, format!("{:?}: allowed: {}", shorten(v), set.join(", "))))
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
        Err(Refusal::option(opt, format!("{:?}: only none, null or chardev:ID (a host file, pipe or socket is not allowed)", shorten(v))))
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

