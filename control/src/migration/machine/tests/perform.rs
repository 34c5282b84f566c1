//! The happy paths (every scenario, precopy and postcopy) and issue 10's cases: a dying source
//! QEMU, a paused guest, a stalled peer.

use super::*;

// ---- the happy paths ----

#[test]
fn happy_path_running_all_disks() {
    let scn = &scenarios()[0];
    let sim = happy(scn);
    let cmds: Vec<Action> = sim
        .commands()
        .into_iter()
        .map(|a| match a {
            Action::Prepare(_) => Action::Prepare(PrepareRequest {
                id: MigrationId("m1".into()),
                running: true,
                disks: vec![],
                multifd_channels: None,
                postcopy: false,
                files: vec![],
            }),
            other => other,
        })
        .collect();
    let s = |x: &str| x.to_string();
    assert_eq!(
        cmds,
        vec![
            Action::Inspect,
            Action::Prepare(PrepareRequest {
                id: MigrationId("m1".into()),
                running: true,
                disks: vec![],
                multifd_channels: None,
                postcopy: false,
                files: vec![]
            }),
            Action::OpenForwards(Routes {
                ram: s("m1.ram"),
                nbd: Some(s("m1.nbd"))
            }),
            Action::AddNbdTarget(s("vda")),
            Action::StartMirror(s("vda")),
            Action::AddNbdTarget(s("vdb")),
            Action::StartMirror(s("vdb")),
            Action::SetMigrationSettings(MigrationSettings {
                pause_before_switchover: true,
                multifd_channels: None,
                postcopy: false,
                max_bandwidth: UNLIMITED_BANDWIDTH,
                downtime_ms: None
            }),
            Action::StartMigration,
            Action::CompleteMirror(s("vda")),
            Action::CompleteMirror(s("vdb")),
            Action::ContinueMigration,
            Action::FinishPeer {
                success: true,
                resume: true
            },
            Action::QuitSource,
            Action::CloseForwards,
        ]
    );
    let prepare = sim.actions().find_map(|a| match a {
        Action::Prepare(r) => Some(r.clone()),
        _ => None,
    });
    let prepare = prepare.expect("prepare");
    assert!(prepare.running);
    assert_eq!(prepare.disks.iter().filter(|d| d.copy).count(), 2);
    assert!(sim
        .actions()
        .any(|a| matches!(a, Action::Report(Report::Progress(_)))));
}

#[test]
fn happy_path_every_scenario() {
    for scn in &scenarios() {
        let sim = happy(scn);
        let cmds = sim.commands();
        let copied: Vec<String> = cmds
            .iter()
            .filter_map(|a| match a {
                Action::StartMirror(d) => Some(d.clone()),
                _ => None,
            })
            .collect();
        let expected: Vec<String> = match (&scn.options.disks, scn.vm.disks.is_empty()) {
            (_, true) | (DiskSelection::SharedStorage, _) => vec![],
            (DiskSelection::Only(v), _) => v.clone(),
            (DiskSelection::All, _) => vec!["vda".into(), "vdb".into()],
        };
        assert_eq!(copied, expected, "{}", scn.name);
        let finish = cmds.iter().find(|a| matches!(a, Action::FinishPeer { .. }));
        assert_eq!(
            finish,
            Some(&Action::FinishPeer {
                success: true,
                resume: scn.vm.running
            }),
            "{}",
            scn.name
        );
        let settings = cmds.iter().find_map(|a| match a {
            Action::SetMigrationSettings(s) => Some(s.clone()),
            _ => None,
        });
        let settings = settings.expect("settings");
        // A paused guest's mirrors are completed before `migrate`, without the pause.
        let paused_precopy = !scn.vm.running && !scn.options.postcopy;
        assert_eq!(settings.pause_before_switchover, !paused_precopy, "{}", scn.name);
        let start = cmds.iter().position(|a| *a == Action::StartMigration).unwrap();
        let completes: Vec<usize> = cmds
            .iter()
            .enumerate()
            .filter(|(_, a)| matches!(a, Action::CompleteMirror(_)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(completes.len(), expected.len(), "{}", scn.name);
        assert!(
            completes.iter().all(|&i| (i < start) == paused_precopy),
            "mirrors completed before migrate exactly for a paused guest: {}",
            scn.name
        );
        assert_eq!(
            cmds.contains(&Action::ContinueMigration),
            !paused_precopy,
            "{}",
            scn.name
        );
        assert_eq!(
            settings.multifd_channels, scn.options.multifd_channels(),
            "{}",
            scn.name
        );
        assert_eq!(settings.postcopy, scn.options.postcopy);
        // No limit given: QEMU's own default limit is lifted, never left in force.
        assert_eq!(settings.max_bandwidth, scn.options.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH));
        assert_eq!(settings.downtime_ms, scn.options.downtime_ms);
        let pos = |f: &dyn Fn(&Action) -> bool| cmds.iter().position(f);
        let files = pos(&|a| matches!(a, Action::SendFiles(_)));
        assert_eq!(
            files.is_some(),
            !scn.options.files.is_empty(),
            "{}",
            scn.name
        );
        if let Some(files) = files {
            assert!(
                files < pos(&|a| matches!(a, Action::SetMigrationSettings(_))).unwrap_or(0)
            );
        }
        assert_eq!(
            cmds.contains(&Action::StartPostcopy),
            scn.options.postcopy,
            "{}",
            scn.name
        );
        let nbd = cmds.iter().find_map(|a| match a {
            Action::OpenForwards(r) => Some(r.nbd.clone()),
            _ => None,
        });
        assert_eq!(nbd.flatten().is_some(), !expected.is_empty());
    }
}

#[test]
fn postcopy_hands_over_at_postcopy_active_and_quits_after_completed() {
    let scn = &scenarios()[6];
    let sim = happy(scn);
    let i_postcopy = sim
        .trace
        .iter()
        .position(|e| {
            matches!(
                e,
                Entry::Event(Event::MigrationState(MigrationStatus::PostcopyActive))
            )
        })
        .unwrap();
    let i_finish = sim
        .trace
        .iter()
        .position(|e| matches!(e, Entry::Action(Action::FinishPeer { .. })))
        .unwrap();
    let i_completed = sim
        .trace
        .iter()
        .position(|e| {
            matches!(
                e,
                Entry::Event(Event::MigrationState(MigrationStatus::Completed))
            )
        })
        .unwrap();
    let i_quit = sim
        .trace
        .iter()
        .position(|e| matches!(e, Entry::Action(Action::QuitSource)))
        .unwrap();
    assert!(
        i_postcopy < i_finish && i_finish < i_completed && i_completed < i_quit,
        "{}",
        sim.dump()
    );
}

// ---- issue 10: the source QEMU dies, a paused guest, a stalled peer ----

/// Drives a one-disk migration of a guest (running or paused) until the mirror syncs
/// (`ram: false`) or the RAM migration runs (`ram: true`); the commands issued so far.
fn drive_to(m: &mut Machine, running: bool, ram: bool) -> Vec<Action> {
    let mut cmds = Vec::new();
    let mut feed = |m: &mut Machine, e: Event| {
        cmds.extend(m.handle(e).into_iter().filter(|a| a.step().is_some()));
    };
    let vm = VmInfo { running, disks: vec![disk("vda", 1 << 30)], ..Default::default() };
    feed(m, Event::Inspected(vm));
    feed(m, Event::Prepared(Routes { ram: "r".into(), nbd: Some("n".into()) }));
    feed(m, Event::Done(Step::OpenForwards));
    feed(m, Event::Done(Step::AddNbdTarget("vda".into())));
    feed(m, Event::Done(Step::StartMirror("vda".into())));
    feed(m, Event::Done(Step::SetMigrationSettings));
    assert_eq!(m.phase(), Phase::Perform(PerformStep::SyncingDisks));
    if ram {
        feed(m, Event::MirrorReady("vda".into()));
        if !running {
            feed(m, Event::MirrorCompleted("vda".into()));
            feed(m, Event::Done(Step::CompleteMirror("vda".into())));
        }
        feed(m, Event::Done(Step::StartMigration));
        feed(m, Event::MigrationState(MigrationStatus::Active));
        assert_eq!(m.phase(), Phase::Perform(PerformStep::Migrating));
    }
    cmds
}

fn commands_of(actions: &[Action]) -> Vec<Action> {
    actions.iter().filter(|a| a.step().is_some()).cloned().collect()
}

#[test]
fn a_dead_source_qemu_ends_the_migration_at_once_with_one_message() {
    for ram in [false, true] {
        let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
        drive_to(&mut m, true, ram);
        let acts = m.handle(Event::QemuLost("QMP connection closed".into()));
        // Nothing is asked of the dead QEMU; the destination is told, the forwards closed.
        assert_eq!(
            commands_of(&acts),
            vec![Action::CloseForwards, Action::FinishPeer { success: false, resume: false }],
            "ram {ram}: {acts:?}"
        );
        // Repeated news of it change nothing (the old driver fed a status per loop pass).
        for _ in 0..3 {
            assert!(commands_of(&m.handle(Event::QemuLost("again".into()))).is_empty());
            assert!(commands_of(&m.handle(Event::MigrationState(MigrationStatus::Failed))).is_empty());
        }
        m.handle(Event::Done(Step::CloseForwards));
        let acts = m.handle(Event::Finished(Ok(())));
        assert!(commands_of(&acts).is_empty());
        match m.outcome() {
            Some(Outcome::Failed { reason, .. }) => {
                assert!(reason.contains("source QEMU") && reason.contains("runs nowhere"), "{reason}");
                assert!(reason.contains("nothing is left on the destination"), "{reason}");
                assert!(!reason.contains("may not run"), "{reason}");
            }
            other => panic!("ram {ram}: {other:?}"),
        }
    }
}

#[test]
fn a_command_failing_because_qemu_died_is_not_followed_by_a_resume() {
    let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
    drive_to(&mut m, true, true);
    // The migration fails (QEMU died): the rollback starts with QEMU commands...
    let acts = m.handle(Event::MigrationState(MigrationStatus::Failed));
    assert!(commands_of(&acts).contains(&Action::CancelMirror("vda".into())));
    // ...which fail; then the driver learns the QMP connection is closed.
    m.handle(Event::QemuLost("QMP connection closed".into()));
    let acts = m.handle(Event::Failed(Step::CancelMirror("vda".into()), "QMP connection lost".into()));
    let cmds = commands_of(&acts);
    assert!(!cmds.contains(&Action::ResumeSource), "{cmds:?}");
    assert!(!cmds.iter().any(|a| matches!(a, Action::RemoveNbdTarget(_))), "{cmds:?}");
    m.handle(Event::Done(Step::CloseForwards));
    m.handle(Event::Finished(Ok(())));
    match m.outcome() {
        Some(Outcome::Failed { reason, .. }) => {
            assert!(reason.contains("runs nowhere") && !reason.contains("may not run"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_paused_guest_completes_its_mirrors_before_migrate_and_never_pauses_at_switchover() {
    let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
    let cmds = drive_to(&mut m, false, false);
    assert!(cmds
        .iter()
        .any(|a| matches!(a, Action::SetMigrationSettings(s) if !s.pause_before_switchover)));
    let acts = m.handle(Event::MirrorReady("vda".into()));
    assert_eq!(commands_of(&acts), vec![Action::CompleteMirror("vda".into())]);
    m.handle(Event::Done(Step::CompleteMirror("vda".into())));
    let acts = m.handle(Event::MirrorCompleted("vda".into()));
    assert_eq!(commands_of(&acts), vec![Action::StartMigration]);
    m.handle(Event::Done(Step::StartMigration));
    // Cancelled during RAM: the guest stays paused, nothing resumes it.
    let acts = m.handle(Event::CancelRequested);
    assert_eq!(commands_of(&acts), vec![Action::CancelMigration]);
    let acts = m.handle(Event::Done(Step::CancelMigration));
    let cmds = commands_of(&acts);
    assert!(!cmds.contains(&Action::ResumeSource), "{cmds:?}");
    assert!(cmds.contains(&Action::RemoveNbdTarget("vda".into())), "{cmds:?}");

    // Completed without a pre-switchover is the handover for a paused guest.
    let (mut m, _) = Machine::new(MigrationId("m2".into()), Options::default());
    drive_to(&mut m, false, true);
    m.handle(Event::MigrationState(MigrationStatus::Device));
    let acts = m.handle(Event::MigrationState(MigrationStatus::Completed));
    assert_eq!(commands_of(&acts), vec![Action::FinishPeer { success: true, resume: false }]);
}

#[test]
fn a_paused_guest_resumed_by_someone_during_its_migration_rolls_back() {
    let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
    drive_to(&mut m, false, true);
    let acts = m.handle(Event::SourceResumed);
    assert!(commands_of(&acts).contains(&Action::CancelMigration), "{acts:?}");
    assert!(matches!(m.phase(), Phase::Confirm));
    // A running guest's own RESUME (QEMU restarting it after a cancel) is no news.
    let (mut m, _) = Machine::new(MigrationId("m2".into()), Options::default());
    drive_to(&mut m, true, true);
    assert!(commands_of(&m.handle(Event::SourceResumed)).is_empty());
    assert_eq!(m.phase(), Phase::Perform(PerformStep::Migrating));
}

#[test]
fn a_lost_peer_at_pre_switchover_resumes_the_guest_before_telling_the_peer() {
    let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
    drive_to(&mut m, true, true);
    let acts = m.handle(Event::MigrationState(MigrationStatus::PreSwitchover));
    assert_eq!(commands_of(&acts), vec![Action::CompleteMirror("vda".into())]);
    m.handle(Event::Done(Step::CompleteMirror("vda".into())));
    let acts = m.handle(Event::PeerLost("no answer to keepalive pings".into()));
    assert_eq!(commands_of(&acts), vec![Action::CancelMigration, Action::CancelMirror("vda".into())]);
    m.handle(Event::Done(Step::CancelMigration));
    let acts = m.handle(Event::Done(Step::CancelMirror("vda".into())));
    let cmds = commands_of(&acts);
    let resume = cmds.iter().position(|a| *a == Action::ResumeSource).expect("resumed");
    let finish = cmds.iter().position(|a| matches!(a, Action::FinishPeer { success: false, .. })).expect("told");
    assert!(resume < finish, "{cmds:?}");
    // The peer never answers: the driver's bound fails the call; the rollback still ends.
    m.handle(Event::Done(Step::RemoveNbdTarget("vda".into())));
    m.handle(Event::Done(Step::CloseForwards));
    m.handle(Event::Done(Step::ResumeSource));
    m.handle(Event::Failed(Step::FinishPeer, "no answer within 5 s".into()));
    assert!(matches!(m.outcome(), Some(Outcome::Failed { .. })), "{:?}", m.outcome());
}
