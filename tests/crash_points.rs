//! The instants of a migration that a kill -9 from outside cannot hit reliably, hit with the
//! agents' failpoints (`control/src/failpoint.rs`: the agent SIGKILLs itself there), and the one
//! case the operator decides: the destination gone for good after the point of no return.
//!
//! Each test: a real guest, real agents as processes, the crash, the restart; then exactly one
//! copy of the guest runs, where the journals say, and nothing is left.

mod vm;

use std::time::{Duration, Instant};

use serde_json::Value;
use vm::*;

fn opts(name: &'static str) -> GuestOpts {
    GuestOpts { name, running: true, ram_mib: 128, raw_mib: 16 }
}

/// Agent `i` restarted with a failpoint armed.
fn arm(hosts: &mut Hosts, i: usize, point: &str) {
    hosts.kill_agent(i);
    hosts.restart_agent_with(i, &[("MIGTUN_FAILPOINT", point)]);
}

/// Waits until agent `i` has killed itself at its failpoint.
fn wait_crash(hosts: &mut Hosts, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while hosts.agents.0[i].try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "agent {i} never reached its failpoint:\n{}", hosts.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the source's `migtun status` says the outcome is unknown.
fn wait_unknown(hosts: &Hosts) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = hosts.status(0);
        if s["migrations"][0]["phase"] == "unknown" && s["migrations"][0]["outcome"].is_null() {
            return;
        }
        assert!(Instant::now() < deadline, "the source never says the outcome is unknown: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(sock: &std::path::Path) -> String {
    qmp_status(sock)["status"].as_str().unwrap_or_default().to_string()
}

/// The destination crashes after it journalled that it takes the guest and before it ran it:
/// its restart completes the handover, and the source, which kept asking, quits.
#[test]
fn destination_crashing_after_its_handover_record_completes_the_handover_on_restart() {
    destination_crash_ends_on_the_destination("crashho", "destination-after-handover-record", false);
}

/// The destination crashes after `cont`, before its journal says so: the same end.
#[test]
fn destination_crashing_after_cont_keeps_the_guest() {
    destination_crash_ends_on_the_destination("crashcont", "destination-after-cont", true);
}

fn destination_crash_ends_on_the_destination(name: &'static str, point: &str, ran: bool) {
    let Some(qemu) = qemu() else { return };
    let mut hosts = Hosts::start();
    let mut guest = start_guest_with(&hosts, &qemu, &opts(name));
    arm(&mut hosts, 1, point);
    let mut m = spawn_migrate(&hosts, &guest, &[]);
    let id = m.id_when_accepted();
    let dir = hosts.path("run-host-b").join(&id);
    let _dest = PidFile(dir.join("qemu.pid"));
    wait_crash(&mut hosts, 1);
    // The source keeps the guest paused: only the destination knows.
    assert_eq!(status(&guest.monitor), "postmigrate", "the source waits, paused");
    assert_eq!(qmp_status(&dir.join("qmp.sock"))["running"], ran, "the destination QEMU at the crash");
    wait_unknown(&hosts);
    hosts.restart_agent(1);
    let (ok, _) = m.finish();
    let done = m.done();
    assert!(ok, "{done}\n{}", hosts.logs());
    assert_eq!(done["outcome"], "succeeded", "{done}");
    let src = &mut guest.proc.0[0];
    wait_exit(|| src.try_wait().unwrap().is_none(), "the source QEMU quits");
    assert_eq!(qmp_status(&dir.join("qmp.sock"))["running"], true, "the guest runs on the destination");
    assert!(!dir.join("migration.sock").exists() && !dir.join("nbd.sock").exists());
    let record: Value = serde_json::from_slice(&std::fs::read(hosts.path("state-host-b").join("incoming").join(format!("{id}.json"))).unwrap()).unwrap();
    assert_eq!(record["state"], "kept", "{record}");
    assert!(std::fs::read_dir(hosts.path("state-host-a").join("outgoing")).unwrap().next().is_none());
}

/// The source crashes just after it journalled the point of no return, before it told the
/// destination: its restart asks the destination, which abandoned the migration when the
/// control connection ended, and rolls back: the guest runs on the source again.
#[test]
fn source_crashing_at_the_point_of_no_return_asks_the_destination_and_rolls_back() {
    let Some(qemu) = qemu() else { return };
    let mut hosts = Hosts::start();
    let guest = start_guest_with(&hosts, &qemu, &opts("crashsrc"));
    let mon = Monitor::connect(&guest.monitor);
    arm(&mut hosts, 0, "source-before-finish");
    let mut m = spawn_migrate(&hosts, &guest, &[]);
    let id = m.id_when_accepted();
    let dest_pid = read_pidfile(&hosts.path("run-host-b").join(&id).join("qemu.pid"));
    wait_crash(&mut hosts, 0);
    let (ok, _) = m.finish();
    assert!(!ok, "the CLI loses its agent");
    let record = std::fs::read_to_string(hosts.path("state-host-a").join("outgoing").join(format!("{id}.json"))).unwrap();
    assert!(record.contains("finishing"), "the point of no return is journalled before it is passed: {record}");
    hosts.restart_agent(0);
    let settled = hosts.wait_settled(0, &id, 120);
    assert_eq!(settled["outcome"], "failed", "{settled}\n{}", hosts.logs());
    assert!(mon.running(), "the guest runs on the source again");
    wait_exit(|| pid_alive(dest_pid), "the destination QEMU exits");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(hosts.path("run-host-b")).map(|d| d.count() > 0).unwrap_or(false) {
        assert!(Instant::now() < deadline, "the destination's run_dir is not emptied:\n{}", hosts.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::fs::read_dir(hosts.path("state-host-a").join("outgoing")).unwrap().next().is_none(), "no record left");
    let nodes = mon.cmd("query-named-block-nodes", serde_json::json!({"flat": true})).unwrap();
    assert!(!nodes.to_string().contains("\"mt0\""), "no NBD node left: {nodes}");
}

/// The destination dies after the point of no return and does not come back: the guest stays
/// paused, `migtun status` says `unknown`, the log says what to do; `migtun resolve` decides.
/// When the destination comes back later, it finds its migration abandoned and cleans up.
#[test]
fn a_destination_gone_for_good_is_resolved_by_the_operator() {
    let Some(qemu) = qemu() else { return };
    let mut hosts = Hosts::start();
    let guest = start_guest_with(&hosts, &qemu, &opts("resolve"));
    let mon = Monitor::connect(&guest.monitor);
    arm(&mut hosts, 1, "destination-at-finish");
    let mut m = spawn_migrate(&hosts, &guest, &[]);
    let id = m.id_when_accepted();
    let dest_pid = read_pidfile(&hosts.path("run-host-b").join(&id).join("qemu.pid"));
    wait_crash(&mut hosts, 1);
    wait_unknown(&hosts);
    assert!(!mon.running(), "the guest stays paused while nobody knows");
    let said = m.wait_for("the advice", |e| e["message"].as_str().is_some_and(|s| s.contains("migtun resolve")));
    eprintln!("advice: {said}");
    let admin = hosts.path("host-a.admin");
    let resolve = |id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_migtun"))
            .args(["resolve", "--admin"])
            .arg(&admin)
            .args([id, "--guest-on", "source"])
            .output()
            .unwrap()
    };
    let wrong = resolve("m-0000000000000000");
    assert!(!wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("no migration m-0000000000000000"));
    let out = resolve(&id);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, _) = m.finish();
    let done = m.done();
    assert!(!ok);
    assert_eq!(done["outcome"], "failed", "{done}");
    assert!(done["message"].as_str().unwrap_or_default().contains("operator"), "{done}");
    assert!(mon.running(), "the operator's decision: the guest runs on the source");
    // The destination QEMU never ran the guest: orphaned and paused, or (usually) gone by
    // itself, since the agent's death cut the last bytes of the stream it was loading.
    if let Some(status) = qmp_status_unless_gone(&hosts.path("run-host-b").join(&id).join("qmp.sock"), dest_pid) {
        assert_eq!(status["running"], false);
    }
    // The destination comes back: its journal says prepared, so it quits the orphan.
    hosts.restart_agent(1);
    wait_exit(|| pid_alive(dest_pid), "the restarted destination quits its orphaned QEMU");
    assert!(std::fs::read_dir(hosts.path("run-host-b")).unwrap().next().is_none(), "{}", hosts.logs());
    // A resolve for a migration that does not wait for one is refused.
    let again = resolve(&id);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("does not wait for a decision"));
}
