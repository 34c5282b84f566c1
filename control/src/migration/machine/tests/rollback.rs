//! Failures at every step roll back or settle, also with a second fault during the rollback.

use super::*;

// ---- failures at every step ----

/// Runs `f` for every scenario and collects how many runs were checked.
fn for_each_scenario(f: impl FnMut(&Scenario) -> usize) -> usize {
    scenarios().iter().map(f).sum()
}

#[test]
fn every_command_failing_rolls_back_or_settles() {
    let runs = for_each_scenario(|scn| {
        let n = happy(scn).commands().len();
        for k in 1..=n {
            let sim = run(
                scn,
                &Plan {
                    fail_command: Some(k),
                    ..Default::default()
                },
            );
            check(&sim, scn);
            let failed = sim
                .world
                .injected
                .iter()
                .next()
                .cloned()
                .expect("a failed command");
            let outcome = sim.machine.outcome().unwrap();
            match failed {
                Step::Inspect => assert!(matches!(
                    outcome,
                    Outcome::Failed {
                        phase: Phase::Begin,
                        ..
                    }
                )),
                Step::FinishPeer => {
                    assert!(matches!(outcome, Outcome::Unknown { .. }), "{}", sim.dump())
                }
                Step::QuitSource | Step::CloseForwards | Step::StartPostcopy => {
                    assert_eq!(outcome, &Outcome::Succeeded, "{}", sim.dump())
                }
                other => assert!(
                    matches!(outcome, Outcome::Failed { reason, .. } if reason.contains(&other.to_string())),
                    "{other}: {}",
                    sim.dump()
                ),
            }
        }
        n
    });
    eprintln!("{runs} simulated runs");
    assert!(runs > 80, "{runs}");
}

#[test]
fn every_fault_at_every_event_keeps_the_invariant() {
    let mut runs = 0;
    for scn in &scenarios() {
        let m = happy(scn).natural;
        for k in 0..=m + 1 {
            for fault in FAULTS {
                let sim = run(
                    scn,
                    &Plan {
                        inject: vec![(k, fault)],
                        ..Default::default()
                    },
                );
                check(&sim, scn);
                runs += 1;
                let (_, phase) = sim.injected_at[0];
                let outcome = sim.machine.outcome().unwrap();
                let before_ponr =
                    !matches!(phase, Phase::Finish | Phase::Confirm | Phase::Done);
                if fault == Fault::Cancel && phase != Phase::Done {
                    if before_ponr {
                        assert_eq!(outcome, &Outcome::Cancelled, "{}", sim.dump());
                    } else {
                        assert_eq!(outcome, &Outcome::Succeeded, "{}", sim.dump());
                        assert!(sim.actions().any(|a| matches!(a, Action::Report(Report::Warning(w)) if w.contains("cancel refused"))));
                    }
                }
                if matches!(fault, Fault::PeerLost | Fault::TimedOut)
                    && before_ponr
                    && phase != Phase::Begin
                {
                    assert!(
                        matches!(outcome, Outcome::Failed { .. }),
                        "{fault:?}: {}",
                        sim.dump()
                    );
                }
            }
        }
    }
    eprintln!("{runs} simulated runs");
    assert!(runs > 500, "{runs}");
}

#[test]
fn a_second_fault_or_time_out_during_rollback_still_cleans_up() {
    let mut runs = 0;
    for scn in &scenarios() {
        let m = happy(scn).natural;
        for k in 0..=m {
            for fault in [Fault::Cancel, Fault::MirrorFailed, Fault::MigrationFailed] {
                for j in 0..4 {
                    for second in [Fault::TimedOut, Fault::PeerLost, Fault::Cancel] {
                        let plan = Plan {
                            inject: vec![(k, fault), (k + j, second)],
                            ..Default::default()
                        };
                        let sim = run(scn, &plan);
                        check(&sim, scn);
                        runs += 1;
                    }
                }
            }
        }
    }
    eprintln!("{runs} simulated runs");
    assert!(runs > 1000, "{runs}");
}

#[test]
fn qemu_dying_at_any_command_ends_the_rollback_and_reports() {
    for_each_scenario(|scn| {
        let n = happy(scn).commands().len();
        for k in 2..=n {
            let sim = run(
                scn,
                &Plan {
                    qemu_dies_at: Some(k),
                    ..Default::default()
                },
            );
            check(&sim, scn);
            let outcome = sim.machine.outcome().unwrap();
            if sim.world.dest_told_success {
                assert!(!sim.has(|a| *a == Action::ResumeSource), "{}", sim.dump());
            } else {
                // The guest died with its QEMU; the destination never ran it and was told to quit.
                assert!(matches!(outcome, Outcome::Failed { .. }), "{}", sim.dump());
                assert_eq!(sim.world.dest, None);
            }
        }
        n
    });
}
