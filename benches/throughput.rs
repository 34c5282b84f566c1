//! Single-stream throughput: N GiB from a UNIX socket to a UNIX socket through each path
//! (direct, socat, stunnel, ssh -L, migtun), printed as a markdown table and written as JSON
//! to `target/bench/throughput.json`. See `benches/README.md`.
//!
//! `cargo bench --bench throughput [-- --size-gib 4 --reps 3 --only direct,migtun --verify sample]`

mod common;

use common::{find_bin, first_line, free_port, install_signal_handlers, loadavg, openssl_certs, run_ok, Proc};
use common::READY_TIMEOUT;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

const MIB: usize = 1 << 20;
const GIB: u64 = 1 << 30;
/// The source cycles through this pre-filled random pattern.
const PATTERN_LEN: usize = 4 * MIB;
/// Source write size and sink read buffer size.
const IO_SIZE: usize = MIB;
/// Sampled verification: the first `SAMPLE_LEN` bytes of every `SAMPLE_EVERY` bytes of the stream.
const SAMPLE_EVERY: u64 = 64 * 1024;
const SAMPLE_LEN: u64 = 4096;
const ALL_PATHS: [&str; 6] = ["direct", "socat", "stunnel", "ssh", "migtun", "migtun-quic"];
const IO_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Arguments

struct Args {
    size_gib: f64,
    reps: usize,
    only: Vec<String>,
    full_verify: bool,
    json: PathBuf,
    /// Parallel streams per rep; the rep's bytes are split evenly between them.
    streams: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench throughput -- [--size-gib N] [--reps N] \
         [--only direct,socat,stunnel,ssh,migtun,migtun-quic] [--streams N] [--verify sample|full] [--json FILE]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let mut a = Args {
        size_gib: 4.0,
        reps: 3,
        only: ALL_PATHS.iter().map(|s| s.to_string()).collect(),
        full_verify: false,
        json: target_dir.join("bench").join("throughput.json"),
        streams: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let val = |it: &mut dyn Iterator<Item = String>| {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage())
        };
        match key.as_str() {
            "--size-gib" => a.size_gib = val(&mut it).parse().unwrap_or_else(|_| usage()),
            "--reps" => a.reps = val(&mut it).parse().unwrap_or_else(|_| usage()),
            "--streams" => a.streams = val(&mut it).parse().unwrap_or_else(|_| usage()),
            "--only" => {
                a.only = val(&mut it)
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                for p in &a.only {
                    if !ALL_PATHS.contains(&p.as_str()) {
                        eprintln!("unknown path {p:?}; known: {}", ALL_PATHS.join(","));
                        usage();
                    }
                }
            }
            "--verify" => match val(&mut it).as_str() {
                "full" => a.full_verify = true,
                "sample" => a.full_verify = false,
                _ => usage(),
            },
            "--json" => a.json = PathBuf::from(val(&mut it)),
            "-h" | "--help" => usage(),
            // `cargo bench` passes `--bench`; ignore it and any libtest-style flags.
            _ => {}
        }
    }
    if a.size_gib.is_nan() || a.size_gib <= 0.0 || a.reps == 0 || a.streams == 0 || a.streams > 64 {
        usage();
    }
    a
}

// ---------------------------------------------------------------------------------------------
// Sink: accepts on a UNIX socket, reads every connection to EOF, verifies, reports.

struct SinkResult {
    bytes: u64,
    first_byte: Option<Instant>,
    last_byte: Option<Instant>,
    /// `None` when the data matched; otherwise a description of the first mismatch / error.
    error: Option<String>,
}

fn verify_chunk(pattern: &[u8], off: u64, chunk: &[u8], full: bool) -> bool {
    let plen = pattern.len() as u64;
    let end = off + chunk.len() as u64;
    if full {
        let mut pos = off;
        let mut c = chunk;
        while !c.is_empty() {
            let po = (pos % plen) as usize;
            let n = c.len().min(pattern.len() - po);
            if c[..n] != pattern[po..po + n] {
                return false;
            }
            c = &c[n..];
            pos += n as u64;
        }
        true
    } else {
        // Windows never straddle the pattern's end: PATTERN_LEN is a multiple of SAMPLE_EVERY.
        let mut w = off / SAMPLE_EVERY * SAMPLE_EVERY;
        while w < end {
            let s = w.max(off);
            let e = (w + SAMPLE_LEN).min(end);
            if s < e {
                let po = (s % plen) as usize;
                let n = (e - s) as usize;
                let co = (s - off) as usize;
                if chunk[co..co + n] != pattern[po..po + n] {
                    return false;
                }
            }
            w += SAMPLE_EVERY;
        }
        true
    }
}

fn sink_conn(mut s: UnixStream, pattern: &[u8], full: bool) -> SinkResult {
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut buf = vec![0u8; IO_SIZE];
    let mut r = SinkResult {
        bytes: 0,
        first_byte: None,
        last_byte: None,
        error: None,
    };
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                if r.first_byte.is_none() {
                    r.first_byte = Some(now);
                }
                r.last_byte = Some(now);
                if r.error.is_none() && !verify_chunk(pattern, r.bytes, &buf[..n], full) {
                    r.error = Some(format!(
                        "data mismatch in bytes {}..{}",
                        r.bytes,
                        r.bytes + n as u64
                    ));
                }
                r.bytes += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                r.error = Some(format!("sink read error after {} bytes: {e}", r.bytes));
                break;
            }
        }
    }
    r
}

fn start_sink(path: &Path, pattern: Arc<Vec<u8>>, full: bool) -> Receiver<SinkResult> {
    let listener = UnixListener::bind(path).expect("bind sink socket");
    let (tx, rx) = mpsc::channel::<SinkResult>();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (tx, pattern): (Sender<SinkResult>, _) = (tx.clone(), pattern.clone());
            thread::spawn(move || {
                let _ = tx.send(sink_conn(conn, &pattern, full));
            });
        }
    });
    rx
}

// ---------------------------------------------------------------------------------------------
// Source

#[derive(Clone, Debug)]
enum Target {
    Unix(PathBuf),
    Tcp(String),
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn connect(t: &Target) -> std::io::Result<Conn> {
        let c = match t {
            Target::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
            Target::Tcp(a) => Conn::Tcp(TcpStream::connect(a)?),
        };
        match &c {
            Conn::Unix(s) => s.set_write_timeout(Some(IO_TIMEOUT))?,
            Conn::Tcp(s) => s.set_write_timeout(Some(IO_TIMEOUT))?,
        }
        Ok(c)
    }
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.write_all(b),
            Conn::Tcp(s) => s.write_all(b),
        }
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
        }
    }
}

/// Drop stale results (late readiness probes) left in the channel.
fn drain(rx: &Receiver<SinkResult>) {
    while rx.try_recv().is_ok() {}
}

/// Wait for the sink to report a connection of exactly `bytes` bytes (other sizes are probes).
fn wait_result(
    rx: &Receiver<SinkResult>,
    bytes: u64,
    timeout: Duration,
) -> Result<SinkResult, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) if r.bytes == bytes && (bytes > 1 || r.error.is_none()) => return Ok(r),
            Ok(r) if r.bytes > 1 => {
                return Err(format!(
                    "sink received {} bytes, expected {bytes}{}",
                    r.bytes,
                    r.error.map(|e| format!(" ({e})")).unwrap_or_default()
                ))
            }
            Ok(_) => continue,
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("no complete stream at the sink within {timeout:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => return Err("sink gone".into()),
        }
    }
}

struct Rep {
    bytes: u64,
    secs: f64,
    gbps: f64,
    first_byte_latency_ms: f64,
}

fn run_rep(
    target: &Target,
    pattern: &[u8],
    total: u64,
    rx: &Receiver<SinkResult>,
) -> Result<Rep, String> {
    drain(rx);
    let mut conn = Conn::connect(target).map_err(|e| format!("connect {target:?}: {e}"))?;
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let po = (sent % PATTERN_LEN as u64) as usize;
        let n = (total - sent)
            .min(IO_SIZE as u64)
            .min((PATTERN_LEN - po) as u64) as usize;
        conn.write_all(&pattern[po..po + n])
            .map_err(|e| format!("write after {sent} bytes: {e}"))?;
        sent += n as u64;
    }
    conn.shutdown_write()
        .map_err(|e| format!("shutdown(write): {e}"))?;
    let r = wait_result(rx, total, IO_TIMEOUT)?;
    drop(conn);
    if let Some(e) = r.error {
        return Err(e);
    }
    let last = r.last_byte.ok_or("no data")?;
    let secs = last.duration_since(t0).as_secs_f64();
    let first_ms = r
        .first_byte
        .map(|f| f.duration_since(t0).as_secs_f64() * 1e3)
        .unwrap_or(0.0);
    Ok(Rep {
        bytes: r.bytes,
        secs,
        gbps: r.bytes as f64 / secs / 1e9,
        first_byte_latency_ms: first_ms,
    })
}

/// `streams` connections at once, `total / streams` bytes each (at least 2, so results are not
/// mistaken for probes); throughput is all bytes over the time from the first write to the last
/// byte of the last stream at the sink.
fn run_rep_parallel(
    target: &Target,
    pattern: &Arc<Vec<u8>>,
    total: u64,
    streams: usize,
    rx: &Receiver<SinkResult>,
) -> Result<Rep, String> {
    if streams == 1 {
        return run_rep(target, pattern, total, rx);
    }
    drain(rx);
    let each = (total / streams as u64).max(2);
    let t0 = Instant::now();
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            let (target, pattern) = (target.clone(), pattern.clone());
            thread::spawn(move || -> Result<Conn, String> {
                let mut conn =
                    Conn::connect(&target).map_err(|e| format!("connect {target:?}: {e}"))?;
                let mut sent = 0u64;
                while sent < each {
                    let po = (sent % PATTERN_LEN as u64) as usize;
                    let n = (each - sent)
                        .min(IO_SIZE as u64)
                        .min((PATTERN_LEN - po) as u64) as usize;
                    conn.write_all(&pattern[po..po + n])
                        .map_err(|e| format!("write after {sent} bytes: {e}"))?;
                    sent += n as u64;
                }
                conn.shutdown_write()
                    .map_err(|e| format!("shutdown(write): {e}"))?;
                Ok(conn)
            })
        })
        .collect();
    let mut results = Vec::new();
    for _ in 0..streams {
        results.push(wait_result(rx, each, IO_TIMEOUT)?);
    }
    for w in writers {
        w.join().map_err(|_| "writer panicked".to_string())??;
    }
    let mut last = t0;
    let mut first = None::<Instant>;
    let mut bytes = 0;
    for r in results {
        if let Some(e) = r.error {
            return Err(e);
        }
        bytes += r.bytes;
        last = last.max(r.last_byte.ok_or("no data")?);
        first = match (first, r.first_byte) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let secs = last.duration_since(t0).as_secs_f64();
    Ok(Rep {
        bytes,
        secs,
        gbps: bytes as f64 / secs / 1e9,
        first_byte_latency_ms: first
            .map(|f| f.duration_since(t0).as_secs_f64() * 1e3)
            .unwrap_or(0.0),
    })
}

/// Probe end to end: one byte through the path must reach the sink.
fn wait_ready(
    target: &Target,
    pattern: &[u8],
    rx: &Receiver<SinkResult>,
    procs: &mut [Proc],
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_err = String::from("not tried");
    while Instant::now() < deadline {
        for p in procs.iter_mut() {
            if let Ok(Some(st)) = p.child.try_wait() {
                return Err(format!(
                    "{} exited during startup ({st})\n{}",
                    p.name,
                    p.log_tail()
                ));
            }
        }
        drain(rx);
        match Conn::connect(target) {
            Ok(mut c) => {
                if let Err(e) = c.write_all(&pattern[..1]).and_then(|_| c.shutdown_write()) {
                    last_err = format!("probe write: {e}");
                } else {
                    match wait_result(rx, 1, Duration::from_millis(1000)) {
                        Ok(_) => return Ok(()),
                        Err(e) => last_err = e,
                    }
                }
            }
            Err(e) => last_err = format!("connect {target:?}: {e}"),
        }
        thread::sleep(Duration::from_millis(100));
    }
    let logs: Vec<String> = procs.iter().map(|p| p.log_tail()).collect();
    Err(format!(
        "not ready within {READY_TIMEOUT:?}: {last_err}\n{}",
        logs.join("\n")
    ))
}

/// A running path: its processes (stopped in reverse start order) and where to connect.
struct Up {
    target: Target,
    procs: Vec<Proc>,
    note: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Paths

enum Setup {
    Up(Up),
    Skipped(String),
}

fn setup_socat(tmp: &Path, sink: &Path) -> Result<Setup, String> {
    let Some(socat) = find_bin(&["socat"]) else {
        return Ok(Setup::Skipped("skipped: not installed".into()));
    };
    let a = tmp.join("socat-a.sock");
    let port = free_port();
    let mut procs = vec![];
    procs.push(Proc::spawn(
        "socat server",
        Command::new(&socat).args([
            "-b".to_string(),
            "262144".into(),
            format!("TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1"),
            format!("UNIX-CONNECT:{}", sink.display()),
        ]),
        tmp.join("socat-server.log"),
    )?);
    procs.push(Proc::spawn(
        "socat client",
        Command::new(&socat).args([
            "-b".to_string(),
            "262144".into(),
            format!("UNIX-LISTEN:{},fork,unlink-early", a.display()),
            format!("TCP:127.0.0.1:{port}"),
        ]),
        tmp.join("socat-client.log"),
    )?);
    let note = first_line(
        Command::new(&socat).arg("-V").stdin(Stdio::null()),
        "socat version",
    );
    let note = if note.is_empty() {
        "no encryption, -b 262144".to_string()
    } else {
        format!("no encryption, -b 262144; {note}")
    };
    Ok(Setup::Up(Up {
        target: Target::Unix(a),
        procs,
        note,
    }))
}

fn setup_stunnel(tmp: &Path, sink: &Path) -> Result<Setup, String> {
    let Some(stunnel) = find_bin(&["stunnel", "stunnel4"]) else {
        return Ok(Setup::Skipped("skipped: not installed".into()));
    };
    if find_bin(&["openssl"]).is_none() {
        return Ok(Setup::Skipped(
            "skipped: openssl (for certificates) not installed".into(),
        ));
    }
    let certs = tmp.join("stunnel-certs");
    openssl_certs(&certs, &["host-a", "host-b"])?;
    let port = free_port();
    let a = tmp.join("stunnel-a.sock");
    let c = |n: &str| certs.join(n).display().to_string();
    let server_conf = tmp.join("stunnel-server.conf");
    fs::write(
        &server_conf,
        format!(
            "foreground = yes\npid =\n[bench]\naccept = 127.0.0.1:{port}\nconnect = {sink}\n\
             cert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
            sink = sink.display(),
            cert = c("host-b.pem"),
            key = c("host-b.key"),
            ca = c("ca.pem"),
        ),
    )
    .map_err(|e| e.to_string())?;
    // Try a UNIX accept socket first (stunnel 5 on Unix supports it); fall back to loopback TCP.
    let client_conf = |accept: &str| {
        format!(
            "foreground = yes\npid =\n[bench]\nclient = yes\naccept = {accept}\nconnect = 127.0.0.1:{port}\n\
             cert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\ncheckHost = host-b\nsslVersionMin = TLSv1.3\n",
            cert = c("host-a.pem"),
            key = c("host-a.key"),
            ca = c("ca.pem"),
        )
    };
    let version = first_line(
        Command::new(&stunnel).arg("-version").stdin(Stdio::null()),
        "stunnel ",
    );
    let mut procs = vec![Proc::spawn(
        "stunnel server",
        Command::new(&stunnel).arg(&server_conf),
        tmp.join("stunnel-server.log"),
    )?];
    let client_path = tmp.join("stunnel-client.conf");
    fs::write(&client_path, client_conf(&a.display().to_string())).map_err(|e| e.to_string())?;
    procs.push(Proc::spawn(
        "stunnel client",
        Command::new(&stunnel).arg(&client_path),
        tmp.join("stunnel-client.log"),
    )?);
    // Give it a moment to either bind the UNIX socket or fail the config.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !a.exists() {
        if let Ok(Some(_)) = procs[1].child.try_wait() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    if a.exists() {
        return Ok(Setup::Up(Up {
            target: Target::Unix(a),
            procs,
            note: format!("TLS 1.3, mutual; {version}"),
        }));
    }
    drop(procs.pop());
    let cport = free_port();
    fs::write(&client_path, client_conf(&format!("127.0.0.1:{cport}")))
        .map_err(|e| e.to_string())?;
    procs.push(Proc::spawn(
        "stunnel client",
        Command::new(&stunnel).arg(&client_path),
        tmp.join("stunnel-client.log"),
    )?);
    Ok(Setup::Up(Up {
        target: Target::Tcp(format!("127.0.0.1:{cport}")),
        procs,
        note: format!(
            "TLS 1.3, mutual; source connects over loopback TCP (no UNIX accept); {version}"
        ),
    }))
}

fn setup_ssh(tmp: &Path, sink: &Path) -> Result<Setup, String> {
    let (Some(sshd), Some(ssh), Some(keygen)) = (
        find_bin(&["sshd"]),
        find_bin(&["ssh"]),
        find_bin(&["ssh-keygen"]),
    ) else {
        return Ok(Setup::Skipped("skipped: not installed".into()));
    };
    let d = tmp.join("ssh");
    fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    // sshd insists on its privilege separation directory.
    let _ = fs::create_dir_all("/run/sshd");
    for k in ["hostkey", "id"] {
        run_ok(
            Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(k)),
        )?;
    }
    fs::copy(d.join("id.pub"), d.join("authorized_keys")).map_err(|e| e.to_string())?;
    let user = run_ok(Command::new("id").arg("-un"))?.trim().to_string();
    let port = free_port();
    let conf = d.join("sshd_config");
    fs::write(
        &conf,
        format!(
            "ListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nStrictModes no\nPermitRootLogin yes\n\
             UsePAM no\nPidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nAllowStreamLocalForwarding yes\nStreamLocalBindUnlink yes\n",
            hk = d.join("hostkey").display(),
            ak = d.join("authorized_keys").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut procs = vec![Proc::spawn(
        "sshd",
        Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(&conf)
            .args(["-p", &port.to_string()]),
        d.join("sshd.log"),
    )?];
    // Wait for sshd to listen before the client tries.
    let deadline = Instant::now() + READY_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = procs[0].child.try_wait() {
            return Err(format!("sshd exited ({st})\n{}", procs[0].log_tail()));
        }
        if Instant::now() > deadline {
            return Err(format!("sshd not listening\n{}", procs[0].log_tail()));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let a = tmp.join("ssh-a.sock");
    procs.push(Proc::spawn(
        "ssh -L",
        Command::new(&ssh)
            .args(["-N", "-F", "/dev/null", "-i"])
            .arg(d.join("id"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "StreamLocalBindUnlink=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "LogLevel=ERROR",
                "-c",
                "aes128-gcm@openssh.com",
                "-L",
            ])
            .arg(format!("{}:{}", a.display(), sink.display()))
            .args(["-p", &port.to_string(), &format!("{user}@127.0.0.1")]),
        d.join("ssh.log"),
    )?);
    let version = first_line(Command::new(&ssh).arg("-V").stdin(Stdio::null()), "OpenSSH");
    Ok(Setup::Up(Up {
        target: Target::Unix(a),
        procs,
        note: format!("aes128-gcm@openssh.com; {version}"),
    }))
}

fn setup_migtun(tmp: &Path, sink: &Path, transport: &str) -> Result<Setup, String> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_migtun"));
    let d = tmp.join(format!("migtun-{transport}"));
    let certs = d.join("certs");
    fs::create_dir_all(&certs).map_err(|e| e.to_string())?;
    let mut cert_note = "certs: migtun certs";
    let cli = run_ok(
        Command::new(&bin)
            .args(["certs", "init", "--dir"])
            .arg(&certs),
    )
    .and_then(|_| {
        for h in ["host-a", "host-b"] {
            run_ok(
                Command::new(&bin)
                    .args(["certs", "issue", "--dir"])
                    .arg(&certs)
                    .args(["--name", h]),
            )?;
        }
        Ok(())
    });
    let have = |n: &str| certs.join(n).is_file();
    if cli.is_err()
        || !(have("ca.pem")
            && have("host-a.pem")
            && have("host-a.key")
            && have("host-b.pem")
            && have("host-b.key"))
    {
        let _ = fs::remove_dir_all(&certs);
        openssl_certs(&certs, &["host-a", "host-b"]).map_err(|e| {
            format!(
                "`migtun certs` failed ({}) and openssl fallback failed: {e}",
                cli.err().unwrap_or_default()
            )
        })?;
        cert_note = "certs: openssl (migtun certs CLI unavailable)";
    }
    let (pa, pb) = (free_port(), free_port());
    let a = d.join("a.sock");
    let c = |n: &str| certs.join(n).display().to_string();
    let tls = |h: &str| {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            c(&format!("{h}.pem")),
            c(&format!("{h}.key")),
            c("ca.pem")
        )
    };
    let conf_a = d.join("host-a.toml");
    let conf_b = d.join("host-b.toml");
    fs::write(
        &conf_a,
        format!(
            "name = \"host-a\"\nlisten = \"127.0.0.1:{pa}\"\n\n{tls}\n[[peer]]\nname = \"host-b\"\naddress = \"127.0.0.1:{pb}\"\ntransport = \"{transport}\"\n\n\
             [[forward]]\nlisten = \"unix:{a}\"\npeer = \"host-b\"\nroute = \"bench\"\n",
            tls = tls("host-a"),
            a = a.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    fs::write(
        &conf_b,
        format!(
            "name = \"host-b\"\nlisten = \"127.0.0.1:{pb}\"\n\n{tls}\n[[peer]]\nname = \"host-a\"\naddress = \"127.0.0.1:{pa}\"\ntransport = \"{transport}\"\n\n\
             [[expose]]\nroute = \"bench\"\ntarget = \"unix:{s}\"\nallow = [\"host-a\"]\n",
            tls = tls("host-b"),
            s = sink.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let procs = vec![
        Proc::spawn(
            "migtun host-b",
            Command::new(&bin).args(["serve", "--config"]).arg(&conf_b),
            d.join("host-b.log"),
        )?,
        Proc::spawn(
            "migtun host-a",
            Command::new(&bin).args(["serve", "--config"]).arg(&conf_a),
            d.join("host-a.log"),
        )?,
    ];
    Ok(Setup::Up(Up {
        target: Target::Unix(a),
        procs,
        note: match transport {
            "quic" => format!(
                "QUIC (quinn), TLS 1.3, mutual, one connection, a stream per stream; congestion {}; {cert_note}",
                std::env::var("MIGTUN_QUIC_CONGESTION").unwrap_or_else(|_| "default".into())
            ),
            _ => format!("TLS 1.3, mutual, one connection per stream; {cert_note}"),
        },
    }))
}

// ---------------------------------------------------------------------------------------------
// Reporting

struct PathResult {
    name: String,
    /// "ok", "skipped" or "error".
    status: &'static str,
    message: String,
    note: String,
    reps: Vec<Rep>,
}

impl PathResult {
    fn median(&self) -> Option<f64> {
        if self.reps.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.reps.iter().map(|r| r.gbps).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "null".into(),
    }
}

fn machine_info() -> (usize, String, String) {
    let nproc = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    (nproc, cpu, kernel)
}

fn main() {
    let args = parse_args();
    install_signal_handlers();
    let total = ((args.size_gib * GIB as f64) as u64).max(1);
    let (nproc, cpu, kernel) = machine_info();
    let load_start = loadavg();

    let mut pattern = vec![0u8; PATTERN_LEN];
    rand::rngs::SmallRng::seed_from_u64(0x6d69_6774_756e).fill_bytes(&mut pattern);
    let pattern = Arc::new(pattern);

    let tmp = tempfile::Builder::new()
        .prefix("mtb")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let sink = tmp.path().join("sink.sock");
    let rx = start_sink(&sink, pattern.clone(), args.full_verify);

    eprintln!(
        "throughput: {} bytes ({} GiB) per rep, {} reps, paths {}, verify {}, work dir {}",
        total,
        args.size_gib,
        args.reps,
        args.only.join(","),
        if args.full_verify { "full" } else { "sample" },
        tmp.path().display()
    );

    let mut results: Vec<PathResult> = vec![];
    for name in ALL_PATHS
        .iter()
        .filter(|p| args.only.iter().any(|o| o == *p))
    {
        let mut pr = PathResult {
            name: name.to_string(),
            status: "ok",
            message: String::new(),
            note: String::new(),
            reps: vec![],
        };
        let setup = match *name {
            "direct" => Ok(Setup::Up(Up {
                target: Target::Unix(sink.clone()),
                procs: vec![],
                note: "no tunnel: the limit".into(),
            })),
            "socat" => setup_socat(tmp.path(), &sink),
            "stunnel" => setup_stunnel(tmp.path(), &sink),
            "ssh" => setup_ssh(tmp.path(), &sink),
            "migtun" => setup_migtun(tmp.path(), &sink, "tls"),
            "migtun-quic" => setup_migtun(tmp.path(), &sink, "quic"),
            _ => unreachable!(),
        };
        let mut up = match setup {
            Ok(Setup::Up(up)) => up,
            Ok(Setup::Skipped(why)) => {
                eprintln!("{name}: {why}");
                pr.status = "skipped";
                pr.message = why;
                results.push(pr);
                continue;
            }
            Err(e) => {
                eprintln!("{name}: failed to start: {e}");
                pr.status = "error";
                pr.message = format!("failed to start: {e}");
                results.push(pr);
                continue;
            }
        };
        pr.note = up.note.clone();
        if !up.procs.is_empty() {
            if let Err(e) = wait_ready(&up.target, &pattern, &rx, &mut up.procs) {
                eprintln!("{name}: failed to start: {e}");
                pr.status = "error";
                pr.message = format!("failed to start: {}", e.lines().next().unwrap_or(""));
                results.push(pr);
                continue;
            }
        }
        for i in 0..args.reps {
            match run_rep_parallel(&up.target, &pattern, total, args.streams, &rx) {
                Ok(r) => {
                    eprintln!(
                        "{name}: rep {}/{}: {:.3} GB/s ({} bytes in {:.3} s)",
                        i + 1,
                        args.reps,
                        r.gbps,
                        r.bytes,
                        r.secs
                    );
                    pr.reps.push(r);
                }
                Err(e) => {
                    let tails: Vec<String> = up.procs.iter().map(|p| p.log_tail()).collect();
                    eprintln!("{name}: rep {} failed: {e}\n{}", i + 1, tails.join("\n"));
                    pr.status = "error";
                    pr.message = format!("rep {} failed: {e}", i + 1);
                    break;
                }
            }
        }
        drop(up);
        results.push(pr);
    }

    // Markdown table.
    let migtun = results.iter().find(|r| r.name == "migtun").and_then(|r| {
        if r.status == "ok" {
            r.median()
        } else {
            None
        }
    });
    let mut out = String::new();
    let _ = if args.streams == 1 {
        writeln!(out, "## migtun single-stream throughput\n")
    } else {
        writeln!(
            out,
            "## migtun throughput, {} parallel streams\n",
            args.streams
        )
    };
    let _ = writeln!(out, "- CPU: {cpu} (nproc {nproc})");
    let _ = writeln!(out, "- kernel: {kernel}");
    let _ = writeln!(
        out,
        "- load average at start: {load_start}, at end: {}",
        loadavg()
    );
    let load1: f64 = load_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if nproc > 0 && load1 > 0.5 * nproc as f64 {
        let _ = writeln!(
            out,
            "- **warning: the machine was busy at the start (load {load1} on {nproc} CPUs): \
             numbers are low and noisy**"
        );
    }
    let _ = writeln!(
        out,
        "- {} GiB per rep through {}, UNIX socket to UNIX socket, median of {} reps; verify: {}\n",
        args.size_gib,
        if args.streams == 1 {
            "one stream".to_string()
        } else {
            format!("{} parallel streams", args.streams)
        },
        args.reps,
        if args.full_verify {
            "every byte"
        } else {
            "byte count + 1/16 of the data"
        }
    );
    let _ = writeln!(
        out,
        "| path | GB/s (median) | reps GB/s | migtun / path | notes |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|---|");
    for r in &results {
        let med = r.median().filter(|_| r.status == "ok");
        let reps: Vec<String> = r.reps.iter().map(|x| format!("{:.2}", x.gbps)).collect();
        let ratio = match (migtun, med) {
            (Some(m), Some(p)) if p > 0.0 => format!("{:.2}", m / p),
            _ => "n/a".into(),
        };
        let notes = match r.status {
            "ok" => r.note.clone(),
            _ if r.note.is_empty() => r.message.clone(),
            _ => format!("{}; {}", r.message, r.note),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.name,
            med.map(|m| format!("{m:.2}")).unwrap_or_else(|| "-".into()),
            if reps.is_empty() {
                "-".into()
            } else {
                reps.join(", ")
            },
            ratio,
            notes.replace('|', "\\|").replace('\n', " ")
        );
    }
    println!("{out}");

    // JSON with the raw numbers.
    let mut j = String::new();
    let _ = write!(
        j,
        "{{\n  \"machine\": {{\"nproc\": {nproc}, \"cpu\": {}, \"kernel\": {}, \"loadavg_start\": {}, \"loadavg_end\": {}}},\n  \"size_bytes\": {total},\n  \"size_gib\": {},\n  \"reps\": {},\n  \"verify\": {},\n  \"paths\": [",
        json_str(&cpu),
        json_str(&kernel),
        json_str(&load_start),
        json_str(&loadavg()),
        args.size_gib,
        args.reps,
        json_str(if args.full_verify { "full" } else { "sample" })
    );
    for (i, r) in results.iter().enumerate() {
        let med = r.median().filter(|_| r.status == "ok");
        let ratio = match (migtun, med) {
            (Some(m), Some(p)) if p > 0.0 => Some(m / p),
            _ => None,
        };
        let reps: Vec<String> = r
            .reps
            .iter()
            .map(|x| {
                format!(
                    "{{\"bytes\": {}, \"seconds\": {}, \"gb_per_s\": {}, \"first_byte_ms\": {}}}",
                    x.bytes, x.secs, x.gbps, x.first_byte_latency_ms
                )
            })
            .collect();
        let _ = write!(
            j,
            "{}\n    {{\"path\": {}, \"status\": {}, \"message\": {}, \"note\": {}, \"median_gb_per_s\": {}, \"migtun_ratio\": {}, \"reps\": [{}]}}",
            if i == 0 { "" } else { "," },
            json_str(&r.name),
            json_str(r.status),
            json_str(&r.message),
            json_str(&r.note),
            json_num(med),
            json_num(ratio),
            reps.join(", ")
        );
    }
    j.push_str("\n  ]\n}\n");
    if let Some(dir) = args.json.parent() {
        let _ = fs::create_dir_all(dir);
    }
    match fs::write(&args.json, j) {
        Ok(()) => eprintln!("raw numbers: {}", args.json.display()),
        Err(e) => eprintln!("cannot write {}: {e}", args.json.display()),
    }
}
