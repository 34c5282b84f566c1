//! The agent as an operator's service manager and health checks see it (issue 12, items 5 and
//! 6): `contrib/systemd/migtun.service` passes `systemd-analyze verify`; `migtun serve` under
//! `Type=notify` says READY=1 only once its port, forward, metrics listener and admin socket
//! accept connections, and STOPPING=1 on SIGTERM; `/healthz`, `/readyz` and
//! `migtun healthcheck` against real agents (draining, a reachable and an unreachable peer).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");
/// Start-up of a debug build on a busy 2-core machine stays well under this.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn run(args: &[&str]) -> Output {
    Command::new(MIGTUN).args(args).output().expect("run migtun")
}

fn make_pki(dir: &Path) {
    let d = dir.to_str().unwrap();
    let out = run(&["certs", "init", "--dir", d]);
    assert!(out.status.success(), "certs init: {}", String::from_utf8_lossy(&out.stderr));
    for host in ["host-a", "host-b"] {
        let out = run(&["certs", "issue", "--dir", d, "--name", host]);
        assert!(out.status.success(), "certs issue: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A free TCP port on loopback (bound, then released for the agent to bind).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A `migtun serve` child, killed if the test fails before it stops.
struct Agent {
    child: Child,
    notify: UnixDatagram,
    stderr: PathBuf,
}

impl Agent {
    fn start(dir: &Path, name: &str, toml: &str) -> Agent {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let notify_path = dir.join(format!("{name}.notify"));
        let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
        let stderr = dir.join(format!("{name}.log"));
        let child = Command::new(MIGTUN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn migtun serve");
        Agent { child, notify, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next notification datagram (sd_notify: newline-separated `KEY=value` lines).
    fn next_notification(&mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            self.notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            match self.notify.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("migtun serve exited ({status}) before notifying:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no notification within {within:?}:\n{}", self.log());
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, not yet reaped (wait happens after this).
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "migtun serve still running after {within:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET: status code and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("status line: {head}"));
    (code, body.to_string())
}

fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin").join(name), PathBuf::from("/bin").join(name)])
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{name} is missing: CI must install it (.ci/run)");
        eprintln!("\n!!! SKIPPED: {name} is not installed; this test did not run !!!\n");
    }
    found
}

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/migtun.service")).unwrap()
}

/// `systemd-analyze verify` on a copy of the unit whose ExecStart names the built binary (verify
/// checks that it exists). Returns the warnings about the unit.
fn verify(analyze: &Path, unit: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("migtun.service");
    std::fs::write(&path, unit.replace("/usr/bin/migtun", MIGTUN)).unwrap();
    let out = Command::new(analyze).args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems: Vec<String> = stderr.lines().filter(|l| l.contains("migtun")).map(String::from).collect();
    if !out.status.success() {
        problems.push(format!("exit status {}: {stderr}", out.status));
    }
    problems
}

#[test]
fn the_systemd_unit_verifies_and_says_what_the_agent_needs() {
    let Some(analyze) = tool("systemd-analyze") else { return };
    let unit = unit_text();
    assert_eq!(verify(&analyze, &unit), Vec::<String>::new(), "systemd-analyze verify");
    // The check can fail: a misspelt key is reported.
    assert!(!verify(&analyze, &unit.replace("KillMode=", "KilMode=")).is_empty(), "verify reports an unknown key");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RuntimeDirectory=migtun",
        "StateDirectory=migtun",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "KillMode=process",
        "LimitNOFILE=524288",
        "ReadWritePaths=/run/migtun /var/lib/migtun",
        "CapabilityBoundingSet=CAP_CHOWN CAP_DAC_OVERRIDE CAP_KILL CAP_SETUID CAP_SETGID",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit has {line:?}");
    }
    // The default journal directory is the unit's StateDirectory.
    assert_eq!(migtun_proxy::config::DEFAULT_STATE_DIR, "/var/lib/migtun");
}

/// READY=1 arrives once everything accepts connections (checked the moment it arrives), with
/// the port in STATUS=; STOPPING=1 follows SIGTERM, then a clean exit.
#[test]
fn serve_notifies_ready_once_everything_listens_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let (listen, metrics, peer) = (free_port(), free_port(), free_port());
    let toml = format!(
        "name = \"host-a\"\nlisten = \"{listen}\"\nadmin = \"{0}/admin.sock\"\nmetrics = \"{metrics}\"\n\
         [tls]\ncert = \"{0}/host-a.pem\"\nkey = \"{0}/host-a.key\"\nca = \"{0}/ca.pem\"\n\
         [[peer]]\nname = \"host-b\"\naddress = \"{peer}\"\ntransport = \"tls\"\n\
         [[forward]]\nlisten = \"unix:{0}/migration.sock\"\npeer = \"host-b\"\nroute = \"migration\"\n",
        d.display()
    );
    let mut agent = Agent::start(d, "host-a", &toml);
    let ready = agent.next_notification(START_TIMEOUT);
    // At this instant every listener must take connections.
    TcpStream::connect(listen).unwrap_or_else(|e| panic!("port {listen} after READY=1: {e}"));
    UnixStream::connect(d.join("migration.sock")).expect("forward socket after READY=1");
    UnixStream::connect(d.join("admin.sock")).expect("admin socket after READY=1");
    let (code, body) = get(metrics, "/readyz");
    assert!(ready.lines().any(|l| l == "READY=1"), "first notification is READY=1: {ready:?}");
    assert!(ready.contains(&format!("STATUS=serving on {listen}")), "{ready:?}");
    assert_eq!(code, 200, "ready after READY=1: {body}");

    agent.signal(libc::SIGTERM);
    let stopping = agent.next_notification(Duration::from_secs(10));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "SIGTERM: STOPPING=1, got {stopping:?}");
    assert!(stopping.contains("STATUS=draining"), "{stopping:?}");
    let status = agent.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit {status}:\n{}", agent.log());
    assert!(!d.join("admin.sock").exists() || UnixStream::connect(d.join("admin.sock")).is_err());
}

/// Without NOTIFY_SOCKET nothing is sent and nothing fails; a bad NOTIFY_SOCKET is logged, and
/// the agent serves anyway.
#[test]
fn serve_without_a_service_manager_serves_anyway() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let (listen, metrics, peer) = (free_port(), free_port(), free_port());
    let toml = format!(
        "name = \"host-a\"\nlisten = \"{listen}\"\nmetrics = \"{metrics}\"\n\
         [tls]\ncert = \"{0}/host-a.pem\"\nkey = \"{0}/host-a.key\"\nca = \"{0}/ca.pem\"\n\
         [[peer]]\nname = \"host-b\"\naddress = \"{peer}\"\ntransport = \"tls\"\n",
        d.display()
    );
    std::fs::write(d.join("a.toml"), toml).unwrap();
    let mut child = Command::new(MIGTUN)
        .args(["serve", "--config"])
        .arg(d.join("a.toml"))
        .env("NOTIFY_SOCKET", d.join("nobody-listens-here"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect(metrics).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(Instant::now() < deadline, "metrics never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // READY=1 is sent right after "agent serving": wait for /readyz, then stop.
    let deadline = Instant::now() + START_TIMEOUT;
    while get(metrics, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("cannot notify systemd"), "the failed notification is logged:\n{log}");
}

/// `/healthz` and `/readyz` on the metrics listener of two real agents, and `migtun healthcheck`:
/// a peer that answered is reachable, one that did not is not (with the error); while draining
/// `/readyz` is 503 and `healthcheck --ready` exits 1 while `/healthz` stays 200.
#[test]
fn health_endpoints_and_healthcheck_follow_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let (pa, pb, ma, mb, nobody) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let tls = |name: &str| format!("[tls]\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\nca = \"{0}/ca.pem\"\n", d.display());
    let target = UnixListener::bind(d.join("target.sock")).unwrap();
    let b = format!(
        "name = \"host-b\"\nlisten = \"{pb}\"\nmetrics = \"{mb}\"\n{}\
         [[peer]]\nname = \"host-a\"\naddress = \"{pa}\"\ntransport = \"tls\"\n\
         [[expose]]\nroute = \"echo\"\ntarget = \"unix:{}/target.sock\"\nallow = [\"host-a\"]\n",
        tls("host-b"),
        d.display()
    );
    // host-a knows host-b twice over: as itself, and under a second name at an address where
    // nothing listens (the certificate does not matter: the TCP connect fails first).
    let a = format!(
        "name = \"host-a\"\nlisten = \"{pa}\"\nmetrics = \"{ma}\"\ndrain_timeout_secs = 20\n{}\
         [[peer]]\nname = \"host-b\"\naddress = \"{pb}\"\ntransport = \"tls\"\n\
         [[peer]]\nname = \"host-c\"\naddress = \"{nobody}\"\ntransport = \"tls\"\n\
         [[forward]]\nlisten = \"unix:{1}/to-b.sock\"\npeer = \"host-b\"\nroute = \"echo\"\n\
         [[forward]]\nlisten = \"unix:{1}/to-c.sock\"\npeer = \"host-c\"\nroute = \"echo\"\n",
        tls("host-a"),
        d.display()
    );
    let mut agent_b = Agent::start(d, "host-b", &b);
    let mut agent_a = Agent::start(d, "host-a", &a);
    assert!(agent_b.next_notification(START_TIMEOUT).contains("READY=1"));
    assert!(agent_a.next_notification(START_TIMEOUT).contains("READY=1"));

    let (code, body) = get(ma, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = get(ma, "/readyz");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["listening"], true);
    assert_eq!(v["listen"], pa.to_string());
    assert_eq!(v["certificate"]["valid"], true);
    // `migtun certs issue`'s default validity, 730 days (a day's slack either way).
    let left = v["certificate"]["expires_in_secs"].as_i64().unwrap();
    assert!((729 * 86400..=731 * 86400).contains(&left), "{body}");

    // A stream to host-b (held open) and one to host-c (fails).
    let mut to_b = UnixStream::connect(d.join("to-b.sock")).unwrap();
    to_b.write_all(b"ping").unwrap();
    let (mut served, _) = target.accept().expect("host-b connects the stream to its target");
    let mut got = [0u8; 4];
    served.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    let mut to_c = UnixStream::connect(d.join("to-c.sock")).unwrap();
    to_c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = to_c.read(&mut [0u8; 1]); // closed (or reset) once the dial fails
    let (_, body) = get(ma, "/readyz");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["peers"]["host-b"]["reachable"], true, "{body}");
    assert_eq!(v["peers"]["host-c"]["reachable"], false, "{body}");
    assert!(v["peers"]["host-c"]["error"].as_str().unwrap_or_default().contains(&nobody.to_string()), "{body}");
    assert!(v["peers"]["host-c"]["last_connect"].as_i64().is_some(), "{body}");
    // host-b has not dialled host-a: not known yet, and that does not make it unready.
    let (code, body) = get(mb, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["peers"]["host-a"]["reachable"].is_null(), "{body}");

    let hc = |args: &[&str]| {
        let mut all = vec!["healthcheck"];
        all.extend_from_slice(args);
        run(&all)
    };
    let ma_s = ma.to_string();
    let out = hc(&["--metrics", &ma_s]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("healthy"), "{out:?}");
    let out = hc(&["--metrics", &ma_s, "--ready"]);
    assert!(out.status.success(), "{out:?}");
    let out = hc(&["--config", d.join("host-a.toml").to_str().unwrap(), "--ready"]);
    assert!(out.status.success(), "{out:?}");
    let out = hc(&["--url", &format!("http://{ma}/nothing")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"), "{out:?}");
    let out = hc(&["--metrics", &nobody.to_string()]);
    assert_eq!(out.status.code(), Some(1), "nothing listens: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"), "{out:?}");

    // Draining with the stream to host-b still open: not ready, still alive.
    agent_a.signal(libc::SIGTERM);
    assert!(agent_a.next_notification(Duration::from_secs(10)).contains("STOPPING=1"));
    let (code, body) = get(ma, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(get(ma, "/healthz").0, 200);
    let out = hc(&["--metrics", &ma_s, "--ready"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("503") && stderr.contains("draining"), "{stderr}");
    assert!(hc(&["--metrics", &ma_s]).status.success(), "alive while draining");
    // The stream ends: the drain ends, the agent exits.
    drop(served);
    drop(to_b);
    assert!(agent_a.wait_exit(Duration::from_secs(20)).success(), "{}", agent_a.log());
    drop(agent_b);
}
