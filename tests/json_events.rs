//! `migtun migrate --json` and `migtun status` with a real migration between two real agents:
//! every event is versioned, stamped and machine-readable, the rates are the bytes moved over
//! time, and both agents' status lists the migration (running with its progress, then ended).

mod vm;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vm::*;

/// `2025-06-01T12:34:56.789Z` as milliseconds since 1970 (the events' format, UTC).
fn ms(ts: &str) -> i64 {
    assert!(ts.len() == 24 && &ts[10..11] == "T" && ts.ends_with('Z'), "RFC 3339 UTC with milliseconds: {ts:?}");
    let n = |a: usize, b: usize| ts[a..b].parse::<i64>().unwrap_or_else(|_| panic!("{ts:?}"));
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)) * 1000) + n(20, 23)
}

const PHASES: [&str; 6] = ["begin", "prepare", "perform", "finish", "confirm", "done"];
const STEPS: [&str; 7] =
    ["opening-forwards", "starting-mirrors", "syncing-disks", "starting-migration", "migrating", "completing-mirrors", "switchover"];

fn find<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["migrations"].as_array().and_then(|a| a.iter().find(|m| m["id"] == id)).unwrap_or_else(|| panic!("{id} in {status}"))
}

/// For each progress event of `stage` with a rate: the rate it reports, and the rates the
/// events themselves show over the windows it may have been measured over (the bytes done
/// between an event 2.5-3.7 s earlier and this one; the agent measures over the last 3 s of its
/// 500 ms polls). Mirrors move in bursts, so only the same window gives the same figure.
fn rates(events: &[Value], stage: &str) -> Vec<(f64, Vec<f64>)> {
    let progress: Vec<(i64, u64, Option<f64>)> = events
        .iter()
        .filter(|e| e["event"] == "progress" && e["stage"] == stage)
        .map(|e| (ms(e["ts"].as_str().unwrap()), e["done_bytes"].as_u64().unwrap(), e["bytes_per_s"].as_f64()))
        .collect();
    let mut out = Vec::new();
    for (i, &(t, done, rate)) in progress.iter().enumerate() {
        let Some(rate) = rate else { continue };
        let windows: Vec<f64> = progress[..i]
            .iter()
            .filter(|(t0, ..)| (2500..=3700).contains(&(t - t0)))
            .map(|&(t0, d0, _)| (done - d0) as f64 * 1000.0 / (t - t0) as f64)
            .collect();
        if !windows.is_empty() {
            out.push((rate, windows));
        }
    }
    out
}

#[test]
fn json_events_and_both_agents_status_during_and_after_a_real_migration() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let guest = start_guest_with(&hosts, &qemu, &GuestOpts { name: "json", running: true, ram_mib: 256, raw_mib: 64 });
    let mon = Monitor::connect(&guest.monitor);
    let mut jobs = mon.subscribe();
    // RAM at 40 MB/s: several seconds of RAM progress.
    let mut m = spawn_migrate(&hosts, &guest, &["--max-bandwidth", "40000000"]);
    // The mirrors at 8 MiB/s each: several seconds of mirror progress (without a limit they
    // copy these disks in a fraction of a second).
    for job in ["mj0", "mj1"] {
        mon.wait_event(&mut jobs, "JOB_STATUS_CHANGE", |d| d["id"] == job && d["status"] == "running", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{job} never ran: {e}\n{}", hosts.logs()));
        mon.cmd("block-job-set-speed", json!({"device": job, "speed": 8u64 << 20})).unwrap();
    }
    let id = m.id_when_accepted();

    m.wait_for("a measured mirror rate", |e| e["event"] == "progress" && e["stage"] == "mirror" && e["bytes_per_s"].as_f64() > Some(0.0));
    // Source: running, in perform, with its progress.
    let src = hosts.status(0);
    assert_eq!(src["v"], 1, "{src}");
    let mine = find(&src, &id);
    assert_eq!((&mine["direction"], &mine["peer"], &mine["phase"]), (&json!("outgoing"), &json!("host-b"), &json!("perform")), "{mine}");
    assert!(mine["outcome"].is_null() && mine["started"].as_str().is_some_and(|s| ms(s) > 0), "{mine}");
    assert_eq!(mine["progress"]["stage"], "mirror", "{mine}");
    assert!(mine["progress"]["bytes_per_s"].as_f64() > Some(0.0), "{mine}");
    // Destination: the incoming migration, receiving.
    let dst = hosts.status(1);
    let theirs = find(&dst, &id);
    assert_eq!((&theirs["direction"], &theirs["peer"]), (&json!("incoming"), &json!("host-a")), "{theirs}");
    assert_eq!((&theirs["phase"], &theirs["step"], &theirs["vm"]), (&json!("perform"), &json!("receiving"), &json!("json")), "{theirs}");
    assert!(theirs["outcome"].is_null(), "{theirs}");
    assert!(theirs["progress"]["done_bytes"].as_u64() > Some(0), "the destination counts what it received: {theirs}");
    assert!(theirs["progress"]["total_bytes"].as_u64() >= Some(96 << 20), "at least the copied disks: {theirs}");
    let human = Command::new(MIGTUN).arg("status").arg("--admin").arg(hosts.path("host-b.admin")).output().unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains(&format!("{id}  json <- host-a  perform/receiving")), "{human}");

    m.wait_for("a measured RAM rate", |e| e["event"] == "progress" && e["stage"] == "ram" && e["bytes_per_s"].as_f64() > Some(0.0));
    let theirs = find(&hosts.status(1), &id).clone();
    assert!(theirs["progress"]["bytes_per_s"].as_f64() > Some(0.0), "the destination's rate: {theirs}");
    assert!(theirs["progress"]["done_bytes"].as_u64() >= Some(96 << 20), "the disks, then RAM: {theirs}");
    let (ok, stderr) = m.finish();
    assert!(ok, "{stderr}\n{:#?}\n{}", m.events, hosts.logs());
    let _dest = PidFile(hosts.path("run-host-b").join(&id).join("qemu.pid"));

    // Every line: version, time, id; times in order.
    let events = &m.events;
    let mut last = 0;
    for e in events {
        assert_eq!((&e["v"], &e["id"]), (&json!(1), &json!(id)), "{e}");
        let t = ms(e["ts"].as_str().unwrap_or_else(|| panic!("ts: {e}")));
        assert!(t >= last, "events in time order: {e}");
        last = t;
        assert!(["accepted", "phase", "progress", "log", "done"].contains(&e["event"].as_str().unwrap_or_default()), "{e}");
    }
    // Phases are ids, the perform step apart.
    for e in events.iter().filter(|e| e["event"] == "phase") {
        let phase = e["phase"].as_str().unwrap_or_default();
        assert!(PHASES.contains(&phase), "{e}");
        match phase {
            "perform" => assert!(STEPS.contains(&e["step"].as_str().unwrap_or_default()), "{e}"),
            _ => assert!(e["step"].is_null(), "{e}"),
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    let steps: Vec<&str> = events.iter().filter_map(|e| e["step"].as_str()).collect();
    assert!(steps.contains(&"syncing-disks") && steps.contains(&"migrating"), "{steps:?}");
    // Rates: what the bytes did over time, as the events themselves show it.
    for stage in ["mirror", "ram"] {
        let r = rates(events, stage);
        let moving = r.iter().filter(|(reported, _)| *reported > 0.0).count();
        assert!(moving >= 2, "{stage}: rates over several seconds: {r:?}\n{events:#?}");
        for (reported, windows) in &r {
            let close = |m: &f64| (reported - m).abs() <= 0.1 * m.max(1.0) + 1.0;
            assert!(windows.iter().any(close), "{stage}: reported {reported:.0} B/s, the bytes moved at {windows:.0?} B/s");
        }
    }
    let ram: Vec<f64> = rates(events, "ram").into_iter().map(|(r, _)| r).collect();
    let limit = 40e6;
    assert!(ram.iter().all(|r| *r > limit * 0.6 && *r < limit * 1.4), "RAM at --max-bandwidth 40 MB/s: {ram:?}");
    // `done`: structured.
    let done = events.last().unwrap();
    assert_eq!((&done["event"], &done["outcome"]), (&json!("done"), &json!("succeeded")), "{done}");
    assert!(done["error"].is_null(), "{done}");
    let took = (ms(done["ts"].as_str().unwrap()) - ms(events[0]["ts"].as_str().unwrap())) as f64 / 1000.0;
    let duration = done["duration_s"].as_f64().unwrap_or_else(|| panic!("duration_s: {done}"));
    assert!((duration - took).abs() < 1.0, "duration_s {duration} against the events' {took} s");
    assert!(done["downtime_ms"].as_u64().is_some(), "{done}");
    assert_eq!(done["disk_bytes"], (64 + 32) << 20, "both disks, whole: {done}");
    // 256 MiB of random RAM (a few pages the firmware zeroed go as zero pages).
    assert!(done["ram_bytes"].as_u64() >= Some(240 << 20), "the random RAM: {done}");

    // After: both sides list it as ended, with start, duration and outcome.
    let mine = find(&hosts.status(0), &id).clone();
    assert_eq!((&mine["phase"], &mine["outcome"]), (&json!("done"), &json!("succeeded")), "{mine}");
    assert!(mine["progress"].is_null() && (mine["duration_s"].as_f64().unwrap() - duration).abs() < 0.5, "{mine}");
    let theirs = find(&hosts.status(1), &id).clone();
    assert_eq!((&theirs["phase"], &theirs["outcome"], &theirs["direction"]), (&json!("done"), &json!("succeeded"), &json!("incoming")), "{theirs}");
    assert!(theirs["duration_s"].as_f64() > Some(1.0), "{theirs}");
    drop(mon);
}

/// The agent keeps the last 32 ended migrations (refused ones included), dropping the oldest.
#[test]
fn status_keeps_a_bounded_history() {
    let hosts = Hosts::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut ids = Vec::new();
    for i in 0..34 {
        let args = migtun_control::messages::MigrateArgs {
            qmp: hosts.path(&format!("no-such-vm-{i}.qmp")),
            to: "host-b".into(),
            ..Default::default()
        };
        let mut lines = Vec::new();
        rt.block_on(migtun_control::admin::request(&hosts.path("host-a.admin"), &migtun_control::admin::Request::Migrate { args }, |v| {
            lines.push(v);
            lines.last().is_some_and(|l| l["event"] != "done")
        }))
        .unwrap();
        let done = lines.last().unwrap();
        assert_eq!((&done["outcome"], &done["v"]), (&json!("refused"), &json!(1)), "{done}");
        assert!(done["error"].as_str().is_some_and(|e| e.contains("no-such-vm")), "{done}");
        ids.push(lines[0]["id"].as_str().unwrap().to_string());
    }
    let status = hosts.status(0);
    let listed: Vec<&str> = status["migrations"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), 32, "{status}");
    assert!(!listed.contains(&ids[0].as_str()) && !listed.contains(&ids[1].as_str()), "the two oldest are dropped");
    assert_eq!(listed, ids[2..].iter().map(String::as_str).collect::<Vec<_>>(), "oldest first");
    for m in status["migrations"].as_array().unwrap() {
        assert!(m["started"].as_str().is_some_and(|s| ms(s) > 0) && m["duration_s"].as_f64().is_some(), "{m}");
        assert_eq!(m["outcome"], "refused");
    }
}
