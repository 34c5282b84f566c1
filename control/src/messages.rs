//! What the source and destination agents tell each other about one migration: the cookie
//! (after libvirt's migration cookie) and the Prepare/Finish messages of the control RPC.
//! The cookie is also what the destination's prepare hook reads on its standard input.

use serde::{Deserialize, Serialize};

/// A disk the migration copies (or, with shared storage, leaves alone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The guest device (`query-block`'s `device`, or the qdev id when the device is anonymous).
    pub device: String,
    /// The source's block node the guest device uses; the destination must create its disk with
    /// the same node name, since that is what the migration stream refers to. Empty when QEMU
    /// named the node itself (`-drive` without `node-name=`, `#block123`): such names are not
    /// stable across hosts, and the destination finds the node by `device` instead.
    pub node_name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Image format on the source (`raw`, `qcow2`, ...).
    pub format: String,
    /// The image file on the source (informational: the hook decides the destination's path).
    pub source_file: String,
    /// Whether this disk's contents are copied (false: shared storage, or not in `--disks`).
    pub copy: bool,
}

impl DiskSpec {
    /// How the disk is named in messages and files: its node name, else its device.
    pub fn name(&self) -> &str {
        if self.node_name.is_empty() {
            &self.device
        } else {
            &self.node_name
        }
    }
}

/// Migration settings both sides must agree on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationParams {
    /// multifd channels (`--parallel N`), if any.
    pub multifd_channels: Option<u8>,
    pub postcopy: bool,
}

/// Everything the destination needs to prepare: sent with `prepare`, given to the hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cookie {
    /// Unique id of this migration (also names its routes and its private directory).
    pub migration: String,
    /// The VM's name (`-name`), or the QMP socket's file stem.
    pub vm: String,
    /// The source host's name.
    pub source: String,
    /// The source QEMU's command line, for the hook to start the destination from.
    pub cmdline: Vec<String>,
    pub disks: Vec<DiskSpec>,
    pub params: MigrationParams,
    /// Where the destination's disk images and side-channel files go (filled in by the
    /// destination agent before the hook runs).
    #[serde(default)]
    pub image_dir: String,
    /// Whether the guest was running on the source (the destination resumes it only then).
    pub running: bool,
}

/// The destination's answer to `prepare`: the routes it exposes for this migration, to the
/// source only, scoped to the migration id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareReply {
    /// Route carrying the RAM migration stream (and multifd channels).
    pub ram_route: String,
    /// Route to the destination's NBD server, if any disk is copied.
    pub nbd_route: Option<String>,
    /// The destination QEMU's version, for the source's log.
    pub qemu_version: String,
}

/// `finish`: the source's verdict. Always sent, also after a failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishRequest {
    pub migration: String,
    /// The migration completed on the source: stop the NBD server and (if `resume`) run the guest.
    pub success: bool,
    /// Resume the guest (it was running on the source).
    pub resume: bool,
}

/// The destination's answer to `finish`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishReply {
    /// The destination QEMU runs the guest (or holds it paused as asked) after a successful
    /// finish; `false` means it has been quit and the source must resume.
    pub guest_kept: bool,
    pub detail: String,
}

/// A migration id: `m-` and 16 hex digits of randomness; safe in route names and paths.
pub fn new_migration_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process; mix in time and a counter for uniqueness.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    format!("m-{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ids_are_unique_and_route_safe() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_migration_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(10) {
            assert!(migtun_proxy::route::wire::validate_name(&format!("{id}.ram")).is_ok());
        }
    }
}

/// What `migtun migrate` asks the local agent to do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateArgs {
    /// The source VM's QMP socket.
    pub qmp: std::path::PathBuf,
    /// The destination peer's name.
    pub to: String,
    /// Copy only these disks (device, qdev id or node name); `None`: every writable disk.
    pub disks: Option<Vec<String>>,
    /// Copy no disk: the destination sees the same storage.
    pub shared_storage: bool,
    /// multifd channels.
    pub parallel: Option<u8>,
    pub postcopy: bool,
    /// Bytes per second.
    pub max_bandwidth: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// Migrate even with host (VFIO) devices attached.
    pub force: bool,
    /// Files carried to the destination's image directory with the migration.
    pub files: Vec<std::path::PathBuf>,
}

/// How a migration ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// The guest runs (or waits, if it was paused) on the destination; the source has quit.
    Succeeded,
    /// Refused before anything was touched.
    Refused,
    /// Failed and rolled back: the guest runs on the source as before.
    Failed,
    /// Cancelled and rolled back: the guest runs on the source as before.
    Cancelled,
    /// The outcome could not be established (the destination vanished after being told to
    /// take over): the source guest is kept paused; an operator must look.
    Unknown,
}

/// Version of the event format: `v` on every event line (the admin API's stream, `migtun
/// migrate --json`) and on `migtun status`'s answer. Raised when a field changes meaning or
/// goes away; new fields may appear within a version.
pub const EVENTS_VERSION: u32 = 1;

/// What happened in one migration (`--json` prints these, wrapped in an [`Event`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Report {
    /// The first event; the migration's id is the event's.
    Accepted { vm: String, to: String },
    Phase {
        /// A kebab-case id: `begin`, `prepare`, `perform`, `finish`, `confirm`, `unknown` (the
        /// outcome awaits the destination's answer), `recovering` (after an agent restart).
        phase: String,
        /// Within `perform`: `opening-forwards`, `starting-mirrors`, `syncing-disks`,
        /// `starting-migration`, `migrating`, `completing-mirrors`, `switchover`.
        #[serde(default)]
        step: Option<String>,
        /// What the phase does, for people.
        message: String,
    },
    Progress {
        /// `mirror` (disks) or `ram`.
        stage: String,
        done_bytes: u64,
        total_bytes: u64,
        /// Measured over the last seconds (bytes done over time), not QEMU's own figure; `null`
        /// until two polls span enough time.
        bytes_per_s: Option<f64>,
        /// Seconds to go at the current rate, if known.
        eta_s: Option<f64>,
        /// Bytes per second the guest dirties (RAM stage: QEMU's dirty pages times the page size).
        dirty_bytes_per_s: Option<f64>,
        /// Milliseconds QEMU expects the switchover to take (RAM stage).
        expected_downtime_ms: Option<i64>,
    },
    Log { message: String },
    Done {
        outcome: OutcomeKind,
        /// What happened, for people.
        message: String,
        /// `null` on success, else why (the message).
        error: Option<String>,
        /// From `accepted` to `done` (filled in by the agent's tracker).
        duration_s: f64,
        /// The guest's downtime at switchover, QEMU's figure (succeeded migrations).
        downtime_ms: Option<u64>,
        /// Bytes the disk mirrors copied.
        disk_bytes: u64,
        /// Bytes of the RAM migration stream.
        ram_bytes: u64,
    },
}

/// The figures of a migration's end, for [`Report::done`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub downtime_ms: Option<u64>,
    pub disk_bytes: u64,
    pub ram_bytes: u64,
}

impl Report {
    /// The last report of a migration; `error` is the message unless it succeeded, the duration
    /// is the tracker's.
    pub fn done(outcome: OutcomeKind, message: String, totals: Totals) -> Report {
        Report::Done {
            error: (outcome != OutcomeKind::Succeeded).then(|| message.clone()),
            outcome,
            message,
            duration_s: 0.0,
            downtime_ms: totals.downtime_ms,
            disk_bytes: totals.disk_bytes,
            ram_bytes: totals.ram_bytes,
        }
    }
}

/// One line of a migration's event stream: a [`Report`] with the version, the time it happened
/// and the migration's id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub v: u32,
    /// RFC 3339, UTC, milliseconds: `2025-06-01T12:34:56.789Z`.
    pub ts: String,
    pub id: String,
    #[serde(flatten)]
    pub report: Report,
}

impl Event {
    pub fn now(id: &str, report: Report) -> Event {
        Event { v: EVENTS_VERSION, ts: rfc3339(std::time::SystemTime::now()), id: id.to_string(), report }
    }
}

/// `t` as RFC 3339 in UTC with milliseconds (`1970-01-01T00:00:00.000Z` for times before 1970).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod event_tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_123)), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_748_781_296)), "2025-06-01T12:34:56.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(4_107_542_399)), "2100-02-28T23:59:59.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(1)), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn events_carry_version_time_id_and_structured_fields() {
        let e = Event::now("m-0123456789abcdef", Report::done(OutcomeKind::Succeeded, "ok".into(), Totals { downtime_ms: Some(35), disk_bytes: 1, ram_bytes: 2 }));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["event"], "done");
        assert_eq!(v["id"], "m-0123456789abcdef");
        assert!(v["error"].is_null(), "{v}");
        assert_eq!(v["downtime_ms"], 35);
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let failed = Report::done(OutcomeKind::Failed, "broken".into(), Totals::default());
        assert!(matches!(failed, Report::Done { error: Some(ref m), .. } if m == "broken"));
        let accepted = serde_json::to_string(&Event::now("m-1", Report::Accepted { vm: "web1".into(), to: "host-b".into() })).unwrap();
        assert_eq!(accepted.matches("\"id\"").count(), 1, "{accepted}");
        let back: Event = serde_json::from_str(&accepted).unwrap();
        assert_eq!((back.id.as_str(), back.report), ("m-1", Report::Accepted { vm: "web1".into(), to: "host-b".into() }));
        let phase: Event = serde_json::from_str(r#"{"v":1,"ts":"x","id":"m","event":"phase","phase":"perform","step":"migrating","message":"copying RAM"}"#).unwrap();
        assert!(matches!(phase.report, Report::Phase { ref step, .. } if step.as_deref() == Some("migrating")));
    }
}
