//! The local admin API: what `migtun migrate` and `migtun status` talk to.
//!
//! JSON lines on a UNIX socket (mode 0600, so only the agent's user may drive migrations). A
//! connection sends one request line and reads answer lines:
//!
//! ```text
//! {"op":"migrate","args":{...}}   -> Event lines ("accepted" first, "done" last)
//! {"op":"watch","id":"m-..."}     -> the same stream for a running migration (history first)
//! {"op":"cancel","id":"m-..."}    -> {"ok":true} | {"error":"..."}
//! {"op":"status"}                 -> one Status line
//! {"op":"resolve","id":"m-...","guest_on":"source"|"destination"}
//!                                 -> {"ok":true} | {"error":"..."}  (only while the outcome is unknown)
//! ```
//!
//! Event lines are [`Event`](crate::messages::Event)s (`v`, `ts`, `id` and the
//! [`Report`](crate::messages::Report)'s fields): what `migtun
//! migrate --json` prints. The agent keeps the running migrations and the last [`HISTORY`]
//! ended ones (outgoing here; incoming ones are the destination side's, [`IncomingStatus`]).
//!
//! The migration belongs to the agent: a client that disconnects (or dies) does not stop it.
//!
//! This file holds the API's types (requests, status); `registry` what the agent keeps of its
//! migrations ([`Tracked`], [`Registry`]), `socket` the serving and the client side.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::messages::{MigrateArgs, OutcomeKind};

mod registry;
mod socket;
#[cfg(test)]
mod tests;

pub use registry::{Awaiting, Registry, Tracked};
pub use socket::{bind, request, serve, serve_on};

/// Ended migrations `migtun status` keeps (per direction); older ones are dropped.
pub const HISTORY: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Migrate { args: MigrateArgs },
    Watch { id: String },
    Cancel { id: String },
    Status,
    /// The operator's answer when the destination cannot say where the guest is.
    Resolve { id: String, guest_on: GuestOn },
    /// `migtun tunnel open`: a per-migration pair of routes to `to` (see `tunnels.rs`).
    TunnelOpen { to: String, name: String, sockets: Vec<String>, ttl_secs: u64 },
    /// `migtun tunnel close`.
    TunnelClose { name: String },
    /// `migtun tunnel list`.
    TunnelList,
    /// Re-read the config file and the `[tls]` files (`migtun reload`, like SIGHUP). Answered
    /// with `{"ok": true, "changes": [...]}` or `{"error": "..."}`.
    Reload,
}

/// Where the operator says the guest is (`migtun resolve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestOn {
    /// The destination does not run the guest: resume it on the source.
    Source,
    /// The destination runs the guest: quit the source QEMU.
    Destination,
}

impl GuestOn {
    pub fn as_str(&self) -> &'static str {
        match self {
            GuestOn::Source => "source",
            GuestOn::Destination => "destination",
        }
    }
}

/// `migtun status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// [`EVENTS_VERSION`](crate::messages::EVENTS_VERSION).
    #[serde(default)]
    pub v: u32,
    pub name: String,
    /// Running migrations and the last [`HISTORY`] ended ones of each direction, oldest first.
    pub migrations: Vec<MigrationSummary>,
    pub routes: Vec<String>,
    /// Open streams by peer, route and side.
    pub streams: Vec<StreamSummary>,
}

/// Which side of a migration this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// This host is the source.
    Outgoing,
    /// This host is the destination.
    Incoming,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub id: String,
    pub vm: String,
    pub direction: Direction,
    /// The other host: the destination of an outgoing migration, the source of an incoming one.
    pub peer: String,
    /// As in the `phase` events, `done` once ended.
    pub phase: String,
    pub step: Option<String>,
    /// `null` while it runs.
    pub outcome: Option<OutcomeKind>,
    /// The last word on an ended migration.
    pub message: Option<String>,
    /// RFC 3339, UTC.
    pub started: String,
    /// Until now, or until it ended.
    pub duration_s: f64,
    /// The last progress of a running migration.
    pub progress: Option<ProgressSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressSummary {
    /// `mirror`, `ram`; on the destination `receiving` (everything its routes received).
    pub stage: String,
    pub done_bytes: u64,
    /// On the destination an estimate (RAM size plus copied disks: zero pages are not sent,
    /// pages the guest dirties are sent again).
    pub total_bytes: u64,
    pub bytes_per_s: Option<f64>,
    pub eta_s: Option<f64>,
}

/// Where the agent's incoming migrations come from (the destination side).
pub trait IncomingStatus: Send + Sync {
    /// The incoming migrations: prepared or running, and the last [`HISTORY`] ended ones.
    fn summaries(&self) -> Vec<(SystemTime, MigrationSummary)>;
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamSummary {
    pub peer: String,
    pub route: String,
    pub side: String,
    pub open: u64,
}

/// Starts a migration: given the args and its tracker, runs it to the end.
pub type Starter = Arc<dyn Fn(MigrateArgs, Arc<Tracked>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Reloads the agent (`serve` provides it): the changes, one line each, or the problems, one
/// line each naming the file and the key.
pub type Reloader = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send>> + Send + Sync>;
