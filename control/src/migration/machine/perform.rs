//! Prepare's answer and Perform: the forwards, per copied disk its NBD target and mirror, the
//! settings and side files while they synchronise, `migrate`, switchover; up to the point of no
//! return. [`Machine::on_forward`] dispatches every event of the stages before it.

use super::*;

impl Machine {
    pub(super) fn on_forward(&mut self, event: Event, news: bool, out: &mut Vec<Action>) {
        match event {
            Event::CancelRequested if self.stage == Stage::Inspecting => {
                self.end(Outcome::Cancelled, out)
            }
            Event::CancelRequested => self.start_rollback(Outcome::Cancelled, true, out),
            Event::TimedOut => self.fail(format!("timed out in {}", self.phase()), out),
            Event::PeerLost(msg) if self.stage == Stage::Inspecting => info(
                out,
                format!("destination agent connection lost ({msg}); not needed yet"),
            ),
            Event::PeerLost(msg) => self.fail(format!("lost the destination agent: {msg}"), out),
            Event::QemuLost(msg) if news => self.fail(
                format!("the source QEMU exited or was killed ({msg}): the guest runs nowhere"),
                out,
            ),
            Event::SourceResumed if !self.was_running && self.stage != Stage::Inspecting => self.fail(
                "the paused guest was resumed on the source during its migration (its disks may have changed after they were copied)"
                    .to_string(),
                out,
            ),
            Event::Failed(Step::StartPostcopy, msg) => warn(
                out,
                format!("could not switch to postcopy ({msg}); the migration goes on as precopy"),
            ),
            Event::Failed(step, msg) => self.fail(format!("{step} failed: {msg}"), out),
            Event::Inspected(vm) if self.stage == Stage::Inspecting => self.begin(vm, out),
            Event::Prepared(routes) if self.stage == Stage::Preparing => {
                self.prepared_ok(routes, out)
            }
            Event::Done(step) => self.advance(step, out),
            Event::MirrorReady(_) if news => self.check_synced(out),
            Event::MirrorCompleted(d) if news => {
                if self.issued.contains(&Step::CompleteMirror(d.clone())) {
                    self.check_mirrors_completed(out)
                } else {
                    self.fail(
                        format!("the mirror job of disk {d} ended before switchover"),
                        out,
                    )
                }
            }
            Event::MirrorCancelled(d) if news => self.fail(
                format!("the mirror job of disk {d} was cancelled outside migtun"),
                out,
            ),
            Event::MirrorFailed(d, msg) if news => {
                self.fail(format!("the mirror job of disk {d} failed: {msg}"), out)
            }
            Event::MigrationState(s) if news => self.on_status(s, out),
            Event::Progress(p) => out.push(Action::Report(Report::Progress(p))),
            _ => {}
        }
    }


    pub(super) fn prepared_ok(&mut self, routes: Routes, out: &mut Vec<Action>) {
        if !self.disks.is_empty() && routes.nbd.is_none() {
            self.fail(
                "the destination exposed no NBD route for the copied disks".to_string(),
                out,
            );
            return;
        }
        self.stage = Stage::OpeningForwards;
        self.issue(out, Action::OpenForwards(routes));
    }

    pub(super) fn advance(&mut self, step: Step, out: &mut Vec<Action>) {
        match (self.stage, &step) {
            (Stage::OpeningForwards, Step::OpenForwards) => self.next_disk(0, out),
            (Stage::AddingTarget(i), Step::AddNbdTarget(_)) => {
                if let Some(d) = self.disks.get(i).cloned() {
                    self.stage = Stage::StartingMirror(i);
                    self.issue(out, Action::StartMirror(d));
                }
            }
            (Stage::StartingMirror(i), Step::StartMirror(_)) => self.next_disk(i + 1, out),
            (Stage::Syncing, Step::SendFiles | Step::SetMigrationSettings) => {
                self.check_synced(out)
            }
            (Stage::StartingMigration, Step::StartMigration) => {
                self.stage = Stage::Migrating;
                if self.options.postcopy {
                    self.issue(out, Action::StartPostcopy);
                }
            }
            _ => {}
        }
    }

    pub(super) fn next_disk(&mut self, i: usize, out: &mut Vec<Action>) {
        if let Some(d) = self.disks.get(i).cloned() {
            self.stage = Stage::AddingTarget(i);
            self.issue(out, Action::AddNbdTarget(d));
            return;
        }
        self.stage = Stage::Syncing;
        if !self.options.files.is_empty() {
            let files = self.options.files.clone();
            self.issue(out, Action::SendFiles(files));
        }
        // The RAM migration's settings while the mirrors run, so that `migrate` follows the
        // last mirror's readiness at once.
        let settings = MigrationSettings {
            pause_before_switchover: self.switchover_pause(),
            multifd_channels: self.options.multifd_channels(),
            postcopy: self.options.postcopy,
            max_bandwidth: self.options.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH),
            downtime_ms: self.options.downtime_ms,
        };
        self.issue(out, Action::SetMigrationSettings(settings));
        self.check_synced(out);
    }

    pub(super) fn check_synced(&mut self, out: &mut Vec<Action>) {
        if self.stage != Stage::Syncing
            || self.in_flight.contains(&Step::SendFiles)
            || self.in_flight.contains(&Step::SetMigrationSettings)
            || !self
                .disks
                .iter()
                .all(|d| self.mirrors.get(d) == Some(&Mirror::Ready))
        {
            return;
        }
        if !self.switchover_pause() && !self.disks.is_empty() {
            // A paused guest writes nothing: complete the mirrors now (see `switchover_pause`).
            info(out, "all disks are synchronised; completing the mirrors of the paused guest");
            self.complete_mirrors(out);
            return;
        }
        if !self.disks.is_empty() {
            info(out, "all disks are synchronised; starting the migration");
        }
        self.stage = Stage::StartingMigration;
        self.issue(out, Action::StartMigration);
    }

    pub(super) fn complete_mirrors(&mut self, out: &mut Vec<Action>) {
        self.stage = Stage::CompletingMirrors;
        for d in self.disks.clone() {
            self.mirrors.insert(d.clone(), Mirror::Completing);
            self.issue(out, Action::CompleteMirror(d));
        }
        self.check_mirrors_completed(out);
    }

    pub(super) fn on_status(&mut self, status: MigrationStatus, out: &mut Vec<Action>) {
        match status {
            MigrationStatus::PreSwitchover
                if self.switchover_pause() && matches!(self.stage, Stage::StartingMigration | Stage::Migrating) =>
            {
                self.complete_mirrors(out)
            }
            MigrationStatus::PostcopyActive | MigrationStatus::Completed
                if self.stage == Stage::Continuing
                    || (!self.switchover_pause() && matches!(self.stage, Stage::StartingMigration | Stage::Migrating)) =>
            {
                if status == MigrationStatus::PostcopyActive && !self.options.postcopy {
                    warn(out, "QEMU switched to postcopy although it was not asked to");
                }
                self.stage = Stage::Finishing;
                info(out, "point of no return: telling the destination to take over the guest");
                self.issue(out, Action::FinishPeer { success: true, resume: self.was_running });
            }
            MigrationStatus::PostcopyActive => {
                self.fail("QEMU switched to postcopy before the switchover pause".to_string(), out)
            }
            MigrationStatus::Completed => self.fail(
                "the migration completed without the switchover pause; the disks were not synchronised".to_string(),
                out,
            ),
            MigrationStatus::Failed => self.fail("QEMU reports that the migration failed".to_string(), out),
            MigrationStatus::Cancelled => self.fail("the migration was cancelled outside migtun".to_string(), out),
            _ => {}
        }
    }

    pub(super) fn check_mirrors_completed(&mut self, out: &mut Vec<Action>) {
        if self.stage == Stage::CompletingMirrors
            && self
                .disks
                .iter()
                .all(|d| self.mirrors.get(d) == Some(&Mirror::Ended))
        {
            if self.issued.contains(&Step::StartMigration) {
                self.stage = Stage::Continuing;
                self.issue(out, Action::ContinueMigration);
            } else {
                info(out, "the disks are copied; starting the migration");
                self.stage = Stage::StartingMigration;
                self.issue(out, Action::StartMigration);
            }
        }
    }
}
