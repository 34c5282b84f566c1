//! The migration journal: one small JSON record per migration under `qemu.state_dir`, so that
//! an agent that died (kill -9, OOM, a crash, a reboot) finds every unfinished migration when
//! it starts again and finishes it (`recovery` in `driver.rs` and `incoming.rs`).
//!
//! ```text
//! state_dir/lock                  flock'd by the one agent that uses this directory; holds its
//!                                 pid and, once it drains, when its drain ends (`Holder`)
//! state_dir/outgoing/<id>.json    the source side: what may exist in the source QEMU
//! state_dir/incoming/<id>.json    the destination side: its QEMU, its directory, the decision
//! ```
//!
//! A record is written *before* the step that makes it necessary (an NBD node is journalled
//! before `blockdev-add`, the decision to run the guest before `cont`), atomically (a temporary
//! file, fsync, rename, fsync of the directory): after a crash a record is whole, old or new,
//! and it never knows less than what exists. Recovery undoes what a record says *may* exist
//! and tolerates what does not.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::process::ProcessId;

/// How long the destination keeps the record of an ended migration, to answer a source that
/// asks again after a crash or a long partition: a week covers a weekend of an operator away.
pub const RETAIN_ENDED: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest record read back (records are a few KiB; anything larger is not ours).
const MAX_RECORD: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("qemu.state_dir {dir}: {why}")]
    Dir { dir: String, why: String },
    /// `holder` is what the lock file said, read once, when the lock was refused.
    #[error("qemu.state_dir {dir} is in use by another migtun agent ({}, holding {dir}/lock); two agents must never share a journal: stop that agent (SIGTERM) and this one takes over while it drains", who_holds(.holder.as_ref()))]
    Locked { dir: String, holder: Option<Holder> },
    #[error("qemu.state_dir {dir}: the agent this one replaces ({holder}) still holds the journal after {waited_secs} s; it may be stuck: look at it, stop it, and start this agent again")]
    HandOver { dir: String, holder: Holder, waited_secs: u64 },
    #[error("journal record {path}: {why}")]
    Record { path: String, why: String },
}

/// The source side's record of one migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingRecord {
    pub id: String,
    /// The destination agent.
    pub to: String,
    pub vm: String,
    /// The source QEMU's QMP socket and the process behind it.
    pub qmp: PathBuf,
    pub qemu: Option<ProcessId>,
    pub was_running: bool,
    /// The guest had never run (`prelaunch`): a rollback brings it back there.
    #[serde(default)]
    pub prelaunch: bool,
    pub stage: OutgoingStage,
    /// NBD client nodes (`mt*`) that may exist in the source QEMU.
    pub nodes: Vec<String>,
    /// Mirror jobs (`mj*`) that may exist.
    pub jobs: Vec<String>,
    /// `migrate` may have been issued.
    pub migration_started: bool,
    /// The capabilities and parameters this migration replaced, to put back.
    pub saved_settings: Option<SavedSettings>,
    /// Unix time of the last write.
    pub updated: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutgoingStage {
    /// Before the point of no return: recovery rolls back.
    Migrating,
    /// `finish(success)` is being sent, or was: only the destination knows whether the guest
    /// runs there, so recovery asks it before resuming or quitting the source.
    Finishing { resume: bool },
}

impl OutgoingStage {
    pub fn as_str(&self) -> &'static str {
        match self {
            OutgoingStage::Migrating => "migrating",
            OutgoingStage::Finishing { .. } => "finishing",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSettings {
    pub capabilities: Vec<Value>,
    pub parameters: serde_json::Map<String, Value>,
}

/// The destination side's record of one migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingRecord {
    pub id: String,
    /// The source agent.
    pub source: String,
    /// `run_dir/<id>`.
    pub dir: PathBuf,
    /// The destination QEMU, once its QMP socket answered.
    pub qemu: Option<ProcessId>,
    pub state: IncomingState,
    /// What the destination said or decided last, for the source and the operator.
    pub detail: String,
    pub updated: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IncomingState {
    /// The hook is starting QEMU: a QEMU may run whose pid is not known yet (its pidfile is).
    Preparing,
    /// QEMU waits for the incoming migration; no `finish(success)` yet.
    Prepared,
    /// `finish(success)` arrived and the decision to take the guest was taken: `cont` (if
    /// `resume`) comes next. The guest belongs to this host from here on.
    Handover { resume: bool },
    /// The guest runs here (or is held here paused, as on the source).
    Kept,
    /// The migration ended without the guest here: QEMU quit, the directory removed. (Written
    /// after the cleanup: a crash during it leaves `Prepared`, which recovery abandons again.)
    Abandoned,
}

impl IncomingState {
    pub fn ended(&self) -> bool {
        matches!(self, IncomingState::Kept | IncomingState::Abandoned)
    }
}

/// Who holds a journal, as the holder wrote it into the lock file: the agent a new one on the
/// same config waits for (see `handover`). Written only by migtun, read with a size limit, and
/// only ever used to decide how long to wait and what to tell the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// Unix time by which the holder's drain ends (it exits then); absent while it serves.
    #[serde(default)]
    pub draining_until: Option<u64>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.draining_until {
            None => write!(f, "pid {}, serving", self.pid),
            Some(t) if t >= now() => write!(f, "pid {}, draining for at most {} s more", self.pid, t - now()),
            Some(t) => write!(f, "pid {}, whose drain should have ended {} s ago", self.pid, now() - t),
        }
    }
}

/// The holder of a lock for the log and the operator, also when it did not say who it is.
pub fn who_holds(holder: Option<&Holder>) -> String {
    holder.map(Holder::to_string).unwrap_or_else(|| "an agent that did not write its pid into the lock file".to_string())
}

/// Largest lock file read back: a `Holder` is a few dozen bytes.
const MAX_HOLDER: u64 = 4096;

/// The journal of one agent.
pub struct Journal {
    dir: PathBuf,
    /// Holds the flock for as long as the agent lives; its contents say who holds it.
    lock: File,
}

impl Journal {
    /// Opens (creating, mode 0700) `state_dir` and takes its lock: one agent per journal.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        use std::os::unix::fs::DirBuilderExt;
        let fail = |why: String| JournalError::Dir { dir: state_dir.display().to_string(), why };
        for sub in ["", "outgoing", "incoming"] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir.join(sub))
                .map_err(|e| fail(format!("cannot create {}: {e}", state_dir.join(sub).display())))?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join("lock"))
            .map_err(|e| fail(format!("cannot open its lock file: {e}")))?;
        // SAFETY: flock(2) on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(JournalError::Locked { dir: state_dir.display().to_string(), holder: Journal::holder(state_dir) });
            }
            return Err(fail(format!("cannot lock it: {e}")));
        }
        let journal = Journal { dir: state_dir.to_path_buf(), lock };
        journal.write_holder(&Holder { pid: std::process::id(), draining_until: None })?;
        Ok(journal)
    }

    /// Who holds the journal in `state_dir`, if it said (see [`Holder`]).
    pub fn holder(state_dir: &Path) -> Option<Holder> {
        use std::io::Read;
        let mut bytes = Vec::new();
        File::open(state_dir.join("lock")).ok()?.take(MAX_HOLDER).read_to_end(&mut bytes).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// This agent drains, and exits once `until` (unix time) has passed at the latest: a new
    /// agent on the same config waits for the lock that long instead of refusing to start.
    pub fn mark_draining(&self, until: u64) -> Result<(), JournalError> {
        self.write_holder(&Holder { pid: std::process::id(), draining_until: Some(until) })
    }

    fn write_holder(&self, holder: &Holder) -> Result<(), JournalError> {
        use std::os::unix::fs::FileExt;
        let path = self.dir.join("lock");
        let fail = |e: std::io::Error| JournalError::Record { path: path.display().to_string(), why: e.to_string() };
        let bytes = serde_json::to_vec(holder).map_err(|e| fail(std::io::Error::other(e)))?;
        // Readers parse the whole file: shrink first, so a shorter text never keeps a tail of
        // the longer one (a reader between the two sees an empty file: "did not say").
        self.lock.set_len(0).map_err(fail)?;
        self.lock.write_all_at(&bytes, 0).map_err(fail)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn put_outgoing(&self, r: &OutgoingRecord) -> Result<(), JournalError> {
        let mut r = r.clone();
        r.updated = now();
        self.put("outgoing", &r.id, &r)
    }

    pub fn put_incoming(&self, r: &IncomingRecord) -> Result<(), JournalError> {
        let mut r = r.clone();
        r.updated = now();
        self.put("incoming", &r.id, &r)
    }

    pub fn remove_outgoing(&self, id: &str) -> Result<(), JournalError> {
        self.remove("outgoing", id)
    }

    pub fn remove_incoming(&self, id: &str) -> Result<(), JournalError> {
        self.remove("incoming", id)
    }

    pub fn outgoing(&self) -> Vec<Result<OutgoingRecord, JournalError>> {
        self.all("outgoing")
    }

    pub fn incoming(&self) -> Vec<Result<IncomingRecord, JournalError>> {
        self.all("incoming")
    }

    pub fn incoming_record(&self, id: &str) -> Option<IncomingRecord> {
        crate::destination::cookie::validate_migration_id(id).ok()?;
        read(&self.path("incoming", id)).ok()
    }

    /// Removes the records of incoming migrations that ended more than [`RETAIN_ENDED`] ago.
    pub fn prune_incoming(&self) {
        let cutoff = now().saturating_sub(RETAIN_ENDED.as_secs());
        for r in self.incoming().into_iter().flatten() {
            // A kept guest's record stays while its run dir does (its QEMU still runs): it is
            // what removes that directory once the QEMU exits, even after a restart.
            let kept_guest_runs = r.state == IncomingState::Kept && r.dir.exists();
            if r.state.ended() && r.updated < cutoff && !kept_guest_runs {
                let _ = self.remove_incoming(&r.id);
            }
        }
    }

    fn path(&self, side: &str, id: &str) -> PathBuf {
        self.dir.join(side).join(format!("{id}.json"))
    }

    fn put<T: Serialize>(&self, side: &str, id: &str, record: &T) -> Result<(), JournalError> {
        crate::destination::cookie::validate_migration_id(id)
            .map_err(|e| JournalError::Record { path: id.to_string(), why: e.to_string() })?;
        let path = self.path(side, id);
        let tmp = self.dir.join(side).join(format!(".{id}.json.tmp"));
        let fail = |why: std::io::Error| JournalError::Record { path: path.display().to_string(), why: why.to_string() };
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| fail(std::io::Error::other(e)))?;
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(fail)?;
            f.write_all(&bytes).map_err(fail)?;
            f.sync_all().map_err(fail)?;
        }
        std::fs::rename(&tmp, &path).map_err(fail)?;
        sync_dir(&self.dir.join(side)).map_err(fail)
    }

    fn remove(&self, side: &str, id: &str) -> Result<(), JournalError> {
        let path = self.path(side, id);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir.join(side))
                .map_err(|e| JournalError::Record { path: path.display().to_string(), why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JournalError::Record { path: path.display().to_string(), why: e.to_string() }),
        }
    }

    fn all<T: DeserializeOwned>(&self, side: &str) -> Vec<Result<T, JournalError>> {
        let Ok(entries) = std::fs::read_dir(self.dir.join(side)) else { return Vec::new() };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json") && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        paths.sort();
        paths.iter().map(|p| read(p)).collect()
    }
}

fn read<T: DeserializeOwned>(path: &Path) -> Result<T, JournalError> {
    use std::io::Read;
    let fail = |why: String| JournalError::Record { path: path.display().to_string(), why };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_RECORD + 1).read_to_end(&mut bytes))
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(fail(format!("larger than {MAX_RECORD} bytes: not a migtun record")));
    }
    serde_json::from_slice(&bytes).map_err(|e| fail(format!("unreadable ({e}); left in place for the operator")))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> OutgoingRecord {
        OutgoingRecord {
            id: id.into(),
            to: "host-b".into(),
            vm: "web1".into(),
            qmp: "/run/vm/web1.qmp".into(),
            qemu: Some(ProcessId { pid: 42, start: 7 }),
            was_running: true,
            prelaunch: false,
            stage: OutgoingStage::Migrating,
            nodes: vec!["mt0".into()],
            jobs: vec![],
            migration_started: false,
            saved_settings: None,
            updated: 0,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let id = "m-0123456789abcdef";
        {
            let j = Journal::open(dir.path()).unwrap();
            j.put_outgoing(&record(id)).unwrap();
            let mut r = record(id);
            r.stage = OutgoingStage::Finishing { resume: true };
            j.put_outgoing(&r).unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        let all: Vec<_> = j.outgoing().into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].stage, OutgoingStage::Finishing { resume: true });
        assert!(all[0].updated > 0);
        j.remove_outgoing(id).unwrap();
        assert!(j.outgoing().is_empty());
        j.remove_outgoing(id).unwrap();
    }

    #[test]
    fn one_agent_per_journal() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Journal::open(dir.path()).unwrap();
        let second = Journal::open(dir.path()).err().expect("the second agent is refused");
        let pid = std::process::id();
        assert!(second.to_string().contains(&format!("in use by another migtun agent (pid {pid}, serving")), "{second}");
    }

    #[test]
    fn the_lock_file_says_who_holds_it_and_until_when_it_drains() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Journal::holder(dir.path()), None, "no journal, nobody");
        let j = Journal::open(dir.path()).unwrap();
        let pid = std::process::id();
        assert_eq!(Journal::holder(dir.path()), Some(Holder { pid, draining_until: None }));
        let until = now() + 30;
        j.mark_draining(until).unwrap();
        assert_eq!(Journal::holder(dir.path()), Some(Holder { pid, draining_until: Some(until) }));
        let refused = Journal::open(dir.path()).err().expect("still held");
        assert!(refused.to_string().contains(&format!("(pid {pid}, draining for at most")), "{refused}");
        drop(j);
        // The lock goes with the holder; what it wrote stays until the next one overwrites it.
        let next = Journal::open(dir.path()).unwrap();
        assert_eq!(Journal::holder(dir.path()), Some(Holder { pid, draining_until: None }));
        drop(next);
        std::fs::write(dir.path().join("lock"), vec![b'x'; 10_000]).unwrap();
        assert_eq!(Journal::holder(dir.path()), None, "garbage or an oversized file says nothing");
    }

    #[test]
    fn bad_ids_and_unreadable_records_are_refused_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.put_outgoing(&record("../etc/passwd")).is_err());
        std::fs::write(dir.path().join("outgoing/m-0123456789abcdee.json"), b"{not json").unwrap();
        std::fs::write(dir.path().join("outgoing/.m-0123456789abcdef.json.tmp"), b"half").unwrap();
        j.put_outgoing(&record("m-0123456789abcdef")).unwrap();
        let all = j.outgoing();
        assert_eq!(all.len(), 2, "the temporary file of an interrupted write is not a record");
        assert!(all[0].as_ref().is_err_and(|e| e.to_string().contains("unreadable")));
        assert!(all[1].is_ok());
    }

    #[test]
    fn ended_incoming_records_are_kept_for_a_while_then_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut r = IncomingRecord {
            id: "m-0123456789abcdef".into(),
            source: "host-a".into(),
            dir: "/run/q/m-0123456789abcdef".into(),
            qemu: None,
            state: IncomingState::Kept,
            detail: String::new(),
            updated: 0,
        };
        j.put_incoming(&r).unwrap();
        j.prune_incoming();
        assert!(j.incoming_record(&r.id).is_some(), "a fresh record stays");
        r.updated = now() - RETAIN_ENDED.as_secs() - 10;
        j.put("incoming", &r.id.clone(), &r).unwrap();
        j.prune_incoming();
        assert!(j.incoming_record(&r.id).is_none(), "an old ended record goes");
    }
}
