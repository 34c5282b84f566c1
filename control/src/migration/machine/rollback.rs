//! Rollback, in two stages: *stopping* (cancel the migration and the mirrors, wait for what is
//! in flight) and *removing* (NBD targets, forwards, `Finish(failure)`, resume); every action at
//! most once.

use super::*;

impl Machine {
    pub(super) fn fail(&mut self, reason: String, out: &mut Vec<Action>) {
        let phase = self.phase();
        if self.stage == Stage::Inspecting {
            self.end(Outcome::Failed { phase, reason }, out);
        } else {
            self.start_rollback(Outcome::Failed { phase, reason }, true, out);
        }
    }

    pub(super) fn start_rollback(&mut self, outcome: Outcome, resume: bool, out: &mut Vec<Action>) {
        match &outcome {
            Outcome::Cancelled => warn(out, "cancelled by user; rolling back"),
            other => warn(out, format!("{other}; rolling back")),
        }
        self.rollback = Some(Rollback {
            outcome,
            resume: resume && self.was_running && self.qemu_lost.is_none(),
            gave_up: false,
        });
        self.stage = Stage::Stopping;
        self.progress_rollback(out);
    }

    pub(super) fn on_rollback(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::CancelRequested => info(out, "already rolling back"),
            Event::TimedOut => {
                let waiting: Vec<String> = self.in_flight.iter().map(|s| s.to_string()).collect();
                warn(
                    out,
                    format!("rollback: gave up waiting ({})", waiting.join(", ")),
                );
                if let Some(rb) = &mut self.rollback {
                    rb.gave_up = true;
                }
                if self.stage == Stage::Stopping {
                    // Whatever is still in flight may have been created: tear it down too.
                    for step in std::mem::take(&mut self.in_flight) {
                        match step {
                            Step::Prepare => self.prepared = true,
                            Step::OpenForwards => self.forwards_open = true,
                            Step::AddNbdTarget(d) => {
                                self.targets.insert(d);
                            }
                            Step::StartMirror(d) => {
                                self.mirrors.entry(d).or_insert(Mirror::Running);
                            }
                            Step::StartMigration if self.migration == Migration::NotStarted => {
                                self.migration = Migration::Running
                            }
                            _ => {}
                        }
                    }
                }
            }
            Event::QemuLost(msg) => warn(
                out,
                format!("rollback: the source QEMU is gone ({msg}); nothing to resume or remove there"),
            ),
            Event::Failed(Step::ResumeSource, _) if self.qemu_lost.is_some() => {}
            Event::Failed(Step::ResumeSource, msg) => {
                let reason = format!(
                    "the source guest could not be resumed ({msg}); it may not run anywhere"
                );
                warn(out, format!("rollback: {reason}"));
                if let Some(rb) = &mut self.rollback {
                    let first = match &rb.outcome {
                        Outcome::Failed { reason, .. } => reason.clone(),
                        _ => "cancelled by user".to_string(),
                    };
                    rb.outcome = Outcome::Failed {
                        phase: Phase::Confirm,
                        reason: format!("{first}; {reason}"),
                    };
                }
            }
            Event::Failed(step, msg) => warn(out, format!("rollback: {step} failed: {msg}")),
            Event::Finished(Err(msg)) => {
                warn(out, format!("rollback: the destination reported: {msg}"))
            }
            Event::PeerLost(msg) => {
                warn(out, format!("rollback: lost the destination agent: {msg}"))
            }
            _ => {}
        }
        self.progress_rollback(out);
    }

    pub(super) fn progress_rollback(&mut self, out: &mut Vec<Action>) {
        let Some((resume, gave_up)) = self.rollback.as_ref().map(|rb| (rb.resume, rb.gave_up))
        else {
            return;
        };
        if self.stage == Stage::Stopping {
            if self.migration.live() {
                self.issue_once(out, Action::CancelMigration);
            }
            let live: Vec<String> = self
                .mirrors
                .iter()
                .filter(|(_, m)| **m != Mirror::Ended)
                .map(|(d, _)| d.clone())
                .collect();
            for d in live {
                self.issue_once(out, Action::CancelMirror(d));
            }
            let busy = !self.in_flight.is_empty()
                || self.migration.live()
                || self.mirrors.values().any(|m| *m != Mirror::Ended);
            if busy && !gave_up {
                return;
            }
            self.stage = Stage::Removing;
            for d in self.targets.clone() {
                self.issue_once(out, Action::RemoveNbdTarget(d));
            }
            if self.forwards_open {
                self.issue_once(out, Action::CloseForwards);
            }
            // The guest first: the destination never runs it without Finish(success), so
            // resuming does not wait for a peer that may be stalled or gone.
            if resume {
                self.issue_once(out, Action::ResumeSource);
            }
            if self.prepared {
                self.issue_once(
                    out,
                    Action::FinishPeer {
                        success: false,
                        resume: false,
                    },
                );
            }
        }
        if self.stage == Stage::Removing && (gave_up || self.in_flight.is_empty()) {
            if let Some(rb) = self.rollback.take() {
                self.end(rb.outcome, out);
            }
        }
    }
}
