//! Certificates over time: expiry and revocation checked on resumed sessions too, `tls.crl`,
//! the expiry metrics, and what a TLS scanner sees on the port.
//!
//! Real agents, real certificates made here. "Valid at the first handshake, expired at the
//! resumption" is a certificate whose notAfter is a few seconds ahead: the test makes its first
//! (full) handshake at once, waits for the clock to pass notAfter, and resumes.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use migtun_certs::{time, Ca, IssueOptions};
use migtun_proxy::config::Config;
use rustls::HandshakeKind;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a short-lived certificate is valid from its making: enough for agents to start and
/// make the first handshakes (well under a second here), and a short wait after.
const SHORT_VALIDITY: time::Duration = time::Duration::seconds(4);

/// A certificate for `host` valid from an hour ago until [`SHORT_VALIDITY`] from now, written
/// over `DIR/HOST.pem` and `DIR/HOST.key`; returns its notAfter.
fn short_lived(pki: &Path, host: &str) -> time::OffsetDateTime {
    let ca = Ca::load(pki).expect("CA");
    let not_after = time::OffsetDateTime::now_utc() + SHORT_VALIDITY;
    let opts = IssueOptions { not_after: Some(not_after), ..Default::default() };
    ca.issue(host, &opts).expect("short-lived certificate").write(pki).expect("write certificate");
    not_after
}

/// Panics unless the clock is still before `not_after`: the part of the test that needs the
/// certificate valid took longer than [`SHORT_VALIDITY`], so what follows would prove nothing.
fn still_valid(not_after: time::OffsetDateTime, what: &str) {
    assert!(
        time::OffsetDateTime::now_utc() + time::Duration::milliseconds(500) < not_after,
        "{what} took longer than the short-lived certificate's {SHORT_VALIDITY}: machine too slow for this test"
    );
}

/// Sleeps until the clock is a second past `not_after` (certificate times are whole seconds).
async fn wait_until_expired(not_after: time::OffsetDateTime) {
    let left = not_after + time::Duration::seconds(1) - time::OffsetDateTime::now_utc();
    if left.is_positive() {
        tokio::time::sleep(Duration::from_millis(left.whole_milliseconds() as u64)).await;
    }
}

/// host-b exposes `bulk` (a hash target) to host-a; host-a forwards `in.sock` to it. `tls_a` /
/// `tls_b` are extra lines for each `[tls]` table (e.g. `crl = "..."`).
async fn start_pair(pki: Pki, tls_a: &str, tls_b: &str, metrics: bool) -> Pair {
    let (port_a, port_b) = (bind_port().await, bind_port().await);
    let (addr_a, addr_b) = (port_a.local_addr().unwrap(), port_b.local_addr().unwrap());
    let metrics = if metrics { "metrics = \"127.0.0.1:0\"\n" } else { "" };
    let b = format!(
        "name = \"host-b\"\nlisten = \"{addr_b}\"\n{metrics}{}{tls_b}\n[[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\n\n\
         [[expose]]\nroute = \"bulk\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        tls_table(&pki.pki(), "host-b"),
        pki.path("hash.sock").display()
    );
    let a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{metrics}{}{tls_a}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\n\n\
         [[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"bulk\"\n",
        tls_table(&pki.pki(), "host-a"),
        pki.path("in.sock").display()
    );
    let b = start_agent(pki.dir.path(), "host-b", &b, port_b).await;
    let a = start_agent(pki.dir.path(), "host-a", &a, port_a).await;
    Pair { pki, a, b, transport: "tls" }
}

/// One stream through host-a's forward: `true` if the hash target's answer came back exact.
async fn stream_works(pair: &Pair, seed: u64) -> bool {
    let data = DataGen::new(seed).bytes(64 * 1024);
    let Ok(mut s) = tokio::net::UnixStream::connect(pair.sock("in.sock")).await else { return false };
    let sent = async {
        s.write_all(&data).await?;
        s.shutdown().await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    matches!(sent.await, Ok(answer) if answer == digest_of(&data))
}

/// A raw TLS client of host-b's port that keeps its session cache between connections.
struct RawClient {
    connector: tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
}

impl RawClient {
    fn new(pki: &Path, host: &str, addr: std::net::SocketAddr) -> RawClient {
        let cert = std::fs::read_to_string(pki.join(format!("{host}.pem"))).unwrap();
        let key = std::fs::read_to_string(pki.join(format!("{host}.key"))).unwrap();
        let config = raw_client_config(pki, Some((cert, key)));
        RawClient { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), addr }
    }

    /// Opens route `bulk`, sends `hello`, half-closes: whether the handshake was a resumption,
    /// and whether the hash target's digest of `hello` came back.
    async fn hello(&self) -> (bool, bool) {
        let tcp = TcpStream::connect(self.addr).await.expect("TCP connect");
        let Ok(mut tls) = self.connector.connect(ServerName::try_from("host-b").unwrap(), tcp).await else {
            return (false, false);
        };
        let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
        let exchange = async {
            tls.write_all(&migtun_proxy::route::wire::Request::new("bulk", None).unwrap().encode()).await?;
            tls.write_all(b"hello").await?;
            // The reply header first: a close_notify right behind the client's Finished is
            // another matter (the session would end before it began).
            let mut reply = vec![0u8; 3];
            tls.read_exact(&mut reply).await?;
            tls.shutdown().await?;
            tls.read_to_end(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        };
        let result = exchange.await;
        let answered = matches!(result, Ok(reply) if reply.ends_with(&digest_of(b"hello")));
        (resumed, answered)
    }
}

fn failures(agent: &RunningAgent, role: &str, reason: &str) -> f64 {
    agent.sample("migtun_handshake_failures_total", &[("role", role), ("reason", reason)])
}

/// Server direction: a client whose certificate expires after its first full handshake. The
/// resumed handshake after expiry is refused (old code: accepted, the stream opened), counted
/// with reason `expired` and the peer's name, and the next attempt is not resumed at all but a
/// full handshake, which the verifier refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_with_a_client_certificate_expired_since_is_refused() {
    let pair = start_pair(Pki::new(), "", "", false).await;
    // The agents have loaded their certificates; the raw client presents a short-lived one.
    let not_after = short_lived(&pair.pki.pki(), "host-a");
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let client = RawClient::new(&pair.pki.pki(), "host-a", pair.b.addr);

    assert_eq!(client.hello().await, (false, true), "first connection: full handshake, stream works");
    still_valid(not_after, "the first handshake");
    wait_until_expired(not_after).await;

    let (resumed, answered) = client.hello().await;
    assert!(resumed, "the second connection must resume the session, or this test proves nothing");
    assert!(!answered, "a resumed session of an expired certificate must not open a stream");
    eventually("host-b counts the resumption refused as expired, naming host-a", || {
        pair.b.sample(
            "migtun_handshake_failures_total",
            &[("role", "server"), ("reason", "expired"), ("peer", "host-a")],
        ) == 1.0
    })
    .await;

    let (resumed, answered) = client.hello().await;
    assert!(!resumed, "a refused certificate's sessions are not resumed again");
    assert!(!answered);
    eventually("host-b refuses the full handshake as expired", || failures(&pair.b, "server", "expired") == 2.0).await;
    assert_eq!(pair.b.sample("migtun_stream_opens_total", &[]), 1.0, "only the first stream opened");
}

/// Client direction, through the warm pool: host-b's certificate expires while host-a keeps
/// resuming sessions to it. Once the connections made before expiry are used up, every new one
/// is refused by host-a (old code: resumed and used for as long as tickets last), counted with
/// reason `expired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_stops_resuming_to_a_server_whose_certificate_expired() {
    let pki = Pki::new();
    let not_after = short_lived(&pki.pki(), "host-b");
    let pair = start_pair(pki, "", "", false).await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));

    assert!(stream_works(&pair, 1).await, "first stream, before expiry");
    eventually("host-a warms its pool (one full handshake, resumed ones after)", || {
        pair.a.sample("migtun_handshakes_total", &[("role", "client"), ("kind", "resumed")])
            >= migtun_proxy::peer::WARM_CONNECTIONS as f64
    })
    .await;
    still_valid(not_after, "the first stream and the pool's warm-up");
    wait_until_expired(not_after).await;

    // The pool's connections were made before expiry; at most that many streams (and one more
    // being dialled) can still use them. Every stream after must fail.
    let before_expiry = migtun_proxy::peer::WARM_CONNECTIONS + 1;
    let mut results = Vec::new();
    for seed in 0..before_expiry + 3 {
        results.push(stream_works(&pair, 10 + seed as u64).await);
    }
    assert!(
        results[before_expiry..].iter().all(|ok| !ok),
        "streams after the pool's pre-expiry connections must fail: {results:?}"
    );
    assert!(failures(&pair.a, "client", "expired") >= 1.0, "host-a counts refusals as expired");
}

/// A certificate in `tls.crl` is refused on a full handshake, in both directions, with reason
/// `revoked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_are_refused_on_full_handshakes() {
    // Server side: host-b's CRL revokes host-c, a certificate of the CA.
    let pki = Pki::new();
    let crl = migtun_certs::revoke(&pki.pki(), "host-c").expect("revoke host-c");
    let pair = start_pair(pki, "", &format!("crl = \"{}\"\n", crl.display()), false).await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let revoked = RawClient::new(&pair.pki.pki(), "host-c", pair.b.addr);
    assert_eq!(revoked.hello().await, (false, false));
    eventually("host-b refuses host-c as revoked", || failures(&pair.b, "server", "revoked") == 1.0).await;
    assert!(stream_works(&pair, 1).await, "host-a, not revoked, still gets through");

    // Client side: host-a's CRL revokes host-b.
    let pki = Pki::new();
    let crl = migtun_certs::revoke(&pki.pki(), "host-b").expect("revoke host-b");
    let pair = start_pair(pki, &format!("crl = \"{}\"\n", crl.display()), "", false).await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    assert!(!stream_works(&pair, 2).await, "host-a must refuse the revoked host-b");
    eventually("host-a refuses host-b as revoked", || failures(&pair.a, "client", "revoked") >= 1.0).await;
    assert_eq!(pair.b.sample("migtun_stream_opens_total", &[]), 0.0);
}

/// The config of `host` in `pki` with `crl` as `tls.crl` (no peers).
fn config_with_crl(pki: &Path, host: &str, crl: &Path) -> Result<Config, migtun_proxy::config::ConfigError> {
    let toml = format!(
        "name = \"{host}\"\nlisten = \"127.0.0.1:0\"\n{}crl = \"{}\"\n",
        tls_table(pki, host),
        crl.display()
    );
    Config::from_toml(&toml, "test.toml", pki)
}

/// A certificate revoked after a session was made is refused when the session is resumed, in
/// both directions: a session made under a context without the CRL (as before a reload, which
/// will replace the context whole) is re-checked by a context with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_are_refused_on_resumed_sessions() {
    use migtun_proxy::tls::context::TlsContext;
    use migtun_proxy::tls::failure::tls_failure_reason;
    use migtun_proxy::tls::ALPN_DATA;
    let pki = Pki::new();
    let load = |host: &str| {
        let toml = format!("name = \"{host}\"\nlisten = \"127.0.0.1:0\"\n{}", tls_table(&pki.pki(), host));
        Config::from_toml(&toml, "test.toml", &pki.pki()).expect("config")
    };
    let (a, b) = (load("host-a"), load("host-b"));
    let (ctx_a, ctx_b) = (TlsContext::new(&a.tls).unwrap(), TlsContext::new(&b.tls).unwrap());
    let client = ctx_a.client_config(&[ALPN_DATA]).unwrap();
    let server = ctx_b.server_config(&[ALPN_DATA]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let mut infos = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = migtun_proxy::tls::session::accept(server.clone(), tcp).await.expect("accept");
            infos.push(s.info().clone());
            // The client reads its tickets until this end closes.
            let _ = s.shutdown().await;
        }
        infos
    });
    let mut client_infos = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("host-b").unwrap();
        let mut s = migtun_proxy::tls::session::connect(client.config.clone(), name, tcp).await.expect("connect");
        client_infos.push(s.info().clone());
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }
    let server_infos = accept.await.unwrap();
    assert!(!client_infos[0].resumed && client_infos[1].resumed, "the second connection resumes");
    assert!(server_infos[1].resumed);

    // Not revoked: the resumed session's certificates pass the re-check.
    let b_name = ServerName::try_from("host-b").unwrap();
    ctx_b.recheck_client(server_infos[1].peer_certificates.as_deref()).expect("host-a is valid");
    client.recheck(client_infos[1].peer_certificates.as_deref(), &b_name).expect("host-b is valid");

    // Revoke both; contexts with the CRL refuse the resumed sessions' certificates.
    migtun_certs::revoke(&pki.pki(), "host-a").unwrap();
    let crl = migtun_certs::revoke(&pki.pki(), "host-b").unwrap();
    let with_crl = |host| TlsContext::new(&config_with_crl(&pki.pki(), host, &crl).unwrap_or_else(|e| panic!("{e}")).tls);
    // host-a's own certificate is revoked now, so its config is refused: build the verifying
    // context from host-c's identity, which trusts and revokes the same way.
    let ctx_c = with_crl("host-c").unwrap();
    let e = ctx_c.recheck_client(server_infos[1].peer_certificates.as_deref()).unwrap_err();
    assert_eq!(tls_failure_reason(&e), "revoked", "{e}");
    let e = ctx_c.recheck_server(client_infos[1].peer_certificates.as_deref(), &b_name).unwrap_err();
    assert_eq!(tls_failure_reason(&e), "revoked", "{e}");
}

/// `tls.crl` that is missing, not a CRL, malformed, of another CA, or revoking the agent's own
/// certificate: a config error naming `tls.crl` (or `tls.cert`) and the file.
#[test]
fn bad_tls_crl_is_a_config_error_naming_the_key() {
    let pki = Pki::new();
    let dir = pki.pki();
    let check = |crl: &Path, key: &str, text: &str| {
        let e = config_with_crl(&dir, "host-a", crl).expect_err("must be refused");
        assert_eq!(e.key, key, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(text), "{msg:?} should say {text:?}");
        assert!(msg.contains(&crl.display().to_string()), "{msg:?} should name {}", crl.display());
    };
    check(&dir.join("nonexistent.pem"), "tls.crl", "cannot read");
    std::fs::write(dir.join("garbage.pem"), "not a CRL\n").unwrap();
    check(&dir.join("garbage.pem"), "tls.crl", "no PEM CRL");
    // A certificate is not a CRL.
    check(&dir.join("ca.pem"), "tls.crl", "no PEM CRL");
    std::fs::write(dir.join("bad.pem"), "-----BEGIN X509 CRL-----\nMIIBAAAA\n-----END X509 CRL-----\n").unwrap();
    check(&dir.join("bad.pem"), "tls.crl", "does not parse");
    // A CRL of another CA: named differently, or named like ours (then its signature fails).
    let other = tempfile::tempdir().unwrap();
    Ca::generate("other CA").unwrap().write(other.path()).unwrap();
    migtun_certs::issue(other.path(), "host-x").unwrap();
    let foreign = migtun_certs::revoke(other.path(), "host-x").unwrap();
    check(&foreign, "tls.crl", "not a CA of tls.ca");
    let twin = tempfile::tempdir().unwrap();
    migtun_certs::init(twin.path()).unwrap();
    migtun_certs::issue(twin.path(), "host-x").unwrap();
    let forged = migtun_certs::revoke(twin.path(), "host-x").unwrap();
    check(&forged, "tls.crl", "is the CRL signed by the CA of tls.ca?");
    let own = migtun_certs::revoke(&dir, "host-a").unwrap();
    check(&own, "tls.cert", "is revoked by tls.crl");
    // The same CRL is fine for a host it does not revoke.
    let c = config_with_crl(&dir, "host-b", &own).expect("host-b is not revoked");
    assert_eq!(c.tls.crls.len(), 1);
    assert_eq!(c.tls.crl_path.as_deref(), Some(own.as_path()));
}

/// GET /metrics over plain HTTP/1.1 (the agent must answer).
async fn metrics_of(addr: std::net::SocketAddr) -> String {
    scrape(addr).await.expect("the metrics endpoint answers 200")
}

fn not_after_of(pem: &Path) -> i64 {
    let data = std::fs::read(pem).unwrap();
    let cert = CertificateDer::pem_slice_iter(&data).next().unwrap().unwrap();
    migtun_proxy::tls::identity::not_after(&cert).expect("parse certificate")
}

/// The agent exports its own certificate's notAfter and the earliest of its CA's, as gauges
/// of unix seconds on /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_metrics_on_the_metrics_endpoint() {
    let pki = Pki::new();
    let not_after = short_lived(&pki.pki(), "host-b");
    let pair = start_pair(pki, "", "", true).await;
    let text = metrics_of(pair.b.metrics_addr.expect("metrics address")).await;
    let value = |which: &str| {
        migtun_proxy::metrics::sum_samples(&text, "migtun_certificate_not_after_seconds", &[("which", which)])
    };
    assert_eq!(value("leaf"), not_after.unix_timestamp() as f64, "{text}");
    assert_eq!(value("leaf"), not_after_of(&pair.pki.pki().join("host-b.pem")) as f64);
    assert_eq!(value("ca"), not_after_of(&pair.pki.pki().join("ca.pem")) as f64, "{text}");
    assert!(value("ca") > value("leaf"));
    let text = metrics_of(pair.a.metrics_addr.expect("metrics address")).await;
    assert_eq!(
        migtun_proxy::metrics::sum_samples(&text, "migtun_certificate_not_after_seconds", &[("which", "leaf")]),
        not_after_of(&pair.pki.pki().join("host-a.pem")) as f64
    );
}

/// Finds `sslscan`; under CI its absence fails the test, elsewhere it is skipped loudly.
fn sslscan() -> Option<&'static str> {
    let found = std::process::Command::new("sslscan").arg("--version").output().is_ok();
    if found {
        return Some("sslscan");
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("sslscan not found, and CI=true: .ci/run must install the Debian package sslscan");
    }
    eprintln!("\n\n*** SKIPPED: sslscan not found (apt-get install sslscan) ***\n\n");
    None
}

/// sslscan against the port: only TLS 1.3 is accepted (SSLv2, SSLv3, TLS 1.0, 1.1 and 1.2 are
/// refused) and exactly the agent's three TLS 1.3 suites are, although the port requires a
/// client certificate (the server's choice shows in its ServerHello, before that is asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslscan_sees_tls13_only_and_the_configured_suites() {
    let Some(bin) = sslscan() else { return };
    let pair = start_pair(Pki::new(), "", "", false).await;
    let target = format!("{}", pair.b.addr);
    let out = tokio::process::Command::new(bin)
        .args(["--no-colour", "--no-fallback", "--no-renegotiation", "--no-compression", "--no-heartbleed", "--no-groups"])
        .arg("--show-sigs")
        .arg(&target)
        .output()
        .await
        .expect("run sslscan");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    assert!(out.status.success(), "sslscan failed: {}", String::from_utf8_lossy(&out.stderr));

    // The "SSL/TLS Protocols" section: one line per protocol, enabled or disabled.
    let protocol = |name: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("sslscan says nothing about {name}:\n{text}"))
            .to_string()
    };
    for name in ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2"] {
        assert!(protocol(name).ends_with("disabled"), "{name} must be refused: {}", protocol(name));
    }
    assert!(protocol("TLSv1.3").ends_with("enabled"), "TLS 1.3 must be accepted: {}", protocol("TLSv1.3"));

    // Accepted cipher suites: "Preferred|Accepted  TLSvX  BITS bits  NAME ...".
    let mut accepted: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Preferred") || l.starts_with("Accepted"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(1)?.to_string(), f.get(4)?.to_string()))
        })
        .collect();
    accepted.sort();
    // The agent's suites (tls::provider), in IANA names: rustls says TLS13_AES_128_GCM_SHA256.
    let mut expected: Vec<(String, String)> = migtun_proxy::tls::context::provider()
        .cipher_suites
        .iter()
        .map(|s| ("TLSv1.3".to_string(), format!("{:?}", s.suite()).replacen("TLS13_", "TLS_", 1)))
        .collect();
    expected.sort();
    assert_eq!(expected.len(), 3, "{expected:?}");
    assert_eq!(accepted, expected, "accepted suites:\n{text}");
    // The agent prefers its own order: AES-128-GCM first.
    assert!(
        text.lines().any(|l| l.trim().starts_with("Preferred") && l.contains("TLS_AES_128_GCM_SHA256")),
        "AES-128-GCM preferred:\n{text}"
    );
    assert_eq!(pair.b.sample("migtun_stream_opens_total", &[]), 0.0, "the scan opened no stream");
}

/// `migtun certs revoke` as an operator runs it: DIR/crl.pem, which `migtun check` then uses
/// through `tls.crl` (relative to the config file): the revoked host's own config is refused
/// naming `tls.cert` and the CRL, another host's is explained with it.
#[test]
fn certs_revoke_then_check() {
    let migtun = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_migtun")).args(args).output().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    assert!(migtun(&["certs", "init", "--dir", p]).status.success());
    for host in ["host-a", "host-b"] {
        assert!(migtun(&["certs", "issue", "--dir", p, "--name", host]).status.success());
    }
    let out = migtun(&["certs", "revoke", "--dir", p, "--name", "host-b"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("crl.pem"));
    let missing = migtun(&["certs", "revoke", "--dir", p, "--name", "host-z"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("host-z.pem"));

    for host in ["host-a", "host-b"] {
        let toml = format!(
            "name = \"{host}\"\nlisten = \"127.0.0.1:0\"\n[tls]\ncert = \"pki/{host}.pem\"\nkey = \"pki/{host}.key\"\nca = \"pki/ca.pem\"\ncrl = \"pki/crl.pem\"\n"
        );
        std::fs::write(dir.path().join(format!("{host}.toml")), toml).unwrap();
    }
    let a = migtun(&["check", "--config", dir.path().join("host-a.toml").to_str().unwrap()]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(String::from_utf8_lossy(&a.stdout).contains("crl.pem (1 CRL(s)"), "{}", String::from_utf8_lossy(&a.stdout));
    let b = migtun(&["check", "--config", dir.path().join("host-b.toml").to_str().unwrap()]);
    assert!(!b.status.success());
    let err = String::from_utf8_lossy(&b.stderr);
    assert!(err.contains("`tls.cert`") && err.contains("is revoked by tls.crl") && err.contains("crl.pem"), "{err}");
}

/// Over QUIC: a client whose certificate expires after its first connection. quinn does not
/// say whether a session was resumed, so host-b checks every connection's certificate; the
/// resumed one after expiry is refused by that check (counted with the peer's name, which a
/// full handshake's refusal does not know) and opens no stream (old code: it did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_resumption_with_a_client_certificate_expired_since_is_refused() {
    use migtun_proxy::quic::quinn;
    let pair = start_pair(Pki::new(), "", "", false).await;
    let not_after = short_lived(&pair.pki.pki(), "host-a");
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let cert = std::fs::read_to_string(pair.pki.pki().join("host-a.pem")).unwrap();
    let key = std::fs::read_to_string(pair.pki.pki().join("host-a.key")).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(raw_client_config(
        &pair.pki.pki(),
        Some((cert, key)),
    )))
    .unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let hello = || async {
        let conn = endpoint.connect_with(config.clone(), pair.b.addr, "host-b").unwrap().await.ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&migtun_proxy::route::wire::Request::new("bulk", None).unwrap().encode()).await.ok()?;
        send.write_all(b"hello").await.ok()?;
        send.finish().ok()?;
        let mut reply = Vec::new();
        AsyncReadExt::read_to_end(&mut recv, &mut reply).await.ok()?;
        // Keep the connection until the reply is read, so its session tickets arrive.
        conn.close(0u32.into(), b"done");
        Some(reply.ends_with(&digest_of(b"hello")))
    };

    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), hello()).await.expect("first"),
        Some(true),
        "first QUIC connection works"
    );
    still_valid(not_after, "the first QUIC connection");
    wait_until_expired(not_after).await;
    let second = tokio::time::timeout(Duration::from_secs(30), hello()).await.expect("the client learns the verdict");
    assert_ne!(second, Some(true), "an expired certificate must not open a stream over QUIC");
    eventually("host-b refuses host-a's resumed QUIC session as expired", || {
        pair.b.sample(
            "migtun_handshake_failures_total",
            &[("transport", "quic"), ("role", "server"), ("reason", "expired"), ("peer", "host-a")],
        ) == 1.0
    })
    .await;
    assert_eq!(pair.b.sample("migtun_stream_opens_total", &[]), 1.0);
}
