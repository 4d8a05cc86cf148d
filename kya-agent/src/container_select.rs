//! The container part of the selection: the cgroups that `--container`
//! (ids and names, resolved at start and on each policy reload),
//! `--cgroup-glob` and `--image` (rescanned while running; the images in
//! `crate::image_select`) and the Kubernetes pod selector
//! (watched through the API) stand for now, and the tasks that keep the
//! kernel's selection in step as containers and pods start and stop.

use crate::bpf::{RedirectConfig, Redirector};
use crate::cgroup_glob::CgroupGlobs;
use crate::config::Config;
use crate::container::ContainerError;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How often the cgroup tree is rescanned for the globs.
const RESCAN_EVERY: Duration = Duration::from_millis(250);

/// The cgroups the container selectors stand for now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerCgroups {
    /// Of `--container` (ids and names).
    pub containers: Vec<String>,
    /// Matches of `--cgroup-glob`.
    pub globbed: Vec<String>,
    /// Cgroups of the pods of this node that match `[kubernetes] pod_selector`.
    pub pods: Vec<String>,
    /// Cgroups of the running containers whose image matches `--image`.
    pub imaged: Vec<String>,
    /// The kernel's selection may lag these cgroups (an update failed): the
    /// next rescan reapplies it even if the matches did not change.
    pub stale: bool,
}

impl ContainerCgroups {
    /// Every cgroup, for the redirect's selection.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.containers
            .iter()
            .chain(self.globbed.iter())
            .chain(self.pods.iter())
            .chain(self.imaged.iter())
    }
}

/// Resolve `--container` selectors. `strict`: one that names no running
/// container is an error (at start); otherwise (a reload, when the container
/// may have stopped since) it is skipped with a warning, and the rest applies.
pub fn resolve_containers(config: &Config, strict: bool) -> Result<Vec<String>, ContainerError> {
    let mut out = Vec::new();
    if config.selection.containers.is_empty() {
        return Ok(out);
    }
    let mount = match crate::bpf::cgroup2_mount() {
        Ok(m) => m,
        Err(e) => {
            // the redirect's own start reports the missing cgroup2 mount
            tracing::error!(error = %e, "no cgroup2 mount: --container cannot be resolved");
            return Ok(out);
        }
    };
    for sel in &config.selection.containers {
        // a name asks the engine's CLI (up to seconds): off the async workers
        match off_the_runtime(|| crate::container::cgroup_of_selector(&mount, sel)) {
            Ok(cg) => {
                tracing::info!(container = %sel, cgroup = %cg, "container selected by its cgroup");
                out.push(cg);
            }
            Err(e) if strict => return Err(e),
            Err(e) => tracing::warn!(container = %sel, error = %e, "container selector skipped"),
        }
    }
    Ok(out)
}

/// Runs blocking `f` without stalling the async runtime's other tasks
/// when called from one of its worker threads.
fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The glob matches now (empty without globs or without a cgroup2 mount).
pub fn scan_globs(globs: &CgroupGlobs) -> Vec<String> {
    if globs.is_empty() {
        return Vec::new();
    }
    match crate::bpf::cgroup2_mount() {
        Ok(m) => globs.scan(&m),
        Err(_) => Vec::new(),
    }
}

/// Keeps the kernel's selection in step with the cgroup globs: each rescan
/// that finds a different set of matches (a container started or stopped)
/// reapplies the whole selection, built by `build` from the current cgroups.
/// A container selected by `--container` whose cgroup is gone is dropped from
/// the selection at the same time. A failed update (a cgroup vanished between
/// scan and apply) is retried at the next rescan.
pub fn spawn_watcher(
    globs: CgroupGlobs,
    current: Arc<Mutex<ContainerCgroups>>,
    redirector: Arc<Mutex<Option<Redirector>>>,
    build: BuildSelection,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if globs.is_empty() {
            return;
        }
        let globs = Arc::new(globs);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RESCAN_EVERY) => {}
                _ = stop.changed() => return,
            }
            let g = globs.clone();
            let Ok(found) = tokio::task::spawn_blocking(move || scan_globs(&g)).await else {
                continue;
            };
            let mount = crate::bpf::cgroup2_mount().ok();
            apply(
                &current,
                &redirector,
                &build,
                "cgroup glob matches",
                |cur| next_cgroups(cur, found, mount.as_deref()),
            );
        }
    })
}

/// Builds the next cgroups from the current ones with `next` (`None`:
/// nothing changed) and applies them to the kernel's selection; kept only
/// if that worked (a failure is retried by the caller's next round).
pub(crate) fn apply(
    current: &Mutex<ContainerCgroups>,
    redirector: &Mutex<Option<Redirector>>,
    build: &BuildSelection,
    what: &str,
    next: impl FnOnce(&ContainerCgroups) -> Option<ContainerCgroups>,
) {
    let mut cur = match current.lock() {
        Ok(c) => c,
        Err(e) => e.into_inner(),
    };
    let Some(next) = next(&cur) else { return };
    let wanted = build(&next);
    let Ok(mut guard) = redirector.lock() else {
        return;
    };
    let Some(r) = guard.as_mut() else { return };
    match off_the_runtime(|| r.update_selection(&wanted)) {
        Ok(()) => {
            tracing::info!(globbed = ?next.globbed, pods = ?next.pods, imaged = ?next.imaged, "{what} changed: selection updated");
            *cur = next;
        }
        Err(e) => {
            cur.stale = true;
            tracing::warn!(error = %e, "cannot apply the {what} yet; retrying")
        }
    }
}

/// Builds the redirect's whole selection from the container cgroups.
pub type BuildSelection = Arc<dyn Fn(&ContainerCgroups) -> RedirectConfig + Send + Sync>;

/// How often the pod cgroups are looked at again (a pod's cgroup appears
/// after the API reports the pod).
const POD_RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Wait before listing again after the API failed.
const API_RETRY: Duration = Duration::from_secs(5);
/// Wait before listing again after a watch failed.
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// Keeps the kernel's selection in step with the pods of this node that
/// match the pod selector: list, then watch (listing again when the watch
/// expires), and each change or rescan reapplies the selection with those
/// pods' cgroups. While the API cannot be reached the pods selected last
/// stay selected.
pub fn spawn_pod_watcher(
    client: crate::kube::client::KubeClient,
    current: Arc<Mutex<ContainerCgroups>>,
    redirector: Arc<Mutex<Option<Redirector>>>,
    build: BuildSelection,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let selector = client.settings().selector.clone();
        let pods_now = |index: &crate::kube::PodIndex| -> Vec<String> {
            let cgroups = crate::bpf::cgroup2_mount()
                .map(|m| crate::kube::pod_cgroups(&m))
                .unwrap_or_default();
            match &selector {
                Some(sel) => crate::kube::selected_cgroups(index, sel, &cgroups),
                None => Vec::new(),
            }
        };
        let update = |index: &crate::kube::PodIndex| {
            crate::kube::names::learn(index);
            let pods = off_the_runtime(|| pods_now(index));
            apply(&current, &redirector, &build, "selected pods", |cur| {
                let next = ContainerCgroups {
                    pods,
                    stale: false,
                    ..cur.clone()
                };
                (next != *cur).then_some(next)
            });
        };
        'list: loop {
            let mut index = tokio::select! {
                r = client.list() => match r {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list this node's pods; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(API_RETRY) => continue 'list,
                            _ = stop.changed() => return,
                        }
                    }
                },
                _ = stop.changed() => return,
            };
            tracing::info!(pods = index.len(), "listed this node's pods");
            update(&index);
            // what the watch has applied so far, for the rescans meanwhile
            let latest = Mutex::new(index.clone());
            loop {
                let mut rescan = tokio::time::interval(POD_RESCAN_EVERY);
                let watched = {
                    let w = client.watch(&mut index, |i| {
                        if let Ok(mut l) = latest.lock() {
                            *l = i.clone();
                        }
                        update(i);
                    });
                    tokio::pin!(w);
                    loop {
                        tokio::select! {
                            r = &mut w => break r,
                            _ = rescan.tick() => {
                                let now = latest.lock().ok().map(|l| l.clone());
                                if let Some(i) = now {
                                    update(&i);
                                }
                            }
                            _ = stop.changed() => return,
                        }
                    }
                };
                match watched {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::info!(error = %e, "the pod watch ended; listing again");
                        // a misbehaving server is not asked in a tight loop
                        tokio::select! {
                            _ = tokio::time::sleep(WATCH_RETRY) => continue 'list,
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        }
    })
}

/// The cgroups after a rescan that `found` these glob matches, or `None`
/// when nothing changed. `--container` cgroups that no longer exist are
/// dropped.
fn next_cgroups(
    cur: &ContainerCgroups,
    found: Vec<String>,
    mount: Option<&Path>,
) -> Option<ContainerCgroups> {
    let containers: Vec<String> = match mount {
        Some(m) => cur
            .containers
            .iter()
            .filter(|c| m.join(c.trim_start_matches('/')).is_dir())
            .cloned()
            .collect(),
        None => cur.containers.clone(),
    };
    let next = ContainerCgroups {
        containers,
        globbed: found,
        pods: cur.pods.clone(),
        imaged: cur.imaged.clone(),
        stale: false,
    };
    (next != *cur).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rescan_changes_the_selection_only_when_the_cgroups_changed() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("a")).unwrap();
        let cur = ContainerCgroups {
            containers: vec!["/a".into(), "/gone".into()],
            globbed: vec!["/x".into()],
            pods: vec!["/kubepods/pod1".into()],
            imaged: vec!["/libpod_parent/libpod-1".into()],
            stale: false,
        };
        // the stopped container is dropped even when the glob matches stay
        let next = next_cgroups(&cur, vec!["/x".into()], Some(r)).unwrap();
        assert_eq!(next.containers, ["/a"]);
        assert_eq!(next.globbed, ["/x"]);
        assert_eq!(next_cgroups(&next, vec!["/x".into()], Some(r)), None);
        let more = next_cgroups(&next, vec!["/x".into(), "/y".into()], Some(r)).unwrap();
        assert_eq!(more.all().count(), 5, "the pods and image matches stay");
        // a failed update elsewhere: reapplied even without a change
        let stale = ContainerCgroups {
            stale: true,
            ..more.clone()
        };
        assert_eq!(
            next_cgroups(&stale, more.globbed.clone(), Some(r)),
            Some(more)
        );
    }
}
