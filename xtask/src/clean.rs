//! Remove what crashed test runs left behind: pinned BPF objects of test
//! instances (`/sys/fs/bpf/kya-e2e-*`, `/sys/fs/bpf/kya-test-*`) and test
//! cgroups (`kya-e2e-*`, `kya-test-*` under the cgroup2 root).
//!
//! Unpinning a link detaches its program, so this also removes the redirect a
//! killed test daemon left in force. A pin directory whose daemon is still
//! running is left alone (its pid is written by the daemon as `owner.pid`).

use anyhow::Result;
use std::path::{Path, PathBuf};

const PREFIXES: [&str; 2] = ["kya-e2e-", "kya-test-"];

pub(crate) fn clean_host() -> Result<()> {
    for pins in test_pins() {
        if !owner_alive(&pins) {
            eprintln!("xtask: removing leftover pins {}", pins.display());
            let _ = std::fs::remove_dir_all(&pins);
        }
    }
    for cgroup in test_cgroups() {
        eprintln!("xtask: removing leftover cgroup {}", cgroup.display());
        remove_cgroup(&cgroup);
    }
    Ok(())
}

/// Pin directories of test instances under bpffs.
pub(crate) fn test_pins() -> Vec<PathBuf> {
    prefixed_entries(Path::new("/sys/fs/bpf"))
}

/// Test cgroups under the cgroup2 root.
pub(crate) fn test_cgroups() -> Vec<PathBuf> {
    cgroup2_mount()
        .map(|root| prefixed_entries(&root))
        .unwrap_or_default()
}

fn prefixed_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            PREFIXES.iter().any(|p| name.starts_with(p))
        })
        .map(|e| e.path())
        .collect()
}

/// Is a live process running with `pin_dir` among its arguments?
fn owner_alive(pin_dir: &Path) -> bool {
    let want = pin_dir.as_os_str().as_encoded_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .map(|c| c.split(|b| *b == 0).any(|arg| arg == want))
            .unwrap_or(false)
    })
}

pub(crate) fn remove_cgroup(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(path).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub(crate) fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}
