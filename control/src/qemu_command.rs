//! The QEMU command line of a migratable guest, built in one place: the demo (`migtun demo`) and
//! the test harness (`tests/vm/`) start the same kind of guest (file-backed, shared RAM so the
//! test can read it back; `-blockdev` disks named `f<i>`/`d<i>`/`vd<i>`; QMP on UNIX sockets),
//! and a flag that differed between two copies would make the demo prove something the tests do
//! not. This builder only makes arguments; starting and watching the process stays with the caller.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The KVM device: a guest uses KVM when it can open it read-write, else TCG.
const KVM_DEVICE: &str = "/dev/kvm";

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` opens read-write (the test machine may lack it, or its permission), else TCG.
    pub fn detect() -> Accel {
        if std::fs::OpenOptions::new().read(true).write(true).open(KVM_DEVICE).is_ok() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The format of a disk image, as `-blockdev driver=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A guest's command line. Disks become virtio-blk devices `vd0`, `vd1`, ... in the order added.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    program: PathBuf,
    name: String,
    machine: String,
    accel: Accel,
    memory_mib: u64,
    /// The file that backs guest RAM (`memory-backend-file`, `share=on`); without it QEMU's own RAM.
    ram_file: Option<PathBuf>,
    cpus: Option<u32>,
    disks: Vec<(PathBuf, DiskFormat)>,
    qmp: Vec<PathBuf>,
    incoming: Option<String>,
    runas: Option<String>,
    paused: bool,
}

impl QemuCommand {
    /// A `pc` guest called `name` with `memory_mib` of RAM, no devices, no display, running at start.
    pub fn new(program: impl Into<PathBuf>, name: &str, memory_mib: u64) -> QemuCommand {
        QemuCommand {
            program: program.into(),
            name: name.to_string(),
            machine: "pc".to_string(),
            accel: Accel::detect(),
            memory_mib,
            ram_file: None,
            cpus: None,
            disks: Vec::new(),
            qmp: Vec::new(),
            incoming: None,
            runas: None,
            paused: false,
        }
    }

    pub fn machine(mut self, machine: &str) -> Self {
        self.machine = machine.to_string();
        self
    }

    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Back guest RAM with this file, shared, so another process can read what the guest holds.
    pub fn ram_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ram_file = Some(path.into());
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = Some(cpus);
        self
    }

    pub fn disk(mut self, path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        self.disks.push((path.into(), format));
        self
    }

    /// One more QMP server on this UNIX socket (QEMU takes several `-qmp`).
    pub fn qmp(mut self, socket: impl AsRef<Path>) -> Self {
        self.qmp.push(socket.as_ref().to_path_buf());
        self
    }

    /// Start as a migration destination listening on `uri` (`defer` to set it over QMP later).
    pub fn incoming(mut self, uri: &str) -> Self {
        self.incoming = Some(uri.to_string());
        self
    }

    /// Drop to this user after start (`-run-with user=` in QEMU 9.1+, `-runas` before).
    pub fn runas(mut self, user: &str) -> Self {
        self.runas = Some(user.to_string());
        self
    }

    /// Start with the CPUs stopped (`-S`).
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    /// The arguments, without the program.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        push("-name".into());
        push(format!("guest={}", self.name));
        if self.paused {
            push("-S".into());
        }
        push("-nodefaults".into());
        push("-display".into());
        push("none".into());
        push("-machine".into());
        match self.ram_file {
            Some(_) => push(format!("{},memory-backend=ram0", self.machine)),
            None => push(self.machine.clone()),
        }
        push("-accel".into());
        push(self.accel.as_str().into());
        push("-m".into());
        push(format!("{}M", self.memory_mib));
        if let Some(cpus) = self.cpus {
            push("-smp".into());
            push(cpus.to_string());
        }
        if let Some(ram) = &self.ram_file {
            push("-object".into());
            push(format!("memory-backend-file,id=ram0,size={}M,mem-path={},share=on", self.memory_mib, ram.display()));
        }
        for (i, (path, format)) in self.disks.iter().enumerate() {
            push("-blockdev".into());
            push(format!("driver=file,filename={},node-name=f{i}", path.display()));
            push("-blockdev".into());
            push(format!("driver={},file=f{i},node-name=d{i}", format.as_str()));
            push("-device".into());
            push(format!("virtio-blk-pci,drive=d{i},id=vd{i}"));
        }
        for socket in &self.qmp {
            push("-qmp".into());
            push(format!("unix:{},server=on,wait=off", socket.display()));
        }
        if let Some(uri) = &self.incoming {
            push("-incoming".into());
            push(uri.clone());
        }
        if let Some(user) = &self.runas {
            push("-runas".into());
            push(user.clone());
        }
        a
    }

    /// A `Command` for the program with these arguments; stdio and spawning are the caller's.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args());
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(c: &QemuCommand) -> Vec<String> {
        c.args().into_iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn the_migratable_guest_of_the_demo_and_the_tests() {
        let c = QemuCommand::new("qemu-system-x86_64", "vm", 128)
            .accel(Accel::Tcg)
            .ram_file("/r/ram")
            .disk("/r/d0.raw", DiskFormat::Raw)
            .disk("/r/d1.qcow2", DiskFormat::Qcow2)
            .qmp("/r/a.qmp")
            .qmp("/r/b.qmp")
            .paused(true);
        assert_eq!(
            strings(&c).join(" "),
            "-name guest=vm -S -nodefaults -display none -machine pc,memory-backend=ram0 -accel tcg -m 128M \
             -object memory-backend-file,id=ram0,size=128M,mem-path=/r/ram,share=on \
             -blockdev driver=file,filename=/r/d0.raw,node-name=f0 -blockdev driver=raw,file=f0,node-name=d0 \
             -device virtio-blk-pci,drive=d0,id=vd0 \
             -blockdev driver=file,filename=/r/d1.qcow2,node-name=f1 -blockdev driver=qcow2,file=f1,node-name=d1 \
             -device virtio-blk-pci,drive=d1,id=vd1 \
             -qmp unix:/r/a.qmp,server=on,wait=off -qmp unix:/r/b.qmp,server=on,wait=off"
        );
        assert_eq!(c.command().get_program(), "qemu-system-x86_64");
    }

    #[test]
    fn a_bare_running_guest_has_no_backend_no_s_and_takes_the_optional_flags() {
        let c = QemuCommand::new("q", "d", 64).accel(Accel::Kvm).machine("q35").cpus(2).incoming("defer").runas("libvirt-qemu");
        let a = strings(&c);
        assert!(!a.contains(&"-S".to_string()));
        assert!(!a.contains(&"-object".to_string()));
        let s = a.join(" ");
        assert!(s.contains("-machine q35 -accel kvm -m 64M -smp 2"), "{s}");
        assert!(s.ends_with("-incoming defer -runas libvirt-qemu"), "{s}");
    }

    #[test]
    fn detect_follows_dev_kvm() {
        let can = std::fs::OpenOptions::new().read(true).write(true).open(KVM_DEVICE).is_ok();
        assert_eq!(Accel::detect() == Accel::Kvm, can);
    }
}
