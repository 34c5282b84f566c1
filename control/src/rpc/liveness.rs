//! Is the peer still there? The client pings every [`KEEPALIVE_INTERVAL`](super::KEEPALIVE_INTERVAL)
//! ([`keepalive`]); the server notices the client's pings without h2's help ([`PingWatch`],
//! [`Activity`]) so that an idle connection of a live peer stays open.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// When the peer last showed life: a PING it sent, or a request. Milliseconds since `base`.
pub(super) struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity { base: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    pub(super) fn touch(&self) {
        let now = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    pub(super) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// The client's connection preface, which precedes its first frame.
const H2_PREFACE_LEN: usize = 24;
/// An HTTP/2 frame header: length (3 bytes), type, flags, stream id (4 bytes).
const H2_FRAME_HEADER_LEN: usize = 9;
const H2_FRAME_PING: u8 = 0x6;
const H2_FLAG_ACK: u8 = 0x1;

/// Passes a server connection's bytes through unchanged, following the client's frame
/// boundaries to notice the PINGs it sends (not the ACKs of ours): h2 answers pings itself and
/// does not tell, but a client's keepalive is what keeps an otherwise idle connection open.
/// Only frame headers are looked at; what h2 makes of the bytes is up to h2.
pub(super) struct PingWatch<T> {
    io: T,
    /// Bytes of the preface or of a frame payload still to pass.
    skip: usize,
    head: [u8; H2_FRAME_HEADER_LEN],
    have: usize,
    activity: Arc<Activity>,
}

impl<T> PingWatch<T> {
    pub(super) fn new(io: T, activity: Arc<Activity>) -> PingWatch<T> {
        PingWatch { io, skip: H2_PREFACE_LEN, head: [0; H2_FRAME_HEADER_LEN], have: 0, activity }
    }

    fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (H2_FRAME_HEADER_LEN - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == H2_FRAME_HEADER_LEN {
                self.have = 0;
                let [l0, l1, l2, kind, flags, ..] = self.head;
                if kind == H2_FRAME_PING && flags & H2_FLAG_ACK == 0 {
                    self.activity.touch();
                }
                self.skip = u32::from_be_bytes([0, l0, l1, l2]) as usize;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PingWatch<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let this = &mut *self;
            this.scan(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PingWatch<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Pings until the connection fails or a ping goes unanswered, then cancels `closed`.
pub(super) async fn keepalive(mut pp: h2::PingPong, closed: CancellationToken, peer: String) {
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(KEEPALIVE_INTERVAL) => {}
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "control connection: ping failed");
                break;
            }
            Err(_) => {
                warn!(%peer, "control connection: no answer to a ping within {}s; the peer is gone", KEEPALIVE_TIMEOUT.as_secs());
                break;
            }
        }
    }
    closed.cancel();
}

