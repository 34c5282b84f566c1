//! The config's tests: every key's errors, defaults, explain.

use super::raw::*;
use super::explain::fmt_time;
use super::*;
use migtun_certs::{Ca, IssueOptions};

/// A PKI in a tempdir: ca.pem, host-a.{pem,key}, host-b.{pem,key}.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        migtun_certs::init(dir.path()).unwrap();
        migtun_certs::issue(dir.path(), "host-a").unwrap();
        migtun_certs::issue(dir.path(), "host-b").unwrap();
        Pki { dir }
    }
    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }
    /// A config for host-a with the given tls.cert/tls.key, one peer (host-b), and `tail`
    /// appended at the end.
    fn config(&self, cert: &str, key: &str, tail: &str) -> String {
        format!(
            r#"name = "host-a"
listen = "0.0.0.0:7443"

[tls]
cert = "{cert}"
key = "{key}"
ca = "{ca}"

[[peer]]
name = "host-b"
address = "192.0.2.2:7443"

{tail}"#,
            ca = self.path("ca.pem"),
        )
    }
    fn valid(&self, tail: &str) -> String {
        self.config(&self.path("host-a.pem"), &self.path("host-a.key"), tail)
    }
    fn load(&self, text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "test.toml", self.dir.path())
    }
    fn err(&self, text: &str) -> ConfigError {
        let e = self.load(text).expect_err("config must be refused");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        e
    }
}

/// What a reload may change live and what it refuses, naming the key.
#[test]
fn restart_needed_names_each_key_a_reload_cannot_change() {
    let pki = Pki::new();
    let base = pki.load(&pki.valid("")).unwrap();
    let live = pki
        .load(&format!(
            "drain_timeout_secs = 5\n{}",
            pki.valid("[[expose]]\nroute = \"r\"\ntarget = \"tcp:127.0.0.1:22\"\nallow = [\"host-b\"]\n")
        ))
        .unwrap();
    assert!(base.restart_needed(&live).is_empty(), "{:?}", base.restart_needed(&live));
    let text = pki.valid("").replace("0.0.0.0:7443", "0.0.0.0:7444").replace("192.0.2.2:7443", "192.0.2.3:7443");
    let other = pki.load(&format!("metrics = \"127.0.0.1:9477\"\n{text}")).unwrap();
    let lines = base.restart_needed(&other);
    for key in ["`listen`", "`metrics`"] {
        assert!(lines.iter().any(|l| l.starts_with(key) && l.ends_with("needs a restart")), "{key}: {lines:?}");
    }
    assert_eq!(lines.len(), 2, "a peer's address changes live: {lines:?}");
    let qemu = pki.load(&pki.valid("[qemu]\nrun_dir = \"/run/x\"\n")).unwrap();
    assert_eq!(base.restart_needed(&qemu), ["`qemu`: changed from no [qemu] section to a [qemu] section; needs a restart"]);
    let qemu2 = pki.load(&pki.valid("[qemu]\nrun_dir = \"/run/y\"\nsandbox = false\n")).unwrap();
    let lines = qemu.restart_needed(&qemu2);
    assert!(lines.iter().any(|l| l.starts_with("`qemu.run_dir`")) && lines.iter().any(|l| l.starts_with("`qemu.sandbox`")), "{lines:?}");
}

/// Found by the `config` fuzz target: a quoted key with a newline made a two-line error
/// naming a key that does not exist (`a\nb.a`).
#[test]
fn a_key_with_control_characters_is_named_on_one_line() {
    let pki = Pki::new();
    let e = pki.err(&format!("\"a\\nb\\tc\" = 1\n{}", pki.valid("")));
    assert_key(&e, "a\\nb\\tc", "unknown key");
    let e = pki.err(&pki.valid("[[expose]]\nroute = \"r\"\ntarget = \"tcp:127.0.0.1:22\"\nallow = [\"host-b\"]\n\"x\\ny\" = 2\n"));
    assert_key(&e, "expose[0].x\\ny", "unknown key");
}

/// The wire refuses `.` and `..` as route names: a config naming one would never work.
#[test]
fn dot_routes_are_refused() {
    let pki = Pki::new();
    for route in [".", ".."] {
        let e = pki.err(&pki.valid(&format!("[[expose]]\nroute = \"{route}\"\ntarget = \"tcp:127.0.0.1:22\"\nallow = [\"host-b\"]\n")));
        assert_key(&e, "expose[0].route", "not allowed");
    }
}

/// `tls.crl`: relative to the config file, loaded, explained; a missing or malformed file,
/// or one revoking this host's own certificate, is an error naming the key.
#[test]
fn tls_crl() {
    let pki = Pki::new();
    let with_crl = |crl: &str| pki.valid("").replace("[[peer]]", &format!("crl = \"{crl}\"\n\n[[peer]]"));
    migtun_certs::issue(pki.dir.path(), "host-c").unwrap();
    migtun_certs::revoke(pki.dir.path(), "host-c").unwrap();
    let c = pki.load(&with_crl("crl.pem")).expect("relative tls.crl");
    assert_eq!(c.tls.crl_path, Some(pki.dir.path().join("crl.pem")));
    assert_eq!(c.tls.crls.len(), 1);
    assert!(c.explain().contains("revokes     "), "{}", c.explain());
    assert!(pki.load(&pki.valid("")).unwrap().tls.crls.is_empty(), "no tls.crl: nothing revoked");

    assert_key(&pki.err(&with_crl("missing.pem")), "tls.crl", "missing.pem: No such file");
    std::fs::write(pki.dir.path().join("junk.pem"), "junk").unwrap();
    assert_key(&pki.err(&with_crl("junk.pem")), "tls.crl", "holds no PEM CRL");
    migtun_certs::revoke(pki.dir.path(), "host-a").unwrap();
    assert_key(&pki.err(&with_crl("crl.pem")), "tls.cert", "is revoked by tls.crl");
}

#[test]
fn allow_names_a_configured_peer_and_top_level_keys_after_a_table_are_explained() {
    let pki = Pki::new();
    let e = pki.err(&pki.valid("[[expose]]\nroute = \"r\"\ntarget = \"unix:/t\"\nallow = [\"host-x\"]\n"));
    assert_key(&e, "expose[0].allow[0]", "unknown peer \"host-x\"");
    assert!(e.problem.contains("known peers: host-b"), "{e}");
    let e = pki.err(&pki.valid("[[expose]]\nroute = \"r\"\ntarget = \"unix:/t\"\nallow = [\"host-b\"]\nadmin = \"/run/a.sock\"\n"));
    assert_key(&e, "expose[0].admin", "top-level key");
    assert!(e.problem.contains("move it above the first [table]"), "{e}");
    let missing = Config::load(&pki.dir.path().join("nope.toml")).unwrap_err().to_string();
    assert!(!missing.contains("``"), "no empty key: {missing}");
    assert!(missing.contains("nope.toml: cannot read the config file"), "{missing}");
}

#[test]
fn syntax_errors_name_the_key_whose_value_they_are_in() {
    let at = |text: &str| parse(text).err().map(|(k, _)| k).unwrap_or_default();
    assert_eq!(at("name = \"a\"\n[tls]\ncert = \"x\"\n[qemu]\nrun_dir = \"/run/q\n"), "qemu.run_dir");
    assert_eq!(at("name = \"a\"\n[tls]\ncert = \"x\" junk\n[qemu]\nrun_dir = \"q\"\n"), "tls.cert");
    assert_eq!(at("name = \"a\"\n[tls]\ncert = \"x\"\n[qemu\nrun_dir = \"q\"\n"), "qemu");
    // An error on a continuation line of a multi-line value is the value's key's.
    assert_eq!(at("name = \"a\"\n[tls]\nca = [\"x\",\n\"y\" \"z\"]\n[qemu]\n"), "tls.ca");
    assert_eq!(at("name = \"a\"\n[[peer]]\nname = \"b\"\n[[peer]]\nname = b\n"), "peer[1].name");
}

fn assert_key(e: &ConfigError, key: &str, contains: &str) {
    assert_eq!(e.key, key, "{e}");
    assert!(
        e.problem.contains(contains),
        "problem {:?} should contain {contains:?}",
        e.problem
    );
}

const FULL: &str = r#"
[[peer]]
name = "host-c.example.org"
address = "192.0.2.3:7443"

[[forward]]
listen = "unix:/run/migtun/host-b/migration.sock"
peer = "host-b"
route = "migration"
mode = "0660"

[[forward]]
listen = "tcp:127.0.0.1:49152"
peer = "host-b"
route = "nbd.disk-0"

[[expose]]
route = "migration"
target = "unix:/run/libvirt/qemu/incoming.sock"
allow = ["host-b", "host-c.example.org"]

[qemu]
run_dir = "qemu-run"
prepare_hook = "/etc/migtun/prepare"
emulator = "/bin/true"
shared_storage = ["/srv/vm", "/var/lib/images"]
max_disk_bytes = 1099511627776
sandbox = true
allow_sources = ["host-b"]
max_incoming = 6
max_incoming_per_peer = 3
max_upload_bytes = 1048576
"#;

#[test]
fn full_valid_config_loads() {
    let pki = Pki::new();
    let text = pki.valid(FULL).replacen(
        "listen = \"0.0.0.0:7443\"\n",
        "listen = \"0.0.0.0:7443\"\nadmin = \"/run/migtun/admin.sock\"\nmetrics = \"127.0.0.1:9477\"\ndrain_timeout_secs = 5\n",
        1,
    );
    let c = pki.load(&text).unwrap();
    assert_eq!(c.name, "host-a");
    assert_eq!(c.listen, "0.0.0.0:7443".parse().unwrap());
    assert_eq!(
        c.admin.as_deref(),
        Some(Path::new("/run/migtun/admin.sock"))
    );
    assert_eq!(c.metrics, Some("127.0.0.1:9477".parse().unwrap()));
    assert_eq!(c.drain_timeout, Duration::from_secs(5));
    assert_eq!(c.tls.cert_chain.len(), 1);
    assert_eq!(c.tls.ca_certs.len(), 1);
    assert_eq!(c.peers.len(), 2);
    assert_eq!(c.peer("host-b").unwrap().address, "192.0.2.2:7443");
    assert_eq!(c.peers[0].transport, Transport::Tls);
    assert_eq!(c.forwards.len(), 2);
    assert_eq!(
        c.forwards[0].listen,
        Endpoint::Unix("/run/migtun/host-b/migration.sock".into())
    );
    assert_eq!(c.forwards[0].mode, 0o660);
    assert_eq!(
        c.forwards[1].listen,
        Endpoint::Tcp("127.0.0.1:49152".parse().unwrap())
    );
    assert_eq!(c.forwards[1].mode, DEFAULT_SOCKET_MODE);
    assert_eq!(c.forwards[1].route, "nbd.disk-0");
    assert_eq!(c.exposes[0].allow, ["host-b", "host-c.example.org"]);
    let q = c.qemu.as_ref().unwrap();
    assert_eq!(q.run_dir, pki.dir.path().join("qemu-run"));
    assert_eq!(
        q.prepare_hook.as_deref(),
        Some(Path::new("/etc/migtun/prepare"))
    );
    assert_eq!(q.emulator, Path::new("/bin/true"));
    assert_eq!(q.shared_storage, [PathBuf::from("/srv/vm"), PathBuf::from("/var/lib/images")]);
    assert_eq!(q.max_disk_bytes, 1 << 40);
    assert!(q.sandbox && q.run_as.is_none());
    assert_eq!(q.allow_sources, ["host-b"]);
    assert_eq!((q.max_incoming, q.max_incoming_per_peer, q.max_upload_bytes), (6, 3, 1 << 20));

    let text = c.explain();
    for want in [
        "identity: host-a",
        "DNS SANs: host-a",
        "days left",
        "CN=migtun CA",
        "TCP 0.0.0.0:7443 (TLS 1.3, mutual TLS",
        "host-b at 192.0.2.2:7443 over TLS/TCP",
        "unix:/run/migtun/host-b/migration.sock (mode 0660) → peer host-b, route migration",
        "tcp:127.0.0.1:49152 → peer host-b, route nbd.disk-0",
        "route migration → unix:/run/libvirt/qemu/incoming.sock allowed for host-b, host-c.example.org",
        "admin: /run/migtun/admin.sock",
        "metrics: http://127.0.0.1:9477/metrics",
        "drain: open streams may run 5 s",
        "destination QEMU is /bin/true, sandbox on, runs as the agent's user; copied disks up to 1099511627776 bytes each; shared storage: /srv/vm, /var/lib/images",
        "incoming migrations from: host-b (at most 6 at once, 3 per peer; side-channel files up to 1048576 bytes)",
    ] {
        assert!(text.contains(want), "explain lacks {want:?}:\n{text}");
    }
}

#[test]
fn defaults() {
    let pki = Pki::new();
    let c = pki.load(&pki.valid("")).unwrap();
    assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert!(c.admin.is_none() && c.metrics.is_none() && c.qemu.is_none());
    assert!(c.forwards.is_empty() && c.exposes.is_empty());
    assert!(c.explain().contains("admin: none"));
}

#[test]
fn relative_paths_resolved_against_config_dir() {
    let pki = Pki::new();
    let text = pki
        .config("host-a.pem", "./host-a.key", "")
        .replace(&pki.path("ca.pem"), "ca.pem");
    let file = pki.dir.path().join("migtun.toml");
    std::fs::write(&file, text).unwrap();
    let c = Config::load(&file).unwrap();
    assert_eq!(c.tls.cert_path, pki.dir.path().join("host-a.pem"));
    assert_eq!(c.tls.key_path, pki.dir.path().join("./host-a.key"));
    assert_eq!(c.tls.ca_path, pki.dir.path().join("ca.pem"));
    // Not relative to the current directory.
    let e = Config::from_toml(
        &std::fs::read_to_string(&file).unwrap(),
        "x.toml",
        Path::new("/nonexistent"),
    )
    .unwrap_err();
    assert_key(&e, "tls.cert", "/nonexistent/host-a.pem");
    let e = Config::load(&pki.dir.path().join("missing.toml")).unwrap_err();
    assert!(e.problem.contains("cannot read"), "{e}");
}

#[test]
fn unknown_keys() {
    let pki = Pki::new();
    let e = pki.err(&format!("nmae = \"x\"\n{}", pki.valid("")));
    assert_key(&e, "nmae", "unknown key (expected one of");
    assert!(e.problem.contains("(line 1)"), "{e}");
    let e = pki.err(&pki.valid("").replace("address =", "adress ="));
    assert_key(
        &e,
        "peer[0].adress",
        "unknown key (expected one of name, address, transport)",
    );
    assert!(e.problem.contains("(line 11)"), "{e}");
    let e =
        pki.err(&pki.valid("[[peer]]\nname = \"c\"\naddress = \"c:1\"\ntransprot = \"tls\"\n"));
    assert_key(&e, "peer[1].transprot", "unknown key");
    let e = pki.err(&pki.valid("[tls2]\n"));
    assert_key(&e, "tls2", "unknown key");
}

#[test]
fn missing_keys_and_wrong_types() {
    let pki = Pki::new();
    let e = pki.err(
        &pki.valid("")
            .replace(&format!("ca = \"{}\"\n", pki.path("ca.pem")), ""),
    );
    assert_key(&e, "tls.ca", "missing key");
    let e = pki.err(&pki.valid("").replace("name = \"host-a\"\n", ""));
    assert_key(&e, "name", "missing key");
    let e = pki.err(
        &pki.valid("")
            .replace("listen = \"0.0.0.0:7443\"", "listen = 7443"),
    );
    assert_key(&e, "listen", "invalid type");
    let e = pki.err(
        &pki.valid("[[expose]]\nroute = \"m\"\ntarget = \"unix:/t\"\nallow = [\"a\", 5]\n"),
    );
    assert_key(&e, "expose[0].allow[1]", "invalid type");
    let e = pki.err(&pki.valid(
        "[[forward]]\nlisten = \"unix:/a\"\npeer = \"host-b\"\nroute = \"m\"\nmode = 0o660\n",
    ));
    assert_key(&e, "forward[0].mode", "octal string");
}

#[test]
fn syntax_error_has_line() {
    let pki = Pki::new();
    let e = pki.err(
        &pki.valid("")
            .replace("address = \"192.0.2.2:7443\"", "address = 192.0.2.2:7443"),
    );
    assert!(
        e.problem.contains("TOML syntax error") && e.problem.contains("(line 11)"),
        "{e}"
    );
    assert_eq!(e.key, "peer[0].address");
}

#[test]
fn missing_and_unreadable_files() {
    let pki = Pki::new();
    let e = pki.err(&pki.config("/nonexistent/x.pem", &pki.path("host-a.key"), ""));
    assert_key(&e, "tls.cert", "/nonexistent/x.pem");
    let e = pki.err(&pki.config(&pki.path("host-a.pem"), &pki.path("nope.key"), ""));
    assert_key(&e, "tls.key", "nope.key");
    // A directory as key.
    let e = pki.err(&pki.config(&pki.path("host-a.pem"), &pki.path(""), ""));
    assert_key(&e, "tls.key", "cannot read");
    // A file without a key.
    let e = pki.err(&pki.config(&pki.path("host-a.pem"), &pki.path("host-a.pem"), ""));
    assert_key(&e, "tls.key", "no PEM private key");
    // A key file as certificate.
    let e = pki.err(&pki.config(&pki.path("host-a.key"), &pki.path("host-a.key"), ""));
    assert_key(&e, "tls.cert", "no PEM certificate");
    let e = pki.err(&pki.valid("").replace("ca.pem", "host-a.key"));
    assert_key(&e, "tls.ca", "no PEM certificate");
}

#[test]
fn key_must_match_cert() {
    let pki = Pki::new();
    let e = pki.err(&pki.config(&pki.path("host-a.pem"), &pki.path("host-b.key"), ""));
    assert_key(&e, "tls.key", "does not match tls.cert");
}

#[test]
fn name_must_be_a_san() {
    let pki = Pki::new();
    let e = pki.err(
        &pki.valid("")
            .replace("name = \"host-a\"", "name = \"host-c\""),
    );
    assert_key(&e, "name", "host-c is not a DNS SAN of");
    assert!(e.problem.contains("(it has: host-a)"), "{e}");
    // Case-insensitive.
    pki.load(
        &pki.valid("")
            .replace("name = \"host-a\"", "name = \"HOST-A\""),
    )
    .unwrap();
    let e = pki.err(
        &pki.valid("")
            .replace("name = \"host-a\"", "name = \"host a\""),
    );
    assert_key(&e, "name", "invalid name");
}

#[test]
fn expired_and_foreign_certs() {
    let pki = Pki::new();
    let ca = Ca::load(pki.dir.path()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |s: i64| migtun_certs::time::OffsetDateTime::from_unix_timestamp(s).unwrap();
    let opts = IssueOptions {
        not_before: Some(at(now - 864_000)),
        not_after: Some(at(now - 86_400)),
        ..Default::default()
    };
    let old = ca.issue("host-a", &opts).unwrap();
    let old_dir = tempfile::tempdir().unwrap();
    let (cert, key) = old.write(old_dir.path()).unwrap();
    let e = pki.err(&pki.config(&cert.display().to_string(), &key.display().to_string(), ""));
    assert_key(&e, "tls.cert", "has expired: valid from ");
    assert!(e.problem.contains(" UTC"), "{e}");

    // A certificate of another CA: peers would refuse it.
    let other = Ca::generate("other CA")
        .unwrap()
        .issue("host-a", &IssueOptions::default())
        .unwrap();
    let (cert, key) = other.write(old_dir.path()).unwrap();
    let e = pki.err(&pki.config(&cert.display().to_string(), &key.display().to_string(), ""));
    assert_key(&e, "tls.cert", "does not verify");
}

#[test]
fn peers() {
    let pki = Pki::new();
    let e = pki.err(&pki.valid("").replace(
        "address = \"192.0.2.2:7443\"",
        "address = \"192.0.2.2:7443\"\ntransport = \"udp\"",
    ));
    assert_key(&e, "peer[0].transport", "unknown transport \"udp\"");
    assert_key(
        &e,
        "peer[0].transport",
        "expected \"tls\", \"quic\" or \"auto\"",
    );
    for (name, t) in [("quic", Transport::Quic), ("auto", Transport::Auto)] {
        let c = pki
            .load(&pki.valid("").replace(
                "address = \"192.0.2.2:7443\"",
                &format!("address = \"192.0.2.2:7443\"\ntransport = \"{name}\""),
            ))
            .unwrap();
        assert_eq!(c.peers[0].transport, t);
    }
    let c = pki
        .load(&pki.valid("").replace(
            "address = \"192.0.2.2:7443\"",
            "address = \"192.0.2.2:7443\"\ntransport = \"tls\"",
        ))
        .unwrap();
    assert_eq!(c.peers[0].transport, Transport::Tls);

    let e = pki.err(&pki.valid("[[peer]]\nname = \"host-b\"\naddress = \"x:1\"\n"));
    assert_key(
        &e,
        "peer[1].name",
        "duplicate peer \"host-b\" (also peer[0])",
    );
    let e = pki.err(&pki.valid("[[peer]]\nname = \"host-a\"\naddress = \"x:1\"\n"));
    assert_key(&e, "peer[1].name", "own name");
    for (addr, ok) in [
        ("b.example.org:7443", true),
        ("[2001:db8::2]:7443", true),
        ("10.0.0.1:65535", true),
        ("", false),
        ("host", false),
        ("host:", false),
        ("host:70000", false),
        (":7443", false),
        ("2001:db8::2:7443", false),
        ("[2001:db8::zz]:7443", false),
        ("a b:1", false),
    ] {
        let r = pki.load(&pki.valid("").replace("192.0.2.2:7443", addr));
        match (r, ok) {
            (Ok(_), true) => {}
            (Err(e), false) => assert_eq!(e.key, "peer[0].address", "{addr}: {e}"),
            (r, _) => panic!("{addr}: {r:?}"),
        }
    }
}

#[test]
fn forwards() {
    let pki = Pki::new();
    let fwd = |listen: &str, peer: &str, route: &str| {
        format!("[[forward]]\nlisten = \"{listen}\"\npeer = \"{peer}\"\nroute = \"{route}\"\n")
    };
    let e = pki.err(&pki.valid(&fwd("unix:/run/a.sock", "host-x", "m")));
    assert_key(
        &e,
        "forward[0].peer",
        "unknown peer \"host-x\" (known peers: host-b)",
    );
    let e = pki.err(&pki.valid(&fwd("tcp:0.0.0.0:49152", "host-b", "m")));
    assert_key(&e, "forward[0].listen", "loopback");
    pki.load(&pki.valid(&fwd("tcp:[::1]:49152", "host-b", "m")))
        .unwrap();
    let e = pki.err(&pki.valid(&fwd("unix:rel.sock", "host-b", "m")));
    assert_key(&e, "forward[0].listen", "absolute");
    let e = pki.err(&pki.valid(&format!(
        "{}{}",
        fwd("unix:/a", "host-b", "m"),
        fwd("unix:/a", "host-b", "n")
    )));
    assert_key(
        &e,
        "forward[1].listen",
        "duplicate listen endpoint unix:/a (also forward[0])",
    );
    let e = pki.err(&pki.valid(&fwd("unix:/a", "host-b", "bad route")));
    assert_key(&e, "forward[0].route", "not allowed");
    let e = pki.err(&pki.valid(&fwd("unix:/a", "host-b", &"r".repeat(65))));
    assert_key(&e, "forward[0].route", "1 to 64");
    pki.load(&pki.valid(&fwd("unix:/a", "host-b", &"r".repeat(64))))
        .unwrap();
    let e = pki.err(&pki.valid(&format!(
        "{}mode = \"0660\"\n",
        fwd("tcp:127.0.0.1:1", "host-b", "m")
    )));
    assert_key(&e, "forward[0].mode", "unix");
    for bad in ["0999", "1777", "rw", "", "07777"] {
        let e = pki.err(&pki.valid(&format!(
            "{}mode = \"{bad}\"\n",
            fwd("unix:/a", "host-b", "m")
        )));
        assert_key(&e, "forward[0].mode", "");
    }
}

#[test]
fn exposes() {
    let pki = Pki::new();
    let exp = |route: &str, target: &str, allow: &str| {
        format!("[[expose]]\nroute = \"{route}\"\ntarget = \"{target}\"\nallow = [{allow}]\n")
    };
    let e = pki.err(&pki.valid(&format!(
        "{}{}",
        exp("migration", "unix:/a", "\"host-b\""),
        exp("migration", "unix:/b", "\"host-b\"")
    )));
    assert_key(
        &e,
        "expose[1].route",
        "duplicate route \"migration\" (also expose[0])",
    );
    let e = pki.err(&pki.valid(&exp("m", "udp:1.2.3.4:5", "\"host-b\"")));
    assert_key(
        &e,
        "expose[0].target",
        "expected \"unix:/absolute/path\" or \"tcp:IP:PORT\"",
    );
    let e = pki.err(&pki.valid(&exp("m", "unix:/a", "")));
    assert_key(&e, "expose[0].allow", "empty");
    let e = pki.err(&pki.valid(&exp("m", "unix:/a", "\"host-b\", \"not a name\"")));
    assert_key(&e, "expose[0].allow[1]", "invalid name");
    let e = pki.err(&pki.valid(&exp("", "unix:/a", "\"host-b\"")));
    assert_key(&e, "expose[0].route", "1 to 64");
}

#[test]
fn top_level_values() {
    let pki = Pki::new();
    let set = |line: &str| {
        pki.valid("").replacen(
            "listen = \"0.0.0.0:7443\"\n",
            &format!("listen = \"0.0.0.0:7443\"\n{line}\n"),
            1,
        )
    };
    assert_key(
        &pki.err(&set("drain_timeout_secs = 3601")),
        "drain_timeout_secs",
        "between 0 and 3600",
    );
    assert_key(
        &pki.err(&set("drain_timeout_secs = -1")),
        "drain_timeout_secs",
        "between 0 and 3600",
    );
    assert_key(
        &pki.err(&set("admin = \"admin.sock\"")),
        "admin",
        "absolute",
    );
    assert_key(
        &pki.err(&set("metrics = \"localhost:9477\"")),
        "metrics",
        "IP:PORT",
    );
    let e = pki.err(&pki.valid("").replace("0.0.0.0:7443", "0.0.0.0"));
    assert_key(&e, "listen", "IP:PORT");
    let e = pki.err(&pki.valid("[qemu]\nrun_dir = \"\"\n"));
    assert_key(&e, "qemu.run_dir", "empty");
    assert_key(
        &pki.err(&pki.valid("[qemu]\n")),
        "qemu.run_dir",
        "missing key",
    );
}

#[test]
fn qemu_destination_keys_are_validated() {
    let pki = Pki::new();
    let q = |tail: &str| pki.valid(&format!("[qemu]\nrun_dir = \"r\"\n{tail}"));
    let c = pki.load(&q("")).unwrap();
    let d = c.qemu.as_ref().unwrap();
    assert_eq!(d.emulator, Path::new(DEFAULT_EMULATOR));
    assert_eq!(d.max_disk_bytes, DEFAULT_MAX_DISK_BYTES);
    assert!(d.sandbox && d.shared_storage.is_empty() && d.run_as.is_none());
    assert!(c.explain().contains("shared storage: none (migrations with disks that are not copied are refused)"));

    let not_exec = pki.dir.path().join("not-exec");
    std::fs::write(&not_exec, "").unwrap();
    assert_key(&pki.err(&q("emulator = \"qemu-system-x86_64\"")), "qemu.emulator", "absolute path");
    assert_key(&pki.err(&q(&format!("emulator = \"{}\"", not_exec.display()))), "qemu.emulator", "not executable");
    assert_key(&pki.err(&q(&format!("emulator = \"{}\"", pki.dir.path().display()))), "qemu.emulator", "not a regular file");
    assert_key(&pki.err(&q("emulator = \"/nonexistent/qemu\"")), "qemu.emulator", "No such file");
    assert_key(&pki.err(&q("shared_storage = [\"/srv\", \"vm\"]")), "qemu.shared_storage[1]", "absolute");
    assert_key(&pki.err(&q("shared_storage = [\"/\"]")), "qemu.shared_storage[0]", "any file");
    assert_key(&pki.err(&q("shared_storage = [\"/srv/../etc\"]")), "qemu.shared_storage[0]", "`..`");
    assert_key(&pki.err(&q("max_disk_bytes = 0")), "qemu.max_disk_bytes", "positive");
    assert_key(&pki.err(&q("run_as = \"root\"")), "qemu.run_as", "unprivileged");
    assert_key(&pki.err(&q("run_as = \"no-such-user-migtun\"")), "qemu.run_as", "no such user");
    assert_key(&pki.err(&q("run_as = \"Bad Name\"")), "qemu.run_as", "not a user name");
    let c = pki.load(&q("sandbox = false")).unwrap();
    assert!(!c.qemu.unwrap().sandbox);
}

#[test]
fn qemu_allow_sources_and_limits() {
    let pki = Pki::new();
    let qemu = |extra: &str| pki.valid(&format!("[qemu]\nrun_dir = \"/run/q\"\n{extra}"));
    // Absent: no incoming migration, defaults for the limits.
    let c = pki.load(&qemu("")).unwrap();
    let q = c.qemu.as_ref().unwrap();
    assert!(q.allow_sources.is_empty());
    assert_eq!(
        (q.max_incoming, q.max_incoming_per_peer, q.max_upload_bytes),
        (DEFAULT_MAX_INCOMING, DEFAULT_MAX_INCOMING_PER_PEER, DEFAULT_MAX_UPLOAD_BYTES)
    );
    assert!(c.explain().contains("incoming migrations: none accepted (qemu.allow_sources is empty)"), "{}", c.explain());
    // A per-peer default never exceeds a smaller total.
    let c = pki.load(&qemu("max_incoming = 2")).unwrap();
    assert_eq!(c.qemu.as_ref().unwrap().max_incoming_per_peer, 2);

    assert_key(&pki.err(&qemu("allow_sources = [\"host-x\"]")), "qemu.allow_sources[0]", "unknown peer \"host-x\"");
    assert_key(
        &pki.err(&qemu("allow_sources = [\"host-b\", \"host-b\"]")),
        "qemu.allow_sources[1]",
        "listed twice",
    );
    assert_key(&pki.err(&qemu("max_incoming = 0")), "qemu.max_incoming", "between 1 and 1024");
    assert_key(&pki.err(&qemu("max_incoming_per_peer = 5000")), "qemu.max_incoming_per_peer", "between 1 and 1024");
    assert_key(
        &pki.err(&qemu("max_incoming = 2\nmax_incoming_per_peer = 3")),
        "qemu.max_incoming_per_peer",
        "more than qemu.max_incoming (2)",
    );
    assert_key(&pki.err(&qemu("max_upload_bytes = -1")), "qemu.max_upload_bytes", "negative");
}

#[test]
fn tunnels_owner_group_and_mode_are_resolved_and_explained() {
    let pki = Pki::new();
    let t = |extra: &str| pki.valid(&format!("[tunnels]\ndir = \"/run/migtun/tunnels\"\nallow = [\"host-b\"]\n{extra}"));
    let c = pki.load(&t("")).unwrap();
    let d = c.tunnels.as_ref().unwrap();
    assert_eq!((d.ownership, d.mode), (Ownership::default(), DEFAULT_TUNNEL_DIR_MODE));
    assert!(c.explain().contains("tunnels: dir /run/migtun/tunnels, accepted from host-b; at most 16 open at once, TTL up to 3600 s"), "{}", c.explain());
    assert!(c.explain().contains("each tunnel's directory: mode 0750, the agent's user, the agent's group; its sockets on the listening side: mode 0660"), "{}", c.explain());
    // The owner's primary group unless `group` says otherwise (a name or a numeric id).
    let c = pki.load(&t("owner = \"nobody\"")).unwrap();
    assert_eq!(c.tunnels.as_ref().unwrap().ownership, Ownership { uid: Some(65534), gid: Some(65534) });
    let c = pki.load(&t("owner = \"nobody\"\ngroup = 0\nmode = \"0770\"")).unwrap();
    let d = c.tunnels.as_ref().unwrap();
    assert_eq!((d.ownership, d.mode), (Ownership { uid: Some(65534), gid: Some(0) }, 0o770));
    assert!(c.explain().contains("mode 0770, owner nobody (uid 65534), gid 0;"), "{}", c.explain());
    let c = pki.load(&t("group = \"root\"")).unwrap();
    assert_eq!(c.tunnels.as_ref().unwrap().ownership, Ownership { uid: None, gid: Some(0) });
    assert!(pki.load(&pki.valid("")).unwrap().explain().contains("tunnels: not configured"));

    assert_key(&pki.err(&t("group = \"no-such-group-migtun\"")), "tunnels.group", "no group \"no-such-group-migtun\"");
    assert_key(&pki.err(&t("group = -1")), "tunnels.group", "not a group id");
    assert_key(&pki.err(&t("owner = \"root\"")), "tunnels.owner", "unprivileged");
    for (bad, why) in [("0650", "lock tunnels.owner out"), ("0057", "lock tunnels.owner out"), ("0772", "any local user"), ("0999", "octal"), ("4750", "0777"), ("", "octal")] {
        assert_key(&pki.err(&t(&format!("mode = \"{bad}\""))), "tunnels.mode", why);
    }
    assert_key(&pki.err(&t("mode = 0o750")), "tunnels.mode", "octal string");
}

#[test]
fn display_is_one_line_naming_the_key() {
    let pki = Pki::new();
    let e = pki.err(&pki.valid("").replace(
        "address = \"192.0.2.2:7443\"",
        "address = \"192.0.2.2:7443\"\ntransport = \"udp\"",
    ));
    let s = e.to_string();
    assert!(
        s.starts_with("test.toml: `peer[0].transport`: unknown transport \"udp\""),
        "{s}"
    );
    assert_eq!(s.lines().count(), 1);
}

#[test]
fn record_layer_defaults_to_own_is_explained_and_a_bad_value_names_the_key() {
    let pki = Pki::new();
    let c = pki.load(&pki.valid("")).unwrap();
    assert_eq!(c.tls.record_layer, RecordLayer::Own);
    assert!(c.explain().contains("records     own (tls.record_layer:"), "{}", c.explain());
    for (value, layer) in [("own", RecordLayer::Own), ("rustls", RecordLayer::Rustls)] {
        let text = pki.valid("").replacen("[tls]\n", &format!("[tls]\nrecord_layer = \"{value}\"\n"), 1);
        let c = pki.load(&text).unwrap();
        assert_eq!(c.tls.record_layer, layer);
        assert!(c.explain().contains(&format!("records     {value} (tls.record_layer:")), "{}", c.explain());
    }
    let e = pki.err(&pki.valid("").replacen("[tls]\n", "[tls]\nrecord_layer = \"kernel\"\n", 1));
    assert_key(&e, "tls.record_layer", "unknown record layer \"kernel\" (expected \"own\" or \"rustls\")");
    let e = pki.err(&pki.valid("").replacen("[tls]\n", "[tls]\nrecord_layer = 1\n", 1));
    assert_eq!(e.key, "tls.record_layer", "{e}");
}

#[test]
fn time_format() {
    assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(fmt_time(1_767_225_599), "2025-12-31 23:59:59 UTC");
}
