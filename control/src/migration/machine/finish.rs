//! Finish and Confirm: `FinishPeer { success: true }` is the point of no return; after it the
//! source is quit, resumed after a refusal, or left paused when the answer is unknown (and settled
//! if the answer arrives late).

use super::*;

impl Machine {
    pub(super) fn on_finish(&mut self, event: Event, news: bool, out: &mut Vec<Action>) {
        let finishing = self.stage == Stage::Finishing;
        match event {
            Event::CancelRequested => warn(
                out,
                "cancel refused: the destination has been told to take over the guest (point of no return passed)",
            ),
            Event::Finished(Ok(())) if finishing => {
                self.finished_ok = true;
                self.maybe_quit(out);
            }
            Event::Finished(Err(msg)) if finishing => {
                if self.postcopy_seen {
                    self.unknown(
                        format!(
                            "postcopy failed: the destination could not resume the guest ({msg}); \
                             the guest is lost on both sides unless recovered"
                        ),
                        out,
                    )
                } else {
                    let reason = format!("the destination could not resume the guest: {msg}");
                    self.start_rollback(Outcome::Failed { phase: Phase::Finish, reason }, true, out)
                }
            }
            Event::Failed(Step::FinishPeer, msg) => {
                self.unknown(format!("no answer from the destination to Finish(success): {msg}"), out)
            }
            Event::PeerLost(msg) if finishing && !self.finished_ok => {
                self.unknown(format!("lost the destination agent after Finish(success): {msg}"), out)
            }
            Event::TimedOut if finishing && !self.finished_ok => {
                self.unknown("no answer from the destination to Finish(success) in time".to_string(), out)
            }
            Event::TimedOut if finishing => self.unknown(
                "postcopy: the migration did not complete in time; the guest is lost on both sides unless recovered"
                    .to_string(),
                out,
            ),
            Event::MigrationState(_) if news && finishing => match self.migration {
                Migration::Completed => self.maybe_quit(out),
                Migration::Ended if self.postcopy_seen => self.unknown(
                    "postcopy failed: the guest is lost on both sides unless recovered".to_string(),
                    out,
                ),
                _ => {}
            },
            Event::Failed(Step::QuitSource, msg) => {
                warn(out, format!("could not quit the source QEMU ({msg}); it stays paused: do not resume it"))
            }
            Event::Failed(step, msg) => warn(out, format!("{step} failed: {msg}")),
            Event::TimedOut => {
                warn(out, "gave up waiting for the source to quit");
                self.end(Outcome::Succeeded, out);
                return;
            }
            Event::Progress(p) => out.push(Action::Report(Report::Progress(p))),
            _ => {}
        }
        if self.stage == Stage::Quitting && self.in_flight.is_empty() {
            self.end(Outcome::Succeeded, out);
        }
    }

    pub(super) fn maybe_quit(&mut self, out: &mut Vec<Action>) {
        if self.stage == Stage::Finishing
            && self.finished_ok
            && self.migration == Migration::Completed
        {
            self.stage = Stage::Quitting;
            self.issue(out, Action::QuitSource);
            if self.forwards_open {
                self.issue(out, Action::CloseForwards);
            }
        }
    }

    /// Past the point of no return without an answer: neither resume nor quit the source.
    pub(super) fn unknown(&mut self, reason: String, out: &mut Vec<Action>) {
        if !self.postcopy_seen {
            // Precopy: the migration is over; its leftovers on the source are no use any more.
            for d in self.targets.clone() {
                self.issue_once(out, Action::RemoveNbdTarget(d));
            }
            if self.forwards_open {
                self.issue_once(out, Action::CloseForwards);
            }
        }
        warn(out, "the source guest stays paused and must not be resumed until the destination's state is known");
        self.end(Outcome::Unknown { reason }, out);
    }

    pub(super) fn on_done(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Finished(result) if matches!(self.outcome, Some(Outcome::Unknown { .. })) => match result {
                _ if self.postcopy_seen && self.migration != Migration::Completed => {
                    warn(out, format!("late answer from the destination ({result:?}); the postcopy migration did not complete, the outcome stays unknown"))
                }
                Err(msg) if self.postcopy_seen => warn(
                    out,
                    format!("late answer from the destination: it could not resume the guest ({msg}); after postcopy the outcome stays unknown"),
                ),
                Ok(()) => {
                    info(out, "the destination confirms it has the guest; quitting the source");
                    self.issue_once(out, Action::QuitSource);
                    if self.forwards_open {
                        self.issue_once(out, Action::CloseForwards);
                    }
                    self.outcome = Some(Outcome::Succeeded);
                }
                Err(msg) => {
                    if self.was_running {
                        self.issue_once(out, Action::ResumeSource);
                    }
                    let reason = format!("the destination could not resume the guest: {msg}");
                    warn(out, format!("migration {}: failed: {reason}", self.id));
                    self.outcome = Some(Outcome::Failed { phase: Phase::Finish, reason });
                }
            },
            Event::Failed(step, msg) => warn(out, format!("{step} failed after the end: {msg}")),
            Event::CancelRequested => info(out, "the migration has already ended"),
            _ => {}
        }
    }
}
