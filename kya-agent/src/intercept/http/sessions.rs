//! State that spans connections: legacy SSE sessions and held calls.
//!
//! Both are reached from a *different* connection than the one that created them:
//! a legacy client holds its GET `/sse` stream on one connection and POSTs messages
//! on others, and `notifications/cancelled` for a held call arrives on a new
//! connection while the held one is still open. A daemon runs one interceptor, so
//! these registries are process-wide; keys carry the destination and the server's
//! own session identifiers, so two servers never share an entry. Both are bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// Most concurrent legacy SSE sessions tracked.
pub(crate) const MAX_LEGACY_SESSIONS: usize = 4096;
/// Most held calls tracked for cancellation (per-connection limits apply first).
pub(crate) const MAX_HELD: usize = 16384;

static NEXT: AtomicU64 = AtomicU64::new(1);

#[derive(Default)]
struct Tables {
    legacy: HashMap<String, (u64, mpsc::Sender<Value>)>,
    /// Several calls may be held under one key: without an `Mcp-Session-Id`
    /// (stateless servers), two client sessions in one process can use the
    /// same JSON-RPC id at once.
    held: HashMap<String, Vec<(u64, oneshot::Sender<()>)>>,
    held_count: usize,
}

static TABLES: LazyLock<Mutex<Tables>> = LazyLock::new(|| Mutex::new(Tables::default()));

fn with<T>(f: impl FnOnce(&mut Tables) -> T) -> T {
    // A poisoned lock only means another task panicked mid-update of a map of
    // senders; the maps are still usable.
    let mut guard = TABLES.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard)
}

/// A legacy session's message URL is registered while its SSE stream lives; the
/// guard removes it when the stream ends.
pub(crate) struct LegacyGuard {
    key: String,
    generation: u64,
}

impl Drop for LegacyGuard {
    fn drop(&mut self) {
        with(|t| {
            if t.legacy
                .get(&self.key)
                .is_some_and(|(g, _)| *g == self.generation)
            {
                t.legacy.remove(&self.key);
            }
        });
    }
}

/// Register the message URL `key` of a legacy SSE session; messages sent into the
/// returned channel are injected into that session's stream. `None` when the table
/// is full.
pub(crate) fn register_legacy(key: String) -> Option<(LegacyGuard, mpsc::Receiver<Value>)> {
    let (tx, rx) = mpsc::channel(64);
    let generation = NEXT.fetch_add(1, Ordering::Relaxed);
    with(|t| {
        if t.legacy.len() >= MAX_LEGACY_SESSIONS && !t.legacy.contains_key(&key) {
            return None;
        }
        t.legacy.insert(key.clone(), (generation, tx));
        Some((LegacyGuard { key, generation }, rx))
    })
}

/// The injector of the legacy session whose message URL is `key`, if one is live.
pub(crate) fn legacy_injector(key: &str) -> Option<mpsc::Sender<Value>> {
    with(|t| t.legacy.get(key).map(|(_, tx)| tx.clone()))
}

/// A held call registered for cancellation; dropping it unregisters.
pub(crate) struct HeldGuard {
    key: String,
    generation: u64,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        with(|t| {
            if let Some(list) = t.held.get_mut(&self.key) {
                let before = list.len();
                list.retain(|(g, _)| *g != self.generation);
                t.held_count -= before - list.len();
                if list.is_empty() {
                    t.held.remove(&self.key);
                }
            }
        });
    }
}

/// Register a held call under `key`; the receiver fires when the client cancels it.
/// `None` only when the table is full ([`MAX_HELD`]).
pub(crate) fn register_held(key: String) -> Option<(HeldGuard, oneshot::Receiver<()>)> {
    let (tx, rx) = oneshot::channel();
    let generation = NEXT.fetch_add(1, Ordering::Relaxed);
    with(|t| {
        if t.held_count >= MAX_HELD {
            return None;
        }
        t.held
            .entry(key.clone())
            .or_default()
            .push((generation, tx));
        t.held_count += 1;
        Some((HeldGuard { key, generation }, rx))
    })
}

/// Cancel the held calls under `key`; returns whether any was held. Without a
/// session id the key is the calling process and URL, so a cancellation can
/// only ever end that process's own calls (ending a call is the safe side).
pub(crate) fn cancel_held(key: &str) -> bool {
    with(|t| match t.held.remove(key) {
        Some(list) => {
            t.held_count -= list.len();
            for (_, tx) in list {
                let _ = tx.send(());
            }
            true
        }
        None => false,
    })
}

/// The key of a held call: destination, server, session and the request id.
pub(crate) fn held_key(
    dst: &std::net::SocketAddr,
    server: &str,
    session: Option<&str>,
    id: &Value,
) -> String {
    format!("{dst}|{server}|{}|{id}", session.unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_register_lookup_and_drop() {
        let (g, mut rx) = register_legacy("t1|/messages?s=1".into()).unwrap();
        let tx = legacy_injector("t1|/messages?s=1").unwrap();
        tx.try_send(Value::from(1)).unwrap();
        assert_eq!(rx.try_recv().unwrap(), Value::from(1));
        drop(g);
        assert!(legacy_injector("t1|/messages?s=1").is_none());
    }

    #[test]
    fn replaced_legacy_entry_survives_old_guard() {
        let (old, _rx1) = register_legacy("t2|/m".into()).unwrap();
        let (_new, _rx2) = register_legacy("t2|/m".into()).unwrap();
        drop(old);
        assert!(legacy_injector("t2|/m").is_some());
    }

    #[test]
    fn held_cancel_and_duplicates() {
        let (g, mut rx) = register_held("t3|1".into()).unwrap();
        // Two stateless sessions of one process may hold the same id at once.
        let (g2, mut rx2) = register_held("t3|1".into()).unwrap();
        drop(g2);
        assert!(
            rx2.try_recv().is_err(),
            "dropping unregisters, never cancels"
        );
        let (_g3, mut rx3) = register_held("t3|1".into()).unwrap();
        assert!(cancel_held("t3|1"));
        assert!(rx.try_recv().is_ok());
        assert!(rx3.try_recv().is_ok());
        assert!(!cancel_held("t3|1"));
        drop(g);
        assert!(register_held("t3|1".into()).is_some());
    }
}
