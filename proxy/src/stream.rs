//! The one stream type over both transports: what carries a tunnelled stream to a peer, a TLS
//! connection over TCP or a QUIC stream, behind [`PeerStream`], which implements the traits the
//! relay is generic over ([`crate::io`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use crate::io::buffers::PooledReader;
use crate::quic::stream::QuicStream;
use crate::tls::session::TlsSession;
use crate::io::Reset;

/// A stream to a peer, on either transport. Same semantics on both: bytes in order, shutdown is
/// an EOF for the other side (TLS close_notify and TCP FIN, or QUIC FIN), a reset on drop after
/// [`Reset::set_reset_on_drop`] (TCP RST, or QUIC RESET_STREAM and STOP_SENDING).
#[derive(Debug)]
pub enum PeerStream {
    /// Decrypted records are read in place ([`TlsSession`] is its own buffered reader).
    Tls(Box<TlsSession>),
    Quic(PooledReader<QuicStream>),
}

impl PeerStream {
    /// `tls` or `quic`, for logs.
    pub fn transport(&self) -> &'static str {
        match self {
            PeerStream::Tls(_) => "tls",
            PeerStream::Quic(_) => "quic",
        }
    }
}

impl Reset for PeerStream {
    fn set_reset_on_drop(&self) {
        match self {
            PeerStream::Tls(s) => s.set_reset_on_drop(),
            PeerStream::Quic(s) => crate::io::Reset::set_reset_on_drop(s),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            PeerStream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            PeerStream::Quic($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for PeerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncBufRead for PeerStream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        match self.get_mut() {
            PeerStream::Tls(s) => Pin::new(&mut **s).poll_fill_buf(cx),
            PeerStream::Quic(s) => Pin::new(s).poll_fill_buf(cx),
        }
    }
    fn consume(self: Pin<&mut Self>, amt: usize) {
        delegate!(self, s => s.consume(amt))
    }
}

impl crate::io::ChunkedRead for PeerStream {
    fn chunks<'a>(&'a self, out: &mut [io::IoSlice<'a>]) -> usize {
        match self {
            PeerStream::Tls(s) => s.chunks(out),
            PeerStream::Quic(s) => s.chunks(out),
        }
    }
}

impl crate::io::DirectRead for PeerStream {
    fn poll_read_direct(&mut self, _: &mut Context<'_>, _: &mut [io::IoSliceMut<'_>]) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

impl crate::io::PullWrite for PeerStream {
    fn poll_pull(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut dyn crate::io::DirectRead,
    ) -> Option<Poll<Result<usize, crate::io::PullError>>> {
        match self {
            PeerStream::Tls(s) => s.poll_pull(cx, src),
            PeerStream::Quic(_) => None,
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}
