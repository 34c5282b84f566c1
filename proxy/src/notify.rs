//! systemd service notifications (`Type=notify`, sd_notify(3)) through the `sd-notify` crate.
//!
//! The agent says `READY=1` once its port, forwards, metrics listener and admin socket accept
//! connections, `STOPPING=1` when it starts draining, and `RELOADING=1` ... `READY=1` around a
//! reload (SIGHUP, `ExecReload=`). `STATUS=` carries a line for `systemctl status`.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or `Type=` other than notify) every
//! function does nothing. A failed send is logged, never fatal: the agent serves either way,
//! and systemd's start timeout reports a `READY=1` that never arrived.

use sd_notify::NotifyState;

fn send(what: &'static str, states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(notify = what, error = %e, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

/// `READY=1` with a status line: start-up (or a reload) is complete and everything listens.
pub fn ready(status: &str) {
    send("READY=1", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`: the agent drains (no new streams; open ones run on for `drain_timeout_secs`).
pub fn stopping(status: &str) {
    send("STOPPING=1", &[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `RELOADING=1` (with `MONOTONIC_USEC=`, which systemd 253+ requires with it): a reload begins.
/// Call [`ready`] when it has ended, whether it succeeded or not (the old config still serves
/// after a failed reload), else systemd keeps the unit in `reloading`.
pub fn reloading(status: &str) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("RELOADING=1", &[NotifyState::Reloading, now, NotifyState::Status(status)]),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read CLOCK_MONOTONIC for MONOTONIC_USEC");
            send("RELOADING=1", &[NotifyState::Reloading, NotifyState::Status(status)]);
        }
    }
}

/// `STATUS=`: a free-form line shown by `systemctl status`.
pub fn status(status: &str) {
    send("STATUS=", &[NotifyState::Status(status)]);
}
