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
    let images = dest_images(&hosts, &events);
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
    assert!(dest_images(&hosts, &events).join("disk0.raw").exists());
}

/// A migrated guest's disks live in the destination's `qemu.image_dir` for as long as it runs
/// there; its run directory (QMP socket, pidfile, log) goes when its QEMU exits, whether the
/// agent that received it still runs or was restarted meanwhile; the images stay: they are the
/// guest's disks, the operator's to keep or delete. Nothing accumulates under `run_dir`.
#[test]
fn a_migrated_guests_run_dir_goes_with_its_qemu_and_its_images_stay() {
    let Some(qemu) = qemu() else { return };
    let mut hosts = Hosts::start();
    let quit_and_wait = |dir: &std::path::Path, hosts: &Hosts, what: &str| {
        let pid = read_pidfile(&dir.join("qemu.pid"));
        let _ = Monitor::connect(&dir.join("qmp.sock")).cmd("quit", serde_json::json!({}));
        wait_exit(|| pid_alive(pid), "the destination QEMU quits");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while dir.exists() {
            assert!(std::time::Instant::now() < deadline, "{what}: {} is left after its QEMU exited\n{}", dir.display(), hosts.logs());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let mut migrated = Vec::new();
    for name in ["g1", "g2"] {
        let guest = start_guest_with(&hosts, &qemu, &GuestOpts { name, ..Default::default() });
        let (ok, events) = migrate(&hosts, &guest, &["--disks", "vd0"]);
        assert!(ok, "migration succeeds; events: {events:#?}");
        let (dir, images) = (dest_dir(&hosts, &events), dest_images(&hosts, &events));
        let mut left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["qemu.log", "qemu.pid", "qmp.sock"], "the running guest's run dir: no migration socket, no image");
        for file in [&guest.ram, &guest.disks[0].0] {
            assert!(images.join(file.file_name().unwrap()).exists(), "{} is in image_dir: {images:?}", file.display());
        }
        migrated.push((dir, images, guest));
    }
    // The first guest's QEMU exits while the agent that received it still runs.
    quit_and_wait(&migrated[0].0, &hosts, "without a restart");
    // The second's after the agent was restarted: its journal record is what watches the QEMU.
    hosts.kill_agent(1);
    hosts.restart_agent(1);
    quit_and_wait(&migrated[1].0, &hosts, "after a restart");
    for (_, images, _) in &migrated {
        assert!(std::fs::read_dir(images).unwrap().count() >= 2, "the guest's images stay in {}", images.display());
    }
    let left: Vec<_> = std::fs::read_dir(hosts.path("run-host-b")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "run_dir is empty: {left:?}");
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
