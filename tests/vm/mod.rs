//! Harness for migration tests: two real `migtun serve` agents (admin sockets, run dirs, a
//! prepare hook) and real QEMU guests with random RAM and disks on tmpfs.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use migtun_control::qemu_command::{Accel, DiskFormat, QemuCommand};
use rand::{RngCore, SeedableRng};

pub const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");
pub const RAM_MIB: u64 = 256;

/// Finds QEMU; under CI its absence fails the test, elsewhere it is skipped loudly.
pub fn qemu() -> Option<PathBuf> {
    let found = ["qemu-system-x86_64"].iter().find_map(|b| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(b)).find(|p| p.exists())
    });
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("qemu-system-x86_64 not found, and CI=true: .ci/run must install qemu-system-x86");
        }
        eprintln!("SKIPPED: qemu-system-x86_64 not found; install qemu-system-x86 and qemu-utils to run the migration tests");
    }
    found
}

pub fn accel() -> &'static str {
    Accel::detect().as_str()
}

/// Kills what it holds on drop.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills a daemonized QEMU by its pidfile on drop.
pub struct PidFile(pub PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        kill_qemu_of_pidfile(&self.0);
    }
}

/// SIGKILLs the QEMU whose pid a pidfile holds (if that pid is still a QEMU).
pub fn kill_qemu_of_pidfile(path: &Path) {
    let Some(pid) = std::fs::read_to_string(path).ok().and_then(|p| p.trim().parse::<i32>().ok()) else { return };
    let is_qemu = std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).contains("qemu")).unwrap_or(false);
    if is_qemu {
        // SAFETY: kill(2) on the pid QEMU wrote; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size / (1 << 20) {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf).unwrap();
    }
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Sum of the samples of `name` with all `labels` on the agent whose metrics listen at `addr`.
pub fn metric_at(addr: std::net::SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    migtun_proxy::metrics::sum_samples(&text, name, labels)
}

pub struct Hosts {
    pub dir: tempfile::TempDir,
    pub agents: Procs,
    /// The agents' metrics endpoints: host-a, host-b.
    pub metrics: [std::net::SocketAddr; 2],
}

/// Whatever a test leaves behind (it may have panicked before its own guards existed): every
/// destination QEMU still recorded under `run-host-b/*/qemu.pid` is killed.
impl Drop for Hosts {
    fn drop(&mut self) {
        if let Ok(dirs) = std::fs::read_dir(self.path("run-host-b")) {
            for d in dirs.flatten() {
                kill_qemu_of_pidfile(&d.path().join("qemu.pid"));
            }
        }
    }
}

impl Hosts {
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Two agents with admin sockets, run dirs, and the example prepare hook.
    pub fn start() -> Hosts {
        Hosts::start_with_hook(&Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prepare-hook"))
    }

    pub fn start_with_hook(hook: &Path) -> Hosts {
        Hosts::start_with(hook, "tls")
    }

    /// Agents whose peers use `transport` for data streams, each with a metrics endpoint
    /// (`metrics_addr`).
    pub fn start_with(hook: &Path, transport: &str) -> Hosts {
        Hosts::start_spec(&HostsSpec { hook, transport, ..HostsSpec::default() })
    }

    /// Two agents as `spec` says, started and answering on their admin sockets.
    pub fn start_spec(spec: &HostsSpec) -> Hosts {
        let dir = tempfile::Builder::new().prefix(spec.prefix).tempdir_in("/dev/shm").unwrap();
        if let Some(mode) = spec.dir_mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let pki = dir.path().join("pki");
        run(Command::new(MIGTUN).args(["certs", "init", "--dir"]).arg(&pki));
        for h in ["host-a", "host-b"] {
            run(Command::new(MIGTUN).args(["certs", "issue", "--dir"]).arg(&pki).args(["--name", h]));
        }
        let port = |_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (pa, pb) = (port(0), port(1));
        let metrics = [port(2), port(3)];
        let mut agents = Procs(Vec::new());
        for (i, (name, me, other, peer)) in [("host-a", pa, pb, "host-b"), ("host-b", pb, pa, "host-a")].into_iter().enumerate() {
            let run_dir = dir.path().join(format!("run-{name}"));
            let config = format!(
                "name = \"{name}\"\nlisten = \"{me}\"\nadmin = \"{d}/{name}.admin\"\nmetrics = \"{m}\"\n\n[tls]\ncert = \"{p}/{name}.pem\"\nkey = \"{p}/{name}.key\"\nca = \"{p}/ca.pem\"\n\n[[peer]]\nname = \"{peer}\"\naddress = \"{other}\"\ntransport = \"{t}\"\n\n[qemu]\nrun_dir = \"{r}\"\nstate_dir = \"{d}/state-{name}\"\nimage_dir = \"{d}/images-{name}\"\nprepare_hook = \"{h}\"\nshared_storage = [\"{d}\"]\nallow_sources = [\"{peer}\"]\n{extra}",
                m = metrics[i],
                d = dir.path().display(),
                p = pki.display(),
                r = run_dir.display(),
                h = spec.hook.display(),
                t = spec.transport,
                extra = spec.qemu_extra[i],
            );
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(&path, config).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            let mut cmd = match &spec.launcher {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(MIGTUN);
                    c
                }
                None => Command::new(MIGTUN),
            };
            agents.0.push(cmd.args(["serve", "--config"]).arg(&path).stderr(log).stdout(Stdio::null()).spawn().unwrap());
        }
        let hosts = Hosts { dir, agents, metrics };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(hosts.path("host-a.admin").exists() && hosts.path("host-b.admin").exists()) {
            assert!(Instant::now() < deadline, "agents did not start:\n{}", hosts.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        hosts
    }

    /// Sum of the samples of `name` with all `labels` on agent `i` (0: host-a, 1: host-b).
    pub fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_at(self.metrics[i], name, labels)
    }

    pub fn logs(&self) -> String {
        ["host-a", "host-b"]
            .iter()
            .map(|h| format!("--- {h}\n{}", std::fs::read_to_string(self.path(&format!("{h}.log"))).unwrap_or_default()))
            .collect()
    }
}

/// How [`Hosts::start_spec`] sets up the two agents.
pub struct HostsSpec<'a> {
    pub hook: &'a Path,
    pub transport: &'a str,
    /// Prefix of the temporary directory under /dev/shm.
    pub prefix: &'a str,
    /// Its mode, when others (QEMU as another user) must get through it.
    pub dir_mode: Option<u32>,
    /// Lines appended to `[qemu]` of host-a and host-b.
    pub qemu_extra: [&'a str; 2],
    /// A program (and its arguments) the agents run under, `migtun serve` after them.
    pub launcher: Option<(PathBuf, Vec<String>)>,
}

impl Default for HostsSpec<'_> {
    fn default() -> Self {
        HostsSpec {
            hook: Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/prepare-hook")),
            transport: "tls",
            prefix: "mt-",
            dir_mode: None,
            qemu_extra: ["", ""],
            launcher: None,
        }
    }
}

/// A source guest: random RAM, a raw and a qcow2 disk with random contents.
pub struct Guest {
    pub ram: PathBuf,
    pub disks: Vec<(PathBuf, &'static str)>,
    pub qmp: PathBuf,
    /// A second QMP monitor for the test itself (the agent holds `qmp` during a migration).
    pub monitor: PathBuf,
    pub proc: Procs,
}

/// What [`start_guest_with`] builds.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// Prefix of the guest's files (and its `-name`); empty: the historic names (`ram-src`, ...).
    pub name: &'static str,
    pub running: bool,
    pub ram_mib: u64,
    /// Size of the raw disk (vd0); the qcow2 disk (vd1) has 32 MiB.
    pub raw_mib: u64,
}

impl Default for GuestOpts {
    fn default() -> Self {
        GuestOpts { name: "", running: true, ram_mib: RAM_MIB, raw_mib: 64 }
    }
}

pub fn start_guest(hosts: &Hosts, qemu: &Path, running: bool) -> Guest {
    start_guest_with(hosts, qemu, &GuestOpts { running, ..GuestOpts::default() })
}

pub fn start_guest_with(hosts: &Hosts, qemu: &Path, o: &GuestOpts) -> Guest {
    let file = |n: &str| if o.name.is_empty() { hosts.path(n) } else { hosts.path(&format!("{}-{n}", o.name)) };
    let seed = o.name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) << 8;
    let ram = file("ram-src");
    random_file(&ram, o.ram_mib << 20, seed + 1);
    let raw = file("disk0.raw");
    random_file(&raw, o.raw_mib << 20, seed + 2);
    let qcow_src = file("disk1-content.raw");
    random_file(&qcow_src, 32 << 20, seed + 3);
    let qcow = file("disk1.qcow2");
    run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&qcow_src).arg(&qcow));
    let _ = std::fs::remove_file(&qcow_src);
    let qmp = file("src.qmp");
    let monitor = file("mon.qmp");
    let vm = if o.name.is_empty() { "testvm" } else { o.name };
    let cmd = QemuCommand::new(qemu, vm, o.ram_mib)
        .paused(!o.running)
        .ram_file(&ram)
        .disk(&raw, DiskFormat::Raw)
        .disk(&qcow, DiskFormat::Qcow2)
        .qmp(&qmp)
        .qmp(&monitor);
    let log = if o.name.is_empty() { "qemu-src.log".to_string() } else { format!("qemu-{}.log", o.name) };
    let child = cmd.command().stderr(std::fs::File::create(hosts.path(&log)).unwrap()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(qmp.exists() && monitor.exists()) {
        assert!(Instant::now() < deadline, "source QEMU did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Guest { ram, disks: vec![(raw, "raw"), (qcow, "qcow2")], qmp, monitor, proc: Procs(vec![child]) }
}

/// A QMP connection of the test's own (blocking calls).
pub struct Monitor {
    rt: tokio::runtime::Runtime,
    qmp: migtun_control::qmp::Qmp,
}

impl Monitor {
    pub fn connect(sock: &Path) -> Monitor {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let qmp = rt.block_on(migtun_control::qmp::Qmp::connect(sock)).unwrap_or_else(|e| panic!("QMP {}: {e}", sock.display()));
        Monitor { rt, qmp }
    }

    pub fn cmd(&self, command: &str, args: serde_json::Value) -> Result<serde_json::Value, String> {
        self.rt.block_on(self.qmp.execute(command, args)).map_err(|e| e.to_string())
    }

    /// Subscribes to QEMU's events (before the command or fault that causes the one awaited).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<migtun_control::qmp::Event> {
        self.qmp.events()
    }

    /// Waits for event `name` whose data satisfies `pred` on a subscription from [`Monitor::subscribe`].
    pub fn wait_event(
        &self,
        rx: &mut tokio::sync::broadcast::Receiver<migtun_control::qmp::Event>,
        name: &str,
        pred: impl FnMut(&serde_json::Value) -> bool + Send,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        use migtun_control::qmp::EventsExt;
        self.rt.block_on(rx.wait_for(name, pred, timeout)).map(|e| e.data).map_err(|e| e.to_string())
    }

    /// A command with its own reply timeout (QEMU's main loop may be blocked).
    pub fn cmd_timeout(&self, command: &str, args: serde_json::Value, timeout: Duration) -> Result<serde_json::Value, String> {
        self.rt.block_on(self.qmp.execute_with_timeout(command, args, timeout)).map_err(|e| e.to_string())
    }

    /// `query-status`'s `running`.
    pub fn running(&self) -> bool {
        self.cmd("query-status", serde_json::Value::Null).expect("query-status")["running"] == true
    }

    /// An HMP command (e.g. `qemu-io`), its output.
    pub fn hmp(&self, line: &str) -> String {
        let v = self.cmd("human-monitor-command", serde_json::json!({ "command-line": line })).expect("human-monitor-command");
        v.as_str().unwrap_or_default().to_string()
    }
}

/// The source after a failed migration: it runs as before, with no block job and no NBD node
/// of the migration left.
pub fn source_is_intact(guest: &Guest, was_running: bool) {
    let mon = Monitor::connect(&guest.monitor);
    // The rollback has ended when `migtun migrate` returns; allow QEMU a moment for job ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let jobs = mon.cmd("query-block-jobs", serde_json::Value::Null).unwrap();
        let nodes = mon.cmd("query-named-block-nodes", serde_json::Value::Null).unwrap();
        let nbd: Vec<_> = nodes.as_array().unwrap().iter().filter(|n| n["drv"] == "nbd").map(|n| n["node-name"].clone()).collect();
        let empty = jobs.as_array().is_some_and(|j| j.is_empty()) && nbd.is_empty();
        if empty {
            break;
        }
        assert!(Instant::now() < deadline, "left on the source: jobs {jobs}, NBD nodes {nbd:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mon.running(), was_running, "the source runs as it ran before");
}

/// Is this pid a live process (zombies count as gone)?
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits for a pidfile and returns its pid.
pub fn read_pidfile(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = std::fs::read_to_string(path).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `migtun migrate --json` running in the background; its events are read as they come.
pub struct Running {
    pub child: Procs,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    pub events: Vec<serde_json::Value>,
    pub stderr: PathBuf,
}

/// `migtun migrate` on `from`'s admin socket, moving `guest` to `to`.
pub fn migrate_command(hosts: &Hosts, from: &str, guest: &Guest, to: &str) -> Command {
    let mut cmd = Command::new(MIGTUN);
    cmd.arg("migrate").arg("--admin").arg(hosts.path(&format!("{from}.admin"))).arg("--qmp").arg(&guest.qmp).args(["--to", to]);
    cmd
}

pub fn spawn_migrate(hosts: &Hosts, guest: &Guest, extra: &[&str]) -> Running {
    let stderr = guest.qmp.with_extension("cli.log");
    let mut child = migrate_command(hosts, "host-a", guest, "host-b")
        .arg("--json")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    Running { child: Procs(vec![child]), lines: std::io::BufRead::lines(std::io::BufReader::new(stdout)), events: Vec::new(), stderr }
}

impl Running {
    /// Reads events until one satisfies `pred` (panics if the stream ends first).
    pub fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&serde_json::Value) -> bool) -> serde_json::Value {
        for line in self.lines.by_ref() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line.unwrap()) else { continue };
            self.events.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
        panic!("the migration ended before {what}: {:#?}
{}", self.events, std::fs::read_to_string(&self.stderr).unwrap_or_default());
    }

    /// Reads events up to `accepted` and returns the migration's id.
    pub fn id_when_accepted(&mut self) -> String {
        if !self.events.iter().any(|e| e["event"] == "accepted") {
            self.wait_for("accepted", |e| e["event"] == "accepted");
        }
        self.id()
    }

    pub fn id(&self) -> String {
        self.events.iter().find_map(|e| e.get("id").and_then(|i| i.as_str())).expect("accepted event").to_string()
    }

    pub fn pid(&self) -> i32 {
        self.child.0[0].id() as i32
    }

    /// Reads the remaining events and waits for the exit: (success, stderr).
    pub fn finish(&mut self) -> (bool, String) {
        for line in self.lines.by_ref() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line.unwrap()) {
                self.events.push(v);
            }
        }
        let status = self.child.0[0].wait().unwrap();
        (status.success(), std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    /// Kills the CLI if the migration does not end within `secs`, so that a hanging agent
    /// fails the test instead of hanging it.
    pub fn watchdog(&self, secs: u64) -> std::thread::JoinHandle<()> {
        watchdog(self.pid(), secs)
    }

    pub fn done(&self) -> serde_json::Value {
        self.events.iter().rev().find(|e| e["event"] == "done").cloned().unwrap_or_default()
    }
}

pub fn migrate(hosts: &Hosts, guest: &Guest, extra: &[&str]) -> (bool, Vec<serde_json::Value>) {
    let out = migrate_command(hosts, "host-a", guest, "host-b").arg("--json").args(extra).output()
        .unwrap();
    let events = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    if !out.status.success() {
        eprintln!("migrate failed: {}\n{}", String::from_utf8_lossy(&out.stderr), hosts.logs());
    }
    (out.status.success(), events)
}

/// The destination's directory for the migration (`run-host-b/<id>`).
pub fn dest_dir(hosts: &Hosts, events: &[serde_json::Value]) -> PathBuf {
    hosts.path("run-host-b").join(migration_id(events))
}

/// The destination's image directory for the migration (`images-host-b/<id>`, its
/// `qemu.image_dir`).
pub fn dest_images(hosts: &Hosts, events: &[serde_json::Value]) -> PathBuf {
    hosts.path("images-host-b").join(migration_id(events))
}

fn migration_id(events: &[serde_json::Value]) -> String {
    events.iter().find_map(|e| e.get("id").and_then(|i| i.as_str())).expect("accepted event with id").to_string()
}

pub fn wait_exit(mut pid_alive: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_alive() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

pub fn qmp_status(sock: &Path) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let q = migtun_control::qmp::Qmp::connect(sock).await.expect("destination QMP");
        q.execute("query-status", serde_json::Value::Null).await.expect("query-status")
    })
}

/// `query-status` of the QEMU `pid` if it is still there: `None` when it has exited, including
/// when it exits while the test connects (alive, then gone before or during the QMP greeting).
/// A QEMU that stays alive but does not answer fails the test.
pub fn qmp_status_unless_gone(sock: &Path, pid: i32) -> Option<serde_json::Value> {
    if !pid_alive(pid) {
        return None;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answer = rt.block_on(async {
        let q = migtun_control::qmp::Qmp::connect(sock).await.map_err(|e| e.to_string())?;
        q.execute("query-status", serde_json::Value::Null).await.map_err(|e| e.to_string())
    });
    match answer {
        Ok(status) => Some(status),
        Err(e) => {
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) {
                assert!(Instant::now() < deadline, "QEMU {pid} is alive but its QMP failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        }
    }
}

pub fn source_status(guest: &Guest) -> serde_json::Value {
    qmp_status(&guest.qmp)
}

/// Nothing of the migration is left on the destination: no QEMU, no run or image directory,
/// no route.
pub fn destination_is_clean(hosts: &Hosts) {
    for dir in ["run-host-b", "images-host-b"] {
        let left: Vec<_> = std::fs::read_dir(hosts.path(dir)).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "left behind on the destination in {dir}: {left:?}\n{}", hosts.logs());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut routes = Vec::new();
    rt.block_on(migtun_control::admin::request(&hosts.path("host-b.admin"), &migtun_control::admin::Request::Status, |v| {
        routes = v["routes"].as_array().cloned().unwrap_or_default();
        false
    }))
    .unwrap();
    assert!(routes.is_empty(), "dynamic routes left on the destination: {routes:?}");
}


/// The agents as processes the fault tests kill, stop and restart (0: host-a, 1: host-b).
impl Hosts {
    pub fn agent_pid(&self, i: usize) -> i32 {
        self.agents.0[i].id() as i32
    }

    /// kill -9 of agent `i`, reaped.
    pub fn kill_agent(&mut self, i: usize) {
        let child = &mut self.agents.0[i];
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGSTOP / SIGCONT of agent `i`.
    pub fn signal_agent(&self, i: usize, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.agent_pid(i), signal) };
    }

    /// Starts agent `i` again from its config (after [`Hosts::kill_agent`]), its log appended,
    /// and waits until its admin socket answers.
    pub fn restart_agent(&mut self, i: usize) {
        self.restart_agent_with(i, &[]);
    }

    /// [`Hosts::restart_agent`] with extra environment variables (a failpoint).
    pub fn restart_agent_with(&mut self, i: usize, env: &[(&str, &str)]) {
        let name = ["host-a", "host-b"][i];
        let log = std::fs::OpenOptions::new().append(true).open(self.path(&format!("{name}.log"))).unwrap();
        let child = Command::new(MIGTUN)
            .args(["serve", "--config"])
            .arg(self.path(&format!("{name}.toml")))
            .envs(env.iter().copied())
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.agents.0[i] = child;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(self.path(&format!("{name}.admin"))).is_err() {
            assert!(Instant::now() < deadline, "{name} did not come back:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Agent `i`'s `migtun status` (JSON).
    pub fn status(&self, i: usize) -> serde_json::Value {
        let name = ["host-a", "host-b"][i];
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut status = serde_json::Value::Null;
        rt.block_on(migtun_control::admin::request(&self.path(&format!("{name}.admin")), &migtun_control::admin::Request::Status, |v| {
            status = v;
            false
        }))
        .unwrap();
        status
    }

    /// Waits until agent `i` reports migration `id` ended and returns its summary.
    pub fn wait_settled(&self, i: usize, id: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let status = self.status(i);
            let m = status["migrations"].as_array().and_then(|a| a.iter().find(|m| m["id"] == id).cloned());
            if let Some(m) = m.filter(|m| !m["outcome"].is_null()) {
                return m;
            }
            assert!(Instant::now() < deadline, "migration {id} not settled on agent {i} within {secs} s: {status}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// What a rollback must restore in the source QEMU: its migration capabilities and the
/// max-bandwidth parameter (the ones a migration changes).
pub fn settings(mon: &Monitor) -> (serde_json::Value, serde_json::Value) {
    let caps = mon.cmd("query-migrate-capabilities", serde_json::Value::Null).unwrap();
    let params = mon.cmd("query-migrate-parameters", serde_json::Value::Null).unwrap();
    (caps, params["max-bandwidth"].clone())
}

/// Nothing of a migration is left in the source QEMU within `within`: no block job, no `mt*`
/// NBD node, and [`settings`] as `before`. `logs` says what the agents did, on failure.
pub fn source_has_nothing_left(mon: &Monitor, before: &(serde_json::Value, serde_json::Value), within: Duration, logs: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    loop {
        let jobs = mon.cmd("query-block-jobs", serde_json::Value::Null).unwrap();
        let nodes = mon.cmd("query-named-block-nodes", serde_json::json!({"flat": true})).unwrap();
        let ours: Vec<serde_json::Value> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node-name"].as_str().is_some_and(|s| s.starts_with("mt")))
            .map(|n| n["node-name"].clone())
            .collect();
        if jobs.as_array().is_some_and(|j| j.is_empty()) && ours.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left in the source QEMU: jobs {jobs}, nodes {ours:?}\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(&settings(mon), before, "migration capabilities and max-bandwidth are restored");
}

/// Kills process `pid` (a CLI the test started) if it has not ended within `secs`.
pub fn watchdog(pid: i32, secs: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if !pid_alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("watchdog: the migration did not end within {secs} s; killing the CLI");
        // SAFETY: kill(2) on the pid of the test's own child; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    })
}
