//! Reloading the policy while running: on SIGHUP and when a policy or registry
//! file changes (polled once a second: portable, no inotify limits, and a
//! second's delay is irrelevant for a policy edit). A broken new policy is
//! rejected by [`PolicyEngine::reload`] and the old one keeps running.

use super::diag::Diagnostics;
use super::engine::PolicyEngine;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What the watched files look like now: (path, size, mtime) of every file,
/// including the `*.toml` files inside watched directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint(Vec<(PathBuf, Option<(u64, SystemTime)>)>);

impl Fingerprint {
    /// Take the fingerprint of `paths` (directories expand to their `*.toml` files).
    pub(crate) fn of(paths: &[PathBuf]) -> Fingerprint {
        let mut v = Vec::new();
        for p in paths {
            if p.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|f| f.extension().is_some_and(|e| e == "toml"))
                            .collect()
                    })
                    .unwrap_or_default();
                files.sort();
                for f in files {
                    v.push((f.clone(), stat(&f)));
                }
            } else {
                v.push((p.clone(), stat(p)));
            }
        }
        Fingerprint(v)
    }
}

fn stat(p: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Called after every reload attempt with its result (the new version, or
/// the errors that kept the old policy running): the daemon updates the eBPF
/// selection from the new registry and counts reloads in its metrics.
pub(crate) type OnReload = Box<dyn Fn(&PolicyEngine, &Result<String, Diagnostics>) + Send + Sync>;

/// Spawn the reload task on the current tokio runtime: reload on SIGHUP and
/// whenever the fingerprint of the engine's files changes (checked every `interval`).
pub(crate) fn spawn_watcher(
    engine: Arc<PolicyEngine>,
    interval: Duration,
    on_reload: OnReload,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        let paths = engine.watched_paths();
        let mut last = Fingerprint::of(&paths);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = hup.recv() => "SIGHUP",
                _ = tick.tick() => {
                    let now = Fingerprint::of(&paths);
                    if now == last { continue; }
                    last = now;
                    "file change"
                }
            };
            tracing::info!(trigger = why, "reloading policy");
            // Errors are logged and counted inside reload().
            let result = engine.reload();
            on_reload(&engine, &result);
        }
    }))
}
