//! Accept loops that survive running out of file descriptors, and log lines a flood cannot
//! multiply.
//!
//! Every listener of the agent (the port, forwards, `/metrics`, the admin socket) accepts through
//! [`AcceptLoop::accept`]. When the process or the system is out of file descriptors or memory
//! (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) the pending connection stays in the kernel's backlog
//! and `accept` fails again at once, so retrying without a pause spins a core and floods the log.
//! Instead the loop waits, doubling the pause up to [`BACKOFF_MAX`], and logs one line per
//! [`LOG_INTERVAL`] with the number of failures. A connection that the client aborted before we
//! accepted it (`ECONNABORTED`) is not our problem: the loop goes on at once.
//!
//! [`Throttle`] is the same rate limit for any log line a remote host can trigger (refused
//! handshakes, strangers): one line per interval per kind, with the count of what it stands for.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::metrics::Metrics;

/// First pause after a resource error. Short: descriptors are often freed within milliseconds
/// (streams ending), and every pause leaves connections waiting in the backlog.
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between retries while the error persists: at most one failed `accept` per
/// second per listener, and a recovered host is noticed within a second.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per listener (or per kind of refusal) in this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What an `accept` error means for the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Out of descriptors (`EMFILE`, `ENFILE`): back off.
    FdLimit,
    /// Out of kernel memory (`ENOBUFS`, `ENOMEM`): back off.
    Memory,
    /// The connection was gone before we took it (`ECONNABORTED`, `EINTR`, `EAGAIN`, ...): go on.
    Transient,
    /// Anything else: back off too, so that an unexpected persistent error never spins.
    Other,
}

impl ErrorKind {
    pub fn of(err: &io::Error) -> ErrorKind {
        match err.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => ErrorKind::FdLimit,
            Some(libc::ENOBUFS | libc::ENOMEM) => ErrorKind::Memory,
            Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EINTR | libc::EAGAIN | libc::EPROTO | libc::EPERM) => {
                ErrorKind::Transient
            }
            _ => match err.kind() {
                io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock => ErrorKind::Transient,
                _ => ErrorKind::Other,
            },
        }
    }

    /// The `reason` label of `migtun_accept_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::FdLimit => "fd-limit",
            ErrorKind::Memory => "memory",
            ErrorKind::Transient => "aborted",
            ErrorKind::Other => "other",
        }
    }

    fn backs_off(self) -> bool {
        self != ErrorKind::Transient
    }
}

/// The accept side of one listener: retries, back-off and its rate-limited log.
pub struct AcceptLoop {
    /// The `listener` label and the log's name for it: `port`, `forward`, `metrics`, `admin`.
    listener: &'static str,
    metrics: Option<Arc<Metrics>>,
    delay: Duration,
    /// Failures since the last log line, and the last error seen.
    unlogged: u64,
    last_error: Option<String>,
    last_log: Option<Instant>,
    /// Whether the loop is in a run of failures (so recovery is logged once).
    failing: bool,
}

impl AcceptLoop {
    pub fn new(listener: &'static str, metrics: Option<Arc<Metrics>>) -> AcceptLoop {
        AcceptLoop {
            listener,
            metrics,
            delay: BACKOFF_MIN,
            unlogged: 0,
            last_error: None,
            last_log: None,
            failing: false,
        }
    }

    /// Calls `accept` until it succeeds, pausing after resource errors. Cancel-safe if `accept`'s
    /// futures are (tokio's are): dropping it mid-pause loses nothing.
    pub async fn accept<T, F, Fut>(&mut self, mut accept: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        loop {
            match accept().await {
                Ok(conn) => {
                    self.succeeded();
                    return conn;
                }
                Err(e) => {
                    if let Some(pause) = self.failed(&e) {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
    }

    fn succeeded(&mut self) {
        if self.failing {
            info!(listener = self.listener, failures = self.unlogged, "accepting connections again");
            self.failing = false;
            self.unlogged = 0;
            self.last_log = None;
        }
        self.delay = BACKOFF_MIN;
    }

    /// Counts and maybe logs a failure; the pause to take before the next `accept`, if any.
    fn failed(&mut self, err: &io::Error) -> Option<Duration> {
        let kind = ErrorKind::of(err);
        if let Some(m) = &self.metrics {
            m.accept_failed(self.listener, kind.label());
        }
        if !kind.backs_off() {
            tracing::debug!(listener = self.listener, error = %err, "accept: connection gone before it was accepted");
            return None;
        }
        self.failing = true;
        self.unlogged += 1;
        self.last_error = Some(err.to_string());
        let now = Instant::now();
        if self.last_log.is_none_or(|t| now.duration_since(t) >= LOG_INTERVAL) {
            let hint = match kind {
                ErrorKind::FdLimit => "out of file descriptors (raise LimitNOFILE= or the hard `ulimit -n`)",
                ErrorKind::Memory => "out of kernel memory for sockets",
                _ => "unexpected error",
            };
            warn!(
                listener = self.listener,
                failures = self.unlogged,
                interval_secs = LOG_INTERVAL.as_secs(),
                error = self.last_error.as_deref().unwrap_or(""),
                backoff_ms = self.delay.as_millis() as u64,
                "accept failed: {hint}; new connections wait in the backlog"
            );
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        let pause = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        Some(pause)
    }
}

/// A log line that remote hosts can trigger, at most once per [`LOG_INTERVAL`]: [`Throttle::hit`]
/// says when to log and how many events the line stands for. Shared by the tasks of a listener.
#[derive(Default)]
pub struct Throttle {
    state: Mutex<ThrottleState>,
}

#[derive(Default)]
struct ThrottleState {
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle::default()
    }

    /// Records one event; `Some(n)` when a line should be logged now, standing for `n` events
    /// (this one and those not logged since the last line).
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.unlogged += 1;
        if s.last_log.is_none_or(|t| now.duration_since(t) >= LOG_INTERVAL) {
            s.last_log = Some(now);
            return Some(std::mem::take(&mut s.unlogged));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn classifies_accept_errors() {
        assert_eq!(ErrorKind::of(&os(libc::EMFILE)), ErrorKind::FdLimit);
        assert_eq!(ErrorKind::of(&os(libc::ENFILE)), ErrorKind::FdLimit);
        assert_eq!(ErrorKind::of(&os(libc::ENOBUFS)), ErrorKind::Memory);
        assert_eq!(ErrorKind::of(&os(libc::ENOMEM)), ErrorKind::Memory);
        assert_eq!(ErrorKind::of(&os(libc::ECONNABORTED)), ErrorKind::Transient);
        assert_eq!(ErrorKind::of(&os(libc::EBADF)), ErrorKind::Other);
    }

    #[test]
    fn resource_errors_back_off_growing_to_the_cap_and_log_once_per_interval() {
        let metrics = Arc::new(Metrics::new());
        let mut l = AcceptLoop::new("port", Some(metrics.clone()));
        let mut pauses = Vec::new();
        for _ in 0..20 {
            pauses.push(l.failed(&os(libc::EMFILE)).expect("EMFILE pauses"));
        }
        assert_eq!(pauses[0], BACKOFF_MIN);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
        // The first failure was logged; the other 19 wait for the next interval's line.
        assert_eq!(l.unlogged, 19);
        assert_eq!(metrics.sample("migtun_accept_failures_total", &[("listener", "port"), ("reason", "fd-limit")]), 20.0);
        assert_eq!(l.failed(&os(libc::ECONNABORTED)), None, "an aborted connection does not pause the loop");
        l.succeeded();
        assert_eq!(l.delay, BACKOFF_MIN);
        assert!(!l.failing);
    }

    #[test]
    fn throttle_logs_once_per_interval_with_the_count() {
        let t = Throttle::new();
        let t0 = Instant::now();
        assert_eq!(t.hit_at(t0), Some(1));
        for i in 1..100 {
            assert_eq!(t.hit_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.hit_at(t0 + LOG_INTERVAL), Some(100));
    }
}
