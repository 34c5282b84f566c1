//! The data plane over QUIC: the shared stream suite, what only QUIC has to show (handshake
//! refusals over QUIC, connection migration), and `transport = "auto"` falling back to TLS over
//! TCP when UDP does not get through, and moving back when it does.

mod common;

common::suite::transport_suite!("quic");

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw QUIC client presenting exactly the certificate it is given (or none), asking for route
/// `bulk` on `addr`. Returns what it could read back, or the error.
async fn raw_quic_client(pki: &std::path::Path, identity: Option<(String, String)>, addr: SocketAddr) -> Result<Vec<u8>, String> {
    common::refusal::raw_client("quic", pki, identity, addr).await
}

/// The shared refusal check (`tests/common/refusal.rs`), over QUIC.
async fn refused_at_quic_handshake(identity: impl FnOnce(&Pair) -> Option<(String, String)>, reason: &str) {
    common::refusal::refused_at_handshake("quic", identity, reason).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_client_certificate_from_another_ca_is_refused() {
    refused_at_quic_handshake(
        |_| Some(identity_from_another_ca("host-a")),
        "unknown-ca",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_without_client_certificate_is_refused() {
    refused_at_quic_handshake(|_| None, "no-client-certificate").await;
}

/// The same raw client with host-a's valid certificate is served: the two refusals above are
/// about the certificate, not about the raw client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_raw_client_with_valid_certificate_is_served() {
    let pair = Pair::start(PairSpec {
        exposes: &[("bulk", "hash.sock", &["host-a"])],
        transport: "quic",
        ..Default::default()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let pki = pair.pki.pki();
    let identity = Some((
        std::fs::read_to_string(pki.join("host-a.pem")).unwrap(),
        std::fs::read_to_string(pki.join("host-a.key")).unwrap(),
    ));
    let reply = raw_quic_client(&pki, identity, pair.b.addr).await.expect("served");
    // Reply `ok` (version 1, code 0, no detail), then the hash target's digest of nothing.
    assert_eq!(&reply[..3], &[1, 0, 0]);
    assert_eq!(&reply[3..], &digest_of(b"")[..]);
}

/// Streams to a `quic` peer go over one QUIC connection: one handshake however many streams,
/// and nothing over TLS/TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_streams_share_one_connection() {
    let pair = Pair::start(PairSpec {
        transport: "quic",
        ..PairSpec::bulk()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let mut tasks = Vec::new();
    for i in 0..10 {
        tasks.push(tokio::spawn(send_and_hash(pair.connect("in.sock").await, 100_000 * i, i)));
    }
    for t in tasks {
        let (answer, sent) = t.await.unwrap();
        assert_eq!(answer, sent);
    }
    assert_eq!(pair.a.sample("migtun_handshakes_total", &[("transport", "quic"), ("role", "client")]), 1.0);
    assert_eq!(pair.b.sample("migtun_handshakes_total", &[("transport", "quic"), ("role", "server")]), 1.0);
    assert_eq!(pair.a.sample("migtun_handshakes_total", &[("transport", "tls")]), 0.0, "no TLS/TCP connection");
    assert_eq!(pair.a.handle.peer_transport("host-b"), Some("quic"));
}

/// `transport = "tls"` never touches UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_transport_never_uses_quic() {
    let pair = Pair::start(PairSpec {
        transport: "tls",
        ..PairSpec::bulk()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let (answer, sent) = send_and_hash(pair.connect("in.sock").await, 1 << 20, 3).await;
    assert_eq!(answer, sent);
    for agent in [&pair.a, &pair.b] {
        assert_eq!(agent.sample("migtun_handshakes_total", &[("transport", "quic")]), 0.0);
        assert_eq!(agent.sample("migtun_handshake_failures_total", &[("transport", "quic")]), 0.0);
    }
    assert_eq!(pair.a.handle.peer_transport("host-b"), Some("tls"));
}

/// Connection migration: host-a's UDP socket is replaced mid-stream (as when its address
/// changes, or a NAT rebinds); the stream carries on and arrives byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_client_rebinding_to_a_new_udp_socket() {
    let pair = Pair::start(PairSpec {
        transport: "quic",
        ..PairSpec::bulk()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let endpoint = pair.a.handle.quic_endpoint().expect("host-a has a QUIC endpoint");
    let old = endpoint.local_addr().unwrap();

    let mut s = pair.connect("in.sock").await;
    let mut gen = DataGen::new(42);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for round in 0..3 {
        if round > 0 {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            migtun_proxy::quic::endpoint::tune_udp_socket(&socket);
            endpoint.rebind(socket).expect("rebind");
            assert_ne!(endpoint.local_addr().unwrap(), old);
        }
        for _ in 0..32 {
            gen.fill(&mut buf);
            hasher.update(&buf);
            s.write_all(&buf).await.expect("write through the tunnel");
            total += buf.len() as u64;
        }
    }
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut answer)).await.expect("answer").unwrap();
    let mut sent = [0u8; 40];
    sent[..8].copy_from_slice(&total.to_le_bytes());
    sent[8..].copy_from_slice(&hasher.finalize());
    assert_eq!(answer, sent.to_vec(), "the stream arrives intact across two rebinds");
    assert_eq!(
        pair.a.sample("migtun_handshakes_total", &[("transport", "quic"), ("role", "client")]),
        1.0,
        "same connection"
    );
    // New streams keep using the migrated connection.
    let (answer, sent) = send_and_hash(pair.connect("in.sock").await, 1 << 20, 7).await;
    assert_eq!(answer, sent);
    assert_eq!(pair.a.sample("migtun_handshakes_total", &[("transport", "quic"), ("role", "client")]), 1.0);
}

/// A stand-in for host-b's port on the path from host-a: TCP is relayed to host-b, UDP is
/// first swallowed (a firewall that drops UDP), then relayed too (the firewall opened).
struct Firewall {
    addr: SocketAddr,
    /// Drop every datagram again (after `open_udp`): the peer seems to vanish.
    blocked: Arc<std::sync::atomic::AtomicBool>,
    udp: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    _tcp: tokio::task::JoinHandle<()>,
    _silent: Arc<std::sync::Mutex<Option<std::net::UdpSocket>>>,
}

impl Firewall {
    async fn start(to: SocketAddr) -> Firewall {
        let tcp = bind_port().await;
        let addr = tcp.local_addr().unwrap();
        // Holds the UDP port: datagrams to it are received by nobody.
        let silent = std::net::UdpSocket::bind(addr).expect("UDP twin of the TCP port");
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = tcp.accept().await else { return };
                tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Firewall {
            addr,
            blocked: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            udp: Arc::new(std::sync::Mutex::new(None)),
            _tcp: tcp_task,
            _silent: Arc::new(std::sync::Mutex::new(Some(silent))),
        }
    }

    /// Lets UDP through: relays datagrams between the port and `to`.
    fn open_udp(&self, to: SocketAddr) {
        let silent = self._silent.lock().unwrap().take().expect("UDP not opened yet");
        silent.set_nonblocking(true).unwrap();
        let socket = tokio::net::UdpSocket::from_std(silent).unwrap();
        let blocked = self.blocked.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut client: Option<SocketAddr> = None;
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
                if blocked.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                if from == to {
                    if let Some(c) = client {
                        let _ = socket.send_to(&buf[..n], c).await;
                    }
                } else {
                    client = Some(from);
                    let _ = socket.send_to(&buf[..n], to).await;
                }
            }
        });
        *self.udp.lock().unwrap() = Some(task);
    }
}

/// `auto`: UDP to the peer is dropped, so streams go over TLS/TCP (switch logged and counted
/// once) and arrive byte-exact; once UDP gets through, new streams move back to QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tls_when_udp_is_dropped_and_returns_to_quic() {
    let pki = Pki::new();
    let (port_a, port_b) = (bind_port().await, bind_port().await);
    let (addr_a, addr_b) = (port_a.local_addr().unwrap(), port_b.local_addr().unwrap());
    let firewall = Firewall::start(addr_b).await;
    let _target = spawn_hash_target(pki.path("hash.sock"));
    let b = format!(
        "name = \"host-b\"\nlisten = \"{addr_b}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\n\n[[expose]]\nroute = \"bulk\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        tls_table(&pki.pki(), "host-b"),
        pki.path("hash.sock").display()
    );
    let a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{}\"\ntransport = \"auto\"\n\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"bulk\"\n",
        tls_table(&pki.pki(), "host-a"),
        firewall.addr,
        pki.path("in.sock").display()
    );
    let b = start_agent(pki.dir.path(), "host-b", &b, port_b).await;
    let a = start_agent(pki.dir.path(), "host-a", &a, port_a).await;
    assert_eq!(a.handle.peer_transport("host-b"), Some("quic"), "auto starts with QUIC");

    // Several streams at once, while QUIC is being tried: all arrive, over TLS.
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let s = tokio::net::UnixStream::connect(pki.path("in.sock")).await.unwrap();
        tasks.push(tokio::spawn(send_and_hash(s, (8 << 20) + i, i)));
    }
    for t in tasks {
        let (answer, sent) = t.await.unwrap();
        assert_eq!(answer, sent, "byte-exact over the fallback");
    }
    assert_eq!(a.handle.peer_transport("host-b"), Some("tls"));
    assert_eq!(
        a.sample("migtun_transport_switches_total", &[("peer", "host-b"), ("to", "tls")]),
        1.0,
        "the switch happens once"
    );
    assert_eq!(b.sample("migtun_handshakes_total", &[("transport", "quic")]), 0.0, "nothing got through on UDP");
    assert!(b.sample("migtun_handshakes_total", &[("transport", "tls"), ("role", "server")]) >= 1.0);
    assert_eq!(a.sample("migtun_stream_failures_total", &[]), 0.0, "no stream failed");

    // UDP opens: the background probe gets through and new streams use QUIC again.
    firewall.open_udp(addr_b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while a.handle.peer_transport("host-b") != Some("quic") {
        assert!(tokio::time::Instant::now() < deadline, "auto never moved back to QUIC");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.sample("migtun_transport_switches_total", &[("peer", "host-b"), ("to", "quic")]), 1.0);
    let s = tokio::net::UnixStream::connect(pki.path("in.sock")).await.unwrap();
    let (answer, sent) = send_and_hash(s, 4 << 20, 9).await;
    assert_eq!(answer, sent);
    assert_eq!(b.sample("migtun_handshakes_total", &[("transport", "quic"), ("role", "server")]), 1.0);
    assert!(b.sample("migtun_stream_opens_total", &[]) >= 5.0);
}

/// An agent whose UDP port is taken refuses to start when a peer needs QUIC, naming `listen`,
/// and starts (TLS only) when no peer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_udp_port_is_an_error_only_when_a_peer_uses_quic() {
    let pki = Pki::new();
    for (transport, ok) in [("quic", false), ("auto", false), ("tls", true)] {
        let port = bind_port().await;
        let addr = port.local_addr().unwrap();
        let _squatter = std::net::UdpSocket::bind(addr).unwrap();
        let toml = format!(
            "name = \"host-a\"\nlisten = \"{addr}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"127.0.0.1:9\"\ntransport = \"{transport}\"\n",
            tls_table(&pki.pki(), "host-a"),
        );
        let path = pki.path(&format!("{transport}.toml"));
        std::fs::write(&path, &toml).unwrap();
        let config = migtun_proxy::Config::load(&path).unwrap();
        match migtun_proxy::Agent::with_port(config, port).await {
            Ok(agent) => {
                assert!(ok, "{transport}: must refuse to start");
                assert!(agent.handle().quic_endpoint().is_none());
            }
            Err(e) => {
                assert!(!ok, "{transport}: must start, got {e}");
                let e = e.to_string();
                assert!(e.starts_with("`listen`: cannot listen on UDP"), "{e}");
                assert!(e.contains("`peer[0].transport`"), "{e}");
            }
        }
    }
}

/// The control connection works whatever transport carries a peer's data streams (it runs
/// over TLS on the same port number).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connection_works_with_a_quic_peer() {
    let pki = Pki::new();
    let (port_a, port_b) = (bind_port().await, bind_port().await);
    let (addr_a, addr_b) = (port_a.local_addr().unwrap(), port_b.local_addr().unwrap());
    let handler: migtun_proxy::agent::ControlHandler = Arc::new(|mut io, peer| {
        Box::pin(async move {
            let mut buf = [0u8; 4];
            if io.read_exact(&mut buf).await.is_ok() {
                let _ = io.write_all(format!("{} {}", peer.name(), String::from_utf8_lossy(&buf)).as_bytes()).await;
                let _ = io.shutdown().await;
            }
        })
    });
    let config = |me: &str, other: &str, other_addr: SocketAddr, listen: SocketAddr| {
        format!(
            "name = \"{me}\"\nlisten = \"{listen}\"\n{}\n[[peer]]\nname = \"{other}\"\naddress = \"{other_addr}\"\ntransport = \"quic\"\n",
            tls_table(&pki.pki(), me)
        )
    };
    let _b =
        start_agent_with(pki.dir.path(), "host-b", &config("host-b", "host-a", addr_a, addr_b), port_b, Some(handler))
            .await;
    let a = start_agent(pki.dir.path(), "host-a", &config("host-a", "host-b", addr_b, addr_a), port_a).await;
    let mut io = a.handle.connect_control("host-b").await.expect("control connection");
    io.write_all(b"ping").await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), io.read_to_string(&mut reply)).await.unwrap().unwrap();
    assert_eq!(reply, "host-a ping");
}

/// A peer that vanishes (every datagram dropped from then on) is noticed by the idle timeout:
/// the open stream ends (the local connection is closed) instead of hanging, and the next
/// stream dials a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_peer_is_noticed_and_the_stream_ends() {
    let pki = Pki::new();
    let (port_a, port_b) = (bind_port().await, bind_port().await);
    let (addr_a, addr_b) = (port_a.local_addr().unwrap(), port_b.local_addr().unwrap());
    let firewall = Firewall::start(addr_b).await;
    firewall.open_udp(addr_b);
    let _target = spawn_hash_target(pki.path("hash.sock"));
    // host-a is one of host-b's peers: a certificate that is not gets nothing past the handshake.
    let b = format!(
        "name = \"host-b\"\nlisten = \"{addr_b}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\n\n[[expose]]\nroute = \"bulk\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        tls_table(&pki.pki(), "host-b"),
        pki.path("hash.sock").display()
    );
    let a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{}\"\ntransport = \"quic\"\n\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"bulk\"\n",
        tls_table(&pki.pki(), "host-a"),
        firewall.addr,
        pki.path("in.sock").display()
    );
    let _b = start_agent(pki.dir.path(), "host-b", &b, port_b).await;
    let a = start_agent(pki.dir.path(), "host-a", &a, port_a).await;

    let mut s = tokio::net::UnixStream::connect(pki.path("in.sock")).await.unwrap();
    s.write_all(&DataGen::new(1).bytes(1 << 20)).await.unwrap();
    eventually("stream open", || a.sample("migtun_streams_open", &[]) == 1.0).await;
    firewall.blocked.store(true, std::sync::atomic::Ordering::Relaxed);
    // Keep writing until the tunnel gives up on the peer; then the local side is closed.
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream to a vanished peer must end (QUIC idle timeout), not hang");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await.expect("closed");
    assert!(rest.is_empty(), "no answer from a vanished peer");
    eventually("no stream left open on host-a", || a.sample("migtun_streams_open", &[]) == 0.0).await;

    // The peer comes back: the next stream dials a new connection and arrives intact.
    firewall.blocked.store(false, std::sync::atomic::Ordering::Relaxed);
    let s = tokio::net::UnixStream::connect(pki.path("in.sock")).await.unwrap();
    let (answer, sent) = send_and_hash(s, 1 << 20, 2).await;
    assert_eq!(answer, sent);
    assert_eq!(
        a.sample("migtun_handshakes_total", &[("transport", "quic"), ("role", "client")]),
        2.0,
        "a new connection"
    );
}

/// host-a expects host-b at an address where host-c answers QUIC (with a valid certificate from
/// the same CA): host-a refuses the server during the handshake, with the TLS transport's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_peer_whose_certificate_names_another_host_is_refused() {
    let pki = Pki::new();
    let (port_a, port_c) = (bind_port().await, bind_port().await);
    let (addr_a, addr_c) = (port_a.local_addr().unwrap(), port_c.local_addr().unwrap());
    let _t = spawn_hash_target(pki.path("hash.sock"));
    let c = format!(
        "name = \"host-c\"\nlisten = \"{addr_c}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"127.0.0.1:9\"\n\n[[expose]]\nroute = \"bulk\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        tls_table(&pki.pki(), "host-c"),
        pki.path("hash.sock").display()
    );
    let a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_c}\"\ntransport = \"quic\"\n\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"bulk\"\n",
        tls_table(&pki.pki(), "host-a"),
        pki.path("in.sock").display()
    );
    let host_c = start_agent(pki.dir.path(), "host-c", &c, port_c).await;
    let host_a = start_agent(pki.dir.path(), "host-a", &a, port_a).await;
    let mut s = tokio::net::UnixStream::connect(pki.path("in.sock")).await.unwrap();
    let _ = s.write_all(b"secret").await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got)).await.expect("closed");
    assert!(got.is_empty());
    eventually("host-a refuses the wrong server name over QUIC", || {
        host_a.sample(
            "migtun_handshake_failures_total",
            &[("transport", "quic"), ("role", "client"), ("peer", "host-b"), ("reason", "wrong-name")],
        ) == 1.0
            && host_a.sample("migtun_stream_failures_total", &[("route", "bulk"), ("reason", "wrong-name")]) == 1.0
    })
    .await;
    assert_eq!(host_c.sample("migtun_stream_opens_total", &[]), 0.0);
}

/// Over QUIC, bytes handed to a stream travel with its connection: a stream whose last direction
/// finishes while the agent drains must still deliver every byte before the agent closes its
/// endpoint (the relay waits for the peer's acknowledgement of the stream's `FIN`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_agent_delivers_the_last_bytes_of_a_finished_stream() {
    let pair = Pair::start(PairSpec {
        forwards: &[("g", "g-in.sock")],
        exposes: &[("g", "greeter.sock", &["host-a"])],
        transport: "quic",
        ..Default::default()
    })
    .await;
    let listener = tokio::net::UnixListener::bind(pair.sock("greeter.sock")).unwrap();
    let target = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap(); // the target -> source direction is done first
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut s = pair.connect("g-in.sock").await;
    let mut greeting = Vec::new();
    s.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello");

    let Pair { a, b, .. } = pair;
    let shutdown = a.shutdown.clone();
    let stopping = tokio::spawn(a.stop());
    shutdown.cancel();
    // The last direction: written and finished while host-a drains.
    let late = DataGen::new(5).bytes(16 << 20);
    s.write_all(&late).await.unwrap();
    s.shutdown().await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(60), target).await.expect("target finishes").unwrap();
    assert!(
        received.len() == late.len() && received == late,
        "all {} late bytes arrive, got {}",
        late.len(),
        received.len()
    );
    tokio::time::timeout(Duration::from_secs(30), stopping).await.expect("host-a stops").unwrap();
    drop(b);
}

/// Stream slots come back: a QUIC connection allows 1,024 streams at once, and streams that
/// ended must not count against it. 1,500 short streams one after the other (each dropped right
/// after its echo came back, as the stream-open benchmark does), then 1,000 at once: all must
/// open. On one connection quinn kept 81 slots of the 1,500 ended streams (both agents had
/// read every stream to its end and seen its FIN acknowledged); the agent now moves to a fresh
/// connection every `QUIC_STREAMS_PER_CONNECTION` streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_streams_give_their_slots_back() {
    let pair = Pair::start(PairSpec {
        forwards: &[("echo", "in.sock")],
        exposes: &[("echo", "echo.sock", &["host-a"])],
        transport: "quic",
        ..Default::default()
    })
    .await;
    let _target = spawn_echo_target(pair.sock("echo.sock"));
    for i in 0..1500u32 {
        let mut s = pair.connect("in.sock").await;
        s.write_all(&[i as u8]).await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap_or_else(|_| panic!("stream {i} got no echo within 5 s"))
            .unwrap();
        assert_eq!(b[0], i as u8);
    }
    let mut held = Vec::new();
    for i in 0..1000u32 {
        let mut s = pair.connect("in.sock").await;
        s.write_all(&[i as u8]).await.unwrap();
        held.push(s);
    }
    for (i, s) in held.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
            .await
            .unwrap_or_else(|_| panic!("held stream {i} of 1000 got no echo within 10 s"))
            .unwrap();
    }
}
