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
mod record;
pub mod sinks;
pub mod syslog;

use crate::agents::Suspensions;
use crate::approvals::{ActionRequest, Answer, Approvals, Outcome};
use crate::audit::event::{ApprovalInfo, EventKind};
use crate::audit::writer::{AuditLog, Durability};
use crate::audit::DecisionEvent;
use crate::credential::action::{self, AgentSubject, Channel, Environment, Evidence, Scope};
use crate::credential::service;
use crate::credential::store::CredentialStore;
use crate::credential::verify::{self, Call as CredCall};
use crate::intercept::http::{BoxFuture, CallFacts, ConnFacts, Direction, Governor, Ruling};
use crate::metrics::{ApprovalLabels, DecisionLabels, Metrics};
use crate::policy::budget::ReservationId;
use crate::policy::{AgentInfo, CallContext, Decide, Decision, PolicyEngine};
use ed25519_dalek::SigningKey;
use events::EventHub;
use kya_common::Verdict;
use record::EventFacts;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// How long a credential minted for one approved call stays valid: long
/// enough to forward the call, short enough to be useless later.
pub const APPROVAL_CREDENTIAL_TTL: Duration = Duration::from_secs(120);

/// The daemon's decision path.
pub struct DecisionPath {
    engine: Arc<PolicyEngine>,
    suspensions: Arc<Suspensions>,
    budget: Arc<ToForward>,
    approvals: Arc<Approvals>,
    credentials: Arc<CredentialStore>,
    key: Arc<SigningKey>,
    audit: Arc<AuditLog>,
    events: Arc<EventHub>,
    metrics: Arc<Metrics>,
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
            budget: Arc::new(ToForward::new(engine.clone())),
            suspensions,
            engine,
            approvals,
            credentials,
            key,
            audit,
            events,
            metrics,
            host,
        }
    }

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
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                verdict: verdict.as_str().into(),
                agent: agent.into(),
                rule: rule.unwrap_or("default").into(),
            })
            .inc();
        self.metrics
            .decision_latency
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Everything one decision needs after the synchronous part, owned so the
/// hold's future can outlive the `decide` call.
struct Pending {
    audit: Arc<AuditLog>,
    events: Arc<EventHub>,
    metrics: Arc<Metrics>,
    facts: EventFacts,
}

impl Pending {
    /// Record a plain denial (group commit: the record is written to the file
    /// before the agent is answered, so a `kill -9` of kya cannot lose it, but
    /// the answer never waits for `fdatasync`; a failure is logged and counted
    /// by `record`).
    async fn record_denial(&self) {
        let event = self
            .facts
            .event(EventKind::Decision, Verdict::Deny, None, None);
        let _ = self.record(event, Durability::Group).await;
    }

    /// Write `event` with `durability`; publish it to the live stream once it
    /// is accepted. Returns the audit error for the caller to fail closed on.
    async fn record(&self, event: DecisionEvent, durability: Durability) -> Result<(), String> {
        // Sync: `append` returns after fdatasync. Group: `append` returns once
        // the record is written (page cache); its fdatasync follows within the
        // writer's batch bound and the call does not wait for it.
        let started = Instant::now();
        if let Err(e) = self.audit.append(&event, durability).await {
            self.metrics.audit_write_failures.inc();
            tracing::error!(error = %e, decision = %event.decision_id, "audit append failed");
            return Err(e.to_string());
        }
        if durability == Durability::Sync {
            self.metrics
                .audit_write_latency
                .observe(started.elapsed().as_secs_f64());
        }
        self.events.publish(event);
        Ok(())
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
        let covering = cred_call.as_ref().and_then(|c| {
            match self
                .credentials
                .find_covering(c, now, &self.key.verifying_key())
            {
                Ok(found) => found,
                Err(e) => {
                    tracing::error!(error = %e, "credential store unreadable; no credential releases this call");
                    None
                }
            }
        });
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
                Some(cov) => verify::redeem(&cov.credential, now, &self.credentials)
                    .map(|()| cov.credential.id.clone())
                    .map_err(|e| e.to_string()),
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
        let facts = EventFacts::new(&self.host, &call, &agent, &decision, &decision_id, started);
        let pending = Pending {
            audit: self.audit.clone(),
            events: self.events.clone(),
            metrics: self.metrics.clone(),
            facts,
        };
        // Fail closed when the audit log cannot take records.
        let health = self.audit.health();
        if call.method == "tools/call" && !health.is_writable() {
            let reason = format!(
                "the audit log is not writable ({health:?}); consequential calls are denied"
            );
            tracing::error!(%reason);
            self.count(
                Verdict::Deny,
                &agent.name,
                Some("kya:audit-unavailable"),
                started,
            );
            return Box::pin(async move {
                Ruling::Deny {
                    decision_id,
                    rule: Some("kya:audit-unavailable".into()),
                    reason,
                }
            });
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
                let budget = self.budget.clone();
                Box::pin(async move {
                    let event = pending.facts.event(
                        EventKind::Decision,
                        Verdict::Allow,
                        None,
                        credential_id.clone(),
                    );
                    if let Err(e) = pending.record(event, durability).await {
                        if call.method == "tools/call" {
                            return audit_denial(decision_id, &e);
                        }
                    }
                    // Budgets count the call once the proxy really forwards it.
                    budget.allowed(&decision_id, ctx, reservation.take());
                    Ruling::Allow { decision_id }
                })
            }
            Verdict::Deny => {
                self.count(
                    Verdict::Deny,
                    &agent.name,
                    decision.rule.as_deref(),
                    started,
                );
                Box::pin(async move {
                    pending.record_denial().await;
                    Ruling::Deny {
                        decision_id,
                        rule: decision.rule.clone(),
                        reason: decision.reason.clone(),
                    }
                })
            }
            Verdict::Hold => self.hold(
                call,
                ctx,
                agent,
                decision,
                decision_id,
                pending,
                started,
                cred_call,
            ),
        }
    }

    fn may_call(&self, conn: &ConnFacts, server: &str, tool: &str) -> bool {
        let now = OffsetDateTime::now_utc();
        let ctx = CallContext {
            agent: self.engine.resolve(&conn.process, now),
            process: conn.process.clone(),
            server: server.to_string(),
            destination: Some(conn.dst),
            method: "tools/call".into(),
            tool: Some(tool.to_string()),
            args: serde_json::json!({}),
            time: now,
            credential: None,
        };
        let d = self.engine.decide(&ctx);
        // Hidden only when no arguments could change the answer: a deny with
        // no evaluation errors, by the defaults or by a rule without `when`.
        if d.verdict != Verdict::Deny || !d.errors.is_empty() {
            return true;
        }
        match &d.rule {
            None => false,
            Some(id) => {
                let policy = self.engine.policy();
                match policy.rules.iter().find(|r| &r.id == id) {
                    Some(rule) => rule.when.is_some(),
                    // Budgets and kya:* pseudo-rules depend on state: keep visible.
                    None => true,
                }
            }
        }
    }

    fn not_forwarded(&self, decision_id: &str) {
        self.budget.not_forwarded(decision_id);
    }

    fn forwarded(&self, decision_id: &str) {
        self.budget.forwarded(decision_id);
    }

    fn refused(&self, conn: &ConnFacts, reason: &str) {
        let started = Instant::now();
        let now = OffsetDateTime::now_utc();
        let agent = self.engine.resolve(&conn.process, now);
        let decision_id = new_decision_id();
        let facts = EventFacts::refused(
            &self.host,
            conn,
            &agent,
            reason,
            &decision_id,
            &self.engine.policy().version,
            started,
        );
        self.count(Verdict::Deny, &agent.name, Some("kya:protocol"), started);
        let pending = Pending {
            audit: self.audit.clone(),
            events: self.events.clone(),
            metrics: self.metrics.clone(),
            facts,
        };
        tokio::spawn(async move { pending.record_denial().await });
    }
}

fn audit_denial(decision_id: String, error: &str) -> Ruling {
    Ruling::Deny {
        decision_id,
        rule: Some("kya:audit-unavailable".into()),
        reason: format!(
            "the audit log could not record this call ({error}); consequential calls are denied"
        ),
    }
}

impl DecisionPath {
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &self,
        call: CallFacts,
        ctx: CallContext,
        agent: AgentInfo,
        decision: Decision,
        decision_id: String,
        pending: Pending,
        started: Instant,
        cred_call: Option<CredCall>,
    ) -> BoxFuture<'static, Ruling> {
        let owner = decision
            .approvers
            .first()
            .cloned()
            .or_else(|| agent.owner.clone());
        let deny_now = |reason: String, rule: &str| -> BoxFuture<'static, Ruling> {
            let decision_id = decision_id.clone();
            let rule = rule.to_string();
            Box::pin(async move {
                Ruling::Deny {
                    decision_id,
                    rule: Some(rule),
                    reason,
                }
            })
        };
        let Some(owner) = owner else {
            self.count(Verdict::Deny, &agent.name, Some("kya:no-approver"), started);
            return deny_now(
                format!(
                    "held by rule {} but agent {} has no owner to approve it",
                    decision.rule.as_deref().unwrap_or("default"),
                    agent.name
                ),
                "kya:no-approver",
            );
        };
        if call.direction == Direction::ServerToClient || call.method != "tools/call" {
            // Only tool calls have an owner-facing approval; anything else held is denied.
            self.count(
                Verdict::Deny,
                &agent.name,
                decision.rule.as_deref(),
                started,
            );
            return deny_now(
                format!(
                    "{} (held messages other than tools/call are denied)",
                    decision.reason
                ),
                decision.rule.as_deref().unwrap_or("default"),
            );
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
        let handle = match self.approvals.submit(request, decision.hold_timeout) {
            Ok(h) => h,
            Err(e) => {
                self.count(
                    Verdict::Deny,
                    &agent.name,
                    Some("kya:too-many-holds"),
                    started,
                );
                return deny_now(e.to_string(), "kya:too-many-holds");
            }
        };
        self.count(
            Verdict::Hold,
            &agent.name,
            decision.rule.as_deref(),
            started,
        );
        let approval_id = handle.id.clone();
        let binding = handle.binding_message.clone();
        let metrics = self.metrics.clone();
        let credentials = self.credentials.clone();
        let key = self.key.clone();
        let budget = self.budget.clone();
        let host = self.host.clone();
        let timeout = decision.hold_timeout;
        let rule = decision.rule.clone();
        let hold_id = approval_id.clone();
        let wait_decision_id = decision_id.clone();
        let wait_binding = binding.clone();
        metrics.held.inc();
        let wait: BoxFuture<'static, Ruling> = Box::pin(async move {
            let _held = HeldGauge(metrics.clone());
            // The hold itself is on disk before anyone is asked.
            let hold_event = pending.facts.event(
                EventKind::Hold,
                Verdict::Hold,
                Some(ApprovalInfo {
                    id: hold_id.clone(),
                    ..ApprovalInfo::default()
                }),
                None,
            );
            if let Err(e) = pending.record(hold_event, Durability::Sync).await {
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
                    let released = if answer.channel == service::RELEASE_CHANNEL {
                        // A standing credential issued while the call was held:
                        // re-check and redeem exactly it (revoked meanwhile → denied).
                        let id = answer
                            .evidence
                            .as_ref()
                            .and_then(|e| e.get("credential_id"))
                            .and_then(|v| v.as_str())
                            .unwrap_or_default();
                        match &cred_call {
                            Some(c) => service::redeem_standing(
                                &credentials,
                                &key.verifying_key(),
                                id,
                                c,
                                OffsetDateTime::now_utc(),
                            ),
                            None => Err("not a tool call".to_string()),
                        }
                    } else {
                        mint_and_redeem(
                            &key,
                            &credentials,
                            &host,
                            &call,
                            &ctx,
                            &answer,
                            &hold_id,
                            &wait_binding,
                        )
                    };
                    match released {
                        Ok(cred_id) => {
                            let ev = pending.facts.event(
                                EventKind::Approved,
                                Verdict::Allow,
                                Some(info),
                                Some(cred_id),
                            );
                            if let Err(e) = pending.record(ev, Durability::Sync).await {
                                return audit_denial(wait_decision_id, &e);
                            }
                            budget.allowed(&wait_decision_id, ctx.clone(), None);
                            Ruling::Allow {
                                decision_id: wait_decision_id,
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "approved call has no valid credential; denying");
                            let ev = pending.facts.event(
                                EventKind::Rejected,
                                Verdict::Deny,
                                Some(info),
                                None,
                            );
                            let _ = pending.record(ev, Durability::Sync).await;
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
                    let ev =
                        pending
                            .facts
                            .event(EventKind::Rejected, Verdict::Deny, Some(info), None);
                    let _ = pending.record(ev, Durability::Sync).await;
                    let why = answer.reason.map(|r| format!(": {r}")).unwrap_or_default();
                    Ruling::Deny {
                        decision_id: wait_decision_id,
                        rule: rule.clone(),
                        reason: format!("denied by {}{why}", answer.approver),
                    }
                }
                Outcome::Expired | Outcome::Cancelled(_) => {
                    let reason = match &outcome {
                        Outcome::Cancelled(why) => format!("hold ended: {why}"),
                        _ => format!("no approval within {}", humantime::format_duration(timeout)),
                    };
                    let info = ApprovalInfo {
                        id: hold_id.clone(),
                        ..ApprovalInfo::default()
                    };
                    let ev =
                        pending
                            .facts
                            .event(EventKind::Expired, Verdict::Deny, Some(info), None);
                    let _ = pending.record(ev, Durability::Sync).await;
                    Ruling::Deny {
                        decision_id: wait_decision_id,
                        rule: rule.clone(),
                        reason,
                    }
                }
            }
        });
        Box::pin(async move {
            Ruling::Hold {
                decision_id,
                owner,
                binding,
                wait,
            }
        })
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
