//! The migration state machine of the source agent: phases, transitions and rollback. No I/O.
//!
//! The machine decides; a driver (`driver.rs`) performs. [`Machine::new`] and [`Machine::handle`]
//! return [`Action`]s; the driver turns each into QMP commands, control RPCs to the destination
//! agent or route changes, and feeds every result back as an [`Event`]. Time-outs are events too
//! ([`Event::TimedOut`]): the machine has no clock, no tokio, no sockets, so every edge of it is
//! unit-tested below without QEMU.
//!
//! # Phases (after libvirt's migration protocol v3)
//!
//! 1. **Begin**: [`Action::Inspect`] → [`Event::Inspected`]. Preconditions: no active block jobs,
//!    no migration blockers, no VFIO devices unless `force`, every `--disks` name exists. A refusal
//!    touches nothing ([`Outcome::Refused`], no action except a report).
//! 2. **Prepare**: [`Action::Prepare`] → [`Event::Prepared`]. From then on the destination holds
//!    state, so every later failure ends with `FinishPeer { success: false }`.
//! 3. **Perform**: open the forwards; per copied disk add the NBD target then start its mirror
//!    (one command at a time); while the mirrors synchronise, send the side-channel files and
//!    set the migration parameters (always with `pause-before-switchover`); when every mirror is
//!    ready, the files are sent and the parameters set: `migrate`, and with postcopy
//!    `migrate-start-postcopy`. At `pre-switchover` each mirror is completed (`block-job-cancel`,
//!    not forced) and once all are completed `migrate-continue`.
//! 4. **Finish**: at `completed` (precopy) or `postcopy-active` (postcopy):
//!    `FinishPeer { success: true, resume }`.
//! 5. **Confirm**: on success quit the source QEMU and close the forwards; on failure roll back.
//!
//! # The invariant and the point of no return
//!
//! Exactly one copy of the guest runs after every outcome (for a paused guest: exactly one copy
//! holds it). This rests on three rules:
//!
//! * **The destination runs the guest only on an explicit `Finish(success)`.** The destination
//!   QEMU is started with `-incoming defer` and must not run by itself (the prepare hook starts it
//!   paused, `-S`); the destination agent `cont`s it only when it receives `Finish` with
//!   `success: true` and `resume: true`, and quits it when it receives `Finish(failure)` or when
//!   the migration's control connection ends before any `Finish` (`incoming.rs`).
//! * **The point of no return is sending `FinishPeer { success: true }`.** It is sent when QEMU
//!   reports `completed` (precopy; the source guest is then paused and the mirrors are
//!   completed), or `postcopy-active` (postcopy: the guest's memory is now split between the
//!   hosts, so the destination must run it). Before it is sent, every failure and every cancel
//!   rolls back: the source is resumed (`cont`, only if the guest was running; a paused guest
//!   stays paused) and the destination is told `Finish(failure)` if Prepare may have created
//!   anything there. Resuming the source is safe exactly until then, because the destination has
//!   not run a single guest instruction and the source's RAM and disks are still complete.
//! * **After it is sent**, cancel requests are refused, and:
//!   - `Finished(Ok)` (the destination runs, or holds, the guest) → `QuitSource` →
//!     [`Outcome::Succeeded`] (with postcopy, once QEMU also reports `completed`);
//!   - `Finished(Err)` (the destination could not `cont` and has quit its QEMU) → the source is
//!     resumed and rolled back → [`Outcome::Failed`] (with postcopy: [`Outcome::Unknown`]);
//!   - no answer (peer lost, RPC failure, time-out) → [`Outcome::Unknown`]: the source is
//!     neither resumed nor quit; it stays paused and intact. If the message arrived, the
//!     destination runs the guest; if not, the destination agent quits its QEMU by its own rule.
//!     Never both. The driver may later learn the answer (ask the destination agent again) and
//!     feed `Finished(..)`: the machine then settles to `Succeeded` (quits the source) or `Failed`
//!     (resumes it) — precopy only.
//! * **Postcopy**: once `postcopy-active` is reached, the destination runs the guest and pulls
//!   missing pages from the source. A failure after that cannot roll back to the source:
//!   [`Outcome::Unknown`], "postcopy failed: the guest is lost on both sides unless recovered";
//!   nothing is torn down on the source (its QEMU, forwards and NBD nodes are what a
//!   `migrate-recover` would need).
//!
//! # Rollback
//!
//! Two stages. *Stopping*: `migrate_cancel` if the migration runs, a forced `block-job-cancel`
//! for every mirror still alive, and wait for every outstanding command's result (a command in
//! flight may still create something: a late `Prepared` means the destination needs
//! `Finish(failure)`, a late mirror start needs a cancel). *Removing*: `blockdev-del` of every
//! NBD target added, close the forwards, `FinishPeer { success: false }`, `cont` the source.
//! Every action is emitted at most once ([`Step`] keys them), failures of teardown actions are
//! reported and do not stop the rest, and a [`Event::TimedOut`] while rolling back gives up
//! waiting: whatever was in flight is assumed to exist and is torn down best effort.
//!
//! # What the driver reports
//!
//! Each action that has a [`Step`] gets exactly one result: `Inspected`, `Prepared`, `Finished`
//! for the three that carry data, [`Event::Done`] or [`Event::Failed`] for the others (a transport
//! failure of `FinishPeer` is `Failed(Step::FinishPeer, ..)`). `Done(CancelMirror(d))` and
//! `Done(CancelMigration)` mean the job or the migration has *ended* (the driver waits for
//! `BLOCK_JOB_CANCELLED`/`COMPLETED` or a terminal `query-migrate` status), since NBD nodes can
//! only be deleted once no job uses them. QEMU events are passed through: `MirrorReady`,
//! `MirrorCompleted`, `MirrorCancelled`, `MirrorFailed` (`BLOCK_JOB_*` for our jobs, keyed by the
//! disk's device name), `MigrationState` (`MIGRATION`), `Progress` (`query-migrate`).
//! Unexpected, late or duplicate events are ignored or reported, never a panic and never a
//! repeated action.

//!
//! # Files
//!
//! * `types.rs`: what goes in and out of the machine (options, VM info, [`Action`], [`Event`],
//!   [`Outcome`], [`Phase`]) and the multifd defaults;
//! * `mod.rs` (here): the [`Machine`], its bookkeeping and the dispatch of each event by stage;
//! * `begin.rs`: the checks of the options and of the VM before anything is touched;
//! * `perform.rs`: Prepare's answer, the forwards, the NBD targets and mirrors, the migration up
//!   to the point of no return;
//! * `finish.rs`: the point of no return, confirming or learning the outcome late;
//! * `rollback.rs`: stopping and removing, at most once each;
//! * `tests/`: the simulated world (`tests/mod.rs`) and the tests of each phase beside it.

mod begin;
mod finish;
mod perform;
mod rollback;
mod types;
#[cfg(test)]
mod tests;

pub use types::*;

use std::collections::{BTreeMap, BTreeSet};

use begin::option_problems;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Inspecting,
    Preparing,
    OpeningForwards,
    AddingTarget(usize),
    StartingMirror(usize),
    /// The mirrors synchronise; meanwhile the migration settings are applied and the
    /// side-channel files sent.
    Syncing,
    StartingMigration,
    Migrating,
    CompletingMirrors,
    Continuing,
    /// `FinishPeer { success: true }` sent: past the point of no return.
    Finishing,
    Quitting,
    /// Rollback, first stage: stop the migration and the mirrors, wait for commands in flight.
    Stopping,
    /// Rollback, second stage: remove what was created, tell the destination, resume.
    Removing,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mirror {
    Running,
    Ready,
    Completing,
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Migration {
    NotStarted,
    Running,
    Postcopy,
    Completed,
    Ended,
}

impl Migration {
    fn live(self) -> bool {
        matches!(self, Migration::Running | Migration::Postcopy)
    }
}

#[derive(Debug)]
struct Rollback {
    outcome: Outcome,
    resume: bool,
    gave_up: bool,
}

/// The state machine of one migration, on the source agent.
#[derive(Debug)]
pub struct Machine {
    id: MigrationId,
    options: Options,
    stage: Stage,
    was_running: bool,
    /// Devices of the copied disks, in the VM's order.
    disks: Vec<String>,
    /// Commands sent whose result has not arrived.
    in_flight: BTreeSet<Step>,
    /// Every command ever sent (each at most once).
    issued: BTreeSet<Step>,
    // What exists, as far as the results tell.
    prepared: bool,
    forwards_open: bool,
    targets: BTreeSet<String>,
    mirrors: BTreeMap<String, Mirror>,
    migration: Migration,
    switchover_seen: bool,
    postcopy_seen: bool,
    last_status: Option<MigrationStatus>,
    finished_ok: bool,
    /// The source QEMU is gone (why): nothing can be resumed or removed in it any more.
    qemu_lost: Option<String>,
    /// The destination confirmed `Finish(failure)`: it has removed this migration.
    peer_cleaned: bool,
    rollback: Option<Rollback>,
    outcome: Option<Outcome>,
}

fn info(out: &mut Vec<Action>, msg: impl Into<String>) {
    out.push(Action::Report(Report::Info(msg.into())));
}

fn warn(out: &mut Vec<Action>, msg: impl Into<String>) {
    out.push(Action::Report(Report::Warning(msg.into())));
}

impl Machine {
    /// A new migration; the first actions are `[Inspect]` (or only a report when the options
    /// themselves are refused).
    pub fn new(id: MigrationId, options: Options) -> (Machine, Vec<Action>) {
        let mut m = Machine {
            id,
            options,
            stage: Stage::Inspecting,
            was_running: false,
            disks: Vec::new(),
            in_flight: BTreeSet::new(),
            issued: BTreeSet::new(),
            prepared: false,
            forwards_open: false,
            targets: BTreeSet::new(),
            mirrors: BTreeMap::new(),
            migration: Migration::NotStarted,
            switchover_seen: false,
            postcopy_seen: false,
            last_status: None,
            finished_ok: false,
            qemu_lost: None,
            peer_cleaned: false,
            rollback: None,
            outcome: None,
        };
        let mut out = Vec::new();
        let problems = option_problems(&m.options);
        if problems.is_empty() {
            m.issue(&mut out, Action::Inspect);
        } else {
            m.end(
                Outcome::Refused {
                    reason: problems.join("; "),
                },
                &mut out,
            );
        }
        (m, out)
    }

    pub fn id(&self) -> &MigrationId {
        &self.id
    }

    pub fn phase(&self) -> Phase {
        match self.stage {
            Stage::Inspecting => Phase::Begin,
            Stage::Preparing => Phase::Prepare,
            Stage::OpeningForwards => Phase::Perform(PerformStep::OpeningForwards),
            Stage::AddingTarget(_) | Stage::StartingMirror(_) => {
                Phase::Perform(PerformStep::StartingMirrors)
            }
            Stage::Syncing => Phase::Perform(PerformStep::SyncingDisks),
            Stage::StartingMigration => Phase::Perform(PerformStep::StartingMigration),
            Stage::Migrating => Phase::Perform(PerformStep::Migrating),
            Stage::CompletingMirrors => Phase::Perform(PerformStep::CompletingMirrors),
            Stage::Continuing => Phase::Perform(PerformStep::Switchover),
            Stage::Finishing => Phase::Finish,
            Stage::Quitting | Stage::Stopping | Stage::Removing => Phase::Confirm,
            Stage::Done => Phase::Done,
        }
    }

    /// Set once the machine is [`Phase::Done`].
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// The guest was running when the migration began (Begin's `query-status`).
    pub fn was_running(&self) -> bool {
        self.was_running
    }

    /// A paused guest (without postcopy) is migrated without `pause-before-switchover`: its
    /// mirrors are completed *before* `migrate` (a paused guest writes nothing). QEMU 7.2 puts
    /// a paused source into `finish-migrate` at switchover and leaves it in `postmigrate` when
    /// the migration then fails, a state it refuses to migrate again ("Can't migrate the vm
    /// that was paused due to previous migration") and that only `cont` (running guest code)
    /// or a reset leaves. Without the pause the source is in `finish-migrate` only for the
    /// final device-state transfer, not for the whole mirror completion.
    fn switchover_pause(&self) -> bool {
        self.was_running || self.options.postcopy
    }

    /// The next actions after `event`. Never panics, whatever arrives when.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        let event = normalize(event);
        if let Some(step) = result_step(&event) {
            if !self.in_flight.remove(&step) && !self.awaits_late_finish(&event) {
                warn(
                    &mut out,
                    format!("ignored a late or duplicate result of {step}"),
                );
                return out;
            }
        }
        let news = self.note(&event);
        if let Event::MigrationState(s) = &event {
            if self.issued.contains(&Step::StartMigration) && self.last_status.as_ref() != Some(s) {
                self.last_status = Some(s.clone());
                info(&mut out, format!("migration status: {s}"));
            }
        }
        match self.stage {
            Stage::Done => self.on_done(event, &mut out),
            Stage::Stopping | Stage::Removing => self.on_rollback(event, &mut out),
            Stage::Finishing | Stage::Quitting => self.on_finish(event, news, &mut out),
            _ => self.on_forward(event, news, &mut out),
        }
        out
    }

    // ---- bookkeeping ----

    /// Sends a command once; a second attempt is an internal error, reported and dropped.
    fn issue(&mut self, out: &mut Vec<Action>, action: Action) {
        match action.step() {
            Some(step) if self.issued.contains(&step) => warn(
                out,
                format!("internal: {step} was already requested; not repeated"),
            ),
            Some(step) => {
                self.issued.insert(step.clone());
                self.in_flight.insert(step);
                out.push(action);
            }
            None => out.push(action),
        }
    }

    /// Sends a teardown command unless it was sent before.
    fn issue_once(&mut self, out: &mut Vec<Action>, action: Action) {
        if action.step().is_some_and(|s| !self.issued.contains(&s)) {
            self.issue(out, action);
        }
    }

    fn awaits_late_finish(&self, event: &Event) -> bool {
        matches!(event, Event::Finished(_))
            && self.stage == Stage::Done
            && matches!(self.outcome, Some(Outcome::Unknown { .. }))
            && self.issued.contains(&Step::FinishPeer)
    }

    fn mirror_live(&self, d: &str) -> bool {
        match self.mirrors.get(d) {
            Some(m) => *m != Mirror::Ended,
            None => self.in_flight.contains(&Step::StartMirror(d.to_string())),
        }
    }

    /// Records the facts an event tells (whatever the stage); true if it is news.
    fn note(&mut self, event: &Event) -> bool {
        match event {
            Event::Prepared(_) => self.prepared = true,
            Event::Done(step) => match step {
                Step::OpenForwards => self.forwards_open = true,
                Step::AddNbdTarget(d) => {
                    self.targets.insert(d.clone());
                }
                Step::StartMirror(d) => {
                    self.mirrors.entry(d.clone()).or_insert(Mirror::Running);
                }
                Step::StartMigration if self.migration == Migration::NotStarted => {
                    self.migration = Migration::Running
                }
                Step::CancelMirror(d) => {
                    self.mirrors.insert(d.clone(), Mirror::Ended);
                }
                Step::CancelMigration if self.migration.live() => self.migration = Migration::Ended,
                Step::RemoveNbdTarget(d) => {
                    self.targets.remove(d);
                }
                Step::CloseForwards => self.forwards_open = false,
                _ => {}
            },
            Event::Failed(step, _) => match step {
                // Give up on these: the failure is reported, the rollback goes on.
                Step::CancelMirror(d) => {
                    self.mirrors.insert(d.clone(), Mirror::Ended);
                }
                Step::CancelMigration if self.migration.live() => self.migration = Migration::Ended,
                Step::RemoveNbdTarget(d) => {
                    self.targets.remove(d);
                }
                Step::CloseForwards => self.forwards_open = false,
                _ => {}
            },
            Event::MirrorReady(d) => {
                if !self.disks.contains(d) || !self.mirror_live(d) {
                    return false;
                }
                let m = self.mirrors.entry(d.clone()).or_insert(Mirror::Running);
                if *m != Mirror::Running {
                    return false;
                }
                *m = Mirror::Ready;
            }
            Event::MirrorCompleted(d) | Event::MirrorCancelled(d) | Event::MirrorFailed(d, _) => {
                if !self.disks.contains(d) || !self.mirror_live(d) {
                    return false;
                }
                self.mirrors.insert(d.clone(), Mirror::Ended);
            }
            Event::QemuLost(msg) => {
                if self.qemu_lost.is_some() {
                    return false;
                }
                self.qemu_lost = Some(msg.clone());
                // What lived in the source QEMU died with it.
                for m in self.mirrors.values_mut() {
                    *m = Mirror::Ended;
                }
                if self.migration.live() {
                    self.migration = Migration::Ended;
                }
                self.targets.clear();
                if let Some(rb) = &mut self.rollback {
                    rb.resume = false;
                }
            }
            Event::Finished(Ok(())) if self.rollback.is_some() => self.peer_cleaned = true,
            Event::MigrationState(s) => {
                if !self.issued.contains(&Step::StartMigration) {
                    return false;
                }
                let before = self.migration;
                self.migration = match (before, s) {
                    (Migration::Completed | Migration::Ended, _) => before,
                    (_, MigrationStatus::Completed) => Migration::Completed,
                    (_, MigrationStatus::Failed | MigrationStatus::Cancelled) => Migration::Ended,
                    (_, MigrationStatus::PostcopyActive) => Migration::Postcopy,
                    (Migration::NotStarted, _) => Migration::Running,
                    _ => before,
                };
                let mut news = self.migration != before;
                if self.migration == Migration::Postcopy && !self.postcopy_seen {
                    self.postcopy_seen = true;
                    news = true;
                }
                if *s == MigrationStatus::PreSwitchover
                    && self.migration.live()
                    && !self.switchover_seen
                {
                    self.switchover_seen = true;
                    news = true;
                }
                return news;
            }
            _ => {}
        }
        true
    }

    fn end(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        let outcome = self.amend(outcome);
        match &outcome {
            Outcome::Succeeded | Outcome::Cancelled => {
                info(out, format!("migration {}: {outcome}", self.id))
            }
            _ => warn(out, format!("migration {}: {outcome}", self.id)),
        }
        self.stage = Stage::Done;
        self.outcome = Some(outcome);
    }

    /// A rolled-back outcome says what became of the guest when the source QEMU died, and
    /// whether the destination confirmed it removed everything.
    fn amend(&self, outcome: Outcome) -> Outcome {
        let Some(why) = &self.qemu_lost else { return outcome };
        let (phase, first) = match outcome {
            Outcome::Failed { phase, reason } => (phase, reason),
            Outcome::Cancelled => (self.phase(), "cancelled by user".to_string()),
            other => return other,
        };
        let mut reason = if first.contains("source QEMU") {
            first
        } else {
            format!("{first}; then the source QEMU exited or was killed ({why}): the guest runs nowhere")
        };
        if self.issued.contains(&Step::FinishPeer) || self.prepared {
            reason.push_str(if self.peer_cleaned {
                "; nothing is left on the destination"
            } else {
                "; the destination did not confirm its cleanup (it quits its QEMU by itself when the control connection ends)"
            });
        }
        Outcome::Failed { phase, reason }
    }

}

/// Results without the data their step needs are failures (or, for `finish`, a plain ack).
fn normalize(event: Event) -> Event {
    match event {
        Event::Done(Step::Inspect) => Event::Failed(Step::Inspect, "no VM information".to_string()),
        Event::Done(Step::Prepare) => {
            Event::Failed(Step::Prepare, "no routes in the answer".to_string())
        }
        Event::Done(Step::FinishPeer) => Event::Finished(Ok(())),
        other => other,
    }
}

fn result_step(event: &Event) -> Option<Step> {
    match event {
        Event::Inspected(_) => Some(Step::Inspect),
        Event::Prepared(_) => Some(Step::Prepare),
        Event::Finished(_) => Some(Step::FinishPeer),
        Event::Done(s) | Event::Failed(s, _) => Some(s.clone()),
        _ => None,
    }
}
