//! A restart hand-over of an agent with `[qemu]`: the new agent starts on the same config while
//! the old one drains a migration to it, holding the journal.
//!
//! Real agents as processes, real QEMU, a real migration with storage. The new agent serves at
//! once and says why it is not ready yet (systemd's STATUS=, no READY=1); migration requests
//! meanwhile, from a peer and on its admin socket, are refused naming the pid that holds the
//! journal; the old agent's migration ends with the guest in exactly one place; once the old
//! agent has exited, the new one takes the journal, says READY=1, and a migration to it runs.
//! A second agent started beside one that serves (not drains) is refused, naming that pid.

mod vm;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm::*;

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");

/// The notifications a `migtun serve` sent to its `NOTIFY_SOCKET` so far, in order.
fn notifications(socket: &UnixDatagram, seen: &mut Vec<String>) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    seen.clone()
}

/// `migtun migrate` on host-b's admin socket, moving `guest` to host-a: (success, output).
fn migrate_from_b(hosts: &Hosts, guest: &Guest) -> (bool, String) {
    let out = migrate_command(hosts, "host-b", guest, "host-a").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_destination_agent_with_qemu_hands_over_while_the_old_one_drains_a_migration() {
    let Some(qemu) = qemu() else { return };
    let mut hosts = Hosts::start();
    // 256 MiB of random RAM at 32 MiB/s: the old agent drains this migration for seconds.
    let mut first = start_guest_with(&hosts, &qemu, &GuestOpts { name: "hofirst", running: true, ram_mib: 256, raw_mib: 16 });
    let second = start_guest_with(&hosts, &qemu, &GuestOpts { name: "hosecond", running: true, ram_mib: 64, raw_mib: 16 });
    let mut m = spawn_migrate(&hosts, &first, &["--max-bandwidth", &(32u64 << 20).to_string()]);
    let id = m.id_when_accepted();
    let first_dir = hosts.path("run-host-b").join(&id);
    let _dest = PidFile(first_dir.join("qemu.pid"));
    // Every stream of the migration is open once RAM moves (the old agent keeps those; a
    // stream opened during the switch could land on the new agent, which knows none of its routes).
    m.wait_for("RAM on the move", |e| e["stage"] == "ram" && e["done_bytes"].as_u64().is_some_and(|b| b >= 16 << 20));

    // The new destination agent starts on the same config beside the old one, which then
    // drains (in this order the port never refuses a connection: both listen on it for a while).
    let old_pid = hosts.agent_pid(1);
    let notify_path = hosts.path("new-b.notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let log = hosts.path("host-b-new.log");
    let new = Command::new(MIGTUN)
        .args(["serve", "--config"])
        .arg(hosts.path("host-b.toml"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _new = Procs(vec![new]);
    let new_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut seen = Vec::new();
    let wait_status = |what: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !notifications(&notify, seen).iter().any(|n| n.contains(what)) {
            assert!(Instant::now() < deadline, "the new agent never said {what:?}: {seen:?}\n{}", new_log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_status(&format!("starting: waiting for the journal, held by the agent this one replaces (pid {old_pid}, serving)"), &mut seen);
    hosts.signal_agent(1, libc::SIGTERM);
    wait_status("holds it until it exits", &mut seen);
    assert!(pid_alive(old_pid), "the old agent still drains");
    assert!(seen.iter().all(|n| !n.contains("READY=1")), "no READY=1 while the journal is held: {seen:?}");
    let holder = format!("pid {old_pid}");
    assert!(seen.iter().any(|n| n.contains(&holder)), "the status names the holder: {seen:?}");

    // Meanwhile host-a's new control connections reach the new agent: its prepare is refused,
    // naming the holder, and the guest stays where it is, running.
    let (ok, events) = migrate(&hosts, &second, &[]);
    let done = events.iter().rev().find(|e| e["event"] == "done").cloned().unwrap_or_default();
    assert!(!ok, "a migration to the starting agent is refused: {done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("host-b is starting") && message.contains(&holder), "{done}");
    source_is_intact(&second, true);
    // So is one started on its own admin socket (once the old agent has let that go).
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(hosts.path("host-b.admin")).is_err() {
        assert!(Instant::now() < deadline, "the new agent never took the admin socket:\n{}", new_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pid_alive(old_pid), "the old agent still drains (its migration takes 8 s at least): {:#?}\n{}\n--- new\n{}", m.events, hosts.logs(), new_log());
    let (ok, out) = migrate_from_b(&hosts, &second);
    assert!(!ok && out.contains("host-b is starting") && out.contains(&holder), "{out}");

    // The old agent's migration ends, with the guest in exactly one place; then it exits.
    let (_, _) = m.finish();
    let outcome = m.done()["outcome"].as_str().unwrap_or_default().to_string();
    wait_exit(|| pid_alive(old_pid), "the old agent exits after its drain");
    hosts.agents.0[1].wait().unwrap();
    match outcome.as_str() {
        "succeeded" => {
            let src = &mut first.proc.0[0];
            wait_exit(|| src.try_wait().unwrap().is_none(), "the source QEMU quits");
            assert_eq!(qmp_status(&first_dir.join("qmp.sock"))["running"], true, "the guest runs on host-b");
        }
        other => panic!("the migration the old agent drained ended {other:?}: {:#?}\n{}\n--- new\n{}", m.events, hosts.logs(), new_log()),
    }

    // The new agent takes the journal, says READY=1, and serves migrations.
    wait_status("READY=1", &mut seen);
    assert!(new_log().contains("journal taken over"), "{}", new_log());
    let (ok, events) = migrate(&hosts, &second, &[]);
    assert!(ok, "a migration to the new agent: {events:?}\n{}", new_log());
    let dir = dest_dir(&hosts, &events);
    let _second_dest = PidFile(dir.join("qemu.pid"));
    assert_eq!(qmp_status(&dir.join("qmp.sock"))["running"], true, "the second guest runs on host-b");
}

/// Two agents on one config by mistake: the second serves beside the first for a few seconds,
/// waiting for it to start draining, then stops, naming the pid that holds the journal; the
/// first serves on.
#[test]
fn a_second_agent_beside_one_that_serves_is_refused_naming_it() {
    if qemu().is_none() {
        return;
    }
    let hosts = Hosts::start();
    let started = Instant::now();
    let out = Command::new(MIGTUN).args(["serve", "--config"]).arg(hosts.path("host-b.toml")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let holder = format!("pid {}, serving", hosts.agent_pid(1));
    assert!(err.contains("is in use by another migtun agent") && err.contains(&holder), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(9), "it waited for a drain that might have been starting");
    assert!(std::os::unix::net::UnixStream::connect(hosts.path("host-b.admin")).is_ok(), "the first one serves on");
}
