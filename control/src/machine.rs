//! The migration state machine of the source agent: phases, transitions and rollback. No I/O.
//!
//! The machine decides; a driver (`driver.rs`) performs. [`Machine::new`] and [`Machine::handle`]
//! return [`Action`]s; the driver turns each into QMP commands, control RPCs to the destination
//! agent or route changes, and feeds every result back as an [`Event`]. Time-outs are events too
//! ([`Event::TimedOut`]): the machine has no clock, no tokio, no sockets, so every edge of it is
//! unit-tested below without QEMU.
//!
//! # Phases (after libvirt's migration protocol v3)
//!
//! 1. **Begin**: [`Action::Inspect`] → [`Event::Inspected`]. Preconditions: no active block jobs,
//!    no migration blockers, no VFIO devices unless `force`, every `--disks` name exists. A refusal
//!    touches nothing ([`Outcome::Refused`], no action except a report).
//! 2. **Prepare**: [`Action::Prepare`] → [`Event::Prepared`]. From then on the destination holds
//!    state, so every later failure ends with `FinishPeer { success: false }`.
//! 3. **Perform**: open the forwards; per copied disk add the NBD target then start its mirror
//!    (one command at a time); while the mirrors synchronise, send the side-channel files and
//!    set the migration parameters (always with `pause-before-switchover`); when every mirror is
//!    ready, the files are sent and the parameters set: `migrate`, and with postcopy
//!    `migrate-start-postcopy`. At `pre-switchover` each mirror is completed (`block-job-cancel`,
//!    not forced) and once all are completed `migrate-continue`.
//! 4. **Finish**: at `completed` (precopy) or `postcopy-active` (postcopy):
//!    `FinishPeer { success: true, resume }`.
//! 5. **Confirm**: on success quit the source QEMU and close the forwards; on failure roll back.
//!
//! # The invariant and the point of no return
//!
//! Exactly one copy of the guest runs after every outcome (for a paused guest: exactly one copy
//! holds it). This rests on three rules:
//!
//! * **The destination runs the guest only on an explicit `Finish(success)`.** The destination
//!   QEMU is started with `-incoming defer` and must not run by itself (the prepare hook starts it
//!   paused, `-S`); the destination agent `cont`s it only when it receives `Finish` with
//!   `success: true` and `resume: true`, and quits it when it receives `Finish(failure)` or when
//!   the migration's control connection ends before any `Finish` (`incoming.rs`).
//! * **The point of no return is sending `FinishPeer { success: true }`.** It is sent when QEMU
//!   reports `completed` (precopy; the source guest is then paused and the mirrors are
//!   completed), or `postcopy-active` (postcopy: the guest's memory is now split between the
//!   hosts, so the destination must run it). Before it is sent, every failure and every cancel
//!   rolls back: the source is resumed (`cont`, only if the guest was running; a paused guest
//!   stays paused) and the destination is told `Finish(failure)` if Prepare may have created
//!   anything there. Resuming the source is safe exactly until then, because the destination has
//!   not run a single guest instruction and the source's RAM and disks are still complete.
//! * **After it is sent**, cancel requests are refused, and:
//!   - `Finished(Ok)` (the destination runs, or holds, the guest) → `QuitSource` →
//!     [`Outcome::Succeeded`] (with postcopy, once QEMU also reports `completed`);
//!   - `Finished(Err)` (the destination could not `cont` and has quit its QEMU) → the source is
//!     resumed and rolled back → [`Outcome::Failed`] (with postcopy: [`Outcome::Unknown`]);
//!   - no answer (peer lost, RPC failure, time-out) → [`Outcome::Unknown`]: the source is
//!     neither resumed nor quit; it stays paused and intact. If the message arrived, the
//!     destination runs the guest; if not, the destination agent quits its QEMU by its own rule.
//!     Never both. The driver may later learn the answer (ask the destination agent again) and
//!     feed `Finished(..)`: the machine then settles to `Succeeded` (quits the source) or `Failed`
//!     (resumes it) — precopy only.
//! * **Postcopy**: once `postcopy-active` is reached, the destination runs the guest and pulls
//!   missing pages from the source. A failure after that cannot roll back to the source:
//!   [`Outcome::Unknown`], "postcopy failed: the guest is lost on both sides unless recovered";
//!   nothing is torn down on the source (its QEMU, forwards and NBD nodes are what a
//!   `migrate-recover` would need).
//!
//! # Rollback
//!
//! Two stages. *Stopping*: `migrate_cancel` if the migration runs, a forced `block-job-cancel`
//! for every mirror still alive, and wait for every outstanding command's result (a command in
//! flight may still create something: a late `Prepared` means the destination needs
//! `Finish(failure)`, a late mirror start needs a cancel). *Removing*: `blockdev-del` of every
//! NBD target added, close the forwards, `FinishPeer { success: false }`, `cont` the source.
//! Every action is emitted at most once ([`Step`] keys them), failures of teardown actions are
//! reported and do not stop the rest, and a [`Event::TimedOut`] while rolling back gives up
//! waiting: whatever was in flight is assumed to exist and is torn down best effort.
//!
//! # What the driver reports
//!
//! Each action that has a [`Step`] gets exactly one result: `Inspected`, `Prepared`, `Finished`
//! for the three that carry data, [`Event::Done`] or [`Event::Failed`] for the others (a transport
//! failure of `FinishPeer` is `Failed(Step::FinishPeer, ..)`). `Done(CancelMirror(d))` and
//! `Done(CancelMigration)` mean the job or the migration has *ended* (the driver waits for
//! `BLOCK_JOB_CANCELLED`/`COMPLETED` or a terminal `query-migrate` status), since NBD nodes can
//! only be deleted once no job uses them. QEMU events are passed through: `MirrorReady`,
//! `MirrorCompleted`, `MirrorCancelled`, `MirrorFailed` (`BLOCK_JOB_*` for our jobs, keyed by the
//! disk's device name), `MigrationState` (`MIGRATION`), `Progress` (`query-migrate`).
//! Unexpected, late or duplicate events are ignored or reported, never a panic and never a
//! repeated action.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Identifies one migration (also in route names and reports).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MigrationId(pub String);

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which disks are copied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSelection {
    /// Every disk of the VM.
    #[default]
    All,
    /// Only these (`--disks a,b`): device names or node names.
    Only(Vec<String>),
    /// None: the disks are on shared storage (`--shared-storage`).
    SharedStorage,
}

/// A file sent to the destination with the migration (VM config, NVRAM, TPM state, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideFile {
    /// Name on the destination (in the migration's directory).
    pub name: String,
    /// Path on the source host.
    pub path: PathBuf,
}

/// What was asked for (`migtun migrate ...`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    pub disks: DiskSelection,
    /// Parallel RAM streams (`--parallel N`): `Some(1)` is one stream (no multifd), `Some(n)`
    /// multifd with `n` channels; `None` is resolved by [`default_parallel`] before the machine runs.
    pub parallel: Option<u8>,
    pub postcopy: bool,
    /// Bytes per second; `None` lifts QEMU's own limit ([`UNLIMITED_BANDWIDTH`]).
    pub max_bandwidth: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// Migrate despite VFIO devices (they must support migration themselves).
    pub force: bool,
    pub files: Vec<SideFile>,
}

/// One disk of the VM as Begin found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Guest device name (`query-block`'s `device`, or the qdev id): the key of a disk in every
    /// action and event.
    pub device: String,
    /// The block node the device uses.
    pub node_name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// `raw`, `qcow2`, ...
    pub format: String,
    /// The image file on the source (informational).
    #[serde(default)]
    pub file: String,
}

/// What [`Action::Inspect`] found out (empty drives such as a CD-ROM without medium are left out
/// by the driver).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `query-status` says the guest runs.
    pub running: bool,
    pub disks: Vec<Disk>,
    pub has_active_block_jobs: bool,
    /// Migration blockers QEMU reports (`query-migrate`'s `blocked-reasons`, or a failed check).
    pub blockers: Vec<String>,
    /// Host devices passed through (VFIO).
    pub vfio_devices: Vec<String>,
}

/// A disk in the Prepare request, and whether its contents are copied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedDisk {
    pub disk: Disk,
    pub copy: bool,
}

/// What the destination must prepare (the driver adds the VM's name, command line and the
/// source host's name to build the cookie of `messages.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRequest {
    pub id: MigrationId,
    /// The guest was running on the source (the destination resumes it only then).
    pub running: bool,
    /// Every disk of the VM in its order; the copied ones need an NBD export, named by device.
    pub disks: Vec<PlannedDisk>,
    pub multifd_channels: Option<u8>,
    pub postcopy: bool,
    /// Names of the side-channel files that will follow.
    pub files: Vec<String>,
}

/// The destination's answer to Prepare: the routes it exposes for this migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    /// The RAM migration stream (and multifd channels).
    pub ram: String,
    /// The NBD server, when a disk is copied.
    pub nbd: Option<String>,
}

/// `migrate-set-capabilities` / `migrate-set-parameters` on the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSettings {
    /// Always true: switchover waits for the mirrors to be completed.
    pub pause_before_switchover: bool,
    /// `multifd` and `multifd-channels`.
    pub multifd_channels: Option<u8>,
    /// `postcopy-ram`.
    pub postcopy: bool,
    /// `max-bandwidth`, always set: without it QEMU's default (128 MiB/s) would throttle every
    /// migration that does not name a limit.
    pub max_bandwidth: u64,
    pub downtime_ms: Option<u64>,
}

/// `max-bandwidth` when the user names no limit: the largest value libvirt sends for
/// "unlimited" (`QEMU_DOMAIN_MIG_BANDWIDTH_MAX` MiB/s, in bytes). QEMU's own default, 128 MiB/s,
/// made a running 512 MiB guest take 9.4 s instead of 5.0 s through migtun. This value stays
/// below `i64::MAX`, which QEMU's rate limiter (an `int64_t`) must hold.
pub const UNLIMITED_BANDWIDTH: u64 = (i64::MAX as u64 / (1 << 20)) << 20;

/// multifd channels `migtun migrate` uses without `--parallel`. Each channel is a QEMU thread
/// on each side and a TLS connection migtun encrypts on its own core, so the RAM copy spreads
/// over cores instead of one migration thread and one stream. Measured on the 2-CPU development
/// machine (`benches/migration.rs --parallel N`, 1 GiB RAM and disk, medians of 3): RAM copy
/// 1.67 s with one stream, 1.45 s with 2 channels, 1.27 s with 4 for a paused guest, and 3.99 /
/// 3.14 / 2.45 s for a running one. More channels than that add connections and threads for
/// less each (and QEMU's default is 2).
pub const MULTIFD_DEFAULT_CHANNELS: u8 = 4;

/// Online CPUs below which one stream is the default: with a single CPU the channel threads
/// only take turns.
pub const MULTIFD_MIN_CPUS: usize = 2;

/// First QEMU major version with which multifd is the default. With QEMU 7.2 (Debian 12,
/// what the tests run) a multifd migration that failed because its source agent was killed
/// sometimes never finishes its cleanup: its yank instance stays, and the guest, which runs on,
/// cannot be migrated again until its QEMU restarts (the fault matrix's
/// `KillSourceAgent@Ram/running/parallel4` found it twice; yanking the channels does not free
/// it). A default must not expose every migration to that; `--parallel N` still asks for it.
pub const MULTIFD_DEFAULT_FROM_QEMU: u64 = 8;

/// multifd channels when `--parallel` is not given, on a host with `cpus` online CPUs and a
/// source QEMU of major version `qemu_major`: [`MULTIFD_DEFAULT_CHANNELS`] from
/// [`MULTIFD_MIN_CPUS`] and QEMU [`MULTIFD_DEFAULT_FROM_QEMU`] on. Never with postcopy, which
/// QEMU 7.2 refuses with multifd.
pub fn default_parallel(cpus: usize, postcopy: bool, qemu_major: Option<u64>) -> Option<u8> {
    let qemu_ok = qemu_major.is_some_and(|m| m >= MULTIFD_DEFAULT_FROM_QEMU);
    (!postcopy && cpus >= MULTIFD_MIN_CPUS && qemu_ok).then_some(MULTIFD_DEFAULT_CHANNELS)
}

/// QEMU's migration status (the `MIGRATION` event, `query-migrate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum MigrationStatus {
    None,
    Setup,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    PreSwitchover,
    Device,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    Other(String),
}

impl MigrationStatus {
    pub fn parse(s: &str) -> MigrationStatus {
        use MigrationStatus::*;
        match s {
            "none" => None,
            "setup" => Setup,
            "active" => Active,
            "postcopy-active" => PostcopyActive,
            "postcopy-paused" => PostcopyPaused,
            "postcopy-recover" => PostcopyRecover,
            "pre-switchover" => PreSwitchover,
            "device" => Device,
            "completed" => Completed,
            "failed" => Failed,
            "cancelling" => Cancelling,
            "cancelled" => Cancelled,
            other => Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        use MigrationStatus::*;
        match self {
            None => "none",
            Setup => "setup",
            Active => "active",
            PostcopyActive => "postcopy-active",
            PostcopyPaused => "postcopy-paused",
            PostcopyRecover => "postcopy-recover",
            PreSwitchover => "pre-switchover",
            Device => "device",
            Completed => "completed",
            Failed => "failed",
            Cancelling => "cancelling",
            Cancelled => "cancelled",
            Other(s) => s,
        }
    }
}

impl From<String> for MigrationStatus {
    fn from(s: String) -> Self {
        MigrationStatus::parse(&s)
    }
}

impl From<MigrationStatus> for String {
    fn from(s: MigrationStatus) -> Self {
        s.as_str().to_string()
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Migration progress (from `query-migrate`), passed through to reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
}

/// Names one command action; the key of its result event and of the at-most-once rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Inspect,
    Prepare,
    OpenForwards,
    AddNbdTarget(String),
    StartMirror(String),
    SendFiles,
    SetMigrationSettings,
    StartMigration,
    StartPostcopy,
    CompleteMirror(String),
    ContinueMigration,
    FinishPeer,
    QuitSource,
    ResumeSource,
    CancelMirror(String),
    CancelMigration,
    RemoveNbdTarget(String),
    CloseForwards,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Inspect => write!(f, "inspecting the VM"),
            Step::Prepare => write!(f, "prepare on the destination"),
            Step::OpenForwards => write!(f, "opening the forwards"),
            Step::AddNbdTarget(d) => write!(f, "adding the NBD target of disk {d}"),
            Step::StartMirror(d) => write!(f, "starting the mirror of disk {d}"),
            Step::SendFiles => write!(f, "sending the side-channel files"),
            Step::SetMigrationSettings => write!(f, "setting the migration parameters"),
            Step::StartMigration => write!(f, "starting the migration"),
            Step::StartPostcopy => write!(f, "switching to postcopy"),
            Step::CompleteMirror(d) => write!(f, "completing the mirror of disk {d}"),
            Step::ContinueMigration => write!(f, "continuing the migration at switchover"),
            Step::FinishPeer => write!(f, "finish on the destination"),
            Step::QuitSource => write!(f, "quitting the source QEMU"),
            Step::ResumeSource => write!(f, "resuming the source guest"),
            Step::CancelMirror(d) => write!(f, "cancelling the mirror of disk {d}"),
            Step::CancelMigration => write!(f, "cancelling the migration"),
            Step::RemoveNbdTarget(d) => write!(f, "removing the NBD target of disk {d}"),
            Step::CloseForwards => write!(f, "closing the forwards"),
        }
    }
}

/// Something for the driver to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// `query-status`, `query-block`, `query-named-block-nodes`, `query-block-jobs`, blockers,
    /// VFIO devices → [`Event::Inspected`].
    Inspect,
    /// Control RPC `prepare` → [`Event::Prepared`].
    Prepare(PrepareRequest),
    /// Dynamic forward listeners on private UNIX sockets for these routes.
    OpenForwards(Routes),
    /// `blockdev-add` of an NBD client node for this disk's export (named by device).
    AddNbdTarget(String),
    /// `blockdev-mirror` of this disk to its NBD target, `sync: full`.
    StartMirror(String),
    /// Side channel: send these files, the destination confirms.
    SendFiles(Vec<SideFile>),
    SetMigrationSettings(MigrationSettings),
    /// `migrate` to the RAM forward.
    StartMigration,
    /// `migrate-start-postcopy`.
    StartPostcopy,
    /// `block-job-cancel` (not forced) of a ready mirror at switchover: it completes cleanly
    /// ([`Event::MirrorCompleted`]).
    CompleteMirror(String),
    /// `migrate-continue {"state": "pre-switchover"}`.
    ContinueMigration,
    /// Control RPC `finish` → [`Event::Finished`].
    FinishPeer {
        success: bool,
        resume: bool,
    },
    /// Stop the source QEMU (`quit`) after success.
    QuitSource,
    /// `cont` on the source.
    ResumeSource,
    /// `block-job-cancel` with `force: true`; `Done` once the job has ended.
    CancelMirror(String),
    /// `migrate_cancel`; `Done` once the migration has reached a terminal status.
    CancelMigration,
    /// `blockdev-del` of the NBD target node.
    RemoveNbdTarget(String),
    CloseForwards,
    /// Tell the user (log, `migtun status`, the CLI watching the migration).
    Report(Report),
}

impl Action {
    /// The step this action's result refers to; `None` for reports.
    pub fn step(&self) -> Option<Step> {
        Some(match self {
            Action::Inspect => Step::Inspect,
            Action::Prepare(_) => Step::Prepare,
            Action::OpenForwards(_) => Step::OpenForwards,
            Action::AddNbdTarget(d) => Step::AddNbdTarget(d.clone()),
            Action::StartMirror(d) => Step::StartMirror(d.clone()),
            Action::SendFiles(_) => Step::SendFiles,
            Action::SetMigrationSettings(_) => Step::SetMigrationSettings,
            Action::StartMigration => Step::StartMigration,
            Action::StartPostcopy => Step::StartPostcopy,
            Action::CompleteMirror(d) => Step::CompleteMirror(d.clone()),
            Action::ContinueMigration => Step::ContinueMigration,
            Action::FinishPeer { .. } => Step::FinishPeer,
            Action::QuitSource => Step::QuitSource,
            Action::ResumeSource => Step::ResumeSource,
            Action::CancelMirror(d) => Step::CancelMirror(d.clone()),
            Action::CancelMigration => Step::CancelMigration,
            Action::RemoveNbdTarget(d) => Step::RemoveNbdTarget(d.clone()),
            Action::CloseForwards => Step::CloseForwards,
            Action::Report(_) => return None,
        })
    }
}

/// A message for the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Report {
    Info(String),
    Warning(String),
    Progress(Progress),
}

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    Inspected(VmInfo),
    Prepared(Routes),
    /// The destination's answer to `finish`: `Ok` = it runs (or holds) the guest, or, after
    /// `Finish(failure)`, it cleaned up; `Err` = it could not resume the guest and quit its QEMU.
    Finished(Result<(), String>),
    /// A command without data succeeded.
    Done(Step),
    /// A command failed (QMP error, RPC failure, QEMU gone, driver time-out).
    Failed(Step, String),
    MirrorReady(String),
    MirrorCompleted(String),
    MirrorCancelled(String),
    MirrorFailed(String, String),
    MigrationState(MigrationStatus),
    Progress(Progress),
    /// The control connection to the destination agent is gone.
    PeerLost(String),
    /// The source QEMU's QMP connection ended: QEMU exited or was killed, and the guest with it.
    QemuLost(String),
    /// QEMU's `RESUME` event: the source guest started running (someone ran `cont`).
    SourceResumed,
    /// What the machine waits for took too long (the driver's clock).
    TimedOut,
    CancelRequested,
}

/// Where the machine is (for `migtun status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Begin,
    Prepare,
    Perform(PerformStep),
    Finish,
    Confirm,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PerformStep {
    OpeningForwards,
    StartingMirrors,
    SyncingDisks,
    StartingMigration,
    Migrating,
    CompletingMirrors,
    Switchover,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Begin => write!(f, "begin"),
            Phase::Prepare => write!(f, "prepare"),
            Phase::Perform(s) => write!(
                f,
                "perform ({})",
                serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
            Phase::Finish => write!(f, "finish"),
            Phase::Confirm => write!(f, "confirm"),
            Phase::Done => write!(f, "done"),
        }
    }
}

/// How the migration ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The destination runs (or holds) the guest; the source QEMU was quit.
    Succeeded,
    /// Rolled back: the source runs (or holds) the guest, nothing is left on the destination.
    Failed { phase: Phase, reason: String },
    /// A precondition failed at Begin; nothing was touched.
    Refused { reason: String },
    /// Rolled back on request.
    Cancelled,
    /// It cannot be known here which side has the guest (see the module documentation); the
    /// source is kept paused and intact, never resumed.
    Unknown { reason: String },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeeded => write!(f, "succeeded"),
            Outcome::Failed { phase, reason } => write!(f, "failed in {phase}: {reason}"),
            Outcome::Refused { reason } => write!(f, "refused: {reason}"),
            Outcome::Cancelled => write!(f, "cancelled"),
            Outcome::Unknown { reason } => write!(f, "outcome unknown: {reason}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Inspecting,
    Preparing,
    OpeningForwards,
    AddingTarget(usize),
    StartingMirror(usize),
    /// The mirrors synchronise; meanwhile the migration settings are applied and the
    /// side-channel files sent.
    Syncing,
    StartingMigration,
    Migrating,
    CompletingMirrors,
    Continuing,
    /// `FinishPeer { success: true }` sent: past the point of no return.
    Finishing,
    Quitting,
    /// Rollback, first stage: stop the migration and the mirrors, wait for commands in flight.
    Stopping,
    /// Rollback, second stage: remove what was created, tell the destination, resume.
    Removing,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mirror {
    Running,
    Ready,
    Completing,
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Migration {
    NotStarted,
    Running,
    Postcopy,
    Completed,
    Ended,
}

impl Migration {
    fn live(self) -> bool {
        matches!(self, Migration::Running | Migration::Postcopy)
    }
}

#[derive(Debug)]
struct Rollback {
    outcome: Outcome,
    resume: bool,
    gave_up: bool,
}

/// The state machine of one migration, on the source agent.
#[derive(Debug)]
pub struct Machine {
    id: MigrationId,
    options: Options,
    stage: Stage,
    was_running: bool,
    /// Devices of the copied disks, in the VM's order.
    disks: Vec<String>,
    /// Commands sent whose result has not arrived.
    in_flight: BTreeSet<Step>,
    /// Every command ever sent (each at most once).
    issued: BTreeSet<Step>,
    // What exists, as far as the results tell.
    prepared: bool,
    forwards_open: bool,
    targets: BTreeSet<String>,
    mirrors: BTreeMap<String, Mirror>,
    migration: Migration,
    switchover_seen: bool,
    postcopy_seen: bool,
    last_status: Option<MigrationStatus>,
    finished_ok: bool,
    /// The source QEMU is gone (why): nothing can be resumed or removed in it any more.
    qemu_lost: Option<String>,
    /// The destination confirmed `Finish(failure)`: it has removed this migration.
    peer_cleaned: bool,
    rollback: Option<Rollback>,
    outcome: Option<Outcome>,
}

fn info(out: &mut Vec<Action>, msg: impl Into<String>) {
    out.push(Action::Report(Report::Info(msg.into())));
}

fn warn(out: &mut Vec<Action>, msg: impl Into<String>) {
    out.push(Action::Report(Report::Warning(msg.into())));
}

impl Machine {
    /// A new migration; the first actions are `[Inspect]` (or only a report when the options
    /// themselves are refused).
    pub fn new(id: MigrationId, options: Options) -> (Machine, Vec<Action>) {
        let mut m = Machine {
            id,
            options,
            stage: Stage::Inspecting,
            was_running: false,
            disks: Vec::new(),
            in_flight: BTreeSet::new(),
            issued: BTreeSet::new(),
            prepared: false,
            forwards_open: false,
            targets: BTreeSet::new(),
            mirrors: BTreeMap::new(),
            migration: Migration::NotStarted,
            switchover_seen: false,
            postcopy_seen: false,
            last_status: None,
            finished_ok: false,
            qemu_lost: None,
            peer_cleaned: false,
            rollback: None,
            outcome: None,
        };
        let mut out = Vec::new();
        let problems = option_problems(&m.options);
        if problems.is_empty() {
            m.issue(&mut out, Action::Inspect);
        } else {
            m.end(
                Outcome::Refused {
                    reason: problems.join("; "),
                },
                &mut out,
            );
        }
        (m, out)
    }

    pub fn id(&self) -> &MigrationId {
        &self.id
    }

    pub fn phase(&self) -> Phase {
        match self.stage {
            Stage::Inspecting => Phase::Begin,
            Stage::Preparing => Phase::Prepare,
            Stage::OpeningForwards => Phase::Perform(PerformStep::OpeningForwards),
            Stage::AddingTarget(_) | Stage::StartingMirror(_) => {
                Phase::Perform(PerformStep::StartingMirrors)
            }
            Stage::Syncing => Phase::Perform(PerformStep::SyncingDisks),
            Stage::StartingMigration => Phase::Perform(PerformStep::StartingMigration),
            Stage::Migrating => Phase::Perform(PerformStep::Migrating),
            Stage::CompletingMirrors => Phase::Perform(PerformStep::CompletingMirrors),
            Stage::Continuing => Phase::Perform(PerformStep::Switchover),
            Stage::Finishing => Phase::Finish,
            Stage::Quitting | Stage::Stopping | Stage::Removing => Phase::Confirm,
            Stage::Done => Phase::Done,
        }
    }

    /// Set once the machine is [`Phase::Done`].
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// The guest was running when the migration began (Begin's `query-status`).
    pub fn was_running(&self) -> bool {
        self.was_running
    }

    /// A paused guest (without postcopy) is migrated without `pause-before-switchover`: its
    /// mirrors are completed *before* `migrate` (a paused guest writes nothing). QEMU 7.2 puts
    /// a paused source into `finish-migrate` at switchover and leaves it in `postmigrate` when
    /// the migration then fails, a state it refuses to migrate again ("Can't migrate the vm
    /// that was paused due to previous migration") and that only `cont` (running guest code)
    /// or a reset leaves. Without the pause the source is in `finish-migrate` only for the
    /// final device-state transfer, not for the whole mirror completion.
    fn switchover_pause(&self) -> bool {
        self.was_running || self.options.postcopy
    }

    /// The next actions after `event`. Never panics, whatever arrives when.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        let event = normalize(event);
        if let Some(step) = result_step(&event) {
            if !self.in_flight.remove(&step) && !self.awaits_late_finish(&event) {
                warn(
                    &mut out,
                    format!("ignored a late or duplicate result of {step}"),
                );
                return out;
            }
        }
        let news = self.note(&event);
        if let Event::MigrationState(s) = &event {
            if self.issued.contains(&Step::StartMigration) && self.last_status.as_ref() != Some(s) {
                self.last_status = Some(s.clone());
                info(&mut out, format!("migration status: {s}"));
            }
        }
        match self.stage {
            Stage::Done => self.on_done(event, &mut out),
            Stage::Stopping | Stage::Removing => self.on_rollback(event, &mut out),
            Stage::Finishing | Stage::Quitting => self.on_finish(event, news, &mut out),
            _ => self.on_forward(event, news, &mut out),
        }
        out
    }

    // ---- bookkeeping ----

    /// Sends a command once; a second attempt is an internal error, reported and dropped.
    fn issue(&mut self, out: &mut Vec<Action>, action: Action) {
        match action.step() {
            Some(step) if self.issued.contains(&step) => warn(
                out,
                format!("internal: {step} was already requested; not repeated"),
            ),
            Some(step) => {
                self.issued.insert(step.clone());
                self.in_flight.insert(step);
                out.push(action);
            }
            None => out.push(action),
        }
    }

    /// Sends a teardown command unless it was sent before.
    fn issue_once(&mut self, out: &mut Vec<Action>, action: Action) {
        if action.step().is_some_and(|s| !self.issued.contains(&s)) {
            self.issue(out, action);
        }
    }

    fn awaits_late_finish(&self, event: &Event) -> bool {
        matches!(event, Event::Finished(_))
            && self.stage == Stage::Done
            && matches!(self.outcome, Some(Outcome::Unknown { .. }))
            && self.issued.contains(&Step::FinishPeer)
    }

    fn mirror_live(&self, d: &str) -> bool {
        match self.mirrors.get(d) {
            Some(m) => *m != Mirror::Ended,
            None => self.in_flight.contains(&Step::StartMirror(d.to_string())),
        }
    }

    /// Records the facts an event tells (whatever the stage); true if it is news.
    fn note(&mut self, event: &Event) -> bool {
        match event {
            Event::Prepared(_) => self.prepared = true,
            Event::Done(step) => match step {
                Step::OpenForwards => self.forwards_open = true,
                Step::AddNbdTarget(d) => {
                    self.targets.insert(d.clone());
                }
                Step::StartMirror(d) => {
                    self.mirrors.entry(d.clone()).or_insert(Mirror::Running);
                }
                Step::StartMigration if self.migration == Migration::NotStarted => {
                    self.migration = Migration::Running
                }
                Step::CancelMirror(d) => {
                    self.mirrors.insert(d.clone(), Mirror::Ended);
                }
                Step::CancelMigration if self.migration.live() => self.migration = Migration::Ended,
                Step::RemoveNbdTarget(d) => {
                    self.targets.remove(d);
                }
                Step::CloseForwards => self.forwards_open = false,
                _ => {}
            },
            Event::Failed(step, _) => match step {
                // Give up on these: the failure is reported, the rollback goes on.
                Step::CancelMirror(d) => {
                    self.mirrors.insert(d.clone(), Mirror::Ended);
                }
                Step::CancelMigration if self.migration.live() => self.migration = Migration::Ended,
                Step::RemoveNbdTarget(d) => {
                    self.targets.remove(d);
                }
                Step::CloseForwards => self.forwards_open = false,
                _ => {}
            },
            Event::MirrorReady(d) => {
                if !self.disks.contains(d) || !self.mirror_live(d) {
                    return false;
                }
                let m = self.mirrors.entry(d.clone()).or_insert(Mirror::Running);
                if *m != Mirror::Running {
                    return false;
                }
                *m = Mirror::Ready;
            }
            Event::MirrorCompleted(d) | Event::MirrorCancelled(d) | Event::MirrorFailed(d, _) => {
                if !self.disks.contains(d) || !self.mirror_live(d) {
                    return false;
                }
                self.mirrors.insert(d.clone(), Mirror::Ended);
            }
            Event::QemuLost(msg) => {
                if self.qemu_lost.is_some() {
                    return false;
                }
                self.qemu_lost = Some(msg.clone());
                // What lived in the source QEMU died with it.
                for m in self.mirrors.values_mut() {
                    *m = Mirror::Ended;
                }
                if self.migration.live() {
                    self.migration = Migration::Ended;
                }
                self.targets.clear();
                if let Some(rb) = &mut self.rollback {
                    rb.resume = false;
                }
            }
            Event::Finished(Ok(())) if self.rollback.is_some() => self.peer_cleaned = true,
            Event::MigrationState(s) => {
                if !self.issued.contains(&Step::StartMigration) {
                    return false;
                }
                let before = self.migration;
                self.migration = match (before, s) {
                    (Migration::Completed | Migration::Ended, _) => before,
                    (_, MigrationStatus::Completed) => Migration::Completed,
                    (_, MigrationStatus::Failed | MigrationStatus::Cancelled) => Migration::Ended,
                    (_, MigrationStatus::PostcopyActive) => Migration::Postcopy,
                    (Migration::NotStarted, _) => Migration::Running,
                    _ => before,
                };
                let mut news = self.migration != before;
                if self.migration == Migration::Postcopy && !self.postcopy_seen {
                    self.postcopy_seen = true;
                    news = true;
                }
                if *s == MigrationStatus::PreSwitchover
                    && self.migration.live()
                    && !self.switchover_seen
                {
                    self.switchover_seen = true;
                    news = true;
                }
                return news;
            }
            _ => {}
        }
        true
    }

    fn end(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        let outcome = self.amend(outcome);
        match &outcome {
            Outcome::Succeeded | Outcome::Cancelled => {
                info(out, format!("migration {}: {outcome}", self.id))
            }
            _ => warn(out, format!("migration {}: {outcome}", self.id)),
        }
        self.stage = Stage::Done;
        self.outcome = Some(outcome);
    }

    /// A rolled-back outcome says what became of the guest when the source QEMU died, and
    /// whether the destination confirmed it removed everything.
    fn amend(&self, outcome: Outcome) -> Outcome {
        let Some(why) = &self.qemu_lost else { return outcome };
        let (phase, first) = match outcome {
            Outcome::Failed { phase, reason } => (phase, reason),
            Outcome::Cancelled => (self.phase(), "cancelled by user".to_string()),
            other => return other,
        };
        let mut reason = if first.contains("source QEMU") {
            first
        } else {
            format!("{first}; then the source QEMU exited or was killed ({why}): the guest runs nowhere")
        };
        if self.issued.contains(&Step::FinishPeer) || self.prepared {
            reason.push_str(if self.peer_cleaned {
                "; nothing is left on the destination"
            } else {
                "; the destination did not confirm its cleanup (it quits its QEMU by itself when the control connection ends)"
            });
        }
        Outcome::Failed { phase, reason }
    }

    // ---- Begin, Prepare, Perform ----

    fn on_forward(&mut self, event: Event, news: bool, out: &mut Vec<Action>) {
        match event {
            Event::CancelRequested if self.stage == Stage::Inspecting => {
                self.end(Outcome::Cancelled, out)
            }
            Event::CancelRequested => self.start_rollback(Outcome::Cancelled, true, out),
            Event::TimedOut => self.fail(format!("timed out in {}", self.phase()), out),
            Event::PeerLost(msg) if self.stage == Stage::Inspecting => info(
                out,
                format!("destination agent connection lost ({msg}); not needed yet"),
            ),
            Event::PeerLost(msg) => self.fail(format!("lost the destination agent: {msg}"), out),
            Event::QemuLost(msg) if news => self.fail(
                format!("the source QEMU exited or was killed ({msg}): the guest runs nowhere"),
                out,
            ),
            Event::SourceResumed if !self.was_running && self.stage != Stage::Inspecting => self.fail(
                "the paused guest was resumed on the source during its migration (its disks may have changed after they were copied)"
                    .to_string(),
                out,
            ),
            Event::Failed(Step::StartPostcopy, msg) => warn(
                out,
                format!("could not switch to postcopy ({msg}); the migration goes on as precopy"),
            ),
            Event::Failed(step, msg) => self.fail(format!("{step} failed: {msg}"), out),
            Event::Inspected(vm) if self.stage == Stage::Inspecting => self.begin(vm, out),
            Event::Prepared(routes) if self.stage == Stage::Preparing => {
                self.prepared_ok(routes, out)
            }
            Event::Done(step) => self.advance(step, out),
            Event::MirrorReady(_) if news => self.check_synced(out),
            Event::MirrorCompleted(d) if news => {
                if self.issued.contains(&Step::CompleteMirror(d.clone())) {
                    self.check_mirrors_completed(out)
                } else {
                    self.fail(
                        format!("the mirror job of disk {d} ended before switchover"),
                        out,
                    )
                }
            }
            Event::MirrorCancelled(d) if news => self.fail(
                format!("the mirror job of disk {d} was cancelled outside migtun"),
                out,
            ),
            Event::MirrorFailed(d, msg) if news => {
                self.fail(format!("the mirror job of disk {d} failed: {msg}"), out)
            }
            Event::MigrationState(s) if news => self.on_status(s, out),
            Event::Progress(p) => out.push(Action::Report(Report::Progress(p))),
            _ => {}
        }
    }

    fn begin(&mut self, vm: VmInfo, out: &mut Vec<Action>) {
        self.was_running = vm.running;
        let mut problems = Vec::new();
        if vm.has_active_block_jobs {
            problems.push(
                "the VM has active block jobs; let them finish or cancel them first".to_string(),
            );
        }
        if !vm.blockers.is_empty() {
            problems.push(format!(
                "QEMU reports migration blockers: {}",
                vm.blockers.join("; ")
            ));
        }
        if !vm.vfio_devices.is_empty() {
            let list = vm.vfio_devices.join(", ");
            if self.options.force {
                warn(
                    out,
                    format!("migrating with host (VFIO) devices because of --force: {list}"),
                );
            } else {
                problems.push(format!(
                    "host (VFIO) devices are attached ({list}); use --force if they support migration"
                ));
            }
        }
        let mut copy: BTreeSet<String> = BTreeSet::new();
        match &self.options.disks {
            DiskSelection::All => copy.extend(vm.disks.iter().map(|d| d.device.clone())),
            DiskSelection::SharedStorage => {}
            DiskSelection::Only(names) => {
                for name in names {
                    match vm
                        .disks
                        .iter()
                        .find(|d| &d.device == name || &d.node_name == name)
                    {
                        Some(d) => {
                            copy.insert(d.device.clone());
                        }
                        None => {
                            let have: Vec<&str> =
                                vm.disks.iter().map(|d| d.device.as_str()).collect();
                            problems.push(format!(
                                "--disks names {name:?}, which the VM does not have (its disks: {})",
                                if have.is_empty() { "none".to_string() } else { have.join(", ") }
                            ));
                        }
                    }
                }
            }
        }
        if !problems.is_empty() {
            self.end(
                Outcome::Refused {
                    reason: problems.join("; "),
                },
                out,
            );
            return;
        }
        let disks: Vec<PlannedDisk> = vm
            .disks
            .iter()
            .map(|d| PlannedDisk {
                disk: d.clone(),
                copy: copy.contains(&d.device),
            })
            .collect();
        self.disks = disks
            .iter()
            .filter(|p| p.copy)
            .map(|p| p.disk.device.clone())
            .collect();
        let request = PrepareRequest {
            id: self.id.clone(),
            running: vm.running,
            disks,
            multifd_channels: self.options.multifd_channels(),
            postcopy: self.options.postcopy,
            files: self.options.files.iter().map(|f| f.name.clone()).collect(),
        };
        info(
            out,
            format!(
                "guest {}, copying {} disk(s){}",
                if vm.running { "running" } else { "paused" },
                self.disks.len(),
                if self.disks.is_empty() {
                    String::new()
                } else {
                    format!(": {}", self.disks.join(", "))
                }
            ),
        );
        self.stage = Stage::Preparing;
        self.issue(out, Action::Prepare(request));
    }

    fn prepared_ok(&mut self, routes: Routes, out: &mut Vec<Action>) {
        if !self.disks.is_empty() && routes.nbd.is_none() {
            self.fail(
                "the destination exposed no NBD route for the copied disks".to_string(),
                out,
            );
            return;
        }
        self.stage = Stage::OpeningForwards;
        self.issue(out, Action::OpenForwards(routes));
    }

    fn advance(&mut self, step: Step, out: &mut Vec<Action>) {
        match (self.stage, &step) {
            (Stage::OpeningForwards, Step::OpenForwards) => self.next_disk(0, out),
            (Stage::AddingTarget(i), Step::AddNbdTarget(_)) => {
                if let Some(d) = self.disks.get(i).cloned() {
                    self.stage = Stage::StartingMirror(i);
                    self.issue(out, Action::StartMirror(d));
                }
            }
            (Stage::StartingMirror(i), Step::StartMirror(_)) => self.next_disk(i + 1, out),
            (Stage::Syncing, Step::SendFiles | Step::SetMigrationSettings) => {
                self.check_synced(out)
            }
            (Stage::StartingMigration, Step::StartMigration) => {
                self.stage = Stage::Migrating;
                if self.options.postcopy {
                    self.issue(out, Action::StartPostcopy);
                }
            }
            _ => {}
        }
    }

    fn next_disk(&mut self, i: usize, out: &mut Vec<Action>) {
        if let Some(d) = self.disks.get(i).cloned() {
            self.stage = Stage::AddingTarget(i);
            self.issue(out, Action::AddNbdTarget(d));
            return;
        }
        self.stage = Stage::Syncing;
        if !self.options.files.is_empty() {
            let files = self.options.files.clone();
            self.issue(out, Action::SendFiles(files));
        }
        // The RAM migration's settings while the mirrors run, so that `migrate` follows the
        // last mirror's readiness at once.
        let settings = MigrationSettings {
            pause_before_switchover: self.switchover_pause(),
            multifd_channels: self.options.multifd_channels(),
            postcopy: self.options.postcopy,
            max_bandwidth: self.options.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH),
            downtime_ms: self.options.downtime_ms,
        };
        self.issue(out, Action::SetMigrationSettings(settings));
        self.check_synced(out);
    }

    fn check_synced(&mut self, out: &mut Vec<Action>) {
        if self.stage != Stage::Syncing
            || self.in_flight.contains(&Step::SendFiles)
            || self.in_flight.contains(&Step::SetMigrationSettings)
            || !self
                .disks
                .iter()
                .all(|d| self.mirrors.get(d) == Some(&Mirror::Ready))
        {
            return;
        }
        if !self.switchover_pause() && !self.disks.is_empty() {
            // A paused guest writes nothing: complete the mirrors now (see `switchover_pause`).
            info(out, "all disks are synchronised; completing the mirrors of the paused guest");
            self.complete_mirrors(out);
            return;
        }
        if !self.disks.is_empty() {
            info(out, "all disks are synchronised; starting the migration");
        }
        self.stage = Stage::StartingMigration;
        self.issue(out, Action::StartMigration);
    }

    fn complete_mirrors(&mut self, out: &mut Vec<Action>) {
        self.stage = Stage::CompletingMirrors;
        for d in self.disks.clone() {
            self.mirrors.insert(d.clone(), Mirror::Completing);
            self.issue(out, Action::CompleteMirror(d));
        }
        self.check_mirrors_completed(out);
    }

    fn on_status(&mut self, status: MigrationStatus, out: &mut Vec<Action>) {
        match status {
            MigrationStatus::PreSwitchover
                if self.switchover_pause() && matches!(self.stage, Stage::StartingMigration | Stage::Migrating) =>
            {
                self.complete_mirrors(out)
            }
            MigrationStatus::PostcopyActive | MigrationStatus::Completed
                if self.stage == Stage::Continuing
                    || (!self.switchover_pause() && matches!(self.stage, Stage::StartingMigration | Stage::Migrating)) =>
            {
                if status == MigrationStatus::PostcopyActive && !self.options.postcopy {
                    warn(out, "QEMU switched to postcopy although it was not asked to");
                }
                self.stage = Stage::Finishing;
                info(out, "point of no return: telling the destination to take over the guest");
                self.issue(out, Action::FinishPeer { success: true, resume: self.was_running });
            }
            MigrationStatus::PostcopyActive => {
                self.fail("QEMU switched to postcopy before the switchover pause".to_string(), out)
            }
            MigrationStatus::Completed => self.fail(
                "the migration completed without the switchover pause; the disks were not synchronised".to_string(),
                out,
            ),
            MigrationStatus::Failed => self.fail("QEMU reports that the migration failed".to_string(), out),
            MigrationStatus::Cancelled => self.fail("the migration was cancelled outside migtun".to_string(), out),
            _ => {}
        }
    }

    fn check_mirrors_completed(&mut self, out: &mut Vec<Action>) {
        if self.stage == Stage::CompletingMirrors
            && self
                .disks
                .iter()
                .all(|d| self.mirrors.get(d) == Some(&Mirror::Ended))
        {
            if self.issued.contains(&Step::StartMigration) {
                self.stage = Stage::Continuing;
                self.issue(out, Action::ContinueMigration);
            } else {
                info(out, "the disks are copied; starting the migration");
                self.stage = Stage::StartingMigration;
                self.issue(out, Action::StartMigration);
            }
        }
    }

    // ---- Finish, Confirm ----

    fn on_finish(&mut self, event: Event, news: bool, out: &mut Vec<Action>) {
        let finishing = self.stage == Stage::Finishing;
        match event {
            Event::CancelRequested => warn(
                out,
                "cancel refused: the destination has been told to take over the guest (point of no return passed)",
            ),
            Event::Finished(Ok(())) if finishing => {
                self.finished_ok = true;
                self.maybe_quit(out);
            }
            Event::Finished(Err(msg)) if finishing => {
                if self.postcopy_seen {
                    self.unknown(
                        format!(
                            "postcopy failed: the destination could not resume the guest ({msg}); \
                             the guest is lost on both sides unless recovered"
                        ),
                        out,
                    )
                } else {
                    let reason = format!("the destination could not resume the guest: {msg}");
                    self.start_rollback(Outcome::Failed { phase: Phase::Finish, reason }, true, out)
                }
            }
            Event::Failed(Step::FinishPeer, msg) => {
                self.unknown(format!("no answer from the destination to Finish(success): {msg}"), out)
            }
            Event::PeerLost(msg) if finishing && !self.finished_ok => {
                self.unknown(format!("lost the destination agent after Finish(success): {msg}"), out)
            }
            Event::TimedOut if finishing && !self.finished_ok => {
                self.unknown("no answer from the destination to Finish(success) in time".to_string(), out)
            }
            Event::TimedOut if finishing => self.unknown(
                "postcopy: the migration did not complete in time; the guest is lost on both sides unless recovered"
                    .to_string(),
                out,
            ),
            Event::MigrationState(_) if news && finishing => match self.migration {
                Migration::Completed => self.maybe_quit(out),
                Migration::Ended if self.postcopy_seen => self.unknown(
                    "postcopy failed: the guest is lost on both sides unless recovered".to_string(),
                    out,
                ),
                _ => {}
            },
            Event::Failed(Step::QuitSource, msg) => {
                warn(out, format!("could not quit the source QEMU ({msg}); it stays paused: do not resume it"))
            }
            Event::Failed(step, msg) => warn(out, format!("{step} failed: {msg}")),
            Event::TimedOut => {
                warn(out, "gave up waiting for the source to quit");
                self.end(Outcome::Succeeded, out);
                return;
            }
            Event::Progress(p) => out.push(Action::Report(Report::Progress(p))),
            _ => {}
        }
        if self.stage == Stage::Quitting && self.in_flight.is_empty() {
            self.end(Outcome::Succeeded, out);
        }
    }

    fn maybe_quit(&mut self, out: &mut Vec<Action>) {
        if self.stage == Stage::Finishing
            && self.finished_ok
            && self.migration == Migration::Completed
        {
            self.stage = Stage::Quitting;
            self.issue(out, Action::QuitSource);
            if self.forwards_open {
                self.issue(out, Action::CloseForwards);
            }
        }
    }

    /// Past the point of no return without an answer: neither resume nor quit the source.
    fn unknown(&mut self, reason: String, out: &mut Vec<Action>) {
        if !self.postcopy_seen {
            // Precopy: the migration is over; its leftovers on the source are no use any more.
            for d in self.targets.clone() {
                self.issue_once(out, Action::RemoveNbdTarget(d));
            }
            if self.forwards_open {
                self.issue_once(out, Action::CloseForwards);
            }
        }
        warn(out, "the source guest stays paused and must not be resumed until the destination's state is known");
        self.end(Outcome::Unknown { reason }, out);
    }

    fn on_done(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Finished(result) if matches!(self.outcome, Some(Outcome::Unknown { .. })) => match result {
                _ if self.postcopy_seen && self.migration != Migration::Completed => {
                    warn(out, format!("late answer from the destination ({result:?}); the postcopy migration did not complete, the outcome stays unknown"))
                }
                Err(msg) if self.postcopy_seen => warn(
                    out,
                    format!("late answer from the destination: it could not resume the guest ({msg}); after postcopy the outcome stays unknown"),
                ),
                Ok(()) => {
                    info(out, "the destination confirms it has the guest; quitting the source");
                    self.issue_once(out, Action::QuitSource);
                    if self.forwards_open {
                        self.issue_once(out, Action::CloseForwards);
                    }
                    self.outcome = Some(Outcome::Succeeded);
                }
                Err(msg) => {
                    if self.was_running {
                        self.issue_once(out, Action::ResumeSource);
                    }
                    let reason = format!("the destination could not resume the guest: {msg}");
                    warn(out, format!("migration {}: failed: {reason}", self.id));
                    self.outcome = Some(Outcome::Failed { phase: Phase::Finish, reason });
                }
            },
            Event::Failed(step, msg) => warn(out, format!("{step} failed after the end: {msg}")),
            Event::CancelRequested => info(out, "the migration has already ended"),
            _ => {}
        }
    }

    // ---- rollback ----

    fn fail(&mut self, reason: String, out: &mut Vec<Action>) {
        let phase = self.phase();
        if self.stage == Stage::Inspecting {
            self.end(Outcome::Failed { phase, reason }, out);
        } else {
            self.start_rollback(Outcome::Failed { phase, reason }, true, out);
        }
    }

    fn start_rollback(&mut self, outcome: Outcome, resume: bool, out: &mut Vec<Action>) {
        match &outcome {
            Outcome::Cancelled => warn(out, "cancelled by user; rolling back"),
            other => warn(out, format!("{other}; rolling back")),
        }
        self.rollback = Some(Rollback {
            outcome,
            resume: resume && self.was_running && self.qemu_lost.is_none(),
            gave_up: false,
        });
        self.stage = Stage::Stopping;
        self.progress_rollback(out);
    }

    fn on_rollback(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::CancelRequested => info(out, "already rolling back"),
            Event::TimedOut => {
                let waiting: Vec<String> = self.in_flight.iter().map(|s| s.to_string()).collect();
                warn(
                    out,
                    format!("rollback: gave up waiting ({})", waiting.join(", ")),
                );
                if let Some(rb) = &mut self.rollback {
                    rb.gave_up = true;
                }
                if self.stage == Stage::Stopping {
                    // Whatever is still in flight may have been created: tear it down too.
                    for step in std::mem::take(&mut self.in_flight) {
                        match step {
                            Step::Prepare => self.prepared = true,
                            Step::OpenForwards => self.forwards_open = true,
                            Step::AddNbdTarget(d) => {
                                self.targets.insert(d);
                            }
                            Step::StartMirror(d) => {
                                self.mirrors.entry(d).or_insert(Mirror::Running);
                            }
                            Step::StartMigration if self.migration == Migration::NotStarted => {
                                self.migration = Migration::Running
                            }
                            _ => {}
                        }
                    }
                }
            }
            Event::QemuLost(msg) => warn(
                out,
                format!("rollback: the source QEMU is gone ({msg}); nothing to resume or remove there"),
            ),
            Event::Failed(Step::ResumeSource, _) if self.qemu_lost.is_some() => {}
            Event::Failed(Step::ResumeSource, msg) => {
                let reason = format!(
                    "the source guest could not be resumed ({msg}); it may not run anywhere"
                );
                warn(out, format!("rollback: {reason}"));
                if let Some(rb) = &mut self.rollback {
                    let first = match &rb.outcome {
                        Outcome::Failed { reason, .. } => reason.clone(),
                        _ => "cancelled by user".to_string(),
                    };
                    rb.outcome = Outcome::Failed {
                        phase: Phase::Confirm,
                        reason: format!("{first}; {reason}"),
                    };
                }
            }
            Event::Failed(step, msg) => warn(out, format!("rollback: {step} failed: {msg}")),
            Event::Finished(Err(msg)) => {
                warn(out, format!("rollback: the destination reported: {msg}"))
            }
            Event::PeerLost(msg) => {
                warn(out, format!("rollback: lost the destination agent: {msg}"))
            }
            _ => {}
        }
        self.progress_rollback(out);
    }

    fn progress_rollback(&mut self, out: &mut Vec<Action>) {
        let Some((resume, gave_up)) = self.rollback.as_ref().map(|rb| (rb.resume, rb.gave_up))
        else {
            return;
        };
        if self.stage == Stage::Stopping {
            if self.migration.live() {
                self.issue_once(out, Action::CancelMigration);
            }
            let live: Vec<String> = self
                .mirrors
                .iter()
                .filter(|(_, m)| **m != Mirror::Ended)
                .map(|(d, _)| d.clone())
                .collect();
            for d in live {
                self.issue_once(out, Action::CancelMirror(d));
            }
            let busy = !self.in_flight.is_empty()
                || self.migration.live()
                || self.mirrors.values().any(|m| *m != Mirror::Ended);
            if busy && !gave_up {
                return;
            }
            self.stage = Stage::Removing;
            for d in self.targets.clone() {
                self.issue_once(out, Action::RemoveNbdTarget(d));
            }
            if self.forwards_open {
                self.issue_once(out, Action::CloseForwards);
            }
            // The guest first: the destination never runs it without Finish(success), so
            // resuming does not wait for a peer that may be stalled or gone.
            if resume {
                self.issue_once(out, Action::ResumeSource);
            }
            if self.prepared {
                self.issue_once(
                    out,
                    Action::FinishPeer {
                        success: false,
                        resume: false,
                    },
                );
            }
        }
        if self.stage == Stage::Removing && (gave_up || self.in_flight.is_empty()) {
            if let Some(rb) = self.rollback.take() {
                self.end(rb.outcome, out);
            }
        }
    }
}

/// Results without the data their step needs are failures (or, for `finish`, a plain ack).
fn normalize(event: Event) -> Event {
    match event {
        Event::Done(Step::Inspect) => Event::Failed(Step::Inspect, "no VM information".to_string()),
        Event::Done(Step::Prepare) => {
            Event::Failed(Step::Prepare, "no routes in the answer".to_string())
        }
        Event::Done(Step::FinishPeer) => Event::Finished(Ok(())),
        other => other,
    }
}

fn result_step(event: &Event) -> Option<Step> {
    match event {
        Event::Inspected(_) => Some(Step::Inspect),
        Event::Prepared(_) => Some(Step::Prepare),
        Event::Finished(_) => Some(Step::FinishPeer),
        Event::Done(s) | Event::Failed(s, _) => Some(s.clone()),
        _ => None,
    }
}

impl Options {
    /// multifd channels, if multifd is used: `--parallel 1` is the one migration stream.
    pub fn multifd_channels(&self) -> Option<u8> {
        self.parallel.filter(|n| *n > 1)
    }
}

fn option_problems(o: &Options) -> Vec<String> {
    let mut problems = Vec::new();
    if o.parallel == Some(0) {
        problems.push("--parallel must be at least 1".to_string());
    }
    if o.postcopy && o.multifd_channels().is_some() {
        problems.push(
            "--postcopy cannot be combined with --parallel: QEMU 7.2 refuses multifd with postcopy-ram"
                .to_string(),
        );
    }
    if matches!(&o.disks, DiskSelection::Only(names) if names.is_empty()) {
        problems.push("--disks names no disk (use --shared-storage to copy none)".to_string());
    }
    problems
}

#[cfg(test)]
mod tests {
    //! A simulated world (the source QEMU, the forwards, the destination agent and its QEMU)
    //! answers the machine's actions like a driver would; faults are injected at every step.
    //! After every run, the invariant is checked twice: from the trace alone
    //! ([`copies_running`]) and against the simulated world's final state.

    use super::*;
    use std::collections::VecDeque;

    #[derive(Clone, Debug)]
    enum Entry {
        Event(Event),
        Action(Action),
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Guest {
        Running,
        Paused,
        Gone,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Fault {
        Cancel,
        PeerLost,
        TimedOut,
        MigrationFailed,
        MirrorFailed,
    }
    const FAULTS: [Fault; 5] = [
        Fault::Cancel,
        Fault::PeerLost,
        Fault::TimedOut,
        Fault::MigrationFailed,
        Fault::MirrorFailed,
    ];

    fn disk(device: &str, size: u64) -> Disk {
        Disk {
            device: device.into(),
            node_name: format!("node-{device}"),
            size,
            format: "qcow2".into(),
            file: format!("/images/{device}.qcow2"),
        }
    }

    fn vm(running: bool) -> VmInfo {
        VmInfo {
            running,
            disks: vec![disk("vda", 1 << 30), disk("vdb", 2 << 30)],
            ..Default::default()
        }
    }

    #[derive(Clone, Debug)]
    struct Scenario {
        name: &'static str,
        vm: VmInfo,
        options: Options,
    }

    fn scenarios() -> Vec<Scenario> {
        let files = vec![SideFile {
            name: "nvram.fd".into(),
            path: "/var/lib/vm/nvram.fd".into(),
        }];
        vec![
            Scenario {
                name: "running, all disks",
                vm: vm(true),
                options: Options::default(),
            },
            Scenario {
                name: "paused, all disks",
                vm: vm(false),
                options: Options::default(),
            },
            Scenario {
                name: "running, --disks vdb",
                vm: vm(true),
                options: Options {
                    disks: DiskSelection::Only(vec!["vdb".into()]),
                    ..Default::default()
                },
            },
            Scenario {
                name: "running, shared storage",
                vm: vm(true),
                options: Options {
                    disks: DiskSelection::SharedStorage,
                    ..Default::default()
                },
            },
            Scenario {
                name: "running, parallel, limits, files",
                vm: vm(true),
                options: Options {
                    parallel: Some(4),
                    max_bandwidth: Some(1 << 30),
                    downtime_ms: Some(300),
                    files: files.clone(),
                    ..Default::default()
                },
            },
            Scenario {
                name: "paused, shared storage, files",
                vm: vm(false),
                options: Options {
                    disks: DiskSelection::SharedStorage,
                    files,
                    ..Default::default()
                },
            },
            Scenario {
                name: "running, postcopy",
                vm: vm(true),
                options: Options {
                    postcopy: true,
                    ..Default::default()
                },
            },
            Scenario {
                name: "paused, postcopy",
                vm: vm(false),
                options: Options {
                    postcopy: true,
                    ..Default::default()
                },
            },
            Scenario {
                name: "running, VM without disks",
                vm: VmInfo {
                    running: true,
                    ..Default::default()
                },
                options: Options::default(),
            },
        ]
    }

    /// The simulated hosts. Commands take effect when applied; their results and the QEMU events
    /// they cause are queued and delivered later, in order or shuffled.
    struct World {
        vm: VmInfo,
        source: Guest,
        /// The destination QEMU (None: not started, or quit).
        dest: Option<Guest>,
        dest_prepared: bool,
        dest_has_state: bool,
        dest_told_success: bool,
        dest_cont_fails: bool,
        finish_reply_lost: bool,
        peer_up: bool,
        forwards: bool,
        nodes: BTreeSet<String>,
        jobs: BTreeMap<String, bool>,
        migration: Option<MigrationStatus>,
        /// `pause-before-switchover` as last set.
        pause: bool,
        postcopy_requested: bool,
        fail_command: Option<usize>,
        qemu_dies_at: Option<usize>,
        qemu_dead: bool,
        commands: usize,
        injected: BTreeSet<Step>,
        queue: VecDeque<Event>,
        /// Things a real QEMU or agent would have refused or that break the invariant.
        errors: Vec<String>,
    }

    fn terminal(s: &Option<MigrationStatus>) -> bool {
        matches!(
            s,
            None | Some(
                MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
            )
        )
    }

    fn is_qemu(step: &Step) -> bool {
        !matches!(
            step,
            Step::Prepare
                | Step::SendFiles
                | Step::FinishPeer
                | Step::OpenForwards
                | Step::CloseForwards
        )
    }

    impl World {
        fn new(vm: VmInfo) -> World {
            World {
                source: if vm.running {
                    Guest::Running
                } else {
                    Guest::Paused
                },
                vm,
                dest: None,
                dest_prepared: false,
                dest_has_state: false,
                dest_told_success: false,
                dest_cont_fails: false,
                finish_reply_lost: false,
                peer_up: true,
                forwards: false,
                nodes: BTreeSet::new(),
                jobs: BTreeMap::new(),
                migration: None,
                pause: true,
                postcopy_requested: false,
                fail_command: None,
                qemu_dies_at: None,
                qemu_dead: false,
                commands: 0,
                injected: BTreeSet::new(),
                queue: VecDeque::new(),
                errors: Vec::new(),
            }
        }

        fn ev(&mut self, e: Event) {
            self.queue.push_back(e);
        }

        fn migration_event(&mut self, s: MigrationStatus) {
            self.migration = Some(s.clone());
            self.ev(Event::MigrationState(s));
        }

        /// QEMU ends a failed or cancelled precopy migration by restarting the guest if it ran
        /// before (not after postcopy started: the destination may have run it).
        fn migration_ends(&mut self, s: MigrationStatus) {
            let postcopy = self.migration == Some(MigrationStatus::PostcopyActive);
            if self.source == Guest::Paused && self.vm.running && !postcopy {
                self.source = Guest::Running;
            }
            self.migration_event(s);
        }

        fn apply(&mut self, action: &Action) {
            let Some(step) = action.step() else { return };
            self.commands += 1;
            if self.fail_command == Some(self.commands) {
                self.injected.insert(step.clone());
                self.ev(Event::Failed(step, "injected failure".into()));
                return;
            }
            if self.qemu_dies_at == Some(self.commands) {
                self.qemu_dead = true;
                self.source = Guest::Gone;
                self.jobs.clear();
                self.nodes.clear();
                self.migration = None;
                self.ev(Event::QemuLost("QMP connection closed".into()));
            }
            if self.qemu_dead && is_qemu(&step) {
                self.ev(Event::Failed(step, "QEMU is gone".into()));
                return;
            }
            let ok = Event::Done(step.clone());
            match action {
                Action::Inspect => self.ev(Event::Inspected(self.vm.clone())),
                Action::Prepare(req) => {
                    if !self.peer_up {
                        return self.ev(Event::Failed(step, "peer unreachable".into()));
                    }
                    self.dest = Some(Guest::Paused);
                    self.dest_prepared = true;
                    let copy = req.disks.iter().any(|d| d.copy);
                    self.ev(Event::Prepared(Routes {
                        ram: "m1.ram".into(),
                        nbd: copy.then(|| "m1.nbd".into()),
                    }));
                }
                Action::OpenForwards(_) => {
                    self.forwards = true;
                    self.ev(ok);
                }
                Action::AddNbdTarget(d) => {
                    if !self.forwards || !self.nodes.insert(d.clone()) {
                        self.errors
                            .push(format!("blockdev-add {d} without forwards or twice"));
                    }
                    self.ev(ok);
                }
                Action::StartMirror(d) => {
                    if !self.nodes.contains(d) {
                        self.errors.push(format!("mirror {d} without its target"));
                    }
                    self.jobs.insert(d.clone(), true);
                    self.ev(ok);
                    self.ev(Event::MirrorReady(d.clone()));
                }
                Action::SendFiles(_) => {
                    if self.peer_up {
                        self.ev(ok)
                    } else {
                        self.ev(Event::Failed(step, "peer unreachable".into()))
                    }
                }
                Action::SetMigrationSettings(s) => {
                    if !s.pause_before_switchover && (self.vm.running || s.postcopy) {
                        self.errors.push("no pause-before-switchover for a running guest or postcopy".into());
                    }
                    self.pause = s.pause_before_switchover;
                    self.ev(ok);
                }
                Action::StartMigration => {
                    if self.jobs.values().any(|ready| !ready) {
                        self.errors
                            .push("migration started before the mirrors were ready".into());
                    }
                    self.migration_event(MigrationStatus::Setup);
                    self.ev(ok);
                    self.migration_event(MigrationStatus::Active);
                    self.ev(Event::Progress(Progress {
                        transferred: 1,
                        remaining: 1,
                        total: 2,
                    }));
                    if self.source == Guest::Running {
                        self.source = Guest::Paused;
                    }
                    if self.pause {
                        self.migration_event(MigrationStatus::PreSwitchover);
                    } else {
                        // A paused guest: its mirrors must be completed before `migrate`.
                        if !self.jobs.is_empty() {
                            self.errors.push("paused guest migrated with mirrors still running".into());
                        }
                        self.dest_has_state = true;
                        self.migration_event(MigrationStatus::Device);
                        self.migration_event(MigrationStatus::Completed);
                    }
                }
                Action::StartPostcopy => {
                    self.postcopy_requested = true;
                    self.ev(ok);
                }
                Action::CompleteMirror(d) => {
                    if self.jobs.remove(d).is_some() {
                        self.ev(ok);
                        self.ev(Event::MirrorCompleted(d.clone()));
                    } else {
                        self.ev(Event::Failed(step, "no such job".into()));
                    }
                }
                Action::ContinueMigration => {
                    if self.migration != Some(MigrationStatus::PreSwitchover) {
                        return self.ev(Event::Failed(step, "not in pre-switchover".into()));
                    }
                    if !self.jobs.is_empty() {
                        self.errors
                            .push("switchover with mirrors still running".into());
                    }
                    self.dest_has_state = true;
                    self.ev(ok);
                    if self.postcopy_requested {
                        // Completes once the destination runs and has pulled the rest.
                        self.migration_event(MigrationStatus::PostcopyActive);
                    } else {
                        self.migration_event(MigrationStatus::Device);
                        self.migration_event(MigrationStatus::Completed);
                    }
                }
                Action::FinishPeer { success, resume } => {
                    if !self.peer_up {
                        return self.ev(Event::Failed(step, "peer unreachable".into()));
                    }
                    if !*success {
                        self.dest = None;
                        self.dest_prepared = false;
                        return self.ev(Event::Finished(Ok(())));
                    }
                    self.dest_told_success = true;
                    if !self.dest_has_state {
                        self.errors
                            .push("Finish(success) before the migration completed".into());
                    }
                    if self.dest_cont_fails {
                        // It never ran the guest and has quit its QEMU.
                        self.dest_told_success = false;
                        self.dest = None;
                        self.ev(Event::Finished(Err("cont failed".into())));
                    } else {
                        self.dest = Some(if *resume {
                            Guest::Running
                        } else {
                            Guest::Paused
                        });
                        if self.migration == Some(MigrationStatus::PostcopyActive) {
                            self.migration_event(MigrationStatus::Completed);
                        }
                        if self.finish_reply_lost {
                            self.peer_up = false;
                            self.ev(Event::PeerLost("connection reset".into()));
                        } else {
                            self.ev(Event::Finished(Ok(())));
                        }
                    }
                }
                Action::QuitSource => {
                    if self.source == Guest::Running {
                        self.errors.push("quit a running source".into());
                    }
                    self.source = Guest::Gone;
                    self.nodes.clear();
                    self.jobs.clear();
                    self.ev(ok);
                }
                Action::ResumeSource => {
                    if !terminal(&self.migration) {
                        self.errors
                            .push(format!("cont during migration status {:?}", self.migration));
                    }
                    if self.dest_told_success {
                        self.errors.push("cont after Finish(success)".into());
                    }
                    self.source = Guest::Running;
                    self.ev(ok);
                }
                Action::CancelMirror(d) => {
                    if self.jobs.remove(d).is_some() {
                        self.ev(Event::MirrorCancelled(d.clone()));
                        self.ev(ok);
                    } else {
                        self.ev(Event::Failed(step, "no such job".into()));
                    }
                }
                Action::CancelMigration => {
                    if !terminal(&self.migration) {
                        self.migration_event(MigrationStatus::Cancelling);
                        self.migration_ends(MigrationStatus::Cancelled);
                    }
                    self.ev(ok);
                }
                Action::RemoveNbdTarget(d) => {
                    if self.jobs.contains_key(d) {
                        self.ev(Event::Failed(step, "node is in use".into()));
                    } else if self.nodes.remove(d) {
                        self.ev(ok);
                    } else {
                        self.ev(Event::Failed(step, "no such node".into()));
                    }
                }
                Action::CloseForwards => {
                    self.forwards = false;
                    self.ev(ok);
                }
                Action::Report(_) => {}
            }
        }

        fn inject(&mut self, fault: Fault) -> Event {
            match fault {
                Fault::Cancel => Event::CancelRequested,
                Fault::TimedOut => Event::TimedOut,
                Fault::PeerLost => {
                    self.peer_up = false;
                    Event::PeerLost("connection reset".into())
                }
                Fault::MigrationFailed => {
                    if !terminal(&self.migration) {
                        if self.migration == Some(MigrationStatus::PostcopyActive) {
                            // The destination loses the pages it had not fetched yet.
                            self.dest = None;
                        }
                        // Whatever QEMU was about to report will not happen.
                        self.queue
                            .retain(|e| !matches!(e, Event::MigrationState(_)));
                        self.migration_ends(MigrationStatus::Failed);
                        return self
                            .queue
                            .pop_back()
                            .unwrap_or(Event::MigrationState(MigrationStatus::Failed));
                    }
                    Event::MigrationState(MigrationStatus::Failed)
                }
                Fault::MirrorFailed => match self.jobs.keys().next().cloned() {
                    Some(d) => {
                        self.jobs.remove(&d);
                        Event::MirrorFailed(d, "I/O error".into())
                    }
                    None => Event::MirrorFailed("vda".into(), "I/O error".into()),
                },
            }
        }

        /// The destination agent's own rule: without Finish(success), its QEMU is quit.
        fn settle(&mut self) {
            if !self.dest_told_success {
                self.dest = None;
            }
        }
    }

    #[derive(Clone, Debug, Default)]
    struct Plan {
        fail_command: Option<usize>,
        qemu_dies_at: Option<usize>,
        /// Faults injected after this many of the world's own events were delivered.
        inject: Vec<(usize, Fault)>,
        /// Shuffle deliveries (and duplicate some) with this seed.
        chaos: Option<u64>,
        /// Deliver random junk events too.
        junk: bool,
        /// Like a driver's timer: when nothing else happens and the machine still waits,
        /// deliver `TimedOut` (only where the world can go silent: dead QEMU, junk).
        watchdog: bool,
        dest_cont_fails: bool,
        finish_reply_lost: bool,
    }

    struct Sim {
        machine: Machine,
        world: World,
        trace: Vec<Entry>,
        natural: usize,
        /// Phase of the machine when each fault was injected.
        injected_at: Vec<(Fault, Phase)>,
    }

    impl Sim {
        fn deliver(&mut self, e: Event) {
            self.trace.push(Entry::Event(e.clone()));
            let actions = self.machine.handle(e);
            self.apply(actions);
        }

        fn apply(&mut self, actions: Vec<Action>) {
            for a in actions {
                self.world.apply(&a);
                self.trace.push(Entry::Action(a));
            }
        }

        fn actions(&self) -> impl Iterator<Item = &Action> {
            self.trace.iter().filter_map(|e| match e {
                Entry::Action(a) => Some(a),
                _ => None,
            })
        }

        fn events(&self) -> impl Iterator<Item = &Event> {
            self.trace.iter().filter_map(|e| match e {
                Entry::Event(e) => Some(e),
                _ => None,
            })
        }

        fn has(&self, f: impl Fn(&Action) -> bool) -> bool {
            self.actions().any(f)
        }

        fn commands(&self) -> Vec<Action> {
            self.actions()
                .filter(|a| a.step().is_some())
                .cloned()
                .collect()
        }

        fn dump(&self) -> String {
            let mut s = String::new();
            for e in &self.trace {
                match e {
                    Entry::Event(e) => s.push_str(&format!("  <- {e:?}\n")),
                    Entry::Action(a) => s.push_str(&format!("  -> {a:?}\n")),
                }
            }
            s.push_str(&format!(
                "  outcome {:?}, phase {:?}; world: source {:?}, dest {:?}, errors {:?}",
                self.machine.outcome(),
                self.machine.phase(),
                self.world.source,
                self.world.dest,
                self.world.errors
            ));
            s
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn junk_event(rng: &mut Rng) -> Event {
        let d = ["vda", "vdb", "vdz"][rng.below(3)].to_string();
        let steps = [
            Step::Inspect,
            Step::Prepare,
            Step::OpenForwards,
            Step::AddNbdTarget(d.clone()),
            Step::StartMirror(d.clone()),
            Step::StartMigration,
            Step::ContinueMigration,
            Step::FinishPeer,
            Step::CancelMirror(d.clone()),
            Step::RemoveNbdTarget(d.clone()),
            Step::ResumeSource,
            Step::QuitSource,
        ];
        let step = steps[rng.below(steps.len())].clone();
        let statuses = [
            "setup",
            "active",
            "pre-switchover",
            "device",
            "completed",
            "failed",
            "cancelled",
            "postcopy-active",
            "wait-unplug",
        ];
        match rng.below(10) {
            0 => Event::Done(step),
            1 => Event::Failed(step, "junk".into()),
            2 => Event::MirrorReady(d),
            3 => Event::MirrorCompleted(d),
            4 => Event::MigrationState(MigrationStatus::parse(statuses[rng.below(statuses.len())])),
            5 => Event::Progress(Progress::default()),
            6 => Event::Finished(if rng.below(2) == 0 {
                Ok(())
            } else {
                Err("junk".into())
            }),
            7 => Event::Inspected(vm(true)),
            8 => Event::Prepared(Routes {
                ram: "x".into(),
                nbd: None,
            }),
            _ => Event::MirrorCancelled(d),
        }
    }

    fn run(scn: &Scenario, plan: &Plan) -> Sim {
        let (machine, first) = Machine::new(MigrationId("m1".into()), scn.options.clone());
        let mut world = World::new(scn.vm.clone());
        world.fail_command = plan.fail_command;
        world.qemu_dies_at = plan.qemu_dies_at;
        world.dest_cont_fails = plan.dest_cont_fails;
        world.finish_reply_lost = plan.finish_reply_lost;
        let mut sim = Sim {
            machine,
            world,
            trace: Vec::new(),
            natural: 0,
            injected_at: Vec::new(),
        };
        sim.apply(first);
        let mut inject: VecDeque<(usize, Fault)> = plan.inject.iter().copied().collect();
        let mut rng = Rng(plan.chaos.unwrap_or(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut duplicates = 0;
        for _ in 0..10_000 {
            if let Some(&(k, fault)) = inject.front() {
                if k <= sim.natural || sim.world.queue.is_empty() {
                    inject.pop_front();
                    sim.injected_at.push((fault, sim.machine.phase()));
                    let e = sim.world.inject(fault);
                    sim.deliver(e);
                    continue;
                }
            }
            if plan.junk && rng.below(8) == 0 {
                let e = junk_event(&mut rng);
                sim.deliver(e);
                continue;
            }
            let next = match plan.chaos {
                Some(_) => {
                    let i = rng.below(sim.world.queue.len());
                    sim.world.queue.remove(i)
                }
                None => sim.world.queue.pop_front(),
            };
            let Some(e) = next else {
                if (plan.watchdog || plan.junk || plan.qemu_dies_at.is_some())
                    && sim.machine.phase() != Phase::Done
                {
                    sim.deliver(Event::TimedOut);
                    continue;
                }
                break;
            };
            if plan.chaos.is_some() && duplicates < 20 && rng.below(5) == 0 {
                duplicates += 1;
                sim.world.queue.push_back(e.clone());
            }
            sim.natural += 1;
            sim.deliver(e);
        }
        assert!(
            sim.world.queue.is_empty(),
            "the run does not end\n{}",
            sim.dump()
        );
        sim.world.settle();
        sim
    }

    /// Who has the guest at the end, from the trace alone: `(source, destination)`. "Runs" means
    /// "holds the live guest": running, or paused if it was paused to begin with.
    /// * The destination has it only if it was sent `FinishPeer { success: true }` and answered
    ///   `Finished(Ok)`.
    /// * The source has it unless it was quit, or handed over (Finish(success) sent and not
    ///   answered with an error); and a guest that was running must have been resumed once a
    ///   migration was started (which pauses it at switchover).
    fn copies_running(trace: &[Entry], was_running: bool) -> (bool, bool) {
        let actions: Vec<&Action> = trace
            .iter()
            .filter_map(|e| match e {
                Entry::Action(a) => Some(a),
                _ => None,
            })
            .collect();
        let quit = actions.iter().any(|a| **a == Action::QuitSource);
        let resumed = actions.iter().any(|a| **a == Action::ResumeSource);
        let started = actions.iter().any(|a| **a == Action::StartMigration);
        let handover = trace
            .iter()
            .position(|e| matches!(e, Entry::Action(Action::FinishPeer { success: true, .. })));
        let answer = handover.and_then(|i| {
            trace[i..].iter().find_map(|e| match e {
                Entry::Event(Event::Finished(r)) => Some(r.is_ok()),
                _ => None,
            })
        });
        let dest = answer == Some(true);
        let handed_over = handover.is_some() && answer != Some(false);
        let source = !quit && !handed_over && (!was_running || resumed || !started);
        (source, dest)
    }

    /// The checks that hold after every run.
    fn check(sim: &Sim, scn: &Scenario) {
        let was_running = scn.vm.running;
        let ctx = || format!("scenario {:?}\n{}", scn.name, sim.dump());
        assert_eq!(sim.machine.phase(), Phase::Done, "not done: {}", ctx());
        let outcome = sim.machine.outcome().cloned().expect("an outcome");

        // Every command at most once.
        let mut seen = BTreeSet::new();
        for a in sim.actions() {
            if let Some(s) = a.step() {
                assert!(seen.insert(s.clone()), "{s:?} issued twice: {}", ctx());
            }
        }
        assert!(
            !sim.actions().any(
                |a| matches!(a, Action::Report(Report::Warning(w)) if w.starts_with("internal"))
            ),
            "internal error: {}",
            ctx()
        );
        let relaxed = sim.world.qemu_dead;
        if !relaxed {
            assert!(sim.world.errors.is_empty(), "world errors: {}", ctx());
        }

        let finish_true = sim.has(|a| matches!(a, Action::FinishPeer { success: true, .. }));
        let finish_false = sim.has(|a| matches!(a, Action::FinishPeer { success: false, .. }));
        let prepared = sim.events().any(|e| matches!(e, Event::Prepared(_)));
        let resumed = sim.has(|a| *a == Action::ResumeSource);
        let quit = sim.has(|a| *a == Action::QuitSource);
        let qemu_lost = sim.events().any(|e| matches!(e, Event::QemuLost(_)));
        let postcopy_unknown = matches!(&outcome, Outcome::Unknown { .. })
            && sim
                .events()
                .any(|e| *e == Event::MigrationState(MigrationStatus::PostcopyActive));

        // The destination is told to quit exactly when Prepare succeeded and it was not told to
        // take over.
        if !finish_true {
            assert_eq!(
                finish_false,
                prepared,
                "FinishPeer(false) iff Prepare succeeded: {}",
                ctx()
            );
        }
        if !was_running {
            assert!(!resumed, "a paused guest must stay paused: {}", ctx());
        }

        let (source, dest) = copies_running(&sim.trace, was_running);
        let w = &sim.world;
        let held = if was_running {
            Guest::Running
        } else {
            Guest::Paused
        };
        match &outcome {
            Outcome::Succeeded => {
                assert!(
                    !source && dest,
                    "success: exactly the destination: {}",
                    ctx()
                );
                assert!(quit, "{}", ctx());
                assert_ne!(w.source, Guest::Running, "{}", ctx());
                assert_eq!(w.dest, Some(held), "{}", ctx());
            }
            Outcome::Failed { .. } | Outcome::Cancelled | Outcome::Refused { .. } if qemu_lost => {
                // The guest died with the source QEMU: it runs nowhere, and says so once.
                assert!(!dest && !quit, "{}", ctx());
                assert!(
                    matches!(&outcome, Outcome::Failed { reason, .. }
                        if reason.contains("runs nowhere") && !reason.contains("may not run")),
                    "{}",
                    ctx()
                );
                assert_eq!(w.dest, None, "{}", ctx());
            }
            Outcome::Failed { .. } | Outcome::Cancelled | Outcome::Refused { .. } => {
                assert!(source && !dest, "failure: exactly the source: {}", ctx());
                assert!(!quit, "{}", ctx());
                let rolled_back = sim.has(|a| matches!(a, Action::Prepare(_)));
                assert_eq!(
                    resumed,
                    was_running && rolled_back,
                    "ResumeSource iff it was running: {}",
                    ctx()
                );
                if !relaxed {
                    assert_eq!(w.source, held, "{}", ctx());
                    assert_eq!(w.dest, None, "{}", ctx());
                }
            }
            Outcome::Unknown { .. } => {
                assert!(
                    !resumed && !quit,
                    "unknown: the source is neither resumed nor quit: {}",
                    ctx()
                );
                assert!(
                    finish_true,
                    "unknown only after the point of no return: {}",
                    ctx()
                );
                if !relaxed {
                    assert_eq!(w.source, Guest::Paused, "{}", ctx());
                }
                assert!(
                    w.dest != Some(Guest::Running) || w.dest_told_success,
                    "{}",
                    ctx()
                );
            }
        }
        if matches!(outcome, Outcome::Refused { .. })
            || !sim.has(|a| matches!(a, Action::Prepare(_)))
        {
            let cmds = sim.commands();
            assert!(
                cmds.is_empty() || cmds == vec![Action::Inspect],
                "a refusal touches nothing: {}",
                ctx()
            );
        }

        // Everything created was removed (the source QEMU's own nodes and jobs go with it),
        // unless its removal was the injected failure or postcopy needs it for recovery.
        if !relaxed && !postcopy_unknown {
            let kept = |s: Step| w.injected.contains(&s);
            assert!(
                !w.forwards || kept(Step::CloseForwards),
                "forwards left open: {}",
                ctx()
            );
            if w.source != Guest::Gone {
                for d in &w.nodes {
                    assert!(
                        kept(Step::RemoveNbdTarget(d.clone())) || kept(Step::QuitSource),
                        "node {d} left: {}",
                        ctx()
                    );
                }
                assert!(w.jobs.is_empty(), "jobs left: {}", ctx());
            }
            assert!(terminal(&w.migration), "migration left running: {}", ctx());
        }
    }

    fn happy(scn: &Scenario) -> Sim {
        let sim = run(scn, &Plan::default());
        check(&sim, scn);
        assert_eq!(
            sim.machine.outcome(),
            Some(&Outcome::Succeeded),
            "{}",
            sim.dump()
        );
        sim
    }

    // ---- the happy paths ----

    #[test]
    fn happy_path_running_all_disks() {
        let scn = &scenarios()[0];
        let sim = happy(scn);
        let cmds: Vec<Action> = sim
            .commands()
            .into_iter()
            .map(|a| match a {
                Action::Prepare(_) => Action::Prepare(PrepareRequest {
                    id: MigrationId("m1".into()),
                    running: true,
                    disks: vec![],
                    multifd_channels: None,
                    postcopy: false,
                    files: vec![],
                }),
                other => other,
            })
            .collect();
        let s = |x: &str| x.to_string();
        assert_eq!(
            cmds,
            vec![
                Action::Inspect,
                Action::Prepare(PrepareRequest {
                    id: MigrationId("m1".into()),
                    running: true,
                    disks: vec![],
                    multifd_channels: None,
                    postcopy: false,
                    files: vec![]
                }),
                Action::OpenForwards(Routes {
                    ram: s("m1.ram"),
                    nbd: Some(s("m1.nbd"))
                }),
                Action::AddNbdTarget(s("vda")),
                Action::StartMirror(s("vda")),
                Action::AddNbdTarget(s("vdb")),
                Action::StartMirror(s("vdb")),
                Action::SetMigrationSettings(MigrationSettings {
                    pause_before_switchover: true,
                    multifd_channels: None,
                    postcopy: false,
                    max_bandwidth: UNLIMITED_BANDWIDTH,
                    downtime_ms: None
                }),
                Action::StartMigration,
                Action::CompleteMirror(s("vda")),
                Action::CompleteMirror(s("vdb")),
                Action::ContinueMigration,
                Action::FinishPeer {
                    success: true,
                    resume: true
                },
                Action::QuitSource,
                Action::CloseForwards,
            ]
        );
        let prepare = sim.actions().find_map(|a| match a {
            Action::Prepare(r) => Some(r.clone()),
            _ => None,
        });
        let prepare = prepare.expect("prepare");
        assert!(prepare.running);
        assert_eq!(prepare.disks.iter().filter(|d| d.copy).count(), 2);
        assert!(sim
            .actions()
            .any(|a| matches!(a, Action::Report(Report::Progress(_)))));
    }

    #[test]
    fn happy_path_every_scenario() {
        for scn in &scenarios() {
            let sim = happy(scn);
            let cmds = sim.commands();
            let copied: Vec<String> = cmds
                .iter()
                .filter_map(|a| match a {
                    Action::StartMirror(d) => Some(d.clone()),
                    _ => None,
                })
                .collect();
            let expected: Vec<String> = match (&scn.options.disks, scn.vm.disks.is_empty()) {
                (_, true) | (DiskSelection::SharedStorage, _) => vec![],
                (DiskSelection::Only(v), _) => v.clone(),
                (DiskSelection::All, _) => vec!["vda".into(), "vdb".into()],
            };
            assert_eq!(copied, expected, "{}", scn.name);
            let finish = cmds.iter().find(|a| matches!(a, Action::FinishPeer { .. }));
            assert_eq!(
                finish,
                Some(&Action::FinishPeer {
                    success: true,
                    resume: scn.vm.running
                }),
                "{}",
                scn.name
            );
            let settings = cmds.iter().find_map(|a| match a {
                Action::SetMigrationSettings(s) => Some(s.clone()),
                _ => None,
            });
            let settings = settings.expect("settings");
            // A paused guest's mirrors are completed before `migrate`, without the pause.
            let paused_precopy = !scn.vm.running && !scn.options.postcopy;
            assert_eq!(settings.pause_before_switchover, !paused_precopy, "{}", scn.name);
            let start = cmds.iter().position(|a| *a == Action::StartMigration).unwrap();
            let completes: Vec<usize> = cmds
                .iter()
                .enumerate()
                .filter(|(_, a)| matches!(a, Action::CompleteMirror(_)))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(completes.len(), expected.len(), "{}", scn.name);
            assert!(
                completes.iter().all(|&i| (i < start) == paused_precopy),
                "mirrors completed before migrate exactly for a paused guest: {}",
                scn.name
            );
            assert_eq!(
                cmds.contains(&Action::ContinueMigration),
                !paused_precopy,
                "{}",
                scn.name
            );
            assert_eq!(
                settings.multifd_channels, scn.options.multifd_channels(),
                "{}",
                scn.name
            );
            assert_eq!(settings.postcopy, scn.options.postcopy);
            // No limit given: QEMU's own default limit is lifted, never left in force.
            assert_eq!(settings.max_bandwidth, scn.options.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH));
            assert_eq!(settings.downtime_ms, scn.options.downtime_ms);
            let pos = |f: &dyn Fn(&Action) -> bool| cmds.iter().position(f);
            let files = pos(&|a| matches!(a, Action::SendFiles(_)));
            assert_eq!(
                files.is_some(),
                !scn.options.files.is_empty(),
                "{}",
                scn.name
            );
            if let Some(files) = files {
                assert!(
                    files < pos(&|a| matches!(a, Action::SetMigrationSettings(_))).unwrap_or(0)
                );
            }
            assert_eq!(
                cmds.contains(&Action::StartPostcopy),
                scn.options.postcopy,
                "{}",
                scn.name
            );
            let nbd = cmds.iter().find_map(|a| match a {
                Action::OpenForwards(r) => Some(r.nbd.clone()),
                _ => None,
            });
            assert_eq!(nbd.flatten().is_some(), !expected.is_empty());
        }
    }

    #[test]
    fn postcopy_hands_over_at_postcopy_active_and_quits_after_completed() {
        let scn = &scenarios()[6];
        let sim = happy(scn);
        let i_postcopy = sim
            .trace
            .iter()
            .position(|e| {
                matches!(
                    e,
                    Entry::Event(Event::MigrationState(MigrationStatus::PostcopyActive))
                )
            })
            .unwrap();
        let i_finish = sim
            .trace
            .iter()
            .position(|e| matches!(e, Entry::Action(Action::FinishPeer { .. })))
            .unwrap();
        let i_completed = sim
            .trace
            .iter()
            .position(|e| {
                matches!(
                    e,
                    Entry::Event(Event::MigrationState(MigrationStatus::Completed))
                )
            })
            .unwrap();
        let i_quit = sim
            .trace
            .iter()
            .position(|e| matches!(e, Entry::Action(Action::QuitSource)))
            .unwrap();
        assert!(
            i_postcopy < i_finish && i_finish < i_completed && i_completed < i_quit,
            "{}",
            sim.dump()
        );
    }

    // ---- refusals at Begin ----

    #[test]
    fn refusals_at_begin_touch_nothing() {
        let base = Scenario {
            name: "refusal",
            vm: vm(true),
            options: Options::default(),
        };
        let cases: Vec<(Scenario, &str)> = vec![
            (
                Scenario {
                    vm: VmInfo {
                        has_active_block_jobs: true,
                        ..vm(true)
                    },
                    ..base.clone()
                },
                "block jobs",
            ),
            (
                Scenario {
                    vm: VmInfo {
                        blockers: vec!["device xyz is not migratable".into()],
                        ..vm(true)
                    },
                    ..base.clone()
                },
                "blockers",
            ),
            (
                Scenario {
                    vm: VmInfo {
                        vfio_devices: vec!["hostdev0".into()],
                        ..vm(false)
                    },
                    ..base.clone()
                },
                "VFIO",
            ),
            (
                Scenario {
                    options: Options {
                        disks: DiskSelection::Only(vec!["vda".into(), "sdz".into()]),
                        ..Default::default()
                    },
                    ..base.clone()
                },
                "\"sdz\"",
            ),
            (
                Scenario {
                    options: Options {
                        disks: DiskSelection::Only(vec![]),
                        ..Default::default()
                    },
                    ..base.clone()
                },
                "--disks",
            ),
            (
                Scenario {
                    options: Options {
                        parallel: Some(0),
                        ..Default::default()
                    },
                    ..base.clone()
                },
                "--parallel",
            ),
            (
                Scenario {
                    options: Options {
                        parallel: Some(2),
                        postcopy: true,
                        ..Default::default()
                    },
                    ..base.clone()
                },
                "multifd",
            ),
        ];
        for (scn, needle) in cases {
            let sim = run(&scn, &Plan::default());
            check(&sim, &scn);
            match sim.machine.outcome() {
                Some(Outcome::Refused { reason }) => {
                    assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
                }
                other => panic!(
                    "{needle}: expected a refusal, got {other:?}\n{}",
                    sim.dump()
                ),
            }
            let cmds = sim.commands();
            assert!(
                cmds.is_empty() || cmds == vec![Action::Inspect],
                "{needle}: {cmds:?}"
            );
            assert!(sim
                .actions()
                .any(|a| matches!(a, Action::Report(Report::Warning(w)) if w.contains(needle))));
        }
    }

    #[test]
    fn vfio_with_force_and_disks_by_node_name_are_accepted() {
        let scn = Scenario {
            name: "force",
            vm: VmInfo {
                vfio_devices: vec!["hostdev0".into()],
                ..vm(true)
            },
            options: Options {
                force: true,
                disks: DiskSelection::Only(vec!["node-vdb".into(), "vdb".into()]),
                ..Default::default()
            },
        };
        let sim = happy(&scn);
        let mirrors: Vec<Action> = sim
            .commands()
            .into_iter()
            .filter(|a| matches!(a, Action::StartMirror(_)))
            .collect();
        assert_eq!(mirrors, vec![Action::StartMirror("vdb".into())]);
    }

    // ---- failures at every step ----

    /// Runs `f` for every scenario and collects how many runs were checked.
    fn for_each_scenario(f: impl FnMut(&Scenario) -> usize) -> usize {
        scenarios().iter().map(f).sum()
    }

    #[test]
    fn every_command_failing_rolls_back_or_settles() {
        let runs = for_each_scenario(|scn| {
            let n = happy(scn).commands().len();
            for k in 1..=n {
                let sim = run(
                    scn,
                    &Plan {
                        fail_command: Some(k),
                        ..Default::default()
                    },
                );
                check(&sim, scn);
                let failed = sim
                    .world
                    .injected
                    .iter()
                    .next()
                    .cloned()
                    .expect("a failed command");
                let outcome = sim.machine.outcome().unwrap();
                match failed {
                    Step::Inspect => assert!(matches!(
                        outcome,
                        Outcome::Failed {
                            phase: Phase::Begin,
                            ..
                        }
                    )),
                    Step::FinishPeer => {
                        assert!(matches!(outcome, Outcome::Unknown { .. }), "{}", sim.dump())
                    }
                    Step::QuitSource | Step::CloseForwards | Step::StartPostcopy => {
                        assert_eq!(outcome, &Outcome::Succeeded, "{}", sim.dump())
                    }
                    other => assert!(
                        matches!(outcome, Outcome::Failed { reason, .. } if reason.contains(&other.to_string())),
                        "{other}: {}",
                        sim.dump()
                    ),
                }
            }
            n
        });
        eprintln!("{runs} simulated runs");
        assert!(runs > 80, "{runs}");
    }

    #[test]
    fn every_fault_at_every_event_keeps_the_invariant() {
        let mut runs = 0;
        for scn in &scenarios() {
            let m = happy(scn).natural;
            for k in 0..=m + 1 {
                for fault in FAULTS {
                    let sim = run(
                        scn,
                        &Plan {
                            inject: vec![(k, fault)],
                            ..Default::default()
                        },
                    );
                    check(&sim, scn);
                    runs += 1;
                    let (_, phase) = sim.injected_at[0];
                    let outcome = sim.machine.outcome().unwrap();
                    let before_ponr =
                        !matches!(phase, Phase::Finish | Phase::Confirm | Phase::Done);
                    if fault == Fault::Cancel && phase != Phase::Done {
                        if before_ponr {
                            assert_eq!(outcome, &Outcome::Cancelled, "{}", sim.dump());
                        } else {
                            assert_eq!(outcome, &Outcome::Succeeded, "{}", sim.dump());
                            assert!(sim.actions().any(|a| matches!(a, Action::Report(Report::Warning(w)) if w.contains("cancel refused"))));
                        }
                    }
                    if matches!(fault, Fault::PeerLost | Fault::TimedOut)
                        && before_ponr
                        && phase != Phase::Begin
                    {
                        assert!(
                            matches!(outcome, Outcome::Failed { .. }),
                            "{fault:?}: {}",
                            sim.dump()
                        );
                    }
                }
            }
        }
        eprintln!("{runs} simulated runs");
        assert!(runs > 500, "{runs}");
    }

    #[test]
    fn a_second_fault_or_time_out_during_rollback_still_cleans_up() {
        let mut runs = 0;
        for scn in &scenarios() {
            let m = happy(scn).natural;
            for k in 0..=m {
                for fault in [Fault::Cancel, Fault::MirrorFailed, Fault::MigrationFailed] {
                    for j in 0..4 {
                        for second in [Fault::TimedOut, Fault::PeerLost, Fault::Cancel] {
                            let plan = Plan {
                                inject: vec![(k, fault), (k + j, second)],
                                ..Default::default()
                            };
                            let sim = run(scn, &plan);
                            check(&sim, scn);
                            runs += 1;
                        }
                    }
                }
            }
        }
        eprintln!("{runs} simulated runs");
        assert!(runs > 1000, "{runs}");
    }

    #[test]
    fn qemu_dying_at_any_command_ends_the_rollback_and_reports() {
        for_each_scenario(|scn| {
            let n = happy(scn).commands().len();
            for k in 2..=n {
                let sim = run(
                    scn,
                    &Plan {
                        qemu_dies_at: Some(k),
                        ..Default::default()
                    },
                );
                check(&sim, scn);
                let outcome = sim.machine.outcome().unwrap();
                if sim.world.dest_told_success {
                    assert!(!sim.has(|a| *a == Action::ResumeSource), "{}", sim.dump());
                } else {
                    // The guest died with its QEMU; the destination never ran it and was told to quit.
                    assert!(matches!(outcome, Outcome::Failed { .. }), "{}", sim.dump());
                    assert_eq!(sim.world.dest, None);
                }
            }
            n
        });
    }

    // ---- after the point of no return ----

    #[test]
    fn peer_lost_after_finish_success_is_unknown_and_keeps_the_source_paused() {
        for scn in &scenarios() {
            let sim = run(
                scn,
                &Plan {
                    finish_reply_lost: true,
                    ..Default::default()
                },
            );
            check(&sim, scn);
            assert!(
                matches!(sim.machine.outcome(), Some(Outcome::Unknown { .. })),
                "{}",
                sim.dump()
            );
            // The message arrived: the destination has the guest, the source is paused: one copy.
            assert_eq!(sim.world.source, Guest::Paused);
            assert_eq!(
                sim.world.dest,
                Some(if scn.vm.running {
                    Guest::Running
                } else {
                    Guest::Paused
                })
            );
            assert!(!sim.has(|a| matches!(a, Action::ResumeSource | Action::QuitSource)));
            let postcopy = scn.options.postcopy;
            assert_eq!(
                sim.has(|a| *a == Action::CloseForwards),
                !postcopy && sim.has(|a| matches!(a, Action::OpenForwards(_)))
            );

            // Learning the answer later settles it (precopy only).
            let mut machine = sim.machine;
            let actions = machine.handle(Event::Finished(Ok(())));
            assert_eq!(machine.outcome(), Some(&Outcome::Succeeded));
            let mut expected = vec![&Action::QuitSource];
            if postcopy {
                expected.push(&Action::CloseForwards); // kept open for a recovery until now
            }
            assert_eq!(
                actions
                    .iter()
                    .filter(|a| a.step().is_some())
                    .collect::<Vec<_>>(),
                expected
            );
            assert!(machine
                .handle(Event::Finished(Ok(())))
                .iter()
                .all(|a| a.step().is_none()));
        }
    }

    #[test]
    fn finish_lost_before_delivery_is_unknown_and_the_destination_quits_by_its_rule() {
        let scn = &scenarios()[0];
        let n = happy(scn)
            .commands()
            .iter()
            .position(|a| matches!(a, Action::FinishPeer { .. }))
            .unwrap()
            + 1;
        let sim = run(
            scn,
            &Plan {
                fail_command: Some(n),
                ..Default::default()
            },
        );
        check(&sim, scn);
        assert!(matches!(
            sim.machine.outcome(),
            Some(Outcome::Unknown { .. })
        ));
        assert_eq!((sim.world.source, sim.world.dest), (Guest::Paused, None));
        // The operator (or the driver) learns the destination quit: resume the source.
        let mut machine = sim.machine;
        let actions = machine.handle(Event::Finished(Err("no such migration".into())));
        assert!(actions.contains(&Action::ResumeSource));
        assert!(matches!(
            machine.outcome(),
            Some(Outcome::Failed {
                phase: Phase::Finish,
                ..
            })
        ));
    }

    #[test]
    fn destination_failing_to_resume_rolls_back_to_the_source() {
        for scn in &scenarios() {
            let sim = run(
                scn,
                &Plan {
                    dest_cont_fails: true,
                    ..Default::default()
                },
            );
            check(&sim, scn);
            let outcome = sim.machine.outcome().unwrap();
            if scn.options.postcopy {
                assert!(
                    matches!(outcome, Outcome::Unknown { reason } if reason.contains("postcopy failed")),
                    "{}",
                    sim.dump()
                );
            } else {
                assert!(
                    matches!(
                        outcome,
                        Outcome::Failed {
                            phase: Phase::Finish,
                            ..
                        }
                    ),
                    "{}",
                    sim.dump()
                );
                assert!(!sim.has(|a| matches!(a, Action::FinishPeer { success: false, .. })));
                assert_eq!(sim.has(|a| *a == Action::ResumeSource), scn.vm.running);
            }
        }
    }

    #[test]
    fn postcopy_failure_after_postcopy_active_is_unknown() {
        let scn = &scenarios()[6];
        let sim = happy(scn);
        let k = sim
            .events()
            .position(|e| *e == Event::MigrationState(MigrationStatus::PostcopyActive))
            .unwrap()
            + 1;
        let sim = run(
            scn,
            &Plan {
                inject: vec![(k, Fault::MigrationFailed)],
                ..Default::default()
            },
        );
        check(&sim, scn);
        match sim.machine.outcome() {
            Some(Outcome::Unknown { reason }) => {
                assert!(reason.contains("lost on both sides"), "{reason}")
            }
            other => panic!("{other:?}\n{}", sim.dump()),
        }
        // Nothing a recovery would need is torn down.
        assert!(!sim.has(|a| matches!(
            a,
            Action::CloseForwards | Action::RemoveNbdTarget(_) | Action::CancelMigration
        )));
    }

    #[test]
    fn cancel_after_the_point_of_no_return_is_refused() {
        let scn = &scenarios()[0];
        let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
        let script = happy(scn);
        // Replay the happy path up to FinishPeer(success), then cancel twice.
        for e in script.events().cloned() {
            let acts = m.handle(e);
            if acts.iter().any(|a| matches!(a, Action::FinishPeer { .. })) {
                break;
            }
        }
        assert_eq!(m.phase(), Phase::Finish);
        for _ in 0..2 {
            let acts = m.handle(Event::CancelRequested);
            assert!(acts.iter().all(|a| a.step().is_none()), "{acts:?}");
            assert!(
                matches!(&acts[..], [Action::Report(Report::Warning(w))] if w.contains("cancel refused"))
            );
        }
        assert_eq!(
            m.handle(Event::Finished(Ok(())))
                .iter()
                .filter(|a| a.step().is_some())
                .count(),
            2
        );
        assert_eq!(m.phase(), Phase::Confirm);
    }

    // ---- duplicates, reordering, junk ----

    #[test]
    fn duplicate_and_out_of_order_events_are_tolerated() {
        let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
        let mut cmds = Vec::new();
        let mut feed = |m: &mut Machine, e: Event| {
            let acts = m.handle(e);
            cmds.extend(acts.iter().filter(|a| a.step().is_some()).cloned());
            acts
        };
        feed(&mut m, Event::Inspected(vm(true)));
        feed(&mut m, Event::Inspected(vm(true))); // duplicate result: ignored
        feed(
            &mut m,
            Event::Prepared(Routes {
                ram: "r".into(),
                nbd: Some("n".into()),
            }),
        );
        feed(&mut m, Event::Done(Step::OpenForwards));
        feed(&mut m, Event::Done(Step::AddNbdTarget("vda".into())));
        // Ready before the command's own result, then twice more.
        feed(&mut m, Event::MirrorReady("vda".into()));
        feed(&mut m, Event::Done(Step::StartMirror("vda".into())));
        feed(&mut m, Event::MirrorReady("vda".into()));
        feed(&mut m, Event::Done(Step::StartMirror("vda".into())));
        feed(&mut m, Event::MirrorReady("vdz".into())); // not ours
        feed(&mut m, Event::MigrationState(MigrationStatus::Completed)); // no migration yet: ignored
        feed(&mut m, Event::Done(Step::AddNbdTarget("vdb".into())));
        feed(&mut m, Event::Done(Step::StartMirror("vdb".into())));
        assert_eq!(m.phase(), Phase::Perform(PerformStep::SyncingDisks));
        feed(&mut m, Event::MirrorReady("vdb".into()));
        feed(&mut m, Event::Done(Step::SetMigrationSettings));
        // QEMU's MIGRATION event arrives before the `migrate` command returns.
        feed(&mut m, Event::MigrationState(MigrationStatus::Setup));
        feed(
            &mut m,
            Event::MigrationState(MigrationStatus::PreSwitchover),
        );
        feed(&mut m, Event::Done(Step::StartMigration));
        feed(&mut m, Event::MigrationState(MigrationStatus::Active)); // late: ignored
        feed(
            &mut m,
            Event::MigrationState(MigrationStatus::PreSwitchover),
        ); // duplicate
        feed(&mut m, Event::MirrorCompleted("vdb".into()));
        feed(&mut m, Event::MirrorCompleted("vdb".into()));
        feed(&mut m, Event::Done(Step::CompleteMirror("vdb".into())));
        feed(&mut m, Event::MirrorReady("vda".into())); // late
        feed(&mut m, Event::MirrorCompleted("vda".into()));
        feed(&mut m, Event::MigrationState(MigrationStatus::Completed)); // before continue's result
        feed(&mut m, Event::Done(Step::ContinueMigration));
        feed(&mut m, Event::Done(Step::CompleteMirror("vda".into())));
        feed(&mut m, Event::MigrationState(MigrationStatus::Completed));
        feed(&mut m, Event::Finished(Ok(())));
        feed(&mut m, Event::Finished(Ok(())));
        feed(&mut m, Event::Done(Step::QuitSource));
        feed(&mut m, Event::Done(Step::CloseForwards));
        assert_eq!(m.outcome(), Some(&Outcome::Succeeded));
        for late in [
            Event::Progress(Progress::default()),
            Event::CancelRequested,
            Event::MirrorReady("vda".into()),
            Event::TimedOut,
        ] {
            feed(&mut m, late);
        }
        assert_eq!(m.outcome(), Some(&Outcome::Succeeded));
        let steps: Vec<Step> = cmds.iter().filter_map(Action::step).collect();
        let unique: BTreeSet<&Step> = steps.iter().collect();
        assert_eq!(unique.len(), steps.len(), "{cmds:?}");
        assert!(cmds.contains(&Action::ContinueMigration));
    }

    #[test]
    fn events_after_the_rollback_started_are_ignored() {
        let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
        m.handle(Event::Inspected(vm(true)));
        m.handle(Event::Prepared(Routes {
            ram: "r".into(),
            nbd: Some("n".into()),
        }));
        m.handle(Event::Done(Step::OpenForwards));
        m.handle(Event::Done(Step::AddNbdTarget("vda".into())));
        // Cancel while the mirror start is in flight: its result is awaited, then it is cancelled.
        let acts = m.handle(Event::CancelRequested);
        assert!(acts.iter().all(|a| a.step().is_none()), "{acts:?}");
        assert!(m
            .handle(Event::CancelRequested)
            .iter()
            .all(|a| a.step().is_none()));
        let acts = m.handle(Event::Done(Step::StartMirror("vda".into())));
        assert_eq!(
            acts.iter()
                .filter(|a| a.step().is_some())
                .collect::<Vec<_>>(),
            vec![&Action::CancelMirror("vda".into())]
        );
        assert!(m
            .handle(Event::MirrorReady("vda".into()))
            .iter()
            .all(|a| a.step().is_none()));
        assert!(m
            .handle(Event::Progress(Progress::default()))
            .iter()
            .all(|a| a.step().is_none()));
        // The job's end event, then the command's result (the rollback waits for both).
        assert!(m
            .handle(Event::MirrorCancelled("vda".into()))
            .iter()
            .all(|a| a.step().is_none()));
        let acts = m.handle(Event::Done(Step::CancelMirror("vda".into())));
        let cmds: Vec<&Action> = acts.iter().filter(|a| a.step().is_some()).collect();
        assert_eq!(
            cmds,
            vec![
                &Action::RemoveNbdTarget("vda".into()),
                &Action::CloseForwards,
                // The guest before the peer: a stalled peer must not keep it paused.
                &Action::ResumeSource,
                &Action::FinishPeer {
                    success: false,
                    resume: false
                },
            ]
        );
        // A duplicate result and a late event change nothing.
        assert!(m
            .handle(Event::Done(Step::CancelMirror("vda".into())))
            .iter()
            .all(|a| a.step().is_none()));
        assert!(m
            .handle(Event::MirrorCancelled("vda".into()))
            .iter()
            .all(|a| a.step().is_none()));
        m.handle(Event::Failed(
            Step::RemoveNbdTarget("vda".into()),
            "QEMU is gone".into(),
        ));
        m.handle(Event::Done(Step::CloseForwards));
        m.handle(Event::Finished(Ok(())));
        assert_eq!(m.phase(), Phase::Confirm);
        m.handle(Event::Done(Step::ResumeSource));
        assert_eq!(m.outcome(), Some(&Outcome::Cancelled));
    }

    #[test]
    fn shuffled_duplicated_and_junk_events_keep_the_invariant() {
        let mut runs = 0;
        for scn in &scenarios() {
            for seed in 1..=120u64 {
                let mut rng = Rng(seed * 7919);
                let mut plan = Plan {
                    chaos: Some(seed),
                    junk: seed % 3 == 0,
                    ..Default::default()
                };
                if seed % 2 == 0 {
                    plan.inject = vec![(rng.below(40), FAULTS[rng.below(FAULTS.len())])];
                }
                if seed % 5 == 0 {
                    plan.fail_command = Some(1 + rng.below(16));
                }
                let sim = run(scn, &plan);
                if plan.junk {
                    // Junk may fake any answer (e.g. a `Finished(Ok)` nobody sent): only the
                    // machine's own guarantees are checked.
                    assert_eq!(sim.machine.phase(), Phase::Done, "{}", sim.dump());
                    let steps: Vec<Step> = sim.actions().filter_map(Action::step).collect();
                    assert_eq!(
                        steps.len(),
                        steps.iter().collect::<BTreeSet<_>>().len(),
                        "{}",
                        sim.dump()
                    );
                    let (source, dest) = copies_running(&sim.trace, scn.vm.running);
                    assert!(!(source && dest), "{}", sim.dump());
                } else {
                    check(&sim, scn);
                }
                runs += 1;
            }
        }
        eprintln!("{runs} simulated runs");
        assert!(runs >= 1000);
    }

    // ---- issue 10: the source QEMU dies, a paused guest, a stalled peer ----

    /// Drives a one-disk migration of a guest (running or paused) until the mirror syncs
    /// (`ram: false`) or the RAM migration runs (`ram: true`); the commands issued so far.
    fn drive_to(m: &mut Machine, running: bool, ram: bool) -> Vec<Action> {
        let mut cmds = Vec::new();
        let mut feed = |m: &mut Machine, e: Event| {
            cmds.extend(m.handle(e).into_iter().filter(|a| a.step().is_some()));
        };
        let vm = VmInfo { running, disks: vec![disk("vda", 1 << 30)], ..Default::default() };
        feed(m, Event::Inspected(vm));
        feed(m, Event::Prepared(Routes { ram: "r".into(), nbd: Some("n".into()) }));
        feed(m, Event::Done(Step::OpenForwards));
        feed(m, Event::Done(Step::AddNbdTarget("vda".into())));
        feed(m, Event::Done(Step::StartMirror("vda".into())));
        feed(m, Event::Done(Step::SetMigrationSettings));
        assert_eq!(m.phase(), Phase::Perform(PerformStep::SyncingDisks));
        if ram {
            feed(m, Event::MirrorReady("vda".into()));
            if !running {
                feed(m, Event::MirrorCompleted("vda".into()));
                feed(m, Event::Done(Step::CompleteMirror("vda".into())));
            }
            feed(m, Event::Done(Step::StartMigration));
            feed(m, Event::MigrationState(MigrationStatus::Active));
            assert_eq!(m.phase(), Phase::Perform(PerformStep::Migrating));
        }
        cmds
    }

    fn commands_of(actions: &[Action]) -> Vec<Action> {
        actions.iter().filter(|a| a.step().is_some()).cloned().collect()
    }

    #[test]
    fn a_dead_source_qemu_ends_the_migration_at_once_with_one_message() {
        for ram in [false, true] {
            let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
            drive_to(&mut m, true, ram);
            let acts = m.handle(Event::QemuLost("QMP connection closed".into()));
            // Nothing is asked of the dead QEMU; the destination is told, the forwards closed.
            assert_eq!(
                commands_of(&acts),
                vec![Action::CloseForwards, Action::FinishPeer { success: false, resume: false }],
                "ram {ram}: {acts:?}"
            );
            // Repeated news of it change nothing (the old driver fed a status per loop pass).
            for _ in 0..3 {
                assert!(commands_of(&m.handle(Event::QemuLost("again".into()))).is_empty());
                assert!(commands_of(&m.handle(Event::MigrationState(MigrationStatus::Failed))).is_empty());
            }
            m.handle(Event::Done(Step::CloseForwards));
            let acts = m.handle(Event::Finished(Ok(())));
            assert!(commands_of(&acts).is_empty());
            match m.outcome() {
                Some(Outcome::Failed { reason, .. }) => {
                    assert!(reason.contains("source QEMU") && reason.contains("runs nowhere"), "{reason}");
                    assert!(reason.contains("nothing is left on the destination"), "{reason}");
                    assert!(!reason.contains("may not run"), "{reason}");
                }
                other => panic!("ram {ram}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_command_failing_because_qemu_died_is_not_followed_by_a_resume() {
        let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
        drive_to(&mut m, true, true);
        // The migration fails (QEMU died): the rollback starts with QEMU commands...
        let acts = m.handle(Event::MigrationState(MigrationStatus::Failed));
        assert!(commands_of(&acts).contains(&Action::CancelMirror("vda".into())));
        // ...which fail; then the driver learns the QMP connection is closed.
        m.handle(Event::QemuLost("QMP connection closed".into()));
        let acts = m.handle(Event::Failed(Step::CancelMirror("vda".into()), "QMP connection lost".into()));
        let cmds = commands_of(&acts);
        assert!(!cmds.contains(&Action::ResumeSource), "{cmds:?}");
        assert!(!cmds.iter().any(|a| matches!(a, Action::RemoveNbdTarget(_))), "{cmds:?}");
        m.handle(Event::Done(Step::CloseForwards));
        m.handle(Event::Finished(Ok(())));
        match m.outcome() {
            Some(Outcome::Failed { reason, .. }) => {
                assert!(reason.contains("runs nowhere") && !reason.contains("may not run"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_paused_guest_completes_its_mirrors_before_migrate_and_never_pauses_at_switchover() {
        let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
        let cmds = drive_to(&mut m, false, false);
        assert!(cmds
            .iter()
            .any(|a| matches!(a, Action::SetMigrationSettings(s) if !s.pause_before_switchover)));
        let acts = m.handle(Event::MirrorReady("vda".into()));
        assert_eq!(commands_of(&acts), vec![Action::CompleteMirror("vda".into())]);
        m.handle(Event::Done(Step::CompleteMirror("vda".into())));
        let acts = m.handle(Event::MirrorCompleted("vda".into()));
        assert_eq!(commands_of(&acts), vec![Action::StartMigration]);
        m.handle(Event::Done(Step::StartMigration));
        // Cancelled during RAM: the guest stays paused, nothing resumes it.
        let acts = m.handle(Event::CancelRequested);
        assert_eq!(commands_of(&acts), vec![Action::CancelMigration]);
        let acts = m.handle(Event::Done(Step::CancelMigration));
        let cmds = commands_of(&acts);
        assert!(!cmds.contains(&Action::ResumeSource), "{cmds:?}");
        assert!(cmds.contains(&Action::RemoveNbdTarget("vda".into())), "{cmds:?}");

        // Completed without a pre-switchover is the handover for a paused guest.
        let (mut m, _) = Machine::new(MigrationId("m2".into()), Options::default());
        drive_to(&mut m, false, true);
        m.handle(Event::MigrationState(MigrationStatus::Device));
        let acts = m.handle(Event::MigrationState(MigrationStatus::Completed));
        assert_eq!(commands_of(&acts), vec![Action::FinishPeer { success: true, resume: false }]);
    }

    #[test]
    fn a_paused_guest_resumed_by_someone_during_its_migration_rolls_back() {
        let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
        drive_to(&mut m, false, true);
        let acts = m.handle(Event::SourceResumed);
        assert!(commands_of(&acts).contains(&Action::CancelMigration), "{acts:?}");
        assert!(matches!(m.phase(), Phase::Confirm));
        // A running guest's own RESUME (QEMU restarting it after a cancel) is no news.
        let (mut m, _) = Machine::new(MigrationId("m2".into()), Options::default());
        drive_to(&mut m, true, true);
        assert!(commands_of(&m.handle(Event::SourceResumed)).is_empty());
        assert_eq!(m.phase(), Phase::Perform(PerformStep::Migrating));
    }

    #[test]
    fn a_lost_peer_at_pre_switchover_resumes_the_guest_before_telling_the_peer() {
        let (mut m, _) = Machine::new(MigrationId("m1".into()), Options::default());
        drive_to(&mut m, true, true);
        let acts = m.handle(Event::MigrationState(MigrationStatus::PreSwitchover));
        assert_eq!(commands_of(&acts), vec![Action::CompleteMirror("vda".into())]);
        m.handle(Event::Done(Step::CompleteMirror("vda".into())));
        let acts = m.handle(Event::PeerLost("no answer to keepalive pings".into()));
        assert_eq!(commands_of(&acts), vec![Action::CancelMigration, Action::CancelMirror("vda".into())]);
        m.handle(Event::Done(Step::CancelMigration));
        let acts = m.handle(Event::Done(Step::CancelMirror("vda".into())));
        let cmds = commands_of(&acts);
        let resume = cmds.iter().position(|a| *a == Action::ResumeSource).expect("resumed");
        let finish = cmds.iter().position(|a| matches!(a, Action::FinishPeer { success: false, .. })).expect("told");
        assert!(resume < finish, "{cmds:?}");
        // The peer never answers: the driver's bound fails the call; the rollback still ends.
        m.handle(Event::Done(Step::RemoveNbdTarget("vda".into())));
        m.handle(Event::Done(Step::CloseForwards));
        m.handle(Event::Done(Step::ResumeSource));
        m.handle(Event::Failed(Step::FinishPeer, "no answer within 5 s".into()));
        assert!(matches!(m.outcome(), Some(Outcome::Failed { .. })), "{:?}", m.outcome());
    }

    #[test]
    fn serde_round_trip_of_statuses_and_outcomes() {
        for s in [
            "setup",
            "pre-switchover",
            "postcopy-active",
            "completed",
            "wait-unplug",
        ] {
            let st = MigrationStatus::parse(s);
            assert_eq!(serde_json::to_value(&st).unwrap(), serde_json::json!(s));
            assert_eq!(
                serde_json::from_value::<MigrationStatus>(serde_json::json!(s)).unwrap(),
                st
            );
        }
        let o = Outcome::Failed {
            phase: Phase::Perform(PerformStep::Migrating),
            reason: "x".into(),
        };
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(serde_json::from_value::<Outcome>(v).unwrap(), o);
        assert_eq!(
            Phase::Perform(PerformStep::SyncingDisks).to_string(),
            "perform (syncing-disks)"
        );
    }

    #[test]
    fn multifd_is_the_default_with_more_than_one_cpu_and_a_qemu_whose_cleanup_holds() {
        assert_eq!(default_parallel(1, false, Some(9)), None, "one CPU: one stream");
        for cpus in [2, 8, 64] {
            assert_eq!(default_parallel(cpus, false, Some(8)), Some(MULTIFD_DEFAULT_CHANNELS), "{cpus} CPUs");
        }
        assert_eq!(default_parallel(8, false, Some(7)), None, "QEMU 7.2: one stream (its multifd cleanup can hang)");
        assert_eq!(default_parallel(8, false, None), None, "an unknown QEMU: one stream");
        assert_eq!(default_parallel(64, true, Some(9)), None, "no multifd with postcopy");
    }

    #[test]
    fn parallel_one_is_one_stream_and_combines_with_postcopy() {
        let one = Options { parallel: Some(1), postcopy: true, ..Default::default() };
        assert_eq!(one.multifd_channels(), None);
        assert!(option_problems(&one).is_empty(), "{:?}", option_problems(&one));
        let four = Options { parallel: Some(4), ..Default::default() };
        assert_eq!(four.multifd_channels(), Some(4));
    }
}
