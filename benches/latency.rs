//! Latency and scale through each path (direct, socat, socat+OpenSSL, stunnel, ssh -L, migtun
//! TLS, migtun QUIC): 64-byte request/response ping-pong (p50, p99), the time to open a new
//! stream and get the first byte back, and 1,000 concurrent streams through one pair of agents
//! (aggregate throughput, RSS of each agent). See `benches/README.md`.
//!
//! `cargo bench --bench latency [-- --reps 3 --pings 10000 --opens 200 --only a,b --scale-streams 1000]`

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const MSG: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The paths, in table order: `common::TUNNEL_PATHS` (shared with `throughput`).
const PATHS: &[(&str, SetupFn)] = TUNNEL_PATHS;

/// `cargo bench --bench latency -- [OPTIONS]`; see `benches/README.md`.
#[derive(clap::Parser, Debug)]
#[command(name = "latency", bin_name = "cargo bench --bench latency --", about = "Latency, stream-open time and scale through each tunnel path")]
struct Args {
    /// Reps per path; tables show the median over reps of each rep's figure (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 3)]
    reps: usize,
    /// 64-byte round trips per rep on one stream (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pings: usize,
    /// Warm-up round trips before the counted ones.
    #[arg(long, value_name = "N", default_value_t = 500)]
    warmup: usize,
    /// New streams per rep for the stream-open time (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 200)]
    opens: usize,
    /// Latency paths, comma-separated, or `none` to skip the latency part.
    #[arg(long, value_name = "a,b|none", default_value_t = Names::all(&names_of(PATHS)), value_parser = only_paths)]
    only: Names,
    /// Paths of the scale test, comma-separated, or `none`.
    #[arg(long, value_name = "a,b|none", default_value = "migtun,migtun-quic", value_parser = only_paths)]
    scale_only: Names,
    /// Concurrent streams of the scale test (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    scale_streams: usize,
    /// KiB each stream writes in the scale test (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    scale_kib: usize,
    /// Scale reps (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 3)]
    scale_reps: usize,
    /// Streams are opened in waves of N, each waiting until the previous one reached the server
    /// (0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = 100)]
    scale_batch: usize,
    /// Where the raw numbers go (the table goes next to it as `.md`).
    #[arg(long, value_name = "FILE", default_value_os_t = json_out_path("latency"))]
    json: PathBuf,
    #[command(flatten)]
    cargo: CargoBench,
}

/// `--only` / `--scale-only`: names of `PATHS`, or `none`.
fn only_paths(v: &str) -> Result<Names, String> {
    Names::parse(v, &names_of(PATHS), true)
}

fn parse_args() -> Args {
    let mut a = <Args as clap::Parser>::parse();
    // As before clap: a zero count means one.
    for n in [&mut a.reps, &mut a.pings, &mut a.opens, &mut a.scale_streams, &mut a.scale_kib, &mut a.scale_reps, &mut a.scale_batch] {
        *n = (*n).max(1);
    }
    a
}

// ---------------------------------------------------------------------------------------------
// The server behind every path: per connection, first byte `S` = sink (read to EOF, answer the
// byte count as u64 LE), anything else = echo everything (including that first byte).

struct Server {
    sinks_open: AtomicUsize,
}

fn start_server(path: &Path) -> Arc<Server> {
    let listener = UnixListener::bind(path).expect("bind server socket");
    let srv = Arc::new(Server {
        sinks_open: AtomicUsize::new(0),
    });
    let s2 = srv.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let srv = s2.clone();
            let _ = thread::Builder::new().stack_size(128 << 10).spawn(move || {
                let mut first = [0u8; 1];
                if c.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'S' {
                    srv.sinks_open.fetch_add(1, Ordering::SeqCst);
                    let mut buf = vec![0u8; 64 << 10];
                    let mut n = 0u64;
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) => break,
                            Ok(k) => n += k as u64,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => return,
                        }
                    }
                    let _ = c.write_all(&n.to_le_bytes());
                } else {
                    let mut buf = vec![0u8; 16 << 10];
                    if c.write_all(&first).is_err() {
                        return;
                    }
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) => break,
                            Ok(k) => {
                                if c.write_all(&buf[..k]).is_err() {
                                    return;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => return,
                        }
                    }
                    let _ = c.shutdown(Shutdown::Write);
                }
            });
        }
    });
    srv
}

fn connect(e: &Entry) -> std::io::Result<UnixStream> {
    let Entry::Unix(p) = e else {
        return Err(std::io::Error::other("TCP entries are not used here"));
    };
    let s = UnixStream::connect(p)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One byte out and back through the path, retried until `READY_TIMEOUT`.
fn wait_ready(e: &Entry, procs: &mut [Proc]) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        for p in procs.iter_mut() {
            if let Some(st) = p.exited() {
                return Err(format!("{} exited ({st})\n{}", p.name, p.log_tail()));
            }
        }
        let r = connect(e).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"E")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(())
        });
        match r {
            Ok(()) => return Ok(()),
            Err(err) => last = err.to_string(),
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no echo within {READY_TIMEOUT:?}: {last}"))
}

/// Microseconds of each of `n` 64-byte round trips on one stream (after `warmup`).
fn ping_pong(e: &Entry, n: usize, warmup: usize) -> Result<Vec<f64>, String> {
    let mut s = connect(e).map_err(|e| format!("connect: {e}"))?;
    let mut out = [b'E'; MSG];
    let mut inb = [0u8; MSG];
    let mut v = Vec::with_capacity(n);
    for i in 0..n + warmup {
        out[1..9].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        s.write_all(&out).map_err(|e| format!("write: {e}"))?;
        s.read_exact(&mut inb).map_err(|e| format!("read: {e}"))?;
        let dt = t.elapsed();
        if inb != out {
            return Err(format!("round trip {i}: the echo differs"));
        }
        if i >= warmup {
            v.push(dt.as_secs_f64() * 1e6);
        }
    }
    Ok(v)
}

/// Microseconds from `connect()` to the first byte back, for `n` new streams (one at a time).
fn stream_opens(e: &Entry, n: usize) -> Result<Vec<f64>, String> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let mut s = connect(e).map_err(|e| format!("open {i}: connect: {e}"))?;
        s.write_all(b"E")
            .map_err(|e| format!("open {i}: write: {e}"))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .map_err(|e| format!("open {i}: read: {e}"))?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(v)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

// ---------------------------------------------------------------------------------------------
// Scale

struct ScaleRep {
    open_secs: f64,
    gbps: f64,
    bytes: u64,
    secs: f64,
    /// Per agent: (name, VmRSS before, VmRSS with all streams open, peak VmRSS sampled during the
    /// transfer, VmHWM at the end, CPU seconds during the transfer), KiB.
    agents: Vec<(String, u64, u64, u64, u64, f64)>,
}

fn scale_rep(
    e: &Entry,
    srv: &Server,
    agents: &[(String, i32)],
    streams: usize,
    bytes_each: usize,
    batch: usize,
    pattern: &Arc<Vec<u8>>,
) -> Result<ScaleRep, String> {
    let rss = |pid: i32| rss_kib(pid).unwrap_or((0, 0));
    let before: Vec<u64> = agents.iter().map(|a| rss(a.1).0).collect();
    let base = srv.sinks_open.load(Ordering::SeqCst);
    let barrier = Arc::new(Barrier::new(streams + 1));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let t_open = Instant::now();
    let mut handles = Vec::with_capacity(streams);
    let errors_main = errors.clone();
    for i in 0..streams {
        let (e, barrier, errors, pattern) =
            (e.clone(), barrier.clone(), errors.clone(), pattern.clone());
        let h = thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || {
                let mut conn = None;
                for attempt in 0..50 {
                    match connect(&e).and_then(|mut s| s.write_all(b"S").map(|_| s)) {
                        Ok(s) => {
                            conn = Some(s);
                            break;
                        }
                        Err(err) if attempt == 49 => errors
                            .lock()
                            .unwrap()
                            .push(format!("stream {i}: connect: {err}")),
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
                barrier.wait();
                let Some(mut s) = conn else { return };
                let r = (|| -> std::io::Result<u64> {
                    let mut sent = 0;
                    while sent < bytes_each {
                        let n = (bytes_each - sent).min(pattern.len());
                        s.write_all(&pattern[..n])?;
                        sent += n;
                    }
                    s.shutdown(Shutdown::Write)?;
                    let mut ack = [0u8; 8];
                    s.read_exact(&mut ack)?;
                    Ok(u64::from_le_bytes(ack))
                })();
                match r {
                    Ok(n) if n == bytes_each as u64 => {}
                    Ok(n) => errors.lock().unwrap().push(format!(
                        "stream {i}: sink counted {n} bytes, sent {bytes_each}"
                    )),
                    Err(err) => errors.lock().unwrap().push(format!("stream {i}: {err}")),
                }
            })
            .map_err(|e| format!("spawn: {e}"))?;
        handles.push(h);
        // Open in waves of `batch`: wait until this wave has reached the sink.
        if (i + 1) % batch == 0 && i + 1 < streams {
            let deadline = Instant::now() + Duration::from_secs(30);
            while srv.sinks_open.load(Ordering::SeqCst) < base + i + 1
                && errors_main.lock().unwrap().is_empty()
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    // All streams open at the sink?
    let deadline = Instant::now() + Duration::from_secs(120);
    while srv.sinks_open.load(Ordering::SeqCst) < base + streams {
        if Instant::now() > deadline || !errors.lock().unwrap().is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let open_secs = t_open.elapsed().as_secs_f64();
    let opened = srv.sinks_open.load(Ordering::SeqCst) - base;
    thread::sleep(Duration::from_millis(300));
    let open_rss: Vec<u64> = agents.iter().map(|a| rss(a.1).0).collect();
    let cpu0: Vec<f64> = agents.iter().map(|a| cpu_secs_group(a.1)).collect();
    // Transfer, sampling the agents' RSS.
    let done = Arc::new(AtomicBool::new(false));
    let pids: Vec<i32> = agents.iter().map(|a| a.1).collect();
    let sampler = {
        let (done, pids) = (done.clone(), pids.clone());
        thread::spawn(move || {
            let mut peak = vec![0u64; pids.len()];
            while !done.load(Ordering::SeqCst) {
                for (i, p) in pids.iter().enumerate() {
                    peak[i] = peak[i].max(rss_kib(*p).map(|r| r.0).unwrap_or(0));
                }
                thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let t0 = Instant::now();
    barrier.wait();
    for h in handles {
        let _ = h.join();
    }
    let secs = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap_or_default();
    let errs = errors.lock().unwrap();
    if opened < streams || !errs.is_empty() {
        return Err(format!(
            "{opened} of {streams} streams opened; {} errors, first: {}",
            errs.len(),
            errs.first().cloned().unwrap_or_default()
        ));
    }
    let bytes = (streams * bytes_each) as u64;
    Ok(ScaleRep {
        open_secs,
        gbps: bytes as f64 / secs / 1e9,
        bytes,
        secs,
        agents: agents
            .iter()
            .enumerate()
            .map(|(i, (n, pid))| {
                let hwm = rss(*pid).1;
                let cpu = cpu_secs_group(*pid) - cpu0[i];
                (
                    n.clone(),
                    before[i],
                    open_rss[i],
                    peak.get(i).copied().unwrap_or(0).max(open_rss[i]),
                    hwm,
                    cpu,
                )
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args = parse_args();
    install_signal_handlers();
    let nofile = raise_nofile();
    let machine = machine_info();
    let tmp = tempfile::Builder::new()
        .prefix("mtl")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let server_path = tmp.path().join("echo.sock");
    let srv = start_server(&server_path);
    let mut pattern = vec![0u8; 64 << 10];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    let pattern = Arc::new(pattern);
    eprintln!(
        "latency: {} reps x {} pings (+{} warm-up), {} stream opens per rep; scale {} streams x {} KiB on {}; work dir {}; RLIMIT_NOFILE {nofile}",
        args.reps,
        args.pings,
        args.warmup,
        args.opens,
        args.scale_streams,
        args.scale_kib,
        args.scale_only.join(","),
        tmp.path().display()
    );

    let mut results = vec![];
    let mut scale_results = vec![];
    for (name, setup) in PATHS {
        let run_lat = args.only.iter().any(|o| o == name);
        let run_scale = args.scale_only.iter().any(|o| o == name);
        if !run_lat && !run_scale {
            continue;
        }
        let fwd = Fwd {
            local: tmp.path().join(format!("{name}-a.sock")),
            target: server_path.clone(),
        };
        let mut r = json!({"path": name, "status": "ok", "message": "", "note": ""});
        let mut sr = json!({"path": name, "status": "ok", "message": "", "note": "", "streams": args.scale_streams, "bytes_per_stream": args.scale_kib * 1024});
        let mut tunnel = match setup(tmp.path(), std::slice::from_ref(&fwd)) {
            Ok(Setup::Up(t)) => t,
            Ok(Setup::Skipped(why)) => {
                eprintln!("{name}: {why}");
                for x in [&mut r, &mut sr] {
                    x["status"] = "skipped".into();
                    x["message"] = why.clone().into();
                }
                if run_lat {
                    results.push(r);
                }
                if run_scale {
                    scale_results.push(sr);
                }
                continue;
            }
            Err(e) => {
                eprintln!("{name}: failed to start: {e}");
                for x in [&mut r, &mut sr] {
                    x["status"] = "error".into();
                    x["message"] =
                        format!("failed to start: {}", e.lines().next().unwrap_or("")).into();
                }
                if run_lat {
                    results.push(r);
                }
                if run_scale {
                    scale_results.push(sr);
                }
                continue;
            }
        };
        r["note"] = tunnel.note.clone().into();
        sr["note"] = tunnel.note.clone().into();
        let entry = tunnel.entries[0].clone();
        if let Err(e) = wait_ready(&entry, &mut tunnel.procs) {
            eprintln!("{name}: not ready: {e}");
            for x in [&mut r, &mut sr] {
                x["status"] = "error".into();
                x["message"] = format!("not ready: {}", e.lines().next().unwrap_or("")).into();
            }
            if run_lat {
                results.push(r);
            }
            if run_scale {
                scale_results.push(sr);
            }
            continue;
        }
        if run_lat {
            let mut reps = vec![];
            for i in 0..args.reps {
                let rep = ping_pong(&entry, args.pings, args.warmup)
                    .and_then(|p| Ok((sorted(p), sorted(stream_opens(&entry, args.opens)?))));
                match rep {
                    Ok((p, o)) => {
                        let x = json!({
                            "ping_p50_us": percentile(&p, 50.0), "ping_p99_us": percentile(&p, 99.0),
                            "ping_mean_us": p.iter().sum::<f64>() / p.len() as f64,
                            "open_p50_us": percentile(&o, 50.0), "open_p99_us": percentile(&o, 99.0),
                        });
                        eprintln!(
                            "{name}: rep {}/{}: ping-pong p50 {:.1} us p99 {:.1} us; open p50 {:.1} us p99 {:.1} us",
                            i + 1,
                            args.reps,
                            x["ping_p50_us"].as_f64().unwrap(),
                            x["ping_p99_us"].as_f64().unwrap(),
                            x["open_p50_us"].as_f64().unwrap(),
                            x["open_p99_us"].as_f64().unwrap()
                        );
                        reps.push(x);
                    }
                    Err(e) => {
                        let tails: Vec<String> = tunnel
                            .procs
                            .iter()
                            .map(|p| format!("{}\n{}", p.log_tail(), p.warnings()))
                            .collect();
                        eprintln!("{name}: rep {} failed: {e}\n{}", i + 1, tails.join("\n"));
                        r["status"] = "error".into();
                        r["message"] = format!("rep {} failed: {e}", i + 1).into();
                        break;
                    }
                }
            }
            for k in ["ping_p50_us", "ping_p99_us", "open_p50_us", "open_p99_us"] {
                let v: Vec<f64> = reps.iter().filter_map(|x| x[k].as_f64()).collect();
                r[format!("median_{k}")] = median(&v).into();
            }
            r["reps"] = reps.into();
            results.push(r);
        }
        if run_scale {
            let mut reps = vec![];
            for i in 0..args.scale_reps {
                match scale_rep(
                    &entry,
                    &srv,
                    &tunnel.agents,
                    args.scale_streams,
                    args.scale_kib * 1024,
                    args.scale_batch,
                    &pattern,
                ) {
                    Ok(x) => {
                        let ag: Vec<String> = x
                            .agents
                            .iter()
                            .map(|a| {
                                format!(
                                    "{}: RSS {} -> {} (peak {}) MiB, HWM {} MiB, {:.2} CPU s",
                                    a.0,
                                    a.1 >> 10,
                                    a.2 >> 10,
                                    a.3 >> 10,
                                    a.4 >> 10,
                                    a.5
                                )
                            })
                            .collect();
                        eprintln!(
                            "{name}: scale rep {}/{}: {} streams open in {:.2} s, {:.3} GB/s ({} bytes in {:.2} s); {}",
                            i + 1,
                            args.scale_reps,
                            args.scale_streams,
                            x.open_secs,
                            x.gbps,
                            x.bytes,
                            x.secs,
                            ag.join("; ")
                        );
                        reps.push(json!({
                            "open_secs": x.open_secs, "gb_per_s": x.gbps, "bytes": x.bytes, "seconds": x.secs,
                            "agents": x.agents.iter().map(|a| json!({
                                "name": a.0, "vmrss_before_kib": a.1, "vmrss_open_kib": a.2, "vmrss_peak_kib": a.3,
                                "vmhwm_kib": a.4, "cpu_secs_transfer": a.5,
                            })).collect::<Vec<_>>(),
                        }));
                    }
                    Err(e) => {
                        let tails: Vec<String> = tunnel
                            .procs
                            .iter()
                            .map(|p| format!("{}\n{}", p.log_tail(), p.warnings()))
                            .collect();
                        eprintln!(
                            "{name}: scale rep {} failed: {e}\n{}",
                            i + 1,
                            tails.join("\n")
                        );
                        sr["status"] = "error".into();
                        sr["message"] = format!("scale rep {} failed: {e}", i + 1).into();
                        break;
                    }
                }
            }
            let v: Vec<f64> = reps.iter().filter_map(|x| x["gb_per_s"].as_f64()).collect();
            sr["median_gb_per_s"] = median(&v).into();
            let v: Vec<f64> = reps
                .iter()
                .filter_map(|x| x["open_secs"].as_f64())
                .collect();
            sr["median_open_secs"] = median(&v).into();
            sr["reps"] = reps.into();
            scale_results.push(sr);
        }
        drop(tunnel);
    }

    // Markdown.
    let mut out = String::from("## Latency: 64-byte ping-pong and stream open\n\n");
    out.push_str(&machine_md(&machine));
    out.push_str(&format!(
        "- {} reps per path; per rep {} round trips of 64 bytes on one stream (after {} warm-up) and {} new streams \
         (connect, 1 byte out, 1 byte back); the table shows the median over reps of each rep's percentile\n\n",
        args.reps, args.pings, args.warmup, args.opens
    ));
    out.push_str("| path | ping-pong p50 µs | p99 µs | reps p50 µs | migtun p50 / path p50 | stream open p50 µs | p99 µs | notes |\n|---|---:|---:|---|---:|---:|---:|---|\n");
    let mig = results
        .iter()
        .find(|r| r["path"] == "migtun")
        .and_then(|r| r["median_ping_p50_us"].as_f64());
    let f = |v: &serde_json::Value| {
        v.as_f64()
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "-".into())
    };
    for r in &results {
        let reps: Vec<String> = r["reps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.1}", x["ping_p50_us"].as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        let ratio = match (mig, r["median_ping_p50_us"].as_f64()) {
            (Some(m), Some(p)) if p > 0.0 => format!("{:.2}", m / p),
            _ => "n/a".into(),
        };
        let notes = notes_of(r);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["path"].as_str().unwrap_or(""),
            f(&r["median_ping_p50_us"]),
            f(&r["median_ping_p99_us"]),
            if reps.is_empty() {
                "-".into()
            } else {
                reps.join(", ")
            },
            ratio,
            f(&r["median_open_p50_us"]),
            f(&r["median_open_p99_us"]),
            notes
        ));
    }
    if !scale_results.is_empty() {
        out.push_str(&format!(
            "\n## Scale: {} concurrent streams through one pair of agents\n\n- streams opened in waves of {} (each wave waits until the previous one reached the sink), each held open (one byte through it), then all write {} KiB at once and half-close; \
             GB/s = all bytes / time from the start signal to the last sink's ack; median of {} reps. RSS from /proc/PID/status: \
             VmRSS before opening -> with all streams open (idle), peak VmRSS sampled every 10 ms during the transfer, VmHWM at the end (max over reps)\n\n",
            args.scale_streams, args.scale_batch, args.scale_kib, args.scale_reps
        ));
        out.push_str("| path | GB/s (median) | reps GB/s | open all s | agent | VmRSS before → open MiB | peak VmRSS MiB | VmHWM MiB | CPU s / GiB | notes |\n|---|---:|---|---:|---|---|---:|---:|---:|---|\n");
        for r in &scale_results {
            let reps = r["reps"].as_array().cloned().unwrap_or_default();
            let gb: Vec<String> = reps
                .iter()
                .map(|x| format!("{:.2}", x["gb_per_s"].as_f64().unwrap_or(0.0)))
                .collect();
            let notes = notes_of(r);
            let names: Vec<String> = reps
                .first()
                .and_then(|x| x["agents"].as_array())
                .map(|a| {
                    a.iter()
                        .map(|g| g["name"].as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            let mib = |k: &str, n: &str, pick: fn(Vec<u64>) -> u64| -> u64 {
                pick(
                    reps.iter()
                        .filter_map(|x| {
                            x["agents"]
                                .as_array()?
                                .iter()
                                .find(|g| g["name"] == n)
                                .and_then(|g| g[k].as_u64())
                        })
                        .collect(),
                ) >> 10
            };
            let agent_cells: Vec<String> = if names.is_empty() {
                vec!["- | - | - | - | -".into()]
            } else {
                names
                    .iter()
                    .map(|n| {
                        let cpu: Vec<f64> = reps
                            .iter()
                            .filter_map(|x| {
                                let g = x["agents"]
                                    .as_array()?
                                    .iter()
                                    .find(|g| g["name"] == n.as_str())?;
                                Some(
                                    g["cpu_secs_transfer"].as_f64()?
                                        / (x["bytes"].as_f64()? / (1u64 << 30) as f64),
                                )
                            })
                            .collect();
                        format!(
                            "{n} | {} → {} | {} | {} | {}",
                            mib("vmrss_before_kib", n, |v| v.into_iter().min().unwrap_or(0)),
                            mib("vmrss_open_kib", n, |v| v.into_iter().max().unwrap_or(0)),
                            mib("vmrss_peak_kib", n, |v| v.into_iter().max().unwrap_or(0)),
                            mib("vmhwm_kib", n, |v| v.into_iter().max().unwrap_or(0)),
                            median(&cpu)
                                .map(|c| format!("{c:.2}"))
                                .unwrap_or_else(|| "-".into())
                        )
                    })
                    .collect()
            };
            for (i, cells) in agent_cells.iter().enumerate() {
                if i == 0 {
                    out.push_str(&format!(
                        "| {} | {} | {} | {} | {cells} | {} |\n",
                        r["path"].as_str().unwrap_or(""),
                        r["median_gb_per_s"]
                            .as_f64()
                            .map(|x| format!("{x:.2}"))
                            .unwrap_or_else(|| "-".into()),
                        if gb.is_empty() {
                            "-".into()
                        } else {
                            gb.join(", ")
                        },
                        r["median_open_secs"]
                            .as_f64()
                            .map(|x| format!("{x:.2}"))
                            .unwrap_or_else(|| "-".into()),
                        notes
                    ));
                } else {
                    out.push_str(&format!("| | | | | {cells} | |\n"));
                }
            }
        }
    }
    println!("{out}");
    write_markdown(&args.json, &out);
    let mut m = machine.clone();
    m["loadavg_end"] = loadavg().into();
    write_json(
        &args.json,
        &json!({
            "machine": m, "reps": args.reps, "pings": args.pings, "warmup": args.warmup, "opens": args.opens,
            "message_bytes": MSG, "paths": results, "scale": scale_results,
        }),
    );
}
