//! `migtun demo`: the main job on one machine with no set-up.
//!
//! Makes a throw-away CA and two host identities, writes two configs, starts two real
//! `migtun serve` processes on loopback, carries a stream from a UNIX socket on "host-a" through
//! the encrypted port to a UNIX socket on "host-b", checks every byte, and shows what the agents
//! counted. Everything lives in a temporary directory that is removed at the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use migtun_control::qemu_command::{Accel, DiskFormat, QemuCommand};
use migtun_proxy::metrics::sum_samples;
use rand::{RngCore, SeedableRng};
use xxhash_rust::xxh3::Xxh3;

/// How long the agents get to come up before the demo gives up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const CHUNK: usize = 1 << 20;
/// The example prepare hook, shipped inside the binary so the demo needs no checkout.
const PREPARE_HOOK: &str = include_str!("../../contrib/prepare-hook");
/// The demo guest: RAM and two disks, all random.
const VM_RAM_MIB: u64 = 512;
const VM_RAW_MIB: u64 = 256;
const VM_QCOW2_MIB: u64 = 128;
/// Size of the random pattern the demo sends repeatedly (a multiple of [`CHUNK`]).
const PATTERN: usize = 64 << 20;

pub fn run(size_mib: u64) -> anyhow::Result<()> {
    // tmpfs when there is one: guest RAM and disk images there keep disk write-back out of it.
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = tempfile::Builder::new().prefix("migtun-demo-").tempdir_in(base).context("temporary directory")?;
    let root = dir.path();
    let pki = root.join("pki");
    migtun_certs::init(&pki)?;
    migtun_certs::issue(&pki, "host-a")?;
    migtun_certs::issue(&pki, "host-b")?;
    println!("migtun demo: two host agents on this machine, joined by one mutually authenticated TLS 1.3 port each\n");
    println!("  PKI      {}: a new CA, host-a and host-b certificates (ECDSA P-256)", pki.display());

    let (port_a, port_b, metrics_a, metrics_b) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let forward = root.join("host-a-migration.sock");
    let target = root.join("host-b-incoming.sock");
    let hook = root.join("prepare-hook");
    std::fs::write(&hook, PREPARE_HOOK)?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let config_a = write_config(root, "host-a", port_a, metrics_a, &pki, &format!(
        "[[peer]]\nname = \"host-b\"\naddress = \"{port_b}\"\n\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"migration\"\n",
        forward.display()
    ))?;
    let config_b = write_config(root, "host-b", port_b, metrics_b, &pki, &format!(
        "[[peer]]\nname = \"host-a\"\naddress = \"{port_a}\"\n\n[[expose]]\nroute = \"migration\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
        target.display()
    ))?;
    println!("  host-a   port {port_a}, forward unix:{} -> host-b, route \"migration\"", forward.display());
    println!("  host-b   port {port_b}, route \"migration\" -> unix:{} (allowed: host-a)", target.display());

    // The receiving application on host-b: hashes everything, answers with the digest.
    // XXH3 rather than SHA-256: it checks integrity at memory speed, so the demo's own hashing
    // does not hide the tunnel's throughput (TLS already authenticates every record).
    let sink = UnixListener::bind(&target).context("bind the demo target socket")?;
    let receiver = thread::spawn(move || -> anyhow::Result<(u64, [u8; 16])> {
        let (mut s, _) = sink.accept()?;
        let mut hasher = Xxh3::new();
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            n += k as u64;
        }
        let digest = hasher.digest128().to_le_bytes();
        s.write_all(&digest)?;
        Ok((n, digest))
    });

    let mut agents = Agents(vec![spawn_agent(root, "host-b", &config_b)?, spawn_agent(root, "host-a", &config_a)?]);
    let mut conn = wait_for_socket(&forward, &mut agents, root)?;
    println!("  agents   running (logs in {})\n", root.display());

    let total = size_mib * (1 << 20);
    let bar = ProgressBar::new(total).with_style(
        // IEC units throughout (as `migtun migrate`), the bar as wide as the terminal allows.
        ProgressStyle::with_template("  {wide_bar:.cyan/blue} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Random data, generated once and sent over and over: generating it on the fly would
    // measure the random number generator.
    let mut data = vec![0u8; PATTERN];
    rand::rngs::SmallRng::seed_from_u64(0x6d69_6774_756e).fill_bytes(&mut data);
    let mut offset = 0;
    let mut hasher = Xxh3::new();
    let started = Instant::now();
    let mut left = total;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        let chunk = &data[offset..offset + k];
        offset = (offset + k) % PATTERN;
        hasher.update(chunk);
        conn.write_all(chunk).context("writing into the tunnel")?;
        left -= k as u64;
        bar.inc(k as u64);
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).context("reading the digest back (half-close)")?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let sent = hasher.digest128().to_le_bytes();
    let (received, digest) = receiver.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;

    let rate = super::ui::rate_of(total, elapsed.as_secs_f64());
    println!(
        "  carried  {} ({received} bytes) in {:.2} s: {rate} through TLS 1.3 (AES-128-GCM, mutual auth)",
        indicatif::HumanBytes(received),
        elapsed.as_secs_f64()
    );
    let ok = received == total && digest == sent && answer == digest;
    println!(
        "  check    XXH3-128 of what was sent {} / of what arrived {}: {}",
        hex::encode(sent),
        hex::encode(digest),
        if ok { "identical" } else { "MISMATCH" }
    );

    for (name, port, dir) in [("host-a", metrics_a, "tx"), ("host-b", metrics_b, "rx")] {
        let text = scrape(port).unwrap_or_default();
        let count = |name, labels: &[(&str, &str)]| sum_samples(&text, name, labels) as u64;
        let bytes = count("migtun_bytes_total", &[("route", "migration"), ("direction", dir)]);
        let full = count("migtun_handshakes_total", &[("kind", "full")]);
        let resumed = count("migtun_handshakes_total", &[("kind", "resumed")]);
        let failures = count("migtun_stream_failures_total", &[]);
        println!(
            "  {name}   metrics: {bytes} bytes {dir} on route migration, TLS handshakes {full} full + {resumed} resumed, {failures} stream failures"
        );
    }

    let migrated = match find_program("qemu-system-x86_64") {
        Some(qemu) => Some(migrate_vm(root, &qemu, &root.join("host-a.admin"))),
        None => {
            println!("\n  QEMU     qemu-system-x86_64 not found: skipping the live migration");
            println!("           (apt-get install qemu-system-x86, then qemu-utils, and run the demo again)");
            None
        }
    };

    let codes = agents.stop()?;
    println!("  stop     SIGTERM: both agents drained and exited ({codes})");
    if !ok {
        bail!("integrity check failed: the bytes that arrived differ from those sent");
    }
    match migrated {
        Some(Err(e)) => return Err(e.context("live migration")),
        Some(Ok(())) => println!("\nOK: every byte arrived, and the VM moved, encrypted and authenticated on the way."),
        None => println!("\nOK: every byte arrived, encrypted and authenticated on the way."),
    }
    Ok(())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn write_config(root: &Path, name: &str, listen: SocketAddr, metrics: SocketAddr, pki: &Path, rest: &str) -> anyhow::Result<PathBuf> {
    // Each demo host accepts migrations from the other one.
    let other = if name == "host-a" { "host-b" } else { "host-a" };
    let text = format!(
        "name = \"{name}\"\nlisten = \"{listen}\"\nmetrics = \"{metrics}\"\nadmin = \"{r}/{name}.admin\"\n\n[tls]\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\nca = \"{0}/ca.pem\"\n\n[qemu]\nrun_dir = \"{r}/run-{name}\"\nstate_dir = \"{r}/state-{name}\"\nimage_dir = \"{r}/images-{name}\"\nprepare_hook = \"{r}/prepare-hook\"\nallow_sources = [\"{other}\"]\n\n{rest}",
        pki.display(),
        r = root.display(),
    );
    let path = root.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn spawn_agent(root: &Path, name: &str, config: &Path) -> anyhow::Result<(String, Child)> {
    let log = std::fs::File::create(root.join(format!("{name}.log")))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting the {name} agent"))?;
    Ok((name.to_string(), child))
}

fn wait_for_socket(path: &Path, agents: &mut Agents, root: &Path) -> anyhow::Result<UnixStream> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        for (name, child) in &mut agents.0 {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(root.join(format!("{name}.log"))).unwrap_or_default();
                bail!("the {name} agent exited ({status}) during start-up:\n{log}");
            }
        }
        if Instant::now() > deadline {
            bail!("the agents did not come up within {}s", STARTUP_TIMEOUT.as_secs());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The agent processes; killed if the demo fails half-way.
struct Agents(Vec<(String, Child)>);

impl Agents {
    /// SIGTERM each agent and wait for it to drain and exit.
    fn stop(&mut self) -> anyhow::Result<String> {
        let mut out = Vec::new();
        for (name, child) in &mut self.0 {
            // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is involved.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let status = child.wait()?;
            out.push(format!("{name}: {status}"));
        }
        self.0.clear();
        Ok(out.join(", "))
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn random_file(path: &Path, mib: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; CHUNK];
    for _ in 0..mib {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf)?;
    }
    Ok(())
}

fn command_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Files equal, compared in chunks.
fn same_contents(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Kills the processes it holds when dropped (the destination QEMU is daemonized: by pidfile).
struct Cleanup {
    children: Vec<Child>,
    pidfiles: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.pidfiles {
            if let Some(pid) = std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<libc::pid_t>().ok()) {
                // SAFETY: kill(2) on the pid the demo's own QEMU wrote; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A paused guest with random RAM and disks, migrated by host-a's agent to host-b, checked.
fn migrate_vm(root: &Path, qemu: &Path, admin: &Path) -> anyhow::Result<()> {
    let ram = root.join("vm-ram");
    let raw = root.join("vm-disk0.raw");
    let qcow = root.join("vm-disk1.qcow2");
    let qcow_content = root.join("vm-disk1-content.raw");
    random_file(&ram, VM_RAM_MIB, 1)?;
    random_file(&raw, VM_RAW_MIB, 2)?;
    random_file(&qcow_content, VM_QCOW2_MIB, 3)?;
    command_ok(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&qcow_content).arg(&qcow))?;
    let kvm = Accel::detect() == Accel::Kvm;
    let qmp = root.join("vm.qmp");
    let child = QemuCommand::new(qemu, "demo-vm", VM_RAM_MIB)
        .paused(true)
        .ram_file(&ram)
        .disk(&raw, DiskFormat::Raw)
        .disk(&qcow, DiskFormat::Qcow2)
        .qmp(&qmp)
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("qemu-source.log"))?)
        .spawn()
        .context("starting the source QEMU")?;
    let mut cleanup = Cleanup { children: vec![child], pidfiles: Vec::new() };
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !qmp.exists() {
        if Instant::now() > deadline {
            bail!("the source QEMU did not start: {}", std::fs::read_to_string(root.join("qemu-source.log")).unwrap_or_default());
        }
        thread::sleep(Duration::from_millis(20));
    }
    println!(
        "\n  VM       paused guest on host-a ({}): {VM_RAM_MIB} MiB random RAM, vd0 raw {VM_RAW_MIB} MiB, vd1 qcow2 {VM_QCOW2_MIB} MiB",
        if kvm { "KVM" } else { "TCG" }
    );
    println!("  migrate  migtun migrate --admin {} --qmp {} --to host-b\n", admin.display(), qmp.display());
    let args = migtun_control::messages::MigrateArgs { qmp: qmp.clone(), to: "host-b".into(), ..Default::default() };
    let started = Instant::now();
    super::migrate::migrate(admin, args, false)?;
    let took = started.elapsed();

    let dest = std::fs::read_dir(root.join("run-host-b"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("qemu.pid").exists())
        .context("the destination's migration directory")?;
    cleanup.pidfiles.push(dest.join("qemu.pid"));
    let images = root.join("images-host-b").join(dest.file_name().context("the migration directory's name")?);
    let ram_ok = same_contents(&ram, &images.join("vm-ram"))?;
    let raw_ok = same_contents(&raw, &images.join("vm-disk0.raw"))?;
    let qcow_ok = Command::new("qemu-img")
        .args(["compare", "-U", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(&qcow)
        .arg(images.join("vm-disk1.qcow2"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let source_quit = cleanup.children[0].try_wait()?.is_some() || {
        thread::sleep(Duration::from_secs(1));
        cleanup.children[0].try_wait()?.is_some()
    };
    let verdict = |ok: bool| if ok { "identical" } else { "DIFFERENT" };
    println!("\n  moved    in {:.1} s; source QEMU {}", took.as_secs_f64(), if source_quit { "has quit" } else { "STILL RUNS" });
    println!("  check    RAM {}, vd0 {}, vd1 {} (destination vs source)", verdict(ram_ok), verdict(raw_ok), verdict(qcow_ok));
    if !(ram_ok && raw_ok && qcow_ok && source_quit) {
        bail!("the destination does not hold exactly the source's guest (files kept in {})", root.display());
    }
    Ok(())
}
