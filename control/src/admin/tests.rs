use super::*;
use crate::messages::{Report, Totals, EVENTS_VERSION};

fn end(t: &Tracked, outcome: OutcomeKind) {
    t.report(Report::done(outcome, format!("{outcome:?}"), Totals { downtime_ms: Some(7), disk_bytes: 1, ram_bytes: 2 }));
}

#[test]
fn status_keeps_the_running_and_the_last_ended_migrations() {
    let r = Registry::default();
    let running = r.track("m-running", "vm", "host-b");
    running.report(Report::Phase { phase: "perform".into(), step: Some("migrating".into()), message: "copying RAM".into() });
    running.report(Report::Progress {
        stage: "ram".into(),
        done_bytes: 10,
        total_bytes: 40,
        bytes_per_s: Some(5.0),
        eta_s: Some(6.0),
        dirty_bytes_per_s: None,
        expected_downtime_ms: None,
    });
    for i in 0..HISTORY + 8 {
        let t = r.track(&format!("m-{i:03}"), "vm", "host-b");
        end(&t, if i % 2 == 0 { OutcomeKind::Refused } else { OutcomeKind::Succeeded });
    }
    let all = r.summaries();
    assert_eq!(all.len(), HISTORY + 1, "the running one and the last {HISTORY} ended");
    assert!(all.iter().all(|m| m.id != "m-000" && m.id != "m-007"), "the oldest ended ones are dropped");
    assert!(all.iter().any(|m| m.id == format!("m-{:03}", HISTORY + 7)));
    let m = all.iter().find(|m| m.id == "m-running").expect("a running migration is never dropped");
    assert_eq!((m.phase.as_str(), m.step.as_deref(), m.outcome), ("perform", Some("migrating"), None));
    assert_eq!(m.direction, Direction::Outgoing);
    assert_eq!(m.peer, "host-b");
    let p = m.progress.as_ref().expect("the last progress");
    assert_eq!((p.stage.as_str(), p.done_bytes, p.total_bytes, p.bytes_per_s, p.eta_s), ("ram", 10, 40, Some(5.0), Some(6.0)));
    assert!(m.started.ends_with('Z') && m.started.len() == 24, "{}", m.started);
    let ended = all.iter().find(|m| m.outcome == Some(OutcomeKind::Succeeded)).unwrap();
    assert_eq!(ended.phase, "done");
    assert!(ended.progress.is_none());
    assert_eq!(ended.message.as_deref(), Some("Succeeded"));
}

#[test]
fn events_are_stamped_and_done_is_final() {
    let r = Registry::default();
    let t = r.track("m-1", "vm", "host-b");
    t.report(Report::Log { message: "hello".into() });
    end(&t, OutcomeKind::Failed);
    t.report(Report::Log { message: "after the end".into() });
    end(&t, OutcomeKind::Succeeded);
    let (history, _) = t.subscribe();
    assert_eq!(history.len(), 2, "nothing after done: {history:?}");
    for e in &history {
        assert_eq!((e.v, e.id.as_str()), (EVENTS_VERSION, "m-1"));
        assert!(e.ts.ends_with('Z'));
    }
    match &history[1].report {
        Report::Done { outcome, error, duration_s, downtime_ms, disk_bytes, ram_bytes, .. } => {
            assert_eq!(*outcome, OutcomeKind::Failed);
            assert_eq!(error.as_deref(), Some("Failed"));
            assert!(*duration_s >= 0.0);
            assert_eq!((*downtime_ms, *disk_bytes, *ram_bytes), (Some(7), 1, 2));
        }
        other => panic!("{other:?}"),
    }
    let v = serde_json::to_value(&history[1]).unwrap();
    for key in ["v", "ts", "id", "event", "outcome", "message", "error", "duration_s", "downtime_ms", "disk_bytes", "ram_bytes"] {
        assert!(v.get(key).is_some(), "done has {key}: {v}");
    }
}
