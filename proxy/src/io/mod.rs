//! Below everything: local sockets and what the byte paths are made of. Local endpoints
//! ([`endpoint`]: TCP or UNIX, listeners and streams), socket options ([`socket`]), the accept
//! loop with its back-off ([`accept`]), per-source limits ([`limit`]), the bounded buffer pool
//! ([`buffers`]), and the traits below that every stream implements and the relay is generic
//! over: [`ChunkedRead`], [`DirectRead`], [`PullWrite`] and [`Reset`].
//!
//! Nothing here knows a transport (TLS, QUIC), the relay or a route.

use std::io::{self, IoSlice, IoSliceMut};
use std::task::{Context, Poll};

use tokio::io::AsyncBufRead;

pub mod accept;
pub mod buffers;
pub mod endpoint;
pub mod limit;
pub mod socket;

/// A buffered reader that can hand out all it holds as several slices, for one vectored write
/// (a TLS session's decrypted records lie apart, between their headers and tags).
pub trait ChunkedRead: AsyncBufRead {
    /// After `poll_fill_buf` returned bytes: the buffered bytes as up to `out.len()` slices, the
    /// first being what `poll_fill_buf` returned. Returns how many slices it filled.
    fn chunks<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize;
}

/// [`ChunkedRead::chunks`] for a reader whose buffer is one slice.
pub fn one_chunk<'a>(buf: &'a [u8], out: &mut [IoSlice<'a>]) -> usize {
    match out.first_mut() {
        Some(slot) if !buf.is_empty() => {
            *slot = IoSlice::new(buf);
            1
        }
        _ => 0,
    }
}

/// A reader that can read straight into someone else's buffers, with one vectored read.
pub trait DirectRead {
    /// Reads into `bufs` in order; `None` if this reader cannot (or holds buffered bytes that
    /// must go first), and the relay copies through the reader's buffer instead.
    fn poll_read_direct(&mut self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>]) -> Option<Poll<io::Result<usize>>>;
}

/// A writer that fills its own buffer straight from a [`DirectRead`]er: a TLS session reads the
/// plaintext into its record slots and seals it where it landed (no copy in between).
pub trait PullWrite {
    /// Moves bytes from `src`; `Ready(Ok(0))` is `src`'s EOF. `None` if either side cannot.
    fn poll_pull(&mut self, cx: &mut Context<'_>, src: &mut dyn DirectRead) -> Option<Poll<Result<usize, PullError>>>;
}

/// A failure of [`PullWrite::poll_pull`], by the side it happened on.
#[derive(Debug)]
pub enum PullError {
    Read(io::Error),
    Write(io::Error),
}

/// A stream that can be closed abortively, so the other end sees a reset rather than an EOF.
pub trait Reset {
    /// Makes dropping the stream send a TCP RST (SO_LINGER 0). No effect on UNIX sockets.
    fn set_reset_on_drop(&self);
}

/// Implements [`DirectRead`] and [`PullWrite`] as "cannot" for streams that neither read straight
/// into another's buffers nor pull from one: the relay copies through a buffer for them.
macro_rules! copy_only {
    ($($t:ty),*) => {$(
        impl crate::io::DirectRead for $t {
            fn poll_read_direct(&mut self, _: &mut std::task::Context<'_>, _: &mut [std::io::IoSliceMut<'_>]) -> Option<std::task::Poll<std::io::Result<usize>>> {
                None
            }
        }
        impl crate::io::PullWrite for $t {
            fn poll_pull(
                &mut self,
                _: &mut std::task::Context<'_>,
                _: &mut dyn crate::io::DirectRead,
            ) -> Option<std::task::Poll<Result<usize, crate::io::PullError>>> {
                None
            }
        }
    )*};
}
pub(crate) use copy_only;
