//! `transport = "auto"`: QUIC, unless it does not get through within [`AUTO_QUIC_TIMEOUT`]; then
//! TLS over TCP for new streams (logged once) while QUIC is probed in the background, and QUIC
//! again for new streams once a probe gets through. [`AutoPolicy`] decides, without I/O; the
//! connector does the dialling and the logging.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{ConnectError, PeerConnector};
use crate::config::Transport;

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

impl PeerConnector {
    /// After a QUIC failure: `Ok` means "use TLS for this stream" (`auto` and UDP does not get
    /// through); anything else is the stream's error.
    pub(super) fn quic_failed(self: &Arc<Self>, err: ConnectError) -> Result<(), ConnectError> {
        if self.transport != Transport::Auto || !matches!(err, ConnectError::Unreachable { .. }) {
            return Err(err);
        }
        let switch = self.policy.lock().unwrap_or_else(|p| p.into_inner()).quic_unreachable();
        if switch == Switch::ToTls {
            warn!(peer = %self.name, address = %self.address, error = %err,
                "QUIC does not get through; new streams use TLS over TCP until it does (retrying QUIC in the background)");
            self.metrics.transport_switched(&self.name, "tls");
            self.spawn_probe();
        }
        Ok(())
    }

    /// While `auto` has fallen back: tries QUIC again with a growing interval until it works.
    fn spawn_probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let delay = this.policy.lock().unwrap_or_else(|p| p.into_inner()).next_probe_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = this.shutdown.cancelled() => break,
                }
                match this.quic_connection(true).await {
                    Ok(_) => {
                        if this.policy.lock().unwrap_or_else(|p| p.into_inner()).quic_up() == Switch::ToQuic {
                            info!(peer = %this.name, address = %this.address, "QUIC gets through again; new streams use QUIC");
                            this.metrics.transport_switched(&this.name, "quic");
                        }
                        break;
                    }
                    Err(e) => debug!(peer = %this.name, error = %e, "QUIC probe failed"),
                }
            }
            this.probing.store(false, Ordering::Release);
        });
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
