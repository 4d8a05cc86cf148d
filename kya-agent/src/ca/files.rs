//! The CA's files on disk: presence, an advisory lock, private reads and
//! atomic writes.
//!
//! Two processes may start against one state dir at once (a daemon and a
//! `kya ca init`); an exclusive `flock` on `ca.lock` serialises creation so
//! both end up with the same CA instead of each writing half of its own.

use super::{CaError, CA_CERT_FILE, CA_KEY_FILE};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

const LOCK_FILE: &str = "ca.lock";

/// Which of the two CA files exist.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Presence {
    Neither,
    Both,
    Only {
        present: &'static str,
        absent: &'static str,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Take the state dir's CA lock (creating the dir if needed); released on drop.
pub(super) fn lock(state_dir: &Path) -> Result<Flock<File>, CaError> {
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let path = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| CaError::Io {
        path,
        source: std::io::Error::from(errno),
    })
}

pub(super) fn presence(state_dir: &Path) -> Result<Presence, CaError> {
    let exists = |name: &str| {
        let path = state_dir.join(name);
        // symlink_metadata: a dangling symlink still "exists" and must not be overwritten.
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(CaError::Io { path, source }),
        }
    };
    Ok(match (exists(CA_CERT_FILE)?, exists(CA_KEY_FILE)?) {
        (false, false) => Presence::Neither,
        (true, true) => Presence::Both,
        (true, false) => Presence::Only {
            present: CA_CERT_FILE,
            absent: CA_KEY_FILE,
        },
        (false, true) => Presence::Only {
            present: CA_KEY_FILE,
            absent: CA_CERT_FILE,
        },
    })
}

/// Read a private key file, refusing one that group or others can read.
pub(super) fn read_private(path: &Path) -> Result<String, CaError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(io(path))
}

/// Write the certificate (0644) and key (0600) via temporary files and
/// renames, key first, so a reader never sees a certificate without its key.
/// Without `overwrite` the final names are taken with `link`, which fails if
/// they exist (no check-then-write race).
pub(super) fn write_pair(
    state_dir: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    overwrite: bool,
) -> Result<(), CaError> {
    let key_tmp = write_temp(state_dir, CA_KEY_FILE, key_pem, 0o600)?;
    let cert_tmp = match write_temp(state_dir, CA_CERT_FILE, cert_pem, 0o644) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&key_tmp);
            return Err(e);
        }
    };
    let result = (|| {
        for (tmp, name) in [(&key_tmp, CA_KEY_FILE), (&cert_tmp, CA_CERT_FILE)] {
            let dest = state_dir.join(name);
            if overwrite {
                std::fs::rename(tmp, &dest).map_err(io(&dest))?;
            } else {
                std::fs::hard_link(tmp, &dest).map_err(io(&dest))?;
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&key_tmp);
    let _ = std::fs::remove_file(&cert_tmp);
    if let Ok(dir) = File::open(state_dir) {
        let _ = dir.sync_all();
    }
    result
}

fn write_temp(
    state_dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> Result<std::path::PathBuf, CaError> {
    let path = state_dir.join(format!(".{name}.tmp.{}", rand::random::<u64>()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(io(&path))?;
    // The umask may have cleared bits of 0644; set the intended mode exactly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(&path))?;
    file.write_all(contents).map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    Ok(path)
}
