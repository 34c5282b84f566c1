//! Test harness: a real PKI, two real agents on loopback, and real UNIX-socket endpoints.
//!
//! Agents run in the test process (so tests can read their metrics and stop them), but they are
//! configured exactly as `migtun serve` is: from TOML files through `Config::load`.

#![allow(dead_code)]

pub mod refusal;
pub mod suite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use migtun_proxy::metrics::Metrics;
use migtun_proxy::{Agent, Config};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A CA and host certificates for host-a, host-b and host-c in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        migtun_certs::init(&dir.path().join("pki")).expect("CA");
        for host in ["host-a", "host-b", "host-c"] {
            migtun_certs::issue(&dir.path().join("pki"), host).expect("host cert");
        }
        Pki { dir }
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues one more host certificate from the same CA.
    pub fn issue(&self, host: &str) {
        migtun_certs::issue(&self.pki(), host).expect("host cert");
    }
}

/// One agent running in this process.
pub struct RunningAgent {
    pub name: String,
    pub handle: migtun_proxy::agent::AgentHandle,
    pub addr: std::net::SocketAddr,
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<()>>,
}

impl RunningAgent {
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics.sample(name, labels)
    }

    /// Starts the drain and waits for the agent to stop.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), t).await.expect("agent stops").expect("agent task");
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Writes `toml` to `dir/NAME.toml`, loads it like `migtun serve` does, and starts the agent on
/// the already bound `port`.
pub async fn start_agent(dir: &Path, name: &str, toml: &str, port: TcpListener) -> RunningAgent {
    start_agent_with(dir, name, toml, port, None).await
}

/// [`start_agent`] with a control-connection handler registered.
pub async fn start_agent_with(
    dir: &Path,
    name: &str,
    toml: &str,
    port: TcpListener,
    control: Option<migtun_proxy::agent::ControlHandler>,
) -> RunningAgent {
    start_agent_serving(dir, name, toml, port, move |_, _| control).await
}

/// [`start_agent`] with the control handler `make` builds from the agent's handle and config
/// (as `migtun serve` builds its router).
pub async fn start_agent_serving(
    dir: &Path,
    name: &str,
    toml: &str,
    port: TcpListener,
    make: impl FnOnce(&migtun_proxy::agent::AgentHandle, &Config) -> Option<migtun_proxy::agent::ControlHandler>,
) -> RunningAgent {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write config");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("config {name}: {e}\n{toml}"));
    let mut agent = Agent::with_port(config, port).await.unwrap_or_else(|e| panic!("agent {name}: {e}"));
    if let Some(h) = make(&agent.handle(), agent.config()) {
        agent.set_control_handler(h);
    }
    let handle = agent.handle();
    let addr = agent.local_addr();
    let metrics = agent.metrics();
    let metrics_addr = agent.metrics_addr();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { agent.run(token).await.expect("agent runs") });
    RunningAgent { name: name.to_string(), handle, addr, metrics, metrics_addr, shutdown, task: Some(task) }
}

/// host-b serving control connections with `handler`, and host-a, each the other's peer (no
/// routes): for tests of the control connection.
pub async fn control_pair(handler: migtun_proxy::agent::ControlHandler) -> (Pki, RunningAgent, RunningAgent) {
    control_pair_on(handler, "own", "own").await
}

/// [`control_pair`] with `tls.record_layer` set on host-a and host-b.
pub async fn control_pair_on(
    handler: migtun_proxy::agent::ControlHandler,
    layer_a: &str,
    layer_b: &str,
) -> (Pki, RunningAgent, RunningAgent) {
    let pki = Pki::new();
    let (port_a, port_b) = (bind_port().await, bind_port().await);
    let (addr_a, addr_b) = (port_a.local_addr().unwrap(), port_b.local_addr().unwrap());
    let b = format!(
        "name = \"host-b\"\nlisten = \"{addr_b}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\n",
        tls_table_on(&pki.pki(), "host-b", layer_b)
    );
    let a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\n",
        tls_table_on(&pki.pki(), "host-a", layer_a)
    );
    let b = start_agent_with(pki.dir.path(), "host-b", &b, port_b, Some(handler)).await;
    let a = start_agent(pki.dir.path(), "host-a", &a, port_a).await;
    (pki, a, b)
}

/// The `[tls]` table for `host` in `pki`.
pub fn tls_table(pki: &Path, host: &str) -> String {
    format!(
        "[tls]\ncert = \"{0}/{1}.pem\"\nkey = \"{0}/{1}.key\"\nca = \"{0}/ca.pem\"\n",
        pki.display(),
        host
    )
}

/// [`tls_table`] with `record_layer` (`own` or `rustls`).
pub fn tls_table_on(pki: &Path, host: &str, record_layer: &str) -> String {
    format!("{}record_layer = \"{record_layer}\"\n", tls_table(pki, host))
}

/// Binds a port for an agent before its config is written, so that peers can name it. The agent
/// also binds UDP (QUIC) at the same port number, so a TCP port whose UDP twin is taken is
/// skipped.
pub async fn bind_port() -> TcpListener {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind port");
        if std::net::UdpSocket::bind(tcp.local_addr().unwrap()).is_ok() {
            return tcp;
        }
    }
    panic!("no TCP port whose UDP port number is free");
}

/// Two agents: host-a forwards, host-b exposes. `forwards` are `(route, socket name)` on A;
/// `exposes` are `(route, target socket name, allowed peers)` on B. Sockets live in the PKI dir.
pub struct Pair {
    pub pki: Pki,
    pub a: RunningAgent,
    pub b: RunningAgent,
    pub transport: &'static str,
}

pub struct PairSpec<'a> {
    pub forwards: &'a [(&'a str, &'a str)],
    pub exposes: &'a [(&'a str, &'a str, &'a [&'a str])],
    pub transport: &'static str,
    /// `tls.record_layer` of both agents.
    pub record_layer: &'static str,
    pub metrics: bool,
    pub drain_timeout_secs: u64,
}

impl Default for PairSpec<'_> {
    fn default() -> Self {
        PairSpec { forwards: &[], exposes: &[], transport: "tls", record_layer: "own", metrics: false, drain_timeout_secs: 30 }
    }
}

impl PairSpec<'static> {
    /// The common case: host-a forwards route `bulk` from `in.sock`, host-b exposes it on
    /// `hash.sock` to host-a (over TLS unless `transport` says otherwise).
    pub fn bulk() -> PairSpec<'static> {
        PairSpec { forwards: &[("bulk", "in.sock")], exposes: &[("bulk", "hash.sock", &["host-a"])], ..Default::default() }
    }
}

impl Pair {
    pub async fn start(spec: PairSpec<'_>) -> Pair {
        let pki = Pki::new();
        let (port_a, port_b) = (bind_port().await, bind_port().await);
        let (addr_a, addr_b) = (port_a.local_addr().unwrap(), port_b.local_addr().unwrap());
        let metrics = if spec.metrics { "metrics = \"127.0.0.1:0\"\n" } else { "" };
        let mut a = format!(
            "name = \"host-a\"\nlisten = \"{addr_a}\"\n{metrics}drain_timeout_secs = {}\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\ntransport = \"{}\"\n",
            spec.drain_timeout_secs,
            tls_table_on(&pki.pki(), "host-a", spec.record_layer),
            spec.transport
        );
        for (route, sock) in spec.forwards {
            a.push_str(&format!(
                "\n[[forward]]\nlisten = \"{}\"\npeer = \"host-b\"\nroute = \"{route}\"\n",
                endpoint(&pki, sock)
            ));
        }
        let mut b = format!(
            // host-c is a peer of host-b too (never started): routes may be allowed for it only.
            "name = \"host-b\"\nlisten = \"{addr_b}\"\n{metrics}{}\n[[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\ntransport = \"{}\"\n\n[[peer]]\nname = \"host-c\"\naddress = \"127.0.0.1:9\"\n",
            tls_table_on(&pki.pki(), "host-b", spec.record_layer),
            spec.transport
        );
        for (route, target, allow) in spec.exposes {
            let allow: Vec<String> = allow.iter().map(|p| format!("\"{p}\"")).collect();
            b.push_str(&format!(
                "\n[[expose]]\nroute = \"{route}\"\ntarget = \"{}\"\nallow = [{}]\n",
                endpoint(&pki, target),
                allow.join(", ")
            ));
        }
        let b_agent = start_agent(pki.dir.path(), "host-b", &b, port_b).await;
        let a_agent = start_agent(pki.dir.path(), "host-a", &a, port_a).await;
        Pair { pki, a: a_agent, b: b_agent, transport: spec.transport }
    }

    pub fn sock(&self, name: &str) -> PathBuf {
        self.pki.path(name)
    }

    pub async fn connect(&self, sock: &str) -> UnixStream {
        UnixStream::connect(self.sock(sock)).await.expect("connect to forward socket")
    }
}

/// `tcp:...` endpoints are used as written; anything else names a UNIX socket in the test dir.
fn endpoint(pki: &Pki, name: &str) -> String {
    if name.starts_with("tcp:") {
        name.to_string()
    } else {
        format!("unix:{}", pki.path(name).display())
    }
}

/// Deterministic pseudo-random bytes, fast enough to generate GiBs in a test.
pub struct DataGen {
    rng: rand::rngs::SmallRng,
}

impl DataGen {
    pub fn new(seed: u64) -> DataGen {
        DataGen { rng: rand::rngs::SmallRng::seed_from_u64(seed) }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        self.rng.fill_bytes(buf);
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// The digest a hashing target answers with: byte count (8 bytes LE) and SHA-256.
pub type Digest40 = [u8; 40];

pub fn digest_of(data: &[u8]) -> Digest40 {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&(data.len() as u64).to_le_bytes());
    out[8..].copy_from_slice(&Sha256::digest(data));
    out
}

/// A target that reads each connection to EOF, then answers with its [`Digest40`] and closes.
/// Exercises half-close: the answer travels back after the source has shut down its write side.
pub fn spawn_hash_target(path: PathBuf) -> JoinHandle<()> {
    let listener = UnixListener::bind(&path).expect("bind hash target");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut hasher = Sha256::new();
                let mut n = 0u64;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => {
                            hasher.update(&buf[..k]);
                            n += k as u64;
                        }
                        Err(_) => return,
                    }
                }
                let mut out = [0u8; 40];
                out[..8].copy_from_slice(&n.to_le_bytes());
                out[8..].copy_from_slice(&hasher.finalize());
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
            });
        }
    })
}

/// A target that echoes every byte back and closes its write side after reading EOF.
pub fn spawn_echo_target(path: PathBuf) -> JoinHandle<()> {
    let listener = UnixListener::bind(&path).expect("bind echo target");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// Sends `total` deterministic bytes through `stream`, half-closes, and returns what the hash
/// target answered together with the digest of what was sent.
pub async fn send_and_hash(mut stream: UnixStream, total: u64, seed: u64) -> (Digest40, Digest40) {
    let mut gen = DataGen::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = total;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..k]);
        hasher.update(&buf[..k]);
        stream.write_all(&buf[..k]).await.expect("write through tunnel");
        left -= k as u64;
    }
    stream.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read answer");
    let mut sent = [0u8; 40];
    sent[..8].copy_from_slice(&total.to_le_bytes());
    sent[8..].copy_from_slice(&hasher.finalize());
    let answer: Digest40 = answer.try_into().unwrap_or_else(|a: Vec<u8>| panic!("answer of {} bytes, expected 40", a.len()));
    (answer, sent)
}

/// Polls `cond` until it holds (metrics are updated by other tasks), failing after 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A certificate and key (PEM) for `host`, issued by a CA nobody trusts.
pub fn identity_from_another_ca(host: &str) -> (String, String) {
    let rogue = migtun_certs::Ca::generate("rogue CA").expect("rogue CA");
    let cert = rogue.issue(host, &migtun_certs::IssueOptions::default()).expect("rogue certificate");
    (cert.cert_pem, cert.key_pem)
}

/// A rustls client configuration like an agent's (TLS 1.3, the test CA as roots, ALPN
/// `migtun/1`), presenting exactly `identity` (certificate and key PEM), or no certificate.
pub fn raw_client_config(pki: &Path, identity: Option<(String, String)>) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.join("ca.pem")).expect("ca.pem");
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(migtun_proxy::tls::context::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).map(|c| c.expect("certificate PEM")).collect();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
            builder.with_client_auth_cert(chain, key).expect("client identity")
        }
    };
    config.alpn_protocols = vec![migtun_proxy::tls::ALPN_DATA.to_vec()];
    config
}

/// `GET /metrics` on an agent's metrics endpoint, the whole HTTP/1.1 response (status line
/// first); `None` if it does not answer 200 within 5 s.
pub async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.starts_with("HTTP/1.1 200").then_some(body)
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.ok().flatten()
}
