//! More live migrations through two real `migtun serve` agents, with real QEMU: shared storage,
//! a subset of the disks, multifd, two migrations at once, the side channel, `migtun status`,
//! and failures (the destination QEMU or agent killed, Ctrl-C of the CLI) that must leave the
//! source running as before and nothing on the destination.

mod vm;

use std::process::Command;

use serde_json::json;
use vm::*;

/// A smaller guest: these tests need many of them at once on a 2-core machine.
fn small(name: &'static str, running: bool) -> GuestOpts {
    GuestOpts { name, running, ram_mib: 128, raw_mib: 64 }
}

fn compare_disk(src: &std::path::Path, format: &str, dest: &std::path::Path) {
    run(Command::new("qemu-img").args(["compare", "-U", "-q", "-f", format, "-F", format]).arg(src).arg(dest));
}

fn assert_succeeded(ok: bool, events: &[serde_json::Value], hosts: &Hosts) {
    assert!(ok, "migration succeeds; events: {events:#?}\n{}", hosts.logs());
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["outcome"], "succeeded", "{done}");
}

fn wait_source_quit(guest: &mut Guest) {
    let src = &mut guest.proc.0[0];
    wait_exit(|| src.try_wait().unwrap().is_none(), "the source QEMU quits after success");
}

fn images_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Both QEMUs open the same image files on this host; QEMU's image locking lets the
/// destination open them inactive while the source writes, the source inactivates them at
/// switchover, and the destination activates them when the migration completes: it can write
/// afterwards.
#[test]
fn shared_storage_copies_no_disk_and_the_destination_writes_to_the_same_images() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let mut guest = start_guest_with(&hosts, &qemu, &small("shared", true));
    let (ok, events) = migrate(&hosts, &guest, &["--shared-storage"]);
    assert_succeeded(ok, &events, &hosts);
    let dir = dest_dir(&hosts, &events);
    let _dest = PidFile(dir.join("qemu.pid"));
    assert!(
        !events.iter().any(|e| e["event"] == "progress" && e["stage"] == "mirror"),
        "no disk is mirrored with --shared-storage: {events:#?}"
    );
    wait_source_quit(&mut guest);
    // Only the RAM file is in the destination's image directory: no disk was created.
    let ram_name = guest.ram.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(images_in(&dest_images(&hosts, &events)), vec![ram_name], "no disk image on the destination");

    let mon = Monitor::connect(&dir.join("qmp.sock"));
    assert!(mon.running(), "the guest runs on the destination");
    let blocks = mon.cmd("query-block", json!(null)).unwrap();
    let files: Vec<String> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["inserted"]["image"]["filename"].as_str().map(str::to_string))
        .collect();
    for (disk, _) in &guest.disks {
        assert!(files.iter().any(|f| f == &disk.display().to_string()), "the destination opened {} ({files:?})", disk.display());
    }
    // Write access: a write through the destination's raw disk lands in the shared image.
    let out = mon.hmp("qemu-io -d /machine/peripheral/vd0/virtio-backend \"write -P 0x5a 0 4096\"");
    // (HMP's qemu-io prints its result to QEMU's stdout, not to the monitor: errors only here.)
    assert!(out.trim().is_empty(), "the destination writes to the shared disk: {out:?}");
    let mut head = vec![0u8; 4096];
    std::io::Read::read_exact(&mut std::fs::File::open(&guest.disks[0].0).unwrap(), &mut head).unwrap();
    assert!(head.iter().all(|b| *b == 0x5a), "the write reached the shared image file");
}

#[test]
fn only_the_named_disk_is_copied() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let mut guest = start_guest_with(&hosts, &qemu, &small("subset", false));
    let (ok, events) = migrate(&hosts, &guest, &["--disks", "vd0"]);
    assert_succeeded(ok, &events, &hosts);
    let dir = dest_dir(&hosts, &events);
    let _dest = PidFile(dir.join("qemu.pid"));
    wait_source_quit(&mut guest);
    let images = dest_images(&hosts, &events);
    let (raw, _) = &guest.disks[0];
    compare_disk(raw, "raw", &images.join(raw.file_name().unwrap()));
    let (qcow, _) = &guest.disks[1];
    assert!(!images.join(qcow.file_name().unwrap()).exists(), "vd1 is not copied: {:?}", images_in(&images));
    assert!(same_file(&guest.ram, &images.join(guest.ram.file_name().unwrap())), "RAM arrives byte-exact");
    // The destination uses the source's vd1 image itself (it was not copied).
    let mon = Monitor::connect(&dir.join("qmp.sock"));
    let blocks = mon.cmd("query-block", json!(null)).unwrap().to_string();
    assert!(blocks.contains(&qcow.display().to_string()), "vd1 is the source's image: {blocks}");
    assert!(!mon.running(), "paused on the source, paused on the destination");
}

#[test]
fn multifd_with_four_channels_arrives_byte_exact() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let mut guest = start_guest_with(&hosts, &qemu, &small("multifd", false));
    let (ok, events) = migrate(&hosts, &guest, &["--parallel", "4"]);
    assert_succeeded(ok, &events, &hosts);
    let dir = dest_dir(&hosts, &events);
    let _dest = PidFile(dir.join("qemu.pid"));
    wait_source_quit(&mut guest);
    let images = dest_images(&hosts, &events);
    assert!(same_file(&guest.ram, &images.join(guest.ram.file_name().unwrap())), "RAM arrives byte-exact over multifd");
    for (disk, format) in &guest.disks {
        compare_disk(disk, format, &images.join(disk.file_name().unwrap()));
    }
    // multifd really was on at the destination.
    let mon = Monitor::connect(&dir.join("qmp.sock"));
    let caps = mon.cmd("query-migrate-capabilities", json!(null)).unwrap();
    assert!(
        caps.as_array().unwrap().iter().any(|c| c["capability"] == "multifd" && c["state"] == true),
        "multifd enabled on the destination: {caps}"
    );
    let params = mon.cmd("query-migrate-parameters", json!(null)).unwrap();
    assert_eq!(params["multifd-channels"], 4, "{params}");
}

/// Two guests, two `migtun migrate` processes, the same two agents and port. The first is
/// held in its RAM phase (2 MB/s) until the second has completed, so they certainly overlap;
/// then it goes on at full speed.
#[test]
fn two_migrations_at_once_between_the_same_agents() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let mut guests = [start_guest_with(&hosts, &qemu, &small("one", false)), start_guest_with(&hosts, &qemu, &small("two", false))];
    let mon = Monitor::connect(&guests[0].monitor);
    let mut first = spawn_migrate(&hosts, &guests[0], &["--max-bandwidth", "2000000"]);
    first.wait_for("RAM progress", |e| e["event"] == "progress" && e["stage"] == "ram");
    let (ok, second) = migrate(&hosts, &guests[1], &[]);
    assert_succeeded(ok, &second, &hosts);
    let status = status_json(&hosts);
    let running: Vec<_> = status["migrations"].as_array().unwrap().iter().filter(|m| m["outcome"].is_null()).collect();
    assert_eq!(running.len(), 1, "the first migration still runs while the second has completed: {status}");
    assert_eq!(running[0]["id"], first.id().as_str());
    mon.cmd("migrate-set-parameters", json!({"max-bandwidth": 10_000_000_000u64})).unwrap();
    let (ok, _) = first.finish();
    assert_succeeded(ok, &first.events, &hosts);
    drop(mon);
    let results = [first.events.clone(), second];
    let mut dirs = Vec::new();
    for (guest, events) in guests.iter_mut().zip(&results) {
        let dir = dest_dir(&hosts, events);
        dirs.push(dir.clone());
        let _dest = PidFile(dir.join("qemu.pid"));
        wait_source_quit(guest);
        let images = dest_images(&hosts, events);
        assert!(same_file(&guest.ram, &images.join(guest.ram.file_name().unwrap())), "RAM of {} arrives byte-exact", guest.ram.display());
        for (disk, format) in &guest.disks {
            compare_disk(disk, format, &images.join(disk.file_name().unwrap()));
        }
    }
    assert_ne!(dirs[0], dirs[1], "two migrations, two destination directories");
}

/// The destination QEMU dies while the disks are mirrored.
#[test]
fn destination_qemu_killed_during_the_mirror_rolls_back() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    // A 512 MiB disk, and the mirror slowed to 20 MB/s from the source's own monitor as soon
    // as the job exists: the mirror phase lasts long enough to kill the destination in it.
    let guest = start_guest_with(&hosts, &qemu, &GuestOpts { name: "killq", running: true, ram_mib: 128, raw_mib: 512 });
    let mon = Monitor::connect(&guest.monitor);
    let mut m = spawn_migrate(&hosts, &guest, &[]);
    m.wait_for("accepted", |e| e["event"] == "accepted");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let jobs = mon.cmd("query-block-jobs", json!(null)).unwrap();
        if let Some(job) = jobs.as_array().unwrap().iter().find(|j| j["type"] == "mirror") {
            mon.cmd("block-job-set-speed", json!({"device": job["device"], "speed": 20_000_000})).unwrap();
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no mirror job started: {:#?}", m.events);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let progress = m.wait_for("mirror progress", |e| e["event"] == "progress" && e["stage"] == "mirror");
    let dir = hosts.path("run-host-b").join(m.id());
    let pid = read_pidfile(&dir.join("qemu.pid"));
    // SAFETY: kill(2) on the destination QEMU's pid; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let done = m.wait_for("done", |e| e["event"] == "done");
    eprintln!("outcome: {done}");
    let (ok, stderr) = m.finish();
    assert!(progress["done_bytes"].as_u64() < progress["total_bytes"].as_u64(), "killed during the mirror: {progress}");
    assert!(!ok, "the migration fails");
    assert_eq!(done["outcome"], "failed", "{done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("mirror"), "the error names the mirror: {message}");
    assert!(stderr.contains("migration failed"), "the CLI says so: {stderr}");
    drop(mon);
    source_is_intact(&guest, true);
    destination_is_clean(&hosts);
}

/// The destination agent dies during the RAM phase: the source rolls back by itself and the
/// destination QEMU, which loses its migration stream, exits by itself.
#[test]
fn destination_agent_killed_during_ram_rolls_back() {
    let Some(qemu) = qemu() else { return };
    let mut hosts = Hosts::start();
    let guest = start_guest_with(&hosts, &qemu, &small("killagent", true));
    let mut m = spawn_migrate(&hosts, &guest, &["--max-bandwidth", "10000000"]);
    m.wait_for("RAM progress", |e| e["event"] == "progress" && e["stage"] == "ram");
    let dir = hosts.path("run-host-b").join(m.id());
    let pid = read_pidfile(&dir.join("qemu.pid"));
    let _dest = PidFile(dir.join("qemu.pid"));
    assert!(pid_alive(pid));
    let agent = &mut hosts.agents.0[1];
    agent.kill().unwrap();
    agent.wait().unwrap();
    let done = m.wait_for("done", |e| e["event"] == "done");
    eprintln!("outcome: {done}");
    let (ok, _) = m.finish();
    assert!(!ok, "the migration fails");
    assert_eq!(done["outcome"], "failed", "{done}");
    wait_exit(|| pid_alive(pid), "the destination QEMU exits when its incoming migration fails");
    source_is_intact(&guest, true);
}

/// Ctrl-C of `migtun migrate` cancels the migration; the CLI waits for the rollback.
#[test]
fn ctrl_c_of_the_cli_cancels_and_rolls_back() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let guest = start_guest_with(&hosts, &qemu, &small("ctrlc", true));
    let mut m = spawn_migrate(&hosts, &guest, &["--max-bandwidth", "10000000"]);
    m.wait_for("RAM progress", |e| e["event"] == "progress" && e["stage"] == "ram");
    let dir = hosts.path("run-host-b").join(m.id());
    let _dest = PidFile(dir.join("qemu.pid"));
    // SAFETY: kill(2) on our child's pid; no memory is involved.
    unsafe { libc::kill(m.pid(), libc::SIGINT) };
    let done = m.wait_for("done", |e| e["event"] == "done");
    eprintln!("outcome: {done}");
    let (ok, stderr) = m.finish();
    assert!(!ok, "a cancelled migration exits non-zero");
    assert_eq!(done["outcome"], "cancelled", "{done}");
    assert!(stderr.contains("cancel"), "the CLI says it cancelled: {stderr}");
    source_is_intact(&guest, true);
    destination_is_clean(&hosts);
}

#[test]
fn side_channel_files_arrive_in_the_image_directory() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let mut guest = start_guest_with(&hosts, &qemu, &small("files", true));
    let big = hosts.path("nvram.fd");
    random_file(&big, 5 << 20, 77);
    let tiny = hosts.path("vm.conf");
    std::fs::write(&tiny, "memory = 128\n").unwrap();
    let (ok, events) = migrate(
        &hosts,
        &guest,
        &["--shared-storage", "--with-file", big.to_str().unwrap(), "--with-file", tiny.to_str().unwrap()],
    );
    assert_succeeded(ok, &events, &hosts);
    let dir = dest_dir(&hosts, &events);
    let _dest = PidFile(dir.join("qemu.pid"));
    wait_source_quit(&mut guest);
    let images = dest_images(&hosts, &events);
    assert!(same_file(&big, &images.join("nvram.fd")), "the 5 MiB file arrives intact");
    assert!(same_file(&tiny, &images.join("vm.conf")), "the small file arrives intact");
    assert!(
        events.iter().filter(|e| e["event"] == "log" && e["message"].as_str().unwrap_or_default().starts_with("sent ")).count() == 2,
        "both files are reported sent: {events:#?}"
    );
}

fn status_json(hosts: &Hosts) -> serde_json::Value {
    let out = Command::new(MIGTUN).arg("status").arg("--admin").arg(hosts.path("host-a.admin")).arg("--json").output().unwrap();
    assert!(out.status.success(), "migtun status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn status_lists_a_running_migration_and_then_its_outcome() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let mut guest = start_guest_with(&hosts, &qemu, &small("status", true));
    let mon = Monitor::connect(&guest.monitor);
    let mut m = spawn_migrate(&hosts, &guest, &["--max-bandwidth", "10000000"]);
    m.wait_for("RAM progress", |e| e["event"] == "progress" && e["stage"] == "ram");
    let id = m.id();
    let status = status_json(&hosts);
    let mine = status["migrations"].as_array().unwrap().iter().find(|x| x["id"] == id.as_str()).cloned();
    let mine = mine.unwrap_or_else(|| panic!("migtun status lists {id}: {status}"));
    assert!(mine["phase"].as_str().unwrap_or_default().starts_with("perform"), "{mine}");
    assert!(mine["outcome"].is_null(), "{mine}");
    assert_eq!(mine["peer"], "host-b");
    assert_eq!(mine["direction"], "outgoing");
    assert_eq!(mine["vm"], "status", "the VM's -name: {mine}");
    assert!(status["routes"].as_array().is_some(), "{status}");
    // Let it finish at full speed.
    mon.cmd("migrate-set-parameters", json!({"max-bandwidth": 10_000_000_000u64})).unwrap();
    let (ok, _) = m.finish();
    assert_succeeded(ok, &m.events, &hosts);
    let _dest = PidFile(hosts.path("run-host-b").join(&id).join("qemu.pid"));
    drop(mon);
    wait_source_quit(&mut guest);
    let status = status_json(&hosts);
    let mine = status["migrations"].as_array().unwrap().iter().find(|x| x["id"] == id.as_str()).cloned().unwrap();
    assert_eq!(mine["outcome"], "succeeded", "{mine}");
    assert_eq!(mine["phase"], "done", "{mine}");
}

/// Begin refuses a VM with an active block job, before anything is touched on either host, and
/// says why.
#[test]
fn active_block_job_is_refused_at_begin() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let guest = start_guest_with(&hosts, &qemu, &GuestOpts { name: "busy", running: true, ram_mib: 64, raw_mib: 64 });
    let mon = Monitor::connect(&guest.monitor);
    // Someone else's job: a throttled backup of vd0 to a local file.
    let target = hosts.path("busy-backup.raw");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&target).arg("64M"));
    mon.cmd("blockdev-add", json!({"driver": "file", "filename": target, "node-name": "bk-file"})).unwrap();
    mon.cmd("blockdev-add", json!({"driver": "raw", "file": "bk-file", "node-name": "bk"})).unwrap();
    mon.cmd("blockdev-backup", json!({"job-id": "theirs", "device": "d0", "target": "bk", "sync": "full", "speed": 1024})).unwrap();

    let (ok, events) = migrate(&hosts, &guest, &[]);
    assert!(!ok, "refused");
    let done = events.last().expect("a done event");
    assert_eq!(done["outcome"], "refused", "{done}");
    assert!(done["message"].as_str().unwrap_or_default().contains("block job"), "the reason names the block job: {done}");
    assert!(mon.running(), "the guest still runs");
    let jobs = mon.cmd("query-block-jobs", json!(null)).unwrap();
    assert_eq!(jobs.as_array().map(|j| j.len()), Some(1), "their job is untouched: {jobs}");
    assert!(
        std::fs::read_dir(hosts.path("run-host-b")).map(|d| d.count()).unwrap_or(0) == 0,
        "nothing was prepared on the destination"
    );
}

/// Postcopy: the migration switches to postcopy once RAM copying has started; the guest runs on
/// the destination afterwards and the source has quit.
#[test]
fn postcopy_migration_completes() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let mut guest = start_guest_with(&hosts, &qemu, &GuestOpts { name: "pc", running: true, ..Default::default() });
    let (ok, events) = migrate(&hosts, &guest, &["--postcopy"]);
    assert!(ok, "postcopy migration succeeds: {events:#?}\n{}", hosts.logs());
    assert!(
        events.iter().any(|e| e["message"].as_str().is_some_and(|m| m.contains("postcopy-active"))),
        "the migration went through postcopy: {events:#?}"
    );
    let dir = dest_dir(&hosts, &events);
    let _dest = PidFile(dir.join("qemu.pid"));
    assert_eq!(qmp_status(&dir.join("qmp.sock"))["running"], true, "the guest runs on the destination");
    let src = &mut guest.proc.0[0];
    wait_exit(|| src.try_wait().unwrap().is_none(), "the source QEMU quits");
}

/// A migration with storage whose streams (RAM and NBD) travel over QUIC.
#[test]
fn migration_with_storage_over_quic() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start_with(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prepare-hook"), "quic");
    let guest = start_guest_with(&hosts, &qemu, &GuestOpts { name: "q", running: false, ..Default::default() });
    let (ok, events) = migrate(&hosts, &guest, &[]);
    assert!(ok, "the migration succeeds over QUIC: {events:#?}\n{}", hosts.logs());
    let dir = dest_dir(&hosts, &events);
    let _dest = PidFile(dir.join("qemu.pid"));
    let images = dest_images(&hosts, &events);
    assert!(same_file(&guest.ram, &images.join(guest.ram.file_name().unwrap())), "RAM byte-exact");
    for (disk, format) in &guest.disks {
        run(Command::new("qemu-img").args(["compare", "-U", "-q", "-f", format, "-F", format]).arg(disk).arg(images.join(disk.file_name().unwrap())));
    }
    assert!(
        hosts.metric(0, "migtun_handshakes_total", &[("transport", "quic"), ("role", "client")]) >= 1.0,
        "host-a reached host-b over QUIC"
    );
    assert_eq!(
        hosts.metric(0, "migtun_handshakes_total", &[("transport", "tls"), ("role", "client")]),
        1.0,
        "one TLS connection (the control RPC); the data streams did not use TLS"
    );
}
