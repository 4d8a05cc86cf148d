//! Held calls: the approval asked for, the wait, and how it ends (approved
//! and released by a credential, rejected, expired, interrupted); each end
//! is the decision's one final record.

use super::offload::Offload;
use super::open::{self, OpenDecision};
use super::{audit_denial, deny_now, mint, Core, STOPPING_REASON};
use crate::approvals::{ActionRequest, Answer, ApprovalHandle, Outcome};
use crate::audit::event::{ApprovalInfo, EventKind};
use crate::audit::writer::Durability;
use crate::credential::action;
use crate::credential::service;
use crate::credential::verify::Call as CredCall;
use crate::intercept::http::{BoxFuture, CallFacts, Direction, Ruling};
use crate::metrics::{ApprovalLabels, Metrics};
use crate::policy::{AgentInfo, CallContext, Decision};
use kya_common::Verdict;
use std::sync::Arc;
use std::time::Instant;
use time::OffsetDateTime;

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn hold(
        self: Arc<Self>,
        call: CallFacts,
        ctx: CallContext,
        agent: AgentInfo,
        decision: Decision,
        decision_id: String,
        mut open: OpenDecision,
        started: Instant,
        cred_call: Option<CredCall>,
        tool_change: Option<serde_json::Value>,
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
            tool_change,
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
            // Locals drop in reverse order: if this future is dropped (the
            // agent went away, kya aborted the connection), the decision's
            // final record is handed to the writer before the approval leaves
            // the table and the journal.
            let hold_id = handle.id.clone();
            let mut handle = ApprovalEnd::new(handle, core.offload.clone());
            let mut open = open;
            let _held = HeldGauge(metrics.clone());
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
            // The approval leaves the table (and the journal) only when this
            // future ends, after the final record: a crash in between leaves
            // it journaled, and the next start records its end.
            let outcome = handle.outcome().await;
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
                        Ok((cred_id, document)) => {
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
                            let grant = core.proofs.grant(&call, &ctx.agent, Some(&document));
                            Ruling::Allow {
                                decision_id: wait_decision_id,
                                grant,
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

    /// The credential that releases an approved call (blocking: the store):
    /// its id and the secured document.
    fn release(
        &self,
        call: &CallFacts,
        ctx: &CallContext,
        answer: &Answer,
        hold_id: &str,
        binding: &str,
        cred_call: Option<&CredCall>,
    ) -> Result<(String, serde_json::Value), String> {
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
            mint::mint_and_redeem(
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

/// A held call's approval handle, ended on the blocking pool: dropping the
/// handle takes the approval out of the table and the approvals journal (a
/// write, sometimes a compaction with `fsync`, behind the journal's lock),
/// which must not run on an async worker.
struct ApprovalEnd {
    handle: Option<ApprovalHandle>,
    offload: Offload,
}

impl ApprovalEnd {
    fn new(handle: ApprovalHandle, offload: Offload) -> Self {
        Self {
            handle: Some(handle),
            offload,
        }
    }

    async fn outcome(&mut self) -> Outcome {
        match self.handle.as_mut() {
            Some(h) => h.outcome().await,
            None => Outcome::Cancelled("approval already ended".into()),
        }
    }
}

impl Drop for ApprovalEnd {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let offload = self.offload.clone();
                // Should the pool refuse the job (the runtime is stopping),
                // the job, and with it the handle, is dropped there instead.
                rt.spawn(async move { offload.run(move || drop(handle)).await });
            }
            // Not on a runtime: this thread may block.
            Err(_) => drop(handle),
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
pub(super) fn id_token_digest(answer: &Answer) -> Option<String> {
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

    /// The approvals journal's end of a held call runs on the blocking pool:
    /// with the journal's lock held elsewhere, a rejected call's ruling still
    /// reaches the agent on a single async worker.
    #[tokio::test(flavor = "current_thread")]
    async fn the_journal_end_of_a_hold_does_not_block_the_worker() {
        use crate::approvals::persist::Persist;
        use crate::approvals::Approvals;
        use crate::audit::writer::{AuditConfig, AuditLog};
        use crate::credential::store::CredentialStore;
        use crate::decision::events::EventHub;
        use crate::decision::DecisionPath;
        use crate::intercept::http::{ConnFacts, Governor};
        use crate::policy::PolicyEngine;

        let dir = tempfile::tempdir().expect("tempdir");
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            "[defaults]\nverdict = \"allow\"\n[[rule]]\nid = \"hold-all\"\ntool = \"transfer\"\nverdict = \"hold\"\n",
        )
        .expect("policy");
        let agents = dir.path().join("agents.toml");
        let uid = nix::unistd::getuid().as_raw();
        std::fs::write(
            &agents,
            format!("[[agent]]\nname = \"bot\"\nowner = \"alice\"\nmatch = {{ uid = {uid} }}\n"),
        )
        .expect("agents");
        let engine = Arc::new(
            PolicyEngine::new(vec![policy], Some(agents), Some(dir.path())).expect("engine"),
        );
        let key = Arc::new(crate::keys::load_or_create(dir.path()).expect("key"));
        let audit = Arc::new(
            AuditLog::open(
                AuditConfig::new(dir.path().join("audit.jsonl")),
                (*key).clone(),
            )
            .expect("audit"),
        );
        let persist = Persist::new(dir.path());
        let approvals = Approvals::new(8, Some(persist.clone()));
        let path = DecisionPath::new(
            engine,
            approvals.clone(),
            Arc::new(CredentialStore::open(dir.path()).expect("store")),
            key,
            audit,
            EventHub::new(),
            Metrics::new(),
            Arc::new(crate::agents::Suspensions::open(dir.path()).expect("suspensions")),
        );
        let conn = Arc::new(ConnFacts {
            process: kya_common::ProcessIdentity {
                pid: std::process::id(),
                uid,
                ..Default::default()
            },
            dst: "127.0.0.1:9".parse().expect("address"),
            sni: None,
            tls: false,
            conn_id: 1,
            tunnel: None,
        });
        let facts = CallFacts {
            conn,
            server: "mcp.test".into(),
            direction: Direction::ClientToServer,
            method: "tools/call".into(),
            tool: Some("transfer".into()),
            args: serde_json::json!({}),
            jsonrpc_id: Some(serde_json::json!(1)),
            session: None,
            protocol_version: None,
            progress_token: None,
            batch: None,
        };
        let Ruling::Hold { wait, .. } = path.decide(facts).await else {
            panic!("the call is held");
        };
        let id = approvals.list()[0].id.clone();
        approvals
            .answer(
                &id,
                Answer {
                    approve: false,
                    approver: "alice".into(),
                    channel: "local".into(),
                    reason: None,
                    evidence: None,
                },
            )
            .expect("answer");
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let stalled = {
            let persist = persist.clone();
            std::thread::spawn(move || {
                persist.stall(locked_tx, release_rx, std::time::Duration::from_secs(20))
            })
        };
        locked.recv().expect("the journal is locked");
        let ruling = wait.await;
        let _ = release.send(());
        assert!(matches!(ruling, Ruling::Deny { .. }), "the call is denied");
        assert!(
            stalled.join().expect("staller"),
            "the ruling waited for the journal's lock on the async worker"
        );
        // The end is journaled once the lock is free.
        for _ in 0..2000 {
            if approvals.is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the approval never left the table");
    }
}
