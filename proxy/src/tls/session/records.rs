//! Our record layer over an established session: records read from the socket, opened in place and
//! handed out where they lie; writes sealed in the send buffer; alerts, key updates and session tickets.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::{AlertDescription, ExtractedSecrets};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::io::buffers::{self, Buffer};
use crate::tls::record::{self, Alert, ContentType, Opener, PostHandshake, RecordError, Sealer, MAX_PLAINTEXT, MAX_RECORD, MAX_SEALED, OVERHEAD};
use crate::io::{DirectRead, PullError, PullWrite};

use super::{record_error, tls_error, write_after_shutdown, Kernel, SessionInfo};

/// Room a write needs in the send buffer: a key update record and a record of at least one byte
/// (a close_notify alert fits too).
const MIN_SEND_ROOM: usize = (OVERHEAD + 5) + (OVERHEAD + 1);
/// Decrypted records passed on by one vectored write: a large buffer's worth of full records.
const MAX_CHUNKS: usize = buffers::LARGE / MAX_PLAINTEXT;
// A pooled buffer holds at least one whole record: the receiving side moves a partial record to
// the front to make room, the sending side seals one record at a time.
const _: () = assert!(buffers::SMALL >= MAX_RECORD);

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

/// A session on our own record layer.
pub(super) struct Records {
    pub(super) tcp: TcpStream,
    pub(super) info: SessionInfo,
    kernel: Kernel,
    opener: Opener,
    pub(super) sealer: Sealer,
    rx: RecvState,
    pub(super) tx: SendState,
    /// Session tickets the server sent us (client side), handed to rustls.
    pub(super) tickets: u64,
    /// Key updates we sent, and the most records any of our keys sealed (for tests).
    pub(super) key_updates: u64,
    pub(super) most_per_key: u64,
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
pub(super) struct SendState {
    buf: Option<Buffer>,
    start: usize,
    end: usize,
    /// The peer asked for a key update: ours goes out before our next record.
    pub(super) key_update_owed: bool,
    /// close_notify is queued: nothing more may be written.
    shut: bool,
    /// We failed the session with this fatal alert: nothing more may be written.
    alerted: Option<AlertDescription>,
    /// The alert reached the socket: the connection ends with it and a FIN, not a reset (a
    /// reset could discard the alert before the peer reads it).
    alert_delivered: bool,
}

pub(super) enum Ready {
    Early,
    Plain,
    Eof,
}

impl Records {
    pub(super) fn new(
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

    pub(super) fn poll_ready_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
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
    pub(super) fn set_reset_on_drop(&self) {
        if !self.tx.alert_delivered {
            crate::io::socket::reset_on_drop(&self.tcp);
        }
    }
}

impl Drop for Records {
    fn drop(&mut self) {
        buffers::give_back(&mut self.rx.buf);
        buffers::give_back(&mut self.tx.buf);
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

impl crate::io::ChunkedRead for Records {
    fn chunks<'a>(&'a self, out: &mut [io::IoSlice<'a>]) -> usize {
        if self.rx.early_pos < self.rx.early.len() {
            return crate::io::one_chunk(&self.rx.early[self.rx.early_pos..], out);
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
