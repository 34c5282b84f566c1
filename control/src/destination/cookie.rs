//! Validation of an incoming cookie against this host's [`Policy`]: pure (no I/O), so the fuzz
//! targets can call [`validate`] on any bytes; [`check_free_space`] is the one step that asks
//! the file system.

use std::path::Path;

use super::{Policy, Refusal};
use crate::messages::Cookie;

/// `m-` and 16 lower-case hex digits: exactly what `messages::new_migration_id` makes.
const MIGRATION_ID_HEX: usize = 16;
/// QEMU keeps block node names in `char node_name[32]`; qdev ids have no limit, but no real
/// configuration needs more than this either.
pub const MAX_IDENTIFIER: usize = 31;
/// A QOM path naming an anonymous device (`/machine/peripheral-anon/device[0]/...`).
const MAX_QOM_PATH: usize = 256;
/// NAME_MAX on Linux.
pub const MAX_FILE_NAME: usize = 255;
/// PATH_MAX on Linux.
pub const MAX_PATH: usize = 4096;
/// No guest has more disks than this (virtio-blk on one PCI bus tops out near 32 per bus).
const MAX_DISKS: usize = 64;
/// A real QEMU command line has tens to a few hundred arguments (libvirt's are ~150).
pub const MAX_ARGS: usize = 1024;
/// One argument: the longest real ones are `-blockdev` JSON of a few KiB.
pub const MAX_ARG_BYTES: usize = 16 * 1024;
/// The VM's name is for logs and `-name`.
const MAX_VM_NAME: usize = 128;
/// Formats the destination knows how to create (`ftruncate` for raw, `qemu-img create`).
pub const CREATABLE_FORMATS: &[&str] = &["raw", "qcow2"];

/// Checks every field of `cookie` that the destination acts on. Nothing is touched.
pub fn validate(cookie: &Cookie, policy: &Policy) -> Result<(), Refusal> {
    validate_migration_id(&cookie.migration)?;
    if cookie.vm.len() > MAX_VM_NAME || cookie.vm.chars().any(char::is_control) {
        return Err(Refusal::field("vm", &cookie.vm, format!("at most {MAX_VM_NAME} bytes, no control characters")));
    }
    if cookie.cmdline.len() > MAX_ARGS {
        return Err(Refusal::field("cmdline", "", format!("{} arguments; at most {MAX_ARGS}", cookie.cmdline.len())));
    }
    for (i, a) in cookie.cmdline.iter().enumerate() {
        if a.len() > MAX_ARG_BYTES || a.contains('\0') {
            return Err(Refusal::field(format!("cmdline[{i}]"), a, format!("at most {MAX_ARG_BYTES} bytes, no NUL")));
        }
    }
    if cookie.disks.len() > MAX_DISKS {
        return Err(Refusal::field("disks", "", format!("{} disks; at most {MAX_DISKS}", cookie.disks.len())));
    }
    let mut total: u64 = 0;
    let mut nodes = std::collections::HashSet::new();
    let mut devices = std::collections::HashSet::new();
    for (i, d) in cookie.disks.iter().enumerate() {
        // Empty: QEMU named the node itself on the source; the destination finds it by device.
        if !d.node_name.is_empty() {
            validate_identifier(&format!("disks[{i}].node_name"), &d.node_name)?;
            if !nodes.insert(d.node_name.as_str()) {
                return Err(Refusal::field(format!("disks[{i}].node_name"), &d.node_name, "two disks with one node name"));
            }
        }
        validate_device(&format!("disks[{i}].device"), &d.device)?;
        // The device names the disk's NBD export.
        if !devices.insert(d.device.as_str()) {
            return Err(Refusal::field(format!("disks[{i}].device"), &d.device, "two disks with one device"));
        }
        validate_path_text(&format!("disks[{i}].source_file"), &d.source_file)?;
        if !d.copy {
            continue;
        }
        let disk = &d.name().to_string();
        if d.size == 0 {
            return Err(Refusal::Disk { disk: disk.clone(), why: "size 0".into() });
        }
        if d.size > policy.max_disk_bytes {
            return Err(Refusal::Disk {
                disk: disk.clone(),
                why: format!("{} bytes is more than this host's qemu.max_disk_bytes ({})", d.size, policy.max_disk_bytes),
            });
        }
        total = total
            .checked_add(d.size)
            .ok_or_else(|| Refusal::Disk { disk: disk.clone(), why: "the sizes of the disks overflow".into() })?;
        if !CREATABLE_FORMATS.contains(&d.format.as_str()) {
            return Err(Refusal::Disk {
                disk: disk.clone(),
                why: format!("format {:?}: the destination creates only {}", super::shorten(&d.format), CREATABLE_FORMATS.join(", ")),
            });
        }
        validate_file_name(&format!("disks[{i}].source_file's file name"), base_name(&d.source_file))?;
    }
    Ok(())
}

/// The last component of a path as written (`/a/.` gives `.`, which is then refused, where
/// `Path::file_name` would quietly give `a`).
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or_default()
}

/// Exactly `m-` followed by 16 lower-case hex digits.
pub fn validate_migration_id(id: &str) -> Result<(), Refusal> {
    let ok = id.len() == 2 + MIGRATION_ID_HEX
        && id.starts_with("m-")
        && id[2..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Refusal::MigrationId {
            id: super::shorten(id),
            why: format!("not of the form m-<{MIGRATION_ID_HEX} lower-case hex digits> that sources generate"),
        })
    }
}

/// A QEMU identifier (node name, qdev or object id): a letter, then letters, digits, `-`, `.`
/// and `_`, at most [`MAX_IDENTIFIER`] bytes.
pub fn validate_identifier(field: &str, v: &str) -> Result<(), Refusal> {
    if is_identifier(v) {
        Ok(())
    } else {
        Err(Refusal::field(
            field,
            v,
            format!("not a QEMU identifier (a letter, then letters, digits, '-', '.', '_'; at most {MAX_IDENTIFIER} bytes)"),
        ))
    }
}

pub fn is_identifier(v: &str) -> bool {
    let mut b = v.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic())
        && v.len() <= MAX_IDENTIFIER
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
}

/// A guest device: an identifier, or the QOM path of an anonymous device.
fn validate_device(field: &str, v: &str) -> Result<(), Refusal> {
    let qom = v.starts_with("/machine/")
        && v.len() <= MAX_QOM_PATH
        && !v.split('/').any(|c| c == "." || c == "..")
        && v.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'/' | b'[' | b']'));
    if qom || is_identifier(v) {
        Ok(())
    } else {
        Err(Refusal::field(field, v, "neither a QEMU identifier nor a /machine/... QOM path"))
    }
}

/// A plain file name: not empty, `.` or `..`, no `/`, no NUL or other control character, not
/// hidden (`.name` is where uploads are staged), at most [`MAX_FILE_NAME`] bytes.
pub fn validate_file_name(field: &str, v: &str) -> Result<(), Refusal> {
    let why = if v.is_empty() {
        "empty"
    } else if v == "." || v == ".." {
        "`.` and `..` are not file names"
    } else if v.contains('/') {
        "contains '/'"
    } else if v.chars().any(char::is_control) {
        "contains NUL or a control character"
    } else if v.starts_with('.') {
        "a hidden name (starts with '.')"
    } else if v.len() > MAX_FILE_NAME {
        "longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(Refusal::field(field, v, why))
}

/// An absolute path without NUL or control characters, at most [`MAX_PATH`] bytes.
fn validate_path_text(field: &str, v: &str) -> Result<(), Refusal> {
    if !v.starts_with('/') || v.len() > MAX_PATH || v.chars().any(char::is_control) {
        return Err(Refusal::field(field, v, format!("not an absolute path (at most {MAX_PATH} bytes, no control characters)")));
    }
    Ok(())
}

/// The bytes the copied disks will take once mirrored (raw images are sparse until written; the
/// mirror writes them all).
pub fn copied_bytes(cookie: &Cookie) -> u64 {
    cookie.disks.iter().filter(|d| d.copy).fold(0u64, |a, d| a.saturating_add(d.size))
}

/// Refuses when the copied disks do not fit into the free space of `image_dir`'s file system
/// (space available to unprivileged users, so the host keeps its reserve).
pub fn check_free_space(image_dir: &Path, cookie: &Cookie) -> Result<(), Refusal> {
    let need = copied_bytes(cookie);
    if need == 0 {
        return Ok(());
    }
    let free = free_bytes(image_dir).map_err(|e| Refusal::Path {
        what: "image directory".into(),
        path: image_dir.display().to_string(),
        why: format!("cannot read its free space: {e}"),
    })?;
    if need > free {
        return Err(Refusal::Space { dir: image_dir.display().to_string(), need, free });
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated string that outlives the call; `st` points to writable
    // memory of the size statvfs(3) fills, and is read only after it reported success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{DiskSpec, MigrationParams};

    pub(crate) fn cookie() -> Cookie {
        Cookie {
            migration: "m-0123456789abcdef".into(),
            vm: "testvm".into(),
            source: "host-a".into(),
            cmdline: vec!["/usr/bin/qemu-system-x86_64".into()],
            disks: vec![DiskSpec {
                device: "vd0".into(),
                node_name: "d0".into(),
                size: 64 << 20,
                format: "raw".into(),
                source_file: "/srv/a/disk0.raw".into(),
                copy: true,
            }],
            params: MigrationParams::default(),
            image_dir: String::new(),
            running: true,
        }
    }

    fn refused(c: &Cookie) -> String {
        validate(c, &Policy::default()).expect_err("must be refused").to_string()
    }

    #[test]
    fn an_ordinary_cookie_passes() {
        validate(&cookie(), &Policy::default()).unwrap();
        assert!(validate_migration_id(&crate::messages::new_migration_id()).is_ok(), "what sources generate passes");
    }

    #[test]
    fn migration_ids_other_than_the_generated_format_are_refused() {
        for id in [".", "..", "", "m-", "m-0123456789abcdeF", "m-0123456789abcdef0", "../m-0123456789abcdef", "m-0123456789abcde/", "/tmp", "x-0123456789abcdef"] {
            let mut c = cookie();
            c.migration = id.into();
            assert!(refused(&c).contains("migration id"), "{id:?}");
        }
    }

    #[test]
    fn an_automatic_node_name_is_sent_empty_and_devices_are_unique() {
        let policy = Policy::default();
        let mut c = cookie();
        c.disks[0].node_name = String::new();
        assert!(validate(&c, &policy).is_ok(), "an empty node name: found by device on the destination");
        c.disks.push(DiskSpec { node_name: String::new(), ..c.disks[0].clone() });
        let e = validate(&c, &policy).unwrap_err().to_string();
        assert!(e.contains("disks[1].device") && e.contains("two disks with one device"), "{e}");
    }

    #[test]
    fn node_names_and_devices_must_be_identifiers() {
        for bad in ["../..", "0abc", "a/b", "a b", "#block123", &"a".repeat(32)] {
            let mut c = cookie();
            c.disks[0].node_name = bad.into();
            assert!(refused(&c).contains("disks[0].node_name"), "{bad:?}");
            let mut c = cookie();
            c.disks[0].device = bad.into();
            assert!(refused(&c).contains("disks[0].device"), "{bad:?}");
        }
        let mut c = cookie();
        c.disks[0].device = "/machine/peripheral-anon/device[0]/virtio-backend".into();
        validate(&c, &Policy::default()).unwrap();
        c.disks[0].device = "/machine/../x".into();
        assert!(refused(&c).contains("device"));
    }

    #[test]
    fn disk_sizes_are_bounded() {
        let mut c = cookie();
        c.disks[0].size = 1 << 60;
        let e = refused(&c);
        assert!(e.contains("disk d0") && e.contains("qemu.max_disk_bytes"), "{e}");
        c.disks[0].size = 0;
        assert!(refused(&c).contains("size 0"));
        let policy = Policy { max_disk_bytes: u64::MAX, ..Policy::default() };
        let mut c = cookie();
        c.disks[0].size = u64::MAX;
        c.disks.push(DiskSpec { node_name: "d1".into(), device: "vd1".into(), ..c.disks[0].clone() });
        assert!(validate(&c, &policy).unwrap_err().to_string().contains("overflow"));
    }

    #[test]
    fn file_names_are_plain() {
        for bad in ["/srv/a/..", "/srv/a/.", "/srv/a/.hidden", "/", "relative/x", &format!("/srv/{}", "x".repeat(256))] {
            let mut c = cookie();
            c.disks[0].source_file = bad.into();
            assert!(refused(&c).contains("source_file"), "{bad:?}: {}", refused(&c));
        }
        assert!(validate_file_name("f", "a\0b").is_err());
        assert!(validate_file_name("f", "disk0.raw").is_ok());
    }

    #[test]
    fn only_creatable_formats() {
        let mut c = cookie();
        c.disks[0].format = "vmdk".into();
        assert!(refused(&c).contains("format \"vmdk\""));
    }

    #[test]
    fn free_space_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cookie();
        check_free_space(dir.path(), &c).unwrap();
        c.disks[0].size = 1 << 60;
        assert!(matches!(check_free_space(dir.path(), &c), Err(Refusal::Space { .. })));
    }
}
