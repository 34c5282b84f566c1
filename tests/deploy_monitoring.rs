//! deploy/prometheus and deploy/grafana: promtool checks the alert rules and runs their unit
//! tests, the dashboard's queries are valid PromQL (promtool checks them as recording rules),
//! and every metric the rules and the dashboard name is one that real agents expose, with the
//! exposition's suffixes (`_total`, `_bucket`, ...), series included where traffic makes them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");
/// How long an agent may take to answer on its metrics address, or a series to appear.
const WAIT: Duration = Duration::from_secs(20);

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// promtool, or None after saying loudly that it is missing (a failure under CI).
fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some("promtool");
    }
    let msg = "promtool not found (apt-get install --no-install-recommends prometheus; .ci/run does): rules NOT checked";
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
    eprintln!("\n*** deploy_monitoring: {msg} ***\n");
    None
}

fn promtool_ok(args: &[&str], dir: &Path) {
    let Some(promtool) = promtool() else { return };
    let out = Command::new(promtool).args(args).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let dir = deploy().join("prometheus");
    promtool_ok(&["check", "rules", "migtun-rules.yml"], &dir);
    promtool_ok(&["test", "rules", "migtun-rules.test.yml"], &dir);
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(deploy().join("grafana/migtun.json")).unwrap();
    serde_json::from_str(&text).expect("deploy/grafana/migtun.json is JSON")
}

/// Every query of the dashboard, Grafana's variables as Prometheus would get them.
fn dashboard_queries() -> Vec<(String, String)> {
    let d = dashboard();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            let expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*");
            out.push((p["title"].as_str().unwrap_or_default().to_string(), expr));
        }
    }
    // The agent picker: label_values(SELECTOR, label) is Grafana's; its selector is PromQL.
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q.strip_prefix("label_values(").and_then(|r| r.rsplit_once(',')).map(|(sel, _)| sel).expect("label_values(SELECTOR, label)");
            out.push((format!("variable {}", v["name"]), inner.to_string()));
        }
    }
    out
}

#[test]
fn the_dashboard_is_well_formed_and_covers_what_operators_watch() {
    let d = dashboard();
    assert_eq!(d["uid"], "migtun");
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(ids.insert(p["id"].as_i64().expect("panel id")), "panel ids are unique: {title}");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_i64().unwrap(), g["w"].as_i64().unwrap());
        assert!(x >= 0 && w > 0 && x + w <= 24 && g["h"].as_i64().unwrap() > 0, "{title}: within the 24-column grid");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: the dashboard's datasource variable");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: has queries");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().unwrap().to_string()), "{title}: refIds unique");
            assert!(t["expr"].as_str().is_some_and(|e| e.contains("instance=~\"$instance\"")), "{title}: follows the agent picker");
        }
    }
    let titles: Vec<String> = panels.iter().map(|p| p["title"].as_str().unwrap_or_default().to_lowercase()).collect();
    for topic in ["throughput by peer and route", "open streams", "failures by reason", "by phase", "by outcome", "duration", "certificate expiry"] {
        assert!(titles.iter().any(|t| t.contains(topic)), "a panel on {topic}: {titles:?}");
    }
    // Valid PromQL: promtool parses each query as a recording rule.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in dashboard_queries().iter().enumerate() {
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {}\n", serde_json::to_string(expr).unwrap()));
    }
    std::fs::write(dir.path().join("dashboard-rules.yml"), rules).unwrap();
    promtool_ok(&["check", "rules", "dashboard-rules.yml"], dir.path());
}

/// The metric names (`migtun_...`) of the rules' expressions and the dashboard's queries.
fn names_used() -> BTreeMap<String, Vec<String>> {
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut add = |text: &str, whence: String| {
        let mut rest = text;
        while let Some(at) = rest.find("migtun_") {
            let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[at + name.len()..];
            used.entry(name).or_default().push(whence.clone());
        }
    };
    let rules = std::fs::read_to_string(deploy().join("prometheus/migtun-rules.yml")).unwrap();
    for line in rules.lines().filter(|l| l.trim_start().starts_with("expr:")) {
        add(line, "migtun-rules.yml".into());
    }
    for (title, expr) in dashboard_queries() {
        add(&expr, format!("dashboard: {title}"));
    }
    used
}

/// The sample names a family of `kind` named `family` has in the text exposition.
fn sample_names(family: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{family}_total"), format!("{family}_created")],
        "histogram" => ["_bucket", "_sum", "_count", "_created"].iter().map(|s| format!("{family}{s}")).collect(),
        "info" => vec![format!("{family}_info")],
        _ => vec![family.to_string()],
    }
}

fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Agent {
    child: Child,
    metrics: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, name: &str, toml: &str, metrics: SocketAddr) -> Agent {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml).unwrap();
    let child = Command::new(MIGTUN).args(["serve", "--config"]).arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut agent = Agent { child, metrics };
    let deadline = Instant::now() + WAIT;
    while scrape(metrics).is_none() {
        assert!(agent.child.try_wait().unwrap().is_none(), "{name} exited at start (run `migtun check --config {}`)", config.display());
        assert!(Instant::now() < deadline, "{name} never answered on {metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

/// The sample lines' metric names in an exposition.
fn samples(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

/// Two real agents: host-a forwards to host-b's route `data` (bytes, streams, handshakes), to a
/// route host-b does not have (a stream failure), and to a "host-c" that is really host-b (a
/// handshake failure: wrong name); host-b gets bytes that are not TLS (a port refusal). Every
/// metric the rules and the dashboard name is then a sample name of a family the agents
/// declare, and those the traffic touches have series.
#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_exposed_by_real_agents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    for args in [vec!["certs", "init", "--dir"], vec!["certs", "issue", "--name", "host-a", "--dir"], vec!["certs", "issue", "--name", "host-b", "--dir"]] {
        let out = Command::new(MIGTUN).args(&args).arg(&pki).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (port_a, port_b) = (free_port(), free_port());
    let (metrics_a, metrics_b): (SocketAddr, SocketAddr) =
        (format!("127.0.0.1:{}", free_port()).parse().unwrap(), format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let p = pki.display();
    let dd = d.display();
    let tls = |host: &str| format!("[tls]\ncert = \"{p}/{host}.pem\"\nkey = \"{p}/{host}.key\"\nca = \"{p}/ca.pem\"\n");
    // The target of host-b's route: echoes what it reads.
    let target = d.join("target.sock");
    let listener = UnixListener::bind(&target).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = conn;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    let b = start(
        d,
        "host-b",
        &format!(
            "name = \"host-b\"\nlisten = \"127.0.0.1:{port_b}\"\nmetrics = \"{metrics_b}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"127.0.0.1:{port_a}\"\n\n\
             [[expose]]\nroute = \"data\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n",
            tls("host-b"),
            target.display()
        ),
        metrics_b,
    );
    let a = start(
        d,
        "host-a",
        &format!(
            "name = \"host-a\"\nlisten = \"127.0.0.1:{port_a}\"\nmetrics = \"{metrics_a}\"\n{}\n\
             [[peer]]\nname = \"host-b\"\naddress = \"127.0.0.1:{port_b}\"\n\n[[peer]]\nname = \"host-c\"\naddress = \"127.0.0.1:{port_b}\"\n\n\
             [[forward]]\nlisten = \"unix:{dd}/data.sock\"\npeer = \"host-b\"\nroute = \"data\"\n\n\
             [[forward]]\nlisten = \"unix:{dd}/nope.sock\"\npeer = \"host-b\"\nroute = \"nope\"\n\n\
             [[forward]]\nlisten = \"unix:{dd}/c.sock\"\npeer = \"host-c\"\nroute = \"data\"\n",
            tls("host-a")
        ),
        metrics_a,
    );

    // Traffic: a round trip on `data`, a stream to a route host-b lacks, one to "host-c".
    let mut s = UnixStream::connect(d.join("data.sock")).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let payload = vec![7u8; 256 << 10];
    s.write_all(&payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, payload, "the echo came back through both agents");
    for sock in ["nope.sock", "c.sock"] {
        let mut s = UnixStream::connect(d.join(sock)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = s.write_all(b"x");
        let _ = s.read(&mut [0u8; 16]);
    }
    let mut junk = TcpStream::connect(("127.0.0.1", port_b)).unwrap();
    junk.set_read_timeout(Some(WAIT)).unwrap();
    let _ = junk.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let _ = junk.read(&mut [0u8; 16]);

    // Series the traffic makes, on whichever agent counts them.
    let expect_series = [
        "migtun_bytes_total",
        "migtun_streams_open",
        "migtun_stream_failures_total",
        "migtun_handshakes_total",
        "migtun_handshake_failures_total",
        "migtun_port_refusals_total",
        "migtun_certificate_not_after_seconds",
        "migtun_build_info",
    ];
    let deadline = Instant::now() + WAIT;
    let (text_a, text_b) = loop {
        let (ta, tb) = (scrape(a.metrics).unwrap_or_default(), scrape(b.metrics).unwrap_or_default());
        let have: BTreeSet<String> = samples(&ta).union(&samples(&tb)).cloned().collect();
        let lacking: Vec<&str> = expect_series.iter().copied().filter(|n| !have.contains(*n)).collect();
        if lacking.is_empty() {
            break (ta, tb);
        }
        assert!(Instant::now() < deadline, "no series of {lacking:?} after the traffic:\n{ta}\n---\n{tb}");
        std::thread::sleep(Duration::from_millis(100));
    };

    // The families the agents declare, and the sample names each has.
    let mut valid: BTreeMap<String, String> = BTreeMap::new();
    for line in text_a.lines().chain(text_b.lines()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(family), Some(kind)) = (it.next(), it.next()) {
                for sample in sample_names(family, kind) {
                    valid.insert(sample, format!("{family} ({kind})"));
                }
            }
        }
    }
    let have = samples(&text_a).union(&samples(&text_b)).cloned().collect::<BTreeSet<_>>();
    let used = names_used();
    assert!(used.len() >= 12, "the rules and the dashboard name the metrics: {used:?}");
    let mut unknown = Vec::new();
    for (name, whence) in &used {
        match valid.get(name) {
            Some(family) => eprintln!(
                "{name}: {family}, {}",
                if have.contains(name) { "with series" } else { "declared (# TYPE), no series yet" }
            ),
            None => unknown.push(format!("{name} (in {})", whence.join(", "))),
        }
    }
    assert!(unknown.is_empty(), "names the agents do not expose: {unknown:?}\nthey expose: {:?}", valid.keys().collect::<Vec<_>>());
    for name in expect_series {
        assert!(used.contains_key(name), "{name} is on the dashboard or in the rules");
    }
}
