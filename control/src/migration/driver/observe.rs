//! What the source QEMU says, in the machine's terms: the guest and its disks (`inspect`),
//! QMP events (`translate`), progress polls and the totals and summary at the end.

use std::time::Duration;

use serde_json::Value;

use crate::admin::Tracked;
use crate::migration::machine::{Disk, Event, MigrationStatus, Progress, VmInfo};
use crate::messages::{Report, Totals};
use crate::progress::eta;
use crate::qmp::Event as QmpEvent;


use super::executor::Executor;

impl Executor {
    pub(super) async fn inspect(&mut self) -> Result<VmInfo, String> {
        // Four queries, one round trip.
        let replies = self
            .qmp
            .execute_pipelined(vec![
                ("query-status", Value::Null),
                ("query-block", Value::Null),
                ("query-block-jobs", Value::Null),
                ("query-migrate", Value::Null),
            ])
            .await
            .map_err(|e| e.to_string())?;
        let [status, blocks, jobs, migrate]: [Value; 4] = replies.try_into().map_err(|_| "QEMU answered four queries with a different number of replies".to_string())?;
        let decode = |what: &str, e: serde_json::Error| format!("unexpected reply to {what}: {e}");
        let status: crate::qmp::Status = serde_json::from_value(status).map_err(|e| decode("query-status", e))?;
        let blocks: Vec<crate::qmp::BlockInfo> = serde_json::from_value(blocks).map_err(|e| decode("query-block", e))?;
        let jobs: Vec<crate::qmp::BlockJobInfo> = serde_json::from_value(jobs).map_err(|e| decode("query-block-jobs", e))?;
        self.prelaunch = status.status == "prelaunch";
        if let Some(pid) = self.qmp.peer_pid() {
            self.cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| b.split(|c| *c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
                .unwrap_or_default();
        }
        if let Some(name) = vm_name(&self.cmdline) {
            self.vm = name;
        }
        let mut disks = Vec::new();
        for b in blocks {
            let Some(ins) = b.inserted else { continue };
            if ins.ro {
                continue;
            }
            let key = disk_key(&b.device, b.qdev.as_deref(), &ins.node_name);
            let format = if ins.image.format.is_empty() { ins.drv.clone() } else { ins.image.format.clone() };
            let disk = Disk { device: key.clone(), node_name: ins.node_name.clone(), size: ins.image.virtual_size, format, file: file_of(&ins.file) };
            self.disks.insert(key, (disks.len(), disk.clone()));
            disks.push(disk);
        }
        let blockers = migrate
            .get("blocked-reasons")
            .and_then(|r| r.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let vfio_devices = self.cmdline.iter().filter(|a| a.contains("vfio-pci")).cloned().collect();
        Ok(VmInfo { running: status.running, disks, has_active_block_jobs: !jobs.is_empty(), blockers, vfio_devices })
    }

    /// A QEMU event as a machine event.
    pub(super) fn translate(&mut self, ev: &QmpEvent) -> Option<Event> {
        let device = ev.data.get("device").and_then(|d| d.as_str()).unwrap_or_default();
        if ev.name.starts_with("BLOCK_JOB_") {
            // READY, COMPLETED and CANCELLED carry the job's offset: what it copied, also when
            // it ended between two polls.
            if let Some(offset) = ev.data.get("offset").and_then(|o| o.as_u64()) {
                if self.disk_of_job(device).is_some() {
                    let seen = self.job_bytes.entry(device.to_string()).or_insert(0);
                    *seen = (*seen).max(offset);
                }
            }
        }
        match ev.name.as_str() {
            "MIGRATION" => {
                let status = ev.data.get("status").and_then(|s| s.as_str())?;
                if status == self.last_status {
                    return None;
                }
                self.last_status = status.to_string();
                Some(Event::MigrationState(MigrationStatus::parse(status)))
            }
            "BLOCK_JOB_READY" => self.disk_of_job(device).map(Event::MirrorReady),
            "BLOCK_JOB_COMPLETED" => {
                let disk = self.disk_of_job(device)?;
                match ev.data.get("error").and_then(|e| e.as_str()) {
                    Some(err) => Some(Event::MirrorFailed(disk, err.to_string())),
                    None => Some(Event::MirrorCompleted(disk)),
                }
            }
            "BLOCK_JOB_CANCELLED" => self.disk_of_job(device).map(Event::MirrorCancelled),
            "RESUME" => Some(Event::SourceResumed),
            "BLOCK_JOB_ERROR" => {
                let disk = self.disk_of_job(device)?;
                let op = ev.data.get("operation").and_then(|o| o.as_str()).unwrap_or("I/O");
                Some(Event::MirrorFailed(disk, format!("{op} error on the mirror")))
            }
            _ => None,
        }
    }

    /// Polls progress; reports it and hands RAM progress (or a status change that no event
    /// announced) to the machine.
    pub(super) async fn progress(&mut self, tracked: &Tracked) -> Option<Event> {
        if self.migration_started {
            let info = self.qmp.query_migrate().await.ok()?;
            if info.status != self.last_status {
                self.last_status = info.status.clone();
                return Some(Event::MigrationState(MigrationStatus::parse(&info.status)));
            }
            let ram = info.ram?;
            // The rate is what `transferred` did over the last seconds: QEMU's `mbps` lags
            // (see `progress`).
            let rate = self.ram_rate.sample(std::time::Instant::now(), ram.transferred);
            self.ram_bytes = ram.transferred;
            tracked.report(Report::Progress {
                stage: "ram".into(),
                done_bytes: ram.transferred,
                total_bytes: ram.total.max(ram.transferred + ram.remaining),
                bytes_per_s: rate,
                eta_s: eta(ram.remaining, rate),
                dirty_bytes_per_s: Some(ram.dirty_pages_rate as f64 * if ram.page_size > 0 { ram.page_size } else { 4096 } as f64),
                expected_downtime_ms: info.expected_downtime,
            });
            return Some(Event::Progress(Progress { transferred: ram.transferred, remaining: ram.remaining, total: ram.total }));
        }
        let jobs = self.qmp.query_block_jobs().await.ok()?;
        let ours: Vec<_> = jobs.iter().filter(|j| self.disk_of_job(&j.device).is_some()).collect();
        if !ours.is_empty() {
            let done: u64 = ours.iter().map(|j| j.offset).sum();
            let total: u64 = ours.iter().map(|j| j.len).sum::<u64>().max(done);
            for j in &ours {
                let seen = self.job_bytes.entry(j.device.clone()).or_insert(0);
                *seen = (*seen).max(j.offset);
            }
            // A job's `speed` is its limit, not its rate: the rate is the offsets over time.
            let rate = self.mirror_rate.sample(std::time::Instant::now(), done);
            tracked.report(Report::Progress {
                stage: "mirror".into(),
                done_bytes: done,
                total_bytes: total,
                bytes_per_s: rate,
                eta_s: eta(total - done, rate),
                dirty_bytes_per_s: None,
                expected_downtime_ms: None,
            });
        }
        None
    }

    /// A succeeded migration's bytes and downtime, into the migration metrics.
    pub(super) fn count_success(&self, m: &migtun_proxy::metrics::MigrationMetrics) {
        use migtun_proxy::metrics::MigrationBytesLabels;
        let t = self.totals();
        m.bytes.get_or_create(&MigrationBytesLabels { phase: "disk" }).inc_by(t.disk_bytes);
        m.bytes.get_or_create(&MigrationBytesLabels { phase: "ram" }).inc_by(t.ram_bytes);
        if let Some(d) = t.downtime_ms {
            m.downtime.observe(d as f64 / 1000.0);
        }
    }

    /// What the migration moved: the mirrors' bytes, the RAM stream's (QEMU's final figure
    /// once it completed), the downtime QEMU measured.
    pub(super) fn totals(&self) -> Totals {
        let ram = self.totals.as_ref().and_then(|t| t.pointer("/ram/transferred")).and_then(|v| v.as_u64());
        Totals {
            // QEMU sets `total-time` and `downtime` just after `completed`: 0 means not yet.
            downtime_ms: self
                .totals
                .as_ref()
                .filter(|t| t.get("total-time").and_then(|v| v.as_u64()).is_some_and(|ms| ms > 0))
                .and_then(|t| t.get("downtime"))
                .and_then(|v| v.as_u64()),
            disk_bytes: self.job_bytes.values().sum(),
            ram_bytes: ram.unwrap_or(self.ram_bytes),
        }
    }

    /// "in 5.7 s: disks 384 MiB, RAM 512 MiB in 2.1 s, downtime 35 ms".
    pub(super) fn summary(&self, took: Duration) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut parts = vec![format!("in {:.1} s", took.as_secs_f64())];
        let disks: u64 = self.job_bytes.values().sum();
        if disks > 0 {
            parts.push(format!("disks {:.0} MiB", mib(disks)));
        }
        if let Some(t) = &self.totals {
            let ram = t.pointer("/ram/transferred").and_then(|v| v.as_u64()).unwrap_or(0);
            // QEMU sets `total-time` and `downtime` just after `completed`: 0 means not yet.
            match t.get("total-time").and_then(|v| v.as_u64()).filter(|ms| *ms > 0) {
                Some(ms) => {
                    parts.push(format!("RAM {:.0} MiB in {:.1} s", mib(ram), ms as f64 / 1000.0));
                    if let Some(d) = t.get("downtime").and_then(|v| v.as_u64()) {
                        parts.push(format!("downtime {d} ms"));
                    }
                }
                None => parts.push(format!("RAM {:.0} MiB", mib(ram))),
            }
        }
        parts.join(", ")
    }
}

/// The machine's name for a disk: the guest device, else the qdev id, else the node name
/// (`-blockdev` disks have no device name; their qdev path is `/machine/peripheral/ID/...`).
fn disk_key(device: &str, qdev: Option<&str>, node: &str) -> String {
    if !device.is_empty() {
        return device.to_string();
    }
    if let Some(id) = qdev.and_then(|q| q.strip_prefix("/machine/peripheral/")).and_then(|q| q.split('/').next()) {
        return id.to_string();
    }
    if let Some(q) = qdev.filter(|q| !q.is_empty()) {
        return q.to_string();
    }
    node.to_string()
}

/// The image file behind `query-block`'s `file` (a `json:{...}` filename keeps its `filename`).
fn file_of(file: &str) -> String {
    if let Some(j) = file.strip_prefix("json:") {
        if let Ok(v) = serde_json::from_str::<Value>(j) {
            if let Some(f) = v.pointer("/file/filename").and_then(|f| f.as_str()) {
                return f.to_string();
            }
        }
    }
    file.to_string()
}

fn vm_name(cmdline: &[String]) -> Option<String> {
    let i = cmdline.iter().position(|a| a == "-name")?;
    let v = cmdline.get(i + 1)?;
    let first = v.split(',').next()?;
    Some(first.strip_prefix("guest=").unwrap_or(first).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_named_by_device_qdev_or_node() {
        assert_eq!(disk_key("drive0", None, "n"), "drive0");
        assert_eq!(disk_key("", Some("/machine/peripheral/vd0/virtio-backend"), "n"), "vd0");
        assert_eq!(disk_key("", None, "node7"), "node7");
        assert_eq!(file_of(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/a.qcow2"}}"#), "/x/a.qcow2");
        assert_eq!(vm_name(&["qemu".into(), "-name".into(), "guest=web1,debug-threads=on".into()]).as_deref(), Some("web1"));
    }
}
