//! Decision time for 10 / 100 / 1,000 / 10,000 rules.
//!
//! The rule mix is what real policies look like: exact tool names, tool globs
//! (prefix and suffix), server-only rules, CEL conditions over nested
//! arguments, a few catch-all rules that every call must evaluate (after-hours
//! and a destructive-SQL check), and two budgets. Each tool has a bounded
//! number of rules (as in real policies), so more rules means more tools.
//! The calls hit exact names, globs, CEL rules, server rules and nothing at all.
//!
//! Run: `cargo bench -p kya-agent --bench policy`. Besides criterion's
//! estimates it prints median and p99 of individually timed decisions.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use kya_agent::policy::budget::BudgetState;
use kya_agent::policy::diag::Source;
use kya_agent::policy::{AgentInfo, CallContext, Decide, Policy, PolicyEngine, Registry};
use serde_json::json;
use std::fmt::Write;
use std::time::{Duration, Instant};

fn policy_text(n: usize) -> String {
    let mut t = String::from(
        "[defaults]\nverdict = \"deny\"\nmethods = \"allow\"\n\n\
         [[rule]]\nid = \"after-hours\"\ntool = \"*\"\nwhen = \"time.hour < 8 || time.hour >= 18 || time.weekday >= 6\"\nverdict = \"hold\"\n\n\
         [[rule]]\nid = \"no-drop\"\nwhen = \"has(args.sql) && args.sql.contains('drop')\"\nverdict = \"deny\"\n\n\
         [[budget]]\nid = \"calls\"\nmax_calls = 1000000\nper = \"1h\"\n\n\
         [[budget]]\nid = \"spend\"\ntool = \"transfer_*\"\nsum = \"args.amount\"\nmax = 1000000\nper = \"24h\"\nverdict = \"hold\"\n\n",
    );
    let verdicts = ["allow", "hold", "deny"];
    for i in 0..n {
        let v = verdicts[i % 3];
        let _ = match i % 10 {
            // exact tool names (40%)
            0..=2 => writeln!(t, "[[rule]]\nid = \"exact-{i}\"\ntool = \"tool_{i}\"\nverdict = \"{v}\"\n"),
            3 => writeln!(t, "[[rule]]\nid = \"exact-srv-{i}\"\nserver = \"srv{}.example.com\"\ntool = \"tool_{i}\"\nverdict = \"{v}\"\n", i % 50),
            // tool globs: prefix and suffix (20%)
            4 => writeln!(t, "[[rule]]\nid = \"prefix-{i}\"\ntool = \"svc{i}_*\"\nverdict = \"{v}\"\n"),
            5 => writeln!(t, "[[rule]]\nid = \"suffix-{i}\"\ntool = \"*_op{i}\"\nverdict = \"{v}\"\n"),
            // server-only (10%)
            6 => writeln!(t, "[[rule]]\nid = \"server-{i}\"\nserver = \"host{i}.example.com\"\nverdict = \"{v}\"\n"),
            // CEL conditions over nested args (30%)
            7 => writeln!(t, "[[rule]]\nid = \"cel-amount-{i}\"\ntool = \"transfer_{i}\"\nwhen = \"args.amount > {i} && args.meta.currency == 'EUR'\"\nverdict = \"{v}\"\n"),
            8 => writeln!(t, "[[rule]]\nid = \"cel-path-{i}\"\ntool = \"fs{i}_*\"\nwhen = \"args.path.startsWith('/srv/{i}') || 'admin' in args.tags\"\nverdict = \"{v}\"\n"),
            _ => writeln!(t, "[[rule]]\nid = \"cel-agent-{i}\"\ntool = \"tool_{}\"\nwhen = \"agent.name == 'bot-{i}' && process.uid == 1000\"\nverdict = \"{v}\"\n", i.saturating_sub(9)),
        };
    }
    t
}

fn calls(n: usize) -> Vec<CallContext> {
    let mk = |tool: &str, server: &str, args: serde_json::Value| CallContext {
        agent: AgentInfo {
            name: "billing-bot".into(),
            owner: Some("alice".into()),
            orphaned: false,
        },
        process: kya_common::ProcessIdentity {
            pid: 42,
            uid: 1000,
            gid: 1000,
            exe: "/usr/bin/python3".into(),
            comm: "python3".into(),
            cgroup: "/agents/billing".into(),
            ..Default::default()
        },
        server: server.into(),
        destination: None,
        method: "tools/call".into(),
        tool: Some(tool.into()),
        args,
        time: time::macros::datetime!(2026-11-26 12:00 UTC),
        credential: None,
        tool_pin: Default::default(),
    };
    let mid = n / 2;
    let m10 = |x: usize, r: usize| (x / 10) * 10 + r;
    vec![
        mk(
            &format!("tool_{}", m10(mid, 0)),
            "mcp.example.com",
            json!({"id": 7, "fields": ["a", "b"]}),
        ),
        mk(
            &format!("tool_{}", m10(mid, 3)),
            &format!("srv{}.example.com", m10(mid, 3) % 50),
            json!({"q": "x"}),
        ),
        mk(
            &format!("svc{}_list", m10(mid, 4)),
            "mcp.example.com",
            json!({"limit": 50}),
        ),
        mk(
            &format!("db_op{}", m10(mid, 5)),
            "mcp.example.com",
            json!({"table": "users"}),
        ),
        mk(
            "anything",
            &format!("host{}.example.com", m10(mid, 6)),
            json!({}),
        ),
        mk(
            &format!("transfer_{}", m10(mid, 7)),
            "pay.example.com",
            json!({"amount": 25000, "to": "bob", "meta": {"currency": "EUR", "ref": "inv-1"}}),
        ),
        mk(
            &format!("fs{}_read", m10(mid, 8)),
            "files.example.com",
            json!({"path": format!("/srv/{}/data.csv", m10(mid, 8)), "tags": ["ops", "admin"]}),
        ),
        mk(
            "query",
            "db.example.com",
            json!({"sql": "select * from users where id = 1"}),
        ),
        mk(
            "unknown_tool",
            "mcp.example.com",
            json!({"x": {"y": [1, 2, 3]}}),
        ),
    ]
}

fn engine(n: usize) -> PolicyEngine {
    engine_of(&policy_text(n))
}

/// An engine over one policy text, with in-memory budgets.
fn engine_of(text: &str) -> PolicyEngine {
    let policy = Policy::from_sources(&[Source::new("bench.toml", text.to_string())])
        .expect("bench policy compiles");
    PolicyEngine::from_parts(
        policy,
        Registry::empty(),
        Vec::new(),
        None,
        BudgetState::in_memory(),
    )
}

fn percentiles(e: &PolicyEngine, calls: &[CallContext]) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = Vec::with_capacity(90_000);
    for _ in 0..10_000 {
        for c in calls {
            let t = Instant::now();
            black_box(e.decide(black_box(c)));
            samples.push(t.elapsed());
        }
    }
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_decide");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    for n in [10usize, 100, 1_000, 10_000] {
        let e = engine(n);
        let cs = calls(n);
        // Sanity: the mix really exercises matching (not all defaults).
        let decided_by_rules = cs.iter().filter(|c| e.decide(c).rule.is_some()).count();
        assert!(
            decided_by_rules >= cs.len() / 2,
            "n={n}: only {decided_by_rules} calls matched rules"
        );
        g.bench_function(format!("{n}_rules_mixed_calls"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % cs.len();
                black_box(e.decide(black_box(&cs[i])))
            })
        });
        let (p50, p99) = percentiles(&e, &cs);
        println!(
            "policy_decide/{n}_rules: per-decision median {p50:?}, p99 {p99:?} ({} calls x 10000)",
            cs.len()
        );
    }
    // `matches` compiles its regex on every evaluation in the cel crate
    // (0.15): measured separately so policies can budget for it.
    let e = engine_of(
        "[[rule]]\nid = \"sel\"\ntool = \"query\"\nwhen = \"args.sql.matches('^(?i)select ')\"\nverdict = \"allow\"\n",
    );
    let c = calls(10).swap_remove(7);
    g.bench_function("one_rule_with_matches", |b| {
        b.iter(|| black_box(e.decide(black_box(&c))))
    });

    // A busy budget: 50,000 forwarded calls already in its window (e.g. 14
    // calls/s for an hour). What one more decision costs, and what the
    // forwarding path costs (check + reserve, then commit).
    let e = engine_of(
        "[defaults]\nverdict = \"allow\"\n[[budget]]\nid = \"calls\"\nmax_calls = 1000000000\nper = \"1h\"\n",
    );
    let mut c = calls(10).swap_remove(0);
    let start = c.time;
    for i in 0..50_000i64 {
        c.time = start + time::Duration::milliseconds(i * 70);
        e.record_forwarded(&c);
    }
    g.bench_function("budget_50k_events_decide", |b| {
        b.iter(|| black_box(e.decide(black_box(&c))))
    });
    g.bench_function("budget_50k_events_reserve_commit", |b| {
        b.iter(|| {
            let (d, r) = e.decide_reserving(black_box(&c));
            if let Some(r) = r {
                e.commit_forwarded(r, &c);
            }
            black_box(d)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
