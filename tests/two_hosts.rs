//! Two hosts, one open port (issue 10): each agent in its own network namespace, joined by a
//! veth pair with private addresses, and the destination's firewall open on the migtun port
//! only.
//!
//! - ns A (`mt-a-<pid>-<n>`, 10.77.0.1): host-a's agent and the source QEMU.
//! - ns B (`mt-b-<pid>-<n>`, 10.77.0.2): host-b's agent and, started by its prepare hook
//!   (contrib/prepare-hook), the destination QEMU. nftables there drops every inbound packet
//!   except TCP and UDP to port 7443, established/related traffic and loopback; the drop rule
//!   counts what it drops.
//!
//! Both agents listen on 0.0.0.0:7443 (TCP and UDP) and serve `/metrics` on 127.0.0.1:9477 of
//! their own namespace. The admin sockets, QMP sockets and run dirs are files on /dev/shm, so the
//! test reaches them from outside the namespaces; what it does on the network it does from a
//! thread that entered a namespace (`setns`). The namespaces go on drop, after a panic too (and
//! a later run removes those of test processes that were killed).
//!
//! What the tests prove:
//! - a migration with storage (raw + qcow2, paused guest, byte-exact RAM and disks) crosses
//!   the one port, over TLS and over QUIC (the QUIC test also checks that host-a's data
//!   streams used QUIC and only the control RPC used TLS);
//! - **the destination QEMU's sockets have no path to them but the agent's port.** Checked
//!   while a migration is held in its mirror phase, when the destination QEMU listens on
//!   everything it ever listens on (its QMP socket, the NBD server and `migrate-incoming`):
//!   the destination QEMU and agent run in ns B (their `/proc/PID/ns/net`); in ns B
//!   `ss -lntup` lists exactly the agent's TCP and UDP 7443 and its loopback metrics, all
//!   the agent's, and `ss -antup` shows no TCP/UDP socket of QEMU at all, listening or not;
//!   QEMU's listening sockets (`ss -lxp`) are UNIX sockets, all directly inside the
//!   migration's directory; that directory and `run_dir` above it are root's, mode 0700, so
//!   no local user but root can even reach the socket files, and no network path leads to a
//!   UNIX socket. The firewall is real, not assumed: a TCP and a UDP listener the test opens
//!   on port 7444 of ns B answer from inside ns B but not from ns A (the TCP connect times
//!   out, i.e. it is dropped, not refused; the datagram never arrives), nor does the agent's
//!   metrics port, while a TCP connect to 7443 from ns A succeeds; the drop rule's counter
//!   grows by what was sent. So from another host the only way to the destination's QEMU is
//!   a stream through the agent's port, which the agent opens only as this migration's
//!   routes, for host-a (what a stranger or another peer gets there is tests/hostile_*.rs).
//!   Not covered: root on host-b, who can open the sockets anyway.
//! - **cutting the link rolls back cleanly**: `ip link set veth-b down` in ns B during RAM,
//!   `ip link set veth-a down` in ns A during the (throttled) mirror. With the link still
//!   down, the source guest runs again as it ran, nothing of the migration is left in the
//!   source QEMU (no `mt*` node, no block job, migration capabilities and `max-bandwidth` as
//!   before) nor in the source agent (no route, its migration directory gone), and the
//!   destination agent, which only notices through its control connection's keepalive,
//!   quits its QEMU and empties its run_dir; the migration's data streams end on both hosts
//!   too (TCP keepalive, and `TCP_USER_TIMEOUT` for a stream that had data in flight), all
//!   within [`migtun_proxy::io::socket::USER_TIMEOUT`] + 20 s of the cut. (The RAM cell rolls back
//!   in ~6 s, on the keepalive and the yank; the mirror cell in ~25 s: while NBD requests are
//!   in flight to the vanished peer the source QEMU answers no in-band QMP command, and the
//!   source driver does not yank until its pending one times out; the data connections'
//!   timeout ends those requests first.) With the link back up the same guest, still
//!   running, migrates again: the disks arrive byte-exact, RAM byte-exact past its first MiB
//!   (where the firmware of a guest that has run keeps writing after the handover, and the
//!   destination QEMU itself changes two bytes even without migtun: see [`FIRMWARE_AREA`]),
//!   and the guest runs on the destination.
//! - **four migrations with storage at once** between the same two agents, each byte-exact,
//!   each source QEMU quit, the destination run_dir then holding exactly the four migrations'
//!   directories with exactly their images, no socket, route, process or directory of theirs
//!   left anywhere else; and while the four run, the destination's default
//!   `max_incoming_per_peer` (4) refuses a fifth, naming the key, with nothing created for it.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables), `ss` and QEMU: without them the tests say so
//! and pass, except under `CI=true`, where they fail (.ci/run installs them).

mod vm;

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vm::*;

/// The one port, on both hosts.
const PORT: u16 = 7443;
/// Each agent's `/metrics`, on the loopback of its own namespace.
const METRICS: &str = "127.0.0.1:9477";
/// A port the destination's firewall does not open.
const CLOSED_PORT: u16 = 7444;
/// host-a's and host-b's addresses on the veth pair.
const ADDR: [&str; 2] = ["10.77.0.1", "10.77.0.2"];
/// The veth pair's ends, in ns A and ns B.
const VETH: [&str; 2] = ["veth-a", "veth-b"];
/// Bandwidth of the RAM migration where a phase must last long enough to be hit.
const SLOW: &str = "50000000";
/// The nftables table in ns B.
const NFT_TABLE: &str = "migtun_test";

// ---------------------------------------------------------------------------------------------
// What the tests need.

struct Tools {
    qemu: PathBuf,
    ip: PathBuf,
    nft: PathBuf,
    ss: PathBuf,
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// QEMU, iproute2, nftables and root; under CI their absence fails the test, elsewhere it is
/// skipped loudly (as [`qemu`] does).
fn tools() -> Option<Tools> {
    let qemu = qemu()?;
    let mut missing = Vec::new();
    let mut tool = |name: &str, package: &str| {
        let found = find_tool(name);
        if found.is_none() {
            missing.push(format!("`{name}` (package {package})"));
        }
        found
    };
    let (ip, nft, ss) = (tool("ip", "iproute2"), tool("nft", "nftables"), tool("ss", "iproute2"));
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces, veth and nftables need CAP_NET_ADMIN and CAP_SYS_ADMIN)".into());
    }
    if let (true, Some(ip), Some(nft)) = (missing.is_empty(), &ip, &nft) {
        if let Err(e) = namespaces_work(ip, nft) {
            missing.push(format!("working network namespaces and nftables ({e})"));
        }
    }
    if !missing.is_empty() {
        let what = missing.join(", ");
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("tests/two_hosts.rs needs {what}, and CI=true: .ci/run must install them (apt-get install iproute2 nftables) and run as root");
        }
        eprintln!("SKIPPED: tests/two_hosts.rs needs {what}; install iproute2 and nftables and run as root to run the two-host tests");
        return None;
    }
    Some(Tools { qemu, ip: ip.unwrap(), nft: nft.unwrap(), ss: ss.unwrap() })
}

/// Can this machine make a network namespace and run nftables in it? (Once per test process.)
fn namespaces_work(ip: &Path, nft: &Path) -> Result<(), String> {
    static PROBE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let name = format!("mt-probe-{}", std::process::id());
            let out = |c: &mut Command| {
                let o = c.output().map_err(|e| format!("{c:?}: {e}"))?;
                if o.status.success() {
                    Ok(())
                } else {
                    Err(format!("{c:?}: {}", String::from_utf8_lossy(&o.stderr).trim()))
                }
            };
            out(Command::new(ip).args(["netns", "add", &name]))?;
            let listed = out(Command::new(ip).args(["netns", "exec", &name]).arg(nft).args(["list", "ruleset"]));
            let _ = Command::new(ip).args(["netns", "del", &name]).output();
            listed
        })
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Network namespaces.

/// A network namespace of this test run, deleted on drop (after SIGKILL of any process of ours
/// still in it).
struct Netns {
    name: String,
    ip: PathBuf,
}

impl Netns {
    fn create(ip: &Path, name: String) -> Netns {
        run(Command::new(ip).args(["netns", "add", &name]));
        let ns = Netns { name, ip: ip.to_path_buf() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`.
    fn ip(&self, args: &[&str]) {
        run(Command::new(&self.ip).arg("-n").arg(&self.name).args(args));
    }

    /// `program` to be run inside the namespace (`ip netns exec NS program`, which execs it:
    /// the child's pid is the program's).
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Output of `program args` run inside the namespace.
    fn output(&self, program: &Path, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap();
        assert!(out.status.success(), "{} {args:?} in {}: {}", program.display(), self.name, String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The namespace's identity (device and inode of its nsfs file).
    fn id(&self) -> (u64, u64) {
        let m = std::fs::metadata(format!("/run/netns/{}", self.name)).unwrap();
        (m.dev(), m.ino())
    }

    /// Is process `pid` in this namespace?
    fn holds(&self, pid: i32) -> bool {
        std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == self.id())
    }

    /// The live processes in this namespace.
    fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&p| pid_alive(p) && self.holds(p))
            .collect();
        pids.sort();
        pids
    }

    /// Runs `f` on a thread that has entered the namespace (sockets made there stay there).
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns(2) on an open namespace file; it changes only this thread's
                // network namespace, and the thread ends with `f`.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            });
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever of ours is still in there (a QEMU a hook started, an agent).
        for pid in self.pids() {
            eprintln!("netns {}: killing pid {pid} left in it", self.name);
            // SAFETY: kill(2) on a process in a namespace this test made; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let out = Command::new(&self.ip).args(["netns", "del", &self.name]).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("could not delete netns {}: {out:?}", self.name);
        }
    }
}

/// Deletes the namespaces earlier test processes (now dead: SIGKILLed, say) left behind.
fn remove_stale_namespaces(ip: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = ["mt-a-", "mt-b-", "mt-probe-"]
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .and_then(|r| r.split('-').next()?.parse::<i32>().ok());
            if pid.is_some_and(|p| !pid_alive(p)) {
                eprintln!("removing stale netns {name}");
                let _ = Command::new(ip).args(["netns", "del", &name]).status();
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Two agents in two namespaces.

/// host-a's and host-b's agents, each in its namespace. Derefs to [`Hosts`], so the harness in
/// tests/vm works on it unchanged (admin sockets, run dirs, logs).
struct TwoHosts {
    // Dropped first: the agents and the destination QEMUs, then the namespaces.
    hosts: Hosts,
    ns: [Netns; 2],
    nft: PathBuf,
    ss: PathBuf,
    /// Programs of the test (outside /dev/shm, which may be mounted noexec).
    bin: tempfile::TempDir,
}

impl std::ops::Deref for TwoHosts {
    type Target = Hosts;
    fn deref(&self) -> &Hosts {
        &self.hosts
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl TwoHosts {
    /// Namespaces, veth, firewall, certificates and two agents whose peers use `transport`.
    fn start(t: &Tools, transport: &str) -> TwoHosts {
        remove_stale_namespaces(&t.ip);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = [Netns::create(&t.ip, format!("mt-a-{pid}-{n}")), Netns::create(&t.ip, format!("mt-b-{pid}-{n}"))];
        run(Command::new(&t.ip).args(["link", "add", VETH[0], "netns", &ns[0].name, "type", "veth", "peer", "name", VETH[1], "netns", &ns[1].name]));
        for i in 0..2 {
            ns[i].ip(&["addr", "add", &format!("{}/24", ADDR[i]), "dev", VETH[i]]);
            ns[i].ip(&["link", "set", VETH[i], "up"]);
        }

        let dir = tempfile::Builder::new().prefix("mt-2h-").tempdir_in("/dev/shm").unwrap();
        // host-b's firewall: inbound only the one port (TCP and UDP), replies and loopback.
        let rules = dir.path().join("host-b.nft");
        std::fs::write(
            &rules,
            format!(
                "table inet {NFT_TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy drop;\n    iif \"lo\" accept\n    ct state established,related accept\n    tcp dport {PORT} accept\n    udp dport {PORT} accept\n    counter drop\n  }}\n}}\n"
            ),
        )
        .unwrap();
        ns[1].output(&t.nft, &["-f", rules.to_str().unwrap()]);

        let pki = dir.path().join("pki");
        run(Command::new(MIGTUN).args(["certs", "init", "--dir"]).arg(&pki));
        for h in ["host-a", "host-b"] {
            run(Command::new(MIGTUN).args(["certs", "issue", "--dir"]).arg(&pki).args(["--name", h]));
        }
        let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prepare-hook");
        let mut agents = Procs(Vec::new());
        for (i, (name, peer)) in [("host-a", "host-b"), ("host-b", "host-a")].into_iter().enumerate() {
            let config = format!(
                "name = \"{name}\"\nlisten = \"0.0.0.0:{PORT}\"\nadmin = \"{d}/{name}.admin\"\nmetrics = \"{METRICS}\"\n\n[tls]\ncert = \"{p}/{name}.pem\"\nkey = \"{p}/{name}.key\"\nca = \"{p}/ca.pem\"\n\n[[peer]]\nname = \"{peer}\"\naddress = \"{a}:{PORT}\"\ntransport = \"{transport}\"\n\n[qemu]\nrun_dir = \"{d}/run-{name}\"\nstate_dir = \"{d}/state-{name}\"\nimage_dir = \"{d}/images-{name}\"\nprepare_hook = \"{h}\"\nshared_storage = [\"{d}\"]\nallow_sources = [\"{peer}\"]\n",
                d = dir.path().display(),
                p = pki.display(),
                a = ADDR[1 - i],
                h = hook.display(),
            );
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(&path, config).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            let child = ns[i].command(MIGTUN).args(["serve", "--config"]).arg(&path).stderr(log).stdout(Stdio::null()).spawn().unwrap();
            agents.0.push(child);
        }
        let metrics = [METRICS.parse().unwrap(); 2];
        let bin = tempfile::Builder::new().prefix("mt-2h-bin-").tempdir().unwrap();
        let th = TwoHosts { hosts: Hosts { dir, agents, metrics }, ns, nft: t.nft.clone(), ss: t.ss.clone(), bin };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(th.path("host-a.admin").exists() && th.path("host-b.admin").exists()) {
            assert!(Instant::now() < deadline, "agents did not start:\n{}", th.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 0..2 {
            assert!(th.ns[i].holds(th.agent_pid(i)), "agent {i} runs in {}", th.ns[i].name);
        }
        th
    }

    fn agent_pid(&self, i: usize) -> i32 {
        self.hosts.agents.0[i].id() as i32
    }

    /// A program that runs QEMU inside ns A (`ip netns exec` execs it: the pid stays QEMU's), for
    /// [`start_guest_with`].
    fn qemu_in_a(&self, t: &Tools) -> PathBuf {
        let wrapper = self.bin.path().join("qemu-in-host-a");
        if !wrapper.exists() {
            std::fs::write(&wrapper, format!("#!/bin/sh\nexec {} netns exec {} {} \"$@\"\n", t.ip.display(), self.ns[0].name, t.qemu.display())).unwrap();
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        wrapper
    }

    /// A guest of host-a, its QEMU in ns A.
    fn guest(&self, t: &Tools, o: &GuestOpts) -> Guest {
        let guest = start_guest_with(self, &self.qemu_in_a(t), o);
        assert!(self.ns[0].holds(guest.proc.0[0].id() as i32), "the source QEMU runs in ns A");
        guest
    }

    /// Takes host `i`'s end of the link down (`up` false) or up again.
    fn link(&self, i: usize, up: bool) {
        self.ns[i].ip(&["link", "set", VETH[i], if up { "up" } else { "down" }]);
        if up {
            // Until host-a reaches host-b's port again.
            let deadline = Instant::now() + Duration::from_secs(10);
            let to = SocketAddr::new(ADDR[1].parse().unwrap(), PORT);
            while self.ns[0].enter(|| TcpStream::connect_timeout(&to, Duration::from_millis(500))).is_err() {
                assert!(Instant::now() < deadline, "host-b's port is not reachable after the link came back");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// A metric of agent `i`, read from inside its namespace.
    fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.ns[i].enter(|| self.hosts.metric(i, name, labels))
    }

    /// `ss -H FLAGS` in host `i`'s namespace.
    fn sockets(&self, i: usize, flags: &str) -> Vec<Socket> {
        self.ns[i].output(&self.ss, &["-H", flags]).lines().filter(|l| !l.trim().is_empty()).map(Socket::parse).collect()
    }

    /// Packets the destination's firewall has dropped so far.
    fn dropped(&self) -> u64 {
        let out = self.ns[1].output(&self.nft, &["list", "chain", "inet", NFT_TABLE, "input"]);
        let line = out.lines().find(|l| l.contains("counter packets") && l.contains("drop")).unwrap_or_else(|| panic!("no drop counter: {out}"));
        line.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    }

    /// Agent `i`'s `status` (its admin socket).
    fn status(&self, i: usize) -> Value {
        let admin = self.path(if i == 0 { "host-a.admin" } else { "host-b.admin" });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut status = Value::Null;
        rt.block_on(migtun_control::admin::request(&admin, &migtun_control::admin::Request::Status, |v| {
            status = v;
            false
        }))
        .unwrap();
        status
    }

    /// The dynamic routes agent `i` has.
    fn routes(&self, i: usize) -> Vec<Value> {
        self.status(i)["routes"].as_array().cloned().unwrap_or_default()
    }

    /// The streams agent `i` has open (by peer, route and side).
    fn streams(&self, i: usize) -> Vec<Value> {
        self.status(i)["streams"].as_array().cloned().unwrap_or_default()
    }

    fn entries(&self, dir: &str) -> Vec<String> {
        names_in(&self.path(dir))
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// One line of `ss`: the protocol (`tcp`, `udp`, `u_str`, ...), the local address (or UNIX
/// path) and the processes holding it.
#[derive(Debug)]
struct Socket {
    proto: String,
    local: String,
    pids: Vec<i32>,
    line: String,
}

impl Socket {
    fn parse(line: &str) -> Socket {
        let f: Vec<&str> = line.split_whitespace().collect();
        let pids = line
            .match_indices("pid=")
            .filter_map(|(i, _)| line[i + 4..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .collect();
        Socket { proto: f[0].to_string(), local: f.get(4).unwrap_or(&"").to_string(), pids, line: line.to_string() }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the tests.

/// Nothing of the migration is left in the source agent: no route, no migration directory.
fn source_agent_has_nothing_left(th: &TwoHosts) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !th.entries("run-host-a").is_empty() {
        assert!(Instant::now() < deadline, "left in the source's run_dir: {:?}\n{}", th.entries("run-host-a"), th.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(th.routes(0), Vec::<Value>::new(), "routes left on the source agent");
}

/// The destination QEMU `dest_pid` exits and the destination's run_dir is emptied (within
/// `secs`), and no dynamic route is left there.
fn destination_has_nothing_left(th: &TwoHosts, dest_pid: i32, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while pid_alive(dest_pid) {
        assert!(Instant::now() < deadline, "the destination QEMU does not exit:\n{}", th.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    while !th.entries("run-host-b").is_empty() {
        assert!(Instant::now() < deadline, "the destination's run_dir is not emptied: {:?}\n{}", th.entries("run-host-b"), th.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    destination_is_clean(th);
}

fn migration_status(mon: &Monitor) -> String {
    mon.cmd("query-migrate", Value::Null).unwrap()["status"].as_str().unwrap_or("none").to_string()
}

fn mirror_jobs(mon: &Monitor) -> Vec<String> {
    let Ok(jobs) = mon.cmd("query-block-jobs", Value::Null) else { return Vec::new() };
    jobs.as_array()
        .map(|a| a.iter().filter(|j| j["type"] == "mirror").filter_map(|j| j["device"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Throttles the guest's mirror jobs to `speed` bytes/s as soon as they exist (`count` of them).
fn throttle_mirrors(mon: &Monitor, m: &Running, count: usize, speed: u64) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut throttled: Vec<String> = Vec::new();
    let mut settled = None;
    // Until `count` are throttled, and then a little longer for the others (a small disk's
    // mirror may be done before it is seen: it does not need to be held).
    while settled.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(100)) {
        for job in mirror_jobs(mon) {
            if !throttled.contains(&job) {
                // The job may have ended meanwhile.
                if mon.cmd("block-job-set-speed", json!({"device": job, "speed": speed})).is_ok() {
                    throttled.push(job);
                }
            }
        }
        if settled.is_none() && throttled.len() >= count {
            settled = Some(Instant::now());
        }
        assert!(Instant::now() < deadline, "the mirror jobs did not start: {:#?}", m.events);
        std::thread::sleep(Duration::from_millis(2));
    }
    throttled
}

fn assert_succeeded(th: &TwoHosts, ok: bool, events: &[Value]) {
    assert!(ok, "the migration succeeds: {events:#?}\n{}", th.logs());
    let done = events.iter().rev().find(|e| e["event"] == "done").cloned().unwrap_or_default();
    assert_eq!(done["outcome"], "succeeded", "{done}");
}

/// Where a guest's RAM may differ between the source and the destination once the guest has
/// run: its first MiB. The running firmware (SeaBIOS, waiting for a bootable disk) keeps
/// writing there (page 0, its timer tick) on the destination after the handover, and even a
/// plain QEMU-to-QEMU migration of such a guest, paused, through a file (no migtun) arrives
/// with two bytes at 0xe8c20 and 0xe8c3d changed by the destination QEMU itself. Above it the
/// firmware writes nothing.
const FIRMWARE_AREA: usize = 1 << 20;

/// A guest's migration arrived: its source QEMU quit, the disks equal the source's byte for
/// byte, and so does RAM (past [`FIRMWARE_AREA`] if the guest is `running`, everywhere
/// otherwise); the destination QEMU, in ns B, runs it or holds it paused as the source did.
/// The destination's directory.
fn assert_arrived_byte_exact(th: &TwoHosts, guest: &mut Guest, events: &[Value], running: bool) -> PathBuf {
    let dir = dest_dir(th, events);
    let src = &mut guest.proc.0[0];
    wait_exit(|| src.try_wait().unwrap().is_none(), "the source QEMU quits after success");
    let images = dest_images(th, events);
    let from = if running { FIRMWARE_AREA } else { 0 };
    let pages = differing_pages(&guest.ram, &images.join(guest.ram.file_name().unwrap()), from);
    assert!(pages.is_empty(), "RAM of {} arrives byte-exact (from {from:#x}); differing 4 KiB pages at {pages:x?}", guest.ram.display());
    for (disk, format) in &guest.disks {
        run(Command::new("qemu-img").args(["compare", "-U", "-q", "-f", format, "-F", format]).arg(disk).arg(images.join(disk.file_name().unwrap())));
    }
    assert_eq!(qmp_status(&dir.join("qmp.sock"))["running"], running, "the guest's run state on the destination");
    assert!(th.ns[1].holds(read_pidfile(&dir.join("qemu.pid"))), "the destination QEMU runs in ns B");
    dir
}

/// Offsets of the 4 KiB pages from `from` on where two files differ (at most 32 of them).
fn differing_pages(a: &Path, b: &Path, from: usize) -> Vec<usize> {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len(), "sizes");
    (from..a.len()).step_by(4096).filter(|&i| a[i..(i + 4096).min(a.len())] != b[i..(i + 4096).min(b.len())]).take(32).collect()
}

/// The file names a guest's migration puts in the destination's image directory.
fn image_names(guest: &Guest) -> Vec<String> {
    let mut v: Vec<String> = std::iter::once(&guest.ram)
        .chain(guest.disks.iter().map(|(d, _)| d))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Holds a paused guest's migration in its mirror phase (1 MB/s) and then checks, while the
/// destination QEMU listens on everything it ever listens on, that nothing but the agent's
/// port is reachable in ns B (see the module's doc comment). Releases the mirrors at the end.
fn check_destination_is_reachable_only_through_the_port(th: &TwoHosts, guest: &Guest, m: &mut Running, firewall: bool) {
    let mon = Monitor::connect(&guest.monitor);
    let jobs = throttle_mirrors(&mon, m, 1, 1_000_000);
    m.wait_for("mirror progress", |e| e["event"] == "progress" && e["stage"] == "mirror");
    let dir = th.path("run-host-b").join(m.id());
    let dest_pid = read_pidfile(&dir.join("qemu.pid"));
    let agent = th.agent_pid(1);
    assert!(th.ns[1].holds(dest_pid), "the destination QEMU runs in ns B");
    assert!(th.ns[1].holds(agent), "host-b's agent runs in ns B");
    assert!(th.ns[0].holds(th.agent_pid(0)) && th.ns[0].holds(guest.proc.0[0].id() as i32), "host-a's agent and the source QEMU run in ns A");

    // Every TCP and UDP listener in ns B is the agent's: the one port and its loopback metrics.
    let inet = th.sockets(1, "-lntup");
    let mut listening: Vec<String> = inet.iter().map(|s| format!("{} {}", s.proto, s.local)).collect();
    listening.sort();
    assert_eq!(
        listening,
        [format!("tcp 0.0.0.0:{PORT}"), format!("tcp {METRICS}"), format!("udp 0.0.0.0:{PORT}")],
        "TCP/UDP listeners in ns B: {inet:#?}"
    );
    for s in &inet {
        assert_eq!(s.pids, [agent], "only the agent listens on TCP/UDP in ns B: {}", s.line);
    }
    // The destination QEMU has no TCP or UDP socket at all, listening or connected.
    let qemu_inet: Vec<_> = th.sockets(1, "-antup").into_iter().filter(|s| s.pids.contains(&dest_pid)).collect();
    assert!(qemu_inet.is_empty(), "the destination QEMU has TCP/UDP sockets: {qemu_inet:#?}");
    // Its listeners are UNIX sockets in the migration's directory: QMP, NBD and the incoming
    // migration.
    let unix: Vec<Socket> = th.sockets(1, "-lxp").into_iter().filter(|s| s.pids.contains(&dest_pid)).collect();
    let canon = dir.canonicalize().unwrap();
    for s in &unix {
        assert!(Path::new(&s.local).parent() == Some(canon.as_path()), "a destination QEMU listener outside {}: {}", canon.display(), s.line);
    }
    let mut names: Vec<&str> = unix.iter().filter_map(|s| Path::new(&s.local).file_name()?.to_str()).collect();
    names.sort();
    assert_eq!(names, ["migration.sock", "nbd.sock", "qmp.sock"], "the destination QEMU's listeners: {unix:#?}");
    // ... which only root can reach: the directory and run_dir are root's, mode 0700.
    for d in [th.path("run-host-b"), dir.clone()] {
        let meta = std::fs::metadata(&d).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, 0), "mode and owner of {}", d.display());
    }
    eprintln!("ns B during the mirror: TCP/UDP {listening:?}, all the agent's (pid {agent}); destination QEMU (pid {dest_pid}) listens on {names:?} in {} (0700)", canon.display());

    if firewall {
        check_the_firewall(th);
    }

    for job in &jobs {
        let _ = mon.cmd("block-job-set-speed", json!({"device": job, "speed": 0}));
    }
}

/// From ns A only the one port of ns B answers: a TCP and a UDP listener on another port (which
/// answer from inside ns B) and the agent's loopback metrics do not.
fn check_the_firewall(th: &TwoHosts) {
    let b = |port| SocketAddr::new(ADDR[1].parse().unwrap(), port);
    let (tcp, udp) = th.ns[1].enter(|| {
        (TcpListener::bind(("0.0.0.0", CLOSED_PORT)).unwrap(), UdpSocket::bind(("0.0.0.0", CLOSED_PORT)).unwrap())
    });
    udp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let dropped = th.dropped();
    th.ns[0].enter(|| {
        TcpStream::connect_timeout(&b(PORT), Duration::from_secs(3)).expect("host-a reaches host-b's port");
        for port in [CLOSED_PORT, 9477] {
            let e = TcpStream::connect_timeout(&b(port), Duration::from_secs(2)).expect_err("another port of host-b is reachable from host-a");
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "TCP {port} is dropped (timed out), not refused: {e}");
        }
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"from host-a", b(CLOSED_PORT)).unwrap();
    });
    let mut buf = [0u8; 64];
    let got = udp.recv_from(&mut buf);
    assert!(got.is_err(), "a datagram from host-a to UDP {CLOSED_PORT} of host-b arrived: {got:?}");
    let after = th.dropped();
    // Two SYNs (at least, with retransmissions) and the datagram.
    assert!(after >= dropped + 3, "the firewall's drop counter grew by {} only", after - dropped);
    // The listeners are there: from inside ns B they answer.
    th.ns[1].enter(|| {
        TcpStream::connect_timeout(&b(CLOSED_PORT), Duration::from_secs(2)).expect("TCP 7444 answers inside ns B");
        UdpSocket::bind("0.0.0.0:0").unwrap().send_to(b"from host-b", b(CLOSED_PORT)).unwrap();
    });
    tcp.accept().expect("the connection from inside ns B");
    let (n, _) = udp.recv_from(&mut buf).expect("the datagram from inside ns B arrives");
    assert_eq!(&buf[..n], b"from host-b");
    eprintln!("firewall: TCP {CLOSED_PORT} and 9477 and UDP {CLOSED_PORT} of host-b dropped from host-a ({} packets), TCP {PORT} reachable", after - dropped);
}

// ---------------------------------------------------------------------------------------------
// 1 and 2: a migration with storage over the one port, TLS and QUIC; nothing else reachable.

fn migrates_through_the_one_port(transport: &str, name: &'static str) {
    let Some(t) = tools() else { return };
    let th = TwoHosts::start(&t, transport);
    let mut guest = th.guest(&t, &GuestOpts { name, running: false, ram_mib: 128, raw_mib: 128 });
    let mut m = spawn_migrate(&th, &guest, &[]);
    let guard = m.watchdog(120);
    check_destination_is_reachable_only_through_the_port(&th, &guest, &mut m, transport == "tls");
    let (ok, _) = m.finish();
    guard.join().unwrap();
    assert_succeeded(&th, ok, &m.events);
    assert_arrived_byte_exact(&th, &mut guest, &m.events, false);
    if transport == "quic" {
        assert!(th.metric(0, "migtun_handshakes_total", &[("transport", "quic"), ("role", "client")]) >= 1.0, "host-a reached host-b over QUIC");
        assert_eq!(
            th.metric(0, "migtun_handshakes_total", &[("transport", "tls"), ("role", "client")]),
            1.0,
            "one TLS connection (the control RPC); the data streams did not use TLS"
        );
    } else {
        assert_eq!(th.metric(0, "migtun_handshakes_total", &[("transport", "quic")]), 0.0, "no QUIC with transport = \"tls\"");
    }
    assert!(th.metric(1, "migtun_bytes_total", &[("direction", "rx")]) > (128 << 20) as f64, "the RAM crossed host-b's port");
}

#[test]
fn migration_with_storage_over_tls_through_the_one_open_port() {
    migrates_through_the_one_port("tls", "ovtls");
}

#[test]
fn migration_with_storage_over_quic_through_the_one_open_port() {
    migrates_through_the_one_port("quic", "ovquic");
}

// ---------------------------------------------------------------------------------------------
// 3: the link cut during RAM and during the mirror.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Mirror,
    Ram,
}

/// A running guest's migration loses the link (host `side`'s end goes down) in `phase`.
fn link_cut_rolls_back_then_migrates(name: &'static str, phase: Phase, side: usize) {
    let Some(t) = tools() else { return };
    let th = TwoHosts::start(&t, "tls");
    let (ram_mib, raw_mib) = match phase {
        Phase::Mirror => (128, 256),
        Phase::Ram => (256, 16),
    };
    let mut guest = th.guest(&t, &GuestOpts { name, running: true, ram_mib, raw_mib });
    let mon = Monitor::connect(&guest.monitor);
    let before = settings(&mon);
    let mut m = spawn_migrate(&th, &guest, &["--max-bandwidth", SLOW]);
    let guard = m.watchdog(120);
    match phase {
        Phase::Mirror => {
            // 20 MB/s: the 256 MiB disk takes over ten seconds to mirror.
            throttle_mirrors(&mon, &m, 1, 20_000_000);
            m.wait_for("mirror progress", |e| e["event"] == "progress" && e["stage"] == "mirror");
        }
        Phase::Ram => {
            m.wait_for("RAM progress", |e| e["event"] == "progress" && e["stage"] == "ram");
        }
    }
    let dest_pid = read_pidfile(&th.path("run-host-b").join(m.id()).join("qemu.pid"));
    let (migration, jobs) = (migration_status(&mon), mirror_jobs(&mon));
    match phase {
        Phase::Mirror => assert!(!jobs.is_empty() && migration == "none", "in the mirror: jobs {jobs:?}, migration {migration}"),
        Phase::Ram => assert_eq!(migration, "active", "in RAM"),
    }
    th.link(side, false);
    let cut = Instant::now();
    eprintln!("cut {} ({}) during {phase:?}: migration {migration}, mirror jobs {jobs:?}", VETH[side], th.ns[side].name);

    let (ok, stderr) = m.finish();
    guard.join().unwrap();
    let done = m.done();
    eprintln!("the CLI returned {:?} after the cut: {done}", cut.elapsed());
    assert!(!ok, "the migration fails");
    assert_eq!(done["outcome"], "failed", "{done}\n{stderr}\n{}", th.logs());
    // What bounds the rollback: the control connection's keepalive (a ping every 2 s, gone
    // after 5 s unanswered). Then the source yanks its QEMU's connections to the peer (out of
    // band) and cuts the forwards' streams, so that QEMU, whose main loop hangs on NBD
    // requests in flight to the vanished peer, sees its sockets close at once instead of when
    // TCP gives up (that took ~25 s before). 10 s more for the rollback on a loaded machine.
    let bound = migtun_control::rpc::KEEPALIVE_INTERVAL + migtun_control::rpc::KEEPALIVE_TIMEOUT + Duration::from_secs(10);
    assert!(cut.elapsed() < bound, "the rollback took {:?} (more than {bound:?})\n{}", cut.elapsed(), th.logs());
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("runs on the source"), "the report says where the guest runs: {message}");
    // With the link still down: the source as it was, the destination cleaned up by itself.
    assert!(mon.running(), "the guest runs on the source again");
    source_has_nothing_left(&mon, &before, Duration::from_secs(20), || th.logs());
    source_agent_has_nothing_left(&th);
    destination_has_nothing_left(&th, dest_pid, 40);
    eprintln!("both sides clean {:?} after the cut", cut.elapsed());
    // The data connections to the vanished peer end too, on both hosts (TCP keepalive, and
    // TCP_USER_TIMEOUT for those with data in flight), and with them the streams.
    let deadline = cut + migtun_proxy::io::socket::USER_TIMEOUT + Duration::from_secs(20);
    while !(th.streams(0).is_empty() && th.streams(1).is_empty()) {
        assert!(Instant::now() < deadline, "streams left {:?} after the cut: host-a {:?}, host-b {:?}", cut.elapsed(), th.streams(0), th.streams(1));
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("no stream left {:?} after the cut", cut.elapsed());

    th.link(side, true);
    // The same guest, still running, migrates byte-exact.
    drop(mon);
    let (ok, events) = migrate(&th, &guest, &[]);
    assert_succeeded(&th, ok, &events);
    assert_arrived_byte_exact(&th, &mut guest, &events, true);
}

#[test]
fn link_cut_during_ram_rolls_back_and_the_next_migration_succeeds() {
    link_cut_rolls_back_then_migrates("cutram", Phase::Ram, 1);
}

#[test]
fn link_cut_during_the_mirror_rolls_back_and_the_next_migration_succeeds() {
    link_cut_rolls_back_then_migrates("cutmirror", Phase::Mirror, 0);
}

// ---------------------------------------------------------------------------------------------
// Four migrations with storage at once between the same two agents.

#[test]
fn four_concurrent_migrations_with_storage_between_two_agents() {
    let Some(t) = tools() else { return };
    let th = TwoHosts::start(&t, "tls");
    const NAMES: [&str; 4] = ["four1", "four2", "four3", "four4"];
    let mut guests: Vec<Guest> =
        NAMES.iter().map(|&n| th.guest(&t, &GuestOpts { name: n, running: false, ram_mib: 128, raw_mib: 64 })).collect();
    let monitors: Vec<Monitor> = guests.iter().map(|g| Monitor::connect(&g.monitor)).collect();
    // All four held in RAM at 2 MB/s (a minute for 128 MiB) until the test lets them go.
    let mut runs: Vec<Running> = guests.iter().map(|g| spawn_migrate(&th, g, &["--max-bandwidth", "2000000"])).collect();
    let guards: Vec<_> = runs.iter().map(|m| m.watchdog(150)).collect();
    for m in &mut runs {
        m.wait_for("RAM progress", |e| e["event"] == "progress" && e["stage"] == "ram");
    }
    let mut ids: Vec<String> = runs.iter().map(Running::id).collect();
    ids.sort();
    assert_eq!(th.entries("run-host-b"), ids, "four incoming migrations at once on host-b");

    // The default max_incoming_per_peer is 4: a fifth from host-a is refused, naming the key,
    // and nothing is created for it.
    let fifth = th.guest(&t, &GuestOpts { name: "five", running: true, ram_mib: 64, raw_mib: 16 });
    let (ok, events) = migrate(&th, &fifth, &[]);
    let done = events.iter().rev().find(|e| e["event"] == "done").cloned().unwrap_or_default();
    eprintln!("the fifth: {done}");
    assert!(!ok, "a fifth migration from host-a is refused while four run");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("max_incoming_per_peer"), "the refusal names the key: {done}");
    assert_eq!(th.entries("run-host-b"), ids, "nothing was created for the fifth");
    assert_eq!(source_status(&fifth)["running"], true, "the fifth guest still runs on host-a");

    for mon in &monitors {
        mon.cmd("migrate-set-parameters", json!({"max-bandwidth": 10_000_000_000u64})).unwrap();
    }
    drop(monitors);
    let mut dirs = Vec::new();
    for ((m, guard), guest) in runs.iter_mut().zip(guards).zip(guests.iter_mut()) {
        let (ok, _) = m.finish();
        guard.join().unwrap();
        assert_succeeded(&th, ok, &m.events);
        let dir = assert_arrived_byte_exact(&th, guest, &m.events, false);
        let images = dest_images(&th, &m.events);
        assert_eq!(names_in(&images), image_names(guest), "exactly {}'s images in {}", guest.ram.display(), images.display());
        // The guest's run directory keeps its QMP socket, pidfile and log while it runs; the
        // migration's NBD and RAM sockets are gone.
        assert_eq!(names_in(&dir), ["qemu.log", "qemu.pid", "qmp.sock"], "left in {}", dir.display());
        dirs.push(dir);
    }
    assert_eq!(th.entries("run-host-b"), ids, "host-b's run_dir holds exactly the four migrations");
    // Nothing else left: no route on either agent, nothing in host-a's run_dir, and in ns B
    // only the agent and the four destination QEMUs (no hook, no fifth QEMU).
    source_agent_has_nothing_left(&th);
    assert_eq!(th.routes(1), Vec::<Value>::new(), "routes left on host-b");
    let mut expected: Vec<i32> = std::iter::once(th.agent_pid(1)).chain(dirs.iter().map(|d| read_pidfile(&d.join("qemu.pid")))).collect();
    expected.sort();
    assert_eq!(th.ns[1].pids(), expected, "the processes in ns B: host-b's agent and the four QEMUs");
    let mut expected = vec![th.agent_pid(0), fifth.proc.0[0].id() as i32];
    expected.sort();
    assert_eq!(th.ns[0].pids(), expected, "the processes in ns A: host-a's agent and the fifth guest");
}
