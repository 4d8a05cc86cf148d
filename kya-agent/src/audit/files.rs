//! Where a log's pieces live: the live file `audit.jsonl`, its rotated
//! predecessors `audit.jsonl.1`, `audit.jsonl.2`, ... (1 is the oldest: rotation
//! renames the live file to the next free number, one atomic rename, so a crash
//! mid-rotation cannot reorder history), and the checkpoint file
//! `audit.jsonl.checkpoints` beside them, covering the whole chain.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// The checkpoint file for the log whose live file is `base`.
pub fn checkpoints_path(base: &Path) -> PathBuf {
    let mut s: OsString = base.as_os_str().to_owned();
    s.push(".checkpoints");
    PathBuf::from(s)
}

/// The live file a (possibly rotated) file belongs to: `audit.jsonl.7` → `audit.jsonl`.
pub fn base_of(file: &Path) -> PathBuf {
    rotation_index(file)
        .and_then(|_| {
            let s = file.to_str()?;
            let dot = s.rfind('.')?;
            Some(PathBuf::from(&s[..dot]))
        })
        .unwrap_or_else(|| file.to_path_buf())
}

/// `Some(n)` when `file` ends in `.n` (decimal, no leading zeros, n >= 1).
pub fn rotation_index(file: &Path) -> Option<u64> {
    let ext = file.extension()?.to_str()?;
    if ext.is_empty() || ext.starts_with('0') || !ext.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ext.parse().ok()
}

/// The name of rotated file number `n`.
pub fn rotated_name(base: &Path, n: u64) -> PathBuf {
    let mut s: OsString = base.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Rotated files of `base`, oldest first.
pub fn rotated(base: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = match base.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = base.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let fname = entry.file_name();
        let Some(f) = fname.to_str() else { continue };
        if let Some(rest) = f.strip_prefix(&prefix) {
            let candidate = dir.join(f);
            if let Some(n) = rotation_index(&candidate) {
                if rest == n.to_string() {
                    out.push((n, candidate));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The whole set, in chain order: rotated files oldest first, then the live file (if present).
pub fn log_set(base: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated(base)?.into_iter().map(|(_, p)| p).collect();
    if base.exists() {
        files.push(base.to_path_buf());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_order() {
        assert_eq!(
            base_of(Path::new("/x/audit.jsonl.12")),
            Path::new("/x/audit.jsonl")
        );
        assert_eq!(
            base_of(Path::new("/x/audit.jsonl")),
            Path::new("/x/audit.jsonl")
        );
        assert_eq!(
            base_of(Path::new("/x/audit.jsonl.01")),
            Path::new("/x/audit.jsonl.01")
        );
        assert_eq!(
            checkpoints_path(Path::new("a/audit.jsonl")),
            Path::new("a/audit.jsonl.checkpoints")
        );
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        for n in [10u64, 2, 1] {
            std::fs::write(rotated_name(&base, n), "").unwrap();
        }
        std::fs::write(dir.path().join("audit.jsonl.02"), "").unwrap();
        std::fs::write(dir.path().join("audit.jsonl.checkpoints"), "").unwrap();
        std::fs::write(&base, "").unwrap();
        let set = log_set(&base).unwrap();
        let names: Vec<_> = set
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "audit.jsonl.1",
                "audit.jsonl.2",
                "audit.jsonl.10",
                "audit.jsonl"
            ]
        );
    }
}
