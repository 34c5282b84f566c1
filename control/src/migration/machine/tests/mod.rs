//! A simulated world (the source QEMU, the forwards, the destination agent and its QEMU)
//! answers the machine's actions like a driver would; faults are injected at every step.
//! After every run, the invariant is checked twice: from the trace alone
//! ([`copies_running`]) and against the simulated world's final state.

use super::*;
use std::collections::VecDeque;

mod begin;
mod events;
mod finish;
mod perform;
mod rollback;
mod types;

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
