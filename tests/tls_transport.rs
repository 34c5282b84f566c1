//! The data plane over TLS/TCP: the shared stream suite on both TLS record layers, plus what
//! only TLS has to show.

mod common;

/// The whole suite on migtun's own record layer (`tls.record_layer = "own"`, the default).
mod own_record_layer {
    crate::common::suite::transport_suite!("tls", "own");
}

/// The whole suite again on the fallback, tokio-rustls' record layer (`"rustls"`).
mod rustls_record_layer {
    crate::common::suite::transport_suite!("tls", "rustls");
}

use std::sync::Arc;
use std::time::Duration;

use common::*;
use migtun_certs::{time, Ca, IssueOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The shared refusal check (`tests/common/refusal.rs`), over TLS/TCP.
async fn refused_at_handshake(identity: impl FnOnce(&Pair) -> Option<(String, String)>, reason: &str) {
    common::refusal::refused_at_handshake("tls", identity, reason).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused() {
    refused_at_handshake(
        |_| Some(identity_from_another_ca("host-a")),
        "unknown-ca",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_refused() {
    refused_at_handshake(|_| None, "no-client-certificate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_refused() {
    refused_at_handshake(
        |pair| {
            let ca = Ca::load(&pair.pki.pki()).unwrap();
            let now = time::OffsetDateTime::now_utc();
            let opts = IssueOptions {
                not_before: Some(now - time::Duration::days(30)),
                not_after: Some(now - time::Duration::days(1)),
                ..Default::default()
            };
            let cert = ca.issue("host-a", &opts).unwrap();
            Some((cert.cert_pem, cert.key_pem))
        },
        "expired",
    )
    .await;
}

/// host-a expects host-b at an address where host-c answers (with a valid certificate from the
/// same CA): host-a refuses the server, the stream fails with that reason, nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_whose_certificate_names_another_host_is_refused() {
    let pki = Pki::new();
    let (port_a, port_c) = (bind_port().await, bind_port().await);
    let (addr_a, addr_c) = (port_a.local_addr().unwrap(), port_c.local_addr().unwrap());
    let target = pki.path("hash.sock");
    let _t = spawn_hash_target(target.clone());
    let c = format!(
        "name = \"host-c\"\nlisten = \"{addr_c}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"127.0.0.1:9\"\n\n[[expose]]\nroute = \"bulk\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        tls_table(&pki.pki(), "host-c"),
        target.display()
    );
    let a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_c}\"\n\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"bulk\"\n",
        tls_table(&pki.pki(), "host-a"),
        pki.path("in.sock").display()
    );
    let host_c = start_agent(pki.dir.path(), "host-c", &c, port_c).await;
    let host_a = start_agent(pki.dir.path(), "host-a", &a, port_a).await;
    let mut s = tokio::net::UnixStream::connect(pki.path("in.sock")).await.unwrap();
    let _ = s.write_all(b"secret").await;
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    assert!(got.is_empty());
    eventually("host-a refuses the wrong server name", || {
        host_a.sample("migtun_handshake_failures_total", &[("role", "client"), ("peer", "host-b"), ("reason", "wrong-name")]) == 1.0
            && host_a.sample("migtun_stream_failures_total", &[("route", "bulk"), ("reason", "wrong-name")]) == 1.0
    })
    .await;
    assert_eq!(host_c.sample("migtun_stream_opens_total", &[]), 0.0);
}

/// Streams after the first do not pay a full handshake: warm connections first, then
/// resumed sessions when more streams open at once than are warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_streams_use_warm_connections_and_resumed_sessions() {
    let pair = Pair::start(PairSpec::bulk()).await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let (answer, sent) = send_and_hash(pair.connect("in.sock").await, 1000, 1).await;
    assert_eq!(answer, sent);
    let client = |kind| pair.a.sample("migtun_handshakes_total", &[("role", "client"), ("kind", kind)]);
    eventually("the pool is warmed", || client("full") + client("resumed") >= 3.0).await;
    let mut streams = Vec::new();
    for i in 0..8 {
        let s = pair.connect("in.sock").await;
        streams.push(tokio::spawn(send_and_hash(s, 100_000, i)));
    }
    for s in streams {
        let (answer, sent) = s.await.unwrap();
        assert_eq!(answer, sent);
    }
    assert!(client("resumed") >= 6.0, "new connections resume the session: {} resumed, {} full", client("resumed"), client("full"));
    assert!(client("full") <= 3.0, "at most the first connections are full handshakes: {}", client("full"));
}

/// Drain: after shutdown starts, the forward socket is gone (no new streams) while the open
/// stream finishes intact; the agent then stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_open_streams_finish_and_refuses_new_ones() {
    let pair = Pair::start(PairSpec::bulk()).await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let mut s = pair.connect("in.sock").await;
    let first = DataGen::new(1).bytes(4 << 20);
    s.write_all(&first).await.unwrap();
    eventually("stream open on host-b", || pair.b.sample("migtun_streams_open", &[]) == 1.0).await;

    let Pair { a, b, pki, .. } = pair;
    let shutdown = a.shutdown.clone();
    let stopping = tokio::spawn(a.stop());
    shutdown.cancel();
    eventually("forward socket removed", || !pki.path("in.sock").exists()).await;
    assert!(tokio::net::UnixStream::connect(pki.path("in.sock")).await.is_err(), "no new streams while draining");

    let second = DataGen::new(2).bytes(4 << 20);
    s.write_all(&second).await.expect("the open stream keeps flowing");
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let all: Vec<u8> = [first, second].concat();
    assert_eq!(answer, digest_of(&all).to_vec(), "the draining stream arrives intact");
    tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("agent stops once its stream is done").unwrap();
    drop(b);
}

/// Drain deadline: a stream that does not finish is cut when the deadline passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_streams_that_do_not_finish() {
    let pair = Pair::start(PairSpec {
        drain_timeout_secs: 1,
        ..PairSpec::bulk()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let mut s = pair.connect("in.sock").await;
    s.write_all(b"never finished").await.unwrap();
    eventually("stream open", || pair.a.sample("migtun_streams_open", &[]) == 1.0).await;
    let Pair { a, .. } = pair;
    tokio::time::timeout(Duration::from_secs(15), a.stop()).await.expect("the agent stops after the deadline");
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await.expect("the local side is closed");
    assert!(r.is_err() || rest.is_empty(), "no answer for an unfinished stream");
}

/// `/metrics` serves the Prometheus text format with the documented families.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    let pair = Pair::start(PairSpec {
        metrics: true,
        ..PairSpec::bulk()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let (answer, sent) = send_and_hash(pair.connect("in.sock").await, 12345, 1).await;
    assert_eq!(answer, sent);
    let addr = pair.a.metrics_addr.expect("metrics address");
    let body = scrape(addr).await.expect("the metrics endpoint answers 200");
    for needle in [
        "migtun_build_info{version=",
        "migtun_bytes_total{peer=\"host-b\",route=\"bulk\",direction=\"tx\"} 12345",
        "migtun_stream_opens_total{peer=\"host-b\",route=\"bulk\",side=\"source\"} 1",
        "migtun_handshakes_total{role=\"client\"",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in\n{body}");
    }
}

/// A burst of 1,000 streams opened at once: every one arrives (the source paces its dials
/// below the peer's cap on handshakes in progress instead of having them dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_thousand_opens_all_arrive() {
    let pair = Pair::start(PairSpec {
        forwards: &[("burst", "burst.sock")],
        exposes: &[("burst", "hash.sock", &["host-a"])],
        ..Default::default()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(pair.connect("burst.sock").await);
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(async move { send_and_hash(s, 4096, i as u64).await }))
        .collect();
    for t in tasks {
        let (answer, sent) = tokio::time::timeout(Duration::from_secs(120), t).await.expect("stream finishes").unwrap();
        assert_eq!(answer, sent);
    }
    assert_eq!(pair.a.sample("migtun_stream_failures_total", &[]), 0.0);
    assert_eq!(pair.b.sample("migtun_handshake_failures_total", &[]), 0.0, "no handshake dropped by the peer");
}

/// Control connections (ALPN h2) run on the configured record layer too, on either side and
/// mixed: bytes both ways and a clean end, whichever layer each agent uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connections_work_on_either_record_layer_and_mixed() {
    for (layer_a, layer_b) in [("rustls", "rustls"), ("own", "rustls"), ("rustls", "own")] {
        let echo: migtun_proxy::agent::ControlHandler = Arc::new(|mut io, peer| {
            Box::pin(async move {
                assert_eq!(peer.name(), "host-a");
                let mut got = Vec::new();
                io.read_to_end(&mut got).await.expect("the control client's bytes, to a clean end");
                io.write_all(&got).await.unwrap();
                io.shutdown().await.unwrap();
            })
        });
        let (_pki, a, _b) = control_pair_on(echo, layer_a, layer_b).await;
        let mut io = a.handle.connect_control("host-b").await.expect("control connection");
        let data = DataGen::new(9).bytes(3 << 20);
        let (mut r, mut w) = tokio::io::split(&mut io);
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let ((), read) = tokio::join!(write, r.read_to_end(&mut back));
        read.expect("the echo, to a clean end");
        assert!(back == data, "host-a {layer_a}, host-b {layer_b}: the echo is exact");
    }
}
