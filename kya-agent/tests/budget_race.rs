//! Budgets under concurrency, through the real decision path and proxy: an
//! agent firing calls in parallel cannot together overshoot a budget, and a
//! call allowed but never sent (its batch was refused) gives its amount back.
//! Counted on the upstream's own record, not on kya's.

mod proxy_support;

use std::sync::Arc;

use kya_agent::approvals::Approvals;
use kya_agent::audit::writer::{AuditConfig, AuditLog};
use kya_agent::credential::store::CredentialStore;
use kya_agent::decision::events::EventHub;
use kya_agent::decision::DecisionPath;
use kya_agent::intercept::http::{Governor, HttpVersion, Limits};
use kya_agent::metrics::Metrics;
use kya_agent::policy::PolicyEngine;
use proxy_support::*;
use serde_json::{json, Value};

const POLICY: &str = r#"
[defaults]
verdict = "allow"
methods = "allow"

[[rule]]
id = "no-wipe"
tool = "wipe"
verdict = "deny"

[[budget]]
id = "spend"
tool = "transfer"
sum = "args.amount"
max = 1000
per = "24h"
verdict = "deny"
"#;

struct Kya {
    _dir: tempfile::TempDir,
    engine: Arc<PolicyEngine>,
    gov: Arc<dyn Governor>,
}

fn kya() -> Kya {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let engine =
        Arc::new(PolicyEngine::new(vec![policy], None, Some(dir.path())).expect("policy engine"));
    let key = Arc::new(kya_agent::keys::load_or_create(dir.path()).expect("key"));
    let audit = Arc::new(
        AuditLog::open(
            AuditConfig::new(dir.path().join("audit.jsonl")),
            (*key).clone(),
        )
        .expect("audit"),
    );
    let gov: Arc<dyn Governor> = Arc::new(DecisionPath::new(
        engine.clone(),
        Approvals::new(16, None),
        Arc::new(CredentialStore::open(dir.path()).expect("credentials")),
        key,
        audit,
        EventHub::new(),
        Metrics::new(),
        Arc::new(kya_agent::agents::Suspensions::open(dir.path()).expect("suspensions")),
    ));
    Kya {
        _dir: dir,
        engine,
        gov,
    }
}

/// One call on its own connection; the JSON-RPC answer.
async fn one(addr: std::net::SocketAddr, body: Value) -> Value {
    let mut c = Client::h1(addr).await;
    let (_, _, b) = c
        .post("/mcp", body.to_string(), &[("accept", "application/json")])
        .await;
    json_of(&b)
}

/// The upstream's result (kya's denials are tool errors).
fn ran(answer: &Value) -> bool {
    answer["result"]["content"][0]["text"]
        .as_str()
        .is_some_and(|t| t.starts_with("ran transfer"))
}

fn transfers(up: &Upstream) -> Vec<i64> {
    up.seen()
        .iter()
        .map(Seen::json)
        .filter(|v| v["params"]["name"] == "transfer")
        .filter_map(|v| v["params"]["arguments"]["amount"].as_i64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_calls_cannot_overshoot_a_budget() {
    let k = kya();
    let up = upstream().await;
    let addr = proxy_with(
        up.addr,
        k.gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;

    // 24 transfers of 300 at once against a budget of 1000: exactly 3 pass.
    let calls: Vec<_> = (0..24)
        .map(|i| tokio::spawn(one(addr, call(i, "transfer", json!({"amount": 300})))))
        .collect();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.expect("call task"));
    }
    let passed = answers.iter().filter(|a| ran(a)).count();
    let refused: Vec<_> = answers
        .iter()
        .filter(|a| !ran(a))
        .map(|a| a.to_string())
        .collect();
    assert_eq!(transfers(&up), vec![300, 300, 300], "the upstream's record");
    assert_eq!(passed, 3, "{answers:?}");
    assert_eq!(refused.len(), 21);
    assert!(
        refused.iter().all(|r| r.contains("rule spend")),
        "{refused:?}"
    );
    assert_eq!(k.engine.budget_reservations(), 0, "all resolved");

    // A batch with an allowed transfer of 100 and a denied call sends
    // nothing; the 100 it reserved is given back...
    let batch = json!([
        call(100, "transfer", json!({"amount": 100})),
        call(101, "wipe", json!({})),
    ]);
    let answer = one(addr, batch).await;
    assert!(answer.to_string().contains("no-wipe"), "{answer}");
    assert_eq!(transfers(&up).len(), 3, "the batch was not forwarded");
    assert_eq!(k.engine.budget_reservations(), 0);
    // ...so a transfer of 100 still fits (900 + 100 = 1000), and then 1 does not.
    let a = one(addr, call(102, "transfer", json!({"amount": 100}))).await;
    assert!(ran(&a), "{a}");
    let a = one(addr, call(103, "transfer", json!({"amount": 1}))).await;
    assert!(a.to_string().contains("spend"), "{a}");
    assert_eq!(transfers(&up), vec![300, 300, 300, 100]);
}
