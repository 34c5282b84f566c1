//! The session against rustls on the other end, both record layers: data, key updates, tickets, alerts, misbehaving peers.

use std::sync::Arc;

use migtun_certs::{Ca, IssueOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConfig, ServerConfig};
use tokio::net::TcpListener;

use crate::tls::settings::TlsConfig;
use crate::tls::context::{client_config, server_config};
use crate::tls::record::{self, ContentType, MAX_PLAINTEXT, OVERHEAD};
use crate::tls::ALPN_DATA;

use super::*;

pub(crate) fn tls_config(ca: &Ca, name: &str) -> TlsConfig {
    let host = ca.issue(name, &IssueOptions::default()).unwrap();
    TlsConfig {
        cert_path: "cert.pem".into(),
        key_path: "key.pem".into(),
        ca_path: "ca.pem".into(),
        cert_chain: CertificateDer::pem_slice_iter(host.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap(),
        key: PrivateKeyDer::from_pem_slice(host.key_pem.as_bytes()).unwrap(),
        ca_certs: CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()).collect::<Result<_, _>>().unwrap(),
        record_layer: crate::tls::settings::RecordLayer::Own,
        crl_path: None,
        crls: Vec::new(),
    }
}

struct Setup {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    listener: TcpListener,
}

async fn setup() -> Setup {
    let ca = Ca::generate("test CA").unwrap();
    Setup {
        client: client_config(&tls_config(&ca, "host-a"), &[ALPN_DATA]).unwrap(),
        server: server_config(&tls_config(&ca, "host-b"), &[ALPN_DATA]).unwrap(),
        listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    }
}

fn name() -> ServerName<'static> {
    ServerName::try_from("host-b").unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed).collect()
}

/// Each side writes `len` bytes in odd-sized pieces (forcing a key update after the first
/// 200 kB), shuts down, and meanwhile reads the other's bytes to EOF.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, len: usize, seed: u8, mid: impl FnOnce(&mut S)) -> Vec<u8> {
    let data = pattern(len, seed);
    let (head, tail) = data.split_at(len.min(200_000));
    s.write_all(head).await.unwrap();
    mid(&mut s);
    let (mut r, mut w) = tokio::io::split(s);
    let write = async {
        for chunk in tail.chunks(70_001) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got);
    let ((), n) = tokio::join!(write, read);
    n.unwrap();
    got
}

const LEN: usize = 3_000_017;

#[tokio::test]
async fn session_to_session_carries_bytes_both_ways_through_key_updates() {
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let session = accept(s.server, tcp).await.unwrap();
        assert_eq!(session.info().alpn.as_deref(), Some(ALPN_DATA));
        exchange(session, LEN, 2, |s| s.force_key_update()).await
    });
    let session = connect(s.client, name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
    let got = exchange(session, LEN, 1, |s| s.force_key_update()).await;
    assert!(got == pattern(LEN, 2), "client received the server's bytes exactly");
    assert!(server.await.unwrap() == pattern(LEN, 1), "server received the client's bytes exactly");
}

/// The other end is plain rustls (tokio-rustls): our records, key updates and close_notify
/// are what rustls expects, and we understand its own, including its key updates.
#[tokio::test]
async fn rustls_client_and_session_server_interoperate() {
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let session = accept(s.server, tcp).await.unwrap();
        exchange(session, LEN, 4, |s| s.force_key_update()).await
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(s.client).connect(name(), tcp).await.unwrap();
    let got = exchange(tls, LEN, 3, |t| t.get_mut().1.refresh_traffic_keys().unwrap()).await;
    assert!(got == pattern(LEN, 4));
    assert!(server.await.unwrap() == pattern(LEN, 3));
}

/// A client learns when the server is done with its side of the handshake: the server sends
/// its session tickets once it has verified the client's Finished. Waiting for them consumes
/// nothing: the server's first bytes are still there to read afterwards.
#[tokio::test]
async fn client_waits_until_the_server_has_finished_its_handshake() {
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let mut session = accept(s.server, tcp).await.unwrap();
        session.write_all(b"hello").await.unwrap();
        session.flush().await.unwrap();
        let mut got = Vec::new();
        session.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut client = connect(s.client, name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
    assert!(client.server_finished(std::time::Duration::from_secs(10)).await, "the server's tickets arrived");
    assert!(client.own().tickets > 0);
    let mut hello = [0u8; 5];
    client.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"hello", "the server's data is still there");
    client.write_all(b"bye").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), b"bye");
}

/// A server that sends no tickets: the wait ends with the server's first data (kept for the
/// read), or after its limit when there is none.
#[tokio::test]
async fn without_tickets_the_wait_ends_with_data_or_its_limit() {
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let mut config = (*s.server).clone();
    config.send_tls13_tickets = 0;
    let config = Arc::new(config);
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let mut session = accept(config, tcp).await.unwrap();
        let _ = go_rx.await;
        session.write_all(b"late").await.unwrap();
        session.shutdown().await.unwrap();
        let mut rest = Vec::new();
        session.read_to_end(&mut rest).await.unwrap();
    });
    let mut client = connect(s.client, name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
    let limit = std::time::Duration::from_millis(300);
    let started = std::time::Instant::now();
    assert!(!client.server_finished(limit).await, "no ticket");
    assert!(started.elapsed() >= limit, "nothing arrived: the wait ran to its limit");
    go_tx.send(()).unwrap();
    assert!(!client.server_finished(std::time::Duration::from_secs(10)).await, "data, but no ticket");
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"late", "the data that ended the wait is read afterwards");
    client.shutdown().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn rustls_server_and_session_client_interoperate_and_tickets_resume() {
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(s.server);
    let server = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = s.listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            results.push(exchange(tls, LEN, 6, |t| t.get_mut().1.refresh_traffic_keys().unwrap()).await);
        }
        results
    });
    let first = connect(s.client.clone(), name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
    assert!(!first.info().resumed);
    assert!(exchange(first, LEN, 5, |s| s.force_key_update()).await == pattern(LEN, 6));
    // The first session stored the server's tickets (they came after the handshake, as
    // records our layer handed to rustls): the second connection resumes.
    let second = connect(s.client, name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
    assert!(second.info().resumed, "second connection resumes the first session");
    assert!(exchange(second, 1000, 5, |_| {}).await == pattern(LEN, 6));
    for r in server.await.unwrap() {
        assert!(r.len() == LEN || r == pattern(1000, 5));
    }
}

/// The local side ends while the peer is slow to read: the relay's shutdown of the session
/// (the last records, then close_notify) takes several polls, and the stream must still end
/// cleanly with every byte delivered. (It once failed with "already shut down for
/// writing" about one migration in ten.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_shutdown_that_waits_for_a_slow_peer_completes() {
    use crate::io::buffers::PooledReader;
    use crate::io::endpoint::LocalStream;
    use prometheus_client::metrics::counter::Counter;

    const LEN: usize = 8 << 20;
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    // Small socket buffers, so that they are full when the local side ends.
    socket2::SockRef::from(&s.listener).set_recv_buffer_size(64 * 1024).unwrap();
    let far = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let mut session = accept(s.server, tcp).await.unwrap();
        // Slow throughout: the sender's socket buffers stay full, also when its local
        // side ends.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            match session.read(&mut buf).await {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    });
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_send_buffer_size(64 * 1024).unwrap();
    let session = connect(s.client, name(), tcp.connect(addr).await.unwrap()).await.unwrap();
    let (app, local) = tokio::net::UnixStream::pair().unwrap();
    let relay = tokio::spawn(async move {
        let mut local = PooledReader::new(LocalStream::Unix(local));
        let mut peer = session;
        crate::relay::relay(&mut local, &mut peer, &Counter::default(), &Counter::default()).await.map(|t| t.local_to_peer)
    });
    let data = pattern(LEN, 9);
    let (mut app_r, mut app_w) = app.into_split();
    app_w.write_all(&data).await.unwrap();
    app_w.shutdown().await.unwrap();
    let got = far.await.unwrap().expect("the far end reads to a clean EOF");
    assert!(got == data, "every byte arrives, in order");
    drop(app_w);
    // The far end closed its side too (dropped): the relay ends without an error.
    let mut rest = Vec::new();
    let _ = app_r.read_to_end(&mut rest).await;
    let sent = relay.await.unwrap();
    assert!(matches!(sent, Ok(n) if n == LEN as u64) || matches!(&sent, Err(crate::relay::RelayError::Peer(e)) if e.kind() == io::ErrorKind::UnexpectedEof), "{sent:?}");
}

#[tokio::test]
async fn a_fin_without_close_notify_is_an_error_not_an_eof() {
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let mut session = accept(s.server, tcp).await.unwrap();
        session.write_all(b"partial").await.unwrap();
        session.flush().await.unwrap();
        // A plain TCP FIN, as if the stream were cut by someone else.
        session.own().tcp.shutdown().await.unwrap();
        session
    });
    let mut session = connect(s.client, name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
    let mut got = Vec::new();
    let err = session.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    assert_eq!(got, b"partial");
    drop(server.await.unwrap());
}

#[tokio::test]
async fn a_tampered_record_fails_the_stream() {
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let mut session = accept(s.server, tcp).await.unwrap();
        let mut got = Vec::new();
        session.read_to_end(&mut got).await
    });
    let mut session = connect(s.client, name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
    // Seal a record, flip a bit in its ciphertext, and write it raw.
    let mut rec = vec![0u8; 100 + OVERHEAD];
    let n = session.own().sealer.seal_message(&mut rec, &[7u8; 100], ContentType::ApplicationData).unwrap();
    rec[n / 2] ^= 1;
    session.own().tcp.write_all(&rec[..n]).await.unwrap();
    let err = server.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("authentication"), "{err}");
}

/// A key log: the traffic secrets of a rustls connection, so that a test can seal records
/// as that connection's peer would, and have rustls judge what comes back.
#[derive(Debug, Default)]
struct KeyLog(std::sync::Mutex<Vec<(String, Vec<u8>)>>);

impl rustls::KeyLog for KeyLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0.lock().unwrap().push((label.to_string(), secret.to_vec()));
    }
}

impl KeyLog {
    fn secret(&self, label: &str) -> Vec<u8> {
        let log = self.0.lock().unwrap();
        log.iter().find(|(l, _)| l == label).map(|(_, s)| s.clone()).unwrap_or_else(|| panic!("no {label} logged"))
    }
}

/// The alert a rustls connection failed with, from its read error.
fn alert_of(e: &io::Error) -> Option<AlertDescription> {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => Some(*a),
        _ => None,
    }
}

/// A rustls client (tokio-rustls) and a session server. Once the session is up and has
/// updated its key once (so the alert must be sealed under the current key, not the first),
/// the client writes what `craft` makes straight onto its socket, as a misbehaving peer
/// would: `craft` gets the client's application traffic keys and seals records at sequence
/// numbers from 0. Returns what the session read (bytes, then EOF or its error) and how the
/// rustls client's next read ended: the alert it received, or `None` with its error.
async fn misbehave(
    craft: impl FnOnce(&ConnectionTrafficSecrets) -> Vec<u8>,
) -> ((Vec<u8>, io::Result<()>), Result<Vec<u8>, (Option<AlertDescription>, io::Error)>) {
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let mut session = accept(s.server, tcp).await.unwrap();
        session.force_key_update();
        session.write_all(b"ready").await.unwrap();
        session.flush().await.unwrap();
        let mut got = Vec::new();
        let end = session.read_to_end(&mut got).await.map(|_| ());
        if end.is_ok() {
            session.shutdown().await.unwrap();
        }
        (got, end)
    });
    let log = Arc::new(KeyLog::default());
    let mut config = (*s.client).clone();
    config.key_log = log.clone();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name(), tcp).await.unwrap();
    let mut ready = [0u8; 5];
    tls.read_exact(&mut ready).await.unwrap();
    assert_eq!(&ready, b"ready");
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    let keys = crate::tls::record::tests::traffic_keys(suite, &log.secret("CLIENT_TRAFFIC_SECRET_0"));
    let raw = craft(&keys);
    tls.get_mut().0.write_all(&raw).await.unwrap();
    let mut rest = Vec::new();
    let client = tls.read_to_end(&mut rest).await.map(|_| rest).map_err(|e| (alert_of(&e), e));
    (server.await.unwrap(), client)
}

fn raw(keys: &ConnectionTrafficSecrets, seq: u64, inner: &[u8]) -> Vec<u8> {
    crate::tls::record::tests::raw_record(keys, seq, inner)
}

/// Inner plaintext: `content` then its content type.
fn inner(content: &[u8], typ: u8) -> Vec<u8> {
    let mut v = content.to_vec();
    v.push(typ);
    v
}

const DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;

/// Runs [`misbehave`] and checks that the session failed naming `problem` after reading
/// exactly `before`, and that rustls received `alert`.
async fn refused_with(what: &str, alert: AlertDescription, problem: &str, before: &[u8], craft: impl FnOnce(&ConnectionTrafficSecrets) -> Vec<u8>) {
    let ((got, end), client) = misbehave(craft).await;
    let err = end.expect_err(what);
    assert!(err.to_string().contains(problem), "{what}: the session's error names the problem: {err}");
    assert!(got == before, "{what}: the session delivered {} bytes before failing", got.len());
    match client {
        Err((Some(a), _)) => assert_eq!(a, alert, "{what}: the alert rustls received"),
        Err((None, e)) => panic!("{what}: rustls received no alert, its read failed with: {e}"),
        Ok(b) => panic!("{what}: rustls read {} bytes and a clean end instead of an alert", b.len()),
    }
}

#[tokio::test]
async fn a_record_that_fails_authentication_gets_bad_record_mac() {
    refused_with("garbage", AlertDescription::BadRecordMac, "authentication", b"", |_| {
        let mut r = crate::tls::record::header(100).to_vec();
        r.extend((0..100u8).map(|i| i.wrapping_mul(37)));
        r
    })
    .await;
    // Good data, then a record sealed at the wrong sequence number (a replay).
    refused_with("replay", AlertDescription::BadRecordMac, "authentication", b"ok", |k| {
        [raw(k, 0, &inner(b"ok", DATA)), raw(k, 0, &inner(b"ok", DATA))].concat()
    })
    .await;
}

#[tokio::test]
async fn oversized_records_get_record_overflow_at_the_exact_limits() {
    // Ciphertext 2^14 + 256 passes framing (and fails authentication); one byte more is an
    // overflow before any decryption.
    refused_with("ciphertext 2^14+256", AlertDescription::BadRecordMac, "authentication", b"", |_| {
        let mut r = crate::tls::record::header(record::MAX_CIPHERTEXT).to_vec();
        r.resize(record::MAX_RECORD, 0x5c);
        r
    })
    .await;
    refused_with("ciphertext 2^14+257", AlertDescription::RecordOverflow, "over the limit", b"", |_| {
        let mut r = crate::tls::record::header(record::MAX_CIPHERTEXT + 1).to_vec();
        r.resize(record::MAX_RECORD + 1, 0x5c);
        r
    })
    .await;
    // Plaintext 2^14 is delivered; 2^14 + 1 is an overflow.
    let full = vec![0x61u8; MAX_PLAINTEXT];
    let over = vec![0x62u8; MAX_PLAINTEXT + 1];
    refused_with("plaintext 2^14+1", AlertDescription::RecordOverflow, "inner plaintext", &full, |k| {
        [raw(k, 0, &inner(&full, DATA)), raw(k, 1, &inner(&over, DATA))].concat()
    })
    .await;
}

#[tokio::test]
async fn records_of_the_wrong_kind_get_unexpected_message() {
    let cases: Vec<(&str, &str, Box<dyn FnOnce(&ConnectionTrafficSecrets) -> Vec<u8> + Send>)> = vec![
        ("plaintext alert", "type 21", Box::new(|_| vec![21, 3, 3, 0, 2, 2, 40])),
        ("change_cipher_spec", "type 20", Box::new(|_| vec![20, 3, 3, 0, 1, 1])),
        ("all-zero inner plaintext", "no content type", Box::new(|k| raw(k, 0, &[0; 40]))),
        ("empty inner plaintext", "no content type", Box::new(|k| raw(k, 0, &[]))),
        ("unknown inner type", "inner content type 99", Box::new(|k| raw(k, 0, &inner(b"x", 99)))),
        ("inner change_cipher_spec", "inner content type 20", Box::new(|k| raw(k, 0, &inner(&[1], 20)))),
        (
            "key update not last in its record",
            "not the last",
            Box::new(|k| raw(k, 0, &inner(&[record::key_update_message(false), record::key_update_message(false)].concat(), HANDSHAKE))),
        ),
        ("session ticket to a server", "type 4", Box::new(|k| raw(k, 0, &inner(&[4, 0, 0, 1, 0], HANDSHAKE)))),
        ("client hello after the handshake", "type 1", Box::new(|k| raw(k, 0, &inner(&[1, 0, 0, 0], HANDSHAKE)))),
    ];
    for (what, problem, craft) in cases {
        refused_with(what, AlertDescription::UnexpectedMessage, problem, b"", craft).await;
    }
}

#[tokio::test]
async fn malformed_messages_get_decode_error() {
    let cases: Vec<(&str, &str, Box<dyn FnOnce(&ConnectionTrafficSecrets) -> Vec<u8> + Send>)> = vec![
        ("empty handshake record", "empty handshake", Box::new(|k| raw(k, 0, &[HANDSHAKE]))),
        ("empty handshake record with padding", "empty handshake", Box::new(|k| raw(k, 0, &[HANDSHAKE, 0, 0]))),
        ("truncated handshake message", "truncated", Box::new(|k| raw(k, 0, &inner(&[24, 0, 0, 5, 0], HANDSHAKE)))),
        ("key update of two bytes", "body of 2", Box::new(|k| raw(k, 0, &inner(&[24, 0, 0, 2, 0, 0], HANDSHAKE)))),
        ("alert of three bytes", "alert record of 3", Box::new(|k| raw(k, 0, &inner(&[2, 40, 0], ALERT)))),
    ];
    for (what, problem, craft) in cases {
        refused_with(what, AlertDescription::DecodeError, problem, b"", craft).await;
    }
    refused_with("key update asking for 2", AlertDescription::IllegalParameter, "request_update 2", b"", |k| {
        raw(k, 0, &inner(&[24, 0, 0, 1, 2], HANDSHAKE))
    })
    .await;
}

/// RFC 8446 §6.1: "Any data received after a closure alert has been received MUST be
/// ignored." Data (and even garbage) behind the peer's close_notify is never delivered:
/// the reader sees exactly the bytes before it and a clean EOF, and the peer no alert.
#[tokio::test]
async fn what_follows_close_notify_is_never_delivered() {
    let ((got, end), client) = misbehave(|k| {
        [
            raw(k, 0, &inner(b"before", DATA)),
            raw(k, 1, &inner(&record::CLOSE_NOTIFY, ALERT)),
            raw(k, 2, &inner(b"after close_notify", DATA)),
            vec![23, 3, 3, 0, 20, 1, 2, 3],
        ]
        .concat()
    })
    .await;
    end.expect("a clean EOF");
    assert_eq!(got, b"before");
    assert_eq!(client.map_err(|(_, e)| e).expect("the session closed cleanly, no alert"), b"");
}

/// A bad record right behind the client's Finished, before the session started: whether
/// rustls meets it still in the handshake or our layer just after, the peer is told
/// bad_record_mac.
#[tokio::test]
async fn a_bad_record_right_behind_the_handshake_gets_bad_record_mac() {
    for _ in 0..5 {
        let s = setup().await;
        let addr = s.listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = s.listener.accept().await.unwrap();
            let mut session = accept(s.server, tcp).await?;
            let mut got = Vec::new();
            session.read_to_end(&mut got).await.map(|_| got)
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(s.client).connect(name(), tcp).await.unwrap();
        let mut garbage = crate::tls::record::header(64).to_vec();
        garbage.extend([0xa5; 64]);
        tls.get_mut().0.write_all(&garbage).await.unwrap();
        let mut rest = Vec::new();
        let err = tls.read_to_end(&mut rest).await.expect_err("an alert, not an EOF");
        assert_eq!(alert_of(&err), Some(AlertDescription::BadRecordMac), "{err}");
        assert!(server.await.unwrap().is_err());
    }
}

/// A fatal alert from the peer fails the read with that alert, and none is sent back.
#[tokio::test]
async fn a_fatal_alert_from_the_peer_is_an_error_naming_it() {
    let ((got, end), client) = misbehave(|k| raw(k, 0, &inner(&record::fatal_alert(AlertDescription::AccessDenied), ALERT))).await;
    let err = end.unwrap_err();
    assert!(err.to_string().contains("AccessDenied"), "{err}");
    assert!(got.is_empty());
    let (alert, e) = client.expect_err("the session closed without close_notify");
    assert_eq!((alert, e.kind()), (None, io::ErrorKind::UnexpectedEof), "{e}");
}

/// The confidentiality limit (RFC 8446 §5.5), lowered to 16 records per key: the session
/// updates its key on its own as it reaches it, on both write paths (writes, and the relay's
/// direct pull), and rustls accepts every update and every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_key_updates_at_the_confidentiality_limit_are_accepted_by_rustls() {
    use crate::io::buffers::PooledReader;
    use crate::io::endpoint::LocalStream;
    use prometheus_client::metrics::counter::Counter;

    const LIMIT: u64 = 16;
    const LEN: usize = 2 << 20;
    let s = setup().await;
    let addr = s.listener.local_addr().unwrap();
    let data = pattern(LEN, 11);
    let sent = data.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = s.listener.accept().await.unwrap();
        let mut session = accept(s.server, tcp).await.unwrap();
        session.own().sealer.set_key_update_after(LIMIT);
        // Writes, in odd pieces.
        for chunk in sent.chunks(50_001) {
            session.write_all(chunk).await.unwrap();
        }
        session.flush().await.unwrap();
        let by_writes = session.own().key_updates;
        // The relay's pull path, from a local socket.
        let (mut app, local) = tokio::net::UnixStream::pair().unwrap();
        let feed = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = app.read_to_end(&mut rest).await;
        });
        let mut local = PooledReader::new(LocalStream::Unix(local));
        let moved = crate::relay::relay(&mut local, &mut session, &Counter::default(), &Counter::default()).await.unwrap();
        feed.await.unwrap();
        let most = session.own().most_per_key;
        (by_writes, session.own().key_updates - by_writes, moved.local_to_peer, most)
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(s.client).connect(name(), tcp).await.unwrap();
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.expect("rustls reads everything to a clean end");
    tls.shutdown().await.unwrap();
    assert!(got.len() == 2 * LEN && got[..LEN] == data[..] && got[LEN..] == data[..], "every byte, in order");
    let (by_writes, by_pulls, moved, most) = server.await.unwrap();
    assert_eq!(moved, LEN as u64);
    assert!(most <= LIMIT + 1, "a key sealed {most} records: over the limit of {LIMIT} data records and its key update");
    let records = (LEN / MAX_PLAINTEXT) as u64;
    assert!(by_writes >= records / LIMIT, "{by_writes} key updates for {records}+ records written");
    assert!(by_pulls >= records / LIMIT, "{by_pulls} key updates for {records}+ records pulled");
}

/// Both layers, both roles: `tls.record_layer` decides the layer of a session on either
/// side (through the rustls configurations [`crate::tls`] builds), and the two interoperate
/// through key updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustls_record_layer_sessions_interoperate_with_our_own() {
    use crate::tls::settings::RecordLayer;
    let ca = Ca::generate("test CA").unwrap();
    let tls = |name: &str, own: bool| {
        let mut t = tls_config(&ca, name);
        t.record_layer = if own { RecordLayer::Own } else { RecordLayer::Rustls };
        t
    };
    for (client_own, server_own) in [(false, true), (true, false), (false, false)] {
        let client_config = client_config(&tls("host-a", client_own), &[ALPN_DATA]).unwrap();
        let server_config = server_config(&tls("host-b", server_own), &[ALPN_DATA]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let session = accept(server_config, tcp).await.unwrap();
            assert_eq!(session.layer_name(), if server_own { "own" } else { "rustls" });
            assert_eq!(session.info().alpn.as_deref(), Some(ALPN_DATA));
            exchange(session, 500_000, 8, move |s| {
                if server_own {
                    s.force_key_update()
                }
            })
            .await
        });
        let client = connect(client_config, name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
        assert_eq!(client.layer_name(), if client_own { "own" } else { "rustls" });
        assert!(client.info().peer_certificates.is_some());
        let got = exchange(client, 500_000, 7, move |s| {
            if client_own {
                s.force_key_update()
            }
        })
        .await;
        assert!(got == pattern(500_000, 8), "client own={client_own} server own={server_own}");
        assert!(server.await.unwrap() == pattern(500_000, 7));
    }
}

/// A session dropped in the middle of a stream, without shutdown, is never a clean end for
/// the far end: on either record layer, the reader gets an error (a TCP FIN without
/// close_notify).
#[tokio::test]
async fn a_session_dropped_mid_stream_is_an_error_at_the_far_end_on_both_layers() {
    for own in [true, false] {
        let s = setup().await;
        let addr = s.listener.local_addr().unwrap();
        let mut server_config = (*s.server).clone();
        server_config.enable_secret_extraction = own;
        let server = tokio::spawn(async move {
            let (tcp, _) = s.listener.accept().await.unwrap();
            let mut session = accept(Arc::new(server_config), tcp).await.unwrap();
            let mut got = Vec::new();
            let end = session.read_to_end(&mut got).await;
            (got.len(), end)
        });
        let mut client_config = (*s.client).clone();
        client_config.enable_secret_extraction = own;
        let mut client = connect(Arc::new(client_config), name(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
        client.write_all(&pattern(100_000, 1)).await.unwrap();
        client.flush().await.unwrap();
        drop(client);
        let (n, end) = server.await.unwrap();
        let err = end.expect_err("a truncated stream is an error, not an EOF");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "layer own={own}: {err}");
        assert!(n <= 100_000);
    }
}
