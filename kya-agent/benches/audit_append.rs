//! Audit log append cost on the build machine's disk (not tmpfs: `fdatasync`
//! must be real). Run: `cargo bench -p kya-agent --bench audit_append`.
//!
//! * `group_1000`: 1000 group-committed appends, then wait for all receipts
//!   (throughput of the batching writer).
//! * `sync_1`: one synchronous append (write + fdatasync) — what a hold or an
//!   approval waits for.
//! * `group_burst_256_last_commit`: 256 group appends issued at once; the time
//!   until the last is on disk, i.e. the worst group-commit delay in a burst
//!   (the figure behind the documented ≤ 10 ms bound).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kya_agent::audit::event::{AgentInfo, Destination, McpInfo, ProcessInfo};
use kya_agent::audit::{AuditConfig, AuditLog, DecisionEvent, Durability, EventKind};
use kya_common::Verdict;

fn event(n: u64) -> DecisionEvent {
    let mut mcp = McpInfo {
        method: "tools/call".into(),
        tool: Some("search_docs".into()),
        jsonrpc_id: Some(serde_json::json!(n)),
        session_id: Some("0f6c2a1e-session".into()),
        ..Default::default()
    };
    mcp.set_args(
        &serde_json::json!({"query": "quarterly numbers", "limit": 10}),
        false,
        &[],
    );
    DecisionEvent {
        decision_id: format!("01J{n:023}"),
        kind: EventKind::Decision,
        time: time::OffsetDateTime::now_utc(),
        host: "bench-host".into(),
        process: ProcessInfo {
            pid: 4242,
            tgid: 4242,
            uid: 1001,
            gid: 1001,
            exe: "/usr/bin/python3.11".into(),
            exe_sha256: Some("ab".repeat(32)),
            comm: "python3".into(),
            cmdline: vec!["python3".into(), "agent.py".into()],
            ppid: Some(1),
            cgroup: "/agents/billing".into(),
            ..Default::default()
        },
        agent: AgentInfo {
            name: "billing-bot".into(),
            owner: Some("alice".into()),
        },
        destination: Destination {
            host: "mcp.example.com".into(),
            ip: Some("127.0.0.1".parse().unwrap()),
            port: 443,
            sni: Some("mcp.example.com".into()),
        },
        mcp,
        verdict: Verdict::Allow,
        rule: Some("read-only-ok".into()),
        reason: "search tools are allowed".into(),
        policy_version: "sha256:0123456789abcdef".into(),
        approval: None,
        credential_id: None,
        hold_id: None,
        latency_us: 42,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let mut cfg = AuditConfig::new(dir.path().join("audit.jsonl"));
    cfg.origin = Some("bench/kya-audit".into());
    cfg.rotate_bytes = 1 << 40;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let log = AuditLog::open(cfg, key).unwrap();
    let ev = event(1);

    let mut g = c.benchmark_group("audit_append");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("group_1000", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut receipts = Vec::with_capacity(1000);
                for _ in 0..1000 {
                    receipts.push(log.append(&ev, Durability::Group).await.unwrap());
                }
                for r in receipts {
                    r.committed().await.unwrap();
                }
            })
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("sync_1", |b| {
        b.iter(|| rt.block_on(async { log.append(&ev, Durability::Sync).await.unwrap() }))
    });
    g.throughput(Throughput::Elements(256));
    g.bench_function("group_burst_256_last_commit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut receipts = Vec::with_capacity(256);
                for _ in 0..256 {
                    receipts.push(log.append(&ev, Durability::Group).await.unwrap());
                }
                for r in receipts {
                    r.committed().await.unwrap();
                }
            })
        })
    });
    g.finish();
    log.close().unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
