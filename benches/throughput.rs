//! Bulk throughput: N GiB from a UNIX socket to a UNIX socket through each path of
//! `common::TUNNEL_PATHS` (direct, socat, socat+OpenSSL, stunnel, ssh -L, migtun TLS and QUIC),
//! in one stream or several in parallel, with the relaying processes' CPU seconds per GiB and
//! peak RSS. Markdown table on stdout, raw numbers in `target/bench/throughput.json` (and the
//! table next to it as `.md`). See `benches/README.md`.
//!
//! `cargo bench --bench throughput [-- --size-gib 4 --reps 3 --streams 1 --only direct,migtun --verify sample]`

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// The source cycles through this pre-filled random pattern: large enough that no cache or
/// compression can exploit repetition, small enough to stay in memory once.
const PATTERN_LEN: usize = 4 * MIB;
/// Source write size and sink read buffer size: what QEMU's migration stream roughly writes.
const IO_SIZE: usize = MIB;
/// Sampled verification: the first `SAMPLE_LEN` bytes of every `SAMPLE_EVERY` bytes of the
/// stream (1/16 of the data: cheap enough not to slow the sink).
const SAMPLE_EVERY: u64 = 64 * 1024;
const SAMPLE_LEN: u64 = 4096;
/// A stalled path fails its rep after this long without progress (or without the sink's report).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one readiness probe waits for its byte at the sink before trying again.
const PROBE_WAIT: Duration = Duration::from_millis(1000);
/// Pause between readiness probes.
const PROBE_RETRY: Duration = Duration::from_millis(100);
/// `--streams` upper bound: beyond this the per-stream share gets too small to mean anything.
const MAX_STREAMS: usize = 64;
/// Seed of the random pattern, fixed so that every run sends the same bytes.
const PATTERN_SEED: u64 = 0x6d69_6774_756e;

// ---------------------------------------------------------------------------------------------
// Arguments

/// `cargo bench --bench throughput -- [OPTIONS]`; see `benches/README.md`.
#[derive(clap::Parser, Debug)]
#[command(name = "throughput", bin_name = "cargo bench --bench throughput --", about = "Bulk throughput from a UNIX socket to a UNIX socket through each tunnel path")]
struct Args {
    /// Bytes pushed per rep, in GiB (fractions allowed, e.g. 0.5).
    #[arg(long, value_name = "N", default_value_t = 4.0, value_parser = positive_gib)]
    size_gib: f64,
    /// Reps per path; the table shows the median.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    reps: usize,
    /// Paths, comma-separated.
    #[arg(long, value_name = "a,b", default_value_t = Names::all(&names_of(TUNNEL_PATHS)), value_parser = only_paths)]
    only: Names,
    /// How much of the received data is compared: `sample` (the first 4 KiB of every 64 KiB) or `full`.
    #[arg(long, value_name = "sample|full", default_value = "sample", value_parser = ["sample", "full"])]
    verify: String,
    /// Where the raw numbers go (the table goes next to it as `.md`).
    #[arg(long, value_name = "FILE", default_value_os_t = json_out_path("throughput"))]
    json: PathBuf,
    /// Parallel streams per rep; the rep's bytes are split evenly between them.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_STREAMS as u64))]
    streams: usize,
    #[command(flatten)]
    cargo: CargoBench,
    /// `--verify full`, set by `parse_args`.
    #[arg(skip)]
    full_verify: bool,
}

/// `--only`: names of `common::TUNNEL_PATHS`.
fn only_paths(v: &str) -> Result<Names, String> {
    Names::parse(v, &names_of(TUNNEL_PATHS), false)
}

/// `--size-gib`: a finite number above 0.
fn positive_gib(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n),
        Ok(_) => Err(format!("{v:?}: must be a number above 0")),
        Err(e) => Err(format!("{v:?}: {e}")),
    }
}

fn parse_args() -> Args {
    let mut a = <Args as clap::Parser>::parse();
    a.full_verify = a.verify == "full";
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

/// Does `chunk`, found at stream offset `off`, match the pattern there, every byte?
fn verify_full(pattern: &[u8], off: u64, chunk: &[u8]) -> bool {
    let mut pos = off;
    let mut c = chunk;
    while !c.is_empty() {
        let po = (pos % pattern.len() as u64) as usize;
        let n = c.len().min(pattern.len() - po);
        if c[..n] != pattern[po..po + n] {
            return false;
        }
        c = &c[n..];
        pos += n as u64;
    }
    true
}

/// The same for the sampled windows only. Windows never straddle the pattern's end:
/// `PATTERN_LEN` is a multiple of `SAMPLE_EVERY`.
fn verify_sample(pattern: &[u8], off: u64, chunk: &[u8]) -> bool {
    let end = off + chunk.len() as u64;
    let mut w = off / SAMPLE_EVERY * SAMPLE_EVERY;
    while w < end {
        let (s, e) = (w.max(off), (w + SAMPLE_LEN).min(end));
        if s < e {
            let po = (s % pattern.len() as u64) as usize;
            let (n, co) = ((e - s) as usize, (s - off) as usize);
            if chunk[co..co + n] != pattern[po..po + n] {
                return false;
            }
        }
        w += SAMPLE_EVERY;
    }
    true
}

fn sink_conn(mut s: UnixStream, pattern: &[u8], full: bool) -> SinkResult {
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let verify = if full { verify_full } else { verify_sample };
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
                r.first_byte.get_or_insert(now);
                r.last_byte = Some(now);
                if r.error.is_none() && !verify(pattern, r.bytes, &buf[..n]) {
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

fn start_sink(
    path: &Path,
    pattern: Arc<Vec<u8>>,
    full: bool,
) -> Result<Receiver<SinkResult>, String> {
    let listener = UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    let (tx, rx) = mpsc::channel::<SinkResult>();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (tx, pattern) = (tx.clone(), pattern.clone());
            thread::spawn(move || {
                let _ = tx.send(sink_conn(conn, &pattern, full));
            });
        }
    });
    Ok(rx)
}

/// Drop stale results (late readiness probes) left in the channel.
fn drain(rx: &Receiver<SinkResult>) {
    while rx.try_recv().is_ok() {}
}

/// Wait for the sink to report a connection of exactly `bytes` bytes (1-byte ones are probes).
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
                let why = r.error.map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(format!(
                    "sink received {} bytes, expected {bytes}{why}",
                    r.bytes
                ));
            }
            Ok(_) => continue,
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("no complete stream at the sink within {timeout:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => return Err("sink gone".into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Source

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn connect(e: &Entry) -> std::io::Result<Conn> {
        let c = match e {
            Entry::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
            Entry::Tcp(a) => Conn::Tcp(TcpStream::connect(a)?),
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

/// Connects, writes `bytes` bytes of the pattern in `IO_SIZE` writes and half-closes; the
/// connection is returned (kept open until the sink has reported).
fn send_stream(e: &Entry, pattern: &[u8], bytes: u64) -> Result<Conn, String> {
    let mut conn = Conn::connect(e).map_err(|err| format!("connect {e:?}: {err}"))?;
    let mut sent = 0u64;
    while sent < bytes {
        let po = (sent % PATTERN_LEN as u64) as usize;
        let n = (bytes - sent)
            .min(IO_SIZE as u64)
            .min((PATTERN_LEN - po) as u64) as usize;
        conn.write_all(&pattern[po..po + n])
            .map_err(|err| format!("write after {sent} bytes: {err}"))?;
        sent += n as u64;
    }
    conn.shutdown_write()
        .map_err(|err| format!("shutdown(write): {err}"))?;
    Ok(conn)
}

/// One rep's transfer: bytes and times (CPU is measured around it).
struct Transfer {
    bytes: u64,
    secs: f64,
    first_byte_ms: f64,
}

/// `streams` connections at once, `total / streams` bytes each (at least 2, so results are not
/// mistaken for probes); the time runs from before the first connect to the last byte of the
/// last stream at the sink.
fn transfer(
    e: &Entry,
    pattern: &Arc<Vec<u8>>,
    total: u64,
    streams: usize,
    rx: &Receiver<SinkResult>,
) -> Result<Transfer, String> {
    drain(rx);
    let each = (total / streams as u64).max(2);
    let t0 = Instant::now();
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            let (e, pattern) = (e.clone(), pattern.clone());
            thread::spawn(move || send_stream(&e, &pattern, each))
        })
        .collect();
    let results = (0..streams)
        .map(|_| wait_result(rx, each, IO_TIMEOUT))
        .collect::<Result<Vec<_>, _>>()?;
    for w in writers {
        w.join().map_err(|_| "writer panicked".to_string())??;
    }
    if let Some(err) = results.iter().find_map(|r| r.error.clone()) {
        return Err(err);
    }
    let last = results
        .iter()
        .filter_map(|r| r.last_byte)
        .max()
        .ok_or("no data")?;
    let first = results.iter().filter_map(|r| r.first_byte).min();
    Ok(Transfer {
        bytes: results.iter().map(|r| r.bytes).sum(),
        secs: last.duration_since(t0).as_secs_f64(),
        first_byte_ms: first
            .map(|f| f.duration_since(t0).as_secs_f64() * 1e3)
            .unwrap_or(0.0),
    })
}

/// Has one of the tunnel's processes exited?
fn exited(procs: &mut [Proc]) -> Option<String> {
    procs.iter_mut().find_map(|p| {
        let st = p.exited()?;
        Some(format!(
            "{} exited during startup ({st})\n{}",
            p.name,
            p.log_tail()
        ))
    })
}

/// One byte through the path, reported by the sink.
fn probe(e: &Entry, pattern: &[u8], rx: &Receiver<SinkResult>) -> Result<(), String> {
    drain(rx);
    let mut c = Conn::connect(e).map_err(|err| format!("connect {e:?}: {err}"))?;
    c.write_all(&pattern[..1])
        .and_then(|_| c.shutdown_write())
        .map_err(|err| format!("probe write: {err}"))?;
    wait_result(rx, 1, PROBE_WAIT).map(|_| ())
}

/// Probe end to end until a byte reaches the sink, for at most `READY_TIMEOUT`.
fn wait_ready(
    e: &Entry,
    pattern: &[u8],
    rx: &Receiver<SinkResult>,
    procs: &mut [Proc],
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_err = String::from("not tried");
    while Instant::now() < deadline {
        if let Some(why) = exited(procs) {
            return Err(why);
        }
        match probe(e, pattern, rx) {
            Ok(()) => return Ok(()),
            Err(err) => last_err = err,
        }
        thread::sleep(PROBE_RETRY);
    }
    let logs: Vec<String> = procs.iter().map(|p| p.log_tail()).collect();
    Err(format!(
        "not ready within {READY_TIMEOUT:?}: {last_err}\n{}",
        logs.join("\n")
    ))
}

// ---------------------------------------------------------------------------------------------
// One path

struct Rep {
    t: Transfer,
    /// user+sys CPU seconds of each relay (with its descendants) during the rep.
    relay_cpu: Vec<f64>,
}

impl Rep {
    fn gbps(&self) -> f64 {
        self.t.bytes as f64 / self.t.secs / 1e9
    }

    /// CPU seconds of the relays on `side` (all relays with `None`) per GiB carried.
    fn cpu_per_gib(&self, relays: &[Relay], side: Option<Side>) -> f64 {
        let cpu: f64 = relays
            .iter()
            .zip(&self.relay_cpu)
            .filter(|(r, _)| side.is_none_or(|s| r.side == s))
            .fold(0.0, |sum, (_, c)| sum + c);
        cpu / (self.t.bytes as f64 / GIB)
    }
}

struct PathResult {
    name: String,
    /// "ok", "skipped" or "error".
    status: &'static str,
    message: String,
    note: String,
    relays: Vec<Relay>,
    /// Peak RSS of each relay (sum of VmHWM over its process tree), KiB.
    peak_rss_kib: Vec<u64>,
    reps: Vec<Rep>,
}

impl PathResult {
    fn new(name: &str) -> PathResult {
        PathResult {
            name: name.into(),
            status: "ok",
            message: String::new(),
            note: String::new(),
            relays: vec![],
            peak_rss_kib: vec![],
            reps: vec![],
        }
    }

    fn fail(mut self, status: &'static str, message: String) -> PathResult {
        eprintln!("{}: {message}", self.name);
        self.status = status;
        self.message = message.lines().next().unwrap_or("").to_string();
        self
    }

    /// The median of a per-rep figure, `None` unless the path succeeded.
    fn median_of(&self, f: impl Fn(&Rep) -> f64) -> Option<f64> {
        let v: Vec<f64> = self.reps.iter().map(f).collect();
        median(&v).filter(|_| self.status == "ok")
    }

    fn median_gbps(&self) -> Option<f64> {
        self.median_of(Rep::gbps)
    }

    fn median_cpu_per_gib(&self, side: Option<Side>) -> Option<f64> {
        self.median_of(|r| r.cpu_per_gib(&self.relays, side))
    }

    /// Peak RSS of the relays on `side`, KiB (`None` without relays).
    fn peak_rss(&self, side: Side) -> Option<u64> {
        let mut it = self
            .relays
            .iter()
            .zip(&self.peak_rss_kib)
            .filter(|(r, _)| r.side == side);
        let first = it.next()?.1;
        Some(first + it.map(|(_, k)| k).sum::<u64>())
    }
}

/// What every path's run needs.
struct Ctx {
    args: Args,
    tmp: PathBuf,
    sink: PathBuf,
    pattern: Arc<Vec<u8>>,
    rx: Receiver<SinkResult>,
    total: u64,
}

/// The path's reps, measuring its relays' CPU around each transfer.
/// One rep, with the relays' CPU seconds read just before and just after the transfer.
fn measured_rep(c: &Ctx, tunnel: &Tunnel) -> Result<Rep, String> {
    let cpu = || -> Vec<f64> {
        let pids = tunnel.relays.iter().map(|r| r.pid);
        pids.map(cpu_secs_group).collect()
    };
    let cpu0 = cpu();
    let t = transfer(
        &tunnel.entries[0],
        &c.pattern,
        c.total,
        c.args.streams,
        &c.rx,
    )?;
    let relay_cpu = cpu().iter().zip(&cpu0).map(|(c1, c0)| c1 - c0).collect();
    Ok(Rep { t, relay_cpu })
}

/// The path's reps into `reps`, until one fails.
fn run_reps(c: &Ctx, name: &str, tunnel: &Tunnel, reps: &mut Vec<Rep>) -> Result<(), String> {
    for i in 1..=c.args.reps {
        let rep = measured_rep(c, tunnel).map_err(|e| format!("rep {i} failed: {e}"))?;
        eprintln!(
            "{name}: rep {i}/{}: {:.3} GB/s ({} bytes in {:.3} s), relays {:.2} CPU s/GiB",
            c.args.reps,
            rep.gbps(),
            rep.t.bytes,
            rep.t.secs,
            rep.cpu_per_gib(&tunnel.relays, None)
        );
        reps.push(rep);
    }
    Ok(())
}

fn run_path(c: &Ctx, name: &str, setup: SetupFn) -> PathResult {
    let r = PathResult::new(name);
    let fwd = Fwd {
        local: c.tmp.join(format!("{name}-a.sock")),
        target: c.sink.clone(),
    };
    let mut tunnel = match setup(&c.tmp, &[fwd]) {
        Ok(Setup::Up(t)) => t,
        Ok(Setup::Skipped(why)) => return r.fail("skipped", why),
        Err(e) => return r.fail("error", format!("failed to start: {e}")),
    };
    let mut r = PathResult {
        note: tunnel.note.clone(),
        relays: tunnel.relays.clone(),
        ..r
    };
    let entry = tunnel.entries[0].clone();
    if let Err(e) = wait_ready(&entry, &c.pattern, &c.rx, &mut tunnel.procs) {
        return r.fail("error", format!("failed to start: {e}"));
    }
    let rss = PeakRss::start(r.relays.iter().map(|x| x.pid).collect());
    let outcome = run_reps(c, name, &tunnel, &mut r.reps);
    r.peak_rss_kib = rss.finish();
    if let Err(e) = outcome {
        let tails: Vec<String> = tunnel.procs.iter().map(|p| p.log_tail()).collect();
        return r.fail("error", format!("{e}\n{}", tails.join("\n")));
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn f2(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}

/// RSS is read in KiB and shown in MiB.
const KIB_PER_MIB: f64 = 1024.0;

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1}", k as f64 / KIB_PER_MIB))
        .unwrap_or_else(|| "-".into())
}

fn table_row(r: &PathResult, migtun: Option<f64>) -> String {
    let med = r.median_gbps();
    let reps: Vec<String> = r.reps.iter().map(|x| format!("{:.2}", x.gbps())).collect();
    let ratio = migtun
        .zip(med)
        .filter(|(_, p)| *p > 0.0)
        .map(|(m, p)| m / p);
    let cpu = match r.median_cpu_per_gib(None) {
        Some(t) if !r.relays.is_empty() => format!(
            "{t:.2} ({} + {})",
            f2(r.median_cpu_per_gib(Some(Side::Src))),
            f2(r.median_cpu_per_gib(Some(Side::Dst)))
        ),
        t => f2(t),
    };
    let rss = match (r.peak_rss(Side::Src), r.peak_rss(Side::Dst)) {
        (None, None) => "-".to_string(),
        (a, b) => format!("{} / {}", mib(a), mib(b)),
    };
    let notes = match r.status {
        "ok" => r.note.clone(),
        s if r.note.is_empty() => format!("{s}: {}", r.message),
        s => format!("{s}: {}; {}", r.message, r.note),
    };
    format!(
        "| {} | {} | {} | {} | {cpu} | {rss} | {} |",
        r.name,
        f2(med),
        if reps.is_empty() {
            "-".into()
        } else {
            reps.join(", ")
        },
        ratio
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "n/a".into()),
        md_cell(&notes)
    )
}

fn migtun_median(results: &[PathResult]) -> Option<f64> {
    results
        .iter()
        .find(|r| r.name == "migtun")
        .and_then(PathResult::median_gbps)
}

fn markdown(a: &Args, machine: &Value, results: &[PathResult]) -> String {
    let mut out = if a.streams == 1 {
        String::from("## Throughput, one stream\n\n")
    } else {
        format!("## Throughput, {} parallel streams\n\n", a.streams)
    };
    out.push_str(&machine_md(machine));
    out.push_str(&format!(
        "- {} GiB per rep through {}, UNIX socket to UNIX socket, median of {} reps; verify: {}\n\
         - CPU: user+sys seconds of the relaying processes and their children (source side + destination side) \
         per GiB carried, from /proc/PID/stat; peak RSS: VmHWM summed over each side's processes, MiB (source / destination)\n\n",
        a.size_gib,
        if a.streams == 1 { "one stream".to_string() } else { format!("{} parallel streams", a.streams) },
        a.reps,
        if a.full_verify { "every byte" } else { "byte count + 1/16 of the data" }
    ));
    out.push_str("| path | GB/s (median) | reps GB/s | migtun / path | CPU s / GiB (src + dst) | peak RSS MiB (src / dst) | notes |\n");
    out.push_str("|---|---:|---|---:|---:|---:|---|\n");
    let migtun = migtun_median(results);
    for r in results {
        out.push_str(&table_row(r, migtun));
        out.push('\n');
    }
    out
}

fn path_json(r: &PathResult, migtun: Option<f64>) -> Value {
    let med = r.median_gbps();
    let side = |s: Side| if s == Side::Src { "src" } else { "dst" };
    let reps: Vec<Value> = r
        .reps
        .iter()
        .map(|x| {
            json!({"bytes": x.t.bytes, "seconds": x.t.secs, "gb_per_s": x.gbps(), "first_byte_ms": x.t.first_byte_ms,
                   "cpu_s": x.relay_cpu.iter().sum::<f64>(), "cpu_s_per_gib": x.cpu_per_gib(&r.relays, None),
                   "relay_cpu_s": x.relay_cpu})
        })
        .collect();
    let relays: Vec<Value> = r
        .relays
        .iter()
        .enumerate()
        .map(|(i, x)| json!({"name": x.name, "side": side(x.side), "peak_rss_kib": r.peak_rss_kib.get(i)}))
        .collect();
    json!({
        "path": r.name, "status": r.status, "message": r.message, "note": r.note,
        "median_gb_per_s": med,
        "migtun_ratio": migtun.zip(med).filter(|(_, p)| *p > 0.0).map(|(m, p)| m / p),
        "median_cpu_s_per_gib": r.median_cpu_per_gib(None),
        "median_cpu_s_per_gib_src": r.median_cpu_per_gib(Some(Side::Src)),
        "median_cpu_s_per_gib_dst": r.median_cpu_per_gib(Some(Side::Dst)),
        "peak_rss_kib_src": r.peak_rss(Side::Src), "peak_rss_kib_dst": r.peak_rss(Side::Dst),
        "relays": relays, "reps": reps,
    })
}

fn results_json(c: &Ctx, machine: &Value, results: &[PathResult]) -> Value {
    let mut m = machine.clone();
    m["loadavg_end"] = loadavg().into();
    let migtun = migtun_median(results);
    json!({
        "machine": m, "size_bytes": c.total, "size_gib": c.args.size_gib, "reps": c.args.reps,
        "streams": c.args.streams, "verify": if c.args.full_verify { "full" } else { "sample" },
        "paths": results.iter().map(|r| path_json(r, migtun)).collect::<Vec<_>>(),
    })
}

fn main() {
    let args = parse_args();
    install_signal_handlers();
    let machine = machine_info();
    let mut pattern = vec![0u8; PATTERN_LEN];
    rand::rngs::SmallRng::seed_from_u64(PATTERN_SEED).fill_bytes(&mut pattern);
    let pattern = Arc::new(pattern);
    let tmp = match tempfile::Builder::new().prefix("mtb").tempdir_in("/tmp") {
        Ok(t) => t,
        Err(e) => fail_exit(&format!("temp dir in /tmp: {e}")),
    };
    let sink = tmp.path().join("sink.sock");
    let rx = start_sink(&sink, pattern.clone(), args.full_verify).unwrap_or_else(|e| fail_exit(&e));
    let c = Ctx {
        total: ((args.size_gib * GIB) as u64).max(1),
        tmp: tmp.path().to_path_buf(),
        args,
        sink,
        pattern,
        rx,
    };
    eprintln!(
        "throughput: {} bytes ({} GiB) per rep in {} stream(s), {} reps, paths {}, verify {}, work dir {}",
        c.total,
        c.args.size_gib,
        c.args.streams,
        c.args.reps,
        c.args.only.join(","),
        if c.args.full_verify { "full" } else { "sample" },
        c.tmp.display()
    );
    let results: Vec<PathResult> = TUNNEL_PATHS
        .iter()
        .filter(|(name, _)| c.args.only.iter().any(|o| o == name))
        .map(|(name, setup)| run_path(&c, name, *setup))
        .collect();
    let md = markdown(&c.args, &machine, &results);
    println!("{md}");
    write_json(&c.args.json, &results_json(&c, &machine, &results));
    write_markdown(&c.args.json, &md);
}

fn fail_exit(msg: &str) -> ! {
    eprintln!("throughput: {msg}");
    std::process::exit(1)
}
