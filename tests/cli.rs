//! The `migtun` binary as an operator uses it: `certs`, `check`, `serve` with SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");

fn migtun(args: &[&str]) -> Output {
    Command::new(MIGTUN).args(args).output().expect("run migtun")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn make_pki(dir: &Path) {
    let pki = dir.to_str().unwrap();
    let out = migtun(&["certs", "init", "--dir", pki]);
    assert!(out.status.success(), "certs init: {}", String::from_utf8_lossy(&out.stderr));
    for host in ["host-a", "host-b"] {
        let out = migtun(&["certs", "issue", "--dir", pki, "--name", host]);
        assert!(out.status.success(), "certs issue: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn valid_config(dir: &Path) -> String {
    format!(
        r#"name = "host-a"
listen = "127.0.0.1:0"

[tls]
cert = "{0}/host-a.pem"
key = "{0}/host-a.key"
ca = "{0}/ca.pem"

[[peer]]
name = "host-b"
address = "127.0.0.1:7443"
transport = "tls"

[[forward]]
listen = "unix:{0}/migration.sock"
peer = "host-b"
route = "migration"

[[expose]]
route = "nbd"
target = "unix:{0}/nbd.sock"
allow = ["host-b"]
"#,
        dir.display()
    )
}

#[test]
fn certs_init_and_issue_write_private_keys_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    assert_eq!(mode(&dir.path().join("host-a.key")), 0o600);
    assert_eq!(mode(&dir.path().join("host-b.key")), 0o600);
    assert!(dir.path().join("host-a.pem").exists());
    let again = migtun(&["certs", "init", "--dir", dir.path().to_str().unwrap()]);
    assert!(!again.status.success(), "init refuses to overwrite a CA key");
    let bad = migtun(&["certs", "issue", "--dir", dir.path().to_str().unwrap(), "--name", "not a name"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a name"));
}

#[test]
fn check_explains_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let config = dir.path().join("a.toml");
    std::fs::write(&config, valid_config(dir.path())).unwrap();
    let out = migtun(&["check", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["host-a", "host-b", "migration", "nbd", "0600"] {
        assert!(stdout.contains(needle), "explanation mentions {needle}:\n{stdout}");
    }
}

/// Each broken config is refused with exit code != 0 and one line on stderr naming the key.
#[test]
fn check_refuses_bad_configs_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let good = valid_config(dir.path());
    let d = dir.path().display().to_string();
    std::fs::create_dir(dir.path().join("a-directory")).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown key", good.replace("transport = \"tls\"", "transprot = \"tls\""), "peer[0].transprot"),
        ("missing file", good.replace("host-a.key", "missing.key"), "tls.key"),
        ("unreadable key", good.replace(&format!("{d}/host-a.key"), &format!("{d}/a-directory")), "tls.key"),
        ("key of another host", good.replace("host-a.key", "host-b.key"), "tls.key"),
        ("name not in the certificate", good.replace("name = \"host-a\"", "name = \"host-z\""), "name"),
        ("forward to an unknown peer", good.replace("peer = \"host-b\"", "peer = \"host-q\""), "forward[0].peer"),
        (
            "duplicate route",
            format!("{good}\n[[expose]]\nroute = \"nbd\"\ntarget = \"unix:/tmp/x.sock\"\nallow = [\"host-b\"]\n"),
            "expose[1].route",
        ),
        ("bad transport", good.replace("transport = \"tls\"", "transport = \"udp\""), "peer[0].transport"),
        ("forward on a public address", good.replace(&format!("unix:{d}/migration.sock"), "tcp:0.0.0.0:5000"), "forward[0].listen"),
    ];
    for (what, text, key) in cases {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, &text).unwrap();
        let out = migtun(&["check", "--config", config.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: must be refused");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: one line, got:\n{stderr}");
        assert!(stderr.contains(&format!("`{key}`")), "{what}: names `{key}`: {stderr}");
    }
}

/// `migtun serve` drains and exits 0 on SIGTERM, removing its forward socket; with
/// `--log-format json` every log line is JSON.
#[test]
fn serve_drains_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let config = dir.path().join("a.toml");
    std::fs::write(&config, valid_config(dir.path())).unwrap();
    let mut child = Command::new(MIGTUN)
        .args(["--log-format", "json", "serve", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = dir.path().join("migration.sock");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "forward socket never appeared");
        assert!(child.try_wait().unwrap().is_none(), "serve exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(mode(&sock), 0o600, "forward sockets are private by default");
    // SAFETY: kill(2) on our own unreaped child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(!sock.exists(), "the forward socket is removed on shutdown");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("draining"), "{stderr}");
    for line in stderr.lines() {
        assert!(line.starts_with('{') && line.ends_with('}'), "JSON log line: {line}");
    }
}

/// `certs issue` never replaces a host's key by accident; `--force` renews; `--days` and `--ip`
/// shape the certificate.
#[test]
fn certs_issue_refuses_to_overwrite_unless_forced_and_takes_days_and_ips() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let pki = dir.path().to_str().unwrap();
    let key = std::fs::read(dir.path().join("host-a.key")).unwrap();
    let again = migtun(&["certs", "issue", "--dir", pki, "--name", "host-a"]);
    assert!(!again.status.success(), "an existing key is not replaced");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("host-a.key") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("host-a.key")).unwrap(), key, "the key is untouched");
    let forced = migtun(&["certs", "issue", "--dir", pki, "--name", "host-a", "--force", "--days", "30", "--ip", "10.1.2.3", "--ip", "fd00::7"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    assert_ne!(std::fs::read(dir.path().join("host-a.key")).unwrap(), key, "--force renews the key");
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.path().join("host-a.pem"))
        .output()
        .expect("openssl (to read the certificate)");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("IP Address:10.1.2.3") && text.contains("IP Address:FD00:0:0:0:0:0:0:7"), "{text}");
    assert!(text.contains("DNS:host-a"), "{text}");
    let end = Command::new("openssl").args(["x509", "-noout", "-checkend"]).arg((31 * 86400).to_string()).arg("-in").arg(dir.path().join("host-a.pem")).output().unwrap();
    assert!(!end.status.success(), "valid for 30 days, not 31");
    let end = Command::new("openssl").args(["x509", "-noout", "-checkend"]).arg((29 * 86400).to_string()).arg("-in").arg(dir.path().join("host-a.pem")).output().unwrap();
    assert!(end.status.success(), "valid for 29 days at least");
    let zero = migtun(&["certs", "issue", "--dir", pki, "--name", "host-c", "--days", "0"]);
    assert!(!zero.status.success());
}

/// `migtun check` finds what `serve` would refuse at start, beyond the config's own validity:
/// every problem at once, one line each naming the key and the file; `serve` refuses with the
/// same lines instead of an OS error without context.
#[test]
fn check_finds_what_serve_would_refuse_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let d = dir.path().display().to_string();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let text = valid_config(dir.path())
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace(&format!("unix:{d}/migration.sock"), &format!("unix:{d}/no-such-dir/migration.sock"))
        + &format!("\n[qemu]\nrun_dir = \"{d}/run\"\nstate_dir = \"{d}/state\"\nprepare_hook = \"{d}/no-such-hook\"\nemulator = \"/bin/true\"\n");
    std::fs::set_permissions(dir.path().join("host-a.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("a.toml");
    std::fs::write(&config, &text).unwrap();
    let file = config.display().to_string();
    let expect = [("listen", "in use"), ("tls.key", "chmod 600"), ("forward[0].listen", "no-such-dir"), ("qemu.prepare_hook", "no-such-hook")];
    let out = migtun(&["check", "--config", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for (key, what) in expect {
        let line = stderr.lines().find(|l| l.contains(&format!("`{key}`"))).unwrap_or_else(|| panic!("no line for {key}:\n{stderr}"));
        assert!(line.starts_with(&file) && line.contains(what), "{line}");
    }
    assert_eq!(stderr.lines().filter(|l| l.starts_with(&file)).count(), expect.len(), "one line each:\n{stderr}");
    let served = Command::new(MIGTUN).args(["serve", "--config", &file]).output().unwrap();
    let served_err = String::from_utf8_lossy(&served.stderr);
    assert!(!served.status.success());
    for (key, _) in expect {
        assert!(served_err.contains(&format!("`{key}`")), "serve names {key}:\n{served_err}");
    }
    drop(busy);
}

/// Every subcommand's `--help` shows an example, and every option says what it is for.
#[test]
fn every_subcommand_has_an_example_and_described_options() {
    for sub in [&["serve"][..], &["check"], &["certs"], &["certs", "issue"], &["migrate"], &["status"], &["resolve"], &["demo"], &["tunnel"], &["tunnel", "open"], &["tunnel", "close"], &["tunnel", "list"], &["reload"], &["healthcheck"], &["completions"], &["man"]] {
        let mut args = sub.to_vec();
        args.push("--help");
        let out = migtun(&args);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{sub:?}: {help}");
        assert!(help.contains("Example") && help.contains("migtun "), "{sub:?} --help has an example:\n{help}");
        // Short help: one line per option, its description beside it.
        let mut args = sub.to_vec();
        args.push("-h");
        let short = String::from_utf8_lossy(&migtun(&args).stdout).into_owned();
        for line in short.lines().filter(|l| l.trim_start().starts_with("--") && !l.contains("--help")) {
            assert!(line.trim().contains("  "), "{sub:?}: option without a description: {line}");
        }
    }
}
