//! Stream buffers: large ones from a bounded, process-wide pool, small ones when it is empty.
//!
//! A bulk stream moves the most bytes per system call with large buffers, but an agent may carry
//! a thousand streams at once and its memory must stay bounded. So a stream holds a buffer only
//! while bytes sit in it (an idle stream holds none: see [`crate::tls::session`] and [`PooledReader`]),
//! large buffers come from a pool whose total size is fixed, and a stream that finds the pool
//! empty makes do with a small buffer that still holds a whole TLS record. Pooled buffers are
//! kept, not freed, so the pool's memory is reused without page faults while streams use it;
//! a buffer that has sat unused in the pool for [`RELEASE_IDLE_AFTER`] gives its pages back to
//! the kernel ([`sweep`]), so that a burst of streams does not leave the pool resident for good.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

/// A large buffer: 16 TLS records, or a whole default UNIX socket buffer (208 KiB) in one read,
/// so a bulk stream costs one system call per quarter MiB on each side.
pub const LARGE: usize = 256 * 1024;
/// The fallback: one full TLS record (the receiving side moves a partial record to the front
/// to make room; the sending side seals one record at a time). With a thousand streams busy at
/// once, this is what most of them hold.
/// The size is TLS 1.3's largest record (RFC 8446 §5.2: a 5-byte header and 2^14 + 256 bytes of
/// ciphertext), spelled out so the pool needs nothing above it; the record layer asserts it fits.
pub const SMALL: usize = 5 + (1 << 14) + 256;
/// Large buffers in the pool: 16 MiB. A migration's handful of bulk streams (the RAM stream, its
/// multifd channels, a disk or two) all get large buffers; with a thousand streams at once the
/// rest get small ones, and the agent stays within 64 MiB (measured with `cargo bench --bench
/// latency`, scale test: see README.md).
pub const POOL_BUFFERS: usize = 64;
/// A pooled buffer unused for this long gives its pages back to the kernel; its allocation stays,
/// and the stream that takes it next faults fresh pages in. Measured with 1,000 streams at once
/// between two `migtun serve` processes (`tests/load.rs`): the burst touched all 64 large
/// buffers, and their 16 MiB stayed resident afterwards (the sending agent went from 12 to 35 MiB
/// and stayed there). Buffers in use circulate (a bulk stream takes and gives its buffers back
/// many times a second), and the pool hands out the most recently returned first, so a running
/// transfer never waits this long for one and never pays the page faults.
pub const RELEASE_IDLE_AFTER: Duration = Duration::from_secs(10);
/// How often [`sweep`] looks for idle buffers.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A buffer on loan from [`take`]; give it back with [`give`].
pub struct Buffer {
    data: Box<[u8]>,
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

/// A large buffer waiting in the pool.
struct Free {
    data: Box<[u8]>,
    /// When it came back.
    since: Instant,
    /// Whether its pages may still be resident (not yet given back by [`Pool::release_idle`]).
    resident: bool,
}

struct Pool {
    /// A stack: the most recently returned buffer (the one most likely resident) is lent first,
    /// so buffers that sit idle collect at the bottom.
    free: Mutex<Vec<Free>>,
    /// Large buffers allocated so far (free or lent); never more than [`POOL_BUFFERS`].
    made: Mutex<usize>,
    /// Buffers lent so far, large or small: [`sweep`] tells a busy data plane from an idle one.
    lent: AtomicU64,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(Pool::new)
}

impl Pool {
    fn new() -> Pool {
        Pool { free: Mutex::new(Vec::with_capacity(POOL_BUFFERS)), made: Mutex::new(0), lent: AtomicU64::new(0) }
    }

    fn take(&self) -> Buffer {
        self.lent.fetch_add(1, Ordering::Relaxed);
        if let Some(free) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Buffer { data: free.data };
        }
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        let size = if *made < POOL_BUFFERS {
            *made += 1;
            LARGE
        } else {
            SMALL
        };
        drop(made);
        Buffer { data: vec![0u8; size].into_boxed_slice() }
    }

    fn give(&self, buf: Buffer) {
        if buf.data.len() == LARGE {
            let free = Free { data: buf.data, since: Instant::now(), resident: true };
            self.free.lock().unwrap_or_else(|e| e.into_inner()).push(free);
        }
    }

    /// Gives back the pages of every buffer that has been waiting in the pool for `idle` or
    /// longer (and still has them); returns how many buffers that was.
    fn release_idle(&self, idle: Duration) -> usize {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut released = 0;
        for f in free.iter_mut().filter(|f| f.resident && f.since.elapsed() >= idle) {
            release_pages(&mut f.data);
            f.resident = false;
            released += 1;
        }
        released
    }
}

/// Drops the physical pages under `buf` (the whole pages inside it) and keeps the allocation: the
/// next write to them faults in fresh zeroed pages. What `buf` held is lost, which for a buffer
/// waiting in the pool does not matter: every use fills a buffer before reading it.
fn release_pages(buf: &mut [u8]) {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf only reads a system constant.
    let page = *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    });
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(page);
    let end = (start + buf.len()) / page * page;
    if end > first {
        // SAFETY: [first, end) lies inside `buf`, which we borrow exclusively, and the pointer
        // is derived from it, so the compiler assumes the call may change those bytes.
        // MADV_DONTNEED neither unmaps nor moves memory: it drops the pages' contents (private
        // anonymous memory, as the allocator's is, then reads as zeros, and any byte value is a
        // valid u8). On memory it cannot advise it fails (EINVAL) and changes nothing.
        unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
    }
}

/// Every [`SWEEP_INTERVAL`] until `stop`: gives the pages of buffers idle for
/// [`RELEASE_IDLE_AFTER`] back to the kernel, and once the data plane has been idle that long
/// (no buffer lent, so no stream moved a byte), the allocator's free memory too
/// (`trim_allocator`), once per idle period. The agent runs one; more (several agents in one
/// test process) do no harm.
pub async fn sweep(stop: tokio_util::sync::CancellationToken) {
    let mut lent = pool().lent.load(Ordering::Relaxed);
    let mut busy_at = Instant::now();
    let mut trimmed = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
        let released = pool().release_idle(RELEASE_IDLE_AFTER);
        if released > 0 {
            tracing::debug!(buffers = released, kib = released * LARGE / 1024, "idle pooled buffers' memory given back");
        }
        let now_lent = pool().lent.load(Ordering::Relaxed);
        if now_lent != lent {
            (lent, busy_at, trimmed) = (now_lent, Instant::now(), false);
        } else if !trimmed && busy_at.elapsed() >= RELEASE_IDLE_AFTER {
            trim_allocator();
            trimmed = true;
        }
    }
}

/// Hands the allocator's free memory back to the kernel (glibc: `malloc_trim`).
///
/// Measured after 1,000 streams at once between two `migtun serve` processes (`tests/load.rs`),
/// with glibc's `mallinfo2` read inside the agents: about 1 MiB of heap in use, and 10-17 MiB
/// (TLS) or 40-120 MiB (QUIC) free but still resident in glibc's per-thread arenas. That memory
/// was the burst's own: QUIC's send and receive buffers (bounded by its flow-control windows),
/// the small stream buffers of the streams the pool had no large one for, the handshakes. Freed
/// in the middle of the arenas, glibc gives it back only on `malloc_trim`; nothing of ours still
/// holds it, so there is nothing to bound or remove. One trim once the data plane is idle took
/// 1.5-8 ms and brought the idle agents from 22-104 MiB (with the pool's pages already given
/// back) to 15-18 MiB, against 13 MiB before the burst. It never runs while streams move bytes,
/// and at most once per idle period.
fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes glibc's arena locks itself and only gives back memory that
        // is free (it changes no allocation); it may be called from any thread at any time.
        let gave_back = unsafe { libc::malloc_trim(0) };
        tracing::debug!(gave_back = gave_back != 0, "idle: the allocator's free memory given back (malloc_trim)");
    }
}

/// A buffer: a large one if the pool has one to lend, else a small one.
pub fn take() -> Buffer {
    pool().take()
}

/// A buffer of at least `n` bytes (for bytes already in hand, such as what arrived with the
/// end of a handshake; at most a few tens of KiB).
pub fn take_at_least(n: usize) -> Buffer {
    let b = take();
    if b.len() >= n {
        return b;
    }
    give(b);
    Buffer { data: vec![0u8; n].into_boxed_slice() }
}

/// Returns a buffer: a large one goes back to the pool, a small one is freed.
pub fn give(buf: Buffer) {
    pool().give(buf)
}

/// Returns the buffer in `slot`, if there is one.
pub fn give_back(slot: &mut Option<Buffer>) {
    if let Some(b) = slot.take() {
        give(b);
    }
}

/// Large buffers allocated so far, for tests and metrics.
pub fn large_allocated() -> usize {
    *pool().made.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffered reader that holds a pooled buffer only while bytes wait in it, so an idle stream
/// costs no buffer. Writes pass straight through.
pub struct PooledReader<T> {
    inner: T,
    buf: Option<Buffer>,
    pos: usize,
    cap: usize,
}

impl<T: std::fmt::Debug> std::fmt::Debug for PooledReader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledReader").field("inner", &self.inner).field("buffered", &(self.cap - self.pos)).finish()
    }
}

impl<T> PooledReader<T> {
    pub fn new(inner: T) -> PooledReader<T> {
        PooledReader { inner, buf: None, pos: 0, cap: 0 }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    fn release(&mut self) {
        give_back(&mut self.buf);
        self.pos = 0;
        self.cap = 0;
    }
}

impl<T> Drop for PooledReader<T> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<T: AsyncRead + Unpin> AsyncBufRead for PooledReader<T> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos == this.cap {
            let mut buf = this.buf.take().unwrap_or_else(take);
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    this.pos = 0;
                    this.cap = rb.filled().len();
                    this.buf = Some(buf);
                }
                Poll::Ready(Err(e)) => {
                    give(buf);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // Idle: the buffer goes back until there is something to read.
                    give(buf);
                    return Poll::Pending;
                }
            }
        }
        match &this.buf {
            Some(b) => Poll::Ready(Ok(&b[this.pos..this.cap])),
            None => Poll::Ready(Ok(&[])),
        }
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.cap);
    }
}

impl<T: AsyncRead + Unpin> crate::io::ChunkedRead for PooledReader<T> {
    fn chunks<'a>(&'a self, out: &mut [io::IoSlice<'a>]) -> usize {
        match &self.buf {
            Some(b) => crate::io::one_chunk(&b[self.pos..self.cap], out),
            None => 0,
        }
    }
}

impl<T: crate::io::DirectRead> crate::io::DirectRead for PooledReader<T> {
    fn poll_read_direct(&mut self, cx: &mut Context<'_>, bufs: &mut [io::IoSliceMut<'_>]) -> Option<Poll<io::Result<usize>>> {
        if self.pos < self.cap {
            return None;
        }
        self.release();
        self.inner.poll_read_direct(cx, bufs)
    }
}

impl<T: crate::io::PullWrite> crate::io::PullWrite for PooledReader<T> {
    fn poll_pull(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut dyn crate::io::DirectRead,
    ) -> Option<Poll<Result<usize, crate::io::PullError>>> {
        self.inner.poll_pull(cx, src)
    }
}

crate::io::copy_only!(tokio::io::DuplexStream);

impl<T: AsyncRead + Unpin> AsyncRead for PooledReader<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos == self.cap {
            // Nothing buffered: read straight into the caller's buffer.
            self.release();
            return Pin::new(&mut self.inner).poll_read(cx, out);
        }
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

impl<T: AsyncWrite + Unpin> AsyncWrite for PooledReader<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: crate::io::Reset> crate::io::Reset for PooledReader<T> {
    fn set_reset_on_drop(&self) {
        self.inner.set_reset_on_drop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    #[test]
    fn the_pool_lends_large_buffers_up_to_its_size_then_small_ones() {
        let lent: Vec<Buffer> = (0..POOL_BUFFERS + 3).map(|_| take()).collect();
        assert_eq!(large_allocated(), POOL_BUFFERS);
        assert!(lent.iter().any(|b| b.len() == SMALL), "an empty pool lends small buffers");
        lent.into_iter().for_each(give);
        assert_eq!(take().len(), LARGE, "returned large buffers are lent again");
        assert_eq!(large_allocated(), POOL_BUFFERS, "and not allocated anew");
    }

    /// Buffers that waited in the pool long enough give their pages back (and read as zeros,
    /// which shows the kernel dropped them), once; one lent and returned since is resident again.
    #[test]
    fn idle_pooled_buffers_give_their_pages_back() {
        let pool = Pool::new();
        let mut lent: Vec<Buffer> = (0..4).map(|_| pool.take()).collect();
        for b in &mut lent {
            b.fill(0xa5);
        }
        lent.into_iter().for_each(|b| pool.give(b));
        assert_eq!(pool.release_idle(Duration::from_secs(3600)), 0, "not idle for long enough");
        assert_eq!(pool.release_idle(Duration::ZERO), 4);
        assert_eq!(pool.release_idle(Duration::ZERO), 0, "each buffer's pages are given back once");
        let b = pool.take();
        assert_eq!(b.len(), LARGE);
        let zeros = b.iter().filter(|&&x| x == 0).count();
        assert!(zeros >= LARGE - 2 * 4096, "the released pages read as zeros: {zeros} of {LARGE} bytes");
        assert_eq!(*pool.made.lock().unwrap(), 4, "the allocation is kept and lent again");
        pool.give(b);
        assert_eq!(pool.release_idle(Duration::ZERO), 1, "returned again: resident again");
    }

    #[test]
    fn releasing_pages_keeps_the_buffer_usable() {
        let mut buf = vec![0x5au8; 100_000];
        release_pages(&mut buf[1..]);
        assert_eq!(buf[0], 0x5a, "bytes outside the released whole pages are kept");
        buf.fill(7);
        assert!(buf.iter().all(|&x| x == 7));
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut r = PooledReader::new(b);
        a.write_all(b"hello").await.unwrap();
        assert_eq!(r.fill_buf().await.unwrap(), b"hello");
        r.consume(5);
        assert!(r.buf.is_some());
        // Nothing more to read: the next poll is pending and gives the buffer back.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut r).poll_fill_buf(&mut cx).is_pending());
        assert!(r.buf.is_none());
        drop(a);
        assert_eq!(r.fill_buf().await.unwrap(), b"");
    }
}
