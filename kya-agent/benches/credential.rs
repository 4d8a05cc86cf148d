//! Credential costs on the decision path: canonicalization, issuing (signing),
//! verifying a presented credential, the standing-store query that every held
//! call makes, and spending a single-use credential (a durable write).
//!
//! `cargo bench -p kya-agent --bench credential`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ed25519_dalek::SigningKey;
use kya_agent::credential::action::{
    self, AgentSubject, ArgBound, Channel, Environment, Evidence, Scope,
};
use kya_agent::credential::jcs;
use kya_agent::credential::store::CredentialStore;
use kya_agent::credential::verify::{self, Call};
use serde_json::{json, Value};
use std::hint::black_box;
use time::OffsetDateTime;

fn subject(agent: &str, max: i64) -> AgentSubject {
    AgentSubject {
        agent: agent.into(),
        exe_sha256: Some("ab".repeat(32)),
        uid: Some(1001),
        environment: Environment {
            host: "host-1".into(),
            cgroup: Some("/agents/billing".into()),
        },
        scope: Scope {
            server: Some("mcp.example.com".into()),
            tool: "transfer".into(),
            args_sha256: None,
            arg_bounds: vec![ArgBound {
                arg: "amount".into(),
                min: None,
                max: Some(max.into()),
            }],
            single_use: false,
        },
    }
}

fn call() -> Call {
    Call {
        agent: "billing-bot".into(),
        uid: 1001,
        cgroup: "/agents/billing".into(),
        exe_sha256: Some("ab".repeat(32)),
        host: "host-1".into(),
        server: "mcp.example.com".into(),
        method: "tools/call".into(),
        tool: "transfer".into(),
        args: json!({"amount": 400, "to": "bob", "memo": "invoice 2026-11"}),
    }
}

fn issue(key: &SigningKey, agent: &str, max: i64) -> (Value, action::ActionCredential) {
    let now = OffsetDateTime::now_utc();
    let ev = Evidence::approval("alice", Channel::Local, now).unwrap();
    action::issue(
        key,
        subject(agent, max),
        now,
        now + time::Duration::hours(1),
        vec![ev],
    )
    .unwrap()
}

fn benches(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let vk = key.verifying_key();
    let (doc, _) = issue(&key, "billing-bot", 500);
    let text = serde_json::to_vec(&doc).unwrap();

    c.bench_function("jcs_canonicalize_credential", |b| {
        b.iter(|| jcs::canonicalize(black_box(&doc)).unwrap())
    });
    c.bench_function("issue_credential", |b| {
        b.iter(|| issue(black_box(&key), "billing-bot", 500))
    });
    c.bench_function("verify_credential_bytes", |b| {
        b.iter(|| verify::verify_bytes(black_box(&text), &vk).unwrap())
    });
    let cred = verify::verify_bytes(&text, &vk).unwrap();
    let now = OffsetDateTime::now_utc();
    c.bench_function("check_call_scope_window_binding", |b| {
        let call = call();
        b.iter(|| verify::check_call(black_box(&cred), &call, now).unwrap())
    });

    for n in [1usize, 100, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        // n-1 credentials for other agents, then the covering one last: worst case.
        let mut docs: Vec<Value> = (1..n)
            .map(|i| issue(&key, &format!("agent-{i}"), 500).0)
            .collect();
        docs.push(doc.clone());
        let file = json!({"version": 1, "credentials": docs});
        std::fs::write(
            store.dir().join("standing.json"),
            serde_json::to_vec(&file).unwrap(),
        )
        .unwrap();
        let call = call();
        assert!(verify::find_covering(&store, &call, now, &vk)
            .unwrap()
            .is_some());
        c.bench_function(&format!("find_covering_{n}_standing"), |b| {
            b.iter(|| {
                verify::find_covering(&store, black_box(&call), now, &vk)
                    .unwrap()
                    .unwrap()
            })
        });
    }

    let dir = tempfile::tempdir().unwrap();
    let store = CredentialStore::open(dir.path()).unwrap();
    let until = now + time::Duration::hours(1);
    let mut i = 0u64;
    c.bench_function("spend_single_use_durable", |b| {
        b.iter_batched(
            || {
                i += 1;
                format!("urn:uuid:00000000-0000-4000-8000-{i:012x}")
            },
            |id| store.spend(&id, until, now).unwrap(),
            BatchSize::SmallInput,
        )
    });
}

criterion_group! {
    name = credential;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = benches
}
criterion_main!(credential);
