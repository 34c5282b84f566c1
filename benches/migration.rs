//! Live migration with storage of a paused guest (1 GiB random RAM, 1 GiB random raw disk by
//! default) through each path: direct UNIX sockets (QMP driven here, the same sequence migtun
//! uses), socat, stunnel, ssh -L, QEMU's native TLS (tls-creds-x509 on migration and NBD), and
//! `migtun migrate` over TLS and QUIC. Total, mirror and RAM time; the destination's RAM file and
//! disk are compared with the source's. See `benches/README.md`.
//!
//! `cargo bench --bench migration [-- --reps 3 --ram-mib 1024 --disk-mib 1024 --only direct,migtun]`

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};

#[derive(Clone, Copy)]
enum Kind {
    /// QMP driven here; the source reaches the destination's sockets through this tunnel.
    Tunnel(SetupFn),
    /// QMP driven here, direct sockets, QEMU's own TLS on the migration stream and NBD.
    QemuTls,
    /// `migtun migrate` through two agents with this transport and these extra arguments.
    Migtun(&'static str, &'static [&'static str]),
}

/// The paths, in table order. Adding one is one line here.
const PATHS: &[(&str, Kind)] = &[
    ("direct", Kind::Tunnel(|_, f| direct(f))),
    ("socat", Kind::Tunnel(socat)),
    ("stunnel", Kind::Tunnel(stunnel)),
    ("ssh", Kind::Tunnel(ssh)),
    ("qemu-tls", Kind::QemuTls),
    ("migtun", Kind::Migtun("tls", &[])),
    // What the bench passed before `migtun migrate` lifted QEMU's limit by default: shows that the
    // default is as fast as asking for "unlimited" by hand.
    ("migtun-1e11", Kind::Migtun("tls", &["--max-bandwidth", "100000000000"])),
    ("migtun-quic", Kind::Migtun("quic", &[])),
];

/// `cargo bench --bench migration -- [OPTIONS]`; see `benches/README.md`.
#[derive(clap::Parser, Debug)]
#[command(name = "migration", bin_name = "cargo bench --bench migration --", about = "Live migration with storage of a guest through each path")]
struct Args {
    /// Reps per path (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 3)]
    reps: usize,
    /// Guest RAM in MiB, filled with random data (at least 16).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    ram_mib: u64,
    /// Raw disk in MiB, filled with random data (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    disk_mib: u64,
    /// Paths, comma-separated.
    #[arg(long, value_name = "a,b", default_value_t = Names::all(&names_of(PATHS)), value_parser = only_paths)]
    only: Names,
    /// Bytes per second; 0: no limit, what `migtun migrate` does without the flag (the QMP-driven
    /// paths set the same "unlimited" value, as libvirt does).
    #[arg(long, value_name = "BYTES_PER_S", default_value_t = 0)]
    max_bandwidth: u64,
    /// A running guest (default: paused); `--running false` is the default.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    running: bool,
    /// Multifd channels on every path, 1: one stream, clamped to 1..=255 [default: migtun migrate's default].
    #[arg(long, value_name = "N", value_parser = clamp_parallel)]
    parallel: Option<u8>,
    /// Where the raw numbers go (the table goes next to it as `.md`).
    #[arg(long, value_name = "FILE", default_value_os_t = json_out_path("migration"))]
    json: PathBuf,
    #[command(flatten)]
    cargo: CargoBench,
}

/// `--only`: names of `PATHS`.
fn only_paths(v: &str) -> Result<Names, String> {
    Names::parse(v, &names_of(PATHS), false)
}

/// `--parallel`: any number, clamped to a multifd channel count QEMU takes (1..=255).
fn clamp_parallel(v: &str) -> Result<u8, String> {
    let n: u64 = v.parse().map_err(|e| format!("{v:?}: {e}"))?;
    Ok(n.clamp(1, 255) as u8)
}

/// The arguments, with the floors the bench always applied.
fn parse_args() -> Args {
    let mut a = <Args as clap::Parser>::parse();
    a.reps = a.reps.max(1);
    a.ram_mib = a.ram_mib.max(16);
    a.disk_mib = a.disk_mib.max(1);
    a
}

// ---------------------------------------------------------------------------------------------
// A small blocking QMP client.

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            r: BufReader::new(s),
            w,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)
            .map_err(|e| format!("QMP greeting: {e}"))?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": name });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args.clone();
        }
        let line = format!("{msg}\n");
        self.w
            .write_all(line.as_bytes())
            .map_err(|e| format!("{name}: {e}"))?;
        loop {
            let mut l = String::new();
            if self
                .r
                .read_line(&mut l)
                .map_err(|e| format!("{name}: {e}"))?
                == 0
            {
                return Err(format!("{name}: QMP closed"));
            }
            let v: Value = serde_json::from_str(&l).map_err(|e| format!("{name}: {e}: {l}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!(
                    "{name} {args}: {}",
                    e["desc"].as_str().unwrap_or("error")
                ));
            }
        }
    }

    /// Polls `query-migrate` until its status is one of `want` (an error on `failed`/`cancelled`).
    fn wait_migrate(&mut self, want: &[&str], timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.cmd("query-migrate", json!({}))?;
            let st = m["status"].as_str().unwrap_or("");
            if want.contains(&st) {
                return Ok(m);
            }
            if st == "failed" || st == "cancelled" {
                return Err(format!(
                    "migration {st}: {}",
                    m["error-desc"].as_str().unwrap_or("")
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("migration still {st:?} after {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Guests

struct Ctx {
    qemu: PathBuf,
    accel: &'static str,
    work: PathBuf,
    ram: PathBuf,
    disk: PathBuf,
    ram_mib: u64,
    disk_mib: u64,
    max_bandwidth: u64,
    /// The guest runs (no `-S`); then the RAM is compared above the first MiB only, where the
    /// firmware of a guest with no bootable disk keeps writing on the destination.
    running: bool,
    /// multifd channels of the QMP-driven paths: `--parallel`, else what `migtun migrate`
    /// picks by default on this host, so that every path migrates with the same settings.
    parallel: Option<u8>,
    /// `--parallel` as given, passed to `migtun migrate` (`None`: its default).
    migtun_parallel: Option<u8>,
}

fn random_file(path: &Path, mib: u64, seed: u64) -> Result<(), String> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut f = fs::File::create(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// QEMU's arguments for a guest with this RAM file and disk.
fn qemu_cmd(c: &Ctx, ram: &Path, disk: &Path, qmp: &Path, extra: &[String]) -> Command {
    let mut cmd = Command::new(&c.qemu);
    cmd.args([
        "-name",
        "guest=bench",
        "-machine",
        "pc,memory-backend=ram0",
        "-accel",
        c.accel,
        "-m",
    ])
    .arg(format!("{}M", c.ram_mib))
    .args(["-nodefaults", "-display", "none"])
    .args(if c.running { &[][..] } else { &["-S"][..] })
    .arg("-object")
    .arg(format!(
        "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
        c.ram_mib,
        ram.display()
    ))
    .arg("-blockdev")
    .arg(format!(
        "driver=file,filename={},node-name=f0",
        disk.display()
    ))
    .args([
        "-blockdev",
        "driver=raw,file=f0,node-name=d0",
        "-device",
        "virtio-blk-pci,drive=d0,id=vd0",
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .args(extra);
    cmd
}

/// Pages of a running guest's RAM that may differ between source and destination (4 MiB): the
/// firmware of a guest with no bootable disk keeps running on the destination after the
/// switchover (its stack, timers, tables; 66 pages were seen after a few seconds). A lost or
/// corrupted stream differs in nearly every page of random RAM (262,144 pages per GiB).
const RUNNING_GUEST_DIRTY_PAGES: u64 = 1024;

/// Compares two RAM files: exactly for a paused guest; for a running one, all but at most
/// [`RUNNING_GUEST_DIRTY_PAGES`] 4 KiB pages must be equal.
fn same_ram(c: &Ctx, a: &Path, b: &Path) -> Result<(), String> {
    if !c.running {
        return same(a, b);
    }
    let (fa, fb) = (
        fs::read(a).map_err(|e| format!("{}: {e}", a.display()))?,
        fs::read(b).map_err(|e| format!("{}: {e}", b.display()))?,
    );
    if fa.len() != fb.len() {
        return Err(format!("{} has {} bytes, {} has {}", a.display(), fa.len(), b.display(), fb.len()));
    }
    let differing = fa.chunks(4096).zip(fb.chunks(4096)).filter(|(x, y)| x != y).count() as u64;
    if differing > RUNNING_GUEST_DIRTY_PAGES {
        return Err(format!("{} and {} differ in {differing} pages of 4 KiB", a.display(), b.display()));
    }
    Ok(())
}

/// Compares two files; `Err` names the first differing byte.
fn same(a: &Path, b: &Path) -> Result<(), String> {
    let (mut fa, mut fb) = (
        fs::File::open(a).map_err(|e| format!("{}: {e}", a.display()))?,
        fs::File::open(b).map_err(|e| format!("{}: {e}", b.display()))?,
    );
    let (la, lb) = (
        fa.metadata().map(|m| m.len()).unwrap_or(0),
        fb.metadata().map(|m| m.len()).unwrap_or(1),
    );
    if la != lb {
        return Err(format!(
            "{} has {la} bytes, {} has {lb}",
            a.display(),
            b.display()
        ));
    }
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        fb.read_exact(&mut bb[..n]).map_err(|e| e.to_string())?;
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0) as u64;
            return Err(format!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i
            ));
        }
        off += n as u64;
    }
}

#[derive(Default)]
struct Times {
    total: f64,
    mirror: f64,
    ram: f64,
    verified: String,
    /// Relaying processes: (name, CPU seconds during the rep, VmHWM KiB at the end).
    relays: Vec<(String, f64, u64)>,
}

fn relay_snapshot(t: &Tunnel) -> Vec<f64> {
    t.agents.iter().map(|a| cpu_secs_group(a.1)).collect()
}

fn relay_figures(t: &Tunnel, before: &[f64]) -> Vec<(String, f64, u64)> {
    t.agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                a.0.clone(),
                cpu_secs_group(a.1) - before.get(i).copied().unwrap_or(0.0),
                rss_kib(a.1).map(|r| r.1).unwrap_or(0),
            )
        })
        .collect()
}

/// The destination's sockets for the QMP-driven paths (fixed so that tunnels can point at them).
fn dst_paths(c: &Ctx) -> (PathBuf, PathBuf, PathBuf) {
    let d = c.work.join("dst");
    (d.clone(), d.join("ram.sock"), d.join("nbd.sock"))
}

/// One migration driven over QMP here, the sequence migtun uses (control/src/destination/incoming.rs and
/// driver.rs): destination `nbd-server-start` + `block-export-add` + `migrate-incoming`;
/// source `blockdev-add` nbd + `blockdev-mirror` until ready, `pause-before-switchover`,
/// `migrate`, at `pre-switchover` `block-job-cancel` then `migrate-continue`; destination
/// `nbd-server-stop` once completed. `tls`: (server dir, client dir) for tls-creds-x509.
fn qmp_rep(
    c: &Ctx,
    tunnel: &Tunnel,
    ram_entry: &Path,
    nbd_entry: &Path,
    tls: Option<(&Path, &Path)>,
) -> Result<Times, String> {
    let (dst, ram_sock, nbd_sock) = dst_paths(c);
    let _ = fs::remove_dir_all(&dst);
    fs::create_dir_all(&dst).map_err(|e| e.to_string())?;
    // The source (not timed).
    let src_qmp = c.work.join("src.qmp");
    let _ = fs::remove_file(&src_qmp);
    let src_extra: Vec<String> = match tls {
        Some((_, client)) => vec![
            "-object".into(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client,verify-peer=on",
                client.display()
            ),
        ],
        None => vec![],
    };
    let src_proc = Proc::spawn(
        "source QEMU",
        &mut qemu_cmd(c, &c.ram, &c.disk, &src_qmp, &src_extra),
        c.work.join("qemu-src.log"),
    )?;
    let mut src = Qmp::connect(&src_qmp).map_err(|e| format!("{e}\n{}", src_proc.log_tail()))?;
    let cpu0 = relay_snapshot(tunnel);

    let t0 = Instant::now();
    let (dram, ddisk, dqmp) = (dst.join("ram"), dst.join("disk.raw"), dst.join("qmp.sock"));
    fs::File::create(&ddisk)
        .and_then(|f| f.set_len(c.disk_mib << 20))
        .map_err(|e| e.to_string())?;
    let mut dst_extra: Vec<String> = vec!["-incoming".into(), "defer".into()];
    if let Some((server, _)) = tls {
        dst_extra.push("-object".into());
        dst_extra.push(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
            server.display()
        ));
    }
    let dst_proc = Proc::spawn(
        "destination QEMU",
        &mut qemu_cmd(c, &dram, &ddisk, &dqmp, &dst_extra),
        c.work.join("qemu-dst.log"),
    )?;
    let mut dq = Qmp::connect(&dqmp).map_err(|e| format!("{e}\n{}", dst_proc.log_tail()))?;
    let mut nbd_start = json!({"addr": {"type": "unix", "data": {"path": nbd_sock}}});
    if tls.is_some() {
        nbd_start["tls-creds"] = "tls0".into();
    }
    dq.cmd("nbd-server-start", nbd_start)?;
    dq.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "mig-d0", "node-name": "d0", "writable": true, "name": "d0"}),
    )?;
    dq.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": c.parallel.is_some()}]}),
    )?;
    if let Some(n) = c.parallel {
        dq.cmd("migrate-set-parameters", json!({"multifd-channels": n}))?;
    }
    if tls.is_some() {
        dq.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}))?;
    }
    dq.cmd(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", ram_sock.display())}),
    )?;

    let mut add = json!({"driver": "nbd", "server": {"type": "unix", "path": nbd_entry}, "export": "d0", "node-name": "tgt0"});
    if tls.is_some() {
        add["tls-creds"] = "tls0".into();
        add["tls-hostname"] = "localhost".into();
    }
    src.cmd("blockdev-add", add)?;
    let tm0 = Instant::now();
    src.cmd(
        "blockdev-mirror",
        json!({"job-id": "mirror-d0", "device": "d0", "target": "tgt0", "sync": "full"}),
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = src.cmd("query-block-jobs", json!({}))?;
        let j = jobs
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .ok_or("the mirror job vanished")?;
        if j["ready"] == true {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("mirror not ready: {j}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    let mirror = tm0.elapsed().as_secs_f64();
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "pause-before-switchover", "state": true},
            {"capability": "multifd", "state": c.parallel.is_some()}]}),
    )?;
    let mut params = serde_json::Map::new();
    if let Some(n) = c.parallel {
        params.insert("multifd-channels".into(), json!(n));
    }
    let bandwidth = if c.max_bandwidth > 0 { c.max_bandwidth } else { migtun_control::machine::UNLIMITED_BANDWIDTH };
    params.insert("max-bandwidth".into(), json!(bandwidth));
    if tls.is_some() {
        params.insert("tls-creds".into(), json!("tls0"));
        params.insert("tls-hostname".into(), json!("localhost"));
    }
    if !params.is_empty() {
        src.cmd("migrate-set-parameters", Value::Object(params))?;
    }
    let tr0 = Instant::now();
    src.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", ram_entry.display())}),
    )?;
    src.wait_migrate(&["pre-switchover"], Duration::from_secs(600))?;
    src.cmd("block-job-cancel", json!({"device": "mirror-d0"}))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while src
        .cmd("query-block-jobs", json!({}))?
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        if Instant::now() > deadline {
            return Err("the mirror did not complete".into());
        }
        thread::sleep(Duration::from_millis(2));
    }
    src.cmd("migrate-continue", json!({"state": "pre-switchover"}))?;
    src.wait_migrate(&["completed"], Duration::from_secs(600))?;
    let ram = tr0.elapsed().as_secs_f64();
    dq.wait_migrate(&["completed"], Duration::from_secs(60))?;
    dq.cmd("nbd-server-stop", json!({}))?;
    let total = t0.elapsed().as_secs_f64();
    let relays = relay_figures(tunnel, &cpu0);

    let _ = src.cmd("quit", json!({}));
    drop(src_proc);
    same_ram(c, &c.ram, &dram)?;
    same(&c.disk, &ddisk)?;
    let _ = dq.cmd("quit", json!({}));
    drop(dst_proc);
    let _ = fs::remove_dir_all(&dst);
    Ok(Times {
        total,
        mirror,
        ram,
        verified: "RAM and disk identical".into(),
        relays,
    })
}

/// One `migtun migrate` (the agents' prepare hook starts the destination).
fn migtun_rep(c: &Ctx, tunnel: &Tunnel, run_dir: &Path, extra: &[&str]) -> Result<Times, String> {
    let admin = tunnel.admin.clone().ok_or("no admin socket")?;
    let src_qmp = c.work.join("src.qmp");
    let _ = fs::remove_file(&src_qmp);
    let mut src_proc = Proc::spawn(
        "source QEMU",
        &mut qemu_cmd(c, &c.ram, &c.disk, &src_qmp, &[]),
        c.work.join("qemu-src.log"),
    )?;
    Qmp::connect(&src_qmp).map_err(|e| format!("{e}\n{}", src_proc.log_tail()))?;
    let cpu0 = relay_snapshot(tunnel);
    let mut cmd = Command::new(MIGTUN);
    cmd.arg("migrate")
        .arg("--admin")
        .arg(&admin)
        .arg("--qmp")
        .arg(&src_qmp)
        .args(["--to", "host-b", "--json"]);
    if c.max_bandwidth > 0 {
        cmd.args(["--max-bandwidth", &c.max_bandwidth.to_string()]);
    }
    if let Some(n) = c.migtun_parallel {
        cmd.args(["--parallel", &n.to_string()]);
    }
    cmd.args(extra);
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut events: Vec<(f64, Value)> = vec![];
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            events.push((t0.elapsed().as_secs_f64(), v));
        }
    }
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let status = child.wait().map_err(|e| e.to_string())?;
    let total = t0.elapsed().as_secs_f64();
    let relays = relay_figures(tunnel, &cpu0);
    let id = events
        .iter()
        .find_map(|(_, e)| e.get("id").and_then(|i| i.as_str()).map(String::from));
    let dest = id.as_ref().map(|id| run_dir.join("run-host-b").join(id));
    let mut guard = dest
        .as_ref()
        .map(|d| PidFileGuard::new(d.join("qemu.pid"), "qemu"));
    if let Some(g) = guard.as_mut() {
        g.arm();
    }
    let done = events
        .iter()
        .rev()
        .find(|(_, e)| e["event"] == "done")
        .map(|(_, e)| e.clone())
        .unwrap_or_default();
    if !status.success() || done["outcome"] != "succeeded" {
        return Err(format!(
            "migtun migrate: {status}: {done} {}",
            err.lines().last().unwrap_or("")
        ));
    }
    let phase_at = |needle: &str| {
        events
            .iter()
            .find(|(_, e)| {
                e["event"] == "phase" && (e["phase"] == needle || e["step"].as_str().is_some_and(|s| s.contains(needle)))
            })
            .map(|(t, _)| *t)
    };
    let (sync, migrating, finish) = (
        phase_at("syncing"),
        phase_at("migrating"),
        phase_at("finish"),
    );
    let dest = dest.unwrap();
    // The source has quit (Confirm); wait for it so its RAM file is settled.
    let deadline = Instant::now() + Duration::from_secs(20);
    while src_proc.exited().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    drop(src_proc);
    let images = run_dir.join("images-host-b").join(dest.file_name().ok_or("no migration directory")?);
    let name = |p: &Path| p.file_name().unwrap().to_owned();
    same_ram(c, &c.ram, &images.join(name(&c.ram)))?;
    same(&c.disk, &images.join(name(&c.disk)))?;
    drop(guard);
    let _ = fs::remove_dir_all(&dest);
    let _ = fs::remove_dir_all(&images);
    Ok(Times {
        total,
        mirror: match (sync, migrating) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        },
        ram: match (migrating, finish) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        },
        verified: "RAM and disk identical".into(),
        relays,
    })
}

/// tls-creds-x509 directories for QEMU: (server dir, client dir).
fn qemu_tls_dirs(work: &Path) -> Result<(PathBuf, PathBuf), String> {
    let pki = work.join("qemu-pki");
    openssl_certs(&pki, &["localhost", "client"])?;
    let (server, client) = (work.join("qemu-tls-server"), work.join("qemu-tls-client"));
    for (d, files) in [
        (
            &server,
            [
                ("ca.pem", "ca-cert.pem"),
                ("localhost.pem", "server-cert.pem"),
                ("localhost.key", "server-key.pem"),
            ],
        ),
        (
            &client,
            [
                ("ca.pem", "ca-cert.pem"),
                ("client.pem", "client-cert.pem"),
                ("client.key", "client-key.pem"),
            ],
        ),
    ] {
        fs::create_dir_all(d).map_err(|e| e.to_string())?;
        for (from, to) in files {
            fs::copy(pki.join(from), d.join(to)).map_err(|e| e.to_string())?;
        }
    }
    Ok((server, client))
}

/// QEMU's major version, from `qemu-system-x86_64 --version` ("QEMU emulator version 7.2.22 ...").
fn qemu_major(qemu: &Path) -> Option<u64> {
    let out = Command::new(qemu).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split("version ").nth(1)?;
    version.split('.').next()?.trim().parse().ok()
}

fn main() {
    let args = parse_args();
    install_signal_handlers();
    raise_nofile();
    let machine = machine_info();
    let Some(qemu) = find_bin(&["qemu-system-x86_64"]) else {
        let md = "## Live migration\n\nskipped: qemu-system-x86_64 not installed (apt-get install qemu-system-x86 qemu-utils)\n";
        println!("{md}");
        write_markdown(&args.json, md);
        write_json(
            &args.json,
            &json!({"machine": machine, "status": "skipped", "message": "qemu-system-x86_64 not installed"}),
        );
        return;
    };
    let accel = if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        "kvm"
    } else {
        "tcg"
    };
    let tmp = tempfile::Builder::new()
        .prefix("mtm")
        .tempdir_in("/dev/shm")
        .expect("temp dir on /dev/shm");
    let work = tmp.path().to_path_buf();
    let c = Ctx {
        qemu: qemu.clone(),
        accel,
        ram: work.join("ram-src"),
        disk: work.join("disk0.raw"),
        work: work.clone(),
        ram_mib: args.ram_mib,
        disk_mib: args.disk_mib,
        max_bandwidth: args.max_bandwidth,
        running: args.running,
        parallel: args.parallel.or_else(|| {
            let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            migtun_control::machine::default_parallel(cpus, false, qemu_major(&qemu))
        })
        .filter(|n| *n > 1),
        migtun_parallel: args.parallel,
    };
    eprintln!(
        "migration: {} guest, {} MiB random RAM, {} MiB random raw disk, {accel}, {} reps, max-bandwidth {}, multifd {}, paths {}, work dir {}",
        if args.running { "running" } else { "paused" },
        args.ram_mib,
        args.disk_mib,
        args.reps,
        if args.max_bandwidth > 0 { args.max_bandwidth.to_string() } else { "default (no limit)".into() },
        c.parallel.map(|n| format!("{n} channels")).unwrap_or_else(|| "off".into()),
        args.only.join(","),
        work.display()
    );
    random_file(&c.ram, args.ram_mib, 1).expect("RAM file");
    random_file(&c.disk, args.disk_mib, 2).expect("disk file");
    let qemu_version = first_line(Command::new(&qemu).arg("--version"), "version");
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prepare-hook");

    let mut results = vec![];
    for (name, kind) in PATHS {
        if !args.only.iter().any(|o| o == name) {
            continue;
        }
        let mut r = json!({"path": name, "status": "ok", "message": "", "note": ""});
        let (dst, ram_sock, nbd_sock) = dst_paths(&c);
        let _ = fs::create_dir_all(&dst);
        let fwds = [
            Fwd {
                local: work.join(format!("{name}-ram.sock")),
                target: ram_sock.clone(),
            },
            Fwd {
                local: work.join(format!("{name}-nbd.sock")),
                target: nbd_sock.clone(),
            },
        ];
        let run_dir = work.join(format!("{name}-run"));
        let setup = match kind {
            Kind::Tunnel(f) => f(&work, &fwds),
            Kind::QemuTls => direct(&fwds),
            Kind::Migtun(t, _) => match if *t == "quic" {
                quic_accepted(&work)
            } else {
                Ok(())
            } {
                Err(why) => Ok(Setup::Skipped(why)),
                Ok(()) => migtun(
                    &work,
                    &[],
                    &MigtunOpts {
                        transport: t.to_string(),
                        qemu_hook: Some(hook.clone()),
                        run_dir: Some(run_dir.clone()),
                    },
                ),
            },
        };
        let tunnel = match setup {
            Ok(Setup::Up(t)) => t,
            Ok(Setup::Skipped(why)) => {
                eprintln!("{name}: {why}");
                r["status"] = "skipped".into();
                r["message"] = why.into();
                results.push(r);
                continue;
            }
            Err(e) => {
                eprintln!("{name}: failed to start: {e}");
                r["status"] = "error".into();
                r["message"] =
                    format!("failed to start: {}", e.lines().next().unwrap_or("")).into();
                results.push(r);
                continue;
            }
        };
        let tls_dirs = match kind {
            Kind::QemuTls => match qemu_tls_dirs(&work) {
                Ok(d) => Some(d),
                Err(e) => {
                    r["status"] = "error".into();
                    r["message"] = format!("certificates: {e}").into();
                    results.push(r);
                    continue;
                }
            },
            _ => None,
        };
        r["note"] = match kind {
            Kind::QemuTls => format!(
                "tls-creds-x509 (GnuTLS) on migration and NBD, verify-peer=on; {qemu_version}"
            ),
            _ => tunnel.note.clone(),
        }
        .into();
        let entry = |i: usize| match &tunnel.entries[i] {
            Entry::Unix(p) => p.clone(),
            Entry::Tcp(a) => PathBuf::from(a),
        };
        let mut reps = vec![];
        for i in 0..args.reps {
            let rep = match kind {
                Kind::Migtun(_, extra) => migtun_rep(&c, &tunnel, &run_dir, extra),
                _ => qmp_rep(
                    &c,
                    &tunnel,
                    &entry(0),
                    &entry(1),
                    tls_dirs.as_ref().map(|(s, c)| (s.as_path(), c.as_path())),
                ),
            };
            match rep {
                Ok(t) => {
                    let relays: Vec<String> = t
                        .relays
                        .iter()
                        .map(|x| format!("{} {:.2} CPU s, HWM {} MiB", x.0, x.1, x.2 >> 10))
                        .collect();
                    eprintln!(
                        "{name}: rep {}/{}: total {:.2} s, mirror {:.2} s, RAM {:.2} s; {}{}",
                        i + 1,
                        args.reps,
                        t.total,
                        t.mirror,
                        t.ram,
                        t.verified,
                        if relays.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", relays.join(", "))
                        }
                    );
                    reps.push(json!({
                        "total_s": t.total, "mirror_s": t.mirror, "ram_s": t.ram, "verified": t.verified,
                        "relays": t.relays.iter().map(|x| json!({"name": x.0, "cpu_s": x.1, "vmhwm_kib": x.2})).collect::<Vec<_>>(),
                    }));
                }
                Err(e) => {
                    let tails: Vec<String> = tunnel
                        .procs
                        .iter()
                        .map(|p| format!("{}\n{}", p.log_tail(), p.warnings()))
                        .collect();
                    eprintln!("{name}: rep {} failed: {e}\n{}", i + 1, tails.join("\n"));
                    r["status"] = "error".into();
                    r["message"] =
                        format!("rep {} failed: {}", i + 1, e.lines().next().unwrap_or("")).into();
                    break;
                }
            }
        }
        for k in ["total_s", "mirror_s", "ram_s"] {
            let v: Vec<f64> = reps
                .iter()
                .filter_map(|x| x[k].as_f64())
                .filter(|x| x.is_finite())
                .collect();
            r[format!("median_{k}")] = median(&v).into();
        }
        r["reps"] = reps.into();
        results.push(r);
        drop(tunnel);
        let _ = fs::remove_dir_all(&run_dir);
    }

    let mut out = format!("## Live migration with storage, {} guest\n\n", if args.running { "running" } else { "paused" });
    out.push_str(&machine_md(&machine));
    out.push_str(&format!(
        "- {} MiB random RAM (memory-backend-file on /dev/shm), {} MiB random raw disk, accel {accel}, {qemu_version}; \
         max-bandwidth {}; multifd {}; median of {} reps; after each rep the destination's RAM file and disk are compared byte for byte with the source's\n\
         - total: from the start of the migration (destination QEMU start included: `migtun migrate`'s wall time, or for the QMP-driven paths \
         from creating the destination's disk) to the destination's completion; mirror: `blockdev-mirror` to ready (migtun: phase \
         syncing-disks to migrating); RAM: `migrate` to completed (migtun: phase migrating to finish)\n\n",
        args.ram_mib,
        args.disk_mib,
        if args.max_bandwidth > 0 { format!("{} B/s", args.max_bandwidth) } else { "migtun's default (no limit)".into() },
        match (args.parallel, c.parallel) {
            (_, None) => "off (one stream)".to_string(),
            (Some(n), _) => format!("{n} channels on every path"),
            (None, Some(n)) => format!("{n} channels on every path (migtun migrate's default)"),
        },
        args.reps
    ));
    out.push_str("| path | total s (median) | reps total s | mirror s | RAM s | path / direct | migtun / path | notes |\n|---|---:|---|---:|---:|---:|---:|---|\n");
    let med = |p: &str| {
        results
            .iter()
            .find(|r| r["path"] == p)
            .and_then(|r| r["median_total_s"].as_f64())
    };
    let (d, m) = (med("direct"), med("migtun"));
    let f2 = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    for r in &results {
        let t = r["median_total_s"].as_f64();
        let reps: Vec<String> = r["reps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.2}", x["total_s"].as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        let notes = notes_of(r);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["path"].as_str().unwrap_or(""),
            f2(t),
            if reps.is_empty() {
                "-".into()
            } else {
                reps.join(", ")
            },
            f2(r["median_mirror_s"].as_f64()),
            f2(r["median_ram_s"].as_f64()),
            f2(t.zip(d).map(|(t, d)| t / d)),
            f2(m.zip(t).map(|(m, t)| m / t)),
            notes
        ));
    }
    println!("{out}");
    write_markdown(&args.json, &out);
    let mut mj = machine.clone();
    mj["loadavg_end"] = loadavg().into();
    write_json(
        &args.json,
        &json!({"machine": mj, "ram_mib": args.ram_mib, "disk_mib": args.disk_mib, "accel": accel, "qemu": qemu_version,
                "max_bandwidth": args.max_bandwidth, "running": args.running, "parallel": c.parallel, "reps": args.reps, "paths": results}),
    );
}
