//! A process named so that it cannot be confused with a later one: its pid and its start time.
//!
//! The journal records the QEMU processes a migration started or used. After an agent restart,
//! a pid alone proves nothing: the process may have exited and its pid been reused. A
//! [`ProcessId`] adds the start time (`/proc/<pid>/stat` field 22, clock ticks since boot),
//! and [`Process::open`] takes a pidfd *before* checking it, so that the process checked is the
//! process signalled: a pidfd keeps naming its process even if the pid is reused meanwhile.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// A process: its pid and when it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    /// `/proc/<pid>/stat` starttime: clock ticks after boot.
    pub start: u64,
}

impl ProcessId {
    /// The process with this pid now, if there is one.
    pub fn of(pid: u32) -> Option<ProcessId> {
        start_time(pid).map(|start| ProcessId { pid, start })
    }

    /// This very process still exists (not a later one with the same pid).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start) && !is_zombie(self.pid)
    }

    /// Waits until this process has exited; false if it still runs after `grace`.
    pub async fn wait_exit(&self, grace: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        while self.alive() {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        true
    }
}

/// A handle on a process that was verified to be `id` (a pidfd).
pub struct Process {
    id: ProcessId,
    fd: OwnedFd,
}

impl Process {
    /// Opens `id`: `None` if it has exited (or its pid now names another process).
    pub fn open(id: ProcessId) -> Option<Process> {
        let pid = libc::pid_t::try_from(id.pid).ok()?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; it
        // reads and writes no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        let fd = i32::try_from(fd).ok()?;
        // SAFETY: `fd` was just returned by pidfd_open, is open, and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Checked after the pidfd exists: if `id` had exited before, the pid names another
        // process now and its start time differs; if `id` exits after, the pidfd still names
        // it (signals to an exited process fail with ESRCH).
        (start_time(id.pid) == Some(id.start)).then_some(Process { id, fd })
    }

    pub fn id(&self) -> ProcessId {
        self.id
    }

    /// Sends `signal` to exactly this process.
    pub fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a null siginfo and no flags reads no memory of
        // ours; the descriptor is a live pidfd owned by `self`.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Whether it still runs (it has not exited, or is a zombie not yet reaped).
    pub fn alive(&self) -> bool {
        self.id.alive()
    }

    /// Waits, without polling, until this process exits: a pidfd becomes readable then
    /// (pidfd_open(2)). Returns at once if it has exited already.
    pub async fn exited(self) -> std::io::Result<()> {
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open until the AsyncFd is dropped,
        // and an OwnedFd's as_raw_fd always returns the same descriptor.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(self.fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let _ready = fd.readable().await?;
        Ok(())
    }
}

/// `/proc/<pid>/stat` field 22. The command name (field 2) may contain spaces and parentheses,
/// so the fields are counted from the last `)`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // After ")": field 3 (state) is the first; starttime (22) is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next().map(|st| st == "Z" || st == "X")))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_named_by_pid_and_start_and_a_reused_pid_is_not_it() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        assert!(id.alive());
        let p = Process::open(id).expect("open the live child");
        // The same pid with another start time is another process: never opened.
        let other = ProcessId { pid: id.pid, start: id.start + 1 };
        assert!(!other.alive() && Process::open(other).is_none());
        p.signal(libc::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(!id.alive(), "exited and reaped");
        assert!(Process::open(id).is_none());
        assert!(ProcessId::of(u32::MAX).is_none());
    }

    #[test]
    fn this_process_is_found_alive() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.start > 0 && me.alive());
    }
}
