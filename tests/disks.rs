//! Every common way of giving QEMU a disk migrates, or is refused with a reason that says what
//! to change (issue 11): `-drive` with automatic node names (`if=none` + a device, and
//! `if=virtio`), a qcow2 with a backing file, read-only cdroms with and without a medium.
//! Real QEMU, real agents; each migrated disk is compared with `qemu-img compare`.

mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vm::*;

/// A paused guest with `disks` (QEMU options) instead of the harness's -blockdev disks.
fn guest(hosts: &Hosts, qemu: &Path, name: &str, disks: &[String]) -> (Procs, PathBuf, PathBuf) {
    let ram = hosts.path(&format!("{name}-ram"));
    random_file(&ram, 64 << 20, 7);
    let qmp = hosts.path(&format!("{name}.qmp"));
    let mon = hosts.path(&format!("{name}-mon.qmp"));
    let child = Command::new(qemu)
        .arg("-name")
        .arg(format!("guest={name}"))
        .args(["-machine", "pc,memory-backend=ram0", "-accel", accel(), "-m", "64M", "-nodefaults", "-display", "none", "-S"])
        .arg("-object")
        .arg(format!("memory-backend-file,id=ram0,size=64M,mem-path={},share=on", ram.display()))
        .args(disks)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", mon.display()))
        .stderr(std::fs::File::create(hosts.path(&format!("qemu-{name}.log"))).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(qmp.exists() && mon.exists()) {
        assert!(Instant::now() < deadline, "QEMU did not start: {}", std::fs::read_to_string(hosts.path(&format!("qemu-{name}.log"))).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
    (Procs(vec![child]), qmp, ram)
}

fn migrate_qmp(hosts: &Hosts, qmp: &Path) -> (bool, Vec<serde_json::Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_migtun"))
        .arg("migrate")
        .arg("--admin")
        .arg(hosts.path("host-a.admin"))
        .arg("--qmp")
        .arg(qmp)
        .args(["--to", "host-b", "--json"])
        .output()
        .unwrap();
    let events = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    (out.status.success(), events)
}

fn image(hosts: &Hosts, name: &str, format: &str, mib: u64, seed: u64) -> PathBuf {
    let raw = hosts.path(&format!("{name}.content"));
    random_file(&raw, mib << 20, seed);
    if format == "raw" {
        return raw;
    }
    let img = hosts.path(&format!("{name}.{format}"));
    run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", format]).arg(&raw).arg(&img));
    img
}

/// Migrates and checks the guest arrived: success, RAM and every listed disk byte-exact.
fn migrates_exactly(hosts: &Hosts, qmp: &Path, ram: &Path, disks: &[(&Path, &str)]) -> PathBuf {
    let (ok, events) = migrate_qmp(hosts, qmp);
    let done = events.iter().rev().find(|e| e["event"] == "done").cloned().unwrap_or_default();
    assert!(ok, "the migration succeeds: {done}\n{}", hosts.logs());
    let dir = dest_dir(hosts, &events);
    let images = dest_images(hosts, &events);
    assert!(same_file(ram, &images.join(ram.file_name().unwrap())), "RAM arrives byte-exact");
    for (disk, format) in disks {
        let dest = images.join(disk.file_name().unwrap());
        run(Command::new("qemu-img").args(["compare", "-U", "-q", "-f", format, "-F", format]).arg(disk).arg(&dest));
    }
    dir
}

#[test]
fn drive_with_automatic_node_names_migrates() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let a = image(&hosts, "drv-a", "qcow2", 16, 1);
    let b = image(&hosts, "drv-b", "raw", 8, 2);
    let disks = vec![
        "-drive".to_string(),
        format!("file={},format=qcow2,if=none,id=drive0", a.display()),
        "-device".into(),
        "virtio-blk-pci,drive=drive0,id=vd0".into(),
        "-drive".into(),
        format!("file={},format=raw,if=virtio", b.display()),
    ];
    let (_q, qmp, ram) = guest(&hosts, &qemu, "drv", &disks);
    let dir = migrates_exactly(&hosts, &qmp, &ram, &[(&a, "qcow2"), (&b, "raw")]);
    let _dest = PidFile(dir.join("qemu.pid"));
}

#[test]
fn qcow2_with_a_backing_file_migrates_whole() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let base = image(&hosts, "bk-base", "qcow2", 16, 3);
    let top = hosts.path("bk-top.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&base).arg(&top));
    // Something in the top layer too.
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 1M 1M"]).arg(&top));
    let disks = vec!["-drive".to_string(), format!("file={},format=qcow2,if=none,id=drive0", top.display()), "-device".into(), "virtio-blk-pci,drive=drive0".into()];
    let (_q, qmp, ram) = guest(&hosts, &qemu, "bk", &disks);
    let dir = migrates_exactly(&hosts, &qmp, &ram, &[(&top, "qcow2")]);
    let _dest = PidFile(dir.join("qemu.pid"));
}

#[test]
fn cdroms_empty_migrate_and_with_a_medium_need_shared_storage() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let a = image(&hosts, "cd-disk", "raw", 8, 4);
    // The harness's destination allows shared storage under its own directory: an ISO there
    // is reachable by both hosts.
    let iso = image(&hosts, "cd-iso", "raw", 2, 5);
    let disks = vec![
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio", a.display()),
        "-drive".into(),
        "if=ide,media=cdrom,index=2".into(),
        "-drive".into(),
        format!("file={},format=raw,if=ide,media=cdrom,readonly=on,index=3", iso.display()),
    ];
    let (_q, qmp, ram) = guest(&hosts, &qemu, "cd", &disks);
    let dir = migrates_exactly(&hosts, &qmp, &ram, &[(&a, "raw")]);
    let _dest = PidFile(dir.join("qemu.pid"));
}

/// A medium the destination cannot reach (not under its `qemu.shared_storage`) is refused
/// before anything runs there, with a reason that says what to change; the source is untouched.
#[test]
fn a_cdrom_outside_shared_storage_is_refused_with_the_key_to_change() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let elsewhere = tempfile::tempdir_in("/var/tmp").unwrap();
    let iso = elsewhere.path().join("install.iso");
    random_file(&iso, 1 << 20, 6);
    let a = image(&hosts, "cdx-disk", "raw", 8, 7);
    let disks = vec![
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio", a.display()),
        "-drive".into(),
        format!("file={},format=raw,if=ide,media=cdrom,readonly=on", iso.display()),
    ];
    let (_q, qmp, _ram) = guest(&hosts, &qemu, "cdx", &disks);
    let (ok, events) = migrate_qmp(&hosts, &qmp);
    let done = events.iter().rev().find(|e| e["event"] == "done").cloned().unwrap_or_default();
    assert!(!ok, "refused: {done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("shared_storage") && message.contains("install.iso"), "the reason names the file and the key: {message}");
    assert_eq!(qmp_status(&qmp)["status"], "prelaunch", "the source is untouched");
    destination_is_clean(&hosts);
}
