//! The destination decides what runs.
//!
//! A source's cookie is data from a peer, never a program. Before any hook or process runs, the
//! destination agent
//! 1. validates the cookie ([`cookie::validate`]): the migration id, node names, device ids,
//!    disk sizes, formats and file names, against this host's [`Policy`] (pure, no I/O);
//! 2. checks the free space of the migration's image directory ([`cookie::check_free_space`]);
//! 3. builds the destination QEMU's command line itself ([`cmdline::build`]) from an allow-list
//!    of QEMU options, with the configured emulator, copied disks in fresh files inside the
//!    image directory, shared disks only under `qemu.shared_storage`, `-sandbox` and `-runas`;
//! 4. creates and removes the migration's directory only as a direct child of `run_dir`
//!    ([`paths`]).
//!
//! Every refusal is a [`Refusal`] naming the option, key or disk, sent to the source's user.

pub mod cmdline;
pub mod cookie;
pub mod opts;
pub mod paths;
pub mod incoming;

use std::path::PathBuf;

use migtun_proxy::config::{QemuConfig, DEFAULT_EMULATOR, DEFAULT_MAX_DISK_BYTES};

/// What this host allows an incoming migration to run (from `[qemu]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `qemu.emulator`: the only binary a destination QEMU is started from.
    pub emulator: PathBuf,
    /// `qemu.shared_storage`: absolute prefixes under which disks that are not copied (and any
    /// other file the guest opens: firmware, kernels, read-only images) may live.
    pub shared_storage: Vec<PathBuf>,
    /// `qemu.max_disk_bytes`: the largest copied disk.
    pub max_disk_bytes: u64,
    /// `qemu.run_as`: QEMU drops to this user once set up (`-runas`).
    pub run_as: Option<String>,
    /// `qemu.sandbox`: start QEMU with `-sandbox on,...`.
    pub sandbox: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            emulator: PathBuf::from(DEFAULT_EMULATOR),
            shared_storage: Vec::new(),
            max_disk_bytes: DEFAULT_MAX_DISK_BYTES,
            run_as: None,
            sandbox: true,
        }
    }
}

impl Policy {
    pub fn from_config(q: &QemuConfig) -> Policy {
        Policy {
            emulator: q.emulator.clone(),
            shared_storage: q.shared_storage.clone(),
            max_disk_bytes: q.max_disk_bytes,
            run_as: q.run_as.clone(),
            sandbox: q.sandbox,
        }
    }
}

/// Why the destination refuses an incoming migration. Each message names what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("migration id {id:?}: {why}")]
    MigrationId { id: String, why: String },
    /// A field of the cookie (`disks[1].node_name`, `vm`, ...).
    #[error("cookie field {field} = {value:?}: {why}")]
    Field { field: String, value: String, why: String },
    #[error("disk {disk}: {why}")]
    Disk { disk: String, why: String },
    /// A QEMU option of the source's command line.
    #[error("QEMU option {option}: {why}")]
    Option { option: String, why: String },
    /// A path the migration would create or use.
    #[error("{what} {path}: {why}")]
    Path { what: String, path: String, why: String },
    #[error("image directory {dir}: the copied disks need {need} bytes, only {free} are free")]
    Space { dir: String, need: u64, free: u64 },
}

impl Refusal {
    pub(crate) fn option(option: &str, why: impl Into<String>) -> Refusal {
        Refusal::Option { option: option.to_string(), why: why.into() }
    }
    pub(crate) fn field(field: impl Into<String>, value: &str, why: impl Into<String>) -> Refusal {
        Refusal::Field { field: field.into(), value: shorten(value), why: why.into() }
    }
}

/// Longest piece of peer data quoted in an error (the rest is cut, so a hostile value cannot
/// flood the source's terminal or our log).
const MAX_QUOTED: usize = 120;

pub(crate) fn shorten(s: &str) -> String {
    if s.len() <= MAX_QUOTED {
        return s.to_string();
    }
    let mut end = MAX_QUOTED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
