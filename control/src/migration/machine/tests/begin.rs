//! Refusals at Begin touch nothing.

use super::*;

// ---- refusals at Begin ----

#[test]
fn refusals_at_begin_touch_nothing() {
    let base = Scenario {
        name: "refusal",
        vm: vm(true),
        options: Options::default(),
    };
    let cases: Vec<(Scenario, &str)> = vec![
        (
            Scenario {
                vm: VmInfo {
                    has_active_block_jobs: true,
                    ..vm(true)
                },
                ..base.clone()
            },
            "block jobs",
        ),
        (
            Scenario {
                vm: VmInfo {
                    blockers: vec!["device xyz is not migratable".into()],
                    ..vm(true)
                },
                ..base.clone()
            },
            "blockers",
        ),
        (
            Scenario {
                vm: VmInfo {
                    vfio_devices: vec!["hostdev0".into()],
                    ..vm(false)
                },
                ..base.clone()
            },
            "VFIO",
        ),
        (
            Scenario {
                options: Options {
                    disks: DiskSelection::Only(vec!["vda".into(), "sdz".into()]),
                    ..Default::default()
                },
                ..base.clone()
            },
            "\"sdz\"",
        ),
        (
            Scenario {
                options: Options {
                    disks: DiskSelection::Only(vec![]),
                    ..Default::default()
                },
                ..base.clone()
            },
            "--disks",
        ),
        (
            Scenario {
                options: Options {
                    parallel: Some(0),
                    ..Default::default()
                },
                ..base.clone()
            },
            "--parallel",
        ),
        (
            Scenario {
                options: Options {
                    parallel: Some(2),
                    postcopy: true,
                    ..Default::default()
                },
                ..base.clone()
            },
            "multifd",
        ),
    ];
    for (scn, needle) in cases {
        let sim = run(&scn, &Plan::default());
        check(&sim, &scn);
        match sim.machine.outcome() {
            Some(Outcome::Refused { reason }) => {
                assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
            }
            other => panic!(
                "{needle}: expected a refusal, got {other:?}\n{}",
                sim.dump()
            ),
        }
        let cmds = sim.commands();
        assert!(
            cmds.is_empty() || cmds == vec![Action::Inspect],
            "{needle}: {cmds:?}"
        );
        assert!(sim
            .actions()
            .any(|a| matches!(a, Action::Report(Report::Warning(w)) if w.contains(needle))));
    }
}

#[test]
fn vfio_with_force_and_disks_by_node_name_are_accepted() {
    let scn = Scenario {
        name: "force",
        vm: VmInfo {
            vfio_devices: vec!["hostdev0".into()],
            ..vm(true)
        },
        options: Options {
            force: true,
            disks: DiskSelection::Only(vec!["node-vdb".into(), "vdb".into()]),
            ..Default::default()
        },
    };
    let sim = happy(&scn);
    let mirrors: Vec<Action> = sim
        .commands()
        .into_iter()
        .filter(|a| matches!(a, Action::StartMirror(_)))
        .collect();
    assert_eq!(mirrors, vec![Action::StartMirror("vdb".into())]);
}
