//! A decision on its way to its final record.
//!
//! Every decision id kya hands out ends in exactly one final audit record
//! (`decision`, `approved`, `rejected`, `expired`, `cancelled` or
//! `interrupted`; a `hold` is not final). [`OpenDecision`] makes that true by
//! construction: every path of the decision must consume it with
//! [`OpenDecision::end`], and if it is dropped instead (the agent went away and
//! the proxy dropped the decision's future, or kya stopped and aborted the
//! connection) its `Drop` hands the final record to the audit writer itself:
//! `interrupted` when kya is stopping, `cancelled` otherwise.

use super::events::EventHub;
use super::record::EventFacts;
use crate::audit::event::{ApprovalInfo, EventKind};
use crate::audit::writer::{AuditLog, Durability};
use crate::audit::DecisionEvent;
use crate::metrics::Metrics;
use kya_common::Verdict;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The rule of a decision kya could not record (the call is denied).
pub(super) const AUDIT_UNAVAILABLE: &str = "kya:audit-unavailable";

/// Whether kya is stopping: decisions ended from now on by being dropped are
/// `interrupted`, not `cancelled`.
#[derive(Debug, Default)]
pub(super) struct Stopping(AtomicBool);

impl Stopping {
    pub(super) fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub(super) fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where a decision's records go.
#[derive(Clone)]
pub(super) struct Sinks {
    pub(super) audit: Arc<AuditLog>,
    pub(super) events: Arc<EventHub>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) stopping: Arc<Stopping>,
}

/// A decision whose final record is not written yet (see the module docs).
pub(super) struct OpenDecision {
    sinks: Sinks,
    facts: EventFacts,
    /// The approval id once the decision is held.
    hold_id: Option<String>,
    /// Cleared when the final record has been handed to the writer.
    open: bool,
}

impl OpenDecision {
    pub(super) fn new(sinks: Sinks, facts: EventFacts) -> Self {
        Self {
            sinks,
            facts,
            hold_id: None,
            open: true,
        }
    }

    /// The decision's rule and reason, when kya itself ends it another way
    /// than the policy said (no approver, too many holds, stopping...).
    pub(super) fn set_outcome(&mut self, rule: Option<String>, reason: String) {
        self.facts.set_outcome(rule, reason);
    }

    /// From now on the decision is held under approval `id`.
    pub(super) fn held(&mut self, id: &str) {
        self.hold_id = Some(id.to_string());
    }

    /// The approval part of a record of this (held) decision.
    pub(super) fn hold_info(&self) -> Option<ApprovalInfo> {
        self.hold_id.as_ref().map(|id| ApprovalInfo {
            id: id.clone(),
            ..ApprovalInfo::default()
        })
    }

    /// Whether kya is stopping.
    pub(super) fn stopping(&self) -> bool {
        self.sinks.stopping.is_set()
    }

    /// Write a record that does not end the decision (a `hold`), durably.
    pub(super) async fn record_hold(&self) -> Result<(), String> {
        let event = self
            .facts
            .event(EventKind::Hold, Verdict::Hold, self.hold_info(), None);
        record(&self.sinks, event, Durability::Sync).await
    }

    /// Write the final record and close the decision. `Err` is the audit
    /// error (the caller fails closed); the decision is closed either way:
    /// when the record could not be written, a denial naming the failure is
    /// handed to the writer in its place (best effort: the log may be down).
    pub(super) async fn end(
        mut self,
        kind: EventKind,
        verdict: Verdict,
        approval: Option<ApprovalInfo>,
        credential_id: Option<String>,
        durability: Durability,
    ) -> Result<(), String> {
        debug_assert!(kind.is_final());
        let event = self.facts.event(kind, verdict, approval, credential_id);
        let started = Instant::now();
        // Reserving may wait (a full queue); dropped while waiting, the guard
        // is still open and writes the record itself. Sending never waits:
        // from that instant the record is the writer's, so the guard closes.
        let sent = match self.sinks.audit.reserve(durability).await {
            Ok(slot) => slot.send(&event).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let result = match sent {
            Ok(written) => {
                self.open = false;
                written.await.map(|_| ()).map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.open = false;
                if durability == Durability::Sync {
                    self.sinks
                        .metrics
                        .audit_write_latency
                        .observe(started.elapsed().as_secs_f64());
                }
                self.sinks.events.publish(event);
                Ok(())
            }
            Err(e) => {
                self.sinks.metrics.audit_write_failures.inc();
                tracing::error!(error = %e, decision = %event.decision_id, "audit append failed");
                self.open = false;
                let reason = format!(
                    "the audit log could not record this decision ({e}); consequential calls are denied"
                );
                self.facts
                    .set_outcome(Some(AUDIT_UNAVAILABLE.into()), reason);
                let denial =
                    self.facts
                        .event(EventKind::Decision, Verdict::Deny, self.hold_info(), None);
                detach(&self.sinks, denial);
                Err(e)
            }
        }
    }
}

impl Drop for OpenDecision {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let (kind, why) = if self.sinks.stopping.is_set() {
            (
                EventKind::Interrupted,
                "kya stopped before the decision ended; the call was denied",
            )
        } else {
            (
                EventKind::Cancelled,
                "the call was given up before its decision ended (the agent went away or cancelled it, or kya stopped holding it on that session); nothing was forwarded",
            )
        };
        let reason = format!("{why} ({})", self.facts.reason());
        let rule = self.facts.rule();
        self.facts.set_outcome(rule, reason);
        let event = self
            .facts
            .event(kind, Verdict::Deny, self.hold_info(), None);
        detach(&self.sinks, event);
    }
}

/// Write `event` (durability as asked); publish it once it is accepted.
pub(super) async fn record(
    sinks: &Sinks,
    event: DecisionEvent,
    durability: Durability,
) -> Result<(), String> {
    let started = Instant::now();
    if let Err(e) = sinks.audit.append(&event, durability).await {
        sinks.metrics.audit_write_failures.inc();
        tracing::error!(error = %e, decision = %event.decision_id, "audit append failed");
        return Err(e.to_string());
    }
    if durability == Durability::Sync {
        sinks
            .metrics
            .audit_write_latency
            .observe(started.elapsed().as_secs_f64());
    }
    sinks.events.publish(event);
    Ok(())
}

/// Hand `event` to the writer without waiting (see
/// [`AuditLog::append_detached`]) and publish it.
fn detach(sinks: &Sinks, event: DecisionEvent) {
    match sinks.audit.append_detached(&event) {
        Ok(()) => sinks.events.publish(event),
        Err(e) => {
            sinks.metrics.audit_write_failures.inc();
            tracing::error!(error = %e, decision = %event.decision_id, kind = event.kind.as_str(),
                "cannot record the end of a decision");
        }
    }
}
