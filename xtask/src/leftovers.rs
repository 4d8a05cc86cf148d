//! What a test run leaves behind: processes, test cgroups and pinned BPF
//! objects that outlive the suite.
//!
//! The suite runs in a cgroup of its own (`kya-suite-PID` under the cgroup2
//! root). A process keeps its cgroup when its parent dies and it is reparented
//! to init, so whatever a test started and forgot is still listed there when
//! `cargo test` has exited. Processes a test moved into a test cgroup of its
//! own are found through that cgroup, which must be gone too.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::clean;

pub(crate) struct SuiteCgroup {
    path: PathBuf,
    /// The cgroup this process was in before, to return to.
    home: PathBuf,
}

impl SuiteCgroup {
    /// Creates the suite's cgroup and moves this process (and so every
    /// process it starts from now on) into it.
    pub(crate) fn enter() -> Result<Self> {
        let root =
            clean::cgroup2_mount().context("no cgroup2 mount: cannot watch for leftovers")?;
        let own =
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("this process is in no cgroup2 cgroup")?;
        let home = root.join(rel.trim_start_matches('/'));
        let path = root.join(format!("kya-suite-{}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let suite = SuiteCgroup { path, home };
        move_self(&suite.path)?;
        Ok(suite)
    }

    /// Moves this process back, then reports (and removes) everything the
    /// run left behind. An error lists what was found.
    pub(crate) fn finish(self) -> Result<()> {
        let me = std::process::id();
        let stray: Vec<u32> = procs(&self.path).into_iter().filter(|p| *p != me).collect();
        let mut found = Vec::new();
        for pid in &stray {
            found.push(format!("process {pid} ({})", cmdline(*pid)));
        }
        for dir in clean::test_cgroups().into_iter().chain(clean::test_pins()) {
            found.push(format!("{}", dir.display()));
        }
        for ns in clean::test_netns() {
            found.push(format!("network namespace {ns}"));
        }
        for veth in clean::test_veths() {
            found.push(format!("interface {veth}"));
        }
        for (kind, name) in clean::test_podman() {
            found.push(format!("podman {kind} {name}"));
        }
        for dir in clean::test_v1_cgroups() {
            found.push(format!("{}", dir.display()));
        }
        // Clean up whatever was found, so one bad run does not spoil the next.
        move_self(&self.home)?;
        for pid in stray {
            // SAFETY: kill has no memory-safety preconditions; a pid that has
            // exited meanwhile yields ESRCH, which is fine.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        clean::remove_cgroup(&self.path);
        clean::clean_host()?;
        if !found.is_empty() {
            bail!(
                "the suite left behind {} thing(s) (now removed):\n  {}",
                found.len(),
                found.join("\n  ")
            );
        }
        Ok(())
    }
}

fn move_self(cgroup: &Path) -> Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving the test runner into {}", cgroup.display()))
}

/// Every pid in `cgroup` and its descendants.
fn procs(cgroup: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(procs(&e.path()));
            }
        }
    }
    out
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "exited".into())
}
