//! Tunnels on demand (`migtun tunnel open|close|list`) between two real `migtun serve` agents:
//! what the tooling that drives QEMU itself (libvirt) relies on. A tunnel's sockets carry bytes
//! exactly with EOF in each direction; close and expiry remove the listeners, routes and
//! directories on both hosts while streams already open run on; the destination refuses what
//! its `[tunnels]` does not grant, naming the key; and two real QEMU migrations to one host at
//! once each run through their own tunnel.
//!
//! Both agents run on this machine, so each has its own `[tunnels] dir` (on two hosts it is the
//! same path, as libvirt gives both QEMUs one path).

mod vm;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vm::{Monitor, Procs, MIGTUN};

struct Pair {
    dir: tempfile::TempDir,
    _agents: Procs,
}

impl Pair {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn admin(&self, host: &str) -> PathBuf {
        self.path(&format!("{host}.admin"))
    }
    /// `[tunnels] dir` of `host`.
    fn tunnels(&self, host: &str) -> PathBuf {
        self.path(&format!("tunnels-{host}"))
    }
    fn logs(&self) -> String {
        ["host-a", "host-b"].iter().map(|h| format!("--- {h}\n{}", std::fs::read_to_string(self.path(&format!("{h}.log"))).unwrap_or_default())).collect()
    }

    /// host-a and host-b; host-b lets host-a open at most `max_open` tunnels, host-a lets no
    /// one open tunnels to it (`allow = []`).
    fn start(max_open: usize) -> Pair {
        Pair::start_with(max_open, "")
    }

    /// [`Pair::start`], with `extra` added to both hosts' `[tunnels]`.
    fn start_with(max_open: usize, extra: &str) -> Pair {
        let dir = tempfile::Builder::new().prefix("mt-tun-").tempdir_in("/dev/shm").unwrap();
        let pki = dir.path().join("pki");
        vm::run(Command::new(MIGTUN).args(["certs", "init", "--dir"]).arg(&pki));
        for h in ["host-a", "host-b"] {
            vm::run(Command::new(MIGTUN).args(["certs", "issue", "--dir"]).arg(&pki).args(["--name", h]));
        }
        let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (pa, pb) = (port(), port());
        let mut agents = Procs(Vec::new());
        for (name, me, other, peer, allow) in [("host-a", pa, pb, "host-b", "[]".to_string()), ("host-b", pb, pa, "host-a", "[\"host-a\"]".to_string())] {
            let config = format!(
                "name = \"{name}\"\nlisten = \"{me}\"\nadmin = \"{d}/{name}.admin\"\n\n[tls]\ncert = \"{p}/{name}.pem\"\nkey = \"{p}/{name}.key\"\nca = \"{p}/ca.pem\"\n\n[[peer]]\nname = \"{peer}\"\naddress = \"{other}\"\n\n[tunnels]\ndir = \"{d}/tunnels-{name}\"\nallow = {allow}\nmax_open = {max_open}\n{extra}",
                d = dir.path().display(),
                p = pki.display(),
            );
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(&path, config).unwrap();
            vm::run(Command::new(MIGTUN).args(["check", "--config"]).arg(&path));
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            agents.0.push(Command::new(MIGTUN).args(["serve", "--config"]).arg(&path).stderr(log).stdout(Stdio::null()).spawn().unwrap());
        }
        let pair = Pair { dir, _agents: agents };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(UnixStream::connect(pair.admin("host-a")).is_ok() && UnixStream::connect(pair.admin("host-b")).is_ok()) {
            assert!(Instant::now() < deadline, "agents did not start:\n{}", pair.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        pair
    }

    /// `migtun tunnel ARGS --admin <host's>`: (success, stdout, stderr).
    fn tunnel(&self, host: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(MIGTUN).arg("tunnel").arg(args[0]).arg("--admin").arg(self.admin(host)).args(&args[1..]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Opens tunnel `name` from host-a to host-b: its JSON.
    fn open(&self, name: &str, extra: &[&str]) -> Value {
        let mut args = vec!["open", "--to", "host-b", "--name", name, "--json"];
        args.extend_from_slice(extra);
        let (ok, out, err) = self.tunnel("host-a", &args);
        assert!(ok, "tunnel open {name}: {err}\n{}", self.logs());
        serde_json::from_str(&out).unwrap()
    }

    fn list(&self, host: &str) -> Vec<Value> {
        let (ok, out, err) = self.tunnel(host, &["list", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()["tunnels"].as_array().cloned().unwrap_or_default()
    }

    /// The routes host-b exposes (`migtun status --json`).
    fn routes_b(&self) -> Vec<Value> {
        let out = Command::new(MIGTUN).args(["status", "--json", "--admin"]).arg(self.admin("host-b")).output().unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["routes"].as_array().cloned().unwrap_or_default()
    }
}

/// The path of `socket` in a tunnel's JSON: this host's (`sockets`) or the peer's.
fn path_of(t: &Value, key: &str, socket: &str) -> PathBuf {
    let s = t[key].as_array().unwrap().iter().find(|s| s["socket"] == socket).unwrap_or_else(|| panic!("no {socket} in {t}"));
    PathBuf::from(s["path"].as_str().unwrap())
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `out` on `s` and then its EOF, reads what comes back until EOF; both directions at once.
fn exchange(mut s: UnixStream, out: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&out).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    got
}

fn random(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[i % 4] ^ seed).collect()
}

/// A stream through each socket of a tunnel arrives exactly, EOF in each direction; `list`
/// shows the tunnel on both hosts; close removes the listeners, the routes and the
/// directories on both.
#[test]
fn a_tunnel_carries_bytes_exactly_and_close_removes_it_on_both_hosts() {
    let pair = Pair::start(4);
    let t = pair.open("vm1", &[]);
    assert_eq!(t["direction"], "outgoing");
    for socket in ["migration", "nbd"] {
        let (here, there) = (path_of(&t, "sockets", socket), path_of(&t, "peer_sockets", socket));
        assert_eq!(here, pair.tunnels("host-a").join("vm1").join(format!("{socket}.sock")));
        assert_eq!(there, pair.tunnels("host-b").join("vm1").join(format!("{socket}.sock")));
        // The destination's QEMU listens at `there` (here: the test), the source's connects `here`.
        let listener = UnixListener::bind(&there).unwrap();
        let (to_b, to_a) = (random(3 << 20, 1), random(2 << 20, 2));
        let (expect_b, expect_a) = (to_b.clone(), to_a.clone());
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let got = exchange(s, to_a);
            assert!(got == expect_b, "host-b's end got {} bytes, not the {} sent", got.len(), expect_b.len());
        });
        let got = exchange(UnixStream::connect(&here).unwrap(), to_b);
        assert!(got == expect_a, "host-a's end got {} bytes, not the {} sent", got.len(), expect_a.len());
        server.join().unwrap();
    }
    assert_eq!(pair.list("host-a").len(), 1);
    let b = pair.list("host-b");
    assert_eq!((b.len(), b[0]["direction"].as_str(), b[0]["peer"].as_str()), (1, Some("incoming"), Some("host-a")));
    assert_eq!(pair.routes_b().len(), 2, "host-b exposes the tunnel's two routes");

    let (ok, out, err) = pair.tunnel("host-a", &["close", "--name", "vm1"]);
    assert!(ok && out.contains("closed"), "{out}{err}");
    assert!(!pair.tunnels("host-a").join("vm1").exists(), "host-a's tunnel directory (its sockets) is gone");
    wait_until("host-b closes its side", 10, || !pair.tunnels("host-b").join("vm1").exists() && pair.routes_b().is_empty());
    assert!(pair.list("host-a").is_empty() && pair.list("host-b").is_empty());
    // Closed twice: an error that names the tunnel.
    let (ok, _, err) = pair.tunnel("host-a", &["close", "--name", "vm1"]);
    assert!(!ok && err.contains("no tunnel \"vm1\""), "{err}");
}

/// The gid of group `name` (getent, so the test does not share the code under test).
fn gid_of(name: &str) -> u32 {
    let out = Command::new("getent").args(["group", name]).output().expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':').nth(2).and_then(|g| g.trim().parse().ok()).unwrap_or_else(|| panic!("no group {name}: {line:?}"))
}

/// (uid, gid, permission bits) of `path`, not following a symlink.
fn stat(path: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid(), m.permissions().mode() & 0o7777)
}

/// `[tunnels] owner`, `group` and `mode`, as for libvirt's `libvirt-qemu:kvm` (here `nobody`
/// and `kvm`): a tunnel's directory gets them on both hosts, and the sockets the source agent
/// listens on get the same owner and group with mode 0660 (the destination's are its QEMU's
/// own). Without `group` and `mode`: the owner's primary group and 0750. `dir` itself stays the
/// agent's, 0711.
#[test]
fn tunnel_directories_and_sockets_get_the_configured_owner_group_and_mode() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run this test as root (chown to another user)");
        eprintln!("SKIPPED tunnel_directories_and_sockets_get_the_configured_owner_group_and_mode: needs root to give a directory to another user");
        return;
    }
    let (nobody, kvm, nogroup) = (65534, gid_of("kvm"), gid_of("nogroup"));
    for (extra, dir_ids, mode) in [("owner = \"nobody\"\ngroup = \"kvm\"\nmode = \"0770\"\n", (nobody, kvm), 0o770), ("owner = \"nobody\"\n", (nobody, nogroup), 0o750)] {
        let pair = Pair::start_with(4, extra);
        let t = pair.open("vm1", &[]);
        for host in ["host-a", "host-b"] {
            let (uid, _, bits) = stat(&pair.tunnels(host));
            assert_eq!((uid, bits), (0, 0o711), "{host}'s tunnels.dir is the agent's ({extra})");
            assert_eq!(stat(&pair.tunnels(host).join("vm1")), (dir_ids.0, dir_ids.1, mode), "{host}'s tunnel directory ({extra})");
        }
        for socket in ["migration", "nbd"] {
            assert_eq!(stat(&path_of(&t, "sockets", socket)), (dir_ids.0, dir_ids.1, 0o660), "host-a's {socket} socket ({extra})");
        }
        // Still a working tunnel: the destination's QEMU (here: the test) listens in its directory.
        let listener = UnixListener::bind(path_of(&t, "peer_sockets", "migration")).unwrap();
        let server = std::thread::spawn(move || exchange(listener.accept().unwrap().0, b"pong".to_vec()));
        assert_eq!(exchange(UnixStream::connect(path_of(&t, "sockets", "migration")).unwrap(), b"ping".to_vec()), b"pong");
        assert_eq!(server.join().unwrap(), b"ping");
        let (ok, _, err) = pair.tunnel("host-a", &["close", "--name", "vm1"]);
        assert!(ok, "{err}");
        wait_until("both tunnel directories go", 10, || !pair.tunnels("host-a").join("vm1").exists() && !pair.tunnels("host-b").join("vm1").exists());
    }
}

/// The destination grants only what its `[tunnels]` says, and each refusal names why; a
/// refused tunnel leaves nothing on either host.
#[test]
fn tunnels_are_refused_with_reasons_and_leave_nothing() {
    let pair = Pair::start(2);
    // host-a's [tunnels] allow is empty: host-b may not open tunnels to it.
    let (ok, _, err) = pair.tunnel("host-b", &["open", "--to", "host-a", "--name", "back"]);
    assert!(!ok && err.contains("not in [tunnels] allow of host-a"), "{err}");
    assert!(!pair.tunnels("host-b").join("back").exists());
    for bad in ["../x", "a.b", ".", "-x"] {
        let name = format!("--name={bad}");
        let (ok, _, err) = pair.tunnel("host-a", &["open", "--to", "host-b", &name]);
        assert!(!ok && err.contains("tunnel name"), "{bad}: {err}");
    }
    let (ok, _, err) = pair.tunnel("host-a", &["open", "--to", "host-x", "--name", "vm1"]);
    assert!(!ok && err.contains("host-x"), "an unknown peer is named: {err}");
    pair.open("vm1", &[]);
    let (ok, _, err) = pair.tunnel("host-a", &["open", "--to", "host-b", "--name", "vm1"]);
    assert!(!ok && err.contains("open already"), "{err}");
    pair.open("vm2", &["--socket", "migration"]);
    let (ok, _, err) = pair.tunnel("host-a", &["open", "--to", "host-b", "--name", "vm3"]);
    assert!(!ok && err.contains("max_open"), "the limit is named: {err}");
    assert!(!pair.tunnels("host-a").join("vm3").exists() && !pair.tunnels("host-b").join("vm3").exists());
    assert_eq!(pair.routes_b().len(), 3, "vm1's two routes and vm2's one");
    // A path the destination's QEMU would listen on that is taken by something else: refused.
    std::fs::create_dir_all(pair.tunnels("host-a").join("vm4")).unwrap();
    let (ok, _, err) = pair.tunnel("host-a", &["close", "--name", "vm2"]);
    assert!(ok, "{err}");
    let (ok, _, err) = pair.tunnel("host-a", &["open", "--to", "host-b", "--name", "vm4"]);
    assert!(!ok && err.contains("exists"), "{err}");
    wait_until("host-b closes vm4 again after host-a could not listen", 10, || !pair.tunnels("host-b").join("vm4").exists());
    assert!(pair.tunnels("host-a").join("vm4").exists(), "what was there before is not removed");
}

/// A tunnel closes on both hosts when its TTL passes; a stream opened before runs on, exactly.
#[test]
fn a_tunnel_expires_on_both_hosts_and_open_streams_run_on() {
    let pair = Pair::start(4);
    let t = pair.open("vm1", &["--ttl", "2s", "--socket", "migration"]);
    assert!(t["expires_in_secs"].as_u64().unwrap() <= 2, "{t}");
    let listener = UnixListener::bind(path_of(&t, "peer_sockets", "migration")).unwrap();
    let mut s = UnixStream::connect(path_of(&t, "sockets", "migration")).unwrap();
    let (mut remote, _) = listener.accept().unwrap();
    s.write_all(b"before").unwrap();
    wait_until("the tunnel expires on host-a", 10, || !pair.tunnels("host-a").join("vm1").exists());
    wait_until("the tunnel expires on host-b", 10, || !pair.tunnels("host-b").join("vm1").join("migration.sock").exists() || pair.routes_b().is_empty());
    wait_until("host-b's route is gone", 10, || pair.routes_b().is_empty());
    assert!(UnixStream::connect(path_of(&t, "sockets", "migration")).is_err(), "no new connection after expiry");
    s.write_all(b" and after").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    remote.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"before and after");
}

/// Two live migrations to one host at once, each through its own tunnel, as libvirt does with
/// `--migrateuri unix://<tunnel>/migration.sock`: the destination QEMUs listen on host-b's paths,
/// the source QEMUs connect to host-a's; both guests' RAM arrives byte for byte.
#[test]
fn two_qemu_migrations_at_once_through_their_own_tunnels() {
    let Some(qemu) = vm::qemu() else { return };
    let pair = Pair::start(4);
    let mut procs = Procs(Vec::new());
    let mut runs = Vec::new();
    for (i, name) in ["vm1", "vm2"].into_iter().enumerate() {
        let t = pair.open(name, &["--socket", "migration"]);
        let (src_ram, dst_ram) = (pair.path(&format!("{name}-src.ram")), pair.path(&format!("{name}-dst.ram")));
        vm::random_file(&src_ram, 128 << 20, 40 + i as u64);
        let guest = |ram: &Path, qmp: &Path, extra: &[String]| {
            let mut c = Command::new(&qemu);
            c.args(["-machine", "pc,memory-backend=ram0", "-accel", vm::accel(), "-m", "128M", "-nodefaults", "-display", "none", "-S", "-object"])
                .arg(format!("memory-backend-file,id=ram0,size=128M,mem-path={},share=on", ram.display()))
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()))
                .args(extra)
                .stderr(Stdio::null());
            c.spawn().unwrap()
        };
        let (sq, dq) = (pair.path(&format!("{name}-src.qmp")), pair.path(&format!("{name}-dst.qmp")));
        let incoming = format!("unix:{}", path_of(&t, "peer_sockets", "migration").display());
        procs.0.push(guest(&src_ram, &sq, &[]));
        procs.0.push(guest(&dst_ram, &dq, &["-incoming".into(), incoming]));
        wait_until("the QEMUs start", 20, || sq.exists() && dq.exists() && path_of(&t, "peer_sockets", "migration").exists());
        let src = Monitor::connect(&sq);
        src.cmd("migrate-set-parameters", json!({"max-bandwidth": 100_000_000_000u64})).unwrap();
        src.cmd("migrate", json!({"uri": format!("unix:{}", path_of(&t, "sockets", "migration").display())})).unwrap();
        runs.push((name, src, src_ram, dst_ram, dq));
    }
    for (name, src, src_ram, dst_ram, dq) in &runs {
        wait_until(&format!("{name}'s migration completes:\n{}", pair.logs()), 120, || {
            let s = src.cmd("query-migrate", json!({})).unwrap();
            assert_ne!(s["status"], "failed", "{name}: {s}");
            s["status"] == "completed"
        });
        let dst = Monitor::connect(dq);
        wait_until("the destination has loaded the guest", 30, || dst.cmd("query-migrate", json!({})).unwrap()["status"] == "completed");
        let _ = src.cmd("quit", json!({}));
        assert!(std::fs::read(src_ram).unwrap() == std::fs::read(dst_ram).unwrap(), "{name}'s RAM arrives byte for byte");
        let _ = dst.cmd("quit", json!({}));
    }
    for name in ["vm1", "vm2"] {
        let (ok, _, err) = pair.tunnel("host-a", &["close", "--name", name]);
        assert!(ok, "{err}");
    }
    wait_until("nothing left on host-b", 10, || pair.routes_b().is_empty() && std::fs::read_dir(pair.tunnels("host-b")).unwrap().count() == 0);
}
