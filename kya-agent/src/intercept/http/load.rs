//! What the proxy shares across connections to stay bounded under load:
//! calls held per process, and the count of each limit's refusals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How many times each limit refused something (exported as metrics).
#[derive(Debug, Default)]
pub struct LimitRefusals {
    /// Requests with more header fields than `max_headers`.
    pub headers: AtomicU64,
    /// Agent connections closed because a request's headers (or the next
    /// request on an idle kept-alive connection) did not arrive within
    /// `body_timeout`.
    pub slow_headers: AtomicU64,
    /// Requests whose server sent no answer within `response_timeout`.
    pub no_answer: AtomicU64,
    /// Request bodies over `max_body`.
    pub body: AtomicU64,
    /// Request bodies not received within `body_timeout`.
    pub slow_body: AtomicU64,
    /// Server answers over `max_response_body`, or not received within
    /// `response_timeout`.
    pub response: AtomicU64,
    /// Server event streams ended at an event over `max_sse_event`.
    pub sse_event: AtomicU64,
    /// Holds refused: `max_held_per_conn` held on the connection.
    pub held_per_conn: AtomicU64,
    /// Holds refused: `max_held_per_process` held for the process.
    pub held_per_process: AtomicU64,
}

impl LimitRefusals {
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Calls held for approval per process (thread group), across all its
/// connections.
#[derive(Debug, Default)]
pub struct HeldByProcess(Mutex<HashMap<u32, usize>>);

/// Held calls counted against a process; dropping it gives them back.
pub(crate) struct ProcessHolds {
    table: Arc<HeldByProcess>,
    pid: u32,
    n: usize,
}

impl HeldByProcess {
    /// Count `n` more held calls of `pid`, unless that would take it past `limit`.
    pub(crate) fn enter(
        self: &Arc<Self>,
        pid: u32,
        n: usize,
        limit: usize,
    ) -> Option<ProcessHolds> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let held = map.entry(pid).or_insert(0);
        if *held + n > limit {
            if *held == 0 {
                map.remove(&pid);
            }
            return None;
        }
        *held += n;
        Some(ProcessHolds {
            table: self.clone(),
            pid,
            n,
        })
    }

    /// Calls of `pid` held now.
    pub fn held(&self, pid: u32) -> usize {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&pid).copied().unwrap_or(0)
    }
}

impl ProcessHolds {
    /// Split off one held call's share (the rest stays counted here).
    pub(crate) fn take_one(&mut self) -> Option<ProcessHolds> {
        if self.n == 0 {
            return None;
        }
        self.n -= 1;
        Some(ProcessHolds {
            table: self.table.clone(),
            pid: self.pid,
            n: 1,
        })
    }
}

impl Drop for ProcessHolds {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        let mut map = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.get_mut(&self.pid) {
            *held = held.saturating_sub(self.n);
            if *held == 0 {
                map.remove(&self.pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_bounded_per_process_and_given_back() {
        let t = Arc::new(HeldByProcess::default());
        let mut a = t.enter(1, 3, 4).expect("under the limit");
        assert!(t.enter(1, 2, 4).is_none());
        let b = t.enter(2, 4, 4).expect("another process has its own");
        let one = a.take_one().expect("one");
        drop(a);
        assert_eq!(t.held(1), 1);
        assert!(t.enter(1, 4, 4).is_none());
        drop(one);
        assert_eq!(t.held(1), 0);
        drop(b);
        assert_eq!(t.held(2), 0);
        assert!(t.0.lock().unwrap().is_empty());
    }
}
