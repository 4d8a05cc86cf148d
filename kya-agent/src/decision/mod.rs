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
mod hold;
mod ledger;
mod mint;
mod offload;
mod open;
pub mod receipts;
mod record;
pub(crate) use record::prewarm as prewarm_connection;
pub(crate) mod restart;

use crate::agents::Suspensions;
use crate::approvals::Approvals;
use crate::audit::event::{EventKind, ProcessInfo};
use crate::audit::writer::{AuditLog, Durability};
use crate::credential::store::{Covering, CredentialStore};
use crate::credential::verify::{self, Call as CredCall};
use crate::intercept::http::{
    BoxFuture, CallFacts, ConnFacts, Direction, Governor, ProofRequest, Ruling,
};
use crate::metrics::{DecisionLabels, Metrics};
use crate::pins::PinStore;
use crate::policy::budget::ReservationId;
use crate::policy::{AgentInfo, CallContext, Decide, PolicyEngine, ToolPin};
use ed25519_dalek::SigningKey;
use events::EventHub;
use kya_common::Verdict;
use ledger::ToForward;
use offload::Offload;
use open::{OpenDecision, Sinks, Stopping};
use record::EventFacts;
use std::sync::Arc;
use std::time::Instant;
use time::OffsetDateTime;

pub use mint::APPROVAL_CREDENTIAL_TTL;

/// The reason a held call is denied when kya stops.
pub const STOPPING_REASON: &str = "kya is stopping; the call was not forwarded";

/// The daemon's decision path.
pub struct DecisionPath {
    core: Arc<Core>,
    /// Credentials kya holds for servers, attached to what it forwards.
    broker: Option<Arc<crate::broker::Broker>>,
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
    args: ArgsRecord,
    /// Which servers get a signed receipt with each request.
    proofs: receipts::ProofSettings,
    /// The pinned tool definitions (`tool_pin`, `tool_drift`).
    pins: Arc<PinStore>,
}

/// What a decision's record keeps of the call's arguments (`[audit] args`,
/// `[audit] redact`): always their digest; the arguments themselves only
/// when `include`, with every `redact` path replaced by `[redacted]`.
#[derive(Debug, Clone, Default)]
pub struct ArgsRecord {
    pub include: bool,
    pub redact: Vec<String>,
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
        let host = crate::host::host_name();
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
                args: ArgsRecord::default(),
                proofs: receipts::ProofSettings::default(),
                pins: Arc::new(PinStore::in_memory()),
            }),
            broker: None,
        }
    }

    /// Record the arguments of each call as `args` says (before the path is
    /// shared; later calls are ignored, with an error logged).
    pub fn with_args_record(mut self, args: ArgsRecord) -> Self {
        match Arc::get_mut(&mut self.core) {
            Some(core) => core.args = args,
            None => tracing::error!("the argument record is set only before decisions start"),
        }
        self
    }

    /// Attach the credentials of `broker` to the requests this path lets through.
    pub fn with_broker(mut self, broker: Option<Arc<crate::broker::Broker>>) -> Self {
        self.broker = broker;
        self
    }

    /// Sign a receipt for every request to the servers `proofs` names
    /// (before the path is shared; later calls are ignored, with an error logged).
    pub fn with_proofs(mut self, proofs: receipts::ProofSettings) -> Self {
        match Arc::get_mut(&mut self.core) {
            Some(core) => core.proofs = proofs,
            None => tracing::error!("proof servers are set only before decisions start"),
        }
        self
    }

    /// Pin tool definitions in `pins` (before the path is shared; by default
    /// they are kept in memory only).
    pub fn with_pins(mut self, pins: Arc<PinStore>) -> Self {
        match Arc::get_mut(&mut self.core) {
            Some(core) => core.pins = pins,
            None => tracing::error!("the tool pins are set only before decisions start"),
        }
        self
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
    /// (the store's files; its spent list may be locked by a spend) unless
    /// there is none to read.
    async fn covering(&self, call: &CredCall, now: OffsetDateTime) -> Option<Covering> {
        // The common case, no standing credential at all, without a hop to
        // the blocking pool.
        if self.credentials.none_standing() {
            return None;
        }
        let store = self.credentials.clone();
        let trusted = self.key.verifying_key();
        let call = call.clone();
        match self
            .offload
            .run(move || verify::find_covering(&store, &call, now, &trusted))
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

    /// How the tool `call` calls stands against its pin, and what changed
    /// (cut short for the record and the approval).
    fn tool_pin(&self, call: &CallFacts) -> (ToolPin, Option<serde_json::Value>) {
        match (&call.tool, call.direction, call.method.as_str()) {
            (Some(tool), Direction::ClientToServer, "tools/call") => {
                let key = crate::pins::server_key(&call.server, server_port(&call.conn));
                let (pin, change) = self.pins.check(&key, tool);
                (
                    pin,
                    change.and_then(|c| serde_json::to_value(c.bounded()).ok()),
                )
            }
            _ => (ToolPin::Unknown, None),
        }
    }

    /// Record what a server announced in a `tools/list` answer; the pins
    /// are written to the state directory off the async workers.
    fn tools_listed(
        &self,
        conn: &ConnFacts,
        server: &str,
        result: &serde_json::Value,
        complete: bool,
    ) -> Result<(), String> {
        let listing = crate::pins::listing::read(result).map_err(|e| e.to_string())?;
        let key = crate::pins::server_key(server, server_port(conn));
        let server = key.as_str();
        let recorded = self
            .pins
            .record(server, &listing, complete)
            .map_err(|e| e.to_string())?;
        if recorded.first {
            tracing::info!(%server, tools = listing.tools.len(), "tool definitions pinned");
        }
        if !recorded.drifted.is_empty() {
            tracing::warn!(%server, tools = ?recorded.drifted,
                "tool definitions differ from their pins; `kya tools diff` shows how");
        }
        if PinStore::needs_save(&recorded) {
            self.pins.save_soon();
        }
        Ok(())
    }

    async fn decide(self: Arc<Self>, mut call: CallFacts) -> Ruling {
        call.conn = with_container_image(call.conn);
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
            tool_pin: Default::default(),
        };
        let (tool_pin, tool_change) = self.tool_pin(&call);
        ctx.tool_pin = tool_pin;
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
        // A call decided by drift names what changed.
        if decision.rule.as_deref() == Some(crate::policy::engine::TOOL_DRIFT_RULE) {
            if let Some(fields) = changed_fields(tool_change.as_ref()) {
                decision.reason = format!("{} (changed: {fields})", decision.reason);
            }
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
            &self.args,
        )
        .with_tool_change(tool_change.clone());
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
                let credential_released = credential_id.is_some();
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
                let released_by = covering
                    .as_ref()
                    .filter(|_| credential_released)
                    .map(|c| &c.document);
                let grant = self.proofs.grant(&call, &agent, released_by);
                Ruling::Allow { decision_id, grant }
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
                        tool_change,
                    )
                    .await
            }
        }
    }

    /// Record a protocol refusal; returns once the record is the writer's
    /// (`Group`) or on disk (`Sync`).
    async fn refused(
        self: Arc<Self>,
        conn: Arc<ConnFacts>,
        reason: String,
        durability: Durability,
    ) {
        let conn = with_container_image(conn);
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
        let _ = open::record(&self.sinks, event, durability).await;
    }
}

/// The names of the fields a recorded tool change lists, comma separated.
fn changed_fields(change: Option<&serde_json::Value>) -> Option<String> {
    let fields: Vec<&str> = change?
        .get("fields")?
        .as_array()?
        .iter()
        .filter_map(|f| f.get("field").and_then(serde_json::Value::as_str))
        .collect();
    (!fields.is_empty()).then(|| fields.join(", "))
}

/// The port the agent reached the server on: the tunnel target's inside a
/// followed `CONNECT`, else the original destination's.
fn server_port(conn: &ConnFacts) -> u16 {
    conn.tunnel.as_ref().map_or(conn.dst.port(), |t| t.port)
}

/// `conn` with its container's image when that is known now (the cache
/// only: a decision never waits for a container engine; until it answered,
/// the image is unknown to the policy and the record).
fn with_container_image(conn: Arc<ConnFacts>) -> Arc<ConnFacts> {
    match crate::container_image::enrich(&conn.process) {
        Some(process) => Arc::new(ConnFacts {
            process,
            ..(*conn).clone()
        }),
        None => conn,
    }
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
            process: crate::container_image::enrich(&conn.process)
                .unwrap_or_else(|| conn.process.clone()),
            server: server.to_string(),
            destination: Some(conn.dst),
            method: "tools/call".into(),
            tool: Some(tool.to_string()),
            args: serde_json::json!({}),
            time: now,
            credential: None,
            tool_pin: Default::default(),
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

    fn broker(&self) -> Option<Arc<crate::broker::Broker>> {
        self.broker.clone()
    }

    fn actor(&self, conn: &ConnFacts) -> crate::broker::oauth::Actor {
        let engine = &self.core.engine;
        let agent = engine.resolve(&conn.process, OffsetDateTime::now_utc());
        crate::broker::oauth::Actor {
            agent: agent.name,
            owner: agent.owner,
            uid: conn.process.uid,
            exe_sha256: engine.registry().exe_hash(&conn.process),
        }
    }

    fn proof_wanted(&self, server: &str) -> bool {
        self.core.proofs.wants(server)
    }

    fn prove(&self, request: &ProofRequest<'_>) -> Result<http::HeaderValue, String> {
        let core = &self.core;
        let now = OffsetDateTime::now_utc();
        core.proofs.sign(
            &core.key,
            &core.host,
            request,
            || core.engine.resolve(&request.conn.process, now),
            now,
        )
    }

    fn tools_listed(
        &self,
        conn: &ConnFacts,
        server: &str,
        result: &serde_json::Value,
        complete: bool,
    ) -> Result<(), String> {
        self.core.tools_listed(conn, server, result, complete)
    }

    fn forwarded(&self, decision_id: &str) {
        self.core.budget.forwarded(decision_id);
    }

    fn refused(&self, conn: &ConnFacts, reason: &str) {
        tokio::spawn(self.core.clone().refused(
            Arc::new(conn.clone()),
            reason.to_string(),
            Durability::Group,
        ));
    }

    fn refused_on_record(&self, conn: &ConnFacts, reason: &str) -> BoxFuture<'static, ()> {
        Box::pin(self.core.clone().refused(
            Arc::new(conn.clone()),
            reason.to_string(),
            Durability::Sync,
        ))
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
