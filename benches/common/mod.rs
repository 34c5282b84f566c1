//! Shared helpers of the benches: child processes in their own process groups (stopped on
//! drop, on panic and on SIGINT/SIGTERM/SIGHUP), certificates, tunnels (socat, socat+OpenSSL,
//! stunnel, ssh -L, migtun TLS/QUIC) with any number of UNIX-to-UNIX forwards — one set-up per
//! peer, used by `throughput`, `latency` and `migration` —, /proc readings (CPU seconds, peak
//! RSS of a process tree) and small statistics.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Child processes, each in its own process group.

static PGIDS: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];
/// Pids (not groups) of daemonized processes we must also kill on a signal (QEMU -daemonize).
static PIDS: [AtomicI32; 16] = [const { AtomicI32::new(0) }; 16];

fn register(slots: &[AtomicI32], v: i32) {
    for slot in slots {
        if slot
            .compare_exchange(0, v, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

fn unregister(slots: &[AtomicI32], v: i32) {
    for slot in slots {
        let _ = slot.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    for slot in &PGIDS {
        let pgid = slot.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill(2) is async-signal-safe.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
    for slot in &PIDS {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Raises RLIMIT_NOFILE to the hard limit (children inherit it): 1,000 streams need ~4,000 fds
/// in an agent.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    0
}

/// A child in its own process group; SIGTERM to the group on drop, SIGKILL after 3 s.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Proc, String> {
        let f = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .process_group(0);
        let child = cmd.spawn().map_err(|e| format!("spawn {name}: {e}"))?;
        register(&PGIDS, child.id() as i32);
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(30)..];
        format!(
            "--- {} ({}), last lines:\n{}",
            self.name,
            self.log.display(),
            tail.join("\n")
        )
    }

    /// The distinct WARN/ERROR lines of its log (ANSI colours and timestamps removed), counted.
    pub fn warnings(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let mut seen: Vec<(String, usize)> = vec![];
        for l in text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        {
            let mut clean = String::new();
            let mut esc = false;
            for ch in l.chars() {
                match (esc, ch) {
                    (false, '\x1b') => esc = true,
                    (true, 'm') => esc = false,
                    (true, _) => {}
                    (false, c) => clean.push(c),
                }
            }
            let clean = clean
                .split_once(' ')
                .map(|(_, r)| r.trim().to_string())
                .unwrap_or(clean);
            if let Some((_, n)) = seen.iter_mut().find(|(m, _)| *m == clean) {
                *n += 1;
            } else if seen.len() < 20 {
                seen.push((clean, 1));
            }
        }
        if seen.is_empty() {
            return String::new();
        }
        let lines: Vec<String> = seen.iter().map(|(m, n)| format!("  {n}x {m}")).collect();
        format!(
            "--- {}: warnings/errors in {}:\n{}",
            self.name,
            self.log.display(),
            lines.join("\n")
        )
    }

    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    pub fn stop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: signals to our own child's process group.
        if let Ok(Some(_)) = self.child.try_wait() {
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            return;
        }
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        unregister(&PGIDS, self.child.id() as i32);
    }
}

/// A daemonized process known by its pidfile (the destination QEMU of the prepare hook):
/// SIGKILLed on drop if the pid still runs `needle`.
pub struct PidFileGuard {
    pub path: PathBuf,
    pub needle: &'static str,
    pid: i32,
}

impl PidFileGuard {
    pub fn new(path: PathBuf, needle: &'static str) -> PidFileGuard {
        PidFileGuard {
            path,
            needle,
            pid: 0,
        }
    }

    /// Reads the pidfile (if there) and registers the pid for the signal handler.
    pub fn arm(&mut self) -> Option<i32> {
        if self.pid == 0 {
            if let Some(pid) = fs::read_to_string(&self.path)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                self.pid = pid;
                register(&PIDS, pid);
            }
        }
        (self.pid > 0).then_some(self.pid)
    }
}

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        self.arm();
        if self.pid > 0 {
            let is = fs::read(format!("/proc/{}/cmdline", self.pid))
                .map(|c| String::from_utf8_lossy(&c).contains(self.needle))
                .unwrap_or(false);
            if is {
                // SAFETY: kill(2) of the pid the pidfile names, checked to be ours.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while pid_alive(self.pid) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(10));
                }
            }
            unregister(&PIDS, self.pid);
        }
    }
}

/// Is this pid a live process (zombies count as gone)?
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

/// (VmRSS, VmHWM) in KiB.
pub fn rss_kib(pid: i32) -> Option<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// user+sys CPU seconds of a process (including its reaped children).
pub fn cpu_secs(pid: i32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the comm: state is f[0]; utime is field 14 of stat, i.e. f[11].
    let t: u64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(t as f64 / hz)
}

/// The parent pid of every live process, from `/proc/PID/stat` (processes that vanish while
/// being read are left out).
fn parent_pids() -> Vec<(i32, i32)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = s
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// `root` and all its live descendants, found through the parent pids (sshd forks a child per
/// connection, which calls setsid(), so the process group is not enough; socat forks per
/// connection).
pub fn descendants(root: i32) -> Vec<i32> {
    let procs = parent_pids();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(procs.iter().filter(|x| x.1 == p).map(|x| x.0));
        i += 1;
    }
    tree
}

/// user+sys CPU seconds of a process and all its live descendants; with `cpu_secs` counting
/// reaped children, a child that ends between two readings is still counted (in its parent).
pub fn cpu_secs_group(root: i32) -> f64 {
    descendants(root)
        .iter()
        .map(|p| cpu_secs(*p).unwrap_or(0.0))
        .sum()
}

/// How often [`PeakRss`] looks at the process trees: often enough to see every per-connection
/// child of a forking relay (they live as long as a stream, i.e. seconds), rarely enough that
/// walking /proc costs well under 1 % of a core.
pub const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Samples the VmHWM (peak RSS) of every process in some process trees until `finish`.
/// A tree's peak is the sum of its processes' VmHWMs: exact for one process (migtun, stunnel),
/// an upper bound for a forking relay (shared pages count once per process).
pub struct PeakRss {
    stop: Arc<AtomicBool>,
    /// Per root: the largest VmHWM seen of each pid in its tree, KiB.
    worker: thread::JoinHandle<Vec<HashMap<i32, u64>>>,
}

impl PeakRss {
    pub fn start(roots: Vec<i32>) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let worker = thread::spawn(move || {
            let mut seen = vec![HashMap::new(); roots.len()];
            loop {
                let last = flag.load(Ordering::SeqCst);
                for (root, peaks) in roots.iter().zip(seen.iter_mut()) {
                    for pid in descendants(*root) {
                        if let Some((_, hwm)) = rss_kib(pid) {
                            let e = peaks.entry(pid).or_insert(0);
                            *e = (*e).max(hwm);
                        }
                    }
                }
                if last {
                    return seen;
                }
                thread::sleep(RSS_SAMPLE_EVERY);
            }
        });
        PeakRss { stop, worker }
    }

    /// One last sample, then each tree's peak in KiB, in the order of the roots.
    pub fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.worker
            .join()
            .map(|seen| seen.iter().map(|m| m.values().sum()).collect())
            .unwrap_or_default()
    }
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn machine_info() -> serde_json::Value {
    let nproc = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    serde_json::json!({ "cpu": cpu, "nproc": nproc, "kernel": kernel, "loadavg_start": loadavg() })
}

/// The markdown header lines about the machine.
pub fn machine_md(m: &serde_json::Value) -> String {
    let mut s = format!(
        "- CPU: {} (nproc {})\n- kernel: {}\n- load average at start: {}, at end: {}\n",
        m["cpu"].as_str().unwrap_or(""),
        m["nproc"],
        m["kernel"].as_str().unwrap_or(""),
        m["loadavg_start"].as_str().unwrap_or(""),
        loadavg()
    );
    let load1: f64 = m["loadavg_start"]
        .as_str()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let nproc = m["nproc"].as_u64().unwrap_or(1) as f64;
    if load1 > 0.5 * nproc {
        s.push_str(&format!("- **warning: the machine was busy at the start (load {load1} on {nproc} CPUs): numbers are noisy**\n"));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Statistics

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Nearest-rank percentile of an already sorted slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Small utilities

pub fn find_bin(names: &[&str]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    names
        .iter()
        .find_map(|n| dirs.iter().map(|d| d.join(n)).find(|p| p.is_file()))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn run_ok(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first line of a command's output that contains `needle` (version strings).
pub fn first_line(cmd: &mut Command, needle: &str) -> String {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines()
                .find(|l| l.contains(needle))
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(_) => String::new(),
    }
}

pub fn wait_for_paths(
    paths: &[&Path],
    procs: &mut [Proc],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !paths.iter().all(|p| p.exists()) {
        for p in procs.iter_mut() {
            if let Some(st) = p.exited() {
                return Err(format!(
                    "{} exited during startup ({st})\n{}",
                    p.name,
                    p.log_tail()
                ));
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.log_tail()).collect();
            return Err(format!(
                "{paths:?} not there within {timeout:?}\n{}",
                logs.join("\n")
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A CA and host certificates (ECDSA P-256, DNS SAN = host name, server+client auth) made with
/// openssl: `ca.pem`, `ca.key`, `HOST.pem`, `HOST.key`. keyUsage is not critical and includes
/// keyEncipherment so that GnuTLS (QEMU's TLS) accepts the certificates as well.
pub fn openssl_certs(dir: &Path, hosts: &[&str]) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let o = |args: &str| {
        run_ok(
            Command::new("openssl")
                .args(args.split_whitespace())
                .current_dir(dir),
        )
        .map(|_| ())
    };
    let p256 = "-algorithm EC -pkeyopt ec_paramgen_curve:P-256";
    o(&format!("genpkey {p256} -out ca.key"))?;
    o(
        "req -x509 -new -key ca.key -subj /CN=bench-ca -days 2 -out ca.pem \
       -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
    )?;
    for h in hosts {
        fs::write(
            dir.join(format!("{h}.ext")),
            format!(
                "subjectAltName=DNS:{h}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        o(&format!("genpkey {p256} -out {h}.key"))?;
        o(&format!("req -new -key {h}.key -subj /CN={h} -out {h}.csr"))?;
        o(&format!("x509 -req -in {h}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out {h}.pem -extfile {h}.ext"))?;
    }
    Ok(())
}

/// `migtun certs init/issue` for host-a and host-b in `dir`.
pub fn migtun_certs(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    run_ok(
        Command::new(MIGTUN)
            .args(["certs", "init", "--dir"])
            .arg(dir),
    )?;
    for h in ["host-a", "host-b"] {
        run_ok(
            Command::new(MIGTUN)
                .args(["certs", "issue", "--dir"])
                .arg(dir)
                .args(["--name", h]),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tunnels: UNIX socket on the "source" -> ... -> UNIX socket on the "destination".

/// One forward of a tunnel: connections to `local` reach `target`.
#[derive(Clone, Debug)]
pub struct Fwd {
    pub local: PathBuf,
    pub target: PathBuf,
}

/// Where a client connects for a forward.
#[derive(Clone, Debug)]
pub enum Entry {
    Unix(PathBuf),
    Tcp(String),
}

/// Which end of a tunnel a relaying process is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Accepts the source's connections (socat/stunnel client, `ssh -L`, migtun host-a).
    Src,
    /// Connects to the target (socat/stunnel server, sshd, migtun host-b).
    Dst,
}

/// A process that carries a tunnel's bytes; its descendants (forked per-connection relays of
/// socat and sshd) count with it.
#[derive(Clone, Debug)]
pub struct Relay {
    pub side: Side,
    pub name: String,
    pub pid: i32,
}

impl Relay {
    fn of(side: Side, p: &Proc) -> Relay {
        Relay {
            side,
            name: p.name.clone(),
            pid: p.pid(),
        }
    }
}

/// A running tunnel; its processes stop (in reverse order) on drop.
pub struct Tunnel {
    pub entries: Vec<Entry>,
    pub procs: Vec<Proc>,
    pub note: String,
    /// Every relaying process, by side (empty for `direct`).
    pub relays: Vec<Relay>,
    /// The long-lived relaying processes whose own RSS is of interest (migtun agents, the ssh
    /// client and the listening sshd), if any.
    pub agents: Vec<(String, i32)>,
    /// Admin socket of the source agent (migtun with `admin`).
    pub admin: Option<PathBuf>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}

pub enum Setup {
    Up(Tunnel),
    Skipped(String),
}

pub fn direct(fwds: &[Fwd]) -> Result<Setup, String> {
    Ok(Setup::Up(Tunnel {
        entries: fwds.iter().map(|f| Entry::Unix(f.target.clone())).collect(),
        procs: vec![],
        note: "no tunnel: the limit".into(),
        relays: vec![],
        agents: vec![],
        admin: None,
    }))
}

pub fn socat(tmp: &Path, fwds: &[Fwd]) -> Result<Setup, String> {
    socat_impl(tmp, fwds, false)
}

pub fn socat_openssl(tmp: &Path, fwds: &[Fwd]) -> Result<Setup, String> {
    socat_impl(tmp, fwds, true)
}

/// socat's copy buffer (`-b`): 256 KiB instead of its 8 KiB default, so that the relay is not
/// dominated by syscalls (the same on both socat paths, and what the earlier numbers used).
const SOCAT_BUFFER: &str = "262144";

/// socat's listen backlog: its default is 5, so that 8 simultaneous connects lose SYNs and wait
/// for the 1 s retransmit; the other peers listen with 128 or more.
const SOCAT_BACKLOG: &str = "backlog=1024";

/// socat's server (listen) and client (connect) addresses of one forward over loopback `port`;
/// with `certs`, OpenSSL with TLS 1.3 minimum and mutual verification.
fn socat_addrs(port: u16, certs: Option<&Path>) -> (String, String) {
    let Some(certs) = certs else {
        return (
            format!("TCP-LISTEN:{port},fork,reuseaddr,{SOCAT_BACKLOG},bind=127.0.0.1"),
            format!("TCP:127.0.0.1:{port}"),
        );
    };
    let c = |n: &str| certs.join(n).display().to_string();
    let tls = "verify=1,openssl-min-proto-version=TLS1.3";
    (
        format!(
            "OPENSSL-LISTEN:{port},fork,reuseaddr,{SOCAT_BACKLOG},bind=127.0.0.1,cert={},key={},cafile={},{tls}",
            c("host-b.pem"),
            c("host-b.key"),
            c("ca.pem")
        ),
        format!(
            "OPENSSL:127.0.0.1:{port},cert={},key={},cafile={},commonname=host-b,{tls}",
            c("host-a.pem"),
            c("host-a.key"),
            c("ca.pem")
        ),
    )
}

fn socat_impl(tmp: &Path, fwds: &[Fwd], tls: bool) -> Result<Setup, String> {
    let Some(socat) = find_bin(&["socat"]) else {
        return Ok(Setup::Skipped("skipped: socat not installed".into()));
    };
    let certs = tmp.join("socat-certs");
    if tls {
        if find_bin(&["openssl"]).is_none() {
            return Ok(Setup::Skipped("skipped: openssl not installed".into()));
        }
        if !certs.join("ca.pem").exists() {
            openssl_certs(&certs, &["host-a", "host-b"])?;
        }
    }
    let tag = if tls { "socat-tls" } else { "socat" };
    let (mut procs, mut relays) = (vec![], vec![]);
    for (i, f) in fwds.iter().enumerate() {
        let (listen, connect) = socat_addrs(free_port(), tls.then_some(certs.as_path()));
        let server = Proc::spawn(
            &format!("socat server {i}"),
            Command::new(&socat)
                .args(["-b", SOCAT_BUFFER, &listen])
                .arg(format!("UNIX-CONNECT:{}", f.target.display())),
            tmp.join(format!("{tag}-server-{i}.log")),
        )?;
        let client = Proc::spawn(
            &format!("socat client {i}"),
            Command::new(&socat)
                .args(["-b", SOCAT_BUFFER])
                .arg(format!(
                    "UNIX-LISTEN:{},fork,unlink-early,{SOCAT_BACKLOG}",
                    f.local.display()
                ))
                .arg(connect),
            tmp.join(format!("{tag}-client-{i}.log")),
        )?;
        relays.extend([Relay::of(Side::Dst, &server), Relay::of(Side::Src, &client)]);
        procs.extend([server, client]);
    }
    wait_for_locals(fwds, &mut procs)?;
    let version = first_line(Command::new(&socat).arg("-V"), "socat version");
    let what = if tls {
        "OpenSSL TLS 1.3, mutual"
    } else {
        "no encryption"
    };
    Ok(Setup::Up(Tunnel {
        entries: unix_entries(fwds),
        procs,
        note: format!("{what}, -b {SOCAT_BUFFER}; {version}"),
        relays,
        agents: vec![],
        admin: None,
    }))
}

/// Where a client connects for each forward: its `local` UNIX socket.
fn unix_entries(fwds: &[Fwd]) -> Vec<Entry> {
    fwds.iter().map(|f| Entry::Unix(f.local.clone())).collect()
}

/// Waits until every forward's `local` socket exists (the tunnel's entry is bound).
fn wait_for_locals(fwds: &[Fwd], procs: &mut [Proc]) -> Result<(), String> {
    let locals: Vec<&Path> = fwds.iter().map(|f| f.local.as_path()).collect();
    wait_for_paths(&locals, procs, READY_TIMEOUT)
}

/// stunnel's server and client configurations: one service per forward, TLS 1.3, mutual.
fn stunnel_confs(certs: &Path, fwds: &[Fwd]) -> (String, String) {
    let c = |n: &str| certs.join(n).display().to_string();
    let tls = |me: &str| {
        format!(
            "cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
            c(&format!("{me}.pem")),
            c(&format!("{me}.key")),
            c("ca.pem")
        )
    };
    let mut server = String::from("foreground = yes\npid =\n");
    let mut client = server.clone();
    for (i, f) in fwds.iter().enumerate() {
        let port = free_port();
        server.push_str(&format!(
            "[s{i}]\naccept = 127.0.0.1:{port}\nconnect = {}\n{}",
            f.target.display(),
            tls("host-b")
        ));
        client.push_str(&format!(
            "[c{i}]\nclient = yes\naccept = {}\nconnect = 127.0.0.1:{port}\ncheckHost = host-b\n{}",
            f.local.display(),
            tls("host-a")
        ));
    }
    (server, client)
}

/// Two `stunnel` processes; the client accepts on each forward's UNIX socket (stunnel 5).
pub fn stunnel(tmp: &Path, fwds: &[Fwd]) -> Result<Setup, String> {
    let Some(stunnel) = find_bin(&["stunnel", "stunnel4"]) else {
        return Ok(Setup::Skipped("skipped: stunnel not installed".into()));
    };
    if find_bin(&["openssl"]).is_none() {
        return Ok(Setup::Skipped(
            "skipped: openssl (for certificates) not installed".into(),
        ));
    }
    let certs = tmp.join("stunnel-certs");
    if !certs.join("ca.pem").exists() {
        openssl_certs(&certs, &["host-a", "host-b"])?;
    }
    let (server, client) = stunnel_confs(&certs, fwds);
    let mut procs = vec![];
    for (role, conf) in [("server", server), ("client", client)] {
        let path = tmp.join(format!("stunnel-{role}.conf"));
        fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
        procs.push(Proc::spawn(
            &format!("stunnel {role}"),
            Command::new(&stunnel).arg(&path),
            tmp.join(format!("stunnel-{role}.log")),
        )?);
    }
    wait_for_locals(fwds, &mut procs)?;
    let version = first_line(Command::new(&stunnel).arg("-version"), "stunnel ");
    Ok(Setup::Up(Tunnel {
        entries: unix_entries(fwds),
        relays: vec![
            Relay::of(Side::Src, &procs[1]),
            Relay::of(Side::Dst, &procs[0]),
        ],
        procs,
        note: format!("TLS 1.3, mutual; {version}"),
        agents: vec![],
        admin: None,
    }))
}

/// The cipher of the ssh path: AES-128-GCM, the AEAD of the TLS 1.3 suites the other encrypted
/// paths negotiate, so that every path pays for comparable crypto.
const SSH_CIPHER: &str = "aes128-gcm@openssh.com";

/// The ssh path's host key, client key, authorized_keys and sshd_config in `d`.
fn ssh_files(keygen: &Path, d: &Path) -> Result<PathBuf, String> {
    let _ = fs::remove_dir_all(d);
    fs::create_dir_all(d).map_err(|e| e.to_string())?;
    for k in ["hostkey", "id"] {
        run_ok(
            Command::new(keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(k)),
        )?;
    }
    fs::copy(d.join("id.pub"), d.join("authorized_keys")).map_err(|e| e.to_string())?;
    let conf = d.join("sshd_config");
    fs::write(
        &conf,
        format!(
            "ListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nStrictModes no\nPermitRootLogin yes\n\
             UsePAM no\nPidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nAllowStreamLocalForwarding yes\nStreamLocalBindUnlink yes\nMaxSessions 1000\n",
            hk = d.join("hostkey").display(),
            ak = d.join("authorized_keys").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    Ok(conf)
}

/// A private `sshd` listening on loopback `port`, once it accepts connections.
fn start_sshd(sshd: &Path, conf: &Path, port: u16, log: PathBuf) -> Result<Proc, String> {
    // sshd insists on its privilege separation directory (creating it needs root).
    let _ = fs::create_dir_all("/run/sshd");
    let mut p = Proc::spawn(
        "sshd",
        Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(conf)
            .args(["-p", &port.to_string()]),
        log,
    )?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = p.exited() {
            return Err(format!("sshd exited ({st})\n{}", p.log_tail()));
        }
        if Instant::now() > deadline {
            return Err(format!("sshd not listening\n{}", p.log_tail()));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

/// `ssh -N -L local:target ...` to `user@127.0.0.1:port` with the key in `d`.
fn ssh_client_cmd(ssh: &Path, d: &Path, fwds: &[Fwd], port: u16, user: &str) -> Command {
    let mut cmd = Command::new(ssh);
    cmd.args(["-N", "-F", "/dev/null", "-i"]).arg(d.join("id"));
    for o in [
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "BatchMode=yes",
        "StreamLocalBindUnlink=yes",
        "ExitOnForwardFailure=yes",
        "LogLevel=ERROR",
    ] {
        cmd.args(["-o", o]);
    }
    cmd.args(["-c", SSH_CIPHER]);
    for f in fwds {
        cmd.arg("-L")
            .arg(format!("{}:{}", f.local.display(), f.target.display()));
    }
    cmd.args(["-p", &port.to_string(), &format!("{user}@127.0.0.1")]);
    cmd
}

/// A private `sshd` on loopback and `ssh -L` with one UNIX-to-UNIX forward per `fwds` entry.
pub fn ssh(tmp: &Path, fwds: &[Fwd]) -> Result<Setup, String> {
    let (Some(sshd), Some(ssh), Some(keygen)) = (
        find_bin(&["sshd"]),
        find_bin(&["ssh"]),
        find_bin(&["ssh-keygen"]),
    ) else {
        return Ok(Setup::Skipped(
            "skipped: sshd/ssh/ssh-keygen not installed".into(),
        ));
    };
    let d = tmp.join("ssh");
    let conf = ssh_files(&keygen, &d)?;
    let user = run_ok(Command::new("id").arg("-un"))?.trim().to_string();
    let port = free_port();
    let mut procs = vec![start_sshd(&sshd, &conf, port, d.join("sshd.log"))?];
    let mut cmd = ssh_client_cmd(&ssh, &d, fwds, port, &user);
    procs.push(Proc::spawn("ssh -L", &mut cmd, d.join("ssh.log"))?);
    wait_for_locals(fwds, &mut procs)?;
    let version = first_line(Command::new(&ssh).arg("-V"), "OpenSSH");
    let (sshd_pid, ssh_pid) = (procs[0].pid(), procs[1].pid());
    Ok(Setup::Up(Tunnel {
        entries: unix_entries(fwds),
        relays: vec![
            Relay::of(Side::Src, &procs[1]),
            Relay::of(Side::Dst, &procs[0]),
        ],
        procs,
        note: format!("{SSH_CIPHER}; {version}"),
        agents: vec![("ssh".into(), ssh_pid), ("sshd".into(), sshd_pid)],
        admin: None,
    }))
}

/// What two `migtun serve` agents get besides the forwards.
#[derive(Clone, Debug, Default)]
pub struct MigtunOpts {
    /// "tls" or "quic".
    pub transport: String,
    /// `admin` sockets and a `[qemu]` section with this prepare hook (for `migtun migrate`).
    pub qemu_hook: Option<PathBuf>,
    /// Where the agents' `qemu.run_dir`s go (tmpfs).
    pub run_dir: Option<PathBuf>,
}

/// The agent config of `me` (listening on `port`) with `peer` at `peer_port`, without forwards.
fn migtun_conf(
    d: &Path,
    o: &MigtunOpts,
    (me, port): (&str, u16),
    (peer, peer_port): (&str, u16),
) -> String {
    let c = |n: &str| d.join("certs").join(n).display().to_string();
    let mut s = format!("name = \"{me}\"\nlisten = \"127.0.0.1:{port}\"\n");
    if o.qemu_hook.is_some() {
        s.push_str(&format!(
            "admin = \"{}\"\n",
            d.join(format!("{me}.admin")).display()
        ));
    }
    s.push_str(&format!(
        "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n[[peer]]\nname = \"{peer}\"\naddress = \"127.0.0.1:{peer_port}\"\ntransport = \"{}\"\n",
        c(&format!("{me}.pem")),
        c(&format!("{me}.key")),
        c("ca.pem"),
        o.transport
    ));
    if let Some(hook) = &o.qemu_hook {
        let run = o
            .run_dir
            .clone()
            .unwrap_or_else(|| d.to_path_buf())
            .join(format!("run-{me}"));
        // Each agent its own journal: two agents on one state_dir refuse to start (it is locked).
        let state = run.with_file_name(format!("state-{me}"));
        let images = run.with_file_name(format!("images-{me}"));
        s.push_str(&format!(
            "\n[qemu]\nrun_dir = \"{}\"\nstate_dir = \"{}\"\nimage_dir = \"{}\"\nprepare_hook = \"{}\"\nallow_sources = [\"{peer}\"]\n",
            run.display(),
            state.display(),
            images.display(),
            hook.display()
        ));
    }
    s
}

/// host-a's and host-b's configs: host-a forwards `fwds[i].local` to route `r{i}`, host-b
/// exposes `r{i}` to `fwds[i].target`.
fn migtun_confs(d: &Path, fwds: &[Fwd], o: &MigtunOpts) -> (String, String) {
    let (pa, pb) = (free_port(), free_port());
    let mut a = migtun_conf(d, o, ("host-a", pa), ("host-b", pb));
    let mut b = migtun_conf(d, o, ("host-b", pb), ("host-a", pa));
    for (i, f) in fwds.iter().enumerate() {
        a.push_str(&format!(
            "\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"r{i}\"\n",
            f.local.display()
        ));
        b.push_str(&format!(
            "\n[[expose]]\nroute = \"r{i}\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
            f.target.display()
        ));
    }
    (a, b)
}

fn migtun_note(transport: &str) -> String {
    match transport {
        "quic" => format!(
            "QUIC (quinn), TLS 1.3, mutual, one connection, a QUIC stream per stream; congestion {}; certs: migtun certs",
            std::env::var("MIGTUN_QUIC_CONGESTION").unwrap_or_else(|_| "default".into())
        ),
        _ => "TLS 1.3 (rustls), mutual, one connection per stream; certs: migtun certs".into(),
    }
}

/// How long the two agents may take to bind their sockets (and admin sockets): twice
/// `READY_TIMEOUT`, room for two starts at once on a busy 2-core machine.
const MIGTUN_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Two `migtun serve` agents on loopback (see [`migtun_confs`]), once `migtun check` accepts
/// host-a's config and every forward's socket (and admin socket) is bound.
pub fn migtun(tmp: &Path, fwds: &[Fwd], o: &MigtunOpts) -> Result<Setup, String> {
    let d = tmp.join(format!("migtun-{}", o.transport));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    migtun_certs(&d.join("certs"))?;
    let (a, b) = migtun_confs(&d, fwds, o);
    let (conf_a, conf_b) = (d.join("host-a.toml"), d.join("host-b.toml"));
    fs::write(&conf_a, a).map_err(|e| e.to_string())?;
    fs::write(&conf_b, b).map_err(|e| e.to_string())?;
    run_ok(
        Command::new(MIGTUN)
            .args(["check", "--config"])
            .arg(&conf_a),
    )
    .map_err(|e| {
        format!(
            "migtun check refuses the config: {}",
            e.lines().last().unwrap_or("")
        )
    })?;
    let mut procs = vec![];
    for (host, conf) in [("host-b", &conf_b), ("host-a", &conf_a)] {
        procs.push(Proc::spawn(
            &format!("migtun {host}"),
            Command::new(MIGTUN).args(["serve", "--config"]).arg(conf),
            d.join(format!("{host}.log")),
        )?);
    }
    let mut wait: Vec<PathBuf> = fwds.iter().map(|f| f.local.clone()).collect();
    if o.qemu_hook.is_some() {
        wait.extend([d.join("host-a.admin"), d.join("host-b.admin")]);
    }
    let w: Vec<&Path> = wait.iter().map(|p| p.as_path()).collect();
    wait_for_paths(&w, &mut procs, MIGTUN_READY_TIMEOUT)?;
    let relays = vec![
        Relay::of(Side::Src, &procs[1]),
        Relay::of(Side::Dst, &procs[0]),
    ];
    Ok(Setup::Up(Tunnel {
        entries: unix_entries(fwds),
        agents: vec![
            ("host-a".into(), relays[0].pid),
            ("host-b".into(), relays[1].pid),
        ],
        relays,
        procs,
        note: migtun_note(&o.transport),
        admin: o.qemu_hook.as_ref().map(|_| d.join("host-a.admin")),
    }))
}

/// migtun over TLS, forwards only.
pub fn migtun_tls(tmp: &Path, fwds: &[Fwd]) -> Result<Setup, String> {
    let o = MigtunOpts {
        transport: "tls".into(),
        ..Default::default()
    };
    migtun(tmp, fwds, &o)
}

/// migtun over QUIC, forwards only; skipped when `migtun check` refuses `transport = "quic"`.
pub fn migtun_quic(tmp: &Path, fwds: &[Fwd]) -> Result<Setup, String> {
    if let Err(why) = quic_accepted(tmp) {
        return Ok(Setup::Skipped(why));
    }
    let o = MigtunOpts {
        transport: "quic".into(),
        ..Default::default()
    };
    migtun(tmp, fwds, &o)
}

/// Sets up a tunnel with the given forwards.
pub type SetupFn = fn(&Path, &[Fwd]) -> Result<Setup, String>;

/// Every tunnel path of the `throughput` and `latency` benches, in table order. Adding one is
/// one line here.
pub const TUNNEL_PATHS: &[(&str, SetupFn)] = &[
    ("direct", |_, f| direct(f)),
    ("socat", socat),
    ("socat-openssl", socat_openssl),
    ("stunnel", stunnel),
    ("ssh", ssh),
    ("migtun", migtun_tls),
    ("migtun-quic", migtun_quic),
];

/// Does `migtun check` accept `transport = "quic"`? `Err` carries its message.
pub fn quic_accepted(tmp: &Path) -> Result<(), String> {
    let d = tmp.join("quic-check");
    let _ = fs::remove_dir_all(&d);
    migtun_certs(&d)?;
    let conf = d.join("host-a.toml");
    fs::write(
        &conf,
        format!(
            "name = \"host-a\"\nlisten = \"127.0.0.1:{}\"\n\n[tls]\ncert = \"{a}/host-a.pem\"\nkey = \"{a}/host-a.key\"\nca = \"{a}/ca.pem\"\n\n\
             [[peer]]\nname = \"host-b\"\naddress = \"127.0.0.1:{}\"\ntransport = \"quic\"\n",
            free_port(),
            free_port(),
            a = d.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    run_ok(Command::new(MIGTUN).args(["check", "--config"]).arg(&conf))
        .map(|_| ())
        .map_err(|e| {
            let last = e
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string();
            format!("skipped: `migtun check` refuses transport = \"quic\": {last}")
        })
}

/// Where the benches write their results: `$CARGO_TARGET_DIR/bench`, else `target/bench`.
pub fn bench_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench")
}

pub fn json_out_path(name: &str) -> PathBuf {
    bench_dir().join(format!("{name}.json"))
}

/// Text for a markdown table cell: `|` escaped, lines joined.
pub fn md_cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The notes cell of a result in a bench's JSON: its note when `status` is `ok`, else
/// `status: message`.
pub fn notes_of(r: &serde_json::Value) -> String {
    let text = if r["status"] == "ok" {
        r["note"].as_str().unwrap_or("").to_string()
    } else {
        format!("{}: {}", r["status"].as_str().unwrap_or(""), r["message"].as_str().unwrap_or(""))
    };
    md_cell(&text)
}

/// Writes a bench's markdown next to its JSON file (same name, `.md`), for the report.
pub fn write_markdown(json: &Path, md: &str) {
    let path = json.with_extension("md");
    if let Some(d) = path.parent() {
        let _ = fs::create_dir_all(d);
    }
    if let Err(e) = fs::write(&path, md) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}

pub fn write_json(path: &Path, v: &serde_json::Value) {
    if let Some(d) = path.parent() {
        let _ = fs::create_dir_all(d);
    }
    match fs::write(path, serde_json::to_string_pretty(v).unwrap_or_default()) {
        Ok(()) => eprintln!("raw numbers: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments: each bench has its own `#[derive(clap::Parser)]` struct; these are the shared parts.

/// What `cargo bench` adds to the arguments of every `harness = false` bench: `--bench`,
/// accepted and ignored (hidden from `--help`). Flatten it into each bench's arguments.
#[derive(clap::Args, Debug)]
pub struct CargoBench {
    #[arg(long = "bench", hide = true)]
    bench: bool,
}

/// A comma-separated list of path names (`--only a,b`), each checked against the bench's paths.
#[derive(Clone, Debug)]
pub struct Names(pub Vec<String>);

impl std::ops::Deref for Names {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for Names {
    /// As `--only` takes it (clap shows defaults this way).
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl Names {
    /// Every name of `known`, in its order: the default of `--only`.
    pub fn all(known: &[&str]) -> Names {
        Names(known.iter().map(|s| s.to_string()).collect())
    }

    /// Parses `v` (`a,b,...`; blanks and empty items ignored); a name not in `known` is an error
    /// that lists the known ones. `none` is the empty list when `none_ok`.
    pub fn parse(v: &str, known: &[&str], none_ok: bool) -> Result<Names, String> {
        if none_ok && v == "none" {
            return Ok(Names(vec![]));
        }
        let list: Vec<String> = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        match list.iter().find(|p| !known.contains(&p.as_str())) {
            Some(p) => Err(format!("unknown path {p:?}; known: {}", known.join(","))),
            None => Ok(Names(list)),
        }
    }
}

/// The names of `paths` (a bench's table of paths), in order.
pub fn names_of<T>(paths: &[(&'static str, T)]) -> Vec<&'static str> {
    paths.iter().map(|p| p.0).collect()
}
