//! The control plane against hostile callers, with real agents, real certificates and (for the
//! prepared migration) a real QEMU: strangers of the same CA and peers not in
//! `[qemu] allow_sources` get 403s naming the key and nothing is done; caps on incoming
//! migrations hold under hundreds of concurrent prepares; HTTP/2 floods are refused by h2 and
//! by the body limit; idle connections are closed; uploads over `max_upload_bytes` or cut off
//! leave no file behind.

mod common;
mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use migtun_control::messages::{new_migration_id, Cookie, FinishReply, FinishRequest, MigrationParams, PrepareReply};
use migtun_control::rpc::{FileHeader, Router, RpcClient, RpcError};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// host-b (the destination, serving the production control router), and three callers that
/// all name host-b as their peer: host-a and host-c are host-b's configured peers, host-d has a
/// certificate of the same CA but is not a peer of host-b.
struct Fleet {
    pki: Pki,
    b: RunningAgent,
    a: RunningAgent,
    c: RunningAgent,
    d: RunningAgent,
    run_dir: PathBuf,
    /// Where the test hooks leave their marks.
    marks: PathBuf,
}

/// Whatever a test leaves behind: destination QEMUs recorded under `run_dir/*/qemu.pid`.
impl Drop for Fleet {
    fn drop(&mut self) {
        if let Ok(dirs) = std::fs::read_dir(&self.run_dir) {
            for d in dirs.flatten() {
                vm::kill_qemu_of_pidfile(&d.path().join("qemu.pid"));
            }
        }
    }
}

enum Hook {
    /// Records that it ran, fails.
    Recording,
    /// Marks its start, waits for `marks/release`, fails.
    Blocking,
    /// The example hook: starts a real QEMU.
    Example,
    /// Its "QEMU" answered the hook's probe, then died: the QMP socket refuses, the pid in
    /// `qemu.pid` has exited, the log ends with why (as when `-runas` lacks CAP_SETGID).
    QemuGone,
}

impl Fleet {
    /// `qemu`: the lines of host-b's `[qemu]` table after `run_dir` and `prepare_hook`; `None`:
    /// no `[qemu]` table at all.
    async fn start(qemu: Option<&str>, hook: Hook) -> Fleet {
        let pki = Pki::new();
        pki.issue("host-d");
        let marks = pki.path("marks");
        std::fs::create_dir(&marks).unwrap();
        let run_dir = pki.path("run-b");
        let hook_path = match hook {
            Hook::Example => Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prepare-hook"),
            Hook::Recording => script(&pki, "hook", &format!("#!/bin/sh\necho ran >> '{}/hook-ran'\nexit 1\n", marks.display())),
            Hook::Blocking => script(
                &pki,
                "hook",
                &format!(
                    "#!/bin/sh\ntouch '{m}/started.'$$\nwhile [ ! -e '{m}/release' ]; do sleep 0.05; done\necho 'released by the test' >&2\nexit 3\n",
                    m = marks.display()
                ),
            ),
            Hook::QemuGone => script(
                &pki,
                "hook",
                "#!/usr/bin/python3\nimport json, os, socket, subprocess, sys\nreq = json.load(sys.stdin)\n\
                 s = socket.socket(socket.AF_UNIX)\ns.bind(req['qmp'])\ns.listen(1)\ns.close()\n\
                 p = subprocess.Popen(['true'])\np.wait()\n\
                 open(os.path.join(os.path.dirname(req['qmp']), 'qemu.pid'), 'w').write(str(p.pid))\n\
                 open(req['log'], 'a').write('qemu-system-x86_64: -runas: setgid: Operation not permitted\\n')\n\
                 print(req['qmp'])\n",
            ),
        };
        let ports = [bind_port().await, bind_port().await, bind_port().await, bind_port().await];
        let addr: Vec<_> = ports.iter().map(|p| p.local_addr().unwrap()).collect();
        let [pb, pa, pc, pd] = ports;
        let qemu_table = match qemu {
            None => String::new(),
            Some(lines) => format!(
                "\n[qemu]\nrun_dir = \"{}\"\nstate_dir = \"{}.state\"\nimage_dir = \"{}.images\"\nprepare_hook = \"{}\"\n{lines}\n",
                run_dir.display(),
                run_dir.display(),
                run_dir.display(),
                hook_path.display()
            ),
        };
        let b = format!(
            "name = \"host-b\"\nlisten = \"{}\"\n{}\n[[peer]]\nname = \"host-a\"\naddress = \"{}\"\n\n[[peer]]\nname = \"host-c\"\naddress = \"{}\"\n\n[[expose]]\nroute = \"echo\"\ntarget = \"unix:{}\"\nallow = [\"host-a\"]\n{qemu_table}",
            addr[0],
            tls_table(&pki.pki(), "host-b"),
            addr[1],
            addr[2],
            pki.path("echo.sock").display(),
        );
        let caller = |name: &str, me: std::net::SocketAddr, extra: &str| {
            format!(
                "name = \"{name}\"\nlisten = \"{me}\"\n{}\n[[peer]]\nname = \"host-b\"\naddress = \"{}\"\n{extra}",
                tls_table(&pki.pki(), name),
                addr[0]
            )
        };
        let a = caller(
            "host-a",
            addr[1],
            &format!("\n[[forward]]\nlisten = \"unix:{}\"\npeer = \"host-b\"\nroute = \"echo\"\n", pki.path("echo-in.sock").display()),
        );
        let (c, d) = (caller("host-c", addr[2], ""), caller("host-d", addr[3], ""));
        let dir = pki.dir.path();
        // host-b's control plane as `migtun serve` builds it: its router, then (the journal is
        // free here) its journal's parts started, before any peer asks.
        let mut plane = None;
        let b = start_agent_serving(dir, "host-b", &b, pb, |h, c| {
            let p = migtun_control::service::ControlPlane::new(h, c);
            let router = p.router().into_handler();
            plane = Some((p, c.qemu.as_ref().map(|q| q.state_dir.clone())));
            Some(router)
        })
        .await;
        if let Some((plane, Some(state_dir))) = plane {
            let journal = migtun_control::journal::Journal::open(&state_dir).expect("host-b's journal");
            plane.start(std::sync::Arc::new(journal)).await;
        }
        let a = start_agent(dir, "host-a", &a, pa).await;
        let c = start_agent(dir, "host-c", &c, pc).await;
        let d = start_agent(dir, "host-d", &d, pd).await;
        Fleet { pki, b, a, c, d, run_dir, marks }
    }

    /// Files and directories under host-b's `run_dir` (absent counts as empty).
    fn run_dir_entries(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.run_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }

    fn marks(&self, prefix: &str) -> usize {
        std::fs::read_dir(&self.marks)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .count()
    }

    fn refusals(&self, labels: &[(&str, &str)]) -> f64 {
        self.b.sample("migtun_control_refusals_total", labels)
    }
}

fn script(pki: &Pki, name: &str, text: &str) -> PathBuf {
    let path = pki.path(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// A control connection from `from` to host-b, with the hello done.
async fn rpc(from: &RunningAgent) -> Result<RpcClient, String> {
    let io = from.handle.connect_control("host-b").await.map_err(|e| e.to_string())?;
    RpcClient::connect(io, "host-b", &from.name).await.map_err(|e| e.to_string())
}

/// A cookie like a source sends: a plain QEMU command line, no disks.
fn cookie(id: &str, source: &str) -> Cookie {
    let cmdline = ["qemu-system-x86_64", "-name", "guest=vm1", "-machine", "pc", "-accel", vm::accel(), "-m", "32M", "-nodefaults", "-display", "none"];
    Cookie {
        migration: id.to_string(),
        vm: "vm1".into(),
        source: source.to_string(),
        cmdline: cmdline.iter().map(|s| s.to_string()).collect(),
        disks: Vec::new(),
        params: MigrationParams::default(),
        image_dir: String::new(),
        running: false,
    }
}

fn file_header(id: &str, name: &str, data: &[u8]) -> FileHeader {
    FileHeader { migration: id.into(), name: name.into(), size: data.len() as u64, sha256: hex::encode(Sha256::digest(data)) }
}

/// What a caller got for one method: `Ok(status, message)` from host-b, or `Err` when the
/// connection itself was refused or closed.
type Answer = Result<(u16, String), String>;

fn answer<T: std::fmt::Debug>(r: Result<T, RpcError>) -> Answer {
    match r {
        Err(RpcError::Remote { status, message, .. }) => Ok((status, message)),
        Err(e) => Err(e.to_string()),
        Ok(v) => panic!("must be refused, got {v:?}"),
    }
}

/// `from` tries prepare, finish and upload for migration `id` (claiming to be its source).
async fn try_everything(from: &RunningAgent, id: &str) -> Vec<(&'static str, Answer)> {
    let rpc = match rpc(from).await {
        Ok(r) => r,
        Err(e) => return ["prepare", "finish", "upload"].into_iter().map(|m| (m, Err(e.clone()))).collect(),
    };
    let data = DataGen::new(1).bytes(300_000);
    let prepare = rpc.call::<_, PrepareReply>("prepare", &cookie(id, &from.name)).await;
    let finish = rpc.call::<_, FinishReply>("finish", &FinishRequest { migration: id.into(), success: true, resume: true }).await;
    let upload = rpc.upload::<_, serde_json::Value>(&file_header(id, "nvram.fd", &data), &data[..], Duration::from_secs(30)).await;
    vec![("prepare", answer(prepare)), ("finish", answer(finish)), ("upload", answer(upload))]
}

/// A configured peer that is not in `allow_sources`, and a host of the same CA that is not a
/// peer at all, try every method: each is refused with a reason naming the key, counted, and
/// nothing is created or started on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_allowed_peer_and_stranger_get_nothing() {
    let fleet = Fleet::start(Some("allow_sources = [\"host-a\"]"), Hook::Recording).await;
    let id = new_migration_id();

    for (method, got) in try_everything(&fleet.c, &id).await {
        let (status, message) = got.unwrap_or_else(|e| panic!("host-c {method}: a 403 expected, got {e}"));
        assert_eq!(status, 403, "host-c {method}: {message}");
        assert!(message.contains("host-c may not migrate guests here") && message.contains("not in [qemu] allow_sources of host-b"), "{message}");
        let labels = [("peer", "host-c"), ("method", method), ("reason", "not-allowed")];
        assert_eq!(fleet.refusals(&labels), 1.0, "host-c {method} counted");
    }

    // A stranger: refused at the port (closed after the handshake), or by the control plane.
    let mut refused_by_rpc = 0.0;
    for (method, got) in try_everything(&fleet.d, &id).await {
        match got {
            Err(e) => eprintln!("host-d {method}: connection refused: {e}"),
            Ok((status, message)) => {
                assert_eq!(status, 403, "host-d {method}: {message}");
                assert!(message.contains("not a configured [[peer]] of host-b") && message.contains("allow_sources"), "{message}");
                refused_by_rpc += 1.0;
            }
        }
    }
    assert_eq!(fleet.refusals(&[("peer", "unknown"), ("reason", "not-a-peer")]), refused_by_rpc);
    assert_eq!(fleet.refusals(&[("peer", "host-d")]), 0.0, "a stranger's name never becomes a label");

    assert!(fleet.run_dir_entries().is_empty(), "nothing under run_dir: {:?}", fleet.run_dir_entries());
    assert_eq!(fleet.marks("hook-ran"), 0, "the prepare hook never ran");

    // The allowed peer, lying about the source, is refused too (and still nothing runs).
    let rpc = rpc(&fleet.a).await.unwrap();
    let got = answer(rpc.call::<_, PrepareReply>("prepare", &cookie(&id, "host-c")).await).unwrap();
    assert_eq!(got.0, 403, "{got:?}");
    assert!(got.1.contains("host-a may not prepare a migration from host-c"), "{got:?}");
    // And the allowed peer reaches the hook (which fails here): the policy lets it through.
    let got = answer(rpc.call::<_, PrepareReply>("prepare", &cookie(&id, "host-a")).await).unwrap();
    assert_eq!(got.0, 500, "the recording hook fails: {got:?}");
    assert_eq!(fleet.marks("hook-ran"), 1);
    assert!(fleet.run_dir_entries().is_empty(), "a failed prepare leaves nothing: {:?}", fleet.run_dir_entries());
}

/// A hook whose QEMU answered its probe and then died before the agent connected: the prepare
/// fails saying so (the pid has exited, and QEMU's last log line), in the same words whether
/// the agent's connect was refused or dropped; nothing is left under `run_dir`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_whose_qemu_died_names_the_exit_and_the_log() {
    let fleet = Fleet::start(Some("allow_sources = [\"host-a\"]"), Hook::QemuGone).await;
    let id = new_migration_id();
    let rpc = rpc(&fleet.a).await.unwrap();
    let got = answer(rpc.call::<_, PrepareReply>("prepare", &cookie(&id, "host-a")).await).unwrap();
    assert_eq!(got.0, 500, "{got:?}");
    let message = &got.1;
    assert!(message.contains("QEMU closed the QMP socket") && message.contains("has exited"), "{message}");
    assert!(message.contains("setgid: Operation not permitted"), "the log's last line is in the reason: {message}");
    assert!(fleet.run_dir_entries().is_empty(), "a failed prepare leaves nothing: {:?}", fleet.run_dir_entries());
}

/// Without `allow_sources` (or without `[qemu]`), no peer may migrate here, and the refusal
/// says which key to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_allow_sources_no_incoming_migration() {
    for (qemu, expect) in [
        (Some(""), "[qemu] allow_sources of host-b is empty"),
        (Some("allow_sources = []"), "[qemu] allow_sources of host-b is empty"),
        (None, "host-b has no [qemu] section, so no [qemu] allow_sources"),
    ] {
        let fleet = Fleet::start(qemu, Hook::Recording).await;
        let rpc = rpc(&fleet.a).await.unwrap();
        let (status, message) = answer(rpc.call::<_, PrepareReply>("prepare", &cookie(&new_migration_id(), "host-a")).await).unwrap();
        assert_eq!(status, 403, "{message}");
        assert!(message.contains(expect), "{qemu:?}: {message}");
        // (Without [qemu], prepare is no method of host-b's: counted under `unknown`.)
        assert_eq!(fleet.refusals(&[("peer", "host-a"), ("reason", "not-allowed")]), 1.0);
        assert_eq!(fleet.marks("hook-ran"), 0);
        assert!(fleet.run_dir_entries().is_empty());
    }
}

/// 300 concurrent prepares from two allowed peers: exactly the caps run (2 per peer, 3 in
/// all), every other one is refused at once with a reason naming the key, and the agent keeps
/// answering hellos and relaying data meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prepares_are_capped() {
    const N: usize = 300;
    let fleet = Fleet::start(
        Some("allow_sources = [\"host-a\", \"host-c\"]\nmax_incoming = 3\nmax_incoming_per_peer = 2"),
        Hook::Blocking,
    )
    .await;
    let _echo = spawn_echo_target(fleet.pki.path("echo.sock"));
    // A few connections per peer; each carries many requests (h2 queues what is over its
    // stream limit on the client side).
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push((rpc(&fleet.a).await.unwrap(), "host-a"));
        clients.push((rpc(&fleet.c).await.unwrap(), "host-c"));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..N {
        let (rpc, source) = clients[i % clients.len()].clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = rpc.call::<_, PrepareReply>("prepare", &cookie(&new_migration_id(), source)).await;
            let _ = tx.send((source, r));
        });
    }
    // Every prepare but the three that hold the slots is answered while those three wait.
    let mut refused = 0;
    while refused < N - 3 {
        let (source, r) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("answers arrive").unwrap();
        let (status, message) = answer(r).unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(status, 429, "{message}");
        assert!(
            message.contains("the limit of [qemu] max_incoming_per_peer") || message.contains("the limit of [qemu] max_incoming;"),
            "{message}"
        );
        refused += 1;
    }
    // The three slot holders' hooks start (each after its journal record is written) and no
    // other does.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fleet.marks("started.") < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fleet.marks("started."), 3, "exactly max_incoming hooks run");
    let counted = fleet.refusals(&[("method", "prepare"), ("reason", "max-incoming-per-peer")])
        + fleet.refusals(&[("method", "prepare"), ("reason", "max-incoming")]);
    assert_eq!(counted, (N - 3) as f64);

    // Responsive meanwhile: a new control connection's hello, and a data stream.
    let fresh = rpc(&fleet.a).await.expect("hello while the caps are reached");
    assert_eq!(fresh.peer_hello().name, "host-b");
    let data = DataGen::new(9).bytes(1 << 20);
    let mut s = tokio::net::UnixStream::connect(fleet.pki.path("echo-in.sock")).await.unwrap();
    let (mut r, mut w) = s.split();
    let (_, back) = tokio::join!(
        async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        },
        async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            back
        }
    );
    assert!(back == data, "a data stream through the same agents is intact");

    // Released, the three fail (the hook says so) and give their slots back.
    std::fs::write(fleet.marks.join("release"), b"").unwrap();
    for _ in 0..3 {
        let (_, r) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("the held prepares end").unwrap();
        let (status, message) = answer(r).unwrap();
        assert!(status == 500 && message.contains("released by the test"), "{status} {message}");
    }
    eventually("run_dir is empty again", || fleet.run_dir_entries().is_empty()).await;
    std::fs::remove_file(fleet.marks.join("release")).unwrap();
    let again = tokio::spawn(async move { fresh.call::<_, PrepareReply>("prepare", &cookie(&new_migration_id(), "host-a")).await });
    eventually("a slot is free again: the next prepare runs its hook", || fleet.marks("started.") == 4).await;
    std::fs::write(fleet.marks.join("release"), b"").unwrap();
    let (status, _) = answer(again.await.unwrap()).unwrap();
    assert_eq!(status, 500);
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/2 client, for what a well-behaved one (the h2 crate) never sends.

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one frame: (type, flags, stream id, payload); `None` at EOF.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    rd.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    rd.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff, payload))
}

/// An HPACK header block of literal fields without indexing (names and values under 127 bytes).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    }
    b
}

/// One connection opens 400 streams without regard for the server's stream limit: h2 refuses
/// those beyond `max_concurrent_streams` (and closes a connection that keeps trying); 400
/// requests of 1 MiB on a well-behaved connection each get a 413 with a reason; afterwards the
/// agent serves a legitimate request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_stream_flood_is_refused() {
    const STREAMS: u32 = 400;
    let fleet = Fleet::start(Some("allow_sources = [\"host-a\"]"), Hook::Recording).await;

    // Raw: preface, SETTINGS, the server's SETTINGS acknowledged, then 400 HEADERS at once,
    // none ending its stream (each request waits for a body that never comes).
    let io = fleet.a.handle.connect_control("host-b").await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut out = H2_PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    wr.write_all(&out).await.unwrap();
    loop {
        let (kind, flags, _, _) = read_frame(&mut rd).await.expect("server SETTINGS");
        if kind == 0x4 && flags & 1 == 0 {
            break;
        }
    }
    let mut flood = frame(0x4, 1, 0, &[]);
    let block = header_block(&[(":method", "POST"), (":scheme", "https"), (":path", "/migtun/v1/call/prepare"), (":authority", "host-b")]);
    for i in 0..STREAMS {
        flood.extend(frame(0x1, 0x4, 2 * i + 1, &block));
    }
    wr.write_all(&flood).await.unwrap();
    let mut refused = std::collections::BTreeSet::new();
    let mut goaway = None;
    let read_all = async {
        while let Some((kind, flags, stream, payload)) = read_frame(&mut rd).await {
            match kind {
                0x3 if payload.get(..4) == Some(&[0, 0, 0, 7]) => {
                    refused.insert(stream);
                }
                0x6 if flags & 1 == 0 => {
                    let _ = wr.write_all(&frame(0x6, 1, 0, &payload)).await;
                }
                0x7 => {
                    let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    goaway = Some((last, code));
                    break;
                }
                _ => {}
            }
            if refused.len() == (STREAMS - 16) as usize {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read_all).await.expect("the server answers the flood");
    // Streams the server took: those not refused, up to the GOAWAY's last stream id if any.
    let last = match goaway {
        Some((last, code)) => {
            assert_eq!(code, 0xb, "a connection that keeps opening refused streams is told ENHANCE_YOUR_CALM");
            last
        }
        None => 2 * STREAMS - 1,
    };
    let accepted = (1..=last).step_by(2).filter(|id| !refused.contains(id)).count();
    assert!(!refused.is_empty(), "streams beyond the limit are refused (REFUSED_STREAM)");
    assert_eq!(accepted, migtun_control::rpc::MAX_CONCURRENT_STREAMS as usize, "refused: {refused:?}, goaway: {goaway:?}");
    assert!(refused.iter().all(|&id| id > 2 * 16), "the first 16 streams are the accepted ones: {refused:?}");
    drop((rd, wr));

    // Well-behaved: 400 requests of 1 MiB each get 413 with the reason.
    let io = fleet.a.handle.connect_control("host-b").await.unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    // One round trip first, as an agent's hello is: the client then knows the server's stream
    // limit and queues what is over it.
    let mut first = send.clone().ready().await.unwrap();
    let (resp, _) = first.send_request(http::Request::post("/migtun/v1/hello").body(()).unwrap(), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let body = Bytes::from(vec![b' '; 1 << 20]);
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let send = send.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut send = send.ready().await.expect("connection up");
            let req = http::Request::post("/migtun/v1/call/prepare").body(()).unwrap();
            let (resp, mut stream) = send.send_request(req, false).expect("send request");
            let _ = stream.send_data(body, true);
            let resp = resp.await.expect("an answer, not a reset");
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut text = Vec::new();
            while let Some(chunk) = body.data().await {
                text.extend_from_slice(&chunk.expect("answer body"));
            }
            (status, String::from_utf8_lossy(&text).into_owned())
        }));
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("request body larger than 262144 bytes"), "{text}");
    }
    assert_eq!(fleet.refusals(&[("peer", "host-a"), ("method", "prepare"), ("reason", "body-too-large")]), STREAMS as f64);

    // And a legitimate caller is served.
    let rpc = rpc(&fleet.a).await.expect("hello after the flood");
    let (status, message) = answer(rpc.call::<_, FinishReply>("finish", &FinishRequest { migration: "m-0000000000000000".into(), success: false, resume: false }).await).unwrap();
    assert_eq!(status, 404, "{message}");
    assert!(message.contains("no record of migration m-0000000000000000"), "{message}");
    assert_eq!(fleet.marks("hook-ran"), 0);
}

/// A control connection that sends no HTTP/2 preface, or no request and no ping, is closed by
/// the destination after the idle timeout; one of an agent (which pings) stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_control_connections_are_closed() {
    // Longer than the keepalive interval (2 s) with a margin for a loaded machine.
    const IDLE: Duration = Duration::from_secs(4);
    let router = Router::new("host-b").idle_timeout(IDLE).method("echo", |_, args| async move { Ok(args) });
    let (_pki, a, _b) = control_pair(router.into_handler()).await;

    // Silent after TLS: no preface.
    let mut silent = a.handle.connect_control("host-b").await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), silent.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "a connection without a preface is closed");

    // HTTP/2 up, one request, then nothing (the h2 client does not ping by itself).
    let io = a.handle.connect_control("host-b").await.unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send.send_request(http::Request::post("/migtun/v1/call/echo").body(()).unwrap(), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    tokio::time::timeout(Duration::from_secs(15), conn).await.expect("an idle connection is closed").unwrap().ok();

    // An agent's connection pings every 2 s: it outlives idle timeouts and still works.
    let rpc = RpcClient::connect(a.handle.connect_control("host-b").await.unwrap(), "host-b", "host-a").await.unwrap();
    tokio::time::sleep(IDLE * 5 / 2).await;
    assert!(!rpc.is_closed(), "pings keep a connection open");
    let v: serde_json::Value = rpc.call("echo", &42).await.expect("the pinging connection still serves");
    assert_eq!(v, 42);
}

/// Uploads on a real prepared migration: over `max_upload_bytes` (announced or sent) refused
/// with the key named and no file left; an upload cut off midway leaves no partial file; one
/// within the limit arrives; another allowed peer may not upload to or finish this migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_capped_and_partial_files_removed() {
    if vm::qemu().is_none() {
        return;
    }
    const CAP: usize = 1 << 20;
    let fleet = Fleet::start(Some(&format!("allow_sources = [\"host-a\", \"host-c\"]\nmax_upload_bytes = {CAP}")), Hook::Example).await;
    let rpc = rpc(&fleet.a).await.unwrap();
    let id = new_migration_id();
    let _reply: PrepareReply = rpc.call("prepare", &cookie(&id, "host-a")).await.expect("prepare with a real QEMU");
    let images = fleet.run_dir.with_extension("images").join(&id);
    let files = || -> Vec<String> {
        std::fs::read_dir(&images).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    };
    assert!(files().is_empty());

    // Announced over the cap.
    let big = DataGen::new(2).bytes(CAP + 1);
    let (status, message) = answer(rpc.upload::<_, serde_json::Value>(&file_header(&id, "big.fd", &big), &big[..], Duration::from_secs(30)).await).unwrap();
    assert_eq!(status, 413, "{message}");
    assert!(message.contains("more than [qemu] max_upload_bytes = 1048576"), "{message}");
    assert!(files().is_empty(), "{:?}", files());
    assert_eq!(fleet.refusals(&[("peer", "host-a"), ("method", "upload"), ("reason", "upload-too-large")]), 1.0);

    // Announced small, sent large.
    let lie = FileHeader { size: 1000, ..file_header(&id, "lie.fd", &big) };
    let (status, message) = answer(rpc.upload::<_, serde_json::Value>(&lie, &big[..], Duration::from_secs(30)).await).unwrap();
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("more than the announced 1000 bytes"), "{message}");
    assert!(files().is_empty(), "{:?}", files());

    // Cut off midway: the stream is reset after 100 KiB of 512 KiB.
    let io = fleet.a.handle.connect_control("host-b").await.unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let part = DataGen::new(3).bytes(512 << 10);
    let header = serde_json::to_string(&file_header(&id, "cut.fd", &part)).unwrap();
    let req = http::Request::post("/migtun/v1/upload").header("x-migtun-file", header).body(()).unwrap();
    let mut send = send.ready().await.unwrap();
    let (_resp, mut stream) = send.send_request(req, false).unwrap();
    stream.send_data(Bytes::copy_from_slice(&part[..100 << 10]), false).unwrap();
    eventually("the partial file is being written", || files().iter().any(|f| f.ends_with(".partial"))).await;
    stream.send_reset(h2::Reason::CANCEL);
    eventually("the partial file is removed when the upload is cut off", || files().is_empty()).await;

    // Another allowed peer may not touch this migration.
    let other = self::rpc(&fleet.c).await.unwrap();
    let small = DataGen::new(4).bytes(4096);
    let (status, message) = answer(other.upload::<_, serde_json::Value>(&file_header(&id, "x.fd", &small), &small[..], Duration::from_secs(30)).await).unwrap();
    assert_eq!((status, message.as_str()), (403, "another host's migration"));
    let (status, _) = answer(other.call::<_, FinishReply>("finish", &FinishRequest { migration: id.clone(), success: true, resume: true }).await).unwrap();
    assert_eq!(status, 403);
    assert_eq!(fleet.refusals(&[("peer", "host-c"), ("reason", "not-its-source")]), 2.0);

    // Within the cap: it arrives, and an upload of the same name does not replace it.
    let v: serde_json::Value = rpc.upload(&file_header(&id, "nvram.fd", &small), &small[..], Duration::from_secs(30)).await.expect("upload");
    assert_eq!(v["bytes"], 4096);
    assert_eq!(std::fs::read(images.join("nvram.fd")).unwrap(), small);
    let other_data = DataGen::new(5).bytes(4096);
    let r = rpc.upload::<_, serde_json::Value>(&file_header(&id, "nvram.fd", &other_data), &other_data[..], Duration::from_secs(30)).await;
    assert!(matches!(&r, Err(RpcError::Remote { status: 403, message, .. }) if message.contains("never overwrites")), "{r:?}");
    assert_eq!(std::fs::read(images.join("nvram.fd")).unwrap(), small, "never replaced");
    assert_eq!(files(), ["nvram.fd"]);

    let reply: FinishReply = rpc.call("finish", &FinishRequest { migration: id.clone(), success: false, resume: false }).await.unwrap();
    assert!(!reply.guest_kept);
    eventually("the destination is clean", || fleet.run_dir_entries().is_empty()).await;
}
