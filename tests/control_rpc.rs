//! The agent-to-agent control RPC over the real port: hello and capabilities, calls and their
//! errors, a streamed upload checked by hash, and dead-peer detection by keepalive.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use migtun_control::rpc::{FileHeader, MethodError, Router, RpcClient, RpcError};
use migtun_proxy::agent::ControlHandler;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

fn test_router(closed_seen: Arc<Mutex<Vec<CancellationToken>>>) -> Router {
    Router::new("host-b")
        .method("echo", |session, args| async move {
            Ok(serde_json::json!({ "from": session.peer.name(), "args": args }))
        })
        .method("refuse", |_, _| async move { Err(MethodError::forbidden("not for you")) })
        .method("watch", move |session, _| {
            closed_seen.lock().unwrap().push(session.closed.clone());
            async move { Ok(serde_json::Value::Null) }
        })
        .upload(|_, header: FileHeader, mut upload| async move {
            let mut hasher = Sha256::new();
            let mut n = 0u64;
            while let Some(chunk) = upload.chunk().await {
                let chunk = chunk.map_err(|e| MethodError::failed(e.to_string()))?;
                n += chunk.len() as u64;
                hasher.update(&chunk);
            }
            let got = hex::encode(hasher.finalize());
            if n != header.size || got != header.sha256 {
                return Err(MethodError::bad_request(format!("{}: got {n} bytes, sha256 {got}", header.name)));
            }
            Ok(serde_json::json!({ "stored": header.name, "bytes": n }))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_errors_and_capabilities() {
    let closed = Arc::new(Mutex::new(Vec::new()));
    let (_pki, a, _b) = control_pair(test_router(closed.clone()).into_handler()).await;
    let io = a.handle.connect_control("host-b").await.expect("control connection");
    let rpc = RpcClient::connect(io, "host-b", "host-a").await.expect("hello");
    assert_eq!(rpc.peer_hello().name, "host-b");
    assert_eq!(rpc.peer_hello().version, migtun_control::rpc::PROTOCOL_VERSION);
    assert!(rpc.supports("echo") && rpc.supports("files"));
    assert!(matches!(rpc.require("teleport"), Err(RpcError::Unsupported { .. })));

    let v: serde_json::Value = rpc.call("echo", &serde_json::json!({"x": 1})).await.unwrap();
    assert_eq!(v, serde_json::json!({"from": "host-a", "args": {"x": 1}}), "the peer's verified name reaches the method");
    match rpc.call::<_, serde_json::Value>("refuse", &()).await {
        Err(RpcError::Remote { status: 403, message, .. }) => assert_eq!(message, "not for you"),
        other => panic!("expected a 403, got {other:?}"),
    }
    match rpc.call::<_, serde_json::Value>("nope", &()).await {
        Err(RpcError::Remote { status: 404, message, .. }) => assert!(message.contains("nope")),
        other => panic!("expected a 404, got {other:?}"),
    }

    // Concurrent calls on one connection.
    let mut calls = Vec::new();
    for i in 0..50 {
        let rpc = rpc.clone();
        calls.push(tokio::spawn(async move { rpc.call::<_, serde_json::Value>("echo", &i).await.unwrap()["args"].clone() }));
    }
    for (i, c) in calls.into_iter().enumerate() {
        assert_eq!(c.await.unwrap(), serde_json::json!(i));
    }

    // The server side learns when the connection goes away.
    let _: serde_json::Value = rpc.call("watch", &()).await.unwrap();
    let token = closed.lock().unwrap()[0].clone();
    assert!(!token.is_cancelled());
    drop(rpc);
    tokio::time::timeout(Duration::from_secs(15), token.cancelled()).await.expect("session closed when the client goes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_arrives_intact_or_is_refused() {
    let (_pki, a, _b) = control_pair(test_router(Default::default()).into_handler()).await;
    let io = a.handle.connect_control("host-b").await.unwrap();
    let rpc = RpcClient::connect(io, "host-b", "host-a").await.unwrap();
    let data = DataGen::new(5).bytes(20 << 20);
    let header = FileHeader {
        migration: "m1".into(),
        name: "nvram.fd".into(),
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(&data)),
    };
    let v: serde_json::Value = rpc.upload(&header, &data[..], Duration::from_secs(60)).await.expect("upload");
    assert_eq!(v, serde_json::json!({"stored": "nvram.fd", "bytes": 20 << 20}));

    let bad = FileHeader { sha256: "00".repeat(32), ..header };
    match rpc.upload::<_, serde_json::Value>(&bad, &data[..], Duration::from_secs(60)).await {
        Err(RpcError::Remote { status: 400, message, .. }) => assert!(message.contains("nvram.fd")),
        other => panic!("a corrupted upload must be refused, got {other:?}"),
    }
}

/// A peer that accepts the connection but never answers is declared dead by the keepalive
/// within seconds, not after the call timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_noticed_within_seconds() {
    let black_hole: ControlHandler = Arc::new(|io, _| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(120)).await;
            drop(io);
        })
    });
    let (_pki, a, _b) = control_pair(black_hole).await;
    let io = a.handle.connect_control("host-b").await.unwrap();
    let started = Instant::now();
    let result = RpcClient::connect(io, "host-b", "host-a").await;
    assert!(matches!(result, Err(RpcError::PeerDead { .. })), "got {:?}", result.err());
    assert!(started.elapsed() < migtun_control::rpc::CALL_TIMEOUT, "noticed by keepalive, not by the call timeout");
}
