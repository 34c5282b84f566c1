//! Serde of the vocabulary and the multifd defaults.

use super::*;

#[test]
fn serde_round_trip_of_statuses_and_outcomes() {
    for s in [
        "setup",
        "pre-switchover",
        "postcopy-active",
        "completed",
        "wait-unplug",
    ] {
        let st = MigrationStatus::parse(s);
        assert_eq!(serde_json::to_value(&st).unwrap(), serde_json::json!(s));
        assert_eq!(
            serde_json::from_value::<MigrationStatus>(serde_json::json!(s)).unwrap(),
            st
        );
    }
    let o = Outcome::Failed {
        phase: Phase::Perform(PerformStep::Migrating),
        reason: "x".into(),
    };
    let v = serde_json::to_value(&o).unwrap();
    assert_eq!(serde_json::from_value::<Outcome>(v).unwrap(), o);
    assert_eq!(
        Phase::Perform(PerformStep::SyncingDisks).to_string(),
        "perform (syncing-disks)"
    );
}

#[test]
fn multifd_is_the_default_with_more_than_one_cpu_and_a_qemu_whose_cleanup_holds() {
    assert_eq!(default_parallel(1, false, Some(9)), None, "one CPU: one stream");
    for cpus in [2, 8, 64] {
        assert_eq!(default_parallel(cpus, false, Some(8)), Some(MULTIFD_DEFAULT_CHANNELS), "{cpus} CPUs");
    }
    assert_eq!(default_parallel(8, false, Some(7)), None, "QEMU 7.2: one stream (its multifd cleanup can hang)");
    assert_eq!(default_parallel(8, false, None), None, "an unknown QEMU: one stream");
    assert_eq!(default_parallel(64, true, Some(9)), None, "no multifd with postcopy");
}

#[test]
fn parallel_one_is_one_stream_and_combines_with_postcopy() {
    let one = Options { parallel: Some(1), postcopy: true, ..Default::default() };
    assert_eq!(one.multifd_channels(), None);
    assert!(option_problems(&one).is_empty(), "{:?}", option_problems(&one));
    let four = Options { parallel: Some(4), ..Default::default() };
    assert_eq!(four.multifd_channels(), Some(4));
}
