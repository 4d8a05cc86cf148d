//! The one decision point: every JSON-RPC message the proxy sees, in either
//! direction, over every transport, is decided here.
//!
//! [`DecisionPath`] implements the proxy's [`Governor`] seam. For each call it
//! resolves the agent from the process, looks for a standing credential that
//! covers exactly this call, asks the policy engine, and then:
//!
//! * **allow**: records the decision (group commit) and lets the proxy forward;
//! * **deny**: records it and answers the agent with the rule and reason;
//! * **hold**: records the hold durably, creates a pending approval for the
//!   owner and keeps the call open; an approval mints a single-use,
//!   action-scoped credential, verifies and spends it, records the approval
//!   durably, and only then releases the call. A denial, a timeout, a
//!   suspension or the agent giving up ends the hold as a denial.
//!
//! If the audit log cannot be written, `tools/call` is denied (fail closed).

pub mod events;
mod offload;
mod open;
mod record;
pub mod restart;
pub mod sinks;
pub mod syslog;

use crate::agents::Suspensions;
use crate::approvals::{ActionRequest, Answer, Approvals, Outcome};
use crate::audit::event::ProcessInfo;
use crate::audit::event::{ApprovalInfo, EventKind};
use crate::audit::writer::{AuditLog, Durability};
use crate::credential::action::{self, AgentSubject, Channel, Environment, Evidence, Scope};
use crate::credential::service;
use crate::credential::store::{Covering, CredentialStore};
use crate::credential::verify::{self, Call as CredCall};
use crate::intercept::http::{BoxFuture, CallFacts, ConnFacts, Direction, Governor, Ruling};
use crate::metrics::{ApprovalLabels, DecisionLabels, Metrics};
use crate::policy::budget::ReservationId;
use crate::policy::{AgentInfo, CallContext, Decide, Decision, PolicyEngine};
use ed25519_dalek::SigningKey;
use events::EventHub;
use kya_common::Verdict;
use offload::Offload;
use open::{OpenDecision, Sinks, Stopping};
use record::EventFacts;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// How long a credential minted for one approved call stays valid: long
/// enough to forward the call, short enough to be useless later.
pub const APPROVAL_CREDENTIAL_TTL: Duration = Duration::from_secs(120);

/// The reason a held call is denied when kya stops.
pub const STOPPING_REASON: &str = "kya is stopping; the call was not forwarded";

/// The daemon's decision path.
pub struct DecisionPath {
    core: Arc<Core>,
}

/// What every decision uses; shared by the decisions in flight.
struct Core {
    engine: Arc<PolicyEngine>,
    suspensions: Arc<Suspensions>,
    budget: Arc<ToForward>,
    approvals: Arc<Approvals>,
    credentials: Arc<CredentialStore>,
    key: Arc<SigningKey>,
    sinks: Sinks,
    offload: Offload,
    host: String,
}

impl DecisionPath {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Arc<PolicyEngine>,
        approvals: Arc<Approvals>,
        credentials: Arc<CredentialStore>,
        key: Arc<SigningKey>,
        audit: Arc<AuditLog>,
        events: Arc<EventHub>,
        metrics: Arc<Metrics>,
        suspensions: Arc<Suspensions>,
    ) -> Self {
        let host = host_name();
        Self {
            core: Arc::new(Core {
                budget: Arc::new(ToForward::new(engine.clone())),
                suspensions,
                engine,
                approvals,
                credentials,
                key,
                sinks: Sinks {
                    audit,
                    events,
                    metrics,
                    stopping: Arc::new(Stopping::default()),
                },
                offload: Offload::new(offload::MAX_BLOCKING),
                host,
            }),
        }
    }

    /// kya is stopping: every held call is denied now (its final record is
    /// `interrupted`), new holds are denied at once, and any decision dropped
    /// from now on (its connection aborted) is recorded as `interrupted`.
    /// Returns how many held calls were ended.
    pub fn stop(&self) -> usize {
        self.core.sinks.stopping.set();
        self.core.approvals.cancel_all(STOPPING_REASON)
    }
}

impl Core {
    fn credential_call(&self, call: &CallFacts, agent: &AgentInfo) -> Option<CredCall> {
        if call.method != "tools/call" {
            return None;
        }
        let p = &call.conn.process;
        Some(CredCall {
            agent: agent.name.clone(),
            uid: p.uid,
            cgroup: p.cgroup.clone(),
            exe_sha256: self.engine.registry().exe_hash(p),
            host: self.host.clone(),
            server: call.server.clone(),
            method: call.method.clone(),
            tool: call.tool.clone().unwrap_or_default(),
            args: call.args.clone(),
        })
    }

    fn count(&self, verdict: Verdict, agent: &str, rule: Option<&str>, started: Instant) {
        let metrics = &self.sinks.metrics;
        metrics
            .decisions
            .get_or_create(&DecisionLabels {
                verdict: verdict.as_str().into(),
                agent: agent.into(),
                rule: rule.unwrap_or("default").into(),
            })
            .inc();
        metrics
            .decision_latency
            .observe(started.elapsed().as_secs_f64());
    }

    /// The process facts of a record: `/proc` is read off the async workers
    /// (once per connection).
    async fn process(&self, conn: &Arc<ConnFacts>) -> ProcessInfo {
        if let Some(p) = record::cached_process_info(conn) {
            return p;
        }
        let c = conn.clone();
        match self.offload.run(move || record::process_info(&c)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the process facts; recording the kernel's only");
                ProcessInfo::from(&conn.process)
            }
        }
    }

    /// The standing credential covering `call`, read off the async workers
    /// (the store's files; its spent list may be locked by a spend).
    async fn covering(&self, call: &CredCall, now: OffsetDateTime) -> Option<Covering> {
        let store = self.credentials.clone();
        let trusted = self.key.verifying_key();
        let call = call.clone();
        match self
            .offload
            .run(move || store.find_covering(&call, now, &trusted))
            .await
        {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "credential store unreadable; no credential releases this call");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "credential lookup did not run; no credential releases this call");
                None
            }
        }
    }

    async fn decide(self: Arc<Self>, call: CallFacts) -> Ruling {
        let started = Instant::now();
        let now = OffsetDateTime::now_utc();
        let decision_id = new_decision_id();
        let agent = self.engine.resolve(&call.conn.process, now);
        let mut ctx = CallContext {
            agent: agent.clone(),
            process: call.conn.process.clone(),
            server: call.server.clone(),
            destination: Some(call.conn.dst),
            method: call.method.clone(),
            tool: call.tool.clone(),
            args: call.args.clone(),
            time: now,
            credential: None,
        };
        // A standing credential covering exactly this call may release a hold.
        let cred_call = self.credential_call(&call, &agent);
        let covering = match &cred_call {
            Some(c) => self.covering(c, now).await,
            None => None,
        };
        if let Some(cov) = &covering {
            ctx.credential = Some(cov.credential.scope_json());
        }
        // An allowed call reserves its budget amounts now (atomically with the
        // check). The guard gives them back when dropped: on every path but
        // the allow that hands it to the forwarding ledger.
        let (mut decision, reserved) = self.engine.decide_reserving(&ctx);
        let mut reservation = Reserved {
            engine: self.engine.clone(),
            id: reserved,
        };
        let mut credential_id = None;
        if decision.released_by_credential {
            let redeemed = match &covering {
                Some(cov) => {
                    let cred = cov.credential.clone();
                    let store = self.credentials.clone();
                    self.offload
                        .run(move || {
                            verify::redeem(&cred, now, &store)
                                .map(|()| cred.id.clone())
                                .map_err(|e| e.to_string())
                        })
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                }
                None => Err("no covering credential".to_string()),
            };
            match redeemed {
                Ok(id) => credential_id = Some(id),
                Err(e) => {
                    // Spent (replay), revoked meanwhile: decide as if it were absent.
                    tracing::info!(error = %e, "covering credential could not be redeemed; deciding without it");
                    ctx.credential = None;
                    let (again, reserved) = self.engine.decide_reserving(&ctx);
                    decision = again;
                    // Replacing the guard releases the first reservation.
                    reservation = Reserved {
                        engine: self.engine.clone(),
                        id: reserved,
                    };
                }
            }
        }
        // The kill switch overrides everything, including credentials.
        if let Some(why) = self.suspensions.get(&agent.name) {
            decision.verdict = Verdict::Deny;
            decision.rule = Some("kya:agent-suspended".into());
            decision.reason = format!(
                "agent {} is suspended (by {})",
                agent.name,
                why["by"].as_str().unwrap_or("an administrator")
            );
            credential_id = None;
        }
        let process = self.process(&call.conn).await;
        let facts = EventFacts::new(
            &self.host,
            process,
            &call,
            &agent,
            &decision,
            &decision_id,
            started,
        );
        // From here the decision ends in exactly one final record, whatever
        // happens to this future.
        let mut open = OpenDecision::new(self.sinks.clone(), facts);
        // Fail closed when the audit log cannot take records.
        let health = self.sinks.audit.health();
        if call.method == "tools/call" && !health.is_writable() {
            let reason = format!(
                "the audit log is not writable ({health:?}); consequential calls are denied"
            );
            tracing::error!(%reason);
            self.count(
                Verdict::Deny,
                &agent.name,
                Some(open::AUDIT_UNAVAILABLE),
                started,
            );
            open.set_outcome(Some(open::AUDIT_UNAVAILABLE.into()), reason.clone());
            let _ = open
                .end(
                    EventKind::Decision,
                    Verdict::Deny,
                    None,
                    None,
                    Durability::Group,
                )
                .await;
            return Ruling::Deny {
                decision_id,
                rule: Some(open::AUDIT_UNAVAILABLE.into()),
                reason,
            };
        }
        match decision.verdict {
            Verdict::Allow => {
                self.count(
                    Verdict::Allow,
                    &agent.name,
                    decision.rule.as_deref(),
                    started,
                );
                // The allow that follows a credential is on disk before release.
                let durability = if credential_id.is_some() {
                    Durability::Sync
                } else {
                    Durability::Group
                };
                let ended = open
                    .end(
                        EventKind::Decision,
                        Verdict::Allow,
                        None,
                        credential_id,
                        durability,
                    )
                    .await;
                if let Err(e) = ended {
                    if call.method == "tools/call" {
                        return audit_denial(decision_id, &e);
                    }
                }
                // Budgets count the call once the proxy really forwards it.
                self.budget.allowed(&decision_id, ctx, reservation.take());
                Ruling::Allow { decision_id }
            }
            Verdict::Deny => {
                self.count(
                    Verdict::Deny,
                    &agent.name,
                    decision.rule.as_deref(),
                    started,
                );
                // Group commit: the record is written to the file before the
                // agent is answered (a `kill -9` of kya cannot lose it), but
                // the answer never waits for `fdatasync`.
                let _ = open
                    .end(
                        EventKind::Decision,
                        Verdict::Deny,
                        None,
                        None,
                        Durability::Group,
                    )
                    .await;
                Ruling::Deny {
                    decision_id,
                    rule: decision.rule.clone(),
                    reason: decision.reason.clone(),
                }
            }
            Verdict::Hold => {
                self.clone()
                    .hold(
                        call,
                        ctx,
                        agent,
                        decision,
                        decision_id,
                        open,
                        started,
                        cred_call,
                    )
                    .await
            }
        }
    }

    async fn refused(self: Arc<Self>, conn: Arc<ConnFacts>, reason: String) {
        let started = Instant::now();
        let now = OffsetDateTime::now_utc();
        let agent = self.engine.resolve(&conn.process, now);
        let decision_id = new_decision_id();
        self.count(Verdict::Deny, &agent.name, Some("kya:protocol"), started);
        let process = self.process(&conn).await;
        let facts = EventFacts::refused(
            &self.host,
            process,
            &conn,
            &agent,
            &reason,
            &decision_id,
            &self.engine.policy().version,
            started,
        );
        let event = facts.event(EventKind::Decision, Verdict::Deny, None, None);
        let _ = open::record(&self.sinks, event, Durability::Group).await;
    }
}

/// This host's name: what credentials bind to (`environment.host`) and what
/// decision records carry.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn new_decision_id() -> String {
    use rand::Rng;
    format!("dec_{:016x}", rand::thread_rng().gen::<u64>())
}

impl Governor for DecisionPath {
    fn decide(&self, call: CallFacts) -> BoxFuture<'static, Ruling> {
        Box::pin(self.core.clone().decide(call))
    }

    fn may_call(&self, conn: &ConnFacts, server: &str, tool: &str) -> bool {
        let engine = &self.core.engine;
        let now = OffsetDateTime::now_utc();
        let ctx = CallContext {
            agent: engine.resolve(&conn.process, now),
            process: conn.process.clone(),
            server: server.to_string(),
            destination: Some(conn.dst),
            method: "tools/call".into(),
            tool: Some(tool.to_string()),
            args: serde_json::json!({}),
            time: now,
            credential: None,
        };
        let d = engine.decide(&ctx);
        // Hidden only when no arguments could change the answer: a deny with
        // no evaluation errors, by the defaults or by a rule without `when`.
        if d.verdict != Verdict::Deny || !d.errors.is_empty() {
            return true;
        }
        match &d.rule {
            None => false,
            Some(id) => {
                let policy = engine.policy();
                match policy.rules.iter().find(|r| &r.id == id) {
                    Some(rule) => rule.when.is_some(),
                    // Budgets and kya:* pseudo-rules depend on state: keep visible.
                    None => true,
                }
            }
        }
    }

    fn not_forwarded(&self, decision_id: &str) {
        self.core.budget.not_forwarded(decision_id);
    }

    fn forwarded(&self, decision_id: &str) {
        self.core.budget.forwarded(decision_id);
    }

    fn refused(&self, conn: &ConnFacts, reason: &str) {
        tokio::spawn(
            self.core
                .clone()
                .refused(Arc::new(conn.clone()), reason.to_string()),
        );
    }
}

fn audit_denial(decision_id: String, error: &str) -> Ruling {
    Ruling::Deny {
        decision_id,
        rule: Some(open::AUDIT_UNAVAILABLE.into()),
        reason: format!(
            "the audit log could not record this call ({error}); consequential calls are denied"
        ),
    }
}

/// End `open` as a denial kya made itself (`rule`, `reason`) and answer it.
async fn deny_now(open: OpenDecision, decision_id: String, rule: &str, reason: String) -> Ruling {
    let mut open = open;
    open.set_outcome(Some(rule.to_string()), reason.clone());
    let _ = open
        .end(
            EventKind::Decision,
            Verdict::Deny,
            None,
            None,
            Durability::Group,
        )
        .await;
    Ruling::Deny {
        decision_id,
        rule: Some(rule.to_string()),
        reason,
    }
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    async fn hold(
        self: Arc<Self>,
        call: CallFacts,
        ctx: CallContext,
        agent: AgentInfo,
        decision: Decision,
        decision_id: String,
        mut open: OpenDecision,
        started: Instant,
        cred_call: Option<CredCall>,
    ) -> Ruling {
        let owner = decision
            .approvers
            .first()
            .cloned()
            .or_else(|| agent.owner.clone());
        let Some(owner) = owner else {
            self.count(Verdict::Deny, &agent.name, Some("kya:no-approver"), started);
            let reason = format!(
                "held by rule {} but agent {} has no owner to approve it",
                decision.rule.as_deref().unwrap_or("default"),
                agent.name
            );
            return deny_now(open, decision_id, "kya:no-approver", reason).await;
        };
        if call.direction == Direction::ServerToClient || call.method != "tools/call" {
            // Only tool calls have an owner-facing approval; anything else held is denied.
            self.count(
                Verdict::Deny,
                &agent.name,
                decision.rule.as_deref(),
                started,
            );
            let reason = format!(
                "{} (held messages other than tools/call are denied)",
                decision.reason
            );
            let rule = decision.rule.as_deref().unwrap_or("default");
            return deny_now(open, decision_id, rule, reason).await;
        }
        if open.stopping() {
            self.count(Verdict::Deny, &agent.name, Some("kya:stopping"), started);
            return deny_now(open, decision_id, "kya:stopping", STOPPING_REASON.into()).await;
        }
        let args_digest = action::args_digest(&call.args).unwrap_or_default();
        let request = ActionRequest {
            agent: agent.name.clone(),
            owner: owner.clone(),
            approvers: decision.approvers.clone(),
            process: call.conn.process.clone(),
            server: call.server.clone(),
            tool: call.tool.clone().unwrap_or_default(),
            args: call.args.clone(),
            args_digest,
            policy_version: decision.policy_version.clone(),
            rule: decision.rule.clone(),
            reason: decision.reason.clone(),
            decision_id: decision_id.clone(),
        };
        // The approvals journal syncs the new approval: off the async workers.
        let approvals = self.approvals.clone();
        let timeout = decision.hold_timeout;
        let submitted = self
            .offload
            .run(move || {
                approvals
                    .submit(request, timeout)
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let handle = match submitted {
            Ok(h) => h,
            Err(e) => {
                self.count(
                    Verdict::Deny,
                    &agent.name,
                    Some("kya:too-many-holds"),
                    started,
                );
                return deny_now(open, decision_id, "kya:too-many-holds", e).await;
            }
        };
        open.held(&handle.id);
        if open.stopping() {
            // Stopping began while this one was being journaled.
            let _ = self.approvals.cancel(&handle.id, STOPPING_REASON);
        }
        self.count(
            Verdict::Hold,
            &agent.name,
            decision.rule.as_deref(),
            started,
        );
        let binding = handle.binding_message.clone();
        let wait_binding = binding.clone();
        let metrics = self.sinks.metrics.clone();
        let rule = decision.rule.clone();
        let wait_decision_id = decision_id.clone();
        let core = self.clone();
        metrics.held.inc();
        let wait: BoxFuture<'static, Ruling> = Box::pin(async move {
            let _held = HeldGauge(metrics.clone());
            let hold_id = handle.id.clone();
            // The hold itself is on disk before the call can be released.
            if let Err(e) = open.record_hold().await {
                open.set_outcome(
                    Some(open::AUDIT_UNAVAILABLE.into()),
                    format!("the hold could not be recorded ({e})"),
                );
                let info = open.hold_info();
                let _ = open
                    .end(
                        EventKind::Decision,
                        Verdict::Deny,
                        info,
                        None,
                        Durability::Group,
                    )
                    .await;
                return audit_denial(wait_decision_id, &e);
            }
            let outcome = handle.wait().await;
            let (channel, outcome_name) = match &outcome {
                Outcome::Approved(a) => (a.channel.clone(), "approved"),
                Outcome::Denied(a) => (a.channel.clone(), "denied"),
                Outcome::Expired => ("none".to_string(), "expired"),
                Outcome::Cancelled(_) => ("none".to_string(), "cancelled"),
            };
            metrics
                .approvals
                .get_or_create(&ApprovalLabels {
                    channel,
                    outcome: outcome_name.into(),
                })
                .inc();
            match outcome {
                Outcome::Approved(answer) => {
                    let info = approval_info(&hold_id, &answer);
                    // Minting, verifying and spending touch the credential
                    // store (flock, fdatasync): off the async workers.
                    let released = {
                        let core = core.clone();
                        let call = call.clone();
                        let ctx = ctx.clone();
                        let answer = answer.clone();
                        let hold_id = hold_id.clone();
                        let binding = wait_binding.clone();
                        let cred_call = cred_call.clone();
                        core.offload
                            .clone()
                            .run(move || {
                                core.release(
                                    &call,
                                    &ctx,
                                    &answer,
                                    &hold_id,
                                    &binding,
                                    cred_call.as_ref(),
                                )
                            })
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()))
                    };
                    match released {
                        Ok(cred_id) => {
                            let ended = open
                                .end(
                                    EventKind::Approved,
                                    Verdict::Allow,
                                    Some(info),
                                    Some(cred_id),
                                    Durability::Sync,
                                )
                                .await;
                            if let Err(e) = ended {
                                return audit_denial(wait_decision_id, &e);
                            }
                            core.budget.allowed(&wait_decision_id, ctx.clone(), None);
                            Ruling::Allow {
                                decision_id: wait_decision_id,
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "approved call has no valid credential; denying");
                            let _ = open
                                .end(
                                    EventKind::Rejected,
                                    Verdict::Deny,
                                    Some(info),
                                    None,
                                    Durability::Sync,
                                )
                                .await;
                            Ruling::Deny {
                                decision_id: wait_decision_id,
                                rule: rule.clone(),
                                reason: format!(
                                    "approved, but no valid credential releases it: {e}"
                                ),
                            }
                        }
                    }
                }
                Outcome::Denied(answer) => {
                    let info = approval_info(&hold_id, &answer);
                    let _ = open
                        .end(
                            EventKind::Rejected,
                            Verdict::Deny,
                            Some(info),
                            None,
                            Durability::Sync,
                        )
                        .await;
                    let why = answer.reason.map(|r| format!(": {r}")).unwrap_or_default();
                    Ruling::Deny {
                        decision_id: wait_decision_id,
                        rule: rule.clone(),
                        reason: format!("denied by {}{why}", answer.approver),
                    }
                }
                Outcome::Cancelled(why) if why == STOPPING_REASON => {
                    let info = open.hold_info();
                    open.set_outcome(rule.clone(), STOPPING_REASON.into());
                    let _ = open
                        .end(
                            EventKind::Interrupted,
                            Verdict::Deny,
                            info,
                            None,
                            Durability::Sync,
                        )
                        .await;
                    Ruling::Deny {
                        decision_id: wait_decision_id,
                        rule: Some("kya:stopping".into()),
                        reason: STOPPING_REASON.into(),
                    }
                }
                Outcome::Expired | Outcome::Cancelled(_) => {
                    let reason = match &outcome {
                        Outcome::Cancelled(why) => format!("hold ended: {why}"),
                        _ => format!("no approval within {}", humantime::format_duration(timeout)),
                    };
                    let info = open.hold_info();
                    let _ = open
                        .end(
                            EventKind::Expired,
                            Verdict::Deny,
                            info,
                            None,
                            Durability::Sync,
                        )
                        .await;
                    Ruling::Deny {
                        decision_id: wait_decision_id,
                        rule: rule.clone(),
                        reason,
                    }
                }
            }
        });
        Ruling::Hold {
            decision_id,
            owner,
            binding,
            wait,
        }
    }

    /// The credential that releases an approved call (blocking: the store).
    fn release(
        &self,
        call: &CallFacts,
        ctx: &CallContext,
        answer: &Answer,
        hold_id: &str,
        binding: &str,
        cred_call: Option<&CredCall>,
    ) -> Result<String, String> {
        if answer.channel == service::RELEASE_CHANNEL {
            // A standing credential issued while the call was held:
            // re-check and redeem exactly it (revoked meanwhile → denied).
            let id = answer
                .evidence
                .as_ref()
                .and_then(|e| e.get("credential_id"))
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            match cred_call {
                Some(c) => service::redeem_standing(
                    &self.credentials,
                    &self.key.verifying_key(),
                    id,
                    c,
                    OffsetDateTime::now_utc(),
                ),
                None => Err("not a tool call".to_string()),
            }
        } else {
            mint_and_redeem(
                &self.key,
                &self.credentials,
                &self.host,
                call,
                ctx,
                answer,
                hold_id,
                binding,
            )
        }
    }
}

/// A budget reservation, released when dropped unless taken.
struct Reserved {
    engine: Arc<PolicyEngine>,
    id: Option<ReservationId>,
}

impl Reserved {
    fn take(mut self) -> Option<ReservationId> {
        self.id.take()
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.engine.release(id);
        }
    }
}

/// Allowed calls waiting to be forwarded: budgets count a call only when the
/// proxy really sends it (a batch with a denied member sends none). A call
/// allowed under a budget carries the reservation made when it was decided.
struct ToForward {
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
    fn new(engine: Arc<PolicyEngine>) -> Self {
        Self {
            engine,
            waiting: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn allowed(&self, decision_id: &str, ctx: CallContext, reservation: Option<ReservationId>) {
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

    fn forwarded(&self, decision_id: &str) {
        match self.take(decision_id) {
            Some((_, ctx, Some(r))) => self.engine.commit_forwarded(r, &ctx),
            Some((_, ctx, None)) => self.engine.record_forwarded(&ctx),
            None => {}
        }
    }

    fn not_forwarded(&self, decision_id: &str) {
        if let Some((_, _, Some(r))) = self.take(decision_id) {
            self.engine.release(r);
        }
    }
}

/// Decrements the held-calls gauge however the hold ends (including the
/// agent dropping it).
struct HeldGauge(Arc<Metrics>);

impl Drop for HeldGauge {
    fn drop(&mut self) {
        self.0.held.dec();
    }
}

/// The digest of the verified ID token behind a CIBA answer, if any.
fn id_token_digest(answer: &Answer) -> Option<String> {
    answer
        .evidence
        .as_ref()
        .and_then(|e| e.get("id_token_sha256"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// What the audit record of an answered hold says about the answer: who, on
/// which channel, and for CIBA the ID token digest, so the log itself ties the
/// release to the provider's signed statement (the minted credential that
/// also carries it is spent and not kept).
fn approval_info(hold_id: &str, answer: &Answer) -> ApprovalInfo {
    ApprovalInfo {
        id: hold_id.to_string(),
        approver: Some(answer.approver.clone()),
        channel: Some(answer.channel.clone()),
        id_token_sha256: id_token_digest(answer),
    }
}

/// Mint the single-use credential for exactly this approved call, verify it as
/// any verifier would, and spend it. Returns its id.
#[allow(clippy::too_many_arguments)]
fn mint_and_redeem(
    key: &SigningKey,
    store: &CredentialStore,
    host: &str,
    call: &CallFacts,
    ctx: &CallContext,
    answer: &Answer,
    approval_id: &str,
    binding: &str,
) -> Result<String, String> {
    let now = OffsetDateTime::now_utc();
    let tool = call.tool.clone().unwrap_or_default();
    // The approver may have chosen a wider scope: this tool on this server for
    // a while (a standing credential later calls match), else exactly this call.
    let standing_for = answer
        .evidence
        .as_ref()
        .and_then(|e| e.get("standing_for_secs"))
        .and_then(|v| v.as_u64())
        .map(Duration::from_secs)
        .filter(|d| !d.is_zero() && *d <= service::MAX_VALID_FOR);
    let scope = match standing_for {
        Some(_) => Scope {
            server: Some(call.server.clone()),
            tool: tool.clone(),
            args_sha256: None,
            arg_bounds: Vec::new(),
            single_use: false,
        },
        None => Scope::exact(&call.server, &tool, &call.args).map_err(|e| e.to_string())?,
    };
    let subject = AgentSubject {
        agent: ctx.agent.name.clone(),
        exe_sha256: None,
        uid: Some(ctx.process.uid),
        environment: Environment {
            host: host.to_string(),
            cgroup: (!ctx.process.cgroup.is_empty()).then(|| ctx.process.cgroup.clone()),
        },
        scope,
    };
    let channel = if answer.channel == "ciba" {
        Channel::Ciba
    } else {
        Channel::Local
    };
    let mut evidence =
        Evidence::approval(&answer.approver, channel, now).map_err(|e| e.to_string())?;
    // A CIBA answer carries the digest of the verified ID token that proved it.
    evidence.id_token_sha256 = id_token_digest(answer);
    evidence.approval_id = Some(approval_id.to_string());
    evidence.binding_message = Some(binding.to_string());
    let until = now + standing_for.unwrap_or(APPROVAL_CREDENTIAL_TTL);
    let (doc, minted) =
        action::issue(key, subject, now, until, vec![evidence]).map_err(|e| e.to_string())?;
    if standing_for.is_some() {
        store
            .add_standing(&doc, &minted, now)
            .map_err(|e| format!("cannot store the standing credential: {e}"))?;
    }
    let call = CredCall {
        agent: ctx.agent.name.clone(),
        uid: ctx.process.uid,
        cgroup: ctx.process.cgroup.clone(),
        exe_sha256: None,
        host: host.to_string(),
        server: call.server.clone(),
        method: call.method.clone(),
        tool,
        args: call.args.clone(),
    };
    let cred = verify::verify_for_call(&doc, &key.verifying_key(), &call, now, store)
        .map_err(|e| e.to_string())?;
    Ok(cred.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(channel: &str, evidence: Option<serde_json::Value>) -> Answer {
        Answer {
            approve: true,
            approver: "alice".into(),
            channel: channel.into(),
            reason: None,
            evidence,
        }
    }

    #[test]
    fn a_ciba_approval_records_its_id_token_digest_in_the_audit_event() {
        let digest = "ab".repeat(32);
        let a = answer(
            "ciba",
            Some(
                serde_json::json!({"id_token_sha256": digest, "iss": "http://127.0.0.1:1", "auth_req_id": "r"}),
            ),
        );
        let info = approval_info("apr_1", &a);
        assert_eq!(info.id, "apr_1");
        assert_eq!(info.approver.as_deref(), Some("alice"));
        assert_eq!(info.channel.as_deref(), Some("ciba"));
        assert_eq!(info.id_token_sha256.as_deref(), Some(digest.as_str()));
        let json = serde_json::to_value(&info).expect("json");
        assert_eq!(json["id_token_sha256"], digest.as_str());

        // A local answer has no token: the field is absent from the record.
        let local = approval_info(
            "apr_2",
            &answer("local", Some(serde_json::json!({"uid": 1000}))),
        );
        assert_eq!(local.id_token_sha256, None);
        let json = serde_json::to_value(&local).expect("json");
        assert!(json.get("id_token_sha256").is_none(), "{json}");
    }
}
