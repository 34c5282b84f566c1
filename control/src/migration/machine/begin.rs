//! Begin: the options and the VM are checked before anything is touched; a refusal is only a
//! report ([`Outcome::Refused`]).

use super::*;

impl Machine {
    pub(super) fn begin(&mut self, vm: VmInfo, out: &mut Vec<Action>) {
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

}

impl Options {
    /// multifd channels, if multifd is used: `--parallel 1` is the one migration stream.
    pub fn multifd_channels(&self) -> Option<u8> {
        self.parallel.filter(|n| *n > 1)
    }
}

pub(super) fn option_problems(o: &Options) -> Vec<String> {
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
