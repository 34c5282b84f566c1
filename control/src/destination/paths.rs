//! A migration's directories (`run_dir/<id>` for its sockets, `image_dir/<id>` for its disks)
//! and the files inside them: created exclusively, removed only when provably a direct child
//! of their base named by a valid migration id, and every derived path asserted to stay inside
//! its directory.

use std::io;
use std::path::{Component, Path, PathBuf};

use super::cookie::validate_migration_id;
use super::Refusal;

/// Creates `run_dir` (if needed) and then `run_dir/<id>`, which must not exist yet: a guest
/// that migrated in keeps its directory, and a second prepare with its id must not reuse (and
/// on failure remove) it.
pub fn create_migration_dir(run_dir: &Path, id: &str) -> Result<PathBuf, Refusal> {
    create_migration_dir_in("qemu.run_dir", run_dir, id)
}

/// [`create_migration_dir`] under the base directory configured as `key` (`qemu.run_dir`,
/// `qemu.image_dir`).
pub fn create_migration_dir_in(key: &str, run_dir: &Path, id: &str) -> Result<PathBuf, Refusal> {
    validate_migration_id(id)?;
    use std::os::unix::fs::DirBuilderExt;
    let fail = |e: io::Error| Refusal::Path { what: key.into(), path: run_dir.display().to_string(), why: e.to_string() };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(run_dir).map_err(fail)?;
    // Canonical, so that every path derived from it compares as it is on disk.
    let run_dir = run_dir.canonicalize().map_err(fail)?;
    let dir = run_dir.join(id);
    assert_direct_child(&run_dir, &dir)?;
    let fail = |e: io::Error| Refusal::Path { what: "migration directory".into(), path: dir.display().to_string(), why: e.to_string() };
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            Refusal::MigrationId { id: id.to_string(), why: format!("{} exists: this id was used on this host before", dir.display()) }
        } else {
            fail(e)
        }
    })?;
    Ok(dir)
}

/// Removes a migration's directory, after checking that it is `run_dir/<valid id>` and a real
/// directory (not a symlink). Anything else is refused: an error, nothing removed.
pub fn remove_migration_dir(run_dir: &Path, dir: &Path) -> io::Result<()> {
    let refuse = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("not removing {}: {why}", dir.display()));
    let name = match dir.components().next_back() {
        Some(Component::Normal(n)) => n.to_str().unwrap_or_default(),
        _ => return Err(refuse("does not end in a file name".into())),
    };
    let same_parent = match (dir.parent().map(Path::canonicalize), run_dir.canonicalize()) {
        (Some(Ok(p)), Ok(r)) => p == r,
        _ => false,
    };
    if !same_parent {
        return Err(refuse(format!("not directly inside {}", run_dir.display())));
    }
    validate_migration_id(name).map_err(|e| refuse(e.to_string()))?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(refuse("not a directory".into()));
    }
    std::fs::remove_dir_all(dir)
}

/// `child` is `dir/<one normal component>`, lexically.
pub fn assert_direct_child(dir: &Path, child: &Path) -> Result<(), Refusal> {
    let ok = child.parent() == Some(dir) && matches!(child.components().next_back(), Some(Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(Refusal::Path { what: "path".into(), path: child.display().to_string(), why: format!("not directly inside {}", dir.display()) })
    }
}

/// `dir.join(name)`, asserted to be a direct child of `dir` lexically and, once `dir` is
/// canonicalized, still inside it (no symlinked parent leads elsewhere). `dir` must exist.
pub fn file_in(dir: &Path, name: &str, what: &str) -> Result<PathBuf, Refusal> {
    super::cookie::validate_file_name(what, name)?;
    let path = dir.join(name);
    assert_direct_child(dir, &path)?;
    let canon = dir.canonicalize().map_err(|e| Refusal::Path { what: what.into(), path: dir.display().to_string(), why: e.to_string() })?;
    if canon != dir {
        return Err(Refusal::Path { what: what.into(), path: dir.display().to_string(), why: format!("resolves to {}", canon.display()) });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_ids_are_refused_and_nothing_is_removed() {
        let base = tempfile::tempdir().unwrap();
        let run_dir = base.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        std::fs::write(run_dir.join("sentinel"), b"x").unwrap();
        std::fs::write(base.path().join("sentinel"), b"x").unwrap();
        for id in [".", "..", "../x", "/tmp", ""] {
            assert!(create_migration_dir(&run_dir, id).is_err(), "{id:?}");
            assert!(remove_migration_dir(&run_dir, &run_dir.join(id)).is_err(), "{id:?}");
        }
        assert!(remove_migration_dir(&run_dir, &run_dir).is_err());
        assert!(remove_migration_dir(&run_dir, base.path()).is_err());
        assert!(run_dir.join("sentinel").exists() && base.path().join("sentinel").exists());
    }

    #[test]
    fn a_migration_dir_is_created_once_and_removed() {
        let base = tempfile::tempdir().unwrap();
        let run_dir = base.path().join("run");
        let dir = create_migration_dir(&run_dir, "m-0123456789abcdef").unwrap();
        let again = create_migration_dir(&run_dir, "m-0123456789abcdef").unwrap_err();
        assert!(again.to_string().contains("used on this host before"), "{again}");
        remove_migration_dir(&run_dir, &dir).unwrap();
        assert!(!dir.exists() && run_dir.exists());
    }

    #[test]
    fn a_symlinked_directory_is_not_removed() {
        let base = tempfile::tempdir().unwrap();
        let run_dir = base.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let victim = base.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, run_dir.join("m-0123456789abcdef")).unwrap();
        assert!(remove_migration_dir(&run_dir, &run_dir.join("m-0123456789abcdef")).is_err());
        assert!(victim.exists());
    }

    #[test]
    fn files_stay_inside_their_directory() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().canonicalize().unwrap();
        assert!(file_in(&dir, "disk0.raw", "image").is_ok());
        for bad in ["..", ".", "../x", "a/b", ""] {
            assert!(file_in(&dir, bad, "image").is_err(), "{bad:?}");
        }
        std::os::unix::fs::symlink("/tmp", dir.join("link")).unwrap();
        assert!(file_in(&dir.join("link"), "x", "image").is_err(), "a symlinked directory is not inside");
    }
}
