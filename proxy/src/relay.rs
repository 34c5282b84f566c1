//! The byte relay: both directions of one tunnelled stream, in one task.
//!
//! Each direction writes out what its reader has buffered before the reader reads again (the
//! buffers are the readers', lent from a bounded pool: [`crate::io::buffers`]), so memory per stream
//! is bounded and a slow reader throttles its writer (backpressure all the way
//! back to the sending QEMU through the kernel's socket buffers and TLS flow). EOF on one side is
//! passed on as a write shutdown on the other (TLS close_notify, then TCP FIN), while the other
//! direction keeps flowing: QEMU and NBD rely on half-close. An error in either direction ends
//! both: the caller then drops the streams abortively, so a reset on one side becomes a reset
//! (or, on UNIX sockets, a close) on the other.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWrite;

use crate::io::{ChunkedRead, DirectRead, PullError, PullWrite};

/// Which side of the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("local side: {0}")]
    Local(io::Error),
    #[error("peer side: {0}")]
    Peer(io::Error),
}

/// Bytes carried in each direction, for the log line at the end of a stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub local_to_peer: u64,
    pub peer_to_local: u64,
}

/// A byte counter the relay adds what it receives from the peer to, shared with whoever set it up
/// (a route's streams and the migration that added the route).
#[derive(Clone, Debug, Default)]
pub struct ByteCount(Arc<AtomicU64>);

impl ByteCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// The same counter, not the same count.
impl PartialEq for ByteCount {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ByteCount {}

/// What the relay needs of each side.
pub trait RelayStream: ChunkedRead + DirectRead + PullWrite + AsyncWrite + Unpin {}
impl<T: ChunkedRead + DirectRead + PullWrite + AsyncWrite + Unpin> RelayStream for T {}

/// Slices per vectored write: all of a large buffer's full TLS records.
const MAX_WRITE_CHUNKS: usize = crate::io::buffers::LARGE / crate::tls::record::MAX_PLAINTEXT;

/// One direction of the relay: from a buffered reader to a writer. The buffer is the reader's:
/// a [`crate::tls::session::TlsSession`] hands out decrypted records where they lie, a
/// [`crate::io::buffers::PooledReader`] its pooled buffer; either holds it only while bytes wait.
#[derive(Default)]
struct Direction {
    total: u64,
    need_flush: bool,
    /// The reader reached EOF: only the writer's shutdown is left (it may take several polls,
    /// and the reader must not be asked again meanwhile).
    eof: bool,
    done: bool,
}

impl Direction {
    /// Moves bytes until `reader` is pending or exhausted; on EOF shuts `writer` down.
    /// An error says whether it came from the read (`true`) or the write side.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &Counter,
        also: Option<&ByteCount>,
    ) -> Poll<Result<(), (bool, io::Error)>>
    where
        R: ChunkedRead + DirectRead + Unpin,
        W: AsyncWrite + PullWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.eof {
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(|e| (false, e))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // The direct path first (local socket into TLS records); the reader declines while
            // it holds buffered bytes, which then go first.
            let direct = writer.as_mut().get_mut().poll_pull(cx, reader.as_mut().get_mut());
            match direct {
                Some(Poll::Ready(Ok(0))) => {
                    self.eof = true;
                    continue;
                }
                Some(Poll::Ready(Ok(n))) => {
                    self.total += n as u64;
                    counter.inc_by(n as u64);
                    if let Some(c) = also {
                        c.add(n as u64);
                    }
                    self.need_flush = true;
                    continue;
                }
                Some(Poll::Ready(Err(PullError::Read(e)))) => return Poll::Ready(Err((true, e))),
                Some(Poll::Ready(Err(PullError::Write(e)))) => return Poll::Ready(Err((false, e))),
                Some(Poll::Pending) => {
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx)).map_err(|e| (false, e))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                None => {}
            }
            let eof = match reader.as_mut().poll_fill_buf(cx) {
                Poll::Ready(Ok(buf)) => buf.is_empty(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err((true, e))),
                Poll::Pending => {
                    // Nothing more to read for now: push out what the writer buffered
                    // (TLS holds sealed records until flushed), then wait for either side.
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx)).map_err(|e| (false, e))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            };
            if eof {
                self.eof = true;
                continue;
            }
            let mut slices = [IoSlice::new(&[]); MAX_WRITE_CHUNKS];
            let k = reader.as_ref().get_ref().chunks(&mut slices);
            let n = ready!(writer.as_mut().poll_write_vectored(cx, &slices[..k])).map_err(|e| (false, e))?;
            if n == 0 {
                return Poll::Ready(Err((false, io::Error::new(io::ErrorKind::WriteZero, "write returned 0"))));
            }
            reader.as_mut().consume(n);
            self.total += n as u64;
            counter.inc_by(n as u64);
            if let Some(c) = also {
                c.add(n as u64);
            }
            self.need_flush = true;
        }
    }
}

/// Relays between `local` and `peer` until both directions have seen EOF, or either fails.
///
/// `tx` counts bytes sent towards the peer, `rx` bytes received from it.
pub async fn relay<L, P>(local: &mut L, peer: &mut P, tx: &Counter, rx: &Counter) -> Result<Transferred, RelayError>
where
    L: RelayStream,
    P: RelayStream,
{
    relay_counted(local, peer, tx, rx, None).await
}

/// [`relay`], counting the received bytes in `received` too.
async fn relay_counted<L, P>(
    local: &mut L,
    peer: &mut P,
    tx: &Counter,
    rx: &Counter,
    received: Option<&ByteCount>,
) -> Result<Transferred, RelayError>
where
    L: RelayStream,
    P: RelayStream,
{
    let mut up = Direction::default();
    let mut down = Direction::default();
    poll_fn(|cx| {
        // Up: local -> peer. A read error is the local side's, a write error the peer's.
        let up_state = up
            .poll_copy(cx, Pin::new(&mut *local), Pin::new(&mut *peer), tx, None)
            .map_err(|(on_read, e)| if on_read { RelayError::Local(e) } else { RelayError::Peer(e) })?;
        let down_state = down
            .poll_copy(cx, Pin::new(&mut *peer), Pin::new(&mut *local), rx, received)
            .map_err(|(on_read, e)| if on_read { RelayError::Peer(e) } else { RelayError::Local(e) })?;
        match (up_state, down_state) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await?;
    Ok(Transferred { local_to_peer: up.total, peer_to_local: down.total })
}

/// Runs one stream to its end: first `early` (peer bytes that arrived with the preamble or its
/// reply) to the local side, then [`relay`] until both directions are done, or until `abort`
/// (the drain deadline). On any failure both sides are set to reset when dropped, so the far
/// ends see a reset, not a clean end of stream. `received` counts the bytes from the peer too.
pub async fn run<L, P>(
    local: &mut L,
    peer: &mut P,
    early: &[u8],
    metrics: &crate::metrics::StreamMetrics,
    received: Option<&ByteCount>,
    abort: &tokio_util::sync::CancellationToken,
) -> Result<Transferred, RelayError>
where
    L: RelayStream + crate::io::Reset,
    P: RelayStream + crate::io::Reset,
{
    let result = async {
        if !early.is_empty() {
            tokio::io::AsyncWriteExt::write_all(local, early).await.map_err(RelayError::Local)?;
            metrics.rx.inc_by(early.len() as u64);
            if let Some(c) = received {
                c.add(early.len() as u64);
            }
        }
        tokio::select! {
            r = relay_counted(local, peer, &metrics.tx, &metrics.rx, received) => r,
            _ = abort.cancelled() => Err(RelayError::Local(io::Error::other("drain deadline passed"))),
        }
    }
    .await;
    if result.is_err() {
        local.set_reset_on_drop();
        peer.set_reset_on_drop();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn carries_bytes_and_half_close_each_way() {
        let (mut app, local) = tokio::io::duplex(1024);
        let (peer, mut remote) = tokio::io::duplex(1024);
        let (mut local, mut peer) = (crate::io::buffers::PooledReader::new(local), crate::io::buffers::PooledReader::new(peer));
        let (tx, rx) = (Counter::default(), Counter::default());
        let relay = tokio::spawn(async move { relay(&mut local, &mut peer, &tx, &rx).await.map(|t| (t, tx.get(), rx.get())) });

        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            // Half-closed: the reply still arrives.
            let mut reply = Vec::new();
            app.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        remote.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        remote.write_all(b"reply after EOF").await.unwrap();
        remote.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after EOF");
        let (t, tx, rx) = relay.await.unwrap().unwrap();
        assert_eq!(t, Transferred { local_to_peer: data.len() as u64, peer_to_local: 15 });
        assert_eq!((tx, rx), (data.len() as u64, 15));
    }
}
