//! Budget state: sliding windows of forwarded calls, persisted to a state file.
//!
//! Each window is a queue of `(unix milliseconds, amount)` events for one
//! budget and one agent (or agent+tool). Only forwarded calls are recorded
//! (the engine's `record_forwarded`), so denied or still-held calls never use
//! up a budget. The state is keyed by budget *id*, so it survives a policy
//! reload, and it is written to `STATE_DIR/budgets.json` so it survives a
//! restart.
//!
//! Writing is off the decision path: a change marks the state dirty and a
//! flusher thread writes it atomically (temp file, fsync, rename, directory
//! fsync) at most every [`FLUSH_INTERVAL`], coalescing bursts; [`BudgetState::flush`]
//! writes at once (shutdown). A crash can therefore forget the calls of the
//! last interval at most — never tear the file, which would stop the next
//! start (a corrupt file is refused rather than reset, as a reset would hand
//! every agent a fresh budget).

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

/// Longest time a recorded call waits to be written to the state file.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The state file name inside the state directory.
pub const STATE_FILE: &str = "budgets.json";
/// Bound on windows kept (budgets × agents × tools).
pub const MAX_WINDOWS: usize = 65_536;
/// Bound on events kept per window (older ones are merged into one).
pub const MAX_EVENTS: usize = 100_000;

/// Errors reading or writing budget state.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The state file exists but cannot be read.
    #[error("cannot read budget state {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The state file is not valid budget state. It is not silently reset:
    /// that would hand every agent a fresh budget.
    #[error("budget state {path} is corrupt: {source} (move it away to reset all budgets)")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Windows {
    /// key → events (unix ms, amount), oldest first.
    windows: HashMap<String, VecDeque<(i64, f64)>>,
}

/// The key of one window.
pub fn window_key(budget: &str, agent: &str, tool: Option<&str>) -> String {
    // \u{1f} (unit separator) cannot appear in ids (validated) and is unlikely in names.
    match tool {
        Some(t) => format!("{budget}\u{1f}{agent}\u{1f}{t}"),
        None => format!("{budget}\u{1f}{agent}"),
    }
}

/// Sliding windows behind a mutex; optionally persisted.
#[derive(Debug, Default)]
pub struct BudgetState {
    path: Option<PathBuf>,
    inner: Mutex<Windows>,
    flush: Arc<Flush>,
}

/// The flusher's signal: set by changes, taken by the writer.
#[derive(Debug, Default)]
struct Flush {
    dirty: Mutex<bool>,
    wake: Condvar,
    /// Serialises writers (the flusher and an explicit flush).
    writing: Mutex<()>,
}

impl BudgetState {
    /// In-memory only (tests, `kya policy test`).
    pub fn in_memory() -> BudgetState {
        BudgetState::default()
    }

    /// Load (or start) the state file `dir/budgets.json`, and start its flusher.
    pub fn open(dir: &Path) -> Result<Arc<BudgetState>, BudgetError> {
        let path = dir.join(STATE_FILE);
        let windows = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| BudgetError::Corrupt {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Windows::default(),
            Err(source) => return Err(BudgetError::Read { path, source }),
        };
        let state = Arc::new(BudgetState {
            path: Some(path),
            inner: Mutex::new(windows),
            flush: Arc::default(),
        });
        let weak = Arc::downgrade(&state);
        let flush = state.flush.clone();
        let spawned = std::thread::Builder::new()
            .name("kya-budgets".into())
            .spawn(move || flusher(weak, flush));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no budget flusher thread: budgets are written only at shutdown");
        }
        Ok(state)
    }

    /// Sum of amounts in the window `(now - per, now]`.
    pub fn used(&self, key: &str, now_ms: i64, per: Duration) -> f64 {
        let start = now_ms.saturating_sub(per.as_millis().min(i64::MAX as u128) as i64);
        let Ok(inner) = self.inner.lock() else {
            // A poisoned lock means a panic elsewhere; report the budget as
            // exhausted so the caller fails closed.
            return f64::INFINITY;
        };
        inner
            .windows
            .get(key)
            .map(|q| {
                q.iter()
                    .filter(|(t, _)| *t > start && *t <= now_ms)
                    .map(|(_, a)| a)
                    .sum()
            })
            .unwrap_or(0.0)
    }

    /// Record a forwarded call's amount, dropping events older than `per`, and persist.
    pub fn record(&self, key: &str, now_ms: i64, amount: f64, per: Duration) {
        let start = now_ms.saturating_sub(per.as_millis().min(i64::MAX as u128) as i64);
        {
            let Ok(mut inner) = self.inner.lock() else {
                tracing::error!("budget state lock poisoned; call not recorded");
                return;
            };
            if !inner.windows.contains_key(key) && inner.windows.len() >= MAX_WINDOWS {
                // Drop windows with nothing recent rather than grow without bound.
                inner
                    .windows
                    .retain(|_, q| q.back().is_some_and(|(t, _)| *t > start));
                if inner.windows.len() >= MAX_WINDOWS {
                    tracing::warn!(key, "too many budget windows; call not recorded");
                    return;
                }
            }
            let q = inner.windows.entry(key.to_string()).or_default();
            while q.front().is_some_and(|(t, _)| *t <= start) {
                q.pop_front();
            }
            if q.len() >= MAX_EVENTS {
                // Merge the two oldest: the sum stays right, the window only
                // becomes slightly more conservative (the merged event keeps the newer time).
                if let (Some((_, a)), Some(second)) = (q.pop_front(), q.front_mut()) {
                    second.1 += a;
                }
            }
            q.push_back((now_ms, amount));
        }
        if self.path.is_some() {
            let mut dirty = self.flush.dirty.lock().unwrap_or_else(|p| p.into_inner());
            *dirty = true;
            self.flush.wake.notify_one();
        }
    }

    /// Write the state now if anything changed since the last write.
    pub fn flush(&self) {
        let Some(path) = &self.path else { return };
        let _writing = self.flush.writing.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut dirty = self.flush.dirty.lock().unwrap_or_else(|p| p.into_inner());
            if !*dirty {
                return;
            }
            *dirty = false;
        }
        let json = match self.inner.lock() {
            Ok(inner) => serde_json::to_vec(&*inner),
            Err(_) => return,
        };
        let result = json
            .map_err(std::io::Error::other)
            .and_then(|j| crate::fsutil::write_atomic(path, &j));
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "cannot persist budget state; retrying");
            *self.flush.dirty.lock().unwrap_or_else(|p| p.into_inner()) = true;
        }
    }
}

impl Drop for BudgetState {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Write dirty state at most every [`FLUSH_INTERVAL`] until the state is dropped.
/// Waiting holds no strong reference, so dropping the state (which flushes)
/// happens where its owner drops it, not later in this thread.
fn flusher(state: Weak<BudgetState>, flush: Arc<Flush>) {
    loop {
        {
            let dirty = flush.dirty.lock().unwrap_or_else(|p| p.into_inner());
            // Wake on a change, or now and then to notice the state was dropped.
            let (dirty, _) = flush
                .wake
                .wait_timeout_while(dirty, Duration::from_secs(1), |d| !*d)
                .unwrap_or_else(|p| p.into_inner());
            if !*dirty {
                if state.strong_count() == 0 {
                    return;
                }
                continue;
            }
        }
        // Let a burst of calls share one write.
        std::thread::sleep(FLUSH_INTERVAL);
        let Some(s) = state.upgrade() else { return };
        s.flush();
    }
}

#[cfg(test)]
impl BudgetState {
    fn open_windows(path: &Path) -> Option<Windows> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn sliding_window_forgets_old_events() {
        let s = BudgetState::in_memory();
        let k = window_key("b", "bot", None);
        s.record(&k, 1_000, 1.0, H);
        s.record(&k, 1_000 + 1_800_000, 2.0, H);
        assert_eq!(s.used(&k, 1_000 + 1_800_000, H), 3.0);
        // Exactly one hour after the first event it is out of the window.
        assert_eq!(s.used(&k, 1_000 + 3_600_000, H), 2.0);
        assert_eq!(s.used(&k, 1_000 + 1_800_000 + 3_600_000, H), 0.0);
        assert_eq!(s.used(&window_key("b", "other", None), 2_000, H), 0.0);
    }

    #[test]
    fn survives_restart_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let k = window_key("daily", "bot", Some("transfer"));
        {
            let s = BudgetState::open(dir.path()).unwrap();
            s.record(&k, 10_000, 700.0, H);
        }
        // Dropping the state flushed it.
        let s = BudgetState::open(dir.path()).unwrap();
        assert_eq!(s.used(&k, 10_001, H), 700.0);
        // The flusher writes a change within its interval, without a drop.
        s.record(&k, 10_002, 1.0, H);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let on_disk = BudgetState::open_windows(&dir.path().join(STATE_FILE));
            if on_disk.is_some_and(|w| w.windows.get(&k).is_some_and(|q| q.len() == 2)) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "not flushed");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(s);
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(
            BudgetState::open(dir.path()),
            Err(BudgetError::Corrupt { .. })
        ));
        std::fs::write(dir.path().join(STATE_FILE), b"{\"windows\":{},\"extra\":1}").unwrap();
        assert!(BudgetState::open(dir.path()).is_err());
    }

    #[test]
    fn concurrent_records_are_all_kept_and_the_file_is_never_torn() {
        let dir = tempfile::tempdir().unwrap();
        let k = window_key("b", "bot", None);
        let s = BudgetState::open(dir.path()).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let s = &s;
                let k = &k;
                let file = dir.path().join(STATE_FILE);
                scope.spawn(move || {
                    for i in 0..250 {
                        s.record(k, 1_000 + t * 1_000 + i, 1.0, H);
                        if i % 50 == 0 {
                            // Every read of the file in between parses.
                            if let Ok(bytes) = std::fs::read(&file) {
                                serde_json::from_slice::<Windows>(&bytes).unwrap();
                            }
                        }
                    }
                });
            }
        });
        s.flush();
        drop(s);
        let again = BudgetState::open(dir.path()).unwrap();
        assert_eq!(again.used(&k, 10_000, H), 1000.0);
    }

    #[test]
    fn event_cap_keeps_the_sum() {
        let s = BudgetState::in_memory();
        let k = window_key("b", "bot", None);
        for i in 0..(MAX_EVENTS as i64 + 10) {
            s.record(&k, 1 + i, 1.0, Duration::from_secs(86_400 * 30));
        }
        assert_eq!(
            s.used(&k, MAX_EVENTS as i64 + 10, Duration::from_secs(86_400 * 30)),
            (MAX_EVENTS + 10) as f64
        );
    }
}
