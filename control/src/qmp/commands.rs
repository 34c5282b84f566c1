//! Typed QMP commands and the replies migtun reads (`query-status`, `query-block`, ...).


use serde::Deserialize;
use serde_json::{json, Value};

use super::*;

impl Qmp {
    /// `query-status`.
    pub async fn query_status(&self) -> Result<Status, QmpError> {
        self.call("query-status", Value::Null).await
    }

    /// `query-block`: block devices attached to guest devices (and legacy `-drive`s).
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>, QmpError> {
        self.call("query-block", Value::Null).await
    }

    /// `query-named-block-nodes` with `flat: true`: every node once, backing chains not nested.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockDeviceInfo>, QmpError> {
        self.call("query-named-block-nodes", json!({ "flat": true }))
            .await
    }

    /// `query-block-jobs`.
    pub async fn query_block_jobs(&self) -> Result<Vec<BlockJobInfo>, QmpError> {
        self.call("query-block-jobs", Value::Null).await
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.call("query-migrate", Value::Null).await
    }

    /// `query-migrate-capabilities`.
    pub async fn query_migrate_capabilities(&self) -> Result<Vec<MigrationCapability>, QmpError> {
        self.call("query-migrate-capabilities", Value::Null).await
    }

    /// `migrate-set-capabilities`, e.g. `&[("multifd", true), ("pause-before-switchover", true)]`.
    pub async fn migrate_set_capabilities(
        &self,
        capabilities: &[(&str, bool)],
    ) -> Result<(), QmpError> {
        let caps: Vec<Value> = capabilities
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .await?;
        Ok(())
    }

    /// `migrate-set-parameters`, e.g. `json!({"max-bandwidth": 1e9 as u64, "downtime-limit": 300})`.
    pub async fn migrate_set_parameters(&self, parameters: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", parameters).await?;
        Ok(())
    }
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    pub running: bool,
    /// `prelaunch`, `running`, `paused`, `inmigrate`, `postmigrate`, `finish-migrate`, ...
    pub status: String,
}

/// One entry of `query-block`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockInfo {
    /// Legacy drive name; empty for devices set up with `-blockdev`.
    #[serde(default)]
    pub device: String,
    /// QOM path or id of the guest device, e.g. `/machine/peripheral/vd0/virtio-backend`.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The medium, absent for an empty drive (e.g. CD-ROM without a disc).
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// A block node (`inserted` of `query-block`, entries of `query-named-block-nodes`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockDeviceInfo {
    #[serde(rename = "node-name", default)]
    pub node_name: String,
    /// Filename (or JSON pseudo-filename) of the node.
    #[serde(default)]
    pub file: String,
    /// Driver: `raw`, `qcow2`, `file`, `nbd`, ...
    #[serde(default)]
    pub drv: String,
    #[serde(default)]
    pub backing_file: Option<String>,
    #[serde(default)]
    pub ro: bool,
    pub image: ImageInfo,
}

/// `image` of a block node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageInfo {
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub format: String,
    /// Guest-visible size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockJobInfo {
    /// `mirror`, `commit`, `stream`, `backup`.
    #[serde(rename = "type", default)]
    pub job_type: String,
    /// The job id (named `device` for historical reasons).
    pub device: String,
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub speed: u64,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub paused: bool,
    /// A mirror is `ready` once source and target are in sync.
    #[serde(default)]
    pub ready: bool,
    /// Job status: `running`, `ready`, `concluded`, ...
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
}

/// Reply of `query-migrate`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MigrationInfo {
    /// `none` (no migration yet: QEMU omits the field), `setup`, `active`, `pre-switchover`,
    /// `device`, `completed`, `failed`, `cancelled`, `postcopy-active`, ...
    #[serde(default = "status_none")]
    pub status: String,
    #[serde(default)]
    pub ram: Option<MigrationRam>,
    /// Estimated downtime in milliseconds (while active).
    #[serde(rename = "expected-downtime", default)]
    pub expected_downtime: Option<i64>,
    /// Milliseconds since the migration started (or its total duration when completed).
    #[serde(rename = "total-time", default)]
    pub total_time: Option<i64>,
    /// Why the migration failed, when `status` is `failed`.
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
}

pub(super) fn status_none() -> String {
    "none".into()
}

/// `ram` of `query-migrate`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct MigrationRam {
    /// Bytes sent so far.
    pub transferred: u64,
    /// Bytes left to send in this pass.
    pub remaining: u64,
    /// Guest RAM size in bytes.
    pub total: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// Pages dirtied per second by the guest.
    #[serde(rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    /// Bytes per page (0 when QEMU does not say: 4096 on x86).
    #[serde(rename = "page-size")]
    pub page_size: u64,
}

/// One entry of `query-migrate-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MigrationCapability {
    pub capability: String,
    pub state: bool,
}
