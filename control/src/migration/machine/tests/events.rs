//! Duplicate, reordered, late and junk events.

use super::*;

// ---- duplicates, reordering, junk ----

#[test]
fn duplicate_and_out_of_order_events_are_tolerated() {
    let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
    let mut cmds = Vec::new();
    let mut feed = |m: &mut Machine, e: Event| {
        let acts = m.handle(e);
        cmds.extend(acts.iter().filter(|a| a.step().is_some()).cloned());
        acts
    };
    feed(&mut m, Event::Inspected(vm(true)));
    feed(&mut m, Event::Inspected(vm(true))); // duplicate result: ignored
    feed(
        &mut m,
        Event::Prepared(Routes {
            ram: "r".into(),
            nbd: Some("n".into()),
        }),
    );
    feed(&mut m, Event::Done(Step::OpenForwards));
    feed(&mut m, Event::Done(Step::AddNbdTarget("vda".into())));
    // Ready before the command's own result, then twice more.
    feed(&mut m, Event::MirrorReady("vda".into()));
    feed(&mut m, Event::Done(Step::StartMirror("vda".into())));
    feed(&mut m, Event::MirrorReady("vda".into()));
    feed(&mut m, Event::Done(Step::StartMirror("vda".into())));
    feed(&mut m, Event::MirrorReady("vdz".into())); // not ours
    feed(&mut m, Event::MigrationState(MigrationStatus::Completed)); // no migration yet: ignored
    feed(&mut m, Event::Done(Step::AddNbdTarget("vdb".into())));
    feed(&mut m, Event::Done(Step::StartMirror("vdb".into())));
    assert_eq!(m.phase(), Phase::Perform(PerformStep::SyncingDisks));
    feed(&mut m, Event::MirrorReady("vdb".into()));
    feed(&mut m, Event::Done(Step::SetMigrationSettings));
    // QEMU's MIGRATION event arrives before the `migrate` command returns.
    feed(&mut m, Event::MigrationState(MigrationStatus::Setup));
    feed(
        &mut m,
        Event::MigrationState(MigrationStatus::PreSwitchover),
    );
    feed(&mut m, Event::Done(Step::StartMigration));
    feed(&mut m, Event::MigrationState(MigrationStatus::Active)); // late: ignored
    feed(
        &mut m,
        Event::MigrationState(MigrationStatus::PreSwitchover),
    ); // duplicate
    feed(&mut m, Event::MirrorCompleted("vdb".into()));
    feed(&mut m, Event::MirrorCompleted("vdb".into()));
    feed(&mut m, Event::Done(Step::CompleteMirror("vdb".into())));
    feed(&mut m, Event::MirrorReady("vda".into())); // late
    feed(&mut m, Event::MirrorCompleted("vda".into()));
    feed(&mut m, Event::MigrationState(MigrationStatus::Completed)); // before continue's result
    feed(&mut m, Event::Done(Step::ContinueMigration));
    feed(&mut m, Event::Done(Step::CompleteMirror("vda".into())));
    feed(&mut m, Event::MigrationState(MigrationStatus::Completed));
    feed(&mut m, Event::Finished(Ok(())));
    feed(&mut m, Event::Finished(Ok(())));
    feed(&mut m, Event::Done(Step::QuitSource));
    feed(&mut m, Event::Done(Step::CloseForwards));
    assert_eq!(m.outcome(), Some(&Outcome::Succeeded));
    for late in [
        Event::Progress(Progress::default()),
        Event::CancelRequested,
        Event::MirrorReady("vda".into()),
        Event::TimedOut,
    ] {
        feed(&mut m, late);
    }
    assert_eq!(m.outcome(), Some(&Outcome::Succeeded));
    let steps: Vec<Step> = cmds.iter().filter_map(Action::step).collect();
    let unique: BTreeSet<&Step> = steps.iter().collect();
    assert_eq!(unique.len(), steps.len(), "{cmds:?}");
    assert!(cmds.contains(&Action::ContinueMigration));
}

#[test]
fn events_after_the_rollback_started_are_ignored() {
    let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
    m.handle(Event::Inspected(vm(true)));
    m.handle(Event::Prepared(Routes {
        ram: "r".into(),
        nbd: Some("n".into()),
    }));
    m.handle(Event::Done(Step::OpenForwards));
    m.handle(Event::Done(Step::AddNbdTarget("vda".into())));
    // Cancel while the mirror start is in flight: its result is awaited, then it is cancelled.
    let acts = m.handle(Event::CancelRequested);
    assert!(acts.iter().all(|a| a.step().is_none()), "{acts:?}");
    assert!(m
        .handle(Event::CancelRequested)
        .iter()
        .all(|a| a.step().is_none()));
    let acts = m.handle(Event::Done(Step::StartMirror("vda".into())));
    assert_eq!(
        acts.iter()
            .filter(|a| a.step().is_some())
            .collect::<Vec<_>>(),
        vec![&Action::CancelMirror("vda".into())]
    );
    assert!(m
        .handle(Event::MirrorReady("vda".into()))
        .iter()
        .all(|a| a.step().is_none()));
    assert!(m
        .handle(Event::Progress(Progress::default()))
        .iter()
        .all(|a| a.step().is_none()));
    // The job's end event, then the command's result (the rollback waits for both).
    assert!(m
        .handle(Event::MirrorCancelled("vda".into()))
        .iter()
        .all(|a| a.step().is_none()));
    let acts = m.handle(Event::Done(Step::CancelMirror("vda".into())));
    let cmds: Vec<&Action> = acts.iter().filter(|a| a.step().is_some()).collect();
    assert_eq!(
        cmds,
        vec![
            &Action::RemoveNbdTarget("vda".into()),
            &Action::CloseForwards,
            // The guest before the peer: a stalled peer must not keep it paused.
            &Action::ResumeSource,
            &Action::FinishPeer {
                success: false,
                resume: false
            },
        ]
    );
    // A duplicate result and a late event change nothing.
    assert!(m
        .handle(Event::Done(Step::CancelMirror("vda".into())))
        .iter()
        .all(|a| a.step().is_none()));
    assert!(m
        .handle(Event::MirrorCancelled("vda".into()))
        .iter()
        .all(|a| a.step().is_none()));
    m.handle(Event::Failed(
        Step::RemoveNbdTarget("vda".into()),
        "QEMU is gone".into(),
    ));
    m.handle(Event::Done(Step::CloseForwards));
    m.handle(Event::Finished(Ok(())));
    assert_eq!(m.phase(), Phase::Confirm);
    m.handle(Event::Done(Step::ResumeSource));
    assert_eq!(m.outcome(), Some(&Outcome::Cancelled));
}

#[test]
fn shuffled_duplicated_and_junk_events_keep_the_invariant() {
    let mut runs = 0;
    for scn in &scenarios() {
        for seed in 1..=120u64 {
            let mut rng = Rng(seed * 7919);
            let mut plan = Plan {
                chaos: Some(seed),
                junk: seed % 3 == 0,
                ..Default::default()
            };
            if seed % 2 == 0 {
                plan.inject = vec![(rng.below(40), FAULTS[rng.below(FAULTS.len())])];
            }
            if seed % 5 == 0 {
                plan.fail_command = Some(1 + rng.below(16));
            }
            let sim = run(scn, &plan);
            if plan.junk {
                // Junk may fake any answer (e.g. a `Finished(Ok)` nobody sent): only the
                // machine's own guarantees are checked.
                assert_eq!(sim.machine.phase(), Phase::Done, "{}", sim.dump());
                let steps: Vec<Step> = sim.actions().filter_map(Action::step).collect();
                assert_eq!(
                    steps.len(),
                    steps.iter().collect::<BTreeSet<_>>().len(),
                    "{}",
                    sim.dump()
                );
                let (source, dest) = copies_running(&sim.trace, scn.vm.running);
                assert!(!(source && dest), "{}", sim.dump());
            } else {
                check(&sim, scn);
            }
            runs += 1;
        }
    }
    eprintln!("{runs} simulated runs");
    assert!(runs >= 1000);
}
