//! The destination QEMU as a process: the prepare hook that starts it, finding it again by its
//! pidfile (verified by its command line, never by pid alone), why it exited, waiting for its
//! incoming migration to complete, and quitting it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::warn;

use crate::destination::cmdline;
use crate::messages::Cookie;
use crate::process::{Process, ProcessId};
use crate::qmp::Qmp;

/// The prepare hook must have started QEMU and printed its QMP socket within this time.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// After the source reports `completed`, the destination must finish loading within this time.
const INCOMING_COMPLETE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waiting for a status change is driven by QEMU's events; without one for this long, the
/// status is queried anyway (a safety net, not the mechanism).
const STATUS_RECHECK: Duration = Duration::from_millis(250);

/// After `quit`, how long QEMU may take to exit before it is killed.
pub(super) const QUIT_GRACE: Duration = Duration::from_secs(5);

/// How long a QEMU whose QMP socket refused or dropped the agent may take to finish exiting
/// before its exit is reported as the reason: one that failed to drop privileges exits within
/// milliseconds; one still running after this is not the reason.
const EXITED_QEMU_WAIT: Duration = Duration::from_secs(2);

/// How much of a QEMU's log ends up in an error: its last lines, not a whole log.
const LOG_TAIL_BYTES: u64 = 2048;

/// What the prepare hook reads on stdin: the cookie's fields, plus what the destination
/// decided (README.md, "The prepare hook"). The hook runs `argv` as given and creates `images`.
#[derive(serde::Serialize)]
pub(super) struct HookInput<'a> {
    #[serde(flatten)]
    pub(super) cookie: &'a Cookie,
    /// `qemu.emulator`; `argv[0]`.
    pub(super) emulator: &'a Path,
    pub(super) argv: &'a [String],
    /// Fresh files to create (none exists yet) before QEMU starts.
    pub(super) images: &'a [cmdline::Image],
    /// The QMP socket `argv` makes; the hook prints it.
    pub(super) qmp: &'a Path,
    pub(super) pidfile: &'a Path,
    /// Where QEMU's stdout and stderr go.
    pub(super) log: &'a Path,
}

/// Runs the prepare hook: its input on stdin, the QMP socket path on the last line of stdout.
pub(super) async fn run_hook(hook: &Path, input: &HookInput<'_>) -> Result<PathBuf, String> {
    let input = serde_json::to_vec_pretty(input).map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new(hook)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run the prepare hook {}: {e}", hook.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its input gets EPIPE here; its exit status tells the story.
        let _ = stdin.write_all(&input).await;
    }
    let output = tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("the prepare hook {} did not finish within {}s", hook.display(), HOOK_TIMEOUT.as_secs()))?
        .map_err(|e| format!("the prepare hook {}: {e}", hook.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
    if !output.status.success() {
        return Err(format!("the prepare hook {} failed ({}): {}", hook.display(), output.status, tail.join(" / ")));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).map(str::trim).unwrap_or_default();
    if !line.starts_with('/') {
        return Err(format!("the prepare hook {} must print the destination QMP socket's absolute path; it printed {line:?}", hook.display()));
    }
    Ok(PathBuf::from(line))
}

/// The QEMU a prepare hook started for the migration in `dir`: its pidfile's pid, if that
/// process's command line names `dir`'s QMP socket.
pub(super) fn hook_qemu(dir: &Path) -> Option<Process> {
    hook_qemu_of(dir, pidfile(dir)?)
}

/// The pid the prepare hook's QEMU wrote into `dir/qemu.pid`.
fn pidfile(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("qemu.pid")).ok()?.trim().parse().ok()
}

/// [`hook_qemu`] for a pid already read.
fn hook_qemu_of(dir: &Path, pid: u32) -> Option<Process> {
    let p = Process::open(ProcessId::of(pid)?)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let qmp = dir.join("qmp.sock");
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(&*qmp.to_string_lossy()));
    ours.then_some(p)
}

/// Why the QMP connect to the QEMU in `dir` failed, if that QEMU has exited (or exits within
/// [`EXITED_QEMU_WAIT`]): the same words whether the connect was refused (QEMU was gone) or
/// dropped (QEMU was going), with its pid and the end of its log. `None` if it still runs.
pub(super) async fn exited_qemu(dir: &Path) -> Option<String> {
    let pid = pidfile(dir);
    if let Some(p) = pid.and_then(|pid| hook_qemu_of(dir, pid)) {
        if !wait_gone(&p, EXITED_QEMU_WAIT).await {
            return None;
        }
    }
    let who = match pid {
        Some(pid) => format!("the QEMU the prepare hook started (pid {pid}) has exited"),
        None => "no QEMU is left (it wrote no pidfile)".to_string(),
    };
    let log = dir.join("qemu.log");
    let tail = log_tail(&log);
    let tail = if tail.is_empty() { String::new() } else { format!("; {}: {tail}", log.display()) };
    Some(format!("QEMU closed the QMP socket: {who}{tail}"))
}

/// The last lines of a log, at most [`LOG_TAIL_BYTES`] of it, joined with " / ".
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(LOG_TAIL_BYTES).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

/// Waits until `p` has exited; false if it still runs after `grace`.
pub(super) async fn wait_gone(p: &Process, grace: Duration) -> bool {
    p.id().wait_exit(grace).await
}

/// Quits QEMU over QMP; kills it if it does not go (that very process: a pidfd).
pub(super) async fn quit_qemu(qmp: &Qmp, qemu: Option<ProcessId>) {
    let process = qemu.and_then(Process::open);
    let _ = qmp.execute_with_timeout("quit", json!({}), QUIT_GRACE).await;
    let Some(p) = process else { return };
    if !wait_gone(&p, QUIT_GRACE).await {
        warn!(pid = p.id().pid, "QEMU did not quit; killing it");
        let _ = p.signal(libc::SIGKILL);
        wait_gone(&p, QUIT_GRACE).await;
    }
}

/// Waits until the incoming migration has completed here (or fails if it did not): on the
/// destination's `MIGRATION` events (Prepare enables the `events` capability), with
/// `query-migrate` as the source of truth.
pub(super) async fn wait_incoming_complete(qmp: &Qmp) -> Result<(), crate::qmp::QmpError> {
    let result = qmp.wait_until("the incoming migration to complete", &["MIGRATION"], STATUS_RECHECK, INCOMING_COMPLETE_TIMEOUT, || async {
        let info = qmp.query_migrate().await?;
        match info.status.as_str() {
            "completed" => Ok(Some(())),
            "failed" | "cancelled" => Err(crate::qmp::QmpError::Protocol(format!(
                "the incoming migration {}: {}",
                info.status,
                info.error_desc.unwrap_or_default()
            ))),
            _ => Ok(None),
        }
    })
    .await;
    match result {
        Err(crate::qmp::QmpError::Timeout { .. }) => {
            let status = qmp.query_migrate().await.map(|i| i.status).unwrap_or_else(|e| e.to_string());
            Err(crate::qmp::QmpError::Protocol(format!(
                "the incoming migration is still {status:?} after {}s",
                INCOMING_COMPLETE_TIMEOUT.as_secs()
            )))
        }
        other => other,
    }
}
