//! What `migtun status` shows of the incoming migrations: a [`View`] of each from the moment
//! prepare journalled it, its phase, received bytes and rate, then the last ended ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use migtun_proxy::route::ByteCount;
use serde_json::json;

use super::recover::RECOVERY_CONNECT;
use super::{Incoming, Prepared};
use crate::admin::{Direction, IncomingStatus, MigrationSummary, ProgressSummary, HISTORY};
use crate::messages::{rfc3339, Cookie, OutcomeKind};
use crate::progress::{eta, RateMeter};

/// How often a running incoming migration's received bytes are sampled for its rate.
const RATE_SAMPLE: Duration = Duration::from_millis(500);

/// The incoming migrations as `migtun status` sees them: from the moment prepare has
/// something to undo (its journal record) to their end, then the last [`HISTORY`] ended ones.
#[derive(Default)]
pub(super) struct Board {
    live: HashMap<String, View>,
    ended: VecDeque<(String, View)>,
}

/// One incoming migration as `migtun status` shows it.
pub(super) struct View {
    vm: String,
    source: String,
    started: SystemTime,
    t0: Instant,
    pub(super) phase: &'static str,
    pub(super) step: Option<&'static str>,
    /// What this migration's routes received from the source.
    received: ByteCount,
    /// The copied disks, and (once QEMU said) the guest's RAM.
    disk_bytes: u64,
    ram_bytes: u64,
    meter: RateMeter,
    rate: Option<f64>,
    ended: Option<(OutcomeKind, String, Instant)>,
}

impl View {
    fn summary(&self, id: &str) -> MigrationSummary {
        let received = self.received.get();
        let total = (self.disk_bytes + self.ram_bytes).max(received);
        let progress = (self.ended.is_none() && self.phase != "prepare").then(|| ProgressSummary {
            stage: "receiving".into(),
            done_bytes: received,
            total_bytes: total,
            bytes_per_s: self.rate,
            eta_s: if self.phase == "perform" { eta(total - received, self.rate) } else { None },
        });
        let until = self.ended.as_ref().map(|e| e.2).unwrap_or_else(Instant::now);
        MigrationSummary {
            id: id.to_string(),
            vm: self.vm.clone(),
            direction: Direction::Incoming,
            peer: self.source.clone(),
            phase: if self.ended.is_some() { "done".into() } else { self.phase.into() },
            step: self.step.filter(|_| self.ended.is_none()).map(str::to_string),
            outcome: self.ended.as_ref().map(|e| e.0),
            message: self.ended.as_ref().map(|e| e.1.clone()),
            started: rfc3339(self.started),
            duration_s: until.duration_since(self.t0).as_secs_f64(),
            progress,
        }
    }
}

impl IncomingStatus for Incoming {
    fn summaries(&self) -> Vec<(SystemTime, MigrationSummary)> {
        let board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        board.live.iter().chain(board.ended.iter().map(|(id, v)| (id, v))).map(|(id, v)| (v.started, v.summary(id))).collect()
    }
}

impl Incoming {
    /// An incoming migration shows in `migtun status` from now on.
    pub(super) fn show(&self, cookie: &Cookie, received: ByteCount) {
        let view = View {
            vm: cookie.vm.clone(),
            source: cookie.source.clone(),
            started: SystemTime::now(),
            t0: Instant::now(),
            phase: "prepare",
            step: None,
            received,
            disk_bytes: cookie.disks.iter().filter(|d| d.copy).map(|d| d.size).sum(),
            ram_bytes: 0,
            meter: RateMeter::default(),
            rate: None,
            ended: None,
        };
        self.board.lock().unwrap_or_else(|p| p.into_inner()).live.insert(cookie.migration.clone(), view);
    }

    /// Changes what `migtun status` shows of a running incoming migration; false once it ended.
    pub(super) fn update(&self, id: &str, f: impl FnOnce(&mut View)) -> bool {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        match board.live.get_mut(id) {
            Some(v) => {
                f(v);
                true
            }
            None => false,
        }
    }

    /// An incoming migration ended: it moves to the history (the last [`HISTORY`]).
    pub(super) fn ended(&self, id: &str, outcome: OutcomeKind, message: &str) {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut v) = board.live.remove(id) {
            v.ended = Some((outcome, message.to_string(), Instant::now()));
            board.ended.push_back((id.to_string(), v));
            while board.ended.len() > HISTORY {
                board.ended.pop_front();
            }
        }
    }

    /// While the migration runs: its rate from the bytes its routes received, and (once) the
    /// guest's RAM size from its QEMU.
    pub(super) async fn sample(self: Arc<Self>, id: String, prepared: std::sync::Weak<Prepared>) {
        // Not held beyond the query: the migration's routes and slot go when it ends.
        let memory = match prepared.upgrade() {
            Some(p) => p.qmp.execute_with_timeout("query-memory-size-summary", json!({}), RECOVERY_CONNECT).await.ok(),
            None => None,
        };
        if let Some(v) = memory {
            let ram = v.get("base-memory").and_then(|b| b.as_u64()).unwrap_or(0) + v.get("plugged-memory").and_then(|b| b.as_u64()).unwrap_or(0);
            self.update(&id, |view| view.ram_bytes = ram);
        }
        let mut tick = tokio::time::interval(RATE_SAMPLE);
        loop {
            tick.tick().await;
            let alive = self.update(&id, |view| {
                let now = view.received.get();
                view.rate = view.meter.sample(Instant::now(), now);
            });
            if !alive {
                return;
            }
        }
    }
}
