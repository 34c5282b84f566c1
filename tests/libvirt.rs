//! Real libvirt in front of two real `migtun serve` agents: README's "In front of libvirt",
//! run as written. Two libvirt daemons (Debian 12's `libvirt-daemon-system`, libvirt 9.0) are
//! two hosts on this machine, each in its own mount namespace with a private `/etc/libvirt`,
//! `/run/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt`, `/var/cache/libvirt` and
//! `/run/migtun`, a distinct `host_uuid`, and its migtun agent inside. `virsh migrate --live
//! --copy-storage-all` moves a running domain between them with the RAM, NBD and libvirt RPC
//! streams all through the agents: plain and `--p2p --parallel` over static routes, there and
//! back, and three migrations to one host at once through tunnels on demand. QEMU runs as
//! `libvirt-qemu` (Debian's default); the agents hand it the sockets with `owner`/`group`.
//!
//! After each migration: the domain runs on the destination and on no other host (its QEMU is
//! the only one), its disk there is byte-identical to the source's, and the destination agent's
//! `/metrics` counted the disk's bytes on the route that carried them.
//!
//! Without systemd as init, `security_driver = "none"`, `cgroup_controllers = [ ]` and
//! `stdio_handler = "file"` are what libvirtd needs. Without udev, `/dev/kvm` is root's alone
//! (0600), so each namespace gets the node Debian's udev rule would make, `root:kvm 0660`, bound
//! over it: libvirt checks KVM as `libvirt-qemu`, and without that node it re-probes QEMU on
//! every call (40 s to define a domain). Without `/dev/kvm` the guests run under TCG; they only
//! have to run, not boot.

mod vm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vm::MIGTUN;

/// Size of each guest's disk: big enough that the NBD bytes stand out in the metrics.
const DISK_MIB: u64 = 32;
/// Longest a `virsh` call may take before the test fails instead of hanging CI.
const VIRSH_TIMEOUT_SECS: u32 = 240;

/// The tools this test drives; under CI their absence fails it, elsewhere it is skipped loudly.
fn requirements() -> bool {
    let on_path = |b: &str| {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().any(|d| Path::new(d).join(b).exists())
    };
    let mut missing: Vec<&str> =
        ["libvirtd", "virsh", "qemu-system-x86_64", "unshare", "nsenter", "timeout"].into_iter().filter(|b| !on_path(b)).collect();
    if users::uid("libvirt-qemu").is_none() {
        missing.push("user libvirt-qemu");
    }
    // SAFETY: geteuid(2) reads the caller's effective uid; it cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (mount namespaces, libvirtd)");
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("tests/libvirt.rs needs {missing:?}, and CI=true: .ci/run must install libvirt-daemon-system and qemu-system-x86");
    }
    eprintln!("SKIPPED: tests/libvirt.rs needs {missing:?}: apt-get install libvirt-daemon-system libvirt-clients qemu-system-x86, as root");
    false
}

mod users {
    /// The uid of user `name`, from /etc/passwd.
    pub fn uid(name: &str) -> Option<u32> {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
        })
    }
}

/// One "host": a mount namespace held open by a `sleep`, its libvirtd and its migtun agent.
struct Host {
    name: &'static str,
    /// What the namespace sees as /etc/libvirt, /run/libvirt, ... lives under here.
    root: PathBuf,
    holder: Child,
    daemons: Vec<Child>,
    metrics: std::net::SocketAddr,
}

impl Host {
    /// Creates the host's private directories and enters them in a new mount namespace.
    fn new(dir: &Path, name: &'static str, uuid: &str) -> Host {
        let root = dir.join(name);
        for d in ["etc", "run", "lib", "log", "cache", "migtun"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        vm::run(Command::new("cp").arg("-a").arg("/etc/libvirt/.").arg(root.join("etc")));
        vm::run(Command::new("cp").arg("-a").arg("/var/lib/libvirt/.").arg(root.join("lib")));
        // The default network's autostart would make both daemons fight over one bridge.
        let _ = std::fs::remove_dir_all(root.join("etc/qemu/networks/autostart"));
        append(&root.join("etc/qemu.conf"), "security_driver = \"none\"\ncgroup_controllers = [ ]\nstdio_handler = \"file\"\n");
        append(&root.join("etc/libvirtd.conf"), &format!("host_uuid = \"{uuid}\"\n"));
        let r = root.display();
        let kvm = match std::fs::metadata("/dev/kvm") {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
                vm::run(Command::new("mknod").arg(root.join("kvm")).args(["c", &major.to_string(), &minor.to_string()]));
                vm::run(Command::new("chown").arg("root:kvm").arg(root.join("kvm")));
                vm::run(Command::new("chmod").arg("0660").arg(root.join("kvm")));
                format!("mount --bind {r}/kvm /dev/kvm")
            }
            Err(_) => "true".to_string(),
        };
        let script = format!(
            "set -e; mkdir -p /run/libvirt /var/log/libvirt /var/cache/libvirt /run/migtun; {kvm}
             mount --bind {r}/etc /etc/libvirt; mount --bind {r}/run /run/libvirt
             mount --bind {r}/lib /var/lib/libvirt; mount --bind {r}/log /var/log/libvirt
             mount --bind {r}/cache /var/cache/libvirt; mount --bind {r}/migtun /run/migtun
             touch {r}/ready; exec sleep infinity"
        );
        let holder = Command::new("unshare").args(["--mount", "--propagation", "private", "--", "sh", "-c", &script]).spawn().unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let host = Host { name, root, holder, daemons: Vec::new(), metrics };
        wait_for(&format!("{name}'s mount namespace"), || host.root.join("ready").exists(), || String::new());
        host
    }

    /// `program` run inside this host's mount namespace.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(self.holder.id().to_string()).args(["-m", "--", program]);
        c
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }

    /// libvirtd, with its pid file in the private /run/libvirt (the default, /run/libvirtd.pid,
    /// is shared and would stop the second daemon).
    fn start_libvirtd(&mut self) {
        let log = std::fs::File::create(self.path("libvirtd.log")).unwrap();
        let child = self.cmd("libvirtd").args(["--pid-file", "/run/libvirt/libvirtd.pid"]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.daemons.push(child);
        wait_for(&format!("{}'s libvirtd", self.name), || self.path("run/libvirt-sock").exists(), || self.logs());
        wait_for(&format!("{}'s libvirtd answering", self.name), || self.virsh(&["list"]).status.success(), || self.logs());
    }

    fn start_agent(&mut self, config: &str) {
        let path = self.path("migtun.toml");
        std::fs::write(&path, config).unwrap();
        let check = self.cmd(MIGTUN).args(["check", "--config"]).arg(&path).output().unwrap();
        assert!(check.status.success(), "{}: migtun check: {}", self.name, String::from_utf8_lossy(&check.stderr));
        let log = std::fs::File::create(self.path("migtun.log")).unwrap();
        let child = self.cmd(MIGTUN).args(["serve", "--config"]).arg(&path).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.daemons.push(child);
        wait_for(&format!("{}'s agent", self.name), || self.path("migtun/admin.sock").exists(), || self.logs());
    }

    /// `virsh -c qemu:///system ARGS` on this host, bounded by [`VIRSH_TIMEOUT_SECS`].
    fn virsh(&self, args: &[&str]) -> Output {
        self.cmd("timeout").arg(VIRSH_TIMEOUT_SECS.to_string()).args(["virsh", "-c", "qemu:///system"]).args(args).output().unwrap()
    }

    fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(out.status.success(), "{}: virsh {args:?}: {}\n{}", self.name, String::from_utf8_lossy(&out.stderr), self.logs());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `migtun tunnel ARGS` against this host's agent.
    fn tunnel(&self, args: &[&str]) -> String {
        let out = self.cmd(MIGTUN).arg("tunnel").arg(args[0]).args(["--admin", "/run/migtun/admin.sock"]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{}: migtun tunnel {args:?}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A guest `name` with a random raw disk, defined and started here; and an empty disk of
    /// the same size at the same path on `destination` (libvirt copies into an existing file
    /// for a disk outside any storage pool).
    fn start_guest(&self, name: &str, seed: u64, destination: &Host) {
        let image = format!("lib/images/{name}.img");
        vm::random_file(&self.path(&image), DISK_MIB << 20, seed);
        std::fs::File::create(destination.path(&image)).unwrap().set_len(DISK_MIB << 20).unwrap();
        let xml = format!(
            "<domain type='{}'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
               <os><type arch='x86_64' machine='pc'>hvm</type></os>
               <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
                 <disk type='file' device='disk'><driver name='qemu' type='raw'/>
                   <source file='/var/lib/libvirt/images/{name}.img'/><target dev='vda' bus='virtio'/></disk>
                 <video><model type='none'/></video><memballoon model='none'/>
               </devices></domain>",
            if vm::accel() == "kvm" { "kvm" } else { "qemu" }
        );
        let file = self.path(&format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        let started = Instant::now();
        self.virsh_ok(&["define", &file.display().to_string()]);
        self.virsh_ok(&["start", name]);
        eprintln!("{}: {name} defined and started in {:.1} s", self.name, started.elapsed().as_secs_f64());
    }

    /// The pid of the QEMU libvirt runs for domain `name` here, if it is alive.
    fn qemu_pid(&self, name: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.path(&format!("run/qemu/{name}.pid"))).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(&format!("guest={name},")).then_some(pid)
    }

    fn state(&self, name: &str) -> String {
        let out = self.virsh(&["domstate", name]);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        } else {
            "absent".to_string()
        }
    }

    /// Sum of the samples of `metric` with `labels` on this agent's `/metrics`.
    fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        vm::metric_at(self.metrics, metric, labels)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for f in ["libvirtd.log", "migtun.log"] {
            out += &format!("--- {} {f}\n{}\n", self.name, std::fs::read_to_string(self.path(f)).unwrap_or_default());
        }
        if let Ok(dir) = std::fs::read_dir(self.path("log/qemu")) {
            for e in dir.flatten() {
                out += &format!("--- {} {}\n{}\n", self.name, e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }
}

/// Whatever a test leaves (it may have panicked half-way): libvirt's QEMUs outlive libvirtd,
/// so every guest is destroyed, then any QEMU a pid file still names is killed, then the
/// daemons and the namespace's holder.
impl Drop for Host {
    fn drop(&mut self) {
        let started = Instant::now();
        if let Ok(out) = self.cmd("timeout").args(["30", "virsh", "-c", "qemu:///system", "list", "--name"]).output() {
            for name in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.cmd("timeout").args(["30", "virsh", "-c", "qemu:///system", "destroy", name.trim()]).output();
            }
        }
        if let Ok(dir) = std::fs::read_dir(self.path("run/qemu")) {
            for e in dir.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "pid")) {
                vm::kill_qemu_of_pidfile(&e.path());
            }
        }
        for c in self.daemons.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        eprintln!("{}: torn down in {:.1} s", self.name, started.elapsed().as_secs_f64());
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new().append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool, logs: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} did not come up within 60 s\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent config of `me` (README's recipe): the libvirt RPC route and, per direction, static
/// routes under `/run/migtun/to-<destination>/` (libvirt gives both QEMUs one path, so the
/// path names the destination and the two directions never meet), and tunnels on demand.
fn agent_config(pki: &Path, me: &Host, other: &Host, port: u16, other_port: u16) -> String {
    let (me_name, other_name, p) = (me.name, other.name, pki.display());
    let forward = |route: &str, sock: &str| {
        format!(
            "[[forward]]\nlisten = \"unix:/run/migtun/to-{other_name}/{sock}\"\npeer = \"{other_name}\"\nroute = \"{route}\"\nowner = \"libvirt-qemu\"\ngroup = \"kvm\"\nmode = \"0660\"\n\n"
        )
    };
    let expose = |route: &str, target: &str| format!("[[expose]]\nroute = \"{route}\"\ntarget = \"unix:{target}\"\nallow = [\"{other_name}\"]\n\n");
    format!(
        "name = \"{me_name}\"\nlisten = \"127.0.0.1:{port}\"\nadmin = \"/run/migtun/admin.sock\"\nmetrics = \"{metrics}\"\n\n\
         [tls]\ncert = \"{p}/{me_name}.pem\"\nkey = \"{p}/{me_name}.key\"\nca = \"{p}/ca.pem\"\n\n\
         [[peer]]\nname = \"{other_name}\"\naddress = \"127.0.0.1:{other_port}\"\n\n\
         [tunnels]\ndir = \"/run/migtun/tunnels\"\nallow = [\"{other_name}\"]\nowner = \"libvirt-qemu\"\ngroup = \"kvm\"\n\n\
         [[forward]]\nlisten = \"unix:/run/migtun/{other_name}-libvirt.sock\"\npeer = \"{other_name}\"\nroute = \"libvirt\"\nmode = \"0600\"\n\n\
         {}{}{}{}{}",
        forward("vm-ram", "vm.sock"),
        forward("vm-nbd", "vm-nbd.sock"),
        expose("vm-ram", &format!("/run/migtun/to-{me_name}/vm.sock")),
        expose("vm-nbd", &format!("/run/migtun/to-{me_name}/vm-nbd.sock")),
        expose("libvirt", "/run/libvirt/libvirt-sock"),
        metrics = me.metrics,
    )
}

/// host-a and host-b, each with libvirtd and an agent configured as README says.
fn two_hosts(dir: &Path) -> (Host, Host) {
    let pki = dir.join("pki");
    vm::run(Command::new(MIGTUN).args(["certs", "init", "--dir"]).arg(&pki));
    for h in ["host-a", "host-b"] {
        vm::run(Command::new(MIGTUN).args(["certs", "issue", "--dir"]).arg(&pki).args(["--name", h]));
    }
    let uuid = || uuid_v4();
    let mut a = Host::new(dir, "host-a", &uuid());
    let mut b = Host::new(dir, "host-b", &uuid());
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (pa, pb) = (port(), port());
    for (h, other) in [(&a, &b), (&b, &a)] {
        // The destination QEMU (libvirt-qemu) binds the static routes' sockets here; the source
        // side's directory holds the agent's forward sockets.
        std::fs::create_dir_all(h.path(&format!("migtun/to-{}", other.name))).unwrap();
        let mine = h.path(&format!("migtun/to-{}", h.name));
        std::fs::create_dir_all(&mine).unwrap();
        vm::run(Command::new("chown").arg("libvirt-qemu:kvm").arg(&mine));
        vm::run(Command::new("chmod").arg("0770").arg(&mine));
    }
    let (ca, cb) = (agent_config(&pki, &a, &b, pa, pb), agent_config(&pki, &b, &a, pb, pa));
    let started = Instant::now();
    a.start_libvirtd();
    b.start_libvirtd();
    a.start_agent(&ca);
    b.start_agent(&cb);
    eprintln!("two hosts: libvirtd and agent up on both in {:.1} s", started.elapsed().as_secs_f64());
    (a, b)
}

fn uuid_v4() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0xfff,
        u16::from_be_bytes([b[8], b[9]]) & 0xfff,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]]),
    )
}

/// `virsh migrate --live --copy-storage-all NAME` from `src` to `dst` through the agents, with
/// the libvirt RPC route and the given migration and NBD socket paths.
fn migrate(src: &Host, dst: &Host, name: &str, extra: &[&str], ram: &str, nbd: &str) -> Command {
    let mut c = src.cmd("timeout");
    c.arg(VIRSH_TIMEOUT_SECS.to_string()).args(["virsh", "-c", "qemu:///system", "migrate", "--live", "--copy-storage-all"]).args(extra).arg(name);
    c.arg(format!("qemu+unix:///system?socket=/run/migtun/{}-libvirt.sock", dst.name));
    c.arg("--migrateuri").arg(format!("unix://{ram}")).arg("--disks-uri").arg(format!("unix://{nbd}"));
    c
}

fn run_migration(mut cmd: Command, src: &Host, dst: &Host, what: &str) {
    let started = Instant::now();
    let out = cmd.output().unwrap();
    eprintln!("{what}: virsh migrate took {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "{what}: virsh migrate failed: {}\n{}{}",
        String::from_utf8_lossy(&out.stderr),
        src.logs(),
        dst.logs()
    );
}

/// What a user relies on after a migration of `name` from `src` to `dst`: it runs on `dst`
/// and not on `src` (exactly one QEMU, libvirt's, as libvirt-qemu), with the disk byte-identical.
fn assert_moved(src: &Host, dst: &Host, name: &str) {
    assert_eq!(dst.state(name), "running", "{name} is not running on {}\n{}", dst.name, dst.logs());
    let gone = src.state(name);
    assert!(gone == "shut off" || gone == "absent", "{name} is still {gone:?} on {}", src.name);
    assert_eq!(src.qemu_pid(name), None, "{name}'s QEMU still runs on {}", src.name);
    let pid = dst.qemu_pid(name).unwrap_or_else(|| panic!("no QEMU for {name} on {}", dst.name));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|u| u.split_whitespace().next()).and_then(|u| u.parse::<u32>().ok());
    assert_eq!(uid, users::uid("libvirt-qemu"), "{name}'s QEMU on {} does not run as libvirt-qemu", dst.name);
    let image = format!("lib/images/{name}.img");
    let (s, d) = (std::fs::read(src.path(&image)).unwrap(), std::fs::read(dst.path(&image)).unwrap());
    assert!(s == d, "{name}'s disk on {} differs from the source's", dst.name);
}

#[test]
fn static_routes_carry_plain_and_p2p_parallel_migrations_there_and_back() {
    if !requirements() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("mt-libvirt-").tempdir().unwrap();
    let (a, b) = two_hosts(dir.path());
    a.start_guest("vm1", 1, &b);

    // host-a → host-b: plain (virsh talks to both daemons; the destination one through the
    // libvirt route).
    let (ram, nbd) = ("/run/migtun/to-host-b/vm.sock", "/run/migtun/to-host-b/vm-nbd.sock");
    run_migration(migrate(&a, &b, "vm1", &[], ram, nbd), &a, &b, "plain a→b");
    assert_moved(&a, &b, "vm1");
    let disk = (DISK_MIB << 20) as f64;
    let nbd_bytes = b.metric("migtun_bytes_total", &[("route", "vm-nbd"), ("direction", "rx")]);
    assert!(nbd_bytes >= disk, "host-b counted {nbd_bytes} NBD bytes, less than the {disk}-byte disk");
    assert!(b.metric("migtun_bytes_total", &[("route", "vm-ram"), ("direction", "rx")]) > 0.0);
    assert!(b.metric("migtun_bytes_total", &[("route", "libvirt"), ("direction", "rx")]) > 0.0);

    // And back, host-b → host-a, peer to peer (host-b's libvirtd opens the libvirt route
    // itself) with four multifd channels, all on the migration route.
    let (ram, nbd) = ("/run/migtun/to-host-a/vm.sock", "/run/migtun/to-host-a/vm-nbd.sock");
    run_migration(migrate(&b, &a, "vm1", &["--p2p", "--parallel", "--parallel-connections", "4"], ram, nbd), &b, &a, "p2p parallel b→a");
    assert_moved(&b, &a, "vm1");
    let nbd_bytes = a.metric("migtun_bytes_total", &[("route", "vm-nbd"), ("direction", "rx")]);
    assert!(nbd_bytes >= disk, "host-a counted {nbd_bytes} NBD bytes, less than the {disk}-byte disk");
    let channels = a.metric("migtun_stream_opens_total", &[("route", "vm-ram")]);
    assert!(channels >= 5.0, "host-a saw {channels} streams on vm-ram: the main channel and 4 multifd channels should be 5");
}

#[test]
fn three_libvirt_migrations_to_one_host_at_once_each_through_its_own_tunnel() {
    if !requirements() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("mt-libvirt-").tempdir().unwrap();
    let (a, b) = two_hosts(dir.path());
    let guests = [("vm1", &[][..]), ("vm2", &["--p2p"][..]), ("vm3", &["--p2p", "--parallel", "--parallel-connections", "2"][..])];
    for (i, (name, _)) in guests.iter().enumerate() {
        a.start_guest(name, 10 + i as u64, &b);
    }
    // One tunnel per migration: `migtun tunnel open` prints the paths to hand to virsh.
    let mut running = Vec::new();
    for (name, extra) in guests {
        let opened = a.tunnel(&["open", "--to", "host-b", "--name", name, "--ttl", "10m"]);
        let path = |flag: &str| {
            opened.lines().find(|l| l.trim_end().ends_with(flag)).and_then(|l| l.split_whitespace().nth(1)).and_then(|u| u.strip_prefix("unix://")).map(str::to_string)
        };
        let (Some(ram), Some(nbd)) = (path("--migrateuri"), path("--disks-uri")) else { panic!("tunnel open printed no paths:\n{opened}") };
        assert_eq!(ram, format!("/run/migtun/tunnels/{name}/migration.sock"));
        let child = migrate(&a, &b, name, extra, &ram, &nbd).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        running.push((name, child));
    }
    for (name, child) in running {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}: virsh migrate failed: {}\n{}{}", String::from_utf8_lossy(&out.stderr), a.logs(), b.logs());
    }
    for (name, _) in guests {
        assert_moved(&a, &b, name);
    }
    let disks = 3.0 * (DISK_MIB << 20) as f64;
    let nbd_bytes = b.metric("migtun_bytes_total", &[("route", "tunnel.nbd"), ("direction", "rx")]);
    assert!(nbd_bytes >= disks, "host-b counted {nbd_bytes} NBD bytes through tunnels, less than the three disks ({disks})");
    assert!(b.metric("migtun_stream_opens_total", &[("route", "tunnel.migration")]) >= 5.0, "1 + 1 + (1 + 2 multifd) migration channels");

    // Closed, a tunnel leaves nothing behind on either host.
    for (name, _) in guests {
        a.tunnel(&["close", "--name", name]);
    }
    wait_for("tunnel directories to go", || guests.iter().all(|(n, _)| !a.path(&format!("migtun/tunnels/{n}")).exists() && !b.path(&format!("migtun/tunnels/{n}")).exists()), || a.logs() + &b.logs());
}
