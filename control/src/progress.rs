//! Rates measured from a growing byte count over time.
//!
//! QEMU's own figures are not rates: a block job's `speed` is its limit (0 = none), and
//! `query-migrate`'s `mbps` is the rate of QEMU's last bandwidth window, which lags and is not
//! updated while the migration thread sends a final pass. Measured on QEMU 7.2 with 1 GiB of
//! random RAM, polling every 250-500 ms: over a direct UNIX socket with `max-bandwidth` 0 (QEMU
//! then sends a paused guest's whole RAM in its final pass) `mbps` said 523-849 MiB/s while
//! `transferred` grew at a steady 660-670 MiB/s; through migtun, running guest, `mbps` said
//! 167 MiB/s in the first second while the bytes moved at 216 MiB/s, and later samples differed
//! by up to 15%. What was transferred over the last seconds is what the user waits on.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far back a rate looks: long enough to smooth the 500 ms polls, short enough to follow a
/// change of speed within a few seconds.
pub const RATE_WINDOW: Duration = Duration::from_secs(3);
/// Below this span between the first and last sample the rate is not known yet.
const MIN_SPAN: Duration = Duration::from_millis(200);

/// The rate of a counter that grows (bytes copied), over a sliding window.
#[derive(Debug, Clone)]
pub struct RateMeter {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl Default for RateMeter {
    fn default() -> Self {
        RateMeter::new(RATE_WINDOW)
    }
}

impl RateMeter {
    pub fn new(window: Duration) -> RateMeter {
        RateMeter { window, samples: VecDeque::new() }
    }

    /// Adds the counter's value at `at` and returns the rate in units per second, if known. A
    /// counter that went backwards (a job ended, a new one began) starts the window afresh.
    pub fn sample(&mut self, at: Instant, value: u64) -> Option<f64> {
        if self.samples.back().is_some_and(|&(t, v)| value < v || at < t) {
            self.samples.clear();
        }
        self.samples.push_back((at, value));
        // Keep one sample at or beyond the window's start, so the span covers the window.
        while self.samples.len() > 2 && self.samples.get(1).is_some_and(|&(t, _)| at.duration_since(t) >= self.window) {
            self.samples.pop_front();
        }
        self.rate()
    }

    /// The rate over the samples kept, if they span long enough.
    pub fn rate(&self) -> Option<f64> {
        let (&(t0, v0), &(t1, v1)) = (self.samples.front()?, self.samples.back()?);
        let span = t1.duration_since(t0);
        (span >= MIN_SPAN).then(|| (v1 - v0) as f64 / span.as_secs_f64())
    }
}

/// Seconds to copy `remaining` at `rate` (none without a positive rate).
pub fn eta(remaining: u64, rate: Option<f64>) -> Option<f64> {
    rate.filter(|r| *r > 0.0).map(|r| remaining as f64 / r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_bytes_over_time_in_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = RateMeter::default();
        assert_eq!(m.sample(at(0), 0), None, "one sample: no rate yet");
        assert_eq!(m.sample(at(100), 10), None, "too short a span");
        assert_eq!(m.sample(at(500), 50), Some(100.0));
        // 100 B/s for 3 s, then 1000 B/s: after a full window only the new speed counts.
        for i in 1..=6 {
            m.sample(at(500 + i * 500), 50 + i * 50);
        }
        assert_eq!(m.rate(), Some(100.0));
        let mut v = 350;
        for i in 1..=7 {
            v += 500;
            m.sample(at(3500 + i * 500), v);
        }
        assert_eq!(m.rate(), Some(1000.0));
    }

    #[test]
    fn a_counter_that_goes_back_starts_afresh() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = RateMeter::default();
        m.sample(at(0), 1000);
        assert_eq!(m.sample(at(1000), 2000), Some(1000.0));
        assert_eq!(m.sample(at(1500), 10), None);
        assert_eq!(m.sample(at(2500), 510), Some(500.0));
    }

    #[test]
    fn eta_needs_a_positive_rate() {
        assert_eq!(eta(100, Some(50.0)), Some(2.0));
        assert_eq!(eta(100, Some(0.0)), None);
        assert_eq!(eta(100, None), None);
    }
}
