//! SHA-256 digests of agents' executables, for `exe_sha256` selectors and the
//! evidence of credential calls.
//!
//! Hashing an executable (a 100 MB runtime) takes tens of milliseconds, so it
//! is done once per file, not per process: digests are cached process-wide by
//! the file's (device, inode, size, mtime), and the decision path's prewarm
//! (`decision/record.rs`) computes a new connection's digest on a blocking
//! thread as the connection arrives, off the decision path. A decision that needs a digest still being computed waits
//! for that computation instead of starting another.

use kya_common::ProcessIdentity;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, OnceLock};

/// (device, inode, size, mtime in ns): a file's identity and version.
type Key = (u64, u64, u64, i128);

/// Most digests kept; the cache is emptied when full.
const MAX_ENTRIES: usize = 4096;

/// Each entry is computed once under its own lock; concurrent askers wait on it.
type Entry = Arc<Mutex<Option<Option<String>>>>;

fn cache() -> &'static Mutex<HashMap<Key, Entry>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Entry>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// The executable file of `p` that may be hashed, and its metadata. When the
/// kernel recorded the executable's (device, inode) at connect, only that file
/// counts: `/proc/PID/exe` or the recorded path, whichever still is that very
/// file (a process that exec'd since, or a path replaced since, gives none).
/// Without a kernel record, `/proc/PID/exe` while the process exists, else the
/// path.
fn locate(p: &ProcessIdentity) -> Option<(String, std::fs::Metadata)> {
    let proc_exe = format!("/proc/{}/exe", p.pid);
    let mut candidates: Vec<&str> = Vec::new();
    if p.pid != 0 {
        candidates.push(&proc_exe);
    }
    if !p.exe.is_empty() {
        candidates.push(&p.exe);
    }
    candidates.into_iter().find_map(|c| {
        let md = std::fs::metadata(c).ok()?;
        let same = p.exe_ino == 0
            || (md.ino() == p.exe_ino && kya_common::maps::kernel_dev(md.dev()) == p.exe_dev);
        same.then(|| (c.to_string(), md))
    })
}

fn key_of(meta: &std::fs::Metadata) -> Key {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(-1);
    (meta.dev(), meta.ino(), meta.len(), mtime)
}

fn hash_file(path: &str, meta: &std::fs::Metadata) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let opened = f.metadata().ok()?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return None; // replaced between the check and the open
    }
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(hex::encode(h.finalize()))
}

/// SHA-256 (hex) of the process's executable; see [`locate`] for which file.
/// Blocks while the file is hashed, once per file version.
pub(crate) fn digest(p: &ProcessIdentity) -> Option<String> {
    let (path, meta) = locate(p)?;
    let key = key_of(&meta);
    let entry = {
        let mut c = cache().lock().ok()?;
        if c.len() >= MAX_ENTRIES && !c.contains_key(&key) {
            c.clear();
        }
        c.entry(key).or_default().clone()
    };
    let mut slot = entry.lock().ok()?;
    if let Some(done) = slot.as_ref() {
        return done.clone();
    }
    let hex = hash_file(&path, &meta);
    *slot = Some(hex.clone());
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> ProcessIdentity {
        ProcessIdentity {
            pid: std::process::id(),
            ..Default::default()
        }
    }

    #[test]
    fn digest_of_this_process_is_the_file_hash_and_cached() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let want = hex::encode(Sha256::digest(std::fs::read(&exe).unwrap()));
        assert_eq!(digest(&me()).as_deref(), Some(want.as_str()));
        // A second process of the same file: the cached entry, same answer.
        let key = key_of(&std::fs::metadata(&exe).unwrap());
        assert!(cache().lock().unwrap().contains_key(&key));
        assert_eq!(digest(&me()).as_deref(), Some(want.as_str()));
    }

    #[test]
    fn a_recorded_inode_that_is_not_the_file_gives_no_digest() {
        let p = ProcessIdentity {
            exe_ino: 1,
            exe_dev: 1,
            ..me()
        };
        assert_eq!(digest(&p), None);
        let gone = ProcessIdentity {
            pid: u32::MAX - 1,
            ..Default::default()
        };
        assert_eq!(digest(&gone), None);
    }

    #[test]
    fn concurrent_askers_share_one_computation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let p = ProcessIdentity {
            exe: path.display().to_string(),
            ..Default::default()
        };
        let want = hex::encode(Sha256::digest(vec![7u8; 1 << 20]));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || digest(&p))
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().as_deref(), Some(want.as_str()));
        }
        // A new version of the file is a new entry.
        std::fs::write(&path, b"changed").unwrap();
        let want2 = hex::encode(Sha256::digest(b"changed"));
        assert_eq!(digest(&p).as_deref(), Some(want2.as_str()));
    }
}
