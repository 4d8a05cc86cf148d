//! Small file-system helpers shared by the components that keep state.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Write `bytes` to `path` so that readers and crashes see the old or the new
/// content, never a mix: temp file (0600) in the same directory, fsync,
/// rename, fsync the directory. The temp file is removed on failure.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Why a state directory is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateDirError {
    #[error("state dir {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("state dir {path} is not a directory")]
    NotADirectory { path: std::path::PathBuf },
    #[error("state dir {path} is owned by uid {owner}, not by the daemon's user (uid {me}): chown it to the daemon's user")]
    NotOwned {
        path: std::path::PathBuf,
        owner: u32,
        me: u32,
    },
    #[error("state dir {path} is group- or world-writable (mode {mode:04o}): another user could replace kya's keys or socket; chmod go-w it")]
    Writable { path: std::path::PathBuf, mode: u32 },
}

/// Make sure `dir` is a state directory only this process's user may
/// change: created (mode 0711) when missing; refused when it is not a
/// directory (a symlink is not followed), is owned by another uid, or is
/// group- or world-writable. Its mode is then set to 0711: others may reach
/// the control socket inside (whose own mode decides who connects) and
/// nothing else.
pub(crate) fn prepare_state_dir(dir: &Path) -> Result<(), StateDirError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |source| StateDirError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let md = match std::fs::symlink_metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(dir)
                .map_err(io)?;
            std::fs::symlink_metadata(dir).map_err(io)?
        }
        Err(e) => return Err(io(e)),
    };
    if !md.is_dir() {
        return Err(StateDirError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(StateDirError::NotOwned {
            path: dir.to_path_buf(),
            owner: md.uid(),
            me,
        });
    }
    if md.mode() & 0o022 != 0 {
        return Err(StateDirError::Writable {
            path: dir.to_path_buf(),
            mode: md.mode() & 0o7777,
        });
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_missing_state_dir_is_created_0711_and_a_private_one_opened_to_0711() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        prepare_state_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o711);
        let private = root.path().join("p");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        prepare_state_dir(&private).unwrap();
        assert_eq!(mode(&private), 0o711);
    }

    #[test]
    fn a_group_or_world_writable_state_dir_is_refused_and_left_as_it_was() {
        let root = tempfile::tempdir().unwrap();
        for m in [0o770, 0o702, 0o777, 0o1777] {
            let dir = root.path().join(format!("d{m:o}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
            let e = prepare_state_dir(&dir).unwrap_err();
            assert!(matches!(e, StateDirError::Writable { .. }), "{m:o}: {e}");
            assert!(e.to_string().contains("chmod go-w"), "{e}");
            assert_eq!(mode(&dir), m, "the mode must not be fixed silently");
        }
    }

    #[test]
    fn a_state_dir_of_another_user_or_a_symlink_or_a_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            prepare_state_dir(&file),
            Err(StateDirError::NotADirectory { .. })
        ));
        let link = root.path().join("l");
        std::os::unix::fs::symlink(root.path(), &link).unwrap();
        assert!(matches!(
            prepare_state_dir(&link),
            Err(StateDirError::NotADirectory { .. })
        ));
        // Another owner: only root can make one here.
        if nix::unistd::geteuid().is_root() {
            let theirs = root.path().join("t");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = prepare_state_dir(&theirs).unwrap_err();
            assert!(
                matches!(e, StateDirError::NotOwned { owner: 65534, .. }),
                "{e}"
            );
            assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), 65534);
        }
    }
}
