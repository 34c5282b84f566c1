//! A configured peer with a valid certificate sends hand-made cookies to a real destination
//! agent (`migtun serve` with `[qemu]` and the example prepare hook): a shell as the emulator,
//! forbidden QEMU options, `.`/`..`/absolute paths in the migration id, node names and file
//! names, disks too large for the limit or the free space, an id whose directory exists. Each
//! is refused with its reason in the error the source sees; nothing is written outside the
//! image directory (a sentinel directory, `run_dir` and its parent are checked); no hook and no
//! process runs. An ordinary cookie still prepares: the QEMU started is the configured
//! emulator, under seccomp, and an abandoned migration's directory goes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use migtun_control::messages::{Cookie, DiskSpec, MigrationParams};
use migtun_control::rpc::{RpcClient, RpcError};

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");
/// The id of a guest that migrated in earlier: its directory must survive everything.
const EARLIER: &str = "m-00000000000000aa";
/// An earlier guest whose QEMU exited: only its images are left (`image_dir/<id>`).
const EARLIER_DISKS_ONLY: &str = "m-00000000000000bb";

/// Finds QEMU; under CI its absence fails the test, elsewhere the QEMU part is skipped loudly.
fn find_qemu() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|p| p.to_str().map(str::to_string))
        .and_then(|p| p.split(':').map(|d| Path::new(d).join("qemu-system-x86_64")).find(|p| p.exists()));
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("qemu-system-x86_64 not found, and CI=true: .ci/run must install qemu-system-x86");
        }
        eprintln!("SKIPPED (partly): qemu-system-x86_64 not found; the ordinary prepare is not tried");
    }
    found
}

struct Site {
    _pki: Pki,
    root: PathBuf,
    run_dir: PathBuf,
    image_dir: PathBuf,
    outside: PathBuf,
    /// Created by a shell payload, if one ever ran.
    marker: PathBuf,
    /// Created by the hook wrapper whenever the hook runs.
    hook_ran: PathBuf,
    emulator: Option<PathBuf>,
    dest: Child,
    _a: RunningAgent,
    rpc: RpcClient,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.dest.kill();
        let _ = self.dest.wait();
    }
}

/// Every file and directory under `dir`, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle) && !c.contains("hostile_cookie"))
        .collect()
}

async fn site(run_as: Option<&str>) -> Site {
    let pki = Pki::new();
    let root = pki.dir.path().canonicalize().unwrap();
    // With run_as, QEMU (as that user) must reach run_dir/<id>, as under /run/migtun.
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    // parent/ holds run_dir (run/), image_dir (images/) and a sentinel, as /run/migtun holds
    // sockets next to qemu/. A guest that migrated in earlier has its directory in both.
    let parent = root.join("parent");
    let (run_dir, image_dir) = (parent.join("run"), parent.join("images"));
    std::fs::create_dir_all(run_dir.join(EARLIER)).unwrap();
    let earlier = image_dir.join(EARLIER);
    std::fs::create_dir_all(&earlier).unwrap();
    std::fs::create_dir_all(image_dir.join(EARLIER_DISKS_ONLY)).unwrap();
    std::fs::write(image_dir.join(EARLIER_DISKS_ONLY).join("disk0.raw"), b"kept disk").unwrap();
    std::fs::write(earlier.join("disk0.raw"), b"the guest that lives here").unwrap();
    std::fs::write(parent.join("sentinel"), b"x").unwrap();
    std::fs::write(run_dir.join("sentinel"), b"x").unwrap();
    let outside = root.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"precious").unwrap();
    let shared = root.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let marker = root.join("pwned");
    let hook_ran = root.join("hook-ran");
    let hook = root.join("hook");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prepare-hook");
    std::fs::write(&hook, format!("#!/bin/sh\ntouch {}\nexec {}\n", hook_ran.display(), example.display())).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let emulator = find_qemu().map(|q| q.canonicalize().unwrap());
    let emulator_key = emulator.clone().unwrap_or_else(|| PathBuf::from("/bin/true"));

    let (port_a, port_b) = (bind_port().await, bind_port().await);
    let (addr_a, addr_b) = (port_a.local_addr().unwrap(), port_b.local_addr().unwrap());
    drop(port_b);
    let admin = root.join("host-b.admin");
    let b = format!(
        "name = \"host-b\"\nlisten = \"{addr_b}\"\nadmin = \"{}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"{addr_a}\"\n\n[qemu]\nrun_dir = \"{}\"\nstate_dir = \"{}/state\"\nimage_dir = \"{}\"\nprepare_hook = \"{}\"\nemulator = \"{}\"\nshared_storage = [\"{}\"]\nallow_sources = [\"host-a\"]\n{}",
        admin.display(),
        tls_table(&pki.pki(), "host-b"),
        run_dir.display(),
        root.display(),
        image_dir.display(),
        hook.display(),
        emulator_key.display(),
        shared.display(),
        run_as.map(|u| format!("run_as = \"{u}\"\n")).unwrap_or_default(),
    );
    let config = root.join("host-b.toml");
    std::fs::write(&config, b).unwrap();
    let log = std::fs::File::create(root.join("host-b.log")).unwrap();
    let dest = Command::new(MIGTUN).args(["serve", "--config"]).arg(&config).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !admin.exists() {
        assert!(Instant::now() < deadline, "host-b did not start: {}", std::fs::read_to_string(root.join("host-b.log")).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = format!(
        "name = \"host-a\"\nlisten = \"{addr_a}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{addr_b}\"\n",
        tls_table(&pki.pki(), "host-a")
    );
    let a = start_agent(&root, "host-a", &a, port_a).await;
    let io = a.handle.connect_control("host-b").await.expect("control connection");
    let rpc = RpcClient::connect(io, "host-b", "host-a").await.expect("hello");
    Site { _pki: pki, root, run_dir, image_dir, outside, marker, hook_ran, emulator, dest, _a: a, rpc }
}

/// An ordinary guest's cookie (the command line tests/vm/mod.rs starts), one copied raw disk.
fn ordinary(src: &Path) -> Cookie {
    let f = |n: &str| src.join(n).display().to_string();
    let cmdline: Vec<String> = [
        "qemu-system-x86_64", "-name", "guest=hostile", "-machine", "pc,memory-backend=ram0", "-accel", "tcg", "-m", "64M",
        "-nodefaults", "-display", "none", "-object", &format!("memory-backend-file,id=ram0,size=64M,mem-path={},share=on", f("ram")),
        "-blockdev", &format!("driver=file,filename={},node-name=f0", f("disk0.raw")), "-blockdev", "driver=raw,file=f0,node-name=d0",
        "-device", "virtio-blk-pci,drive=d0,id=vd0", "-qmp", &format!("unix:{},server=on,wait=off", f("src.qmp")),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Cookie {
        migration: migtun_control::messages::new_migration_id(),
        vm: "hostile".into(),
        source: "host-a".into(),
        cmdline,
        disks: vec![DiskSpec {
            device: "vd0".into(),
            node_name: "d0".into(),
            size: 16 << 20,
            format: "raw".into(),
            source_file: f("disk0.raw"),
            copy: true,
        }],
        params: MigrationParams::default(),
        image_dir: String::new(),
        running: false,
    }
}

async fn refused(site: &Site, what: &str, cookie: &Cookie, reason: &str) {
    match site.rpc.call::<_, serde_json::Value>("prepare", cookie).await {
        Err(RpcError::Remote { status, message, .. }) => {
            assert!(status == 403 || status == 400, "{what}: status {status}: {message}");
            assert!(message.contains(reason), "{what}: the refusal names {reason:?}: {message}");
        }
        other => panic!("{what}: must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cookies_are_refused_with_reasons_and_touch_nothing() {
    let site = site(None).await;
    let src = site.root.join("src");
    let before_outside = tree(&site.outside);
    let before_parent = tree(site.run_dir.parent().unwrap());

    let mut c = ordinary(&src);
    c.cmdline = vec!["/bin/sh".into(), "-c".into(), format!("touch {}", site.marker.display())];
    refused(&site, "a shell as the emulator", &c, "cmdline[0]").await;

    let options: &[(&[&str], &str)] = &[
        (&["-drive", &format!("file={},format=raw,if=virtio", site.outside.join("victim").display())], "QEMU option -drive"),
        (&["-drive", "file=/etc/shadow,format=raw,if=virtio"], "QEMU option -drive"),
        (&["-chardev", &format!("file,id=c0,path={}", site.outside.join("new").display())], "QEMU option -chardev file"),
        (&["-netdev", &format!("tap,id=n0,script={}", site.marker.display())], "QEMU option -netdev tap"),
        (&["-plugin", "/tmp/evil.so"], "QEMU option -plugin"),
        (&["-add-fd", "fd=3,set=1"], "QEMU option -add-fd"),
        (&["-readconfig", "/etc/passwd"], "QEMU option -readconfig"),
        (&["-device", "vfio-pci,host=01:00.0"], "QEMU option -device vfio-pci"),
    ];
    for (extra, reason) in options {
        let mut c = ordinary(&src);
        c.cmdline.extend(extra.iter().map(|s| s.to_string()));
        refused(&site, &format!("{extra:?}"), &c, reason).await;
    }

    for id in [".", "..", "/tmp/x", "../m-0123456789abcdef", "m-0123456789abcdef/.."] {
        let mut c = ordinary(&src);
        c.migration = id.into();
        refused(&site, &format!("migration id {id:?}"), &c, "migration id").await;
    }
    let mut c = ordinary(&src);
    c.migration = EARLIER.into();
    refused(&site, "the id of a guest that lives here", &c, "used on this host before").await;
    // A guest whose QEMU has exited: its run dir is gone, its disks stay, and are not reused.
    let mut c = ordinary(&src);
    c.migration = EARLIER_DISKS_ONLY.into();
    refused(&site, "the id of a guest whose disks are kept here", &c, "used on this host before").await;

    for node in ["../../outside/x", ".", "/tmp/x"] {
        let mut c = ordinary(&src);
        c.disks[0].node_name = node.into();
        refused(&site, &format!("node name {node:?}"), &c, "disks[0].node_name").await;
    }
    for file in ["/x/..", "/x/.", "../outside/victim", "/x/.hidden"] {
        let mut c = ordinary(&src);
        c.disks[0].source_file = file.into();
        refused(&site, &format!("source file {file:?}"), &c, "disks[0].source_file").await;
    }
    let mut c = ordinary(&src);
    c.disks[0].size = 1 << 60;
    refused(&site, "a 1 EiB disk", &c, "qemu.max_disk_bytes").await;
    let mut c = ordinary(&src);
    c.disks[0].size = 3 << 40;
    refused(&site, "a disk larger than the free space", &c, "are free").await;
    let mut c = ordinary(&src);
    c.disks[0].copy = false;
    refused(&site, "a shared disk outside shared storage", &c, "qemu.shared_storage").await;

    assert!(!site.marker.exists(), "no shell ran");
    assert!(!site.hook_ran.exists(), "no hook ran for a refused cookie");
    assert_eq!(tree(&site.outside), before_outside, "nothing written in the sentinel directory");
    assert_eq!(tree(site.run_dir.parent().unwrap()), before_parent, "run_dir and its parent are as they were");
    assert_eq!(std::fs::read(site.image_dir.join(EARLIER).join("disk0.raw")).unwrap(), b"the guest that lives here");
    assert_eq!(std::fs::read(site.image_dir.join(EARLIER_DISKS_ONLY).join("disk0.raw")).unwrap(), b"kept disk");
    assert!(processes_mentioning(&site.run_dir.display().to_string()).is_empty(), "no process started");
    let log = std::fs::read_to_string(site.root.join("host-b.log")).unwrap();
    assert!(log.contains("refused an incoming migration"), "the destination logs refusals:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_cookie_runs_the_configured_emulator_sandboxed() {
    ordinary_prepare(None).await;
}

/// With `qemu.run_as`, QEMU runs as that user (and can still bind the migration's sockets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_run_as_qemu_runs_unprivileged() {
    if Command::new("id").arg("nobody").output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("SKIPPED: no user `nobody` on this host");
        return;
    }
    ordinary_prepare(Some("nobody")).await;
}

/// Prepares an ordinary cookie, checks what runs, then has the migration abandoned.
async fn ordinary_prepare(run_as: Option<&str>) -> Option<i32> {
    let site = site(run_as).await;
    let Some(emulator) = site.emulator.clone() else { return None };
    let mut c = ordinary(&site.root.join("src"));
    // A mem-path elsewhere lands in the image directory, the source's plumbing is dropped.
    c.cmdline.extend(["-daemonize", "-pidfile", "/etc/passwd"].map(String::from));
    let id = c.migration.clone();
    let reply: serde_json::Value = site.rpc.call("prepare", &c).await.unwrap_or_else(|e| {
        panic!("an ordinary cookie prepares: {e}\n{}", std::fs::read_to_string(site.root.join("host-b.log")).unwrap_or_default())
    });
    assert_eq!(reply["ram_route"], format!("{id}.ram"));
    assert!(site.hook_ran.exists());
    let dir = site.run_dir.join(&id);
    let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid")).unwrap().trim().parse().unwrap();
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(), emulator, "the configured emulator runs");
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).replace('\0', " ");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| status.lines().find(|l| l.starts_with(name)).map(|l| l.split_whitespace().skip(1).map(str::to_string).collect::<Vec<_>>()).unwrap_or_default();
    assert_eq!(field("Seccomp:"), ["2"], "QEMU runs under its seccomp filter:\n{status}");
    let uid = if run_as.is_some() { "65534" } else { "0" };
    assert!(field("Uid:").iter().all(|u| u == uid), "QEMU runs as uid {uid}:\n{status}");
    if run_as.is_some() {
        assert!(cmdline.contains("-runas nobody") && cmdline.contains("elevateprivileges=allow"), "{cmdline}");
    }
    assert!(!cmdline.contains("-daemonize") && !cmdline.contains("/etc/passwd"), "{cmdline}");
    let images = site.image_dir.join(&id);
    assert!(cmdline.contains(&format!("mem-path={}", images.join("ram").display())), "{cmdline}");
    assert_eq!(tree(&images), ["disk0.raw", "ram"], "the fresh image and the RAM file, nothing else");
    assert!(!processes_mentioning(&site.run_dir.display().to_string()).is_empty(), "the process check sees a running QEMU");

    // The source reports failure: QEMU is quit, only this migration's directory goes.
    let _ = site.rpc.call::<_, serde_json::Value>("finish", &serde_json::json!({"migration": id, "success": false, "resume": false})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while dir.exists() || images.exists() || std::path::Path::new(&format!("/proc/{pid}/exe")).exists() {
        assert!(Instant::now() < deadline, "the abandoned migration is cleaned up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(site.image_dir.join(EARLIER).join("disk0.raw").exists() && site.run_dir.join("sentinel").exists());
    Some(pid)
}
