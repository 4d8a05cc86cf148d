//! The forwarding ledger: allowed calls waiting to be forwarded, so budgets
//! count a call only when the proxy really sends it.

use crate::policy::budget::ReservationId;
use crate::policy::{CallContext, PolicyEngine};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Allowed calls waiting to be forwarded: budgets count a call only when the
/// proxy really sends it (a batch with a denied member sends none). A call
/// allowed under a budget carries the reservation made when it was decided.
pub(super) struct ToForward {
    engine: Arc<PolicyEngine>,
    waiting: std::sync::Mutex<std::collections::HashMap<String, Waiting>>,
}

/// An allowed call not yet forwarded: since when, what, and its reservation.
type Waiting = (Instant, CallContext, Option<ReservationId>);

/// Allowed calls remembered at once; beyond it a call is counted at once
/// (over-counting is the safe side of a budget).
const MAX_TO_FORWARD: usize = 65_536;
/// An allowed call not forwarded within this long never will be.
const FORWARD_WINDOW: Duration = Duration::from_secs(600);

impl ToForward {
    pub(super) fn new(engine: Arc<PolicyEngine>) -> Self {
        Self {
            engine,
            waiting: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub(super) fn allowed(
        &self,
        decision_id: &str,
        ctx: CallContext,
        reservation: Option<ReservationId>,
    ) {
        if ctx.method != "tools/call" {
            if let Some(r) = reservation {
                self.engine.release(r);
            }
            return;
        }
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() >= MAX_TO_FORWARD {
            let stale: Vec<String> = w
                .iter()
                .filter(|(_, (at, _, _))| at.elapsed() >= FORWARD_WINDOW)
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                if let Some((_, _, Some(r))) = w.remove(&k) {
                    self.engine.release(r);
                }
            }
        }
        if w.len() >= MAX_TO_FORWARD {
            drop(w);
            match reservation {
                Some(r) => self.engine.commit_forwarded(r, &ctx),
                None => self.engine.record_forwarded(&ctx),
            }
            return;
        }
        w.insert(decision_id.to_string(), (Instant::now(), ctx, reservation));
    }

    fn take(&self, decision_id: &str) -> Option<Waiting> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(decision_id)
    }

    pub(super) fn forwarded(&self, decision_id: &str) {
        match self.take(decision_id) {
            Some((_, ctx, Some(r))) => self.engine.commit_forwarded(r, &ctx),
            Some((_, ctx, None)) => self.engine.record_forwarded(&ctx),
            None => {}
        }
    }

    pub(super) fn not_forwarded(&self, decision_id: &str) {
        if let Some((_, _, Some(r))) = self.take(decision_id) {
            self.engine.release(r);
        }
    }
}
