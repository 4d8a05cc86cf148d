//! Blocking work of the decision path, off the async workers.
//!
//! The credential store takes an exclusive `flock` (which a `kya credential`
//! command may hold) and `fdatasync`s what it spends; the approvals journal
//! waits for its group `fdatasync` when a hold begins and writes (sometimes
//! compacts) under its lock when one ends; the first decision of a connection reads
//! `/proc`. None of that may run on an async worker: a worker stuck in one
//! stalls every connection it serves. Such work runs on tokio's blocking
//! pool, at most [`MAX_BLOCKING`] jobs at once; further jobs wait as futures
//! (never as threads), so a stuck lock holds at most that many threads and
//! the calls that need no blocking work keep flowing.

use std::sync::Arc;
use tokio::sync::Semaphore;

/// Blocking jobs of the decision path running at once.
pub(crate) const MAX_BLOCKING: usize = 64;

/// The blocking work could not run (the runtime is shutting down, or the job
/// panicked).
#[derive(Debug, thiserror::Error)]
#[error("blocking work of the decision path did not complete: {0}")]
pub(crate) struct OffloadError(String);

/// A bounded door to the blocking pool.
#[derive(Clone)]
pub(crate) struct Offload {
    permits: Arc<Semaphore>,
}

impl Offload {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    /// Run `job` on the blocking pool once a place is free.
    pub(crate) async fn run<T, F>(&self, job: F) -> Result<T, OffloadError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| OffloadError(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|e| OffloadError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_job_does_not_block_the_worker() {
        let offload = Offload::new(1);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let stuck = tokio::spawn({
            let offload = offload.clone();
            async move { offload.run(move || wait.recv().is_ok()).await }
        });
        // On a single-threaded runtime this only runs if the stuck job is
        // not holding the worker.
        tokio::task::yield_now().await;
        let other = tokio::spawn(async { 7 }).await.unwrap();
        assert_eq!(other, 7);
        release.send(()).unwrap();
        assert!(stuck.await.unwrap().unwrap());
        assert_eq!(offload.run(|| 1 + 1).await.unwrap(), 2);
    }
}
