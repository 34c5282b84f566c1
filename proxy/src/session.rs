//! A TLS 1.3 connection on the port: rustls does the handshake, [`crate::record`] the records
//! (`tls.record_layer = "own"`, the default), or tokio-rustls does both (`"rustls"`).
//!
//! [`connect`] and [`accept`] drive rustls' unbuffered API over the TCP socket until the
//! handshake is complete, then take the traffic secrets and a [`KernelConnection`] (rustls' API
//! for kTLS) and from there on [`TlsSession`] reads, decrypts, encrypts and writes records
//! itself, in place, in pooled buffers ([`crate::buffers`]). rustls keeps what it is good at:
//! certificates, session tickets (a client hands each ticket the server sends to rustls, so
//! later connections resume) and deriving the next key when either side updates its keys.
//!
//! [`TlsSession`] is an [`AsyncBufRead`] (the relay writes decrypted records to the local socket
//! straight from the receive buffer) and an [`AsyncWrite`] (records are sealed in the send
//! buffer and written several at a time). Semantics match tokio-rustls: shutdown sends
//! close_notify and then a TCP FIN; a close_notify from the peer is EOF; a TCP FIN without one is
//! an `UnexpectedEof` error (a truncated stream must never look complete).
//!
//! A record the peer should not have sent (one that fails authentication, is too long, has no or
//! an unknown content type, a malformed or misplaced handshake message, a plaintext record after
//! the handshake) fails the session, and the peer is first told why with a fatal alert sealed
//! under our current write key (RFC 8446 §6.2), as rustls would tell it.
//!
//! Which record layer runs follows the rustls configuration: one that lets secrets be extracted
//! (`enable_secret_extraction`, which [`crate::tls`] sets for `tls.record_layer = "own"`) gets
//! ours; one that does not is served by tokio-rustls' record layer, behind the same
//! [`TlsSession`] type. So the port and the connectors need not know which it is.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{
    AlertDescription, ClientConfig, ConnectionTrafficSecrets, ExtractedSecrets, HandshakeKind, ServerConfig,
    SupportedCipherSuite,
};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::buffers::{self, Buffer, PooledReader};
use crate::record::{self, Alert, ContentType, Opener, PostHandshake, RecordError, Sealer, MAX_PLAINTEXT, MAX_RECORD, MAX_SEALED, OVERHEAD};
use crate::relay::{DirectRead, PullError, PullWrite};

/// Handshake messages from a peer may not exceed this (a certificate chain is a few KiB).
const MAX_HANDSHAKE_BUFFER: usize = 64 * 1024;
/// Room a write needs in the send buffer: a key update record and a record of at least one byte
/// (a close_notify alert fits too).
const MIN_SEND_ROOM: usize = (OVERHEAD + 5) + (OVERHEAD + 1);
/// Decrypted records passed on by one vectored write: a large buffer's worth of full records.
const MAX_CHUNKS: usize = buffers::LARGE / MAX_PLAINTEXT;
/// First read buffer for the handshake: a ClientHello or a server's first flight (with its
/// certificate chain) usually fits; it doubles as needed. Small, because a thousand handshakes
/// at once leave their freed buffers in the allocator's heap.
const HANDSHAKE_READ: usize = 4 * 1024;

/// What the handshake established.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub peer_certificates: Option<Vec<CertificateDer<'static>>>,
    pub alpn: Option<Vec<u8>>,
    pub resumed: bool,
    pub suite: SupportedCipherSuite,
}

/// rustls' handle for key updates and tickets, on either side.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn write_after_shutdown() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "TLS session already shut down for writing")
}

fn record_error(e: RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A failure on the receiving side: what the reader is told, and the alert the peer is sent.
struct Fatal {
    error: io::Error,
    alert: Option<AlertDescription>,
}

impl From<RecordError> for Fatal {
    fn from(e: RecordError) -> Fatal {
        Fatal { alert: e.alert(), error: record_error(e) }
    }
}

impl From<rustls::Error> for Fatal {
    /// rustls judged a message we handed it (a session ticket): malformed is decode_error.
    fn from(e: rustls::Error) -> Fatal {
        let alert = match &e {
            rustls::Error::InvalidMessage(_) => AlertDescription::DecodeError,
            _ => AlertDescription::InternalError,
        };
        Fatal { alert: Some(alert), error: tls_error(e) }
    }
}

impl Fatal {
    /// A failure the peer is not told about (it is gone, or it told us).
    fn quiet(error: io::Error) -> Fatal {
        Fatal { error, alert: None }
    }
}

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

/// An established TLS 1.3 session, on either record layer.
pub struct TlsSession(Layer);

enum Layer {
    Own(Records),
    Rustls(RustlsSession),
}

/// A session on our own record layer.
struct Records {
    tcp: TcpStream,
    info: SessionInfo,
    kernel: Kernel,
    opener: Opener,
    sealer: Sealer,
    rx: RecvState,
    tx: SendState,
    /// Session tickets the server sent us (client side), handed to rustls.
    tickets: u64,
    /// Key updates we sent, and the most records any of our keys sealed (for tests).
    key_updates: u64,
    most_per_key: u64,
}

/// The receiving half: ciphertext at `buf[start..end]`, decrypted records' plaintext at the
/// ranges in `plain` (before `start`); `early` is plaintext rustls decrypted in the handshake.
struct RecvState {
    buf: Option<Buffer>,
    start: usize,
    end: usize,
    plain: VecDeque<Range<usize>>,
    early: Vec<u8>,
    early_pos: usize,
    /// The peer sent close_notify.
    closed: bool,
    /// A fatal problem already reported; later reads report it again.
    failed: Option<(io::ErrorKind, String)>,
}

/// The sending half: sealed records at `buf[start..end]` waiting for the socket.
struct SendState {
    buf: Option<Buffer>,
    start: usize,
    end: usize,
    /// The peer asked for a key update: ours goes out before our next record.
    key_update_owed: bool,
    /// close_notify is queued: nothing more may be written.
    shut: bool,
    /// We failed the session with this fatal alert: nothing more may be written.
    alerted: Option<AlertDescription>,
    /// The alert reached the socket: the connection ends with it and a FIN, not a reset (a
    /// reset could discard the alert before the peer reads it).
    alert_delivered: bool,
}

enum Ready {
    Early,
    Plain,
    Eof,
}

impl Records {
    fn new(
        tcp: TcpStream,
        info: SessionInfo,
        secrets: ExtractedSecrets,
        kernel: Kernel,
        leftover: &[u8],
        early: Vec<u8>,
    ) -> io::Result<Records> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let sealer = Sealer::new(info.suite, tx_seq, tx).map_err(record_error)?;
        let opener = Opener::new(info.suite, rx_seq, rx).map_err(record_error)?;
        let mut buf = None;
        if !leftover.is_empty() {
            let mut b = buffers::take_at_least(leftover.len());
            b[..leftover.len()].copy_from_slice(leftover);
            buf = Some(b);
        }
        Ok(Records {
            tcp,
            info,
            kernel,
            opener,
            sealer,
            rx: RecvState { buf, start: 0, end: leftover.len(), plain: VecDeque::with_capacity(MAX_CHUNKS), early, early_pos: 0, closed: false, failed: None },
            tx: SendState { buf: None, start: 0, end: 0, key_update_owed: false, shut: false, alerted: None, alert_delivered: false },
            tickets: 0,
            key_updates: 0,
            most_per_key: 0,
        })
    }

    /// Opens the next complete record in the receive buffer, if there is one, and acts on it.
    /// Returns whether a record was consumed.
    fn open_next(&mut self) -> Result<bool, Fatal> {
        let Some(buf) = self.rx.buf.as_deref_mut() else { return Ok(false) };
        let Some(opened) = self.opener.open_next(&mut buf[self.rx.start..self.rx.end])? else { return Ok(false) };
        let content = self.rx.start + opened.content.start..self.rx.start + opened.content.end;
        self.rx.start += opened.len;
        match opened.typ {
            ContentType::ApplicationData if content.is_empty() => {}
            ContentType::ApplicationData => self.rx.plain.push_back(content),
            ContentType::Alert => match record::parse_alert(&buf[content])? {
                // After close_notify nothing more is read: RFC 8446 §6.1, "any data received
                // after a closure alert has been received MUST be ignored".
                Alert::CloseNotify => self.rx.closed = true,
                // A close_notify follows it (§6.1).
                Alert::UserCanceled => {}
                Alert::Fatal(desc) => return Err(Fatal::quiet(tls_error(rustls::Error::AlertReceived(desc)))),
            },
            ContentType::Handshake => {
                let content = buf[content].to_vec();
                self.handshake_message(&content)?;
            }
        }
        Ok(true)
    }

    /// A post-handshake record: session tickets (to a client) or a key update.
    fn handshake_message(&mut self, content: &[u8]) -> Result<(), Fatal> {
        for message in record::parse_post_handshake(content)? {
            match (message, &mut self.kernel) {
                (PostHandshake::NewSessionTicket(body), Kernel::Client(k)) => {
                    k.handle_new_session_ticket(body)?;
                    self.tickets += 1;
                }
                (PostHandshake::NewSessionTicket(_), Kernel::Server(_)) => {
                    return Err(RecordError::UnexpectedHandshake(record::NEW_SESSION_TICKET).into())
                }
                (PostHandshake::KeyUpdate { request }, kernel) => {
                    let (seq, secrets) = kernel.update_rx()?;
                    self.opener.replace(seq, secrets)?;
                    self.tx.key_update_owed |= request;
                }
            }
        }
        Ok(())
    }

    /// After a fatal problem with what the peer sent: tells it why with a fatal alert under our
    /// current write key, behind whatever records are still queued (RFC 8446 §6.2), best effort
    /// (like rustls, one attempt: a peer that does not read does not get it). Nothing more is
    /// written afterwards.
    fn send_fatal_alert(&mut self, cx: &mut Context<'_>, alert: AlertDescription) {
        if self.tx.shut {
            // Our close_notify went first: the peer ignores whatever follows it (§6.1).
            return;
        }
        self.tx.shut = true;
        self.tx.alerted = Some(alert);
        let buf = self.tx.buf.get_or_insert_with(buffers::take);
        if buf.len() - self.tx.end < OVERHEAD + 2 && !matches!(self.poll_write_out(cx), Poll::Ready(Ok(()))) {
            return;
        }
        if self.seal_message(&record::fatal_alert(alert), ContentType::Alert).is_err() {
            return;
        }
        if let Poll::Ready(Ok(())) = self.poll_write_out(cx) {
            self.tx.alert_delivered = true;
            let _ = Pin::new(&mut self.tcp).poll_shutdown(cx);
        }
    }

    /// Reads more ciphertext from the socket into the receive buffer.
    fn poll_read_socket(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let rx = &mut self.rx;
        let buf = rx.buf.get_or_insert_with(buffers::take);
        if rx.start == rx.end {
            rx.start = 0;
            rx.end = 0;
        } else if buf.len() - rx.start < MAX_RECORD {
            // The partial record at the front might not fit behind: move it to the start.
            buf.copy_within(rx.start..rx.end, 0);
            rx.end -= rx.start;
            rx.start = 0;
        }
        let mut rb = ReadBuf::new(&mut buf[rx.end..]);
        match Pin::new(&mut self.tcp).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    let what = if rx.start == rx.end { "without close_notify" } else { "inside a record" };
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("peer closed the TLS connection {what}"),
                    )));
                }
                rx.end += n;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if rx.start == rx.end {
                    // Idle: the buffer goes back to the pool until bytes arrive.
                    buffers::give_back(&mut rx.buf);
                }
                Poll::Pending
            }
        }
    }

    fn poll_ready_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        loop {
            if self.rx.early_pos < self.rx.early.len() {
                return Poll::Ready(Ok(Ready::Early));
            }
            // What was authenticated before a failure is delivered before it.
            if !self.rx.plain.is_empty() {
                return Poll::Ready(Ok(Ready::Plain));
            }
            if let Some((kind, msg)) = &self.rx.failed {
                return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
            }
            if self.rx.closed {
                return Poll::Ready(Ok(Ready::Eof));
            }
            // Decrypt every complete record there is (up to MAX_CHUNKS of data), so that one
            // vectored write passes them all on.
            let mut opened = Ok(false);
            while self.rx.plain.len() < MAX_CHUNKS && !self.rx.closed {
                match self.open_next() {
                    Ok(true) => opened = Ok(true),
                    Ok(false) => break,
                    Err(e) => {
                        opened = Err(e);
                        break;
                    }
                }
            }
            let step = match opened {
                Ok(true) => continue,
                Ok(false) => ready!(self.poll_read_socket(cx)).map_err(Fatal::quiet),
                Err(e) => Err(e),
            };
            if let Err(Fatal { error, alert }) = step {
                if let Some(alert) = alert {
                    self.send_fatal_alert(cx, alert);
                }
                self.rx.failed = Some((error.kind(), error.to_string()));
                if self.rx.plain.is_empty() {
                    return Poll::Ready(Err(error));
                }
            }
        }
    }

    /// Makes room for at least one record in the send buffer, writing out what is there.
    fn poll_send_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let buf = self.tx.buf.get_or_insert_with(buffers::take);
            if buf.len() - self.tx.end >= MIN_SEND_ROOM {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_write_out(cx))?;
        }
    }

    /// Writes sealed records to the socket until they are all out.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tx = &mut self.tx;
        let Some(buf) = tx.buf.as_deref() else { return Poll::Ready(Ok(())) };
        while tx.start < tx.end {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &buf[tx.start..tx.end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            tx.start += n;
        }
        tx.start = 0;
        tx.end = 0;
        Poll::Ready(Ok(()))
    }

    /// Seals `payload` of type `typ` as one record into the send buffer (room must be there).
    fn seal_message(&mut self, payload: &[u8], typ: ContentType) -> io::Result<()> {
        if let Some(buf) = self.tx.buf.as_deref_mut() {
            self.tx.end += self.sealer.seal_message(&mut buf[self.tx.end..], payload, typ).map_err(record_error)?;
        }
        Ok(())
    }

    /// Sends a key update if one is owed or the key is worn out, and switches keys.
    fn rotate_if_due(&mut self) -> io::Result<()> {
        if !self.tx.key_update_owed && !self.sealer.needs_key_update() {
            return Ok(());
        }
        self.seal_message(&record::key_update_message(false), ContentType::Handshake)?;
        self.most_per_key = self.most_per_key.max(self.sealer.sealed());
        let (seq, secrets) = self.kernel.update_tx().map_err(tls_error)?;
        self.sealer.replace(seq, secrets).map_err(record_error)?;
        self.tx.key_update_owed = false;
        self.key_updates += 1;
        Ok(())
    }

    /// Why nothing may be written any more, if so.
    fn write_refused(&self) -> Option<io::Error> {
        match (self.tx.alerted, self.tx.shut) {
            (Some(alert), _) => Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("TLS session failed (we sent the peer a fatal {alert:?} alert)"),
            )),
            (None, true) => Some(write_after_shutdown()),
            (None, false) => None,
        }
    }

    /// Sets SO_LINGER 0: dropping the session sends a TCP RST. Not after a fatal alert went out:
    /// the alert already tells the peer the stream failed, and a reset could destroy it unread.
    fn set_reset_on_drop(&self) {
        if !self.tx.alert_delivered {
            crate::socket::reset_on_drop(&self.tcp);
        }
    }
}

impl Drop for Records {
    fn drop(&mut self) {
        buffers::give_back(&mut self.rx.buf);
        buffers::give_back(&mut self.tx.buf);
    }
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession").field("layer", &self.layer_name()).field("tcp", self.tcp()).field("alpn", &self.info().alpn).finish_non_exhaustive()
    }
}

impl AsyncBufRead for Records {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        Poll::Ready(Ok(match ready!(this.poll_ready_plain(cx))? {
            Ready::Early => &this.rx.early[this.rx.early_pos..],
            Ready::Plain => match (this.rx.buf.as_deref(), this.rx.plain.front()) {
                (Some(b), Some(r)) => &b[r.clone()],
                _ => &[],
            },
            Ready::Eof => &[],
        }))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let rx = &mut self.get_mut().rx;
        if rx.early_pos < rx.early.len() {
            rx.early_pos = (rx.early_pos + amt).min(rx.early.len());
            if rx.early_pos == rx.early.len() {
                rx.early = Vec::new();
                rx.early_pos = 0;
            }
        } else {
            let mut amt = amt;
            while let Some(front) = rx.plain.front_mut() {
                let n = amt.min(front.len());
                front.start += n;
                amt -= n;
                if front.start >= front.end {
                    rx.plain.pop_front();
                }
                if amt == 0 {
                    break;
                }
            }
        }
    }
}

impl Records {
    /// Reads plaintext from `src` straight into record slots of the send buffer (one vectored
    /// read, up to a large buffer's worth of full records), seals each where it landed and
    /// writes them out. `Ready(Ok(0))` is `src`'s EOF.
    fn poll_pull_records(&mut self, cx: &mut Context<'_>, src: &mut dyn DirectRead) -> Option<Poll<Result<usize, PullError>>> {
        if let Some(e) = self.write_refused() {
            return Some(Poll::Ready(Err(PullError::Write(e))));
        }
        // Room for at least one full record slot (after a key update record).
        loop {
            let buf = self.tx.buf.get_or_insert_with(buffers::take);
            if buf.len() - self.tx.end >= MAX_SEALED + MIN_SEND_ROOM {
                break;
            }
            match self.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(PullError::Write(e)))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        if let Err(e) = self.rotate_if_due() {
            return Some(Poll::Ready(Err(PullError::Write(e))));
        }
        let buf = self.tx.buf.as_deref_mut()?;
        let start = self.tx.end;
        // Never more records than the key may still seal (it was just renewed if it was due).
        let left = usize::try_from(self.sealer.records_left()).unwrap_or(usize::MAX);
        let slots = ((buf.len() - start) / MAX_SEALED).min(MAX_CHUNKS).min(left.max(1));
        let mut iov: Vec<io::IoSliceMut<'_>> = buf[start..start + slots * MAX_SEALED]
            .chunks_mut(MAX_SEALED)
            .map(|slot| io::IoSliceMut::new(&mut slot[record::HEADER_LEN..record::HEADER_LEN + MAX_PLAINTEXT]))
            .collect();
        let n = match src.poll_read_direct(cx, &mut iov)? {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(PullError::Read(e)))),
            Poll::Pending => {
                drop(iov);
                // Nothing to read: what is sealed goes out (or waits for the socket).
                if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                    return Some(Poll::Ready(Err(PullError::Write(e))));
                }
                return Some(Poll::Pending);
            }
        };
        drop(iov);
        // Full slots are exactly MAX_SEALED long once sealed, so the records lie back to back.
        let mut left = n;
        while left > 0 {
            let len = left.min(MAX_PLAINTEXT);
            match self.sealer.seal(&mut buf[self.tx.end..], len, ContentType::ApplicationData) {
                Ok(sealed) => self.tx.end += sealed,
                Err(e) => return Some(Poll::Ready(Err(PullError::Write(record_error(e))))),
            }
            left -= len;
        }
        if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
            return Some(Poll::Ready(Err(PullError::Write(e))));
        }
        Some(Poll::Ready(Ok(n)))
    }
}

impl DirectRead for Records {
    fn poll_read_direct(&mut self, _: &mut Context<'_>, _: &mut [io::IoSliceMut<'_>]) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

impl PullWrite for Records {
    fn poll_pull(&mut self, cx: &mut Context<'_>, src: &mut dyn DirectRead) -> Option<Poll<Result<usize, PullError>>> {
        self.poll_pull_records(cx, src)
    }
}

impl crate::relay::ChunkedRead for Records {
    fn chunks<'a>(&'a self, out: &mut [io::IoSlice<'a>]) -> usize {
        if self.rx.early_pos < self.rx.early.len() {
            return crate::relay::one_chunk(&self.rx.early[self.rx.early_pos..], out);
        }
        let Some(buf) = self.rx.buf.as_deref() else { return 0 };
        let mut k = 0;
        for (slot, r) in out.iter_mut().zip(&self.rx.plain) {
            *slot = io::IoSlice::new(&buf[r.clone()]);
            k += 1;
        }
        k
    }
}

impl AsyncRead for Records {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = {
            let avail = ready!(self.as_mut().poll_fill_buf(cx))?;
            let n = avail.len().min(out.remaining());
            out.put_slice(&avail[..n]);
            n
        };
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Records {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.write_refused() {
            return Poll::Ready(Err(e));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_send_room(cx))?;
        this.rotate_if_due()?;
        let mut taken = 0;
        while let Some(buf) = this.tx.buf.as_deref_mut() {
            let room = buf.len() - this.tx.end;
            if taken == data.len() || room <= OVERHEAD {
                break;
            }
            let n = (data.len() - taken).min(MAX_PLAINTEXT).min(room - OVERHEAD);
            let rec = &mut buf[this.tx.end..];
            rec[record::HEADER_LEN..record::HEADER_LEN + n].copy_from_slice(&data[taken..taken + n]);
            this.tx.end += this.sealer.seal(rec, n, ContentType::ApplicationData).map_err(record_error)?;
            taken += n;
            if this.sealer.needs_key_update() {
                break;
            }
        }
        // Out to the socket now, as far as it takes them (like tokio-rustls: a write is sent
        // without waiting for a flush); what it does not take goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        buffers::give_back(&mut this.tx.buf);
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tx.shut {
            ready!(this.poll_send_room(cx))?;
            this.seal_message(&record::CLOSE_NOTIFY, ContentType::Alert)?;
            this.tx.shut = true;
        }
        ready!(this.poll_write_out(cx))?;
        buffers::give_back(&mut this.tx.buf);
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// A session on tokio-rustls' record layer (`tls.record_layer = "rustls"`): what the relay
/// needs of it, through a pooled read buffer (rustls holds its plaintext where we cannot lend
/// it out), and no direct reads or pulls.
struct RustlsSession {
    stream: PooledReader<tokio_rustls::TlsStream<TcpStream>>,
    info: SessionInfo,
}

impl RustlsSession {
    fn new(stream: tokio_rustls::TlsStream<TcpStream>) -> RustlsSession {
        let conn = stream.get_ref().1;
        let info = SessionInfo {
            peer_certificates: conn.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
            // A completed TLS 1.3 handshake always has one; the provider's first as a fallback
            // only keeps this infallible.
            suite: conn
                .negotiated_cipher_suite()
                .unwrap_or(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256),
        };
        RustlsSession { stream: PooledReader::new(stream), info }
    }

    fn tcp(&self) -> &TcpStream {
        self.stream.get_ref().get_ref().0
    }
}

impl TlsSession {
    pub fn info(&self) -> &SessionInfo {
        match &self.0 {
            Layer::Own(s) => &s.info,
            Layer::Rustls(s) => &s.info,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match &self.0 {
            Layer::Own(s) => &s.tcp,
            Layer::Rustls(s) => s.tcp(),
        }
    }

    /// `own` or `rustls`: which record layer carries this session.
    pub fn layer_name(&self) -> &'static str {
        match &self.0 {
            Layer::Own(_) => "own",
            Layer::Rustls(_) => "rustls",
        }
    }

    /// Sets SO_LINGER 0: dropping the session sends a TCP RST.
    pub fn set_reset_on_drop(&self) {
        match &self.0 {
            Layer::Own(s) => s.set_reset_on_drop(),
            Layer::Rustls(s) => crate::socket::reset_on_drop(s.tcp()),
        }
    }

    /// Client side, right after [`connect`]: waits until the server is done with its side of
    /// the handshake, for at most `limit`. A TLS 1.3 client is done once it has sent its
    /// Finished; the server still has to read it and verify the client's certificate, and only
    /// then sends its session tickets (migtun's servers send several after every handshake,
    /// full or resumed). So this reads until a ticket has arrived, and stops early if data, an
    /// end or an error arrive first (the next read returns them; nothing is consumed).
    ///
    /// A source that paces its dials by completed handshakes needs this: without it, a burst of
    /// dials on a busy receiver has the receiver's handshakes pile up behind the source's, over
    /// the receiver's per-address cap (see `MAX_CONCURRENT_DIALS` in `crate::connect`). The
    /// tickets are also in the session store before the next dial starts, so that one resumes.
    ///
    /// Returns whether a ticket arrived. On rustls' record layer (`tls.record_layer = "rustls"`)
    /// it returns `false` at once: reading ahead there could swallow an error the next read
    /// would no longer report.
    pub async fn server_finished(&mut self, limit: std::time::Duration) -> bool {
        let Layer::Own(records) = &mut self.0 else { return false };
        let wait = std::future::poll_fn(|cx| match records.poll_ready_plain(cx) {
            // Data, EOF or a failure (kept for the next read): the server is past its handshake.
            Poll::Ready(_) => Poll::Ready(records.tickets > 0),
            Poll::Pending if records.tickets > 0 => Poll::Ready(true),
            Poll::Pending => Poll::Pending,
        });
        tokio::time::timeout(limit, wait).await.unwrap_or(false)
    }
}

macro_rules! layers {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().0 {
            Layer::Own($s) => {
                let $s = Pin::new($s);
                $e
            }
            Layer::Rustls(r) => {
                let $s = Pin::new(&mut r.stream);
                $e
            }
        }
    };
}

impl AsyncRead for TlsSession {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        layers!(self, s => s.poll_read(cx, out))
    }
}

impl AsyncBufRead for TlsSession {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        match &mut self.get_mut().0 {
            Layer::Own(s) => Pin::new(s).poll_fill_buf(cx),
            Layer::Rustls(r) => Pin::new(&mut r.stream).poll_fill_buf(cx),
        }
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        layers!(self, s => s.consume(amt))
    }
}

impl AsyncWrite for TlsSession {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        layers!(self, s => s.poll_write(cx, data))
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        layers!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            Layer::Own(s) => s.is_write_vectored(),
            Layer::Rustls(r) => r.stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        layers!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        layers!(self, s => s.poll_shutdown(cx))
    }
}

impl crate::relay::ChunkedRead for TlsSession {
    fn chunks<'a>(&'a self, out: &mut [io::IoSlice<'a>]) -> usize {
        match &self.0 {
            Layer::Own(s) => s.chunks(out),
            Layer::Rustls(r) => r.stream.chunks(out),
        }
    }
}

impl DirectRead for TlsSession {
    fn poll_read_direct(&mut self, _: &mut Context<'_>, _: &mut [io::IoSliceMut<'_>]) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

impl PullWrite for TlsSession {
    fn poll_pull(&mut self, cx: &mut Context<'_>, src: &mut dyn DirectRead) -> Option<Poll<Result<usize, PullError>>> {
        match &mut self.0 {
            Layer::Own(s) => s.poll_pull(cx, src),
            Layer::Rustls(_) => None,
        }
    }
}

impl crate::Reset for TlsSession {
    fn set_reset_on_drop(&self) {
        TlsSession::set_reset_on_drop(self)
    }
}

#[cfg(test)]
impl TlsSession {
    /// Our record layer's state, for tests that look inside it.
    fn own(&mut self) -> &mut Records {
        match &mut self.0 {
            Layer::Own(s) => s,
            Layer::Rustls(_) => panic!("this session is on rustls' record layer"),
        }
    }

    /// Makes the next write send a key update first, as if the key were worn out.
    fn force_key_update(&mut self) {
        self.own().tx.key_update_owed = true;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use migtun_certs::{Ca, IssueOptions};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::config::TlsConfig;
    use crate::tls::{client_config, server_config, ALPN_DATA};

    pub(crate) fn tls_config(ca: &Ca, name: &str) -> TlsConfig {
        let host = ca.issue(name, &IssueOptions::default()).unwrap();
        TlsConfig {
            cert_path: "cert.pem".into(),
            key_path: "key.pem".into(),
            ca_path: "ca.pem".into(),
            cert_chain: CertificateDer::pem_slice_iter(host.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap(),
            key: PrivateKeyDer::from_pem_slice(host.key_pem.as_bytes()).unwrap(),
            ca_certs: CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()).collect::<Result<_, _>>().unwrap(),
            record_layer: crate::config::RecordLayer::Own,
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
        use crate::buffers::PooledReader;
        use crate::endpoint::LocalStream;
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
        let keys = crate::record::tests::traffic_keys(suite, &log.secret("CLIENT_TRAFFIC_SECRET_0"));
        let raw = craft(&keys);
        tls.get_mut().0.write_all(&raw).await.unwrap();
        let mut rest = Vec::new();
        let client = tls.read_to_end(&mut rest).await.map(|_| rest).map_err(|e| (alert_of(&e), e));
        (server.await.unwrap(), client)
    }

    fn raw(keys: &ConnectionTrafficSecrets, seq: u64, inner: &[u8]) -> Vec<u8> {
        crate::record::tests::raw_record(keys, seq, inner)
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
            let mut r = crate::record::header(100).to_vec();
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
            let mut r = crate::record::header(record::MAX_CIPHERTEXT).to_vec();
            r.resize(record::MAX_RECORD, 0x5c);
            r
        })
        .await;
        refused_with("ciphertext 2^14+257", AlertDescription::RecordOverflow, "over the limit", b"", |_| {
            let mut r = crate::record::header(record::MAX_CIPHERTEXT + 1).to_vec();
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
            let mut garbage = crate::record::header(64).to_vec();
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
        use crate::buffers::PooledReader;
        use crate::endpoint::LocalStream;
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
        use crate::config::RecordLayer;
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
}
