//! Remove what crashed test runs left behind: pinned BPF objects of test
//! instances (`/sys/fs/bpf/kya-e2e-*`, `/sys/fs/bpf/kya-test-*`), test
//! cgroups (`kya-e2e-*`, `kya-test-*` under the cgroup2 root), and the
//! network namespaces (`ip netns` `kya-test-*`, their processes killed) and
//! veth interfaces (`kyat*`) the namespace tests create, and what the
//! container tests create with Podman: containers, networks and images named
//! `kya-test-*`, and their cgroup parents (`kya-test-*`) in every cgroup
//! hierarchy, v1 ones included.
//!
//! Unpinning a link detaches its program, so this also removes the redirect a
//! killed test daemon left in force. A pin directory whose daemon is still
//! running is left alone (its pid is written by the daemon as `owner.pid`).

use anyhow::Result;
use std::path::{Path, PathBuf};

/// (`kubepods-kya-test-*`: the pod tests' stand-in for the kubelet's tree.)
const PREFIXES: [&str; 3] = ["kya-e2e-", "kya-test-", "kubepods-kya-test-"];
/// Named network namespaces of tests (`ip netns add kya-test-...`).
const NETNS_PREFIX: &str = "kya-test-";
/// Host ends of the tests' veth pairs.
const VETH_PREFIX: &str = "kyat";

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
    for ns in test_netns() {
        eprintln!("xtask: removing leftover network namespace {ns}");
        remove_netns(&ns);
    }
    for veth in test_veths() {
        eprintln!("xtask: removing leftover interface {veth}");
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &veth])
            .output();
    }
    // containers first: they hold the networks, images and cgroups
    for (kind, name) in test_podman() {
        eprintln!("xtask: removing leftover podman {kind} {name}");
        let args: &[&str] = match kind {
            "container" => &["rm", "-f", "-t", "0"],
            "network" => &["network", "rm", "-f"],
            _ => &["rmi", "-f"],
        };
        let _ = std::process::Command::new("podman")
            .args(args)
            .arg(&name)
            .output();
    }
    for cgroup in test_v1_cgroups() {
        eprintln!("xtask: removing leftover cgroup {}", cgroup.display());
        remove_v1_cgroup(&cgroup);
    }
    Ok(())
}

/// Podman objects the container tests create, containers first:
/// (`container` | `network` | `image`, name).
pub(crate) fn test_podman() -> Vec<(&'static str, String)> {
    let list = |args: &[&str]| -> Vec<String> {
        std::process::Command::new("podman")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| l.starts_with(NETNS_PREFIX) || l.starts_with("localhost/kya-test-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for c in list(&["ps", "-a", "--format", "{{.Names}}"]) {
        out.push(("container", c));
    }
    for n in list(&["network", "ls", "--format", "{{.Name}}"]) {
        out.push(("network", n));
    }
    for i in list(&["images", "--format", "{{.Repository}}:{{.Tag}}"]) {
        out.push(("image", i));
    }
    out
}

/// Test cgroups (`kya-test-*`) at the root of the cgroup v1 hierarchies
/// (the container engine creates the tests' cgroup parents there too).
pub(crate) fn test_v1_cgroups() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .flat_map(|m| {
            names_with_prefix(&m, NETNS_PREFIX)
                .into_iter()
                .map(move |n| m.join(n))
        })
        .collect()
}

/// rmdir a v1 cgroup tree (no `cgroup.kill` in v1: its processes are
/// killed one by one first).
fn remove_v1_cgroup(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_v1_cgroup(&e.path());
            }
        }
    }
    for _ in 0..100 {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Named network namespaces the tests create (`/run/netns/kya-test-*`).
pub(crate) fn test_netns() -> Vec<String> {
    names_with_prefix(Path::new("/run/netns"), NETNS_PREFIX)
}

/// Host ends of the tests' veth pairs (`kyat*`; deleting one deletes its peer).
pub(crate) fn test_veths() -> Vec<String> {
    names_with_prefix(Path::new("/sys/class/net"), VETH_PREFIX)
}

fn names_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    out.sort();
    out
}

/// Kills the processes of a test namespace, then deletes it.
fn remove_netns(name: &str) {
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", name])
        .output();
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
