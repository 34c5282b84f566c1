//! What the control plane builds on: dynamic routes scoped to one peer and one migration, and
//! control connections handed to a registered handler.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use migtun_proxy::agent::{ControlHandler, DynamicForward};
use migtun_proxy::io::endpoint::Endpoint;
use migtun_proxy::route::{ByteCount, ExposeRoute};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_routes_carry_one_migration_and_vanish_with_their_guards() {
    let pair = Pair::start(PairSpec::default()).await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let received = ByteCount::default();
    let expose = pair
        .b
        .handle
        .add_expose(ExposeRoute {
            name: "m1.ram".into(),
            target: Endpoint::Unix(pair.sock("hash.sock")),
            allow: vec!["host-a".into()],
            migration: Some("m1".into()),
            received: Some(received.clone()),
        })
        .expect("expose m1.ram");
    let forward = |sock: &str, migration: &str| DynamicForward {
        listen: Endpoint::Unix(pair.sock(sock)),
        mode: 0o600,
        peer: "host-b".into(),
        route: "m1.ram".into(),
        migration: Some(migration.into()),
    };
    let right = pair.a.handle.add_forward(forward("m1.sock", "m1")).await.expect("forward m1");
    let wrong = pair.a.handle.add_forward(forward("m2.sock", "m2")).await.expect("forward m2");

    let (answer, sent) = send_and_hash(pair.connect("m1.sock").await, 3 << 20, 1).await;
    assert_eq!(answer, sent, "the migration's own forward reaches the route");
    assert_eq!(received.get(), 3 << 20, "the route counts what its streams received");

    let mut s = pair.connect("m2.sock").await;
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    assert!(got.is_empty());
    eventually("another migration's stream is refused", || {
        pair.a.sample("migtun_stream_failures_total", &[("route", "m1.ram"), ("reason", "forbidden")]) == 1.0
    })
    .await;

    wrong.close().await;
    assert!(!pair.sock("m2.sock").exists(), "closing a dynamic forward removes its socket");
    drop(expose);
    let mut s = pair.connect("m1.sock").await;
    let _ = s.read_to_end(&mut got).await;
    eventually("the removed route is unknown", || {
        pair.a.sample("migtun_stream_failures_total", &[("route", "m1.ram"), ("reason", "unknown-route")]) == 1.0
    })
    .await;
    right.close().await;
    assert!(!pair.sock("m1.sock").exists());
    assert!(pair.a.handle.add_forward(DynamicForward { peer: "nobody".into(), ..forward("x.sock", "m1") }).await.is_err());
}

/// Control connections (ALPN h2) reach the registered handler with the peer's verified name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connections_reach_the_handler_with_the_peer_name() {
    let handler: ControlHandler = Arc::new(|mut io, peer| {
        Box::pin(async move {
            let mut buf = [0u8; 5];
            if io.read_exact(&mut buf).await.is_ok() {
                let reply = format!("{} says {}", peer.name(), String::from_utf8_lossy(&buf));
                let _ = io.write_all(reply.as_bytes()).await;
                let _ = io.shutdown().await;
            }
        })
    });
    let (_pki, a, _b) = control_pair(handler).await;
    let mut io = a.handle.connect_control("host-b").await.expect("control connection");
    io.write_all(b"hello").await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), io.read_to_string(&mut reply)).await.unwrap().unwrap();
    assert_eq!(reply, "host-a says hello");
    assert!(a.handle.connect_control("host-z").await.is_err());
}
