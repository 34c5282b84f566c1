//! The handshake: rustls' unbuffered API driven over the TCP socket until the session is established,
//! then the traffic secrets handed to our record layer ([`super::records`]), or tokio-rustls' handshake
//! when the configuration keeps the secrets inside rustls.

use std::io;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ExtractedSecrets, HandshakeKind, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{tls_error, Kernel, Layer, RustlsSession, SessionInfo, TlsSession};
use super::records::Records;

/// Handshake messages from a peer may not exceed this (a certificate chain is a few KiB).
const MAX_HANDSHAKE_BUFFER: usize = 64 * 1024;
/// First read buffer for the handshake: a ClientHello or a server's first flight (with its
/// certificate chain) usually fits; it doubles as needed. Small, because a thousand handshakes
/// at once leave their freed buffers in the allocator's heap.
const HANDSHAKE_READ: usize = 4 * 1024;

/// The two unbuffered rustls connection types, for one handshake driver.
trait Unbuffered: Sized {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn info(&self) -> Option<SessionInfo>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

macro_rules! unbuffered {
    ($conn:ty, $data:ty, $kernel:ident) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, $data> {
                self.process_tls_records(incoming)
            }
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn info(&self) -> Option<SessionInfo> {
                Some(SessionInfo {
                    peer_certificates: self.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
                    alpn: self.alpn_protocol().map(<[u8]>::to_vec),
                    resumed: self.handshake_kind() == Some(HandshakeKind::Resumed),
                    suite: self.negotiated_cipher_suite()?,
                })
            }
            fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
                self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::$kernel(k)))
            }
        }
    };
}
unbuffered!(UnbufferedClientConnection, ClientConnectionData, Client);
unbuffered!(UnbufferedServerConnection, ServerConnectionData, Server);

/// Opens a TLS session to `name` over `tcp`. The caller bounds the time it may take.
/// The record layer is ours if `config` lets secrets be extracted, else tokio-rustls'.
pub async fn connect(config: Arc<ClientConfig>, name: ServerName<'static>, tcp: TcpStream) -> io::Result<TlsSession> {
    if !config.enable_secret_extraction {
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        return Ok(TlsSession(Layer::Rustls(RustlsSession::new(tls.into()))));
    }
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    handshake(conn, tcp).await
}

/// Accepts a TLS session on `tcp`. The caller bounds the time it may take.
/// The record layer is ours if `config` lets secrets be extracted, else tokio-rustls'.
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsSession> {
    if !config.enable_secret_extraction {
        let tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        return Ok(TlsSession(Layer::Rustls(RustlsSession::new(tls.into()))));
    }
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    handshake(conn, tcp).await
}

/// Drives rustls through the handshake, then hands the connection to the record layer.
async fn handshake<C: Unbuffered>(mut conn: C, mut tcp: TcpStream) -> io::Result<TlsSession> {
    let mut incoming = vec![0u8; HANDSHAKE_READ];
    let mut have = 0;
    let mut outgoing: Vec<u8> = Vec::new();
    // Application data that came with the handshake's last flight (the peer's first bytes).
    let mut early = Vec::new();
    loop {
        let mut need_read = false;
        let mut established = false;
        let status = conn.process(&mut incoming[..have]);
        let mut discard = status.discard;
        match status.state {
            Err(e) => {
                // rustls queued an alert for the peer: send it so it learns why.
                let _ = send_alert(&mut conn, &mut tcp, &mut incoming[..0]).await;
                return Err(tls_error(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => encode(&mut outgoing, |out| data.encode(out))?,
            Ok(ConnectionState::TransmitTlsData(data)) => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
                data.done();
            }
            Ok(ConnectionState::BlockedHandshake) => need_read = true,
            Ok(ConnectionState::WriteTraffic(_)) => established = true,
            Ok(ConnectionState::ReadTraffic(mut data)) => {
                let mut failed = None;
                while let Some(rec) = data.next_record() {
                    match rec {
                        Ok(rec) => {
                            discard += rec.discard;
                            early.extend_from_slice(rec.payload);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = failed {
                    // A bad record right behind the handshake: rustls judged it and queued the
                    // alert, as our record layer would have (see `send_fatal_alert`).
                    let _ = send_alert(&mut conn, &mut tcp, &mut incoming[..0]).await;
                    return Err(tls_error(e));
                }
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection during the TLS handshake"));
            }
            Ok(other) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected TLS state {other:?} in the handshake")));
            }
        }
        incoming.copy_within(discard..have, 0);
        have -= discard;
        if established {
            // A server may send before the client's Finished arrived (TLS 1.3's 0.5-RTT);
            // the session starts only once the client is authenticated.
            if !conn.handshaking() {
                break;
            }
            need_read = true;
        }
        if need_read {
            if have == incoming.len() {
                if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS handshake message too large"));
                }
                incoming.resize(incoming.len() * 2, 0);
            }
            let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut incoming[have..]).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection during the TLS handshake"));
            }
            have += n;
        }
    }
    let info = conn.info().ok_or_else(|| tls_error(rustls::Error::HandshakeNotComplete))?;
    let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
    let records = Records::new(tcp, info, secrets, kernel, &incoming[..have], early)?;
    Ok(TlsSession(Layer::Own(records)))
}

/// Appends what `encode` writes to `out`, growing it as rustls asks.
fn encode(out: &mut Vec<u8>, mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>) -> io::Result<()> {
    let start = out.len();
    let mut room = 4096;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
            Err(e) => {
                out.truncate(start);
                return Err(io::Error::other(format!("TLS encode: {e}")));
            }
        }
    }
}

/// After a handshake error: writes the alert rustls queued, best effort.
async fn send_alert<C: Unbuffered>(conn: &mut C, tcp: &mut TcpStream, none: &mut [u8]) -> io::Result<()> {
    let mut out = Vec::new();
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = conn.process(none).state {
        encode(&mut out, |o| data.encode(o))?;
    }
    if !out.is_empty() {
        tcp.write_all(&out).await?;
    }
    Ok(())
}
