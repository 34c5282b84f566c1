//! The port under attack: strangers without a certificate, hosts of the CA that are not peers,
//! a peer that holds connections without a preamble, and an agent out of file descriptors.
//!
//! Where the file-descriptor limit matters the receiving agent is the real `migtun serve`
//! binary in its own process, started with the limit under test; the attacking connections come
//! from 127.0.0.2 and the legitimate peer (host-a, in this process) from 127.0.0.1.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use migtun_proxy::quic::quinn;
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");
/// Where the attacking connections come from (the whole 127.0.0.0/8 is loopback).
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// `migtun serve` in its own process, logging JSON lines to a file.
struct ServeProcess {
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
}

impl ServeProcess {
    /// Starts `migtun serve` on `toml` with RLIMIT_NOFILE set to `nofile` (soft, hard) and waits
    /// until its metrics endpoint answers.
    async fn spawn(dir: &Path, name: &str, toml: &str, metrics: SocketAddr, nofile: (u64, u64)) -> ServeProcess {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(MIGTUN);
        cmd.args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let (soft, hard) = nofile;
        // SAFETY: the closure runs in the child between fork and exec; it only calls setrlimit,
        // which is async-signal-safe, on a local value, and allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn migtun serve");
        let p = ServeProcess { child, log, metrics };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.try_metrics().await.is_none() {
            assert!(Instant::now() < deadline, "{name} did not come up; its log:\n{}", p.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's JSON lines whose message contains `needle`.
    fn log_lines(&self, needle: &str) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.contains(needle)))
            .collect()
    }

    async fn try_metrics(&self) -> Option<String> {
        scrape(self.metrics).await
    }

    async fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let body = self.try_metrics().await.expect("metrics answer");
        migtun_proxy::metrics::sum_samples(&body, name, labels)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port number (whose UDP twin is free too) on 127.0.0.1, released for the child.
async fn free_addr() -> SocketAddr {
    bind_port().await.local_addr().unwrap()
}

/// host-b's config: peers host-a (the legitimate source) and host-c (a peer that misbehaves),
/// route `bulk` to `hash.sock` for host-a, metrics on.
fn host_b_config(pki: &Pki, addr: SocketAddr, metrics: SocketAddr, addr_a: SocketAddr) -> String {
    format!(
        "name = \"host-b\"\nlisten = \"{addr}\"\nmetrics = \"{metrics}\"\n{}\n\
         [[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\n\n[[peer]]\nname = \"host-c\"\naddress = \"127.0.0.1:9\"\n\n\
         [[expose]]\nroute = \"bulk\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        tls_table(&pki.pki(), "host-b"),
        pki.path("hash.sock").display()
    )
}

/// host-a (in this process): forwards `in.sock` to route `bulk` on host-b.
async fn start_host_a(pki: &Pki, addr_b: SocketAddr) -> RunningAgent {
    let port_a = bind_port().await;
    let addr_a = port_a.local_addr().unwrap();
    let a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\n\n\
         [[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"bulk\"\n",
        tls_table(&pki.pki(), "host-a"),
        pki.path("in.sock").display()
    );
    start_agent(pki.dir.path(), "host-a", &a, port_a).await
}

/// A certificate of the test CA for `host`, which no agent names as a peer.
fn issue(pki: &Pki, host: &str) -> (String, String) {
    let ca = migtun_certs::Ca::load(&pki.pki()).unwrap();
    let cert = ca.issue(host, &migtun_certs::IssueOptions::default()).unwrap();
    (cert.cert_pem, cert.key_pem)
}

fn identity(pki: &Pki, host: &str) -> (String, String) {
    (
        std::fs::read_to_string(pki.pki().join(format!("{host}.pem"))).unwrap(),
        std::fs::read_to_string(pki.pki().join(format!("{host}.key"))).unwrap(),
    )
}

fn tls_connector(pki: &Pki, id: (String, String), alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut config = raw_client_config(&pki.pki(), Some(id));
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TCP connection to `to` from the attacker's address.
async fn attacker_tcp(to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(ATTACKER, 0))?;
    s.connect(to).await
}

/// Reads until the server closes (EOF or reset) or `limit` passes; the bytes read.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let _ = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

/// What one attacking connection does once connected.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// Sends nothing.
    Silent,
    /// Sends the start of a TLS record that announces a ClientHello and never the rest.
    PartialHello,
    /// Completes TLS with a certificate of the CA that is not a configured peer.
    Stranger,
    /// Completes TLS with a configured peer's certificate (host-c) and sends no preamble.
    IdlePeer,
}

/// Counters of the flood, for the test's own report.
#[derive(Default)]
struct FloodStats {
    connected: AtomicU64,
    tls_done: AtomicU64,
    refused_reply: AtomicU64,
}

/// One attacking connection slot: connects, attacks, waits until the server closes, reconnects
/// a second later, until `stop`.
async fn attack_loop(kind: Attack, to: SocketAddr, tls: tokio_rustls::TlsConnector, stop: Arc<AtomicBool>, stats: Arc<FloodStats>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut tcp) = attacker_tcp(to).await {
            stats.connected.fetch_add(1, Ordering::Relaxed);
            match kind {
                Attack::Silent => {
                    read_until_closed(&mut tcp, Duration::from_secs(60)).await;
                }
                Attack::PartialHello => {
                    // A handshake record of 512 bytes of which 1 arrives.
                    if tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.is_ok() {
                        read_until_closed(&mut tcp, Duration::from_secs(60)).await;
                    }
                }
                Attack::Stranger | Attack::IdlePeer => {
                    let name = ServerName::try_from("host-b").unwrap();
                    if let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(10), tls.connect(name, tcp)).await {
                        stats.tls_done.fetch_add(1, Ordering::Relaxed);
                        let got = read_until_closed(&mut s, Duration::from_secs(60)).await;
                        if !got.is_empty() {
                            stats.refused_reply.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A stream that keeps sending until told to stop, then checks the target's digest.
struct RunningStream {
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Digest40, Digest40)>,
}

fn start_running_stream(mut s: tokio::net::UnixStream) -> RunningStream {
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent2, stop2) = (sent.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut gen = DataGen::new(7);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            gen.fill(&mut buf);
            hasher.update(&buf);
            s.write_all(&buf).await.expect("the running stream keeps writing");
            total += buf.len() as u64;
            sent2.store(total, Ordering::Relaxed);
        }
        s.shutdown().await.expect("half-close");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("answer");
        let mut want = [0u8; 40];
        want[..8].copy_from_slice(&total.to_le_bytes());
        want[8..].copy_from_slice(&hasher.finalize());
        (answer.try_into().expect("40-byte digest"), want)
    });
    RunningStream { sent, stop, task }
}

/// Bytes per second the running stream moves over `window`.
async fn rate(s: &RunningStream, window: Duration) -> f64 {
    let before = s.sent.load(Ordering::Relaxed);
    tokio::time::sleep(window).await;
    (s.sent.load(Ordering::Relaxed) - before) as f64 / window.as_secs_f64()
}

/// While 2,000 connections from 127.0.0.2 hold the port (silent, a partial ClientHello, TLS with
/// a certificate that is no peer's, TLS of a peer that sends no preamble), every one of 200 new
/// streams of the legitimate peer opens with its bytes intact, and a stream that was already
/// running carries on byte-exact. Before the fix, 256 silent connections took every handshake
/// slot (the excess were accepted and dropped) and the idle ones exhausted the agent's 1,024
/// descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_hostile_connections_do_not_stop_a_legitimate_peer() {
    let pki = Pki::new();
    let _target = spawn_hash_target(pki.path("hash.sock"));
    let (addr_b, metrics_b) = (free_addr().await, free_addr().await);
    let host_a = start_host_a(&pki, addr_b).await;
    let b = host_b_config(&pki, addr_b, metrics_b, host_a.addr);
    // The systemd default soft limit, with room above it: the agent raises it.
    let host_b = ServeProcess::spawn(pki.dir.path(), "host-b", &b, metrics_b, (1024, 8192)).await;

    let running = start_running_stream(pair_connect(&pki).await);
    let before = rate(&running, Duration::from_secs(1)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(FloodStats::default());
    let stranger = tls_connector(&pki, issue(&pki, "host-x"), migtun_proxy::tls::ALPN_DATA);
    let idle_peer = tls_connector(&pki, identity(&pki, "host-c"), migtun_proxy::tls::ALPN_DATA);
    let mut flood = Vec::new();
    // The idle peer's connections first, a few at a time, so that they are established (TLS
    // done, no preamble) when the rest arrives: 1,100 is over its cap of 1,024.
    for i in 0..1100 {
        flood.push(tokio::spawn(attack_loop(Attack::IdlePeer, addr_b, idle_peer.clone(), stop.clone(), stats.clone())));
        if i % 32 == 31 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eventually_long("host-c's idle connections are established", Duration::from_secs(60), || {
        stats.tls_done.load(Ordering::Relaxed) >= 1024
    })
    .await;
    for (kind, n) in [(Attack::Stranger, 100), (Attack::Silent, 400), (Attack::PartialHello, 400)] {
        for _ in 0..n {
            flood.push(tokio::spawn(attack_loop(kind, addr_b, stranger.clone(), stop.clone(), stats.clone())));
        }
    }
    assert_eq!(flood.len(), 2000);
    // The flood holds: strangers over the per-address cap are refused, non-peers closed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let over = host_b.sample("migtun_port_refusals_total", &[("reason", "address-limit")]).await;
        let strangers = host_b.sample("migtun_port_refusals_total", &[("reason", "not-a-peer")]).await;
        if over > 0.0 && strangers > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the flood never reached host-b\n{}", host_b.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = rate(&running, Duration::from_secs(1)).await;

    let mut streams = Vec::new();
    for i in 0..200u64 {
        let s = pair_connect(&pki).await;
        streams.push(tokio::spawn(async move { send_and_hash(s, 64 * 1024, 1000 + i).await }));
    }
    let mut opened = 0;
    for t in streams {
        let (answer, sent) = tokio::time::timeout(Duration::from_secs(120), t).await.expect("stream finishes").expect("stream task");
        assert_eq!(answer, sent, "every byte of every new stream arrives");
        opened += 1;
    }
    let after = rate(&running, Duration::from_secs(1)).await;
    println!(
        "running stream: {:.0} MB/s before the flood, {:.0} MB/s during, {:.0} MB/s while 200 streams opened; \
         flood: {} connections made, {} TLS handshakes completed, {} refused with a reply",
        before / 1e6,
        during / 1e6,
        after / 1e6,
        stats.connected.load(Ordering::Relaxed),
        stats.tls_done.load(Ordering::Relaxed),
        stats.refused_reply.load(Ordering::Relaxed),
    );
    assert_eq!(opened, 200);
    assert_eq!(host_a.sample("migtun_stream_failures_total", &[]), 0.0, "no stream of host-a failed");

    // The cap on connections awaiting their preamble held host-c, with a reply naming it.
    let preamble_refused = host_b.sample("migtun_port_refusals_total", &[("reason", "peer-preamble-limit")]).await;
    assert!(preamble_refused > 0.0, "host-c's connections over 1,024 are refused");
    assert!(stats.refused_reply.load(Ordering::Relaxed) > 0, "the refusal is a reply the peer can read");
    let awaiting = host_b.sample("migtun_awaiting_preamble", &[]).await;
    assert!(awaiting <= 1024.0 + 2.0, "at most the cap (and host-a's warm connections) await a preamble: {awaiting}");
    // Silent and partial ClientHellos are cut at the ClientHello deadline, not the handshake's.
    eventually_long("host-b cuts connections without a ClientHello", Duration::from_secs(30), || {
        std::fs::read_to_string(&host_b.log).unwrap_or_default().contains("no complete ClientHello in time")
    })
    .await;
    assert!(host_b.sample("migtun_port_refusals_total", &[("reason", "client-hello-timeout")]).await > 0.0);
    assert!(host_b.sample("migtun_handshakes_pending", &[]).await <= 256.0);

    stop.store(true, Ordering::Relaxed);
    running.stop.store(true, Ordering::Relaxed);
    let (answer, sent) = tokio::time::timeout(Duration::from_secs(120), running.task).await.expect("running stream ends").unwrap();
    assert_eq!(answer, sent, "the stream that was running throughout arrives byte-exact");
    // The log stays short: one line per interval per kind of refusal, not one per connection.
    let refusal_lines = host_b.log_text().lines().filter(|l| l.contains("refused")).count();
    assert!(refusal_lines < 100, "{refusal_lines} log lines about refusals");
    for t in flood {
        t.abort();
    }
}

async fn pair_connect(pki: &Pki) -> tokio::net::UnixStream {
    tokio::net::UnixStream::connect(pki.path("in.sock")).await.expect("connect to host-a's forward")
}

/// [`eventually`] with a longer limit, for conditions a flood takes a while to reach.
async fn eventually_long(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent started under the systemd default of 1,024 open files raises its soft limit to the
/// hard limit and says so in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_the_open_files_limit_to_the_hard_limit() {
    let pki = Pki::new();
    let (addr_b, metrics_b) = (free_addr().await, free_addr().await);
    let b = host_b_config(&pki, addr_b, metrics_b, "127.0.0.1:9".parse().unwrap());
    let host_b = ServeProcess::spawn(pki.dir.path(), "host-b", &b, metrics_b, (1024, 4096)).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", host_b.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files line").to_string();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], &["4096", "4096"], "soft limit raised to the hard limit: {line}");
    let logged = host_b.log_lines("open-files limit");
    assert_eq!(logged.len(), 1, "one log line says what the agent got:\n{}", host_b.log_text());
    assert_eq!(logged[0]["fields"]["soft"], 4096);
    assert_eq!(logged[0]["fields"]["hard"], 4096);
    assert_eq!(logged[0]["fields"]["was"], 1024);
}

/// An agent whose hard limit is low runs out of descriptors under a flood of held connections:
/// its accept loops back off and log a few lines (not one per failure, not a spin), and once
/// the flood ends it serves new streams and `/metrics` again, also the scrape that waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_backs_off_and_recovers() {
    let pki = Pki::new();
    let _target = spawn_hash_target(pki.path("hash.sock"));
    let (addr_b, metrics_b) = (free_addr().await, free_addr().await);
    let host_a = start_host_a(&pki, addr_b).await;
    let b = host_b_config(&pki, addr_b, metrics_b, host_a.addr);
    let host_b = ServeProcess::spawn(pki.dir.path(), "host-b", &b, metrics_b, (128, 128)).await;

    // host-c's connections awaiting their preamble hold a descriptor each, until none is left:
    // batches of 16 until the agent says its accepts fail.
    let idle_peer = tls_connector(&pki, identity(&pki, "host-c"), migtun_proxy::tls::ALPN_DATA);
    let mut held = Vec::new();
    let mut batches = 0;
    while host_b.log_lines("accept failed").is_empty() {
        assert!(batches < 60, "the agent never ran out of descriptors ({} connections held):\n{}", held.len(), host_b.log_text());
        batches += 1;
        let batch: Vec<_> = (0..16)
            .map(|_| {
                let tls = idle_peer.clone();
                tokio::spawn(async move {
                    let tcp = attacker_tcp(addr_b).await.ok()?;
                    let name = ServerName::try_from("host-b").unwrap();
                    tokio::time::timeout(Duration::from_secs(3), tls.connect(name, tcp)).await.ok()?.ok()
                })
            })
            .collect();
        for t in batch {
            held.extend(t.await.unwrap());
        }
    }
    // A scrape while out of descriptors waits in the backlog of the metrics listener.
    let mut waiting_scrape = TcpStream::connect(metrics_b).await.unwrap();
    waiting_scrape.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    // Stay out of descriptors for a while: a spinning or per-failure log would write thousands.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let failure_lines = host_b.log_lines("accept failed");
    let listeners: std::collections::BTreeSet<String> =
        failure_lines.iter().filter_map(|l| l["fields"]["listener"].as_str().map(String::from)).collect();
    println!("{} accept-failure log lines, listeners {listeners:?}", failure_lines.len());
    assert!(failure_lines.len() <= 8, "a bounded number of accept-failure lines, got {}:\n{}", failure_lines.len(), host_b.log_text());
    assert!(listeners.contains("port"), "the port's accept failed: {listeners:?}");
    assert!(listeners.contains("metrics"), "the metrics listener's accept failed: {listeners:?}");

    drop(held);
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), waiting_scrape.read_to_string(&mut answer))
        .await
        .expect("the scrape that waited is answered")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let s = pair_connect(&pki).await;
    let (answer, sent) = tokio::time::timeout(Duration::from_secs(60), send_and_hash(s, 1 << 20, 9)).await.expect("new stream");
    assert_eq!(answer, sent, "a new stream works once the flood is over");
    assert!(host_b.sample("migtun_accept_failures_total", &[("listener", "port"), ("reason", "fd-limit")]).await > 0.0);
    assert!(!host_b.log_lines("accepting connections again").is_empty(), "recovery is logged");
}

/// A target that counts the connections it accepts and closes them.
fn spawn_counting_target(path: PathBuf) -> Arc<AtomicU64> {
    let n = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    n
}

/// A certificate of the CA that is not one of host-b's `[[peer]]`s gets nothing beyond the
/// handshake: on the data ALPN (TLS and QUIC) no reply and no route, on `h2` no control
/// handler; each is counted. A configured peer on the same paths is served, so the check is
/// the peer list and not the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_of_the_ca_that_is_not_a_peer_gets_nothing_past_the_handshake() {
    let pki = Pki::new();
    let targets = spawn_counting_target(pki.path("count.sock"));
    let port_b = bind_port().await;
    let addr_b = port_b.local_addr().unwrap();
    let b = format!(
        "name = \"host-b\"\nlisten = \"{addr_b}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"127.0.0.1:9\"\n\n\
         [[expose]]\nroute = \"bulk\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        tls_table(&pki.pki(), "host-b"),
        pki.path("count.sock").display()
    );
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let handler: migtun_proxy::agent::ControlHandler = Arc::new(move |mut conn, _peer| {
        h.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let _ = conn.write_all(b"control").await;
            let _ = conn.shutdown().await;
        })
    });
    let host_b = start_agent_with(pki.dir.path(), "host-b", &b, port_b, Some(handler)).await;
    let stranger = issue(&pki, "host-x");
    let request = migtun_proxy::route::wire::Request::new("bulk", None).unwrap().encode();

    // Data ALPN over TLS: the handshake completes, then nothing: no reply, no target.
    let tcp = TcpStream::connect(addr_b).await.unwrap();
    let name = ServerName::try_from("host-b").unwrap();
    let mut s = tls_connector(&pki, stranger.clone(), migtun_proxy::tls::ALPN_DATA)
        .connect(name.clone(), tcp)
        .await
        .expect("the handshake itself completes");
    let _ = s.write_all(&request).await;
    let got = read_until_closed(&mut s, Duration::from_secs(30)).await;
    assert!(got.is_empty(), "no reply to a non-peer: {got:?}");

    // h2 over TLS: no control handler.
    let tcp = TcpStream::connect(addr_b).await.unwrap();
    let mut s = tls_connector(&pki, stranger.clone(), b"h2").connect(name.clone(), tcp).await.expect("handshake");
    let got = read_until_closed(&mut s, Duration::from_secs(30)).await;
    assert!(got.is_empty(), "nothing on h2 for a non-peer: {got:?}");

    // Data ALPN over QUIC: the connection is closed, no stream is served.
    let config = raw_client_config(&pki.pki(), Some(stranger));
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(config)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let quic = async {
        let conn = endpoint.connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr_b, "host-b").ok()?.await.ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&request).await.ok()?;
        let _ = send.finish();
        let mut reply = Vec::new();
        AsyncReadExt::read_to_end(&mut recv, &mut reply).await.ok()?;
        Some(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(30), quic).await.expect("QUIC attempt ends");
    assert!(reply.as_ref().is_none_or(|r| r.is_empty()), "no reply over QUIC to a non-peer: {reply:?}");

    eventually("host-b counts three non-peers", || {
        host_b.sample("migtun_port_refusals_total", &[("reason", "not-a-peer")]) == 3.0
    })
    .await;
    assert_eq!(host_b.sample("migtun_port_refusals_total", &[("reason", "not-a-peer"), ("transport", "quic")]), 1.0);
    assert_eq!(handled.load(Ordering::Relaxed), 0, "the control handler never ran for a non-peer");
    assert_eq!(targets.load(Ordering::Relaxed), 0, "no route reached");
    assert_eq!(host_b.sample("migtun_stream_failures_total", &[]), 0.0, "no route was even looked up");

    // The same paths with a peer's certificate are served.
    let tcp = TcpStream::connect(addr_b).await.unwrap();
    let mut s = tls_connector(&pki, identity(&pki, "host-a"), b"h2").connect(name.clone(), tcp).await.unwrap();
    assert_eq!(read_until_closed(&mut s, Duration::from_secs(30)).await, b"control");
    let tcp = TcpStream::connect(addr_b).await.unwrap();
    let mut s = tls_connector(&pki, identity(&pki, "host-a"), migtun_proxy::tls::ALPN_DATA).connect(name, tcp).await.unwrap();
    s.write_all(&request).await.unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(30)).await;
    assert_eq!(&got[..3], &[1, 0, 0], "host-a gets `ok`");
    eventually("the peer reached the target", || targets.load(Ordering::Relaxed) == 1).await;
    assert_eq!(handled.load(Ordering::Relaxed), 1);
}
