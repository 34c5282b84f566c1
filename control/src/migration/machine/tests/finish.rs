//! After the point of no return: lost peers, lost answers, refusals to resume, postcopy.

use super::*;

// ---- after the point of no return ----

#[test]
fn peer_lost_after_finish_success_is_unknown_and_keeps_the_source_paused() {
    for scn in &scenarios() {
        let sim = run(
            scn,
            &Plan {
                finish_reply_lost: true,
                ..Default::default()
            },
        );
        check(&sim, scn);
        assert!(
            matches!(sim.machine.outcome(), Some(Outcome::Unknown { .. })),
            "{}",
            sim.dump()
        );
        // The message arrived: the destination has the guest, the source is paused: one copy.
        assert_eq!(sim.world.source, Guest::Paused);
        assert_eq!(
            sim.world.dest,
            Some(if scn.vm.running {
                Guest::Running
            } else {
                Guest::Paused
            })
        );
        assert!(!sim.has(|a| matches!(a, Action::ResumeSource | Action::QuitSource)));
        let postcopy = scn.options.postcopy;
        assert_eq!(
            sim.has(|a| *a == Action::CloseForwards),
            !postcopy && sim.has(|a| matches!(a, Action::OpenForwards(_)))
        );

        // Learning the answer later settles it (precopy only).
        let mut machine = sim.machine;
        let actions = machine.handle(Event::Finished(Ok(())));
        assert_eq!(machine.outcome(), Some(&Outcome::Succeeded));
        let mut expected = vec![&Action::QuitSource];
        if postcopy {
            expected.push(&Action::CloseForwards); // kept open for a recovery until now
        }
        assert_eq!(
            actions
                .iter()
                .filter(|a| a.step().is_some())
                .collect::<Vec<_>>(),
            expected
        );
        assert!(machine
            .handle(Event::Finished(Ok(())))
            .iter()
            .all(|a| a.step().is_none()));
    }
}

#[test]
fn finish_lost_before_delivery_is_unknown_and_the_destination_quits_by_its_rule() {
    let scn = &scenarios()[0];
    let n = happy(scn)
        .commands()
        .iter()
        .position(|a| matches!(a, Action::FinishPeer { .. }))
        .unwrap()
        + 1;
    let sim = run(
        scn,
        &Plan {
            fail_command: Some(n),
            ..Default::default()
        },
    );
    check(&sim, scn);
    assert!(matches!(
        sim.machine.outcome(),
        Some(Outcome::Unknown { .. })
    ));
    assert_eq!((sim.world.source, sim.world.dest), (Guest::Paused, None));
    // The operator (or the driver) learns the destination quit: resume the source.
    let mut machine = sim.machine;
    let actions = machine.handle(Event::Finished(Err("no such migration".into())));
    assert!(actions.contains(&Action::ResumeSource));
    assert!(matches!(
        machine.outcome(),
        Some(Outcome::Failed {
            phase: Phase::Finish,
            ..
        })
    ));
}

#[test]
fn destination_failing_to_resume_rolls_back_to_the_source() {
    for scn in &scenarios() {
        let sim = run(
            scn,
            &Plan {
                dest_cont_fails: true,
                ..Default::default()
            },
        );
        check(&sim, scn);
        let outcome = sim.machine.outcome().unwrap();
        if scn.options.postcopy {
            assert!(
                matches!(outcome, Outcome::Unknown { reason } if reason.contains("postcopy failed")),
                "{}",
                sim.dump()
            );
        } else {
            assert!(
                matches!(
                    outcome,
                    Outcome::Failed {
                        phase: Phase::Finish,
                        ..
                    }
                ),
                "{}",
                sim.dump()
            );
            assert!(!sim.has(|a| matches!(a, Action::FinishPeer { success: false, .. })));
            assert_eq!(sim.has(|a| *a == Action::ResumeSource), scn.vm.running);
        }
    }
}

#[test]
fn postcopy_failure_after_postcopy_active_is_unknown() {
    let scn = &scenarios()[6];
    let sim = happy(scn);
    let k = sim
        .events()
        .position(|e| *e == Event::MigrationState(MigrationStatus::PostcopyActive))
        .unwrap()
        + 1;
    let sim = run(
        scn,
        &Plan {
            inject: vec![(k, Fault::MigrationFailed)],
            ..Default::default()
        },
    );
    check(&sim, scn);
    match sim.machine.outcome() {
        Some(Outcome::Unknown { reason }) => {
            assert!(reason.contains("lost on both sides"), "{reason}")
        }
        other => panic!("{other:?}\n{}", sim.dump()),
    }
    // Nothing a recovery would need is torn down.
    assert!(!sim.has(|a| matches!(
        a,
        Action::CloseForwards | Action::RemoveNbdTarget(_) | Action::CancelMigration
    )));
}

#[test]
fn cancel_after_the_point_of_no_return_is_refused() {
    let scn = &scenarios()[0];
    let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
    let script = happy(scn);
    // Replay the happy path up to FinishPeer(success), then cancel twice.
    for e in script.events().cloned() {
        let acts = m.handle(e);
        if acts.iter().any(|a| matches!(a, Action::FinishPeer { .. })) {
            break;
        }
    }
    assert_eq!(m.phase(), Phase::Finish);
    for _ in 0..2 {
        let acts = m.handle(Event::CancelRequested);
        assert!(acts.iter().all(|a| a.step().is_none()), "{acts:?}");
        assert!(
            matches!(&acts[..], [Action::Report(Report::Warning(w))] if w.contains("cancel refused"))
        );
    }
    assert_eq!(
        m.handle(Event::Finished(Ok(())))
            .iter()
            .filter(|a| a.step().is_some())
            .count(),
        2
    );
    assert_eq!(m.phase(), Phase::Confirm);
}
