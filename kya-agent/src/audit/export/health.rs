//! What each export sink reports about itself (for `kya status`), and how
//! a sink's failure is counted.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A sink's counters, for `kya status`.
#[derive(Debug, Default, Serialize)]
pub(crate) struct SinkHealth {
    pub sink: String,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub failures: AtomicU64,
    /// Messages cut to fit the transport (syslog).
    pub truncated: AtomicU64,
    #[serde(skip)]
    pub last_error: Mutex<Option<String>>,
}

impl SinkHealth {
    /// A JSON snapshot.
    pub(crate) fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "sink": self.sink,
            "written": self.written.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "truncated": self.truncated.load(Ordering::Relaxed),
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }
}

pub(crate) fn fail(health: &SinkHealth, message: String) {
    health.failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(sink = %health.sink, error = %message, "export sink write failed");
    *health.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
}
