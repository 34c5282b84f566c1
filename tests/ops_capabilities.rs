//! The systemd unit's `CapabilityBoundingSet=` is enough, and each capability in it is there for
//! a reason (issue 12, item 5): two `migtun serve` agents run as root under exactly the unit's
//! bounding set with no_new_privs (`setpriv`, as systemd would start them), the destination with
//! `qemu.run_as = "nobody"`, and a real guest with its disks migrates. With any of CAP_CHOWN,
//! CAP_DAC_OVERRIDE, CAP_SETUID, CAP_SETGID taken away the same migration fails in prepare, for
//! that capability's reason, and the guest stays on the source.

mod vm;

use std::path::{Path, PathBuf};

use vm::*;

/// The capabilities of `CapabilityBoundingSet=` in contrib/systemd/migtun.service, as setpriv
/// names them (`chown`, `dac_override`, ...).
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/migtun.service")).unwrap();
    let line = unit.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("the unit sets CapabilityBoundingSet=");
    line.split_whitespace().map(|c| c.trim_start_matches("CAP_").to_lowercase()).collect()
}

fn setpriv() -> Option<PathBuf> {
    let found = ["/usr/bin/setpriv", "/bin/setpriv"].iter().map(PathBuf::from).find(|p| p.is_file());
    if found.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "setpriv (util-linux) is missing under CI");
        eprintln!("\n!!! SKIPPED: setpriv not found; the unit's capabilities were not tried !!!\n");
    }
    found
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI runs as root; this test needs it");
        eprintln!("\n!!! SKIPPED: not root: the agents cannot run as root with a bounding set !!!\n");
    }
    root
}

/// Two agents (host-b with `run_as = "nobody"`) started by setpriv with only `caps` in their
/// bounding set, no inheritable capabilities and no_new_privs.
fn start_hosts(setpriv: &Path, caps: &[String]) -> Hosts {
    let bounding = format!("-all,{}", caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(","));
    let args = ["--bounding-set", &bounding, "--inh-caps=-all", "--no-new-privs"].map(String::from).to_vec();
    Hosts::start_spec(&HostsSpec {
        prefix: "mt-caps-",
        // QEMU, as nobody, must reach its migration's directory under run-host-b.
        dir_mode: Some(0o711),
        qemu_extra: ["", "run_as = \"nobody\"\n"],
        launcher: Some((setpriv.to_path_buf(), args)),
        ..HostsSpec::default()
    })
}

/// The effective capabilities of a process (CapEff, hex).
fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// Migrates a small guest with its two disks between agents bounded to `caps`; whether it
/// succeeded, with the migrate events (for the failure's message).
fn migrate_under(qemu: &Path, setpriv: &Path, caps: &[String], name: &'static str) -> (bool, serde_json::Value, String) {
    let hosts = start_hosts(setpriv, caps);
    for agent in &hosts.agents.0 {
        // setpriv execs migtun: the agent's pid is the child's; its capabilities are the set.
        assert_eq!(cap_eff(agent.id()).count_ones() as usize, caps.len(), "the agent runs with exactly {caps:?}");
    }
    let guest = start_guest_with(&hosts, qemu, &GuestOpts { name, running: false, ram_mib: 16, raw_mib: 1 });
    let (ok, events) = migrate(&hosts, &guest, &[]);
    let done = events.iter().rev().find(|e| e["event"] == "done").cloned().unwrap_or_default();
    if ok {
        let dir = dest_dir(&hosts, &events);
        let pid: u32 = std::fs::read_to_string(dir.join("qemu.pid")).unwrap().trim().parse().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
        assert!(uid.split_whitespace().skip(1).all(|u| u == "65534"), "the destination QEMU runs as nobody: {uid}");
        kill_qemu_of_pidfile(&dir.join("qemu.pid"));
    }
    let logs = hosts.logs();
    drop(guest);
    (ok, done, logs)
}

#[test]
fn the_units_capabilities_run_a_migration_with_run_as_and_each_is_needed() {
    let (Some(qemu), Some(setpriv)) = (qemu(), setpriv()) else { return };
    if !is_root() {
        return;
    }
    let caps = unit_capabilities();
    assert_eq!(caps, ["chown", "dac_override", "kill", "setuid", "setgid"]);
    let (ok, done, logs) = migrate_under(&qemu, &setpriv, &caps, "caps");
    assert!(ok, "a migration under the unit's capabilities: {done}\n{logs}");

    // Each one taken away: the destination's prepare fails (the guest stays on the source), for
    // that capability's reason. CAP_KILL is not tried: a successful migration signals no QEMU;
    // it is for quitting a destination QEMU that runs as run_as when a migration is abandoned.
    for (missing, why) in [
        ("chown", "chown"),
        ("dac_override", "Permission denied"),
        ("setuid", "QEMU closed the QMP socket"),
        ("setgid", "QEMU closed the QMP socket"),
    ] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let (ok, done, logs) = migrate_under(&qemu, &setpriv, &fewer, "fewer");
        assert!(!ok, "without CAP_{} the migration cannot work: {done}\n{logs}", missing.to_uppercase());
        assert_eq!(done["outcome"], "failed", "{done}");
        let error = done["error"].as_str().unwrap_or_default();
        assert!(error.contains("prepare") && error.contains(why), "without CAP_{}: {error}", missing.to_uppercase());
        assert!(error.contains("paused on the source as before"), "{error}");
    }
}
