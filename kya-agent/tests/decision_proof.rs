//! The real decision path signs the proofs of decision: an allowed call's
//! receipt names the agent and owner the decision resolved and the decision
//! id in the audit log; an approved held call's receipt carries the
//! credential minted for it, and a call a standing credential releases
//! carries that one. Verified with kya's public key, on what the upstream received.

mod proxy_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kya_agent::approvals::{Answer, Approvals};
use kya_agent::audit::writer::{AuditConfig, AuditLog};
use kya_agent::credential::header;
use kya_agent::credential::store::CredentialStore;
use kya_agent::decision::events::EventHub;
use kya_agent::decision::receipts::ProofSettings;
use kya_agent::decision::DecisionPath;
use kya_agent::intercept::http::{Governor, HttpVersion, Limits};
use kya_agent::metrics::Metrics;
use kya_agent::policy::PolicyEngine;
use proxy_support::*;
use serde_json::json;
use time::OffsetDateTime;

const POLICY: &str = r#"
[defaults]
verdict = "allow"
methods = "allow"
hold_timeout = "300s"

[[rule]]
id = "big-transfer"
tool = "transfer"
verdict = "hold"
"#;

const AGENTS: &str = r#"
[[agent]]
name = "bot"
owner = "alice"
match = { uid = 0 }
"#;

struct Kya {
    dir: tempfile::TempDir,
    key: ed25519_dalek::VerifyingKey,
    approvals: Arc<Approvals>,
    gov: Arc<dyn Governor>,
}

fn kya(servers: &[&str]) -> Kya {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let agents = dir.path().join("agents.toml");
    std::fs::write(&agents, AGENTS).expect("agents");
    let engine = Arc::new(
        PolicyEngine::new(vec![policy], Some(agents), Some(dir.path())).expect("policy engine"),
    );
    let key = Arc::new(kya_agent::keys::load_or_create(dir.path()).expect("key"));
    let audit = Arc::new(
        AuditLog::open(
            AuditConfig::new(dir.path().join("audit.jsonl")),
            (*key).clone(),
        )
        .expect("audit"),
    );
    let approvals = Approvals::new(8, None);
    let store = Arc::new(CredentialStore::open(dir.path()).expect("credentials"));
    let decisions = DecisionPath::new(
        engine,
        approvals.clone(),
        store,
        key.clone(),
        audit,
        EventHub::new(),
        Metrics::new(),
        Arc::new(kya_agent::agents::Suspensions::open(dir.path()).expect("suspensions")),
    )
    .with_proofs(ProofSettings {
        servers: servers
            .iter()
            .map(|s| s.to_string())
            .collect::<HashSet<_>>(),
        ttl: Duration::from_secs(30),
    });
    Kya {
        key: key.verifying_key(),
        dir,
        approvals,
        gov: Arc::new(decisions),
    }
}

impl Kya {
    fn verified(&self, seen: &Seen) -> header::Verified {
        let values: Vec<_> = seen.headers.get_all(header::HEADER_NAME).iter().collect();
        assert_eq!(values.len(), 1, "{:?}", seen.headers);
        header::verify(
            values[0].to_str().expect("ascii"),
            &self.key,
            OffsetDateTime::now_utc(),
            Some(&seen.body),
        )
        .expect("the receipt verifies with kya's public key")
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default()
    }

    async fn approve_next(&self) {
        self.answer_next(None).await
    }

    async fn answer_next(&self, evidence: Option<serde_json::Value>) {
        while self.approvals.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (id, _) = self.approvals.pending().pop().expect("held");
        self.approvals
            .answer(
                &id,
                Answer {
                    approve: true,
                    approver: "alice".into(),
                    channel: "local".into(),
                    reason: None,
                    evidence,
                },
            )
            .expect("answer");
    }
}

#[tokio::test]
async fn an_allowed_call_is_proven_with_the_decisions_agent_and_id() {
    let k = kya(&["127.0.0.1"]);
    let up = upstream().await;
    let addr = proxy_with(
        up.addr,
        k.gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let mut c = Client::h1(addr).await;
    let (status, _, _) = c
        .post(
            "/mcp",
            call(1, "search_docs", json!({"q": "x"})).to_string(),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    let seen = up.seen();
    let v = k.verified(&seen[0]);
    let s = &v.receipt.subject;
    assert_eq!(s.agent.name, "bot");
    assert_eq!(s.agent.owner.as_deref(), Some("alice"));
    assert_eq!(s.calls.len(), 1);
    assert!(s.calls[0].credential.is_none());
    let decision = &s.calls[0].decision;
    assert!(
        k.audit().contains(decision.as_str()),
        "{decision} is on record"
    );
    assert_eq!(
        (v.receipt.valid_until - v.receipt.valid_from).whole_seconds(),
        30
    );
}

#[tokio::test]
async fn other_servers_get_no_proof() {
    let k = kya(&["mcp.example.com"]);
    let up = upstream().await;
    let addr = proxy_with(
        up.addr,
        k.gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let mut c = Client::h1(addr).await;
    let (status, _, _) = c
        .post(
            "/mcp",
            call(1, "search_docs", json!({"q": "x"})).to_string(),
            &[("kya-decision", "forged")],
        )
        .await;
    assert_eq!(status, 200);
    assert!(up.seen()[0].headers.get(header::HEADER_NAME).is_none());
}

#[tokio::test]
async fn an_approved_call_carries_the_credential_minted_for_it() {
    let k = kya(&["127.0.0.1"]);
    let up = upstream().await;
    let addr = proxy_with(
        up.addr,
        k.gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let args = json!({"amount": 9000, "to": "bob"});
    let held = {
        let args = args.clone();
        tokio::spawn(async move {
            let mut c = Client::h1(addr).await;
            c.post("/mcp", call(7, "transfer", args).to_string(), &[])
                .await
        })
    };
    k.approve_next().await;
    let (status, _, body) = held.await.expect("the held call");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(up.tools_called(), ["transfer"]);
    let v = k.verified(&up.seen()[0]);
    assert_eq!(
        v.credentials.len(),
        1,
        "the approval's credential is carried"
    );
    let cred = &v.credentials[0].1;
    assert_eq!(cred.subject.scope.tool, "transfer");
    assert!(cred.subject.scope.single_use);
    assert_eq!(
        cred.subject.scope.args_sha256.as_deref(),
        Some(
            kya_agent::credential::action::args_digest(&args)
                .expect("digest")
                .as_str()
        )
    );
    assert_eq!(cred.evidence[0].approver, "alice");
    // The audit log's approval names the same credential.
    assert!(k.audit().contains(&cred.id), "{}", cred.id);
}

#[tokio::test]
async fn a_call_a_standing_credential_releases_carries_that_credential() {
    let k = kya(&["127.0.0.1"]);
    let up = upstream().await;
    let addr = proxy_with(
        up.addr,
        k.gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    // The owner approves the first transfer for an hour (`approve --for 1h`).
    let held = tokio::spawn(async move {
        let mut c = Client::h1(addr).await;
        c.post(
            "/mcp",
            call(1, "transfer", json!({"amount": 1})).to_string(),
            &[],
        )
        .await
    });
    k.answer_next(Some(json!({"standing_for_secs": 3600})))
        .await;
    let (status, _, _) = held.await.expect("the held call");
    assert_eq!(status, 200);
    // The next transfer is released by that standing credential, unasked.
    let mut c = Client::h1(addr).await;
    let (status, _, _) = c
        .post(
            "/mcp",
            call(2, "transfer", json!({"amount": 2})).to_string(),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    assert!(k.approvals.is_empty(), "the second call was not held");
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let first = k.verified(&seen[0]);
    let second = k.verified(&seen[1]);
    let (a, b) = (&first.credentials[0].1, &second.credentials[0].1);
    assert!(!a.subject.scope.single_use);
    assert_eq!(a.id, b.id, "the same standing credential released both");
}
