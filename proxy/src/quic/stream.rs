//! One tunnelled connection over QUIC: a bidirectional stream, reset unless shut down.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use quinn::VarInt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::io::Reset;

use super::tuning::codes;

/// One tunnelled stream on a QUIC connection: a bidirectional QUIC stream.
///
/// Shutdown is `FIN` ([`quinn::SendStream::finish`]). Dropping it after [`Reset::set_reset_on_drop`],
/// or before it was shut down, resets both halves (`RESET_STREAM` and `STOP_SENDING`), so the
/// other side's reads and writes fail as a TCP reset would make them fail. Only a shutdown is an
/// orderly EOF: quinn's default, finishing the send half of a stream dropped without one, would
/// make a stream cut short (a task cancelled, an error path that forgot the reset) look complete.
pub struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reset: AtomicBool,
    /// After `finish`: resolves when the peer has acknowledged every byte (or stopped the stream).
    finishing: Option<Pin<Box<Finishing>>>,
    finished: bool,
}

type Finishing = dyn Future<Output = Result<Option<VarInt>, quinn::StoppedError>> + Send + Sync;

impl QuicStream {
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> QuicStream {
        QuicStream { send, recv, reset: AtomicBool::new(false), finishing: None, finished: false }
    }
}

impl std::fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStream").field("id", &self.send.id()).finish()
    }
}

impl Reset for QuicStream {
    fn set_reset_on_drop(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        let shut_down = self.finished || self.finishing.is_some();
        if self.reset.load(Ordering::Relaxed) || !shut_down {
            let _ = self.send.reset(codes::STREAM_RESET);
            let _ = self.recv.stop(codes::STREAM_RESET);
        }
    }
}

crate::io::copy_only!(QuicStream);

impl AsyncRead for QuicStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }
    /// Sends `FIN`, then waits until the peer has acknowledged all the stream's data. Unlike TCP,
    /// whose kernel keeps delivering after `close`, quinn's buffered data goes with the
    /// connection: waiting here keeps a stream "open" (for the drain, and for the endpoint close
    /// at shutdown) until its bytes have arrived.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(Ok(()));
        }
        if this.finishing.is_none() {
            if this.send.finish().is_err() {
                // Already finished or reset: nothing more to send.
                this.finished = true;
                return Poll::Ready(Ok(()));
            }
            this.finishing = Some(Box::pin(this.send.stopped()));
        }
        let Some(finishing) = this.finishing.as_mut() else { return Poll::Ready(Ok(())) };
        let result = std::task::ready!(finishing.as_mut().poll(cx));
        this.finishing = None;
        this.finished = true;
        Poll::Ready(match result {
            Ok(None) => Ok(()),
            Ok(Some(code)) => {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("peer stopped reading (code {code})")))
            }
            Err(e) => Err(io::Error::new(io::ErrorKind::NotConnected, e)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use crate::quic::tuning::{client_config, server_config};
    use crate::tls::context::TlsContext;
    use crate::tls::ALPN_DATA;

    /// A QUIC server and client endpoint on loopback with certificates from one test CA.
    async fn endpoints() -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
        let ca = migtun_certs::Ca::generate("test CA").unwrap();
        let server_tls = crate::tls::session::tests::tls_config(&ca, "host-b");
        let client_tls = crate::tls::session::tests::tls_config(&ca, "host-a");
        let server_ctx = TlsContext::new(&server_tls).unwrap();
        let server = quinn::Endpoint::server(server_config(&server_ctx, &[ALPN_DATA]).unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
        let addr = server.local_addr().unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let client_side = TlsContext::new(&client_tls).unwrap().client_config(&[ALPN_DATA]).unwrap();
        client.set_default_client_config(client_config(&client_side).unwrap());
        (server, client, addr)
    }

    /// A stream dropped in the middle of a transfer, before any shutdown (a task cancelled, an
    /// error path that did not ask for a reset), is reset: the far end's read fails, it never
    /// sees a FIN, so a truncated stream cannot look complete. One that was shut down ends with
    /// an EOF after all its bytes.
    #[tokio::test]
    async fn a_stream_dropped_before_shutdown_is_reset_not_finished() {
        use tokio::io::AsyncWriteExt;
        let (server, client, addr) = endpoints().await;
        let far = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut ends = Vec::new();
            for _ in 0..2 {
                let (_send, mut recv) = conn.accept_bi().await.unwrap();
                let mut got = Vec::new();
                ends.push(tokio::io::AsyncReadExt::read_to_end(&mut recv, &mut got).await.map(|_| got.len()).map_err(|e| e.to_string()));
            }
            ends
        });
        let conn = client.connect(addr, "host-b").unwrap().await.unwrap();
        let data = vec![0x5a; 200_000];
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut cut = QuicStream::new(send, recv);
        cut.write_all(&data).await.unwrap();
        cut.flush().await.unwrap();
        drop(cut);
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut whole = QuicStream::new(send, recv);
        whole.write_all(&data).await.unwrap();
        whole.shutdown().await.unwrap();
        drop(whole);
        let ends = far.await.unwrap();
        let reset = ends[0].as_ref().expect_err("the stream cut short is an error at the far end, not an EOF");
        assert!(reset.contains("reset"), "{reset}");
        assert_eq!(ends[1], Ok(data.len()), "the stream shut down ends with every byte and an EOF");
    }
}
