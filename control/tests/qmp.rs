//! The QMP client against a real QEMU (`qemu-system-x86_64`, KVM when `/dev/kvm` is usable,
//! else TCG). Fake servers appear only for protocol-error cases a real QEMU cannot produce.
//!
//! `MIGTUN_TEST_ACCEL=tcg` forces TCG. Without QEMU the QEMU tests print `SKIPPED: ...` and pass, unless `CI=true`, where they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migtun_control::qmp::{EventsExt, Qmp, QmpError, Timeouts, MAX_LINE};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Generous upper bound for things that should happen at once (a dead QEMU noticed, a stopped
/// QEMU's event delivered). Only a guard against hangs, not a timing assertion.
const PROMPTLY: Duration = Duration::from_secs(10);

/// How long a freshly spawned QEMU may take to create its QMP socket.
const QEMU_STARTUP: Duration = Duration::from_secs(20);

const QEMU: &str = "qemu-system-x86_64";

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// QEMU's path, or `None` after printing a loud skip notice (panics instead under `CI=true`).
fn qemu_binary() -> Option<PathBuf> {
    if let Some(p) = find_in_path(QEMU) {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{QEMU} not found in PATH, and CI=true: QEMU tests must run in CI");
    }
    eprintln!(
        "SKIPPED: {QEMU} not found in PATH (apt-get install qemu-system-x86); QEMU test not run"
    );
    None
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A scratch directory, on tmpfs when there is one (see DESIGN.md "Testing approach").
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("migtun-qmp")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("migtun-qmp")
        .tempdir()
        .unwrap()
}

/// A paused QEMU with a QMP socket, killed (and reaped) on drop.
struct Vm {
    child: Child,
    qmp_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    /// Starts QEMU with `extra` arguments (which may use `{dir}` for the scratch directory),
    /// or returns `None` if QEMU is not installed (see [`qemu_binary`]).
    fn start(extra: &[&str], prepare: impl FnOnce(&Path)) -> Option<Vm> {
        let qemu = qemu_binary()?;
        let dir = scratch_dir();
        prepare(dir.path());
        let qmp_path = dir.path().join("qmp.sock");
        // MIGTUN_TEST_ACCEL=tcg forces the path taken on hosts without KVM.
        let accel = std::env::var("MIGTUN_TEST_ACCEL")
            .unwrap_or_else(|_| if kvm_usable() { "kvm" } else { "tcg" }.into());
        let dir_s = dir.path().to_str().unwrap().to_owned();
        let mut cmd = Command::new(qemu);
        cmd.args(["-S", "-display", "none", "-nodefaults", "-no-user-config"])
            .args(["-machine", "q35", "-accel", &accel, "-m", "64"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(extra.iter().map(|a| a.replace("{dir}", &dir_s)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn qemu");
        let mut vm = Vm {
            child,
            qmp_path,
            dir,
        };
        let deadline = Instant::now() + QEMU_STARTUP;
        while !vm.qmp_path.exists() {
            if let Ok(Some(status)) = vm.child.try_wait() {
                panic!("QEMU exited during startup ({status}); its stderr is above");
            }
            assert!(Instant::now() < deadline, "QEMU created no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(vm)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn connect(&mut self) -> Qmp {
        match Qmp::connect(&self.qmp_path).await {
            Ok(qmp) => qmp,
            Err(e) => match self.child.try_wait() {
                Ok(Some(status)) => panic!("QEMU exited ({status}), its stderr is above: {e}"),
                _ => panic!("QMP connect: {e}"),
            },
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own live (unreaped)
    // child, so the signal cannot reach an unrelated process that reused the pid.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

#[tokio::test]
async fn greeting_status_cont_stop() {
    let Some(mut vm) = Vm::start(&[], |_| {}) else {
        return;
    };
    let qmp = vm.connect().await;
    let (major, minor, micro) = qmp.version();
    eprintln!(
        "QEMU {major}.{minor}.{micro} ({}), capabilities {:?}",
        qmp.greeting().package,
        qmp.greeting().capabilities
    );
    assert!((major, minor) >= (7, 0), "QEMU {major}.{minor} too old");

    let st = qmp.query_status().await.unwrap();
    assert!(!st.running);
    assert!(st.status == "prelaunch" || st.status == "paused", "{st:?}");
    qmp.execute("cont", Value::Null).await.unwrap();
    let st = qmp.query_status().await.unwrap();
    assert!(st.running, "{st:?}");
    assert_eq!(st.status, "running");
    qmp.execute("stop", json!({})).await.unwrap();
    let st = qmp.query_status().await.unwrap();
    assert!(!st.running, "{st:?}");
    assert_eq!(st.status, "paused");

    // The other helpers decode against this QEMU.
    let m = qmp.query_migrate().await.unwrap();
    assert_eq!(m.status, "none", "{m:?}");
    assert!(qmp.query_block_jobs().await.unwrap().is_empty());
    qmp.migrate_set_capabilities(&[("pause-before-switchover", true)])
        .await
        .unwrap();
    let caps = qmp.query_migrate_capabilities().await.unwrap();
    assert!(caps
        .iter()
        .any(|c| c.capability == "pause-before-switchover" && c.state));
    assert!(caps.iter().any(|c| c.capability == "multifd" && !c.state));
    qmp.migrate_set_parameters(json!({"downtime-limit": 321}))
        .await
        .unwrap();
    let params = qmp
        .execute("query-migrate-parameters", Value::Null)
        .await
        .unwrap();
    assert_eq!(params["downtime-limit"], 321);
}

/// `wait_until` wakes on the named event (the safety-net recheck is set far beyond the test's
/// patience), and gives up with a timeout naming what it waited for.
#[tokio::test]
async fn wait_until_follows_events_and_times_out() {
    let Some(mut vm) = Vm::start(&[], |_| {}) else {
        return;
    };
    let qmp = Arc::new(vm.connect().await);
    let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let resumer = {
        let qmp = qmp.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            qmp.execute("cont", Value::Null).await.unwrap();
        })
    };
    let started = Instant::now();
    let status = qmp
        .wait_until(
            "the guest to run",
            &["RESUME"],
            Duration::from_secs(3600),
            PROMPTLY,
            || {
                let (qmp, probes) = (qmp.clone(), probes.clone());
                async move {
                    probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let st = qmp.query_status().await?;
                    Ok(st.running.then_some(st.status))
                }
            },
        )
        .await
        .unwrap();
    assert_eq!(status, "running");
    assert!(started.elapsed() < PROMPTLY);
    // Once before the event, once after (a few more if unrelated events came between).
    assert!(probes.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    resumer.await.unwrap();

    let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let err = qmp
        .wait_until(
            "a STOP that never comes",
            &["STOP"],
            Duration::from_millis(50),
            Duration::from_millis(300),
            || {
                let (qmp, probes) = (qmp.clone(), probes.clone());
                async move {
                    probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let st = qmp.query_status().await?;
                    Ok((!st.running).then_some(()))
                }
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Timeout { command, .. } if command.contains("STOP that never comes")),
        "{err}"
    );
    // The recheck ran the probe without any event.
    assert!(probes.load(std::sync::atomic::Ordering::Relaxed) >= 3);
}

/// Pipelined commands run in order; a failure is reported by name and does not stop the
/// commands after it; the connection stays usable.
#[tokio::test]
async fn pipelined_commands_run_in_order() {
    let Some(mut vm) = Vm::start(&[], |_| {}) else {
        return;
    };
    let qmp = vm.connect().await;
    let replies = qmp
        .execute_pipelined(vec![
            ("cont", Value::Null),
            ("query-status", Value::Null),
            ("stop", Value::Null),
            ("query-status", Value::Null),
        ])
        .await
        .unwrap();
    assert_eq!(replies.len(), 4);
    assert_eq!(replies[1]["status"], "running", "{replies:?}");
    assert_eq!(replies[3]["status"], "paused", "{replies:?}");
    let err = qmp
        .execute_pipelined(vec![
            ("no-such-command", Value::Null),
            ("cont", Value::Null),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Qemu { command, class, .. } if command == "no-such-command" && class == "CommandNotFound"),
        "{err}"
    );
    let st = qmp.query_status().await.unwrap();
    assert!(st.running, "the command after the failed one ran: {st:?}");
}

#[tokio::test]
async fn qemu_errors_reach_the_caller() {
    let Some(mut vm) = Vm::start(&[], |_| {}) else {
        return;
    };
    let qmp = vm.connect().await;

    let e = qmp
        .execute("blockdev-del", json!({"node-name": "no-such-node"}))
        .await
        .unwrap_err();
    eprintln!("{e}");
    match &e {
        QmpError::Qemu {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "blockdev-del");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("no-such-node"), "{desc}");
        }
        other => panic!("expected a QEMU error, got {other:?}"),
    }
    assert!(e
        .to_string()
        .starts_with("QEMU refused blockdev-del: GenericError: "));

    let e = qmp
        .execute("no-such-command", Value::Null)
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, QmpError::Qemu { class, desc, .. }
            if class == "CommandNotFound" && desc.contains("no-such-command")),
        "{e:?}"
    );

    // Bad arguments are QEMU's to reject too.
    let e = qmp
        .execute("migrate-set-parameters", json!({"downtime-limit": "soon"}))
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, QmpError::Qemu { class, .. } if class == "GenericError"),
        "{e:?}"
    );

    // A typed call whose reply does not fit is a Protocol error, not a panic.
    let e = qmp
        .call::<Vec<String>>("query-status", Value::Null)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, QmpError::Protocol(m) if m.contains("query-status")),
        "{e:?}"
    );

    // After all of that the session still works.
    assert!(!qmp.query_status().await.unwrap().running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_while_commands_are_in_flight() {
    const TOGGLES: usize = 10;
    const TASKS: usize = 6;
    const QUERIES_PER_TASK: usize = 50;

    let Some(mut vm) = Vm::start(&[], |_| {}) else {
        return;
    };
    let qmp = Arc::new(vm.connect().await);

    // The simple case, race-free by construction: subscribe, then trigger.
    let (_, ev) = qmp
        .execute_and_wait("cont", Value::Null, "RESUME", |_| true, PROMPTLY)
        .await
        .unwrap();
    assert!(ev.timestamp.is_some(), "{ev:?}");
    let mut events = qmp.events();
    qmp.execute("stop", Value::Null).await.unwrap();
    let ev = events.wait_for("STOP", |_| true, PROMPTLY).await.unwrap();
    assert_eq!(ev.name, "STOP");

    // Now many concurrent queries while STOP/RESUME events flow.
    let mut events = qmp.events();
    let toggler = {
        let qmp = qmp.clone();
        tokio::spawn(async move {
            for _ in 0..TOGGLES {
                qmp.execute("cont", Value::Null).await.unwrap();
                qmp.execute("stop", Value::Null).await.unwrap();
            }
        })
    };
    let queriers: Vec<_> = (0..TASKS)
        .map(|_| {
            let qmp = qmp.clone();
            tokio::spawn(async move {
                for _ in 0..QUERIES_PER_TASK {
                    let st = qmp.query_status().await.unwrap();
                    assert!(
                        (st.running && st.status == "running")
                            || (!st.running && st.status == "paused"),
                        "{st:?}"
                    );
                    // Replies are matched by id: a different command's reply must never
                    // arrive here.
                    let m = qmp.query_migrate().await.unwrap();
                    assert_eq!(m.status, "none");
                }
            })
        })
        .collect();
    toggler.await.unwrap();
    for q in queriers {
        q.await.unwrap();
    }
    let mut names = Vec::new();
    while names.len() < 2 * TOGGLES {
        let ev = tokio::time::timeout(PROMPTLY, events.recv())
            .await
            .expect("events stopped coming")
            .unwrap();
        names.push(ev.name);
    }
    let expected: Vec<String> = (0..TOGGLES)
        .flat_map(|_| ["RESUME".to_string(), "STOP".to_string()])
        .collect();
    assert_eq!(names, expected);
}

#[tokio::test]
async fn query_block_reports_nodes() {
    const DISK_SIZE: u64 = 4 << 20;
    let Some(mut vm) = Vm::start(
        &[
            "-blockdev",
            "driver=file,filename={dir}/disk.raw,node-name=f0",
            "-blockdev",
            "driver=raw,file=f0,node-name=disk0",
            "-device",
            "virtio-blk-pci,drive=disk0,id=vd0",
        ],
        |dir| {
            std::fs::File::create(dir.join("disk.raw"))
                .unwrap()
                .set_len(DISK_SIZE)
                .unwrap();
        },
    ) else {
        return;
    };
    let qmp = vm.connect().await;
    let disk_path = vm.dir.path().join("disk.raw");

    let blocks = qmp.query_block().await.unwrap();
    eprintln!("{blocks:#?}");
    let b = blocks
        .iter()
        .find(|b| b.qdev.as_deref().is_some_and(|q| q.contains("vd0")))
        .expect("the virtio disk in query-block");
    let ins = b.inserted.as_ref().expect("a medium");
    assert_eq!(ins.node_name, "disk0");
    assert_eq!(ins.drv, "raw");
    assert_eq!(ins.file, disk_path.to_str().unwrap());
    assert_eq!(ins.backing_file, None);
    assert_eq!(ins.image.format, "raw");
    assert_eq!(ins.image.virtual_size, DISK_SIZE);

    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n.node_name.as_str()).collect();
    assert!(
        names.contains(&"disk0") && names.contains(&"f0"),
        "{names:?}"
    );
    let f0 = nodes.iter().find(|n| n.node_name == "f0").unwrap();
    assert_eq!(f0.drv, "file");
    assert_eq!(f0.image.virtual_size, DISK_SIZE);
}

#[tokio::test]
async fn peer_pid_is_qemus_pid() {
    let Some(mut vm) = Vm::start(&[], |_| {}) else {
        return;
    };
    let qmp = vm.connect().await;
    assert_eq!(qmp.peer_pid(), Some(vm.pid()));
}

#[tokio::test]
async fn stuck_and_killed_qemu_are_detected() {
    let Some(mut vm) = Vm::start(&[], |_| {}) else {
        return;
    };
    let qmp = Arc::new(vm.connect().await);
    let pid = vm.pid();

    // A stuck QEMU (SIGSTOP): the command times out, the session survives.
    signal(pid, libc::SIGSTOP);
    let e = qmp
        .execute_with_timeout("query-status", Value::Null, Duration::from_millis(300))
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, QmpError::Timeout { command, .. } if command == "query-status"),
        "{e:?}"
    );
    signal(pid, libc::SIGCONT);
    // The late reply to the timed-out command is ignored; new commands work.
    assert!(!qmp.query_status().await.unwrap().running);

    // Killed while a command is pending: Closed, promptly, for the command and for waiters.
    signal(pid, libc::SIGSTOP);
    let mut events = qmp.events();
    let pending = {
        let qmp = qmp.clone();
        tokio::spawn(async move { qmp.query_status().await })
    };
    let waiter = tokio::spawn(async move { events.wait_for("RESUME", |_| true, PROMPTLY).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    let e = tokio::time::timeout(PROMPTLY, pending)
        .await
        .expect("a killed QEMU went unnoticed")
        .unwrap()
        .unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, QmpError::Closed { command, .. } if command == "query-status"),
        "{e:?}"
    );
    let e = tokio::time::timeout(PROMPTLY, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, QmpError::Closed { .. }), "{e:?}");
    assert!(qmp.is_closed());
    // Later commands fail at once.
    let e = qmp.execute("cont", Value::Null).await.unwrap_err();
    assert!(matches!(e, QmpError::Closed { .. }), "{e:?}");
}

#[tokio::test]
async fn connect_to_missing_socket() {
    let dir = scratch_dir();
    let path = dir.path().join("nothing.sock");
    let e = Qmp::connect(&path).await.unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, QmpError::Connect { path: p, .. } if *p == path),
        "{e:?}"
    );
}

// ---- Fake servers: protocol errors a real QEMU does not produce. ----

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// Short timeouts so that the greeting-timeout test stays well under 2 s.
const FAST: Timeouts = Timeouts {
    greeting: Duration::from_millis(300),
    command: Duration::from_secs(5),
};

/// Listens on a fresh socket and runs `serve` on the first connection.
fn fake_server<F, Fut>(serve: F) -> (tempfile::TempDir, PathBuf)
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = scratch_dir();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        serve(s).await;
    });
    (dir, path)
}

/// Reads one command from the client and returns its id.
async fn read_command(rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> (String, Value) {
    let mut line = String::new();
    rd.read_line(&mut line).await.unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    (v["execute"].as_str().unwrap().to_owned(), v["id"].clone())
}

/// Greets, accepts `qmp_capabilities`, then hands over.
async fn handshake(
    s: UnixStream,
) -> (
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
) {
    let (rd, mut wr) = s.into_split();
    let mut rd = BufReader::new(rd);
    wr.write_all(format!("{GREETING}\r\n").as_bytes())
        .await
        .unwrap();
    let (cmd, id) = read_command(&mut rd).await;
    assert_eq!(cmd, "qmp_capabilities");
    wr.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\r\n").as_bytes())
        .await
        .unwrap();
    (rd, wr)
}

#[tokio::test]
async fn silent_server_times_out_the_greeting() {
    let (_dir, path) = fake_server(|s| async move {
        // Accept and say nothing; keep the socket open past the client's timeout.
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(s);
    });
    let started = Instant::now();
    let e = Qmp::connect_with(&path, FAST).await.unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, QmpError::Timeout { command, .. } if command.contains("greeting")),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn garbage_instead_of_greeting() {
    let (_dir, path) = fake_server(|mut s| async move {
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let e = Qmp::connect_with(&path, FAST).await.unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");

    // Valid JSON, but not a greeting.
    let (_dir, path) = fake_server(|mut s| async move {
        let _ = s.write_all(b"{\"return\": {}, \"id\": 1}\n").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let e = Qmp::connect_with(&path, FAST).await.unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, QmpError::Greeting(_)), "{e:?}");
}

#[tokio::test]
async fn oversized_line_is_a_protocol_error() {
    let (_dir, path) = fake_server(|mut s| async move {
        let chunk = vec![b' '; 1 << 20];
        // One line of MAX_LINE + 1 MiB spaces and no newline: the client must stop reading.
        for _ in 0..=(MAX_LINE >> 20) {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let timeouts = Timeouts {
        greeting: Duration::from_secs(10),
        ..FAST
    };
    let e = Qmp::connect_with(&path, timeouts).await.unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, QmpError::Protocol(m) if m.contains("longer than")),
        "{e:?}"
    );
}

#[tokio::test]
async fn malformed_reply_fails_the_connection() {
    let (_dir, path) = fake_server(|s| async move {
        let (mut rd, mut wr) = handshake(s).await;
        // A reply to an unknown id (e.g. a command that timed out) is ignored...
        let (_, id) = read_command(&mut rd).await;
        wr.write_all(b"{\"return\": {}, \"id\": 999999}\n")
            .await
            .unwrap();
        // ...an event may come before the reply...
        wr.write_all(
            b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n",
        )
        .await
        .unwrap();
        let reply = json!({"return": {"running": false, "status": "paused"}, "id": id});
        wr.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        // ...but half a JSON object is the end of the session.
        let (_, _) = read_command(&mut rd).await;
        wr.write_all(b"{\"return\": {\"running\": tr\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let qmp = Qmp::connect_with(&path, FAST).await.unwrap();
    assert_eq!(qmp.version(), (7, 2, 0));
    assert_eq!(qmp.peer_pid(), Some(std::process::id()));
    let mut events = qmp.events();
    let st = qmp.query_status().await.unwrap();
    assert_eq!(st.status, "paused");
    let ev = events.wait_for("STOP", |_| true, PROMPTLY).await.unwrap();
    assert_eq!(ev.timestamp, Some((1, 2)));

    let e = qmp.query_status().await.unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, QmpError::Protocol(m) if m.contains("invalid JSON")),
        "{e:?}"
    );
    assert!(qmp.is_closed());
    let e = qmp.query_status().await.unwrap_err();
    assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
}

#[tokio::test]
async fn greeting_then_malformed_capabilities_reply() {
    let (_dir, path) = fake_server(|s| async move {
        let (rd, mut wr) = s.into_split();
        let mut rd = BufReader::new(rd);
        wr.write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        let _ = read_command(&mut rd).await;
        // Valid JSON of the wrong shape, then nonsense.
        wr.write_all(b"{\"error\": {\"class\": 42}, \"id\": 1}\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let e = Qmp::connect_with(&path, FAST).await.unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
}
