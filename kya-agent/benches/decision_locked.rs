//! Decision latency of an allowed `tools/call` through the real decision path
//! (policy, credential lookup, audit record), on a runtime with two async
//! workers: with the credential store free, and while another holder keeps
//! the store's `flock` and two approved calls are blocked spending their
//! credentials (which, before the store's work moved off the async workers,
//! stalled every decision).
//!
//! Run: `cargo bench -p kya-agent --bench decision_locked`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use kya_agent::approvals::{Answer, Approvals};
use kya_agent::audit::writer::{AuditConfig, AuditLog};
use kya_agent::credential::store::CredentialStore;
use kya_agent::decision::events::EventHub;
use kya_agent::decision::DecisionPath;
use kya_agent::intercept::http::{CallFacts, ConnFacts, Direction, Governor, Ruling};
use kya_agent::metrics::Metrics;
use kya_agent::policy::PolicyEngine;

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
name = "bench-bot"
owner = "nobody"
match = { uid = 0 }
"#;

fn facts(tool: &str, n: u64) -> CallFacts {
    CallFacts {
        conn: Arc::new(ConnFacts {
            process: Default::default(),
            dst: "127.0.0.1:443".parse().unwrap(),
            sni: None,
            tls: false,
            conn_id: 1,
            tunnel: None,
        }),
        server: "mcp.bench".into(),
        direction: Direction::ClientToServer,
        method: "tools/call".into(),
        tool: Some(tool.into()),
        args: serde_json::json!({"q": n}),
        jsonrpc_id: Some(serde_json::json!(n)),
        session: None,
        protocol_version: None,
        progress_token: None,
        batch: None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(dir.path().join("policy.toml"), POLICY).unwrap();
    std::fs::write(dir.path().join("agents.toml"), AGENTS).unwrap();
    let (gov, approvals, store_dir) = rt.block_on(async {
        let engine = Arc::new(
            PolicyEngine::new(
                vec![dir.path().join("policy.toml")],
                Some(dir.path().join("agents.toml")),
                Some(dir.path()),
            )
            .unwrap(),
        );
        let key = Arc::new(kya_agent::keys::load_or_create(dir.path()).unwrap());
        let audit = Arc::new(
            AuditLog::open(
                AuditConfig::new(dir.path().join("audit.jsonl")),
                (*key).clone(),
            )
            .unwrap(),
        );
        let store = Arc::new(CredentialStore::open(dir.path()).unwrap());
        let store_dir = store.dir().to_path_buf();
        let approvals = Approvals::new(64, None);
        let gov: Arc<dyn Governor> = Arc::new(DecisionPath::new(
            engine,
            approvals.clone(),
            store,
            key,
            audit,
            EventHub::new(),
            Metrics::new(),
            Arc::new(kya_agent::agents::Suspensions::open(dir.path()).unwrap()),
        ));
        (gov, approvals, store_dir)
    });
    let mut n = 0u64;
    let mut allowed = |c: &mut Criterion, name: &str| {
        c.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                let r = rt.block_on(gov.decide(facts("search", n)));
                assert!(matches!(r, Ruling::Allow { .. }));
            })
        });
    };
    allowed(c, "decide allowed call, store free");

    // Another holder takes the store's lock; two approved calls block on it.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(store_dir.join("lock"))
        .unwrap();
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let mut blocked = Vec::new();
    for i in 0..2 {
        let Ruling::Hold { wait, .. } = rt.block_on(gov.decide(facts("transfer", 1_000_000 + i)))
        else {
            panic!("transfer is held");
        };
        blocked.push(rt.spawn(wait));
    }
    rt.block_on(async {
        while approvals.len() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    for (id, _) in approvals.pending() {
        approvals
            .answer(
                &id,
                Answer {
                    approve: true,
                    approver: "nobody".into(),
                    channel: "local".into(),
                    reason: None,
                    evidence: None,
                },
            )
            .unwrap();
    }
    allowed(c, "decide allowed call, store locked, 2 releases blocked");
    drop(lock);
    for b in blocked {
        let r = rt.block_on(b).unwrap();
        assert!(matches!(r, Ruling::Allow { .. }), "{r:?}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
