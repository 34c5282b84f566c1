//! What the agent keeps of its migrations: each one's [`Tracked`] (its reports, for late
//! watchers, its cancel token, an unknown outcome awaiting `migtun resolve`) and the
//! [`Registry`] of the running ones and the last [`HISTORY`](super::HISTORY) ended ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::messages::{rfc3339, Event, OutcomeKind, Report};
use super::{Direction, GuestOn, IncomingStatus, MigrationSummary, ProgressSummary, Reloader, HISTORY};

/// Reports buffered per watcher; a watcher that falls further behind skips progress lines (it
/// gets the final `done` line regardless, from the history).
const WATCH_CAPACITY: usize = 256;
/// Reports kept per migration for late watchers; progress lines beyond this are dropped from
/// the history (phase changes and the outcome are always kept).
const HISTORY_PROGRESS: usize = 32;

/// One migration as the admin API sees it.
pub struct Tracked {
    pub id: String,
    pub vm: String,
    pub to: String,
    pub cancel: CancellationToken,
    /// When it was accepted (or found in the journal by recovery).
    started: SystemTime,
    t0: Instant,
    events: broadcast::Sender<Event>,
    state: Mutex<TrackedState>,
    /// The operator's decision, sent while the migration awaits one.
    resolution: tokio::sync::watch::Sender<Option<GuestOn>>,
    awaiting: std::sync::atomic::AtomicBool,
}

/// Marks a migration as awaiting the operator's decision while it lives.
pub struct Awaiting<'a>(&'a Tracked);

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.0.awaiting.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Default)]
struct TrackedState {
    /// The VM's real name (`-name`), once Begin has read it.
    vm_name: Option<String>,
    phase: String,
    step: Option<String>,
    outcome: Option<OutcomeKind>,
    /// The `done` message, and when it came.
    ended: Option<(String, Instant)>,
    progress: Option<ProgressSummary>,
    history: Vec<Event>,
}

impl Tracked {
    /// Records and broadcasts a report, stamped with the time; `done` gets its duration here.
    pub fn report(&self, mut r: Report) {
        let event = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.ended.is_some() {
                // One `done` per migration; nothing after it.
                return;
            }
            match &mut r {
                Report::Phase { phase, step, .. } => {
                    s.phase = phase.clone();
                    s.step = step.clone();
                    s.progress = None;
                }
                Report::Done { outcome, message, duration_s, .. } => {
                    *duration_s = self.t0.elapsed().as_secs_f64();
                    s.outcome = Some(*outcome);
                    s.phase = "done".into();
                    s.step = None;
                    s.progress = None;
                    s.ended = Some((message.clone(), Instant::now()));
                }
                Report::Progress { stage, done_bytes, total_bytes, bytes_per_s, eta_s, .. } => {
                    s.progress = Some(ProgressSummary {
                        stage: stage.clone(),
                        done_bytes: *done_bytes,
                        total_bytes: *total_bytes,
                        bytes_per_s: *bytes_per_s,
                        eta_s: *eta_s,
                    });
                }
                _ => {}
            }
            if matches!(r, Report::Progress { .. }) {
                let progress = s.history.iter().filter(|h| matches!(h.report, Report::Progress { .. })).count();
                if progress >= HISTORY_PROGRESS {
                    if let Some(i) = s.history.iter().position(|h| matches!(h.report, Report::Progress { .. })) {
                        s.history.remove(i);
                    }
                }
            }
            let event = Event::now(&self.id, r);
            s.history.push(event.clone());
            event
        };
        // No watcher is fine.
        let _ = self.events.send(event);
    }

    /// From now until the guard is dropped, `migtun resolve` may decide for this migration.
    pub fn await_resolution(&self) -> Awaiting<'_> {
        self.awaiting.store(true, std::sync::atomic::Ordering::SeqCst);
        Awaiting(self)
    }

    /// The operator's decision, when it comes.
    pub async fn resolution(&self) -> GuestOn {
        let mut rx = self.resolution.subscribe();
        loop {
            if let Some(g) = *rx.borrow_and_update() {
                return g;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Records the operator's decision; refused unless the migration awaits one.
    pub fn resolve(&self, guest_on: GuestOn) -> Result<(), String> {
        if !self.awaiting.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(format!(
                "migration {} does not wait for a decision (only a migration whose outcome is unknown does; see migtun status)",
                self.id
            ));
        }
        self.resolution.send_replace(Some(guest_on));
        Ok(())
    }

    /// Names the VM by what Begin found (its `-name`) rather than its QMP socket's file name.
    pub fn set_vm_name(&self, name: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).vm_name = Some(name.to_string());
    }

    fn summary(&self) -> MigrationSummary {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let vm = s.vm_name.clone().unwrap_or_else(|| self.vm.clone());
        let until = s.ended.as_ref().map(|(_, at)| *at).unwrap_or_else(Instant::now);
        MigrationSummary {
            id: self.id.clone(),
            vm,
            direction: Direction::Outgoing,
            peer: self.to.clone(),
            phase: s.phase.clone(),
            step: s.step.clone(),
            outcome: s.outcome,
            message: s.ended.as_ref().map(|(m, _)| m.clone()),
            started: rfc3339(self.started),
            duration_s: until.duration_since(self.t0).as_secs_f64(),
            progress: s.progress.clone(),
        }
    }

    /// When it ended, if it has.
    fn ended(&self) -> Option<Instant> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).ended.as_ref().map(|(_, at)| *at)
    }

    pub(super) fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        // Subscribe under the lock so no report falls between history and live stream.
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.history.clone(), self.events.subscribe())
    }
}

/// The migrations this agent runs, and the last [`HISTORY`] it ran (since it started).
#[derive(Default)]
pub struct Registry {
    migrations: Mutex<HashMap<String, Arc<Tracked>>>,
    incoming: OnceLock<Arc<dyn IncomingStatus>>,
    /// The tunnels `migtun tunnel` opens, closes and lists.
    pub(super) tunnels: OnceLock<Arc<crate::tunnels::Tunnels>>,
    pub(super) reloader: OnceLock<Reloader>,
}

impl Registry {
    /// What the admin op `reload` runs.
    pub fn set_reloader(&self, reloader: Reloader) {
        let _ = self.reloader.set(reloader);
    }

    pub fn track(&self, id: &str, vm: &str, to: &str) -> Arc<Tracked> {
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        let t = Arc::new(Tracked {
            id: id.to_string(),
            vm: vm.to_string(),
            to: to.to_string(),
            cancel: CancellationToken::new(),
            started: SystemTime::now(),
            t0: Instant::now(),
            events,
            state: Mutex::new(TrackedState { phase: "begin".into(), ..Default::default() }),
            resolution: tokio::sync::watch::channel(None).0,
            awaiting: std::sync::atomic::AtomicBool::new(false),
        });
        let mut all = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(id.to_string(), t.clone());
        prune(&mut all);
        t
    }

    /// The destination side, listed by `migtun status` with the outgoing migrations.
    pub fn set_incoming(&self, incoming: Arc<dyn IncomingStatus>) {
        let _ = self.incoming.set(incoming);
    }

    /// The agent's tunnels, for `migtun tunnel`.
    pub fn set_tunnels(&self, tunnels: Arc<crate::tunnels::Tunnels>) {
        let _ = self.tunnels.set(tunnels);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Tracked>> {
        self.migrations.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Outgoing and incoming migrations, oldest first.
    pub fn summaries(&self) -> Vec<MigrationSummary> {
        let mut v: Vec<(SystemTime, MigrationSummary)> = {
            let mut all = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
            prune(&mut all);
            all.values().map(|t| (t.started, t.summary())).collect()
        };
        if let Some(incoming) = self.incoming.get() {
            v.extend(incoming.summaries());
        }
        v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        v.into_iter().map(|(_, s)| s).collect()
    }
}

/// Drops the ended migrations beyond the last [`HISTORY`].
fn prune(all: &mut HashMap<String, Arc<Tracked>>) {
    let mut ended: Vec<(Instant, String)> = all.values().filter_map(|t| t.ended().map(|at| (at, t.id.clone()))).collect();
    if ended.len() <= HISTORY {
        return;
    }
    ended.sort();
    for (_, id) in &ended[..ended.len() - HISTORY] {
        all.remove(id);
    }
}
