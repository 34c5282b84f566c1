//! Shared helpers of the `latency` and `migration` benches: child processes in their own
//! process groups (stopped on drop, on panic and on SIGINT/SIGTERM/SIGHUP), certificates,
//! tunnels (socat, socat+OpenSSL, stunnel, ssh -L, migtun TLS/QUIC) with any number of
//! UNIX-to-UNIX forwards, /proc readings and small statistics.
//!
//! Parts of the tunnel set-up are copied from `throughput.rs` (which another bench owns) and
//! generalised to several forwards per tunnel.

#![allow(dead_code)]

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
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
            return r.rlim_cur as u64;
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

/// user+sys CPU seconds of a process and all its live descendants (sshd forks a child per
/// connection, which calls setsid(); socat forks per connection).
pub fn cpu_secs_group(root: i32) -> f64 {
    let mut procs = vec![];
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(ppid) = s
                .rsplit_once(')')
                .and_then(|r| r.1.split_whitespace().nth(1)?.parse::<i32>().ok())
            else {
                continue;
            };
            procs.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(procs.iter().filter(|x| x.1 == p).map(|x| x.0));
        i += 1;
    }
    tree.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).sum()
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

/// A running tunnel; its processes stop (in reverse order) on drop.
pub struct Tunnel {
    pub entries: Vec<Entry>,
    pub procs: Vec<Proc>,
    pub note: String,
    /// Pids of the two relaying processes whose RSS is of interest (migtun agents), if any.
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
    let c = |n: &str| certs.join(n).display().to_string();
    let mut procs = vec![];
    let mut entries = vec![];
    for (i, f) in fwds.iter().enumerate() {
        let port = free_port();
        let (listen, connect) = if tls {
            (
                format!(
                    "OPENSSL-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1,cert={},key={},cafile={},verify=1,openssl-min-proto-version=TLS1.3",
                    c("host-b.pem"),
                    c("host-b.key"),
                    c("ca.pem")
                ),
                format!(
                    "OPENSSL:127.0.0.1:{port},cert={},key={},cafile={},verify=1,commonname=host-b,openssl-min-proto-version=TLS1.3",
                    c("host-a.pem"),
                    c("host-a.key"),
                    c("ca.pem")
                ),
            )
        } else {
            (
                format!("TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1"),
                format!("TCP:127.0.0.1:{port}"),
            )
        };
        procs.push(Proc::spawn(
            &format!("socat server {i}"),
            Command::new(&socat).args([
                "-b".to_string(),
                "262144".into(),
                listen,
                format!("UNIX-CONNECT:{}", f.target.display()),
            ]),
            tmp.join(format!(
                "socat{}-server-{i}.log",
                if tls { "-tls" } else { "" }
            )),
        )?);
        procs.push(Proc::spawn(
            &format!("socat client {i}"),
            Command::new(&socat).args([
                "-b".to_string(),
                "262144".into(),
                format!("UNIX-LISTEN:{},fork,unlink-early", f.local.display()),
                connect,
            ]),
            tmp.join(format!(
                "socat{}-client-{i}.log",
                if tls { "-tls" } else { "" }
            )),
        )?);
        entries.push(Entry::Unix(f.local.clone()));
    }
    let locals: Vec<&Path> = fwds.iter().map(|f| f.local.as_path()).collect();
    wait_for_paths(&locals, &mut procs, READY_TIMEOUT)?;
    let version = first_line(Command::new(&socat).arg("-V"), "socat version");
    let what = if tls {
        "OpenSSL TLS 1.3, mutual, -b 262144"
    } else {
        "no encryption, -b 262144"
    };
    Ok(Setup::Up(Tunnel {
        entries,
        procs,
        note: format!("{what}; {version}"),
        agents: vec![],
        admin: None,
    }))
}

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
    let c = |n: &str| certs.join(n).display().to_string();
    let mut server = String::from("foreground = yes\npid =\n");
    let mut client = String::from("foreground = yes\npid =\n");
    for (i, f) in fwds.iter().enumerate() {
        let port = free_port();
        server.push_str(&format!(
            "[s{i}]\naccept = 127.0.0.1:{port}\nconnect = {t}\ncert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
            t = f.target.display(),
            cert = c("host-b.pem"),
            key = c("host-b.key"),
            ca = c("ca.pem"),
        ));
        client.push_str(&format!(
            "[c{i}]\nclient = yes\naccept = {l}\nconnect = 127.0.0.1:{port}\ncert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\ncheckHost = host-b\nsslVersionMin = TLSv1.3\n",
            l = f.local.display(),
            cert = c("host-a.pem"),
            key = c("host-a.key"),
            ca = c("ca.pem"),
        ));
    }
    let (sc, cc) = (
        tmp.join("stunnel-server.conf"),
        tmp.join("stunnel-client.conf"),
    );
    fs::write(&sc, server).map_err(|e| e.to_string())?;
    fs::write(&cc, client).map_err(|e| e.to_string())?;
    let mut procs = vec![
        Proc::spawn(
            "stunnel server",
            Command::new(&stunnel).arg(&sc),
            tmp.join("stunnel-server.log"),
        )?,
        Proc::spawn(
            "stunnel client",
            Command::new(&stunnel).arg(&cc),
            tmp.join("stunnel-client.log"),
        )?,
    ];
    let locals: Vec<&Path> = fwds.iter().map(|f| f.local.as_path()).collect();
    wait_for_paths(&locals, &mut procs, READY_TIMEOUT)?;
    let version = first_line(Command::new(&stunnel).arg("-version"), "stunnel ");
    Ok(Setup::Up(Tunnel {
        entries: fwds.iter().map(|f| Entry::Unix(f.local.clone())).collect(),
        procs,
        note: format!("TLS 1.3, mutual; {version}"),
        agents: vec![],
        admin: None,
    }))
}

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
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let _ = fs::create_dir_all("/run/sshd");
    for k in ["hostkey", "id"] {
        run_ok(
            Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(k)),
        )?;
    }
    fs::copy(d.join("id.pub"), d.join("authorized_keys")).map_err(|e| e.to_string())?;
    let user = run_ok(Command::new("id").arg("-un"))?.trim().to_string();
    let port = free_port();
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
    let mut procs = vec![Proc::spawn(
        "sshd",
        Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(&conf)
            .args(["-p", &port.to_string()]),
        d.join("sshd.log"),
    )?];
    let deadline = Instant::now() + READY_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = procs[0].exited() {
            return Err(format!("sshd exited ({st})\n{}", procs[0].log_tail()));
        }
        if Instant::now() > deadline {
            return Err(format!("sshd not listening\n{}", procs[0].log_tail()));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let mut cmd = Command::new(&ssh);
    cmd.args(["-N", "-F", "/dev/null", "-i"])
        .arg(d.join("id"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
            "-c",
            "aes128-gcm@openssh.com",
        ]);
    for f in fwds {
        cmd.arg("-L")
            .arg(format!("{}:{}", f.local.display(), f.target.display()));
    }
    cmd.args(["-p", &port.to_string(), &format!("{user}@127.0.0.1")]);
    procs.push(Proc::spawn("ssh -L", &mut cmd, d.join("ssh.log"))?);
    let locals: Vec<&Path> = fwds.iter().map(|f| f.local.as_path()).collect();
    wait_for_paths(&locals, &mut procs, READY_TIMEOUT)?;
    let version = first_line(Command::new(&ssh).arg("-V"), "OpenSSH");
    let (sshd_pid, ssh_pid) = (procs[0].pid(), procs[1].pid());
    Ok(Setup::Up(Tunnel {
        entries: fwds.iter().map(|f| Entry::Unix(f.local.clone())).collect(),
        procs,
        note: format!("aes128-gcm@openssh.com; {version}"),
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

/// Two `migtun serve` agents on loopback: host-a forwards each `fwds[i].local` to route `r{i}`,
/// host-b exposes `r{i}` to `fwds[i].target`.
pub fn migtun(tmp: &Path, fwds: &[Fwd], o: &MigtunOpts) -> Result<Setup, String> {
    let d = tmp.join(format!("migtun-{}", o.transport));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let certs = d.join("certs");
    migtun_certs(&certs)?;
    let (pa, pb) = (free_port(), free_port());
    let c = |n: &str| certs.join(n).display().to_string();
    let conf = |me: &str, port: u16, peer: &str, peer_port: u16| {
        let mut s = format!("name = \"{me}\"\nlisten = \"127.0.0.1:{port}\"\n",);
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
                .unwrap_or_else(|| d.clone())
                .join(format!("run-{me}"));
            s.push_str(&format!(
                "\n[qemu]\nrun_dir = \"{}\"\nprepare_hook = \"{}\"\n",
                run.display(),
                hook.display()
            ));
        }
        s
    };
    let mut ca = conf("host-a", pa, "host-b", pb);
    let mut cb = conf("host-b", pb, "host-a", pa);
    for (i, f) in fwds.iter().enumerate() {
        ca.push_str(&format!(
            "\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"r{i}\"\n",
            f.local.display()
        ));
        cb.push_str(&format!(
            "\n[[expose]]\nroute = \"r{i}\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
            f.target.display()
        ));
    }
    let (conf_a, conf_b) = (d.join("host-a.toml"), d.join("host-b.toml"));
    fs::write(&conf_a, ca).map_err(|e| e.to_string())?;
    fs::write(&conf_b, cb).map_err(|e| e.to_string())?;
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
    let mut procs = vec![
        Proc::spawn(
            "migtun host-b",
            Command::new(MIGTUN)
                .args(["serve", "--config"])
                .arg(&conf_b),
            d.join("host-b.log"),
        )?,
        Proc::spawn(
            "migtun host-a",
            Command::new(MIGTUN)
                .args(["serve", "--config"])
                .arg(&conf_a),
            d.join("host-a.log"),
        )?,
    ];
    let mut wait: Vec<PathBuf> = fwds.iter().map(|f| f.local.clone()).collect();
    if o.qemu_hook.is_some() {
        wait.push(d.join("host-a.admin"));
        wait.push(d.join("host-b.admin"));
    }
    let w: Vec<&Path> = wait.iter().map(|p| p.as_path()).collect();
    wait_for_paths(&w, &mut procs, Duration::from_secs(20))?;
    let agents = vec![
        ("host-a".to_string(), procs[1].pid()),
        ("host-b".to_string(), procs[0].pid()),
    ];
    Ok(Setup::Up(Tunnel {
        entries: fwds.iter().map(|f| Entry::Unix(f.local.clone())).collect(),
        procs,
        note: match o.transport.as_str() {
            "quic" => "QUIC (quinn), TLS 1.3, mutual; certs: migtun certs".into(),
            _ => "TLS 1.3 (rustls), mutual, one connection per stream; certs: migtun certs".into(),
        },
        agents,
        admin: o.qemu_hook.as_ref().map(|_| d.join("host-a.admin")),
    }))
}

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

pub fn json_out_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench").join(format!("{name}.json"))
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

/// `--key value` / `--key=value` arguments (anything else, e.g. cargo's `--bench`, is ignored).
pub fn args() -> Vec<(String, String)> {
    let mut out = vec![];
    let mut it = std::env::args().skip(1).peekable();
    while let Some(a) = it.next() {
        if let Some((k, v)) = a.split_once('=').filter(|(k, _)| k.starts_with("--")) {
            out.push((k.to_string(), v.to_string()));
        } else if a.starts_with("--") && a != "--bench" {
            let v = match it.peek() {
                Some(n) if !n.starts_with("--") => it.next().unwrap(),
                _ => String::new(),
            };
            out.push((a, v));
        }
    }
    out
}
