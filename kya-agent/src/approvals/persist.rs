//! The on-disk record of pending approvals (`STATE_DIR/approvals.json`).
//!
//! Rewritten atomically (temp file, fsync, rename) on every change, so after a
//! crash or restart the daemon knows which calls were held when it stopped and
//! records them as denied ("the daemon restarted while the call was held")
//! instead of losing them silently. The HTTP exchanges themselves cannot
//! survive a restart: their sockets died with the process.

use super::request::{ActionRequest, ApprovalView};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name inside the state directory.
pub const FILE: &str = "approvals.json";
/// Largest file accepted at load (the set is bounded; anything bigger is not ours).
pub const MAX_FILE: u64 = 64 * 1024 * 1024;

/// One pending approval as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRecord {
    pub view: ApprovalView,
    pub request: ActionRequest,
}

/// Errors reading or writing the record.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a pending-approvals file: {message}")]
    Format { path: PathBuf, message: String },
}

/// Writes the pending set.
#[derive(Debug, Clone)]
pub struct Persist {
    path: PathBuf,
}

impl Persist {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replace the file with `records`, atomically.
    pub fn save(&self, records: &[PendingRecord]) -> Result<(), PersistError> {
        let io = |source| PersistError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(records).map_err(|e| io(std::io::Error::other(e)))?;
        crate::fsutil::write_atomic(&self.path, &bytes).map_err(io)
    }

    /// Read what a previous run left pending, then clear the file. A missing
    /// file means nothing was pending.
    pub fn take_interrupted(&self) -> Result<Vec<PendingRecord>, PersistError> {
        let io = |source| PersistError::Io {
            path: self.path.clone(),
            source,
        };
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_FILE {
            return Err(PersistError::Format {
                path: self.path.clone(),
                message: format!("{} bytes is larger than any pending set", meta.len()),
            });
        }
        let bytes = std::fs::read(&self.path).map_err(io)?;
        let records: Vec<PendingRecord> =
            serde_json::from_slice(&bytes).map_err(|e| PersistError::Format {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        self.save(&[])?;
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::Approvals;
    use std::time::Duration;

    #[tokio::test]
    async fn pending_approvals_survive_a_crash_as_interrupted_records() {
        let dir = tempfile::tempdir().unwrap();
        let persist = Persist::new(dir.path());
        let a = Approvals::new(8, Some(persist.clone()));
        let h = a
            .submit(
                crate::approvals::pending::tests::action("bot", "alice"),
                Duration::from_secs(60),
            )
            .unwrap();
        let id = h.id.clone();
        // Simulate a crash: the handle is never dropped normally.
        std::mem::forget(h);
        let again = Persist::new(dir.path());
        let left = again.take_interrupted().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].view.id, id);
        assert_eq!(left[0].request.tool, "transfer");
        assert!(again.take_interrupted().unwrap().is_empty(), "taken once");
    }

    #[test]
    fn hostile_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(dir.path());
        assert!(p.take_interrupted().unwrap().is_empty());
        for bad in [&b"{"[..], b"[1,2]", b"\xff\xfe", b"{\"view\":1}"] {
            std::fs::write(p.path(), bad).unwrap();
            assert!(matches!(
                p.take_interrupted(),
                Err(PersistError::Format { .. })
            ));
        }
    }
}
