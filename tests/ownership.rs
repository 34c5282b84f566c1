//! Forward sockets get the `owner`, `group` and `mode` their config gives them (names or
//! numeric ids, resolved when the config is validated), also after a reload changes them; an
//! unknown `[tunnels] group` or a bad `[tunnels] mode` is a config error naming its key (the
//! tunnels' directories themselves: `tests/tunnels.rs`).
//! Uses the users and groups every Debian system has (`nobody`, `nogroup`, 65534); giving a
//! file to another user needs root (CI runs as root; elsewhere the test says it is skipped).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;

fn forward(pki: &Pki, sock: &str, extra: &str) -> String {
    format!("\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"r\"\n{extra}", pki.path(sock).display())
}

fn config(pki: &Pki, addr: std::net::SocketAddr, forwards: &str) -> String {
    format!(
        "name = \"host-a\"\nlisten = \"{addr}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"127.0.0.1:9\"\n{forwards}",
        tls_table(&pki.pki(), "host-a")
    )
}

fn load(pki: &Pki, text: &str) -> Result<migtun_proxy::Config, migtun_proxy::config::ConfigError> {
    let path = pki.path("own.toml");
    std::fs::write(&path, text).unwrap();
    migtun_proxy::Config::load(&path)
}

/// The gid of group `name` (getent, so the test does not share the code under test).
fn gid_of(name: &str) -> u32 {
    let out = std::process::Command::new("getent").args(["group", name]).output().expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':').nth(2).and_then(|g| g.trim().parse().ok()).unwrap_or_else(|| panic!("no group {name}: {line:?}"))
}

#[test]
fn unknown_users_and_groups_are_config_errors_naming_the_key() {
    let pki = Pki::new();
    let addr = "127.0.0.1:7443".parse().unwrap();
    let e = load(&pki, &config(&pki, addr, &forward(&pki, "a.sock", "owner = \"no-such-user-migtun\"\n"))).unwrap_err();
    assert_eq!(e.key, "forward[0].owner", "{e}");
    assert!(e.problem.contains("no user \"no-such-user-migtun\""), "{e}");
    let e = load(&pki, &config(&pki, addr, &forward(&pki, "a.sock", "group = \"no-such-group-migtun\"\n"))).unwrap_err();
    assert_eq!(e.key, "forward[0].group", "{e}");
    let e = load(&pki, &config(&pki, addr, &forward(&pki, "a.sock", "group = \"../etc\"\n"))).unwrap_err();
    assert_eq!(e.key, "forward[0].group", "{e}");
    let e = load(&pki, &config(&pki, addr, &forward(&pki, "a.sock", "owner = -1\n"))).unwrap_err();
    assert_eq!(e.key, "forward[0].owner", "{e}");
    let tcp = "\n[[forward]]\nlisten = \"tcp:127.0.0.1:0\"\npeer = \"host-b\"\nroute = \"r\"\nowner = \"nobody\"\n";
    let e = load(&pki, &config(&pki, addr, tcp)).unwrap_err();
    assert_eq!(e.key, "forward[0].owner", "{e}");
    assert!(e.problem.contains("unix"), "{e}");
    let c = load(&pki, &config(&pki, addr, &forward(&pki, "a.sock", "owner = \"nobody\"\ngroup = 65534\n"))).unwrap();
    assert_eq!((c.forwards[0].owner.uid, c.forwards[0].owner.gid), (Some(65534), Some(65534)));
}

#[test]
fn an_unknown_tunnels_group_or_a_bad_tunnels_mode_is_a_config_error_naming_the_key() {
    let pki = Pki::new();
    let addr = "127.0.0.1:7443".parse().unwrap();
    let tunnels = |extra: &str| format!("\n[tunnels]\ndir = \"{}\"\nowner = \"nobody\"\n{extra}", pki.path("tunnels").display());
    let e = load(&pki, &config(&pki, addr, &tunnels("group = \"no-such-group-migtun\"\n"))).unwrap_err();
    assert_eq!(e.key, "tunnels.group", "{e}");
    assert!(e.problem.contains("no group \"no-such-group-migtun\""), "{e}");
    for (mode, why) in [("0640", "would lock tunnels.owner out"), ("0777", "any local user"), ("rwx", "not an octal mode")] {
        let e = load(&pki, &config(&pki, addr, &tunnels(&format!("mode = \"{mode}\"\n")))).unwrap_err();
        assert_eq!(e.key, "tunnels.mode", "{mode}: {e}");
        assert!(e.problem.contains(why), "{mode}: {e}");
    }
    let c = load(&pki, &config(&pki, addr, &tunnels("group = \"kvm\"\nmode = \"0770\"\n"))).unwrap();
    let t = c.tunnels.expect("[tunnels]");
    assert_eq!((t.ownership.uid, t.ownership.gid, t.mode), (Some(65534), Some(gid_of("kvm")), 0o770));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_sockets_get_the_configured_owner_group_and_mode() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run this test as root (chown to another user)");
        eprintln!("SKIPPED forward_sockets_get_the_configured_owner_group_and_mode: needs root to give a socket to another user");
        return;
    }
    let pki = Pki::new();
    let port = bind_port().await;
    let addr = port.local_addr().unwrap();
    let nogroup = gid_of("nogroup");
    let forwards = forward(&pki, "numeric.sock", "owner = 65534\ngroup = \"nogroup\"\nmode = \"0660\"\n")
        + &forward(&pki, "named.sock", "owner = \"nobody\"\nmode = \"0640\"\n").replace("route = \"r\"", "route = \"s\"");
    let text = config(&pki, addr, &forwards);
    let agent = start_agent(pki.dir.path(), "host-a", &text, port).await;
    let stat = |sock: &str| {
        let m = std::fs::symlink_metadata(pki.path(sock)).expect("socket file");
        (m.uid(), m.gid(), m.permissions().mode() & 0o777)
    };
    assert_eq!(stat("numeric.sock"), (65534, nogroup, 0o660));
    assert_eq!(stat("named.sock"), (65534, 0, 0o640), "no group: the agent's");

    // A reload that changes the owner: the forward listens again with the new one.
    let forwards = forward(&pki, "numeric.sock", "owner = 0\ngroup = 65534\nmode = \"0600\"\n")
        + &forward(&pki, "named.sock", "owner = \"nobody\"\nmode = \"0640\"\n").replace("route = \"r\"", "route = \"s\"");
    let path = pki.path("host-a.toml");
    std::fs::write(&path, config(&pki, addr, &forwards)).unwrap();
    let changes = agent.handle.reload(migtun_proxy::Config::load(&path).unwrap()).await.expect("reload");
    assert!(changes.iter().any(|c| c.contains("numeric.sock") && c.ends_with("changed")), "{changes:?}");
    assert_eq!(stat("numeric.sock"), (0, 65534, 0o600));
    assert_eq!(stat("named.sock"), (65534, 0, 0o640), "an unchanged forward is left alone");
    agent.stop().await;
    assert!(!pki.path("numeric.sock").exists(), "removed on shutdown");
}
