//! What carries a tunnelled stream to a peer: a TLS connection over TCP or a QUIC stream, behind
//! one type ([`PeerStream`]), and the `transport = "auto"` decision ([`AutoPolicy`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// How long `auto` waits for a QUIC handshake before it uses TLS over TCP for the stream. On a
/// path where UDP gets through, a handshake takes one or two round trips; this only costs the
/// first stream after UDP became blocked.
pub const AUTO_QUIC_TIMEOUT: Duration = Duration::from_secs(2);
/// While fallen back, QUIC is tried again after this long, doubling up to [`AUTO_PROBE_MAX`].
pub const AUTO_PROBE_MIN: Duration = Duration::from_secs(1);
pub const AUTO_PROBE_MAX: Duration = Duration::from_secs(30);

/// Which transport a new stream takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Quic,
    Tls,
}

/// What to do after an event, for the caller (which does the I/O and the logging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// Nothing changed.
    None,
    /// New streams now use TLS over TCP: log it (once) and start probing QUIC.
    ToTls,
    /// QUIC works again: new streams use it; log it.
    ToQuic,
}

/// The `transport = "auto"` policy for one peer, without I/O: try QUIC; when UDP does not get
/// through, use TLS over TCP and probe QUIC in the background with a growing interval; go back to
/// QUIC as soon as a probe succeeds. Streams already open stay on the transport they started on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoPolicy {
    fallen_back: bool,
    probe_delay: Duration,
}

impl Default for AutoPolicy {
    fn default() -> Self {
        AutoPolicy { fallen_back: false, probe_delay: AUTO_PROBE_MIN }
    }
}

impl AutoPolicy {
    pub fn choose(&self) -> Choice {
        if self.fallen_back {
            Choice::Tls
        } else {
            Choice::Quic
        }
    }

    /// QUIC did not get through (timeout or a network error; a certificate refusal is not a
    /// reason to fall back, TLS would be refused too).
    pub fn quic_unreachable(&mut self) -> Switch {
        if self.fallen_back {
            Switch::None
        } else {
            self.fallen_back = true;
            self.probe_delay = AUTO_PROBE_MIN;
            Switch::ToTls
        }
    }

    /// A QUIC connection was established (by a stream or a background probe).
    pub fn quic_up(&mut self) -> Switch {
        self.probe_delay = AUTO_PROBE_MIN;
        if std::mem::replace(&mut self.fallen_back, false) {
            Switch::ToQuic
        } else {
            Switch::None
        }
    }

    /// While fallen back: how long to wait before the next probe (grows each time it is asked).
    pub fn next_probe_delay(&mut self) -> Duration {
        let d = self.probe_delay;
        self.probe_delay = (self.probe_delay * 2).min(AUTO_PROBE_MAX);
        d
    }

    pub fn is_fallen_back(&self) -> bool {
        self.fallen_back
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_once_probes_with_backoff_and_returns() {
        let mut p = AutoPolicy::default();
        assert_eq!(p.choose(), Choice::Quic);
        assert_eq!(p.quic_up(), Switch::None, "QUIC working from the start is not a switch");
        assert_eq!(p.quic_unreachable(), Switch::ToTls);
        assert_eq!(p.choose(), Choice::Tls);
        assert_eq!(p.quic_unreachable(), Switch::None, "logged once, not per stream");
        let delays: Vec<u64> = (0..7).map(|_| p.next_probe_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(p.quic_up(), Switch::ToQuic);
        assert_eq!(p.choose(), Choice::Quic);
        assert_eq!(p.quic_unreachable(), Switch::ToTls, "a later outage is reported again");
        assert_eq!(p.next_probe_delay(), AUTO_PROBE_MIN, "the backoff starts over");
    }
}
