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
            assert!(migtun_proxy::wire::validate_name(&format!("{id}.ram")).is_ok());
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

/// A line of the admin API's event stream for one migration (`--json` prints these).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Report {
    Accepted { id: String, vm: String, to: String },
    Phase { phase: String, message: String },
    Progress {
        /// `mirror` (disks) or `ram`.
        stage: String,
        done: u64,
        total: u64,
        /// Bytes per second.
        rate: f64,
        /// Seconds to go at the current rate, if known.
        eta_secs: Option<f64>,
        /// Pages per second dirtied by the guest (RAM stage).
        dirty_rate: Option<u64>,
        /// Milliseconds QEMU expects the switchover to take (RAM stage).
        expected_downtime_ms: Option<i64>,
    },
    Log { message: String },
    Done { outcome: OutcomeKind, message: String },
}
