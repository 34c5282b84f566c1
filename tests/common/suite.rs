//! The stream semantics every transport must keep, written once and run per transport with
//! [`transport_suite!`]: byte-exact transfer, echo, half-close both ways, 200 concurrent
//! streams, accept order, resets, and refusals that leave other streams alone.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};

use super::*;

/// Expands to one `#[tokio::test]` per suite function, for the given transport and TLS record
/// layer (`tls.record_layer` of both agents, `own` unless given).
#[allow(unused_macros)] // test binaries that include `common` without running the suite
macro_rules! transport_suite {
    ($transport:literal) => {
        crate::common::suite::transport_suite!($transport, "own");
    };
    ($transport:literal, $layer:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn one_gib_one_way_byte_exact() {
            crate::common::suite::one_gib_one_way_byte_exact($transport, $layer).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn echo_of_random_sizes() {
            crate::common::suite::echo_of_random_sizes($transport, $layer).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn half_close_source_first() {
            crate::common::suite::half_close_source_first($transport, $layer).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn half_close_target_first() {
            crate::common::suite::half_close_target_first($transport, $layer).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_hundred_concurrent_streams() {
            crate::common::suite::two_hundred_concurrent_streams($transport, $layer).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn connections_reach_target_in_accept_order() {
            crate::common::suite::connections_reach_target_in_accept_order($transport, $layer).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn reset_propagates_both_ways() {
            crate::common::suite::reset_propagates_both_ways($transport, $layer).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn refusals_name_their_reason_and_leave_other_streams_alone() {
            crate::common::suite::refusals_name_their_reason_and_leave_other_streams_alone($transport, $layer).await
        }
    };
}
#[allow(unused_imports)]
pub(crate) use transport_suite;

const GIB: u64 = 1 << 30;

pub async fn one_gib_one_way_byte_exact(transport: &'static str, record_layer: &'static str) {
    let pair = Pair::start(PairSpec {
        forwards: &[("bulk", "bulk.sock")],
        exposes: &[("bulk", "hash.sock", &["host-a"])],
        transport,
        record_layer,
        ..Default::default()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let (answer, sent) = send_and_hash(pair.connect("bulk.sock").await, GIB, 1).await;
    assert_eq!(answer, sent, "the target received exactly the bytes sent");
    let labels = [("route", "bulk"), ("direction", "tx")];
    eventually("source counts 1 GiB sent", || pair.a.sample("migtun_bytes_total", &labels) == GIB as f64).await;
    eventually("target counts 1 GiB received", || {
        pair.b.sample("migtun_bytes_total", &[("route", "bulk"), ("direction", "rx")]) == GIB as f64
    })
    .await;
    eventually("no stream left open", || pair.a.sample("migtun_streams_open", &[]) == 0.0).await;
}

pub async fn echo_of_random_sizes(transport: &'static str, record_layer: &'static str) {
    let pair = Pair::start(PairSpec {
        forwards: &[("echo", "echo-in.sock")],
        exposes: &[("echo", "echo.sock", &["host-a"])],
        transport,
        record_layer,
        ..Default::default()
    })
    .await;
    let _target = spawn_echo_target(pair.sock("echo.sock"));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut sizes: Vec<usize> = (0..20).map(|_| rng.gen_range(0..3 << 20)).collect();
    sizes.extend([0, 1, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 65536]);
    for (i, size) in sizes.into_iter().enumerate() {
        let data = DataGen::new(i as u64).bytes(size);
        let (mut r, mut w) = pair.connect("echo-in.sock").await.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.expect("write");
            w.shutdown().await.expect("half-close");
        });
        let mut back = Vec::with_capacity(size);
        r.read_to_end(&mut back).await.expect("read echo");
        writer.await.expect("writer");
        assert_eq!(back.len(), data.len(), "echo of {size} bytes: length");
        assert!(back == data, "echo of {size} bytes: contents differ");
    }
}

/// The source finishes writing, keeps reading, and gets the reply (QEMU's and NBD's pattern).
pub async fn half_close_source_first(transport: &'static str, record_layer: &'static str) {
    let pair = Pair::start(PairSpec {
        forwards: &[("h", "h-in.sock")],
        exposes: &[("h", "hash.sock", &["host-a"])],
        transport,
        record_layer,
        ..Default::default()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    for size in [0u64, 1, 100_000, 5 << 20] {
        let (answer, sent) = send_and_hash(pair.connect("h-in.sock").await, size, size).await;
        assert_eq!(answer, sent, "reply after half-close, {size} bytes");
    }
}

/// The target finishes writing first; the source sees EOF, and can still send, and the target
/// receives it.
pub async fn half_close_target_first(transport: &'static str, record_layer: &'static str) {
    let pair = Pair::start(PairSpec {
        forwards: &[("g", "g-in.sock")],
        exposes: &[("g", "greeter.sock", &["host-a"])],
        transport,
        record_layer,
        ..Default::default()
    })
    .await;
    let listener = UnixListener::bind(pair.sock("greeter.sock")).unwrap();
    let greeting = DataGen::new(3).bytes(300_000);
    let expected = greeting.clone();
    let target = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&greeting).await.unwrap();
        s.shutdown().await.unwrap(); // target -> source is finished
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut s = pair.connect("g-in.sock").await;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("EOF from the target arrives");
    assert!(got == expected, "greeting arrives intact before EOF");
    let late = DataGen::new(4).bytes(1 << 20);
    s.write_all(&late).await.expect("source can still write after receiving EOF");
    s.shutdown().await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(30), target).await.expect("target finishes").unwrap();
    assert!(received == late, "data written after the target's EOF arrives");
}

pub async fn two_hundred_concurrent_streams(transport: &'static str, record_layer: &'static str) {
    let pair = Pair::start(PairSpec {
        forwards: &[("many", "many.sock")],
        exposes: &[("many", "hash.sock", &["host-a"])],
        transport,
        record_layer,
        ..Default::default()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(200);
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let size = rng.gen_range(0..1 << 20);
        let path = pair.sock("many.sock");
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::UnixStream::connect(path).await.expect("connect");
            let (answer, sent) = send_and_hash(s, size, 1000 + i).await;
            assert_eq!(answer, sent, "stream {i} ({size} bytes)");
            size
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("stream task");
    }
    eventually("all 200 counted as opened", || {
        pair.a.sample("migtun_stream_opens_total", &[("route", "many")]) == 200.0
    })
    .await;
    eventually("all bytes counted", || {
        pair.a.sample("migtun_bytes_total", &[("route", "many"), ("direction", "tx")]) == total as f64
    })
    .await;
    assert_eq!(pair.a.sample("migtun_stream_failures_total", &[]), 0.0);
}

/// QEMU before 8.0 takes the first connection on its migration socket as the main channel:
/// connections must reach the target in the order the source accepted them.
pub async fn connections_reach_target_in_accept_order(transport: &'static str, record_layer: &'static str) {
    const N: u64 = 64;
    let pair = Pair::start(PairSpec {
        forwards: &[("ordered", "ordered.sock")],
        exposes: &[("ordered", "order-target.sock", &["host-a"])],
        transport,
        record_layer,
        ..Default::default()
    })
    .await;
    let listener = UnixListener::bind(pair.sock("order-target.sock")).unwrap();
    let target = tokio::spawn(async move {
        let mut order = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..N {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut idx = [0u8; 8];
            s.read_exact(&mut idx).await.unwrap();
            order.push(u64::from_le_bytes(idx));
            conns.push(s);
        }
        order
    });
    // Connect all at once: each connect() is queued in the listener's backlog in this order.
    let mut clients = Vec::new();
    for i in 0..N {
        let mut s = pair.connect("ordered.sock").await;
        s.write_all(&i.to_le_bytes()).await.unwrap();
        clients.push(s);
    }
    let order = tokio::time::timeout(Duration::from_secs(60), target).await.expect("all arrive").unwrap();
    assert_eq!(order, (0..N).collect::<Vec<_>>(), "target saw connections in accept order");
}

/// A reset on one end becomes a reset on the other (TCP endpoints, which have resets).
pub async fn reset_propagates_both_ways(transport: &'static str, record_layer: &'static str) {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (target_addr, forward_addr) = (target.local_addr().unwrap(), forward.local_addr().unwrap());
    drop(forward); // its port is taken by the agent's forward listener below
    let fwd = format!("tcp:{forward_addr}");
    let tgt = format!("tcp:{target_addr}");
    let _pair = Pair::start(PairSpec {
        forwards: &[("r", fwd.as_str())],
        exposes: &[("r", tgt.as_str(), &["host-a"])],
        transport,
        record_layer,
        ..Default::default()
    })
    .await;

    // Target resets: the source's read fails with a reset, not a clean EOF.
    let mut client = TcpStream::connect(forward_addr).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    let (mut s, _) = target.accept().await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    reset_on_drop(&s);
    drop(s);
    let mut rest = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("the source learns of the reset")
        .expect_err("a reset, not an orderly EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    // Source resets: the target sees a reset.
    let client = TcpStream::connect(forward_addr).await.unwrap();
    let (mut s, _) = target.accept().await.unwrap();
    reset_on_drop(&client);
    drop(client);
    let mut rest = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the target learns of the reset")
        .expect_err("a reset, not an orderly EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// Unknown route, forbidden peer, target down: the source's local connection is closed with no
/// data, the reason is counted on both sides, and a stream running meanwhile is untouched.
pub async fn refusals_name_their_reason_and_leave_other_streams_alone(transport: &'static str, record_layer: &'static str) {
    let pair = Pair::start(PairSpec {
        forwards: &[
            ("good", "good.sock"),
            ("missing", "missing.sock"),
            ("secret", "secret.sock"),
            ("down", "down.sock"),
        ],
        exposes: &[
            ("good", "hash.sock", &["host-a"]),
            ("secret", "hash.sock", &["host-c"]),
            ("down", "nobody-listens.sock", &["host-a"]),
        ],
        transport,
        record_layer,
        ..Default::default()
    })
    .await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));

    // A long stream in flight while the refusals happen.
    let long = tokio::spawn(send_and_hash(pair.connect("good.sock").await, 256 << 20, 99));

    for (sock, reason, b_route) in [
        ("missing.sock", "unknown-route", "<unknown>"),
        ("secret.sock", "forbidden", "secret"),
        ("down.sock", "target-unreachable", "down"),
    ] {
        let mut s = pair.connect(sock).await;
        let _ = s.write_all(b"this must go nowhere").await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got)).await.expect("closed");
        assert!(got.is_empty(), "{reason}: no bytes come back");
        let route = sock.trim_end_matches(".sock");
        eventually(&format!("source counts {reason}"), || {
            pair.a.sample("migtun_stream_failures_total", &[("route", route), ("side", "source"), ("reason", reason)]) == 1.0
        })
        .await;
        eventually(&format!("target counts {reason}"), || {
            pair.b.sample("migtun_stream_failures_total", &[("route", b_route), ("side", "target"), ("reason", reason)]) == 1.0
        })
        .await;
    }

    let (answer, sent) = long.await.unwrap();
    assert_eq!(answer, sent, "the stream running meanwhile is intact");
    // And the agents still serve new streams.
    let (answer, sent) = send_and_hash(pair.connect("good.sock").await, 1 << 20, 5).await;
    assert_eq!(answer, sent);
}

/// SO_LINGER 0: dropping the socket sends a RST. (tokio deprecates set_linger because a
/// positive linger blocks on close; a zero linger never blocks.)
#[allow(deprecated)]
fn reset_on_drop(s: &TcpStream) {
    s.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
}
