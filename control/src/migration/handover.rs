//! Taking the journal over from the agent this one replaces.
//!
//! A restart on the same config starts the new agent while the old one drains (README,
//! "Restart without refusing streams"). The old agent holds the journal's lock until it exits,
//! and it writes into the lock file who it is and, once it drains, when its drain ends
//! ([`Holder`]). The new agent waits for the lock as long as that says, and no longer:
//!
//! - a holder that drains: until its drain deadline plus [`EXIT_MARGIN`];
//! - a holder that serves (or did not say): [`DRAIN_START_GRACE`] for it to start draining —
//!   after that it is a second agent on one `state_dir` by mistake, and this one is refused.
//!
//! [`judge`] is that policy, without I/O or a clock; [`take`] polls the lock with it. The new
//! agent serves meanwhile (see `service::ControlPlane`), so starting it *before* stopping the
//! old one leaves no moment in which the port refuses connections.

use std::path::Path;
use std::time::Duration;

use super::journal::{now, Holder, Journal, JournalError};

/// How long a holder that still serves has to start draining: `kill -TERM old; migtun serve`
/// starts the new agent before the old one has written its drain into the lock file (that takes
/// milliseconds, seconds on a loaded host). A holder still serving after that is not leaving.
pub const DRAIN_START_GRACE: Duration = Duration::from_secs(10);
/// How long after its drain deadline the old agent may take to exit: it closes its QUIC
/// connections (up to 1 s), aborts the streams still open and its runtime stops; a loaded host
/// takes a few seconds more. Past that, it is stuck, and waiting longer would hide it.
pub const EXIT_MARGIN: Duration = Duration::from_secs(15);
/// How often the lock is tried: cheap (one flock), and the control plane starts at most this
/// long after the old agent exited.
pub const RETRY: Duration = Duration::from_millis(200);

/// What to do about a journal whose lock is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The holder is leaving: wait (the text says for whom, for the log and `/readyz`).
    Wait(String),
    /// The holder drains: wait for it to exit.
    Draining(String),
    /// Not leaving, or stuck: give up.
    Refuse,
}

/// The policy, at unix time `now`, having waited `waited` so far.
pub fn judge(holder: Option<&Holder>, now: u64, waited: Duration) -> Verdict {
    match holder {
        Some(h @ Holder { draining_until: Some(until), .. }) => {
            if now <= until.saturating_add(EXIT_MARGIN.as_secs()) {
                Verdict::Draining(format!("waiting for the journal: the agent this one replaces ({h}) holds it until it exits"))
            } else {
                Verdict::Refuse
            }
        }
        _ if waited < DRAIN_START_GRACE => {
            let who = holder.map(|h| h.to_string()).unwrap_or_else(|| "an agent that did not say who it is".into());
            Verdict::Wait(format!(
                "waiting up to {} s for the agent holding the journal ({who}) to start draining",
                DRAIN_START_GRACE.as_secs()
            ))
        }
        _ => Verdict::Refuse,
    }
}

/// Takes the journal in `state_dir`, waiting as [`judge`] says; `on_wait` hears each new kind
/// of reason to wait (for the log and `/readyz`).
pub async fn take(state_dir: &Path, mut on_wait: impl FnMut(&str)) -> Result<Journal, JournalError> {
    let started = tokio::time::Instant::now();
    let mut last = String::new();
    loop {
        // One read of the lock file per try: the refused lock says who holds it.
        let holder = match Journal::open(state_dir) {
            Ok(journal) => return Ok(journal),
            Err(JournalError::Locked { holder, .. }) => holder,
            Err(e) => return Err(e),
        };
        let reason = match judge(holder.as_ref(), now(), started.elapsed()) {
            Verdict::Draining(reason) | Verdict::Wait(reason) => reason,
            Verdict::Refuse => {
                let dir = state_dir.display().to_string();
                return Err(match holder {
                    Some(holder) if holder.draining_until.is_some() => {
                        JournalError::HandOver { dir, holder, waited_secs: started.elapsed().as_secs() }
                    }
                    holder => JournalError::Locked { dir, holder },
                });
            }
        };
        // The reason names seconds left; tell it when the kind of wait changes, not each tick.
        let kind = reason.split(':').next().unwrap_or_default().to_string();
        if kind != last {
            on_wait(&reason);
            last = kind;
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn serving() -> Holder {
        Holder { pid: 42, draining_until: None }
    }

    #[test]
    fn a_draining_holder_is_waited_for_until_its_deadline_and_the_margin() {
        let h = Holder { pid: 42, draining_until: Some(NOW + 30) };
        let Verdict::Draining(reason) = judge(Some(&h), NOW, Duration::ZERO) else { panic!("waits") };
        assert!(reason.contains("pid 42"), "{reason}");
        // Long waits are fine while the deadline holds: it is the old agent's drain.
        assert!(matches!(judge(Some(&h), NOW + 30 + EXIT_MARGIN.as_secs(), Duration::from_secs(3600)), Verdict::Draining(_)));
        assert_eq!(judge(Some(&h), NOW + 31 + EXIT_MARGIN.as_secs(), Duration::ZERO), Verdict::Refuse);
    }

    #[test]
    fn a_serving_holder_gets_the_grace_to_start_draining_then_is_refused() {
        let Verdict::Wait(reason) = judge(Some(&serving()), NOW, Duration::ZERO) else { panic!("waits") };
        assert!(reason.contains("pid 42, serving") && reason.contains("to start draining"), "{reason}");
        assert!(matches!(judge(None, NOW, DRAIN_START_GRACE - Duration::from_millis(1)), Verdict::Wait(_)));
        assert_eq!(judge(Some(&serving()), NOW, DRAIN_START_GRACE), Verdict::Refuse);
        assert_eq!(judge(None, NOW, DRAIN_START_GRACE), Verdict::Refuse);
    }

    #[tokio::test(start_paused = true)]
    async fn take_gets_the_lock_when_the_holder_goes_and_refuses_one_that_stays() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody holds it: taken at once.
        let first = take(dir.path(), |_| {}).await.expect("a free lock");
        // A holder that serves and never drains: refused after the grace, naming it.
        let mut heard = Vec::new();
        let Err(e) = take(dir.path(), |r| heard.push(r.to_string())).await else { panic!("refused") };
        assert!(matches!(e, JournalError::Locked { .. }) && e.to_string().contains("pid"), "{e}");
        assert_eq!(heard.len(), 1, "one line per kind of wait: {heard:?}");
        // It starts draining within the grace, then exits: the waiter gets the lock.
        let waiter = tokio::spawn({
            let dir = dir.path().to_path_buf();
            async move {
                let mut heard = Vec::new();
                let taken = take(&dir, |r| heard.push(r.to_string())).await.is_ok();
                (taken, heard)
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        first.mark_draining(now() + 60).unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(first);
        let (taken, heard) = waiter.await.unwrap();
        assert!(taken, "the lock is taken once the holder is gone");
        assert!(heard.len() == 2 && heard[1].contains("holds it until it exits"), "{heard:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_stuck_past_its_drain_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let stuck = Journal::open(dir.path()).unwrap();
        // Paused time does not move the wall clock that `now()` reads: make the deadline old.
        stuck.mark_draining(now() - EXIT_MARGIN.as_secs() - 1).unwrap();
        let Err(e) = take(dir.path(), |_| {}).await else { panic!("refused") };
        assert!(matches!(e, JournalError::HandOver { .. }) && e.to_string().contains("may be stuck"), "{e}");
    }
}
