//! A TLS 1.3 connection on the port: rustls does the handshake, [`crate::tls::record`] the records
//! (`tls.record_layer = "own"`, the default), or tokio-rustls does both (`"rustls"`).
//!
//! [`connect`] and [`accept`] drive rustls' unbuffered API over the TCP socket until the
//! handshake is complete, then take the traffic secrets and a [`KernelConnection`] (rustls' API
//! for kTLS) and from there on [`TlsSession`] reads, decrypts, encrypts and writes records
//! itself, in place, in pooled buffers ([`crate::io::buffers`]). rustls keeps what it is good at:
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

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, HandshakeKind, SupportedCipherSuite};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::io::buffers::PooledReader;
use crate::tls::record::RecordError;
use crate::io::{DirectRead, PullError, PullWrite};

mod handshake;
mod records;
#[cfg(test)]
pub(crate) mod tests;

pub use handshake::{accept, connect};
use records::Records;

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

/// An established TLS 1.3 session, on either record layer.
pub struct TlsSession(Layer);

enum Layer {
    Own(Records),
    Rustls(RustlsSession),
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

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession").field("layer", &self.layer_name()).field("tcp", self.tcp()).field("alpn", &self.info().alpn).finish_non_exhaustive()
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
            Layer::Rustls(s) => crate::io::socket::reset_on_drop(s.tcp()),
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

impl crate::io::ChunkedRead for TlsSession {
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

impl crate::io::Reset for TlsSession {
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
