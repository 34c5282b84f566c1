//! A TLS 1.3 connection on the port: rustls does the handshake, [`crate::record`] the records.
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
use rustls::{ClientConfig, ConnectionTrafficSecrets, ExtractedSecrets, HandshakeKind, ServerConfig, SupportedCipherSuite};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::buffers::{self, Buffer};
use crate::record::{self, ContentType, Opener, RecordError, Sealer, MAX_PLAINTEXT, MAX_RECORD, MAX_SEALED, OVERHEAD};
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
pub async fn connect(config: Arc<ClientConfig>, name: ServerName<'static>, tcp: TcpStream) -> io::Result<TlsSession> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    handshake(conn, tcp).await
}

/// Accepts a TLS session on `tcp`. The caller bounds the time it may take.
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsSession> {
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
                while let Some(rec) = data.next_record() {
                    let rec = rec.map_err(tls_error)?;
                    discard += rec.discard;
                    early.extend_from_slice(rec.payload);
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
    TlsSession::new(tcp, info, secrets, kernel, &incoming[..have], early)
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

/// An established TLS 1.3 session with its own record layer.
pub struct TlsSession {
    tcp: TcpStream,
    info: SessionInfo,
    kernel: Kernel,
    opener: Opener,
    sealer: Sealer,
    rx: RecvState,
    tx: SendState,
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
}

enum Ready {
    Early,
    Plain,
    Eof,
}

impl TlsSession {
    fn new(
        tcp: TcpStream,
        info: SessionInfo,
        secrets: ExtractedSecrets,
        kernel: Kernel,
        leftover: &[u8],
        early: Vec<u8>,
    ) -> io::Result<TlsSession> {
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
        Ok(TlsSession {
            tcp,
            info,
            kernel,
            opener,
            sealer,
            rx: RecvState { buf, start: 0, end: leftover.len(), plain: VecDeque::with_capacity(MAX_CHUNKS), early, early_pos: 0, closed: false, failed: None },
            tx: SendState { buf: None, start: 0, end: 0, key_update_owed: false, shut: false },
        })
    }

    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Opens the next complete record in the receive buffer, if there is one, and acts on it.
    /// Returns whether a record was consumed.
    fn open_next(&mut self) -> io::Result<bool> {
        let Some(buf) = self.rx.buf.as_deref_mut() else { return Ok(false) };
        let avail = &mut buf[self.rx.start..self.rx.end];
        let len = match record::record_len(avail).map_err(record_error)? {
            Some(len) if len <= avail.len() => len,
            _ => return Ok(false),
        };
        let (typ, range) = self.opener.open(&mut avail[..len]).map_err(record_error)?;
        let content = self.rx.start + range.start..self.rx.start + range.end;
        self.rx.start += len;
        match typ {
            ContentType::ApplicationData if content.is_empty() => {}
            ContentType::ApplicationData => self.rx.plain.push_back(content),
            ContentType::Alert => {
                let alert = &buf[content];
                match alert {
                    // close_notify; user_canceled is followed by one.
                    [_, 0] => self.rx.closed = true,
                    [_, 90] => {}
                    [_, desc] => return Err(tls_error(rustls::Error::AlertReceived((*desc).into()))),
                    _ => return Err(tls_error(rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooShort))),
                }
            }
            ContentType::Handshake => {
                let content = buf[content].to_vec();
                self.handshake_message(&content)?;
            }
        }
        Ok(true)
    }

    /// A post-handshake message: a session ticket (to a client) or a key update.
    fn handshake_message(&mut self, content: &[u8]) -> io::Result<()> {
        let mut messages = record::handshake_messages(content).peekable();
        while let Some(m) = messages.next() {
            let (typ, body) = m.map_err(record_error)?;
            match (typ, &mut self.kernel) {
                (record::NEW_SESSION_TICKET, Kernel::Client(k)) => k.handle_new_session_ticket(body).map_err(tls_error)?,
                (record::KEY_UPDATE, kernel) if messages.peek().is_none() => {
                    let request = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(tls_error(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidKeyUpdate))),
                    };
                    let (seq, secrets) = kernel.update_rx().map_err(tls_error)?;
                    self.opener.replace(seq, secrets).map_err(record_error)?;
                    self.tx.key_update_owed |= request;
                }
                (typ, _) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected TLS handshake message type {typ} after the handshake"),
                    ))
                }
            }
        }
        Ok(())
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
        if let Some((kind, msg)) = &self.rx.failed {
            return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
        }
        loop {
            if self.rx.early_pos < self.rx.early.len() {
                return Poll::Ready(Ok(Ready::Early));
            }
            if !self.rx.plain.is_empty() {
                return Poll::Ready(Ok(Ready::Plain));
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
                Ok(false) => ready!(self.poll_read_socket(cx)),
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                self.rx.failed = Some((e.kind(), e.to_string()));
                return Poll::Ready(Err(e));
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
    fn seal_message(&mut self, payload: &[u8], typ: ContentType) {
        if let Some(buf) = self.tx.buf.as_deref_mut() {
            self.tx.end += self.sealer.seal_message(&mut buf[self.tx.end..], payload, typ);
        }
    }

    /// Sends a key update if one is owed or the key is worn out, and switches keys.
    fn rotate_if_due(&mut self) -> io::Result<()> {
        if !self.tx.key_update_owed && !self.sealer.needs_key_update() {
            return Ok(());
        }
        self.seal_message(&record::key_update_message(false), ContentType::Handshake);
        let (seq, secrets) = self.kernel.update_tx().map_err(tls_error)?;
        self.sealer.replace(seq, secrets).map_err(record_error)?;
        self.tx.key_update_owed = false;
        Ok(())
    }

    /// Sets SO_LINGER 0: dropping the session sends a TCP RST.
    pub fn set_reset_on_drop(&self) {
        crate::socket::reset_on_drop(&self.tcp);
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        buffers::give_back(&mut self.rx.buf);
        buffers::give_back(&mut self.tx.buf);
    }
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession").field("tcp", &self.tcp).field("alpn", &self.info.alpn).finish_non_exhaustive()
    }
}

impl AsyncBufRead for TlsSession {
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

impl TlsSession {
    /// Reads plaintext from `src` straight into record slots of the send buffer (one vectored
    /// read, up to a large buffer's worth of full records), seals each where it landed and
    /// writes them out. `Ready(Ok(0))` is `src`'s EOF.
    fn poll_pull_records(&mut self, cx: &mut Context<'_>, src: &mut dyn DirectRead) -> Option<Poll<Result<usize, PullError>>> {
        if self.tx.shut {
            return Some(Poll::Ready(Err(PullError::Write(write_after_shutdown()))));
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
        let slots = ((buf.len() - start) / MAX_SEALED).min(MAX_CHUNKS);
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
            self.tx.end += self.sealer.seal(&mut buf[self.tx.end..], len, ContentType::ApplicationData);
            left -= len;
        }
        if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
            return Some(Poll::Ready(Err(PullError::Write(e))));
        }
        Some(Poll::Ready(Ok(n)))
    }
}

impl DirectRead for TlsSession {
    fn poll_read_direct(&mut self, _: &mut Context<'_>, _: &mut [io::IoSliceMut<'_>]) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

impl PullWrite for TlsSession {
    fn poll_pull(&mut self, cx: &mut Context<'_>, src: &mut dyn DirectRead) -> Option<Poll<Result<usize, PullError>>> {
        self.poll_pull_records(cx, src)
    }
}

impl crate::relay::ChunkedRead for TlsSession {
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

impl AsyncRead for TlsSession {
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

impl AsyncWrite for TlsSession {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tx.shut {
            return Poll::Ready(Err(write_after_shutdown()));
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
            this.tx.end += this.sealer.seal(rec, n, ContentType::ApplicationData);
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
            this.seal_message(&record::CLOSE_NOTIFY, ContentType::Alert);
            this.tx.shut = true;
        }
        ready!(this.poll_write_out(cx))?;
        buffers::give_back(&mut this.tx.buf);
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl crate::Reset for TlsSession {
    fn set_reset_on_drop(&self) {
        TlsSession::set_reset_on_drop(self)
    }
}

#[cfg(test)]
impl TlsSession {
    /// Makes the next write send a key update first, as if the key were worn out.
    fn force_key_update(&mut self) {
        self.tx.key_update_owed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migtun_certs::{Ca, IssueOptions};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::config::TlsConfig;
    use crate::tls::{client_config, server_config, ALPN_DATA};

    fn tls_config(ca: &Ca, name: &str) -> TlsConfig {
        let host = ca.issue(name, &IssueOptions::default()).unwrap();
        TlsConfig {
            cert_path: "cert.pem".into(),
            key_path: "key.pem".into(),
            ca_path: "ca.pem".into(),
            cert_chain: CertificateDer::pem_slice_iter(host.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap(),
            key: PrivateKeyDer::from_pem_slice(host.key_pem.as_bytes()).unwrap(),
            ca_certs: CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()).collect::<Result<_, _>>().unwrap(),
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
            session.tcp.shutdown().await.unwrap();
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
        let n = session.sealer.seal_message(&mut rec, &[7u8; 100], ContentType::ApplicationData);
        rec[n / 2] ^= 1;
        session.tcp.write_all(&rec[..n]).await.unwrap();
        let err = server.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("authentication"), "{err}");
    }
}
