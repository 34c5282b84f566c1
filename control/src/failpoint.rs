//! Crash points for the fault tests. With `MIGTUN_FAILPOINT=<name>` in its environment, an
//! agent kills itself (SIGKILL, as `kill -9` would) when it reaches the point of that name: the
//! instants between a journal write and the step it guards are too short to hit from outside.
//! Without the variable (always, in production) a point costs one environment lookup.
//!
//! The points:
//! - `source-before-finish`: the source has journalled the point of no return, not sent `finish`;
//! - `destination-at-finish`: the destination has received `finish(success)`, decided nothing;
//! - `destination-after-handover-record`: the destination has journalled that it takes the
//!   guest, not yet run it;
//! - `destination-after-cont`: the guest runs on the destination, the journal does not say so yet.

/// The environment variable naming the point to crash at.
pub const VAR: &str = "MIGTUN_FAILPOINT";

/// Kills this process if `MIGTUN_FAILPOINT` names `point`.
pub fn hit(point: &str) {
    if std::env::var_os(VAR).is_some_and(|v| v == point) {
        eprintln!("failpoint {point}: killing this agent");
        // SAFETY: kill(2) on our own pid with SIGKILL; no memory is involved, and nothing runs
        // after it.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
