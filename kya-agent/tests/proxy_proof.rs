//! Proofs of decision through the proxy: a server that asked for them gets
//! one `Kya-Decision` header per request, kya's own, bound to the exact body
//! it receives; no server ever gets a header the agent wrote. Judged on the
//! upstream's own record of what it received.

mod proxy_support;

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use kya_agent::credential::header;
use kya_agent::decision::receipts::ProofSettings;
use kya_agent::intercept::http::{
    BoxFuture, CallFacts, ConnFacts, Governor, HttpVersion, Limits, ProofRequest, Ruling,
};
use kya_agent::policy::AgentInfo;
use proxy_support::*;
use serde_json::json;
use time::OffsetDateTime;

/// The table-driven fake governor, with the real receipt signing for the
/// servers `proofs` names.
struct ProofGov {
    inner: GovHandle,
    proofs: ProofSettings,
    key: SigningKey,
    /// Signing fails (the request must then not go).
    broken: bool,
}

fn agent() -> AgentInfo {
    AgentInfo {
        name: "bot".into(),
        owner: Some("alice".into()),
        orphaned: false,
    }
}

impl Governor for ProofGov {
    fn decide(&self, call: CallFacts) -> BoxFuture<'static, Ruling> {
        let grant = self.proofs.grant(&call, &agent(), None);
        let decided = self.inner.decide(call);
        Box::pin(async move {
            match decided.await {
                Ruling::Allow { decision_id, .. } => Ruling::Allow { decision_id, grant },
                Ruling::Hold {
                    decision_id,
                    owner,
                    binding,
                    wait,
                } => Ruling::Hold {
                    decision_id,
                    owner,
                    binding,
                    wait: Box::pin(async move {
                        match wait.await {
                            Ruling::Allow { decision_id, .. } => {
                                Ruling::Allow { decision_id, grant }
                            }
                            other => other,
                        }
                    }),
                },
                other => other,
            }
        })
    }
    fn may_call(&self, conn: &ConnFacts, server: &str, tool: &str) -> bool {
        self.inner.may_call(conn, server, tool)
    }
    fn refused(&self, conn: &ConnFacts, reason: &str) {
        self.inner.refused(conn, reason)
    }
    fn proof_wanted(&self, server: &str) -> bool {
        self.proofs.wants(server)
    }
    fn prove(&self, request: &ProofRequest<'_>) -> Result<http::HeaderValue, String> {
        if self.broken {
            return Err("the signing key is gone".into());
        }
        self.proofs.sign(
            &self.key,
            "test-host",
            request,
            agent,
            OffsetDateTime::now_utc(),
        )
    }
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[11; 32])
}

/// The upstream, the fake governor's table, and an HTTP/1.1 client through
/// a proxy whose governor signs for `servers`.
async fn setup(servers: &[&str], broken: bool) -> (Upstream, Arc<FakeGov>, Client) {
    let up = upstream().await;
    let fake = default_gov();
    let gov = Arc::new(ProofGov {
        inner: GovHandle(fake.clone()),
        proofs: ProofSettings {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            ttl: Duration::from_secs(60),
        },
        key: key(),
        broken,
    });
    let addr = proxy_with(up.addr, gov, Limits::default(), HttpVersion::H1, None).await;
    (up, fake, Client::h1(addr).await)
}

/// The proof headers a request reached the upstream with.
fn proofs_of(seen: &Seen) -> Vec<String> {
    seen.headers
        .get_all(header::HEADER_NAME)
        .iter()
        .map(|v| v.to_str().unwrap_or("<not ascii>").to_string())
        .collect()
}

fn verified(seen: &Seen) -> header::Verified {
    let proofs = proofs_of(seen);
    assert_eq!(proofs.len(), 1, "exactly one proof: {proofs:?}");
    header::verify(
        &proofs[0],
        &key().verifying_key(),
        OffsetDateTime::now_utc(),
        Some(&seen.body),
    )
    .unwrap_or_else(|e| panic!("the upstream's proof does not verify: {e}"))
}

const FORGED: &[(&str, &str)] = &[
    ("kya-decision", "eyJmb3JnZWQiOnRydWV9"),
    ("KYA-Decision", "second"),
    ("connection", "kya-decision"),
];

#[tokio::test]
async fn a_server_that_did_not_ask_never_gets_a_proof_header() {
    let (up, _gov, mut c) = setup(&["proof.test"], false).await;
    let (status, _, _) = c
        .post(
            "/mcp",
            call(1, "search_docs", json!({"q": "x"})).to_string(),
            FORGED,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = c.get("/plain", FORGED).await;
    assert_eq!(status, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert!(
            proofs_of(s).is_empty(),
            "{} {}: {:?}",
            s.method,
            s.path,
            s.headers
        );
    }
}

#[tokio::test]
async fn an_allowed_call_carries_kyas_receipt_bound_to_the_body_sent() {
    let (up, _gov, mut c) = setup(&["127.0.0.1"], false).await;
    let (status, _, _) = c
        .post(
            "/mcp?x=1",
            // Not canonical as sent: kya forwards (and binds) the canonical bytes.
            r#"{ "params": {"arguments": {"q": "x"}, "name": "search_docs"}, "method": "tools/call", "id": 1, "jsonrpc": "2.0" }"#,
            FORGED,
        )
        .await;
    assert_eq!(status, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let v = verified(&seen[0]);
    let s = &v.receipt.subject;
    assert_eq!(s.server, "127.0.0.1");
    assert_eq!(s.request.method, "POST");
    assert_eq!(s.request.path, "/mcp?x=1");
    assert_eq!(s.agent.name, "bot");
    assert_eq!(s.calls.len(), 1);
    assert_eq!(s.calls[0].method, "tools/call");
    assert_eq!(s.calls[0].tool.as_deref(), Some("search_docs"));
    assert_eq!(
        s.calls[0].args_sha256.as_deref(),
        Some(
            kya_agent::credential::action::args_digest(&json!({"q": "x"}))
                .unwrap()
                .as_str()
        )
    );
    assert!(s.calls[0].decision.starts_with("d-"));
    // What the upstream got is exactly what the receipt is for: another
    // body does not verify against it.
    let proof = &proofs_of(&seen[0])[0];
    let e = header::verify(
        proof,
        &key().verifying_key(),
        OffsetDateTime::now_utc(),
        Some(
            call(1, "search_docs", json!({"q": "y"}))
                .to_string()
                .as_bytes(),
        ),
    )
    .unwrap_err();
    assert_eq!(e.code(), "body_mismatch");
}

#[tokio::test]
async fn a_batch_has_one_receipt_listing_every_decision() {
    let (up, _gov, mut c) = setup(&["127.0.0.1"], false).await;
    let batch = json!([
        call(1, "search_docs", json!({"q": "a"})),
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        call(2, "search_docs", json!({"q": "b"})),
    ]);
    let (status, _, _) = c.post("/mcp", batch.to_string(), &[]).await;
    assert_eq!(status, 200);
    let seen = up.seen();
    let v = verified(&seen[0]);
    let calls = &v.receipt.subject.calls;
    let methods: Vec<_> = calls.iter().map(|c| c.method.as_str()).collect();
    assert_eq!(
        methods,
        ["tools/call", "notifications/initialized", "tools/call"]
    );
    let mut ids: Vec<_> = calls.iter().map(|c| c.decision.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one decision each: {ids:?}");
}

#[tokio::test]
async fn requests_without_a_decided_message_carry_an_empty_receipt() {
    let (up, _gov, mut c) = setup(&["127.0.0.1"], false).await;
    let (status, _, _) = c.get("/plain", FORGED).await;
    assert_eq!(status, 200);
    let seen = up.seen();
    let v = verified(&seen[0]);
    assert!(v.receipt.subject.calls.is_empty());
    assert_eq!(v.receipt.subject.request.method, "GET");
    assert_eq!(v.receipt.subject.agent.owner.as_deref(), Some("alice"));
}

#[tokio::test]
async fn an_approved_held_call_carries_its_receipt() {
    let (up, gov, mut c) = setup(&["127.0.0.1"], false).await;
    let release = {
        let gov = gov.clone();
        tokio::spawn(async move { gov.release("transfer", true).await })
    };
    let (status, _, _) = c
        .post(
            "/mcp",
            call(3, "transfer", json!({"amount": 5})).to_string(),
            FORGED,
        )
        .await;
    release.await.unwrap();
    assert_eq!(status, 200);
    let seen = up.seen();
    assert_eq!(up.tools_called(), ["transfer"]);
    let v = verified(&seen[0]);
    assert_eq!(v.receipt.subject.calls[0].tool.as_deref(), Some("transfer"));
}

#[tokio::test]
async fn no_proof_no_request() {
    let (up, gov, mut c) = setup(&["127.0.0.1"], true).await;
    let (status, _, body) = c
        .post(
            "/mcp",
            call(1, "search_docs", json!({"q": "x"})).to_string(),
            &[],
        )
        .await;
    // The call is answered with the reason, as a denial the model sees.
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v = json_of(&body);
    assert_eq!(v["id"], json!(1));
    assert_eq!(v["result"]["isError"], json!(true), "{v}");
    assert!(v.to_string().contains("no proof of decision"), "{v}");
    // A request with no JSON-RPC to answer gets an HTTP error.
    let (status, _, _) = c.get("/plain", &[]).await;
    assert_eq!(status, 502);
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    assert_eq!(gov.refusals.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn an_approved_call_held_with_progress_carries_its_receipt() {
    let (up, gov, mut c) = setup(&["127.0.0.1"], false).await;
    let body = json!({"jsonrpc":"2.0","id":5,"method":"tools/call",
        "params":{"name":"transfer","arguments":{"amount":5000},"_meta":{"progressToken":"pt-1"}}});
    let resp = c
        .send(post_req("/mcp", &body, true, &[("kya-decision", "forged")]))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    gov.wait_for_hold("transfer").await;
    assert!(up.seen().is_empty());
    gov.release("transfer", true).await;
    let rest = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let last = sse_messages(&rest).pop().expect("a final message");
    assert_eq!(last["id"], json!(5), "{last}");
    assert_eq!(up.tools_called(), ["transfer"]);
    let v = verified(&up.seen()[0]);
    assert_eq!(v.receipt.subject.calls[0].tool.as_deref(), Some("transfer"));
}

#[tokio::test]
async fn an_approved_call_held_with_progress_is_not_sent_without_a_proof() {
    let (up, gov, mut c) = setup(&["127.0.0.1"], true).await;
    let body = json!({"jsonrpc":"2.0","id":6,"method":"tools/call",
        "params":{"name":"transfer","arguments":{"amount":5000},"_meta":{"progressToken":"pt-2"}}});
    let resp = c.send(post_req("/mcp", &body, true, &[])).await;
    assert_eq!(resp.status(), 200);
    gov.release("transfer", true).await;
    let rest = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let last = sse_messages(&rest).pop().expect("a final message");
    assert_eq!(last["id"], json!(6), "{last}");
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no proof of decision")),
        "{last}"
    );
    assert!(up.seen().is_empty(), "{:?}", up.seen());
}
