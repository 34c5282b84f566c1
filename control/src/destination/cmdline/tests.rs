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
