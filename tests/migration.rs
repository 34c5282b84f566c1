//! Live migration with storage through two real `migtun serve` agents, with real QEMU.
//!
//! The source guest gets 256 MiB of random RAM (a shared memory-backend-file on tmpfs) and two
//! random disks (raw and qcow2); after `migtun migrate` the destination's RAM file and disks
//! equal the source's byte for byte, the destination holds the guest in the run state the
//! source had, and the source QEMU has quit. Failures leave the source as it was and nothing on
//! the destination.

mod vm;

use std::process::{Command, Stdio};

use vm::*;

#[test]
fn paused_guest_with_two_disks_arrives_byte_exact() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let mut guest = start_guest(&hosts, &qemu, false);
    let (ok, events) = migrate(&hosts, &guest, &[]);
    assert!(ok, "migration succeeds; events: {events:#?}");
    let dir = dest_dir(&hosts, &events);
    let _dest = PidFile(dir.join("qemu.pid"));
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["outcome"], "succeeded");

    // The source has quit.
    let src = &mut guest.proc.0[0];
    wait_exit(|| src.try_wait().unwrap().is_none(), "the source QEMU quits after success");

    // RAM and disks equal the source's byte for byte.
    let images = dir.join("images");
    assert!(same_file(&guest.ram, &images.join("ram-src")), "destination RAM equals the source's");
    for (disk, format) in &guest.disks {
        let dest = images.join(disk.file_name().unwrap());
        run(Command::new("qemu-img").args(["compare", "-U", "-q", "-f", format, "-F", format]).arg(disk).arg(&dest));
    }
    // Paused on the source, paused on the destination.
    let status = qmp_status(&dir.join("qmp.sock"));
    assert_eq!(status["running"], false, "{status}");
}

#[test]
fn running_guest_runs_on_the_destination() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let guest = start_guest(&hosts, &qemu, true);
    let (ok, events) = migrate(&hosts, &guest, &["--disks", "vd0"]);
    assert!(ok, "migration succeeds; events: {events:#?}");
    let dir = dest_dir(&hosts, &events);
    let _dest = PidFile(dir.join("qemu.pid"));
    let status = qmp_status(&dir.join("qmp.sock"));
    assert_eq!(status["running"], true, "the guest runs on the destination: {status}");
    assert!(dir.join("images/disk0.raw").exists());
}

#[test]
fn failing_prepare_hook_leaves_the_source_as_it_was() {
    let Some(qemu) = qemu() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let hook = scratch.path().join("hook");
    std::fs::write(&hook, "#!/bin/sh\necho 'no capacity on this host' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hosts = Hosts::start_with_hook(&hook);
    let guest = start_guest(&hosts, &qemu, true);
    let (ok, events) = migrate(&hosts, &guest, &[]);
    assert!(!ok, "the migration must fail");
    let done = events.last().expect("a done event");
    assert_eq!(done["outcome"], "failed", "{done}");
    assert!(done["message"].as_str().unwrap_or_default().contains("no capacity on this host"), "the hook's reason reaches the user: {done}");
    assert_eq!(source_status(&guest)["running"], true, "the source still runs");
    destination_is_clean(&hosts);
    // The destination's operator learns it too: one line with the migration, the peer and the
    // reason, in plain text (the log is a file, not a terminal: no ANSI colours).
    let id = events.iter().find_map(|e| e["id"].as_str()).expect("accepted");
    let log = std::fs::read_to_string(hosts.path("host-b.log")).unwrap();
    let line = log.lines().find(|l| l.contains("prepare failed")).unwrap_or_else(|| panic!("no log line for the failed prepare:\n{log}"));
    assert!(line.contains(id) && line.contains("source=host-a") && line.contains("no capacity on this host"), "{line}");
    assert!(!log.contains('\x1b'), "no ANSI escape codes in a log file");
}

#[test]
fn cancel_during_ram_migration_rolls_back() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let guest = start_guest(&hosts, &qemu, true);
    let mon = Monitor::connect(&guest.monitor);
    let settings = |mon: &Monitor| {
        let caps = mon.cmd("query-migrate-capabilities", serde_json::Value::Null).unwrap();
        let params = mon.cmd("query-migrate-parameters", serde_json::Value::Null).unwrap();
        let cap = |n: &str| caps.as_array().unwrap().iter().find(|c| c["capability"] == n).map(|c| c["state"].clone());
        (cap("pause-before-switchover"), cap("events"), params["max-bandwidth"].clone())
    };
    let before = settings(&mon);
    // 10 MB/s: the RAM phase takes long enough to be cancelled in the middle.
    let child = Command::new(MIGTUN)
        .arg("migrate")
        .arg("--admin")
        .arg(hosts.path("host-a.admin"))
        .arg("--qmp")
        .arg(&guest.qmp)
        .args(["--to", "host-b", "--json", "--max-bandwidth", "10000000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Procs(vec![child]);
    let stdout = child.0[0].stdout.take().unwrap();
    let mut id = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if let Some(i) = v.get("id").and_then(|i| i.as_str()) {
            id = Some(i.to_string());
        }
        if v["event"] == "progress" && v["stage"] == "ram" {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let req = migtun_control::admin::Request::Cancel { id: id.clone().unwrap() };
            rt.block_on(migtun_control::admin::request(&hosts.path("host-a.admin"), &req, |_| false)).unwrap();
        }
        if v["event"] == "done" {
            assert_eq!(v["outcome"], "cancelled", "{v}");
            break;
        }
    }
    let status = child.0[0].wait().unwrap();
    assert!(!status.success(), "a cancelled migration exits non-zero");
    assert_eq!(source_status(&guest)["running"], true, "the source runs again");
    assert_eq!(settings(&mon), before, "the rollback restores the source's migration capabilities and parameters");
    destination_is_clean(&hosts);
}
