//! The machine's vocabulary: what is asked for, what Begin finds, the actions it emits, the
//! events it is fed and how a migration ends; the multifd defaults.

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
