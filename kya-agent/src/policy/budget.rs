//! Budget state: sliding windows of forwarded calls, persisted to a state file.
//!
//! Each window is a queue of `(unix milliseconds, amount)` events for one
//! budget and one agent (or agent+tool). Only forwarded calls are recorded
//! (the engine's `record_forwarded`), so denied or still-held calls never use
//! up a budget. The state is keyed by budget *id*, so it survives a policy
//! reload, and it is written to `STATE_DIR/budgets.json` so it survives a
//! restart.
//!
//! **Reservations** close the gap between deciding and forwarding: a call
//! allowed under a budget reserves its amount in the same critical section
//! that checked the budget ([`BudgetState::begin`] → [`BudgetGuard::reserve`]),
//! so concurrent calls see each other and cannot together overshoot it. The
//! reservation becomes a recorded event when the call is forwarded
//! ([`BudgetState::commit`]), and is released when it is not
//! ([`BudgetState::release`]); one never resolved expires after
//! [`RESERVATION_TTL`] (until then it counts: over-counting is a budget's safe
//! side). Reservations live in memory only: a restart ends every call in flight.
//!
//! Writing is off the decision path: a change marks the state dirty and a
//! flusher thread writes it atomically (temp file, fsync, rename, directory
//! fsync) at most every [`FLUSH_INTERVAL`], coalescing bursts; [`BudgetState::flush`]
//! writes at once (shutdown). A crash can therefore forget the calls of the
//! last interval at most — never tear the file, which would stop the next
//! start (a corrupt file is refused rather than reset, as a reset would hand
//! every agent a fresh budget).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
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
/// A reservation neither committed nor released within this long is dropped
/// (longer than any hold a batch's allowed calls may wait behind).
pub const RESERVATION_TTL: Duration = Duration::from_secs(600);
/// Bound on reservations outstanding at once; beyond it a call is refused a
/// reservation and so denied by its budget (fail closed).
pub const MAX_RESERVATIONS: usize = 65_536;

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
    /// key → the sum of its events (kept with every change; not persisted).
    #[serde(skip)]
    sums: HashMap<String, f64>,
    /// key → (sum, count) of its outstanding reservations (not persisted).
    #[serde(skip)]
    pending: HashMap<String, (f64, usize)>,
    /// Outstanding reservations by id (ids increase: the first is the oldest).
    #[serde(skip)]
    reservations: BTreeMap<u64, Reservation>,
    #[serde(skip)]
    next_reservation: u64,
}

/// Amounts reserved by one allowed call, until it is forwarded or not.
#[derive(Debug)]
struct Reservation {
    at: std::time::Instant,
    /// When the call was decided (unix ms): where its events land.
    now_ms: i64,
    items: Vec<BudgetItem>,
}

/// One budget window a call counts toward, with its amount.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetItem {
    pub key: String,
    pub amount: f64,
    pub per: Duration,
}

/// An outstanding reservation's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationId(u64);

/// The budget state locked for one decision: what [`BudgetGuard::used`]
/// reports (recorded events and outstanding reservations) cannot change until
/// the guard is dropped or reserves.
pub struct BudgetGuard<'a> {
    windows: std::sync::MutexGuard<'a, Windows>,
}

impl BudgetGuard<'_> {
    /// Recorded amounts after `now - per` (later stamps included), plus every
    /// outstanding reservation on `key`.
    pub fn used(&self, key: &str, now_ms: i64, per: Duration) -> f64 {
        let reserved = self.windows.pending.get(key).map_or(0.0, |(sum, _)| *sum);
        self.windows.used(key, now_ms, per) + reserved
    }

    /// Reserve `items` for a call decided at `now_ms`. None when the bound on
    /// outstanding reservations is reached (the caller must then not allow).
    pub fn reserve(mut self, now_ms: i64, items: Vec<BudgetItem>) -> Option<ReservationId> {
        let w = &mut *self.windows;
        // Expire the stale ones first (oldest first: ids increase).
        while let Some(entry) = w.reservations.first_entry() {
            if entry.get().at.elapsed() < RESERVATION_TTL {
                break;
            }
            let stale = entry.remove();
            tracing::warn!(
                items = stale.items.len(),
                "a budget reservation was never resolved; dropped"
            );
            w.unpend(&stale.items);
        }
        if w.reservations.len() >= MAX_RESERVATIONS {
            tracing::error!("too many outstanding budget reservations; call refused");
            return None;
        }
        for item in &items {
            let e = w.pending.entry(item.key.clone()).or_insert((0.0, 0));
            e.0 += item.amount;
            e.1 += 1;
        }
        let id = w.next_reservation;
        w.next_reservation += 1;
        w.reservations.insert(
            id,
            Reservation {
                at: std::time::Instant::now(),
                now_ms,
                items,
            },
        );
        Some(ReservationId(id))
    }
}

impl Windows {
    /// After loading: events in time order (files of older versions appended
    /// in arrival order) and their sums.
    fn index(&mut self) {
        self.sums.clear();
        for (key, q) in &mut self.windows {
            q.make_contiguous()
                .sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
            self.sums
                .insert(key.clone(), q.iter().map(|(_, a)| a).sum());
        }
    }

    /// Sum of the events after `now - per`: the window's running sum less the
    /// stale events not yet dropped (events are kept in time order, so those
    /// are found by binary search and are few). Events stamped after `now`
    /// count too: a call decided a moment earlier than one already forwarded
    /// must see it (and a clock stepped back must not hand out fresh budget).
    fn used(&self, key: &str, now_ms: i64, per: Duration) -> f64 {
        let start = now_ms.saturating_sub(per.as_millis().min(i64::MAX as u128) as i64);
        let Some(q) = self.windows.get(key) else {
            return 0.0;
        };
        let total = self.sums.get(key).copied().unwrap_or(0.0);
        let first = q.partition_point(|(t, _)| *t <= start);
        if first == 0 {
            return total;
        }
        total - q.range(..first).map(|(_, a)| a).sum::<f64>()
    }

    fn unpend(&mut self, items: &[BudgetItem]) {
        for item in items {
            if let Some((sum, count)) = self.pending.get_mut(&item.key) {
                *sum -= item.amount;
                *count -= 1;
                // Drop the entry (and any float rounding residue) when
                // nothing else is reserved on the key.
                if *count == 0 {
                    self.pending.remove(&item.key);
                }
            }
        }
    }

    /// Add one event in time order (the caller marks the state dirty).
    fn record(&mut self, key: &str, now_ms: i64, amount: f64, per: Duration) {
        let start = now_ms.saturating_sub(per.as_millis().min(i64::MAX as u128) as i64);
        if !self.windows.contains_key(key) && self.windows.len() >= MAX_WINDOWS {
            // Drop windows with nothing recent rather than grow without bound.
            self.windows
                .retain(|_, q| q.back().is_some_and(|(t, _)| *t > start));
            let windows = &self.windows;
            self.sums.retain(|k, _| windows.contains_key(k));
            if self.windows.len() >= MAX_WINDOWS {
                tracing::warn!(key, "too many budget windows; call not recorded");
                return;
            }
        }
        let q = self.windows.entry(key.to_string()).or_default();
        let sum = self.sums.entry(key.to_string()).or_insert(0.0);
        while let Some((_, a)) = q.front().filter(|(t, _)| *t <= start).copied() {
            q.pop_front();
            *sum -= a;
        }
        if q.is_empty() {
            // Start again from exactly zero (no float residue).
            *sum = 0.0;
        }
        if q.len() >= MAX_EVENTS {
            // Merge the two oldest: the sum stays right, the window only
            // becomes slightly more conservative (the merged event keeps the newer time).
            if let (Some((_, a)), Some(second)) = (q.pop_front(), q.front_mut()) {
                second.1 += a;
            }
        }
        // Nearly always the newest; a call forwarded after a later-decided one
        // (both reserved) lands a few places from the end.
        let at = q.partition_point(|(t, _)| *t <= now_ms);
        q.insert(at, (now_ms, amount));
        *sum += amount;
    }
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
        let mut windows: Windows = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| BudgetError::Corrupt {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Windows::default(),
            Err(source) => return Err(BudgetError::Read { path, source }),
        };
        windows.index();
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

    /// Lock the state for one decision. None when the lock is poisoned (a
    /// panic elsewhere): the caller must count every budget as exhausted.
    pub fn begin(&self) -> Option<BudgetGuard<'_>> {
        self.inner
            .lock()
            .ok()
            .map(|windows| BudgetGuard { windows })
    }

    /// [`BudgetGuard::used`] without holding the lock (infinite when the state
    /// is unusable, so callers fail closed).
    pub fn used(&self, key: &str, now_ms: i64, per: Duration) -> f64 {
        match self.begin() {
            Some(g) => g.used(key, now_ms, per),
            None => f64::INFINITY,
        }
    }

    /// Record a forwarded call's amount, dropping events older than `per`, and persist.
    pub fn record(&self, key: &str, now_ms: i64, amount: f64, per: Duration) {
        {
            let Ok(mut inner) = self.inner.lock() else {
                tracing::error!("budget state lock poisoned; call not recorded");
                return;
            };
            inner.record(key, now_ms, amount, per);
        }
        self.mark_dirty();
    }

    /// The reserved call was forwarded: its reservation becomes recorded
    /// events. False when it is no longer outstanding (expired), in which case
    /// the caller records the call itself.
    pub fn commit(&self, id: ReservationId) -> bool {
        {
            let Ok(mut inner) = self.inner.lock() else {
                tracing::error!("budget state lock poisoned; call not recorded");
                return true;
            };
            let Some(r) = inner.reservations.remove(&id.0) else {
                return false;
            };
            inner.unpend(&r.items);
            for item in &r.items {
                inner.record(&item.key, r.now_ms, item.amount, item.per);
            }
        }
        self.mark_dirty();
        true
    }

    /// The reserved call was not forwarded: give its amounts back.
    pub fn release(&self, id: ReservationId) {
        if let Ok(mut inner) = self.inner.lock() {
            if let Some(r) = inner.reservations.remove(&id.0) {
                inner.unpend(&r.items);
            }
        }
    }

    /// Outstanding reservations (status, tests).
    pub fn reservations(&self) -> usize {
        self.inner.lock().map(|i| i.reservations.len()).unwrap_or(0)
    }

    fn mark_dirty(&self) {
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

    fn item(key: &str, amount: f64) -> BudgetItem {
        BudgetItem {
            key: key.to_string(),
            amount,
            per: H,
        }
    }

    #[test]
    fn reservations_count_until_committed_or_released() {
        let s = BudgetState::in_memory();
        let (a, b) = (window_key("x", "bot", None), window_key("y", "bot", None));
        let r1 = s
            .begin()
            .unwrap()
            .reserve(1_000, vec![item(&a, 300.0), item(&b, 1.0)])
            .unwrap();
        let r2 = s
            .begin()
            .unwrap()
            .reserve(1_001, vec![item(&a, 200.0)])
            .unwrap();
        assert_ne!(r1, r2);
        // Outstanding reservations count, and nothing is recorded yet.
        assert_eq!(s.used(&a, 1_002, H), 500.0);
        assert_eq!(s.used(&b, 1_002, H), 1.0);
        assert_eq!(s.reservations(), 2);
        // Forwarded: the amount moves from reserved to recorded, at decision time.
        assert!(s.commit(r1));
        assert_eq!(s.used(&a, 1_002, H), 500.0);
        assert_eq!(s.begin().unwrap().windows.windows[&a], [(1_000, 300.0)]);
        // Not forwarded: given back; a second resolution is a no-op.
        s.release(r2);
        assert_eq!(s.used(&a, 1_002, H), 300.0);
        assert!(!s.commit(r2), "a released reservation cannot be committed");
        assert!(!s.commit(r1), "nor a committed one twice");
        s.release(r1);
        assert_eq!(s.used(&a, 1_002, H), 300.0);
        assert_eq!(s.reservations(), 0);
        assert!(s.begin().unwrap().windows.pending.is_empty());
    }

    #[test]
    fn running_sums_match_a_full_scan_with_events_out_of_order() {
        let s = BudgetState::in_memory();
        let k = window_key("b", "bot", None);
        // Forwarded in another order than decided (reservations commit at
        // decision time), and queried at times before, inside and after them.
        let events = [
            (5_000, 1.0),
            (3_000, 2.0),
            (4_000, 4.0),
            (9_000, 8.0),
            (3_500, 16.0),
        ];
        for (t, a) in events {
            s.record(&k, t, a, H);
        }
        let times: Vec<i64> = s.begin().unwrap().windows.windows[&k]
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            times,
            [3_000, 3_500, 4_000, 5_000, 9_000],
            "kept in time order"
        );
        // Events after `now` count (see Windows::used).
        let scan = |now: i64, per: i64| -> f64 {
            events
                .iter()
                .filter(|(t, _)| *t > now - per)
                .map(|(_, a)| a)
                .sum()
        };
        for now in [0, 3_000, 3_499, 3_500, 4_500, 5_000, 8_999, 9_000, 20_000] {
            for per in [1_000i64, 2_000, 3_600_000] {
                assert_eq!(
                    s.used(&k, now, Duration::from_millis(per as u64)),
                    scan(now, per),
                    "now {now} per {per}"
                );
            }
        }
    }

    #[test]
    fn a_state_file_in_arrival_order_is_sorted_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let k = window_key("b", "bot", None);
        let file = serde_json::json!({"windows": {k.clone(): [[5_000, 1.0], [3_000, 2.0]]}});
        std::fs::write(dir.path().join(STATE_FILE), file.to_string()).unwrap();
        let s = BudgetState::open(dir.path()).unwrap();
        assert_eq!(s.used(&k, 5_000, H), 3.0);
        assert_eq!(s.used(&k, 4_000, H), 3.0, "a later event counts too");
        assert_eq!(s.used(&k, 5_000, Duration::from_millis(1_500)), 1.0);
    }

    #[test]
    fn reservations_are_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let k = window_key("b", "bot", None);
        {
            let s = BudgetState::open(dir.path()).unwrap();
            s.begin().unwrap().reserve(5, vec![item(&k, 9.0)]).unwrap();
            s.record(&k, 6, 1.0, H);
        }
        let s = BudgetState::open(dir.path()).unwrap();
        assert_eq!(s.used(&k, 10, H), 1.0);
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
