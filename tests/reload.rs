//! Reload and restart hand-over, with real agents and real certificates.
//!
//! - `migtun serve` in its own process reloads on SIGHUP and on `migtun reload`: forwards come
//!   and go (a removed forward's socket file goes, its open stream finishes byte-exact), an
//!   invalid config is refused with the lines `migtun check` prints and the old one keeps
//!   working, a key that needs a restart is named, and SIGHUP no longer ends the agent.
//! - In this process, a reload swaps exposed routes, a re-issued certificate and a CRL that
//!   revokes the peer: new handshakes (and old connections' new streams) follow at once.
//! - A second `migtun serve` on the same config starts while the first drains an open stream:
//!   the stream completes exactly, new streams reach the new agent, and the new agent takes
//!   the UDP port once the old one is gone.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");

/// `migtun serve` in its own process, logging JSON lines to a file.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn spawn(config: &Path, log: PathBuf) -> Serve {
        let child = Command::new(MIGTUN)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn migtun serve");
        Serve { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid, which has not been waited for (Drop waits).
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0, "kill");
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits until the log has a line containing `needle`.
    async fn wait_log(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log_text().contains(needle) {
            assert!(self.alive(), "the agent exited while waiting for {needle:?}; its log:\n{}", self.log_text());
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit; its log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One stream through the forward socket `sock`: whether the hash target's digest of 64 KiB
/// came back exact (a refused route closes the local connection without an answer).
async fn stream_works(sock: &Path, seed: u64) -> bool {
    let data = DataGen::new(seed).bytes(64 * 1024);
    let Ok(mut s) = UnixStream::connect(sock).await else { return false };
    let exchange = async {
        s.write_all(&data).await?;
        s.shutdown().await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    matches!(tokio::time::timeout(Duration::from_secs(20), exchange).await, Ok(Ok(answer)) if answer == digest_of(&data))
}

/// A stream sent in two halves with something done in between: the digest is checked at the end.
struct HalfStream {
    s: UnixStream,
    gen: DataGen,
    hasher: Sha256,
    sent: u64,
}

impl HalfStream {
    async fn open(sock: &Path, seed: u64) -> HalfStream {
        let s = UnixStream::connect(sock).await.expect("connect to the forward socket");
        HalfStream { s, gen: DataGen::new(seed), hasher: Sha256::new(), sent: 0 }
    }

    async fn send(&mut self, n: usize) {
        let chunk = self.gen.bytes(n);
        self.hasher.update(&chunk);
        self.s.write_all(&chunk).await.expect("write through the tunnel");
        self.sent += n as u64;
    }

    /// Half-closes and checks the hash target's answer.
    async fn finish(mut self) {
        self.s.shutdown().await.expect("half-close");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), self.s.read_to_end(&mut answer))
            .await
            .expect("answer in time")
            .expect("read the answer");
        let mut expected = [0u8; 40];
        expected[..8].copy_from_slice(&self.sent.to_le_bytes());
        expected[8..].copy_from_slice(&self.hasher.finalize());
        assert_eq!(answer, expected, "the stream open across the change carried its bytes exactly");
    }
}

/// `migtun reload --admin SOCKET`: exit success, stdout, stderr.
fn migtun_reload(admin: &Path) -> (bool, String, String) {
    let out = Command::new(MIGTUN).args(["reload", "--admin"]).arg(admin).output().expect("run migtun reload");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// host-a as `migtun serve` (admin socket, one forward per `(route, socket)`) towards host-b.
fn host_a_config(pki: &Pki, addr_a: SocketAddr, addr_b: SocketAddr, forwards: &[(&str, &str)], extra: &str) -> String {
    let mut a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\nadmin = \"{}\"\n{extra}{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\n",
        pki.path("a.admin").display(),
        tls_table(&pki.pki(), "host-a"),
    );
    for (route, sock) in forwards {
        a.push_str(&format!("\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"{route}\"\n", pki.path(sock).display()));
    }
    a
}

/// host-b: exposes each route on `hash.sock` to host-a (`tls_extra` goes into `[tls]`).
fn host_b_config(pki: &Pki, addr_a: SocketAddr, addr_b: SocketAddr, routes: &[&str], tls_extra: &str) -> String {
    let mut b = format!(
        "name = \"host-b\"\nlisten = \"{addr_b}\"\n{}{tls_extra}\n[[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\n",
        tls_table(&pki.pki(), "host-b"),
    );
    for route in routes {
        b.push_str(&format!(
            "\n[[expose]]\nroute = \"{route}\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
            pki.path("hash.sock").display()
        ));
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_migtun_reload_move_forwards_and_refuse_bad_configs() {
    let pki = Pki::new();
    let _target = spawn_hash_target(pki.path("hash.sock"));
    let port_b = bind_port().await;
    let addr_b = port_b.local_addr().unwrap();
    let addr_a = bind_port().await.local_addr().unwrap();
    let b = start_agent(pki.dir.path(), "host-b", &host_b_config(&pki, addr_a, addr_b, &["one", "two"], ""), port_b).await;

    let config = pki.path("host-a.toml");
    std::fs::write(&config, host_a_config(&pki, addr_a, addr_b, &[("one", "one.sock")], "")).unwrap();
    let mut a = Serve::spawn(&config, pki.path("host-a.log"));
    a.wait_log("agent serving").await;
    let (one, two, admin) = (pki.path("one.sock"), pki.path("two.sock"), pki.path("a.admin"));
    wait_for("the admin socket", || admin.exists()).await;
    assert!(stream_works(&one, 1).await, "route one before the reload");

    // A stream opened before the reload, on the forward the reload removes.
    let mut open = HalfStream::open(&one, 2).await;
    open.send(1 << 20).await;

    std::fs::write(&config, host_a_config(&pki, addr_a, addr_b, &[("two", "two.sock")], "drain_timeout_secs = 7\n")).unwrap();
    a.signal(libc::SIGHUP);
    wait_for("two.sock listening, one.sock gone", || two.exists() && !one.exists()).await;
    a.wait_log("reloaded").await;
    assert!(a.alive(), "SIGHUP does not end the agent");
    let log = a.log_text();
    for change in ["forward: unix:", "removed (its open streams finish)", "added", "drain_timeout_secs: 30 -> 7"] {
        assert!(log.contains(change), "the log says what changed ({change:?}):\n{log}");
    }

    open.send(1 << 20).await;
    open.finish().await;
    assert!(stream_works(&two, 3).await, "the route the reload added carries bytes");
    assert!(UnixStream::connect(&one).await.is_err(), "the removed forward no longer accepts");

    // An invalid config: refused with the line `migtun check` prints, the old config stays.
    let bad = host_a_config(&pki, addr_a, addr_b, &[("two", "two.sock")], "").replace("peer = \"host-b\"\nroute", "peer = \"host-x\"\nroute");
    std::fs::write(&config, &bad).unwrap();
    let check = Command::new(MIGTUN).args(["check", "--config"]).arg(&config).output().unwrap();
    assert!(!check.status.success());
    let check_line = String::from_utf8_lossy(&check.stderr).lines().next().unwrap_or_default().trim_start_matches("migtun: ").to_string();
    assert!(check_line.contains("`forward[0].peer`"), "{check_line}");
    let (ok, _, err) = migtun_reload(&admin);
    assert!(!ok, "migtun reload fails on an invalid config");
    assert!(err.contains(&check_line), "the same message as `migtun check` ({check_line:?}):\n{err}");
    assert!(stream_works(&two, 4).await, "the running config keeps working");

    // A key that cannot change live is named.
    let other = bind_port().await.local_addr().unwrap();
    std::fs::write(&config, host_a_config(&pki, other, addr_b, &[("two", "two.sock")], "")).unwrap();
    let (ok, _, err) = migtun_reload(&admin);
    assert!(!ok);
    assert!(err.contains("`listen`") && err.contains("needs a restart"), "{err}");
    assert!(stream_works(&two, 5).await);

    // A peer's address changes live: the forward to it uses the new connector.
    let nowhere = bind_port().await.local_addr().unwrap();
    std::fs::write(&config, host_a_config(&pki, addr_a, nowhere, &[("two", "two.sock")], "")).unwrap();
    let (ok, out, err) = migtun_reload(&admin);
    assert!(ok && out.contains("peer host-b:"), "{out}{err}");
    assert!(!stream_works(&two, 50).await, "host-b is not at {nowhere}");

    // Back to a valid config: `migtun reload` succeeds and prints what changed.
    std::fs::write(&config, host_a_config(&pki, addr_a, addr_b, &[("two", "two.sock"), ("one", "one.sock")], "")).unwrap();
    let (ok, out, err) = migtun_reload(&admin);
    assert!(ok, "{out}{err}");
    assert!(out.contains("added") && out.contains("reloaded"), "{out}");
    assert!(stream_works(&one, 6).await && stream_works(&two, 7).await);

    a.signal(libc::SIGTERM);
    assert!(a.wait_exit(Duration::from_secs(20)).await.success(), "{}", a.log_text());
    b.stop().await;
}

/// Whether the control connection still echoes "ping".
async fn echoes(control: &mut migtun_proxy::agent::ControlStream) -> bool {
    let exchange = async {
        control.write_all(b"ping").await?;
        control.flush().await?;
        let mut back = [0u8; 4];
        control.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), exchange).await, Ok(Ok(b)) if &b == b"ping")
}

/// The DER of the certificate host-b's port presents to a fresh client now.
async fn presented_certificate(pki: &Path, addr: SocketAddr) -> Vec<u8> {
    let cert = std::fs::read_to_string(pki.join("host-a.pem")).unwrap();
    let key = std::fs::read_to_string(pki.join("host-a.key")).unwrap();
    let config = raw_client_config(pki, Some((cert, key)));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("host-b").unwrap(), tcp)
        .await
        .expect("handshake with host-b");
    tls.get_ref().1.peer_certificates().expect("server certificate")[0].as_ref().to_vec()
}

fn leaf_der(pem: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    let text = std::fs::read(pem).unwrap();
    rustls_pki_types::CertificateDer::pem_slice_iter(&text).next().unwrap().unwrap().as_ref().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_routes_a_reissued_certificate_and_a_crl_for_new_handshakes() {
    let pki = Pki::new();
    let _target = spawn_hash_target(pki.path("hash.sock"));
    let (port_a, port_b) = (bind_port().await, bind_port().await);
    let (addr_a, addr_b) = (port_a.local_addr().unwrap(), port_b.local_addr().unwrap());
    let b_text = host_b_config(&pki, addr_a, addr_b, &["one"], "");
    // Control connections echo: one stays open across the reloads.
    let echo: migtun_proxy::agent::ControlHandler = Arc::new(|io, _peer| {
        Box::pin(async move {
            let (mut r, mut w) = tokio::io::split(io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
    });
    let b = start_agent_with(pki.dir.path(), "host-b", &b_text, port_b, Some(echo)).await;
    let mut a_text = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\n",
        tls_table(&pki.pki(), "host-a")
    );
    for (route, sock) in [("one", "one.sock"), ("two", "two.sock")] {
        a_text.push_str(&format!("\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"{route}\"\n", pki.path(sock).display()));
    }
    let a = start_agent(pki.dir.path(), "host-a", &a_text, port_a).await;
    let (one, two) = (pki.path("one.sock"), pki.path("two.sock"));
    let b_path = pki.path("host-b.toml");
    let reload_b = |text: String| {
        std::fs::write(&b_path, text).unwrap();
        let config = migtun_proxy::Config::load(&b_path).expect("valid config");
        let handle = b.handle.clone();
        async move { handle.reload(config).await }
    };

    assert!(stream_works(&one, 1).await);
    assert!(!stream_works(&two, 2).await, "route two is not exposed yet");
    let mut control = a.handle.connect_control("host-b").await.expect("control connection");
    assert!(echoes(&mut control).await);
    // A stream open across the reload that removes its route.
    let mut open = HalfStream::open(&one, 3).await;
    open.send(1 << 20).await;
    let changes = reload_b(host_b_config(&pki, addr_a, addr_b, &["two"], "")).await.expect("reload");
    assert!(changes.iter().any(|c| c.contains("route \"two\" added")), "{changes:?}");
    assert!(changes.iter().any(|c| c.contains("route \"one\" removed")), "{changes:?}");
    open.send(1 << 20).await;
    open.finish().await;
    assert!(stream_works(&two, 4).await, "the added route carries bytes");
    assert!(!stream_works(&one, 5).await, "the removed route refuses");

    // A refused reload changes nothing.
    let e = reload_b(format!("metrics = \"127.0.0.1:0\"\n{}", host_b_config(&pki, addr_a, addr_b, &["one"], ""))).await.unwrap_err();
    assert!(e.to_string().contains("`metrics`") && e.to_string().contains("needs a restart"), "{e}");
    assert!(stream_works(&two, 6).await && !stream_works(&one, 6).await);

    // A new peer, host-c, and a route for it: refused before (not a peer), carried after.
    let port_c = bind_port().await;
    let addr_c = port_c.local_addr().unwrap();
    let c_text = format!(
        "name = \"host-c\"\nlisten = \"{addr_c}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\n\n\
         [[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"three\"\n",
        tls_table(&pki.pki(), "host-c"),
        pki.path("three.sock").display()
    );
    let c = start_agent(pki.dir.path(), "host-c", &c_text, port_c).await;
    let three = pki.path("three.sock");
    assert!(!stream_works(&three, 20).await, "host-c is not a peer of host-b yet");
    let with_c = |tls_extra: &str| {
        format!(
            "{}\n[[peer]]\nname = \"host-c\"\naddress = \"{addr_c}\"\n\n[[expose]]\nroute = \"three\"\ntarget = \"unix:{}\"\nallow = [\"host-c\"]\n",
            host_b_config(&pki, addr_a, addr_b, &["two"], tls_extra),
            pki.path("hash.sock").display()
        )
    };
    let changes = reload_b(with_c("")).await.expect("reload adding a peer");
    assert!(changes.iter().any(|c| c.starts_with("peer host-c: added")), "{changes:?}");
    assert!(stream_works(&three, 21).await, "the new peer's route carries bytes");
    assert_eq!(b.handle.peer_names(), ["host-a", "host-c"]);

    // A re-issued certificate: presented on the next handshake, no restart.
    let before = presented_certificate(&pki.pki(), addr_b).await;
    // Valid for 100 days (the first one: the default 730), so the expiry gauge must move too.
    let not_after = migtun_certs::time::OffsetDateTime::now_utc() + migtun_certs::time::Duration::days(100);
    let opts = migtun_certs::IssueOptions { not_after: Some(not_after), ..Default::default() };
    migtun_certs::issue_with(&pki.pki(), "host-b", &opts, true).expect("re-issue host-b");
    let leaf_expiry = || b.sample("migtun_certificate_not_after_seconds", &[("which", "leaf")]);
    assert!(leaf_expiry() > not_after.unix_timestamp() as f64 + 86400.0, "the first certificate's expiry");
    let reissued = leaf_der(&pki.pki().join("host-b.pem"));
    assert_ne!(before, reissued);
    assert_eq!(presented_certificate(&pki.pki(), addr_b).await, before, "not before the reload");
    let changes = reload_b(with_c("")).await.expect("reload");
    assert!(changes.iter().any(|c| c.starts_with("tls: new handshakes use")), "{changes:?}");
    assert_eq!(presented_certificate(&pki.pki(), addr_b).await, reissued, "the re-issued certificate after the reload");
    assert_eq!(leaf_expiry(), not_after.unix_timestamp() as f64, "migtun_certificate_not_after_seconds follows the reload");
    assert!(stream_works(&two, 7).await, "host-a still connects (same CA)");
    assert!(echoes(&mut control).await, "the control connection lives through reloads");

    // A CRL that revokes host-a: its new streams are refused at once, on fresh, resumed and
    // already open (warm) connections alike.
    let crl = migtun_certs::revoke(&pki.pki(), "host-a").expect("revoke host-a");
    reload_b(with_c(&format!("crl = \"{}\"\n", crl.display()))).await.expect("reload");
    for seed in 8..12 {
        assert!(!stream_works(&two, seed).await, "a revoked peer's stream {seed} is refused");
    }
    assert!(!echoes(&mut control).await, "a revoked peer's control connection is closed");
    assert!(stream_works(&three, 22).await, "a peer the CRL does not name goes on");

    // The peer removed again: refused.
    let changes = reload_b(host_b_config(&pki, addr_a, addr_b, &["two"], &format!("crl = \"{}\"\n", crl.display()))).await.expect("reload");
    assert!(changes.iter().any(|c| c.starts_with("peer host-c: removed")), "{changes:?}");
    assert!(!stream_works(&three, 23).await, "a removed peer gets nothing");
    c.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_takes_over_while_the_first_drains() {
    hand_over("tls").await;
}

/// The same with the source on `auto`, its open stream on QUIC: the new agent leaves the old
/// one's UDP socket (and so its QUIC connection) alone until it is gone, new streams go over
/// TLS meanwhile, and the new agent serves QUIC afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_takes_over_while_the_first_drains_a_quic_stream() {
    hand_over("auto").await;
}

async fn hand_over(transport: &str) {
    let pki = Pki::new();
    let _target = spawn_hash_target(pki.path("hash.sock"));
    let port_a = bind_port().await;
    let addr_a = port_a.local_addr().unwrap();
    let addr_b = bind_port().await.local_addr().unwrap();
    let metrics_b = bind_port().await.local_addr().unwrap();
    // host-b names host-a with `auto`, so it needs the UDP port too (QUIC).
    let b_text = format!(
        "name = \"host-b\"\nlisten = \"{addr_b}\"\nmetrics = \"{metrics_b}\"\nadmin = \"{}\"\ndrain_timeout_secs = 60\n{}\n\
         [[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\ntransport = \"auto\"\n\n\
         [[expose]]\nroute = \"bulk\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        pki.path("b.admin").display(),
        tls_table(&pki.pki(), "host-b"),
        pki.path("hash.sock").display()
    );
    let config = pki.path("host-b.toml");
    std::fs::write(&config, &b_text).unwrap();
    let a_text = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\ntransport = \"{transport}\"\n\n\
         [[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"bulk\"\n",
        tls_table(&pki.pki(), "host-a"),
        pki.path("in.sock").display()
    );
    let a = start_agent(pki.dir.path(), "host-a", &a_text, port_a).await;
    let input = pki.path("in.sock");

    let mut old = Serve::spawn(&config, pki.path("old.log"));
    old.wait_log("agent serving").await;
    assert!(stream_works(&input, 1).await);
    let expected = if transport == "auto" { "quic" } else { "tls" };
    assert_eq!(a.handle.peer_transport("host-b"), Some(expected));
    let mut open = HalfStream::open(&input, 2).await;
    open.send(1 << 20).await;

    // The old agent drains (the open stream keeps it); the new one starts on the same config.
    old.signal(libc::SIGTERM);
    old.wait_log("draining").await;
    let mut new = Serve::spawn(&config, pki.path("new.log"));
    new.wait_log("agent serving").await;
    assert!(new.log_text().contains("UDP port held by another process"), "{}", new.log_text());
    assert!(old.alive(), "the old agent still drains its open stream");
    for seed in 3..6 {
        // The draining agent refuses new streams, so a stream that works reached the new one.
        assert!(stream_works(&input, seed).await, "a new stream during the hand-over; new agent's log:\n{}", new.log_text());
    }

    open.send(1 << 20).await;
    open.finish().await;
    assert!(old.wait_exit(Duration::from_secs(30)).await.success(), "{}", old.log_text());
    new.wait_log("UDP port taken over").await;
    if transport == "auto" {
        // QUIC gets through again, to the new agent.
        let deadline = Instant::now() + Duration::from_secs(40);
        while a.handle.peer_transport("host-b") != Some("quic") {
            assert!(Instant::now() < deadline, "auto never went back to QUIC");
            assert!(stream_works(&input, 99).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    wait_for("the new agent's admin socket", || pki.path("b.admin").exists()).await;
    let (ok, out, err) = migtun_reload(&pki.path("b.admin"));
    assert!(ok && out.contains("nothing changed"), "the new agent answers on the admin socket: {out}{err}");
    assert!(stream_works(&input, 6).await);
    new.signal(libc::SIGTERM);
    assert!(new.wait_exit(Duration::from_secs(20)).await.success());
    a.stop().await;
}
