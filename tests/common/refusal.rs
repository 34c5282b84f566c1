//! The one handshake-refusal check, over either transport: a raw client (rustls over TCP, or
//! quinn) presents exactly the certificate a test gives it (or none) and asks for route `bulk`;
//! the connection must fail, host-b must count one handshake failure with the expected reason on
//! that transport, and no stream may open.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use migtun_proxy::quic::quinn;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{eventually, raw_client_config, spawn_hash_target, Pair, PairSpec};

/// A raw client on `transport` ("tls" or "quic") presenting `identity` (or no certificate),
/// asking for route `bulk` on `addr`. Returns what it could read back, or the error.
pub async fn raw_client(transport: &str, pki: &Path, identity: Option<(String, String)>, addr: SocketAddr) -> Result<Vec<u8>, String> {
    let config = raw_client_config(pki, identity);
    let request = migtun_proxy::route::wire::Request::new("bulk", None).map_err(|e| e.to_string())?.encode();
    let mut reply = Vec::new();
    if transport == "quic" {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(config)).map_err(|e| e.to_string())?;
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
        let conn = endpoint
            .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, "host-b")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3: the client is done before the server has judged its certificate; the
        // verdict closes the connection, which the stream then reports.
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&request).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        AsyncReadExt::read_to_end(&mut recv, &mut reply).await.map_err(|e| e.to_string())?;
    } else {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("host-b").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3: the client finishes its handshake before the server has judged its
        // certificate; the verdict arrives on the first read.
        tls.write_all(&request).await.map_err(|e| e.to_string())?;
        tls.read_to_end(&mut reply).await.map_err(|e| e.to_string())?;
    }
    Ok(reply)
}

/// host-b (exposing `bulk` to host-a, on `transport`) refuses the client `identity` makes, at
/// the handshake, for `reason`, and opens no stream.
pub async fn refused_at_handshake(transport: &'static str, identity: impl FnOnce(&Pair) -> Option<(String, String)>, reason: &str) {
    let pair = Pair::start(PairSpec { exposes: &[("bulk", "hash.sock", &["host-a"])], transport, ..Default::default() }).await;
    let _target = spawn_hash_target(pair.sock("hash.sock"));
    let result = tokio::time::timeout(Duration::from_secs(30), raw_client(transport, &pair.pki.pki(), identity(&pair), pair.b.addr))
        .await
        .expect("the client learns the verdict");
    assert!(result.is_err(), "{transport} {reason}: the connection must fail, got {result:?}");
    eventually(&format!("host-b counts a {transport} handshake refused for {reason}"), || {
        pair.b.sample("migtun_handshake_failures_total", &[("transport", transport), ("role", "server"), ("reason", reason)]) == 1.0
    })
    .await;
    assert_eq!(pair.b.sample("migtun_stream_opens_total", &[]), 0.0, "{transport} {reason}: no stream opened");
}
